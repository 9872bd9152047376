"""`edgeft check BUNDLE`: a bundle proves it is what the build wrote, and that its artifacts still run.

Every file is re-hashed against manifest.json (missing, changed and added files are findings), SHA256SUMS is
validated against the files (it covers manifest.json too, so an edited manifest is caught), every artifact
gets its format's header check (Format.check_file), and each is loaded in its runtime and generates a few
tokens. model.json's prompt recipe (edgeft.recipe) is proved again against its chat template, rendered within
bounds (edgeft.template), and on each artifact's own template and tokenizer; model.kv must say what model.json
says.
manifest.json and SHA256SUMS are read as untrusted input: a damaged or hostile one is a finding, never a
traceback, and no path they name is opened outside the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeft import formats, recipe, runspec
from edgeft.bundle import bundle_files
from edgeft.constants import BUNDLE_USER_DIRS, MANIFEST, MODEL_JSON, MODEL_KV, SHA256SUMS
from edgeft.device import bundle_manifest
from edgeft.device.bundle_manifest import (
    MAX_MANIFEST_BYTES,
    ArtifactEntry,
    Manifest,
    ManifestError,
    read_regular,
    read_sums,
)
from edgeft.device.bundle_manifest import parse_sums as device_sums
from edgeft.errors import EdgeftError, printable
from edgeft.files import sha256_file
from edgeft.probes import first_difference
from edgeft.template import BoundedRender

# Tokens each artifact generates to show it runs (greedy, from a one-message chat through its own template).
PROBE_TOKENS = 4
PROBE_MESSAGES = [{"role": "user", "content": "Hello"}]

# Finding kinds, for --json readers.
MISSING, MODIFIED, UNEXPECTED, NOT_REGULAR = "missing", "modified", "unexpected", "not_regular"
BAD_MANIFEST, BAD_SUMS, BAD_HEADER, RUNTIME = "manifest", "sha256sums", "artifact_header", "runtime"
RECIPE = "recipe"
MAX_MODEL_JSON_BYTES = 4 << 20  # a chat template and a few settings: tens of KB


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a bundle, about one file (a path relative to the bundle)."""

    kind: str
    path: str
    detail: str

    def line(self) -> str:
        """One line, control characters escaped: a file named "x\nok: all good" forges no line."""
        return printable(f"{self.path}: {self.detail}")


@dataclass(frozen=True)
class ArtifactCheck:
    """One artifact listed in the manifest: whether it loaded in its runtime and what it generated."""

    path: str
    format: str
    loaded: bool
    generated: list[int] = field(default_factory=list)
    skipped: str | None = None  # why it was not loaded (failed integrity checks, --no-load)


@dataclass(frozen=True)
class CheckReport:
    """What `edgeft check` found; `passed` when there is no finding."""

    bundle: str
    schema_version: int | None
    build_passed: bool | None  # the manifest's own `passed` (drift budgets at build time), not a finding
    files_checked: int
    artifacts: list[ArtifactCheck]
    findings: list[Finding]
    unverified: list[str] = field(default_factory=list)  # the user's installs inside it (not verified)

    @property
    def passed(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed} | asdict(self)


def parse_manifest(raw: bytes, where: str = MANIFEST) -> Manifest:
    """Validate manifest.json bytes against the bundle schema (edgeft/device/bundle_manifest.py, the module
    the device reads it with); any problem is one EdgeftError line starting with `where`."""
    try:
        return bundle_manifest.parse_manifest(raw, formats.names(), where)
    except ManifestError as e:
        raise EdgeftError(str(e)) from None


def parse_sums(text: str, where: str = SHA256SUMS) -> dict[str, str]:
    """SHA256SUMS lines → {path: sha256}; its first problem is one EdgeftError. The parser is the one the
    bundle's device script runs (edgeft/device/bundle_manifest.py), so `edgeft check` and the device judge
    the same file alike."""
    sums, problems = device_sums(text)
    if problems:
        raise EdgeftError(f"{where}: {problems[0].removeprefix(f'{SHA256SUMS}: ')}")
    return sums


def _user_dir(root: Path, path: Path) -> bool:
    """A real folder where the user installs an example's dependencies (BUNDLE_USER_DIRS)."""
    return path.relative_to(root).as_posix() in BUNDLE_USER_DIRS and path.is_dir() and not path.is_symlink()


