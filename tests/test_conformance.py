"""Conformance: every architecture and every tokenizer kind (a pairwise grid, PAIRS), exported at full
precision, behaves like PyTorch in both runtimes — on shared ids (mean KLD < 1e-6, top-1 agreement wherever PyTorch's choice is not a
near-tie) and on the path an app takes (`prompt_ids_match` = `answers_match` = 1.0: the artifact's own chat
template, tokenizer and end ids give the float model's prompts and greedy answers).

Where a runtime cannot reproduce a tokenizer, the exporter and verify must say so instead: onnxruntime-genai
ignores the Digits(individual) pre-tokenizer SmolLM2 ships (see edgeft/formats/onnx/tokenizer.py) and puts "▁" after
special tokens where a Metaspace prepend_scheme="first" file does not, so those pairs are expected to be
flagged with their first differing token, not to pass silently.

Then the real-checkpoint tokenizer traits through edgeft's own finetune + merge: the merged model carries
the base's tokenizer files byte for byte, and the exported artifacts still match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tinymodels import ARCHS, cached_model

from edgeft import verify
from edgeft.config import LoraSettings
from edgeft.finetune import finetune
from edgeft.formats import open_runtime
from edgeft.formats.gguf.export import export_gguf
from edgeft.formats.onnx.export import export_onnx
from edgeft.loading import load_tokenizer
from edgeft.merge import merge

# Byte-level BPE (GPT-2 split, Llama-3 split, SmolLM2's digits, a Qwen2 checkpoint whose file differs from
# Qwen2Tokenizer's rebuild) and SentencePiece (a Llama whose config names LlamaTokenizer; a file saved with
# Metaspace prepend_scheme "first").
KINDS = ("bpe", "bpe-llama3", "smollm2", "qwen2-file", "spm-llama", "spm-first")
# (runtime, tokenizer kind) pairs the runtime cannot reproduce; the mismatch must be reported.
UNREPRODUCIBLE = {("onnx", "smollm2"), ("onnx", "spm-first")}
KLD_MAX = 1e-6
# llama.cpp keeps its KV cache in f16 (what apps run), so its logits sit ~1e-4 from PyTorch's: a pick within
# this much of PyTorch's best logit is the same choice up to that noise.
TIE_MARGIN = 1e-3


def _extra(arch: str) -> dict:
    return {"layers": 6} if arch == "gemma3" else {}  # Gemma 3's local/global period (5 + 1)


def _judge(model_dir: Path, artifact: Path, es: verify.EvalSet) -> verify.DriftReport:
    ref_rt = open_runtime(model_dir)
    rt = open_runtime(artifact, n_ctx=es.n_ctx)
    try:
        return verify.compare(verify.run_reference(ref_rt, es), rt, es)
    finally:
        rt.close()
        ref_rt.close()


def _top1_outside_ties(model_dir: Path, artifact: Path, ids: list[int]) -> float:
    """Top-1 agreement, counting a pick whose PyTorch logit is within TIE_MARGIN of the best as agreeing."""
    ref_rt, rt = open_runtime(model_dir), open_runtime(artifact, n_ctx=len(ids) + 8)
    try:
        ref, got = ref_rt.logits(ids), rt.logits(ids)
    finally:
        rt.close()
        ref_rt.close()
    picked = ref[np.arange(len(ids)), got.argmax(-1)]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    assert ((top2[:, 1] - top2[:, 0]) > TIE_MARGIN).mean() > 0.9  # ties are rare: the check has teeth
    return float((picked >= ref.max(-1) - TIE_MARGIN).mean())


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conformance")


# A pairwise grid, not the 7 x 6 cross product: every architecture with one tokenizer, one architecture
# with every tokenizer, and the pairs that interact — transformers rebuilds a qwen2/qwen3 checkpoint's
# tokenizer as Qwen2Tokenizer whatever its file says; Mistral, Gemma and Phi-3 ship SentencePiece ones.
# Each pair runs in both runtimes: 18 pairs, 36 exports instead of 84.
INTERACTING = {
    ("qwen2", "qwen2-file"),
    ("qwen3", "qwen2-file"),
    ("mistral", "spm-llama"),
    ("gemma2", "spm-llama"),
    ("gemma3", "spm-first"),
    ("phi3", "spm-llama"),
}
PAIRS = sorted({(a, "bpe") for a in ARCHS} | {("llama", k) for k in KINDS} | INTERACTING)


def test_the_grid_covers_every_architecture_and_tokenizer() -> None:
    assert {a for a, _ in PAIRS} == set(ARCHS) and {k for _, k in PAIRS} == set(KINDS)
    assert len(PAIRS) == 18


@pytest.mark.parametrize("runtime", ["gguf", "onnx"])
@pytest.mark.parametrize(("arch", "kind"), PAIRS)
def test_full_precision_export_behaves_like_pytorch(arch: str, kind: str, runtime: str, out: Path) -> None:
    model_dir = cached_model(arch, kind, **_extra(arch))
    tok = load_tokenizer(model_dir, notify=False)
    es = verify.make_eval_set(tok, None)  # probe conversations + offline text
    if runtime == "gguf":
        res = export_gguf(model_dir, out / f"{arch}-{kind}.gguf", "f32")
    else:
        res = export_onnx(model_dir, out / f"{arch}-{kind}-onnx", "fp32")
    rep = _judge(model_dir, res.path, es)
    assert rep.kld_mean < KLD_MAX, rep
    assert _top1_outside_ties(model_dir, res.path, es.sequences[0]) == 1.0
    if (runtime, kind) in UNREPRODUCIBLE:
        assert res.tokenizer_mismatches, "the exporter must name what it cannot reproduce"
        assert (
            rep.prompt_ids_match < 1.0 and rep.prompt_diff and "first difference at token" in rep.prompt_diff
        )
        return
    assert not res.tokenizer_mismatches or all("probe text" in m for m in res.tokenizer_mismatches)
    assert rep.prompt_ids_match == 1.0, rep.prompt_diff
    assert rep.answers_match == 1.0, rep.answer_diff


def _task(path: Path) -> Path:
    rooms = ["kitchen", "hall", "office", "garage", "attic"]
    with path.open("w") as f:
        for i in range(40):
            room = rooms[i % 5]
            f.write(
                json.dumps(
                    {
                        "prompt": f"set the {room} to {i}.{i % 7} degrees at {1990 + i}",
                        "completion": f"{room} {i}.{i % 7}",
                    }
                )
                + "\n"
            )
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("arch", "kind"), [("llama", "smollm2"), ("qwen2", "qwen2-file"), ("llama", "spm-llama")]
)
def test_finetuned_model_keeps_its_files_tokenization(arch: str, kind: str, tmp_path: Path) -> None:
    base = cached_model(arch, kind)
    data = _task(tmp_path / "tasks.jsonl")
    settings = LoraSettings(r=4, alpha=8, lr=1e-2, batch_size=8, max_steps=6, eval_fraction=0.2)
    adapter = finetune(base, data, tmp_path / "adapter", settings).adapter_dir
    merged = merge(base, adapter, tmp_path / "merged").out_dir
    files = [
        f.name for f in base.iterdir() if f.name.startswith(("tokenizer", "special_tokens", "chat_template"))
    ]
    assert "tokenizer.json" in files
    for name in files:  # the base's tokenizer files, byte for byte, in every model edgeft writes
        assert _sha(adapter / name) == _sha(base / name), name
        assert _sha(merged / name) == _sha(base / name), name
    # what finetune trained on is the file's pipeline, not transformers' rebuild of it
    tok = load_tokenizer(merged, notify=False)
    written = json.loads((base / "tokenizer.json").read_text())
    running = json.loads(tok.backend_tokenizer.to_str())
    assert running["pre_tokenizer"] == written["pre_tokenizer"]
    assert running["normalizer"] == written["normalizer"]

    examples, _ = verify.eval_examples(merged, None)  # the fine-tune's recorded held-out split
    assert examples and len(examples) == 8
    es = verify.make_eval_set(tok, examples)
    gguf_res = export_gguf(
        merged, tmp_path / "m.gguf", "f32", conversations=[e.prompt_messages for e in examples]
    )
    rep = _judge(merged, gguf_res.path, es)
    assert rep.kld_mean < KLD_MAX and rep.prompt_ids_match == 1.0 and rep.answers_match == 1.0, rep
    onnx_res = export_onnx(merged, tmp_path / "onnx", "fp32")
    rep = _judge(merged, onnx_res.path, es)
    assert rep.kld_mean < KLD_MAX
    if ("onnx", kind) in UNREPRODUCIBLE:
        assert rep.prompt_ids_match < 1.0 and rep.prompt_diff
    else:
        assert rep.prompt_ids_match == 1.0 and rep.answers_match == 1.0, rep


def test_base_tokenizer_differs_from_transformers_rebuild() -> None:
    """The traits above are real: transformers' own classes tokenize these files differently."""
    from transformers import AutoTokenizer

    text = "<|im_start|>user\nversion 3.11 of 2024<|im_end|>"
    for kind in ("smollm2", "qwen2-file"):
        d = cached_model("qwen2" if kind == "qwen2-file" else "llama", kind)
        assert AutoTokenizer.from_pretrained(d).encode(text) != load_tokenizer(d, notify=False).encode(text)
    d = cached_model("llama", "spm-llama")
    text = "<s>[INST] hi [/INST]"
    assert AutoTokenizer.from_pretrained(d).encode(text) != load_tokenizer(d, notify=False).encode(text)


