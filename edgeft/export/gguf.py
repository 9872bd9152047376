"""HF causal LM directory → GGUF file, built on gguf-py, loading weights lazily tensor by tensor.

Float types (f32/f16/bf16) are written here; integer quants are written as f32 first and then handed to
llama.cpp's own quantizer (edgeft.quantize), which knows the per-tensor type mixes (e.g. q4_k_m).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..constants import (
    GGUF_ARCHS,
    GGUF_FLOAT_QUANTS,
    GGUF_FTYPES,
    GGUF_PRE_TOKENIZERS,
    GGUF_QUANTS,
    GGUF_TOKENIZER_BPE,
    GGUF_TOKENIZER_SPM,
)
from ..errors import EdgeftError

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GGUFExportResult:
    """What export_gguf wrote."""

    path: Path
    quant: str
    arch: str
    n_tensors: int
    bytes: int


# --- small file helpers ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeftError(f"{path}: cannot read JSON ({e})") from e


def _optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _token_str(tok: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


# --- weights ---------------------------------------------------------------------------------------------


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model dir; refuses pickle-only checkpoints (arbitrary code on load)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [model_dir / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise EdgeftError(f"{index}: lists shards that do not exist: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    if pickles:
        raise EdgeftError(
            f"{model_dir}: only pickle checkpoints ({', '.join(pickles)}) and no *.safetensors; "
            "re-save the model with save_pretrained(..., safe_serialization=True)"
        )
    raise EdgeftError(f"{model_dir}: no *.safetensors weights found")


def _tensor_index(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open handles are not iterable
                index[k] = f
    return index


def _load_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor as float32 numpy (bf16/f16 upcast via torch, since numpy has no bf16)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as sf:
        t = sf.get_tensor(name)
    return t.to(torch.float32).numpy()


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Reorder rotary halves of Q/K rows from HF's rotate_half layout to GGML's interleaved one.

    ref: llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- hyperparameters -------------------------------------------------------------------------------------


def _rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings across transformers 4 (rope_theta + rope_scaling) and 5 (rope_parameters)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    return params


def _llama3_rope_factors(params: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors for Llama-3.x rope scaling, stored as rope_freqs.weight.

    ref: llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
    """
    base = float(params["rope_theta"])
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
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
    return np.asarray(out, dtype=np.float32)


