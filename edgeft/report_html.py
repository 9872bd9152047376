"""report.html: the bundle's report as one self-contained page (inline SVG and CSS, no script, no network).

Rendered from the manifest dict alone (never from the build's objects), so any bundle's page can be re-rendered
from its manifest.json later, e.g. after `edgeft bench` adds device runs. Every value is read as untrusted JSON:
strings are escaped, a missing or odd-typed value shows as "—", never as a traceback. A Content-Security-Policy
meta tag forbids scripts and every fetch, so even a page edited by hand cannot reach the network.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

from edgeft import formats
from edgeft.constants import BUDGET_KINDS

# Marker shape and colour per artifact format; formats edgeft does not know take the next free style.
OTHER_STYLES = (("diamond", "#2f855a"), ("triangle", "#6b46c1"), ("diamond", "#b7791f"), ("triangle", "#555"))
# Colours of the tensor types in the stacked bars, handed out in order of first appearance.
TYPE_COLOURS = (
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2",
    "#eeca3b", "#9d755d", "#ff9da6", "#bab0ac", "#1b9e77", "#7570b3",
)  # fmt: skip
LONG_TEXT = 400  # characters of one manifest string shown; a label longer than this is cut with "…"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1a202c;background:#fff;padding:0 16px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0}
code{background:#edf2f7;padding:0 3px;border-radius:3px}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;font-weight:700;color:#fff}
.pass{background:#2f855a}.fail{background:#c53030}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #cbd5e0;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#edf2f7}td.t,th.t{text-align:left}.v{min-width:240px}
tr.chosen td{background:#fefcbf;font-weight:600}tr.ref td{color:#4a5568;font-style:italic}
td.bad{background:#fed7d7;color:#9b2c2c;font-weight:700}
.legend{display:flex;flex-wrap:wrap;gap:14px;font-size:13px;margin:2px 0 8px}
.legend span{display:inline-flex;align-items:center;gap:4px}
.wide{overflow-x:auto}.note{color:#4a5568;font-size:13px;max-width:1100px}
svg text{font:12px system-ui,sans-serif;fill:#1a202c}
svg .axis{stroke:#4a5568;stroke-width:1}svg .grid{stroke:#e2e8f0;stroke-width:1}
"""


def _text(x: Any, limit: int = LONG_TEXT) -> str:
    """Any manifest value as escaped text (cut at `limit` characters); None as a dash."""
    if x is None:
        return "—"
    s = str(x)
    return html.escape(s if len(s) <= limit else s[: limit - 1] + "…", quote=True)


