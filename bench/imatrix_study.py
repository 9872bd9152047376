"""Does an importance matrix from the fine-tuning data beat none, and one from generic text?

    python bench/imatrix_study.py                       # one calibration sample; cached under --work
    python bench/imatrix_study.py --seeds 0 1 2         # three calibration samples (noise)

Steps, each cached under --work (default /tmp/edgeft-imatrix-study) so a rerun only measures again:
1. a base bigger than the demo's, grown from it: the demo's 4 trained layers interleaved with 4 fresh ones
   whose o_proj and down_proj start at zero (so it starts out computing the demo's logits exactly), then
   pretrained further on the demo's own offline corpus and tokenizer (scripts/train_demo_model.py corpus,
   stream; no smart-home data) in float32: Llama, hidden 256, 8 layers, intermediate 768 (every row a
   multiple of 256, so q4_k_m is real Q4_K), 7.3M parameters vs 4.2M. Pretraining a 14.7M 512x4 base from
   scratch instead took 24 minutes on this machine and could not learn the task (0% held-out after LoRA);
2. LoRA fine-tune on the demo task (edgeft/demo/data/smarthome.jsonl) and merge with edgeft's own stages
   (edgeft.finetune.finetune, edgeft.merge.merge), as `edgeft build` runs them;
3. per calibration seed, two importance matrices from the merged float model (edgeft.formats.gguf.imatrix.compute_imatrix,
   the same token budget for both, default 16384 tokens: edgeft build's):
   - "ft-data": the fine-tune's TRAINING split only (never the held-out one), whole conversations (answer
     included, as `edgeft build` calibrates), shuffled by the seed and cut at the budget;
   - "generic": Python documentation text (pydoc_data.topics, the base's own pretraining text), packed into
     ~1500-character chunks; compute_imatrix takes conversations only, so each chunk is one user message
     rendered through the chat template; shuffled by the seed and cut at the same budget;
   - "uniform" (a control, once): every entry 1.0. Giving llama.cpp any imatrix changes more than weights:
     its weighted rounding search runs, and for iq4_nl and q4_0 the first eighth of the layers' ffn_down get
     another type (llama.cpp src/llama-quant.cpp llama_tensor_get_type: iq4_nl keeps Q5_K there only
     WITHOUT an imatrix, q4_0 uses Q4_1 there only WITH one). "KLD vs uniform" is what the data itself buys;
4. q4_k_m, iq4_nl and q4_0 GGUFs from one float GGUF (edgeft.formats.gguf.export), without and with each imatrix;
5. edgeft's verify on the fine-tune's held-out split: one float reference run (TorchRuntime of the merged
   model) compared with every GGUF (llama.cpp): mean and p99 KLD, top-1 agreement, held-out task accuracy
   (exact match of the greedy app-path answer) and answers_match (same answer as the float model).

Results of `--seeds 0 1 2` (docs/benchmarks.md "Importance matrix from your data" has the full tables). On the 2-core
build machine, shared with other jobs and running 1 thread: base 7.4 min, fine-tune 5.7 min, 24 GGUFs measured
in 9.5 min. The float model scores 96.7% (116/120). KLD is relative to the same quant without an imatrix,
averaged over the 3 seeds:

    quant    none KLD  uniform  generic  ft-data  task acc none -> ft-data
    q4_k_m   0.00263   0.96     0.84     0.90     96.7% -> 96.1%
    iq4_nl   0.00389   1.01     1.00     0.95     95.8% -> 95.0%
    q4_0     0.00414   1.03     1.04     1.07     96.7% -> 95.8%

`--threads 2` pretrains a different base (float sums depend on the thread count; float 95.8%). Seed 0 there,
with the "+head" sources (tied_head=True: token_embd.weight weighted by the head's inputs) and "mix":

    quant    none KLD  uniform  generic  ft-data  generic+head  ft-data+head  mix+head
    q4_k_m   0.0024    0.95     1.00     1.11     1.04          1.04          1.06
    iq4_nl   0.0033    1.17     1.16     1.18     1.17          1.17          1.09
    q4_0     0.0054    0.91     0.81     0.81     0.81          0.83          0.84

The goal (ft-data KLD <= 0.8x none, task accuracy no lower) is met on neither base, and the sign of the
effect flips between the two (q4_k_m 0.90 -> 1.11, q4_0 1.07 -> 0.81): at these sizes the base's weights
decide more than the calibration data. `--base DIR` runs the study on a real pretrained model instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

    from edgeft.config import LoraSettings
    from edgeft.formats.gguf.imatrix import Imatrix
    from edgeft.verify import EvalSet, ReferenceRun

ROOT = Path(__file__).resolve().parents[1]
QUANTS = ("q4_k_m", "iq4_nl", "q4_0")
SOURCES = ("none", "uniform", "generic", "ft-data", "generic+head", "ft-data+head", "mix+head")
CALIBRATIONS = SOURCES[2:]  # those computed from text, per seed
CHUNK_CHARS = 1500


@dataclass(frozen=True)
class Growth:
    """How the bigger base is grown from the demo's and how long it is pretrained further."""

    layers: int = 8  # the demo's 4 layers, each followed by a new one
    steps: int = 150
    batch: int = 16
    seq: int = 128
    lr: float = 1e-3
    seed: int = 0

    @property
    def name(self) -> str:
        return f"base-demo-x{self.layers}l-s{self.steps}-b{self.batch}-seed{self.seed}"