def test_end_of_turn_ends_generation_when_eos_differs(tmp_path: Path) -> None:
    """A ChatML model whose EOS is <|endoftext|> (Qwen2.5 base style): answers end at the template's
    <|im_end|> in both runtimes, and the turn markers are CONTROL tokens in the GGUF."""
    import shutil

    import gguf

    model = shutil.copytree(cached_model("qwen2", "bpe"), tmp_path / "m")
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = "<|endoftext|>"
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(model, notify=False)
    im_end, im_start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_token_id != im_end

    path = export_gguf(model, tmp_path / "m.gguf", "f32").path
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == im_end
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[im_end] == types[im_start] == gguf.TokenType.CONTROL
    gguf_rt = open_runtime(path)
    assert im_end in gguf_rt.end_ids
    gguf_rt.close()

    onnx = export_onnx(model, tmp_path / "onnx", "fp32").path
    genai = json.loads((onnx / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert im_end in (genai if isinstance(genai, list) else [genai])

    es = verify.make_eval_set(tok, None)
    for artifact in (path, onnx):
        rep = _judge(model, artifact, es)
        assert rep.prompt_ids_match == 1.0 and rep.answers_match == 1.0, rep


def test_tokens_added_past_the_base_vocabulary(tmp_path: Path) -> None:
    """Phi-3 style: chat markers added after SentencePiece training (ids past tokenizer.model's pieces) and
    used by the template; both runtimes must reproduce the prompts and answers."""
    from tinymodels import make_model
    from transformers import TokenizersBackend

    model = make_model("phi3", "spm-llama", tmp_path / "m", vocab_pad=8)
    tok = TokenizersBackend.from_pretrained(model)
    base = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    tok.save_pretrained(model)
    assert tok.convert_tokens_to_ids("<|end|>") >= base  # past the trained pieces, within the padded rows
    es = verify.make_eval_set(load_tokenizer(model, notify=False), None)
    gguf_res = export_gguf(model, tmp_path / "m.gguf", "f32")
    onnx_res = export_onnx(model, tmp_path / "onnx", "fp32")
    for artifact in (gguf_res.path, onnx_res.path):
        rep = _judge(model, artifact, es)
        assert rep.kld_mean < KLD_MAX and rep.prompt_ids_match == 1.0 and rep.answers_match == 1.0, rep
