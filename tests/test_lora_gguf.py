"""A peft LoRA adapter as llama.cpp's LoRA GGUF on top of a base GGUF: its tensors are the adapter's (with the
converter's row layout changes), base + adapter in llama.cpp answers as the merged float model does, and an
adapter of another model is refused in one line before llama.cpp loads anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import cached_model, log_softmax, quiet_transformers

from edgeft.errors import EdgeftError
from edgeft.formats.gguf.adapter import check_pair, export_lora_gguf
from edgeft.formats.gguf.arch import permute
from edgeft.formats.gguf.export import export_gguf
from edgeft.formats.gguf.header import check_gguf
from edgeft.formats.gguf.runtime import LlamaCppRuntime
from edgeft.formats.torch.runtime import TorchRuntime

IDS = [1, 17, 42, 99, 7, 3, 250, 64, 12, 5]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base model, peft adapter with non-zero B on every projection, the merged float model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    base = cached_model("llama", "bpe")
    tmp = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # peft starts B at zero: make the adapter change the model
    peft_model.save_pretrained(tmp / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp / "merged")
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (tmp / "merged" / f.name).write_bytes(f.read_bytes())
    return base, tmp / "adapter", tmp / "merged"


def test_adapter_tensors_are_the_peft_adapters(adapted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    base, adapter, _ = adapted
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    import gguf

    for f16 in (False, True):
        res = export_lora_gguf(base, adapter, tmp_path / f"lora-{f16}.gguf", f16=f16)
        assert (res.n_pairs, res.rank, res.alpha) == (10, 4, 8.0)  # 5 projections x 2 layers
        reader = gguf.GGUFReader(str(res.path))
        assert reader.get_field("general.type").contents() == "adapter"
        assert reader.get_field("adapter.lora.alpha").contents() == 8.0
        got = {t.name: np.array(t.data) for t in reader.tensors}
        assert len(got) == 20
        key = "base_model.model.model.layers.1.self_attn.{}.lora_{}.weight"
        tol = 1e-3 if f16 else 0
        v_a, v_b = got["blk.1.attn_v.weight.lora_a"], got["blk.1.attn_v.weight.lora_b"]
        assert v_a.shape == peft[key.format("v_proj", "A")].shape == (4, 64)
        assert np.allclose(v_a, peft[key.format("v_proj", "A")], atol=tol, rtol=tol)
        assert np.allclose(v_b, peft[key.format("v_proj", "B")], atol=tol, rtol=tol)
        # Q's rows are permuted for llama.cpp's rope layout: B's rows follow, A stays
        q_b = peft[key.format("q_proj", "B")]
        assert np.allclose(got["blk.1.attn_q.weight.lora_b"], permute(q_b, 4, 4), atol=tol, rtol=tol)
        assert not np.allclose(got["blk.1.attn_q.weight.lora_b"], q_b, atol=tol, rtol=tol)
        assert np.allclose(
            got["blk.1.attn_q.weight.lora_a"], peft[key.format("q_proj", "A")], atol=tol, rtol=tol
        )
        assert check_gguf(res.path).value("general.architecture") == "llama"


def test_base_plus_adapter_in_llama_cpp_is_the_merged_model(
    adapted: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, adapter, merged = adapted
    base_gguf = export_gguf(base, tmp_path / "base-f32.gguf", "f32").path
    lora = export_lora_gguf(base, adapter, tmp_path / "lora.gguf").path
    ref = TorchRuntime(merged, threads=1)
    want = log_softmax(ref.logits(IDS))
    with_adapter = LlamaCppRuntime(base_gguf, threads=1, adapter=lora)
    without = LlamaCppRuntime(base_gguf, threads=1)
    try:
        got, plain = log_softmax(with_adapter.logits(IDS)), log_softmax(without.logits(IDS))
        kld = float((np.exp(want) * (want - got)).sum(-1).mean())
        kld_without = float((np.exp(want) * (want - plain)).sum(-1).mean())
        assert kld < 1e-3 < kld_without, (kld, kld_without)  # the adapter is what makes it the fine-tune
        assert with_adapter.generate(IDS, 8) == ref.generate(IDS, 8)
    finally:
        with_adapter.close()
        without.close()
        ref.close()


def test_an_adapter_of_another_model_is_refused_before_loading(
    adapted: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, adapter, _ = adapted
    lora = export_lora_gguf(base, adapter, tmp_path / "lora.gguf").path
    other = export_gguf(cached_model("llama", "bpe", hidden=128), tmp_path / "other.gguf", "f32").path
    for call in (lambda: check_pair(other, lora), lambda: LlamaCppRuntime(other, threads=1, adapter=lora)):
        with pytest.raises(EdgeftError, match="trained on another model") as e:
            call()
        assert "\n" not in str(e.value) and str(lora) in str(e.value)
    with pytest.raises(EdgeftError, match="not a LoRA adapter GGUF"):
        check_pair(other, other)


def _adapter_gguf(path: Path, *, alpha: object = 8.0, dtype: object = np.float32, dims: int = 2) -> Path:
    """A hand-made adapter GGUF for the tiny llama (its attn_v: 64 in, 32 out)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    if isinstance(alpha, str):
        w.add_string("adapter.lora.alpha", alpha)
    elif isinstance(alpha, np.float32):
        w.add_float32("adapter.lora.alpha", float(alpha))
    else:
        w.add_key_value("adapter.lora.alpha", alpha, gguf.GGUFValueType.FLOAT64)
    a, b = np.zeros((4, 64), dtype), np.zeros((32, 4), dtype)
    if dims == 3:
        a = a.reshape(2, 2, 64)
    w.add_tensor("blk.0.attn_v.weight.lora_a", a)
    w.add_tensor("blk.0.attn_v.weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_adapters_llama_cpp_would_abort_on_are_refused_in_one_line(
    adapted: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """llama.cpp asserts alpha is a float32 and crashes on integer or 3-D LoRA tensors: edgeft's header check
    refuses each first; a stranger's adapter folder with NaN weights or no weights file is one line too."""
    import shutil

    base, adapter, _ = adapted
    base_gguf = export_gguf(base, tmp_path / "base.gguf", "f32").path
    cases = {
        "float64 alpha": (_adapter_gguf(tmp_path / "f64.gguf"), "float32"),
        "string alpha": (_adapter_gguf(tmp_path / "str.gguf", alpha="8"), "float32"),
        "int32 tensors": (
            _adapter_gguf(tmp_path / "int.gguf", alpha=np.float32(8), dtype=np.int32),
            "2-D float",
        ),
        "3-D tensor": (_adapter_gguf(tmp_path / "3d.gguf", alpha=np.float32(8), dims=3), "2-D float"),
    }
    for case, (bad, needle) in cases.items():
        with pytest.raises(EdgeftError, match=needle) as e:
            LlamaCppRuntime(base_gguf, threads=1, adapter=bad)
        assert "\n" not in str(e.value), case
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(EdgeftError, match="not a readable safetensors file"):
        export_lora_gguf(base, broken, tmp_path / "x.gguf")
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(EdgeftError, match="adapter_model.safetensors"):
        export_lora_gguf(base, broken, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()

    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = np.full_like(tensors[first], np.nan)
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(EdgeftError, match="NaN or infinite"):
        export_lora_gguf(base, broken, tmp_path / "x.gguf")