def unverified_user_dirs(root: Path) -> list[str]:
    """The user's install folders present in a bundle: not part of it, so nothing in them is verified."""
    return [rel for rel in BUNDLE_USER_DIRS if _user_dir(root, root / rel)]


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """(regular files, anything else: symlinks, fifos, sockets) under root, relative; no symlink followed."""
    regular, odd = [], []
    for dirpath, dirs, names in os.walk(root):
        # an example's dependencies the user installed (npm ci in examples/node) are not the bundle's; a link
        # by that name is still reported
        dirs[:] = [d for d in dirs if not _user_dir(root, Path(dirpath) / d)]
        for n in [*dirs, *names]:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            mode = os.lstat(p).st_mode
            if stat.S_ISREG(mode):
                regular.append(rel)
            elif not stat.S_ISDIR(mode):
                odd.append(rel)
    return sorted(regular), sorted(odd)


class _Checker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.findings: list[Finding] = []
        self.flagged: set[str] = set()  # paths with an integrity finding already (one such line per file)
        self._digests: dict[str, str] = {}

    def add(self, kind: str, path: str, detail: str) -> None:
        if kind in (MISSING, MODIFIED, UNEXPECTED, NOT_REGULAR):
            if path in self.flagged:
                return
            self.flagged.add(path)
        self.findings.append(Finding(kind, path, detail))

    def digest(self, rel: str) -> str:
        if rel not in self._digests:
            self._digests[rel] = sha256_file(self.root / rel)
        return self._digests[rel]


def check_bundle(
    path: Path,
    *,
    load: bool = True,
    threads: int | None = None,
    allow_native_libs: bool = False,
) -> CheckReport:
    """Check a bundle folder (see the module doc); a missing folder is an EdgeftError, all else findings."""
    root = Path(path)
    if not root.is_dir():
        raise EdgeftError(f"{root}: not a bundle folder (expected OUT/<target>/ holding {MANIFEST})")
    c = _Checker(root)
    regular, odd = _walk(root)
    present = set(regular)
    for rel in odd:
        c.add(NOT_REGULAR, rel, "not a regular file (a symlink or device); bundles hold regular files only")

    manifest: Manifest | None = None
    if MANIFEST not in present:
        c.add(MISSING, MANIFEST, "missing; this folder is not a whole bundle")
    else:
        try:
            manifest = parse_manifest(read_regular(root / MANIFEST, MAX_MANIFEST_BYTES))
        except EdgeftError as e:
            c.add(BAD_MANIFEST, MANIFEST, str(e).removeprefix(f"{MANIFEST}: "))
        except OSError as e:
            c.add(BAD_MANIFEST, MANIFEST, f"cannot read it ({e.strerror or e})")

    listed = set(bundle_files(root)) if manifest is None else set(manifest.files)
    if manifest is not None:
        for rel, want in sorted(manifest.files.items()):
            if rel not in present:
                c.add(MISSING, rel, f"missing (listed in {MANIFEST})")
            elif c.digest(rel) != want:
                c.add(MODIFIED, rel, f"sha256 differs from {MANIFEST}: the file changed after the build")
        for rel in sorted(present - listed - {MANIFEST, SHA256SUMS}):
            c.add(UNEXPECTED, rel, f"not in {MANIFEST}: added after the build")
        _check_artifact_entries(c, manifest)
    _check_sums(c, present)

    artifacts: list[ArtifactCheck] = []
    # every file of an artifact's shape, and every artifact the manifest lists, gets its format's header check
    typed = {rel: fmt for rel in present for fmt in formats.EXPORT_FORMATS.values() if fmt.owns(root / rel)}
    if manifest is not None:
        folders = {a.path for a in manifest.artifacts if any(rel.startswith(a.path + "/") for rel in present)}
        typed |= {a.path: formats.get(a.format) for a in manifest.artifacts if a.path in present | folders}
    bad_header: set[str] = set()
    for rel, fmt in sorted(typed.items()):
        try:
            fmt.check_file(root / rel)
        except EdgeftError as e:
            bad_header.add(rel)
            c.add(BAD_HEADER, rel, str(e).removeprefix(f"{root / rel}: "))
    found = _check_recipe(c) if manifest is not None and MODEL_JSON in manifest.files else None
    for a in manifest.artifacts if manifest is not None else []:
        artifacts.append(_run_artifact(c, a, load, threads, allow_native_libs, bad_header, found))
    return CheckReport(
        bundle=str(root),
        schema_version=manifest.schema_version if manifest else None,
        build_passed=manifest.passed if manifest else None,
        files_checked=len(present),
        artifacts=artifacts,
        findings=c.findings,
        unverified=unverified_user_dirs(root),
    )


