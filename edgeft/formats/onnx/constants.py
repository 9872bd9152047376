"""ONNX (onnxruntime-genai) facts as tables: quant names and the builder's precisions, accuracy levels,
architectures, the files of a genai folder. Each rests on the onnxruntime-genai source it cites."""

from __future__ import annotations

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
# Phi3MiniLongRoPEModel (builders/phi.py); edgeft/formats/onnx/export.py fixes the config traits it misreads.
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

# Why a profile cannot ship an ONNX artifact as base + LoRA adapter (ArtifactSpec.adapter), measured by
# bench/onnx_adapter.py on the demo (int4, 2 threads, idle): onnxruntime-genai 0.18's builder `adapter_path`
# bakes the LoRA into the graph as int4 MatMuls (ref: onnxruntime_genai/models/builders/base.py
# make_matmul_lora), decoding 48 % slower than merged; adapter inputs need the graph surgery of Olive's
# ExtractAdapters pass (ref: microsoft/Olive olive/passes/onnx/extract_adapters.py), which also unpacks the
# fused Q/K/V: 34 % slower than merged (1742 vs 2638 tok/s, the same answers). Published: ~30 % for rank 8 on
# Llama-3.2-1B int4 (onnxruntime-genai #1661), crashes on Qwen2-1.5B int4 + LoRA (#1186).
ONNX_ADAPTER_DECLINED = (
    "onnxruntime-genai's builder has no adapter inputs (it bakes the adapter in: 48 % slower decode on the "
    "demo), and a base rebuilt with them decoded 34 % slower than merged (~30 % at rank 8 in "
    "onnxruntime-genai #1661); ship it merged, or ship the adapter in a gguf slot"
)
