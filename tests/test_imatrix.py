"""Importance matrix from the user's data (edgeft.formats.gguf.imatrix), the low-bit GGUF quants, and the quantizer's
imatrix / head-type / float-reuse paths, down to the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tinymodels import ARCHS, cached_model, load_tokenizer, quiet_transformers

from edgeft.errors import EdgeftError
from edgeft.formats import export_file, open_runtime, tensor_types
from edgeft.formats.gguf.constants import (
    GGUF_IMATRIX_QUANTS,
    GGUF_KEY_IMATRIX_CHUNKS,
    GGUF_KEY_IMATRIX_DATASET,
    GGUF_KEY_IMATRIX_ENTRIES,
    GGUF_LLAMA_QUANTS,
    GGUF_QUANTS,
)
from edgeft.formats.gguf.export import export_float_gguf, export_gguf
from edgeft.formats.gguf.footprint import GGUF_RATE
from edgeft.formats.gguf.imatrix import Imatrix, compute_imatrix, imatrix_from_jsonl
from edgeft.formats.gguf.quantize import quantize_gguf
from edgeft.spec import ArtifactSpec

ROOT = Path(__file__).resolve().parents[1]
NEW_QUANTS = ("q6_k", "q5_k_m", "q3_k_m", "q2_k", "iq4_nl", "iq4_xs")
CONVS = [
    [
        {"role": "system", "content": "You answer with the result only."},
        {"role": "user", "content": f"What is {i} plus {i + 3}? Think of the numbers {i * 7} and {i * 11}."},
        {"role": "assistant", "content": f"{2 * i + 3}"},
    ]
    for i in range(12)
]


def _quiet(_done: int, _total: int) -> None:
    return None


def _imatrix(model_dir: Path, **kw: object) -> Imatrix:
    return compute_imatrix(model_dir, CONVS, progress=_quiet, **kw)  # type: ignore[arg-type]


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("quantize.")}


# --- names and sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_names_and_sizes_are_the_gguf_tensors(arch: str, tmp_path: Path) -> None:
    """Every entry names a GGUF tensor of the converter's file and has its ne[0] values (llama.cpp throws
    otherwise), every block matrix has one, and llama.cpp's quantizer takes them."""
    model_dir = cached_model(arch, "bpe")
    im = _imatrix(model_dir)
    f16 = export_gguf(model_dir, tmp_path / "f16.gguf", "f16").path
    tensors = _tensors(f16)
    for name, values in im.values.items():
        assert name in tensors, name
        assert values.dtype == np.float32 and values.shape == (int(tensors[name].shape[0]),), name
        assert np.isfinite(values).all() and (values > 0).all(), name
    blocks = {n for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) == 2}
    assert set(im.values) == blocks  # tied head: token_embd.weight gets no entry
    assert im.examples == len(CONVS) and im.tokens > 10 * len(CONVS)
    out = quantize_gguf(f16, tmp_path / "q4_0.gguf", "q4_0", imatrix=im)
    assert _fields(out)[GGUF_KEY_IMATRIX_ENTRIES] == len(im.values)


def test_untied_head_gets_output_weight(tmp_path: Path) -> None:
    model_dir = cached_model("phi3", "bpe", tie_embeddings=False)
    im = _imatrix(model_dir)
    tensors = _tensors(export_gguf(model_dir, tmp_path / "f16.gguf", "f16").path)
    assert "output.weight" in im.values and "token_embd.weight" not in im.values
    assert im.values["output.weight"].size == int(tensors["output.weight"].shape[0])
    # Phi-3's fused projections keep HF's input columns: qkv and gate_up read the hidden state
    assert im.values["blk.0.attn_qkv.weight"].size == int(tensors["blk.0.attn_qkv.weight"].shape[0])
    assert im.values["blk.0.attn_qkv.weight"].size == im.values["blk.0.ffn_up.weight"].size == 64


