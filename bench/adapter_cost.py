"""What a LoRA adapter beside a quantized base costs at decode, against the merged model of the same quant.

    python bench/adapter_cost.py [--quants q8_0,q4_k_m] [--threads 1,2] [--rounds 5] [--out /tmp/edgeft-adapter]

Builds the built-in demo once with a profile shipping each quant as base + adapter (`adapter = true`), which
also exports each one's merged twin; then times both in llama.cpp (edgeft.bench: prefill of a 64-token
prompt, 64 decoded tokens, medians after a warm-up), alternating pair and merged in each round so a drift of
the machine's speed hits both alike, and prints decode and prefill tok/s, the decode cost and the sizes.
llama.cpp computes B (A x) beside every adapted weight on every token (ref: llama.cpp src/llama-graph.cpp
build_lora_mm), so the cost grows with the adapter's size relative to the base: the demo's base is tiny
(its rank-16 adapter is 14 % of the q8_0 base), a 1B model's is not. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from edgeft import bench
from edgeft.formats.gguf.adapter import pair_files

PROFILE = """name = "adapter-bench"
description = "the demo's quants as base + LoRA adapter, each beside its merged twin"
threads = 2
ram_mb = 8192
ram_budget_mb = 6144
context_length = 512
bandwidth_gb_s = 10.0
"""
SLOT = '[[artifacts]]\nformat = "gguf"\nquant = "{}"\nadapter = true\n'


def build(out: Path, quants: list[str]) -> Path:
    if out.exists() and not (out / "adapter-bench.toml").is_file():
        sys.exit(f"{out}: exists and is not this script's output folder; pass another --out")
    shutil.rmtree(out, ignore_errors=True)  # this script's own earlier output
    out.mkdir(parents=True)
    profile = out / "adapter-bench.toml"
    profile.write_text(PROFILE + "".join(SLOT.format(q) for q in quants))
    cmd = [sys.executable, "-m", "edgeft", "build", "--target", str(profile), "--out", str(out / "dist")]
    res = subprocess.run([*cmd, "--keep-work", "--json"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"the demo build failed:\n{res.stderr[-3000:]}")
    return Path(json.loads(res.stdout)["bundle"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", default="q8_0,q4_k_m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgeft-adapter"))
    a = ap.parse_args()
    quants, threads = a.quants.split(","), [int(t) for t in a.threads.split(",")]
    bundle = build(a.out, quants)
    manifest = json.loads((bundle / "manifest.json").read_text())
    artifacts = bundle.parent / ".work" / "build" / "artifacts"
    print(f"demo bundle: {bundle} ({manifest['reference']['task_accuracy']:.1%} float task accuracy)")
    print(
        "| quant | threads | merged decode tok/s | base+adapter decode tok/s | decode cost | merged prefill "
        "tok/s | base+adapter prefill tok/s | merged MB | base MB + adapter MB | base+adapter task acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for entry in manifest["artifacts"]:
        pair = pair_files(bundle / entry["path"])
        merged = artifacts / f"model-{entry['quant']}.gguf"
        for n in threads:
            runs: dict[str, list[bench.LatencyReport]] = {"pair": [], "merged": []}
            for _ in range(a.rounds):
                runs["pair"].append(bench.bench(bundle / entry["path"], threads=n))
                runs["merged"].append(bench.bench(merged, threads=n))
            dec = {k: statistics.median(r.decode_tok_s for r in v) for k, v in runs.items()}
            pre = {k: statistics.median(r.prefill_tok_s for r in v) for k, v in runs.items()}
            adapter_mb = sum(f.stat().st_size for f in pair.adapters.values()) / 1e6
            print(
                f"| {entry['quant']} | {n} | {dec['merged']:.0f} | {dec['pair']:.0f} | "
                f"{1 - dec['pair'] / dec['merged']:+.0%} | {pre['merged']:.0f} | {pre['pair']:.0f} | "
                f"{merged.stat().st_size / 1e6:.2f} | {pair.base.stat().st_size / 1e6:.2f} + {adapter_mb:.2f} | "
                f"{entry['drift']['task_accuracy']:.1%} |"
            )


if __name__ == "__main__":
    main()
