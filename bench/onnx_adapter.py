"""What an onnxruntime-genai LoRA adapter costs at decode against the merged model of the same quant, on the
built-in demo, and whether base + adapter answers exactly as the merged model does.

    python bench/onnx_adapter.py                          # --out /tmp/edgeft-onnx-adapter, 64 decode tokens
    python bench/onnx_adapter.py --out /tmp/x --tokens 128 --runs 10

Run it on an otherwise idle machine: decode speed of a model this small is easily moved by other jobs (the
load average is printed with the numbers).

Steps: `edgeft build --keep-work --target raspberrypi` once gives a fine-tuned LoRA adapter of the demo model
(OUT/build/.work/build/adapter, peft) and the merged float model (.../merged). onnxruntime-genai's model
builder then writes, at int4 for the CPU EP: the merged model; the base model with the adapter as graph
inputs; the plain base model; and the base model with `adapter_path` exactly as the builder does it. The
builder's `adapter_path` bakes the LoRA A/B weights into the graph as extra MatMuls quantized to int4 like
the rest (onnxruntime_genai/models/builders/base.py make_matmul_lora, then to_nbits); it writes no adapter
inputs and no adapter file. So for the adapter-input model the LoRA MatMuls are kept float
(`nodes_to_exclude`), and their weights become graph inputs with a symbolic `lora_r` dim and an empty
(lora_r = 0) default, written to an .onnx_adapter file with onnxruntime.AdapterFormat: what Olive's
ExtractAdapters pass does for onnxruntime-genai's multi-LoRA. At run time the file is loaded with
og.Adapters(model).load(path, name) and switched on per generator with generator.set_active_adapter(adapters,
name).

Measured in one fresh child process (no torch in it), each variant loaded once, 2 threads: 5 held-out prompts
of the fine-tune answered greedily, up to --tokens tokens or the end of the turn (greedy tokens compared with
the merged model's; this also warms every variant up), then a warm-up round and --runs (3) interleaved rounds
of one timed run per variant on the first held-out prompt: prefill (append_tokens and the first token), then
--tokens decode steps with min_length = max_length so nothing stops early; the best run counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("/tmp/edgeft-onnx-adapter")
TARGET = "raspberrypi"
PRECISION = "int4"
THREADS = 2
PROMPTS = 5
ADAPTER_NAME = "demo"
ADAPTER_FILE = "demo.onnx_adapter"
PEFT_WEIGHTS = "adapter_model.safetensors"
# What issue #1661 (microsoft/onnxruntime-genai, "LORA speed degradation") reports: a rank-8 adapter on
# Llama-3.2-1B-Instruct int4 (Olive auto-opt with the model builder, CPU) generating ~30% slower than the
# vanilla ONNX model without LoRA.
REPORTED_COST = 0.30
FAILED_PREFIX = "onnx_adapter: not possible: "

MERGED = "merged int4"
ACTIVE = "base + adapter inputs, adapter active"
INACTIVE = "base + adapter inputs, none active"
BASE = "base int4 (no LoRA nodes)"
BAKED = "builder adapter_path as is (LoRA baked int4)"
VARIANTS = (MERGED, ACTIVE, INACTIVE, BASE, BAKED)

# A peft LoRA weight of a decoder layer as peft saves it, "<module path>.lora_A.weight" (ref: peft
# utils/save_and_load.py get_peft_model_state_dict, which drops the adapter name),
# and the builder's node name for that MatMul: "/model/layers.{i}/attn/q_proj/MatMul" and ".../mlp/..."
# (ref: onnxruntime_genai/models/builders/base.py make_attention, make_mlp_proj), the LoRA path inserting
# "lora_A"/"lora_B" before the last part (make_matmul_lora).
_PEFT_LORA_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_BUILDER_BLOCK = {"self_attn": "attn", "mlp": "mlp"}


class Failed(Exception):
    """A step that cannot be done, as "STEP: WHY": printed as one line, exit 1."""

    def __init__(self, step: str, why: str | None = None) -> None:
        super().__init__(step if why is None else f"{step}: {why}")


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def last_line(path: Path) -> str:
    lines = [
        ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]
    return lines[-1] if lines else "(no output)"


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


# --- 1. the fine-tuned adapter ---------------------------------------------------------------------------


def demo_adapter(out: Path) -> tuple[Path, Path]:
    """(peft adapter dir, merged float model dir) of one `edgeft build` of the demo, built once."""
    build = out / "build"
    # ref: edgeft/stages.py: a build keeps its work in OUT/.work/build (WORK), the LoRA fine-tune writes
    # work/"adapter" and the merge work/"merged".
    work = build / ".work" / "build"
    adapter, merged = work / "adapter", work / "merged"
    if not (adapter / PEFT_WEIGHTS).is_file():
        log = out / "edgeft-build.log"
        cmd = [sys.executable, "-m", "edgeft", "build", "--out", str(build), "--keep-work"]
        cmd += ["--target", TARGET]
        print(f"building the demo adapter: {' '.join(cmd[1:])} (log: {log})", flush=True)
        with open(log, "w", encoding="utf-8") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        have = (adapter / PEFT_WEIGHTS).is_file() and (merged / "model.safetensors").is_file()
        if rc and not have:
            raise Failed("edgeft build", f"exit {rc}: {last_line(log)} (log: {log})")
        if rc:  # a later stage (export, verify, bench) failed; the adapter and merged model are written
            print(f"note: edgeft build exited {rc} after the fine-tune and merge ({last_line(log)})")
    for p in (adapter / "adapter_config.json", adapter / PEFT_WEIGHTS, merged / "config.json"):
        if not p.is_file():
            raise Failed(
                "build layout", f"{p} is missing (edgeft/stages.py says where a build keeps its work)"
            )
    return adapter, merged


def lora_matmul_names(adapter: Path) -> list[str]:
    """The builder's names of the adapter's LoRA A/B MatMuls (before quantization renames them)."""
    from safetensors import safe_open

    names = set()
    with safe_open(str(adapter / PEFT_WEIGHTS), "np") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
            m = _PEFT_LORA_KEY.search(key)
            if not m or m.group(2) not in _BUILDER_BLOCK:
                raise Failed(
                    "adapter", f"{key}: not a LoRA A/B weight of a layer's attention or MLP projection"
                )
            layer, block, proj, ab = m.groups()
            names.add(f"/model/layers.{layer}/{_BUILDER_BLOCK[block]}/{proj}/lora_{ab}/MatMul")
    return sorted(names)


# --- 2. the onnxruntime-genai models ---------------------------------------------------------------------


def run_builder(name: str, model_dir: Path, out_dir: Path, work: Path, options: list[str]) -> None:
    """onnxruntime-genai's model builder on `model_dir`, as edgeft's ONNX export calls it (staged input dir,
    config fixes, output to a log), with `options` as extra KEY=VALUE options."""
    from edgeft.formats.onnx.constants import ONNX_EXECUTION_PROVIDER as EP
    from edgeft.formats.onnx.export import _fix_builder_config, _import_builder, _quiet, _stage_input

    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = str(work / "cache")
    try:
        builder = _import_builder()
        stage = _stage_input(model_dir, work)
        with _quiet(work / "builder.log"):
            # ref: builder.py __main__: parse_extra_options (loads the HF config, and with adapter_path the
            # peft config into it) then create_model.
            kv = builder.parse_extra_options(
                None, str(stage), str(out_dir), PRECISION, EP, cache, ["hf_token=false", *options]
            )
            _fix_builder_config(kv["hf_details"]["hf_config"])
            builder.create_model(None, str(stage), str(out_dir), PRECISION, EP, cache, **kv)
    except Failed:
        raise
    except Exception as e:  # noqa: BLE001 - the builder raises anything from ValueError to torch errors
        raise Failed(f"model builder ({name})", f"{first_line(e)} (log: {work / 'builder.log'})") from None


def graph_ops(folder: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def make_adapter_inputs(folder: Path, adapter_file: Path, expected: list[str]) -> dict[str, Any]:
    """Turn the float LoRA A/B weights of the builder's graph in `folder` into optional graph inputs and
    write their values to `adapter_file` (onnxruntime's adapter format); returns what was extracted."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort

    model = ir.load(str(folder / "model.onnx"))
    lora = [n for n in model.graph if "/lora_A/" in (n.name or "") or "/lora_B/" in (n.name or "")]
    not_float = [f"{n.name} ({n.op_type})" for n in lora if n.op_type != "MatMul"]
    if not_float:
        raise Failed(
            "adapter inputs",
            f"{len(not_float)} LoRA nodes were quantized despite nodes_to_exclude, e.g. {not_float[0]}",
        )
    found = {n.name for n in lora}
    if found != set(expected):
        missing, extra = sorted(set(expected) - found), sorted(found - set(expected))
        raise Failed("adapter inputs", f"LoRA MatMuls missing {missing[:2]} / unexpected {extra[:2]}")
    weights: dict[str, np.ndarray] = {}
    ranks = set()
    for node in lora:
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.const_value is None:
            raise Failed("adapter inputs", f"{node.name}: its weight is not an initializer")
        arr = np.array(w.const_value.numpy())  # [in, r] for lora_A, [r, out] for lora_B (scaling folded in)
        axis = 1 if "/lora_A/" in node.name else 0
        ranks.add(arr.shape[axis])
        weights[str(w.name)] = arr
        # ref: microsoft/Olive olive/passes/onnx/extract_adapters.py (_convert_initializer_to_input,
        # _make_dynamic_optional): the weight becomes a graph input whose lora_r dim is symbolic, and keeps an
        # initializer with lora_r = 0 as its default, so without an active adapter ORT feeds the empty one and
        # the LoRA path adds zeros.
        empty = list(arr.shape)
        empty[axis] = 0
        dims: list[int | str] = list(arr.shape)
        dims[axis] = "lora_r"
        w.const_value = ir.tensor(np.zeros(empty, dtype=arr.dtype), name=w.name)
        w.shape = ir.Shape(dims)
        model.graph.inputs.append(w)
    # Saved beside the files it reads from (external data is read lazily), then moved over them.
    staged = folder / "staged"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    ir.save(model, str(staged / "model.onnx"), external_data="model.onnx.data")
    del model
    for name in ("model.onnx", "model.onnx.data"):
        (staged / name).replace(folder / name)
    staged.rmdir()
    # ref: onnxruntime/capi/convert_npz_to_onnx_adapter.py in the onnxruntime wheel (AdapterFormat,
    # set_parameters with OrtValues, export_adapter).
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in weights.items()})
    fmt.export_adapter(str(adapter_file))
    return {
        "tensors": len(weights),
        "params": int(sum(v.size for v in weights.values())),
        "ranks": sorted(ranks),
    }


