"""PyTorch runtime: the float reference every exported artifact is judged against.

Its app path is the fine-tune's own: the conversation rendered by the model's chat template and tokenized
by the checkpoint's own tokenizer files (edgeft.loading.load_tokenizer), exactly as training saw it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeft import data as data_mod
from edgeft.loading import load_model, load_tokenizer


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

    @torch.inference_mode()
    def logits_batch(self, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """`logits` of several sequences in one forward. They are right-padded: causal attention keeps every
        real position from seeing the padding, so no mask is needed and each row is its sequence's logits."""
        n = max(len(s) for s in seqs)
        x = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        out = self.model(input_ids=x).logits.float()
        return [out[i, : len(s)].numpy().copy() for i, s in enumerate(seqs)]

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        stop_ids: Sequence[int] = (),
        top_k: int = 0,
        keep_going: Callable[[int, list[int]], bool] | None = None,
    ) -> list[tuple[list[int], list[tuple[list[int], list[float]]]]]:
        """`generate` for several prompts at once (left-padded, with attention mask and positions, one KV
        cache): per prompt its greedy ids and, with `top_k`, at each generated position the `top_k` most
        likely ids with their log-probabilities (the float model's alternatives, for near-tie judgements).
        With `keep_going(i, ids so far)`, prompt i stops once it is false; decoding ends when all have."""
        stops = set(stop_ids)
        b, longest = len(prompts), max(len(p) for p in prompts)
        x = torch.zeros((b, longest), dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            x[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, longest - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out: list[list[int]] = [[] for _ in prompts]
        alts: list[list[tuple[list[int], list[float]]]] = [[] for _ in prompts]
        done = [False] * b
        cache = None
        for _ in range(n):
            # transformers 5 names the KV cache `cache` (ref: transformers 5.x LlamaForCausalLM.forward)
            res = self.model(
                input_ids=x,
                attention_mask=mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = res.cache
            last = res.logits[:, -1].float()
            toks = last.argmax(-1)
            if top_k:
                lp, ids = torch.log_softmax(last, -1).topk(top_k, -1)
            for i in range(b):
                if done[i]:
                    continue
                tok = int(toks[i])
                out[i].append(tok)
                if top_k:
                    alts[i].append((ids[i].tolist(), lp[i].tolist()))
                done[i] = tok in stops or (keep_going is not None and not keep_going(i, out[i]))
            if all(done):
                break
            x = toks[:, None]
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], -1)
            pos = pos[:, -1:] + 1
        return list(zip(out, alts, strict=True))

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The fine-tune's prompt ids for a conversation (chat template + generation prompt)."""
        return data_mod.chat_prompt_ids(self.tokenizer, messages)

    def vet(self, conversations: list[list[dict[str, str]]]) -> None:
        data_mod.vet(self.tokenizer, [(list(m), True) for m in conversations])

    def text_ids(self, text: str) -> list[int]:
        """The tokenizer's ids of a prompt text, nothing added (special tokens in it are parsed)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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


class TorchEngine:
    """The PyTorch float reference as a measurement engine: one forward over the prompt, then one per token
    with the KV cache (the same loop as edgeft.formats.torch.runtime.TorchRuntime.generate)."""

    def __init__(self, path: Path, *, threads: int) -> None:
        self._rt = TorchRuntime(path, threads=threads)
        self.n_vocab = self._rt.n_vocab
        self._cache: Any = None
        self._last = 0

    def _forward(self, ids: list[int]) -> int:
        import torch

        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long)
            # transformers 5 names the KV cache `cache` (ref: transformers 5.x LlamaForCausalLM.forward)
            res = self._rt.model(input_ids=x, cache=self._cache, use_cache=True, logits_to_keep=1)
            self._cache = res.cache
            self._last = int(res.logits[0, -1].argmax())
        return self._last

    def start(self, ids: list[int]) -> int:
        self._cache = None
        return self._forward(ids)

    def step(self) -> int:
        return self._forward([self._last])

    def close(self) -> None:
        self._cache = None
        self._rt.close()
