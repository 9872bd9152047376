"""Failure injection: edgeft never deletes what it did not write, never runs code it was not asked to, and
never follows a stranger's file out of its folder. Every case ends in one clear line and nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodels import cached_model

from edgeft import config, files, pipeline
from edgeft.errors import EdgeftError
from edgeft.formats.gguf import header
from edgeft.formats.gguf.export import export_gguf
from edgeft.formats.onnx.export import export_onnx
from edgeft.formats.onnx.folder import check_onnx_folder
from edgeft.formats.onnx.runtime import OrtRuntime
from edgeft.guard import check_model_folder


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_gguf(cached_model("llama", "bpe"), tmp_path_factory.mktemp("g") / "m.gguf", "f32").path


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(cached_model("llama", "bpe"), tmp_path_factory.mktemp("o") / "onnx", "fp32").path


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- never delete what edgeft did not write ----------------------------------------------------------------


def test_build_refuses_a_users_folder_and_keeps_it(tmp_path: Path) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    cfg = config.BuildConfig(targets=("raspberrypi",), out=out)
    with pytest.raises(EdgeftError) as e:
        pipeline.build(cfg)
    assert "edgeft did not write" in _one_line(e) and str(out) in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"


def test_atomic_dir_leaves_siblings_and_old_output_alone(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    for sibling in ("bundle.partial", "bundle.old"):  # the user's own folders with edgeft-like names
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "mine.txt").write_text("keep")
    with files.atomic_dir(out) as d:
        (d / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), files.atomic_dir(out) as d:  # a crash while writing the second version
        (d / "a.txt").write_text("second")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "first"  # the old output survives a failed replacement
    with files.atomic_dir(out) as d:
        (d / "a.txt").write_text("third")
    assert (out / "a.txt").read_text() == "third" and (out / files.MARKER).is_file()
    for sibling in ("bundle.partial", "bundle.old"):
        assert (tmp_path / sibling / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle.old", "bundle.partial"]


def test_a_replaced_output_keeps_the_users_install_inside_it(tmp_path: Path) -> None:
    """A rebuilt bundle keeps what the user installed in it (examples/node/node_modules after `npm ci`); a
    link by that name is not followed, and nothing is left beside the output."""
    out = tmp_path / "bundle"
    keep = ("examples/node/node_modules",)
    with files.atomic_dir(out, keep=keep) as d:
        (d / "model.gguf").write_text("v1")
    dep = out / keep[0] / "dep" / "index.js"
    dep.parent.mkdir(parents=True)
    dep.write_text("the user's")
    with files.atomic_dir(out, keep=keep) as d:
        (d / "model.gguf").write_text("v2")
    assert (out / "model.gguf").read_text() == "v2" and dep.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(out / keep[0])
    (out / keep[0]).symlink_to(elsewhere)
    with files.atomic_dir(out, keep=keep) as d:
        (d / "model.gguf").write_text("v3")
    assert not (out / keep[0]).exists() and elsewhere.is_dir()  # the link went with the old output


def test_a_second_build_into_the_same_out_is_refused(tmp_path: Path) -> None:
    with files.locked(tmp_path / "dist"):
        with pytest.raises(EdgeftError) as e, files.locked(tmp_path / "dist"):
            pass
        assert "another edgeft build" in _one_line(e)
    with files.locked(tmp_path / "dist"):  # released: free again
        pass


def test_gguf_export_overwrites_only_its_own_files(tmp_path: Path, gguf_file: Path) -> None:
    mine = tmp_path / "notes.gguf"
    mine.write_text("not a model")
    with pytest.raises(EdgeftError) as e:
        export_gguf(cached_model("llama", "bpe"), mine, "f32")
    assert "not written by edgeft" in _one_line(e)
    assert mine.read_text() == "not a model"
    ours = tmp_path / "ours.gguf"
    shutil.copy(gguf_file, ours)
    export_gguf(cached_model("llama", "bpe"), ours, "q8_0")  # edgeft's own file: replaced
    assert ours.stat().st_size < gguf_file.stat().st_size
    assert oct(ours.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # normal permissions, not 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- no code runs unless asked ---------------------------------------------------------------------------------


def test_bench_child_does_not_import_from_the_working_folder(tmp_path: Path, gguf_file: Path) -> None:
    trap = tmp_path / "imported"
    (tmp_path / "numpy.py").write_text(f"open({str(trap)!r}, 'w').write('yes')\nraise SystemExit(3)\n")
    script = (
        "from edgeft.bench import bench\n"
        f"r = bench({str(gguf_file)!r}, threads=1, prompt_tokens=8, decode_tokens=4, runs=1)\n"
        "print(r.decode_tok_s > 0)\n"
    )
    res = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "True" and not trap.exists()


def _copy_onnx(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001 - a callable on the config dict
    shutil.copytree(src, dst)
    cfg_path = dst / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    return dst


def test_onnx_folder_naming_a_native_library_is_refused(tmp_path: Path, onnx_dir: Path) -> None:
    def add_custom_ops(cfg: dict) -> None:
        cfg["model"]["decoder"]["session_options"]["custom_ops_library"] = "libevil.so"

    bad = _copy_onnx(onnx_dir, tmp_path / "bad", add_custom_ops)
    with pytest.raises(EdgeftError) as e:
        OrtRuntime(bad)
    msg = _one_line(e)
    assert "custom_ops_library" in msg and "--allow-native-libs" in msg
    check_onnx_folder(bad, allow_native_libs=True)  # asked for: the check lets it through


def test_onnx_decoder_file_outside_the_folder_is_refused(tmp_path: Path, onnx_dir: Path) -> None:
    def point_out(cfg: dict) -> None:
        cfg["model"]["decoder"]["filename"] = "../elsewhere/model.onnx"

    bad = _copy_onnx(onnx_dir, tmp_path / "bad", point_out)
    with pytest.raises(EdgeftError) as e:
        OrtRuntime(bad)
    assert "leads outside the folder" in _one_line(e)


# --- strangers' folders stay inside themselves -------------------------------------------------------------------


def test_chat_template_symlink_to_a_secret_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    model = shutil.copytree(cached_model("llama", "bpe"), tmp_path / "m")
    (model / "chat_template.jinja").unlink()
    (model / "chat_template.jinja").symlink_to(secret)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EdgeftError) as e:
        export_gguf(model, out / "m.gguf", "f32")
    assert "chat_template.jinja" in _one_line(e) and "outside the folder" in str(e.value)
    assert list(out.iterdir()) == []


def test_shard_index_pointing_outside_is_refused(tmp_path: Path) -> None:
    model = shutil.copytree(cached_model("llama", "bpe"), tmp_path / "m")
    (tmp_path / "outside").mkdir()
    shutil.move(model / "model.safetensors", tmp_path / "outside" / "model.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../outside/model.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EdgeftError) as e:
        check_model_folder(model)
    assert "../outside/model.safetensors" in _one_line(e)


# --- review findings: the build's --out folder, ownership parsed not searched, every named file ----------------


def test_a_builds_out_folder_is_entered_never_replaced(tmp_path: Path, onnx_dir: Path) -> None:
    dist = tmp_path / "dist"
    with files.locked(dist):  # what `edgeft build --out dist` leaves: a marked container folder
        pass
    (dist / "notes.txt").write_text("mine")
    with pytest.raises(EdgeftError) as e, files.atomic_dir(dist):
        pass
    assert "build's --out folder" in _one_line(e)
    with pytest.raises(EdgeftError) as e:
        export_onnx(cached_model("llama", "bpe"), dist, "fp32")  # `edgeft export --out dist`
    assert "subfolder" in _one_line(e)
    with files.atomic_dir(dist / "raspberrypi", what="bundle") as d:  # a bundle inside it: fine
        (d / "a.txt").write_text("x")
    assert (dist / "notes.txt").read_text() == "mine" and (dist / "raspberrypi" / "a.txt").is_file()


def test_build_holds_the_lock_on_out(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    with files.locked(dist), pytest.raises(EdgeftError) as e:
        pipeline.build(config.BuildConfig(targets=("raspberrypi",), out=dist))
    assert "another edgeft build" in _one_line(e)
    assert sorted(p.name for p in dist.iterdir()) == [".edgeft", ".edgeft.lock"]  # no work started


def _gguf_with(path: Path, kv: dict[str, str]) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in kv.items():
        w.add_string(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_ownership_is_the_parsed_key_not_a_byte_search(tmp_path: Path, gguf_file: Path) -> None:
    stranger = _gguf_with(tmp_path / "s.gguf", {"general.name": "edgeft.version mentioned in a string"})
    with pytest.raises(EdgeftError) as e:
        header.ensure_replaceable_file(stranger)
    assert "not written by edgeft" in _one_line(e)
    header.ensure_replaceable_file(_gguf_with(tmp_path / "o.gguf", {header.GGUF_MARKER_KEY: "0.1.0"}))
    header.ensure_replaceable_file(gguf_file)  # a real export carries the key
    link = tmp_path / "link.gguf"
    link.symlink_to(gguf_file)
    with pytest.raises(EdgeftError):  # a symlink to edgeft's file is not edgeft's to replace
        header.ensure_replaceable_file(link)


def test_sweep_removes_only_what_edgeft_leaves(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    ours = [tmp_path / ".m.gguf.q4_0-k2j8x_0a", tmp_path / ".m.gguf.quantizing-00aa11bb"]
    ours[0].write_bytes(b"GGUF\x03\x00")
    ours[1].write_bytes(b"\x00" * 64)  # llama.cpp's placeholder for the metadata it writes last
    theirs = {
        ".m.gguf.q4_0-notes.txt": b"GGUF",  # not a mkstemp name
        ".m.gguf.q4_0-abcdefgh": b"my text",  # a mkstemp-like name, but not a GGUF temp's content
        ".m.gguf.other-abcdefgh": b"",  # not one of the tags asked for
    }
    for name, content in theirs.items():
        (tmp_path / name).write_bytes(content)
    files.sweep_temps(out, ("q4_0", files.QUANTIZING_TAG))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["model"].setdefault("vision", {}).update(filename="/etc/hostname"),
        lambda c: c["model"].setdefault("embedding", {}).update(filename="../x.onnx"),
        lambda c: (
            c["model"]["decoder"].setdefault("pipeline", []).append({"stage": {"filename": "../../y.onnx"}})
        ),
    ],
    ids=["vision-absolute", "embedding-dotdot", "pipeline-stage"],
)
def test_every_file_a_genai_config_names_stays_inside(tmp_path: Path, onnx_dir: Path, edit) -> None:  # noqa: ANN001
    bad = _copy_onnx(onnx_dir, tmp_path / "bad", edit)
    with pytest.raises(EdgeftError) as e:
        check_onnx_folder(bad)
    msg = _one_line(e)
    assert "filename" in msg and ("outside the folder" in msg or "absolute path" in msg)


@pytest.mark.parametrize(
    "record",
    [
        {"eval_split": "abc"},
        {"eval_split": {"files": [1], "examples": []}},
        {"eval_split": {"files": {"/x.jsonl": "zz"}, "examples": ["/x.jsonl:1"]}},
        {"eval_split": {"files": {"/x.jsonl": "0" * 64}, "examples": ["/elsewhere.jsonl:1"]}},
        {"eval_split": {"files": {"/x.jsonl": "0" * 64}, "examples": [7]}},
        [1, 2],
    ],
)
def test_a_malformed_finetune_record_is_one_line(tmp_path: Path, record: object) -> None:
    from edgeft.constants import FINETUNE_RECORD
    from edgeft.verify import eval_examples

    (tmp_path / FINETUNE_RECORD).write_text(json.dumps(record))
    with pytest.raises(EdgeftError) as e:
        eval_examples(tmp_path, None)
    assert FINETUNE_RECORD in _one_line(e)


def test_a_torn_checkpoint_is_not_resumed_from(tmp_path: Path) -> None:
    from edgeft.finetune import _last_complete_checkpoint

    for step, state in ((10, '{"global_step": 10}'), (20, '{"global_step": 20, "log_hist')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert _last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert not (tmp_path / "checkpoint-20").exists()  # edgeft's own torn checkpoint, removed


class _Boom:
    """A pickle payload that would run a command when unpickled by the full pickle machinery."""

    def __init__(self, trap: Path) -> None:
        self.trap = trap

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.trap}",))


def _pickle_only(src: Path, dst: Path, state: object) -> Path:
    import torch

    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_pickle_weights_only_when_asked_and_only_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from edgeft.loading import resolve_model, unpickled

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = cached_model("llama", "bpe")
    state = load_file(src / "model.safetensors")
    model = _pickle_only(src, tmp_path / "m", state)
    with pytest.raises(EdgeftError) as e:
        resolve_model(model)
    assert "--allow-pickle" in _one_line(e)
    copy = Path(unpickled(str(model)))
    assert copy.is_relative_to(tmp_path / "cache") and resolve_model(copy) == str(copy)
    back = load_file(copy / "model.safetensors")
    assert back.keys() == state.keys() and all(back[k].equal(state[k]) for k in state)
    assert (copy / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert unpickled(str(model)) == str(copy)  # converted once, then reused
    trap = tmp_path / "ran"
    evil = _pickle_only(src, tmp_path / "evil", {"w": _Boom(trap)})
    with pytest.raises(EdgeftError) as e:
        unpickled(str(evil))
    assert "weights-only loader" in _one_line(e) and not trap.exists()
    # the CLI wires the flag: export reads the converted copy
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "edgeft", "export", "--model", str(model), "--quant", "f32"]
    res = subprocess.run([*cmd, "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "--allow-pickle" in res.stderr and not (tmp_path / "x.gguf").exists()
    res = subprocess.run(
        [*cmd, "--out", str(tmp_path / "x.gguf"), "--allow-pickle"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "x.gguf").stat().st_size > 0


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_a_pickle_beside_a_decoy_safetensors_is_never_unpickled(tmp_path: Path, fmt: str) -> None:
    """The real weights only in a pickle, an unrelated *.safetensors beside it: neither exporter (nor the ONNX
    builder's from_pretrained fallback) unpickles anything; the export fails in one line."""
    import torch
    from safetensors.torch import save_file

    trap = tmp_path / "ran"
    model = _pickle_only(cached_model("llama", "bpe"), tmp_path / "m", {"w": _Boom(trap)})
    save_file({"decoy": torch.zeros(2)}, str(model / "decoy.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EdgeftError) as e:
        if fmt == "gguf":
            export_gguf(model, out / "m.gguf", "f32")
        else:
            export_onnx(model, out / "onnx", "fp32")
    _one_line(e)
    assert not trap.exists() and list(out.iterdir()) == []
