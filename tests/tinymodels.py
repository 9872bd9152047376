"""Tiny random-weight HF causal LMs with in-process trained tokenizers, for offline tests.

Everything is built from local text (`pydoc_data.topics`, ~465K chars of English), so no test ever
touches the network. Trained tokenizers are cached per kind for the life of the process; models are
cheap (a few hundred KB) and rebuilt per call.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

# ChatML, as used by Qwen2 and SmolLM2 instruct models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A minimal Llama-2 style template for SentencePiece tokenizers.
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SPM_SPECIALS = ("<unk>", "<s>", "</s>")

# ref: llama.cpp src/llama-vocab.cpp (LLAMA_VOCAB_PRE_TYPE_LLAMA3 / QWEN2 regexes), the same strings the
# upstream HF tokenizer.json files carry in their Split pre-tokenizer.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Tokenizer kinds: "bpe" (GPT-2 style ByteLevel regex), "bpe-llama3", "bpe-qwen2", "bpe-smollm" (byte-level
# BPE variants differing only in pre-tokenizer), and "spm" (SentencePiece BPE with byte fallback).
TOKENIZER_KINDS = (
    "bpe",
    "bpe-llama3",
    "bpe-qwen2",
    "bpe-smollm",
    "spm",
    "smollm2",
    "qwen2-file",
    "spm-llama",
    "spm-first",
)
# Real-checkpoint traits transformers 5 rebuilds on load (ref: transformers models/*/tokenization_*.py):
# kind → (trained like, tokenizer_class named in tokenizer_config.json, tokenizer.json pre_tokenizer or None).
# "smollm2": SmolLM2's config names GPT2Tokenizer, whose rebuild drops the file's Digits(individual) step;
#   the vocabulary is trained without it, so merges like "Ġ3" exist and the rebuild really tokenizes "3.11"
#   differently. "qwen2-file": a Qwen2 checkpoint whose file splits digits in runs of 3 (Llama-3's regex)
#   while Qwen2Tokenizer imposes single digits and NFC (vocabulary with digit merges, as above). "spm-llama": a SentencePiece Llama whose config
#   names LlamaTokenizer, rebuilt as Metaspace(prepend_scheme="first") — no "▁" after special tokens.
REBUILT_KINDS: dict[str, tuple[str, str, dict | None]] = {
    "smollm2": (
        "bpe",
        "GPT2Tokenizer",
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
    ),
    "qwen2-file": (
        "bpe",
        "Qwen2Tokenizer",
        {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
    ),
    "spm-llama": ("spm", "LlamaTokenizer", None),
    # A SentencePiece file saved the transformers-5 way (Metaspace prepend_scheme "first", no normalizer):
    # "▁" only at the very start of the input, never after a special token (llama.cpp does prefix after each
    # one; ref: llama.cpp src/llama-vocab.cpp llama_vocab::impl::tokenize).
    "spm-first": (
        "spm",
        "TokenizersBackend",
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
    ),
}

_CACHE: dict[str, Path] = {}
_CACHE_ROOT: Path | None = None


def corpus_lines() -> list[str]:
    """Offline English training text: the pydoc topic help pages, split into paragraphs."""
    from pydoc_data.topics import topics

    lines: list[str] = []
    for text in topics.values():
        lines.extend(p for p in text.split("\n\n") if p.strip())
    # Numbers are rare in the docs; add some so BPE learns digit merges ("20", "Ġ3") and tokenizers that
    # split digits differently really disagree (the demo task is full of numbers).
    rng = np.random.default_rng(0)
    lines += [
        f"version {rng.integers(1, 4)}.{rng.integers(0, 13)} of {rng.integers(1990, 2030)}: "
        f"{rng.integers(0, 1000)} items at {rng.integers(0, 100)}.{rng.integers(0, 100):02d} each"
        for _ in range(3000)
    ]
    return lines


def _cache_root() -> Path:
    global _CACHE_ROOT
    if _CACHE_ROOT is None:
        _CACHE_ROOT = Path(tempfile.mkdtemp(prefix="edgeft-tinytok-"))
    return _CACHE_ROOT


def _bpe_pre_tokenizer(kind: str):  # noqa: ANN202 - tokenizers types are untyped
    from tokenizers import Regex, pre_tokenizers

    if kind == "bpe":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "bpe-smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    regex = {"bpe-llama3": LLAMA3_REGEX, "bpe-qwen2": QWEN2_REGEX}[kind]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _train_bpe(kind: str, out_dir: Path, vocab_size: int = 1200) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _bpe_pre_tokenizer(kind)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any UTF-8 round-trips
        special_tokens=list(BPE_SPECIALS),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)


def _train_spm(out_dir: Path, vocab_size: int = 1000) -> None:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="edgeft-spm-"))
    try:
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(line.replace("\n", " ") for line in corpus_lines()), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(tmp / "tokenizer"),
            model_type="bpe",  # llama.cpp's SPM tokenizer merges by piece score, which is exact for BPE
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
        )
        spm_dir = tmp / "hf"
        spm_dir.mkdir()
        shutil.copy(tmp / "tokenizer.model", spm_dir / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(spm_dir, legacy=True, add_bos_token=True, add_eos_token=False)
        tok.chat_template = LLAMA2_TEMPLATE
        tok.save_pretrained(out_dir)
        shutil.copy(tmp / "tokenizer.model", out_dir / "tokenizer.model")
        # Make tokenizer.json the original Llama-2 form: normalizer Prepend("▁") + Replace(" ", "▁") and no
        # pre-tokenizer. This is exactly sentencepiece's add_dummy_prefix, per text segment between special
        # tokens, which is also what llama.cpp's SPM tokenizer does ("prefix with space if previous is
        # special", llama-vocab.cpp). transformers 5's LlamaTokenizer class instead rebuilds a Metaspace
        # pre-tokenizer, whose prefix is skipped when text already starts with a space (" " → ["▁"], where
        # sentencepiece and llama.cpp give ["▁▁"]), so the tokenizer is saved with the generic class.
        tj_path = out_dir / "tokenizer.json"
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        tj["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        }
        tj["pre_tokenizer"] = None
        tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
        cfg_path = out_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "TokenizersBackend"
        cfg["add_bos_token"] = True
        cfg["add_eos_token"] = False
        cfg_path.write_text(json.dumps(cfg, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_tokenizer(kind: str, out_dir: Path) -> None:
    """Write a trained tokenizer of `kind` (see TOKENIZER_KINDS) into `out_dir` (cached per kind)."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {TOKENIZER_KINDS}")
    out_dir = Path(out_dir)
    if kind in REBUILT_KINDS:
        like, cls, pre = REBUILT_KINDS[kind]
        make_tokenizer(like, out_dir)
        cfg_path = Path(out_dir) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = cls
        cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        if pre is not None:
            tj_path = Path(out_dir) / "tokenizer.json"
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
            tj["pre_tokenizer"] = pre
            if pre.get("type") == "Metaspace":
                tj["normalizer"] = None  # Metaspace replaces spaces and prepends itself
            tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
        return
    if kind not in _CACHE:
        cached = _cache_root() / kind
        cached.mkdir(parents=True, exist_ok=True)
        if kind == "spm":
            _train_spm(cached)
        else:
            _train_bpe(kind, cached)
        _CACHE[kind] = cached
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in _CACHE[kind].iterdir():
        shutil.copy(f, out_dir / f.name)


