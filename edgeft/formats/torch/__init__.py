"""The float reference: a Hugging Face model folder run in PyTorch (float32), what every artifact is judged
against. Not an export format: a profile cannot ship it, but verify, bench and footprint read it like one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edgeft.errors import EdgeftError
from edgeft.footprint import KvShape, config_kv, hf_tensor_sums
from edgeft.guard import check_model_folder

if TYPE_CHECKING:
    from edgeft.device.bench_on_device import Engine
    from edgeft.footprint import CheckpointCounts, Footprint, TensorSums, TensorTypes
    from edgeft.runtime import Runtime
    from edgeft.spec import ArtifactSpec


class TorchFormat:
    """A Hugging Face folder in PyTorch (edgeft.formats.Format), the reference side of every comparison."""

    name = "torch"
    shape = "or a Hugging Face model dir (with config.json)"
    title = "PyTorch (float reference)"
    architectures: tuple[str, ...] = ()
    quants = ("float32",)
    distributions = ("torch", "transformers")  # the Python packages that write and run it
    option_keys: tuple[str, ...] = ()
    declined: Mapping[str, str] = MappingProxyType({})
    apps: tuple[dict[str, str], ...] = ()
    example_files: tuple[str, ...] = ()
    tokenizer_notes: tuple[tuple[str, str], ...] = ()
    plot_style = ("diamond", "#2f855a")

    def owns(self, path: Path) -> bool:
        return Path(path).is_dir() and (Path(path) / "config.json").is_file()

    def artifact_name(self, stem: str) -> str:
        return stem

    def parse_slot(
        self, table: dict[str, Any], base: ArtifactSpec, search: list[str], where: str
    ) -> ArtifactSpec:
        raise EdgeftError(f"{where}: the float reference is not an artifact a profile ships")

    def check_spec(self, spec: ArtifactSpec, where: str) -> None:
        raise EdgeftError(f"{where}: the float reference is not exported")

    def support(self, hf_architecture: str) -> str:
        return "yes"

    def prepare(self, model_dir: Path, spec: ArtifactSpec, job: Any) -> Any:
        return job  # nothing shared between candidates

    def export(self, model_dir: Path, spec: ArtifactSpec, out: Path, job: Any) -> Any:
        raise EdgeftError(f"{out}: the float reference is not exported")

    def importance_matrix(
        self, model_dir: Path, examples: list[Any], threads: int | None, dataset: str
    ) -> Any:
        raise EdgeftError("an importance matrix applies to quantized exports only")

    def open_runtime(
        self, path: Path, *, threads: int | None, n_ctx: int, all_logits: bool, allow_native_libs: bool
    ) -> Runtime:
        from edgeft.formats.torch.runtime import TorchRuntime  # lazy: torch and transformers

        return TorchRuntime(path, threads=threads)

    def bench_engine(self, path: Path, *, threads: int, n_ctx: int, allow_native_libs: bool) -> Engine:
        from edgeft.formats.torch.runtime import TorchEngine

        return TorchEngine(path, threads=threads)

    def tensor_sums(self, path: Path) -> TensorSums:
        return hf_tensor_sums(path)

    def kv_shape(self, path: Path) -> KvShape:
        return config_kv(path, 4, "fp32")  # transformers' DynamicCache, in float32 as the reference runs

    def estimate(
        self, model_dir: Path, counts: CheckpointCounts, quant: str, context_length: int
    ) -> Footprint:
        raise EdgeftError(f"{model_dir}: the float reference is measured, not estimated")

    def tensor_types(self, path: Path) -> TensorTypes:
        raise EdgeftError(f"{path}: tensor types are read from exported artifacts only")

    def combine(self, paths: Sequence[Path], out: Path) -> Path:
        raise EdgeftError(f"{out}: the float reference is not shipped, so it has no adapters to combine")

    def check_file(self, path: Path) -> None:
        check_model_folder(path)

    def write_checkpoint(self, path: Path, out: Path) -> None:
        raise EdgeftError(f"{path}: edgeft does not read this format back into a checkpoint")

    def manifest_fields(
        self, spec: ArtifactSpec, imatrix: dict[str, Any] | None, path: Path
    ) -> dict[str, Any]:
        return {}


TORCH = TorchFormat()