@dataclass(frozen=True)
class Row:
    """One quantized artifact's measurement."""

    quant: str
    source: str
    seed: int | None
    size_mb: float
    kld_mean: float
    kld_p99: float
    top1: float
    task_accuracy: float
    answers_match: float
    imatrix_tokens: int | None


def grow(demo: Path, layers: int, seed: int) -> LlamaForCausalLM:
    """The demo model deepened to `layers`: demo layer i becomes layer i·k, the layers between are fresh
    (transformers' init) with o_proj and down_proj zeroed, so the grown model computes the demo's logits."""
    import torch
    from transformers import LlamaForCausalLM

    small = LlamaForCausalLM.from_pretrained(demo, dtype=torch.float32)
    n = small.config.num_hidden_layers
    if layers % n:
        raise SystemExit(f"--layers {layers} should be a multiple of the demo's {n}")
    config = small.config.__class__.from_dict({**small.config.to_dict(), "num_hidden_layers": layers})
    torch.manual_seed(seed)
    big = LlamaForCausalLM(config)
    state = big.state_dict()
    k = layers // n
    for name, tensor in small.state_dict().items():
        if ".layers." in name:
            head, rest = name.split(".layers.", 1)
            i, tail = rest.split(".", 1)
            name = f"{head}.layers.{int(i) * k}.{tail}"
        state[name] = tensor.clone()
    for j in range(layers):
        if j % k:
            state[f"model.layers.{j}.self_attn.o_proj.weight"].zero_()
            state[f"model.layers.{j}.mlp.down_proj.weight"].zero_()
    big.load_state_dict(state)
    return big


