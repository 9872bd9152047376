"""Per-architecture facts for GGUF: hyperparameter keys, tensor names, layout transforms and refusals.

`ARCHS` is the table: one `ArchSpec` per HF `architectures` entry, naming the GGUF architecture, the extra
hyperparameter writers, the per-tensor transforms and the checks that refuse configs llama.cpp cannot run
as transformers does. Everything is decided by `prepare` before the caller creates any file.

Facts come from llama.cpp's own converter and loader (vendor/llama.cpp in llama-cpp-python 0.3.36):
`conversion/*.py` (what convert_hf_to_gguf.py writes) and `src/models/<arch>.cpp` (what the runtime reads,
and what it hard-codes instead of reading).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgeft.errors import EdgeftError
from edgeft.files import read_json
from edgeft.formats.gguf.constants import GGUF_ARCHS
from edgeft.formats.gguf.weights import Plan, safetensors_files, tensor_index

FULL, SLIDING = "full_attention", "sliding_attention"  # transformers `layer_types` values

Array = np.ndarray
Transform = Callable[[Array], Array]


# --- the parsed config -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rope:
    """One layer type's rotary settings, normalized across transformers 4 and 5 config spellings."""

    type: str  # "default", "linear", "yarn", "llama3", "longrope"
    theta: float
    params: dict[str, Any]  # the rest: factor, original_max_position_embeddings, long_factor, ...


@dataclass(frozen=True)
class Model:
    """What the writers, transforms and checks need from config.json."""

    config: dict[str, Any]
    where: Path  # config.json, for error messages
    spec: ArchSpec
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_layer: int
    n_vocab: int
    rope: dict[str, Rope]  # FULL and SLIDING
    rope_fields: dict[str, str]  # FULL/SLIDING → the config field their settings came from (for errors)
    layer_types: tuple[str, ...]
    tied: bool

    def get(self, key: str, default: Any = None) -> Any:
        """A config field, or the transformers default of this architecture when the file omits it."""
        if key in self.config:
            return self.config[key]
        return self.spec.defaults.get(key, default)

    def refuse(self, what: str, why: str) -> EdgeftError:
        """The one-line error for a config llama.cpp cannot run as transformers does."""
        return EdgeftError(
            f"{self.where}: {what} is not supported for GGUF export of {self.spec.hf_arch}; {why}"
        )

    @property
    def n_ctx(self) -> int:
        return int(self.get("max_position_embeddings") or 2048)

    @property
    def ignored_window(self) -> int | None:
        """A sliding window shorter than the context that llama.cpp ignores for this architecture (it attends
        over everything), or None. Up to the window both agree exactly; beyond it they differ."""
        if check_no_sliding_window not in self.spec.checks:
            return None
        if self.spec.swa_flag is not None and not self.get(self.spec.swa_flag, False):
            return None  # Qwen: sliding_window is inert unless use_sliding_window
        window = self.get("sliding_window")
        return int(window) if window is not None and int(window) < self.n_ctx else None

    @property
    def exact_context(self) -> int:
        """The context length over which the GGUF computes what transformers does (written as context_length)."""
        return self.ignored_window or self.n_ctx

    @property
    def partial_rotary_factor(self) -> float:
        return float(self.rope[FULL].params.get("partial_rotary_factor", 1.0))

    @property
    def n_rot(self) -> int:
        # ref: transformers modeling_rope_utils (dim = int(head_dim * partial_rotary_factor))
        return int(self.head_dim * self.partial_rotary_factor)

    def rope_key(self, key: str, layer_type: str = FULL) -> str:
        """Where a rope setting is spelled in config.json, e.g. rope_parameters.sliding_attention.rope_type."""
        if key in self.config and key not in ("rope_parameters", "rope_scaling"):
            return key  # transformers 4 top-level field (partial_rotary_factor, original_max_position_...)
        return f"{self.rope_fields[layer_type]}.{key}"


def _rope_dict(raw: dict[str, Any], theta: float) -> Rope:
    params = dict(raw)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    return Rope(rope_type, float(params.pop("rope_theta", theta)), params)


