"""The formats edgeft exports to, one package each behind one registry: the pipeline, CLI, checks, reports and
footprint never branch on a format, they ask the artifact's `Format`.

A format package (gguf, onnx; torch is the float reference) owns everything about its files: export, quant
names and which profile options apply, artifact naming, how a path is recognized, its runtime and bench
engine, its footprint (bytes per token, KV cache, tensor types), its part of model.json and its header
checks. Adding a format is one package and one line in `EXPORT_FORMATS` (ref: peft's one package per
method behind PEFT_TYPE_TO_CONFIG_MAPPING, peft/mapping.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgeft.errors import EdgeftError
from edgeft.footprint import Footprint, KvShape, TensorSums, TensorTypes, checkpoint_counts
from edgeft.formats.gguf import GGUF
from edgeft.formats.onnx import ONNX
from edgeft.formats.torch import TORCH

if TYPE_CHECKING:
    from edgeft.device.bench_on_device import Engine
    from edgeft.footprint import CheckpointCounts
    from edgeft.runtime import Runtime
    from edgeft.spec import ArtifactSpec
    from edgeft.ui import Progress


@dataclass(frozen=True)
class ExportJob:
    """What an export gets besides the model, the output path and the artifact's spec."""

    progress: Progress | None = None
    # Conversations (the eval set's) the exporter proves its tokenizer on, besides the built-in probes.
    conversations: Sequence[Sequence[dict[str, str]]] = ()
    # The importance matrix of the calibration data (a spec with imatrix only), made before the export.
    importance: Any = None
    # A folder the format may keep what several candidates of one model share, and the merged model's stage
    # key such files are valid for (None: make everything afresh); what Format.prepare made there (or, for a
    # base + adapter of a further task, the first task's artifact whose base it shares).
    shared: Path | None = None
    shared_key: str = ""
    source: Path | None = None
    # A base + adapter artifact (ArtifactSpec.adapter) is made of the model before fine-tuning, the fine-tune's
    # peft adapter folder and the task name the adapter is shipped under.
    base_model: Path | None = None
    adapter_dir: Path | None = None
    task: str = "task"


