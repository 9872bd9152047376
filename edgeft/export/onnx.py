"""HF causal LM directory → onnxruntime-genai model directory, built by onnxruntime-genai's model builder.

The builder (`onnxruntime_genai.models.builder`) is called as a library: it writes model.onnx (+ external
weights in model.onnx.data), genai_config.json and the tokenizer files. int8/int4 are weight-only
MatMulNBits quants; `accuracy_level` picks the precision the CPU kernel computes activations in (4 = int8,
fast; 1 = fp32, closer to the float model). The builder is chatty (print, tqdm, root-logger INFO), so all
of its output goes to a log file in the work dir and a `--json` CLI stays clean.

Architectures are the ONNX_ARCHS table; traits the builder or onnxruntime cannot handle are refused before
any work. The builder reads a staged copy of the model dir (safetensors only, config.json rewritten where
needed) and a config object fixed where it misreads a transformers 5 config (`_fix_builder_config`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import (
    ONNX_ACCURACY_LEVELS,
    ONNX_ARCHS,
    ONNX_EXECUTION_PROVIDER,
    ONNX_FLOAT_QUANTS,
    ONNX_MODEL_FILE,
    ONNX_OPT_ACCURACY_LEVEL,
    ONNX_OPT_HF_TOKEN,
    ONNX_PRECISIONS,
    ONNX_QUANTS,
    ONNX_REQUIRED_FILES,
    ONNX_SAFETENSORS_FILES,
    ONNX_SUPPORTED_ARCHS,
    PICKLE_SUFFIXES,
)
from ..errors import EdgeftError
from ..files import atomic_dir, ensure_replaceable_dir, tree_bytes, unique_sibling
from ..guard import check_external_data, check_model_folder
from ..loading import copy_tokenizer_files
from ..ui import Progress, info
from .onnx_tok import prove_tokenizer

_STEPS = 3  # build, check, publish


@dataclass(frozen=True)
class OnnxExportResult:
    """What export_onnx wrote: an onnxruntime-genai model directory."""

    path: Path
    quant: str
    accuracy_level: int | None  # MatMulNBits accuracy_level in the graph; None for fp32
    bytes: int
    tokenizer_mismatches: tuple[str, ...] = ()  # probes onnxruntime-genai tokenizes differently
    tokenizer_adapted: str | None = None  # what edgeft changed so onnxruntime-genai agrees (see onnx_tok)


# --- input checks ----------------------------------------------------------------------------------------


def _read_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeftError(f"{cfg_path}: cannot read the model config ({e})") from None
    if not isinstance(cfg, dict):
        raise EdgeftError(f"{cfg_path}: the model config is not a JSON object")
    return cfg


def _architecture(model_dir: Path) -> str:
    cfg = _read_config(model_dir)
    archs = cfg.get("architectures") or []
    return str(archs[0]) if archs else f"model_type={cfg.get('model_type', '?')}"


def _unsupported(model_dir: Path, arch: str) -> EdgeftError:
    refused = [a for a in ONNX_ARCHS if a not in ONNX_SUPPORTED_ARCHS]
    return EdgeftError(
        f"{model_dir}: architecture {arch} is not supported by edgeft's ONNX export "
        f"(supported: {', '.join(ONNX_SUPPORTED_ARCHS)}; refused: {', '.join(refused)})"
    )


def _gemma3_rope_types(cfg: dict[str, Any]) -> dict[str, str]:
    """Gemma 3's RoPE type per layer type, from a transformers 5 (nested) or 4 (rope_scaling) config."""
    # ref: transformers models/gemma3/configuration_gemma3.py convert_rope_params_to_dict: rope_parameters is
    # {"full_attention": {...}, "sliding_attention": {...}}; an old `rope_scaling` applies to full_attention.
    params = cfg.get("rope_parameters") or {}
    types = {
        t: str((params.get(t) or {}).get("rope_type", "default"))
        for t in ("full_attention", "sliding_attention")
    }
    scaling = cfg.get("rope_scaling") or {}
    if scaling:
        types["full_attention"] = str(scaling.get("rope_type", scaling.get("type", "default")))
    return types