def load_tokenizer(model_dir: Path):  # noqa: ANN201 - transformers tokenizer
    """The tokenizer of a tiny model directory exactly as its tokenizer.json is written (the truth tests
    judge against; transformers' per-class rebuilds are bypassed, independently of edgeft.loading)."""
    from transformers import TokenizersBackend

    return TokenizersBackend.from_pretrained(model_dir)


# Architectures the tiny-model factory builds: name → (transformers config class, per-arch config fields).
# Hyperparameters are deliberately far from the defaults (rms_norm_eps 0.05, rope_theta 1000 instead of
# 1e-6 / 10000) so a converter that drops or mistypes one shows up as drift, not as f32 noise.
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
RMS_NORM_EPS = 0.05
ROPE_THETA = 1000.0


def _arch_config(arch: str, common: dict, hidden: int, heads: int):  # noqa: ANN202 - transformers config
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**{"sliding_window": None, **common})
    if arch == "qwen2":
        return Qwen2Config(**{"use_sliding_window": False, **common})
    if arch == "qwen3":
        # head_dim != hidden / heads, as in the real Qwen3 models (q/k norms work per head)
        return Qwen3Config(**{"head_dim": 2 * hidden // heads, "use_sliding_window": False, **common})
    if arch == "gemma2":
        # head_dim != hidden / heads, as in the real Gemma 2 models (2B: 2304 / 8 heads, head_dim 256)
        return Gemma2Config(
            **{
                "head_dim": 2 * hidden // heads,
                "query_pre_attn_scalar": hidden
                // heads
                // 2,  # != head_dim: the scale must come from the config
                "sliding_window": 16,
                "final_logit_softcapping": 3.0,  # low caps so soft-capping really bends the logits
                "attn_logit_softcapping": 5.0,
                "hidden_activation": "gelu_pytorch_tanh",
                **common,
            }
        )
    if arch == "gemma3":
        # Gemma 3 ropes local and global layers with different bases (transformers 5: one rope dict per
        # layer type); its 5-local-1-global pattern needs >= 7 layers to show both kinds after a global one.
        rope = common.get("rope_parameters") or {}
        if "full_attention" not in rope:
            theta = rope.get("rope_theta", ROPE_THETA)
            common = {
                **common,
                "rope_parameters": {
                    "full_attention": {**rope, "rope_theta": theta},
                    "sliding_attention": {"rope_type": "default", "rope_theta": theta / 10},
                },
            }
        # head_dim != hidden / heads as in the real models (1B: 1152 / 4 heads, head_dim 256), and
        # query_pre_attn_scalar != head_dim, so the attention scale must come from the config.
        return Gemma3TextConfig(
            **{
                "head_dim": 2 * hidden // heads,
                "query_pre_attn_scalar": hidden // heads,
                "sliding_window": 16,
                "hidden_activation": "gelu_pytorch_tanh",
                **common,
            }
        )
    if arch == "phi3":
        # Phi-3 keeps the pretraining context beside the rope settings (used by LongRoPE overrides).
        return Phi3Config(**{"sliding_window": None, "original_max_position_embeddings": 256, **common})
    raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")


def make_model(
    arch: str,
    tokenizer_kind: str,
    out_dir: Path,
    *,
    seed: int = 0,
    tie_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
    hidden: int = 64,
    intermediate: int | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    std: float | None = None,
    vocab_pad: int = 0,
    config_overrides: dict | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Save a tiny random `arch` model (see ARCHS) with a `tokenizer_kind` tokenizer to `out_dir`.

    For arch "qwen2"/"qwen3", tokenizer_kind "bpe" means "bpe-qwen2" (see below).
    Weights use init std 1/sqrt(hidden) by default (gain ~1 per layer: logits std ~1, far from flat, yet not
    chaotic, so quantization drift looks like a real model's) and randomized norms/biases so every tensor
    matters; hidden/intermediate default to multiples of 32 (q4_0/q8_0). Use hidden=256 for k-quants.
    `vocab_pad` rows are added past the tokenizer's vocabulary (as Phi-3 and Qwen2 checkpoints do).
    `max_shard_size` (e.g. "100KB") saves several safetensors shards plus model.safetensors.index.json.
    """
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    out_dir = Path(out_dir)
    if arch in ("qwen2", "qwen3") and tokenizer_kind == "bpe":
        # transformers 5 loads a qwen2 model's tokenizer as Qwen2Tokenizer, which rebuilds the Qwen2 split
        # regex whatever tokenizer.json says; train with that regex so tokenizer.json and HF agree.
        tokenizer_kind = "bpe-qwen2"
    make_tokenizer(tokenizer_kind, out_dir)
    tok = load_tokenizer(out_dir)
    intermediate = intermediate or 2 * hidden
    common = dict(
        vocab_size=len(tok) + vocab_pad,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=tie_embeddings,
        initializer_range=std if std is not None else hidden**-0.5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    common.update(config_overrides or {})
    config = _arch_config(arch, common, hidden, heads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Gemma norms scale by (1 + w): centre them on 0 there, on 1 elsewhere
                centre = 0.0 if arch.startswith("gemma") else 1.0
                p.copy_(centre + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model = model.to(dtype)
    model.eval()
    if max_shard_size is None:
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    gen = out_dir / "generation_config.json"
    if gen.exists():  # keep generation defaults deterministic
        data = json.loads(gen.read_text())
        data["do_sample"] = False
        gen.write_text(json.dumps(data, indent=2))
    return out_dir


_MODELS: dict[tuple, Path] = {}


def cached_model(arch: str, tokenizer_kind: str, **kw: object) -> Path:
    """make_model into a process-wide temp dir, built once per argument set (tests share them)."""
    key = (arch, tokenizer_kind, tuple(sorted(kw.items())))
    if key not in _MODELS:
        out = Path(tempfile.mkdtemp(prefix=f"{arch}-{tokenizer_kind}-", dir=_cache_root()))
        _MODELS[key] = make_model(arch, tokenizer_kind, out, **kw)  # type: ignore[arg-type]
    return _MODELS[key]


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers in test output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


# --- drift helpers shared by the export tests (computed here, independently of edgeft.verify) ----------


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kld(ref_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """Mean over positions of KL(ref || test) of the next-token distributions, in float64."""
    lp, lq = log_softmax(ref_logits), log_softmax(test_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def leftovers(folder: Path, name: str) -> list[str]:
    """Temp names edgeft's writers make next to an output `name` (`.NAME.partial-*`, `.NAME.old-*`, ...)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(f".{name}."))


def onnx_with_external(path: Path, location: str, *, in_subgraph: bool = False) -> Path:
    """A one-initializer ONNX model whose weights live at `location` (written by hand, not by onnx); with
    `in_subgraph`, the initializer sits in both branches of an If (subgraphs must be walked too)."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]
    if in_subgraph:
        inner = helper.make_graph([helper.make_node("Identity", ["w"], ["z"])], "inner", [], [], [w])
        node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
        graph = helper.make_graph([node], "g", [], out)
    else:
        graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], out, [w])
    onnx.save(helper.make_model(graph), str(path))
    return path