def _num(x: Any) -> float | None:
    """A finite number from untrusted JSON, else None (booleans are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _obj(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _fmt(x: Any, spec: str) -> str:
    v = _num(x)
    return "—" if v is None else format(v, spec)


def _mb(x: Any) -> float | None:
    v = _num(x)
    return None if v is None else v / 1e6


@dataclass(frozen=True)
class Point:
    """One candidate (or shipped artifact) as the plots and the candidates table draw it."""

    index: int  # 1-based: the number next to the marker and in the table's first column
    label: str
    format: str
    quant: str
    size_mb: float | None
    kld: float | None  # None: not measured (the "not measured" strip); 0 sits on the axis floor
    est_tok_s: float | None  # decode bound on the device: its bandwidth / bytes read per token
    host_tok_s: float | None  # decode measured on the build host
    task_accuracy: float | None
    chosen: bool
    entry: dict[str, Any]  # the manifest entry it came from


def points(manifest: dict[str, Any]) -> tuple[list[Point], bool]:
    """The candidates of the manifest, or its shipped artifacts when it lists none; and which it was."""
    cands = [c for c in _list(manifest.get("candidates")) if isinstance(c, dict)]
    from_candidates = bool(cands)
    if not from_candidates:
        cands = [a for a in _list(manifest.get("artifacts")) if isinstance(a, dict)]
    bandwidth = _num(_obj(manifest.get("device")).get("bandwidth_gb_s"))
    out = []
    for i, c in enumerate(cands, 1):
        drift, lat = _obj(c.get("drift")), _obj(c.get("latency"))
        est = _num(c.get("est_decode_tok_s"))
        per_token = _num(c.get("decode_bytes_per_token"))
        if est is None and bandwidth and per_token:
            est = bandwidth * 1e9 / per_token
        kld = _num(drift.get("kld_mean"))
        out.append(
            Point(
                index=i,
                label=str(c.get("label") if from_candidates else c.get("path")),
                format=str(c.get("format")),
                quant=str(c.get("quant")),
                size_mb=_mb(c.get("bytes")),
                kld=None if kld is None else max(kld, 0.0),
                est_tok_s=est,
                host_tok_s=_num(lat.get("decode_tok_s")),
                task_accuracy=_num(drift.get("task_accuracy")),
                chosen=c.get("chosen") is True if from_candidates else True,
                entry=c,
            )
        )
    return out, from_candidates


def pareto(pts: list[Point]) -> list[Point]:
    """The measured points no other measured point beats on both size and KLD, smallest first."""
    front: list[Point] = []
    for p in sorted(
        (p for p in pts if p.kld is not None and p.size_mb is not None),
        key=lambda p: (p.size_mb, p.kld),
    ):
        if not front or p.kld < front[-1].kld:  # type: ignore[operator]
            front.append(p)
    return front


def _styles(pts: list[Point]) -> dict[str, tuple[str, str]]:
    styles, spare = {}, iter(OTHER_STYLES * (1 + len(pts)))
    for p in pts:
        if p.format not in styles:
            known = formats.EXPORT_FORMATS.get(p.format)  # a manifest's format string, maybe unknown
            styles[p.format] = known.plot_style if known is not None else next(spare)
    return styles


@dataclass(frozen=True)
class Axis:
    """A value range mapped to pixels, linear or log10."""

    lo: float
    hi: float
    start: float  # pixel of lo
    end: float  # pixel of hi
    log: bool = False

    def __call__(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo)
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / (self.hi - self.lo)
        return self.start + f * (self.end - self.start)

    def ticks(self) -> list[float]:
        if self.log:
            a, b = round(math.log10(self.lo)), round(math.log10(self.hi))
            return [10.0**e for e in range(a, b + 1)]
        step = _nice_step((self.hi - self.lo) / 5)
        first = math.ceil(self.lo / step) * step
        return [first + k * step for k in range(int((self.hi - first) / step + 1e-9) + 1)]


def _nice_step(raw: float) -> float:
    mag = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)


def _linear_axis(values: list[float], start: float, end: float) -> Axis:
    top = max(values, default=0.0)
    step = _nice_step(top * 1.08 / 5) if top > 0 else 0.2
    return Axis(0.0, step * math.ceil(top * 1.08 / step) if top > 0 else 1.0, start, end)


def _log_axis(values: list[float], start: float, end: float) -> Axis:
    pos = [v for v in values if v > 0]
    if not pos:
        return Axis(1e-3, 1.0, start, end, log=True)
    lo = 10.0 ** math.floor(math.log10(min(pos) * 0.8))
    hi = 10.0 ** math.ceil(math.log10(max(pos) * 1.25))
    return Axis(lo, hi if hi > lo else lo * 10, start, end, log=True)


def _tick_label(v: float) -> str:
    if abs(v) < 1e-12:  # a linear axis's 0 (or float noise around it)
        return "0"
    return format(v, "g") if v >= 1e-3 else f"1e{round(math.log10(v))}"


def _marker(shape: str, x: float, y: float, r: float, fill: str, stroke: str, width: float = 1.5) -> str:
    paint = f'fill="{fill}" stroke="{stroke}" stroke-width="{width}"'
    if shape == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" {paint}/>'
    if shape == "diamond":
        pts = f"{x:.1f},{y - r * 1.3:.1f} {x + r * 1.3:.1f},{y:.1f} {x:.1f},{y + r * 1.3:.1f} {x - r * 1.3:.1f},{y:.1f}"
        return f'<polygon points="{pts}" {paint}/>'
    if shape == "triangle":
        pts = f"{x:.1f},{y - r * 1.3:.1f} {x + r * 1.2:.1f},{y + r * 0.8:.1f} {x - r * 1.2:.1f},{y + r * 0.8:.1f}"
        return f'<polygon points="{pts}" {paint}/>'
    if shape == "cross":
        d = f"M{x - r:.1f},{y - r:.1f}L{x + r:.1f},{y + r:.1f}M{x - r:.1f},{y + r:.1f}L{x + r:.1f},{y - r:.1f}"
        return f'<path d="{d}" fill="none" stroke="{stroke}" stroke-width="{width + 1}"/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {paint}/>'


def _swatch(shape: str, fill: str, stroke: str) -> str:
    return f'<svg width="16" height="16" aria-hidden="true">{_marker(shape, 8, 8, 5, fill, stroke)}</svg>'


def _frame(
    xa: Axis, ya: Axis, top: float, bottom: float, axis_y: float, x_title: str, y_title: str
) -> list[str]:
    """Grid, axes, tick labels and axis titles of one plot; the x axis is drawn at `axis_y` (>= bottom)."""
    left, right = xa.start, xa.end
    out = []
    for t in xa.ticks():
        x = xa(t)
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y}"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{_tick_label(t)}</text>')
    for t in ya.ticks():
        y = ya(t)
        out.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(t)}</text>')
    out.append(f'<line class="axis" x1="{left}" y1="{axis_y}" x2="{right}" y2="{axis_y}"/>')
    out.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{bottom}"/>')
    out.append(f'<text x="{(left + right) / 2:.1f}" y="{axis_y + 36}" text-anchor="middle">{x_title}</text>')
    mid = (top + bottom) / 2
    out.append(
        f'<text x="16" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 16 {mid:.1f})">{y_title}</text>'
    )
    return out


def _tooltip(p: Point) -> str:
    """The <title> of a candidate's point: everything the table says about it, one fact a line."""
    e, drift = p.entry, _obj(p.entry.get("drift"))
    lines = [
        f"#{p.index} {p.label}" + (" (chosen)" if p.chosen else ""),
        f"{p.format} {p.quant}" + (f", {_options(e.get('options'))}" if _options(e.get("options")) else ""),
        f"size {_fmt(p.size_mb, '.2f')} MB",
        "KLD not measured"
        if p.kld is None
        else f"KLD mean {p.kld:.3g} (p99 {_fmt(drift.get('kld_p99'), '.3g')})",
        f"decode tok/s: device estimate {_fmt(p.est_tok_s, '.0f')}, host measured {_fmt(p.host_tok_s, '.0f')}",
        f"task accuracy {_fmt(p.task_accuracy, '.1%')}",
    ]
    if e.get("verdict") is not None:
        lines.append(str(e.get("verdict")))
    return _text("\n".join(lines), 4 * LONG_TEXT)


