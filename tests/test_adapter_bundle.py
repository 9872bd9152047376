"""A fine-tune shipped as base + LoRA adapter beside a quantized base (`adapter = true`, `--adapter`): judged
at the same gates as the merged artifact of the same quant, on the app path, with its decode cost against
that merged artifact in the report; a wrong base, a damaged folder, an ONNX adapter and an adapter without
LoRA are each refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft import config, formats, pipeline, targets, verify
from edgeft.errors import EdgeftError
from edgeft.formats.gguf import runtime as gguf_runtime
from edgeft.formats.gguf.adapter import pair_files
from edgeft.formats.torch.runtime import TorchRuntime

PAIR, MERGED = "model-q8_0-lora", "model-q8_0.gguf"


def _entries(bundle: Path) -> dict[str, dict]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {a["path"]: a for a in manifest["artifacts"]}


def test_base_plus_adapter_meets_the_gates_of_the_merged_q8_0(adapter_bundle: Path) -> None:
    arts = _entries(adapter_bundle)
    pair, merged = arts[PAIR], arts[MERGED]
    assert pair["budget"] == merged["budget"]  # the same gates
    assert pair["within_budget"] and merged["within_budget"]
    manifest = json.loads((adapter_bundle / "manifest.json").read_text())
    ref_acc, base_acc = manifest["reference"]["task_accuracy"], manifest["reference"]["base_task_accuracy"]
    d = pair["drift"]
    assert d["prompt_ids_match"] == 1.0 and d["answers_match"] >= 0.95
    assert d["task_accuracy"] >= ref_acc - 0.05
    assert d["task_accuracy"] > base_acc + 0.5  # the adapter is what answers, not the base
    # the folder: the model before fine-tuning (not the merged file) and the demo task's adapter
    files = pair_files(adapter_bundle / PAIR)
    assert files.base.name == "base-q8_0.gguf" and list(files.adapters) == ["smarthome"]
    assert pair["base"] == "base-q8_0.gguf" and pair["adapters"] == {"smarthome": "adapter-smarthome.gguf"}
    assert files.base.read_bytes() != (adapter_bundle / MERGED).read_bytes()
    # its decode cost against the merged q8_0, measured and reported
    assert pair["merged_latency"]["decode_tok_s"] > 0 and "merged_latency" not in merged
    report = (adapter_bundle / "report.md").read_text()
    assert (
        f"{PAIR} (base + LoRA adapter, task smarthome): decode" in report
        and pair["task"] == "smarthome"
        and "merged at q8_0" in report
    )
    described = {a["path"]: a for a in json.loads((adapter_bundle / "model.json").read_text())["artifacts"]}
    assert described[PAIR]["base"] == f"{PAIR}/base-q8_0.gguf"
    assert described[PAIR]["adapters"] == [
        {"task": "smarthome", "path": f"{PAIR}/adapter-smarthome.gguf", "scale": 1.0}
    ]
    assert "adapters" not in described[MERGED]


def test_base_plus_adapter_answers_as_the_fine_tuned_float_model(adapter_bundle: Path) -> None:
    """Checked here, apart from the build's own verify: held-out prompts through llama.cpp's chat path with the
    adapter loaded give the float model's prompt ids and greedy answers; the base alone does not."""
    merged = adapter_bundle.parent / ".work" / "build" / "merged"
    examples, _ = verify.eval_examples(merged, None)
    assert examples
    convs = [list(ex.prompt_messages) for ex in examples[:12]]
    float_rt = TorchRuntime(merged, threads=2)
    try:
        want = [
            (ids, float_rt.generate(ids, 24, float_rt.end_ids))
            for ids in map(float_rt.chat_prompt_ids, convs)
        ]
    finally:
        float_rt.close()
    pair = pair_files(adapter_bundle / PAIR)
    for adapter, expect_same in ((pair.adapter(), True), (None, False)):
        rt = gguf_runtime.LlamaCppRuntime(pair.base, threads=2, n_ctx=512, all_logits=False, adapter=adapter)
        try:
            got = []
            for conv, (ids, _) in zip(convs, want, strict=True):
                assert rt.chat_prompt_ids(conv) == ids  # the app path's prompt ids are the fine-tune's
                got.append(rt.generate(ids, 24, rt.end_ids))
        finally:
            rt.close()
        same = sum(g == w for g, (_, w) in zip(got, want, strict=True))
        assert (same >= len(convs) - 1) if expect_same else (same <= len(convs) // 2)


def test_the_bundle_passes_check_and_the_device_script_runs_the_pair(
    adapter_bundle: Path, tmp_path: Path
) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "edgeft", "check", str(adapter_bundle)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "2/2 artifacts loaded and generated" in res.stderr
    copy = tmp_path / "b"
    shutil.copytree(adapter_bundle, copy)
    res = subprocess.run(
        [sys.executable, "-I", str(copy / "bench_on_device.py"), str(copy), "--threads", "1", "--runs", "1",
         "--prompt-tokens", "8", "--decode-tokens", "8", "--no-energy", "--artifact", PAIR],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    result = {a["path"]: a for a in json.loads(res.stdout)["artifacts"]}
    assert result[PAIR]["status"] == "ok" and result[PAIR]["decode_tok_s"] > 0


def test_another_models_base_is_refused_before_loading(
    adapter_bundle: Path, tiny_exports: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / PAIR
    shutil.copytree(adapter_bundle / PAIR, folder)
    other = next(Path(a.path) for a in tiny_exports if str(a.path).endswith(".gguf"))
    shutil.copy(other, folder / "base-q8_0.gguf")
    loaded = []
    monkeypatch.setattr("llama_cpp.Llama", lambda *a, **kw: loaded.append(kw))
    with pytest.raises(EdgeftError) as e:
        formats.open_runtime(folder, threads=1, n_ctx=64)
    assert "adapter-smarthome.gguf" in str(e.value) and "another model" in str(e.value)
    assert "\n" not in str(e.value) and not loaded


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda f: (f / "notes.txt").write_text("x"), "notes.txt"),
        (lambda f: (f / "base-q4_0.gguf").write_bytes(b"GGUF"), "found 2 and 1"),
        (lambda f: (f / "adapter-smarthome.gguf").unlink(), "found 1 and 0"),
        (lambda f: (f / "adapter-x.gguf").symlink_to("/etc/passwd"), "adapter-x.gguf"),
    ],
)
def test_a_damaged_pair_folder_is_one_line(adapter_bundle: Path, tmp_path: Path, make, says: str) -> None:  # noqa: ANN001
    folder = tmp_path / PAIR
    shutil.copytree(adapter_bundle / PAIR, folder)
    make(folder)
    with pytest.raises(EdgeftError, match=says.replace("(", r"\(")) as e:
        formats.get("gguf").check_file(folder)
    assert "\n" not in str(e.value)


