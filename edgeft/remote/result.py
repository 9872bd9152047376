"""A device's answer, read as a stranger's: bench_on_device.py's JSON parsed into known fields with types,
ranges and length limits before anything is recorded in the bundle.

The device (or whoever answers in its place) decides the bytes. Unbounded, a 200 MB result became a 209 MB
manifest.json that `edgeft check` then refused on every run; NaN and Infinity made manifest.json JSON that jq
and JSON.parse reject; thread counts of -7 and 10^12 reached model.json. Here: the output is capped before it
is parsed (MAX_RESULT_BYTES), nesting, list lengths, keys and strings are bounded, a number that is not finite
or does not fit a double is recorded as null with the reason in `sanitized`, and the fields edgeft acts on
(status, threads, speeds) must have their type and range or are dropped, also with the reason.
"""

from __future__ import annotations

import json
import math
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.remote.ssh import DEVICE_SCRIPT, RESULT_SCHEMA
from edgeft.targets import MAX_THREADS

MAX_RESULT_BYTES = 4 << 20  # a result is tens of KB (a sweep per artifact); far more is not one
MAX_DEPTH = 8  # result.device.energy.* is the deepest the script writes (4)
MAX_ITEMS = 256  # per list or object: artifacts, sweep points, problems, cpu features
MAX_TEXT = 1000  # per string: a reason, a path, a CPU model
MAX_NOTES = 50
MAX_RECORDED_BYTES = (
    64 << 10
)  # one run in manifest.json (a sweep per artifact is a few KB); x MAX_RUNS << 16 MB
STATUSES = ("ok", "failed", "skipped")
SPEEDS = (
    "prefill_tok_s",
    "decode_tok_s",
    "ttft_ms",
    "peak_rss_mb",
    "effective_gb_s",
    "decode_bytes_per_token",
)


class _Bounded:
    """One pass over the parsed JSON that keeps it within the limits, noting what it changed."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text[:200])

    def value(self, v: Any, where: str, depth: int = 0) -> Any:
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, int):
            if abs(v) > 2**53:
                self.note(f"{where}: {str(v)[:20]}… does not fit a double; recorded as null")
                return None
            return v
        if isinstance(v, float):
            if not math.isfinite(v):
                self.note(f"{where}: {v} is not a finite number; recorded as null")
                return None
            return v
        if isinstance(v, str):
            if len(v) > MAX_TEXT:
                self.note(f"{where}: a string of {len(v)} characters, cut to {MAX_TEXT}")
                return v[:MAX_TEXT]
            return v
        if depth >= MAX_DEPTH:
            self.note(f"{where}: nested deeper than {MAX_DEPTH}; recorded as null")
            return None
        if isinstance(v, list):
            if len(v) > MAX_ITEMS:
                self.note(f"{where}: {len(v)} items, cut to {MAX_ITEMS}")
            return [self.value(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v[:MAX_ITEMS])]
        if isinstance(v, dict):
            if len(v) > MAX_ITEMS:
                self.note(f"{where}: {len(v)} keys, cut to {MAX_ITEMS}")
            out = {}
            for k, x in list(v.items())[:MAX_ITEMS]:
                key = str(k)[:100]
                out[key] = self.value(x, f"{where}.{key}", depth + 1)
            return out
        return None


def _loads(text: str) -> Any:
    def constant(name: str) -> float:
        return float("nan")  # NaN, Infinity, -Infinity: recorded as null with the reason

    return json.loads(text, parse_constant=constant)


def _thread_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_THREADS


def _speed(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e12)


def _artifact(a: Any, where: str, b: _Bounded) -> dict[str, Any] | None:
    """One artifact's entry with the fields edgeft acts on checked; None when it is not one at all."""
    if not isinstance(a, dict) or not isinstance(a.get("path"), str) or not a["path"]:
        return None
    if a.get("status") not in STATUSES:
        b.note(f"{where}.status: {str(a.get('status'))[:40]!r} is not one of {STATUSES}; recorded as failed")
        a["status"] = "failed"
    for k in SPEEDS:
        if k in a and not _speed(a[k]):
            b.note(f"{where}.{k}: {str(a[k])[:40]} is not a speed; recorded as null")
            a[k] = None
    best = a.get("best_threads")
    if best is not None and not (
        isinstance(best, dict) and _thread_count(best.get("decode")) and _thread_count(best.get("prefill"))
    ):
        b.note(f"{where}.best_threads: not thread counts from 1 to {MAX_THREADS}; recorded as null")
        a["best_threads"] = None
    sweep = a.get("sweep")
    if not isinstance(sweep, list):
        a["sweep"] = []
    else:
        kept = [p for p in sweep if isinstance(p, dict) and _thread_count(p.get("threads"))]
        kept = [p for p in kept if all(_speed(p.get(k)) for k in SPEEDS)]
        if len(kept) != len(sweep):
            b.note(
                f"{where}.sweep: {len(sweep) - len(kept)} point(s) without a thread count or speeds dropped"
            )
        a["sweep"] = kept
    return a


