"""The command line: one table of commands, each a thin wrapper over a stage function.

Errors a user can cause arrive as EdgeftError (or OSError) and are printed as one line with exit code 2.
With `--json` a command prints exactly one JSON object on stdout; progress and messages go to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import EdgeftError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune a Hugging Face causal LM with LoRA and ship it, verified and benchmarked, to small devices.",
)


def _quiet_libraries() -> None:
    """Keep the terminal to edgeft's own progress: no per-file loading bars or deprecation chatter."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While a stage runs, anything written to stdout (library prints, C-level logs) goes to stderr.

    stdout is the result channel: with --json it must hold one JSON object and nothing else.
    """
    _quiet_libraries()
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _emit(obj: Any, as_json: bool) -> None:
    """Print a result: one JSON object on stdout, or a readable summary on stderr."""
    plain = asdict(obj) if is_dataclass(obj) else obj
    if as_json:
        sys.stdout.write(json.dumps(plain, default=str) + "\n")
        return
    from .ui import info

    for key, value in plain.items():
        info(f"{key:>16}: {value:.6g}" if isinstance(value, float) else f"{key:>16}: {value}")


def _key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """`--flag k=v --flag k2=v2` → {k: v, ...}; values are TOML literals (strings when not)."""
    table: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise EdgeftError(f"{flag} {pair}: expected KEY=VALUE")
        try:
            table[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            table[key.strip()] = value
    return table


def _lora_overrides(pairs: list[str]):
    """`--lora r=8 --lora epochs=2` → validated LoraSettings."""
    from .config import lora_settings

    return lora_settings(_key_values(pairs, "--lora"), "--lora")


JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")
]
Threads = Annotated[int | None, typer.Option(help="CPU threads (default: up to 4).")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run the checkpoint's own Python code (transformers trust_remote_code). Off unless given here.",
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Accept a checkpoint with only pickle weights (pytorch_model.bin): converted once to safetensors "
        "with torch's weights-only loader.",
    ),
]
AllowNativeLibs = Annotated[
    bool,
    typer.Option(
        "--allow-native-libs",
        help="Load an ONNX folder whose genai_config.json names native libraries (custom ops, providers).",
    ),
]


@app.command(
    epilog="Example: edgeft build --target raspberrypi --model ./my-model --data tasks.jsonl --out dist"
)
def build(
    target: Annotated[
        str | None, typer.Option(help="Target profile name (see `edgeft targets`) or a .toml path.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="HF model dir or hub id (default: built-in demo).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Task data, JSONL (default: built-in demo).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output dir; the bundle goes to OUT/<target>/ (default ./dist).")
    ] = None,
    fail_on_drift: Annotated[bool | None, typer.Option("--fail-on-drift/--no-fail-on-drift")] = None,
    threads: Threads = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    keep_work: Annotated[
        bool,
        typer.Option(
            "--keep-work", help="Keep OUT/.work after success (re-runs then reuse finished stages)."
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Run the whole pipeline: fine-tune, merge, export, quantize, verify, bench, bundle. A failed or killed
    build keeps its work: running it again resumes where it stopped."""
    from .config import resolve
    from .pipeline import build as run_build
    from .ui import info

    cfg = resolve(
        target=target, model=model, data=data, out=out, fail_on_drift=fail_on_drift, threads=threads
    )
    cfg = dataclasses.replace(
        cfg, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, keep_work=keep_work
    )
    with _stdout_to_stderr():
        res = run_build(cfg)
    if as_json:
        _emit({"bundle": str(res.bundle_dir.resolve()), "passed": res.passed}, True)
    else:
        info(f"bundle: {res.bundle_dir}  (report: {res.bundle_dir / 'report.md'})")


