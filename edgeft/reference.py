"""The float reference: what the fine-tuned float model does on the eval set, computed once and reused.

Every artifact is judged against one reference run: the float model's logits on the shared sequences (KLD,
top-1, perplexity), its greedy answers on the app path, and at each answer position its most likely
alternatives (for `answers_match`'s near-tie rule, edgeft.verify). The PyTorch model computes it in batches
(right-padded sequences; left-padded prompts decoded together with one KV cache) and it is stored in a
folder keyed by (weights digest, eval set digest, tool versions): every candidate, target and rerun reads it
back, the logits one sequence at a time, so memory stays bounded however large the vocabulary.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeft import data as data_mod
from edgeft import files, formats, metrics
from edgeft.errors import EdgeftError
from edgeft.evalset import AppAnswer, EvalSet, app_answer, cut_answer, vet_app_path
from edgeft.runtime import Runtime
from edgeft.ui import Progress
from edgeft.versions import tool_versions

FORMAT = 1  # of the stored folder; a change makes every stored reference stale
TOP_K = 5  # alternatives kept per answer position
LOGITS_FILE = "logits.f32"
RECORD_FILE = "reference.json"
BATCH_BYTES = 64 << 20  # float32 logits one batched forward may hold (and their per-sequence copies as many)
BATCH_PROMPTS = 32  # prompts decoded together
# Where `edgeft verify` keeps references between runs (a build keeps its own in its work folder); the
# newest few are kept, older ones removed.
KEEP_CACHED = 4

Choices = list[tuple[list[int], list[float]]]  # per generated position: top ids and their log-probabilities


@dataclass
class ReferenceRun:
    """What the float model produced on an EvalSet, compared with every artifact."""

    nll: float  # mean next-token NLL over the shared sequences
    task_accuracy: float | None
    answers: list[AppAnswer]
    choices: list[Choices]  # per answer: the float model's top alternatives at each generated position
    piece: Callable[[int], str]  # one id as the float model's tokenizer spells it
    folder: Path
    lengths: list[int]
    vocab: int
    _temp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def logits(self, i: int, ids: Sequence[int] | None = None) -> np.ndarray:
        """Sequence i's float32 logits [len, vocab], read from the stored file."""
        offset = sum(self.lengths[:i]) * self.vocab * 4
        n = self.lengths[i]
        arr = np.fromfile(self.folder / LOGITS_FILE, dtype="<f4", count=n * self.vocab, offset=offset)
        if arr.size != n * self.vocab:
            raise EdgeftError(f"{self.folder / LOGITS_FILE}: shorter than its record; delete the folder")
        return arr.reshape(n, self.vocab)

    def close(self) -> None:
        """Remove the stored logits when they live in a temporary folder (a kept reference stays)."""
        if self._temp is not None:
            self._temp.cleanup()


def run_reference(
    rt: Runtime, es: EvalSet, progress: Progress | None = None, *, folder: Path | None = None
) -> ReferenceRun:
    """Score the float model once: logits and next-token NLL on the sequences, its own app-path answers
    (with their alternatives when the runtime decodes in batches), task accuracy. Stored in `folder`, or in
    a temporary folder removed by close()."""
    temp = None
    if folder is None:  # removed by close(), or when the run is garbage-collected
        temp = tempfile.TemporaryDirectory(prefix="edgeft-reference-")
        folder = Path(temp.name)
    vocab = int(rt.n_vocab)
    nll: list[np.ndarray] = []
    done = 0
    with open(folder / LOGITS_FILE, "wb") as f:
        for batch in _batches(es.sequences, vocab, getattr(rt, "logits_batch", None) is not None):
            rows = rt.logits_batch(batch) if len(batch) > 1 else [rt.logits(batch[0])]  # type: ignore[attr-defined]
            for ids, logits in zip(batch, rows, strict=True):
                if logits.shape != (len(ids), vocab):
                    raise EdgeftError(
                        f"the float model gave logits of shape {logits.shape} for {len(ids)} ids"
                    )
                np.ascontiguousarray(logits, dtype="<f4").tofile(f)
                nll.append(metrics.next_token_nll(metrics.log_softmax(logits), ids))
            done += len(batch)
            if progress:
                progress(done, es.n_steps)
    answers, choices = _answers(rt, es, progress)
    hits = sum(
        a.ended and data_mod.answer_text_matches(a.text, ex)
        for a, ex in zip(answers, es.examples, strict=True)
    )
    run = ReferenceRun(
        nll=float(np.concatenate(nll).mean()) if nll else 0.0,
        task_accuracy=hits / len(es.examples) if es.scored else None,
        answers=answers,
        choices=choices,
        piece=_piece(rt),
        folder=folder,
        lengths=[len(s) for s in es.sequences],
        vocab=vocab,
        _temp=temp,
    )
    _save(run)
    return run


