"""What the Python examples share: read a bundle's model.json, pick an artifact, build the conversation,
answer each prompt from the command line, and fail in one line.

model.json (written by edgeft into every bundle) says how the model was verified: chat template and its
variables, whether to add special tokens, the system prompt (null: none), the end-of-turn ids, greedy
settings, context length and threads. Nothing here hard-codes any of it. Python 3.8+, no edgeft needed.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

MODEL_JSON = "model.json"
Messages = List[Dict[str, str]]


class ExampleError(Exception):
    """A one-line failure, printed as `<program>: error: ...` with exit status 1."""


def load_description(bundle: Path) -> Dict[str, Any]:
    """The bundle's model.json."""
    path = bundle / MODEL_JSON
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExampleError(
            f"{path}: cannot read it ({type(e).__name__}); is {bundle} an edgeft bundle?"
        ) from None
    if not isinstance(desc, dict) or desc.get("schema_version") != 1:
        raise ExampleError(f"{path}: not a model.json this example knows (schema_version 1)")
    return desc


def pick_artifact(
    bundle: Path, desc: Dict[str, Any], fmt: str, rel: Optional[str]
) -> Tuple[Path, Dict[str, Any]]:
    """The artifact `rel`, or the bundle's first of format `fmt`, and its model.json entry; never a path
    outside the bundle."""
    entries = {a["path"]: a for a in desc.get("artifacts", []) if a.get("format") == fmt}
    if rel is None:
        if not entries:
            raise ExampleError(f"{bundle}: model.json lists no {fmt} artifact")
        rel = next(iter(entries))
    elif rel not in entries:
        raise ExampleError(
            f"{rel}: not a {fmt} artifact of this bundle (have: {', '.join(entries) or 'none'})"
        )
    path = in_bundle(bundle, rel)
    if path is None or not path.exists():
        raise ExampleError(f"{rel}: missing from the bundle")
    return path, entries[rel]


def in_bundle(bundle: Path, rel: Any) -> Optional[Path]:
    """`rel` (a path from model.json, relative to the bundle) with every symlink resolved, or None when it is
    not a path or leads outside the bundle's real folder (a link to elsewhere, "..", an absolute path)."""
    if not isinstance(rel, str) or not rel:
        return None
    root = bundle.resolve()
    path = (root / rel).resolve()
    return path if root in path.parents else None  # Path.is_relative_to is 3.9+


def bundle_file(bundle: Path, rel: Any, what: str) -> Path:
    """The regular file `rel` names inside the bundle (see in_bundle), or a one-line failure naming `what`."""
    path = in_bundle(bundle, rel)
    if path is None or not path.exists():
        raise ExampleError(f"{str(rel)[:200]}: {what} is not a file inside the bundle")
    if not path.is_file():  # resolved: not a link; is_file refuses folders, devices and pipes
        raise ExampleError(f"{rel}: {what} is not a regular file")
    return path


# A LoRA adapter applied on a base model: its file and its scale (model.json artifacts[].adapters[])
Adapter = Tuple[Path, float]


def pick_adapter(bundle: Path, entry: Dict[str, Any], task: Optional[str]) -> Tuple[Path, Adapter]:
    """A base + adapter artifact's base model file and the adapter of `task` (default: the first listed),
    each a regular file inside the bundle."""
    rel = entry["path"]
    listed = entry.get("adapters")
    if not isinstance(listed, list) or not listed or not all(isinstance(a, dict) for a in listed):
        raise ExampleError(f"{rel}: model.json lists no adapters for this base + adapter artifact")
    tasks = [str(a.get("task")) for a in listed]
    if task is not None and task not in tasks:
        raise ExampleError(f"--task {task}: {rel} has no such task (have: {', '.join(tasks)})")
    i = 0 if task is None else tasks.index(task)
    # each file sits directly in the artifact's own folder (the files edgeft check loaded), then in the bundle
    for p in (entry.get("base"), listed[i].get("path")):
        if not isinstance(p, str) or not p.startswith(f"{rel}/") or "/" in p[len(rel) + 1 :]:
            raise ExampleError(f"{p}: not a file inside the bundle's {rel} folder")
    base = bundle_file(bundle, entry.get("base"), f"the base model of {rel}")
    adapter = bundle_file(bundle, listed[i].get("path"), f"the {tasks[i]} adapter of {rel}")
    scale = listed[i].get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ExampleError(f"{rel}: the {tasks[i]} adapter's scale {scale!r} is not a number")
    return base, (adapter, float(scale))