class Format(Protocol):
    """Everything edgeft knows about one kind of artifact."""

    name: str  # as profiles and manifest.json spell it
    title: str  # for people: the format and its runtime
    shape: str  # what `owns` recognizes, for an error line ("a .gguf file")
    architectures: tuple[str, ...]  # the HF architectures it knows (exported, or refused with a reason)
    quants: tuple[str, ...]  # the quant names a profile or `edgeft export --quant` may give
    distributions: tuple[str, ...]  # the Python packages that write and run it (recorded per build)
    option_keys: tuple[str, ...]  # the [[artifacts]] option keys this format takes besides format/quant
    declined: Mapping[str, str]  # options of other formats it refuses with its own reason (key -> why)
    apps: tuple[dict[str, str], ...]  # model.json "runtimes": what runs it in an app, and its example
    example_files: tuple[str, ...]  # files of examples/ a bundle shipping this format carries
    tokenizer_notes: tuple[tuple[str, str], ...]  # (tokenizer pipeline, what the runtime gets wrong)
    plot_style: tuple[str, str]  # report.html marker shape and colour

    def owns(self, path: Path) -> bool:
        """Whether `path` is an artifact of this format (a file or folder of its shape)."""
        ...

    def artifact_name(self, stem: str) -> str:
        """The artifact's name in a bundle for a quant (and variant) `stem`."""
        ...

    def parse_slot(
        self, table: dict[str, Any], base: ArtifactSpec, search: list[str], where: str
    ) -> ArtifactSpec:
        """A profile's [[artifacts]] slot of this format: its options (`table`), its fixed artifact and the
        candidates of its `search` list, each checked in one line naming `where`."""
        ...

    def check_spec(self, spec: ArtifactSpec, where: str) -> None:
        """Refuse option values this format cannot build, in one line naming `where`."""
        ...

    def support(self, hf_architecture: str) -> str:
        """How this format handles an HF architecture, for the support matrix ("no: why" when refused)."""
        ...

    def prepare(self, model_dir: Path, spec: ArtifactSpec, job: ExportJob) -> ExportJob:
        """Make what the export of `spec` starts from and several candidates share (a GGUF's 16-bit source
        file, in job.shared), before the export's own progress bar; returns the job that points at it."""
        ...

    def export(self, model_dir: Path, spec: ArtifactSpec, out: Path, job: ExportJob) -> Any:
        """Write the artifact of `spec` from `model_dir` to `out`; returns a result with `.path`."""
        ...

    def importance_matrix(
        self, model_dir: Path, examples: list[Any], threads: int | None, dataset: str
    ) -> Any:
        """The calibration statistic of `examples` this format quantizes with (EdgeftError if it has none)."""
        ...

    def open_runtime(
        self, path: Path, *, threads: int | None, n_ctx: int, all_logits: bool, allow_native_libs: bool
    ) -> Runtime:
        """The artifact loaded in its own runtime, after the format's file checks."""
        ...

    def bench_engine(self, path: Path, *, threads: int, n_ctx: int, allow_native_libs: bool) -> Engine:
        """The artifact as a latency measurement engine (edgeft.device.bench_on_device.Engine)."""
        ...

    def combine(self, paths: Sequence[Path], out: Path) -> Path:
        """Base + adapter artifacts of several tasks over the same base as one artifact at `out` (formats
        that take `adapter`; EdgeftError when the bases differ)."""
        ...

    def tensor_sums(self, path: Path) -> TensorSums:
        """Bytes of every weight tensor, and of those streamed per decoded token."""
        ...

    def kv_shape(self, path: Path) -> KvShape:
        """The KV cache the runtime allocates for this artifact, read from the artifact."""
        ...

    def estimate(
        self, model_dir: Path, counts: CheckpointCounts, quant: str, context_length: int
    ) -> Footprint:
        """The footprint an artifact of `quant` will have, from a checkpoint before export."""
        ...

    def tensor_types(self, path: Path) -> TensorTypes:
        """The tensor types the artifact really holds, as shares of its weight bytes."""
        ...

    def check_file(self, path: Path) -> None:
        """The format's own header check of a file in a bundle (EdgeftError when it fails); no load."""
        ...

    def write_checkpoint(self, path: Path, out: Path) -> None:
        """The artifact `path` read back as a float Hugging Face checkpoint in `out` (a model a package ships
        in this format; EdgeftError when the format cannot be read back)."""
        ...

    def manifest_fields(
        self, spec: ArtifactSpec, imatrix: dict[str, Any] | None, path: Path
    ) -> dict[str, Any]:
        """The format's own keys of an artifact's manifest entry."""
        ...


# The formats a profile may ship, in the order they are listed; the float reference is not one of them.
EXPORT_FORMATS: dict[str, Format] = {f.name: f for f in (GGUF, ONNX)}
REFERENCE: Format = TORCH
_ALL: tuple[Format, ...] = (*EXPORT_FORMATS.values(), REFERENCE)


def names() -> tuple[str, ...]:
    """The export formats' names."""
    return tuple(EXPORT_FORMATS)


def get(name: str) -> Format:
    """The export format called `name`; one line naming the known ones otherwise."""
    if name not in EXPORT_FORMATS:
        raise EdgeftError(f"unknown format '{str(name)[:40]}' (known: {', '.join(EXPORT_FORMATS)})")
    return EXPORT_FORMATS[name]


def format_of(path: Path) -> Format:
    """The format of an artifact path (an export format's file or folder, or a Hugging Face model folder)."""
    path = Path(path)
    for fmt in _ALL:
        if fmt.owns(path):
            return fmt
    shapes = ", ".join(f.shape for f in _ALL)
    raise EdgeftError(f"{path}: not {shapes}")


def open_runtime(
    path: Path,
    *,
    threads: int | None = None,
    n_ctx: int = 512,
    all_logits: bool = True,
    allow_native_libs: bool = False,
) -> Runtime:
    """Open an artifact in its format's runtime (ONNX folders naming native libraries only when
    `allow_native_libs`)."""
    return format_of(path).open_runtime(
        Path(path), threads=threads, n_ctx=n_ctx, all_logits=all_logits, allow_native_libs=allow_native_libs
    )


def combine(paths: Sequence[Path], out: Path) -> Path:
    """One artifact serving every task of `paths` (base + adapter artifacts of one format, one base)."""
    return format_of(paths[0]).combine([Path(p) for p in paths], Path(out))


def open_reference(model: str | Path, *, threads: int | None = None) -> Any:
    """The fine-tuned (or base) float model in PyTorch: what every artifact is judged against. A Hub id works
    too (the reference runtime resolves it)."""
    return REFERENCE.open_runtime(model, threads=threads, n_ctx=0, all_logits=True, allow_native_libs=False)  # type: ignore[arg-type]


