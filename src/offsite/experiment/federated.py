"""The owner's last step of a federation (``offsite federated``): the final adapter plugged into the
full model and the table's rows scored (:func:`evaluate_federated`), through the run's row
evaluation (:func:`offsite.experiment.run.evaluate_row`)."""

from __future__ import annotations

import time
from pathlib import Path

from ..bundle import load_adapter, load_emulator
from ..federated.core import FederationConfig
from ..federated.run import federated_setting, round_records
from ..federated.server import FINAL_DIR, STATE_FILE
from ..files import read_json_file
from ..models.load import load_model, model_display_name
from ..plug import plug, plug_into_emulator
from .run import evaluate_row, row_records


def evaluate_federated(model_name: str, cfg: FederationConfig, task, eval_limit: int | None, text_docs: int | None,
                       batch_size: int = 32, command: str = "", emulator_row: bool = True) -> tuple[list, list]:
    """The owner's last step: plug the final adapter into the full model and score the table's rows
    (Full ZS, Emulator FT with the federated adapter, Plug-in). Returns (records, notes)."""
    state = read_json_file(Path(cfg.out) / STATE_FILE)
    bundle = load_adapter(Path(cfg.out) / FINAL_DIR)
    emu = load_emulator(cfg.emulator)
    manifest = emu.manifest
    base = {"model": model_display_name(model_name), "method": manifest.get("method"),
            "setting": {"adapter_layers": list(emu.adapter_layers), **emu.params,
                        "federated": federated_setting(cfg, state)},
            "middle_params": emu.middle_params()}
    records = []
    if emulator_row:
        plug_into_emulator(emu, bundle)
        t0 = time.perf_counter()
        res = evaluate_row(emu.model, emu.tokenizer, task, eval_limit, text_docs, batch_size)
        records += row_records("emu_ft", res, base, time.perf_counter() - t0, {})
    del emu
    model, tokenizer = load_model(model_name)
    t0 = time.perf_counter()
    res = evaluate_row(model, tokenizer, task, eval_limit, text_docs, batch_size)
    records += row_records("full_zs", res, base, time.perf_counter() - t0, {})
    plugged = plug(model, bundle, manifest)
    t0 = time.perf_counter()
    res = evaluate_row(plugged, tokenizer, task, eval_limit, text_docs, batch_size)
    records += row_records("plugin", res, base, time.perf_counter() - t0, {})
    records += round_records(state, base)
    notes = [f"federated: {cfg.clients} data owners, {cfg.rounds} rounds of {cfg.local_steps} local steps, "
             f"{'SecAgg+' if cfg.secagg else 'no secure aggregation'}"
             + (f", FedProx mu {cfg.proximal_mu:g}" if cfg.proximal_mu else ", FedAvg"),
             f"evaluated on the first {eval_limit} documents of the evaluation split" if eval_limit
             else "evaluated on every evaluation document"]
    return records, notes


__all__ = ["evaluate_federated"]
