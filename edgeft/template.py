"""A stranger's chat template rendered within bounds: in a child process with a memory limit, a wall-clock
deadline per request and a cap on each rendering's length.

A chat template is a program from whoever made the model folder or bundle. Jinja's sandbox stops it reaching
Python internals but not running forever (`range(100000)` nested) or growing a string to gigabytes
(`'x' * 2000000000`); in the child both end as one line naming the template, and this process is untouched.
The child (edgeft/template_child.py) renders as transformers does, so a rendering here equals the fine-tune's.
One child serves a process's renders (started once, ~0.1 s; a request ~1 ms), is replaced after a bound is
hit, and renders are batched and cached.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError, printable

# wall clock for one batch; a chat template renders in milliseconds (EDGEFT_RENDER_SECONDS: a slow machine, a test)
MAX_SECONDS = float(os.environ.get("EDGEFT_RENDER_SECONDS") or 20)
MAX_MEMORY = 1 << 30  # the child's address space: Python and jinja2 need ~100 MB of it
MAX_CHARS = 200_000  # one rendering: a 32k-token prompt is ~150k characters
MAX_BATCH = 64  # renders per request, so a reply stays bounded (MAX_BATCH x MAX_CHARS x 6 for JSON escapes)
MAX_REPLY_BYTES = MAX_BATCH * MAX_CHARS * 6 + (1 << 20)
CHILD = Path(__file__).with_name("template_child.py")

Messages = list[dict[str, str]]


class TemplateBoundsError(EdgeftError):
    """A template past the renderer's bounds: a fault of the template, never skipped as a refusal."""


class TemplateRefused(Exception):  # noqa: N818 - the template's own answer, not edgeft's error
    """The template raised for this conversation (raise_exception, or its own bug): an answer, not a fault."""


def _limit_child() -> None:
    """The child's memory limit, never above the one this process already has (a user's ulimit). Its time is
    bounded per request by the parent's wall clock (a long-lived child would exhaust a CPU-seconds limit)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = MAX_MEMORY if hard == resource.RLIM_INFINITY else min(MAX_MEMORY, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class _Child:
    """One renderer child for this process's renders (starting Python and jinja2 costs ~0.1 s; a request to a
    running child ~1 ms): one JSON line in, one out, within a deadline; a child past a bound is killed and the
    next request starts a fresh one."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(CHILD)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=_limit_child if sys.platform != "win32" else None,  # noqa: PLW1509
            )
        return self.proc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def ask(self, request: dict[str, Any], seconds: float) -> tuple[str, Any]:
        """("ok", answer), or ("timeout" | "died" | "too long", stderr's last line)."""
        with self.lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(request).encode("utf-8") + b"\n")
                proc.stdin.flush()
            except OSError:
                return self._died()
            deadline, buf = time.monotonic() + seconds, bytearray()
            fd = proc.stdout.fileno()
            while not buf.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    return "timeout", ""
                ready, _, _ = select.select([fd], [], [], left)
                if not ready:
                    continue
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return self._died()
                buf += chunk
                if len(buf) > MAX_REPLY_BYTES:
                    self.kill()
                    return "too long", ""
            return "ok", json.loads(buf)

    def _died(self) -> tuple[str, str]:
        proc, self.proc = self.proc, None
        err = b""
        if proc is not None:
            proc.wait()
            err = proc.stderr.read()[-2000:] if proc.stderr is not None else b""
            code = proc.returncode
        else:
            code = 0
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit status {code}"]
        return ("died", printable(last[0][:200]) + (" (killed)" if code < 0 else ""))


_CHILD = _Child()
atexit.register(_CHILD.kill)


def render_many(
    template: str,
    variables: dict[str, Any],
    renders: Sequence[tuple[Messages, bool]],
    *,
    where: str,
    seconds: float | None = None,
    now: str | None = None,
) -> list[str | TemplateRefused]:
    """Each (messages, add_generation_prompt) rendered: its text, or TemplateRefused when the template raised.
    A template past a bound (time, memory, length, recursion; `seconds` defaults to MAX_SECONDS) is one
    EdgeftError naming `where`. `now` (ISO time): what `strftime_now` formats instead of the clock."""
    seconds = MAX_SECONDS if seconds is None else seconds
    out: list[str | TemplateRefused] = []
    for i in range(0, len(renders), MAX_BATCH):
        out += _batch(template, variables, renders[i : i + MAX_BATCH], where, seconds, now)
    return out


