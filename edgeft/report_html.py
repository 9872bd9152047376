"""report.html: the bundle's report as one self-contained page (inline SVG and CSS, no script, no network).

Rendered from the manifest dict alone, so a bundle's page can be re-rendered from its manifest.json later.
"""

from __future__ import annotations

import html
from typing import Any


def render_html(manifest: dict[str, Any]) -> str:
    """The page for one bundle's manifest (placeholder until the plots land)."""
    target = html.escape(str(manifest.get("target")))
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>edgeft {target}</title></head></html>\n"
    )
