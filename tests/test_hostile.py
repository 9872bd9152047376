"""Failure injection: hostile bundles and model folders against every loader on this machine (the device
cases, behind a real sshd on 127.0.0.1, are in test_remote.py). Each ends in one clear line, nothing runs that
the user did not ask for, and the bundle still passes `edgeft check` after any device run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bundles
import pytest
from bundles import TARGET, Bundles
from tinymodels import make_model, onnx_with_external

from edgeft import remote
from edgeft.check import check_bundle
from edgeft.constants import MANIFEST
from edgeft.device import bundle_checks
from edgeft.remote.run import run_capped

QUICK = ("--thread-sweep", "1", "--runs", "1", "--prompt-tokens", "8", "--decode-tokens", "4")
ONNX = "onnx-int8"


@pytest.fixture(scope="module")
def made(tiny_llama: Path, tiny_exports: list, tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """The tiny Llama's bundle (GGUF q8_0 and ONNX int8), as `edgeft build` writes it."""
    work = tmp_path_factory.mktemp("hostile")
    arts = [a for a in tiny_exports if a.spec in TARGET.artifacts]
    fresh = bundles.write(tiny_llama, arts, work / "dist", target=TARGET)
    assert (fresh / ONNX / "genai_config.json").is_file()
    return Bundles(fresh, work)


def _edgeft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeft", *args], capture_output=True, text=True, timeout=600
    )