def _options(x: Any) -> str:
    """Non-default options of a candidate, e.g. `imatrix, head_type q8_0`."""
    parts = [
        str(k) if v is True else f"{k} {v}" for k, v in _obj(x).items() if v is not None and v is not False
    ]
    return ", ".join(parts)


def kld_plot(pts: list[Point]) -> str:
    """Size (MB) vs mean KLD (log): one `class="candidate"` group per point, the Pareto frontier as steps."""
    left, right, top, bottom = 72, 880, 16, 350
    unmeasured = any(p.kld is None for p in pts)
    strip = bottom + 26  # the "not measured" strip's centre line, between the plot and the x axis
    axis_y = strip + 20 if unmeasured else bottom + 10
    width, height = 900, axis_y + 48
    xa = _linear_axis([p.size_mb for p in pts if p.size_mb is not None], left, right)
    ya = _log_axis([p.kld for p in pts if p.kld is not None], bottom, top)
    out = [
        f'<svg class="plot" id="kld-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'role="img" aria-label="size vs KL divergence per candidate">'
    ]
    out += _frame(xa, ya, top, bottom, axis_y, "file size (MB)", "mean KL divergence vs float (log)")
    if unmeasured:
        out.append(
            f'<rect x="{left}" y="{strip - 12}" width="{right - left}" height="24" fill="#f7fafc" '
            f'stroke="#cbd5e0" stroke-dasharray="4 3"/><text x="{right - 6}" y="{strip + 4}" '
            'text-anchor="end" style="fill:#4a5568">not measured</text>'
        )
    front = pareto(pts)
    if front:
        d = f"M{xa(front[0].size_mb or 0):.1f},{ya(front[0].kld or ya.lo):.1f}"
        for p in front[1:]:
            d += f"H{xa(p.size_mb or 0):.1f}V{ya(p.kld or ya.lo):.1f}"
        d += f"H{right}"
        out.append(
            f'<path class="pareto" d="{d}" fill="none" stroke="#2d3748" stroke-width="1.5" '
            'stroke-dasharray="6 3"><title>Pareto frontier: the lowest mean KLD at each size</title></path>'
        )
    styles = _styles(pts)
    on_front = {p.index for p in front}
    for p in sorted(pts, key=lambda p: p.chosen):  # chosen ones last, on top
        shape, colour = styles[p.format]
        x = xa(p.size_mb) if p.size_mb is not None else left
        y = strip if p.kld is None else ya(p.kld or ya.lo)
        fill = "#fff" if p.kld is None else colour
        out.append(
            f'<g class="candidate" data-label="{_text(p.label)}" data-format="{_text(p.format)}" '
            f'data-chosen="{str(p.chosen).lower()}" data-measured="{str(p.kld is not None).lower()}" '
            f'data-pareto="{str(p.index in on_front).lower()}"><title>{_tooltip(p)}</title>'
        )
        if p.chosen:
            out.append(_marker("circle", x, y, 11, "none", "#d69e2e", 3))
        out.append(_marker(shape, x, y, 6, fill, "#1a202c" if p.chosen else colour, 2 if p.chosen else 1.5))
        out.append(f'<text x="{x + 9:.1f}" y="{y - 7:.1f}" font-size="10">{p.index}</text>')
        if p.chosen:
            out.append(
                f'<text x="{x + 9:.1f}" y="{y + 16:.1f}" font-weight="700">{_text(p.label, 40)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


@dataclass(frozen=True)
class DeviceSpeed:
    """A decode speed measured on a device by bench_on_device.py, placed at its artifact's size."""

    where: str
    path: str
    size_mb: float
    decode_tok_s: float


def device_speeds(manifest: dict[str, Any]) -> list[DeviceSpeed]:
    """Each device's newest run (manifest `device_latency`), per artifact it ran whose size is known."""
    sizes = {
        a.get("path"): _mb(a.get("bytes")) for a in _list(manifest.get("artifacts")) if isinstance(a, dict)
    }
    out = []
    for where, run in latest_runs(manifest).items():
        for a in _list(_obj(run.get("result")).get("artifacts")):
            a = _obj(a)
            size, tok = sizes.get(a.get("path")), _num(a.get("decode_tok_s"))
            if a.get("status") == "ok" and size is not None and tok:
                out.append(DeviceSpeed(where, str(a.get("path")), size, tok))
    return out


def latest_runs(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The newest recorded device run per `where` (device_latency is oldest first)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in _list(manifest.get("device_latency")):
        if isinstance(r, dict):
            latest[str(r.get("where"))] = r
    return latest


def speed_plot(pts: list[Point], measured: list[DeviceSpeed]) -> str:
    """Size (MB) vs decode tok/s (log): the device estimate, the host's measurement, the device's own."""
    width, height, left, right, top, bottom = 900, 400, 72, 880, 16, 340
    values = [v for p in pts for v in (p.est_tok_s, p.host_tok_s) if v] + [m.decode_tok_s for m in measured]
    sizes = [p.size_mb for p in pts if p.size_mb is not None] + [m.size_mb for m in measured]
    xa, ya = _linear_axis(sizes, left, right), _log_axis(values, bottom, top)
    out = [
        f'<svg class="plot" id="speed-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'role="img" aria-label="size vs decode tokens per second">'
    ]
    out += _frame(xa, ya, top, bottom, bottom, "file size (MB)", "decode tok/s (log)")
    styles = _styles(pts)
    for p in pts:
        if p.size_mb is None:
            continue
        shape, colour = styles[p.format]
        x = xa(p.size_mb)
        title = _tooltip(p)
        out.append(f'<g class="speed" data-label="{_text(p.label)}"><title>{title}</title>')
        if p.est_tok_s and p.host_tok_s:
            out.append(
                f'<line x1="{x:.1f}" y1="{ya(p.est_tok_s):.1f}" x2="{x:.1f}" y2="{ya(p.host_tok_s):.1f}" '
                'stroke="#a0aec0" stroke-width="1"/>'
            )
        stroke = "#1a202c" if p.chosen else colour
        if p.est_tok_s:
            out.append(_marker(shape, x, ya(p.est_tok_s), 6, colour, stroke, 2 if p.chosen else 1.5))
        if p.host_tok_s:
            out.append(_marker(shape, x, ya(p.host_tok_s), 5, "#fff", stroke, 2))
        out.append("</g>")
    for m in measured:
        out.append(
            f'<g class="device-speed" data-label="{_text(m.path)}"><title>{_text(m.path)} on '
            f"{_text(m.where)}: decode {m.decode_tok_s:.1f} tok/s (measured on the device)</title>"
            f"{_marker('cross', xa(m.size_mb), ya(m.decode_tok_s), 5, 'none', '#1a202c')}</g>"
        )
    out.append("</svg>")
    return "".join(out)


def violations(art: dict[str, Any], reference_accuracy: float | None) -> dict[str, str]:
    """Budgeted metric → why it fails, from an artifact entry's `budget` and `drift` (as targets does)."""
    drift, out = _obj(art.get("drift")), {}
    acc = _num(drift.get("task_accuracy"))
    derived = {
        "task_accuracy_drop": None if acc is None or reference_accuracy is None else reference_accuracy - acc,
        "min_task_accuracy": acc,
        "max_size_mb": _mb(art.get("bytes")),
    }
    for name, limit in _obj(art.get("budget")).items():
        kind, lim = BUDGET_KINDS.get(name), _num(limit)
        value = derived[name] if name in derived else _num(drift.get(name))
        if kind is None or lim is None or value is None:
            continue
        if (kind == "max" and value > lim) or (kind == "min" and value < lim):
            out[name] = f"{name} = {value:.4g}, budget {'<=' if kind == 'max' else '>='} {lim:g}"
    return out


def _variant(a: dict[str, Any]) -> str:
    """What else shaped an artifact: the importance matrix it was quantized with, its head type, ONNX level."""
    imatrix, parts = _obj(a.get("imatrix")), []
    if imatrix:
        parts.append(
            f"imatrix ({_text(imatrix.get('examples'))} examples, {_text(imatrix.get('tokens'))} tokens)"
        )
    if a.get("head_type"):
        parts.append(f"head {_text(a.get('head_type'))}")
    if a.get("accuracy_level") is not None:
        parts.append(f"accuracy_level {_text(a.get('accuracy_level'))}")
    return "<br>" + ", ".join(parts) if parts else ""


def _cell(value: str, bad: bool = False, left: bool = False) -> str:
    cls = " ".join(c for c, on in (("bad", bad), ("t", left)) if on)
    return f'<td class="{cls}">{value}</td>' if cls else f"<td>{value}</td>"


def artifacts_table(manifest: dict[str, Any]) -> str:
    """Per shipped artifact: task accuracy and app-path agreement against the float model, drift, budget."""
    ref = _obj(manifest.get("reference"))
    ref_acc = _num(ref.get("task_accuracy"))
    ram_budget = _num(_obj(manifest.get("device")).get("ram_budget_mb"))
    head = (
        "artifact", "format / quant", "size MB", "MB read per token", "task accuracy (vs float)",
        "prompt ids match", "answers match", "KLD mean", "KLD p99", "top-1", "PPL ratio", "RAM need MB",
        "budget",
    )  # fmt: skip
    rows = [
        '<div class="wide"><table><tr>'
        + "".join(f'<th class="{"t" if i < 2 else ""}">{h}</th>' for i, h in enumerate(head))
        + "</tr>",
        f'<tr class="ref"><td class="t">PyTorch float (reference)</td><td class="t">torch</td>'
        f"<td>—</td><td>—</td><td>{_fmt(ref_acc, '.1%')}</td>"
        "<td>100%</td><td>100%</td><td>0</td><td>0</td><td>100%</td><td>1.000</td><td>—</td><td>—</td></tr>",
    ]
    diffs = []
    for a in _list(manifest.get("artifacts")):
        if not isinstance(a, dict):
            continue
        d, bad = _obj(a.get("drift")), violations(a, ref_acc)
        acc = _num(d.get("task_accuracy"))
        delta = "" if acc is None or ref_acc is None else f" ({(acc - ref_acc) * 100:+.1f} pt)"
        need = _num(a.get("ram_need_mb"))
        fits = need is None or ram_budget is None or need <= ram_budget
        within = a.get("within_budget")
        verdict = (
            "pass"
            if within is True and not bad
            else "FAIL: " + "; ".join(bad.values())
            if bad
            else "FAIL"
            if within is False
            else "—"
        )
        rows.append(
            "<tr>"
            + _cell(_text(a.get("path")), left=True)
            + _cell(f"{_text(a.get('format'))} {_text(a.get('quant'))}{_variant(a)}", left=True)
            + _cell(_fmt(_mb(a.get("bytes")), ".2f"))
            + _cell(_fmt(_mb(a.get("decode_bytes_per_token")), ".2f"))
            + _cell(_fmt(acc, ".1%") + delta, "task_accuracy_drop" in bad)
            + _cell(_fmt(d.get("prompt_ids_match"), ".1%"), "prompt_ids_match" in bad)
            + _cell(_fmt(d.get("answers_match"), ".1%"), "answers_match" in bad)
            + _cell(_fmt(d.get("kld_mean"), ".5f"), "kld_mean" in bad)
            + _cell(_fmt(d.get("kld_p99"), ".4f"), "kld_p99" in bad)
            + _cell(_fmt(d.get("top1"), ".1%"), "top1" in bad)
            + _cell(_fmt(d.get("ppl_ratio"), ".4f"), "ppl_ratio" in bad)
            + _cell(_fmt(need, ".1f") + ("" if fits else f" &gt; {ram_budget:g}"), not fits)
            + _cell(_text(verdict), verdict.startswith("FAIL"), left=True)
            + "</tr>"
        )
        for key in ("prompt_diff", "answer_diff"):
            if d.get(key):
                diffs.append(f"<li><code>{_text(a.get('path'))}</code>: {_text(d.get(key))}</li>")
    rows.append("</table></div>")
    if diffs:
        rows.append("<p>First differences from the float model:</p><ul>" + "".join(diffs) + "</ul>")
    return "".join(rows)


def latency_tables(manifest: dict[str, Any]) -> str:
    """Build-host latency per artifact, side by side with each device's newest run when one is recorded."""
    arts = [a for a in _list(manifest.get("artifacts")) if isinstance(a, dict)]
    runs = latest_runs(manifest)
    metrics = (
        ("prefill_tok_s", "prefill tok/s", ".0f"),
        ("decode_tok_s", "decode tok/s", ".1f"),
        ("ttft_ms", "TTFT ms", ".1f"),
        ("peak_rss_mb", "peak RSS MB", ".0f"),
    )
    if not runs:
        rows = [
            '<div class="wide"><table><tr><th class="t">artifact</th>'
            + "".join(f"<th>{m[1]} host</th>" for m in metrics)
        ]
        for a in arts:
            lat = _obj(a.get("latency"))
            rows.append(
                f'<tr><td class="t">{_text(a.get("path"))}</td>'
                + "".join(f"<td>{_fmt(lat.get(k), s)}</td>" for k, _, s in metrics)
                + "</tr>"
            )
        note = (
            '<p class="note">No device run recorded yet: <code>edgeft bench BUNDLE --remote user@host</code> '
            "measures the bundle on the device and records it in manifest.json (<code>device_latency</code>).</p>"
        )
        return note + "".join(rows) + "</table></div>"
    out = []
    for where, run in runs.items():
        result = _obj(run.get("result"))
        on_device = {
            _obj(a).get("path"): _obj(a) for a in _list(result.get("artifacts")) if isinstance(a, dict)
        }
        out.append(f"<h3>{_text(where)} — {_text(run.get('recorded'))}</h3>")
        out.append(
            '<div class="wide"><table><tr><th class="t">artifact</th><th class="t">status on the device</th>'
            + "".join(f"<th>{m[1]} host / device</th>" for m in metrics)
            + "</tr>"
        )
        for a in arts:
            lat, dev = _obj(a.get("latency")), on_device.get(a.get("path"), {})
            status = _text(dev.get("status")) if dev else "not run"
            if dev and dev.get("status") != "ok" and dev.get("reason"):
                status += f": {_text(dev.get('reason'))}"
            out.append(
                f'<tr><td class="t">{_text(a.get("path"))}</td><td class="t">{status}</td>'
                + "".join(f"<td>{_fmt(lat.get(k), s)} / {_fmt(dev.get(k), s)}</td>" for k, _, s in metrics)
                + "</tr>"
            )
        out.append("</table></div>")
    return "".join(out)


def tensor_type_bars(manifest: dict[str, Any]) -> str:
    """Per artifact one horizontal bar split by the share of weight bytes of each tensor type it holds."""
    arts = [
        a for a in _list(manifest.get("artifacts")) if isinstance(a, dict) and _obj(a.get("tensor_types"))
    ]
    if not arts:
        return '<p class="note">The manifest records no tensor types.</p>'
    colours: dict[str, str] = {}
    for a in arts:
        for t in _obj(a.get("tensor_types")):
            colours.setdefault(str(t), TYPE_COLOURS[len(colours) % len(TYPE_COLOURS)])
    label_w, bar_w, row_h, width = 190, 560, 30, 1140
    out = [
        f'<svg class="types" width="{width}" height="{row_h * len(arts) + 8}" '
        f'viewBox="0 0 {width} {row_h * len(arts) + 8}" role="img" aria-label="tensor types per artifact">'
    ]
    for i, a in enumerate(arts):
        y = 4 + i * row_h
        shares = {str(t): v for t, s in _obj(a.get("tensor_types")).items() if (v := _num(s)) and v > 0}
        total = sum(shares.values()) or 1.0
        out.append(
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end"><title>{_text(a.get("path"))}</title>'
            f"{_text(a.get('path'), 28)}</text>"
        )
        x = float(label_w)
        for t, v in shares.items():
            w = bar_w * v / total
            out.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 8}" fill="{colours[t]}">'
                f"<title>{_text(t)}: {v:.1%} of the weight bytes</title></rect>"
            )
            if w > 70:
                out.append(
                    f'<text x="{x + 4:.1f}" y="{y + 16}" style="fill:#fff">{_text(t, 14)} {v:.0%}</text>'
                )
            x += w
        head = _obj(a.get("output_head"))
        if head.get("type") is not None:
            out.append(
                f'<text x="{label_w + bar_w + 10}" y="{y + 16}">output head: {_text(head.get("type"), 30)} '
                f"({_fmt(head.get('share'), '.1%')})</text>"
            )
    out.append("</svg>")
    legend = "".join(
        f'<span><svg width="14" height="14" aria-hidden="true"><rect width="14" height="14" fill="{c}"/></svg>'
        f"{_text(t)}</span>"
        for t, c in colours.items()
    )
    return "".join(out) + f'<div class="legend">{legend}</div>'


