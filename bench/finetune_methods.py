"""LoRA vs full fine-tuning on the built-in demo: held-out accuracy, training time, peak RSS.

    python bench/finetune_methods.py                      # both methods, edgeft's defaults
    python bench/finetune_methods.py --full-lr 1e-3       # another learning rate for full fine-tuning

Each method runs in its own child process (so its peak RSS is its own), through edgeft's own stages as
`edgeft build --method lora|full` runs them: edgeft.finetune.finetune (LoRA then edgeft.merge.merge; or
every weight), then the float model in PyTorch answers the fine-tune's held-out split greedily through its
chat template (edgeft.verify: exact-match task accuracy). Prints one table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(method: str, work: Path, full_lr: float, threads: int) -> dict:
    """Fine-tune the demo with `method` and score the float result; runs in a child process."""
    import torch

    from edgeft import verify
    from edgeft.config import LoraSettings
    from edgeft.demo import DEMO_DATA, DEMO_MODEL
    from edgeft.finetune import finetune
    from edgeft.formats.torch.runtime import TorchRuntime
    from edgeft.loading import load_tokenizer
    from edgeft.merge import merge

    torch.set_num_threads(threads)
    settings = LoraSettings()
    out = work / method
    t0 = time.time()
    res = finetune(DEMO_MODEL, Path(DEMO_DATA), out, settings, method=method, full_lr=full_lr)
    train_s = time.time() - t0
    model = out
    if method == "lora":
        model = work / "lora-merged"
        merge(DEMO_MODEL, out, model)
    total_s = time.time() - t0
    examples, source = verify.eval_examples(model, None)
    evalset = verify.make_eval_set(load_tokenizer(model, notify=False), examples, source=source)
    rt = TorchRuntime(model, threads=threads)
    try:
        acc = verify.task_accuracy(rt, evalset)
    finally:
        rt.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    trainable = settings.r if method == "lora" else None
    return {
        "method": method,
        "lr": settings.lr if method == "lora" else full_lr,
        "lora_r": trainable,
        "train_examples": res.train_examples,
        "eval_examples": len(evalset.examples),
        "task_accuracy": acc,
        "eval_loss": res.eval_loss,
        "train_seconds": round(train_s, 1),
        "seconds_with_merge": round(total_s, 1),
        "peak_rss_mb": round(rss_mb),
        "output_mb": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeft-finetune-methods"))
    ap.add_argument("--full-lr", type=float, default=None, help="full fine-tuning's lr (default: edgeft's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--one", choices=("lora", "full"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    from edgeft.config import FULL_LR

    full_lr = a.full_lr if a.full_lr is not None else FULL_LR
    a.work.mkdir(parents=True, exist_ok=True)
    if a.one:
        print(json.dumps(one(a.one, a.work, full_lr, a.threads)))
        return 0
    rows = []
    for method in ("lora", "full"):
        cmd = [sys.executable, __file__, "--one", method, "--work", str(a.work), "--full-lr", str(full_lr)]
        cmd += ["--threads", str(a.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{method}: done", file=sys.stderr, flush=True)
    print(
        "| method | lr | held-out task accuracy | eval loss | train s | with merge s | peak RSS MB | output MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['lr']:g} | {r['task_accuracy']:.1%} ({r['eval_examples']}) | "
            f"{r['eval_loss']:.3f} | {r['train_seconds']:.0f} | {r['seconds_with_merge']:.0f} | "
            f"{r['peak_rss_mb']} | {r['output_mb']:.1f} |"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
