"""Build the shipped demo base model `edgeft/demo/model/` from offline text only.

Why: the no-argument demo must run offline, so edgeft ships its own tiny base model. This script trains a
byte-level BPE tokenizer (GPT-2 regex with single digits, which llama.cpp knows as the "smollm"
pre-tokenizer) and pretrains a small LlamaForCausalLM from scratch on Python's own documentation
(`pydoc_data.topics`) and some stdlib sources, plus generic ChatML chats (topic questions, "fields → JSON"
records, "repeat: ..." copying) so the chat tokens are trained and the base can copy numbers from a prompt.
The smart-home task data is deliberately NOT in the corpus: the base model must score ~0% on it.

Usage: python scripts/train_demo_model.py [--out edgeft/demo/model] [--steps N] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "edgeft" / "demo" / "model"

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
STDLIB_MODULES = (
    "json/__init__.py",
    "json/encoder.py",
    "json/decoder.py",
    "textwrap.py",
    "string.py",
    "pathlib.py",
    "shutil.py",
    "argparse.py",
    "datetime.py",
    "calendar.py",
    "fractions.py",
    "statistics.py",
    "colorsys.py",
    "sched.py",
)
USER_TEMPLATES = (
    "Explain {}.",
    "What is {}?",
    "Tell me about {}.",
    "Describe {} briefly.",
    "Can you help me understand {}?",
)


def corpus(seed: int) -> tuple[list[str], list[str]]:
    """Plain documents and ChatML conversations, from offline stdlib text only."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    docs = [topics[k] for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs += [(stdlib / m).read_text(encoding="utf-8") for m in STDLIB_MODULES if (stdlib / m).is_file()]
    chats: list[str] = []
    for key in sorted(topics):
        name = key.replace("-", " ")
        paras = [p.strip() for p in topics[key].split("\n\n") if 40 < len(p.strip()) < 600]
        for para in paras[:12]:
            q = rng.choice(USER_TEMPLATES).format(name)
            chats.append(f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{para}{IM_END}\n")
    words = sorted(
        {w for text in topics.values() for w in text.lower().split() if w.isalpha() and 2 < len(w) < 12}
    )
    chats += json_chats(words, 10000, rng)
    chats += repeat_chats(words, 12000, rng)
    return docs, chats


KEYS = (
    "name",
    "kind",
    "size",
    "color",
    "count",
    "level",
    "section",
    "topic",
    "owner",
    "mode",
    "limit",
    "index",
)
RECORD_TEMPLATES = (
    "make a record with {pairs}",
    "{pairs}",
    "store {pairs} as json",
    "json for {pairs} please",
    "Create an entry: {pairs}.",
)


def json_chats(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Generic "fields in words → one-line JSON" chats, so the base knows JSON and copying words/numbers.

    The keys are unrelated to the demo task's schema, so the base still cannot do the smart-home task.
    """
    chats = []
    for _ in range(n):
        keys = rng.sample(KEYS, rng.randint(1, 4))
        vals: list[str | int] = [
            rng.choice(words) if rng.random() < 0.6 else rng.randint(0, 999) for _ in keys
        ]
        sep = rng.choice([" ", " is ", " = ", ": "])
        pairs = ", ".join(f"{k}{sep}{v}" for k, v in zip(keys, vals, strict=True))
        q = rng.choice(RECORD_TEMPLATES).format(pairs=pairs)
        a = json.dumps(dict(zip(keys, vals, strict=True)), separators=(",", ":"))
        chats.append(f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n")
    return chats


REPEAT_TEMPLATES = ("repeat: {}", "say {}", "Copy this: {}", "echo {}")


def repeat_chats(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Chats "repeat: w1 w2 ..." → "w1 w2 ...": plain copying, which small models learn late from text alone."""
    chats = []
    for _ in range(n):
        items = [
            rng.choice(words) if rng.random() < 0.5 else str(rng.randint(0, 120))
            for _ in range(rng.randint(1, 10))
        ]
        text = " ".join(items)
        q = rng.choice(REPEAT_TEMPLATES).format(text)
        chats.append(f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{text}{IM_END}\n")
    return chats


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the full 256-byte alphabet, single digits, ChatML special tokens, no BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path):
    """Wrap in a transformers fast tokenizer with the ChatML template and save; returns the HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOT,
        unk_token=None,
        bos_token=None,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(out)
    return hf


def stream(hf, docs: list[str], chats: list[str], seed: int) -> torch.Tensor:
    """All documents and chats, shuffled, tokenized and joined by <|endoftext|>, as one id stream."""
    items = docs + chats
    random.Random(seed).shuffle(items)
    eot = hf.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for text in items:
        ids += hf(text, add_special_tokens=False)["input_ids"] + [eot]
    return torch.tensor(ids, dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    t0 = time.time()
    docs, chats = corpus(args.seed)
    print(f"corpus: {len(docs)} docs {sum(map(len, docs))} chars, {len(chats)} chats", flush=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = train_tokenizer(docs + chats, args.vocab)
    hf = save_tokenizer(tok, tmp)
    data = stream(hf, docs, chats, args.seed)
    print(f"tokenizer: vocab {len(hf)}; stream {len(data)} tokens ({time.time() - t0:.0f}s)", flush=True)

    eos, pad = hf.convert_tokens_to_ids(IM_END), hf.convert_tokens_to_ids(EOT)
    config = LlamaConfig(
        vocab_size=len(hf),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm))))

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t1 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s : s + args.seq] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        # bf16 autocast: ~20% faster on CPUs with avx512_bf16/AMX; the weights stay float32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            el = time.time() - t1
            print(
                f"step {step:4d}/{args.steps} loss {loss.item():.3f} lr {lr_at(step):.2e} {el:.0f}s",
                flush=True,
            )

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad, do_sample=False, max_new_tokens=64
    )
    model.save_pretrained(tmp)
    (tmp / "TRAINING.json").write_text(
        json.dumps(
            {
                "script": "scripts/train_demo_model.py",
                "args": {k: str(v) for k, v in vars(args).items()},
                "params": n_params,
                "final_loss": round(loss.item(), 4),
                "train_seconds": round(time.time() - t1),
                "corpus": "pydoc_data.topics + stdlib sources (" + ", ".join(STDLIB_MODULES) + "), "
                f"{len(chats)} ChatML chats (topics, generic fields->JSON, repeat/copy); no smart-home data",
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"saved {args.out} ({size:.1f} MB) in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
