"""Device runs: `edgeft bench BUNDLE [--remote user@host]` records what bench_on_device.py measured in the
bundle (manifest.json's device_latency, report.md's device section, model.json's threads), in one atomic
step, and compares each run with the previous one of the same device."""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from edgeft import formats, runspec
from edgeft.bundle.writer import not_user_dirs, umask
from edgeft.constants import (
    BUNDLE_USER_DIRS,
    MANIFEST,
    MODEL_JSON,
    MODEL_KV,
    REPORT,
    REPORT_HTML,
    SHA256SUMS,
)
from edgeft.device.bundle_manifest import (
    ManifestError,
    dump_manifest,
    dump_sums,
    read_manifest,
)
from edgeft.errors import EdgeftError, printable
from edgeft.files import MARKER, atomic_dir, read_json
from edgeft.report_html import render_html

# --- device results: `edgeft bench BUNDLE [--remote user@host]` records what bench_on_device.py measured ----

# report.md's device section sits between these lines; it is rewritten whole on every recorded run.
MAX_RUNS_PER_DEVICE = 20  # device runs kept in manifest.json per device (the newest) ...
MAX_RUNS = 100  # ... and overall
DEVICE_SECTION_START = "<!-- edgeft:device-latency -->"
DEVICE_SECTION_END = "<!-- /edgeft:device-latency -->"
# A run is flagged as slower than the previous run of the same device when a metric is worse by more than
# the noise: the larger of this share and the spread of that metric over the device's earlier runs
# ((max - min) / median). 10%: thread-count effects on a Pi 5 (up to 21%; ref: learn.arm.com
# llm-decode-roofline) and runtime-update regressions (26 → 2.6 tok/s; ref: ollama #13819) are far above
# it, run-to-run jitter on an idle device below it.
REGRESSION_MIN_SHARE = 0.10
# (key in the device JSON, label, whether higher is better)
DEVICE_METRICS = (
    ("prefill_tok_s", "prefill tok/s", True),
    ("decode_tok_s", "decode tok/s", True),
    ("ttft_ms", "TTFT ms", False),
)


