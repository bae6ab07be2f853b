"""The data owner's Flower ClientApp: hold a shard, tune the adapter on the emulator, return the update.

Messages it answers (Flower's legacy message types, which SecAgg+'s ``secaggplus_mod`` wraps):

* ``get_properties`` (the handshake, once): config ``emulator_digest`` names the federation's
  emulator. A client holding a bundle (node config ``emulator``, or one received earlier) answers
  with its digest; one holding none gets the bundle's files in a second handshake (config keys
  ``file:<name>``), writes them into its work directory and loads them as any received bundle
  (digests, schema, safetensors only). It answers ``emulator_digest``, ``adapter_digest`` (names
  and shapes of the adapter tensors) and its number of training examples.
* ``fit``: the global adapter (float32 arrays, sorted tensor names) and the round's settings; the
  client writes the adapter into its emulator, makes ``local_steps`` optimizer steps through
  :func:`offsite.train.train` (the engine of ``offsite tune``; FedProx adds ``mu/2 ||w - w_global||^2``;
  ``tune_blocks: bottom`` trains only the bottom adapter blocks; a ``correction``, safetensors bytes
  from the owner, adds its linear term to the loss as :class:`offsite.assist.CorrectedLoss` does)
  and returns the **update** ``w_local - w_global`` weighted by its training examples. A fit whose
  ``emulator_digest`` is not its emulator's is refused with a one-line reason. In a round of
  DP-FedAvg (``--dp-epsilon``: the config carries Flower's clipping norm) the update is clipped to
  that norm by Flower's ``fixedclipping_mod`` (:func:`dp_clipping_mod`), weighs 1, and no loss or
  timing goes with it.
* ``evaluate``: the global adapter's loss on the client's held-out part (a fixed 10 % of its data),
  weighted by target tokens.

Node config (deployment: ``flower-supernode --node-config``): ``data-path`` (this owner's file),
``work-dir``, optionally ``emulator`` (a bundle already on disk) and ``partition-id`` (a label for
logs and ordering). In simulation the data path is ``<shards>/client-<partition-id>.jsonl``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import OffsiteError
from .core import arrays_to_state, keys_digest, state_to_arrays

log = logging.getLogger(__name__)

_FILE_KEY = re.compile(r"file:([A-Za-z0-9_.-]{1,100})")
_EMULATORS: dict[str, object] = {}  # bundle directory -> loaded Emulator (one process may serve many nodes)
_DATA: dict[tuple, tuple] = {}  # (data path, seed, val_fraction, max_length, tokenizer) -> examples


def _load_emulator(path: str):
    from ..bundle import load_emulator

    emu = _EMULATORS.get(path)
    if emu is None:
        _EMULATORS.clear()  # one emulator per process at a time
        emu = _EMULATORS[path] = load_emulator(path)
    return emu


def _examples(data_path: str, emu, seed: int, val_fraction: float, max_length: int):
    from ..tune import TrainingData, file_data, split_validation, tokenize

    key = (data_path, seed, val_fraction, max_length, id(emu.tokenizer))
    if key not in _DATA:
        data = file_data(data_path)
        train_items, val_items = split_validation(data.items, val_fraction, seed)
        train_ex = tokenize(emu.tokenizer, TrainingData(data.kind, train_items, data.source), max_length)
        val_ex = tokenize(emu.tokenizer, TrainingData(data.kind, val_items, data.source), max_length) if val_items else []
        if not train_ex:
            raise OffsiteError(f"{data_path}: no training example left after tokenisation")
        _DATA[key] = (train_ex, val_ex)
    return _DATA[key]


def make_client_fn(data_dir: str | None = None, work_root: str | None = None, fail: dict | None = None,
                   emulators: dict | None = None):
    """The ``client_fn`` of the ClientApp. ``data_dir``/``work_root`` (simulation): shards
    ``client-<partition-id>.jsonl`` and per-client work directories. ``fail`` (benchmarks and tests
    only): ``{"partition": p, "round": r, "after_steps": k}`` makes that client die mid-round, in its
    training (a list of such: several; ``{"partition": p, "round": r, "stage": "setup"}``, a SecAgg+
    stage instead: :func:`make_client_app`).
    ``emulators`` (simulation): ``{partition: bundle dir}`` a client already holds (as node config
    ``emulator`` does in deployment)."""
    from flwr.client import NumPyClient

    class OffsiteClient(NumPyClient):
        def __init__(self, context):
            nc = dict(context.node_config)
            self.partition = int(nc.get("partition-id", context.node_id % 100000))
            self.data_path = str(nc.get("data-path") or (Path(data_dir) / f"client-{self.partition}.jsonl"
                                                         if data_dir else ""))
            if not self.data_path:
                raise OffsiteError("this node has no data: start it with --node-config \"data-path='FILE'\"")
            root = nc.get("work-dir") or (Path(work_root) / f"client-{self.partition}" if work_root else
                                          Path(tempfile.gettempdir()) / "offsite-federated" / f"node-{context.node_id}")
            self.work = Path(root)
            self.own_emulator = nc.get("emulator") or (emulators or {}).get(self.partition) or None
            self.state = context.state

        # -- the emulator this client holds
        def _emulator_dir(self) -> str | None:
            if self.own_emulator:
                return str(self.own_emulator)
            pointer = self.work / "EMULATOR"
            if pointer.is_file():
                d = self.work / pointer.read_text().strip()
                if d.is_dir():
                    return str(d)
            return None

        def _digest(self) -> str | None:
            from ..bundle import load_emulator_manifest

            d = self._emulator_dir()
            return load_emulator_manifest(d)["digest"] if d else None

        def _receive_bundle(self, config: dict, digest: str) -> None:
            from ..bundle import load_emulator_manifest
            from ..files import atomic_dir, write_text_atomic

            files = {}
            for k, v in config.items():
                if k.startswith("file:"):
                    m = _FILE_KEY.fullmatch(k)
                    if not m or not isinstance(v, bytes) or m.group(1).startswith("."):
                        raise OffsiteError(f"refused the emulator bundle: bad file entry {k[:60]!r}")
                    files[m.group(1)] = v
            name = f"emulator-{digest[:16]}"
            self.work.mkdir(parents=True, exist_ok=True)
            with atomic_dir(self.work / name, overwrite=True) as tmp:
                for fname, data in files.items():
                    (tmp / fname).write_bytes(data)
            got = load_emulator_manifest(self.work / name)["digest"]  # verifies every file's digest
            if got != digest:
                shutil.rmtree(self.work / name, ignore_errors=True)
                raise OffsiteError(f"the emulator bundle received has digest {got[:12]}, not the announced {digest[:12]}")
            write_text_atomic(self.work / "EMULATOR", name + "\n")

        def get_properties(self, config):
            digest = str(config.get("emulator_digest", ""))
            if any(k.startswith("file:") for k in config) and not self.own_emulator:
                self._receive_bundle(config, digest)
            have = self._digest()
            props = {"partition": self.partition, "emulator_digest": have or ""}
            if have is not None and have == digest:
                emu = _load_emulator(self._emulator_dir())
                keys, arrays = state_to_arrays(_adapter_state(emu))
                props["adapter_digest"] = keys_digest(keys, arrays)
                train_ex, val_ex = _examples(self.data_path, emu, int(config["seed"]),
                                             float(config["val_fraction"]), int(config["max_length"]))
                props["train_examples"] = len(train_ex)
                props["val_examples"] = len(val_ex)
            return props

        def _ready(self, config):
            digest = str(config.get("emulator_digest", ""))
            have = self._digest()
            if have != digest:
                raise OffsiteError(f"client {self.partition} refuses the round: the adapter is for emulator "
                                   f"{digest[:12]}, this client holds {str(have)[:12]}")
            emu = _load_emulator(self._emulator_dir())
            return emu

        def _set_adapter(self, emu, parameters):
            from ..bundle import AdapterBundle
            from ..plug import plug_into_emulator

            keys, _ = state_to_arrays(_adapter_state(emu))
            m = emu.manifest
            bundle = AdapterBundle(kind="full", state=arrays_to_state(keys, parameters), emulator_digest=m["digest"],
                                   adapter_init_digest=m["adapter_init_digest"], base=emu.base)
            plug_into_emulator(emu, bundle)
            return keys

        def fit(self, parameters, config):
            import torch

            from .. import adapters
            from ..train import TrainConfig, causal_lm_loss, train

            t0 = time.perf_counter()
            _lower_priority()
            emu = self._ready(config)
            keys = self._set_adapter(emu, parameters)
            train_ex, val_ex = _examples(self.data_path, emu, int(config["seed"]), float(config["val_fraction"]),
                                         int(config["max_length"]))
            rnd, steps = int(config["round"]), int(config["local_steps"])
            cfg = TrainConfig(lr=float(config["lr"]), max_steps=steps, batch_size=int(config["batch_size"]),
                              micro_batch_size=int(config["micro_batch_size"]), schedule="constant",
                              warmup_steps=0, seed=int(config["seed"]) + 1000 * rnd + self.partition,
                              eval_every=steps, checkpoint_every=None, max_length=int(config["max_length"]),
                              progress=False, restore_best=False)
            model = adapters.prepare(emu.model, emu.adapter_positions, "full")
            if str(config.get("tune_blocks", "all")) == "bottom":
                from ..tune import freeze_top

                freeze_top(emu)
            mu = float(config.get("proximal_mu", 0.0))
            loss_fn = None
            if mu > 0:
                anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

                def loss_fn(m, batch):
                    s, n = causal_lm_loss(m, batch)
                    prox = sum(((p - p0) ** 2).sum() for p, p0 in anchor)
                    return s + n * (mu / 2) * prox, n

            if config.get("correction"):  # the owner's correction at the global adapter (offsite.assist)
                from ..assist import CorrectedLoss

                c = _correction(config["correction"])
                loss_fn = CorrectedLoss(adapters.trained_params(model, emu.adapter_positions), lambda state: c,
                                        every=steps + 1, base=loss_fn)
            on_step = None
            death = next((f for f in _failures(fail) if "stage" not in f and int(f.get("partition", -1)) == self.partition
                          and int(f.get("round", -1)) == rnd), None)
            if death:
                k, fail_hard = int(death.get("after_steps", 1)), death.get("hard")

                def on_step(record):
                    if record["step"] >= k:
                        if fail_hard:
                            os._exit(9)  # the process dies, as a killed data owner's would
                        raise RuntimeError(f"client {self.partition} killed in round {rnd} after {k} steps")
            torch.manual_seed(cfg.seed)
            result = train(model, None, train_ex, val_ex or None, cfg, loss_fn=loss_fn, pad_id=emu.tokenizer.pad_token_id,
                           on_step=on_step, val_loss_fn=causal_lm_loss)
            for p in emu.model.parameters():
                p.requires_grad_(False)
            emu.model.eval()
            _, new = state_to_arrays(adapters.extract(emu.model, emu.adapter_positions, "full"))
            metrics = {"partition": self.partition, "emulator_digest": emu.manifest["digest"],
                       "adapter_digest": keys_digest(keys, new), "steps": result.steps}
            if _dp_round(config):
                # DP-FedAvg: the new adapter (dp_clipping_mod clips its update and sends the update),
                # weight 1, and no statistic of the data beside it (losses, timings) that the noise would not cover
                return new, 1, metrics
            delta = [n - np.asarray(g, dtype=np.float32) for n, g in zip(new, parameters)]
            last = result.history[-1] if result.history else {}
            metrics.update(train_loss=float(last.get("train_loss") or 0.0), seconds=time.perf_counter() - t0)
            if result.best_val_loss is not None:
                metrics["local_val_loss"] = float(result.best_val_loss)
            return delta, len(train_ex), metrics

        def evaluate(self, parameters, config):
            emu = self._ready(config)
            self._set_adapter(emu, parameters)
            _, val_ex = _examples(self.data_path, emu, int(config["seed"]), float(config["val_fraction"]),
                                  int(config["max_length"]))
            loss, tokens = validation_loss(emu.model, val_ex, int(config["micro_batch_size"]), emu.tokenizer.pad_token_id)
            return float(loss), int(tokens), {"partition": self.partition, "val_examples": len(val_ex)}

    def client_fn(context):
        return OffsiteClient(context).to_client()

    return client_fn


def _dp_round(config) -> bool:
    """Whether the owner runs DP-FedAvg this round: Flower's DP wrapper put the clipping norm in the config."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    return KEY_CLIPPING_NORM in config


