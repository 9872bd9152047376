"""Copying a bundle onto a device: the device's side of `edgeft bench BUNDLE --remote` (edgeft/remote/sync.py).

Runs on the device with its own Python (standard library only, Python 3.8+), sent as the code of
`python -I -c <this file> prepare|finish FINAL PARTIAL`:

- prepare: stdin is {"want": the bundle's file list, "hash": the files to hash (null: all), "keep": folders
  that are the user's (an example's `npm ci` install)}. It moves an existing copy at FINAL to PARTIAL (unless
  a killed run left PARTIAL), removes what the bundle does not hold (and unfinished `.part` uploads) outside
  "keep", makes the folders, and prints {"dir": PARTIAL, "files": {relpath: sha256, or "size:N" for a file
  not to hash}} of what is already there.
- finish: the finished copy takes the name FINAL (an older one is moved aside first and removed after), so
  FINAL only ever holds a whole bundle.

Only a folder that is a bundle copy edgeft made is ever renamed, emptied or removed: an empty folder, or one
with a `.edgeft` marker that is not a build's output folder's (that one holds bundles and maybe the user's
files). Unlike the host's rule (edgeft/files.py ensure_replaceable_dir), an empty or unreadable marker counts
as a copy: prepare writes an empty one first, so a copy killed midway is picked up. Anything else is refused
in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Any

MARKER = ".edgeft"
CONTAINER = "output folder"  # the marker's "what" of a build's --out folder (edgeft/files.py CONTAINER)
MAX_MARKER_BYTES = 4096


def marker_what(folder: str) -> str | None:
    """The "what" a folder's marker names, or None (no marker, an empty one, or one that is not JSON)."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            data = json.loads(f.read(MAX_MARKER_BYTES))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data.get("what") if isinstance(data, dict) and isinstance(data.get("what"), str) else None


def ours(folder: str) -> bool:
    """An empty folder, or a bundle copy edgeft made (its marker, and not a build's output folder)."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return False
    if not os.listdir(folder):
        return True
    marker = os.path.join(folder, MARKER)
    if not os.path.isfile(marker) or os.path.getsize(marker) > MAX_MARKER_BYTES:
        return False  # no marker, or more than any marker edgeft writes (its "what" would go unread)
    return marker_what(folder) != CONTAINER


def refuse_unless_ours(folder: str, what: str) -> None:
    if os.path.lexists(folder) and not ours(folder):
        sys.exit(
            f"{folder} exists and is not a bundle edgeft copied (no .edgeft marker, or a build's output "
            f"folder); {what}"
        )


def _kept(rel: str, keep: list[str]) -> bool:
    return any(rel == k or rel.startswith(k + "/") for k in keep)


def _sha256(path: str) -> str:
    """bench_on_device.sha256_file's twin: this code is sent alone, before any bundle file is on the device,
    so it cannot import that one."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(rel: Any) -> bool:
    """A relative path that stays inside the copy (bench_on_device.plain_path's rule; this code is sent
    alone and cannot import it)."""
    return (
        isinstance(rel, str)
        and bool(rel)
        and not rel.startswith("/")
        and "\\" not in rel
        and "\0" not in rel
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )


def _paths(job: Any, key: str, *, null: bool = False) -> list[str] | None:
    """job[key] as a list of plain relative paths (None allowed where `null`); else one line and exit 1."""
    value = job.get(key) if isinstance(job, dict) else None
    if value is None and null:
        return None
    if not isinstance(value, list) or not all(_plain(rel) for rel in value):
        sys.exit(f"the copy job's {key!r} is not a list of plain paths inside the bundle")
    return value


def prepare(final: str, partial: str, job: Any) -> dict[str, Any]:
    """job: {"want": [...], "hash": [...] or null, "keep": [...]} as edgeft/remote/sync.py sends it."""
    want, to_hash, keep = (
        set(_paths(job, "want") or ()),
        _paths(job, "hash", null=True),
        _paths(job, "keep", null=True) or [],
    )
    for d in (final, partial):
        refuse_unless_ours(d, "choose another --remote-dir")
    if not os.path.isdir(partial):
        os.makedirs(os.path.dirname(partial), exist_ok=True)
        if os.path.isdir(final):
            os.rename(final, partial)
        else:
            os.mkdir(partial)
    open(
        os.path.join(partial, MARKER), "a"
    ).close()  # ours from the first moment (the bundle's own replaces it)
    have: dict[str, str] = {}
    for d, dirs, names in os.walk(partial, topdown=False):
        for n in names + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, partial).replace(os.sep, "/")
            if _kept(rel, keep) or (rel == MARKER and rel not in want):
                continue  # the user's install (npm ci in examples/node); our marker, kept till the bundle's
            if rel not in want or os.path.islink(p) or not os.path.isfile(p):
                os.remove(p)
                continue
            if to_hash is not None and rel not in to_hash:
                have[rel] = f"size:{os.path.getsize(p)}"
                continue
            have[rel] = _sha256(p)
        drel = os.path.relpath(d, partial).replace(os.sep, "/")
        if d != partial and not os.listdir(d) and not _kept(drel, keep):
            os.rmdir(d)
    for rel in want:
        os.makedirs(os.path.dirname(os.path.join(partial, rel)), exist_ok=True)
    return {"dir": partial, "files": have}


def finish(final: str, partial: str) -> str:
    old = final + ".old"
    refuse_unless_ours(old, "move it away")
    refuse_unless_ours(final, "choose another --remote-dir")
    if not ours(partial):  # nothing is moved unless the finished copy is there and is ours
        sys.exit(f"{partial} is not a bundle copy edgeft made; copy again")
    if os.path.lexists(old):
        shutil.rmtree(old)
    if os.path.lexists(final):
        os.rename(final, old)
    os.rename(partial, final)
    if os.path.lexists(old):
        shutil.rmtree(old)
    return final


def main(argv: list[str]) -> None:
    step, final, partial = argv[0], *(os.path.abspath(os.path.expanduser(p)) for p in argv[1:3])
    if step == "prepare":
        try:
            job = json.load(sys.stdin)
        except (ValueError, RecursionError):
            sys.exit("the copy job on stdin is not JSON")
        print(json.dumps(prepare(final, partial, job)))
    elif step == "finish":
        print(finish(final, partial))
    else:
        sys.exit(f"unknown step {step!r} (prepare or finish)")


if __name__ == "__main__":
    main(sys.argv[1:])
