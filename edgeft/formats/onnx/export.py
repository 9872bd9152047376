"""HF causal LM directory → onnxruntime-genai model directory, built by onnxruntime-genai's model builder.

The builder (`onnxruntime_genai.models.builder`) is called as a library: it writes model.onnx (+ external
weights in model.onnx.data), genai_config.json and the tokenizer files. int8/int4 are weight-only
MatMulNBits quants; `accuracy_level` picks the precision the CPU kernel computes activations in (4 = int8,
fast; 1 = fp32, closer to the float model). A tied model keeps one quantized matrix for the lm_head and the
token embedding, whose rows GatherBlockQuantized reads: the builder does this for int4, edgeft for int8
(`_share_int8_embedding`; the builder would keep a float32 copy of the table). The builder is chatty (print, tqdm, root-logger INFO), so all
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

from edgeft.constants import PICKLE_SUFFIXES
from edgeft.errors import EdgeftError
from edgeft.files import atomic_dir, ensure_replaceable_dir, tree_bytes, unique_sibling
from edgeft.formats.onnx.constants import (
    ONNX_ACCURACY_LEVELS,
    ONNX_ARCHS,
    ONNX_DATA_FILE,
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
)
from edgeft.formats.onnx.folder import check_external_data
from edgeft.formats.onnx.tokenizer import prove_tokenizer
from edgeft.guard import check_model_folder
from edgeft.loading import copy_tokenizer_files
from edgeft.ui import Progress, info

_STEPS = 3  # build, check, publish
# The quant whose tied embedding edgeft gathers from the quantized head itself (int4: the builder does).
_SHARED_INT8_QUANT = "int8"


@dataclass(frozen=True)
class OnnxExportResult:
    """What export_onnx wrote: an onnxruntime-genai model directory."""

    path: Path
    quant: str
    accuracy_level: int | None  # MatMulNBits accuracy_level in the graph; None for fp32
    bytes: int
    tokenizer_mismatches: tuple[str, ...] = ()  # probes onnxruntime-genai tokenizes differently
    tokenizer_adapted: str | None = (
        None  # what edgeft changed so onnxruntime-genai agrees (see edgeft.formats.onnx.tokenizer)
    )


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


def _run_builder(model_dir: Path, out: Path, quant: str, accuracy_level: int | None, work: Path) -> bool:
    """Build `out` with the model builder; True when the builder treats the model as tied (one matrix for
    the token embedding and the lm_head)."""
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
        # ref: builder.py check_extra_options: shared_embeddings defaults to config.tie_word_embeddings (and
        # is refused for an untied model).
        tied = bool(kv.get("shared_embeddings", False))
        builder.create_model(None, str(stage), str(out), precision, ep, str(cache), **kv)
    return tied


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


# --- a tied int8 head shared with the embedding gather -----------------------------------------------------

# What the builder names the token embedding lookup and the output head, and the graph input of token ids.
# ref: builders/base.py make_embedding (basename "/model/embed_tokens"), make_lm_head ("/lm_head/MatMul";
# to_nbits renames it "/lm_head/MatMul_Q8"), self.input_names["input_ids"].
_EMBED_BASENAME = "/model/embed_tokens"
_LM_HEAD_PREFIX = "/lm_head/"
_INPUT_IDS = "input_ids"
# Both ops default an absent zero point to 2^(bits-1) = 128 for 8-bit uint8 data (ref: onnxruntime
# docs/ContribOperators.md MatMulNBits input zero_points, GatherBlockQuantized point 2), so the head's blocks
# dequantize the same way in either op.
_INT8_ZERO_POINT = 128
_ROWS_PER_CHECK = 4096  # rows of the table compared at a time (bounded memory on a large vocabulary)


def _same_table(table: Any, qweight: Any, scales: Any, k: int) -> bool:
    """Whether the float `table` [N, K] is the matrix the int8 MatMulNBits blocks `qweight` [N, blocks,
    block] with `scales` [N, blocks] hold: every element within one quantization step of its block."""
    import numpy as np

    n, blocks, block = qweight.shape
    if table.shape != (n, k) or scales.shape != (n, blocks) or blocks * block < k:
        return False
    for lo in range(0, n, _ROWS_PER_CHECK):
        q = qweight[lo : lo + _ROWS_PER_CHECK].astype(np.float32) - _INT8_ZERO_POINT
        s = scales[lo : lo + _ROWS_PER_CHECK].astype(np.float32)[:, :, None]
        deq = (q * s).reshape(len(q), blocks * block)[:, :k]
        step = np.broadcast_to(np.abs(s), q.shape).reshape(len(q), blocks * block)[:, :k]
        if not np.all(np.abs(deq - table[lo : lo + _ROWS_PER_CHECK]) <= step * 1.001 + 1e-12):
            return False
    return True


def _share_int8_embedding(folder: Path) -> None:
    """Gather a tied model's token embeddings from its int8 lm_head instead of a float32 copy of the table.

    The builder quantizes a tied model's lm_head to int8 but keeps the embedding as a float32 table for Gather
    (ref: builders/base.py make_tied_embeddings_init: a quantized embedding only for INT4/UINT4;
    make_tied_quantized_embedding_input_names names int8 initializers that the default quantizer does not
    write) — 113 of 266 MB on SmolLM2-135M. GatherBlockQuantized reads uint8 data with bits=8 (ref:
    onnxruntime docs/ContribOperators.md), so the embedding gathers rows of the head's blocks [N, blocks,
    block] themselves, quantized along axis 2 with the head's scales as [N, blocks, 1], and reshapes them to
    [batch, sequence, K padded] (slicing off any padding, as builders/base.py make_embedding_lookup does for
    int4). The builder's int4 graph reshapes the blocks to [N, K padded] instead, which onnxruntime
    constant-folds into a second copy of the head in anonymous memory (+27 MB over the float-table graph on
    SmolLM2-135M int8, measured); reading the head's own initializer adds 3 MB (the reshaped scales), its
    pages staying file-backed and reclaimable. The table is dropped only once it is checked to be the head's
    matrix, within one quantization step.
    """
    import numpy as np
    import onnx_ir as ir

    model_file = folder / ONNX_MODEL_FILE
    model = ir.load(str(model_file))
    graph = model.graph
    ids = next((v for v in graph.inputs if v.name == _INPUT_IDS), None)
    gather = next(
        (n for n in graph if n.op_type == "Gather" and ids is not None and n.inputs[1] is ids), None
    )
    head = next(
        (n for n in graph if n.op_type == "MatMulNBits" and (n.name or "").startswith(_LM_HEAD_PREFIX)), None
    )
    if gather is None or head is None or gather.inputs[0] is None or gather.inputs[0].const_value is None:
        raise EdgeftError(f"{model_file}: no embedding Gather and int8 lm_head MatMulNBits to share")
    attrs = {name: a.value for name, a in head.attributes.items()}
    if attrs.get("bits") != 8 or len([v for v in head.inputs if v is not None]) != 3:
        # zero points, g_idx or bias would need more than the head's blocks and scales
        raise EdgeftError(f"{model_file}: the lm_head is not a symmetric int8 MatMulNBits ({attrs})")
    table_value, weight, scales = gather.inputs[0], head.inputs[1], head.inputs[2]
    k, block = int(attrs["K"]), int(attrs["block_size"])
    qweight = weight.const_value.numpy() if weight.const_value is not None else None
    scale_array = scales.const_value.numpy() if scales.const_value is not None else None
    if (
        qweight is None
        or scale_array is None
        or not _same_table(table_value.const_value.numpy(), qweight, scale_array, k)
    ):
        raise EdgeftError(f"{model_file}: the embedding table is not the int8 lm_head's matrix; not shared")
    n, blocks, _ = qweight.shape
    padded = blocks * block

    def const(name: str, values: list[int]) -> ir.Node:
        node = ir.node(
            "Constant", [], attributes={"value": ir.tensor(np.array(values, dtype=np.int64))}, name=name
        )
        node.outputs[0].name = f"{name}/output_0"
        return node

    # Shapes as Constant nodes, not initializers: the builder writes every initializer as external data, and
    # onnxruntime's shape inference cannot read a Reshape's shape from external data.
    scale_shape = const(f"{_EMBED_BASENAME}/scales_shape", [n, blocks, 1])
    scales_3d = ir.node("Reshape", [scales, scale_shape.outputs[0]], name=f"{_EMBED_BASENAME}/ReshapeScales")
    scales_3d.outputs[0].name = f"{scales_3d.name}/output_0"
    lookup = ir.node(
        "GatherBlockQuantized",
        [weight, ids, scales_3d.outputs[0]],
        attributes={"bits": 8, "block_size": block, "gather_axis": 0, "quantize_axis": 2},
        domain="com.microsoft",
        name=f"{_EMBED_BASENAME}/GatherBlockQuantized",
    )
    lookup.outputs[0].name = f"{lookup.name}/output_0"
    row_shape = const(f"{_EMBED_BASENAME}/rows_shape", [0, 0, padded])  # 0: keep batch and sequence
    rows = ir.node("Reshape", [lookup.outputs[0], row_shape.outputs[0]], name=f"{_EMBED_BASENAME}/Reshape")
    new_nodes = [scale_shape, scales_3d, lookup, row_shape, rows]
    out = rows.outputs[0]
    if padded != k:  # rows are padded to whole blocks: cut the padding off the gathered rows
        starts, ends, axes = (
            const(f"{_EMBED_BASENAME}/Slice/{a}", [v]) for a, v in (("starts", 0), ("ends", k), ("axes", -1))
        )
        cut = ir.node(
            "Slice",
            [out, starts.outputs[0], ends.outputs[0], axes.outputs[0]],
            name=f"{_EMBED_BASENAME}/Slice",
        )
        new_nodes += [starts, ends, axes, cut]
        out = cut.outputs[0]
    old = gather.outputs[0]
    out.name, out.type, out.shape = f"{new_nodes[-1].name}/output_0", old.type, old.shape
    graph.insert_before(gather, new_nodes)
    ir.convenience.replace_all_uses_with(old, out)
    graph.remove(gather, safe=True)
    del graph.initializers[table_value.name]
    # Saved beside the files it reads from (external data is read lazily), then moved over them.
    staged = unique_sibling(model_file, "shared", directory=True)
    try:
        ir.save(model, str(staged / ONNX_MODEL_FILE), external_data=ONNX_DATA_FILE, size_threshold_bytes=0)
        del model, graph
        for name in (ONNX_MODEL_FILE, ONNX_DATA_FILE):
            (staged / name).replace(folder / name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


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
    slower for int8 on CPU), 4 = int8 activations; the result records the level the graph got. A tied
    model's int8 embedding is gathered from the int8 head (no float32 table; see _share_int8_embedding).
    The build goes to a unique hidden folder and is renamed on success (edgeft.files.atomic_dir); an existing
    `out_dir` is only replaced if edgeft wrote it. Every failure is one EdgeftError and leaves no partial output.
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
                tied = _run_builder(model_dir, partial, quant, accuracy_level, work)
            except EdgeftError:
                raise
            except Exception as e:  # noqa: BLE001 - the builder raises anything from ValueError to torch errors
                raise _builder_error(model_dir, e) from None
            if tied and quant == _SHARED_INT8_QUANT:
                try:
                    _share_int8_embedding(partial)
                except EdgeftError:
                    raise
                except Exception as e:  # noqa: BLE001 - onnx_ir/numpy raise assorted types on a graph
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise EdgeftError(
                        f"{model_dir}: cannot share the int8 lm_head with the embedding ({msg})"
                    ) from None
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
