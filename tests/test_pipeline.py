"""`edgeft build` end to end on a tiny model, and on the built-in demo as the README runs it."""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft import config, pipeline
from edgeft.config import LoraSettings

TARGET = """name = "tiny-device"
description = "test device"
threads = 2
ram_mb = 1024
ram_budget_mb = 512
context_length = 256
bandwidth_gb_s = 4.0
[[artifacts]]
format = "gguf"
quant = "q8_0"
[[artifacts]]
format = "gguf"
quant = "q4_0"
[[artifacts]]
format = "onnx"
quant = "int8"
accuracy_level = 4
[[artifacts]]
format = "onnx"
quant = "int8"
accuracy_level = 1
ship = false
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data(path: Path, n: int = 40) -> Path:
    rooms = ["kitchen", "hall", "office", "garage", "attic"]
    with path.open("w") as f:
        for i in range(n):
            room = rooms[i % len(rooms)]
            f.write(json.dumps({"prompt": f"lights on in the {room} {i}", "completion": f"on {room}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def built(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("build")
    (tmp / "tiny.toml").write_text(TARGET)
    cfg = config.BuildConfig(
        targets=(str(tmp / "tiny.toml"),),
        model=str(tiny_llama),
        data=_data(tmp / "tasks.jsonl"),
        out=tmp / "dist",
        lora=LoraSettings(epochs=1, eval_fraction=0.2),
        fail_on_drift=False,
        threads=2,
    )
    return pipeline.build(cfg).results[0], tmp


def test_bundle_layout_and_checksums(built) -> None:
    res, tmp = built
    assert res.bundle_dir == tmp / "dist" / "tiny-device"
    manifest = json.loads((res.bundle_dir / "manifest.json").read_text())
    for key in (
        "target",
        "base_model",
        "adapter_sha256",
        "dataset_sha256",
        "tools",
        "artifacts",
        "reference",
    ):
        assert key in manifest, key
    assert manifest["dataset_sha256"] == _sha256(tmp / "tasks.jsonl")
    assert [(a["format"], a["quant"]) for a in manifest["artifacts"]] == [
        ("gguf", "q8_0"),
        ("gguf", "q4_0"),
        ("onnx", "int8"),  # the accuracy_level 1 build is compared in the report, not shipped
    ]
    for a in manifest["artifacts"]:
        f = res.bundle_dir / a["path"]
        if a["format"] == "gguf":
            assert f.stat().st_size == a["bytes"]
            assert _sha256(f) == a["sha256"]
        else:
            assert (f / "genai_config.json").is_file() and (f / "tokenizer.json").is_file()
            assert a["accuracy_level"] == 4
            assert {p.relative_to(f).as_posix() for p in f.rglob("*") if p.is_file()} == set(a["files"])
            for rel, digest in a["files"].items():
                assert _sha256(f / rel) == digest, rel
            # the directory digest: sha256 over "path\0digest\n" lines in path order (see bundle.sha256_tree)
            lines = "".join(f"{rel}\0{a['files'][rel]}\n" for rel in sorted(a["files"]))
            assert hashlib.sha256(lines.encode()).hexdigest() == a["sha256"]
            assert sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) == a["bytes"]
        assert set(a["drift"]) == {
            "kld_mean",
            "kld_p99",
            "top1",
            "ppl_ratio",
            "task_accuracy",
            "prompt_ids_match",
            "answers_match",
            "prompt_diff",
            "answer_diff",
        }
        # a tiny BPE llama: every runtime reproduces the fine-tune's prompts
        assert a["drift"]["prompt_ids_match"] == 1.0 and a["drift"]["prompt_diff"] is None
        assert set(a["latency"]) == {"prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb"}
        assert all(math.isfinite(v) for v in a["latency"].values())
        assert a["latency"]["peak_rss_mb"] > 1
    assert (res.bundle_dir / "tokenizer" / "tokenizer.json").is_file()
    report = (res.bundle_dir / "report.md").read_text()
    assert "model-q4_0.gguf" in report and "model-q8_0.gguf" in report and "onnx-int8" in report
    # the build's default: q4_0 quantized with the training split's importance matrix, q8_0 (unaffected) without
    by_quant = {(a["format"], a["quant"]): a for a in manifest["artifacts"]}
    im = by_quant[("gguf", "q4_0")]["imatrix"]
    assert im["examples"] > 0 and im["tokens"] > 0 and len(im["dataset_sha256"]) == 64
    assert by_quant[("gguf", "q8_0")]["imatrix"] is None
    assert "accuracy_level 1" in report and "not shipped" in report
    assert "prompt ids match" in report and "answers match" in report
    assert manifest["data"]["eval_source"].startswith("the fine-tune's held-out split")
    assert [p.name for p in (tmp / "dist").iterdir() if ".partial-" in p.name or ".old-" in p.name] == []


def test_drift_is_finite_and_ordered(built) -> None:
    res, _ = built
    drift = {a.spec.slot: a.drift for a in res.artifacts}
    q8, q4 = drift["gguf-q8_0"], drift["gguf-q4_0"]
    assert math.isfinite(q8.kld_mean) and math.isfinite(q4.kld_mean)
    assert 0 <= q8.kld_mean < q4.kld_mean
    assert q8.top1 >= q4.top1


def test_drift_budget_fails_the_build(tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "strict.toml").write_text(
        TARGET.replace('quant = "q4_0"', 'quant = "q4_0"\n[artifacts.budget]\nkld_mean = 0.0')
    )
    cfg = config.BuildConfig(
        targets=(str(tmp_path / "strict.toml"),),
        model=str(tiny_llama),
        data=_data(tmp_path / "tasks.jsonl", 20),
        out=tmp_path / "dist",
        lora=LoraSettings(epochs=1, eval_fraction=0.2),
        threads=2,
    )
    from edgeft.errors import EdgeftError

    with pytest.raises(EdgeftError, match=r"gguf-q4_0-imatrix: kld_mean = .*budget <= 0"):
        pipeline.build(cfg)
    assert not (tmp_path / "dist" / "tiny-device").exists()
    assert (tmp_path / "dist" / "tiny-device.rejected" / "report.md").is_file()


def test_demo_build_as_in_readme(demo_bundle: Path) -> None:
    """The README's first command: the demo lifts held-out task accuracy to >= 80% and ships the artifact the
    search chose per format."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = {"bundle": str(demo_bundle)}
    manifest = json.loads((Path(out["bundle"]) / "manifest.json").read_text())
    ref = manifest["reference"]
    assert ref["task_accuracy"] >= 0.8
    assert ref["base_task_accuracy"] < ref["task_accuracy"]
    # the search chose one GGUF and one ONNX artifact; every candidate is listed with why it won or lost
    assert sorted(a["format"] for a in manifest["artifacts"]) == ["gguf", "onnx"]
    cands = manifest["candidates"]
    gguf = [c for c in cands if c["format"] == "gguf"]
    assert {c["quant"] for c in gguf} == {"q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_nl", "q4_0"}
    assert {c["options"]["imatrix"] for c in gguf} == {True, False}
    for fmt in ("gguf", "onnx"):
        chosen = [c for c in cands if c["format"] == fmt and c["chosen"]]
        assert len(chosen) == 1 and chosen[0]["verdict"].startswith("chosen"), chosen
        shipped = next(a for a in manifest["artifacts"] if a["format"] == fmt)
        assert (shipped["quant"], shipped["bytes"]) == (chosen[0]["quant"], chosen[0]["bytes"])
        # nothing that passed every budget reads fewer bytes per token than the winner
        assert all(
            c["decode_bytes_per_token"] >= chosen[0]["decode_bytes_per_token"] or c["violations"]
            for c in cands
            if c["format"] == fmt
        )
    assert all(c["drift"]["kld_mean"] is not None for c in cands)  # every candidate has its plot point
    for a in manifest["artifacts"]:
        assert a["drift"]["task_accuracy"] >= ref["task_accuracy"] - 0.15
        if a["format"] == "gguf" and a["quant"] != "q8_0":
            assert (a["imatrix"] is not None) == any(c["chosen"] and c["options"]["imatrix"] for c in gguf)
    # the fresh demo bundle proves itself: `edgeft check` re-hashes, checks headers, loads and generates
    chk = subprocess.run(
        [sys.executable, "-m", "edgeft", "check", out["bundle"], "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert chk.returncode == 0, chk.stdout[-2000:] + chk.stderr[-2000:]
    report = json.loads(chk.stdout)
    assert report["passed"] and report["findings"] == [], report
    assert len(report["artifacts"]) == 2 and all(a["loaded"] and a["generated"] for a in report["artifacts"])


# the tiny device with its first artifact only (GGUF q8_0)
FULL_TARGET = TARGET[: TARGET.index("[[artifacts]]", TARGET.index("[[artifacts]]") + 1)].replace(
    "tiny-device", "tiny-full"
)


def test_full_finetuning_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    """--method full: every weight trains (no adapter, no merge stage), held-out accuracy rises from the
    base's, and export, verify against this float model, bench and bundle run unchanged."""
    (tmp_path / "tiny.toml").write_text(FULL_TARGET)
    (tmp_path / "edgeft.toml").write_text('[finetune]\nmethod = "full"\nlr = 3e-3\n')
    cfg = config.resolve(
        target=str(tmp_path / "tiny.toml"),
        model=str(tiny_llama),
        data=_data(tmp_path / "tasks.jsonl"),
        out=tmp_path / "dist",
        threads=2,
        cwd=tmp_path,
    )
    assert (cfg.method, cfg.full_lr) == ("full", 3e-3)
    lora = LoraSettings(epochs=10, eval_fraction=0.2, batch_size=8)
    res = pipeline.build(dataclasses.replace(cfg, lora=lora, keep_work=True)).results[0]
    manifest = json.loads((res.bundle_dir / "manifest.json").read_text())
    ref = manifest["reference"]
    assert manifest["finetune_method"] == "full" and manifest["adapter_sha256"] is None
    assert ref["base_task_accuracy"] == 0.0 and ref["task_accuracy"] >= 0.75, ref
    assert manifest["artifacts"][0]["drift"]["task_accuracy"] >= ref["task_accuracy"] - 0.15
    assert manifest["lora"]["lr"] == 3e-3  # the record keeps the learning rate full fine-tuning used
    assert not {"r", "alpha", "dropout", "target_modules"} & set(manifest["lora"])  # LoRA's, unused here
    work = tmp_path / "dist" / ".work" / "build"
    tuned = work / "finetuned"  # the whole model: not named an adapter
    assert not (work / "merged").exists() and not (tuned / "adapter_config.json").exists()
    assert manifest["finetuned_weights_sha256"] == {"model.safetensors": _sha256(tuned / "model.safetensors")}
    # every weight moved, not a low-rank part of some
    from safetensors.torch import load_file

    before = load_file(str(Path(tiny_llama) / "model.safetensors"))
    after = load_file(str(tuned / "model.safetensors"))
    assert all(
        not (after[k] == before[k]).all()
        for k in before
        if k.endswith(("proj.weight", "embed_tokens.weight"))
    )
    report = (res.bundle_dir / "report.md").read_text()
    assert "fine-tuned with full fine-tuning (every weight)" in report and "merge " not in report
    from edgeft.errors import EdgeftError
    from edgeft.merge import merge

    with pytest.raises(EdgeftError, match="a whole fine-tuned model .*nothing to merge"):
        merge(tiny_llama, tuned, tmp_path / "merged")


def test_full_finetuning_that_cannot_fit_is_refused_with_the_numbers(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeft import finetune as ft_mod
    from edgeft.errors import EdgeftError

    need, params, _ = ft_mod.full_training_bytes(tiny_llama, LoraSettings())
    from safetensors.torch import load_file

    assert params == sum(t.numel() for t in load_file(str(Path(tiny_llama) / "model.safetensors")).values())
    monkeypatch.setattr(ft_mod, "available_ram", lambda: need + 1)
    ft_mod.check_full_memory(tiny_llama, LoraSettings())  # fits: no refusal
    monkeypatch.setattr(ft_mod, "available_ram", lambda: need - 1)
    with pytest.raises(EdgeftError) as e:
        ft_mod.finetune(
            tiny_llama, _data(tmp_path / "t.jsonl"), tmp_path / "out", LoraSettings(), method="full"
        )
    line = str(e.value)
    assert "\n" not in line and f"needs ~{need / 1e9:.1f} GB" in line and "use --method lora" in line
    assert not (tmp_path / "out").exists()


def test_method_is_checked_in_one_line(tmp_path: Path) -> None:
    from edgeft.errors import EdgeftError

    (tmp_path / "edgeft.toml").write_text('[finetune]\nmethod = "qlora"\n')
    with pytest.raises(EdgeftError, match=r"finetune.method = 'qlora' should be one of lora, full"):
        config.resolve(target="raspberrypi", model=None, data=None, out=None, cwd=tmp_path)
    (tmp_path / "edgeft.toml").write_text('[finetune]\nmethod = "full"\nrank = 4\n')
    with pytest.raises(EdgeftError, match="rank"):
        config.resolve(target="raspberrypi", model=None, data=None, out=None, cwd=tmp_path)
    (tmp_path / "edgeft.toml").write_text("")
    with pytest.raises(EdgeftError, match=r"--method = 'both' should be one of lora, full"):
        config.resolve(target="raspberrypi", model=None, data=None, out=None, cwd=tmp_path, method="both")