def test_tied_head_option_weighs_token_embd_by_the_final_hidden_states(tmp_path: Path) -> None:
    """tied_head=True (bench/imatrix_study.py "+head"): token_embd.weight gets the mean square of lm_head's
    inputs, sized ne[0], and llama.cpp's quantizer uses it for that tensor (Q6_K: 256-wide rows)."""
    from transformers import AutoModelForCausalLM

    model_dir = cached_model("llama", "bpe", hidden=256, intermediate=512, seed=3)
    im = _imatrix(model_dir, tied_head=True)
    plain = _imatrix(model_dir)
    assert set(im.values) - set(plain.values) == {"token_embd.weight"}
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir)
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double())
    )
    with torch.no_grad():
        for conv in CONVS:
            model(
                torch.tensor(
                    [
                        tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)[
                            "input_ids"
                        ]
                    ]
                )
            )
    hook.remove()
    x = torch.cat(seen)
    np.testing.assert_allclose(im.values["token_embd.weight"], (x * x).mean(0).float().numpy(), rtol=1e-5)
    f16 = export_gguf(model_dir, tmp_path / "f16.gguf", "f16").path
    assert im.values["token_embd.weight"].size == int(_tensors(f16)["token_embd.weight"].shape[0])
    with_head = quantize_gguf(f16, tmp_path / "head.gguf", "q4_k_m", imatrix=im)
    without = quantize_gguf(f16, tmp_path / "plain.gguf", "q4_k_m", imatrix=plain)
    assert _fields(with_head)[GGUF_KEY_IMATRIX_ENTRIES] == len(plain.values) + 1
    emb = {p: _tensors(p)["token_embd.weight"] for p in (with_head, without)}
    assert {t.tensor_type.name for t in emb.values()} == {"Q6_K"}
    assert (
        emb[with_head].data.tobytes() != emb[without].data.tobytes()
    )  # the weights steered that tensor's rounding


# --- values ------------------------------------------------------------------------------------------------


def test_value_is_the_mean_square_input_by_hand() -> None:
    """blk.1.ffn_down.weight = mean over every calibration token of down_proj's input squared, per column,
    computed here with the tests' own tokenizer and a plain torch hook."""
    from transformers import AutoModelForCausalLM

    model_dir = cached_model("llama", "bpe")
    im = _imatrix(model_dir)
    quiet_transformers()
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).double())
    )
    n = 0
    with torch.no_grad():
        for conv in CONVS:
            text = tok.apply_chat_template(conv, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert "<|im_start|>" in text and tok.convert_tokens_to_ids("<|im_start|>") in ids
            n += len(ids)
            model(torch.tensor([ids]))
    hook.remove()
    x = torch.cat(seen)
    want = (x * x).mean(0).float().numpy()
    assert im.tokens == n == x.shape[0]
    np.testing.assert_allclose(im.values["blk.1.ffn_down.weight"], want, rtol=1e-5)
    assert not np.allclose(im.values["blk.1.ffn_down.weight"], im.values["blk.0.ffn_down.weight"])


def test_max_tokens_caps_and_digest_names_the_text() -> None:
    model_dir = cached_model("llama", "bpe")
    first = compute_imatrix(model_dir, CONVS[:1], progress=_quiet)
    full, capped = _imatrix(model_dir), _imatrix(model_dir, max_tokens=first.tokens + 5)
    assert capped.tokens == first.tokens + 5 and capped.examples == 2  # the second one cut to fit
    assert capped.dataset_sha256 != full.dataset_sha256 and len(full.dataset_sha256) == 64
    again = _imatrix(model_dir)
    assert again.dataset_sha256 == full.dataset_sha256
    assert again.record() == {"dataset_sha256": full.dataset_sha256, "examples": 12, "tokens": full.tokens}
    named = _imatrix(model_dir, dataset_sha256="ab" * 32)
    assert named.dataset_sha256 == "ab" * 32


def test_imatrix_from_jsonl_reads_chat_records(tmp_path: Path) -> None:
    model_dir = cached_model("llama", "bpe")
    data = tmp_path / "calib.jsonl"
    lines = [json.dumps({"messages": c}) for c in CONVS[:6]]
    lines += [json.dumps({"prompt": c[1]["content"], "completion": c[2]["content"]}) for c in CONVS[6:]]
    data.write_text("\n".join(lines) + "\n")
    im = imatrix_from_jsonl(model_dir, data, progress=_quiet)
    import hashlib

    assert im.dataset_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
    assert im.examples == 12 and im.summary() == f"imatrix from 12 examples, {im.tokens} tokens"
    same = compute_imatrix(model_dir, [c for c in CONVS[:6]], progress=_quiet)
    assert im.tokens > same.tokens
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EdgeftError, match="empty.jsonl: no examples"):
        imatrix_from_jsonl(model_dir, tmp_path / "empty.jsonl")
    with pytest.raises(EdgeftError, match="missing.jsonl: data file not found"):
        imatrix_from_jsonl(model_dir, tmp_path / "missing.jsonl")
    with pytest.raises(EdgeftError, match="no calibration conversations"):
        compute_imatrix(model_dir, [])
    with pytest.raises(EdgeftError, match="max_tokens = 0"):
        compute_imatrix(model_dir, CONVS, max_tokens=0)


