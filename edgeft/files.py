"""File helpers shared by the stages: outputs that appear whole and never replace a user's files, content
digests, sizes on disk, small JSON reads."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.guard import read_json  # noqa: F401 - read_json: files is where callers look for it

# Every folder edgeft writes carries this file; an existing folder without it is never replaced or deleted.
MARKER = ".edgeft"
# The marker's "what" for a build's --out folder: it holds bundles (and maybe the user's own files), so it is
# entered and locked, never replaced whole.
CONTAINER = "output folder"


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _marker_what(folder: Path) -> str | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return data.get("what") if isinstance(data, dict) and isinstance(data.get("what"), str) else None


def ensure_replaceable_dir(out: Path, *, enter: bool = False) -> None:
    """Refuse to replace `out` unless it is absent, an empty folder, or a folder edgeft wrote (its marker).

    A build's --out folder (marker CONTAINER) is only ever entered (`enter=True`), never replaced: it may hold
    the user's own files next to the bundles.
    """
    out = Path(out)
    if not out.exists() or _is_empty_dir(out):
        return
    if out.is_dir() and (out / MARKER).is_file():
        what = _marker_what(out)
        if enter or (what is not None and what != CONTAINER):
            return
        if what == CONTAINER:
            raise EdgeftError(
                f"{out}: is a build's --out folder (it holds bundles, maybe your files); "
                "write into a new subfolder of it instead"
            )
    what = "a file" if not out.is_dir() else "a folder edgeft did not write (no .edgeft marker)"
    raise EdgeftError(f"{out}: exists and is {what}; choose another output or move it away")


def unique_sibling(out: Path, tag: str, *, directory: bool) -> Path:
    """A fresh, unique, hidden name next to `out` (created empty), e.g. `.bundle.partial-3kq9x`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.{tag}-", dir=out.parent)
    os.close(fd)
    return Path(name)


def publish_file(tmp: Path, out: Path) -> None:
    """Move a finished temp file to `out` with the permissions a new file gets (mkstemp makes them 0600)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(out: Path, *, what: str = "output", keep: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a fresh folder to fill; on success it becomes `out`, on failure it is removed.

    Only what edgeft wrote is ever replaced (see ensure_replaceable_dir): the temp name is unique per run, the
    old `out` is renamed aside, the new one renamed in, and only then the old one removed — a crash at any
    point leaves either the old output or the new one under `out` (and at worst a hidden `.NAME.old-*`).
    `keep` names folders inside `out` that are the user's (a bundle's examples/node/node_modules): they move
    into the new `out`, and an old output whose folder could not be moved stays beside it, never removed.
    """
    out = Path(out)
    ensure_replaceable_dir(out)
    partial = unique_sibling(out, "partial", directory=True)
    os.chmod(partial, 0o777 & ~_umask())
    try:
        (partial / MARKER).write_text(
            json.dumps({"written_by": "edgeft", "what": what}) + "\n", encoding="utf-8"
        )
        yield partial
        ensure_replaceable_dir(out)  # may have appeared while we worked
        old = None
        if out.exists():
            old = unique_sibling(out, "old", directory=True)
            os.rmdir(old)
            out.rename(old)
        partial.rename(out)
        if old is not None and _carry(old, out, keep):
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _carry(old: Path, new: Path, keep: Sequence[str]) -> bool:
    """Move each `keep` folder (a real folder, not a link) from `old` into `new`; False if any could not be."""
    ok = True
    for rel in keep:
        src, dst = old / rel, new / rel
        if src.is_symlink() or not src.is_dir() or dst.exists():
            continue
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
        except OSError:
            ok = False
    return ok


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder `out` (a second build into it fails at once)."""
    out = Path(out)
    ensure_replaceable_dir(out, enter=True)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"written_by": "edgeft", "what": CONTAINER}) + "\n", encoding="utf-8")
    fd = os.open(out / ".edgeft.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgeftError(
                f"{out}: another edgeft build is writing here; wait for it or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)


def cache_root() -> Path:
    """edgeft's cache folder: $XDG_CACHE_HOME/edgeft, or ~/.cache/edgeft."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "edgeft"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_bytes(path: Path) -> int:
    """Size on disk of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_json(path: Path, obj: Any) -> None:
    """Write a small JSON file whole (a unique temp name, then renamed in)."""
    tmp = unique_sibling(Path(path), "tmp", directory=False)
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def optional_json(path: Path) -> Any:
    """read_json, or {} when the file does not exist."""
    return read_json(path) if Path(path).is_file() else {}


# --- resuming: a stage's output is reused when the key of its inputs matches ---------------------------------


def digest(obj: Any) -> str:
    """sha256 of a JSON-able value (keys sorted): the key of a stage's inputs and settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _key_file(output: Path) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.key")


