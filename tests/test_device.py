"""The script a bundle carries runs on a device without edgeft: bench_on_device.py (integrity first, a thread
sweep per artifact, device facts, one JSON object), in a virtual environment holding only the runtimes; and
the one timing definition never re-runs a prefill after an early EOS. The example apps: tests/test_examples.py."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundles import write

from edgeft import bench as edgeft_bench
from edgeft import bundle, files, remote
from edgeft.constants import MANIFEST, SHA256SUMS
from edgeft.device import bench_on_device as bod
from edgeft.device import sync_on_device as sync

GGUF, ONNX = "model-q8_0.gguf", "onnx-int8"
SMALL = ["--runs", "1", "--prompt-tokens", "16", "--decode-tokens", "8"]


@pytest.fixture(scope="module")
def made(tiny_llama: Path, tiny_exports: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of a tiny Llama as GGUF q8_0 and ONNX int8 (the session's exports), written once per module."""
    work = tmp_path_factory.mktemp("device")
    return write(tiny_llama, tiny_exports, work / "dist")


def _copy(made: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(made, dst)
    return dst


def _device(
    python: Path | str, bundle_dir: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run the bundle's own copy of bench_on_device.py as a device would (isolated, from another folder)."""
    res = subprocess.run(
        [str(python), "-I", str(bundle_dir / "bench_on_device.py"), str(bundle_dir), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=bundle_dir.parent,
    )
    try:
        out = json.loads(res.stdout)  # exactly one JSON object: anything else on stdout fails here
    except ValueError:
        pytest.fail(f"stdout is not one JSON object: {res.stdout[:2000]!r} / {res.stderr[-2000:]}")
    return res, out


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with nothing installed: no runtime at all."""
    venv = tmp_path_factory.mktemp("bare-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    return venv / "bin" / "python"


# --- what the bundle carries -------------------------------------------------------------------------------


def test_bundle_carries_both_scripts_hashed(made: Path) -> None:
    manifest = json.loads((made / MANIFEST).read_text())
    sums = (made / SHA256SUMS).read_text()
    for script in bundle.DEVICE_SCRIPTS:
        src = Path(bod.__file__).parent / script
        assert (made / script).read_bytes() == src.read_bytes()
        assert manifest["files"][script] == bundle.sha256_file(made / script)
        assert f"{manifest['files'][script]}  {script}\n" in sums


# Python that runs on a device: the scripts a bundle ships, and the copy helper edgeft bench --remote sends.
DEVICE_CODE = (*bundle.DEVICE_SCRIPTS, "sync_on_device.py")


@pytest.mark.parametrize("script", DEVICE_CODE)
def test_scripts_import_only_the_standard_library_and_runtimes(script: str) -> None:
    tree = ast.parse((Path(bod.__file__).parent / script).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{script} has a relative import"
            if node.module in (
                "edgeft.device.bundle_manifest",
                "edgeft.device",
            ):  # siblings shipped beside it
                assert {"bundle_manifest.py", "bundle_checks.py"} <= set(bundle.DEVICE_SCRIPTS)
                continue
            names.add((node.module or "").split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"llama_cpp", "onnxruntime_genai"}
    assert names and names <= allowed, names - allowed
    assert not names & {"edgeft", "torch", "numpy"}


VERMIN = "import sys; from vermin.main import main; sys.argv[0] = 'vermin'; sys.exit(main())"


def test_scripts_run_on_python_3_8() -> None:
    """Devices run the Python their OS ships (Ubuntu 20.04 and JetPack 5: 3.8): vermin finds no newer feature
    (dict `|`, Path.is_relative_to, str.removeprefix, ...) in either script."""
    scripts = [str(Path(bod.__file__).parent / s) for s in DEVICE_CODE]
    res = subprocess.run(
        [sys.executable, "-c", VERMIN, "-t=3.8-", "--violations", "--no-tips", *scripts],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _device_sync(step: str, final: Path, job: dict | None = None) -> subprocess.CompletedProcess[str]:
    """The copy helper as edgeft bench --remote runs it: its source as `python -I -c`, a step, two folders."""
    code = (Path(bod.__file__).parent / "sync_on_device.py").read_text()
    partial = f"{final}{remote.PARTIAL_SUFFIX}"
    return subprocess.run(
        [sys.executable, "-I", "-c", code, step, str(final), partial],
        input=json.dumps(job or {}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_copy_helper_never_touches_an_output_folder_or_the_users_files(tmp_path: Path) -> None:
    """A build's --out folder carries edgeft's marker, but holds bundles and the user's own files: as
    --remote-dir it is refused in one line and nothing in it moves. A device copy edgeft made (its own marker,
    recording what it copied) is brought to the bundle's file list: edgeft's stale files go, the user's files
    and install folder inside it stay."""
    out = tmp_path / "dist"
    out.mkdir(exist_ok=True)
    (out / ".edgeft").write_text(json.dumps({"written_by": "edgeft", "what": files.CONTAINER}))
    (out / "notes.txt").write_text("mine")
    (out / "raspberrypi").mkdir()
    (out / "raspberrypi" / "model.gguf").write_text("another bundle")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for step in ("prepare", "finish"):
        res = _device_sync(step, out, {"want": ["a.txt"], "hash": None})
        assert (
            res.returncode == 1 and "not a bundle copy edgeft made" in res.stderr and str(out) in res.stderr
        )
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "notes.txt").read_text() == "mine"

    copy = tmp_path / "copy"
    (copy / "examples" / "node" / "node_modules").mkdir(parents=True)
    record = {"written_by": "edgeft", "what": sync.COPY_WHAT, "files": ["a.txt", "stale.bin"]}
    (copy / sync.COPY_MARKER).write_text(json.dumps(record))
    (copy / "examples" / "node" / "node_modules" / "dep.js").write_text("users install")
    (copy / "stale.bin").write_text("an earlier bundle's file, not this one's")
    (copy / "notes.txt").write_text("the user's")
    (copy / "a.txt").write_text("kept")
    job = {"want": ["a.txt", "sub/b.txt"], "hash": None, "keep": ["examples/node/node_modules"]}
    res = _device_sync("prepare", copy, job)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    partial = Path(got["dir"])
    assert got["files"] == {"a.txt": bod.sha256_file(partial / "a.txt")}
    assert not (partial / "stale.bin").exists() and (partial / "sub").is_dir() and not copy.exists()
    assert (partial / "notes.txt").read_text() == "the user's"
    assert (partial / "examples" / "node" / "node_modules" / "dep.js").read_text() == "users install"
    res = _device_sync("finish", copy)
    assert res.returncode == 0 and res.stdout.strip() == str(copy) and not partial.exists()
    assert (copy / "notes.txt").read_text() == "the user's"


def test_the_copy_helper_refuses_a_job_or_a_finish_that_would_reach_outside_the_copy(tmp_path: Path) -> None:
    """A want-list naming "../x" or an absolute path creates nothing anywhere; finish with a PARTIAL that is
    not a copy (the user's folder) or missing moves nothing: one line, exit 1."""
    final = tmp_path / "w" / "final"
    for want in (["../evil1/x"], ["a/../../evil2/y"], [str(tmp_path / "evil3" / "x")], ["a\0b"], 5):
        res = _device_sync("prepare", final, {"want": want, "hash": None})
        assert res.returncode == 1 and "'want' is not a list of plain paths" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # not even the copy's own folders
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    final.mkdir(parents=True)
    (final / ".edgeft").write_text("")
    (final / "a.txt").write_text("old copy")
    code = (Path(bod.__file__).parent / "sync_on_device.py").read_text()
    for partial in (users, tmp_path / "absent"):
        res = subprocess.run(
            [sys.executable, "-I", "-c", code, "finish", str(final), str(partial)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 1 and "is not a bundle copy edgeft made" in res.stderr, res.stderr
    assert (users / "notes.txt").read_text() == "mine" and (final / "a.txt").read_text() == "old copy"


def test_special_files_in_a_bundle_end_the_device_check_and_edgeft_check_alike(
    made: Path, tmp_path: Path
) -> None:
    """SHA256SUMS or manifest.json as a FIFO (a read that never ends) or a symlink (to a file outside) is a
    problem on the device as in `edgeft check`, found at once."""
    import threading

    from edgeft.check import check_bundle

    outside = tmp_path / "outside"
    outside.mkdir()
    for name, kind in [
        (SHA256SUMS, "fifo"),
        (MANIFEST, "fifo"),
        (SHA256SUMS, "symlink"),
        (MANIFEST, "symlink"),
    ]:
        b = _copy(made, tmp_path / f"{name}-{kind}")
        (outside / name).write_bytes((b / name).read_bytes())
        (b / name).unlink()
        os.mkfifo(b / name) if kind == "fifo" else (b / name).symlink_to(outside / name)
        got: list = []
        t = threading.Thread(
            target=lambda b, got: got.append(bod.check_integrity(b)[0]), args=(b, got), daemon=True
        )
        t.start()
        t.join(30)
        assert got, f"the device check hung on {name} as a {kind}"
        assert got[0]["ok"] is False and any("not a regular file" in x for x in got[0]["problems"]), got
        assert not check_bundle(b, load=False).passed


def test_edgeft_bench_times_with_the_device_scripts_core(tiny_exports: list) -> None:
    """`edgeft bench` times with the device script's loop and the device script's engine of each format."""
    assert edgeft_bench.measure_engine is bod.measure_engine
    engines = {}
    for art in tiny_exports:
        engine = edgeft_bench._open_engine(Path(art.path), threads=1, n_ctx=64, allow_native_libs=False)
        engines[art.spec.format] = type(engine)
        engine.close()
    assert engines == {"gguf": bod.LlamaCppEngine, "onnx": bod.OrtGenaiEngine}


def test_default_thread_sweep() -> None:
    assert bod.default_threads(1) == [1]
    assert bod.default_threads(2) == [1, 2]
    assert bod.default_threads(4) == [1, 2, 4]
    assert bod.default_threads(6) == [1, 2, 4, 6]
    assert bod.default_threads(None) == [1]


# --- on the "device": a venv with only the runtimes --------------------------------------------------------


def test_bench_on_device_in_a_runtime_only_venv(made: Path, runtime_venv: Path) -> None:
    res, out = _device(runtime_venv, made, "--threads", "1,2", *SMALL)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out["schema"] == 1 and out["bundle"] == str(made.resolve())
    assert out["started"] <= out["finished"] and out["finished"].endswith("Z")
    manifest = json.loads((made / MANIFEST).read_text())
    assert out["integrity"] == {"ok": True, "files_checked": len(manifest["files"]) + 1, "problems": []}
    dev = out["device"]
    assert dev["cores"] == os.cpu_count() and dev["ram_mb"] > 100 and dev["machine"]
    assert dev["runtimes"] == {"llama-cpp-python": "0.3.36", "onnxruntime-genai": "0.18.0"}
    if Path("/proc/cpuinfo").is_file():
        assert dev["cpu_features"] and dev["cpu_model"]
    # energy: read where a counter is readable; this VM has none, so "not available" and no figure anywhere
    if dev["energy"]["available"]:
        assert dev["energy"]["idle_w"] is None or dev["energy"]["idle_w"] > 0
    else:
        assert dev["energy"]["reason"] == bod.find_energy_source()[1]
        assert all(
            a["energy"] is None and all(p["energy"] is None for p in a["sweep"]) for a in out["artifacts"]
        )
    for when in ("before", "after"):  # read from the system or null, never made up
        assert dev["temperature_c"][when] is None or 0 < dev["temperature_c"][when] < 150
        assert dev["throttled"][when] is None or dev["throttled"][when].startswith("0x")
    arts = {a["path"]: a for a in out["artifacts"]}
    assert list(arts) == [GGUF, ONNX]
    by_path = {e["path"]: e for e in manifest["artifacts"]}
    for path, a in arts.items():
        assert a["status"] == "ok" and a["reason"] is None and a["install"] is None, a
        assert a["format"] == by_path[path]["format"]
        assert [p["threads"] for p in a["sweep"]] == [1, 2]
        for p in a["sweep"]:
            assert (
                p["prefill_tok_s"] > 0 and p["decode_tok_s"] > 0 and p["ttft_ms"] > 0 and p["peak_rss_mb"] > 1
            )
        best = a["best_threads"]
        pre = {p["threads"]: p for p in a["sweep"]}
        assert (
            a["prefill_tok_s"]
            == max(p["prefill_tok_s"] for p in a["sweep"])
            == pre[best["prefill"]]["prefill_tok_s"]
        )
        assert a["ttft_ms"] == pre[best["prefill"]]["ttft_ms"]
        assert (
            a["decode_tok_s"]
            == max(p["decode_tok_s"] for p in a["sweep"])
            == pre[best["decode"]]["decode_tok_s"]
        )
        assert a["peak_rss_mb"] == max(p["peak_rss_mb"] for p in a["sweep"])
        per_token = by_path[path].get("decode_bytes_per_token")
        assert a["decode_bytes_per_token"] == per_token
        if per_token is None:
            assert a["effective_gb_s"] is None
        else:
            assert a["effective_gb_s"] == pytest.approx(per_token * a["decode_tok_s"] / 1e9)


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda b: (b / "tokenizer" / "tokenizer.json").write_text("{}"), "tokenizer/tokenizer.json: sha256"),
        (
            lambda b: (b / MANIFEST).write_text(
                (b / MANIFEST).read_text().replace('"passed": true', '"passed": 1')
            ),
            MANIFEST,
        ),
        (lambda b: (b / GGUF).unlink(), f"{GGUF}: missing"),
        (lambda b: (b / SHA256SUMS).unlink(), SHA256SUMS),
    ],
    ids=["tokenizer", "manifest", "missing-artifact", "no-sums"],
)
def test_a_changed_bundle_is_refused_before_any_benchmark(
    made: Path, tmp_path: Path, tamper, needle: str
) -> None:  # noqa: ANN001
    b = _copy(made, tmp_path)
    tamper(b)
    res, out = _device(sys.executable, b, "--threads", "1", *SMALL)
    assert res.returncode == 1
    assert out["integrity"]["ok"] is False and out["artifacts"] == []
    assert any(needle in p for p in out["integrity"]["problems"]), out["integrity"]["problems"]


def _odd_sums(text: str) -> dict[str, str]:
    """SHA256SUMS texts a hand, a tool or an attacker might leave, made from a bundle's real one."""
    lines = text.splitlines(keepends=True)
    first = lines[0].rstrip("\n")
    digest, name = first[:64], first[66:]
    return {
        "as written": text,
        "binary markers": "".join(f"{ln[:64]} *{ln[66:]}" for ln in lines),
        "blank and form-feed lines": "\n\x0c\n" + text + "\n \n",
        "crlf": text.replace("\n", "\r\n"),
        "line separator u2028": text.replace("\n", "\u2028", 1),
        "next line x85": text.replace("\n", "\x85", 1),
        "listed twice, same digest": text + lines[0],
        "listed twice, other digest": text + f"{'0' * 64}  {name}\n",
        "one space, no marker": text.replace(f"{digest}  {name}", f"{digest} {name}"),
        "escaped name": text.replace(f"{digest}  {name}", f"\\{digest}  {name}"),
        "escaped newline": text + f"\\{digest}  a\\nb\n",
        "parent path": text + f"{digest}  ../{name}\n",
        "absolute path": text + f"{digest}  /etc/{name}\n",
        "upper-case digest": text.replace(digest, digest.upper()),
    }


def test_check_and_the_device_give_the_same_verdict_on_odd_sha256sums(made: Path, tmp_path: Path) -> None:
    """One SHA256SUMS parser: `edgeft check` on the host and the bundle's own script on the device accept
    and refuse the same files (str.splitlines on the device once split at \\x85 and \\u2028, and kept the
    last of a name listed twice, where check refused)."""
    from edgeft.check import check_bundle

    b = _copy(made, tmp_path)
    verdicts = {}
    for case, text in _odd_sums((made / SHA256SUMS).read_text()).items():
        (b / SHA256SUMS).write_text(text, encoding="utf-8", newline="")
        host = check_bundle(b, load=False).passed
        device = bod.check_integrity(b)[0]["ok"]
        verdicts[case] = (host, device)
    assert {c: v for c, v in verdicts.items() if v[0] != v[1]} == {}
    accepted = {case for case, (host, _) in verdicts.items() if host}
    assert accepted == {
        "as written",
        "binary markers",
        "blank and form-feed lines",
        "escaped name",
        "upper-case digest",
    }


def test_a_missing_runtime_is_skipped_with_its_install_line(made: Path, bare_python: Path) -> None:
    res, out = _device(bare_python, made, "--threads", "1", *SMALL)
    assert res.returncode == 0, res.stderr[-2000:]  # skipped is not failed
    assert out["integrity"]["ok"] is True
    assert out["device"]["runtimes"] == {"llama-cpp-python": None, "onnxruntime-genai": None}
    got = {a["path"]: (a["status"], a["install"], a["sweep"]) for a in out["artifacts"]}
    assert got == {
        GGUF: ("skipped", "pip install llama-cpp-python", []),
        ONNX: ("skipped", "pip install onnxruntime-genai", []),
    }
    assert all("not importable" in a["reason"] for a in out["artifacts"])


def test_an_artifact_not_in_the_manifest_fails(made: Path, bare_python: Path) -> None:
    res, out = _device(bare_python, made, "--artifact", "nope.gguf", *SMALL)
    assert res.returncode == 1
    assert [(a["path"], a["status"]) for a in out["artifacts"]] == [("nope.gguf", "failed")]


# --- one timing definition: an early EOS never restarts anything ------------------------------------------


@pytest.fixture(scope="module")
def eos_first_onnx(made: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A copy of the ONNX artifact whose genai_config eos_token_id is the first token it generates for the
    benchmark prompt: onnxruntime-genai would stop right after it."""
    import onnxruntime_genai as og

    dst = tmp_path_factory.mktemp("eos") / ONNX
    shutil.copytree(made / ONNX, dst)
    engine = bod.OrtGenaiEngine(dst, threads=1, n_ctx=64)
    ids = bod.prompt_ids(engine.n_vocab, 16)
    first = engine.start(ids)
    engine.close()
    cfg_path = dst / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["eos_token_id"] = [first]
    cfg["model"]["pad_token_id"] = first
    cfg_path.write_text(json.dumps(cfg))
    # Without min_length the generator is done after that first token: the case this file guards against.
    model = og.Model(str(dst))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=64)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    gen.generate_next_token()
    assert int(gen.get_next_tokens()[0]) == first and gen.is_done()
    return dst, ids


def test_timed_onnx_decode_runs_exactly_d_steps_after_an_early_eos(
    eos_first_onnx: tuple[Path, list[int]],
) -> None:
    path, ids = eos_first_onnx
    engine = bod.OrtGenaiEngine(path, threads=1, n_ctx=64)
    try:
        ttft, decode, out = bod.time_once(engine, ids, 8)
        # one generator: the prompt, the first token and 8 decode steps, nothing appended twice
        assert len(out) == 9 and engine.sequence_length() == len(ids) + 9
        assert ttft > 0 and decode > 0
    finally:
        engine.close()
    lat = edgeft_bench.bench(path, threads=1, prompt_tokens=16, decode_tokens=8, runs=1)
    assert lat.decode_tok_s > 0 and lat.prefill_tok_s > 0 and lat.decode_tokens == 8


def test_ort_runtime_continues_past_its_eos(made: Path, eos_first_onnx: tuple[Path, list[int]]) -> None:
    """OrtRuntime.generate with no stop ids goes on after the model's EOS, giving the tokens the same weights
    give when that token is not the EOS; a stop id still ends it."""
    from edgeft.formats.onnx.runtime import OrtRuntime

    path, ids = eos_first_onnx
    with OrtRuntime(made / ONNX, threads=1, n_ctx=64) as rt:
        want = rt.generate(ids, 6)
    with OrtRuntime(path, threads=1, n_ctx=64) as rt:
        assert want[0] in rt.end_ids
        assert rt.generate(ids, 6) == want
        assert rt.generate(ids, 6, rt.end_ids) == want[:1]


def test_the_device_script_runs_only_the_bundles_own_schema_file(made: Path, tmp_path: Path) -> None:
    """bench_on_device.py reads bundle_manifest.py beside it from its bytes: a .pyc planted in __pycache__
    (valid for that very file's mtime and size) never runs, no bytecode is written into the bundle, and a
    schema file that is a symlink or missing is one line and a non-zero exit."""
    import importlib.util
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    b = _copy(made, tmp_path)
    schema = b / "bundle_manifest.py"
    st = schema.stat()
    planted = compile("raise SystemExit('PLANTED BYTECODE RAN')", str(schema), "exec")
    cache = b / "__pycache__"
    cache.mkdir()
    pyc = Path(importlib.util.cache_from_source(str(schema))).name
    (cache / pyc).write_bytes(bytes(_code_to_timestamp_pyc(planted, int(st.st_mtime), st.st_size)))
    res = subprocess.run(
        [sys.executable, "-I", str(b / "bench_on_device.py"), str(b), "--threads", "1", "--runs", "1",
         "--prompt-tokens", "4", "--decode-tokens", "2", "--artifact", "model-q8_0.gguf"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert "PLANTED" not in res.stdout + res.stderr
    assert json.loads(res.stdout)["integrity"]["ok"] is True, res.stderr[-2000:]
    assert sorted(p.name for p in cache.iterdir()) == [pyc]  # nothing written beside the planted file
    shutil.rmtree(cache)

    real = tmp_path / "elsewhere.py"
    shutil.move(schema, real)
    schema.symlink_to(real)
    for case in ("symlink", "missing"):
        if case == "missing":
            schema.unlink()
        res = subprocess.run(
            [sys.executable, "-I", str(b / "bench_on_device.py"), str(b)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0 and len(lines) == 1 and "bundle_manifest.py" in lines[0], (
            case,
            res.stderr,
        )
        assert "Traceback" not in res.stderr and res.stdout == ""