def _write_hparams(w: gguf.GGUFWriter, config: dict[str, Any], ftype: int, n_vocab: int) -> np.ndarray | None:
    """Model hyperparameters; returns the rope_freqs tensor when the rope scaling needs one."""
    n_embd = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(n_embd)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(ftype)

    rope = _rope_params(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = rope["rope_type"]
    if rope_type == "default":
        return None
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
        return None
    if rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        orig = rope.get("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
        return None
    if rope_type == "llama3":
        return _llama3_rope_factors(rope, head_dim)
    raise EdgeftError(
        f"config.json: rope scaling type {rope_type!r} is not supported for GGUF export "
        "(supported: default, linear, yarn, llama3)"
    )


# --- tokenizer -------------------------------------------------------------------------------------------


def pre_tokenizer_signature(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """A tokenizer.json pre_tokenizer reduced to what decides how text is split (see GGUF_PRE_TOKENIZERS)."""
    if pre is None:
        return ("None",)
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    sig: list[str] = []
    for s in steps:
        kind = s.get("type")
        if kind == "ByteLevel":
            if s.get("add_prefix_space"):
                sig.append("ByteLevel(add_prefix_space)")
            sig.append("ByteLevel(regex)" if s.get("use_regex", True) else "ByteLevel(no-regex)")
        elif kind == "Digits":
            sig.append("Digits(individual)" if s.get("individual_digits") else "Digits(grouped)")
        elif kind == "Split":
            pattern = s.get("pattern", {})
            regex = pattern.get("Regex", pattern.get("String"))
            if s.get("behavior", "Isolated") != "Isolated" or s.get("invert"):
                sig.append(f"Split({regex}, behavior={s.get('behavior')}, invert={s.get('invert')})")
            else:
                sig.append(f"Split({regex})")
        else:
            sig.append(json.dumps(s, sort_keys=True, ensure_ascii=False))
    return tuple(sig)


def _gguf_pre_name(tokenizer_json: dict[str, Any], where: Path) -> str:
    """The tokenizer.ggml.pre name matching the tokenizer's own pre_tokenizer definition."""
    pre = tokenizer_json.get("pre_tokenizer")
    sig = pre_tokenizer_signature(pre)
    name = GGUF_PRE_TOKENIZERS.get(sig)
    if name is None:
        found = json.dumps(pre, ensure_ascii=False, separators=(",", ":"))
        known = "; ".join(f"{n} = {' + '.join(s)}" for s, n in GGUF_PRE_TOKENIZERS.items())
        raise EdgeftError(
            f"{where}: unknown pre-tokenizer {found} (llama.cpp would split text differently); known: {known}"
        )
    return name


def _is_byte_level_bpe(tj: dict[str, Any]) -> bool:
    def has_bytelevel(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_bytelevel(c) for c in node.get("pretokenizers", []) + node.get("decoders", []))

    model = tj.get("model", {})
    return model.get("type") == "BPE" and (
        has_bytelevel(tj.get("pre_tokenizer")) or has_bytelevel(tj.get("decoder"))
    )


def _added_tokens(tj: dict[str, Any], model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id → (content, special) for added tokens, from tokenizer.json or added_tokens.json/tokenizer_config."""
    out: dict[int, tuple[str, bool]] = {}
    for t in tj.get("added_tokens", []):
        out[int(t["id"])] = (t["content"], bool(t.get("special")))
    cfg = _optional_json(model_dir / "tokenizer_config.json")
    for sid, t in (cfg.get("added_tokens_decoder") or {}).items():
        out.setdefault(int(sid), (t["content"], bool(t.get("special"))))
    for content, tid in _optional_json(model_dir / "added_tokens.json").items():
        out.setdefault(int(tid), (content, False))
    return out


def _bpe_vocab(w: gguf.GGUFWriter, model_dir: Path, tj: dict[str, Any], n_vocab: int) -> dict[str, int]:
    """Byte-level BPE: tokens, merges, types.

    ref: llama.cpp convert_hf_to_gguf.py TextModel._set_vocab_gpt2
    """
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = _added_tokens(tj, model_dir)
    for tid, (content, _) in added.items():
        vocab[content] = tid
    size = max(n_vocab, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i][1] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    w.add_tokenizer_model(GGUF_TOKENIZER_BPE)
    w.add_tokenizer_pre(_gguf_pre_name(tj, model_dir / "tokenizer.json"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    return vocab


def _spm_vocab_from_model(
    w: gguf.GGUFWriter, model_dir: Path, tj: dict[str, Any], n_vocab: int
) -> dict[str, int]:
    """SentencePiece tokenizer.model: tokens, scores, types from the proto.

    ref: llama.cpp convert_hf_to_gguf.py TextModel._create_vocab_sentencepiece
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    for tid, (content, special) in sorted(_added_tokens(tj, model_dir).items()):
        while tid >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        if tid >= sp.vocab_size() or types[tid] in (gguf.TokenType.NORMAL, gguf.TokenType.UNUSED):
            tokens[tid] = content
            scores[tid] = -1000.0
            types[tid] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    _write_spm(w, tokens, scores, types, _sp_add_dummy_prefix(sp))
    return {t: i for i, t in enumerate(tokens)}


def _sp_add_dummy_prefix(sp: Any) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _spm_vocab_from_json(
    w: gguf.GGUFWriter, model_dir: Path, tj: dict[str, Any], n_vocab: int
) -> dict[str, int]:
    """SentencePiece-style tokenizer.json (BPE + byte_fallback + Metaspace) without tokenizer.model.

    llama.cpp's SPM tokenizer merges the adjacent pair whose merged piece has the highest score, so the
    score is minus the rank of the merge that produces the piece (HF applies merges by rank).
    """
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    added = _added_tokens(tj, model_dir)
    for tid, (content, _) in added.items():
        vocab[content] = tid
    size = max(n_vocab, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        scores.append(-float(rank[t]) if t in rank else 0.0)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i][1] else gguf.TokenType.USER_DEFINED)
        elif t == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    _write_spm(w, tokens, scores, types, _json_adds_space_prefix(tj))
    return vocab


def _json_adds_space_prefix(tj: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends "▁" (Metaspace prepend, or Llama-2's Prepend)."""
    steps: list[dict[str, Any]] = []
    for key, seq in (("pre_tokenizer", "pretokenizers"), ("normalizer", "normalizers")):
        node = tj.get(key) or {}
        steps += node.get(seq, []) if node.get("type") == "Sequence" else [node]
    for s in steps:
        if s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never":
            return bool(s.get("add_prefix_space", True))
        if s.get("type") == "Prepend" and s.get("prepend") == "\u2581":
            return True
    return False


def _write_spm(
    w: gguf.GGUFWriter, tokens: list[str], scores: list[float], types: list[int], add_prefix: bool
) -> None:
    w.add_tokenizer_model(GGUF_TOKENIZER_SPM)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(add_prefix)


def _is_spm_json(tj: dict[str, Any]) -> bool:
    model = tj.get("model", {})
    if model.get("type") == "Unigram":
        return True
    pre = json.dumps([tj.get("pre_tokenizer"), tj.get("normalizer")], ensure_ascii=False)
    return (
        model.get("type") == "BPE" and bool(model.get("byte_fallback")) and ("Metaspace" in pre or "▁" in pre)
    )


def _post_processor_adds(tj: dict[str, Any]) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) for single sequences, read from a TemplateProcessing post-processor."""
    pp = tj.get("post_processor") or {}
    procs = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single", [])
            return (
                bool(single) and "SpecialToken" in single[0],
                len(single) > 1 and "SpecialToken" in single[-1],
            )
    return False, False


def _chat_template(model_dir: Path, tok_cfg: dict[str, Any]) -> str | list[dict[str, str]] | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = tok_cfg.get("chat_template")
    if tmpl:
        return tmpl
    cj = model_dir / "chat_template.json"
    if cj.is_file():
        return _read_json(cj).get("chat_template")
    return None


def _write_tokenizer(w: gguf.GGUFWriter, model_dir: Path, config: dict[str, Any], n_vocab: int) -> None:
    """Vocabulary, special token ids, add_bos/add_eos and chat template."""
    tj_path = model_dir / "tokenizer.json"
    tj = _optional_json(tj_path)
    if (model_dir / "tokenizer.model").is_file():
        vocab = _spm_vocab_from_model(w, model_dir, tj, n_vocab)
    elif tj and _is_spm_json(tj):
        if tj["model"].get("type") != "BPE":
            raise EdgeftError(f"{tj_path}: Unigram tokenizer without tokenizer.model; cannot export scores")
        vocab = _spm_vocab_from_json(w, model_dir, tj, n_vocab)
    elif tj and _is_byte_level_bpe(tj):
        vocab = _bpe_vocab(w, model_dir, tj, n_vocab)
    elif not tj:
        raise EdgeftError(
            f"{model_dir}: no tokenizer.json or tokenizer.model; save the tokenizer with the model"
        )
    else:
        kind = tj.get("model", {}).get("type")
        raise EdgeftError(
            f"{tj_path}: tokenizer model {kind!r} is not supported for GGUF "
            "(supported: byte-level BPE, SentencePiece BPE/Unigram)"
        )

    tok_cfg = _optional_json(model_dir / "tokenizer_config.json")
    special_map = _optional_json(model_dir / "special_tokens_map.json")
    for role, add in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("unk", w.add_unk_token_id),
        ("pad", w.add_pad_token_id),
    ):
        text = _token_str(tok_cfg.get(f"{role}_token")) or _token_str(special_map.get(f"{role}_token"))
        tid = vocab.get(text) if text is not None else None
        if tid is None and role in ("bos", "eos", "pad"):
            cid = config.get(f"{role}_token_id")
            tid = cid[0] if isinstance(cid, list) and cid else cid
        if isinstance(tid, int):
            add(tid)

    pp_bos, pp_eos = _post_processor_adds(tj)
    add_bos = tok_cfg.get("add_bos_token")
    add_eos = tok_cfg.get("add_eos_token")
    w.add_add_bos_token(bool(pp_bos if add_bos is None else add_bos))
    w.add_add_eos_token(bool(pp_eos if add_eos is None else add_eos))

    tmpl = _chat_template(model_dir, tok_cfg)
    if tmpl:
        w.add_chat_template(tmpl)


# --- tensors ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """One output tensor: where it comes from and how it is transformed."""

    gguf_name: str
    src: Path | None
    hf_name: str
    shape: tuple[int, ...]
    permute_heads: tuple[int, int | None] | None = None
    data: np.ndarray | None = None  # generated tensors (rope_freqs)


def _plan_tensors(
    model_dir: Path, arch: gguf.MODEL_ARCH, config: dict[str, Any], extra: np.ndarray | None
) -> list[_Plan]:
    from safetensors import safe_open

    files = _safetensors_files(model_dir)
    index = _tensor_index(files)
    n_layers = int(config["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", False))
    plans: list[_Plan] = []
    if extra is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plans.append(_Plan(name, None, "", tuple(extra.shape), data=extra))
    for hf_name, path in index.items():
        if hf_name.endswith((".rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp falls back to token_embd.weight when output.weight is absent
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EdgeftError(f"{path}: tensor {hf_name!r} has no GGUF name for arch {arch.name.lower()}")
        with safe_open(str(path), framework="pt") as sf:
            shape = tuple(sf.get_slice(hf_name).get_shape())
        permute = None
        if arch == gguf.MODEL_ARCH.LLAMA:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                permute = (n_head, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                permute = (n_head, n_head_kv)
        plans.append(_Plan(name, path, hf_name, shape, permute))
    return plans


def _out_type(quant: str, plan: _Plan) -> gguf.GGMLQuantizationType:
    """Storage type of one tensor: 1-D tensors (norms, biases) stay f32, as llama.cpp's converter does."""
    if quant == "f32" or len(plan.shape) <= 1:
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.F16 if quant == "f16" else gguf.GGMLQuantizationType.BF16


def _materialize(plan: _Plan, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if plan.data is not None:
        data = plan.data
    else:
        assert plan.src is not None
        data = _load_tensor(plan.src, plan.hf_name)
        if plan.permute_heads is not None:
            data = _permute(data, *plan.permute_heads)
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


# --- entry point -----------------------------------------------------------------------------------------


def _load_config(model_dir: Path) -> tuple[dict[str, Any], gguf.MODEL_ARCH]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EdgeftError(f"{model_dir}: model directory does not exist")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise EdgeftError(f"{cfg_path}: missing; not a Hugging Face model directory")
    config = _read_json(cfg_path)
    archs = config.get("architectures") or []
    for a in archs:
        if a in GGUF_ARCHS:
            return config, GGUF_ARCHS[a]
    raise EdgeftError(
        f"{cfg_path}: architecture {', '.join(archs) or '(none)'} is not supported for GGUF export; "
        f"supported: {', '.join(GGUF_ARCHS)}"
    )


def _write_float_gguf(model_dir: Path, dst: Path, quant: str, progress: Progress | None) -> tuple[str, int]:
    """Write a float GGUF to `dst` (not atomic; the caller owns the temp name). Returns (arch, n_tensors)."""
    config, arch = _load_config(model_dir)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_vocab = int(config.get("vocab_size") or 0)
    w = gguf.GGUFWriter(str(dst), arch_name)
    try:
        w.add_name(model_dir.name)
        extra = _write_hparams(w, config, int(GGUF_FTYPES[quant]), n_vocab)
        _write_tokenizer(w, model_dir, config, n_vocab)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        plans = _plan_tensors(model_dir, arch, config, extra)
        for p in plans:
            qtype = _out_type(quant, p)
            if qtype == gguf.GGMLQuantizationType.BF16:
                byte_shape = gguf.quant_shape_to_byte_shape(p.shape, qtype)
                w.add_tensor_info(
                    p.gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype
                )
            else:
                dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                w.add_tensor_info(p.gguf_name, p.shape, dtype, int(np.prod(p.shape)) * dtype.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(plans):
            w.write_tensor_data(_materialize(p, _out_type(quant, p)))
            if progress is not None:
                progress(i + 1, len(plans))
        w.flush()
    finally:
        w.close()
    return arch_name, len(plans)


def _temp_path(out: Path, tag: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".{tag}.tmp", dir=out.parent)
    os.close(fd)
    return Path(name)


def export_gguf(
    model_dir: Path, out: Path, quant: str = "f32", *, progress: Progress | None = None
) -> GGUFExportResult:
    """Convert an HF model directory (safetensors + tokenizer) into one GGUF file at `out`, atomically."""
    if quant not in GGUF_QUANTS:
        raise EdgeftError(f"unknown GGUF quant {quant!r}; choose one of: {', '.join(GGUF_QUANTS)}")
    model_dir, out = Path(model_dir), Path(out)
    _load_config(model_dir)  # fail on bad input before creating any file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(out, "f32" if quant not in GGUF_FLOAT_QUANTS else quant)
    tmp_q: Path | None = None
    try:
        float_quant = quant if quant in GGUF_FLOAT_QUANTS else "f32"
        arch, n_tensors = _write_float_gguf(model_dir, tmp, float_quant, progress)
        if quant in GGUF_FLOAT_QUANTS:
            os.replace(tmp, out)
        else:
            from ..quantize import quantize_gguf

            tmp_q = _temp_path(out, quant)
            quantize_gguf(tmp, tmp_q, quant)
            os.replace(tmp_q, out)
    finally:
        for t in (tmp, tmp_q):
            if t is not None and t.exists():
                t.unlink()
    return GGUFExportResult(path=out, quant=quant, arch=arch, n_tensors=n_tensors, bytes=out.stat().st_size)


def iter_gguf_tensor_names(path: Path) -> Iterator[str]:
    """Tensor names in a GGUF file (handy for checks and tests)."""
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        yield t.name
