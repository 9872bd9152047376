"""The bundle's contract: manifest.json's schema and SHA256SUMS, read and written here only.

Every bundle ships this file beside bench_on_device.py, so the device reads a bundle through the same code
as `edgeft check`, the reports and the recording of device runs on the host. Standard library only, Python
3.8+ (checked by vermin), because it runs on devices without edgeft.

manifest.json (schema_version 2) is one JSON object. The keys every reader relies on are typed here
(`Manifest`): `schema_version`, `passed`, `files` (every file of the bundle but manifest.json and SHA256SUMS
→ sha256) and `artifacts` (path, format, sha256, decode_bytes_per_token); the rest of the document (build
facts, candidates, device runs) is kept as written in `Manifest.doc` for the reports.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# manifest.json layout version: 2 added files, passed, base weights/revision, lora settings, eval split digest.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
SHA256SUMS = "SHA256SUMS"
MAX_SUMS_BYTES = 16 << 20  # larger than any SHA256SUMS a build writes (an ONNX folder adds a line per file)
MAX_MANIFEST_BYTES = 16 << 20  # and than any manifest.json (a few KB; device runs add a few KB each)
# A SHA256SUMS line: optional "\\" (escaped name), digest, " " and " " (text) or "*" (binary), the name.
# ref: GNU coreutils src/digest.c (split_3, the BSD/GNU line formats `sha256sum -c` accepts).
_SUMS_LINE = re.compile(r"(\\?)([0-9a-fA-F]{64}) [ *](.+)")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """manifest.json or SHA256SUMS is not what a build writes; the message is one line naming the file."""


# --- paths and files --------------------------------------------------------------------------------------------


def plain_path(rel: str) -> bool:
    """A relative POSIX path that stays inside the bundle and fits one SHA256SUMS line: no absolute path,
    "..", ".", empty part, backslash, NUL, newline or carriage return."""
    return (
        bool(rel)
        and not rel.startswith("/")
        and "\\" not in rel
        and "\0" not in rel
        and "\n" not in rel
        and "\r" not in rel
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )


def read_regular(path: Path, cap: int) -> bytes:
    """At most cap + 1 bytes of a regular file, never through a symlink (it could lead outside the bundle)
    nor from a FIFO or device (a read that never ends); OSError when it is not one."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise OSError(f"{Path(path).name}: not a regular file")
    with open(path, "rb") as f:
        return f.read(cap + 1)


# --- SHA256SUMS ---------------------------------------------------------------------------------------------


def sums_line(digest: str, rel: str) -> str:
    """One line of SHA256SUMS as GNU `sha256sum` writes it: "<hex>  <path>", text mode (two spaces). Only
    plain paths are written (the reader refuses any other), so no name needs coreutils' escaping."""
    if not plain_path(rel):
        raise ManifestError(f"{SHA256SUMS}: {rel[:200]!r} is not a plain path inside the bundle")
    return f"{digest}  {rel}\n"


def parse_sums(text: str) -> tuple[dict[str, str], list[str]]:
    """SHA256SUMS as GNU `sha256sum` writes it → ({path: hex}, problems). The one parser of it: `edgeft check`
    and the device both call it, so they judge a bundle alike. Lines end at "\\n" only (str.splitlines
    would also split at \\x0c, \\x85 or \\u2028 inside a name); a malformed line, a path that is not plain
    or a name listed twice is a problem, and only the first listing of a name is kept."""
    sums: dict[str, str] = {}
    problems: list[str] = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        m = _SUMS_LINE.fullmatch(line)
        if not m:
            problems.append(f"{SHA256SUMS}: line {n} is not '<sha256>  <path>' ({line[:80]!r})")
            continue
        escaped, digest, name = m.groups()
        if escaped:  # ref: coreutils digest.c filename_unescape: \\ -> \, \n -> newline, \r -> CR
            name = re.sub(r"\\(.)", lambda c: {"\\": "\\", "n": "\n", "r": "\r"}.get(c.group(1), "\0"), name)
        if not plain_path(name):
            problems.append(
                f"{SHA256SUMS}: line {n} path {name[:200]!r} is not a plain path inside the bundle"
            )
        elif name in sums:
            problems.append(f"{SHA256SUMS}: {name[:200]!r} is listed twice")
        else:
            sums[name] = digest.lower()
    return sums, problems