def _parse_rope(config: dict[str, Any], spec: ArchSpec) -> tuple[dict[str, Rope], dict[str, str]]:
    """Rope settings per layer type from transformers 5 `rope_parameters` (flat, or one dict per layer type)
    or transformers 4 `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`).

    ref: transformers modeling_rope_utils.py standardize_rope_params, Gemma3TextConfig.convert_rope_params_to_dict
    """
    rp = config.get("rope_parameters")
    flat = "rope_parameters" if rp else "rope_scaling"
    fields = {FULL: flat, SLIDING: flat}
    theta = float(config.get("rope_theta", spec.defaults.get("rope_theta", 10000.0)))
    # Gemma 3: local layers rope unscaled on their own base unless told otherwise; transformers 4 configs
    # put rope_scaling on global layers only. ref: Gemma3TextConfig.convert_rope_params_to_dict
    local_theta = float(config.get("rope_local_base_freq", spec.defaults.get("rope_local_base_freq", theta)))
    if rp and (FULL in rp or SLIDING in rp):
        fields = {t: f"rope_parameters.{t}" for t in (FULL, SLIDING)}
        full = _rope_dict(rp.get(FULL) or {}, theta)
        local = rp.get(SLIDING)
        if local:
            sliding = _rope_dict(local, local_theta)
        else:
            sliding = Rope("default", local_theta, {}) if spec.local_rope_default else full
    else:
        full = _rope_dict({**(config.get("rope_scaling") or {}), **(rp or {})}, theta)
        sliding = Rope("default", local_theta, {}) if spec.local_rope_default else full
    for key in ("partial_rotary_factor", "original_max_position_embeddings"):
        for rope in (full, sliding):
            if key in config and (key not in rope.params or key == "original_max_position_embeddings"):
                # Phi-3 keeps original_max_position_embeddings beside rope_scaling, and it wins.
                # ref: transformers standardize_rope_params ("exception case where we give priority")
                rope.params[key] = config[key]
    return {FULL: full, SLIDING: sliding}, fields


def _layer_types(config: dict[str, Any], spec: ArchSpec, n_layer: int, where: Path) -> tuple[str, ...]:
    """transformers' per-layer attention kinds: `layer_types`, else the arch's default pattern."""
    types = config.get("layer_types")
    if types is None:
        period = int(config.get("sliding_window_pattern") or spec.hf_swa_period or 0)
        if not period:
            return (FULL,) * n_layer
        # ref: transformers Gemma2Config/Gemma3TextConfig (sliding unless (i + 1) % pattern == 0)
        return tuple(SLIDING if (i + 1) % period else FULL for i in range(n_layer))
    types = tuple(types)
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise EdgeftError(
            f"{where}: layer_types {', '.join(map(repr, unknown))} is not supported for GGUF export; "
            f"llama.cpp runs {spec.hf_arch} layers as {FULL!r} or {SLIDING!r}"
        )
    if len(types) != n_layer:
        raise EdgeftError(f"{where}: layer_types has {len(types)} entries for num_hidden_layers {n_layer}")
    return types


# Far past any released model: a value beyond them is a corrupt or hostile config.json, refused before it
# sizes an allocation or divides anything. (field, required, upper bound)
SHAPE_BOUNDS = (
    ("hidden_size", True, 1 << 17),
    ("num_attention_heads", True, 4096),
    ("num_hidden_layers", True, 4096),
    ("intermediate_size", True, 1 << 20),
    ("vocab_size", True, 1 << 24),
    ("num_key_value_heads", False, 4096),
    ("head_dim", False, 1 << 14),
    ("max_position_embeddings", False, 1 << 24),
    ("sliding_window", False, 1 << 24),
)


def check_config_shape(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """Type- and range-check the shape fields of config.json; one-line EdgeftError naming file and field."""
    for key, required, hi in SHAPE_BOUNDS:
        value = config.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
            shown = f"= {repr(value)[:40]}" if key in config else "is missing and"
            raise EdgeftError(f"{where}: {key} {shown} should be an integer from 1 to {hi}")
    heads, kv_heads = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    if heads % kv_heads:
        raise EdgeftError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise EdgeftError(
            f"{where}: hidden_size {config['hidden_size']} is not a multiple of num_attention_heads {heads} "
            "(and no head_dim is given)"
        )
    for key in ("rope_theta", "rms_norm_eps"):
        value = config.get(key)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
        ):
            raise EdgeftError(f"{where}: {key} = {repr(value)[:40]} should be a finite number > 0")
    return config


