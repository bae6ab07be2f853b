"""The guard against an adapter that harms the full model (docs/protocol.md, "No harm").

Tuned on an emulator, an adapter can learn to repair the emulator's damage; plugged into the full
model, which had no such damage, that repair can make the model worse than with no adapter at all.
Two checks say so before anyone relies on the adapter:

* :func:`harm_note`: ``offsite run`` warns in its table when the Plug-in scores below Full ZS by more
  than two paired standard errors on the task's documents;
* :func:`check_data`: ``offsite plug --check-data FILE`` scores the model before and after the plug-in
  on a few labelled examples the model owner holds (its own, or ones the data owner agrees to share)
  and refuses to write a plugged model that is worse beyond noise.
"""

from __future__ import annotations

from .errors import OffsiteError
from .eval.paired import paired


def harm_note(scores: dict, task: str) -> str | None:
    """A warning when the Plug-in scores below Full ZS by more than two paired standard errors on
    ``task`` (``scores``: row -> {task: per-document correctness}), else ``None``."""
    rows = [scores.get(r, {}).get(task) for r in ("plugin", "full_zs")]
    if not all(rows):
        return None
    diff, se = paired(*rows)
    if diff >= -2 * se:
        return None
    return (f"the Plug-in is {-100 * diff:.1f} ± {100 * se:.1f} points below Full ZS on {task}: this adapter harms "
            "the full model; do not deploy it (docs/protocol.md, \"No harm\")")


def check_data(before, after, tokenizer, task, limit: int | None = None, batch_size: int = 32) -> dict:
    """Per-document accuracy of the model ``before`` and ``after`` the plug-in on a multiple-choice
    ``task`` (a file of the owner's, :func:`offsite.data.own.resolve_task`): ``{"n", "full_zs",
    "plugin", "diff", "stderr", "harm"}``, ``harm`` the :func:`harm_note` or ``None``."""
    from .data.own import task_name
    from .eval import correct, metric_of

    if metric_of(task) != "acc":
        raise OffsiteError("--check-data takes a multiple-choice file ({question|context, choices, answer} rows)")
    rows = {}
    for row, model in (("full_zs", before), ("plugin", after)):
        rows[row] = correct(model, tokenizer, task, limit=limit, batch_size=batch_size)
    diff, se = paired(rows["plugin"], rows["full_zs"])
    n = len(rows["plugin"])
    return {"n": n, "full_zs": sum(rows["full_zs"]) / n, "plugin": sum(rows["plugin"]) / n, "diff": diff,
            "stderr": se, "harm": harm_note({r: {task_name(task): v} for r, v in rows.items()}, task_name(task))}


__all__ = ["check_data", "harm_note"]
