"""LoRA learning rates on a model: how many steps early stopping runs, held-out loss and task accuracy.

    python bench/finetune_lr.py                                       # builtin:smollm2-135m, auto + 3 rates
    python bench/finetune_lr.py --model builtin:demo --lr auto 1e-3   # the demo
    python bench/finetune_lr.py --lr 3e-4 1e-3 --json rows.json

Each rate runs in its own child process through edgeft's own stages, as `edgeft build` runs them: LoRA
(edgeft.finetune, defaults but the rate: up to 5 epochs, early stop on the validation slice of the training
split), merge, then the merged float model answers the fine-tune's held-out split greedily through its chat
template (edgeft.reference, batched): exact-match task accuracy. The anchors of edgeft.config.auto_lr come
from this script. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def one(model: str, lr: str, work: Path, threads: int) -> dict:
    """Fine-tune `model` at `lr` ("auto": edgeft's choice), merge, score; runs in a child process."""
    import dataclasses

    import torch

    from edgeft import verify
    from edgeft.builtin import model_source
    from edgeft.config import LoraSettings
    from edgeft.demo import DEMO_DATA
    from edgeft.finetune import finetune
    from edgeft.loading import load_tokenizer
    from edgeft.merge import merge
    from edgeft.reference import stored_reference
    from edgeft.ui import task

    torch.set_num_threads(threads)
    source = model_source(model)
    settings = dataclasses.replace(LoraSettings(), lr=None if lr == "auto" else float(lr))
    out = work / f"lr-{lr}"
    t0 = time.time()
    res = finetune(source, Path(DEMO_DATA), out / "adapter", settings)
    train_s = time.time() - t0
    merged = out / "merged"
    merge(source, out / "adapter", merged)
    examples, src = verify.eval_examples(merged, None)
    es = verify.make_eval_set(load_tokenizer(merged, notify=False), examples, source=src)
    ref, _ = stored_reference(merged, es, out, threads=threads, progress=task)
    sched = res.schedule
    return {
        "lr": sched["lr"],
        "auto": lr == "auto",
        "steps": sched["steps"],
        "max_steps": sched["max_steps"],
        "best_step": sched["best_step"],
        "stopped_early": sched["stopped_early"],
        "train_seconds": round(train_s, 1),
        "heldout_loss": round(res.eval_loss, 4),
        "task_accuracy": ref.task_accuracy,
        "eval_examples": len(es.examples),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--lr", nargs="+", default=["auto", "3e-4", "2e-3"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeft-finetune-lr"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.model, a.one, a.work, a.threads)))
        return 0
    rows = []
    for lr in a.lr:
        cmd = [sys.executable, __file__, "--one", lr, "--model", a.model, "--work", str(a.work)]
        res = subprocess.run([*cmd, "--threads", str(a.threads)], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"{a.model}, demo task data, {rows[0]['eval_examples']} held-out conversations, {a.threads} threads"
    )
    print("| lr | steps (of max) | best step | stopped early | train s | held-out loss | task accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lr = f"{r['lr']:g}" + (" (auto)" if r["auto"] else "")
        print(
            f"| {lr} | {r['steps']} ({r['max_steps']}) | {r['best_step']} | {'yes' if r['stopped_early'] else 'no'} "
            f"| {r['train_seconds']:.0f} | {r['heldout_loss']:.4f} | {r['task_accuracy']:.1%} |"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