def parse_model(model_dir: Path) -> Model:
    """config.json → Model, refusing architectures not in ARCHS and shapes out of bounds."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EdgeftError(f"{model_dir}: model directory does not exist")
    where = model_dir / "config.json"
    if not where.is_file():
        raise EdgeftError(f"{where}: missing; not a Hugging Face model directory")
    config = read_json(where)
    if not isinstance(config, dict):
        raise EdgeftError(f"{where}: not a JSON object; not a Hugging Face config.json")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise EdgeftError(f"{where}: architectures = {repr(archs)[:60]} should be a list of class names")
    spec = next((ARCHS[a] for a in archs if a in ARCHS), None)
    if spec is None:
        raise EdgeftError(
            f"{where}: architecture {', '.join(archs) or '(none)'} is not supported for GGUF export; "
            f"supported: {', '.join(ARCHS)}"
        )
    check_config_shape(config, where)
    n_embd, n_head, n_layer = (
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_hidden_layers"],
    )
    rope, rope_fields = _parse_rope(config, spec)
    for layer_type, r in rope.items():
        if not 0 < r.theta < math.inf:
            raise EdgeftError(
                f"{where}: rope theta {r.theta} ({rope_fields[layer_type]}) should be finite and > 0"
            )
    return Model(
        config=config,
        where=where,
        spec=spec,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=int(config.get("head_dim") or n_embd // n_head),
        n_layer=n_layer,
        n_vocab=int(config["vocab_size"]),
        rope=rope,
        rope_fields=rope_fields,
        layer_types=_layer_types(config, spec, n_layer, where),
        tied=bool(config.get("tie_word_embeddings", spec.defaults.get("tie_word_embeddings", False))),
    )


# --- hyperparameter writers --------------------------------------------------------------------------------

HparamWriter = Callable[[gguf.GGUFWriter, Model], None]


def write_common(w: gguf.GGUFWriter, m: Model) -> None:
    """Keys every architecture here reads. ref: llama.cpp conversion/base.py TextModel.set_gguf_parameters"""
    w.add_context_length(m.exact_context)
    w.add_embedding_length(m.n_embd)
    w.add_block_count(m.n_layer)
    w.add_feed_forward_length(int(m.config["intermediate_size"]))
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_head_kv)
    w.add_layer_norm_rms_eps(float(m.get("rms_norm_eps", 1e-6)))
    if m.head_dim != m.n_embd // m.n_head:
        # ref: src/llama-model.cpp load_hparams (n_embd_head_k defaults to n_embd / n_head)
        w.add_key_length(m.head_dim)
        w.add_value_length(m.head_dim)
    w.add_rope_dimension_count(m.n_rot)
    w.add_rope_freq_base(m.rope[FULL].theta)
    w.add_vocab_size(m.n_vocab)


def _mscale(factor: float) -> float:
    """YaRN's default attention factor. ref: transformers _compute_yarn_parameters get_mscale."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def write_rope_scaling(w: gguf.GGUFWriter, m: Model) -> None:
    """Linear and YaRN scaling of the global rope. ref: conversion/base.py TextModel.set_gguf_parameters"""
    rope = m.rope[FULL]
    if rope.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope.params["factor"]))
    elif rope.type == "yarn":
        factor = _yarn_factor(m)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(_orig_ctx(m))
        attn = rope.params.get("attention_factor")
        if attn is not None:
            # llama.cpp derives mscale(factor) itself, then multiplies by rope.scaling.attn_factor.
            # ref: src/llama-context.cpp (yarn_attn_factor = get_mscale(factor); *= hparams.rope_attn_factor)
            w.add_rope_scaling_attn_factors(float(attn) / _mscale(factor))


def _orig_ctx(m: Model) -> int:
    """The pretraining context a scaled rope extends (transformers' default: max_position_embeddings)."""
    orig = m.rope[FULL].params.get("original_max_position_embeddings") or m.get(
        "original_max_position_embeddings"
    )
    return int(orig or m.n_ctx)


def _yarn_factor(m: Model) -> float:
    # ref: transformers _compute_yarn_parameters (factor, else max_position_embeddings / original)
    factor = m.rope[FULL].params.get("factor")
    return float(factor) if factor is not None else m.n_ctx / _orig_ctx(m)


