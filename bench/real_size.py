"""Peak RSS and wall time of export + verify for a Qwen2.5-0.5B-shaped model: does a real size fit a laptop?

    python bench/real_size.py                      # 16 eval conversations, 2 threads
    python bench/real_size.py --examples 64 --keep /tmp/q05

The model has Qwen2.5-0.5B-Instruct's real config (hidden 896, 24 layers, 14/2 heads, intermediate 4864,
vocab 151936, tied embeddings, bf16 weights) and random weights; its tokenizer is a small byte-level BPE
trained here (the embedding is padded to 151936 rows as Qwen's is). Each step runs in its own process, so
its peak RSS (VmHWM) is its own: the GGUF exports (q8_0 and q4_k_m through a bf16 intermediate, f16 when
the checkpoint is not bf16), the ONNX int8 export, and verify of each artifact against the float model on
the demo task's conversations (the float model's logits for a 151936-token vocabulary are recomputed per
sequence instead of kept: verify.REFERENCE_CACHE_BYTES).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = {
    "export gguf q8_0": ["export", "--format", "gguf", "--quant", "q8_0", "--out", "{work}/m-q8_0.gguf"],
    "export gguf q4_k_m": [
        "export",
        "--format",
        "gguf",
        "--quant",
        "q4_k_m",
        "--out",
        "{work}/m-q4_k_m.gguf",
    ],
    "export onnx int8": ["export", "--format", "onnx", "--quant", "int8", "--out", "{work}/onnx-int8"],
    "verify gguf q8_0": ["verify", "--artifact", "{work}/m-q8_0.gguf", "--data", "{data}", "--json"],
    "verify onnx int8": ["verify", "--artifact", "{work}/onnx-int8", "--data", "{data}", "--json"],
}


def qwen05_shaped(out: Path) -> Path:
    """Qwen2.5-0.5B's config with random bf16 weights and a locally trained tokenizer."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    from pydoc_data.topics import topics

    regex = (  # Qwen2's split, ref: Qwen2.5 tokenizer.json pre_tokenizer
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(topics.values(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    fast.save_pretrained(out)
    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


def run_step(args: list[str]) -> dict:
    """Run `edgeft ARGS` in a child process; its wall time, peak RSS (from /proc, via a wrapper) and output."""
    wrapper = (
        "import runpy, sys, json, atexit\n"
        "def report():\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
        "    sys.stderr.write('PEAK_RSS_KB ' + hwm[0].split()[1] + '\\n')\n"
        "atexit.register(report)\n"
        "sys.argv = ['edgeft'] + sys.argv[1:]\n"
        "from edgeft.cli import main\n"
        "main()\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak = next((int(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")), 0)
    return {
        "rc": proc.returncode,
        "seconds": seconds,
        "peak_rss_mb": peak / 1024,
        "stdout": proc.stdout,
        "stderr": proc.stderr[-2000:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=16, help="eval conversations from the demo task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="edgeft-realsize-"))
    work.mkdir(parents=True, exist_ok=True)
    model = qwen05_shaped(work / "qwen2.5-0.5b-shaped")
    from edgeft.demo import DEMO_DATA

    data = work / "eval.jsonl"
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()[: a.examples]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2
    print(
        f"model: Qwen2.5-0.5B shape, {params / 1e6:.0f}M parameters (bf16), {a.examples} eval conversations, "
        f"{a.threads} threads, {os.cpu_count()} cores",
        file=sys.stderr,
    )
    rows = []
    for name, tmpl in STEPS.items():
        args = [x.format(work=work, data=data) for x in tmpl] + [
            "--threads",
            str(a.threads),
        ] * name.startswith("verify")
        args = (
            args[:1]
            + (["--model", str(model)] if args[0] == "export" else ["--reference", str(model)])
            + args[1:]
        )
        r = run_step(args)
        if r["rc"] != 0:
            print(f"{name}: failed\n{r['stderr']}", file=sys.stderr)
            sys.exit(1)
        extra = ""
        if name.startswith("verify"):
            rep = json.loads(r["stdout"])
            extra = (
                f"KLD {rep['kld_mean']:.5f}, top-1 {rep['top1']:.1%}, prompts {rep['prompt_ids_match']:.0%}, "
                f"answers {rep['answers_match']:.0%}"
            )
        rows.append((name, r["seconds"], r["peak_rss_mb"], extra))
        print(f"  {name}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB {extra}", file=sys.stderr)
    print("| step | wall s | peak RSS MB | result |")
    print("|---|---|---|---|")
    for name, s, mb, extra in rows:
        print(f"| {name} | {s:.0f} | {mb:.0f} | {extra} |")


if __name__ == "__main__":
    main()
