"""The CLI contract: commands exist, --help shows an example, user errors are one line and exit non-zero."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ("build", "finetune", "merge", "export", "verify", "bench", "targets")


def edgeft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "edgeft", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0, res.stdout
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_shows_an_example(cmd: str) -> None:
    res = edgeft(cmd, "--help")
    assert res.returncode == 0, res.stderr
    assert f"edgeft {cmd}" in res.stdout and "Example" in res.stdout


def test_targets_lists_profiles_and_json() -> None:
    res = edgeft("targets")
    assert res.returncode == 0 and "raspberrypi" in res.stdout and "q4_0" in res.stdout
    res = edgeft("targets", "--json")
    data = json.loads(res.stdout)
    assert data["raspberrypi"]["threads"] == 4


def test_unknown_target(tmp_path: Path) -> None:
    assert_one_line_error(
        edgeft("build", "--target", "toaster", cwd=tmp_path), "toaster", "raspberrypi", "host"
    )


def test_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    res = edgeft("export", "--model", str(missing), "--quant", "f16", "--out", str(tmp_path / "m.gguf"))
    assert_one_line_error(res, str(missing))
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    res = edgeft("export", "--model", str(tmp_path), "--quant", "f16", "--out", str(tmp_path / "m.gguf"))
    assert_one_line_error(res, "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_unknown_quant(tiny_llama: Path, tmp_path: Path) -> None:
    res = edgeft("export", "--model", str(tiny_llama), "--quant", "q3_xs", "--out", str(tmp_path / "m.gguf"))
    assert_one_line_error(res, "q3_xs", "q4_k_m")
    assert not list(tmp_path.glob("*.gguf*"))


def test_malformed_dataset_line(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "tasks.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": 3\n')
    res = edgeft("finetune", "--model", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "ad"))
    assert_one_line_error(res, "tasks.jsonl:3")
    assert not (tmp_path / "ad").exists()


def test_bad_edgeft_toml(tmp_path: Path) -> None:
    (tmp_path / "edgeft.toml").write_text('target = "raspberrypi"\nepochs = 3\n')
    assert_one_line_error(edgeft("build", cwd=tmp_path), "edgeft.toml", "epochs")
    (tmp_path / "edgeft.toml").write_text('target = "raspberrypi"\n[lora]\nrank = 3\n')
    assert_one_line_error(edgeft("build", cwd=tmp_path), "rank")


def test_unwritable_out_dir(tiny_llama: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = edgeft("export", "--model", str(tiny_llama), "--quant", "f16", "--out", str(blocker / "m.gguf"))
    assert_one_line_error(res)


def test_onnx_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    out = tmp_path / "onnx-int8"
    res = edgeft("export", "--model", str(tmp_path), "--format", "onnx", "--quant", "int8", "--out", str(out))
    assert_one_line_error(res, "GPT2LMHeadModel", "LlamaForCausalLM")
    assert not out.exists() and not list(tmp_path.glob("onnx-int8*"))


def test_onnx_unwritable_out_dir(tiny_llama: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = edgeft(
        "export",
        "--model",
        str(tiny_llama),
        "--format",
        "onnx",
        "--quant",
        "int4",
        "--out",
        str(blocker / "o"),
    )
    assert_one_line_error(res)
    assert blocker.read_text() == "not a directory"


def test_export_json_is_the_only_stdout(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    res = edgeft("export", "--model", str(tiny_llama), "--quant", "q8_0", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)  # the whole of stdout is one JSON object
    assert data["quant"] == "q8_0" and out.stat().st_size == data["bytes"]


def test_verify_fails_a_gguf_whose_chat_template_was_edited_after_export(tmp_path: Path) -> None:
    """The weights are untouched (KLD ~1e-8), yet an app would feed the model other prompt ids: verify must
    report prompt_ids_match < 1 with the first differing token and exit non-zero."""
    from tinymodels import cached_model

    from edgeft.formats.gguf.export import export_gguf

    model = cached_model("llama", "bpe")
    good = export_gguf(model, tmp_path / "good.gguf", "f32").path
    res = edgeft("verify", "--reference", str(model), "--artifact", str(good), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["prompt_ids_match"] == 1.0 and report["answers_match"] == 1.0 and report["kld_mean"] < 1e-6

    # Same-length edit of the template inside the file: the generation prompt loses its newline.
    raw = good.read_bytes()
    old = b"<|im_start|>assistant\n"
    assert raw.count(old) == 1
    bad = tmp_path / "edited.gguf"
    bad.write_bytes(raw.replace(old, b"<|im_start|>assistant "))
    res = edgeft("verify", "--reference", str(model), "--artifact", str(bad), "--json")
    assert res.returncode == 1, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["kld_mean"] < 1e-6  # the weights are the same
    assert report["prompt_ids_match"] < 1.0 and "first difference at token" in report["prompt_diff"]
    assert "prompt_ids_match" in res.stderr and "first difference at token" in res.stderr


def test_finetune_method_flags_are_one_line(tmp_path: Path) -> None:
    from edgeft.demo import DEMO_DATA, DEMO_MODEL

    common = ("finetune", "--model", str(DEMO_MODEL), "--data", str(DEMO_DATA), "--out", str(tmp_path / "o"))
    assert_one_line_error(edgeft(*common, "--lr", "1e-4"), "--lr 0.0001 is full fine-tuning's", "--lora lr=")
    assert_one_line_error(edgeft(*common, "--method", "qlora"), "--method = 'qlora'", "lora, full")
    assert_one_line_error(edgeft(*common, "--method", "full", "--lr", "-1"), "finetune.lr = -1")
    assert not (tmp_path / "o").exists()