def dp_clipping_mod(msg, ctxt, call_next):
    """Flower's ``fixedclipping_mod`` for a round of DP-FedAvg (the owner's
    ``DifferentialPrivacyClientSideFixedClipping`` sent the clipping norm), else nothing.

    ``fixedclipping_mod`` clips the difference between what the client returns and the adapter it
    received, so under DP the client returns its new adapter; this mod then sends the clipped
    *update* (new minus received), which SecAgg+ encodes finely (:mod:`offsite.federated.server`).
    It sits inside ``secaggplus_mod`` (which calls it in SecAgg+'s masking stage, with the fit
    instructions): the update is clipped before it is masked."""
    from flwr.app.message_type import MessageType
    from flwr.client.mod import fixedclipping_mod
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    if not _dp_round(fit_ins.config):
        return call_next(msg, ctxt)
    received = parameters_to_ndarrays(fit_ins.parameters)
    out = fixedclipping_mod(msg, ctxt, call_next)
    if out.has_error():
        return out
    fit_res = compat.recorddict_to_fitres(out.content, keep_input=True)
    clipped = parameters_to_ndarrays(fit_res.parameters)
    update = [w.astype(np.float64) - g.astype(np.float64) for w, g in zip(clipped, received)]
    # float32 rounding of received + clipped update can leave the difference a hair above the clip
    clip, norm = float(fit_ins.config[KEY_CLIPPING_NORM]), float(np.sqrt(sum((u ** 2).sum() for u in update)))
    scale = min(1.0, clip / norm * (1 - 1e-6)) if norm > 0 else 1.0
    fit_res.parameters = ndarrays_to_parameters([(u * scale).astype(np.float32) for u in update])
    out.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return out


