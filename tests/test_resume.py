"""Resume instead of redo: finished stages are reused, a build killed mid-fine-tune resumes from its last
checkpoint and gives the same artifacts as an uninterrupted one, a killed export leaves nothing under a final
name and is redone alone."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinymodels import cached_model

from edgeft import config, pipeline
from edgeft.config import LoraSettings

TARGET = """name = "tiny-device"
description = "test device"
threads = 2
ram_mb = 1024
ram_budget_mb = 512
context_length = 256
bandwidth_gb_s = 4.0
[[artifacts]]
format = "gguf"
quant = "q8_0"
[[artifacts]]
format = "gguf"
quant = "q4_0"
"""
SETTINGS = {"r": 4, "alpha": 8, "lr": 1e-2, "batch_size": 4, "max_steps": 30, "eval_fraction": 0.2}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    (root / "tiny.toml").write_text(TARGET)
    with (root / "tasks.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"lights {i}", "completion": f"on {i % 5}"}) + "\n")
    return root


def _cfg(inputs: Path, out: Path, keep_work: bool = True) -> config.BuildConfig:
    return config.BuildConfig(
        targets=(str(inputs / "tiny.toml"),),
        model=str(cached_model("llama", "bpe")),
        data=inputs / "tasks.jsonl",
        out=out,
        lora=LoraSettings(**SETTINGS),
        fail_on_drift=False,
        threads=2,
        keep_work=keep_work,
    )


def _artifacts(bundle: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(bundle.glob("*.gguf"))}


@pytest.fixture(scope="module")
def uninterrupted(inputs: Path) -> tuple[Path, dict[str, str]]:
    res = pipeline.build(_cfg(inputs, inputs / "dist-a")).results[0]
    return inputs / "dist-a", _artifacts(res.bundle_dir)


def test_rerun_reuses_finished_stages_and_cleans_up(
    inputs: Path, uninterrupted: tuple[Path, dict[str, str]]
) -> None:
    out, first = uninterrupted
    work = out / ".work" / "build"
    # an export killed mid-way: its record is written only after the file is complete
    (work / "artifacts" / ".model-q4_0-imatrix.gguf.key").unlink()  # q4_0 with the imatrix (the default)
    res = pipeline.build(_cfg(inputs, out, keep_work=False)).results[0]
    # only the interrupted artifact is redone; the float reference is read back, not recomputed
    assert res.reused == ("finetune", "merge", "gguf-q8_0", "reference")
    assert _artifacts(res.bundle_dir) == first
    assert not (out / ".work").exists()  # cleaned after success without --keep-work


def test_killed_finetune_resumes_to_the_same_artifacts(
    inputs: Path, uninterrupted: tuple[Path, dict[str, str]]
) -> None:
    out = inputs / "dist-killed"
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from pathlib import Path\n"
        "from test_resume import _cfg\n"
        "from edgeft import pipeline\n"
        f"pipeline.build(_cfg(Path({str(inputs)!r}), Path({str(out)!r})))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    work = out / ".work" / "build"
    deadline = time.time() + 300
    while (
        not list(work.glob("checkpoints-*/checkpoint-*")) and time.time() < deadline and proc.poll() is None
    ):
        time.sleep(0.1)
    assert proc.poll() is None, "the build ended before a checkpoint was written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "adapter").exists()  # killed mid-training: no adapter under its final name
    res = pipeline.build(_cfg(inputs, out)).results[0]
    assert _artifacts(res.bundle_dir) == uninterrupted[1]


@pytest.mark.parametrize("stage", ["f16", "quantizing"])
def test_killed_export_leaves_nothing_under_the_final_name(tmp_path: Path, stage: str) -> None:
    """SIGKILL while the float GGUF is written, or while llama.cpp quantizes it: no file at the final name, and
    the next run sweeps the killed run's temp files (and nothing else)."""
    model = cached_model("llama", "bpe", hidden=256, intermediate=768, layers=4, seed=7)
    out = tmp_path / "m.gguf"
    mine = tmp_path / ".m.gguf.quantizing-notes.txt"  # a user's file with an edgeft-like name: kept
    mine.write_text("keep")
    script = f"from edgeft.formats.gguf.export import export_gguf\nexport_gguf({str(model)!r}, {str(out)!r}, 'q4_k_m')\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while (
        not list(tmp_path.glob(f".m.gguf.{stage}-????????"))
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.005)
    assert proc.poll() is None, f"the export ended before its {stage} temp file appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(f".m.gguf.{stage}-????????"))  # what the killed run left
    from edgeft.formats.gguf.export import export_gguf

    export_gguf(model, out, "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "m.gguf"]  # temp files swept, not mine
    assert mine.read_text() == "keep"
