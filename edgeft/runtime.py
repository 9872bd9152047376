"""One small interface over the inference engines, so verify and bench are written once.

Each format's package has one class implementing `Runtime` (edgeft/formats/<name>/runtime.py); the registry
(edgeft.formats.open_runtime) opens an artifact in its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


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

    def vet(self, conversations: list[list[dict[str, str]]]) -> None:
        """Render these through the artifact's own chat template within bounds first, in one batch
        (edgeft.template.vet), so chat_prompt_ids on them next is known to finish; a template past the bounds
        is one EdgeftError naming it."""
        ...

    def text_ids(self, text: str) -> list[int]:
        """A prompt text's ids as an app without a template engine gets them from the runtime's tokenizer:
        special tokens in the text parsed as such, none added (model.json's prompt settings)."""
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