def threads(desc: Dict[str, Any], entry: Dict[str, Any], phase: str = "decode") -> int:
    """Threads for `phase` ("decode" or "prefill"): what the artifact ran fastest at on the device (after
    `edgeft bench --remote`), else the target profile's; never more than this machine's cores (more threads
    than cores stall llama.cpp)."""
    measured = entry.get("threads") or {}
    wanted = int(measured.get(phase) or desc.get("threads") or 1)
    return max(1, min(wanted, os.cpu_count() or 1))


def conversation(desc: Dict[str, Any], prompt: str) -> Messages:
    """The messages verify sent: model.json's system prompt (unless null), then the user's prompt."""
    system = desc["prompt"].get("system_prompt")
    head = [] if system is None else [{"role": "system", "content": system}]
    return head + [{"role": "user", "content": prompt}]


# A chat template is a program from whoever made the bundle: it renders in a child Python within these bounds
# (a nested range(100000) loop would hang the app; 'x' * 2000000000 would take ~24 GB).
RENDER_SECONDS = int(os.environ.get("EDGEFT_RENDER_SECONDS") or 20)  # a slow board (or a test) may change it
RENDER_MEMORY = 1 << 30
RENDER_CHARS = 200_000


def _limit_child() -> None:
    import resource

    for which, want in ((resource.RLIMIT_AS, RENDER_MEMORY), (resource.RLIMIT_CPU, RENDER_SECONDS + 1)):
        hard = resource.getrlimit(which)[1]
        limit = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(which, (limit, limit))


def render(desc: Dict[str, Any], messages: Messages) -> str:
    """model.json's chat template rendered (render_here) in a child Python with a memory, CPU and time limit
    and a cap on the text's length; a template past them is one line naming it."""
    import subprocess

    here = str(Path(__file__).resolve().parent)
    code = f"import sys; sys.dont_write_bytecode = True; sys.path.insert(0, {here!r}); import bundle_model; "
    code += "bundle_model.render_child()"
    bounds = f"{RENDER_SECONDS} s, {RENDER_MEMORY >> 20} MB, {RENDER_CHARS} characters"
    try:
        res = subprocess.run(
            [sys.executable, "-I", "-c", code],
            input=json.dumps({"desc": desc, "messages": messages}),
            capture_output=True,
            text=True,
            timeout=RENDER_SECONDS,
            preexec_fn=_limit_child if os.name == "posix" else None,
        )
    except subprocess.TimeoutExpired:
        raise ExampleError(f"model.json chat_template: did not finish rendering within {bounds}") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        if "MemoryError" in last or res.returncode < 0:
            last = f"needed more than {bounds}"
        raise ExampleError(f"model.json chat_template: {printable(last[:300])}")
    return json.loads(res.stdout)


def printable(text: str) -> str:
    """Control characters shown as escapes: a template's message must not drive the terminal."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text)


def render_child() -> None:
    """The child's side of render: stdin {"desc", "messages"}, stdout the text as JSON, one line on stderr and
    exit 1 for the template's own error or a bound."""
    job = json.load(sys.stdin)
    try:
        text = render_here(job["desc"], job["messages"])
    except MemoryError:
        sys.exit("MemoryError")
    except Exception as e:  # noqa: BLE001 - the template's own error (raise_exception) or its bug
        sys.exit(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300])
    json.dump(text, sys.stdout)


def render_here(desc: Dict[str, Any], messages: Messages) -> str:
    """model.json's chat template rendered as transformers renders it: Jinja2, sandboxed, trim_blocks and
    lstrip_blocks, loop controls, its `tojson` (non-ASCII kept) and its `raise_exception` and `strftime_now`
    globals, `tools` and `documents` none (ref: transformers utils/chat_template_utils.py
    _compile_jinja_template), with model.json's template variables and the generation prompt; at most
    RENDER_CHARS characters."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(p) if p.isdigit() else 0 for p in jinja2.__version__.split(".")[:3])
    if version < (3, 1, 6):  # CVE-2024-56201, CVE-2024-56326, CVE-2025-27516: sandbox escapes
        raise ValueError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes; pip install 'jinja2>=3.1.6'"
        )

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(desc["chat_template"])
    parts, n = [], 0
    for chunk in template.generate(
        messages=messages,
        tools=None,
        documents=None,
        add_generation_prompt=desc["prompt"]["add_generation_prompt"],
        **desc.get("template_variables", {}),
    ):
        n += len(chunk)
        if n > RENDER_CHARS:
            raise ValueError(f"the rendering grew past {RENDER_CHARS} characters")
        parts.append(chunk)
    return "".join(parts)


def prompt_text(desc: Dict[str, Any], prompt: str) -> str:
    """The text the model is fed for one user prompt: its conversation through model.json's template."""
    return render(desc, conversation(desc, prompt))


