"""Before writing a GGUF: prove llama.cpp tokenizes chat prompts exactly as the fine-tune did.

The vocabulary and flags are written into a small vocab-only GGUF first; llama-cpp-python loads it and builds
each probe conversation's prompt ids the way an app's `create_chat_completion` does (edgeft.formats.gguf.runtime
.chat_prompt_ids). They must equal the ids of the same conversation rendered by the model's chat template
and tokenized by its own tokenizer files (edgeft.data.chat_prompt_ids). Plain texts are compared too.

For SentencePiece vocabularies the space-prefix rule is the one choice that differs between runtimes:
llama.cpp prefixes text after every special token, transformers' Metaspace(prepend_scheme="first") only the
start of the input (ref: llama.cpp src/llama-vocab.cpp llama_vocab::impl::tokenize, SPM branch; tokenizers
src/pre_tokenizers/metaspace.rs PrependScheme::First). When the flag derived from the
tokenizer files does not reproduce the prompts, the other one is tried; when neither does, one line says so
with the first differing token (the artifact is still written, and verify's prompt_ids_match fails it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf

from edgeft.formats.gguf.vocab import Vocab, general_name, write_vocab
from edgeft.probes import PROBE_CONVERSATIONS, tokenization_mismatches


def mismatches(path: Path, tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    """Every probe (text or conversation) whose llama.cpp ids differ from the tokenizer's, one line each."""
    import llama_cpp

    from edgeft.formats.gguf.runtime import chat_prompt_ids, silence_llama_logs

    silence_llama_logs()
    try:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as e:
        return [f"llama.cpp cannot load the vocabulary ({e})"]
    try:

        def encode(text: str) -> list[int]:
            return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

        return tokenization_mismatches(
            tokenizer,
            "llama.cpp",
            encode,
            lambda m: chat_prompt_ids(llm, m),
            conversations,
            text_specials=True,
        )
    finally:
        llm.close()


def _vocab_only_gguf(
    arch_name: str, write_header: Callable[[gguf.GGUFWriter], None], write: Callable
) -> Path:
    fd, name = tempfile.mkstemp(prefix=".edgeft-vocab-", suffix=".gguf")
    os.close(fd)
    w = gguf.GGUFWriter(name, arch_name)
    try:
        write_header(w)
        write(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.flush()
    finally:
        w.close()
    return Path(name)


def _write_candidate(
    w: gguf.GGUFWriter, *, model_dir: Path, vocab: Vocab, n_vocab: int, eot: int | None
) -> None:
    w.add_name(general_name(model_dir, vocab))  # llama.cpp keys some token attributes on the name
    write_vocab(w, model_dir, vocab, n_vocab, end_of_turn=eot)


def choose_vocab(
    model_dir: Path,
    vocab: Vocab,
    n_vocab: int,
    arch_name: str,
    write_header: Callable[[gguf.GGUFWriter], None],
    conversations: Sequence[Sequence[dict[str, str]]] = (),
    *,
    end_of_turn: int | None = None,
) -> tuple[Vocab, list[str]]:
    """The vocabulary settings under which llama.cpp reproduces the fine-tune's prompts, and what still
    differs (empty when everything matches). `conversations` are checked besides the built-in probes."""
    from edgeft.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir, notify=False)
    convs = list(PROBE_CONVERSATIONS) + [tuple(c) for c in conversations]
    candidates = [vocab]
    if vocab.add_space_prefix is not None:
        candidates.append(dataclasses.replace(vocab, add_space_prefix=not vocab.add_space_prefix))
    best: tuple[tuple[int, int], Vocab, list[str]] | None = None
    for cand in candidates:
        path = _vocab_only_gguf(
            arch_name,
            write_header,
            functools.partial(
                _write_candidate, model_dir=model_dir, vocab=cand, n_vocab=n_vocab, eot=end_of_turn
            ),
        )
        try:
            found = mismatches(path, tokenizer, convs)
        finally:
            path.unlink(missing_ok=True)
        # Chat prompts (the app path) first, then plain texts; the first candidate wins ties.
        score = (sum(m.startswith("conversation") for m in found), len(found))
        if best is None or score < best[0]:
            best = (score, cand, found)
        if not found:
            break
    assert best is not None
    return best[1], best[2]
