"""General file helpers: atomic writes (a file or a directory appears whole or not at all), SHA-256
digests of regular files, strict JSON reading within size and depth limits, and checks of output
paths made before any heavy work.

Bundles (:mod:`offsite.bundle`), results files, run directories and the benchmarks all write
through these; the module imports nothing of offsite but :mod:`offsite.errors`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import OffsiteError, describe

# Size limits of what a bundle may hold (a peer's file is refused before it is read whole).
MAX_JSON_BYTES = 64 << 20  # manifest.json, config.json
MAX_FILE_BYTES = 1 << 40  # weights and tokenizer files
MAX_JSON_DEPTH = 64


def _open_regular(path: str | Path, limit: int | None):
    """Open ``path`` for reading only if it is a regular file (not a symlink, FIFO, device or
    directory) of at most ``limit`` bytes; the checks are made on the opened descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise OffsiteError(f"{path} is missing") from exc
    except OSError as exc:  # ELOOP: a symlink; EACCES, ...
        raise OffsiteError(f"{path} is not a readable regular file ({exc.strerror})") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OffsiteError(f"{path} is not a regular file")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise OffsiteError(f"{path} is {st.st_size} bytes, more than the {limit} allowed")
    return os.fdopen(fd, "rb")


def sha256_file(path: str | Path, limit: int | None = MAX_FILE_BYTES) -> str:
    """SHA-256 of a regular file (symlinks, FIFOs and devices are refused: they could be endless)."""
    h = hashlib.sha256()
    with _open_regular(path, limit) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_file(path: str | Path, limit: int | None = None):
    """Parse a JSON file strictly: a regular file of at most ``limit`` (MAX_JSON_BYTES) bytes, UTF-8,
    no duplicate keys, no NaN/Infinity and no number beyond a float's range (1e999), nested at most
    MAX_JSON_DEPTH deep; anything else is a one-line OffsiteError."""
    limit = MAX_JSON_BYTES if limit is None else limit
    with _open_regular(path, limit) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise OffsiteError(f"{path} is more than the {limit} bytes allowed")
    return parse_json(raw, str(path))


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: a number JSON allows and a float cannot hold
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def parse_json(raw: bytes | str, source: str):
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                         parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        if isinstance(exc, RecursionError):
            reason = "nested too deeply"
        else:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else describe(exc, 120, typed=False)
        raise OffsiteError(f"{source} is not valid JSON ({reason})") from exc
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise OffsiteError(f"{source} is nested more than {MAX_JSON_DEPTH} levels deep")
    return obj


def json_depth(obj) -> int:
    """Nesting depth of a parsed JSON value (iterative, so any depth is measured safely)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def check_new_path(path: str | Path, overwrite: bool = False) -> None:
    """Refuse to write over an existing path unless asked to, or where it cannot be created
    (checked before any heavy work)."""
    if Path(path).exists() and not overwrite:
        raise OffsiteError(f"{path} already exists; choose another path or pass --overwrite")
    check_parent(path)


def check_parent(path: str | Path) -> None:
    """Refuse an output path that cannot be created: its nearest existing ancestor must be a
    writable directory (not a file), and the path itself not an existing directory when a file is meant."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OffsiteError(f"cannot create {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OffsiteError(f"cannot create {path}: {parent} is not writable")


def check_new_file(path: str | Path) -> None:
    """An output file (``--json``): creatable, and not an existing directory."""
    if Path(path).is_dir():
        raise OffsiteError(f"{path} is a directory; give a file name")
    check_parent(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False):
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    check_new_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows, ensure_ascii: bool = True) -> None:
    """Write ``rows`` as JSON Lines (one object a line), atomically as :func:`write_text_atomic`."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results and manifests private to their writer
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
