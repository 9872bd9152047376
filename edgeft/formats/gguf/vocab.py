"""Tokenizer → GGUF: vocabulary, token types, merges or SentencePiece scores, special ids, chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edgeft.errors import EdgeftError
from edgeft.files import optional_json
from edgeft.formats.gguf.constants import GGUF_PRE_TOKENIZERS, GGUF_TOKENIZER_BPE, GGUF_TOKENIZER_SPM


def pre_tokenizer_signature(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """A tokenizer.json pre_tokenizer reduced to what decides how text is split (see GGUF_PRE_TOKENIZERS)."""
    if pre is None:
        return ("None",)
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    sig: list[str] = []
    for s in steps:
        kind = s.get("type")
        if kind == "ByteLevel":
            if s.get("add_prefix_space"):
                sig.append("ByteLevel(add_prefix_space)")
            sig.append("ByteLevel(regex)" if s.get("use_regex", True) else "ByteLevel(no-regex)")
        elif kind == "Digits":
            sig.append("Digits(individual)" if s.get("individual_digits") else "Digits(grouped)")
        elif kind == "Split":
            pattern = s.get("pattern", {})
            regex = pattern.get("Regex", pattern.get("String"))
            if s.get("behavior", "Isolated") != "Isolated" or s.get("invert"):
                sig.append(f"Split({regex}, behavior={s.get('behavior')}, invert={s.get('invert')})")
            else:
                sig.append(f"Split({regex})")
        else:
            sig.append(json.dumps(s, sort_keys=True, ensure_ascii=False))
    return tuple(sig)


def _gguf_pre_name(tokenizer_json: dict[str, Any], where: Path) -> str:
    """The tokenizer.ggml.pre name matching the tokenizer's own pre_tokenizer definition."""
    pre = tokenizer_json.get("pre_tokenizer")
    sig = pre_tokenizer_signature(pre)
    name = GGUF_PRE_TOKENIZERS.get(sig)
    if name is None:
        found = json.dumps(pre, ensure_ascii=False, separators=(",", ":"))
        known = "; ".join(f"{n} = {' + '.join(s)}" for s, n in GGUF_PRE_TOKENIZERS.items())
        raise EdgeftError(
            f"{where}: unknown pre-tokenizer {found} (llama.cpp would split text differently); known: {known}"
        )
    return name


def _is_byte_level_bpe(tj: dict[str, Any]) -> bool:
    def has_bytelevel(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_bytelevel(c) for c in node.get("pretokenizers", []) + node.get("decoders", []))

    model = tj.get("model", {})
    return model.get("type") == "BPE" and (
        has_bytelevel(tj.get("pre_tokenizer")) or has_bytelevel(tj.get("decoder"))
    )