def _real(x: Any) -> float | None:
    """A finite positive number from untrusted JSON, else None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if x == x and 0 < x < float("inf") else None


def _ok_artifacts(result: Any) -> dict[str, dict[str, Any]]:
    arts = result.get("artifacts") if isinstance(result, dict) else None
    return {
        a["path"]: a
        for a in arts or []
        if isinstance(a, dict) and isinstance(a.get("path"), str) and a.get("status") == "ok"
    }


def compare_device_runs(runs: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """The newest run of `where` against the one before it: every metric's change, and the regressions
    (slower beyond noise, see REGRESSION_MIN_SHARE). `runs` is manifest["device_latency"], oldest first."""

    mine = [r for r in runs if isinstance(r, dict) and r.get("where") == where]
    if mine:  # only runs with the same prompt/decode lengths, runs and thread sweep are comparable
        settings = _settings(mine[-1])
        mine = [r for r in mine if _settings(r) == settings]
    out: dict[str, Any] = {"where": where, "previous_recorded": None, "changes": [], "regressions": []}
    if len(mine) < 2:
        return out
    *earlier, current = mine
    out["previous_recorded"] = earlier[-1].get("recorded")
    prev = _ok_artifacts(earlier[-1].get("result"))
    history = [_ok_artifacts(r.get("result")) for r in earlier]
    for path, art in _ok_artifacts(current.get("result")).items():
        if path not in prev:
            continue
        for key, label, higher_better in DEVICE_METRICS:
            new, old = _real(art.get(key)), _real(prev[path].get(key))
            if new is None or old is None:
                continue
            seen = [v for h in history if path in h for v in [_real(h[path].get(key))] if v is not None]
            spread = (max(seen) - min(seen)) / statistics.median(seen) if len(seen) >= 2 else 0.0
            threshold = max(REGRESSION_MIN_SHARE, spread)
            slowdown = 1 - new / old if higher_better else new / old - 1
            change = {
                "artifact": path,
                "metric": key,
                "label": label,
                "previous": old,
                "current": new,
                "slowdown": round(slowdown, 4),
                "threshold": round(threshold, 4),
                "regression": slowdown > threshold,
            }
            out["changes"].append(change)
            if change["regression"]:
                out["regressions"].append(change)
    return out


def _settings(run: dict[str, Any]) -> Any:
    result = run.get("result")
    return result.get("settings") if isinstance(result, dict) else None


def regression_line(r: dict[str, Any]) -> str:
    """One regression in words, e.g. `model-q4_0.gguf decode tok/s 34.7 → 17.3 (50% slower; noise 10%)`."""
    return (
        f"{r['artifact']} {r['label']} {r['previous']:.4g} → {r['current']:.4g} "
        f"({r['slowdown']:.0%} slower; noise {r['threshold']:.0%})"
    )


MARKDOWN_SPECIALS = frozenset("\\`[]!")  # what makes a link, an image or code of plain text


def _cell(x: Any, spec: str = "") -> str:
    """A table cell from untrusted JSON: numbers formatted; text without pipes, line breaks or control
    characters, and with <, > and & as HTML entities (a device's `<script>`, or report.md's own section
    markers in a hostname, stay text)."""
    if x is None:
        return "—"
    if isinstance(x, int | float) and not isinstance(x, bool):
        return format(x, spec) if spec else str(x)
    text = printable(" ".join(str(x).replace("|", "/").split())[:200])
    # no Markdown from a device either: a link or an image in its reason would render as one
    text = "".join("\\" + ch if ch in MARKDOWN_SPECIALS else ch for ch in html.escape(text, quote=False))
    return text or "—"


# /proc/cpuinfo flags → the ISA names of target profiles (the features llama.cpp's and onnxruntime's fast
# kernels use). ref: Linux arch/arm64/kernel/cpuinfo.c (hwcap_str: asimd, asimdhp, asimddp, i8mm, sve, sve2,
# sme, bf16) and arch/x86/include/asm/cpufeatures.h (avx2, avx512f, avx512_vnni, avx_vnni, amx_int8, ...).
CPU_FLAG_ISA = {
    "asimd": "neon",
    "neon": "neon",
    "asimdhp": "fp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
    "sve2": "sve2",
    "sme": "sme",
    "sse4_2": "sse4.2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx_vnni": "avx_vnni",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_int8": "amx",
}


def _device_facts(result: dict[str, Any]) -> str:
    dev = result.get("device") if isinstance(result.get("device"), dict) else {}
    rts = dev.get("runtimes") if isinstance(dev.get("runtimes"), dict) else {}
    temp = dev.get("temperature_c") if isinstance(dev.get("temperature_c"), dict) else {}
    thr = dev.get("throttled") if isinstance(dev.get("throttled"), dict) else {}
    features = dev.get("cpu_features") if isinstance(dev.get("cpu_features"), list) else []
    parts = [
        f"{_cell(dev.get('hostname'))}: {_cell(dev.get('cpu_model'))} ({_cell(dev.get('machine'))}, "
        f"{_cell(dev.get('cores'))} cores, {_cell(dev.get('ram_mb'), '.0f')} MB RAM)",
        f"OS {_cell(dev.get('os'))}",
        f"Python {_cell(dev.get('python'))}",
        ", ".join(f"{_cell(k)} {_cell(v)}" for k, v in rts.items()) or "no runtime",
    ]
    if features:
        flags = {str(f).lower() for f in features}
        isa = [name for flag, name in CPU_FLAG_ISA.items() if flag in flags]
        parts.append(
            f"ISA {' '.join(dict.fromkeys(isa)) or 'none the runtimes use'} (of {len(flags)} CPU flags)"
        )
    if temp.get("before") is not None or temp.get("after") is not None:
        parts.append(f"temperature {_cell(temp.get('before'), '.1f')} → {_cell(temp.get('after'), '.1f')} °C")
    if thr.get("before") is not None or thr.get("after") is not None:
        parts.append(f"throttled {_cell(thr.get('before'))} → {_cell(thr.get('after'))}")
    return "; ".join(parts)


def _energy_lines(result: dict[str, Any]) -> str:
    """Energy per token on the device, or why there is none (bench_on_device.py's energy readers)."""
    dev = result.get("device") if isinstance(result.get("device"), dict) else {}
    energy = dev.get("energy") if isinstance(dev.get("energy"), dict) else None
    if energy is None:
        return "Energy: not measured."
    if not energy.get("available"):
        return f"Energy: not available ({_cell(energy.get('reason'))})."
    idle = energy.get("idle_w")
    parts = []
    for a in result.get("artifacts") or []:
        e = a.get("energy") if isinstance(a, dict) and isinstance(a.get("energy"), dict) else None
        if e is None:
            continue
        watts, idle_w = _real(e.get("decode_w")), _real(idle)
        above = watts - idle_w if watts is not None and idle_w is not None else None
        note = f" ({_cell(e.get('note'))})" if e.get("note") else ""
        parts.append(
            f"- {_cell(a.get('path'))}: {_cell(e.get('decode_j_per_token'), '.4f')} J per decoded token, "
            f"{_cell(e.get('prefill_j_per_token'), '.5f')} J per prompt token, {_cell(e.get('decode_w'), '.2f')} W "
            f"while decoding ({_cell(above, '+.2f')} W over idle){note}"
        )
    head = f"Energy ({_cell(energy.get('detail'))}; idle {_cell(idle, '.2f')} W, measured first):"
    return "\n".join([head, "", *parts]) if parts else head + " no artifact measured."


def render_device_section(manifest: dict[str, Any]) -> str:
    """report.md's device section: per device the newest run next to the build host's figures, the thread
    sweep, and what got slower since that device's previous run."""
    runs = [r for r in manifest.get("device_latency") or [] if isinstance(r, dict)]
    host = {
        a.get("path"): a.get("latency") if isinstance(a.get("latency"), dict) else {}
        for a in manifest.get("artifacts") or []
        if isinstance(a, dict)
    }
    lines = [
        DEVICE_SECTION_START,
        "## On the device",
        "",
        "Measured on the device itself by the bundle's `bench_on_device.py` (`edgeft bench BUNDLE --remote "
        "user@host`, or `edgeft bench BUNDLE` on this machine), each figure at its best thread count; the host "
        "figures are the build host's from the table above. The newest run per device is shown; manifest.json "
        f"keeps the newest {MAX_RUNS_PER_DEVICE} runs per device under `device_latency`. A metric is flagged when it is worse than that device's "
        f"previous run by more than {REGRESSION_MIN_SHARE:.0%} and more than its spread over the earlier runs.",
        "",
    ]
    latest: dict[str, dict[str, Any]] = {}
    for r in runs:
        latest[str(r.get("where"))] = r
    for where, run in latest.items():
        result = run.get("result") if isinstance(run.get("result"), dict) else {}
        lines += [f"### {_cell(where)} — {_cell(run.get('recorded'))}", "", _device_facts(result), ""]
        settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
        if settings:  # TTFT grows with the prompt: say which prompt the device figures used
            lines += [
                f"Device runs: {_cell(settings.get('prompt_tokens'))}-token prompt, "
                f"{_cell(settings.get('decode_tokens'))} decoded tokens, medians of {_cell(settings.get('runs'))} "
                f"runs, threads {_cell(', '.join(map(str, settings.get('threads') or [])))}.",
                "",
            ]
        lines += [
            "| artifact | status | prefill tok/s host / device | decode tok/s host / device | "
            "TTFT ms host / device | peak RSS MB host / device | best threads prefill / decode | "
            "decode GB/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        sweeps = []
        for a in result.get("artifacts") or []:
            if not isinstance(a, dict):
                continue
            path = a.get("path")
            h = host.get(path) or {}
            status = _cell(a.get("status"))
            if a.get("status") != "ok":
                status += f": {_cell(a.get('reason'))}" + (
                    f" (install: `{_cell(a.get('install'))}`)" if a.get("install") else ""
                )
            best = a.get("best_threads") if isinstance(a.get("best_threads"), dict) else {}
            lines.append(
                f"| {_cell(path)} | {status} | {_cell(h.get('prefill_tok_s'), '.0f')} / "
                f"{_cell(a.get('prefill_tok_s'), '.0f')} | {_cell(h.get('decode_tok_s'), '.0f')} / "
                f"{_cell(a.get('decode_tok_s'), '.1f')} | {_cell(h.get('ttft_ms'), '.1f')} / "
                f"{_cell(a.get('ttft_ms'), '.1f')} | {_cell(h.get('peak_rss_mb'), '.0f')} / "
                f"{_cell(a.get('peak_rss_mb'), '.0f')} | {_cell(best.get('prefill'))} / "
                f"{_cell(best.get('decode'))} | {_cell(a.get('effective_gb_s'), '.2f')} |"
            )
            points = [
                f"{_cell(s.get('threads'))} → {_cell(s.get('prefill_tok_s'), '.0f')} / "
                f"{_cell(s.get('decode_tok_s'), '.1f')}"
                for s in a.get("sweep") or []
                if isinstance(s, dict)
            ]
            if points:
                sweeps.append(f"- {_cell(path)}: " + ", ".join(points))
        if sweeps:
            lines += ["", "Thread sweep (threads → prefill / decode tok/s):", "", *sweeps]
        lines += ["", _energy_lines(result)]
        cmp = compare_device_runs(runs, where)
        if cmp["regressions"]:
            lines += ["", f"**Slower than the previous run ({_cell(cmp['previous_recorded'])}):**", ""]
            lines += [f"- {_cell(regression_line(r))}" for r in cmp["regressions"]]
        elif cmp["previous_recorded"]:
            lines += [
                "",
                f"No slowdown beyond noise since the previous run ({_cell(cmp['previous_recorded'])}).",
            ]
        lines.append("")
    lines.append(DEVICE_SECTION_END)
    return "\n".join(lines) + "\n"


def with_device_section(report: str, section: str) -> str:
    """report.md with its device section replaced (or appended when it has none)."""
    start, end = report.find(DEVICE_SECTION_START), report.find(DEVICE_SECTION_END)
    if start != -1 and end > start:
        tail = report[end + len(DEVICE_SECTION_END) :].lstrip("\n")
        return report[:start] + section + tail
    return report.rstrip("\n") + "\n\n" + section


def _rewrite_files(root: Path, new: dict[str, str]) -> None:
    """Replace some files of a bundle as one step: a sibling folder gets hard links to every other file (a
    copy where links fail) and the new contents, then takes the bundle's name (files.atomic_dir)."""

    # the user's installs (BUNDLE_USER_DIRS) move over whole, never linked file by file
    with atomic_dir(root, keep=BUNDLE_USER_DIRS) as tmp:
        for dirpath, dirs, names in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root)
            dirs[:] = not_user_dirs(rel_dir, dirs)
            for d in dirs:
                (tmp / rel_dir / d).mkdir(exist_ok=True)
            for n in names:
                rel = (rel_dir / n).as_posix()
                if rel in new:
                    continue
                src, dst = root / rel, tmp / rel
                if rel == MARKER:
                    dst.unlink(missing_ok=True)
                try:
                    os.link(src, dst, follow_symlinks=False)
                except OSError:
                    shutil.copy2(src, dst, follow_symlinks=False)
        for rel, text in new.items():
            (tmp / rel).write_text(text, encoding="utf-8")
            os.chmod(tmp / rel, 0o666 & ~umask())


def record_device_run(bundle_dir: Path, result: dict[str, Any], where: str) -> dict[str, Any]:
    """Record a bench_on_device.py result in a bundle: appended to manifest.json's `device_latency` (newest
    last: {where, recorded, result}), report.md's device section rewritten, the manifest's report.md digest
    and SHA256SUMS updated, all in one atomic step (the bundle still passes `edgeft check`). Returns the
    comparison with the previous run of the same `where` (compare_device_runs).

    Runs recorded at the same time into one bundle wait for each other (a lock on the bundle's parent folder,
    whose inode stays while the bundle folder is replaced), so none is lost."""
    import fcntl

    root = Path(bundle_dir)
    try:
        fd = os.open(root.resolve().parent, os.O_RDONLY)
    except OSError as exc:
        raise EdgeftError(f"cannot open the folder of bundle {root}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _record(root, result, where)
    finally:
        os.close(fd)


def _record(root: Path, result: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        manifest = read_manifest(root / MANIFEST, formats.names()).doc
    except ManifestError as e:
        raise EdgeftError(
            str(e) if str(e).endswith("rebuild the bundle") else f"{e}; rebuild the bundle"
        ) from None
    if not isinstance(result, dict):
        raise EdgeftError(f"device result for {where}: expected a JSON object, got {type(result).__name__}")
    runs = manifest.get("device_latency", [])
    if not isinstance(runs, list):
        raise EdgeftError(f"{root / MANIFEST}: device_latency is not a list; rebuild the bundle")
    runs.append(
        {"where": where, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "result": result}
    )
    # a bounded history, so manifest.json stays far below what a reader accepts: the newest runs per device,
    # and the newest overall (each run is at most edgeft.remote.result.MAX_RECORDED_BYTES)
    per_device: dict[str, int] = {}
    kept = []
    for r in reversed(runs):
        w = str(r.get("where")) if isinstance(r, dict) else ""
        per_device[w] = per_device.get(w, 0) + 1
        if per_device[w] <= MAX_RUNS_PER_DEVICE and len(kept) < MAX_RUNS:
            kept.append(r)
    manifest["device_latency"] = runs = kept[::-1]
    try:
        report = (root / REPORT).read_text(encoding="utf-8") if (root / REPORT).is_file() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeftError(f"{root / REPORT}: cannot read it ({e}); rebuild the bundle") from None
    report = with_device_section(report, render_device_section(manifest))
    manifest["files"][REPORT] = hashlib.sha256(report.encode("utf-8")).hexdigest()
    new = {REPORT: report}
    if REPORT_HTML in manifest["files"]:  # the page shows the device runs too (it shows no file hashes)
        new[REPORT_HTML] = render_html(manifest)
        manifest["files"][REPORT_HTML] = hashlib.sha256(new[REPORT_HTML].encode("utf-8")).hexdigest()
    if MODEL_JSON in manifest["files"] and where != "localhost":  # threads an app should use on the device
        try:
            described = runspec.with_device_threads(read_json(root / MODEL_JSON), result, where)
        except EdgeftError:
            described = None  # a damaged model.json stays as it is: `edgeft check` names it
        if described is not None:
            new[MODEL_JSON] = json.dumps(described, indent=2) + "\n"
            manifest["files"][MODEL_JSON] = hashlib.sha256(new[MODEL_JSON].encode("utf-8")).hexdigest()
            if MODEL_KV in manifest["files"]:  # its flat twin says the same
                new[MODEL_KV] = runspec.flat(described)
                manifest["files"][MODEL_KV] = hashlib.sha256(new[MODEL_KV].encode("utf-8")).hexdigest()
    manifest_text = dump_manifest(manifest)
    sums = dict(manifest["files"]) | {MANIFEST: hashlib.sha256(manifest_text.encode("utf-8")).hexdigest()}
    sums_text = dump_sums(sums)
    try:
        _rewrite_files(root, new | {MANIFEST: manifest_text, SHA256SUMS: sums_text})
    except OSError as exc:
        raise EdgeftError(f"cannot update bundle {root}: {exc.strerror or exc}") from None
    return compare_device_runs(runs, where)
