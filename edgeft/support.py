"""The support matrix: which architectures edgeft exports to which format, from the exporters' own tables.

`edgeft export --list-architectures` prints it; docs/architectures.md shows it. Each format says which
architectures it knows and how (Format.architectures, Format.support).
"""

from __future__ import annotations

from edgeft import formats

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


def rows() -> list[tuple[str, ...]]:
    """(HF architecture, families, then one cell per export format) for every architecture a format knows."""
    fmts = list(formats.EXPORT_FORMATS.values())
    archs = dict.fromkeys(a for f in fmts for a in f.architectures)
    return [(arch, FAMILIES.get(arch, ""), *(f.support(arch) for f in fmts)) for arch in archs]


def markdown() -> str:
    """The matrix as a Markdown table (for docs/architectures.md and the terminal)."""
    fmts = list(formats.EXPORT_FORMATS.values())
    lines = [
        "| architecture | families | " + " | ".join(f.title for f in fmts) + " |",
        "|---|---|" + "---|" * len(fmts),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    lines += ["", "Tokenizers a runtime cannot reproduce (flagged at export, failed by verify):", ""]
    lines += [f"- {f.name}: {what} — {why}" for f in fmts for what, why in f.tokenizer_notes]
    return "\n".join(lines)
