"""Exporters, one module per format, behind one registry so the pipeline and CLI never branch on format.

Each exporter is `fn(model_dir, out, quant, options) -> result with .path`; adding a format is one module
and one registry line (and its quants in edgeft.targets.QUANTS_BY_FORMAT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.constants import FORMAT_GGUF, FORMAT_ONNX
from edgeft.errors import EdgeftError
from edgeft.ui import Progress

if TYPE_CHECKING:
    from edgeft.formats.gguf.export import GGUFExportResult
    from edgeft.formats.gguf.imatrix import Imatrix


@dataclass(frozen=True)
class ExportOptions:
    """Per-export settings besides model, output and quant."""

    accuracy_level: int | None = None  # ONNX int8/int4 only
    progress: Progress | None = None
    # Conversations (e.g. the eval set's) the exporter proves its tokenizer on, besides the built-in probes.
    conversations: Sequence[Sequence[dict[str, str]]] = ()
    # GGUF quants only: an importance matrix (edgeft.formats.gguf.imatrix) for llama.cpp's quantizer, and a type the
    # output head / token embedding are kept at (edgeft.constants.GGUF_HEAD_TYPES, e.g. "q8_0").
    imatrix: Imatrix | None = None
    head_type: str | None = None
    # GGUF quants only: a float GGUF of the same model already written (export.gguf.export_float_gguf),
    # quantized directly instead of converting again — several quants of one model cost one conversion.
    float_gguf: GGUFExportResult | Path | None = None


def _gguf(model_dir: Path, out: Path, quant: str, opts: ExportOptions) -> Any:
    from edgeft.formats.gguf.export import export_gguf

    if opts.accuracy_level is not None:
        raise EdgeftError("accuracy_level applies to onnx int8/int4 only, not gguf")
    return export_gguf(
        model_dir,
        out,
        quant,
        progress=opts.progress,
        conversations=opts.conversations,
        imatrix=opts.imatrix,
        head_type=opts.head_type,
        float_gguf=opts.float_gguf,
    )


def _onnx(model_dir: Path, out: Path, quant: str, opts: ExportOptions) -> Any:
    from edgeft.formats.onnx.export import export_onnx

    given = [n for n in ("imatrix", "head_type", "float_gguf") if getattr(opts, n) is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise EdgeftError(f"{out}: {' and '.join(given)} {verb} to gguf quants only, not onnx {quant}")
    return export_onnx(
        model_dir,
        out,
        quant,
        accuracy_level=opts.accuracy_level,
        progress=opts.progress,
        conversations=opts.conversations,
    )


Exporter = Callable[[Path, Path, str, ExportOptions], Any]
# format: (exporter, artifact name for a quant: a file for GGUF, a directory for onnxruntime-genai)
EXPORTERS: dict[str, tuple[Exporter, Callable[[str], str]]] = {
    FORMAT_GGUF: (_gguf, lambda stem: f"model-{stem}.gguf"),
    FORMAT_ONNX: (_onnx, lambda stem: f"onnx-{stem}"),
}


def _entry(fmt: str) -> tuple[Exporter, Callable[[str], str]]:
    if fmt not in EXPORTERS:
        raise EdgeftError(f"unknown format '{fmt}' (known: {', '.join(EXPORTERS)})")
    return EXPORTERS[fmt]


def artifact_name(fmt: str, quant: str, variant: str = "") -> str:
    """The conventional name of an artifact inside a bundle: model-q4_0.gguf, model-q4_0-imatrix.gguf,
    onnx-int8/ (`variant` is ArtifactSpec.variant)."""
    return _entry(fmt)[1](quant + variant)


def export_file(
    model_dir: Path, fmt: str, quant: str, out: Path, options: ExportOptions = ExportOptions()
) -> Any:
    """Export `model_dir` to `out` in `fmt`/`quant`; returns the exporter's typed result."""
    return _entry(fmt)[0](Path(model_dir), Path(out), quant, options)


def export_artifact(
    model_dir: Path, fmt: str, quant: str, out_dir: Path, options: ExportOptions = ExportOptions()
) -> Path:
    """Export into `out_dir` under the conventional name (plus the accuracy level, if set); returns the path."""
    name = artifact_name(fmt, quant)
    if options.accuracy_level is not None:
        name = f"{name}-acc{options.accuracy_level}"
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(export_file(model_dir, fmt, quant, out, options).path)