# --- quantizing with it ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Imatrix]:
    """A llama with 256-wide rows (k-quants and iq4_xs really apply), its f16 GGUF and imatrix."""
    model_dir = cached_model("llama", "bpe", hidden=256, intermediate=512, seed=3)
    f16 = export_float_gguf(model_dir, tmp_path_factory.mktemp("wide")).path
    return model_dir, f16, _imatrix(model_dir)


@pytest.mark.parametrize(("quant", "qtype"), [("q4_k_m", "Q4_K"), ("iq4_nl", "IQ4_NL")])
def test_imatrix_changes_the_weights_and_is_recorded(
    wide: tuple[Path, Path, Imatrix], quant: str, qtype: str, tmp_path: Path
) -> None:
    _, f16, im = wide
    plain = quantize_gguf(f16, tmp_path / "plain.gguf", quant)
    weighted = quantize_gguf(f16, tmp_path / "imatrix.gguf", quant, imatrix=im)
    a, b = _tensors(plain), _tensors(weighted)
    assert a["blk.0.attn_q.weight"].tensor_type.name == b["blk.0.attn_q.weight"].tensor_type.name == qtype
    changed = [n for n in im.values if a[n].data.tobytes() != b[n].data.tobytes()]
    assert len(changed) == len(im.values)  # every weighted tensor is rounded differently
    assert a["token_embd.weight"].data.tobytes() == b["token_embd.weight"].data.tobytes()  # no entry
    assert _fields(plain) == {}
    assert _fields(weighted) == {
        GGUF_KEY_IMATRIX_DATASET: f"edgeft:sha256:{im.dataset_sha256[:16]}",
        GGUF_KEY_IMATRIX_ENTRIES: len(im.values),
        GGUF_KEY_IMATRIX_CHUNKS: im.examples,
    }


def test_imatrix_lowers_the_weighted_error(wide: tuple[Path, Path, Imatrix], tmp_path: Path) -> None:
    """What the weights are for: the rounding error weighted by the imatrix is lower with it than without."""
    model_dir, f16, im = wide
    name = "blk.1.ffn_down.weight"
    ref = gguf.GGUFReader(f16)
    w = next(t for t in ref.tensors if t.name == name).data.astype(np.float32)
    errs = {}
    for label, kw in (("plain", {}), ("imatrix", {"imatrix": im})):
        out = quantize_gguf(f16, tmp_path / f"{label}.gguf", "q4_0", **kw)  # type: ignore[arg-type]
        t = _tensors(out)[name]
        q = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        errs[label] = float((((q - w) ** 2) * im.values[name]).sum())
    print(f"imatrix-weighted q4_0 rounding error of {name}: {errs}")
    assert errs["imatrix"] < 0.97 * errs["plain"], errs