def _check_artifact_entries(c: _Checker, m: Manifest) -> None:
    """Each artifact's own sha256 agrees with the files list (a file's digest, or a folder's tree digest)."""

    for a in m.artifacts:
        inner = {
            rel.removeprefix(a.path + "/"): d for rel, d in m.files.items() if rel.startswith(a.path + "/")
        }
        if a.path in m.files:
            digest = m.files[a.path]
        elif inner:  # ref: edgeft.bundle.sha256_tree: sha256 over "relpath\0sha256\n" lines in path order
            digest = hashlib.sha256("".join(f"{k}\0{inner[k]}\n" for k in sorted(inner)).encode()).hexdigest()
        else:
            c.add(BAD_MANIFEST, MANIFEST, f"artifact {a.path} has no files in the files list")
            continue
        if digest != a.sha256:
            c.add(BAD_MANIFEST, MANIFEST, f"artifact {a.path}: its sha256 disagrees with the files list")


def _app_conversations(desc: dict[str, Any]) -> list[list[dict[str, str]]]:
    """What an app sends (model.json's system prompt, if any, then a user message) and a several-turn one."""
    system = desc.get("prompt", {}).get("system_prompt") if isinstance(desc.get("prompt"), dict) else None
    head = [{"role": "system", "content": system}] if isinstance(system, str) else []
    return [
        head + PROBE_MESSAGES,
        head + [*PROBE_MESSAGES, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}],
    ]


