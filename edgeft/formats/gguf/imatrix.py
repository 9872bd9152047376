"""llama.cpp's importance matrix, computed in PyTorch from the fine-tuned float model on the user's own data.

For every linear layer, the mean over calibration tokens of each input column's squared activation: what
llama.cpp's imatrix tool collects from its matrix multiplications (ref: tools/imatrix/imatrix.cpp
IMatrixCollector::collect_imatrix sums x² per column and counts rows) and its quantize tool hands to the
quantizer after dividing sums by counts (ref: tools/quantize/quantize.cpp load_imatrix). Keys are the GGUF
tensor names edgeft's converter writes (edgeft.formats.gguf.arch), so edgeft.formats.gguf.quantize passes them straight to
llama.cpp with no file format in between (ref: include/llama.h llama_model_quantize_params.imatrix).

Calibration text is each conversation rendered whole (answer included: it is training data) through the
model's own chat template and tokenized as the fine-tune tokenized it, special tokens parsed — unlike
imatrix tools run on chat text without `--parse-special` (ref: llama.cpp #6804, PR #13389).

The output head: when untied, output.weight gets an entry. llama.cpp's imatrix tool skips it unless
`--process-output` because collecting it needs every position's logits; here the head's inputs (the final
hidden states) are already computed, and the head is the tensor k-quant mixes keep at Q6_K — whose
quantizer uses the weights. A tied head is token_embd.weight, which is also the embedding table gathered row
by row, where every column matters alike: it gets no entry (llama.cpp never collects token_embd either).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.data import _encode, _render, dataset_sha256, load_jsonl
from edgeft.errors import EdgeftError
from edgeft.guard import check_model_folder

Progress = Callable[[int, int], None]
TIED_HEAD = (
    "token_embd.weight"  # a tied model's head in GGUF (ref: llama.cpp src/llama-model.cpp output fallback)
)


@dataclass(frozen=True, eq=False)
class Imatrix:
    """An importance matrix ready for llama.cpp's quantizer, and what it was computed from.

    `dataset_sha256` is, by default, the SHA-256 of the calibration texts actually used, as rendered through
    the chat template (a JSON list of strings, in order); `imatrix_from_jsonl` records the data file's own
    SHA-256 instead (the digest a fine-tune records for its data), with `examples` saying how many of its
    records the token cap let in.
    """

    values: dict[str, np.ndarray]  # GGUF tensor name → float32 mean of squared inputs per input column
    examples: int  # conversations used (each one forward pass: llama.cpp's "chunks")
    tokens: int
    dataset_sha256: str

    def record(self) -> dict[str, Any]:
        """What a manifest records about it: {"dataset_sha256", "examples", "tokens"}."""
        return {"dataset_sha256": self.dataset_sha256, "examples": self.examples, "tokens": self.tokens}

    def summary(self) -> str:
        """One line for people: "imatrix from 200 examples, 31k tokens"."""
        k = f"{self.tokens / 1000:.0f}k" if self.tokens >= 10_000 else str(self.tokens)
        return f"imatrix from {self.examples} example{'s' * (self.examples != 1)}, {k} tokens"


def _tokenize(
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    sources: Sequence[str],
    max_tokens: int,
    max_len: int,
) -> tuple[list[list[int]], list[str]]:
    """Rendered texts' ids, in order, until `max_tokens` (the last one cut to fit); and the texts used."""

    out: list[list[int]] = []
    texts: list[str] = []
    left = max_tokens
    for conv, source in zip(conversations, sources, strict=True):
        try:
            text = _render(tokenizer, [dict(m) for m in conv], False)
        except EdgeftError as e:
            raise EdgeftError(f"{source}: {e}") from None
        ids = _encode(tokenizer, text, special=False)[: min(left, max_len)]
        if not ids:
            continue
        out.append(ids)
        texts.append(text)
        left -= len(ids)
        if left <= 0:
            break
    return out, texts


BATCH_TOKENS = 2048  # padded tokens per forward pass
# Calibration tokens by default: on SmolLM2-135M the forward pass costs ~3 s per 1000 tokens on 2 cores, and
# the imatrix study (bench/imatrix_study.py) measures the search's choices at this budget; llama.cpp's own
# figures show no consistent gain from more generic text (tools/perplexity README, imatrix section).
MAX_TOKENS = 16384


def _groups(seqs: list[list[int]]) -> list[list[list[int]]]:
    """Sequences in order, grouped so that each group padded to its longest holds at most BATCH_TOKENS."""
    out: list[list[list[int]]] = []
    for ids in seqs:
        cur = out[-1] if out else None
        if cur is not None and (len(cur) + 1) * max(len(ids), *(len(c) for c in cur)) <= BATCH_TOKENS:
            cur.append(ids)
        else:
            out.append([ids])
    return out


