"""Format facts in one place: formats, quant names, architectures, manifest keys.

Every string that names something outside edgeft (a GGUF key, a llama.cpp file type, an HF architecture)
lives here, so the stages never spell them as literals.
"""

from __future__ import annotations

import gguf

# --- formats ------------------------------------------------------------------------------------------
FORMAT_GGUF = "gguf"
FORMAT_ONNX = "onnx"
FORMAT_TORCH = "torch"
FORMATS = (FORMAT_GGUF, FORMAT_ONNX)

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
# IQ4_XS→IQ4_NL); edgeft.footprint.tensor_types records what was really written.
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
# Phi3MiniModel). How each is converted lives in edgeft/export/gguf/arch.py (ARCHS).
GGUF_ARCHS: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
}

# --- drift budgets ---------------------------------------------------------------------------------------
# Direction of "worse" per budgeted metric: "max" budgets cap the value, "min" budgets floor it.
BUDGET_KINDS = {
    "kld_mean": "max",
    "kld_p99": "max",
    "top1": "min",
    "ppl_ratio": "max",
    "task_accuracy_drop": "max",
    "prompt_ids_match": "min",
    "answers_match": "min",
    "min_task_accuracy": "min",  # the artifact's own held-out task accuracy
    "max_size_mb": "max",  # the artifact's size on disk
}

# --- files -----------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
MODEL_JSON = "model.json"  # how an app runs the model (edgeft.runspec)
# Where a user installs an example's dependencies inside a bundle (`npm ci` in examples/node): edgeft never
# hashes, checks, copies to a device or removes what is there.
BUNDLE_USER_DIRS = ("examples/node/node_modules",)
CHAT_TEMPLATE_FILE = (
    "chat_template.jinja"  # transformers 5 saves the template here (ref: tokenization_utils_base)
)
REPORT = "report.md"
REPORT_HTML = "report.html"  # the same build as one self-contained page (edgeft.report_html)
CONFIG_FILE = "edgeft.toml"
# Files that make up a tokenizer and its chat template; carried unchanged into every model edgeft writes.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
# What finetune records next to an adapter (settings, data digests, the held-out split); merge carries it.
FINETUNE_RECORD = "edgeft_finetune.json"
# Weight files that are pickles (can run code when loaded): never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

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

# --- ONNX (onnxruntime-genai builder) ---
# edgeft ONNX quant name → the model builder's `precision`. ref: onnxruntime_genai/models/builder.py
# (--precision int4/int8/bf16/fp16/fp32; int8 and int4 write MatMulNBits bits=8 / bits=4 weight-only nodes,
# block_size 32, symmetric; fp32 keeps plain MatMul).
ONNX_PRECISIONS: dict[str, str] = {"fp32": "fp32", "int8": "int8", "int4": "int4"}
ONNX_QUANTS = tuple(ONNX_PRECISIONS)
ONNX_FLOAT_QUANTS = ("fp32",)
ONNX_EXECUTION_PROVIDER = "cpu"
# MatMulNBits `accuracy_level`: the lowest precision the kernel may compute activations in.
# ref: builder.py --extra_options help ("accuracy_level = 1/2/3/4 ... 4 is int8 ... 1 is fp32") and
# onnxruntime docs/ContribOperators.md (com.microsoft.MatMulNBits, 0 = unset: the EP picks).
ONNX_ACCURACY_LEVELS: dict[int, str] = {0: "unset", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}
# The builder's own default on the CPU EP. ref: quantization/quant_config.py QuantConfig.from_extra_options
# (`accuracy_level` defaults to 4 for cpu/webgpu, 0 otherwise).
ONNX_DEFAULT_ACCURACY_LEVEL = 4
# Builder extra-option keys (KEY=VALUE strings); older builders spell it `int4_accuracy_level`.
ONNX_OPT_ACCURACY_LEVEL = "accuracy_level"
ONNX_OPT_HF_TOKEN = "hf_token"
# HF architecture → None when edgeft exports it to ONNX, else the one-line reason it is refused up front.
# ref: builder.py create_model, which dispatches the supported ones to LlamaModel, MistralModel, QwenModel,
# Qwen3Model (builders/qwen.py), Gemma2Model / Gemma3Model (builders/gemma.py) and Phi3MiniModel /
# Phi3MiniLongRoPEModel (builders/phi.py); edgeft/export/onnx.py fixes the config traits it misreads.
ONNX_ARCHS: dict[str, str | None] = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "Gemma2ForCausalLM": None,
    "Gemma3ForCausalLM": None,
    "Phi3ForCausalLM": None,
    # ref: builders/gemma.py Gemma3Model.make_rotary_embedding_multi_cache keeps the full-attention
    # rescale_factors (linear, factor 8 in Gemma 3 4B/12B/27B) when it builds the sliding layers' cache.
    "Gemma3ForConditionalGeneration": (
        "multimodal Gemma 3: edgeft exports text decoders only, and the builder applies the full-attention "
        "layers' linear RoPE scaling to the sliding-window layers too"
    ),
    # ref: transformers has no phi3small model; builder.py loads it with trust_remote_code only.
    "Phi3SmallForCausalLM": "needs the checkpoint's own Python code (trust_remote_code), which edgeft never runs",
}
ONNX_SUPPORTED_ARCHS = tuple(arch for arch, refused in ONNX_ARCHS.items() if refused is None)
# The only weight files the builder may read: transformers' from_pretrained looks for these names first and
# falls back to pickle (pytorch_model.bin) without them. ref: transformers utils SAFE_WEIGHTS_NAME /
# SAFE_WEIGHTS_INDEX_NAME. Files with these suffixes never reach the builder (pickle can run code).
ONNX_SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
# Files of an onnxruntime-genai model directory. ref: builders/base.py save_model / make_genai_config /
# save_processing.
ONNX_GENAI_CONFIG = "genai_config.json"
ONNX_MODEL_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
ONNX_REQUIRED_FILES = (ONNX_GENAI_CONFIG, ONNX_MODEL_FILE, "tokenizer.json", "tokenizer_config.json")

# --- bundle integrity ---
# Checksum list a device verifies with `sha256sum -c SHA256SUMS` (GNU coreutils: "<hex>  <path>" lines).
SHA256SUMS = "SHA256SUMS"

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