def _batches(seqs: list[list[int]], vocab: int, batched: bool) -> list[list[list[int]]]:
    """Sequences in file order, grouped so that one batch's float32 logits stay within BATCH_BYTES."""
    if not batched:
        return [[s] for s in seqs]
    out: list[list[list[int]]] = []
    for s in seqs:
        cur = out[-1] if out else None
        longest = max([len(s)] + [len(t) for t in cur or []])
        if cur is not None and (len(cur) + 1) * longest * vocab * 4 <= BATCH_BYTES:
            cur.append(s)
        else:
            out.append([s])
    return out


def _answers(rt: Runtime, es: EvalSet, progress: Progress | None) -> tuple[list[AppAnswer], list[Choices]]:
    """The float model's greedy answer to every conversation, through its own template and end ids."""
    base = len(es.sequences)
    vet_app_path(rt, es)  # its own template renders every conversation within bounds first
    generate_batch = getattr(rt, "generate_batch", None)
    if generate_batch is None:  # one at a time (no alternatives: the near-tie rule does not apply)
        answers = []
        for i, ex in enumerate(es.examples):
            a = app_answer(rt, es, i)
            if a.error:
                raise EdgeftError(f"{ex.source}: the float model cannot answer this conversation ({a.error})")
            answers.append(a)
            if progress:
                progress(base + i + 1, es.n_steps)
        return answers, [[] for _ in answers]
    prompts = []
    for ex in es.examples:
        try:
            prompts.append(rt.chat_prompt_ids(ex.prompt_messages))
        except EdgeftError as e:
            raise EdgeftError(f"{ex.source}: the float model cannot answer this conversation ({e})") from None
    # similar lengths decode together (less padding); results go back in conversation order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[AppAnswer | None] = [None] * len(prompts)
    choices: list[Choices] = [[] for _ in prompts]
    done = 0
    for a in range(0, len(order), BATCH_PROMPTS):
        idx = order[a : a + BATCH_PROMPTS]
        outs = generate_batch([prompts[i] for i in idx], es.max_new_tokens, rt.end_ids, top_k=TOP_K)
        for i, (ids, alts) in zip(idx, outs, strict=True):
            answers[i] = cut_answer(rt, prompts[i], ids)
            choices[i] = alts[: len(answers[i].generated)]  # type: ignore[union-attr]
        done += len(idx)
        if progress:
            progress(base + done, es.n_steps)
    return [a for a in answers if a is not None], choices


def _piece(rt: Runtime) -> Callable[[int], str]:
    piece = getattr(rt, "piece", None)
    if piece is not None:
        return piece
    return lambda i: rt.decode([i])


# --- storing and reading back ----------------------------------------------------------------------------