def write_gemma_softcaps(w: gguf.GGUFWriter, m: Model) -> None:
    """Attention and final logit soft-capping. ref: conversion/gemma.py Gemma2Model / Gemma3Model"""
    if (attn := m.get("attn_logit_softcapping")) is not None:
        w.add_attn_logit_softcapping(float(attn))
    if (final := m.get("final_logit_softcapping")) is not None:
        w.add_final_logit_softcapping(float(final))


def _llama_swa_layers(m: Model) -> list[bool]:
    """The sliding layers llama.cpp assumes when the file has no per-layer pattern.

    ref: src/models/gemma2.cpp / gemma3.cpp load_swa_pattern(ml, 2 / 6) and llama-hparams.cpp
    set_swa_pattern (layer il slides when il % n_pattern < n_pattern - 1)
    """
    period = m.spec.llama_swa_period
    return [il % period < period - 1 for il in range(m.n_layer)]


def write_sliding_window(w: gguf.GGUFWriter, m: Model) -> None:
    """Window size, and the per-layer pattern when it is not the one llama.cpp hard-codes.

    llama.cpp reads an array `attention.sliding_window_pattern` before falling back to its built-in period
    (ref: src/llama-model.cpp llama_model_base::load_swa_pattern), so any transformers `layer_types` layout
    is representable; the array is only written when needed, as older runtimes expect the default.
    """
    sliding = [t == SLIDING for t in m.layer_types]
    if not any(sliding) and m.spec.gguf_arch == gguf.MODEL_ARCH.GEMMA3:
        return  # no window key: llama.cpp runs Gemma 3 without SWA. ref: src/models/gemma3.cpp
    w.add_sliding_window(int(m.get("sliding_window") or 0))
    if sliding != _llama_swa_layers(m):
        w.add_sliding_window_pattern(sliding)
    if any(sliding):
        # ref: conversion/base.py (rope.freq_base_swa from rope_parameters.sliding_attention.rope_theta)
        w.add_rope_freq_base_swa(m.rope[SLIDING].theta)


def write_phi3_rope(w: gguf.GGUFWriter, m: Model) -> None:
    """Phi-3: original context, sliding window as written by the converter, LongRoPE attention factor.

    ref: conversion/phi.py Phi3MiniModel.set_gguf_parameters / generate_extra_tensors
    """
    w.add_rope_scaling_orig_ctx_len(_orig_ctx(m))
    w.add_sliding_window(int(m.get("sliding_window") or 0))
    rope = m.rope[FULL]
    if rope.type in ("longrope", "su"):
        w.add_rope_scaling_attn_factors(_longrope_attn_factor(m))


def _longrope_attn_factor(m: Model) -> float:
    """ref: transformers _compute_longrope_parameters (attention_factor, else from the context ratio)"""
    rope = m.rope[FULL]
    if (attn := rope.params.get("attention_factor")) is not None:
        return float(attn)
    orig = _orig_ctx(m)
    factor = rope.params.get("factor") or m.n_ctx / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


# --- generated tensors -------------------------------------------------------------------------------------

ExtraTensors = Callable[[Model], list[tuple[gguf.MODEL_TENSOR, Array]]]


def llama3_rope_freqs(m: Model) -> list[tuple[gguf.MODEL_TENSOR, Array]]:
    """Per-frequency divisors for Llama-3.x rope scaling, stored as rope_freqs.weight.

    ref: llama.cpp conversion/llama.py LlamaModel.generate_extra_tensors
    """
    rope = m.rope[FULL]
    if rope.type != "llama3":
        return []
    p = rope.params
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (rope.theta ** (np.arange(0, m.n_rot, 2, dtype=np.float64) / m.n_rot))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return [(gguf.MODEL_TENSOR.ROPE_FREQS, np.asarray(out, dtype=np.float32))]


def longrope_factors(m: Model) -> list[tuple[gguf.MODEL_TENSOR, Array]]:
    """LongRoPE long/short frequency factors; llama.cpp picks long ones when n_ctx > the original context.

    ref: conversion/phi.py Phi3MiniModel.generate_extra_tensors; src/llama-model.cpp get_rope_factors
    """
    rope = m.rope[FULL]
    if rope.type not in ("longrope", "su"):
        return []
    return [
        (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, np.asarray(rope.params["long_factor"], dtype=np.float32)),
        (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, np.asarray(rope.params["short_factor"], dtype=np.float32)),
    ]


