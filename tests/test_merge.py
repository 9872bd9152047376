"""edgeft.merge: merged logits equal the adapter model's (float32 and bf16 bases); broken merges fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tinymodels import cached_model, leftovers

from edgeft.errors import EdgeftError
from edgeft.merge import merge

PROBES = [[5, 17, 300, 42, 9, 77, 1000, 3], [12, 13, 14]]


def make_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter with random (non-zero) A and B, so merging really changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@torch.no_grad()
def adapter_logits(base: Path, adapter: Path) -> list[torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    return [model(input_ids=torch.tensor([p])).logits[0] for p in PROBES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_logits_match_adapter_model(tmp_path: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    base = cached_model("llama", "bpe", dtype=dtype)
    adapter = make_adapter(base, tmp_path / "adapter")
    res = merge(base, adapter, tmp_path / "merged")
    name = str(dtype).removeprefix("torch.")
    assert res.dtype == name and res.out_dir == tmp_path / "merged"
    assert 0 <= res.max_abs_diff <= res.tolerance
    out = res.out_dir
    assert leftovers(tmp_path, "merged") == []
    for f in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        assert not any("lora" in k for k in st.keys())  # noqa: SIM118
        assert st.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == dtype

    # independent check: the saved model, in float32, against the adapter model
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = adapter_logits(base, adapter)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        got = [merged(input_ids=torch.tensor([p])).logits[0] for p in PROBES]
        unadapted = [base_model(input_ids=torch.tensor([p])).logits[0] for p in PROBES]
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
    effect = max(float((a - b).abs().max()) for a, b in zip(ref, unadapted, strict=True))
    assert effect > 10 * diff  # the adapter changes logits far more than merging/casting does
    if dtype == torch.float32:
        assert diff < 1e-4 * max(1.0, max(float(x.abs().max()) for x in ref))


def test_nan_adapter_is_refused(tmp_path: Path) -> None:
    base = cached_model("llama", "bpe")
    adapter = make_adapter(base, tmp_path / "adapter")
    f = adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, f)
    with pytest.raises(EdgeftError, match="NaN"):
        merge(base, adapter, tmp_path / "merged", check_ids=PROBES)
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path, "merged") == []


def test_wrong_merge_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge that silently drops the adapter must fail the logits check, not pass with a warning."""
    from peft.tuners.lora import LoraModel

    base = cached_model("llama", "bpe")
    adapter = make_adapter(base, tmp_path / "adapter")
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(EdgeftError, match="logits"):
        merge(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_bad_inputs(tmp_path: Path) -> None:
    base = cached_model("llama", "bpe")
    with pytest.raises(EdgeftError, match="adapter directory not found"):
        merge(base, tmp_path / "none", tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeftError, match="adapter_config.json"):
        merge(base, tmp_path / "empty", tmp_path / "m")
    adapter = make_adapter(base, tmp_path / "adapter")
    with pytest.raises(EdgeftError, match="model directory not found"):
        merge(tmp_path / "no-model", adapter, tmp_path / "m")
    with pytest.raises(EdgeftError, match="check_ids"):
        merge(base, adapter, tmp_path / "m", check_ids=[[10**7]])
