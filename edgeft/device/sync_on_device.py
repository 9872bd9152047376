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

Only a folder that is a device copy edgeft made is ever renamed, and only files edgeft put there are ever
removed. A device copy carries its own marker, `.edgeft-copy` (never a file of any bundle): {"what": "device
copy", "files": [every path edgeft copied into it]}, written before the first upload, so a copy killed midway
is still known. Any other folder is refused in one line: a build's --out folder, a bundle built or copied there
by hand (its `.edgeft` marker is a bundle's, not a copy's), the user's own folder. Inside a copy, a file the
record does not list is the user's: it stays where it is (the device script looks only at the files the
manifest lists), and a copy holding such files is never removed whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

COPY_MARKER = ".edgeft-copy"  # a device copy's own marker (edgeft/remote/sync.py never uploads such a name)
COPY_WHAT = "device copy"
MAX_MARKER_BYTES = 1 << 20  # a record of a bundle's file list: a few KB
UPLOAD_SUFFIX = ".part"  # an upload in progress (edgeft/remote/ssh.py UPLOAD_SUFFIX)


def copy_record(folder: str) -> list[str] | None:
    """The files edgeft copied into `folder`, from its device-copy marker; None when it is not a device copy
    (no such marker, a link, too large, not JSON, another "what")."""
    path = os.path.join(folder, COPY_MARKER)
    if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > MAX_MARKER_BYTES:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read(MAX_MARKER_BYTES))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("what") == COPY_WHAT else None
    return files if isinstance(files, list) and all(_plain(rel) for rel in files) else None


def _write_record(folder: str, files: list[str]) -> None:
    tmp = os.path.join(folder, COPY_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"written_by": "edgeft", "what": COPY_WHAT, "files": sorted(files)}, f)
    os.replace(tmp, os.path.join(folder, COPY_MARKER))


def ours(folder: str) -> bool:
    """An empty folder, or a device copy edgeft made (its own marker; a bundle's `.edgeft` is not one)."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return False
    return not os.listdir(folder) or copy_record(folder) is not None


def refuse_unless_ours(folder: str, what: str) -> None:
    if os.path.lexists(folder) and not ours(folder):
        sys.exit(
            f"{folder} exists and is not a bundle copy edgeft made (no {COPY_MARKER} marker: your folder, a "
            f"build's output or a bundle put there by hand); nothing in it was touched; {what}"
        )


def _through_link(root: str, rel: str) -> bool:
    """Whether a folder on the way from `root` to `rel` is a link (writing or removing there would reach
    whatever it points to: the user's folder)."""
    parts = rel.split("/")[:-1]
    return any(os.path.islink(os.path.join(root, *parts[: i + 1])) for i in range(len(parts)))


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
    if any(rel == COPY_MARKER or rel.startswith(COPY_MARKER + ".") for rel in want):
        sys.exit(f"the bundle holds a file named {COPY_MARKER}, the device copy's own marker; refusing it")
    for d in (final, partial):
        refuse_unless_ours(d, "choose another --remote-dir")
    if not os.path.isdir(partial):
        os.makedirs(os.path.dirname(partial), exist_ok=True)
        if os.path.isdir(final):
            os.rename(final, partial)
        else:
            os.mkdir(partial)
    record = set(copy_record(partial) or ())
    linked = sorted(rel for rel in want if _through_link(partial, rel))
    if linked:
        sys.exit(
            f"{partial}/{linked[0]}: reached through a link inside the copy; refusing to write through it"
        )
    _write_record(partial, sorted(record | want))  # before any upload: what this copy may put here
    mine = record | want
    have: dict[str, str] = {}
    for d, dirs, names in os.walk(partial, topdown=False):
        for n in names + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, partial).replace(os.sep, "/")
            if rel == COPY_MARKER or _kept(rel, keep):
                continue  # the record itself; the user's install (npm ci in examples/node)
            upload = (
                rel.endswith(UPLOAD_SUFFIX) and rel[: -len(UPLOAD_SUFFIX)] in mine
            )  # an unfinished upload
            if rel not in want or os.path.islink(p) or not os.path.isfile(p):
                if rel in mine or upload:
                    os.remove(p)  # edgeft's: a file the bundle no longer holds, or a link where one goes
                continue  # not edgeft's: the user's, left alone
            if to_hash is not None and rel not in to_hash:
                have[rel] = f"size:{os.path.getsize(p)}"
                continue
            have[rel] = _sha256(p)
        drel = os.path.relpath(d, partial).replace(os.sep, "/")
        if d != partial and not os.listdir(d) and any(r.startswith(drel + "/") for r in record):
            os.rmdir(d)  # emptied of edgeft's files
    for rel in want:
        os.makedirs(os.path.dirname(os.path.join(partial, rel)), exist_ok=True)
    return {"dir": partial, "files": have}


def _remove_copy(folder: str) -> None:
    """Remove a device copy: the files its record lists, then the folders they emptied, then the folder. A
    file it does not list (the user's) stays, and so does the folder, still marked as a copy."""
    record = copy_record(folder) or []
    for rel in record:
        if _through_link(folder, rel):
            continue  # never through a link: what it points to is not the copy's
        for p in (os.path.join(folder, rel), os.path.join(folder, rel + UPLOAD_SUFFIX)):
            if os.path.islink(p) or os.path.isfile(p):
                os.remove(p)
    for d, _dirs, _names in os.walk(folder, topdown=False):
        drel = os.path.relpath(d, folder).replace(os.sep, "/")
        if d != folder and not os.listdir(d) and any(r.startswith(drel + "/") for r in record):
            os.rmdir(d)
    if sorted(os.listdir(folder)) == [COPY_MARKER]:
        os.remove(os.path.join(folder, COPY_MARKER))
        os.rmdir(folder)
    else:
        _write_record(folder, [])


def finish(final: str, partial: str) -> str:
    old = final + ".old"
    refuse_unless_ours(old, "move it away")
    refuse_unless_ours(final, "choose another --remote-dir")
    if not ours(partial):  # nothing is moved unless the finished copy is there and is ours
        sys.exit(f"{partial} is not a bundle copy edgeft made; copy again")
    if os.path.lexists(old):
        _remove_copy(old)
    if os.path.lexists(old):
        sys.exit(f"{old} holds files edgeft did not copy; move them away")
    if os.path.lexists(final):
        os.rename(final, old)
    os.rename(partial, final)
    if os.path.lexists(old):
        _remove_copy(old)
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