def _batch(
    template: str,
    variables: dict[str, Any],
    renders: Sequence[tuple[Messages, bool]],
    where: str,
    seconds: float,
    now: str | None,
) -> list[str | TemplateRefused]:
    request = {
        "template": template,
        "variables": variables,
        "renders": list(renders),
        "max_chars": MAX_CHARS,
        "now": now,
    }
    limits = (
        f"edgeft renders a template within {seconds:g} s, {MAX_MEMORY >> 20} MB and {MAX_CHARS} characters"
    )
    try:
        status, reply = _CHILD.ask(request, seconds)
    except OSError as e:
        raise TemplateBoundsError(f"{where}: cannot start the template renderer ({e})") from None
    if status == "timeout":
        raise TemplateBoundsError(f"{where}: the chat template did not finish rendering ({limits})")
    if status != "ok":
        if status == "died" and "jinja2" in str(reply) and "sandbox" in str(reply):
            raise TemplateBoundsError(f"{where}: {reply}")
        raise TemplateBoundsError(f"{where}: the chat template needed more memory than allowed ({limits})")
    out: list[str | TemplateRefused] = []
    for r in reply:
        if "text" in r:
            out.append(str(r["text"]))
        elif r.get("limit"):
            raise TemplateBoundsError(f"{where}: the chat template {r.get('error')} ({limits})")
        else:
            out.append(TemplateRefused(str(r.get("error"))))
    return out


# Renderings made within bounds in this process, by digest of (template, variables, messages, gen): the text,
# or the template's refusal.
_VETTED: dict[str, str | TemplateRefused] = {}


def _digest(template: str, variables: dict[str, Any], messages: Messages, gen: bool, now: str | None) -> str:
    import hashlib

    raw = json.dumps([template, variables, messages, gen, now], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def vet(
    template: str,
    variables: dict[str, Any],
    renders: Sequence[tuple[Messages, bool]],
    *,
    where: str,
    now: str | None = None,
) -> None:
    """Render these within bounds first (batched, each input once per process), so that an in-process renderer
    given the same input next (transformers, llama-cpp-python, onnxruntime-genai) is known to finish: a template
    that would hang, eat memory or grow without end is one EdgeftError naming `where` here instead. The
    template's own refusal is not a fault here: the renderer that follows reports it as it always has. `now`:
    see render_many."""
    todo: dict[str, tuple[Messages, bool]] = {}
    for m, g in renders:
        key = _digest(template, variables, list(m), g, now)
        if key not in _VETTED:
            todo[key] = (list(m), g)
    if todo:
        results = render_many(template, variables, list(todo.values()), where=where, now=now)
        _VETTED.update(zip(todo, results, strict=True))


def rendered(
    template: str,
    variables: dict[str, Any],
    messages: Messages,
    gen: bool,
    *,
    where: str,
    now: str | None = None,
) -> str:
    """The bounded child's rendering (vetted in a batch before, or alone now): edgeft uses this text itself
    rather than rendering the same input again in process, so no template can tell the two apart. Raises
    TemplateRefused when the template refuses the conversation."""
    vet(template, variables, [(messages, gen)], where=where, now=now)
    r = _VETTED[_digest(template, variables, list(messages), gen, now)]
    if isinstance(r, TemplateRefused):
        raise r
    return r


class BoundedRender:
    """A recipe.Render over a stranger's template: `prefetch` renders a batch in one request (vet); a call
    renders what was not prefetched (rendered). The template's refusal raises TemplateRefused, as a Jinja error
    would. Renderings are kept with every other of the process (vet's), by template, variables and `now`."""

    def __init__(self, template: str, variables: dict[str, Any], where: str, now: str | None = None) -> None:
        self.template, self.variables, self.where, self.now = template, variables, where, now

    def prefetch(self, renders: Sequence[tuple[Messages, bool]]) -> None:
        vet(self.template, self.variables, renders, where=self.where, now=self.now)

    def __call__(self, messages: Messages, gen: bool) -> str:
        return rendered(self.template, self.variables, messages, gen, where=self.where, now=self.now)