def done_with(output: Path, key: str) -> bool:
    """Whether `output` exists and was finished from inputs with this key (see mark_done)."""
    kf = _key_file(output)
    return Path(output).exists() and kf.is_file() and kf.read_text(encoding="utf-8").strip() == key


def mark_done(output: Path, key: str) -> None:
    """Record that `output` is complete for `key` (written after the output itself is in place)."""
    kf = _key_file(output)
    tmp = unique_sibling(kf, "tmp", directory=False)
    tmp.write_text(key + "\n", encoding="utf-8")
    os.replace(tmp, kf)


def forget(output: Path) -> None:
    """Drop a stage's record (before redoing it), so a half-redone output is never taken for done."""
    _key_file(output).unlink(missing_ok=True)


# --- resources ---------------------------------------------------------------------------------------------


def available_ram() -> int | None:
    """MemAvailable in bytes (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def require_resources(what: str, *, disk_at: Path | None = None, disk: int = 0, ram: int = 0) -> None:
    """Refuse a heavy step up front when free disk at `disk_at` or available RAM is below what it needs."""
    gb = 1e9
    if disk_at is not None and disk:
        at = Path(disk_at)
        while not at.exists():
            at = at.parent
        free = shutil.disk_usage(at).free
        if free < disk:
            raise EdgeftError(
                f"{what} needs ~{disk / gb:.1f} GB of free disk at {at}, {free / gb:.1f} GB are free; "
                "free some space or choose another --out"
            )
    avail = available_ram()
    if ram and avail is not None and avail < ram:
        raise EdgeftError(
            f"{what} needs ~{ram / gb:.1f} GB of RAM, {avail / gb:.1f} GB are available; close other programs "
            "or use a machine with more memory"
        )


# The temp tag of llama.cpp's quantizer output (`.NAME.quantizing-xxxxxxxx`).
QUANTIZING_TAG = "quantizing"
# tempfile.mkstemp's random part: 8 characters from its alphabet.
_TEMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")


def sweep_temps(out: Path, tags: tuple[str, ...]) -> None:
    """Remove temp files an earlier, killed run of edgeft left next to `out` (only names unique_sibling made
    for it: `.NAME.TAG-xxxxxxxx`), so a crash leaves no clutter behind the next successful run."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for tag in tags:
        prefix = f".{out.name}.{tag}-"
        for stale in out.parent.glob(f"{prefix}*"):
            suffix = stale.name[len(prefix) :]
            if not (_TEMP_SUFFIX.fullmatch(suffix) and stale.is_file() and not stale.is_symlink()):
                continue
            with open(stale, "rb") as f:
                head = f.read(4)
            # only what edgeft's writers and llama.cpp's quantizer start a file with: nothing yet, the magic, or
            # the zeros llama.cpp reserves for the metadata it writes last (ref: llama.cpp src/llama-quant.cpp)
            if head in (b"", b"GGUF", b"\0\0\0\0"):
                stale.unlink(missing_ok=True)


def task_name(text: str) -> str:
    """A task name fit for a file name: letters, digits, '-' and '_' (others become '-'), at most 40."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in text)[:40].strip("-")
    return name or "task"
