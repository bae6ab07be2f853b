"""The data owner's job: tune the adapter on the emulator, return only the adapter.

Also the full fine-tuning baseline (all blocks trainable; embeddings, final norm and head frozen,
as in the paper's FT), through the same training engine (:mod:`offsite.train`).

QA data (a task or prompt/completion pairs) is trained with the loss on the answer tokens only;
raw text with the plain LM loss. A fixed part of the training data is held out for validation
(every 10th example in a seeded order, at least one), and the adapter with the lowest validation
loss is kept, as the reference code keeps the best-perplexity adapter.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import adapters
from .bundle import AdapterBundle, save_adapter
from .data.tokenize import tokenize_qa, tokenize_text
from .dp import DPOptions, make_plan
from .emulator import build_emulator, parse_adapter_layers, split_layers
from .emulator.core import Emulator, state_digest
from .errors import OffsiteError
from .files import check_new_path
from .models.families import get_blocks, num_blocks
from .train import TrainConfig, TrainResult, planned_steps, train


@dataclass
class TrainingData:
    """What to train on: QA pairs (context, target) or raw text documents."""

    kind: str  # "qa" | "text"
    items: list  # list[tuple[str, str]] for qa, list[str] for text
    source: str = ""  # task name or file, for the record

    def __post_init__(self):
        if not self.items:
            raise OffsiteError(f"training data {self.source or ''} has no examples".replace("  ", " "))


def task_data(task) -> TrainingData:
    """The training pairs of a built-in task (its train split), of an own task file
    (:class:`offsite.data.own.OwnTask`: every document, formatted as it is scored) or of a public
    pair source (``squad``: :mod:`offsite.data.squad`)."""
    from .data.own import OwnTask, resolve_task
    from .data.tasks import load_task, train_pairs

    if task == "squad":
        from .data.squad import load_squad

        return TrainingData("qa", train_pairs(load_squad("train")), source="squad")
    task = resolve_task(task)
    if isinstance(task, OwnTask):
        return TrainingData("qa", task.train_pairs(), source=task.source)
    return TrainingData("qa", train_pairs(load_task(task, "train")), source=task)


def file_data(path: str, template: str | None = None) -> TrainingData:
    """Training data from a file: prompt/completion or text (:mod:`offsite.data.user`), or an
    evaluation-format file (multiple choice or generation, :mod:`offsite.data.own`) turned into
    the pairs its scorer would score."""
    from .data.own import file_kind, load_own_task
    from .data.user import load_user_data

    if file_kind(path):
        return task_data(load_own_task(path, template))
    if template is not None:
        raise OffsiteError(f"--template applies to multiple-choice or generation files; {path} holds "
                           "prompt/completion or text records, used verbatim")
    kind, items = load_user_data(path)
    if kind == "qa":
        _warn_glued(items, str(path))
    return TrainingData(kind, items, source=str(path))


def _warn_glued(pairs: list[tuple[str, str]], source: str) -> None:
    """Prompt/completion pairs are used verbatim; a completion glued to its prompt ("Answer:" +
    "bookstore") trains other tokens (book|store) than the scorer's " bookstore". Say so once."""
    glued = [(p, c) for p, c in pairs if p[-1:] and not p[-1:].isspace() and c[:1] and not c[:1].isspace()]
    if glued:
        p, c = glued[0]
        logging.getLogger(__name__).warning(
            "%s: %d of %d completions follow their prompt without a space (e.g. %r + %r), so they train as "
            "other tokens than the ' ' + answer that multiple-choice scoring uses; start each completion "
            "with a space, or give the rows as multiple choice (docs/own-task.md)",
            source, len(glued), len(pairs), p[-12:], c[:12])