# --- 3./4. measuring: a fresh child process --------------------------------------------------------------


class GenaiEngine:
    """An onnxruntime-genai model folder, optionally with an adapter file active on every generator."""

    def __init__(self, folder: Path, adapter_file: Path | None, threads: int) -> None:
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(folder))
        # ref: onnxruntime-genai src/config.h, Config::SessionOptions intra_op_num_threads (as
        # edgeft/device/bench_on_device.py OrtGenaiEngine sets them).
        overlay = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": overlay}}}))
        self.model = og.Model(config)
        self.adapters: Any = None
        if adapter_file is not None:
            # ref: onnxruntime-genai src/models/adapters.cpp (Adapters::LoadAdapter: an OrtLoraAdapter per
            # name) and src/python/python.cpp (Adapters.load, Generator.set_active_adapter).
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter_file), ADAPTER_NAME)
        self.gen: Any = None

    def start(self, ids: list[int], max_length: int, min_length: int) -> int:
        """Prefill `ids` from an empty context; the first greedy token."""
        self.gen = None  # free the last run's KV cache first
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length, min_length=min_length)
        self.gen = self._og.Generator(self.model, params)
        if self.adapters is not None:
            self.gen.set_active_adapter(self.adapters, ADAPTER_NAME)
        self.gen.append_tokens(ids)  # runs the prompt; the first generate_next_token only picks from it
        return self.step()

    def step(self) -> int:
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy answers and timings of every variant in `spec` (run in the child process)."""
    n, stops = int(spec["tokens"]), set(spec["stop_ids"])
    step = "start"

    def at(what: str) -> None:
        nonlocal step
        step = what
        print(f"step: {what}", file=sys.stderr, flush=True)  # the parent names the last one on a crash

    try:
        engines = {}
        for name, v in spec["variants"].items():
            at(f"load {name}")
            adapter = Path(v["adapter"]) if v["adapter"] else None
            engines[name] = GenaiEngine(Path(v["folder"]), adapter, int(spec["threads"]))
        answers: dict[str, list[list[int]]] = {name: [] for name in engines}
        for name, eng in engines.items():
            at(f"answers {name}")
            for ids in spec["prompts"]:
                out = [eng.start(ids, len(ids) + n, 0)]
                while out[-1] not in stops and len(out) < n and not eng.gen.is_done():
                    out.append(eng.step())
                answers[name].append(out)
        ids = spec["prompts"][0]
        length = len(ids) + n + 1  # the first token and n decode steps, min_length = max_length: no early end
        timed: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in engines}
        tokens: dict[str, list[int]] = {}
        for r in range(int(spec["runs"]) + 1):  # round 0 warms up
            for name, eng in engines.items():
                at(f"timing {name} round {r}")
                t0 = time.perf_counter()
                out = [eng.start(ids, length, length)]
                t1 = time.perf_counter()
                for _ in range(n):
                    out.append(eng.step())
                t2 = time.perf_counter()
                if tokens.setdefault(name, out) != out:
                    raise RuntimeError(f"{name}: greedy tokens differ between runs")
                if r:
                    timed[name]["prefill"].append(t1 - t0)
                    timed[name]["decode"].append(t2 - t1)
        engines.clear()
    except Exception as e:  # noqa: BLE001 - onnxruntime(-genai) raises RuntimeError and its own types
        raise Failed(f"onnxruntime-genai, {step}", first_line(e)) from None
    return {"answers": answers, "timed": timed}


def run_child(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    spec_path, result_path = work / "measure-spec.json", work / "measure-result.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--measure", str(spec_path), str(result_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode < 0:  # killed by a signal: onnxruntime crashed in native code
        step = next((ln[6:] for ln in reversed(lines) if ln.startswith("step: ")), "start")
        raise Failed(f"onnxruntime-genai, {step}", f"the process died with signal {-proc.returncode}")
    if proc.returncode:
        last = lines[-1] if lines else f"measure: exit {proc.returncode}"
        raise Failed(last.removeprefix(FAILED_PREFIX))
    return json.loads(result_path.read_text(encoding="utf-8"))


# --- the whole run ------------------------------------------------------------------------------------


def held_out(merged: Path) -> tuple[list[Any], str]:
    """PROMPTS examples of the fine-tune's held-out split (the last lines of the demo data without one)."""
    from edgeft import data, verify
    from edgeft.demo import DEMO_DATA

    examples, source = verify.eval_examples(merged, None)
    if not examples:
        examples, source = (
            data.load_jsonl(Path(DEMO_DATA))[-PROMPTS:],
            f"the last {PROMPTS} lines of {DEMO_DATA}",
        )
    return list(examples)[:PROMPTS], source


