"""HF causal LM directory → onnxruntime-genai model directory, built by onnxruntime-genai's model builder.

The builder (`onnxruntime_genai.models.builder`) is called as a library: it writes model.onnx (+ external
weights in model.onnx.data), genai_config.json and the tokenizer files. int8/int4 are weight-only
MatMulNBits quants; `accuracy_level` picks the precision the CPU kernel computes activations in (4 = int8,
fast; 1 = fp32, closer to the float model). The builder is chatty (print, tqdm, root-logger INFO), so all
of its output goes to a log file in the work dir and a `--json` CLI stays clean.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import (
    ONNX_ACCURACY_LEVELS,
    ONNX_ARCHS,
    ONNX_EXECUTION_PROVIDER,
    ONNX_FLOAT_QUANTS,
    ONNX_GENAI_CONFIG,
    ONNX_MODEL_FILE,
    ONNX_OPT_ACCURACY_LEVEL,
    ONNX_OPT_HF_TOKEN,
    ONNX_PRECISIONS,
    ONNX_QUANTS,
    ONNX_REQUIRED_FILES,
)
from ..errors import EdgeftError
from ..files import tree_bytes
from ..guard import check_external_data

Progress = Callable[[int, int], None]
_STEPS = 3  # build, check, publish


@dataclass(frozen=True)
class OnnxExportResult:
    """What export_onnx wrote: an onnxruntime-genai model directory."""

    path: Path
    quant: str
    accuracy_level: int | None  # MatMulNBits accuracy_level in the graph; None for fp32
    bytes: int


# --- input checks ----------------------------------------------------------------------------------------


def _architecture(model_dir: Path) -> str:
    cfg_path = model_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeftError(f"{cfg_path}: cannot read the model config ({e})") from None
    archs = cfg.get("architectures") or []
    return str(archs[0]) if archs else f"model_type={cfg.get('model_type', '?')}"


def _check_inputs(model_dir: Path, quant: str, accuracy_level: int | None) -> None:
    if quant not in ONNX_PRECISIONS:
        raise EdgeftError(f"unknown ONNX quant '{quant}' (known: {', '.join(ONNX_QUANTS)})")
    if accuracy_level:
        if quant in ONNX_FLOAT_QUANTS:
            raise EdgeftError(f"accuracy_level applies to int8/int4 ONNX quants, not '{quant}'")
        if accuracy_level not in ONNX_ACCURACY_LEVELS:
            levels = ", ".join(f"{k} ({v})" for k, v in ONNX_ACCURACY_LEVELS.items())
            raise EdgeftError(f"unknown ONNX accuracy_level {accuracy_level} (known: {levels})")
    if not model_dir.is_dir():
        raise EdgeftError(f"{model_dir}: model directory does not exist")
    arch = _architecture(model_dir)
    if arch not in ONNX_ARCHS:
        raise EdgeftError(
            f"{model_dir}: architecture {arch} is not supported by edgeft's ONNX export "
            f"(supported: {', '.join(ONNX_ARCHS)})"
        )
    # The builder loads weights with transformers' from_pretrained; refuse pickle-only checkpoints.
    if not any(model_dir.glob("*.safetensors")):
        raise EdgeftError(f"{model_dir}: no .safetensors weights (pickle checkpoints are not loaded)")


# --- the builder, quietly ----------------------------------------------------------------------------------


def _import_builder() -> Any:
    """Import the model builder without keeping its import-time side effects.

    onnxruntime.quantization.matmul_nbits_quantizer runs `logging.basicConfig(level=INFO)` on import, which
    would make every INFO log of the process print to stderr; the root logger is restored afterwards.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401
        from onnxruntime_genai.models import builder
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EdgeftError(f"onnxruntime-genai is not installed ({e}); pip install onnxruntime-genai") from e
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return builder


@contextlib.contextmanager
def _quiet(log_path: Path) -> Iterator[None]:
    """Send the builder's prints, progress bars and quantizer logs to `log_path`."""
    noisy = logging.getLogger("onnxruntime")
    old_level, old_propagate = noisy.level, noisy.propagate
    with open(log_path, "a", encoding="utf-8") as log:
        handler = logging.StreamHandler(log)
        noisy.addHandler(handler)
        noisy.setLevel(logging.WARNING)
        noisy.propagate = False
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            noisy.removeHandler(handler)
            noisy.setLevel(old_level)
            noisy.propagate = old_propagate


def _builder_options(quant: str, accuracy_level: int | None) -> list[str]:
    # KEY=VALUE strings, exactly as builder.parse_extra_options takes them from the command line.
    opts = [f"{ONNX_OPT_HF_TOKEN}=false"]  # local input dir: never read or send a Hub token
    # None/0: leave it to the builder (4 on the CPU EP today; the result records what the graph got).
    if accuracy_level and quant not in ONNX_FLOAT_QUANTS:
        opts.append(f"{ONNX_OPT_ACCURACY_LEVEL}={accuracy_level}")
    return opts


