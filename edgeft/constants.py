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
FORMATS = (FORMAT_GGUF,)

# --- GGUF quant names → llama.cpp file types ------------------------------------------------------------
# ref: llama.cpp include/llama.h `enum llama_ftype`, mirrored by gguf-py as gguf.LlamaFileType.
GGUF_FTYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
}
# Quants the converter writes itself (plain float casts); the rest go through llama.cpp's quantizer.
GGUF_FLOAT_QUANTS = ("f32", "f16", "bf16")
GGUF_LLAMA_QUANTS = ("q8_0", "q4_0", "q4_k_m")
GGUF_QUANTS = GGUF_FLOAT_QUANTS + GGUF_LLAMA_QUANTS

# --- architectures --------------------------------------------------------------------------------------
# HF `config.json` "architectures" entry → GGUF architecture. ref: llama.cpp convert_hf_to_gguf.py
# (LlamaModel is registered for Llama/Mistral, Qwen2Model for Qwen2).
GGUF_ARCHS: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
}

# --- drift and latency metric names (manifest keys) ---------------------------------------------------
DRIFT_METRICS = ("kld_mean", "kld_p99", "top1", "ppl_ratio", "task_accuracy")
LATENCY_METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb")
# Direction of "worse" per budgeted metric: "max" budgets cap the value, "min" budgets floor it.
BUDGET_KINDS = {
    "kld_mean": "max",
    "kld_p99": "max",
    "top1": "min",
    "ppl_ratio": "max",
    "task_accuracy_drop": "max",
}

# --- files -----------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
REPORT = "report.md"
CONFIG_FILE = "edgeft.toml"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
