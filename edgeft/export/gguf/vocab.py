"""Tokenizer → GGUF: vocabulary, token types, merges or SentencePiece scores, special ids, chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from ...constants import GGUF_PRE_TOKENIZERS, GGUF_TOKENIZER_BPE, GGUF_TOKENIZER_SPM
from ...errors import EdgeftError
from ...files import optional_json, read_json


def _token_str(tok: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


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


def _bpe_vocab(w: gguf.GGUFWriter, model_dir: Path, tj: dict[str, Any], n_vocab: int) -> dict[str, int]:
    """Byte-level BPE: tokens, merges, types.

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
            types.append(gguf.TokenType.CONTROL if added[i][1] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    w.add_tokenizer_model(GGUF_TOKENIZER_BPE)
    w.add_tokenizer_pre(_gguf_pre_name(tj, model_dir / "tokenizer.json"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    return vocab


def _spm_vocab_from_model(
    w: gguf.GGUFWriter, model_dir: Path, tj: dict[str, Any], n_vocab: int
) -> dict[str, int]:
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
            types[tid] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    _write_spm(w, tokens, scores, types, _sp_add_dummy_prefix(sp))
    return {t: i for i, t in enumerate(tokens)}


def _sp_add_dummy_prefix(sp: Any) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _spm_vocab_from_json(
    w: gguf.GGUFWriter, model_dir: Path, tj: dict[str, Any], n_vocab: int
) -> dict[str, int]:
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
            types.append(gguf.TokenType.CONTROL if added[i][1] else gguf.TokenType.USER_DEFINED)
        elif t == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    _write_spm(w, tokens, scores, types, _json_adds_space_prefix(tj))
    return vocab


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


def _write_spm(
    w: gguf.GGUFWriter, tokens: list[str], scores: list[float], types: list[int], add_prefix: bool
) -> None:
    w.add_tokenizer_model(GGUF_TOKENIZER_SPM)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(add_prefix)


def _is_spm_json(tj: dict[str, Any]) -> bool:
    model = tj.get("model", {})
    if model.get("type") == "Unigram":
        return True
    pre = json.dumps([tj.get("pre_tokenizer"), tj.get("normalizer")], ensure_ascii=False)
    return (
        model.get("type") == "BPE" and bool(model.get("byte_fallback")) and ("Metaspace" in pre or "▁" in pre)
    )


def _post_processor_adds(tj: dict[str, Any]) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) for single sequences, read from a TemplateProcessing post-processor."""
    pp = tj.get("post_processor") or {}
    procs = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single", [])
            return (
                bool(single) and "SpecialToken" in single[0],
                len(single) > 1 and "SpecialToken" in single[-1],
            )
    return False, False


def _chat_template(model_dir: Path, tok_cfg: dict[str, Any]) -> str | list[dict[str, str]] | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = tok_cfg.get("chat_template")
    if tmpl:
        return tmpl
    cj = model_dir / "chat_template.json"
    if cj.is_file():
        return read_json(cj).get("chat_template")
    return None


def write_tokenizer(w: gguf.GGUFWriter, model_dir: Path, config: dict[str, Any], n_vocab: int) -> None:
    """Vocabulary, special token ids, add_bos/add_eos and chat template."""
    tj_path = model_dir / "tokenizer.json"
    tj = optional_json(tj_path)
    if (model_dir / "tokenizer.model").is_file():
        vocab = _spm_vocab_from_model(w, model_dir, tj, n_vocab)
    elif tj and _is_spm_json(tj):
        if tj["model"].get("type") != "BPE":
            raise EdgeftError(f"{tj_path}: Unigram tokenizer without tokenizer.model; cannot export scores")
        vocab = _spm_vocab_from_json(w, model_dir, tj, n_vocab)
    elif tj and _is_byte_level_bpe(tj):
        vocab = _bpe_vocab(w, model_dir, tj, n_vocab)
    elif not tj:
        raise EdgeftError(
            f"{model_dir}: no tokenizer.json or tokenizer.model; save the tokenizer with the model"
        )
    else:
        kind = tj.get("model", {}).get("type")
        raise EdgeftError(
            f"{tj_path}: tokenizer model {kind!r} is not supported for GGUF "
            "(supported: byte-level BPE, SentencePiece BPE/Unigram)"
        )

    tok_cfg = optional_json(model_dir / "tokenizer_config.json")
    special_map = optional_json(model_dir / "special_tokens_map.json")
    for role, add in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("unk", w.add_unk_token_id),
        ("pad", w.add_pad_token_id),
    ):
        text = _token_str(tok_cfg.get(f"{role}_token")) or _token_str(special_map.get(f"{role}_token"))
        tid = vocab.get(text) if text is not None else None
        if tid is None and role in ("bos", "eos", "pad"):
            cid = config.get(f"{role}_token_id")
            tid = cid[0] if isinstance(cid, list) and cid else cid
        if isinstance(tid, int):
            add(tid)

    pp_bos, pp_eos = _post_processor_adds(tj)
    add_bos = tok_cfg.get("add_bos_token")
    add_eos = tok_cfg.get("add_eos_token")
    w.add_add_bos_token(bool(pp_bos if add_bos is None else add_bos))
    w.add_add_eos_token(bool(pp_eos if add_eos is None else add_eos))

    tmpl = _chat_template(model_dir, tok_cfg)
    if tmpl:
        w.add_chat_template(tmpl)