# --- per-tensor transforms ---------------------------------------------------------------------------------

TransformFactory = Callable[[Model, str], Transform | None]  # (model, HF tensor name) → transform or None


def permute(w: Array, n_head: int, n_head_kv: int | None) -> Array:
    """Reorder rotary halves of Q/K rows from HF's rotate_half layout to GGML's interleaved one.

    ref: llama.cpp conversion/llama.py LlamaModel.permute
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_qk_permute(m: Model, name: str) -> Transform | None:
    """LLM_ARCH_LLAMA ropes adjacent pairs (LLAMA_ROPE_TYPE_NORM), HF rotates halves.

    ref: src/llama-model.cpp llama_model_rope_type; conversion/llama.py LlamaModel.modify_tensors
    """
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return functools.partial(permute, n_head=m.n_head, n_head_kv=m.n_head)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return functools.partial(permute, n_head=m.n_head, n_head_kv=m.n_head_kv)
    return None


def _add(x: Array, c: float) -> Array:
    return x + np.float32(c)


def _mul(x: Array, c: float) -> Array:
    return x * np.float32(c)


def gemma_norm_plus_one(m: Model, name: str) -> Transform | None:
    """Gemma RMSNorm scales by (1 + w); llama.cpp's norms scale by w, so the converter adds 1.

    ref: conversion/gemma.py Gemma2Model.modify_tensors / Gemma3Model.norm_shift
    """
    return functools.partial(_add, c=1.0) if name.endswith("norm.weight") else None


def _gemma_q_scale(m: Model) -> float:
    """Factor folding transformers' query_pre_attn_scalar**-0.5 into Q, given llama.cpp's fixed scale.

    llama.cpp ignores query_pre_attn_scalar: it scales Q by 1/sqrt(head_dim), or 1/sqrt(n_embd / n_head) for
    the 27B layer counts (46 for Gemma 2, 62 for Gemma 3). Scaling Q is linear and commutes with rope, so
    the ratio is folded into the last linear step before rope (q_proj for Gemma 2, q_norm for Gemma 3).
    ref: src/models/gemma2.cpp, gemma3.cpp load_arch_hparams (f_attention_scale)
    """
    big = m.n_layer == m.spec.llama_27b_layers
    llama_dim = m.n_embd // m.n_head if big else m.head_dim
    return math.sqrt(llama_dim / float(m.get("query_pre_attn_scalar")))


def gemma2_q_scale(m: Model, name: str) -> Transform | None:
    scale = _gemma_q_scale(m)
    if scale == 1.0 or not name.endswith(("q_proj.weight", "q_proj.bias")):
        return None
    return functools.partial(_mul, c=scale)


def gemma3_q_scale(m: Model, name: str) -> Transform | None:
    # Q is RMS-normalized after q_proj, so the factor goes on the q_norm weight (after its +1).
    scale = _gemma_q_scale(m)
    if scale == 1.0 or not name.endswith("q_norm.weight"):
        return None
    return functools.partial(_mul, c=scale)


# --- checks: configs llama.cpp cannot run as transformers does ---------------------------------------------

Check = Callable[[Model], None]


def check_activation(m: Model) -> None:
    key, want = m.spec.activation
    got = m.get(key)
    if got != want:
        raise m.refuse(f"{key} {got!r}", f"llama.cpp's {m.spec.gguf_arch.name.lower()} graph uses {want!r}")


def check_rope(m: Model) -> None:
    """Rope types llama.cpp reproduces for this architecture, and their parameters."""
    full, sliding = m.rope[FULL], m.rope[SLIDING]
    allowed = m.spec.rope_types
    if full.type not in allowed:
        raise m.refuse(
            f"{m.rope_key('rope_type')} {full.type!r}", f"llama.cpp reproduces: {', '.join(allowed)}"
        )
    if m.partial_rotary_factor != 1.0 and not m.spec.partial_rotary:
        raise m.refuse(
            f"{m.rope_key('partial_rotary_factor')} {m.partial_rotary_factor}",
            "llama.cpp ropes the whole head for this architecture",
        )
    if full.type == "yarn":
        p = full.params
        for key, default in (("beta_fast", 32), ("beta_slow", 1)):
            if p.get(key) not in (None, default):
                # ref: src/llama-hparams.h (yarn_beta_fast 32, yarn_beta_slow 1; not read for these archs)
                raise m.refuse(f"{m.rope_key(key)} {p[key]}", f"llama.cpp uses {default}")
        for key in ("mscale", "mscale_all_dim"):
            if p.get(key) not in (None, 1, 1.0):
                raise m.refuse(f"{m.rope_key(key)} {p[key]}", "llama.cpp applies mscale only for DeepSeek")
        if p.get("truncate", True) is not True:
            # ref: ggml ggml_rope_yarn_corr_dims (floor/ceil of the correction range)
            raise m.refuse(f"{m.rope_key('truncate')} {p['truncate']}", "llama.cpp always truncates")
    if full.type in ("longrope", "su"):
        for key in ("long_factor", "short_factor"):
            n = len(full.params.get(key) or [])
            if n != m.n_rot // 2:
                raise m.refuse(
                    f"{m.rope_key(key)} of length {n}", f"llama.cpp needs n_rot/2 = {m.n_rot // 2}"
                )
    if any(t == SLIDING for t in m.layer_types) and sliding is not full:
        local = m.spec.sliding_rope_types
        if sliding.type not in local:
            raise m.refuse(
                f"{m.rope_key('rope_type', SLIDING)} {sliding.type!r}",
                f"llama.cpp's sliding layers support: {', '.join(local)}",
            )
        if sliding.params.get("partial_rotary_factor", 1.0) != m.partial_rotary_factor:
            raise m.refuse(m.rope_key("partial_rotary_factor", SLIDING), "it must match full_attention")
        if m.spec.sliding_rope_is_global and (sliding.type, sliding.params) != (full.type, full.params):
            # ref: src/models/gemma2.cpp (rope_freq_scale_train_swa = rope_freq_scale_train)
            raise m.refuse(f"{m.rope_fields[SLIDING]} scaling", "llama.cpp scales all layers alike")


def check_no_sliding_window(m: Model) -> None:
    """Architectures llama.cpp runs with full attention only (src/models/llama.cpp, qwen2.cpp, qwen3.cpp,
    phi3.cpp: "Phi SWA is currently disabled"). A window shorter than the context (Mistral-7B-v0.1: 4096 of
    32768; Phi-3-mini-4k: 2047 of 4096) gives the same outputs up to the window, so the file is written with
    context_length = the window and one line says so; refusing would turn away checkpoints llama.cpp's own
    converter takes, and the edge contexts edgeft targets (2–4k) are within those windows."""
    window = m.ignored_window
    if window is not None:
        from edgeft.ui import info

        info(
            f"note: {m.where}: llama.cpp ignores sliding_window {window} for {m.spec.hf_arch}; the GGUF's "
            f"context_length is {window} (of {m.n_ctx}), the length over which it computes what transformers does"
        )


def check_head_dim_is_split(m: Model) -> None:
    """ref: src/models/phi3.cpp (wo is {n_embd, n_embd}: head_dim must be hidden_size / heads)"""
    if m.head_dim * m.n_head != m.n_embd:
        raise m.refuse(f"head_dim {m.head_dim}", "llama.cpp needs hidden_size / num_attention_heads here")


def check_no_attention_bias(m: Model) -> None:
    """ref: src/models/qwen3.cpp, gemma2.cpp, gemma3.cpp (no attn_output bias tensor)"""
    if m.get("attention_bias", False):
        raise m.refuse("attention_bias true", "llama.cpp's graph has no attention output bias here")


def check_tied_head(m: Model) -> None:
    """ref: src/models/gemma2.cpp (output is token_embd; there is no output.weight)"""
    if not m.tied:
        raise m.refuse(
            "tie_word_embeddings false", "llama.cpp's gemma2 always uses the embeddings as lm_head"
        )


def check_gemma2_softcaps(m: Model) -> None:
    """ref: src/models/gemma2.cpp (attn_soft_cap is always on; final soft-capping always applied)"""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if m.get(key) is None:
            raise m.refuse(f"{key} null", "llama.cpp's gemma2 always soft-caps")


def check_gemma3(m: Model) -> None:
    """ref: src/models/gemma3.cpp (no attention soft-capping, causal only)"""
    if m.get("attn_logit_softcapping") is not None:
        raise m.refuse(
            f"attn_logit_softcapping {m.get('attn_logit_softcapping')}",
            "llama.cpp's gemma3 has no attention cap",
        )
    if m.get("use_bidirectional_attention"):
        raise m.refuse("use_bidirectional_attention true", "llama.cpp's gemma3 is causal")


def check_sliding_window_size(m: Model) -> None:
    if any(t == SLIDING for t in m.layer_types) and not m.get("sliding_window"):
        raise m.refuse(f"sliding_window {m.get('sliding_window')!r}", "layer_types has sliding layers")


# --- the table ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture becomes a GGUF one."""

    hf_arch: str
    activation: tuple[str, str]  # (config key, the activation llama.cpp's graph hard-codes)
    rope_types: tuple[str, ...]  # HF rope types of the global layers llama.cpp reproduces
    hparams: tuple[HparamWriter, ...] = ()  # beyond write_common
    transforms: tuple[TransformFactory, ...] = ()  # applied in order to every tensor they match
    extra_tensors: tuple[ExtraTensors, ...] = ()
    checks: tuple[Check, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)  # transformers defaults for omitted keys
    partial_rotary: bool = False
    swa_flag: str | None = None  # config key that switches sliding_window on (Qwen)
    hf_swa_period: int = 0  # transformers' default layer_types period
    llama_swa_period: int = 0  # the period llama.cpp assumes
    sliding_rope_types: tuple[str, ...] = ("default",)
    sliding_rope_is_global: bool = False
    local_rope_default: bool = False  # transformers 4 configs: rope_scaling only on global layers
    llama_27b_layers: int = 0

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        return GGUF_ARCHS[self.hf_arch]


