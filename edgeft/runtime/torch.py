"""PyTorch runtime: the float reference every exported artifact is judged against."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgeftError


class TorchRuntime:
    """A Hugging Face causal LM directory run eagerly in float32 on the CPU."""

    def __init__(self, path: Path, *, threads: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise EdgeftError(f"{path}: cannot load as a causal LM ({str(exc).splitlines()[0]})") from None
        self.model.eval()
        self.n_vocab = int(self.model.config.vocab_size)

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

    def close(self) -> None:
        del self.model
