"""Shared fixtures: tiny random models built offline, once per session; a runtime-only virtual environment."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from tinymodels import make_model

# Property tests run under a named profile: HYPOTHESIS_PROFILE=quick while editing, ci (the default) in CI,
# thorough before a release or after touching a parser of strangers' files.
_FUZZ_BASE = {
    "deadline": 2000,  # ms: a parser that takes seconds on a small input is a finding in itself
    "database": None,  # nothing written into the checkout
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
}
settings.register_profile("ci", max_examples=200, **_FUZZ_BASE)
settings.register_profile("quick", max_examples=25, **_FUZZ_BASE)
settings.register_profile("thorough", max_examples=5000, **{**_FUZZ_BASE, "deadline": None})
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# What a device installs to run a bundle: the runtimes only (and what they depend on), never edgeft or torch.
RUNTIME_PACKAGES = ("llama-cpp-python==0.3.36", "onnxruntime-genai==0.18.0")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained on local text."""
    return make_model("llama", "bpe", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_exports(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    """The tiny Llama exported once per session as the test target's artifacts (GGUF q8_0, ONNX int8), with
    made-up drift and latency: what test_check, test_device and test_remote write their bundles from (a
    bundle copies its artifacts, so sharing them is safe)."""
    from bundles import TARGET, exported

    return exported(tiny_llama, tmp_path_factory.mktemp("tiny-exports"), TARGET.artifacts)


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh virtual environment holding only the artifact runtimes, from the package
    registry (pip's cache makes it quick), as a device has them; `import torch` and `import edgeft` fail."""
    venv = tmp_path_factory.mktemp("runtime-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *RUNTIME_PACKAGES]
    # llama-cpp-python is an sdist on the registry (~8 min to compile); the wheel pip built for this
    # project's own install sits in pip's cache: point the venv's older pip at it.
    cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    built = sorted(
        Path(cache.stdout.strip() or "/nonexistent").glob("wheels/**/llama_cpp_python-0.3.36-*.whl")
    )
    for wheel in built[-1:]:
        pip += ["--find-links", str(wheel.parent)]
    res = subprocess.run(pip, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    for absent in ("torch", "edgeft"):
        probe = subprocess.run([str(python), "-I", "-c", f"import {absent}"], capture_output=True, cwd=venv)
        assert probe.returncode != 0, f"{absent} is importable in the runtime-only venv"
    for present in ("llama_cpp", "onnxruntime_genai"):
        probe = subprocess.run([str(python), "-I", "-c", f"import {present}"], capture_output=True, text=True)
        assert probe.returncode == 0, probe.stderr[-2000:]
    return python


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's first command (`edgeft build --target raspberrypi` on the built-in demo) run once per
    session in a fresh folder; its bundle. Tests that change a bundle work on a copy. `--keep-work` leaves the
    fine-tuned float model in `.work/build/merged` beside the bundle, for the tests that compare with it
    (it changes nothing in the bundle)."""
    cwd = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, "-m", "edgeft", "build", "--target", "raspberrypi", "--json", "--keep-work"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(json.loads(res.stdout)["bundle"])


# A profile shipping the same q8_0 twice under the same gates: merged, and as base + LoRA adapter.
ADAPTER_PROFILE = """name = "pi-lora"
description = "a Raspberry Pi 5 shipping q8_0 merged and as base + adapter"
threads = 2
ram_mb = 8192
ram_budget_mb = 6144
context_length = 2048
bandwidth_gb_s = 10.0
"""
ADAPTER_GATES = """[artifacts.budget]
kld_mean = 0.05
top1 = 0.9
task_accuracy_drop = 0.05
answers_match = 0.95
"""


@pytest.fixture(scope="session")
def adapter_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo shipped as q8_0 merged and as base q8_0 + LoRA adapter, under the same gates, built into a copy
    of demo_bundle's output folder: the fine-tune, merge and float reference of the README's command are
    reused (same inputs, same keys), only the exports, judging and bench run."""
    out = tmp_path_factory.mktemp("adapter") / "out"
    shutil.copytree(demo_bundle.parent, out, symlinks=True)
    slot = '[[artifacts]]\nformat = "gguf"\nquant = "q8_0"\nadapter = {}\n' + ADAPTER_GATES
    profile = out.parent / "pi-lora.toml"
    profile.write_text(ADAPTER_PROFILE + slot.format("true") + slot.format("false"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "edgeft", "build", "--target", str(profile), "--out", str(out), "--json"]
    res = subprocess.run(
        [*cmd, "--keep-work"], cwd=out.parent, capture_output=True, text=True, env=env, timeout=1200
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reusing finetune, merge" in res.stderr  # nothing of the README's build was redone
    return Path(json.loads(res.stdout)["bundle"])


@pytest.fixture(scope="session")
def two_task_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's task and a second one (naming the room of 300 of the demo's commands) as two adapters over
    one base q8_0, in a copy of demo_bundle's output folder: the first task's fine-tune is reused, the
    second is fine-tuned here."""
    from edgeft.demo import DEMO_DATA

    out = tmp_path_factory.mktemp("two-task") / "out"
    shutil.copytree(demo_bundle.parent, out, symlinks=True)
    rooms = out.parent / "rooms.jsonl"
    with DEMO_DATA.open() as src, rooms.open("w") as dst:
        for line in list(src)[:300]:
            rec = json.loads(line)
            room = json.loads(rec["completion"]).get("room", "none")
            dst.write(json.dumps({"prompt": rec["prompt"], "completion": room}) + "\n")
    profile = out.parent / "pi-lora.toml"
    slot = '[[artifacts]]\nformat = "gguf"\nquant = "q8_0"\nadapter = true\n' + ADAPTER_GATES
    profile.write_text(ADAPTER_PROFILE + slot)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "edgeft", "build", "--target", str(profile), "--out", str(out), "--json"]
    cmd += ["--adapter", "--data", str(DEMO_DATA), "--data", str(rooms), "--keep-work"]
    res = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(json.loads(res.stdout)["bundle"])
