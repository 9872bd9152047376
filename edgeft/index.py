"""OUT/index.html and the terminal summary of a build for several targets: the targets side by side, what
each ships and how it did, each linking its bundle's report. Read from the bundles' own manifest.json
(through the bundle schema), so the index says what the bundles say."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft import formats
from edgeft.constants import MANIFEST, REPORT_HTML
from edgeft.device.bundle_manifest import ManifestError, read_manifest
from edgeft.errors import EdgeftError
from edgeft.files import publish_file, unique_sibling
from edgeft.ui import info

if TYPE_CHECKING:
    from edgeft.stages import Shipped

INDEX = "index.html"
COLUMNS = (
    "target",
    "ships",
    "MB",
    "MB/token",
    "decode tok/s (here)",
    "KLD",
    "task",
    "answers",
    "RAM need",
    "",
)


def _num(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, int | float) and not isinstance(x, bool) else "—"


def rows(shipped: Sequence[Shipped]) -> list[tuple[str, ...]]:
    """One row per shipped artifact of each target, from its bundle's manifest.json."""
    out = []
    for s in shipped:
        try:
            doc = read_manifest(s.bundle / MANIFEST, formats.names()).doc
        except ManifestError as e:
            raise EdgeftError(f"cannot index {s.bundle}: {e}") from None
        verdict = "pass" if s.passed else "REJECTED" if s.failure else "over budget"
        for a in doc.get("artifacts", []):
            d, lat = a.get("drift") or {}, a.get("latency") or {}
            ram = f"{_num(a.get('ram_need_mb'), '.0f')} of {s.target.ram_budget_mb} MB"
            out.append(
                (
                    s.target.name,
                    str(a.get("path")),
                    _num((a.get("bytes") or 0) / 1e6, ".1f"),
                    _num((a.get("decode_bytes_per_token") or 0) / 1e6, ".2f"),
                    _num(lat.get("decode_tok_s"), ".0f"),
                    _num(d.get("kld_mean"), ".4f"),
                    _num(d.get("task_accuracy"), ".1%"),
                    _num(d.get("answers_match"), ".1%"),
                    ram,
                    verdict,
                )
            )
    return out


def forget(out: Path) -> None:
    """Remove OUT/index.html of an earlier build (edgeft's own file in edgeft's own folder)."""
    (Path(out) / INDEX).unlink(missing_ok=True)


def write_index(out: Path, shipped: Sequence[Shipped]) -> Path:
    """Write OUT/index.html (replacing an earlier one whole) and print the same table; returns its path."""
    table = rows(shipped)
    info("targets side by side:")
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(COLUMNS)]
    for r in [COLUMNS, *table]:
        info("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    links = "".join(
        f'<li><a href="{html.escape(s.bundle.name)}/{REPORT_HTML}">{html.escape(s.target.name)}</a>: '
        f"{html.escape(s.target.description)}</li>"
        for s in shipped
    )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in table)
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>edgeft build: targets</title><style>'
        "body{font-family:system-ui,sans-serif;margin:2em}td,th{padding:.2em .8em;text-align:left}"
        "tr:nth-child(even){background:#f4f4f4}</style></head><body><h1>One fine-tune, "
        f"{len(shipped)} targets</h1><ul>{links}</ul><table><tr>{head}</tr>{body}</table>"
        "<p>decode tok/s is measured on the build machine at each target's thread count; "
        "<code>edgeft bench BUNDLE --remote user@host</code> measures it on the device.</p></body></html>\n"
    )
    final = Path(out) / INDEX
    tmp = unique_sibling(final, "partial", directory=False)  # written whole, then moved in place
    tmp.write_text(page, encoding="utf-8")
    publish_file(tmp, final)
    return final
