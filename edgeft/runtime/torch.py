"""PyTorch runtime: the float reference every exported artifact is judged against.

Its app path is the fine-tune's own: the conversation rendered by the model's chat template and tokenized
by the checkpoint's own tokenizer files (edgeft.loading.load_tokenizer), exactly as training saw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as data_mod
from ..loading import load_model, load_tokenizer


class TorchRuntime:
    """A Hugging Face causal LM directory run eagerly in float32 on the CPU."""

    def __init__(
        self, model: str | Path, *, threads: int | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.source = model  # a local dir or a hub id, exactly as given (a hub id is not a Path)
        self.model = load_model(model, dtype=dtype)
        self.model.eval()
        self.n_vocab = int(self.model.config.vocab_size)
        self._tokenizer: Any = None
        self._end_ids: list[int] | None = None

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's own tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source, notify=False)
        return self._tokenizer

    @torch.inference_mode()
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        x = torch.tensor([list(ids)], dtype=torch.long)
        return self.model(input_ids=x).logits[0].float().numpy()

    @torch.inference_mode()
    def generate(self, ids: Sequence[int], n: int, stop_ids: Sequence[int] = ()) -> list[int]:
        stops, out = set(stop_ids), []
        x = torch.tensor([list(ids)], dtype=torch.long)
        cache = None
        for _ in range(n):
            # transformers 5 names the KV cache `cache` (ref: transformers 5.x LlamaForCausalLM.forward)
            res = self.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
            cache = res.cache
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            if tok in stops:
                break
            x = torch.tensor([[tok]], dtype=torch.long)
        return out

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The fine-tune's prompt ids for a conversation (chat template + generation prompt)."""
        return data_mod.chat_prompt_ids(self.tokenizer, messages)

    @property
    def end_ids(self) -> list[int]:
        """Ids that end an answer: eos and the chat template's end-of-turn tokens."""
        if self._end_ids is None:
            self._end_ids = data_mod.stop_ids(self.tokenizer)
        return self._end_ids

    def piece(self, token_id: int) -> str:
        """One token as the vocabulary spells it (e.g. '▁['), for showing where two tokenizations differ."""
        return str(self.tokenizer.convert_ids_to_tokens(int(token_id)))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def close(self) -> None:
        self.model = None