@app.command(
    epilog="Example: edgeft finetune --model ./base --data tasks.jsonl --out adapter --lora r=8 --lora epochs=2"
)
def finetune(
    model: Annotated[str, typer.Option(help="HF model dir or hub id.")],
    data: Annotated[Path, typer.Option(help="JSONL: {prompt, completion} or {messages} per line.")],
    out: Annotated[Path, typer.Option(help="Adapter directory to write.")],
    lora: Annotated[
        list[str] | None, typer.Option(help="LoRA setting override KEY=VALUE (repeatable).")
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    as_json: JsonFlag = False,
) -> None:
    """Fine-tune with LoRA; writes a PEFT adapter directory."""
    from .finetune import finetune as run
    from .ui import task

    settings = _lora_overrides(lora or [])
    model = _unpickled(model, allow_pickle)
    with _stdout_to_stderr(), task("fine-tune (LoRA)") as update:
        res = run(model, data, out, settings, trust_remote_code=trust_remote_code, progress=update)
    _emit(res, as_json)


@app.command(epilog="Example: edgeft merge --model ./base --adapter adapter --out merged")
def merge(
    model: Annotated[str, typer.Option(help="Base HF model dir or hub id.")],
    adapter: Annotated[Path, typer.Option(help="PEFT adapter directory.")],
    out: Annotated[Path, typer.Option(help="Merged model directory to write.")],
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    as_json: JsonFlag = False,
) -> None:
    """Fold a LoRA adapter into the base (in float32) and check the logits did not change."""
    from .merge import merge as run

    model = _unpickled(model, allow_pickle)
    with _stdout_to_stderr():
        res = run(model, adapter, out, trust_remote_code=trust_remote_code)
    _emit(res, as_json)


def _unpickled(model: str, allow_pickle: bool) -> str:
    """The model to read: with --allow-pickle, a safetensors copy of a pickle-only checkpoint."""
    if not allow_pickle:
        return model
    from .loading import unpickled

    with _stdout_to_stderr():
        return unpickled(model)


def _list_architectures(value: bool) -> None:
    if value:
        from .support import markdown

        typer.echo(markdown())
        raise typer.Exit()


@app.command(
    epilog="Example: edgeft export --model merged --format gguf --quant q4_0 --out model-q4_0.gguf\n\n"
    "Example: edgeft export --model merged --format onnx --quant int8 --out onnx-int8\n\n"
    "Example: edgeft export --list-architectures"
)
def export(
    model: Annotated[Path, typer.Option(help="HF model directory (safetensors).")],
    quant: Annotated[
        str, typer.Option(help="gguf: f32, f16, bf16, q8_0, q4_0, q4_k_m; onnx: fp32, int8, int4.")
    ],
    out: Annotated[Path, typer.Option(help="Output: a .gguf file, or a directory for onnx.")],
    list_architectures: Annotated[
        bool,
        typer.Option(
            "--list-architectures",
            is_eager=True,
            callback=_list_architectures,
            help="Print which architectures each format supports, and exit.",
        ),
    ] = False,
    format: Annotated[str, typer.Option(help="gguf (llama.cpp) or onnx (onnxruntime-genai).")] = "gguf",
    accuracy_level: Annotated[
        int | None, typer.Option(help="onnx int8/int4: 4 = int8 activations (fast), 1 = fp32 activations.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Task JSONL whose conversations the tokenizer check covers (besides built-in probes)."
        ),
    ] = None,
    allow_pickle: AllowPickle = False,
    as_json: JsonFlag = False,
) -> None:
    """Export an HF model to a device format, quantized; the artifact's tokenizer is checked against the
    model's own on chat prompts before it is shipped."""
    from .data import load_jsonl
    from .export import ExportOptions, export_file
    from .ui import task

    model = Path(_unpickled(str(model), allow_pickle))
    convs = [ex.prompt_messages for ex in load_jsonl(data)] if data else []
    with _stdout_to_stderr(), task(f"export {format} {quant}") as update:
        res = export_file(model, format, quant, out, ExportOptions(accuracy_level, update, convs))
    _emit(res, as_json)


@app.command(
    epilog="Example: edgeft verify --reference merged --artifact model-q4_0.gguf --data tasks.jsonl --json\n\n"
    "Example: edgeft verify --reference merged --artifact onnx-int8 --budget answers_match=0.95"
)
def verify(
    reference: Annotated[Path, typer.Option(help="Fine-tuned float HF model directory to compare against.")],
    artifact: Annotated[Path, typer.Option(help="Exported artifact: a .gguf file or an ONNX model dir.")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Task JSONL. Default: the held-out split the fine-tune recorded; other data is used whole."
        ),
    ] = None,
    budget: Annotated[
        list[str] | None,
        typer.Option(help="Drift budget METRIC=VALUE (repeatable); prompt_ids_match=1 is always on."),
    ] = None,
    threads: Threads = None,
    allow_native_libs: AllowNativeLibs = False,
    as_json: JsonFlag = False,
) -> None:
    """Drift of an artifact against the float model: KLD, top-1, PPL ratio, task accuracy, and the app path
    (prompt ids and greedy answers through the artifact's own template, tokenizer and runtime). Exits 1 when
    a budget is exceeded."""
    from .targets import parse_budget
    from .ui import task
    from .verify import verify as run

    limits = parse_budget(_key_values(budget or [], "--budget"), "--budget")
    _check_threads(threads)
    with _stdout_to_stderr(), task("verify") as update:
        report, ref_acc, source = run(
            reference, artifact, data, threads=threads, progress=update, allow_native_libs=allow_native_libs
        )
    _emit(asdict(report) | {"reference_task_accuracy": ref_acc, "eval_source": source}, as_json)
    failed = [report.explain(v) for v in limits.violations(report.metrics(), ref_acc)]
    if failed:
        print(f"error: {artifact}: over budget: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)


MAX_RUNS = 1000


def _check_threads(threads: int | None) -> None:
    """--threads within 1..MAX_THREADS (one line otherwise), before any runtime sees it."""
    from .targets import MAX_THREADS, expect_int

    if threads is not None:
        expect_int(threads, "--threads", 1, MAX_THREADS)


@app.command(epilog="Example: edgeft bench --artifact model-q4_0.gguf --threads 4 --json")
def bench(
    artifact: Annotated[Path, typer.Option(help="A .gguf file, an ONNX model dir or an HF model dir.")],
    threads: Threads = None,
    allow_native_libs: AllowNativeLibs = False,
    runs: Annotated[int, typer.Option(help=f"Timed runs after one warm-up (1-{MAX_RUNS}).")] = 3,
    as_json: JsonFlag = False,
) -> None:
    """Latency on this machine: prefill and decode tok/s, time to first token, peak RSS, size."""
    from .bench import bench as run
    from .targets import expect_int

    expect_int(runs, "--runs", 1, MAX_RUNS)
    _check_threads(threads)
    with _stdout_to_stderr():
        res = run(artifact, threads=threads, runs=runs, allow_native_libs=allow_native_libs)
    _emit(res, as_json)


@app.command(
    epilog="Example: edgeft check dist/raspberrypi\n\nExample: edgeft check dist/raspberrypi --no-load --json"
)
def check(
    bundle: Annotated[
        Path, typer.Argument(help="A bundle folder written by `edgeft build` (OUT/<target>/).")
    ],
    load: Annotated[
        bool, typer.Option("--load/--no-load", help="Load each artifact and generate a few tokens.")
    ] = True,
    allow_native_libs: Annotated[
        bool,
        typer.Option(
            "--allow-native-libs",
            help="Load an ONNX folder whose genai_config.json names native libraries (custom ops, providers).",
        ),
    ] = False,
    threads: Threads = None,
    as_json: JsonFlag = False,
) -> None:
    """Prove a bundle is what the build wrote: every file's sha256 against manifest.json and SHA256SUMS, no
    file missing or added, GGUF headers sound, each artifact loads and generates. Exits 1 on any finding."""
    from .check import check_bundle

    _check_threads(threads)
    with _stdout_to_stderr():
        report = check_bundle(bundle, load=load, threads=threads, allow_native_libs=allow_native_libs)
    if as_json:
        _emit(report.to_json(), True)
    else:
        for f in report.findings:
            print(f"FAIL {f.line()}", file=sys.stderr)
        loaded = sum(a.loaded for a in report.artifacts)
        verdict = "ok" if report.passed else f"{len(report.findings)} finding(s)"
        print(
            f"{verdict}: {report.bundle}: {report.files_checked} files checked, "
            f"{loaded}/{len(report.artifacts)} artifacts loaded and generated",
            file=sys.stderr,
        )
        if report.build_passed is False:
            print(
                "note: the build marked this bundle as over its drift budget (passed: false)", file=sys.stderr
            )
    if not report.passed:
        sys.exit(1)


@app.command(epilog="Example: edgeft targets --json")
def targets(as_json: JsonFlag = False) -> None:
    """List the target profiles, one line each."""
    from . import targets as t

    profiles = t.load_all()
    if as_json:
        _emit({p.name: asdict(p) for p in profiles}, True)
    else:
        for p in profiles:
            typer.echo(p.summary())


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit.

    Anything unexpected is one line too (type and message, exit 1) with a hint: EDGEFT_DEBUG=1 shows the
    traceback instead, for a bug report.
    """

    def one_line(text: str) -> str:
        return " ".join(part.strip() for part in text.splitlines() if part.strip())

    try:
        app()
    except EdgeftError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {one_line(where + str(exc.strerror or exc))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last resort: never a traceback unless asked for
        if os.environ.get("EDGEFT_DEBUG", "") not in ("", "0"):
            raise
        message = one_line(str(exc))[:500]
        print(
            f"error: {type(exc).__name__}{': ' + message if message else ''} "
            "(set EDGEFT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