def parse_result(stdout: str, where: str) -> dict[str, Any]:
    """bench_on_device.py's JSON object within bounds (the module doc); one line when it is not that."""
    if len(stdout) > MAX_RESULT_BYTES:
        raise EdgeftError(
            f"{where}: {DEVICE_SCRIPT} printed more than {MAX_RESULT_BYTES >> 20} MB; a result is tens of KB, "
            "so this is not one (nothing was recorded)"
        )
    text = stdout.strip()
    doc: Any = None
    for candidate in (text, *(reversed(text.splitlines()))):
        try:
            doc = _loads(candidate)
            break
        except RecursionError:
            raise EdgeftError(
                f"{where}: {DEVICE_SCRIPT}'s JSON is nested too deeply to be a result"
            ) from None
        except ValueError:
            continue
    if not isinstance(doc, dict):
        raise EdgeftError(f"{where}: {DEVICE_SCRIPT} printed no JSON object ({text[-200:]!r})")
    if doc.get("schema") != RESULT_SCHEMA:
        raise EdgeftError(
            f"{where}: {DEVICE_SCRIPT} wrote schema {str(doc.get('schema'))[:40]!r}, this edgeft reads "
            f"{RESULT_SCHEMA}; rebuild the bundle with this edgeft"
        )
    b = _Bounded()
    doc = b.value(doc, "result")
    if not isinstance(doc.get("artifacts"), list) or not isinstance(doc.get("integrity"), dict):
        raise EdgeftError(f"{where}: {DEVICE_SCRIPT}'s JSON lacks artifacts or integrity")
    arts = [_artifact(a, f"result.artifacts[{i}]", b) for i, a in enumerate(doc["artifacts"])]
    if any(a is None for a in arts):
        raise EdgeftError(f"{where}: {DEVICE_SCRIPT}'s JSON has an artifact without a path")
    doc["artifacts"] = arts
    integrity = doc["integrity"]
    if not isinstance(integrity.get("ok"), bool):
        raise EdgeftError(f"{where}: {DEVICE_SCRIPT}'s integrity has no ok: true or false")
    if not isinstance(integrity.get("problems", []), list):
        b.note("result.integrity.problems: not a list; recorded as empty")
        integrity["problems"] = []
    settings = doc.get("settings")
    if settings is not None and not isinstance(settings, dict):
        b.note("result.settings: not an object; recorded as null")
        doc["settings"] = settings = None
    if isinstance(settings, dict):
        threads = settings.get("threads")
        if threads is not None and not (isinstance(threads, list) and all(_thread_count(t) for t in threads)):
            b.note("result.settings.threads: not a list of thread counts; recorded as null")
            settings["threads"] = None
        for k in ("prompt_tokens", "decode_tokens", "runs"):
            v = settings.get(k)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**7):
                b.note(f"result.settings.{k}: not a count; recorded as null")
                settings[k] = None
    if b.notes:
        doc["sanitized"] = b.notes
    size = len(json.dumps(doc, indent=2))  # as manifest.json will hold it (non-ASCII escaped)
    if size > MAX_RECORDED_BYTES:
        raise EdgeftError(
            f"{where}: {DEVICE_SCRIPT}'s result would take {size >> 10} KB of manifest.json, more than a run's "
            f"{MAX_RECORDED_BYTES >> 10} KB; nothing was recorded"
        )
    return doc