def _lower_priority() -> None:
    """Training runs at the niceness in ``$OFFSITE_CLIENT_NICE`` (e.g. 19 on a shared machine), one
    thread a process; the engine's own processes (Ray, Flower) keep the priority they started with."""
    import torch

    want = os.environ.get("OFFSITE_CLIENT_NICE")
    if want:
        try:
            now = os.nice(0)
            if int(want) > now:
                os.nice(int(want) - now)
        except (OSError, ValueError):
            pass
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)


def _correction(data: bytes) -> dict:
    """The owner's correction from the round's config: safetensors bytes (never a pickle)."""
    from ..assist import tensors_from_bytes

    return tensors_from_bytes(data, "the owner's correction")


def _adapter_state(emu) -> dict:
    from .. import adapters

    return adapters.extract(emu.model, emu.adapter_positions, "full")


def validation_loss(model, examples: list[dict], micro_batch_size: int, pad_id) -> tuple[float, int]:
    """Token-weighted mean loss of ``model`` over ``examples`` (answer tokens of QA pairs), and the
    number of target tokens."""
    import torch

    from ..train import causal_lm_loss, collate

    if not examples:
        return 0.0, 0
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), micro_batch_size):
            s, k = causal_lm_loss(model, collate(examples[i:i + micro_batch_size], pad_id if pad_id is not None else 0))
            total += float(s)
            n += int(k)
    return (total / n if n else 0.0), n


