"""HF causal LM directory → GGUF file, built on gguf-py, loading weights lazily tensor by tensor.

One module per concern: `arch` (hyperparameters and tensor layout per architecture), `vocab` (tokenizer),
`weights` (reading and casting tensors). Float types (f32/f16/bf16) are written here; integer quants are
written as a 16-bit intermediate first and then handed to llama.cpp's own quantizer (edgeft.quantize),
which knows the per-tensor type mixes (e.g. q4_k_m).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ... import __version__
from ...constants import GGUF_FLOAT_QUANTS, GGUF_FTYPES, GGUF_QUANTS
from ...errors import EdgeftError
from ...files import (
    GGUF_MARKER_KEY,
    QUANTIZING_TAG,
    ensure_replaceable_file,
    publish_file,
    sweep_temps,
    unique_sibling,
)
from ...guard import check_model_folder
from ...ui import Progress
from .arch import Prepared, prepare
from .tokcheck import choose_vocab
from .vocab import Vocab, general_name, read_vocab, write_vocab
from .weights import fit_f16, intermediate_type, materialize, out_type

__all__ = ["GGUFExportResult", "export_gguf"]


@dataclass(frozen=True)
class GGUFExportResult:
    """What export_gguf wrote."""

    path: Path
    quant: str
    arch: str
    n_tensors: int
    bytes: int
    tokenizer_mismatches: tuple[str, ...] = ()  # probes llama.cpp tokenizes differently (see tokcheck)


def _write_float_gguf(
    prep: Prepared, model_dir: Path, dst: Path, quant: str, progress: Progress | None, tok: ChosenVocab
) -> tuple[str, int]:
    """Write a float GGUF to `dst` (not atomic; the caller owns the temp name). Returns (arch, n_tensors)."""
    arch_name = gguf.MODEL_ARCH_NAMES[prep.gguf_arch]
    w = gguf.GGUFWriter(str(dst), arch_name)
    try:
        w.add_string(GGUF_MARKER_KEY, __version__)  # early in the file: edgeft.files.ensure_replaceable_file
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
    (edgeft.export.gguf.tokcheck); one line on stderr names the first difference left, if any."""
    from ...data import adds_bos, plain_chat_template, template_end_of_turn
    from ...loading import load_tokenizer

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
        from ...ui import info

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
) -> GGUFExportResult:
    """Convert an HF model directory (safetensors + tokenizer) into one GGUF file at `out`, atomically.

    The tokenizer settings are proven first on built-in probes plus `conversations` (e.g. the eval set's):
    llama-cpp-python's chat path must give the fine-tune's prompt ids (see tokcheck).
    """
    if quant not in GGUF_QUANTS:
        raise EdgeftError(f"unknown GGUF quant {quant!r}; choose one of: {', '.join(GGUF_QUANTS)}")
    model_dir, out = Path(model_dir), Path(out)
    ensure_replaceable_file(out)  # only a GGUF edgeft wrote is ever overwritten
    sweep_temps(out, (*GGUF_QUANTS, QUANTIZING_TAG))  # what a killed earlier export left behind
    check_model_folder(model_dir)  # nothing the folder names may lead outside it
    prep = prepare(model_dir)  # every config and tensor check happens before any file is created
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
            from ...quantize import quantize_gguf

            quantize_gguf(tmp, out, quant)  # writes `.NAME.quantizing-*`, then renames it to `out`
    finally:
        if tmp.exists():
            tmp.unlink()
    return GGUFExportResult(
        path=out,
        quant=quant,
        arch=arch,
        n_tensors=n_tensors,
        bytes=out.stat().st_size,
        tokenizer_mismatches=tuple(tok.mismatches),
    )