def test_head_type_keeps_output_and_embedding(tmp_path: Path) -> None:
    model_dir = cached_model("llama", "bpe", hidden=256, intermediate=512, seed=4, tie_embeddings=False)
    base = export_float_gguf(model_dir, tmp_path / "work")
    plain = export_gguf(model_dir, tmp_path / "plain.gguf", "q4_k_m", float_gguf=base).path
    kept = export_gguf(model_dir, tmp_path / "kept.gguf", "q4_k_m", float_gguf=base, head_type="q8_0").path
    types = {n: t.tensor_type.name for n, t in _tensors(kept).items()}
    assert types["output.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert tensor_types(kept).head_type == "q8_0" and tensor_types(plain).head_type == "q6_k"
    assert _tensors(plain)["token_embd.weight"].tensor_type.name == "Q4_K"


# --- the new quants ---------------------------------------------------------------------------------------


def test_new_quants_export_load_and_generate(tmp_path: Path) -> None:
    """Each new quant from one float conversion (64-wide rows: k-quants fall back per tensor, recorded by
    tensor_types), loaded and run in llama.cpp; with an imatrix where it applies."""
    model_dir = cached_model("llama", "bpe")
    im = _imatrix(model_dir)
    base = export_float_gguf(model_dir, tmp_path / "work")
    ids = load_tokenizer(model_dir).encode("The quick brown fox jumps over the lazy dog.")
    assert set(NEW_QUANTS) <= set(GGUF_LLAMA_QUANTS) and set(GGUF_RATE) == set(GGUF_QUANTS)
    for quant in NEW_QUANTS:
        res = export_gguf(model_dir, tmp_path / f"m-{quant}.gguf", quant, imatrix=im, float_gguf=base)
        assert res.quant == quant and res.imatrix == im.record() and res.n_tensors == base.n_tensors
        shares = tensor_types(res.path).shares
        assert "f16" not in shares and abs(sum(shares.values()) - 1) < 1e-9, (quant, shares)
        rt = open_runtime(res.path, threads=1)
        try:
            logits, out = rt.logits(ids), rt.generate(ids, 4)
        finally:
            rt.close()
        assert np.isfinite(logits).all() and len(out) == 4, quant
    # what fell back on 64-wide rows: iq4_xs to IQ4_NL, q6_k to Q8_0 (ref: llama-quant.cpp fallback)
    assert "iq4_nl" in tensor_types(tmp_path / "m-iq4_xs.gguf").shares
    assert set(tensor_types(tmp_path / "m-q6_k.gguf").shares) <= {"q8_0", "f32"}
    assert set(GGUF_IMATRIX_QUANTS) == set(GGUF_LLAMA_QUANTS) - {"q8_0"}


# --- refusals ---------------------------------------------------------------------------------------------


def test_one_line_refusals(tmp_path: Path) -> None:
    model_dir = cached_model("llama", "bpe")
    im = _imatrix(model_dir)
    out = tmp_path / "m.gguf"
    for quant in ("q8_0", "f16"):
        with pytest.raises(EdgeftError, match=f"does not change {quant} files"):
            export_gguf(model_dir, out, quant, imatrix=im)
    with pytest.raises(EdgeftError, match="head type 'q8_0' applies to quantized GGUF files, not f32"):
        export_gguf(model_dir, out, "f32", head_type="q8_0")
    with pytest.raises(EdgeftError, match="unknown head type 'q9_9'"):
        export_gguf(model_dir, out, "q4_0", head_type="q9_9")
    with pytest.raises(EdgeftError, match="imatrix and head_type apply to gguf quants only, not onnx int8"):
        export_file(
            model_dir, ArtifactSpec("onnx", "int8", imatrix=True, head_type="q8_0"), tmp_path / "onnx"
        )
    # checked against the model before anything is converted: the head's 64 columns are no Q6_K row
    with pytest.raises(EdgeftError, match="head type q6_k needs rows that are a multiple of 256; token_embd"):
        export_gguf(model_dir, out, "q4_0", head_type="q6_k")
    other = _imatrix(cached_model("llama", "bpe", hidden=256, intermediate=512, seed=3))
    with pytest.raises(EdgeftError, match="has 256 values for a tensor of 64 columns"):
        export_gguf(model_dir, out, "q4_0", imatrix=other)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    base = export_float_gguf(model_dir, tmp_path / "work")
    q4 = export_gguf(model_dir, out, "q4_0", float_gguf=base).path
    with pytest.raises(EdgeftError, match="is not a float GGUF"):
        export_gguf(model_dir, tmp_path / "again.gguf", "q4_0", float_gguf=q4)
    with pytest.raises(EdgeftError, match="does not exist"):
        export_gguf(model_dir, tmp_path / "again.gguf", "q4_0", float_gguf=tmp_path / "none.gguf")
    bad = dict(im.values, **{"blk.0.attn_q.weight": np.full(64, np.nan, np.float32)})
    nan = Imatrix(bad, im.examples, im.tokens, im.dataset_sha256)
    with pytest.raises(EdgeftError, match="non-finite"):
        quantize_gguf(base.path, tmp_path / "nan.gguf", "q4_0", imatrix=nan)
    assert not (tmp_path / "again.gguf").exists() and not (tmp_path / "nan.gguf").exists()


# --- the CLI ----------------------------------------------------------------------------------------------


def edgeft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "edgeft", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def one_error_line(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_export_with_calibration(tmp_path: Path) -> None:
    model_dir = cached_model("llama", "bpe")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    out = tmp_path / "m.gguf"
    res = edgeft(
        "export", "--model", str(model_dir), "--quant", "iq4_nl", "--calibration", str(data),
        "--head-type", "q8_0", "--threads", "1", "--out", str(out), "--json", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)
    assert got["imatrix"]["examples"] == 12 and got["head_type"] == "q8_0"
    assert f"imatrix from 12 examples, {got['imatrix']['tokens']} tokens" in res.stderr
    fields = _fields(out)
    assert fields[GGUF_KEY_IMATRIX_CHUNKS] == 12
    assert fields[GGUF_KEY_IMATRIX_DATASET] == f"edgeft:sha256:{got['imatrix']['dataset_sha256'][:16]}"
    assert _tensors(out)["token_embd.weight"].tensor_type.name == "Q8_0"


def test_cli_calibration_errors(tmp_path: Path) -> None:
    model_dir = str(cached_model("llama", "bpe"))
    data = tmp_path / "calib.jsonl"
    data.write_text(json.dumps({"messages": CONVS[0]}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = str(tmp_path / "m.gguf")
    common = ("export", "--model", model_dir, "--out", out)
    one_error_line(
        edgeft(*common, "--quant", "f16", "--calibration", str(data), cwd=tmp_path),
        "--calibration",
        "does not change f16 files",
    )
    one_error_line(
        edgeft(*common, "--quant", "q8_0", "--calibration", str(data), cwd=tmp_path), "q8_0 ignores it"
    )
    one_error_line(
        edgeft(*common, "--format", "onnx", "--quant", "int8", "--calibration", str(data), cwd=tmp_path),
        "--calibration applies to gguf quants only, not onnx int8",
    )
    one_error_line(
        edgeft(*common, "--quant", "q4_0", "--calibration", str(empty), cwd=tmp_path), str(empty), "empty"
    )
    one_error_line(
        edgeft(*common, "--quant", "q4_0", "--calibration", str(tmp_path / "nope.jsonl"), cwd=tmp_path),
        "nope.jsonl",
        "not found",
    )
    one_error_line(
        edgeft(*common, "--quant", "q4_0", "--head-type", "q6_k", cwd=tmp_path),
        "head type q6_k needs rows that are a multiple of 256",
    )
    assert not Path(out).exists()