def write_checkpoint(path: Path, out: Path) -> None:
    """A model file read back as a Hugging Face checkpoint by the format that owns it (built-in models)."""
    format_of(path).write_checkpoint(Path(path), Path(out))


def artifact_name(fmt: str, quant: str, variant: str = "") -> str:
    """The conventional name of an artifact inside a bundle (`variant` is ArtifactSpec.variant)."""
    return get(fmt).artifact_name(quant + variant)


def option_keys() -> tuple[str, ...]:
    """Every option key some export format takes in a profile's [[artifacts]] table."""
    return tuple(dict.fromkeys(k for f in EXPORT_FORMATS.values() for k in f.option_keys))


def owners(key: str) -> str:
    """The formats an option applies to, for an error line ("gguf quants")."""
    return " and ".join(f.name for f in EXPORT_FORMATS.values() if key in f.option_keys) + " quants"


def refuse_foreign_options(spec: ArtifactSpec, where: str) -> None:
    """One line when `spec` sets an option its format does not take (option keys are ArtifactSpec fields)."""
    fmt = get(spec.format)
    foreign = [k for k in option_keys() if k not in fmt.option_keys and _is_set(getattr(spec, k))]
    declined = [k for k in foreign if k in fmt.declined]
    if declined:
        raise EdgeftError(
            f"{where}: {declined[0]} = true is not offered for {spec.format}: {fmt.declined[declined[0]]}"
        )
    if foreign:
        verb = "applies" if len(foreign) == 1 else "apply"
        raise EdgeftError(
            f"{where}: {' and '.join(foreign)} {verb} to {owners(foreign[0])} only, not {spec.format} {spec.quant}"
        )


def _is_set(value: Any) -> bool:
    """An option value that asks for something (None, False and empty lists ask for nothing; 0 does)."""
    return value is not None and value is not False and value != []


def export_file(model_dir: Path, spec: ArtifactSpec, out: Path, job: ExportJob = ExportJob()) -> Any:
    """Export `model_dir` to `out` as `spec` says; returns the format's typed result."""
    refuse_foreign_options(spec, str(out))
    return get(spec.format).export(Path(model_dir), spec, Path(out), job)


def export_artifact(model_dir: Path, spec: ArtifactSpec, out_dir: Path, job: ExportJob = ExportJob()) -> Path:
    """Export into `out_dir` under the conventional name (plus the accuracy level, if set); returns the path."""
    out = Path(out_dir) / (artifact_name(spec.format, spec.quant, spec.variant) + spec.level_suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(export_file(model_dir, spec, out, job).path)


# --- footprint of any artifact, through its format ---------------------------------------------------------


def measure(path: Path, context_length: int) -> Footprint:
    """The footprint of an exported artifact, from its own tensors and KV metadata."""
    fmt = format_of(path)
    sums, kv = fmt.tensor_sums(Path(path)), fmt.kv_shape(Path(path))
    return Footprint(sums.total_bytes, sums.decode_bytes, kv.bytes(context_length), kv.dtype, context_length)


def estimate_need(model_dir: Path, fmt: str, quant: str, context_length: int) -> Footprint:
    """The footprint an artifact of `fmt`/`quant` will have, estimated from a Hugging Face checkpoint before
    anything is exported (the build's RAM preflight)."""
    return get(fmt).estimate(Path(model_dir), checkpoint_counts(model_dir), quant, context_length)


def decode_bytes_per_token(path: Path) -> int:
    """Weight bytes streamed per decoded token (the token embedding gathered, not streamed, unless tied)."""
    return format_of(path).tensor_sums(Path(path)).decode_bytes


def weights_bytes(path: Path) -> int:
    """Bytes of every weight tensor the runtime keeps resident."""
    return format_of(path).tensor_sums(Path(path)).total_bytes


def kv_shape(path: Path) -> KvShape:
    """The KV cache shape of an artifact as its runtime allocates it."""
    return format_of(path).kv_shape(Path(path))


def kv_cache_bytes(path: Path, context_length: int) -> int:
    """Bytes of the KV cache an artifact's runtime holds at `context_length` tokens (its own KV dtype)."""
    return kv_shape(path).bytes(context_length)


def tensor_types(path: Path) -> TensorTypes:
    """The tensor types an artifact really holds."""
    return format_of(path).tensor_types(Path(path))
