"""The support matrix: which architectures edgeft exports to which format, from the exporters' own tables.

`edgeft export --list-architectures` prints it; docs/architectures.md shows it. GGUF support is
constants.GGUF_ARCHS (implemented in edgeft/export/gguf/arch.py), ONNX support is constants.ONNX_ARCHS
(None = exported, else the reason it is refused up front).
"""

from __future__ import annotations

from edgeft.constants import FORMAT_GGUF, FORMAT_ONNX, GGUF_ARCHS, ONNX_ARCHS

# Model families people ship under each HF architecture name (what the matrix is read for).
FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "Llama 2, Llama 3.x (rope scaling llama3), TinyLlama, SmolLM/SmolLM2",
    "MistralForCausalLM": "Mistral 7B (sliding window)",
    "Qwen2ForCausalLM": "Qwen2, Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3 (q/k norms)",
    "Gemma2ForCausalLM": "Gemma 2 (soft-capping, sliding-window layers)",
    "Gemma3ForCausalLM": "Gemma 3 text (1B; local/global rope bases)",
    "Gemma3ForConditionalGeneration": "Gemma 3 4B+ (multimodal)",
    "Phi3ForCausalLM": "Phi-3, Phi-3.5-mini (longrope), Phi-4-mini (partial rotary)",
    "Phi3SmallForCausalLM": "Phi-3-small",
}
# Tokenizer pipelines a runtime cannot reproduce (measured; verify's prompt_ids_match fails such artifacts).
TOKENIZER_NOTES: tuple[tuple[str, str, str], ...] = (
    (
        FORMAT_ONNX,
        "byte-level BPE with a Digits(individual) pre-tokenizer (SmolLM2)",
        "onnxruntime-genai 0.18 ignores the Digits step: numbers tokenize differently",
    ),
    (
        FORMAT_ONNX,
        'SentencePiece saved with Metaspace prepend_scheme="first" (as transformers 5 re-saves a Llama tokenizer)',
        'onnxruntime-genai puts "▁" after special tokens, the file does not: every chat prompt differs',
    ),
    (
        FORMAT_GGUF,
        'SentencePiece saved with Metaspace prepend_scheme="first"',
        'chat prompts match (the space-prefix flag is chosen by test); plain text lacks the leading "▁"',
    ),
)


def rows() -> list[tuple[str, str, str, str]]:
    """(HF architecture, families, GGUF, ONNX) per architecture either exporter knows."""
    out = []
    for arch in dict.fromkeys([*GGUF_ARCHS, *ONNX_ARCHS]):
        gguf = GGUF_ARCHS[arch].name.lower() if arch in GGUF_ARCHS else "no"
        onnx = (
            "yes"
            if ONNX_ARCHS.get(arch, "not supported") is None
            else f"no: {ONNX_ARCHS.get(arch, 'not supported')}"
        )
        out.append((arch, FAMILIES.get(arch, ""), gguf, onnx))
    return out


def markdown() -> str:
    """The matrix as a Markdown table (for docs/architectures.md and the terminal)."""
    lines = ["| architecture | families | GGUF (llama.cpp) | ONNX (onnxruntime-genai) |", "|---|---|---|---|"]
    lines += [f"| {a} | {f} | {g} | {o} |" for a, f, g, o in rows()]
    lines += ["", "Tokenizers a runtime cannot reproduce (flagged at export, failed by verify):", ""]
    lines += [f"- {fmt}: {what} — {why}" for fmt, what, why in TOKENIZER_NOTES]
    return "\n".join(lines)