def candidates_table(pts: list[Point], from_candidates: bool) -> str:
    """Every candidate with its figures, budget violations and verdict; the chosen rows highlighted."""
    if not from_candidates:
        return (
            '<p class="note">This build recorded no candidate search (no <code>candidates</code> in '
            "manifest.json); the plots show the shipped artifacts.</p>"
        )
    why = [
        f"<li><b>{_text(p.entry.get('slot') or p.format)}</b>: <code>{_text(p.label)}</code> — "
        f"{_text(p.entry.get('verdict'))}</li>"
        for p in pts
        if p.chosen
    ]
    out = [
        "<p>Chosen:</p><ul>" + "".join(why) + "</ul>" if why else "<p><b>No candidate was chosen.</b></p>",
        '<div class="wide"><table><tr><th>#</th><th class="t">candidate</th><th class="t v">verdict</th>'
        '<th class="t">format / quant, options</th><th>size MB</th><th>MB read per token</th><th>decode tok/s '
        "device estimate</th><th>decode tok/s host</th><th>KLD mean</th><th>KLD p99</th><th>top-1</th>"
        '<th>task accuracy</th><th>answers match</th><th>fits RAM</th><th class="t">budget violations</th>'
        "</tr>",
    ]
    for p in pts:
        e, d = p.entry, _obj(p.entry.get("drift"))
        fits = e.get("fits_ram")
        viol = [str(v) for v in _list(e.get("violations"))]
        opts = _options(e.get("options"))
        out.append(
            f'<tr class="{"chosen" if p.chosen else ""}"><td>{p.index}</td>'
            + _cell(_text(p.label), left=True)
            + f'<td class="t v">{_text(e.get("verdict"))}</td>'
            + _cell(f"{_text(p.format)} {_text(p.quant)}" + (f"<br>{_text(opts)}" if opts else ""), left=True)
            + _cell(_fmt(p.size_mb, ".2f"))
            + _cell(_fmt(_mb(e.get("decode_bytes_per_token")), ".2f"))
            + _cell(_fmt(p.est_tok_s, ".0f"))
            + _cell(_fmt(p.host_tok_s, ".0f"))
            + _cell("not measured" if p.kld is None else f"{p.kld:.5f}")
            + _cell(_fmt(d.get("kld_p99"), ".4f"))
            + _cell(_fmt(d.get("top1"), ".1%"))
            + _cell(_fmt(p.task_accuracy, ".1%"))
            + _cell(_fmt(d.get("answers_match"), ".1%"))
            + _cell("yes" if fits is True else "NO" if fits is False else "—", fits is False)
            + _cell("; ".join(_text(v) for v in viol) or "—", bool(viol), left=True)
            + "</tr>"
        )
    out.append("</table></div>")
    return "".join(out)


