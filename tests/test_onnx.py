"""HF → ONNX (onnxruntime-genai builder): logits and greedy output match PyTorch, quants drift in order,
bad inputs fail with one EdgeftError and leave nothing behind, external data cannot escape the model dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tinymodels import cached_model, kld, leftovers, load_tokenizer, onnx_with_external, quiet_transformers

from edgeft.errors import EdgeftError
from edgeft.formats.gguf.export import export_gguf
from edgeft.formats.onnx.constants import (
    ONNX_ARCHS,
    ONNX_DATA_FILE,
    ONNX_DEFAULT_ACCURACY_LEVEL,
    ONNX_MODEL_FILE,
    ONNX_QUANTS,
    ONNX_REQUIRED_FILES,
)
from edgeft.formats.onnx.export import OnnxExportResult, export_onnx
from edgeft.formats.onnx.folder import check_external_data
from edgeft.formats.onnx.runtime import OrtRuntime

TEXT = (
    "The quick brown fox jumps over the lazy dog. In Python, a function is defined with def; "
    "for example:\n\ndef square(x):\n\treturn x ** 2  # 1234567890\n\n"
    "Names are bound to objects, and the for statement iterates over the items of any sequence."
)
PROMPT = "The for statement is used to iterate over"
# hidden 128: every MatMul has K ≥ 128, several 32-blocks per row, so int8/int4 really quantize.
LLAMA = {"hidden": 128, "layers": 2}


def torch_model(model_dir: Path):  # noqa: ANN201 - transformers model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def torch_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full recompute each step: independent of any KV-cache code."""
    model, seq = torch_model(model_dir), list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def model_dir(arch: str) -> Path:
    return cached_model("llama", "bpe", **LLAMA) if arch == "llama" else cached_model("qwen2", "bpe")


_EXPORTS: dict[tuple, tuple[Path, OnnxExportResult]] = {}


def exported(arch: str, quant: str, tmp_root: Path, accuracy_level: int | None = None) -> Path:
    key = (arch, quant, accuracy_level)
    if key not in _EXPORTS:
        out = tmp_root / f"{arch}-{quant}-{accuracy_level}"
        _EXPORTS[key] = (out, export_onnx(model_dir(arch), out, quant, accuracy_level=accuracy_level))
    return _EXPORTS[key][0]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


def ids_of(arch: str, text: str = TEXT) -> list[int]:
    return load_tokenizer(model_dir(arch)).encode(text)


# --- float export parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_logits_match_torch(arch: str, root: Path) -> None:
    out = exported(arch, "fp32", root)
    res = _EXPORTS[(arch, "fp32", None)][1]
    assert res.path == out and res.quant == "fp32" and res.accuracy_level is None
    assert res.bytes == sum(p.stat().st_size for p in out.iterdir())
    assert all((out / f).is_file() for f in ONNX_REQUIRED_FILES)
    assert leftovers(out.parent, out.name) == []
    ids = ids_of(arch)
    with torch.no_grad():
        ref = torch_model(model_dir(arch))(torch.tensor([ids])).logits[0].numpy()
    rt = OrtRuntime(out, threads=1)
    got = rt.logits(ids)
    assert rt._og_model is None  # scoring never loads the genai engine
    assert got.shape == ref.shape == (len(ids), rt.n_vocab) and got.dtype == np.float32
    assert kld(ref, got) < 1e-9  # fp32 graph: summation order only (~1e-13 measured)
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    rt.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_genai_greedy_matches_torch(arch: str, root: Path) -> None:
    out = exported(arch, "fp32", root)
    ids = ids_of(arch, PROMPT)
    with OrtRuntime(out, threads=1) as rt:
        got = rt.generate(ids, 20)
        assert rt._session is None  # generation never loads the scoring session
    assert got == torch_greedy(model_dir(arch), ids, 20)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_genai_tokenizer_matches_hf(arch: str, root: Path) -> None:
    import onnxruntime_genai as og

    out = exported(arch, "fp32", root)
    tok = og.Tokenizer(og.Model(str(out)))
    assert [int(i) for i in tok.encode(TEXT)] == ids_of(arch)