_SILU = ("hidden_act", "silu")
_GELU_TANH = ("hidden_activation", "gelu_pytorch_tanh")  # llama.cpp LLM_FFN_GELU is the tanh form
# ref: conversion/llama.py LlamaModel (registered for Llama and Mistral)
_LLAMA = ArchSpec(
    "LlamaForCausalLM",
    activation=_SILU,
    rope_types=("default", "linear", "yarn", "llama3"),
    hparams=(write_rope_scaling,),
    transforms=(llama_qk_permute,),
    extra_tensors=(llama3_rope_freqs,),
    checks=(check_activation, check_rope, check_no_sliding_window),
)
# ref: conversion/qwen.py Qwen2Model, Qwen3Model (q_norm/k_norm map by name; head_dim as key_length)
_QWEN2 = ArchSpec(
    "Qwen2ForCausalLM",
    activation=_SILU,
    rope_types=("default", "linear", "yarn"),
    hparams=(write_rope_scaling,),
    checks=(check_activation, check_rope, check_no_sliding_window),
    swa_flag="use_sliding_window",
)

ARCHS: dict[str, ArchSpec] = {
    spec.hf_arch: spec
    for spec in (
        _LLAMA,
        dataclasses.replace(_LLAMA, hf_arch="MistralForCausalLM"),
        _QWEN2,
        dataclasses.replace(
            _QWEN2, hf_arch="Qwen3ForCausalLM", checks=(*_QWEN2.checks, check_no_attention_bias)
        ),
        # ref: conversion/gemma.py Gemma2Model; src/models/gemma2.cpp
        ArchSpec(
            "Gemma2ForCausalLM",
            activation=_GELU_TANH,
            rope_types=("default", "linear"),
            hparams=(write_rope_scaling, write_gemma_softcaps, write_sliding_window),
            transforms=(gemma_norm_plus_one, gemma2_q_scale),
            checks=(
                check_activation,
                check_rope,
                check_tied_head,
                check_gemma2_softcaps,
                check_no_attention_bias,
                check_sliding_window_size,
            ),
            defaults={
                "tie_word_embeddings": True,
                "query_pre_attn_scalar": 256,
                "sliding_window": 4096,
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
                "hidden_activation": "gelu_pytorch_tanh",
            },
            hf_swa_period=2,
            llama_swa_period=2,
            sliding_rope_types=("default", "linear"),
            sliding_rope_is_global=True,
            llama_27b_layers=46,
        ),
        # ref: conversion/gemma.py Gemma3Model; src/models/gemma3.cpp
        ArchSpec(
            "Gemma3ForCausalLM",
            activation=_GELU_TANH,
            rope_types=("default", "linear"),
            hparams=(write_rope_scaling, write_gemma_softcaps, write_sliding_window),
            transforms=(gemma_norm_plus_one, gemma3_q_scale),
            checks=(
                check_activation,
                check_rope,
                check_gemma3,
                check_no_attention_bias,
                check_sliding_window_size,
            ),
            defaults={
                "tie_word_embeddings": True,
                "query_pre_attn_scalar": 256,
                "sliding_window": 4096,
                "rope_theta": 1_000_000.0,
                "rope_local_base_freq": 10_000.0,
                "hidden_activation": "gelu_pytorch_tanh",
            },
            hf_swa_period=6,
            llama_swa_period=6,
            local_rope_default=True,
            llama_27b_layers=62,
        ),
        # ref: conversion/phi.py Phi3MiniModel (qkv_proj → attn_qkv, gate_up_proj → ffn_up, both fused in
        # llama.cpp too: src/models/phi3.cpp build_qkv / LLM_FFN_SWIGLU on ffn_up {n_embd, 2*n_ff})
        ArchSpec(
            "Phi3ForCausalLM",
            activation=_SILU,
            rope_types=("default", "longrope", "su"),
            hparams=(write_phi3_rope,),
            extra_tensors=(longrope_factors,),
            checks=(check_activation, check_rope, check_head_dim_is_split, check_no_sliding_window),
            defaults={"original_max_position_embeddings": 4096},
            partial_rotary=True,
        ),
    )
}
assert set(ARCHS) == set(GGUF_ARCHS), "constants.GGUF_ARCHS and arch.ARCHS must list the same architectures"