def _save(run: ReferenceRun) -> None:
    record = {
        "format": FORMAT,
        "vocab": run.vocab,
        "lengths": run.lengths,
        "nll": run.nll,
        "task_accuracy": run.task_accuracy,
        "answers": [
            {"prompt": a.prompt, "answer": a.answer, "ended": a.ended, "text": a.text, "end_id": a.end_id}
            for a in run.answers
        ],
        "choices": run.choices,
    }
    (run.folder / RECORD_FILE).write_text(json.dumps(record), encoding="utf-8")


def load(folder: Path, piece: Callable[[int], str]) -> ReferenceRun:
    """A stored reference run (edgeft's own work or cache folder); EdgeftError when it is not whole."""
    rec = files.read_json(folder / RECORD_FILE)
    bad = EdgeftError(f"{folder}: not a whole stored reference; delete the folder")
    try:
        if rec["format"] != FORMAT:
            raise bad
        vocab, lengths = int(rec["vocab"]), [int(n) for n in rec["lengths"]]
        answers = [
            AppAnswer(
                [int(t) for t in a["prompt"]],
                [int(t) for t in a["answer"]],
                bool(a["ended"]),
                str(a["text"]),
                end_id=None if a["end_id"] is None else int(a["end_id"]),
            )
            for a in rec["answers"]
        ]
        choices = [
            [([int(t) for t in ids], [float(v) for v in lps]) for ids, lps in c] for c in rec["choices"]
        ]
        acc = rec["task_accuracy"]
        run = ReferenceRun(
            nll=float(rec["nll"]),
            task_accuracy=None if acc is None else float(acc),
            answers=answers,
            choices=choices,
            piece=piece,
            folder=folder,
            lengths=lengths,
            vocab=vocab,
        )
    except (KeyError, TypeError, ValueError):
        raise bad from None
    if (folder / LOGITS_FILE).stat().st_size != sum(lengths) * vocab * 4:
        raise bad
    return run


def reference_key(model_dir: Path, es: EvalSet) -> str:
    """What a stored reference depends on: the float model's files, the eval set, the tools that ran it."""
    from edgeft.loading import model_fingerprint

    versions = {k: v for k, v in tool_versions().items() if k in ("torch", "transformers", "edgeft")}
    return files.digest(["reference", FORMAT, model_fingerprint(model_dir), es.digest(), versions, TOP_K])


def stored_reference(
    model_dir: Path,
    es: EvalSet,
    root: Path,
    *,
    threads: int | None = None,
    progress: Callable[[str, int], Any],
    keep: int | None = None,
) -> tuple[ReferenceRun, bool]:
    """The reference run of `model_dir` on `es` from `root/reference-KEY`, computed there first when absent
    (written whole or not at all); also whether it was reused. With `keep`, only the `keep` most recently
    used references stay under `root` (edgeft verify's cache)."""
    from edgeft.loading import load_tokenizer

    key = reference_key(model_dir, es)
    folder = root / f"reference-{key[:16]}"
    tokenizer = load_tokenizer(model_dir, notify=False)

    def piece(i: int) -> str:
        return str(tokenizer.convert_ids_to_tokens(int(i)))

    if files.done_with(folder, key):
        try:
            folder.touch()  # most recently used
            return load(folder, piece), True
        except (EdgeftError, OSError):
            pass  # damaged: computed again below
    files.forget(folder)
    root.mkdir(parents=True, exist_ok=True)
    with files.atomic_dir(folder, what="float reference") as tmp:
        rt = formats.open_reference(model_dir, threads=threads)
        try:
            with progress("float reference (once, batched)", es.n_steps) as update:
                run_reference(rt, es, update, folder=tmp)
        finally:
            rt.close()
    files.mark_done(folder, key)
    if keep is not None:
        _evict(root, keep)
    return load(folder, piece), False


def _evict(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used stored references under `root`."""
    stored = sorted(
        (d for d in root.glob("reference-*") if d.is_dir() and (d / RECORD_FILE).is_file()),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for old in stored[keep:]:
        files.forget(old)
        shutil.rmtree(old, ignore_errors=True)
