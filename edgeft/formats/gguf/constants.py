"""GGUF facts as tables: quant names and llama.cpp file types, importance-matrix keys, architectures,
tokenizer models and pre-tokenizers, bits per weight. Each rests on the llama.cpp or gguf-py source it cites."""

from __future__ import annotations

import gguf

# --- GGUF quant names → llama.cpp file types ------------------------------------------------------------
# ref: llama.cpp include/llama.h `enum llama_ftype`, mirrored by gguf-py as gguf.LlamaFileType.
GGUF_FTYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "iq4_nl": gguf.LlamaFileType.MOSTLY_IQ4_NL,
    "iq4_xs": gguf.LlamaFileType.MOSTLY_IQ4_XS,
    "q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M,
    "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K,
}
# Quants the converter writes itself (plain float casts); the rest go through llama.cpp's quantizer.
# k-quants and iq4_xs work on 256-wide blocks: rows that are not a multiple of 256 fall back per tensor
# (ref: src/llama-quant.cpp tensor_type_fallback: Q6_K→Q8_0, Q5_K→Q5_1, Q4_K→Q5_0, Q3_K/Q2_K→Q4_0,
# IQ4_XS→IQ4_NL); edgeft.formats.tensor_types records what was really written.
GGUF_FLOAT_QUANTS = ("f32", "f16", "bf16")
GGUF_LLAMA_QUANTS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_nl", "iq4_xs", "q3_k_m", "q2_k")
GGUF_QUANTS = GGUF_FLOAT_QUANTS + GGUF_LLAMA_QUANTS
# Quants an importance matrix changes: every type these files are made of quantizes with per-column
# weights when given them (ref: ggml/src/ggml-quants.c quantize_q2_K … quantize_q6_K, quantize_q4_0,
# quantize_q5_0, quantize_q5_1, quantize_iq4_nl, quantize_iq4_xs take `quant_weights`); quantize_q8_0
# ignores them ("not used"), so a q8_0 file is the same with or without one.
GGUF_IMATRIX_QUANTS = tuple(q for q in GGUF_LLAMA_QUANTS if q != "q8_0")
# Types the output head and token embedding may be kept at (`--head-type`): ggml type ids for
# llama_model_quantize_params.output_tensor_type / token_embedding_type (ref: include/llama.h; ggml.h
# enum ggml_type, mirrored by gguf.GGMLQuantizationType). llama.cpp applies them without its per-tensor
# fallback (src/llama-quant.cpp llama_tensor_get_type), so the row size must be a multiple of the type's
# block (gguf.GGML_QUANT_SIZES): edgeft.formats.gguf.quantize checks that first.
GGUF_HEAD_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q6_k": gguf.GGMLQuantizationType.Q6_K,
    "q5_k": gguf.GGMLQuantizationType.Q5_K,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q4_k": gguf.GGMLQuantizationType.Q4_K,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "iq4_nl": gguf.GGMLQuantizationType.IQ4_NL,
}
# Metadata llama.cpp's quantize tool writes when it is given an importance matrix (string, int, int);
# edgeft writes the same keys through llama_model_quantize_params.kv_overrides.
# ref: tools/quantize/quantize.cpp LLM_KV_QUANTIZE_IMATRIX_DATASET / _N_ENTRIES / _N_CHUNKS
GGUF_KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
GGUF_KEY_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
GGUF_KEY_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"
# edgeft's own key: which tensors were written in another 32-block type than llama.cpp chose, and why
# (edgeft.formats.gguf.quantize.Steered.summary)
GGUF_KEY_STEERED = "edgeft.steered"
# The dataset value: a name for the calibration data, not a path (llama.cpp keeps 127 bytes of it).
GGUF_IMATRIX_DATASET_PREFIX = "edgeft:sha256:"

# --- architectures --------------------------------------------------------------------------------------
# HF `config.json` "architectures" entry → GGUF architecture. ref: llama.cpp convert_hf_to_gguf.py
# (@ModelBase.register: LlamaModel for Llama/Mistral, Qwen2Model, Qwen3Model, Gemma2Model, Gemma3Model,
# Phi3MiniModel). How each is converted lives in edgeft/formats/gguf/arch.py (ARCHS).
GGUF_ARCHS: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
}

# --- GGUF tokenizer / pre-tokenizers ---
# tokenizer.ggml.model values. ref: llama.cpp src/llama-vocab.cpp llama_vocab::impl::load
# ("gpt2" → byte-level BPE, "llama" → SentencePiece).
GGUF_TOKENIZER_BPE = "gpt2"
GGUF_TOKENIZER_SPM = "llama"

# Pre-tokenizer regexes exactly as upstream tokenizer.json files spell them in a `Split` pre-tokenizer.
# ref: llama.cpp src/llama-vocab.cpp (LLAMA_VOCAB_PRE_TYPE_LLAMA3 / _QWEN2, "original regex from tokenizer.json").
PRE_REGEX_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_REGEX_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# A byte-level BPE pre-tokenizer's signature (the tuple edgeft.formats.gguf.vocab.pre_tokenizer_signature builds
# from tokenizer.json) → tokenizer.ggml.pre name that llama.cpp maps to the same split rules.
# ref: llama.cpp src/llama-vocab.cpp (`tokenizer_pre == "..."` and the regex_exprs per LLAMA_VOCAB_PRE_TYPE).
GGUF_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel(regex)",): "gpt-2",
    ("Digits(individual)", "ByteLevel(regex)"): "smollm",
    (f"Split({PRE_REGEX_LLAMA3})", "ByteLevel(no-regex)"): "llama-bpe",
    (f"Split({PRE_REGEX_QWEN2})", "ByteLevel(no-regex)"): "qwen2",
}

# --- quant precision -------------------------------------------------------------------------------
# Bits per weight of each GGUF quant's main type. ref: ggml/src/ggml-common.h block layouts: block_q8_0
# 34 B / 32, block_q6_K 210 B / 256, block_q5_K 176 / 256, block_q4_K 144 / 256, block_iq4_nl 18 / 32,
# block_q4_0 18 / 32, block_iq4_xs 136 / 256, block_q3_K 110 / 256, block_q2_K 84 / 256. Orders quants by
# precision (a head kept "higher" than the body) and sorts candidates before anything is exported.
GGUF_BITS_PER_WEIGHT: dict[str, float] = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.5625, "q5_k_m": 5.5, "q4_k_m": 4.5,
    "iq4_nl": 4.5, "q4_0": 4.5, "iq4_xs": 4.25, "q3_k_m": 3.4375, "q2_k": 2.625,
    "q5_k": 5.5, "q5_0": 5.5, "q4_k": 4.5,  # ggml types a head may be kept at (GGUF_HEAD_TYPES)
}  # fmt: skip