def test_onnx_adapter_is_declined_with_the_reason(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text(
        'name = "p"\ndescription = "d"\nthreads = 2\nram_mb = 4096\nram_budget_mb = 2048\ncontext_length = 512\n'
        'bandwidth_gb_s = 4.0\n[[artifacts]]\nformat = "onnx"\nquant = "int4"\nadapter = true\n'
    )
    with pytest.raises(EdgeftError, match=r"adapter is not offered for onnx: .*#1661"):
        targets.load(toml)
    # --adapter leaves an ONNX slot merged, and says why
    pi, kept = targets.with_adapters(targets.load("raspberrypi"))
    assert [a.adapter for a in pi.artifacts] == [True, False]
    assert all(c.adapter and not c.imatrix for c in pi.artifacts[0].search)
    assert len(kept) == 1 and "onnx" in kept[0] and "#1661" in kept[0]


def test_adapter_needs_a_lora_fine_tune(tmp_path: Path) -> None:
    cfg = config.BuildConfig(targets=("raspberrypi",), out=tmp_path / "out", method="full", adapter=True)
    with pytest.raises(EdgeftError, match="--method full trains no adapter"):
        pipeline.build(cfg)
    assert not (tmp_path / "out" / ".work").exists()  # refused before any work


def test_imatrix_with_adapter_is_refused_in_a_profile(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text(
        'name = "p"\ndescription = "d"\nthreads = 2\nram_mb = 4096\nram_budget_mb = 2048\ncontext_length = 512\n'
        'bandwidth_gb_s = 4.0\n[[artifacts]]\nformat = "gguf"\nquant = "q4_k_m"\nadapter = true\nimatrix = true\n'
    )
    with pytest.raises(EdgeftError, match="imatrix does not apply with adapter = true"):
        targets.load(toml)


def test_two_tasks_share_one_base_and_each_adapter_is_verified(two_task_bundle: Path) -> None:
    (entry,) = _entries(two_task_bundle).values()
    assert entry["adapters"] == {"rooms": "adapter-rooms.gguf", "smarthome": "adapter-smarthome.gguf"}
    folder = two_task_bundle / entry["path"]
    assert sorted(p.name for p in folder.glob("*.gguf")) == [
        "adapter-rooms.gguf",
        "adapter-smarthome.gguf",
        "base-q8_0.gguf",
    ]  # one base for both
    (rooms,) = entry["tasks"]
    assert rooms["task"] == "rooms" and rooms["within_budget"] and entry["within_budget"]
    assert rooms["drift"]["answers_match"] >= 0.95 and rooms["drift"]["prompt_ids_match"] == 1.0
    assert rooms["drift"]["task_accuracy"] > rooms["base_task_accuracy"] + 0.3  # the rooms adapter answers
    described = json.loads((two_task_bundle / "model.json").read_text())["artifacts"][0]
    assert [a["task"] for a in described["adapters"]] == ["smarthome", "rooms"]  # the first --data first
    # each adapter answers its own task: the same prompt, two answers
    pair = pair_files(folder)
    merged = two_task_bundle.parent / ".work" / "build" / "merged"
    (ex, *_) = verify.eval_examples(merged, None)[0]
    answers = {}
    for task in ("smarthome", "rooms"):
        rt = gguf_runtime.LlamaCppRuntime(
            pair.base, threads=2, n_ctx=512, all_logits=False, adapter=pair.adapter(task)
        )
        try:
            ids = rt.chat_prompt_ids(list(ex.prompt_messages))
            answers[task] = rt.decode(rt.generate(ids, 40, rt.end_ids))
        finally:
            rt.close()
    assert answers["smarthome"].startswith('{"action"') and not answers["rooms"].startswith("{")
    report = (two_task_bundle / "report.md").read_text()
    assert "  - task rooms: KLD mean" in report


def test_several_data_sets_need_adapter_and_distinct_names(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "tasks.jsonl", tmp_path / "b" / "tasks.jsonl"
    for p in (a, b, tmp_path / "c" / "more.jsonl"):
        p.parent.mkdir()
        p.write_text('{"prompt": "x", "completion": "y"}\n')
    base = {"targets": ("raspberrypi",), "out": tmp_path / "out", "data": a}
    with pytest.raises(EdgeftError, match="c.jsonl: --data file does not exist"):
        pipeline.build(config.BuildConfig(**base, adapter=True, adapter_data=(tmp_path / "c.jsonl",)))
    with pytest.raises(EdgeftError, match="no slot of this profile ships one; add --adapter"):
        pipeline.build(config.BuildConfig(**base, adapter_data=(b.parent.parent / "c" / "more.jsonl",)))
    with pytest.raises(EdgeftError, match="two data sets are named 'tasks'"):
        pipeline.build(config.BuildConfig(**base, adapter=True, adapter_data=(b,)))
    with pytest.raises(EdgeftError, match="no slot of this profile ships one"):
        targets.adapters_only(targets.load("raspberrypi"))  # without --adapter
