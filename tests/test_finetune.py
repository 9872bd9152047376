"""edgeft.finetune: a short LoRA run lowers the loss and leaves a loadable adapter, also under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tinymodels import cached_model, leftovers

from edgeft.config import LoraSettings
from edgeft.demo import DEMO_DATA
from edgeft.errors import EdgeftError
from edgeft.finetune import finetune

ROOT = Path(__file__).resolve().parents[1]
FAST = LoraSettings(r=8, alpha=16, lr=1e-2, batch_size=8, max_steps=12, eval_fraction=0.25, logging_steps=2)


@pytest.fixture
def task(tmp_path: Path) -> Path:
    """The first 64 demo examples: small enough for a few-second run."""
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()[:64]
    f = tmp_path / "task.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f


def test_finetune_lowers_loss_and_saves_loadable_adapter(tmp_path: Path, task: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = cached_model("llama", "bpe")
    out = tmp_path / "adapter"
    res = finetune(base, task, out, FAST)
    assert res.adapter_dir == out and res.train_examples == 48 and res.eval_examples == 16
    assert res.eval_loss < res.history[0] - 0.5, res  # below the first logged training loss
    assert res.final_loss < res.history[0], res.history
    assert res.seconds > 0
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "edgeft_finetune.json"):
        assert (out / f).is_file(), f
    assert leftovers(tmp_path, "adapter") == []
    cfg = json.loads((out / "adapter_config.json").read_text())
    llama_linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(cfg["target_modules"]) == llama_linears and cfg["r"] == 8
    record = json.loads((out / "edgeft_finetune.json").read_text())
    assert record["world_size"] == 1 and len(record["data_sha256"]) == 64

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    plain = AutoModelForCausalLM.from_pretrained(base)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits)

    # a second run replaces the adapter in place
    res2 = finetune(base, task, out, LoraSettings(**{**FAST.__dict__, "max_steps": 2}))
    assert res2.adapter_dir == out and (out / "adapter_model.safetensors").is_file()


def test_model_errors(tmp_path: Path, task: Path) -> None:
    with pytest.raises(EdgeftError, match="not found"):
        finetune(tmp_path / "missing-model", task, tmp_path / "a", FAST)
    with pytest.raises(EdgeftError, match="not found"):
        finetune("./missing-model", task, tmp_path / "a", FAST)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "llama"}')
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(EdgeftError, match="pickle"):
        finetune(pickled, task, tmp_path / "a", FAST)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "no-such-arch"}')
    (odd / "model.safetensors").write_bytes(b"")
    with pytest.raises(EdgeftError, match="unsupported"):
        finetune(odd, task, tmp_path / "a", FAST)
    with pytest.raises(EdgeftError, match="none of the LoRA target modules"):
        finetune(cached_model("llama", "bpe"), task, tmp_path / "a", LoraSettings(target_modules=("nope",)))
    with pytest.raises(EdgeftError, match="data file not found"):
        finetune(cached_model("llama", "bpe"), tmp_path / "none.jsonl", tmp_path / "a", FAST)
    with pytest.raises(EdgeftError, match="lr"):
        LoraSettings(lr=0)
    assert not (tmp_path / "a").exists() and leftovers(tmp_path, "a") == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_processes(tmp_path: Path, task: Path) -> None:
    base = cached_model("llama", "bpe")
    out = tmp_path / "adapter"
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            f"""
            import os
            from pathlib import Path
            from edgeft.config import LoraSettings
            from edgeft.finetune import finetune
            s = LoraSettings(r=8, alpha=16, lr=1e-2, batch_size=4, max_steps=4, eval_fraction=0.25)
            res = finetune({str(base)!r}, Path({str(task)!r}), Path({str(out)!r}), s)
            Path({str(tmp_path)!r}, "done-" + os.environ["RANK"]).write_text(str(res.train_examples))
            """
        )
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(driver),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(tmp_path / f"done-{r}").read_text() for r in (0, 1)] == ["48", "48"]  # both ranks finished
    record = json.loads((out / "edgeft_finetune.json").read_text())
    assert record["world_size"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("adapter")) == ["adapter"]