def _run_builder(model_dir: Path, out: Path, quant: str, accuracy_level: int | None, work: Path) -> None:
    builder = _import_builder()
    precision = ONNX_PRECISIONS[quant]
    cache = work / "cache"
    with _quiet(work / "builder.log"):
        # ref: builder.py __main__: parse_extra_options (loads the HF config/tokenizer) then create_model.
        kv = builder.parse_extra_options(
            None,
            str(model_dir),
            str(out),
            precision,
            ONNX_EXECUTION_PROVIDER,
            str(cache),
            _builder_options(quant, accuracy_level),
        )
        ep = ONNX_EXECUTION_PROVIDER
        builder.create_model(None, str(model_dir), str(out), precision, ep, str(cache), **kv)


def _builder_error(model_dir: Path, exc: BaseException) -> EdgeftError:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    if isinstance(exc, NotImplementedError) and "not currently supported" in first:
        return EdgeftError(
            f"{model_dir}: architecture {_architecture(model_dir)} is not supported by edgeft's ONNX export "
            f"(supported: {', '.join(ONNX_ARCHS)})"
        )
    return EdgeftError(f"onnx builder failed for {model_dir}: {first}")


# --- output checks ---------------------------------------------------------------------------------------


def _matmulnbits_accuracy(model_path: Path) -> int | None:
    """The accuracy_level the MatMulNBits nodes carry (None when there are none, i.e. a float model)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    levels = [
        # an absent attribute is the op's default, 0 (ref: onnxruntime docs/ContribOperators.md MatMulNBits)
        next((int(a.i) for a in n.attribute if a.name == "accuracy_level"), 0)
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    ]
    return min(levels) if levels else None


def _check_tokenizer(out: Path) -> None:
    """onnxruntime-genai must load the tokenizer it will be deployed with, and round-trip a probe text."""
    import onnxruntime_genai as og

    probe = "Hello, world! 123"
    try:
        tok = og.Tokenizer(og.Model(str(out)))
        text = tok.decode(tok.encode(probe))
    except Exception as e:  # noqa: BLE001 - og raises RuntimeError/others for config and file problems
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EdgeftError(f"{out}: onnxruntime-genai cannot load the model/tokenizer ({msg})") from None
    if probe not in text:
        raise EdgeftError(f"{out}: onnxruntime-genai tokenizer does not round-trip {probe!r} (got {text!r})")


def check_output(out: Path) -> None:
    """The files onnxruntime-genai needs are there, regular (no symlinks), and weights stay inside `out`."""
    missing = [f for f in ONNX_REQUIRED_FILES if not (out / f).is_file()]
    if missing:
        raise EdgeftError(f"{out}: the ONNX export is missing {', '.join(missing)}")
    links = [p.name for p in out.rglob("*") if p.is_symlink()]
    if links:
        raise EdgeftError(f"{out}: the ONNX export contains symlinks ({', '.join(links)})")
    for data in check_external_data(out / ONNX_MODEL_FILE, out):
        if not data.is_file():
            raise EdgeftError(f"{out}: external data file {data.name} is missing")


# --- the exporter ----------------------------------------------------------------------------------------


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    quant: str = "int8",
    *,
    accuracy_level: int | None = None,
    work_dir: Path | None = None,
    progress: Progress | None = None,
) -> OnnxExportResult:
    """Export an HF Llama/Mistral/Qwen2 directory to an onnxruntime-genai model directory `out_dir`.

    quant: fp32 | int8 | int4 (weight-only MatMulNBits, block 32, symmetric). accuracy_level (int quants
    only): None or 0 = the builder's default (4 on the CPU EP), 1 = fp32 activations (closer to float, far
    slower for int8 on CPU), 4 = int8 activations; the result records the level the graph got. The build
    goes to `out_dir`.partial and is renamed on success; an existing `out_dir` is only replaced if it is an
    onnxruntime-genai model directory. Every failure is one EdgeftError and leaves no partial output.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_inputs(model_dir, quant, accuracy_level)
    if out_dir.exists() and not (out_dir / ONNX_GENAI_CONFIG).is_file():
        raise EdgeftError(f"{out_dir}: exists and is not an ONNX model directory; choose another output")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix=".edgeft-onnx-", dir=out_dir.parent)) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if progress:
            progress(0, _STEPS)
        try:
            _run_builder(model_dir, partial, quant, accuracy_level, work)
        except EdgeftError:
            raise
        except Exception as e:  # noqa: BLE001 - the builder raises anything from ValueError to torch errors
            raise _builder_error(model_dir, e) from None
        if progress:
            progress(1, _STEPS)
        check_output(partial)
        _check_tokenizer(partial)
        level = _matmulnbits_accuracy(partial / ONNX_MODEL_FILE)
        if progress:
            progress(2, _STEPS)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
        if progress:
            progress(3, _STEPS)
        return OnnxExportResult(path=out_dir, quant=quant, accuracy_level=level, bytes=tree_bytes(out_dir))
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