def _legend(pts: list[Point], from_candidates: bool) -> str:
    items = [f"<span>{_swatch(s, c, c)}{_text(f)}</span>" for f, (s, c) in _styles(pts).items()]
    items.append(
        '<span><svg width="26" height="26" aria-hidden="true">'
        + _marker("circle", 13, 13, 11, "none", "#d69e2e", 3)
        + _marker("circle", 13, 13, 6, "#a0aec0", "#1a202c", 2)
        + f"</svg>{'chosen' if from_candidates else 'shipped'}</span>"
    )
    if any(p.kld is None for p in pts):
        items.append(f"<span>{_swatch('circle', '#fff', '#4a5568')}not measured (hollow, own strip)</span>")
    items += [
        '<span><svg width="30" height="10" aria-hidden="true"><path d="M0,5H30" stroke="#2d3748" '
        'stroke-width="1.5" stroke-dasharray="6 3"/></svg>Pareto frontier (lowest KLD for its size)</span>',
    ]
    return '<div class="legend">' + "".join(items) + "</div>"


def _speed_legend(pts: list[Point], measured: bool) -> str:
    items = []
    if any(p.est_tok_s for p in pts):
        items.append(
            f"<span>{_swatch('circle', '#4a5568', '#4a5568')}device estimate (bandwidth ÷ bytes per token)</span>"
        )
    if any(p.host_tok_s for p in pts):
        items.append(f"<span>{_swatch('circle', '#fff', '#4a5568')}measured on the build host</span>")
    if measured:
        items.append(f"<span>{_swatch('cross', 'none', '#1a202c')}measured on the device</span>")
    items += [f"<span>{_swatch(s, c, c)}{_text(f)}</span>" for f, (s, c) in _styles(pts).items()]
    return '<div class="legend">' + "".join(items) + "</div>"


