"""Size, speed and drift of every GGUF quant and the ONNX variants next to PyTorch float, for the demo model and a
SmolLM2-135M-shaped model (random weights; speed only depends on shapes).

    python bench/compare.py                 # both models
    python bench/compare.py --model demo    # just one
    python bench/compare.py --threads 2 --runs 3

Prints one table per model: file size, prefill/decode tok/s, TTFT, peak RSS, drift against the float model
(KLD mean, top-1 agreement) and bytes read per token (edgeft.footprint) × decode tok/s, the memory bandwidth decode used. Decode of
small models is bandwidth-bound (ref: llama-roofline, learn.arm.com llm-decode-roofline), so that last
column says how close to the machine's roofline each engine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from edgeft import bench, verify
from edgeft.formats import export_artifact, open_runtime
from edgeft.loading import load_tokenizer
from edgeft.spec import ArtifactSpec

# (format, quant, accuracy_level): every GGUF quant, and the ONNX variants edgeft ships (int8/int4 with int8
# activations). bench/onnx_int8.py compares accuracy levels and the builder's own default in detail.
VARIANTS = (
    ("gguf", "f32", None),
    ("gguf", "f16", None),
    ("gguf", "q8_0", None),
    ("gguf", "q4_k_m", None),
    ("gguf", "q4_0", None),
    ("onnx", "fp32", None),
    ("onnx", "int8", 4),
    ("onnx", "int4", 4),
)


def smollm2_shaped(out: Path) -> Path:
    """A SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9/3 heads, vocab 49152, tied), random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    from pydoc_data.topics import topics

    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(topics.values(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return out


def run(name: str, model_dir: Path, work: Path, threads: int, runs: int) -> list[dict]:
    es = verify.make_eval_set(load_tokenizer(model_dir, notify=False), None)
    ref_rt = open_runtime(model_dir, threads=threads)
    ref = verify.run_reference(ref_rt, es)
    rows = []
    lat = bench.bench(model_dir, threads=threads, runs=runs)
    rows.append({"model": name, "artifact": "PyTorch fp32", "lat": lat, "kld": 0.0, "top1": 1.0})
    for fmt, q, level in VARIANTS:
        path = export_artifact(model_dir, ArtifactSpec(fmt, q, accuracy_level=level), work / name)
        rt = open_runtime(path, threads=threads, n_ctx=es.n_ctx)
        drift = verify.compare(ref, rt, es)
        rt.close()
        lat = bench.bench(path, threads=threads, runs=runs)
        label = f"{fmt} {q}" + (f" acc{level}" if level else "")
        rows.append({"model": name, "artifact": label, "lat": lat, "kld": drift.kld_mean, "top1": drift.top1})
        print(f"  {name} {q}: done", file=sys.stderr)
    ref_rt.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["demo", "smollm2", "all"], default="all")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from edgeft.demo import DEMO_MODEL

    work = Path(tempfile.mkdtemp(prefix="edgeft-bench-"))
    models = []
    if a.model in ("demo", "all"):
        models.append(("demo", Path(DEMO_MODEL)))
    if a.model in ("smollm2", "all"):
        models.append(("smollm2-135m-shape", smollm2_shaped(work / "smollm2")))
    rows = [r for name, path in models for r in run(name, path, work, a.threads, a.runs)]
    if a.json:
        print(json.dumps([{**r, "lat": r["lat"].__dict__} for r in rows]))
        return
    print(f"threads={a.threads}, 64-token prompt, 64 decode tokens, median of {a.runs} runs after warm-up")
    hdr = (
        f"{'model':<20} {'artifact':<16} {'MB':>7} {'prefill':>8} {'decode':>7} {'TTFT ms':>8} {'RSS MB':>7}"
    )
    print(hdr + f" {'KLD mean':>9} {'top-1':>6} {'GB/s used':>9}")
    for r in rows:
        lat = r["lat"]
        print(
            f"{r['model']:<20} {r['artifact']:<16} {lat.bytes / 1e6:7.1f} {lat.prefill_tok_s:8.0f} "
            f"{lat.decode_tok_s:7.1f} {lat.ttft_ms:8.1f} {lat.peak_rss_mb:7.0f} {r['kld']:9.5f} "
            f"{r['top1']:6.1%} {lat.effective_gb_s:9.2f}"
        )


if __name__ == "__main__":
    main()