def _one_line(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert res.returncode != 0 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    return lines[0]


# --- native code named by a bundle runs only when asked for --------------------------------------------------


@pytest.fixture(scope="module")
def evil_lib(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A shared library whose constructor leaves a file behind when anything loads it."""
    work = tmp_path_factory.mktemp("evil")
    flag = work / "constructor-ran"
    src = work / "evil.c"
    src.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void ran(void) {\n"
        f'  FILE *f = fopen("{flag}", "w"); if (f) fclose(f);\n}}\n'
    )
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed (apt-get install gcc)"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", str(work / "libevil.so"), str(src)], check=True, timeout=120
    )
    return work / "libevil.so", flag


def _with_native_lib(made: Bundles, name: str, lib: Path) -> Path:
    """A copy whose ONNX folder ships libevil.so and names it in genai_config.json, every digest (files,
    the artifact's tree digest, SHA256SUMS) made consistent, as a careful attacker would."""
    import hashlib

    from edgeft.constants import SHA256SUMS
    from edgeft.device.bundle_manifest import dump_manifest, dump_sums

    b = made(name)
    shutil.copy(lib, b / ONNX / "libevil.so")
    cfg = json.loads((b / ONNX / "genai_config.json").read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["custom_ops_library"] = "libevil.so"
    (b / ONNX / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    manifest = json.loads((b / MANIFEST).read_text())
    for rel in (f"{ONNX}/genai_config.json", f"{ONNX}/libevil.so"):
        manifest["files"][rel] = hashlib.sha256((b / rel).read_bytes()).hexdigest()
    inner = {k.removeprefix(ONNX + "/"): v for k, v in manifest["files"].items() if k.startswith(ONNX + "/")}
    tree = hashlib.sha256("".join(f"{k}\0{inner[k]}\n" for k in sorted(inner)).encode()).hexdigest()
    next(a for a in manifest["artifacts"] if a["path"] == ONNX)["sha256"] = tree
    text = dump_manifest(manifest)
    (b / MANIFEST).write_text(text)
    sums = dict(manifest["files"]) | {MANIFEST: hashlib.sha256(text.encode()).hexdigest()}
    (b / SHA256SUMS).write_text(dump_sums(sums))
    assert check_bundle(b, load=False).passed  # consistent: only what looks inside the folder can tell
    return b


def test_a_native_library_in_a_bundle_is_loaded_by_no_one_unless_asked(
    made: Bundles, evil_lib: tuple[Path, Path], runtime_venv: Path
) -> None:
    """genai_config.json naming a custom-ops library (digests consistent): `edgeft check`, `edgeft bench`,
    the device script and the ONNX example all refuse it before onnxruntime-genai opens the folder; only
    `edgeft bench --allow-native-libs` loads it."""
    lib, flag = evil_lib
    b = _with_native_lib(made, "native", lib)
    flag.unlink(missing_ok=True)
    rep = check_bundle(b)
    assert [(f.kind, f.path) for f in rep.findings if f.path == ONNX] == [("runtime", ONNX)], rep.findings
    assert "names native code" in next(f.detail for f in rep.findings if f.path == ONNX)
    res = _edgeft("bench", str(b), "--python", str(runtime_venv), *QUICK)
    line = _one_line(res, ONNX)
    assert "failed to run" in line and "names native code" in res.stderr
    run = json.loads((b / MANIFEST).read_text())["device_latency"][-1]["result"]
    onnx = next(a for a in run["artifacts"] if a["path"] == ONNX)
    assert onnx["status"] == "failed" and "names native code" in onnx["reason"]
    dev = subprocess.run(  # the bundle's own script, as a device user runs it
        [str(runtime_venv), "-I", str(b / "bench_on_device.py"), str(b), "--artifact", ONNX, "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert "names native code" in json.loads(dev.stdout)["artifacts"][0]["reason"]
    ex = subprocess.run(
        [str(runtime_venv), "-I", str(b / "examples/python/chat_onnxruntime_genai.py"), "--bundle", str(b), "hi"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert (
        ex.returncode == 1 and "names native code" in ex.stderr and len(ex.stderr.strip().splitlines()) == 1
    )
    assert not flag.exists(), "the library's constructor ran without --allow-native-libs"
    assert check_bundle(b, load=False).passed  # after a recorded device run, still whole
    _edgeft("bench", str(b), "--python", str(runtime_venv), "--allow-native-libs", "--only", ONNX, *QUICK)
    assert flag.exists(), "--allow-native-libs must reach the script that loads the folder"


def test_edgeft_bench_runs_its_own_script_not_the_bundles(
    made: Bundles, runtime_venv: Path, tmp_path: Path
) -> None:
    """A bundle whose bench_on_device.py was replaced (digests made consistent): `edgeft bench` runs the
    script installed with edgeft, so the planted code never runs."""
    b = made("planted-script")
    flag = tmp_path / "planted-ran"
    script = (b / remote.DEVICE_SCRIPT).read_text()
    bundles.reseal(b, {remote.DEVICE_SCRIPT: f"open({str(flag)!r}, 'w').close()\n" + script})
    res = _edgeft("bench", str(b), "--python", str(runtime_venv), "--only", "model-q8_0.gguf", *QUICK)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not flag.exists()
    assert check_bundle(b, load=False).passed


@pytest.mark.parametrize("location", ["../../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_folder_is_refused_without_the_onnx_package(
    tmp_path: Path, location: str
) -> None:
    """The shared check reads the model's protobuf itself (a device has no onnx package), subgraphs included,
    and agrees with the onnx package on where each tensor's data lives."""
    import onnx

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    onnx_with_external(folder / "model.onnx", location, in_subgraph=True)
    # the tensor sits in both branches of the If: found in each subgraph
    assert bundle_checks.external_data_locations(folder / "model.onnx") == [("w", location)] * 2
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert model.graph.node[0].attribute[0].g.initializer[0].external_data[0].value == location
    with pytest.raises(bundle_checks.FolderError, match="outside"):
        bundle_checks.check_onnx_folder(folder)


def test_the_protobuf_field_numbers_are_onnxs() -> None:
    """The shared module's table of ONNX field numbers, against the onnx package's own descriptors."""
    import onnx

    table = {
        ("ModelProto", "graph"): bundle_checks.MODEL_GRAPH,
        ("ModelProto", "functions"): bundle_checks.MODEL_FUNCTIONS,
        ("GraphProto", "node"): bundle_checks.GRAPH_NODE,
        ("GraphProto", "initializer"): bundle_checks.GRAPH_INITIALIZER,
        ("GraphProto", "sparse_initializer"): bundle_checks.GRAPH_SPARSE_INITIALIZER,
        ("FunctionProto", "node"): bundle_checks.FUNCTION_NODE,
        ("NodeProto", "attribute"): bundle_checks.NODE_ATTRIBUTE,
        ("AttributeProto", "t"): bundle_checks.ATTR_T,
        ("AttributeProto", "g"): bundle_checks.ATTR_G,
        ("AttributeProto", "tensors"): bundle_checks.ATTR_TENSORS,
        ("AttributeProto", "graphs"): bundle_checks.ATTR_GRAPHS,
        ("AttributeProto", "sparse_tensor"): bundle_checks.ATTR_SPARSE_TENSOR,
        ("AttributeProto", "sparse_tensors"): bundle_checks.ATTR_SPARSE_TENSORS,
        ("TensorProto", "name"): bundle_checks.TENSOR_NAME,
        ("TensorProto", "external_data"): bundle_checks.TENSOR_EXTERNAL_DATA,
        ("TensorProto", "data_location"): bundle_checks.TENSOR_DATA_LOCATION,
        ("SparseTensorProto", "values"): bundle_checks.SPARSE_VALUES,
        ("SparseTensorProto", "indices"): bundle_checks.SPARSE_INDICES,
        ("StringStringEntryProto", "key"): bundle_checks.ENTRY_KEY,
        ("StringStringEntryProto", "value"): bundle_checks.ENTRY_VALUE,
    }
    for (message, field), number in table.items():
        assert getattr(onnx, message).DESCRIPTOR.fields_by_name[field].number == number, (message, field)
    assert onnx.TensorProto.EXTERNAL == 1


def test_a_truncated_or_random_model_file_is_one_line(tmp_path: Path) -> None:
    for name, raw in (("cut", b"\x3a\xff\xff\xff\x0f"), ("random", bytes(range(256)) * 40), ("empty", b"")):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(raw)
        try:
            bundle_checks.external_data_locations(path)
        except bundle_checks.FolderError as e:
            assert "\n" not in str(e) and str(path) in str(e)


# --- text from strangers reaches no terminal raw ------------------------------------------------------------


def test_a_file_name_cannot_forge_a_line_of_check(made: Bundles) -> None:
    b = made("forged-names")
    (b / "x\nok: all good").write_text("")
    (b / "\x1b[2J\x1b[32mclean").write_text("")
    res = _edgeft("check", str(b), "--no-load")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert "ok: all good" not in lines and not any(ln.startswith("ok:") for ln in lines), lines
    assert "\x1b" not in res.stderr and "x\\nok: all good" in res.stderr


# --- the faults a stranger's model folder can cause: one line each ------------------------------------------


@pytest.mark.parametrize("fault", ["int-template", "deep-tokenizer", "bad-safetensors"])
def test_a_broken_model_folder_is_one_line_naming_the_file(tmp_path: Path, fault: str) -> None:
    model = make_model("llama", "bpe", tmp_path / "m")
    if fault == "int-template":
        (model / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        cfg["chat_template"] = 7
        (model / "tokenizer_config.json").write_text(json.dumps(cfg))
        needles = ("tokenizer_config.json", "chat_template is 7")
    elif fault == "deep-tokenizer":
        (model / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
        needles = ("tokenizer.json", "cannot read JSON")
    else:
        (model / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b'{"a":1,"b":[}   ' + b"\0" * 64)
        needles = ("model.safetensors", "not a readable safetensors file")
    res = _edgeft("export", "--model", str(model), "--quant", "f32", "--out", str(tmp_path / "x.gguf"))
    _one_line(res, *needles)
    assert not (tmp_path / "x.gguf").exists()


def test_output_read_with_a_cap() -> None:
    """A child printing 300 MB: at most the cap is kept, the child is drained (no deadlock), quickly."""
    t0 = time.monotonic()
    code, out, err = run_capped(
        [sys.executable, "-c", "import sys\nfor _ in range(300): sys.stdout.write('x' * (1 << 20))"],
        cwd=".",
        timeout=120,
        cap=1 << 20,
    )
    assert code == 0 and len(out) == 1 << 20 and err == ""
    assert time.monotonic() - t0 < 60


def test_an_error_line_escapes_control_characters() -> None:
    res = _edgeft("check", "/nonexistent/\x1b[2Jbundle")
    assert res.returncode == 2 and "\x1b" not in res.stderr and "\\x1b[2J" in res.stderr


# --- a stranger's chat template renders within bounds, everywhere -------------------------------------------

HOSTILE_TEMPLATES = {
    "nested-loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "did not finish"),
    "huge-string": ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
                    "{{ ns.s }}", ""),
}  # fmt: skip
FAST = {"EDGEFT_RENDER_SECONDS": "3"}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_a_model_folders_template_is_bounded_in_edgeft(tmp_path: Path, name: str) -> None:
    """edgeft renders a model's template (export's tokenizer checks, training, verify) only after the same
    conversations rendered within bounds in a child: a hostile one is one line naming it, in seconds."""
    import os

    template, says = HOSTILE_TEMPLATES[name]
    model = make_model("llama", "bpe", tmp_path / "m")
    (model / "chat_template.jinja").write_text(template)
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "edgeft", "export", "--model", str(model), "--quant", "f32", "--out", str(tmp_path / "x.gguf")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, **FAST),
    )  # fmt: skip
    line = _one_line(res, "chat template", says)
    assert "m: its chat template" in line or str(model) in line
    assert time.monotonic() - t0 < 60 and not (tmp_path / "x.gguf").exists()


# --- ways around the folder checks, closed ----------------------------------------------------------------


def _folder_with(made: Bundles, tmp_path: Path, name: str, edit) -> Path:  # noqa: ANN001
    folder = tmp_path / name
    shutil.copytree(made.fresh / ONNX, folder)
    edit(folder)
    return folder


def _cfg(folder: Path, change) -> None:  # noqa: ANN001
    cfg = json.loads((folder / "genai_config.json").read_text())
    change(cfg)
    (folder / "genai_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("duplicate-key", "given twice"),
        ("profiling", "session_options.enable_profiling"),
        ("provider-library", "provider_options"),
        ("config-filename", "leads outside the folder"),
        ("data-file", "absolute path"),
        ("renamed-model", "outside"),
        ("linked-vocab", "not a regular file"),
    ],
)
def test_every_way_around_the_onnx_folder_check_is_closed(
    made: Bundles, tmp_path: Path, case: str, says: str
) -> None:
    """What onnxruntime-genai honours beyond `filename` and `custom_ops_library` (ref: onnxruntime-genai
    src/config.cpp): a repeated key (its parser applies both copies), session options it passes to
    onnxruntime unchecked, provider options, config/adapter/data files, a model under another name, a link."""
    decoder = ("model", "decoder")

    def edit(folder: Path) -> None:
        if case == "duplicate-key":
            text = (folder / "genai_config.json").read_text()
            text = text.replace('"session_options": {', '"session_options": {}, "session_options": {', 1)
            (folder / "genai_config.json").write_text(text)
        elif case == "profiling":
            _cfg(
                folder,
                lambda c: c[decoder[0]][decoder[1]]["session_options"].update(enable_profiling="/tmp/p"),
            )
        elif case == "provider-library":
            opts = [{"qnn": {"qnn_saver_path": "./payload"}}]
            _cfg(folder, lambda c: c["model"]["decoder"]["session_options"].update(provider_options=opts))
        elif case == "config-filename":
            _cfg(folder, lambda c: c["model"].update(vision={"config_filename": "../../../../etc/passwd"}))
        elif case == "data-file":
            _cfg(
                folder,
                lambda c: c["model"]["decoder"].update(shared_initializers=[{"data_file": "/etc/shadow"}]),
            )
        elif case == "renamed-model":
            onnx_with_external(folder / "model.bin", "/etc/passwd", in_subgraph=True)
            _cfg(folder, lambda c: c["model"]["decoder"].update(filename="model.bin"))
        else:
            (folder / "vocab.json").symlink_to("/etc/passwd")

    folder = _folder_with(made, tmp_path, case, edit)
    with pytest.raises(bundle_checks.FolderError) as e:
        bundle_checks.check_onnx_folder(folder)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_exported_folder_passes_the_stricter_check(made: Bundles) -> None:
    """What edgeft's own ONNX export writes stays within the allow-list (no false refusal)."""
    assert bundle_checks.check_onnx_folder(made.fresh / ONNX)


def test_no_write_or_removal_through_a_link_inside_a_device_copy(tmp_path: Path) -> None:
    """A link inside a device copy (a user's `data -> ~/data`): a bundle shipping data/notes.txt is refused
    before anything is written through it, and removing the copy never follows it."""
    from edgeft.device import sync_on_device as sync

    users = tmp_path / "home" / "data"
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    copy = tmp_path / "device" / "b"
    copy.mkdir(parents=True)
    (copy / sync.COPY_MARKER).write_text(json.dumps({"what": sync.COPY_WHAT, "files": ["data/notes.txt"]}))
    (copy / "data").symlink_to(users)
    res = subprocess.run(
        [sys.executable, "-I", sync.__file__, "prepare", str(copy), str(copy) + ".partial"],
        input=json.dumps({"want": ["data/notes.txt"], "hash": None}), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1 and "through a link" in res.stderr, res.stderr
    sync._remove_copy(str(copy.parent / "b.partial") if (copy.parent / "b.partial").exists() else str(copy))
    assert (users / "notes.txt").read_text() == "mine"


def test_a_device_result_with_odd_settings_is_recorded_typed(made: Bundles) -> None:
    from edgeft.bundle import record_device_run
    from edgeft.remote.result import parse_result

    b = made("odd-settings")
    doc = {
        "schema": 1,
        "integrity": {"ok": True, "problems": 7},
        "settings": {"threads": 7, "runs": -1},
        "artifacts": [
            {"path": "model-q8_0.gguf", "status": "failed", "reason": "[click](https://evil) ![x](y)"}
        ],
    }
    result = parse_result(json.dumps(doc), "pi@board")
    assert result["settings"]["threads"] is None and result["integrity"]["problems"] == []
    record_device_run(b, result, "pi@board")
    report = (b / "report.md").read_text()
    assert "\\[click\\](https://evil) \\!\\[x\\](y)" in report  # shown as text: no link, no image
    for _ in range(25):
        record_device_run(b, result, "pi@board")
    runs = json.loads((b / MANIFEST).read_text())["device_latency"]
    assert len(runs) == 20  # the newest per device
    assert check_bundle(b, load=False).passed