def header(manifest: dict[str, Any]) -> str:
    """Target, base model, pass/fail and the float model's task accuracy against the base's."""
    ref, data, dev = _obj(manifest.get("reference")), _obj(manifest.get("data")), _obj(manifest.get("device"))
    passed = manifest.get("passed")
    badge = (
        '<span class="badge pass">PASS</span> every shipped artifact is within its drift budget'
        if passed is True
        else '<span class="badge fail">FAIL</span> a shipped artifact is outside its drift budget'
        if passed is False
        else '<span class="badge fail">?</span> the manifest does not say whether the build passed'
    )
    rev = manifest.get("base_revision")
    acc = (
        f"held-out task accuracy (exact match, {_text(data.get('eval_examples'))} examples): base "
        f"{_fmt(ref.get('base_task_accuracy'), '.1%')} → fine-tuned float {_fmt(ref.get('task_accuracy'), '.1%')}"
    )
    return (
        f"<h1>edgeft bundle for <code>{_text(manifest.get('target'))}</code></h1>"
        f'<p class="note">{_text(dev.get("description"))}; {_text(dev.get("threads"))} threads, RAM budget '
        f"{_text(dev.get('ram_budget_mb'))} MB, context {_text(dev.get('context_length'))} tokens</p>"
        f"<p>{badge}</p><ul>"
        f"<li>base model: <code>{_text(manifest.get('base_model'))}</code>"
        + (f" (revision <code>{_text(rev, 12)}</code>)" if rev else "")
        + f"</li><li>{acc}</li>"
        f"<li>evaluated on: {_text(data.get('eval_source'))}</li>"
        f"<li>built {_text(manifest.get('created'))} with edgeft {_text(_obj(manifest.get('tools')).get('edgeft'))}"
        "</li></ul>"
    )


