"""Results files (docs/results-format.md): ``{"meta": {...}, "records": [...]}``, one record per number."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}"


def meta(command: str, packages: tuple[str, ...] = ()) -> dict:
    """The ``meta`` block: command, commit, machine, date and library versions (plus ``packages``)."""
    from importlib import metadata

    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "command": command,
        "git_commit": commit,
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"offsite": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version(),
                     **{p: _version(metadata, p) for p in packages}},
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _version(metadata, package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def metric_records(metrics: dict, base: dict, prefix: str = "", **after) -> list[dict]:
    """One record per number of a metrics dict (``{"acc": .., "acc_stderr": .., "n": ..}``):
    ``{**base, "metric", "value", "stderr", "n", **after}``; stderrs and ``n`` travel with their metric."""
    recs = []
    for m, v in metrics.items():
        if m == "n" or m.endswith("_stderr") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        recs.append({**base, "metric": prefix + m, "value": float(v), "stderr": metrics.get(f"{m}_stderr"),
                     "n": metrics.get("n"), **after})
    return recs


def write_results(path: str | Path, meta_block: dict, records: list[dict], **extra) -> None:
    from ..files import write_json_atomic

    write_json_atomic(path, {"meta": meta_block, **extra, "records": records})
