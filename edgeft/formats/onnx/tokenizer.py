"""The tokenizer of an onnxruntime-genai model directory: the model's own files, proven on chat prompts.

onnxruntime-genai tokenizes with onnxruntime-extensions, which reads tokenizer.json but not every
pre-tokenizer in it: measured with onnxruntime-genai 0.18, a `Digits(individual)` step (SmolLM2's) is
ignored, so " 2024" becomes one token where the model was trained on " ", "2", "0", "2", "4" (dropping the
digit merges does not help: a pre-token found whole in the vocabulary is taken as is); SentencePiece runs of
spaces split differently unless tokenizer_config.json names GemmaTokenizer (the folder then says so; the
bundle's tokenizer/ keeps the model's own files). What still differs is named in one line at export, and
verify's prompt_ids_match fails the artifact on the eval conversations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft import data as data_mod
from edgeft.constants import CHAT_TEMPLATE_FILE
from edgeft.files import read_json
from edgeft.formats.onnx.constants import ONNX_GENAI_CONFIG
from edgeft.probes import PROBE_CONVERSATIONS, tokenization_mismatches


@dataclass(frozen=True)
class TokenizerCheck:
    """What onnxruntime-genai tokenizes differently from the model's own tokenizer (empty: nothing)."""

    mismatches: tuple[str, ...]
    adapted: str | None = None  # what edgeft changed in the folder's tokenizer files so the runtime agrees


def mismatches(out: Path, tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    """Probes (texts, chat prompts) whose onnxruntime-genai ids differ from the model's tokenizer."""
    import onnxruntime_genai as og

    try:
        og_tok = og.Tokenizer(og.Model(str(out)))
    except Exception as e:  # noqa: BLE001 - og raises RuntimeError and others
        return [f"onnxruntime-genai cannot load the folder's tokenizer ({str(e).splitlines()[0]})"]

    def encode(text: str) -> list[int]:
        ids = [int(i) for i in og_tok.encode(text)]
        # encode() may add the BOS the tokenizer config asks for; compare the text's own ids
        return ids[1:] if ids[:1] == [tokenizer.bos_token_id] else ids

    def chat(messages: list[dict[str, str]]) -> list[int]:
        prompt = og_tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(i) for i in og_tok.encode(prompt)]

    return tokenization_mismatches(
        tokenizer, "onnxruntime-genai", encode, chat, conversations, text_specials=False
    )


def _end_of_turn_in_eos(out: Path, tokenizer: Any) -> None:
    """genai_config.json's eos_token_id also lists the chat template's end-of-turn token, so the generator
    stops where a chat answer ends (not only at the model's EOS)."""
    eot = data_mod.template_end_of_turn(tokenizer)
    if eot is None:
        return
    path = out / ONNX_GENAI_CONFIG
    cfg = read_json(path)
    eos = cfg["model"].get("eos_token_id", [])
    eos = list(eos) if isinstance(eos, list) else [eos]
    if eot not in eos:
        cfg["model"]["eos_token_id"] = [*eos, eot]
        path.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")


def prove_tokenizer(
    model_dir: Path, out: Path, conversations: Sequence[Sequence[dict[str, str]]] = ()
) -> TokenizerCheck:
    """Make the ONNX folder stop at the end of a chat turn, check onnxruntime-genai's tokenization against
    the model's own on probes plus `conversations`, and when it differs, try the tokenizer classes under
    which onnxruntime-extensions reads the same tokenizer.json faithfully (_CLASS_CANDIDATES)."""
    from edgeft.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir, notify=False)
    _end_of_turn_in_eos(out, tokenizer)
    if not getattr(tokenizer, "chat_template", None) and not (out / CHAT_TEMPLATE_FILE).is_file():
        # a model without a template is tuned on edgeft's plain one; the app's chat call must use it too
        (out / CHAT_TEMPLATE_FILE).write_text(data_mod.plain_chat_template(tokenizer), encoding="utf-8")
    convs = list(PROBE_CONVERSATIONS) + [tuple(c) for c in conversations]
    found = mismatches(out, tokenizer, convs)
    if not found:
        return TokenizerCheck(())
    cfg_path = out / "tokenizer_config.json"
    original = cfg_path.read_bytes()
    cfg = json.loads(original)
    for cls in _CLASS_CANDIDATES.get(_kind(out), ()):
        if cls == cfg.get("tokenizer_class"):
            continue
        cfg_path.write_text(json.dumps({**cfg, "tokenizer_class": cls}, indent=2) + "\n", encoding="utf-8")
        if not mismatches(out, tokenizer, convs):
            return TokenizerCheck(
                (),
                f"tokenizer_config.json names {cls} (onnxruntime-extensions' reading of it "
                f"reproduces tokenizer.json; the class named was {cfg.get('tokenizer_class')})",
            )
    cfg_path.write_bytes(original)
    return TokenizerCheck(tuple(found))


# onnxruntime-extensions picks its tokenizer implementation by tokenizer_config.json's tokenizer_class and
# does not run every tokenizer.json pipeline the same way under every name. Measured with onnxruntime-genai
# 0.18: a SentencePiece-style BPE (Prepend/Replace normalizer, byte fallback) keeps runs of spaces ("▁▁") only
# under GemmaTokenizer; under LlamaTokenizer or the generic classes "a  b" splits as "▁", "▁b".
_CLASS_CANDIDATES: dict[str, tuple[str, ...]] = {
    "spm": ("GemmaTokenizer", "LlamaTokenizer"),
    "bpe": ("GPT2Tokenizer", "Qwen2Tokenizer", "LlamaTokenizer"),
}


def _kind(out: Path) -> str:
    """ "spm" for SentencePiece-style tokenizer.json files (byte-fallback BPE/Unigram with "▁"), else "bpe"."""
    tj = read_json(out / "tokenizer.json") if (out / "tokenizer.json").is_file() else {}
    model = tj.get("model", {})
    spm = model.get("type") == "Unigram" or bool(model.get("byte_fallback"))
    return "spm" if spm else "bpe"
