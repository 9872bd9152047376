"""Exporters, one module per format, behind one registry so the pipeline and CLI never branch on format.

Each exporter is `fn(model_dir, out, quant) -> result with .path`; adding a format is one module and one
registry line (and its quants in edgeft.targets.QUANTS_BY_FORMAT).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..constants import FORMAT_GGUF
from ..errors import EdgeftError


def _gguf(model_dir: Path, out: Path, quant: str) -> Any:
    from .gguf import export_gguf

    return export_gguf(model_dir, out, quant)


EXPORTERS: dict[str, tuple[Callable[[Path, Path, str], Any], str]] = {
    # format: (exporter, file name suffix)
    FORMAT_GGUF: (_gguf, ".gguf"),
}


def export_file(model_dir: Path, fmt: str, quant: str, out: Path) -> Any:
    """Export `model_dir` to `out` in `fmt`/`quant`; returns the exporter's typed result."""
    if fmt not in EXPORTERS:
        raise EdgeftError(f"unknown format '{fmt}' (known: {', '.join(EXPORTERS)})")
    return EXPORTERS[fmt][0](Path(model_dir), Path(out), quant)


def export_artifact(model_dir: Path, fmt: str, quant: str, out_dir: Path) -> Path:
    """Export into `out_dir` under the conventional name `model-<quant><suffix>`; returns the path."""
    if fmt not in EXPORTERS:
        raise EdgeftError(f"unknown format '{fmt}' (known: {', '.join(EXPORTERS)})")
    out = Path(out_dir) / f"model-{quant}{EXPORTERS[fmt][1]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(export_file(model_dir, fmt, quant, out).path)
