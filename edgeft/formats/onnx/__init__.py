"""ONNX for onnxruntime-genai: the genai model builder's graphs (int4/int8 MatMulNBits, fp32), with the
tokenizer proven against the model's own; run by onnxruntime-genai.

Everything ONNX-specific is in this package; the rest of edgeft reaches it through `ONNX` (edgeft.formats).
onnx, onnxruntime and the builder are imported inside the methods that need them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edgeft.device.bench_on_device import OrtGenaiEngine
from edgeft.errors import EdgeftError, show
from edgeft.formats.onnx import footprint
from edgeft.formats.onnx.constants import (
    ONNX_ACCURACY_LEVELS,
    ONNX_ADAPTER_DECLINED,
    ONNX_ARCHS,
    ONNX_FLOAT_QUANTS,
    ONNX_GENAI_CONFIG,
    ONNX_QUANTS,
)

if TYPE_CHECKING:
    from edgeft.device.bench_on_device import Engine
    from edgeft.runtime import Runtime
    from edgeft.spec import ArtifactSpec


class OnnxFormat:
    """The onnxruntime-genai format (edgeft.formats.Format)."""

    name = "onnx"
    quants = ONNX_QUANTS
    shape = "an ONNX model dir (with genai_config.json)"
    title = "ONNX (onnxruntime-genai)"
    architectures = tuple(ONNX_ARCHS)
    distributions = ("onnxruntime", "onnxruntime-genai")  # the Python packages that write and run it
    option_keys = ("accuracy_level",)
    declined = MappingProxyType({"adapter": ONNX_ADAPTER_DECLINED})
    apps = (
        {
            "name": "onnxruntime-genai",
            "package": "pypi:onnxruntime-genai",
            "example": "python/chat_onnxruntime_genai.py",
        },
    )
    example_files = ("python/chat_onnxruntime_genai.py", "python/bundle_checks.py")
    tokenizer_notes = (
        (
            "byte-level BPE with a Digits(individual) pre-tokenizer (SmolLM2)",
            "onnxruntime-genai 0.18 ignores the Digits step: numbers tokenize differently",
        ),
        (
            'SentencePiece saved with Metaspace prepend_scheme="first" (as transformers 5 re-saves a Llama tokenizer)',
            'onnxruntime-genai puts "▁" after special tokens, the file does not: every chat prompt differs',
        ),
    )
    plot_style = ("square", "#c05621")
    # its footprint, from its own files (edgeft/formats/onnx/footprint.py)
    tensor_sums = staticmethod(footprint.tensor_sums)
    kv_shape = staticmethod(footprint.kv_shape)
    estimate = staticmethod(footprint.estimate)
    tensor_types = staticmethod(footprint.tensor_types)

    def owns(self, path: Path) -> bool:
        return Path(path).is_dir() and (Path(path) / ONNX_GENAI_CONFIG).is_file()

    def artifact_name(self, stem: str) -> str:
        return f"onnx-{stem}"

    def parse_slot(
        self, table: dict[str, Any], base: ArtifactSpec, search: list[str], where: str
    ) -> ArtifactSpec:
        """A profile's [[artifacts]] slot: its accuracy_level, the fixed artifact and its search candidates."""

        level = table.get("accuracy_level")
        spec = dataclasses.replace(base, accuracy_level=level)
        self.check_spec(spec, where)
        # a float candidate of the search has no activation precision to set: it is built without the level
        cands = tuple(
            dataclasses.replace(spec, quant=q, accuracy_level=None if q in ONNX_FLOAT_QUANTS else level)
            for q in search
        )
        return dataclasses.replace(spec, search=cands)

    def check_spec(self, spec: ArtifactSpec, where: str) -> None:
        level = spec.accuracy_level
        if level is None:
            return
        if spec.quant in ONNX_FLOAT_QUANTS:
            raise EdgeftError(
                f"{where}: accuracy_level applies to onnx int8/int4 only, not onnx {spec.quant}"
            )
        if not isinstance(level, int) or isinstance(level, bool) or level not in ONNX_ACCURACY_LEVELS:
            known = ", ".join(map(str, ONNX_ACCURACY_LEVELS))
            raise EdgeftError(f"{where}: accuracy_level = {show(level)} (known: {known})")

    def support(self, hf_architecture: str) -> str:
        refused = ONNX_ARCHS.get(hf_architecture, "not supported")
        return "yes" if refused is None else f"no: {refused}"

    def prepare(self, model_dir: Path, spec: ArtifactSpec, job: Any) -> Any:
        return job  # nothing shared between candidates

    def export(self, model_dir: Path, spec: ArtifactSpec, out: Path, job: Any) -> Any:
        from edgeft.formats.onnx.export import export_onnx  # lazy: the builder imports torch and onnx

        return export_onnx(
            model_dir,
            out,
            spec.quant,
            accuracy_level=spec.accuracy_level,
            progress=job.progress,
            conversations=job.conversations,
        )

    def importance_matrix(
        self, model_dir: Path, examples: list[Any], threads: int | None, dataset: str
    ) -> Any:
        raise EdgeftError("an importance matrix applies to gguf quants only")

    def open_runtime(
        self, path: Path, *, threads: int | None, n_ctx: int, all_logits: bool, allow_native_libs: bool
    ) -> Runtime:
        from edgeft.formats.onnx.runtime import OrtRuntime

        return OrtRuntime(
            path, threads=threads, n_ctx=n_ctx, all_logits=all_logits, allow_native_libs=allow_native_libs
        )

    def bench_engine(self, path: Path, *, threads: int, n_ctx: int, allow_native_libs: bool) -> Engine:
        from edgeft.formats.onnx.runtime import OrtRuntime

        # validates genai_config.json, native libraries and external data; loads nothing
        OrtRuntime(path, threads=threads, n_ctx=n_ctx, all_logits=False, allow_native_libs=allow_native_libs)
        return OrtGenaiEngine(path, threads=threads, n_ctx=n_ctx)

    def combine(self, paths: Sequence[Path], out: Path) -> Path:
        raise EdgeftError(f"{out}: {ONNX_ADAPTER_DECLINED}")

    def check_file(self, path: Path) -> None:
        """Nothing before loading: the folder checks (check_onnx_folder) run when it is opened, where the
        user's --allow-native-libs is known."""

    def write_checkpoint(self, path: Path, out: Path) -> None:
        raise EdgeftError(f"{path}: edgeft does not read this format back into a checkpoint")

    def manifest_fields(
        self, spec: ArtifactSpec, imatrix: dict[str, Any] | None, path: Path
    ) -> dict[str, Any]:
        return {} if spec.accuracy_level is None else {"accuracy_level": spec.accuracy_level}


ONNX = OnnxFormat()
