"""GGUF for llama.cpp: edgeft's own converter on gguf-py, llama.cpp's quantizer with an importance matrix,
the output head kept at a chosen type; run by llama-cpp-python (and node-llama-cpp in the examples).

Everything GGUF-specific is in this package; the rest of edgeft reaches it through `GGUF` (edgeft.formats).
Heavy modules (llama_cpp, torch, the converter) are imported inside the methods that need them, so the
registry imports without them (gguf-py and numpy only) and without llama.cpp installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edgeft import files
from edgeft.device.bench_on_device import LlamaCppEngine
from edgeft.errors import EdgeftError, show
from edgeft.formats.gguf import footprint
from edgeft.formats.gguf.adapter import check_pair_folder, is_pair, pair_files
from edgeft.formats.gguf.constants import (
    GGUF_ARCHS,
    GGUF_BITS_PER_WEIGHT,
    GGUF_FLOAT_QUANTS,
    GGUF_HEAD_TYPES,
    GGUF_IMATRIX_QUANTS,
    GGUF_QUANTS,
)
from edgeft.formats.gguf.header import check_gguf
from edgeft.spec import LORA_SUFFIX
from edgeft.ui import task

if TYPE_CHECKING:
    from edgeft.device.bench_on_device import Engine
    from edgeft.runtime import Runtime
    from edgeft.spec import ArtifactSpec

# The node-llama-cpp version examples/node/package.json pins (and its lock installs).
NODE_LLAMA_CPP = "3.21.1"
# `imatrix` values in a profile: with it, without it, or (in a search) both as separate candidates.
IMATRIX_CHOICES = (True, False, "both")


class GgufFormat:
    """The GGUF format (edgeft.formats.Format)."""

    name = "gguf"
    quants = GGUF_QUANTS
    shape = "a .gguf file or a base + adapter folder"
    title = "GGUF (llama.cpp)"
    architectures = tuple(GGUF_ARCHS)
    distributions = ("gguf", "llama-cpp-python")  # the Python packages that write and run it
    option_keys = ("imatrix", "head_type", "adapter")
    declined: Mapping[str, str] = MappingProxyType({})
    # What runs it in an app, and which examples/ program drives it. The Node example's package is pinned in
    # examples/node/package.json (its lock installs cleanly from the npm registry); edgeft's tests run every
    # example against the demo bundle.
    apps = (
        {
            "name": "llama-cpp-python",
            "package": "pypi:llama-cpp-python",
            "example": "python/chat_llama_cpp.py",
        },
        {
            "name": "node-llama-cpp",
            "package": "npm:node-llama-cpp",
            "example": "node/chat.mjs",
            "pinned": NODE_LLAMA_CPP,
        },
        {  # the C program builds against the llama.h and libllama that llama-cpp-python installs
            "name": "llama.cpp C API",
            "package": "pypi:llama-cpp-python (its llama.h and libllama)",
            "example": "c/chat.c",
            "version_of": "llama-cpp-python",
        },
    )
    example_files = (
        "python/chat_llama_cpp.py",
        "node/chat.mjs",
        "node/package.json",
        "node/package-lock.json",
        "c/chat.c",
    )
    tokenizer_notes = (
        (
            'SentencePiece saved with Metaspace prepend_scheme="first"',
            'chat prompts match (the space-prefix flag is chosen by test); plain text lacks the leading "▁"',
        ),
    )
    plot_style = ("circle", "#2b6cb0")
    # its footprint, from its own files (edgeft/formats/gguf/footprint.py)
    tensor_sums = staticmethod(footprint.tensor_sums)
    kv_shape = staticmethod(footprint.kv_shape)
    estimate = staticmethod(footprint.estimate)
    tensor_types = staticmethod(footprint.tensor_types)

    def owns(self, path: Path) -> bool:
        return (Path(path).is_file() and Path(path).suffix == ".gguf") or is_pair(Path(path))

    def artifact_name(self, stem: str) -> str:
        # a base + adapter artifact is a folder of GGUF files (edgeft.formats.gguf.adapter)
        return f"model-{stem}" if stem.endswith(LORA_SUFFIX) else f"model-{stem}.gguf"

    # --- options ------------------------------------------------------------------------------------------

    def parse_slot(
        self, table: dict[str, Any], base: ArtifactSpec, search: list[str], where: str
    ) -> ArtifactSpec:
        """A profile's [[artifacts]] slot: its imatrix and head_type options, its fixed artifact and the
        candidates of its search list."""
        adapter = table.get("adapter", False)
        if not isinstance(adapter, bool):
            raise EdgeftError(f"{where}: adapter = {show(adapter)} should be true or false")
        if adapter and table.get("imatrix"):
            raise EdgeftError(
                f"{where}: imatrix does not apply with adapter = true: the base is quantized without any one "
                "task's importance matrix, so adapters of several tasks can share it; drop imatrix"
            )
        base = dataclasses.replace(base, adapter=adapter)
        imatrix = False if adapter else table.get("imatrix", "both" if search else True)
        if imatrix not in IMATRIX_CHOICES or (imatrix == "both" and not search):
            both = ', or "both" (with a search list)' if not search else ', or "both"'
            raise EdgeftError(f"{where}: imatrix = {show(imatrix)} should be true or false{both}")
        heads = table.get("head_type", [])
        heads = [heads] if isinstance(heads, str) else heads
        if not isinstance(heads, list) or not all(h in GGUF_HEAD_TYPES for h in heads):
            raise EdgeftError(
                f"{where}: head_type = {show(table['head_type'])} should be one or a list of the ggml types "
                f"{', '.join(GGUF_HEAD_TYPES)}"
            )
        if len(heads) > 1 and not search:
            raise EdgeftError(f"{where}: head_type lists several types; only a search slot tries several")
        fixed = self._variants(base, [base.quant], imatrix, heads or [None])
        if not fixed:
            raise EdgeftError(
                f"{where}: head_type {show(heads[0])} is not more precise than {base.quant}; drop it"
            )
        return dataclasses.replace(
            fixed[0], search=tuple(self._variants(base, search, imatrix, [None, *heads]))
        )

    @staticmethod
    def _variants(
        base: ArtifactSpec, quants: list[str], imatrix: bool | str, heads: list[str | None]
    ) -> list[ArtifactSpec]:
        """Concrete artifacts: each quant with/without the importance matrix where the quant uses one, and
        with the head kept at each higher type; a variant that would change nothing is not repeated."""
        out: list[ArtifactSpec] = []
        for quant in quants:
            uses = quant in GGUF_IMATRIX_QUANTS
            flags = [True, False] if imatrix == "both" else [bool(imatrix)]
            for flag in dict.fromkeys(f and uses for f in flags):
                for head in heads:
                    # a head kept "higher" only if that is more precise than the quant makes it
                    if head is not None and GGUF_BITS_PER_WEIGHT.get(head, 0) <= GGUF_BITS_PER_WEIGHT.get(
                        quant, 0
                    ):
                        continue
                    out.append(dataclasses.replace(base, quant=quant, imatrix=flag, head_type=head))
        return out

    def check_spec(self, spec: ArtifactSpec, where: str) -> None:
        from edgeft.formats.gguf.quantize import check_quant_options

        check_quant_options(spec.quant, spec.imatrix, spec.head_type, where)
        if spec.adapter and spec.imatrix:
            raise EdgeftError(f"{where}: a base + adapter is quantized without an importance matrix")

    def support(self, hf_architecture: str) -> str:
        arch = GGUF_ARCHS.get(hf_architecture)
        return arch.name.lower() if arch is not None else "no"

    # --- export -------------------------------------------------------------------------------------------

    def prepare(self, model_dir: Path, spec: ArtifactSpec, job: Any) -> Any:
        """A quantized GGUF is made from the model's 16-bit GGUF, converted once into job.shared."""
        if spec.quant in GGUF_FLOAT_QUANTS or job.shared is None or spec.adapter:
            return job
        return dataclasses.replace(job, source=self._float_source(model_dir, job))

    def export(self, model_dir: Path, spec: ArtifactSpec, out: Path, job: Any) -> Any:
        """Convert (or quantize the prepared 16-bit GGUF of the same model) to `out`; with `spec.adapter`, the
        model before fine-tuning and the fine-tune's LoRA adapter as a base + adapter folder."""
        from edgeft.formats.gguf.export import export_gguf, export_pair  # lazy: the converter imports torch

        if spec.adapter:
            if job.base_model is None or job.adapter_dir is None:
                raise EdgeftError(
                    f"{out}: a base + adapter artifact needs the fine-tune's LoRA adapter; fine-tune with "
                    "--method lora, or drop adapter"
                )
            return export_pair(
                job.base_model,
                job.adapter_dir,
                out,
                spec.quant,
                job.task,
                progress=job.progress,
                conversations=job.conversations,
                head_type=spec.head_type,
                base_from=job.source,  # another task's pair: its base is shared as it is
            )
        return export_gguf(
            model_dir,
            out,
            spec.quant,
            progress=job.progress,
            conversations=job.conversations,
            imatrix=job.importance if spec.imatrix else None,
            head_type=spec.head_type,
            float_gguf=job.source,
        )

    @staticmethod
    def _float_source(model_dir: Path, job: Any) -> Path:
        """The 16-bit GGUF every quantized candidate of one model is made from: converted once, kept in
        job.shared under the merged model's key."""
        from edgeft.formats.gguf.export import export_float_gguf

        folder = job.shared / "float-gguf"
        key = files.digest(["float-gguf", job.shared_key, job.conversations])
        if not files.done_with(folder, key):
            files.forget(folder)
            folder.mkdir(parents=True, exist_ok=True)
            with task("export 16-bit GGUF (quantized from, once)") as update:
                export_float_gguf(model_dir, folder, progress=update, conversations=job.conversations)
            files.mark_done(folder, key)
        return next(folder.glob("model-*.gguf"))

    def importance_matrix(
        self, model_dir: Path, examples: list[Any], threads: int | None, dataset: str
    ) -> Any:
        """llama.cpp's importance matrix of `examples` (edgeft.data.Example: messages, and the file:line an
        error names) in this model, recorded under the data's digest `dataset` (edgeft.formats.gguf.imatrix)."""
        from edgeft.formats.gguf.imatrix import compute_from

        messages, sources = [list(ex.messages) for ex in examples], [ex.source for ex in examples]
        return compute_from(model_dir, messages, sources, threads=threads, dataset_sha256=dataset)

    # --- run ----------------------------------------------------------------------------------------------

    def open_runtime(
        self, path: Path, *, threads: int | None, n_ctx: int, all_logits: bool, allow_native_libs: bool
    ) -> Runtime:
        from edgeft.formats.gguf.runtime import LlamaCppRuntime

        base, adapter = self._files(path)
        return LlamaCppRuntime(base, threads=threads, n_ctx=n_ctx, all_logits=all_logits, adapter=adapter)

    @staticmethod
    def _files(path: Path) -> tuple[Path, Path | None]:
        """The model file, and the adapter on it when `path` is a base + adapter folder (checked together)."""
        if not Path(path).is_dir():
            return Path(path), None
        pair = check_pair_folder(path)
        return pair.base, pair.adapter()

    def bench_engine(self, path: Path, *, threads: int, n_ctx: int, allow_native_libs: bool) -> Engine:
        from edgeft.formats.gguf.runtime import silence_llama_logs

        base, adapter = self._files(path)
        check_gguf(base)  # a damaged or hostile header is refused before llama.cpp parses it
        silence_llama_logs()
        return LlamaCppEngine(base, threads=threads, n_ctx=n_ctx, adapter=adapter)

    def combine(self, paths: Sequence[Path], out: Path) -> Path:
        from edgeft.formats.gguf.adapter import combine_pairs

        return combine_pairs(paths, out)

    # --- footprint, checks, manifest ----------------------------------------------------------------------

    def check_file(self, path: Path) -> None:
        if Path(path).is_dir():
            check_pair_folder(path)
        else:
            check_gguf(path)

    def write_checkpoint(self, path: Path, out: Path) -> None:
        """The GGUF `path` as a float32 Hugging Face checkpoint in `out` (edgeft.formats.gguf.checkpoint)."""
        from edgeft.formats.gguf.checkpoint import write_checkpoint  # lazy: transformers and torch

        write_checkpoint(path, out)

    def manifest_fields(
        self, spec: ArtifactSpec, imatrix: dict[str, Any] | None, path: Path
    ) -> dict[str, Any]:
        """Its options; for a base + adapter, the base file and each task's adapter (inside the folder)."""
        out = {"imatrix": imatrix if spec.imatrix else None, "head_type": spec.head_type}
        if spec.adapter:
            pair = pair_files(path)
            out["base"] = pair.base.name
            out["adapters"] = {task: f.name for task, f in sorted(pair.adapters.items())}
        return out


GGUF = GgufFormat()