def fits(desc: Dict[str, Any], n_prompt: int, max_new: int) -> None:
    """Refuse, in one line, a prompt that leaves no room for the answer in model.json's context."""
    n_ctx = int(desc["context_length"])
    if n_prompt + max_new > n_ctx:
        raise ExampleError(
            f"the prompt ({n_prompt} tokens) and the answer (up to {max_new}) do not fit the context of "
            f"{n_ctx} tokens (model.json context_length); shorten the prompt or pass a smaller --max-tokens"
        )


def runtime(module: str, package: str) -> Any:
    """Import an artifact's runtime, or fail in one line naming what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExampleError(f"{package} is not installed: pip install {package}") from None


def end_ids(desc: Dict[str, Any]) -> List[int]:
    """The ids an answer ends at (model.json tokens.end_of_turn)."""
    return [int(t["id"]) for t in desc["tokens"]["end_of_turn"]]


# An answer function: (artifact, description, prompts, max_new_tokens, (decode, prefill) threads)
# -> [(prompt ids, answer)]; one that runs base + adapter artifacts (main's `adapters=True`) takes the base as
# the artifact and `adapter=` the Adapter to apply (None for a merged model)
Answerer = Callable[..., List[Any]]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 1 like every other failure."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(1)


def main(
    prog: str, fmt: str, answer: Answerer, argv: Optional[List[str]] = None, adapters: bool = False
) -> int:
    """Parse the command line, answer every prompt (each a fresh conversation) and print the answers.
    `adapters`: `answer` also runs base + adapter artifacts (and the command line has `--task`)."""
    here = Path(__file__).resolve().parent
    default_bundle = here.parent.parent if (here.parent.parent / MODEL_JSON).is_file() else None
    ap = _Parser(
        prog=prog,
        description=f"Answer prompts with a bundle's {fmt} artifact, run as model.json describes.",
        epilog=f'Example: python3 {prog} "turn off the kitchen lights" --bundle dist/raspberrypi',
    )
    ap.add_argument("prompts", nargs="+", metavar="PROMPT", help="a user message (each one its own chat)")
    ap.add_argument(
        "--bundle",
        type=Path,
        default=default_bundle,
        help="the bundle folder (default: the one holding this example)",
    )
    ap.add_argument(
        "--artifact", default=None, help=f"{fmt} artifact path in the bundle (default: the first)"
    )
    if adapters:
        ap.add_argument(
            "--task",
            default=None,
            help="the adapter to apply, by task, for a base + adapter artifact (default: the first listed)",
        )
    ap.add_argument("--max-tokens", type=int, default=None, help="longest answer (default: model.json's)")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: model.json's for the artifact)"
    )
    ap.add_argument(
        "--json", action="store_true", help="one JSON line per prompt: prompt, prompt_ids, answer"
    )
    a = ap.parse_args(argv)
    try:
        if a.bundle is None:
            raise ExampleError("no bundle: pass --bundle DIR (the folder holding model.json)")
        desc = load_description(a.bundle)
        path, entry = pick_artifact(a.bundle, desc, fmt, a.artifact)
        task = getattr(a, "task", None)
        adapter: Optional[Adapter] = None
        # a base + adapter folder: load its base and apply one adapter
        if "base" in entry or "adapters" in entry:
            if not adapters:
                raise ExampleError(f"{entry['path']}: a base + adapter artifact, which {prog} does not run")
            path, adapter = pick_adapter(a.bundle, entry, task)
        elif task is not None:
            raise ExampleError(f"--task {task}: {entry['path']} is a merged model, it has no adapters")
        max_new = a.max_tokens if a.max_tokens is not None else int(desc["generation"]["max_new_tokens"])
        if max_new < 1:
            raise ExampleError(f"--max-tokens = {max_new} should be 1 or more")
        if a.threads is not None and a.threads < 1:
            raise ExampleError(f"--threads = {a.threads} should be 1 or more")
        n = (a.threads or threads(desc, entry), a.threads or threads(desc, entry, "prefill"))
        extra = {"adapter": adapter} if adapters else {}
        results = answer(path, desc, a.prompts, max_new, n, **extra)
    except ExampleError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a runtime's load, template or generate error, shown as one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"{prog}: error: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    for prompt, (ids, text) in zip(a.prompts, results):
        line = json.dumps({"prompt": prompt, "prompt_ids": ids, "answer": text}) if a.json else text
        sys.stdout.buffer.write(line.encode("utf-8", errors="replace") + b"\n")
    sys.stdout.flush()
    return 0