def render_html(manifest: dict[str, Any]) -> str:
    """report.html for one bundle's manifest dict: the same page whether written by the build or later."""
    manifest = _obj(manifest)
    pts, from_candidates = points(manifest)
    measured = device_speeds(manifest)
    what = "candidate" if from_candidates else "shipped artifact"
    skipped = [
        f"<li>{_text(_obj(s).get('artifact'))}: {_text(_obj(s).get('reason'))}</li>"
        for s in _list(manifest.get("skipped"))
    ]
    body = [
        header(manifest),
        f"<h2>Size against drift ({len(pts)} {what}{'s' if len(pts) != 1 else ''})</h2>",
        '<p class="note">One point per ' + what + " (the number is its row below; hover for details). Lower "
        "left is better: smaller and closer to the float model. Mean KL divergence of the artifact's "
        "next-token distribution from the float model's on the held-out data; log scale, so a KLD of 0 sits on "
        "the bottom edge.</p>",
        kld_plot(pts),
        _legend(pts, from_candidates),
        "<h2>Size against decode speed</h2>",
        '<p class="note">Decode speed bound on the device (its memory bandwidth ÷ the bytes each token reads), '
        "the build host's measurement"
        + (", and the device's own newest run" if measured else "")
        + ". Tiny models are compute-bound far below the bandwidth bound.</p>",
        speed_plot(pts, measured),
        _speed_legend(pts, bool(measured)),
        "<h2>Shipped artifacts against the float model</h2>",
        artifacts_table(manifest),
        "<h2>Latency: build host and device</h2>",
        latency_tables(manifest),
        "<h2>Tensor types actually written</h2>",
        '<p class="note">Share of the weight bytes per tensor type (tensors whose rows do not fit a type\'s '
        "block size fall back to another), and the output head's type and share.</p>",
        tensor_type_bars(manifest),
        "<h2>Candidates</h2>",
        candidates_table(pts, from_candidates),
    ]
    if skipped:
        body += ["<h2>Skipped (cannot fit the device's RAM)</h2><ul>", *skipped, "</ul>"]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>edgeft bundle: {_text(manifest.get('target'))}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
