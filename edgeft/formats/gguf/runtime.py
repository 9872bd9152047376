"""llama.cpp runtime (llama-cpp-python): scores and extends token ids of a GGUF file.

llama_cpp is imported lazily (here, in edgeft/formats/gguf/quantize.py and the GGUF tokenizer check), so edgeft imports without it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeft import template
from edgeft.errors import EdgeftError
from edgeft.formats.gguf.header import check_gguf


def silence_llama_logs() -> None:
    """Route llama.cpp's C-level log output through a callback that drops it (verbose=False is not enough
    for messages emitted before/after the Llama object exists, e.g. during quantization or free)."""
    import llama_cpp

    global _LOG_CB
    if _LOG_CB is None:

        @llama_cpp.llama_log_callback
        def _drop(level: int, text: bytes, user_data: Any) -> None:  # noqa: ARG001
            return None

        _LOG_CB = _drop
    llama_cpp.llama_log_set(_LOG_CB, None)


_LOG_CB: Any = None


class _Captured(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by _PromptProbe once llama-cpp-python's chat handler has built the prompt it would run."""

    def __init__(self, prompt: list[int]) -> None:
        super().__init__("prompt captured")
        self.prompt = prompt


class _PromptProbe:
    """Stands in for a `Llama` inside llama-cpp-python's chat handler: tokenizes for real, then stops.

    `create_chat_completion` = handler(llama, messages): render the chat format (the GGUF's own Jinja
    template, or a built-in format llama-cpp-python guesses from it), `llama.tokenize(...)`, then
    `llama.create_completion(prompt=ids, ...)`. Intercepting that last call yields exactly the ids an app's
    `create_chat_completion` feeds the model, through llama-cpp-python's own code.
    """

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, prompt: Any, **kwargs: Any) -> Any:  # noqa: ARG002
        raise _Captured([int(t) for t in prompt])