def _added_tokens(tj: dict[str, Any], model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id → (content, special) for added tokens, from tokenizer.json or added_tokens.json/tokenizer_config."""
    out: dict[int, tuple[str, bool]] = {}
    for t in tj.get("added_tokens", []):
        out[int(t["id"])] = (t["content"], bool(t.get("special")))
    cfg = optional_json(model_dir / "tokenizer_config.json")
    for sid, t in (cfg.get("added_tokens_decoder") or {}).items():
        out.setdefault(int(sid), (t["content"], bool(t.get("special"))))
    for content, tid in optional_json(model_dir / "added_tokens.json").items():
        out.setdefault(int(tid), (content, False))
    return out


# llama.cpp's converter marks added tokens that look like markup as CONTROL even when not flagged special.
# ref: llama.cpp convert_hf_to_gguf.py TextModel.does_token_look_special
_SPECIAL_LOOKING = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def _looks_special(text: str) -> bool:
    return (
        text in _SPECIAL_LOOKING
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or text.startswith(("<start_of_", "<end_of_"))
    )


def _added_type(content: str, special: bool, template: str) -> int:
    """GGUF type of an added token: CONTROL when flagged special, looking special or used by the chat
    template as a marker (<...> or [...]; a turn marker written as NORMAL/USER_DEFINED is a known cause of
    endless or garbled output, ref: unsloth PR #5080 (NORMAL), PR #6229 (USER_DEFINED)); USER_DEFINED for
    plain added words, which llama.cpp then prints in answers like any text."""
    markup = len(content) > 2 and content[0] in "<[" and content[-1] in ">]"
    if special or _looks_special(content) or (markup and content in template):
        return gguf.TokenType.CONTROL
    return gguf.TokenType.USER_DEFINED


@dataclass
class Vocab:
    """A tokenizer as GGUF stores it (ref: llama.cpp gguf.md "tokenizer.ggml.*")."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) | "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    add_space_prefix: bool | None = None  # SentencePiece only
    ids: dict[str, int] = field(default_factory=dict)
    # Whether encoding adds BOS / EOS, as the tokenizer itself does it (None: leave it to SpecialVocab).
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None  # written when the model's files have none


def _bpe_vocab(model_dir: Path, tj: dict[str, Any], n_vocab: int, template: str) -> Vocab:
    """Byte-level BPE: tokens and types (merges come from gguf-py's SpecialVocab).

    ref: llama.cpp convert_hf_to_gguf.py TextModel._set_vocab_gpt2
    """
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = _added_tokens(tj, model_dir)
    for tid, (content, _) in added.items():
        vocab[content] = tid
    size = max(n_vocab, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(_added_type(added[i][0], added[i][1], template))
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    pre = _gguf_pre_name(tj, model_dir / "tokenizer.json")
    return Vocab(GGUF_TOKENIZER_BPE, pre, tokens, types, ids=vocab)


def _spm_vocab_from_model(model_dir: Path, tj: dict[str, Any], n_vocab: int, template: str) -> Vocab:
    """SentencePiece tokenizer.model: tokens, scores, types from the proto.

    ref: llama.cpp convert_hf_to_gguf.py TextModel._create_vocab_sentencepiece
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    for tid, (content, special) in sorted(_added_tokens(tj, model_dir).items()):
        while tid >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        if tid >= sp.vocab_size() or types[tid] in (gguf.TokenType.NORMAL, gguf.TokenType.UNUSED):
            tokens[tid] = content
            scores[tid] = -1000.0
            types[tid] = _added_type(content, special, template)
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    # The file's own pipeline decides the space prefix when there is one (one tokenization truth).
    prefix = _json_adds_space_prefix(tj) if tj else _sp_add_dummy_prefix(sp)
    ids = {t: i for i, t in enumerate(tokens)}
    return Vocab(GGUF_TOKENIZER_SPM, "default", tokens, types, scores, prefix, ids)


def _sp_add_dummy_prefix(sp: Any) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _spm_vocab_from_json(model_dir: Path, tj: dict[str, Any], n_vocab: int, template: str) -> Vocab:
    """SentencePiece-style tokenizer.json (BPE + byte_fallback + Metaspace) without tokenizer.model.

    llama.cpp's SPM tokenizer merges the adjacent pair whose merged piece has the highest score, so the
    score is minus the rank of the merge that produces the piece (HF applies merges by rank).
    """
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    added = _added_tokens(tj, model_dir)
    for tid, (content, _) in added.items():
        vocab[content] = tid
    size = max(n_vocab, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        scores.append(-float(rank[t]) if t in rank else 0.0)
        if i in added:
            types.append(_added_type(added[i][0], added[i][1], template))
        elif t == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return Vocab(GGUF_TOKENIZER_SPM, "default", tokens, types, scores, _json_adds_space_prefix(tj), vocab)


def _json_adds_space_prefix(tj: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends "▁" (Metaspace prepend, or Llama-2's Prepend)."""
    steps: list[dict[str, Any]] = []
    for key, seq in (("pre_tokenizer", "pretokenizers"), ("normalizer", "normalizers")):
        node = tj.get(key) or {}
        steps += node.get(seq, []) if node.get("type") == "Sequence" else [node]
    for s in steps:
        if s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never":
            return bool(s.get("add_prefix_space", True))
        if s.get("type") == "Prepend" and s.get("prepend") == "\u2581":
            return True
    return False


def _is_spm_json(tj: dict[str, Any]) -> bool:
    model = tj.get("model", {})
    if model.get("type") == "Unigram":
        return True
    pre = json.dumps([tj.get("pre_tokenizer"), tj.get("normalizer")], ensure_ascii=False)
    return (
        model.get("type") == "BPE" and bool(model.get("byte_fallback")) and ("Metaspace" in pre or "▁" in pre)
    )


def read_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """The model directory's tokenizer files as GGUF's vocabulary (kind decided by the files themselves)."""
    tj_path = model_dir / "tokenizer.json"
    tj = optional_json(tj_path)
    template = chat_template_text(model_dir)
    if (model_dir / "tokenizer.model").is_file():
        return _spm_vocab_from_model(model_dir, tj, n_vocab, template)
    if tj and _is_spm_json(tj):
        if tj["model"].get("type") != "BPE":
            raise EdgeftError(f"{tj_path}: Unigram tokenizer without tokenizer.model; cannot export scores")
        return _spm_vocab_from_json(model_dir, tj, n_vocab, template)
    if tj and _is_byte_level_bpe(tj):
        return _bpe_vocab(model_dir, tj, n_vocab, template)
    if not tj:
        raise EdgeftError(
            f"{model_dir}: no tokenizer.json or tokenizer.model; save the tokenizer with the model"
        )
    kind = tj.get("model", {}).get("type")
    raise EdgeftError(
        f"{tj_path}: tokenizer model {kind!r} is not supported for GGUF "
        "(supported: byte-level BPE, SentencePiece BPE/Unigram)"
    )


def chat_template_text(model_dir: Path) -> str:
    """The chat template(s) of a model dir as one string (for finding the tokens it uses)."""
    sv = gguf.SpecialVocab(model_dir, load_merges=False)
    tmpl = sv.chat_template
    if isinstance(tmpl, list):
        return "\n".join(str(t.get("template", "")) for t in tmpl)
    return tmpl or ""


def write_vocab(
    w: gguf.GGUFWriter, model_dir: Path, vocab: Vocab, n_vocab: int, *, end_of_turn: int | None = None
) -> None:
    """Vocabulary, merges, special token ids, add_bos/add_eos and chat template.

    Special ids, add_* flags, merges and the chat template come from gguf-py's SpecialVocab, which reads
    tokenizer.json, tokenizer_config.json, chat_template.jinja/json and config.json the way llama.cpp's own
    converter does. `end_of_turn` (the token the chat template closes an answer with) becomes the EOT id
    when it is not the EOS, so llama.cpp ends generation on it.
    """
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    sv = gguf.SpecialVocab(
        model_dir, load_merges=vocab.model == GGUF_TOKENIZER_BPE, n_vocab=len(vocab.tokens)
    )
    if end_of_turn is not None and end_of_turn != sv.special_token_ids.get("eos"):
        sv.special_token_ids["eot"] = end_of_turn
    if sv.chat_template is None and vocab.chat_template is not None:
        sv.chat_template = vocab.chat_template
    for role, value in (("bos", vocab.add_bos), ("eos", vocab.add_eos)):
        if value is not None:
            sv.add_special_token[role] = value
    sv.add_to_gguf(w, quiet=True)


# llama.cpp changes token attributes by general.name: a name containing one of these sets RSTRIP on every
# special token (Phi-3's added tokens strip the whitespace after them) and requires the tokens listed.
# ref: llama.cpp src/llama-vocab.cpp load ("set attributes by model/tokenizer/architecture name")
_NAME_HACKS = ("phi-3", "phi3", "modern-bert")
_PHI3_NAME_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def general_name(model_dir: Path, vocab: Vocab) -> str:
    """general.name for the GGUF: the folder's name, with llama.cpp's name-keyed tokenizer behaviour switched
    on exactly when the tokenizer itself behaves that way (special tokens that strip whitespace to their
    right, as Phi-3's do) and off otherwise — a folder called "phi3-ft" must not change how text splits."""
    name = model_dir.name or "model"
    for hack in _NAME_HACKS:
        name = name.replace(hack, "").replace(hack.upper(), "").replace(hack.capitalize(), "")
    name = name.strip("-_ .") or "model"
    tj = optional_json(model_dir / "tokenizer.json")
    rstrip = any(t.get("special") and t.get("rstrip") for t in tj.get("added_tokens", []))
    if rstrip and all(t in vocab.ids for t in _PHI3_NAME_TOKENS):
        return f"phi3 {name}"
    return name