def _check_recipe(c: _Checker) -> tuple[recipe.Recipe, list[list[dict[str, str]]]] | None:
    """model.json's recipe proved again against its chat template (even when model.json's digest is already a
    finding: an edited template must be named as breaking the recipe), and model.kv equal to model.json's
    flat form. The recipe and the conversations to try it on each artifact, or None."""
    try:
        desc = json.loads(read_regular(c.root / MODEL_JSON, MAX_MODEL_JSON_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        c.add(RECIPE, MODEL_JSON, "cannot be read as JSON; rebuild the bundle")
        return None
    if not isinstance(desc, dict):
        c.add(RECIPE, MODEL_JSON, "not a JSON object; rebuild the bundle")
        return None
    if (c.root / MODEL_KV).is_file() and MODEL_KV not in c.flagged and MODEL_JSON not in c.flagged:
        try:
            same = read_regular(c.root / MODEL_KV, MAX_MODEL_JSON_BYTES).decode("utf-8") == runspec.flat(desc)
        except (OSError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            same = False
        if not same:
            c.add(RECIPE, MODEL_KV, f"does not say what {MODEL_JSON} says (the build writes it from there)")
    raw = desc.get("recipe")
    if raw is None:
        return None  # no recipe claimed: model.json's recipe_reason says why
    try:
        rec = recipe.Recipe.from_json(raw)
        template, variables, prompt = (
            desc.get("chat_template"),
            desc.get("template_variables", {}),
            desc.get("prompt"),
        )
        if not isinstance(template, str) or not isinstance(variables, dict) or not isinstance(prompt, dict):
            raise TypeError
    except TypeError:
        c.add(RECIPE, MODEL_JSON, "recipe: not the shape edgeft writes; rebuild the bundle")
        return None
    # the recipe's text is proved tokenized as edgeft writes it: special tokens parsed, none added
    if prompt.get("parse_special") is not True or prompt.get("add_special_tokens") is not False:
        c.add(
            RECIPE,
            MODEL_JSON,
            "prompt: the recipe is proved with parse_special true, add_special_tokens false",
        )
        return None
    convs = _app_conversations(desc)
    try:
        why = recipe.prove(BoundedRender(template, variables, f"{MODEL_JSON} chat_template"), rec, convs)
    except EdgeftError as e:
        why = str(e).removeprefix(f"{MODEL_JSON} ")
    if why is not None:
        c.add(RECIPE, MODEL_JSON, f"recipe: not what the chat template renders any more: {why}")
        return None
    return rec, convs


def _check_sums(c: _Checker, present: set[str]) -> None:
    """SHA256SUMS covers every file (manifest.json included) and every line matches its file."""
    if SHA256SUMS not in present:
        c.add(MISSING, SHA256SUMS, "missing; a device cannot run `sha256sum -c SHA256SUMS`")
        return
    sums, problems = read_sums(c.root / SHA256SUMS)  # the device script's reader: one verdict on both sides
    if problems:
        c.add(BAD_SUMS, SHA256SUMS, problems[0].removeprefix(f"{SHA256SUMS}: "))
        return
    for rel, want in sorted(sums.items()):
        if rel not in present:
            c.add(MISSING, rel, f"missing (listed in {SHA256SUMS})")
        elif c.digest(rel) != want:
            c.add(MODIFIED, rel, f"sha256 differs from {SHA256SUMS}: the file changed after the build")
    for rel in sorted(present - set(sums) - {SHA256SUMS}):
        c.add(UNEXPECTED, rel, f"not covered by {SHA256SUMS}")


def _run_artifact(
    c: _Checker,
    a: ArtifactEntry,
    load: bool,
    threads: int | None,
    allow_native_libs: bool,
    bad_header: set[str],
    found: tuple[recipe.Recipe, list[list[dict[str, str]]]] | None = None,
) -> ArtifactCheck:
    """Load one artifact in its runtime and generate PROBE_TOKENS tokens, unless it failed a check before."""
    tainted = (
        a.path in c.flagged or a.path in bad_header or any(p.startswith(a.path + "/") for p in c.flagged)
    )
    if not load or tainted:
        why = "--no-load" if not load else "failed the integrity checks; not loaded"
        return ArtifactCheck(a.path, a.format, False, skipped=why)
    full = c.root / a.path
    try:
        if not full.resolve().is_relative_to(c.root.resolve()):
            raise EdgeftError("leads outside the bundle")
        fmt = formats.format_of(full).name
        if fmt != a.format:
            raise EdgeftError(f"is a {fmt} artifact, but {MANIFEST} says {a.format}")
        rt = formats.open_runtime(
            full, threads=threads, n_ctx=512, all_logits=False, allow_native_libs=allow_native_libs
        )
        try:
            rt.vet([PROBE_MESSAGES, *(found[1] if found is not None else [])])  # its own template, bounded
            ids = rt.chat_prompt_ids(PROBE_MESSAGES)
            out = [int(t) for t in rt.generate(ids, PROBE_TOKENS)]
            recipe_diff = _recipe_on(rt, found) if found is not None else None
        finally:
            rt.close()
        if not out or not all(0 <= t < rt.n_vocab for t in out):
            raise EdgeftError(f"generated {out!r}, not {PROBE_TOKENS} token ids of its vocabulary")
    except EdgeftError as e:
        c.add(RUNTIME, a.path, f"does not run: {str(e).removeprefix(f'{full}: ')}")
        return ArtifactCheck(a.path, a.format, False)
    except Exception as e:  # noqa: BLE001 - a runtime can fail in its own ways; that is this finding
        c.add(
            RUNTIME, a.path, f"does not run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        return ArtifactCheck(a.path, a.format, False)
    if recipe_diff is not None:
        c.add(RECIPE, a.path, f"{MODEL_JSON}'s recipe {recipe_diff}")
    return ArtifactCheck(a.path, a.format, True, out)


def _recipe_on(rt: Any, found: tuple[recipe.Recipe, list[list[dict[str, str]]]]) -> str | None:
    """Where the recipe's prompt, tokenized by the artifact's runtime, differs from the ids of its own chat
    template (the app path), or None."""
    rec, convs = found
    for conv in convs:
        at = first_difference(rt.chat_prompt_ids(conv), rt.text_ids(recipe.build(rec, conv)))
        if at is not None:
            return (
                f"gives other prompt ids than this artifact's own chat template (a {len(conv)}-message "
                f"conversation, first difference at token {at})"
            )
    return None