def make_client_app(data_dir: str | None = None, work_root: str | None = None, secagg: bool = True,
                    fail: dict | list | None = None, emulators: dict | None = None):
    """The data owners' ClientApp, with Flower's ``secaggplus_mod`` when ``secagg`` (the server must
    then run SecAgg+: the mod refuses a plain training message). ``fail`` (tests and benchmarks):
    see :func:`make_client_fn`; an entry with ``"stage": S`` makes client ``partition`` raise when
    SecAgg+'s stage ``S`` (``setup``, ``share_keys``, ``collect_masked_vectors``, ``unmask``) of
    round ``round`` reaches it."""
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod

    mods = ([secaggplus_mod] if secagg else []) + [dp_clipping_mod]  # clip (DP rounds only), then mask
    stages = [f for f in _failures(fail) if "stage" in f]
    if stages:
        mods = [_failing_stage(stages)] + mods
    return ClientApp(client_fn=make_client_fn(data_dir, work_root, fail, emulators), mods=mods)


def _failures(fail) -> list[dict]:
    return [fail] if isinstance(fail, dict) else list(fail or [])


def _failing_stage(stages: list[dict]):
    """A ClientApp mod raising where ``stages`` say (a client dying in a SecAgg+ stage)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    def mod(msg, context, call_next):
        record = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        stage = record.get(Key.STAGE) if record is not None else None
        for f in stages:
            if (stage == f["stage"] and msg.metadata.group_id == str(f["round"])
                    and int(context.node_config.get("partition-id", -1)) == int(f["partition"])):
                raise RuntimeError(f"client {f['partition']} killed in round {f['round']}, SecAgg+ stage {stage}")
        return call_next(msg, context)

    return mod