def test_generate_stops_and_survives_genai_eos(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop_ids end generation (stop id included); genai's own EOS does not end it early, and the same
    generator carries on (no second generator, so the prompt is never evaluated twice)."""
    import onnxruntime_genai as og

    ids = ids_of("llama", PROMPT)
    ref = torch_greedy(model_dir("llama"), ids, 12)
    eos_dir = root / "llama-eos"
    shutil.copytree(exported("llama", "fp32", root), eos_dir)
    cfg = json.loads((eos_dir / "genai_config.json").read_text())
    cfg["model"]["eos_token_id"] = ref[3]  # genai stops after this id unless we carry on
    (eos_dir / "genai_config.json").write_text(json.dumps(cfg))
    real = og.Generator

    class Spy:
        """An og.Generator that counts rewinds (how the runtime feeds genai's EOS back)."""

        def __init__(self, *a: object) -> None:
            self.gen, self.rewinds = real(*a), 0
            made.append(self)

        def rewind_to(self, n: int) -> None:
            self.rewinds += 1
            self.gen.rewind_to(n)

        def __getattr__(self, name: str) -> object:
            return getattr(self.gen, name)

    made: list[Spy] = []
    monkeypatch.setattr(og, "Generator", Spy)
    with OrtRuntime(eos_dir, threads=1) as rt:
        assert rt.generate(ids, 12) == ref
        # genai did stop at its EOS, and the same generator carried on
        assert len(made) == 1 and made[0].rewinds == ref[:-1].count(ref[3])
        assert rt.generate(ids, 12, stop_ids=[ref[5]]) == ref[: ref.index(ref[5]) + 1]
        with pytest.raises(EdgeftError, match="context"):
            rt.generate(ids, 600)


# --- quants ----------------------------------------------------------------------------------------------


def test_quant_drift_ordered(root: Path) -> None:
    ids = ids_of("llama")
    with torch.no_grad():
        ref = torch_model(model_dir("llama"))(torch.tensor([ids])).logits[0].numpy()
    drift = {}
    for quant, level in (("fp32", None), ("int8", None), ("int8", 0), ("int8", 1), ("int4", None)):
        out = exported("llama", quant, root, level)
        res = _EXPORTS[("llama", quant, level)][1]
        if quant != "fp32":
            # None/0 = builder default, 4 on CPU (int8 activations); an explicit level lands in the graph
            assert res.accuracy_level == (level or ONNX_DEFAULT_ACCURACY_LEVEL)
        with OrtRuntime(out, threads=1) as rt:
            logits = rt.logits(ids)
            assert len(rt.generate(ids[:8], 4)) == 4
        assert np.isfinite(logits).all()
        drift[(quant, level)] = kld(ref, logits)
    assert drift[("fp32", None)] < drift[("int8", None)] < drift[("int4", None)]
    assert drift[("int8", 0)] == drift[("int8", None)]  # same graph
    assert drift[("int8", 1)] < drift[("int4", None)]
    sizes = {q: _EXPORTS[("llama", q, None)][1].bytes for q in ("fp32", "int8", "int4")}
    assert sizes["fp32"] > sizes["int8"] > sizes["int4"]


# SmolLM2-135M's proportions, tiny: vocab far larger than hidden (49152 vs 576 there), a tied head, so the
# embedding matrix is a large share of the weights and a second, float32 copy of it would show.
SMOL_VOCAB = 8192


def smol_model() -> Path:
    """The tiny llama with its vocabulary padded to SMOL_VOCAB rows (tied, hidden 128, 2 layers)."""
    pad = SMOL_VOCAB - len(load_tokenizer(model_dir("llama")))
    return cached_model("llama", "bpe", **LLAMA, vocab_pad=pad)


def lm_head(graph: onnx.GraphProto) -> onnx.NodeProto:
    """The builder's output head: the MatMulNBits named /lm_head/..."""
    return next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))


