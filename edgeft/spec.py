"""What one artifact of a target is: its format, quant, options and drift budget (read from a profile by
edgeft.targets, built by the artifact's format in edgeft.formats)."""

from __future__ import annotations

from dataclasses import dataclass

from edgeft.constants import BUDGET_KINDS

# The name suffix of a base + adapter artifact ("model-q8_0-lora").
LORA_SUFFIX = "-lora"


@dataclass(frozen=True)
class DriftBudget:
    """Limits on drift against the float model; None means unchecked."""

    kld_mean: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    ppl_ratio: float | None = None
    task_accuracy_drop: float | None = None
    # The app path: a tokenization or template difference fails the build unless a profile loosens it.
    prompt_ids_match: float | None = 1.0
    answers_match: float | None = None
    min_task_accuracy: float | None = None  # held-out exact-match accuracy of the artifact itself
    max_size_mb: float | None = None  # the artifact's size on disk (file, or folder for ONNX), in MB

    def violations(
        self,
        drift: dict[str, float | None],
        reference_accuracy: float | None,
        size_mb: float | None = None,
    ) -> list[str]:
        """One line per exceeded limit, naming metric, value and budget (unmeasured metrics unchecked)."""
        values = dict(drift)
        acc = drift.get("task_accuracy")
        values["task_accuracy_drop"] = (
            None if acc is None or reference_accuracy is None else reference_accuracy - acc
        )
        values["min_task_accuracy"] = acc
        values["max_size_mb"] = size_mb
        out = []
        for name, kind in BUDGET_KINDS.items():
            limit, value = getattr(self, name), values.get(name)
            if limit is None or value is None:
                continue
            bad = value > limit if kind == "max" else value < limit
            if bad or value != value:  # NaN always fails
                sign = "<=" if kind == "max" else ">="
                out.append(f"{name} = {value:.4g}, budget {sign} {limit:g}")
        return out


@dataclass(frozen=True)
class ArtifactSpec:
    """One artifact to build for a target: a format, a quant and its drift budget.

    `accuracy_level` (ONNX int quants) is MatMulNBits' activation precision: 4 = int8 (fast), 1 = fp32.
    `ship = false` builds, verifies and benches it for the report only, so a user sees the trade-off.
    `imatrix`: quantize with the importance matrix of the fine-tuning data (GGUF quants that use one).
    `head_type`: keep the output head and token embedding at this GGUF type (llama.cpp's
    output_tensor_type / token_embedding_type).
    `adapter`: ship the base model quantized at `quant` and the fine-tune as a LoRA adapter beside it (one base
    in RAM serves several adapters), judged like a merged artifact; only formats whose runtime applies an
    adapter to a quantized base take it.
    `search`: the candidates this slot chooses from (edgeft.search); empty for a fixed artifact. Without
    the search (`--no-search`) a slot builds its own quant.
    """

    format: str
    quant: str
    budget: DriftBudget = DriftBudget()
    accuracy_level: int | None = None
    ship: bool = True
    imatrix: bool = False
    head_type: str | None = None
    adapter: bool = False
    search: tuple[ArtifactSpec, ...] = ()

    @property
    def variant(self) -> str:
        """What sets this artifact apart from the plain quant, as a name suffix ("-imatrix-head_q8_0")."""
        return ("-imatrix" if self.imatrix else "") + self.file_variant

    @property
    def file_variant(self) -> str:
        """The suffix of the artifact's name in a bundle: the head type, and LORA_SUFFIX for a base + adapter
        (whether an importance matrix was used is in the manifest; the default build uses one wherever it
        helps)."""
        return (f"-head_{self.head_type}" if self.head_type else "") + (LORA_SUFFIX if self.adapter else "")

    @property
    def level_suffix(self) -> str:
        """ "-acc4" when an accuracy level is set (part of labels and work names), else ""."""
        return f"-acc{self.accuracy_level}" if self.accuracy_level is not None else ""

    @property
    def label(self) -> str:
        return f"{self.format}-{self.quant}{self.variant}{self.level_suffix}"

    @property
    def slot(self) -> str:
        """The slot's own label: the plain format-quant it builds without the search."""
        return f"{self.format}-{self.quant}{LORA_SUFFIX if self.adapter else ''}{self.level_suffix}"
