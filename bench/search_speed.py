"""The search's early stops keep the exhaustive search's choice: the demo and the real model, both ways.

    python bench/search_speed.py                          # demo and builtin:smollm2-135m
    python bench/search_speed.py --model builtin:demo

For each model, `edgeft build --target raspberrypi --keep-work` runs once as users run it (clearly failing
candidates stop early on shared ids, candidates that read more bytes than the winner are only screened),
then again with `--exhaustive` in the same folder: the fine-tune, exports and the stored float reference
are reused, and every candidate is measured in full (every shared-id sequence, every app-path
conversation). Prints, per slot, the artifact each chose and the seconds its choice took, and per candidate
the exhaustive numbers (KLD, top-1, task accuracy, answers match) with how far the fast search measured it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def build(cwd: Path, model: str, *extra: str) -> tuple[dict, float]:
    """One `edgeft build` into cwd/dist; its manifest and wall seconds."""
    cmd = [
        sys.executable,
        "-m",
        "edgeft",
        "build",
        "--target",
        "raspberrypi",
        "--keep-work",
        "--json",
        *extra,
    ]
    if model != "builtin:demo":
        cmd += ["--model", model]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    bundle = Path(json.loads(res.stdout)["bundle"])
    return json.loads((bundle / "manifest.json").read_text()), seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["builtin:demo", "builtin:smollm2-135m"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeft-search-speed"))
    a = ap.parse_args(argv)
    same = True
    for model in a.model:
        cwd = a.work / model.replace(":", "-")
        cwd.mkdir(parents=True, exist_ok=True)
        fast, fast_s = build(cwd, model)
        full, full_s = build(cwd, model, "--exhaustive")
        print(f"\n## {model} (fast build {fast_s:.0f} s; exhaustive rerun reusing its work {full_s:.0f} s)\n")
        print("| slot | fast search chose | in (s) | exhaustive chose | in (s) | same |")
        print("|---|---|---|---|---|---|")
        for slot in sorted({c["slot"] for c in full["candidates"]}):
            pick = {
                name: next(c["label"] for c in m["candidates"] if c["slot"] == slot and c["chosen"])
                for name, m in (("fast", fast), ("full", full))
            }
            secs = {
                name: m["stage_seconds"].get(f"choose {slot}", 0.0)
                for name, m in (("fast", fast), ("full", full))
            }
            ok = pick["fast"] == pick["full"]
            same &= ok
            print(
                f"| {slot} | {pick['fast']} | {secs['fast']:.0f} | {pick['full']} | {secs['full']:.0f} | "
                f"{'yes' if ok else 'NO'} |"
            )
        print(
            "\n| candidate | KLD | top-1 | task acc | answers match | near-tie flips | fast search measured |"
        )
        print("|---|---|---|---|---|---|---|")
        quick = {c["label"]: c for c in fast["candidates"]}
        for c in sorted(full["candidates"], key=lambda c: (c["slot"], c["decode_bytes_per_token"])):
            d, q = c["drift"], quick[c["label"]]
            seen = f"{q['sequences_checked'] or 0} sequences, {q['conversations_checked']} conversations"

            def pct(x: float | None) -> str:
                return "—" if x is None else f"{x:.1%}"

            print(
                f"| {c['label']} | {d['kld_mean']:.4f} | {pct(d['top1'])} | {pct(d['task_accuracy'])} | "
                f"{pct(d['answers_match'])} | {c.get('near_ties') or 0} | {seen} |"
            )
    print("\nthe early stops kept every choice" if same else "\nA CHOICE DIFFERS")
    return 0 if same else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