# --- entry points ------------------------------------------------------------------------------------------


def _tensor_plans(model_dir: Path, m: Model) -> list[Plan]:
    from safetensors import safe_open

    index = tensor_index(safetensors_files(model_dir))
    tmap = gguf.get_tensor_name_map(m.spec.gguf_arch, m.n_layer)
    plans = [
        Plan(gguf.TENSOR_NAMES[kind] + ".weight", None, "", tuple(data.shape), data=data)
        for extra in m.spec.extra_tensors
        for kind, data in extra(m)
    ]
    for hf_name, path in index.items():
        if hf_name.endswith((".rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")):
            continue
        if hf_name == "lm_head.weight" and m.tied:
            continue  # llama.cpp falls back to token_embd.weight when output.weight is absent
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EdgeftError(
                f"{path}: tensor {hf_name!r} has no GGUF name for arch {m.spec.gguf_arch.name.lower()}"
            )
        with safe_open(str(path), framework="pt") as sf:
            shape = tuple(sf.get_slice(hf_name).get_shape())
        steps = [t for t in (factory(m, hf_name) for factory in m.spec.transforms) if t is not None]
        plans.append(Plan(name, path, hf_name, shape, _compose(steps)))
    return plans


def _compose(steps: Sequence[Transform]) -> Transform | None:
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def run(x: Array) -> Array:
        for step in steps:
            x = step(x)
        return x

    return run


@dataclass(frozen=True)
class Prepared:
    """A validated model: its config facts and tensor plans, ready to write."""

    model: Model
    plans: list[Plan]

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        return self.model.spec.gguf_arch

    def write_hparams(self, w: gguf.GGUFWriter, ftype: int) -> None:
        write_common(w, self.model)
        for writer in self.model.spec.hparams:
            writer(w, self.model)
        w.add_file_type(ftype)


def prepare(model_dir: Path) -> Prepared:
    """Read and check config.json and plan every tensor; raises EdgeftError before any file is written."""
    try:
        m = parse_model(model_dir)
        for check in m.spec.checks:
            check(m)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        # A field of the wrong type deeper in config.json (rope_parameters as a list, a factor as text, ...).
        detail = " ".join(str(e).split())[:120]
        where = Path(model_dir) / "config.json"
        raise EdgeftError(f"{where}: malformed field ({type(e).__name__}: {detail})") from None
    return Prepared(m, _tensor_plans(Path(model_dir), m))