def compute_from(
    model_dir: Path,
    conversations: Sequence[Sequence[dict[str, str]]],
    sources: Sequence[str],
    *,
    threads: int | None,
    max_tokens: int = MAX_TOKENS,
    progress: Progress | None = None,
    dataset_sha256: str | None = None,
    tied_head: bool = False,
) -> Imatrix:
    """compute_imatrix with each conversation's own source (file:line) for error lines."""
    import torch

    from edgeft.formats.gguf.arch import prepare
    from edgeft.loading import load_model, load_tokenizer

    model_dir = Path(model_dir)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise EdgeftError(f"max_tokens = {max_tokens!r} should be a positive integer")
    if not conversations:
        raise EdgeftError("no calibration conversations; give at least one chat record")
    check_model_folder(model_dir)
    prep = prepare(model_dir)  # the converter's own names and shapes: the keys must be the GGUF's
    plans = {p.hf_name: p for p in prep.plans if len(p.shape) == 2 and p.src is not None}
    tokenizer = load_tokenizer(model_dir, notify=False)
    batches, texts = _tokenize(tokenizer, conversations, sources, max_tokens, prep.model.n_ctx)
    if not batches:
        raise EdgeftError(f"{sources[0]}: the calibration conversations render to no tokens")
    model = load_model(model_dir, dtype=torch.float32)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    names: dict[str, str] = {}
    handles = []
    real = torch.ones(1, dtype=torch.bool)  # which flattened positions of the running batch are not padding

    def add(key: str, x: torch.Tensor) -> None:
        # ref: tools/imatrix/imatrix.cpp collect_imatrix (acc[j] += x[j]*x[j] per row; counts += rows)
        x = x.detach().reshape(-1, x.shape[-1])[real]
        sums[key] += (x * x).sum(0, dtype=torch.float64)  # float64 sums across batches, as before per row
        counts[key] += x.shape[0]

    def collector(key: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            add(key, args[0])

        return hook

    for mod_name, module in model.named_modules():
        plan = plans.get(f"{mod_name}.weight")
        if not isinstance(module, torch.nn.Linear) or plan is None:
            continue  # a tied lm_head has no plan: it is token_embd.weight in the GGUF
        if plan.shape[-1] != module.in_features:
            raise EdgeftError(
                f"{model_dir}: {mod_name} takes {module.in_features} inputs but {plan.hf_name} has "
                f"{plan.shape[-1]} columns in the checkpoint"
            )
        names[mod_name] = plan.gguf_name
        sums[mod_name] = torch.zeros(module.in_features, dtype=torch.float64)
        counts[mod_name] = 0
        if module is not model.get_output_embeddings():  # the head's inputs come from the decoder below
            handles.append(module.register_forward_pre_hook(collector(mod_name)))
    head = model.get_output_embeddings()
    head_key = next((m for m, mod in model.named_modules() if mod is head and m in names), None)
    embd = next((p for p in plans.values() if p.gguf_name == TIED_HEAD), None)
    if tied_head and prep.model.tied and isinstance(head, torch.nn.Linear) and embd is not None:
        # the head's inputs (final hidden states) weigh token_embd.weight's columns; llama-quant.cpp takes
        # any tensor's entry whose size is ne[0] (ref: src/llama-quant.cpp llama_model_quantize_impl)
        head_key = "<tied head>"
        names[head_key] = embd.gguf_name
        sums[head_key] = torch.zeros(head.in_features, dtype=torch.float64)
        counts[head_key] = 0
    decoder = model.get_decoder()  # the head's input is the decoder's last hidden state: no logits computed
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        from contextlib import nullcontext

        from edgeft.ui import task

        bar = task("importance matrix", len(batches)) if progress is None else nullcontext(progress)
        done = 0
        with bar as update, torch.inference_mode():
            for group in _groups(batches):
                n = max(len(ids) for ids in group)
                x = torch.zeros((len(group), n), dtype=torch.long)
                mask = torch.zeros((len(group), n), dtype=torch.bool)
                for i, ids in enumerate(group):
                    x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[i, : len(ids)] = True
                real = mask.reshape(-1)
                # right-padded, causal: every real position sees only real positions before it
                hidden = decoder(input_ids=x, use_cache=False).last_hidden_state
                if head_key is not None:
                    add(head_key, hidden)
                done += len(group)
                update(done, len(batches))
    finally:
        for h in handles:
            h.remove()
        torch.set_num_threads(saved_threads)
    values = {names[m]: (sums[m] / counts[m]).to(torch.float32).numpy() for m in sums if counts[m] > 0}
    digest = dataset_sha256 or hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    tokens = sum(len(ids) for ids in batches)
    return Imatrix(values, examples=len(batches), tokens=tokens, dataset_sha256=digest)


def compute_imatrix(
    model_dir: Path,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    threads: int | None = None,
    max_tokens: int = MAX_TOKENS,
    progress: Progress | None = None,
    dataset_sha256: str | None = None,
    tied_head: bool = False,
) -> Imatrix:
    """The importance matrix of a (merged, float) HF model over `conversations`, each rendered whole
    through its chat template and run forward in float32, up to `max_tokens` tokens in all.

    `progress(done, total)` is called per conversation (default: a progress bar on stderr).
    `dataset_sha256` names the data in the record; default: the digest of the rendered texts used.
    """
    sources = [f"calibration conversation {i + 1}" for i in range(len(conversations))]
    return compute_from(
        model_dir,
        conversations,
        sources,
        threads=threads,
        max_tokens=max_tokens,
        progress=progress,
        dataset_sha256=dataset_sha256,
        tied_head=tied_head,
    )


def imatrix_from_jsonl(model_dir: Path, path: Path, **kw: Any) -> Imatrix:
    """compute_imatrix over a task JSONL file's records (edgeft.data.load_jsonl: prompt/completion or
    messages lines), in file order. The record's dataset_sha256 is the file's own SHA-256."""

    path = Path(path)
    examples = load_jsonl(path)  # one-line errors: missing, unreadable, empty, malformed line
    kw.setdefault("dataset_sha256", dataset_sha256(path))
    kw.setdefault("threads", None)
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("progress", None)
    return compute_from(model_dir, [ex.messages for ex in examples], [ex.source for ex in examples], **kw)
