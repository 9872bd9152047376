"""The float reference (edgeft.reference): batched equals one at a time, it is computed once and read back,
and a change of weights, data or setting computes it again."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import cached_model

from edgeft import data, reference, verify
from edgeft.demo import DEMO_DATA
from edgeft.formats.torch.runtime import TorchRuntime
from edgeft.loading import load_tokenizer


@contextmanager
def quiet(description: str, total: int | None = None):
    yield lambda *a: None


class OneAtATime:
    """The same model without its batched methods: run_reference then scores one sequence at a time."""

    def __init__(self, rt: TorchRuntime) -> None:
        self._rt = rt
        self.n_vocab = rt.n_vocab

    def __getattr__(self, name: str):
        if name in ("logits_batch", "generate_batch"):
            raise AttributeError(name)
        return getattr(self._rt, name)


@pytest.fixture(scope="module")
def model() -> Path:
    return cached_model("llama", "bpe")


def _evalset(model: Path, n: int = 12, max_new: int | None = None) -> verify.EvalSet:
    examples = data.load_jsonl(Path(DEMO_DATA))[:n]
    es = verify.make_eval_set(load_tokenizer(model, notify=False), examples, source="demo")
    if max_new is not None:
        es.max_new_tokens = max_new
    return es


def test_batched_and_one_at_a_time_give_the_same_ids_and_logits(model: Path) -> None:
    es = _evalset(model)
    rt = TorchRuntime(model, threads=2)
    batched = reference.run_reference(rt, es)
    single = reference.run_reference(OneAtATime(rt), es)
    assert [a.answer for a in batched.answers] == [a.answer for a in single.answers]
    assert [a.ended for a in batched.answers] == [a.ended for a in single.answers]
    assert [a.prompt for a in batched.answers] == [a.prompt for a in single.answers]
    for i, ids in enumerate(es.sequences):
        assert np.allclose(batched.logits(i, ids), single.logits(i, ids), atol=1e-4)
        assert np.allclose(batched.logits(i, ids), rt.logits(ids), atol=1e-4)
    assert batched.nll == pytest.approx(single.nll, rel=1e-5)
    # the alternatives the batched run kept: the float model's own token first, at every generated position
    for a, choices in zip(batched.answers, batched.choices, strict=True):
        assert len(choices) == len(a.generated) > 0
        assert [ids[0] for ids, _ in choices] == a.generated
        assert all(lps == sorted(lps, reverse=True) for _, lps in choices)
    batched.close()
    assert not batched.folder.exists()  # a temporary reference leaves nothing behind


def test_a_stored_reference_is_computed_once(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []
    real = reference.run_reference

    def counting(*a, **kw):
        runs.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(reference, "run_reference", counting)
    es = _evalset(model)
    first, reused = reference.stored_reference(model, es, tmp_path, threads=2, progress=quiet)
    assert not reused and len(runs) == 1
    again, reused = reference.stored_reference(model, _evalset(model), tmp_path, threads=2, progress=quiet)
    assert reused and len(runs) == 1  # another candidate, target or rerun reads it back
    assert [a.answer for a in again.answers] == [a.answer for a in first.answers]
    assert np.array_equal(again.logits(3, es.sequences[3]), first.logits(3, es.sequences[3]))
    assert again.choices == first.choices

    # other data, another setting, other weights: computed again, each into a folder of its own
    reference.stored_reference(model, _evalset(model, n=10), tmp_path, threads=2, progress=quiet)
    assert len(runs) == 2
    reference.stored_reference(model, _evalset(model, max_new=5), tmp_path, threads=2, progress=quiet)
    assert len(runs) == 3
    changed = tmp_path / "changed"
    shutil.copytree(model, changed)
    _perturb(changed / "model.safetensors")
    reference.stored_reference(changed, es, tmp_path, threads=2, progress=quiet)
    assert len(runs) == 4
    assert len(list(tmp_path.glob("reference-*"))) == 4


def test_a_damaged_store_is_computed_again_and_the_cache_is_bounded(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    es = _evalset(model, n=6)
    run, _ = reference.stored_reference(model, es, tmp_path, threads=2, progress=quiet)
    with open(run.folder / reference.LOGITS_FILE, "r+b") as f:
        f.truncate(100)
    again, reused = reference.stored_reference(model, es, tmp_path, threads=2, progress=quiet)
    assert not reused and again.logits(0, es.sequences[0]).shape == (len(es.sequences[0]), again.vocab)
    for n in (2, 3, 4):
        reference.stored_reference(model, _evalset(model, n=n), tmp_path, threads=2, progress=quiet, keep=2)
    assert len(list(tmp_path.glob("reference-*"))) == 2


def _perturb(weights: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(weights), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("arch", "kw"),
    [
        ("llama", {"dtype": torch.bfloat16}),
        ("qwen2", {"dtype": torch.bfloat16, "tie_embeddings": False, "max_shard_size": "100KB"}),
        (
            "gemma3",
            {"dtype": torch.float16, "hidden": 48},
        ),  # its embedding scale sqrt(48) is not exact in 16 bits
        ("phi3", {"dtype": torch.bfloat16}),
    ],
)
def test_a_16_bit_checkpoint_widened_one_weight_at_a_time_is_the_float32_model(
    arch: str, kw: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_model reads a 16-bit folder's weights into float32 one at a time (the float reference's peak
    memory); the model must be exactly what from_pretrained(dtype=float32) gives: every weight and buffer,
    tied weights still one tensor, the same logits."""
    from transformers import AutoModelForCausalLM

    from edgeft import loading

    folder = cached_model(arch, "bpe", **kw)
    states = []
    read = loading._widened_state
    monkeypatch.setattr(loading, "_widened_state", lambda *a: states.append(read(*a)) or states[-1])
    ours = loading.load_model(folder, dtype=torch.float32)
    assert states and states[0] is not None  # the read() path was taken: its tensors are the model's, no copy
    assert ours.get_input_embeddings().weight.data_ptr() == states[0]["model.embed_tokens.weight"].data_ptr()
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    buffers = dict(theirs.named_buffers())
    for name, buf in ours.named_buffers():
        assert buf.dtype == buffers[name].dtype and torch.equal(buf, buffers[name]), name
    tied = kw.get("tie_embeddings", True)
    assert (ours.lm_head.weight is ours.get_input_embeddings().weight) == tied
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.config.dtype == theirs.config.dtype


