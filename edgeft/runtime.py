"""One small interface over the inference engines, so verify and bench are written once.

Each engine (PyTorch, llama.cpp, onnxruntime) has one module here with one class implementing `Runtime`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeft.constants import FORMAT_GGUF, FORMAT_ONNX, FORMAT_TORCH, ONNX_GENAI_CONFIG
from edgeft.errors import EdgeftError


class Runtime(Protocol):
    """A loaded model that can score and extend token ids, and take a conversation the way an app does."""

    n_vocab: int

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits for every position of `ids` (fresh context), float32 [len(ids), vocab]."""
        ...

    def generate(self, ids: Sequence[int], n: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of `ids`: at most `n` new ids, ending early after any of `stop_ids`."""
        ...

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids an app feeds the model for a conversation: the artifact's own template and tokenizer."""
        ...

    @property
    def end_ids(self) -> list[int]:
        """The ids this runtime ends an answer on (what an app's generation stops at)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, as the runtime's own tokenizer renders an answer."""
        ...

    def close(self) -> None:
        """Free the engine's memory."""
        ...


def artifact_format(path: Path) -> str:
    """The format of an artifact path: a .gguf file, an onnxruntime-genai dir or an HF model dir."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return FORMAT_GGUF
    if path.is_dir() and (path / ONNX_GENAI_CONFIG).is_file():
        return FORMAT_ONNX
    if path.is_dir() and (path / "config.json").is_file():
        return FORMAT_TORCH
    raise EdgeftError(
        f"{path}: not a .gguf file, an ONNX model dir (with {ONNX_GENAI_CONFIG}) "
        "or a Hugging Face model dir (with config.json)"
    )


def open_runtime(
    path: Path,
    *,
    threads: int | None = None,
    n_ctx: int = 512,
    all_logits: bool = True,
    allow_native_libs: bool = False,
) -> Runtime:
    """Open an artifact in the engine that its format needs (ONNX folders naming native libraries only when
    `allow_native_libs`)."""
    fmt = artifact_format(path)
    if fmt == FORMAT_GGUF:
        from edgeft.formats.gguf.runtime import LlamaCppRuntime

        return LlamaCppRuntime(path, threads=threads, n_ctx=n_ctx, all_logits=all_logits)
    if fmt == FORMAT_ONNX:
        from edgeft.formats.onnx.runtime import OrtRuntime

        return OrtRuntime(
            path, threads=threads, n_ctx=n_ctx, all_logits=all_logits, allow_native_libs=allow_native_libs
        )
    from edgeft.formats.torch.runtime import TorchRuntime

    return TorchRuntime(path, threads=threads)  # a local HF dir (artifact_format checked config.json)