def run(out: Path, tokens: int, runs: int) -> None:
    from edgeft.data import answer_text_matches, prompt_ids, stop_ids
    from edgeft.demo import DEMO_MODEL
    from edgeft.files import tree_bytes
    from edgeft.loading import load_tokenizer

    load = os.getloadavg()[0]  # before any work of ours: what else runs on the machine
    out.mkdir(parents=True, exist_ok=True)
    adapter, merged = demo_adapter(out)
    peft_cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    onnx_dir, work = out / "onnx", out / "work"
    folders = {
        MERGED: onnx_dir / "merged-int4",
        ACTIVE: onnx_dir / "lora-inputs-int4",
        BASE: onnx_dir / "base-int4",
        BAKED: onnx_dir / "lora-baked-int4",
    }
    folders[INACTIVE] = folders[ACTIVE]
    adapter_file = onnx_dir / ADAPTER_FILE
    lora_names = lora_matmul_names(adapter)

    print("building the onnxruntime-genai models (int4, cpu)", flush=True)
    run_builder(MERGED, merged, folders[MERGED], work / "merged", [])
    run_builder(BASE, DEMO_MODEL, folders[BASE], work / "base", [])
    run_builder(BAKED, DEMO_MODEL, folders[BAKED], work / "baked", [f"adapter_path={adapter}"])
    # ref: builder.py --extra_options help: nodes_to_exclude = node names kept out of int4/int8 weight-only
    # quantization, comma-separated.
    inputs_opts = [f"adapter_path={adapter}", "nodes_to_exclude=" + ",".join(lora_names)]
    run_builder(ACTIVE, DEMO_MODEL, folders[ACTIVE], work / "inputs", inputs_opts)
    baked_ops = graph_ops(folders[BAKED])
    extracted = make_adapter_inputs(folders[ACTIVE], adapter_file, lora_names)

    tok = load_tokenizer(merged, notify=False)
    examples, source = held_out(merged)
    prompts = [prompt_ids(tok, ex) for ex in examples]
    genai_cfg = json.loads((folders[MERGED] / "genai_config.json").read_text(encoding="utf-8"))
    context = int(genai_cfg["model"]["context_length"])
    if max(len(p) for p in prompts) + tokens + 1 > context:
        raise Failed("arguments", f"--tokens {tokens} and the prompts do not fit the context of {context}")
    spec = {
        "tokens": tokens,
        "runs": runs,
        "threads": THREADS,
        "stop_ids": stop_ids(tok),
        "prompts": prompts,
        "variants": {
            name: {"folder": str(folders[name]), "adapter": str(adapter_file) if name == ACTIVE else None}
            for name in VARIANTS
        },
    }
    print(f"measuring in a fresh process ({len(VARIANTS)} variants, {runs} rounds)", flush=True)
    res = run_child(spec, work)

    # --- summary ---
    timed, answers = res["timed"], res["answers"]
    prefill = {k: len(prompts[0]) / min(v["prefill"]) for k, v in timed.items()}
    decode = {k: tokens / min(v["decode"]) for k, v in timed.items()}
    # the median beside the best shows how much other jobs moved the runs
    decode_median = {k: tokens / statistics.median(v["decode"]) for k, v in timed.items()}
    ops = {k: graph_ops(folders[k]) for k in VARIANTS}
    ops[BAKED] = baked_ops
    sizes = {k: tree_bytes(folders[k]) for k in VARIANTS}  # the .onnx_adapter file is not in any folder

    def cost(name: str, ref: str) -> str:
        return (
            f"{decode[name]:.0f} vs {decode[ref]:.0f} tok/s: {decode[name] / decode[ref] - 1:+.1%} tok/s, "
            f"{decode[ref] / decode[name] - 1:+.1%} time per token"
        )

    def same(a: str, b: str) -> int:
        return sum(x == y for x, y in zip(answers[a], answers[b], strict=True))

    def correct(name: str) -> int:
        """Answers that ended (a stop id) with exactly the expected text before the stop."""
        ok = 0
        for ids, ex in zip(answers[name], examples, strict=True):
            ok += ids[-1] in spec["stop_ids"] and answer_text_matches(tok.decode(ids[:-1]), ex)
        return ok

    cfg = json.loads((DEMO_MODEL / "config.json").read_text(encoding="utf-8"))
    print()
    print(
        f"onnxruntime-genai LoRA adapter vs merged, edgeft demo ({cfg['num_hidden_layers']} layers, hidden "
        f"{cfg['hidden_size']}), {PRECISION} CPU, {THREADS} threads; load average {load:.2f} on "
        f"{os.cpu_count()} cores before the run"
        + (" (other jobs: speeds may be contended)" if load > 0.5 else "")
    )
    print(
        f"adapter: rank {peft_cfg.get('r')} on {', '.join(peft_cfg.get('target_modules') or [])}: "
        f"{extracted['tensors']} tensors, {extracted['params']:,} params; .onnx_adapter "
        f"{mb(tree_bytes(adapter_file))}, peft {PEFT_WEIGHTS} {mb(tree_bytes(adapter / PEFT_WEIGHTS))}"
    )
    print(
        f"timing: prompt {len(prompts[0])} tokens, {tokens} decode tokens, best of {runs} interleaved runs "
        "after a warm-up"
    )
    print()
    print(
        f"{'variant':<47} {'folder':>9} {'MatMulNBits/MatMul':>19} {'prefill tok/s':>14} {'decode tok/s':>13} "
        f"{'(median)':>9}"
    )
    for k in VARIANTS:
        nodes = f"{ops[k].get('MatMulNBits', 0)}/{ops[k].get('MatMul', 0)}"
        size = mb(sizes[k]) if k != INACTIVE else "same"
        print(
            f"{k:<47} {size:>9} {nodes:>19} {prefill[k]:>14.0f} {decode[k]:>13.0f} {decode_median[k]:>9.0f}"
        )
    print()
    print(f"adapter decode cost vs merged int4:  {cost(ACTIVE, MERGED)}")
    print(f"adapter decode cost vs base int4:    {cost(ACTIVE, BASE)}")
    print(f"no adapter active vs base int4:      {cost(INACTIVE, BASE)}")
    print(f"baked LoRA (builder) vs merged int4: {cost(BAKED, MERGED)}")
    print(
        f"(issue #1661: rank-8 adapter on Llama-3.2-1B int4 ~{REPORTED_COST:.0%} slower token generation "
        "than the model without LoRA)"
    )
    print()
    n = len(examples)
    print(f"greedy tokens, {n} prompts of {source}, up to {tokens} tokens or the end of the turn:")
    print(f"  base + adapter == merged int4:           {same(ACTIVE, MERGED)}/{n} identical")
    print(f"  builder baked LoRA == merged int4:       {same(BAKED, MERGED)}/{n} identical")
    print(f"  no adapter active == base int4:          {same(INACTIVE, BASE)}/{n} identical")
    print(
        f"  expected answer reproduced: merged {correct(MERGED)}/{n}, base + adapter {correct(ACTIVE)}/{n}, "
        f"baked {correct(BAKED)}/{n}, base {correct(BASE)}/{n}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"work and output dir (default {DEFAULT_OUT})"
    )
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per timed run (default 64)")
    ap.add_argument("--runs", type=int, default=3, help="timed rounds, the best counts (default 3)")
    ap.add_argument("--measure", nargs=2, type=Path, help=argparse.SUPPRESS)  # the child: SPEC RESULT
    a = ap.parse_args(argv)
    try:
        if a.measure:
            spec = json.loads(a.measure[0].read_text(encoding="utf-8"))
            a.measure[1].write_text(json.dumps(measure(spec)), encoding="utf-8")
            return 0
        if a.tokens < 1 or a.runs < 1:
            raise Failed("arguments", "--tokens and --runs must be at least 1")
        t0 = time.time()
        run(a.out, a.tokens, a.runs)
        print(f"\ntook {time.time() - t0:.0f} s (output in {a.out})")
    except Failed as e:
        print(f"{FAILED_PREFIX}{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