def split_validation(items: list, fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Hold out a fixed ``fraction`` (at least one item, when there are two or more)."""
    if len(items) < 2:
        return list(items), []
    keyed = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n_val = max(1, round(len(items) * fraction))
    val_idx = set(keyed[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


def tokenize(tokenizer, data: TrainingData, max_length: int) -> list[dict]:
    if data.kind == "qa":
        return tokenize_qa(tokenizer, data.items, max_length)
    return tokenize_text(tokenizer, data.items, max_length)


BLOCKS = ("all", "bottom")
# what a DP-tuned adapter's manifest says of its training (the rest would leak beyond the guarantee)
# (``blocks``: which adapter blocks the data owner trains; ``assist``: the owner's correction's options and count)
DP_TRAINING_KEYS = ("data", "data_kind", "examples", "config", "steps", "blocks", "assist")


@dataclass
class TuneSettings:
    adapter: str = "full"  # full | lora | bitfit
    lora: adapters.LoraOptions = field(default_factory=adapters.LoraOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.1
    # "bottom": only the bottom adapter blocks train; the top ones stay the original blocks (the
    # owner-assisted recipe, offsite.assist)
    blocks: str = "all"
    # differentially private tuning (offsite.dp): DP-SGD with Opacus; None: plain AdamW
    dp: DPOptions | None = None

    def check(self) -> None:
        if self.adapter not in adapters.KINDS:
            raise OffsiteError(f"unknown adapter kind {self.adapter!r}; choose one of {', '.join(adapters.KINDS)}")
        if self.blocks not in BLOCKS:
            raise OffsiteError(f"unknown adapter blocks {self.blocks!r}; choose one of {', '.join(BLOCKS)}")
        if self.adapter == "lora":
            self.lora.check()
        if not 0.0 <= self.val_fraction < 1.0:
            raise OffsiteError(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        self.train.check()
        if self.dp is not None:
            self.dp.check()
            if self.train.mixed_precision != "no":
                raise OffsiteError("differentially private tuning (--dp-epsilon) runs in float32; leave out "
                                   "--precision bf16")

    def split(self, items: list) -> tuple[list, list]:
        """(training, validation) items: with DP every item trains (the kept adapter is the last one,
        not one chosen by a non-private validation on held-out private examples)."""
        if self.dp is not None:
            return list(items), []
        return split_validation(items, self.val_fraction, self.train.seed)

    @classmethod
    def from_tuning(cls, tuning: dict, dp: dict | None = None, base: TrainConfig | None = None) -> TuneSettings:
        """Settings from a recipe's ``[tuning]`` and ``[dp]`` (:mod:`offsite.experiment.recipe`; the
        command line's training flags as the same dict) over ``base`` (default: TrainConfig's
        defaults): the one place flags and recipe files become settings. ``tuning`` holds TrainConfig
        fields, ``adapter``, ``blocks``, ``precision`` and LoRA's options as ``lora_<field>``; a batch
        size given without a micro-batch size caps the micro-batch at it."""
        import dataclasses

        from .train import resolve_precision

        cfg = base or TrainConfig()
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        changes = {k: v for k, v in tuning.items() if k in train_fields}
        if "batch_size" in changes and "micro_batch_size" not in changes:
            changes["micro_batch_size"] = min(changes["batch_size"], cfg.micro_batch_size)
        if tuning.get("precision"):
            changes["mixed_precision"] = resolve_precision(tuning["precision"])
        lora = adapters.LoraOptions(**{k[len("lora_"):]: v for k, v in tuning.items() if k.startswith("lora_")})
        dp_opts = DPOptions(**dp) if dp else None
        if dp_opts is not None:
            dp_opts.check()
        return cls(adapter=tuning.get("adapter", "full"), lora=lora, train=dataclasses.replace(cfg, **changes),
                   blocks=tuning.get("blocks", "all"), dp=dp_opts)

    def dp_plan(self, n_train: int):
        """The DP mechanism for ``n_train`` training examples (:func:`offsite.dp.make_plan`), or None."""
        if self.dp is None:
            return None
        return make_plan(self.dp, n_train, self.train.batch_size, planned_steps(self.train, n_train))


def check_plan(data: TrainingData, settings: TuneSettings) -> None:
    """Check the settings and that they make at least one optimizer step on ``data`` (before any
    model is loaded; :func:`offsite.train.train` checks again on the tokenized examples)."""
    settings.check()
    n_train = len(settings.split(data.items)[0])
    planned_steps(settings.train, n_train)
    settings.dp_plan(n_train)  # a budget no noise level reaches fails here


def _train(model, tokenizer, data: TrainingData, settings: TuneSettings, work_dir: Path | None,
           accelerator=None, loss=None, run_info: dict | None = None) -> TrainResult:
    """``loss``: a :class:`offsite.assist.CorrectedLoss` (the owner's correction), else the plain LM loss;
    ``run_info``: what else a checkpoint must match to resume (the correction's options)."""
    from .train import causal_lm_loss

    train_items, val_items = settings.split(data.items)
    train_ex = tokenize(tokenizer, TrainingData(data.kind, train_items, data.source), settings.train.max_length)
    val_ex = tokenize(tokenizer, TrainingData(data.kind, val_items, data.source), settings.train.max_length) \
        if val_items else None
    return train(model, None, train_ex, val_ex, settings.train, out_dir=work_dir,
                 pad_id=tokenizer.pad_token_id, accelerator=accelerator, loss_fn=loss, val_loss_fn=causal_lm_loss,
                 on_step=loss.on_step if loss is not None else None, run_info=run_info,
                 dp=settings.dp_plan(len(train_ex)))


def freeze_top(emu: Emulator) -> None:
    """Freeze the top adapter blocks of ``emu.model`` (prepared for tuning; LoRA layers included)."""
    blocks, n_bottom = get_blocks(emu.model), emu.adapter_layers[0]
    for pos, src in emu.adapter_positions.items():
        if src >= n_bottom:
            for p in blocks[pos].parameters():
                p.requires_grad_(False)


def tune_adapter(emu: Emulator, data: TrainingData, settings: TuneSettings,
                 work_dir: str | Path | None = None, accelerator=None,
                 assist=None) -> tuple[AdapterBundle, TrainResult]:
    """Train the adapter of ``emu`` in place and return it as a bundle (not yet written).

    ``assist``: the model owner's gradient correction (:class:`offsite.assist.Assistant`, or any
    object with its ``opts`` and ``loss(params)``); ``None`` or ``assist.opts.every == 0``: the
    papers' protocol, the data owner alone."""
    positions = emu.adapter_positions
    init_digest = state_digest(emu.adapter_state())
    settings.check()
    model = adapters.prepare(emu.model, positions, settings.adapter, settings.lora)
    if settings.blocks == "bottom":
        freeze_top(emu)
    loss = None
    if assist is not None and assist.opts.on:
        if settings.adapter != "full":
            raise OffsiteError(f"the owner's correction applies to full adapter blocks; tune with --adapter full "
                               f"(got {settings.adapter})")
        loss = assist.loss(adapters.trained_params(model, positions))
    result = _train(model, emu.tokenizer, data, settings, Path(work_dir) if work_dir else None, accelerator, loss,
                    {"assist": assist.opts.record()} if loss is not None else None)
    state = adapters.extract(model, positions, settings.adapter)
    if settings.adapter == "lora":
        emu.model = model.merge_and_unload()  # the emulator now carries the tuned adapter
    for p in emu.model.parameters():
        p.requires_grad_(False)
    emu.model.eval()
    training = {
        "data": data.source, "data_kind": data.kind, "examples": len(data.items),
        "config": asdict(settings.train), "steps": result.steps, "tokens_seen": result.tokens_seen,
        "seconds": round(result.seconds, 2), "best_val_loss": result.best_val_loss,
        "best_step": result.best_step, "history": result.history, "blocks": settings.blocks,
    }
    if loss is not None:  # the owner took part: say how (the history's train_loss includes its linear term)
        training["assist"] = {**assist.opts.record(), "corrections": loss.calls}
    if result.dp is not None:  # losses, token counts and timings are statistics of the private data: not sent
        training = {k: v for k, v in training.items() if k in DP_TRAINING_KEYS}
        training["config"] = {**training["config"], "dp": asdict(settings.dp)}
    lora = asdict(settings.lora) if settings.adapter == "lora" else None
    bundle = adapter_bundle(emu, settings.adapter, state, lora, training, init_digest)
    bundle.dp = result.dp
    return bundle, result


def adapter_bundle(emu: Emulator, kind: str, state: dict, lora: dict | None = None,
                   training: dict | None = None, init_digest: str | None = None) -> AdapterBundle:
    """Wrap adapter tensors of ``emu`` as a bundle that names the emulator it belongs to."""
    manifest = emu.manifest or {}
    return AdapterBundle(
        kind=kind, state=state, emulator_digest=manifest.get("digest", ""),
        adapter_init_digest=manifest.get("adapter_init_digest") or init_digest or state_digest(emu.adapter_state()),
        base=emu.base, lora=lora, training=training or {},
    )


def untuned_adapter(emu: Emulator) -> AdapterBundle:
    """The adapter as shipped (the original blocks), as a full adapter bundle."""
    return adapter_bundle(emu, "full", adapters.extract(emu.model, emu.adapter_positions, "full"))


def tune_to_dir(emu: Emulator, data: TrainingData, settings: TuneSettings, out: str | Path,
                overwrite: bool = False, accelerator=None, assist=None) -> AdapterBundle:
    """Tune and write the adapter bundle atomically. Checkpoints go to ``<out>.work/`` so that a
    killed run resumes when the same command is run again; they are removed on success."""
    out = Path(out)
    check_new_path(out, overwrite)
    work = out.with_name(out.name + ".work")
    bundle, _ = tune_adapter(emu, data, settings, work, accelerator, assist)
    from accelerate import PartialState

    state = PartialState()  # under `accelerate launch`, only the main process writes the bundle
    if state.is_main_process:
        save_adapter(bundle, out, overwrite=overwrite)
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    return bundle


def ceiling_emulator(model, tokenizer, name: str, adapter_layers) -> Emulator:
    """The ceiling's "emulator": the full middle, every original block (tuning the adapter on it is
    tuning the adapter on the full model, through the same code path as on any emulator)."""
    layers = parse_adapter_layers(adapter_layers)
    middle = split_layers(num_blocks(model.config), layers)[1]
    return build_emulator("uniform", model, tokenizer, name, layers, keep=len(middle))


def tune_ceiling(model, tokenizer, name: str, adapter_layers, data: TrainingData, settings: TuneSettings,
                 work: Path) -> tuple[Emulator, AdapterBundle, TrainResult]:
    """The adapter tuned with ``settings`` on ``data`` on the full middle of ``model`` (which is not
    modified: the returned emulator holds copies of the adapter blocks): the ceiling row's training,
    the floor's (on public pairs) and the distilled Plug-in's (:mod:`offsite.distilled_plugin`).
    Checkpoints go to ``work``, removed once done. Returns (that emulator, the adapter as a bundle,
    which names no emulator, and the training result)."""
    full_middle = ceiling_emulator(model, tokenizer, name, adapter_layers)
    bundle, trained = tune_adapter(full_middle, data, settings, work)
    shutil.rmtree(work, ignore_errors=True)
    return full_middle, bundle, trained


def finetune_full(model, tokenizer, data: TrainingData, settings: TuneSettings,
                  work_dir: str | Path | None = None) -> TrainResult:
    """The FT baseline: every block trainable, embeddings, final norm and head frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in get_blocks(model):
        for p in block.parameters():
            p.requires_grad_(True)
    result = _train(model, tokenizer, data, settings, Path(work_dir) if work_dir else None)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return result