def train_base(work: Path, growth: Growth, threads: int) -> Path:
    """The bigger base: the demo grown in depth (`grow`) and pretrained further on the demo's own offline
    corpus (scripts/train_demo_model.py: corpus, stream), float32; reused while its folder exists."""
    import math
    import shutil

    import torch

    from edgeft.demo import DEMO_MODEL
    from edgeft.loading import copy_tokenizer_files, load_tokenizer

    out = work / growth.name
    if (out / "TRAINING.json").is_file():
        return out
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_demo_model as tdm

    t0 = time.time()
    torch.set_num_threads(threads)
    model = grow(Path(DEMO_MODEL), growth.layers, growth.seed)
    hf = load_tokenizer(Path(DEMO_MODEL), notify=False)
    docs, chats = tdm.corpus(growth.seed)  # the demo's corpus and tokenizer: no smart-home data
    data = tdm.stream(hf, docs, chats, growth.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=growth.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, growth.steps // 10)
    gen = torch.Generator().manual_seed(growth.seed)
    model.train()
    for step in range(growth.steps):
        frac = max(0.0, (step - warm) / max(1, growth.steps - warm))
        lr = growth.lr * min((step + 1) / warm, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - growth.seq - 1, (growth.batch,), generator=gen)
        batch = torch.stack([data[s : s + growth.seq] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == growth.steps - 1:
            print(
                f"base step {step}/{growth.steps} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True
            )
    model.eval()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config = model.generation_config.__class__.from_pretrained(DEMO_MODEL)
    model.save_pretrained(tmp)
    copy_tokenizer_files(Path(DEMO_MODEL), tmp)
    params = sum(p.numel() for p in model.parameters())
    record = {"grown_from": "edgeft/demo/model", **growth.__dict__, "params": params}
    record |= {"final_loss": round(loss.item(), 4), "seconds": round(time.time() - t0)}
    (tmp / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(out)
    print(f"base: {params / 1e6:.2f}M params, {record['seconds']}s", flush=True)
    return out


def finetune_merge(work: Path, base: Path, data_path: Path, lora: LoraSettings) -> Path:
    """LoRA fine-tune + merge with edgeft's own stages; cached by a digest of the inputs (as build does)."""
    from edgeft import files
    from edgeft.finetune import finetune
    from edgeft.loading import model_fingerprint
    from edgeft.merge import merge

    key = files.digest(["study", model_fingerprint(str(base)), files.sha256_file(data_path), repr(lora)])
    merged = work / f"merged-{key[:12]}"
    if files.done_with(merged, key):
        return merged
    files.forget(merged)
    adapter = work / f"adapter-{key[:12]}"
    ft = finetune(str(base), data_path, adapter, lora, checkpoint_dir=work / f"checkpoints-{key[:12]}")
    print(
        f"fine-tune: {ft.train_examples} train / {ft.eval_examples} held-out examples, {ft.seconds:.0f}s, "
        f"held-out loss {ft.eval_loss:.3f}",
        flush=True,
    )
    merge(str(base), adapter, merged)
    files.mark_done(merged, key)
    return merged


def ft_conversations(data_path: Path, lora: LoraSettings, seed: int) -> list[list[dict[str, str]]]:
    """The fine-tune's training split (never the held-out one), whole conversations, shuffled by `seed`."""
    from edgeft import data

    train, _ = data.load_split(data_path, lora.eval_fraction, lora.seed, lora.max_eval)
    convs = [[dict(m) for m in ex.messages] for ex in train]
    random.Random(seed).shuffle(convs)
    return convs


def generic_conversations(seed: int) -> list[list[dict[str, str]]]:
    """Python documentation (pydoc_data.topics) in ~CHUNK_CHARS chunks, each one user message, shuffled."""
    from pydoc_data.topics import topics

    chunks: list[str] = []
    for key in sorted(topics):
        cur = ""
        for para in (p.strip() for p in topics[key].split("\n\n")):
            if cur and len(cur) + len(para) > CHUNK_CHARS:
                chunks.append(cur)
                cur = ""
            cur = f"{cur}\n\n{para}" if cur else para[: 2 * CHUNK_CHARS]
        if cur:
            chunks.append(cur)
    random.Random(seed).shuffle(chunks)
    return [[{"role": "user", "content": c}] for c in chunks]


def measure(
    ref: ReferenceRun,
    evalset: EvalSet,
    path: Path,
    threads: int,
    quant: str,
    source: str,
    seed: int | None,
    tokens: int | None,
) -> Row:
    """verify.compare of one GGUF against the shared reference run."""
    from edgeft import verify
    from edgeft.formats import open_runtime

    rt = open_runtime(path, threads=threads, n_ctx=evalset.n_ctx)
    try:
        d = verify.compare(ref, rt, evalset)
    finally:
        rt.close()
    row = Row(
        quant,
        source,
        seed,
        path.stat().st_size / 1e6,
        d.kld_mean,
        d.kld_p99,
        d.top1,
        float(d.task_accuracy or 0.0),
        d.answers_match,
        tokens,
    )
    print(f"  {quant} {source} seed={seed}: KLD {row.kld_mean:.4f}, task {row.task_accuracy:.1%}", flush=True)
    return row


def table(rows: list[Row], float_acc: float, quants: tuple[str, ...] = QUANTS) -> str:
    """Markdown table: per quant and imatrix source (mean ± spread over seeds when several)."""
    lines = [
        f"float model (PyTorch fp32) held-out task accuracy: {float_acc:.1%}",
        "",
        "| quant | imatrix | size MB | mean KLD | KLD p99 | top-1 | task acc | answers_match | KLD vs none "
        "| KLD vs uniform |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for quant in quants:
        none = next(r.kld_mean for r in rows if r.quant == quant and r.source == "none")
        uniform = next((r.kld_mean for r in rows if r.quant == quant and r.source == "uniform"), None)
        for source in SOURCES:
            group = [r for r in rows if r.quant == quant and r.source == source]
            if not group:
                continue

            def cell(attr: str, fmt: str, group: list[Row] = group) -> str:
                vals = [getattr(r, attr) for r in group]
                mean = sum(vals) / len(vals)
                if len(vals) == 1:
                    return format(mean, fmt)
                return f"{format(mean, fmt)} ({format(min(vals), fmt)}–{format(max(vals), fmt)})"

            def ratio(base: float | None, group: list[Row] = group) -> str:
                if base is None:
                    return "–"
                ratios = [r.kld_mean / base for r in group]
                out = f"{sum(ratios) / len(ratios):.2f}"
                return out + (f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else "")

            label = source if len(group) == 1 or source == "none" else f"{source} ×{len(group)} seeds"
            lines.append(
                f"| {quant} | {label} | {group[0].size_mb:.2f} | {cell('kld_mean', '.4f')} | "
                f"{cell('kld_p99', '.3f')} | {cell('top1', '.3f')} | {cell('task_accuracy', '.1%')} | "
                f"{cell('answers_match', '.1%')} | {ratio(none)} | {ratio(uniform)} |"
            )
    return "\n".join(lines)


def verdicts(rows: list[Row], float_acc: float, quants: tuple[str, ...] = QUANTS) -> list[str]:
    """The goal per quant: ft-data KLD ≤ 0.8× none (mean over seeds) and task accuracy no lower than none."""
    out = []
    for quant in quants:
        none = next(r for r in rows if r.quant == quant and r.source == "none")
        ft = [r for r in rows if r.quant == quant and r.source == "ft-data"]
        if not ft:
            continue  # --sources without ft-data: no verdict to give
        ratio = sum(r.kld_mean for r in ft) / len(ft) / none.kld_mean
        acc = sum(r.task_accuracy for r in ft) / len(ft)
        ok = ratio <= 0.8 and acc >= none.task_accuracy
        out.append(
            f"{quant}: ft-data KLD {ratio:.2f}x none (goal <= 0.80), task accuracy {acc:.1%} vs none "
            f"{none.task_accuracy:.1%} (float {float_acc:.1%}) -> {'MET' if ok else 'NOT MET'}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeft-imatrix-study"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration sampling seeds")
    ap.add_argument("--imatrix-tokens", type=int, default=16384, help="token budget of every imatrix")
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads")
    ap.add_argument("--layers", type=int, default=Growth.layers, help="layers of the grown base")
    ap.add_argument("--steps", type=int, default=Growth.steps, help="further pretraining steps of the base")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--base",
        help="a pretrained model to fine-tune instead of growing one: an HF folder or builtin:smollm2-135m",
    )
    ap.add_argument("--quants", nargs="+", default=list(QUANTS), help="GGUF quants to measure")
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform-imatrix control")
    ap.add_argument(
        "--sources", nargs="+", choices=CALIBRATIONS, default=list(CALIBRATIONS), help="imatrices"
    )
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from edgeft import verify
    from edgeft.config import LoraSettings
    from edgeft.demo import DEMO_DATA
    from edgeft.formats.gguf.export import export_float_gguf, export_gguf
    from edgeft.formats.gguf.imatrix import Imatrix, compute_imatrix
    from edgeft.formats.torch.runtime import TorchRuntime
    from edgeft.loading import load_tokenizer

    torch.set_num_threads(args.threads)
    t0 = time.time()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    from edgeft.builtin import model_source

    base = (
        Path(model_source(args.base))
        if args.base
        else train_base(work, Growth(layers=args.layers, steps=args.steps), args.threads)
    )
    lora = LoraSettings()  # edgeft's defaults (lr and epochs chosen for the model's size, r 16)
    quants = tuple(args.quants)
    merged = finetune_merge(work, base, Path(DEMO_DATA), lora)
    print(f"base + fine-tune ready ({time.time() - t0:.0f}s): {merged}", flush=True)

    examples, source = verify.eval_examples(merged, None)
    evalset = verify.make_eval_set(load_tokenizer(merged, notify=False), examples, source=source)
    prompts = [ex.prompt_messages for ex in evalset.examples]
    gguf_dir = work / f"gguf-{merged.name}"
    float_gguf = gguf_dir / "model-f16.gguf"
    base_gguf = (
        float_gguf if float_gguf.is_file() else export_float_gguf(merged, gguf_dir, conversations=prompts)
    )

    ref_rt = TorchRuntime(merged, threads=args.threads)
    ref = verify.run_reference(ref_rt, evalset)
    float_acc = float(ref.task_accuracy or 0.0)
    print(f"float reference: task accuracy {float_acc:.1%} on {source}", flush=True)
    rows: list[Row] = []

    def run(quant: str, src: str, seed: int | None, imatrix: Imatrix | None) -> None:
        """Quantize from the float GGUF (with `imatrix`, if any) and measure it against the reference."""
        stem = quant if imatrix is None else f"{quant}-{src}" + (f"-seed{seed}" if seed is not None else "")
        out = gguf_dir / f"model-{stem}.gguf"
        export_gguf(merged, out, quant, imatrix=imatrix, threads=args.threads, float_gguf=base_gguf)
        tokens = imatrix.tokens if imatrix is not None else None
        rows.append(measure(ref, evalset, out, args.threads, quant, src, seed, tokens))

    try:
        for quant in quants:
            run(quant, "none", None, None)
        if not args.no_uniform:
            # "uniform": every entry 1.0 — llama.cpp's imatrix code path and tensor-type choices with no data
            keys = compute_imatrix(merged, generic_conversations(0)[:1], threads=args.threads, max_tokens=64)
            ones = {name: np.ones_like(v) for name, v in keys.values.items()}
            digest = hashlib.sha256(b"uniform").hexdigest()
            uniform = Imatrix(ones, examples=1, tokens=0, dataset_sha256=digest)
            for quant in quants:
                run(quant, "uniform", None, uniform)
        for seed in args.seeds:
            texts = {
                "generic": generic_conversations(seed),
                "ft-data": ft_conversations(Path(DEMO_DATA), lora, seed),
            }
            for src in args.sources:
                kind, _, head = src.partition("+")
                kw = {"threads": args.threads, "tied_head": bool(head)}
                if kind == "mix":  # half the budget from each; means of squares combine weighted by tokens
                    half = args.imatrix_tokens // 2
                    a, b = (
                        compute_imatrix(merged, texts[k], max_tokens=half, **kw)
                        for k in ("ft-data", "generic")
                    )
                    vals = {
                        n: (a.values[n] * a.tokens + b.values[n] * b.tokens) / (a.tokens + b.tokens)
                        for n in a.values
                    }
                    digest = hashlib.sha256((a.dataset_sha256 + b.dataset_sha256).encode()).hexdigest()
                    imx = Imatrix(vals, a.examples + b.examples, a.tokens + b.tokens, digest)
                else:
                    imx = compute_imatrix(merged, texts[kind], max_tokens=args.imatrix_tokens, **kw)
                print(f"seed {seed} {src}: {imx.summary()}", flush=True)
                for quant in quants:
                    run(quant, src, seed, imx)
    finally:
        ref_rt.close()

    print()
    print(table(rows, float_acc, quants))
    print()
    print("\n".join(verdicts(rows, float_acc, quants)))
    print(f"\ntotal {time.time() - t0:.0f}s ({len(evalset.examples)} held-out examples)")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