def _rewrite_header(folder: Path, edit) -> None:  # noqa: ANN001 - edit(header) changes the JSON in place
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()  # offsets count from the data's start: it may move
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


@pytest.mark.parametrize("fault", ["overlapping", "zero-size huge"])
def test_a_hostile_16_bit_header_is_never_widened_and_fails_in_one_line(fault: str, tmp_path: Path) -> None:
    """Tensors whose extents overlap would let a small file fill memory as float32 (600 copies of one 1 MB
    extent: 1.2 GB); a 0-element tensor of 2^70 rows cannot even be shaped. Neither is read by the widening
    path, and the ordinary load refuses them in one EdgeftError line."""
    from edgeft import loading
    from edgeft.errors import EdgeftError

    folder = tmp_path / "m"
    shutil.copytree(cached_model("llama", "bpe", dtype=torch.bfloat16), folder)

    def overlap(h: dict) -> None:
        for info in h.values():
            if isinstance(info, dict) and "data_offsets" in info:
                info["data_offsets"] = [0, info["data_offsets"][1] - info["data_offsets"][0]]

    def huge(h: dict) -> None:
        h["zz.extra"] = {"dtype": "BF16", "shape": [0, 2**70], "data_offsets": [0, 0]}

    _rewrite_header(folder, overlap if fault == "overlapping" else huge)
    assert loading._tensor_extents(folder / "model.safetensors") is None
    assert loading._widened_state(folder, torch.float32) is None
    with pytest.raises(EdgeftError) as e:
        loading.load_model(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