def _refused_trait(arch: str, cfg: dict[str, Any]) -> str | None:
    """Why a supported architecture's config still cannot become a correct ONNX model (None: it can)."""
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (
        hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else 0
    )
    # ref: onnxruntime contrib_ops/cpu/bert/group_query_attention_helper.h CheckInputs ("head_size shall be a
    # multiple of 16", "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8"); the builder
    # uses GroupQueryAttention for every CPU float/int model (builders/base.py is_gqa_supported).
    if head_dim and head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16, which onnxruntime's GroupQueryAttention needs"
    rope = cfg.get("rope_parameters") or {}
    partial = cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    rotary = int(head_dim * float(partial))
    if head_dim and rotary % 16:
        return (
            f"{rotary} rotary dims (head_dim {head_dim} x partial_rotary_factor {partial}) are not a multiple of "
            "16, which onnxruntime's GroupQueryAttention needs"
        )
    if arch == "Gemma3ForCausalLM":
        scaled = {t: r for t, r in _gemma3_rope_types(cfg).items() if r != "default"}
        if scaled:
            # ref: builders/gemma.py Gemma3Model.make_rotary_embedding_multi_cache builds the sliding layers'
            # cache with the full-attention rescale_factors (KLD 0.19 on a tiny linear-scaled model).
            return (
                f"RoPE scaling {scaled} is not exported correctly: the builder applies the full-attention "
                "scaling to the sliding-window layers too"
            )
    return None


def _check_architecture(model_dir: Path) -> None:
    """Refuse, before any work, what the builder cannot turn into a correct onnxruntime-genai model."""
    cfg = _read_config(model_dir)
    arch = _architecture(model_dir)
    if arch not in ONNX_ARCHS:
        raise _unsupported(model_dir, arch)
    reason = ONNX_ARCHS[arch]
    if reason:
        raise EdgeftError(f"{model_dir}: {arch} is refused by edgeft's ONNX export: {reason}")
    trait = _refused_trait(arch, cfg)
    if trait:
        raise EdgeftError(f"{model_dir / 'config.json'}: {arch} cannot be exported to ONNX: {trait}")


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
    _check_architecture(model_dir)
    # The builder loads weights with transformers' from_pretrained, which reads these names (and only pickle
    # files without them; _stage_input never shows it any).
    if not any((model_dir / name).is_file() for name in ONNX_SAFETENSORS_FILES):
        raise EdgeftError(
            f"{model_dir}: no {' or '.join(ONNX_SAFETENSORS_FILES)} (pickle checkpoints are not loaded); "
            "re-save the model with safe_serialization=True"
        )


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


