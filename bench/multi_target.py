"""Wall time of one build for three targets against one build for one target (goal: <= 1.3x).

    python bench/multi_target.py [--targets raspberrypi,android-arm64,windows-x64] [--out /tmp/edgeft-multi]

Both builds run the built-in demo from scratch (fresh output folders, nothing reused), one after the other,
as the CLI runs them; the three-target build shares the fine-tune, merge, float reference, each distinct
candidate's export and full drift measurement, and each latency measurement at the same thread count.
Run it on an otherwise idle machine: time with another heavy job on the cores is not a measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def timed_build(targets: list[str], out: Path) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "edgeft", "build", "--out", str(out), "--json"]
    for t in targets:
        cmd += ["--target", t]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"build of {targets} failed:\n{res.stderr[-3000:]}")
    return seconds, json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="raspberrypi,android-arm64,windows-x64")
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgeft-multi"))
    a = ap.parse_args()
    names = a.targets.split(",")
    one, _ = timed_build(names[:1], a.out / "one")
    many, out = timed_build(names, a.out / "many")
    print(f"one target ({names[0]}): {one:.1f} s")
    print(f"{len(names)} targets ({', '.join(names)}): {many:.1f} s")
    print(f"ratio: {many / one:.2f}x (goal <= 1.3x); index: {out.get('index')}")


if __name__ == "__main__":
    main()
