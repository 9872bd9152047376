"""llama.cpp's tokenizer, driven only by the GGUF metadata we write, must equal the HF tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import cached_model, load_tokenizer

from edgeft.formats.gguf.export import export_gguf
from edgeft.formats.gguf.runtime import LlamaCppRuntime

TRICKY = [
    "Hello world",
    "  leading spaces",
    "trailing spaces   ",
    "runs   of     spaces",
    "tabs\tand\t\ttabs",
    "line\nbreaks\r\nand\n\n\nblank lines\n",
    "\n\n\n",
    " ",
    "1234567890 and 3.14159, 42nd",
    "café naïve Ålesund",
    "日本語の文章",
    "🙂👍🏽",
    "def f(x):\n\treturn x**2  # ok",
    "It's they're we've I'm you'll he'd IT'S",
    "mixed   \t\n  whitespace\u00a0nbsp",
]

# (arch, tokenizer kind, expected tokenizer.ggml.pre)
KINDS = [
    ("llama", "bpe", "gpt-2"),
    ("llama", "bpe-llama3", "llama-bpe"),
    ("llama", "bpe-smollm", "smollm"),
    ("qwen2", "bpe", "qwen2"),
    ("llama", "spm", "default"),
]


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - generator fixture
    """(HF tokenizer, llama.cpp runtime) per tokenizer kind, exported once per module."""
    out: dict[str, tuple] = {}
    for arch, kind, _ in KINDS:
        model_dir = cached_model(arch, kind)
        path = export_gguf(model_dir, tmp_path_factory.mktemp(kind) / "m.gguf").path
        out[f"{arch}-{kind}"] = (load_tokenizer(model_dir), LlamaCppRuntime(Path(path), n_ctx=64))
    yield out
    for _, rt in out.values():
        rt.close()


@pytest.mark.parametrize(("arch", "kind", "pre"), KINDS)
def test_pre_tokenizer_name(arch: str, kind: str, pre: str, runtimes: dict) -> None:
    _, rt = runtimes[f"{arch}-{kind}"]
    assert rt.metadata["tokenizer.ggml.pre"] == pre


@pytest.mark.parametrize("add_special", [False, True])
@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize(("arch", "kind", "pre"), KINDS)
def test_tokenization_matches_hf(
    arch: str, kind: str, pre: str, text: str, add_special: bool, runtimes: dict
) -> None:
    tok, rt = runtimes[f"{arch}-{kind}"]
    expected = tok.encode(text, add_special_tokens=add_special)
    assert rt.tokenize(text, add_special=add_special) == expected


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize(("arch", "kind", "pre"), KINDS)
def test_detokenize_round_trips(arch: str, kind: str, pre: str, text: str, runtimes: dict) -> None:
    tok, rt = runtimes[f"{arch}-{kind}"]
    ids = tok.encode(text, add_special_tokens=False)
    assert rt.detokenize(ids) == tok.decode(ids)


def test_spm_from_tokenizer_json_only(tmp_path: Path) -> None:
    """Without tokenizer.model, scores come from tokenizer.json merge ranks; tokenization must not change."""
    import shutil

    src = cached_model("llama", "spm")
    model_dir = tmp_path / "m"
    shutil.copytree(src, model_dir)
    (model_dir / "tokenizer.model").unlink()
    tok = load_tokenizer(model_dir)
    res = export_gguf(model_dir, tmp_path / "m.gguf")
    rt = LlamaCppRuntime(res.path, n_ctx=64)
    try:
        assert rt.metadata["tokenizer.ggml.model"] == "llama"
        assert rt.metadata["tokenizer.ggml.add_space_prefix"] == "true"
        for text in TRICKY:
            assert rt.tokenize(text, add_special=True) == tok.encode(text), text
    finally:
        rt.close()


def test_added_token_types() -> None:
    """Flagged-special, special-looking and template-used markers are CONTROL; plain added words are not."""
    import gguf

    from edgeft.formats.gguf.vocab import _added_type

    template = "{{ '<tool>' + message['content'] + '[END]' }} hello"
    control, user = gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED
    assert _added_type("<pad2>", True, "") == control  # flagged special
    assert _added_type("<|im_start|>", False, "") == control  # looks special (llama.cpp's rule)
    assert _added_type("<start_of_turn>", False, "") == control
    assert _added_type("<tool>", False, template) == control  # a marker the chat template uses
    assert _added_type("[END]", False, template) == control
    assert _added_type("<tool>", False, "no markers here") == user
    assert _added_type("hello", False, template) == user  # a word, even if the template says it