# Gemma norms scale by (1 + w); the builder adds that 1 to the weight in the dtype the checkpoint loads in
# (ref: builders/gemma.py GemmaModel add_offset = 1, builders/base.py make_layernorm `layernorm.weight +
# add_offset`), which rounds for a bf16 checkpoint (KLD ~1e-5 on a tiny model), so these load as float32.
_FLOAT32_LOAD_ARCHS = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def _stage_input(model_dir: Path, work: Path) -> Path:
    """The builder's input dir: links to model_dir's files minus pickle ones, and a rewritten config.json.

    transformers' from_pretrained falls back to pytorch_model.bin and the like, so the builder never sees
    those; config.json is a copy (the user's model dir is never written).
    """
    stage = work / "builder-input"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for src in sorted(model_dir.iterdir()):
        if not src.is_file() or src.name == "config.json" or src.suffix.lower() in PICKLE_SUFFIXES:
            continue
        try:
            (stage / src.name).symlink_to(src.resolve())
        except OSError:  # no symlinks here (some Windows setups): copy
            shutil.copy2(src, stage / src.name)
    cfg = _read_config(model_dir)
    if cfg.get("architectures", [None])[0] in _FLOAT32_LOAD_ARCHS:
        # ref: transformers 5 from_pretrained dtype="auto" takes the config's dtype (torch_dtype before 4.56).
        cfg["dtype"] = cfg["torch_dtype"] = "float32"
    (stage / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return stage


def _fix_builder_config(config: Any) -> None:
    """Set the attributes the builder reads from the HF config object where it misreads a transformers 5 one.

    Each fix gives the builder what the HF modeling code does; tests/test_onnx_archs.py checks the logits.
    """
    arch = config.architectures[0]
    rope = getattr(config, "rope_parameters", None) or {}
    if arch == "Gemma3ForCausalLM":
        # ref: builders/gemma.py Gemma3Model reads config.rope_local_base_freq and (builders/base.py) a flat
        # config.rope_theta / rope_parameters["rope_type"]; transformers 5 nests them per layer type.
        full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        config.rope_local_base_freq = sliding.get("rope_theta", 10_000.0)
        config.rope_theta = full.get("rope_theta", 1_000_000.0)
        config.rope_parameters = dict(full) or {"rope_type": "default"}
    if arch == "Phi3ForCausalLM":
        if rope.get("rope_type") == "longrope":
            # ref: builders/phi.py Phi3MiniLongRoPEModel.make_rope_init reads rope_parameters["type"].
            rope.setdefault("type", "longrope")
        else:
            # ref: builder.py create_model picks Phi3MiniLongRoPEModel whenever max_position_embeddings !=
            # original_max_position_embeddings; HF Phi-3 uses the latter only for longrope.
            config.original_max_position_embeddings = config.max_position_embeddings
    # ref: transformers models/{mistral,phi3}/modeling_*.py apply config.sliding_window in every layer;
    # builders/base.py is_local only windows layers whose layer_types entry is "sliding_attention".
    window = getattr(config, "sliding_window", None) or 0
    if (
        arch in ("MistralForCausalLM", "Phi3ForCausalLM")
        and getattr(config, "layer_types", None) is None
        and 0 < window < config.max_position_embeddings
    ):
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers


def _run_builder(model_dir: Path, out: Path, quant: str, accuracy_level: int | None, work: Path) -> None:
    builder = _import_builder()
    precision = ONNX_PRECISIONS[quant]
    cache = work / "cache"
    stage = _stage_input(model_dir, work)
    with _quiet(work / "builder.log"):
        # ref: builder.py __main__: parse_extra_options (loads the HF config/tokenizer) then create_model.
        kv = builder.parse_extra_options(
            None,
            str(stage),
            str(out),
            precision,
            ONNX_EXECUTION_PROVIDER,
            str(cache),
            _builder_options(quant, accuracy_level),
        )
        # ref: builder.py create_model pops extra_options["hf_details"]["hf_config"] and builds from it.
        _fix_builder_config(kv["hf_details"]["hf_config"])
        ep = ONNX_EXECUTION_PROVIDER
        builder.create_model(None, str(stage), str(out), precision, ep, str(cache), **kv)


def _builder_error(model_dir: Path, exc: BaseException) -> EdgeftError:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    arch = _architecture(model_dir)
    if isinstance(exc, NotImplementedError) and "not currently supported" in first:
        if arch not in ONNX_SUPPORTED_ARCHS:
            return _unsupported(model_dir, arch)
        # e.g. "The llama3 RoPE style is not currently supported.": a trait of a supported architecture
        return EdgeftError(f"{model_dir}: the onnx builder cannot export this {arch} ({first})")
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
    conversations: Sequence[Sequence[dict[str, str]]] = (),
) -> OnnxExportResult:
    """Export an HF causal LM directory (see ONNX_ARCHS) to an onnxruntime-genai model directory `out_dir`.

    quant: fp32 | int8 | int4 (weight-only MatMulNBits, block 32, symmetric). accuracy_level (int quants
    only): None or 0 = the builder's default (4 on the CPU EP), 1 = fp32 activations (closer to float, far
    slower for int8 on CPU), 4 = int8 activations; the result records the level the graph got. The build
    goes to a unique hidden folder and is renamed on success (edgeft.files.atomic_dir); an existing `out_dir`
    is only replaced if edgeft wrote it. Every failure is one EdgeftError and leaves no partial output.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_inputs(model_dir, quant, accuracy_level)
    ensure_replaceable_dir(out_dir)  # only a folder edgeft wrote is ever replaced
    check_model_folder(model_dir)  # nothing the folder names may lead outside it
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    own_work = work_dir is None
    work = unique_sibling(out_dir, "work", directory=True) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(out_dir, what="onnxruntime-genai model") as partial:
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
            # The builder re-saves the tokenizer through transformers, which may rebuild its pipeline; ship the
            # model's own files instead (edgeft.loading: one tokenization truth).
            copy_tokenizer_files(model_dir, partial)
            check_output(partial)
            _check_tokenizer(partial)
            tok_check = prove_tokenizer(model_dir, partial, conversations)
            if tok_check.mismatches:
                n = len(tok_check.mismatches)
                more = f" (and {n - 1} more)" if n > 1 else ""
                info(
                    f"warning: onnxruntime-genai cannot reproduce the tokenization of {model_dir}: "
                    f"{tok_check.mismatches[0]}{more}"
                )
            level = _matmulnbits_accuracy(partial / ONNX_MODEL_FILE)
            if progress:
                progress(2, _STEPS)
        if progress:
            progress(3, _STEPS)
        return OnnxExportResult(
            path=out_dir,
            quant=quant,
            accuracy_level=level,
            bytes=tree_bytes(out_dir),
            tokenizer_mismatches=tok_check.mismatches,
            tokenizer_adapted=tok_check.adapted,
        )
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
