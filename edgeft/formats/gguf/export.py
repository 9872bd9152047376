"""HF causal LM directory → GGUF file, built on gguf-py, loading weights lazily tensor by tensor.

One module per concern: `arch` (hyperparameters and tensor layout per architecture), `vocab` (tokenizer),
`weights` (reading and casting tensors). Float types (f32/f16/bf16) are written here; integer quants are
written as a 16-bit intermediate first and then handed to llama.cpp's own quantizer (edgeft.formats.gguf.quantize),
which knows the per-tensor type mixes (e.g. q4_k_m).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from edgeft import __version__
from edgeft.data import adds_bos, plain_chat_template, template_end_of_turn
from edgeft.errors import EdgeftError
from edgeft.files import QUANTIZING_TAG, atomic_dir, publish_file, sweep_temps, task_name, unique_sibling
from edgeft.formats.gguf.adapter import (
    PAIR_ADAPTER,
    PAIR_BASE,
    Pair,
    check_pair_folder,
    export_lora_gguf,
    pair_files,
)
from edgeft.formats.gguf.arch import Prepared, prepare
from edgeft.formats.gguf.constants import GGUF_FLOAT_QUANTS, GGUF_FTYPES, GGUF_QUANTS
from edgeft.formats.gguf.footprint import tensor_types
from edgeft.formats.gguf.header import GGUF_MARKER_KEY, check_gguf, ensure_replaceable_file, is_edgeft_gguf
from edgeft.formats.gguf.tokcheck import choose_vocab
from edgeft.formats.gguf.vocab import Vocab, general_name, read_vocab, write_vocab
from edgeft.formats.gguf.weights import fit_f16, intermediate_type, materialize, out_type
from edgeft.guard import check_model_folder
from edgeft.ui import Progress

if TYPE_CHECKING:
    from edgeft.formats.gguf.imatrix import Imatrix

__all__ = ["GGUFExportResult", "export_float_gguf", "export_gguf"]


@dataclass(frozen=True)
class GGUFExportResult:
    """What export_gguf wrote."""

    path: Path
    quant: str
    arch: str
    n_tensors: int
    bytes: int
    tokenizer_mismatches: tuple[str, ...] = ()  # probes llama.cpp tokenizes differently (see tokcheck)
    imatrix: dict[str, Any] | None = None  # Imatrix.record() of the importance matrix quantized with
    head_type: str | None = None  # the type output/token_embd were kept at, if one was asked for


def _write_float_gguf(
    prep: Prepared, model_dir: Path, dst: Path, quant: str, progress: Progress | None, tok: ChosenVocab
) -> tuple[str, int]:
    """Write a float GGUF to `dst` (not atomic; the caller owns the temp name). Returns (arch, n_tensors)."""
    arch_name = gguf.MODEL_ARCH_NAMES[prep.gguf_arch]
    w = gguf.GGUFWriter(str(dst), arch_name)
    try:
        w.add_string(GGUF_MARKER_KEY, __version__)  # early in the file: ensure_replaceable_file
        w.add_name(general_name(model_dir, tok.vocab))
        prep.write_hparams(w, int(GGUF_FTYPES[quant]))
        write_vocab(w, model_dir, tok.vocab, prep.model.n_vocab, end_of_turn=tok.end_of_turn)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        plans = prep.plans
        if quant == "f16":
            plans = [fit_f16(p) for p in plans]
        for p in plans:
            qtype = out_type(quant, p)
            if qtype == gguf.GGMLQuantizationType.BF16:
                byte_shape = gguf.quant_shape_to_byte_shape(p.shape, qtype)
                w.add_tensor_info(
                    p.gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype
                )
            else:
                dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                w.add_tensor_info(p.gguf_name, p.shape, dtype, int(np.prod(p.shape)) * dtype.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(plans):
            w.write_tensor_data(materialize(p, out_type(quant, p)))
            if progress is not None:
                progress(i + 1, len(plans))
        w.flush()
    finally:
        w.close()
    return arch_name, len(plans)


def _temp_path(out: Path, tag: str) -> Path:
    return unique_sibling(out, tag, directory=False)


@dataclass(frozen=True)
class ChosenVocab:
    """The tokenizer as it goes into the GGUF, and what llama.cpp still tokenizes differently."""

    vocab: Vocab
    end_of_turn: int | None
    mismatches: list[str]


def choose_tokenizer(
    prep: Prepared, model_dir: Path, conversations: Sequence[Sequence[dict[str, str]]] = ()
) -> ChosenVocab:
    """Read the tokenizer files and settle the flags llama.cpp needs to reproduce the fine-tune's prompts
    (edgeft.formats.gguf.tokcheck); one line on stderr names the first difference left, if any."""
    from edgeft.loading import load_tokenizer

    n_vocab = prep.model.n_vocab
    tokenizer = load_tokenizer(model_dir, notify=False)
    eot = template_end_of_turn(tokenizer)
    # Whether plain encoding adds BOS/EOS: taken from what the tokenizer does, not from config guesses.
    probe = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    vocab = dataclasses.replace(
        read_vocab(model_dir, n_vocab),
        add_bos=adds_bos(tokenizer),
        add_eos=len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id,
        # a model without a template was tuned on edgeft's plain one: the app's chat call must use it too
        chat_template=None if getattr(tokenizer, "chat_template", None) else plain_chat_template(tokenizer),
    )
    arch_name = gguf.MODEL_ARCH_NAMES[prep.gguf_arch]
    header = functools.partial(_vocab_header, prep)
    vocab, found = choose_vocab(model_dir, vocab, n_vocab, arch_name, header, conversations, end_of_turn=eot)
    if found:
        from edgeft.ui import info

        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        info(f"warning: llama.cpp cannot reproduce the tokenization of {model_dir}: {found[0]}{more}")
    return ChosenVocab(vocab, eot, found)


def _vocab_header(prep: Prepared, w: gguf.GGUFWriter) -> None:
    prep.write_hparams(w, int(GGUF_FTYPES["f32"]))


def export_gguf(
    model_dir: Path,
    out: Path,
    quant: str = "f32",
    *,
    progress: Progress | None = None,
    conversations: Sequence[Sequence[dict[str, str]]] = (),
    imatrix: Imatrix | None = None,
    head_type: str | None = None,
    threads: int | None = None,
    float_gguf: GGUFExportResult | Path | None = None,
) -> GGUFExportResult:
    """Convert an HF model directory (safetensors + tokenizer) into one GGUF file at `out`, atomically.

    The tokenizer settings are proven first on built-in probes plus `conversations` (e.g. the eval set's):
    llama-cpp-python's chat path must give the fine-tune's prompt ids (see tokcheck). Integer quants may
    take an importance matrix and a head type (edgeft.formats.gguf.quantize.quantize_gguf). `float_gguf`, a float GGUF
    of this same model written by export_float_gguf (its result, or its path), is quantized directly: no
    conversion and no tokenizer check again (a result carries that check's findings; a bare path does not).
    """
    from edgeft.formats.gguf.quantize import check_columns, check_quant_options, quantize_gguf

    model_dir, out = Path(model_dir), Path(out)
    check_quant_options(quant, imatrix is not None, head_type, str(out))
    ensure_replaceable_file(out)  # only a GGUF edgeft wrote is ever overwritten
    sweep_temps(out, (*GGUF_QUANTS, QUANTIZING_TAG))  # what a killed earlier export left behind
    if float_gguf is not None and quant not in GGUF_FLOAT_QUANTS:
        base = _reuse_float(float_gguf)
        out.parent.mkdir(parents=True, exist_ok=True)
        _said(quantize_gguf(base.path, out, quant, threads=threads, imatrix=imatrix, head_type=head_type))
        return _result(out, quant, base.arch, base.n_tensors, base.tokenizer_mismatches, imatrix, head_type)
    check_model_folder(model_dir)  # nothing the folder names may lead outside it
    prep = prepare(model_dir)  # every config and tensor check happens before any file is created
    if imatrix is not None or head_type is not None:
        cols = {p.gguf_name: p.shape[-1] for p in prep.plans if len(p.shape) == 2}  # ne[0] = HF's last dim
        check_columns(cols, imatrix, head_type, str(model_dir))
    tok = choose_tokenizer(prep, model_dir, conversations)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Integer quants go through a 16-bit intermediate (2 bytes a parameter of temporary disk, not 4): bf16
    # for bf16 checkpoints (lossless), f16 otherwise, as llama.cpp's own convert-then-quantize flow does.
    float_quant = quant if quant in GGUF_FLOAT_QUANTS else intermediate_type(model_dir)
    tmp = _temp_path(out, float_quant)
    try:
        arch, n_tensors = _write_float_gguf(prep, model_dir, tmp, float_quant, progress, tok)
        if quant in GGUF_FLOAT_QUANTS:
            publish_file(tmp, out)
        else:
            # writes `.NAME.quantizing-*`, then renames it to `out`
            _said(quantize_gguf(tmp, out, quant, threads=threads, imatrix=imatrix, head_type=head_type))
    finally:
        if tmp.exists():
            tmp.unlink()
    return _result(out, quant, arch, n_tensors, tuple(tok.mismatches), imatrix, head_type)


def _said(out: Path) -> None:
    """One line when edgeft wrote some tensors in another type than llama.cpp chose (quantize.Steered)."""

    steered = tensor_types(out).steered
    if steered:
        from edgeft.ui import info

        info(f"[yellow]{out.name}[/]: {steered} (docs/requantization.md)")


def _result(
    out: Path,
    quant: str,
    arch: str,
    n_tensors: int,
    mismatches: tuple[str, ...],
    imatrix: Imatrix | None,
    head_type: str | None,
) -> GGUFExportResult:
    return GGUFExportResult(
        path=out,
        quant=quant,
        arch=arch,
        n_tensors=n_tensors,
        bytes=out.stat().st_size,
        tokenizer_mismatches=mismatches,
        imatrix=imatrix.record() if imatrix is not None else None,
        head_type=head_type,
    )


def export_float_gguf(
    model_dir: Path,
    out_dir: Path,
    *,
    progress: Progress | None = None,
    conversations: Sequence[Sequence[dict[str, str]]] = (),
) -> GGUFExportResult:
    """The 16-bit GGUF integer quants are made from (bf16 for a bf16 checkpoint, else f16), written once as
    `out_dir/model-<type>.gguf` for export_gguf(..., float_gguf=...) to quantize many times. The caller
    caches it (and keys the cache on the model); it is an ordinary edgeft GGUF, written atomically."""
    quant = intermediate_type(Path(model_dir))
    out = Path(out_dir) / f"model-{quant}.gguf"
    return export_gguf(model_dir, out, quant, progress=progress, conversations=conversations)


def _reuse_float(base: GGUFExportResult | Path) -> GGUFExportResult:
    """A float GGUF to quantize from: edgeft-written and of a float file type, else one line."""

    path = base.path if isinstance(base, GGUFExportResult) else Path(base)
    if not path.is_file():
        raise EdgeftError(f"{path}: float GGUF to quantize from does not exist; export it again")
    header = check_gguf(path)
    if not is_edgeft_gguf(path):
        raise EdgeftError(f"{path}: not a GGUF edgeft wrote; quantize only from export_float_gguf's output")
    field = header.value(gguf.Keys.General.FILE_TYPE)
    ftype = field if type(field) is int else -1  # not a bool
    floats = {int(GGUF_FTYPES[q]): q for q in GGUF_FLOAT_QUANTS}
    if ftype not in floats:
        raise EdgeftError(
            f"{path}: general.file_type {ftype} is not a float GGUF (f32/f16/bf16); quantizing a quantized "
            "file loses precision twice"
        )
    if isinstance(base, GGUFExportResult):
        return base
    arch = header.value(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise EdgeftError(f"{path}: general.architecture is missing or not a string; export it again")
    return GGUFExportResult(path, floats[ftype], arch, header.n_tensors, path.stat().st_size)


def export_pair(
    base_dir: Path,
    adapter_dir: Path,
    out: Path,
    quant: str,
    task: str,
    *,
    progress: Progress | None = None,
    conversations: Sequence[Sequence[dict[str, str]]] = (),
    head_type: str | None = None,
    base_from: Path | None = None,
) -> Pair:
    """The base + adapter folder `out`: the HF model `base_dir` as a GGUF of `quant` (no importance matrix: a
    base shared by adapters of different tasks belongs to none of them) and the peft adapter in `adapter_dir`
    as a float16 LoRA GGUF (convert_lora_to_gguf.py --outtype f16: half of its f32 default, within the drift
    gates), written whole and moved into place. `base_from`, another task's base + adapter folder over the same
    base: its base file is taken as it is (so adapters of several tasks share the same bytes)."""
    with atomic_dir(out, what="base + adapter artifact") as tmp:
        if base_from is not None:
            base = pair_files(base_from).base
            shutil.copy2(base, tmp / base.name)
        else:
            export_gguf(
                base_dir,
                tmp / f"{PAIR_BASE}{quant}{f'-head_{head_type}' if head_type else ''}.gguf",
                quant,
                progress=progress,
                conversations=conversations,
                head_type=head_type,
            )
        export_lora_gguf(base_dir, adapter_dir, tmp / f"{PAIR_ADAPTER}{task_name(task)}.gguf", f16=True)
        check_pair_folder(tmp)
    return pair_files(out)