def chat_prompt_ids(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids `llm.create_chat_completion(messages)` would evaluate (see _PromptProbe)."""
    from llama_cpp import llama_chat_format

    handler = (
        llm.chat_handler
        or llm._chat_handlers.get(llm.chat_format)  # noqa: SLF001 - where Llama keeps GGUF templates
        or llama_chat_format.get_chat_completion_handler(llm.chat_format)
    )
    try:
        handler(llama=_PromptProbe(llm), messages=messages, temperature=0.0, max_tokens=1)
    except _Captured as c:
        return c.prompt
    raise EdgeftError(f"llama-cpp-python's chat handler {llm.chat_format!r} did not build a prompt")


def end_of_generation_ids(llm: Any) -> list[int]:
    """Every id llama.cpp ends a generation on (EOS, EOT and the other end-of-generation tokens)."""
    import llama_cpp

    vocab = llm._model.vocab  # noqa: SLF001 - the vocab handle llama-cpp-python itself passes around
    return [t for t in range(int(llm.n_vocab())) if llama_cpp.llama_vocab_is_eog(vocab, t)]


class LlamaCppRuntime:
    """A GGUF model loaded in llama.cpp, implementing edgeft.runtime.Runtime."""

    def __init__(
        self,
        path: Path,
        *,
        threads: int | None = None,
        n_ctx: int = 512,
        all_logits: bool = True,
        adapter: Path | None = None,
    ) -> None:
        """`adapter`: a LoRA GGUF (edgeft.formats.gguf.adapter) applied on top, checked against the base first."""
        path = Path(path)
        if not path.is_file():
            raise EdgeftError(f"{path}: GGUF file does not exist")
        try:
            import llama_cpp
        except ImportError as e:  # pragma: no cover - depends on the install
            raise EdgeftError(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python") from e
        silence_llama_logs()
        threads = threads or max(1, os.cpu_count() or 1)
        check_gguf(path)  # a damaged or hostile header is refused here, before llama.cpp parses it
        if adapter is not None:
            from edgeft.formats.gguf.adapter import check_pair

            check_pair(path, Path(adapter))  # another model's adapter: one line, before llama.cpp loads it
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                lora_path=None if adapter is None else str(adapter),
                n_ctx=n_ctx,
                n_batch=n_ctx,  # one decode call per eval up to n_ctx tokens
                n_ubatch=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=all_logits,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            what = f"the model with the adapter {adapter}" if adapter is not None else "the model"
            raise EdgeftError(f"{path}: llama.cpp could not load {what} ({e})") from e
        self.path = path
        self.n_ctx = n_ctx
        self.all_logits = all_logits
        self.n_vocab: int = int(self._llm.n_vocab())
        self.metadata: dict[str, str] = dict(self._llm.metadata)
        self.end_ids: list[int] = end_of_generation_ids(self._llm)

    def _check_len(self, n: int) -> None:
        if n > self.n_ctx:
            raise EdgeftError(f"{n} tokens do not fit the llama.cpp context of {self.n_ctx}; raise n_ctx")
        if n == 0:
            raise EdgeftError("no token ids to evaluate")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits for every position of `ids` in a fresh context, float32 [len(ids), n_vocab]."""
        if not self.all_logits:
            raise EdgeftError(
                "this llama.cpp runtime was opened with all_logits=False; per-position logits need it"
            )
        ids = [int(i) for i in ids]
        self._check_len(len(ids))
        self._llm.reset()
        self._llm.eval(ids)
        return np.array(self._llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        if self.all_logits:
            return np.asarray(self._llm.scores[self._llm.n_tokens - 1])
        ptr = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def generate(self, ids: Sequence[int], n: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation: up to `n` new ids, ending after (and including) the first of `stop_ids`."""
        ids = [int(i) for i in ids]
        self._check_len(len(ids) + max(n - 1, 0))
        stops = {int(s) for s in stop_ids}
        self._llm.reset()
        self._llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            nxt = int(np.argmax(self._last_logits()))
            out.append(nxt)
            if nxt in stops or len(out) == n:
                break
            self._llm.eval([nxt])
        return out

    def vet(self, conversations: list[list[dict[str, str]]]) -> None:
        """The GGUF's own template (the one llama-cpp-python renders, with the bos and eos text it passes)
        rendered within bounds first; a GGUF without one uses llama-cpp-python's built-in formats (no Jinja)."""
        tmpl = self.metadata.get("tokenizer.chat_template")
        if not tmpl:
            return
        model = self._llm._model  # noqa: SLF001 - where Llama keeps the vocabulary's token texts
        bos, eos = self._llm.token_bos(), self._llm.token_eos()
        variables = {
            "bos_token": model.token_get_text(bos) if bos != -1 else "",
            "eos_token": model.token_get_text(eos) if eos != -1 else "",
        }
        renders = [(list(m), True) for m in conversations]
        template.vet(tmpl, variables, renders, where=f"{self.path}: its chat template")

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids an app's `create_chat_completion(messages)` feeds this model (its template, its tokenizer)."""
        self.vet([messages])  # at once when a batch vetted it already
        try:
            return chat_prompt_ids(self._llm, messages)
        except EdgeftError:
            raise
        except Exception as e:  # noqa: BLE001 - a template can raise anything while rendering
            raise EdgeftError(f"{self.path}: the GGUF chat template fails to render ({e})") from None

    def text_ids(self, text: str) -> list[int]:
        """llama.cpp's ids of a prompt text, special tokens parsed, none added (llama_tokenize)."""
        return self.tokenize(text, add_special=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Answer text the way llama-cpp-python returns it (special tokens not rendered)."""
        return self._llm.detokenize([int(i) for i in ids]).decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama.cpp's own tokenization of `text` (special tokens in the text are parsed as such)."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        """llama.cpp's detokenization of `ids` (special tokens rendered, SPM dummy-prefix space removed)."""
        import ctypes

        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        arr = (llama_cpp.llama_token * len(ids))(*[int(i) for i in ids])
        size = 64 + 16 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(size)
            # ref: llama.h llama_detokenize; a negative result is the needed buffer size
            n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n

    def close(self) -> None:
        """Free the model and context."""
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None

    def __enter__(self) -> LlamaCppRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