def test_tied_int8_gathers_from_the_int8_head(root: Path) -> None:
    """A tied int8 model keeps one int8 matrix for the head and the embedding: its weight files are no bigger
    than 1.1x the q8_0 GGUF (with the builder's float32 table they were 3.6x), and drift stays int8-small."""
    model = smol_model()
    folder = export_onnx(model, root / "smol-int8", "int8").path
    gguf = export_gguf(model, root / "smol-q8_0.gguf", "q8_0").path
    weight_bytes = sum((folder / f).stat().st_size for f in (ONNX_MODEL_FILE, ONNX_DATA_FILE))
    assert weight_bytes <= 1.1 * gguf.stat().st_size, (weight_bytes, gguf.stat().st_size)
    graph = onnx.load(str(folder / ONNX_MODEL_FILE), load_external_data=False).graph
    inits, head = {t.name for t in graph.initializer}, lm_head(graph)
    assert not [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]  # no float table
    # the lookup reads the head's own blocks and scales (the scales reshaped to [vocab, blocks, 1])
    (lookup,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    producer = {out: n for n in graph.node for out in n.output}
    assert lookup.input[0] == head.input[1] and producer[lookup.input[2]].input[0] == head.input[2]
    assert {a.name: a.i for a in lookup.attribute}["bits"] == 8
    ids = load_tokenizer(model).encode(TEXT)
    with torch.no_grad():
        ref = torch_model(model)(torch.tensor([ids])).logits[0].numpy()
    with OrtRuntime(folder, threads=1) as rt:
        got = rt.logits(ids)
        assert len(rt.generate(ids[:8], 4)) == 4
    drift, top1 = kld(ref, got), float((ref.argmax(-1) == got.argmax(-1)).mean())
    # measured: KLD 3.5e-4, top-1 0.91 (with the builder's float32 table: 3.2e-4, 0.97)
    assert drift < 1e-3 and top1 >= 0.85, (drift, top1)


def test_tied_int8_rows_padded_to_whole_blocks(root: Path) -> None:
    """hidden 80 is not a multiple of the 32-weight blocks: the gathered rows are padded to 96 and sliced back
    to 80, and the model still matches PyTorch."""
    model = cached_model("llama", "bpe", hidden=80, heads=5, kv_heads=1, intermediate=160)
    folder = export_onnx(model, root / "h80-int8", "int8").path
    graph = onnx.load(str(folder / ONNX_MODEL_FILE), load_external_data=False).graph
    assert {a.name: a.i for a in lm_head(graph).attribute}["K"] == 80
    assert [n.op_type for n in graph.node if n.name.startswith("/model/embed_tokens/")].count("Slice") == 1
    ids = load_tokenizer(model).encode(TEXT)
    with torch.no_grad():
        ref = torch_model(model)(torch.tensor([ids])).logits[0].numpy()
    with OrtRuntime(folder, threads=1) as rt:
        assert kld(ref, rt.logits(ids)) < 1e-3  # measured 3.7e-4


def test_embedding_dropped_only_when_it_is_the_head(root: Path) -> None:
    """The check that lets the float table go: the model's embedding is within one quantization step of the
    int8 head's blocks; the same matrix with one element three steps off is not."""
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    from edgeft.formats.onnx.export import _same_table

    model = smol_model()
    folder = root / "smol-int8"
    if not folder.is_dir():
        export_onnx(model, folder, "int8")
    graph = onnx.load(str(folder / ONNX_MODEL_FILE)).graph  # with its external data: real arrays
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    head = lm_head(graph)
    qweight, scales = arrays[head.input[1]], arrays[head.input[2]]
    table = load_file(str(model / "model.safetensors"))["model.embed_tokens.weight"]
    k = table.shape[1]
    assert _same_table(table, qweight, scales, k)
    row = int(np.argmax(np.abs(scales[:, 0])))
    off = table.copy()
    off[row, 3] += 3 * abs(scales[row, 0])
    assert not _same_table(off, qweight, scales, k)
    assert not _same_table(table[::-1], qweight, scales, k)  # another matrix of the same shape


# --- failures --------------------------------------------------------------------------------------------


def test_export_is_quiet(root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Nothing on stdout (a --json CLI prints there), nothing noisy on stderr."""
    export_onnx(model_dir("qwen2"), root / "quiet", "int4")
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "quantize" not in captured.err and "Saving" not in captured.err


def test_unknown_quant_and_bad_accuracy_level(root: Path) -> None:
    out = root / "bad-quant"
    with pytest.raises(EdgeftError) as e:
        export_onnx(model_dir("llama"), out, "q4_k_m")
    assert "q4_k_m" in str(e.value) and all(q in str(e.value) for q in ONNX_QUANTS)
    with pytest.raises(EdgeftError, match="accuracy_level"):
        export_onnx(model_dir("llama"), out, "fp32", accuracy_level=4)
    with pytest.raises(EdgeftError, match="accuracy_level 7"):
        export_onnx(model_dir("llama"), out, "int8", accuracy_level=7)
    assert not out.exists()


def test_unsupported_architecture(root: Path) -> None:
    bad = root / "gpt2-ish"
    shutil.copytree(model_dir("llama"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeftError) as e:
        export_onnx(bad, root / "gpt2-out", "fp32")
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and all(a in msg for a in ONNX_ARCHS) and "\n" not in msg
    assert not (root / "gpt2-out").exists()


def test_builder_failure_leaves_nothing(root: Path) -> None:
    broken = root / "broken-weights"
    shutil.copytree(model_dir("llama"), broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    parent = root / "fail"
    parent.mkdir()
    with pytest.raises(EdgeftError) as e:
        export_onnx(broken, parent / "out", "int8")
    msg = str(e.value)
    assert msg.startswith(f"onnx builder failed for {broken}: ") and "\n" not in msg
    assert list(parent.iterdir()) == []  # no out, no out.partial, no temp work dir


def test_refuses_to_replace_a_foreign_dir(root: Path) -> None:
    foreign = root / "not-onnx"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(EdgeftError, match="edgeft did not write"):
        export_onnx(model_dir("qwen2"), foreign, "fp32")
    assert (foreign / "keep.txt").read_text() == "mine"
    # an ONNX folder somebody else made is not edgeft's to replace either
    (foreign / "keep.txt").unlink()
    (foreign / "genai_config.json").write_text("{}")
    with pytest.raises(EdgeftError, match="edgeft did not write"):
        export_onnx(model_dir("qwen2"), foreign, "fp32")
    assert (foreign / "genai_config.json").read_text() == "{}"


# --- external data path traversal ------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["../evil.bin", "sub/../../evil.bin", "/etc/passwd"])
def test_external_data_escape_refused(tmp_path: Path, location: str) -> None:
    model_dir_ = tmp_path / "m"
    model_dir_.mkdir()
    (tmp_path / "evil.bin").write_bytes(b"\0" * 16)
    model = onnx_with_external(model_dir_ / "model.onnx", location)
    with pytest.raises(EdgeftError, match="outside"):
        check_external_data(model, model_dir_)


def test_external_data_inside_ok_and_runtime_checks(tmp_path: Path, root: Path) -> None:
    inside = tmp_path / "ok"
    inside.mkdir()
    (inside / "w.bin").write_bytes(b"\0" * 16)
    model = onnx_with_external(inside / "model.onnx", "w.bin")
    assert check_external_data(model, inside) == [(inside / "w.bin").resolve()]
    # A model dir whose decoder escapes is refused when opened, before any engine reads it.
    evil = tmp_path / "evil-model"
    shutil.copytree(exported("qwen2", "fp32", root), evil)
    onnx_with_external(evil / "model.onnx", "../evil.bin")
    with pytest.raises(EdgeftError, match="outside"):
        OrtRuntime(evil)