def read_sums(path: Path) -> tuple[dict[str, str], list[str]]:
    """A SHA256SUMS file read and parsed → ({path: hex}, problems): as bytes (read_text would turn "\\r\\n"
    into "\\n"), at most MAX_SUMS_BYTES, UTF-8."""
    try:
        raw = read_regular(path, MAX_SUMS_BYTES)
    except OSError as e:
        return {}, [f"{SHA256SUMS}: cannot be read ({e.strerror or e})"]
    if len(raw) > MAX_SUMS_BYTES:
        return {}, [f"{SHA256SUMS}: more than {MAX_SUMS_BYTES} bytes"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {}, [f"{SHA256SUMS}: not UTF-8 text; the file is damaged"]
    return parse_sums(text)


def dump_sums(files: dict[str, str]) -> str:
    """SHA256SUMS for {path: sha256}, sorted by path."""
    return "".join(sums_line(digest, rel) for rel, digest in sorted(files.items()))


# --- manifest.json --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactEntry:
    """One artifact the manifest lists: where it is, its format and digest, and what decode streams."""

    path: str
    format: str
    sha256: str
    decode_bytes_per_token: int | None = None
    task: str | None = None  # a base + adapter folder: the task (adapter-<task>.gguf) its figures are of


@dataclass(frozen=True)
class Manifest:
    """manifest.json, validated: the typed keys every reader relies on, and the whole document."""

    schema_version: int
    passed: bool | None
    files: dict[str, str]
    artifacts: list[ArtifactEntry]
    doc: dict[str, Any]


# A task name as edgeft.files.task_name makes it (an adapter file is adapter-<task>.gguf).
_TASK = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _rel(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: {what} {str(value)[:80]!r} is not a file name")
    if not plain_path(value):
        raise ManifestError(f"{where}: {what} {value[:200]!r} is not a plain path inside the bundle")
    return value


def parse_manifest(raw: bytes, formats: Sequence[str], where: str = MANIFEST) -> Manifest:
    """Validate manifest.json bytes against the schema (artifact formats among `formats`); any problem is
    one ManifestError line starting with `where`."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where}: {len(raw)} bytes, more than a manifest holds ({MAX_MANIFEST_BYTES})")
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{where}: not UTF-8 text (byte {e.start}); the file is damaged") from None
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{where}: not usable JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {type(doc).__name__}")
    version = doc.get("schema_version")
    if version is None:
        raise ManifestError(
            f"{where}: no schema_version: written by an older edgeft that did not checksum every file; "
            "rebuild the bundle"
        )
    if type(version) is not int or version < 1:
        raise ManifestError(f"{where}: schema_version is {str(version)[:40]!r}, not a positive integer")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: schema_version {version} is newer than this edgeft reads ({SCHEMA_VERSION}); upgrade edgeft"
        )
    if version < SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: schema_version {version} has no file list to check; rebuild the bundle"
        )
    passed = doc.get("passed")
    if passed is not None and not isinstance(passed, bool):
        raise ManifestError(f"{where}: passed is {str(passed)[:40]!r}, not true or false")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise ManifestError(f"{where}: files is missing or not an object of path → sha256")
    for rel, digest in files.items():
        _rel(rel, where, "files entry")
        if rel in (MANIFEST, SHA256SUMS):
            raise ManifestError(f"{where}: files lists {rel}, which cannot hold its own digest")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ManifestError(
                f"{where}: files[{rel[:200]!r}] is {str(digest)[:80]!r}, not a sha256 hex digest"
            )
    arts = doc.get("artifacts")
    if not isinstance(arts, list):
        raise ManifestError(f"{where}: artifacts is missing or not a list")
    artifacts = []
    for i, a in enumerate(arts):
        if not isinstance(a, dict):
            raise ManifestError(f"{where}: artifacts[{i}] is not an object")
        path = _rel(a.get("path"), where, f"artifacts[{i}].path")
        fmt, digest, per_token = a.get("format"), a.get("sha256"), a.get("decode_bytes_per_token")
        if fmt not in formats:
            raise ManifestError(
                f"{where}: artifacts[{i}].format is {str(fmt)[:40]!r}; expected one of {tuple(formats)}"
            )
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ManifestError(f"{where}: artifacts[{i}].sha256 is not a sha256 hex digest")
        if not (isinstance(per_token, int) and not isinstance(per_token, bool) and per_token > 0):
            per_token = None
        task = a.get("task")
        if task is not None and not (isinstance(task, str) and _TASK.fullmatch(task)):
            raise ManifestError(f"{where}: artifacts[{i}].task is not a task name (letters, digits, - and _)")
        artifacts.append(ArtifactEntry(path, fmt, digest, per_token, task))
    return Manifest(version, passed, dict(files), artifacts, doc)


def read_manifest(path: Path, formats: Sequence[str], where: str | None = None) -> Manifest:
    """manifest.json read (a regular file, capped) and validated; ManifestError naming it (`where`, default
    the path) otherwise."""
    where = str(path) if where is None else where
    try:
        raw = read_regular(path, MAX_MANIFEST_BYTES)
    except OSError as e:
        raise ManifestError(f"{where}: cannot be read ({e.strerror or e})") from None
    return parse_manifest(raw, formats, where)


def dump_manifest(doc: dict[str, Any]) -> str:
    """The manifest's text as every writer writes it (two-space indent, a final newline)."""
    return json.dumps(doc, indent=2) + "\n"
