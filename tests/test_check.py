"""Bundles prove themselves (`edgeft check`, SHA256SUMS, manifest schema 2, permissions) and the GGUF header
check refuses damaged or hostile files in one line, quickly, whatever the bytes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from bundles import DRIFT, LATENCY, Bundles, plain_facts, write
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeft import bundle, data
from edgeft.check import check_bundle, parse_manifest, parse_sums
from edgeft.constants import FINETUNE_RECORD, MANIFEST, SHA256SUMS
from edgeft.errors import EdgeftError
from edgeft.formats.gguf.header import check_gguf
from edgeft.targets import ArtifactSpec

SETTINGS = {"r": 8, "alpha": 16, "epochs": 1, "target_modules": ["q_proj", "v_proj"]}
SPLIT = {"files": {"/data/tasks.jsonl": "0" * 64}, "examples": ["/data/tasks.jsonl:3"]}
# The same split recorded from another folder: the manifest's digest names content, not where it lay.
SPLIT_ELSEWHERE = {"files": {"/home/me/t.jsonl": "0" * 64}, "examples": ["/home/me/t.jsonl:3"]}


def _write(work: Path, tiny_llama: Path, arts: list[bundle.ArtifactResult], out: Path) -> Path:
    """A bundle as `edgeft build` writes it, from artifacts exported once (no fine-tune: faster)."""
    (work / "adapter").mkdir(exist_ok=True)
    (work / "adapter" / FINETUNE_RECORD).write_text(json.dumps({"settings": SETTINGS, "eval_split": SPLIT}))
    base = bundle.describe_base(tiny_llama)
    lora, split_sha = bundle.finetune_facts(work / "adapter")
    facts = plain_facts(
        tiny_llama,
        base_model=base.name,
        base_revision=base.revision,
        base_weights_sha256=base.weights_sha256,
        lora_settings=lora,
        eval_split_sha256=split_sha,
    )
    return write(tiny_llama, arts, out, facts=facts)


@pytest.fixture(scope="module")
def made(tiny_llama: Path, tiny_exports: list, tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """The bundle, written with umask 022 from the session's exported artifacts (no fine-tune: faster)."""
    work = tmp_path_factory.mktemp("check")
    return Bundles(_write(work, tiny_llama, tiny_exports, work / "dist"), work)


def _edgeft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeft", *args], capture_output=True, text=True, timeout=300
    )


# --- a fresh bundle -----------------------------------------------------------------------------------------


def test_fresh_bundle_passes_check(made: Bundles) -> None:
    res = _edgeft("check", str(made.fresh), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["passed"] and report["findings"] == []
    assert [(a["path"], a["loaded"]) for a in report["artifacts"]] == [
        ("model-q8_0.gguf", True),
        ("onnx-int8", True),
    ]
    assert all(len(a["generated"]) == 4 for a in report["artifacts"])
    plain = _edgeft("check", str(made.fresh), "--no-load")
    assert plain.returncode == 0 and plain.stdout == ""
    assert plain.stderr.strip().splitlines()[-1].startswith("ok: ")


def test_manifest_schema(made: Bundles, tiny_llama: Path) -> None:
    m = json.loads((made.fresh / MANIFEST).read_text())
    assert m["schema_version"] == bundle.SCHEMA_VERSION == 2
    assert m["passed"] is True
    assert m["base_model"] == tiny_llama.name  # the folder's name, never its path
    assert str(tiny_llama.parent) not in (made.fresh / MANIFEST).read_text()
    assert m["base_revision"] is None
    assert m["base_weights_sha256"] == {
        "model.safetensors": bundle.sha256_file(tiny_llama / "model.safetensors")
    }
    assert m["lora"] == SETTINGS
    assert m["data"]["eval_split_sha256"] == data.split_digest(SPLIT_ELSEWHERE, "x")
    # what was actually written: tensor types as shares of the weight bytes, and the head's type
    types = {a["path"]: a["tensor_types"] for a in m["artifacts"]}
    assert all(abs(sum(t.values()) - 1) < 1e-4 for t in types.values()), types
    assert types["model-q8_0.gguf"].get("q8_0", 0) > 0.5 and "int8 (MatMulNBits)" in types["onnx-int8"]
    assert all(a["output_head"]["type"] for a in m["artifacts"] if a["format"] == "gguf")
    assert "Tensor types actually written" in (made.fresh / "report.md").read_text()
    assert m["data"]["eval_split_sha256"] != data.split_digest(
        {**SPLIT, "examples": ["/data/tasks.jsonl:4"]}, "x"
    )
    files = m["files"]
    on_disk = bundle.bundle_files(made.fresh)
    assert sorted(files) == on_disk
    assert {
        "report.md",
        "model-q8_0.gguf",
        "tokenizer/tokenizer.json",
        "tokenizer/chat_template.jinja",
    } <= set(files)
    assert "onnx-int8/model.onnx" in files and MANIFEST not in files and SHA256SUMS not in files
    for rel, digest in files.items():
        assert bundle.sha256_file(made.fresh / rel) == digest
    sums = parse_sums((made.fresh / SHA256SUMS).read_text())
    assert sums == files | {MANIFEST: bundle.sha256_file(made.fresh / MANIFEST)}


def test_sha256sum_c_accepts_the_bundle(made: Bundles) -> None:
    if shutil.which("sha256sum") is None:
        pytest.skip("coreutils sha256sum not installed")
    res = subprocess.run(
        ["sha256sum", "-c", "--strict", SHA256SUMS], cwd=made.fresh, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": OK") == len(parse_sums((made.fresh / SHA256SUMS).read_text()))


def test_permissions_follow_the_umask(made: Bundles) -> None:
    for p in [made.fresh, *made.fresh.rglob("*")]:
        want = 0o755 if p.is_dir() else 0o644
        assert p.stat().st_mode & 0o777 == want, p


def test_passed_is_false_when_a_shipped_artifact_is_over_budget(
    made: Bundles, tiny_llama: Path, tmp_path: Path
) -> None:
    gguf = made.fresh / "model-q8_0.gguf"
    arts = [bundle.ArtifactResult(ArtifactSpec("gguf", "q8_0"), gguf, DRIFT, LATENCY, ("kld_mean over",))]
    out = _write(tmp_path, tiny_llama, arts, tmp_path / "dist")
    assert json.loads((out / MANIFEST).read_text())["passed"] is False
    assert check_bundle(out, load=False).passed  # intact, even though the build rejected it


def test_written_gguf_files_have_normal_modes(tiny_llama: Path, gguf_bytes: bytes, tmp_path: Path) -> None:
    from edgeft.formats.gguf.export import export_gguf
    from edgeft.formats.gguf.quantize import quantize_gguf

    src = tmp_path / "src.gguf"
    src.write_bytes(gguf_bytes)
    old = os.umask(0o022)
    try:
        f16 = export_gguf(tiny_llama, tmp_path / "f16.gguf", "f16").path
        q4 = quantize_gguf(f16, tmp_path / "q4.gguf", "q4_0", threads=1)
    finally:
        os.umask(old)
    assert f16.stat().st_mode & 0o777 == 0o644 and q4.stat().st_mode & 0o777 == 0o644


def test_base_model_recorded_as_given(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    local = bundle.describe_base(str(tiny_llama) + "/")
    assert local == bundle.BaseModel(tiny_llama.name, None, bundle.describe_base(tiny_llama).weights_sha256)
    snap = tmp_path / "models--org--name" / "snapshots" / ("c0ffee" * 6 + "beef")
    snap.mkdir(parents=True)
    (snap / "model-00001-of-00002.safetensors").write_bytes(b"one")
    (snap / "model-00002-of-00002.safetensors").write_bytes(b"two")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, local_files_only: str(snap))
    hub = bundle.describe_base("org/name")
    assert hub.name == "org/name" and hub.revision == snap.name
    assert list(hub.weights_sha256) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]

    def offline(name: str, local_files_only: bool) -> str:
        raise OSError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert bundle.describe_base("org/name") == bundle.BaseModel("org/name", None, {})


# --- tampering: each change fails the check, naming the file -----------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


TAMPER: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (change, the file the finding names, its kind)
    "gguf-data-byte": (lambda b: _flip(b / "model-q8_0.gguf", -100), "model-q8_0.gguf", "modified"),
    "gguf-header-byte": (lambda b: _flip(b / "model-q8_0.gguf", 9), "model-q8_0.gguf", "modified"),
    "chat-template": (
        lambda b: (b / "tokenizer/chat_template.jinja").write_text("{{ messages }}"),
        "tokenizer/chat_template.jinja",
        "modified",
    ),
    "onnx-file": (
        lambda b: _flip(b / "onnx-int8/model.onnx.data", 0),
        "onnx-int8/model.onnx.data",
        "modified",
    ),
    "report": (
        lambda b: (b / "report.md").write_text((b / "report.md").read_text() + "\nall good!\n"),
        "report.md",
        "modified",
    ),
    "deleted": (
        lambda b: (b / "tokenizer/tokenizer_config.json").unlink(),
        "tokenizer/tokenizer_config.json",
        "missing",
    ),
    "added": (
        lambda b: (b / "tokenizer/extra.py").write_text("import os\n"),
        "tokenizer/extra.py",
        "unexpected",
    ),
    "symlink": (lambda b: (b / "notes.txt").symlink_to("/etc/hostname"), "notes.txt", "not_regular"),
    "manifest-truncated": (
        lambda b: (b / MANIFEST).write_bytes((b / MANIFEST).read_bytes()[:200]),
        MANIFEST,
        "manifest",
    ),
    "manifest-edited": (
        lambda b: (b / MANIFEST).write_text(
            (b / MANIFEST).read_text().replace('"passed": true', '"passed": false')
        ),
        MANIFEST,
        "modified",
    ),
    "sums-deleted": (lambda b: (b / SHA256SUMS).unlink(), SHA256SUMS, "missing"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_bundle_fails_naming_the_file(made: Bundles, case: str) -> None:
    change, path, kind = TAMPER[case]
    b = made(case)
    change(b)
    report = check_bundle(b, load=False)
    assert not report.passed
    assert (kind, path) in {(f.kind, f.path) for f in report.findings}, report.findings
    assert all("\n" not in f.line() for f in report.findings)


def test_tampered_artifacts_are_not_loaded(made: Bundles) -> None:
    b = made("not-loaded")
    _flip(b / "model-q8_0.gguf", 9)  # the tensor count's second byte: the header no longer adds up
    report = check_bundle(b)
    kinds = {(f.kind, f.path) for f in report.findings}
    assert {("modified", "model-q8_0.gguf"), ("artifact_header", "model-q8_0.gguf")} <= kinds
    gguf, onnx = report.artifacts
    assert not gguf.loaded and gguf.skipped and onnx.loaded


def test_cli_names_the_file_and_exits_1(made: Bundles) -> None:
    b = made("cli")
    (b / "tokenizer/chat_template.jinja").write_text("{{ messages }}")
    (b / MANIFEST).write_bytes((b / MANIFEST).read_bytes()[:-40])
    res = _edgeft("check", str(b), "--no-load")
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert any(line.startswith("FAIL manifest.json: not valid JSON") for line in lines), lines
    assert any(line.startswith("FAIL tokenizer/chat_template.jinja: sha256 differs") for line in lines), lines
    assert "Traceback" not in res.stderr
    js = _edgeft("check", str(b), "--no-load", "--json")
    assert js.returncode == 1 and json.loads(js.stdout)["passed"] is False
    missing = _edgeft("check", str(b.parent / "nope"))
    assert (
        missing.returncode == 2
        and missing.stderr.count("\n") == 1
        and "not a bundle folder" in missing.stderr
    )


def test_hostile_manifest_paths_are_refused(made: Bundles) -> None:
    m = json.loads((made.fresh / MANIFEST).read_text())
    for bad in ("../../etc/passwd", "/etc/passwd", "a/../../x", "a\\b", ""):
        doc = m | {"files": {bad: "0" * 64}}
        with pytest.raises(EdgeftError, match="manifest.json: files entry"):
            parse_manifest(json.dumps(doc).encode())
        art = m | {"artifacts": [{"path": bad, "format": "gguf", "sha256": "0" * 64}]}
        with pytest.raises(EdgeftError, match=r"manifest.json: artifacts\[0\].path"):
            parse_manifest(json.dumps(art).encode())
    for raw, msg in (
        (b"[" * 100_000 + b"]" * 100_000, "not usable JSON|not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (json.dumps(m | {"schema_version": 99}).encode(), "newer than this edgeft"),
        (json.dumps({k: v for k, v in m.items() if k != "schema_version"}).encode(), "no schema_version"),
        (b'{"schema_version": 2, "files": {}, "artifacts": [], "passed": "yes"}', "passed is"),
        (b"9" * 10_000, "not usable JSON"),
    ):
        with pytest.raises(EdgeftError, match=msg):
            parse_manifest(raw)


# --- GGUF header check -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(made: Bundles) -> bytes:
    return (made.fresh / "model-q8_0.gguf").read_bytes()


def _refused(tmp_path: Path, data: bytes, match: str) -> str:
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(EdgeftError, match=match) as e:
        check_gguf(p)
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and "\n" not in msg
    return msg


def test_real_gguf_header(gguf_bytes: bytes, made: Bundles) -> None:
    h = check_gguf(made.fresh / "model-q8_0.gguf")
    assert h.version == 3 and h.n_tensors > 0 and h.n_kv > 10 and h.alignment == 32
    assert h.data_offset + h.data_bytes <= len(gguf_bytes)


@pytest.mark.parametrize("cut", [0, 3, 4, 10, 23, 24, 100, 1000, 5000, -(1 << 14), -1])
def test_truncated_gguf_is_refused(gguf_bytes: bytes, tmp_path: Path, cut: int) -> None:
    msg = _refused(tmp_path, gguf_bytes[:cut], "not a usable GGUF file")
    assert "truncated" in msg or "cannot describe" in msg or "cannot hold" in msg


def _kv_string(key: bytes, value_len: int, value: bytes = b"") -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<iQ", 8, value_len) + value


def test_hostile_gguf_headers_are_refused(gguf_bytes: bytes, tmp_path: Path) -> None:
    head = b"GGUF" + struct.pack("<I", 3)
    _refused(tmp_path, b"GGML" + gguf_bytes[4:], "starts with b'GGML'")
    _refused(tmp_path, b"GGUF" + struct.pack("<I", 1) + gguf_bytes[8:], "GGUF version 1")
    _refused(tmp_path, b"GGUF" + struct.pack("<I", 7) + gguf_bytes[8:], "GGUF version 7")
    _refused(tmp_path, b"GGUF" + struct.pack(">I", 3) + gguf_bytes[8:], "byte-swapped")
    # absurd counts: the 43-byte file gguf-py 0.19 can hang on
    _refused(
        tmp_path, head + struct.pack("<qq", 1 << 62, 0) + b"\0" * 19, "claims 4611686018427387904 tensors"
    )
    _refused(tmp_path, head + struct.pack("<qq", 0, 1 << 40) + b"\0" * 19, "claims 1099511627776 metadata")
    _refused(tmp_path, head + struct.pack("<qq", -1, 0) + b"\0" * 19, "claims -1 tensors")
    n_kv_ok = head + struct.pack("<qq", 0, 1)
    # a string of absurd length, and one longer than what is left
    _refused(
        tmp_path, n_kv_ok + _kv_string(b"general.name", 1 << 60) + b"x" * 64, "1152921504606846976 bytes long"
    )
    _refused(
        tmp_path, n_kv_ok + _kv_string(b"general.name", 1000, b"x" * 10), "truncated: metadata 'general.name'"
    )
    huge_array = struct.pack("<Q", 4) + b"toks" + struct.pack("<iiQ", 9, 8, 1 << 50)
    _refused(tmp_path, n_kv_ok + huge_array + b"\0" * 64, "array of 1125899906842624 elements")
    key = struct.pack("<Q", 1 << 40) + b"k" * 32
    _refused(tmp_path, n_kv_ok + key, "metadata key 0 is 1099511627776 bytes long")
    align = struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<iI", 4, 24)
    _refused(tmp_path, n_kv_ok + align + b"\0" * 32, "not a power of 2")
    align_type = struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<iQ", 10, 32)
    _refused(tmp_path, n_kv_ok + align_type + b"\0" * 32, "not a uint32")


def _tensor_file(name: bytes, dims: list[int], ggml_type: int, offset: int = 0, data: int = 64) -> bytes:
    info = struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
    info += b"".join(struct.pack("<q", d) for d in dims) + struct.pack("<iQ", ggml_type, offset)
    header = b"GGUF" + struct.pack("<Iqq", 3, 1, 0) + info
    return header + b"\0" * (-len(header) % 32) + b"\0" * data


def test_hostile_tensor_infos_are_refused(tmp_path: Path) -> None:
    check_path = tmp_path / "ok.gguf"
    check_path.write_bytes(_tensor_file(b"w", [4, 4], 0))  # 16 f32 = 64 bytes: fine
    assert check_gguf(check_path).n_tensors == 1
    _refused(tmp_path, _tensor_file(b"w", [4, 4, 1, 1, 1], 0), "5 dimensions")
    _refused(tmp_path, _tensor_file(b"w", [4, 0], 0), "dimension 1 is 0")
    _refused(tmp_path, _tensor_file(b"w", [4, -4], 0), "dimension 1 is -4")
    _refused(tmp_path, _tensor_file(b"w", [4, 4], 99), "unknown ggml type 99")
    _refused(tmp_path, _tensor_file(b"w", [4, 4], 4), "unknown ggml type 4")  # Q4_2: removed from ggml
    _refused(tmp_path, _tensor_file(b"w", [16, 4], 2), "not a multiple of its type's block of 32")
    _refused(tmp_path, _tensor_file(b"w" * 64, [4, 4], 0), "tensor 0 name is 64 bytes long")
    _refused(tmp_path, _tensor_file(b"w", [4, 4], 0, offset=3), "not a multiple of the alignment")
    _refused(tmp_path, _tensor_file(b"w", [4, 4], 0, offset=32), "expected 0")
    _refused(tmp_path, _tensor_file(b"w", [1 << 31, 1 << 31, 1 << 31], 0), "more elements than an int64")
    _refused(tmp_path, _tensor_file(b"w", [1 << 20, 1 << 20], 0), "more than the whole file")
    _refused(tmp_path, _tensor_file(b"w", [4, 4], 0, data=63), "truncated: the tensor data ends at byte")


def _kv_file(*kvs: bytes) -> bytes:
    return b"GGUF" + struct.pack("<Iqq", 3, 0, len(kvs)) + b"".join(kvs)


def _u32(key: bytes, value: int) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<iI", 4, value)


def _u32s(key: bytes, values: list[int]) -> bytes:
    return (
        struct.pack("<Q", len(key))
        + key
        + struct.pack("<iiQ", 9, 4, len(values))
        + struct.pack(f"<{len(values)}I", *values)
    )


def _str(key: bytes, value: bytes) -> bytes:
    return _kv_string(key, len(value), value)


def test_keys_and_values_read_as_llama_cpp_reads_them(tmp_path: Path) -> None:
    """A key llama.cpp would find under another name (a NUL inside: it compares C strings), text that is
    not UTF-8 (the GGUF spec's strings; gguf-py fails on it), or more small values than a model has, are
    refused; a value too long to keep is refused when asked for, never read as a missing key."""
    arch = _str(b"general.architecture", b"llama")
    _refused(tmp_path, _kv_file(_u32(b"general.alignment\0x", 64), arch), "holds a NUL byte")
    _refused(tmp_path, _kv_file(_str(b"general.architecture\0", b"evil"), arch), "holds a NUL byte")
    _refused(tmp_path, _kv_file(arch, _u32(b"x\xff", 1)), "metadata key 1 is not UTF-8")
    _refused(tmp_path, _kv_file(_str(b"general.name", b"\xff")), "'general.name' is not UTF-8")
    _refused(tmp_path, _tensor_file(b"a\0b", [4, 4], 0), "holds a NUL byte")
    many = [_u32s(f"f.{i}".encode(), [0] * 1024) for i in range(64)]
    _refused(tmp_path, _kv_file(*many, arch), "more metadata than a model header holds")
    p = tmp_path / "long.gguf"
    p.write_bytes(_kv_file(arch, _u32s(b"llama.attention.head_count_kv", [1] * 1025)))
    h = check_gguf(p)
    assert h.value("general.architecture") == "llama" and h.value("absent") is None
    with pytest.raises(EdgeftError, match="'llama.attention.head_count_kv' is an array of 1025 numbers"):
        h.value("llama.attention.head_count_kv")
    with pytest.raises(EdgeftError, match="cannot read the GGUF file"):
        check_gguf(Path("a\0b.gguf"))


@pytest.mark.parametrize(
    ("kvs", "match"),
    [
        ([], "no attention.head_count"),
        ([_u32s(b"llama.attention.head_count", [2, 2, 2])], "head_count_kv has 3 entries for 2 layers"),
        ([_u32(b"llama.attention.head_count", 2), _u32s(b"llama.attention.head_count_kv", [1] * 512)], "512"),
        ([_u32(b"llama.attention.head_count", 16)], "key_length = 0"),  # 16 heads of an 8-wide embedding
    ],
)
def test_a_kv_shape_llama_cpp_would_refuse_is_refused(tmp_path: Path, kvs: list[bytes], match: str) -> None:
    from edgeft.formats import kv_shape

    base = [_str(b"general.architecture", b"llama"), _u32(b"llama.block_count", 2)]
    p = tmp_path / "m.gguf"
    p.write_bytes(_kv_file(*base, _u32(b"llama.embedding_length", 8), *kvs))
    with pytest.raises(EdgeftError, match=match):
        kv_shape(p)
    p.write_bytes(
        _kv_file(*base, _u32(b"llama.embedding_length", 8), _u32s(b"llama.attention.head_count", [2, 2]))
    )
    assert kv_shape(p).k_width == 2 * 2 * 4  # two layers of 2 kv heads (head_count_kv defaults), 4 wide


def test_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(EdgeftError, match="not a regular file"):
        check_gguf(fifo)  # opening a fifo would block forever
    with pytest.raises(EdgeftError, match="cannot read"):
        check_gguf(tmp_path / "absent.gguf")


def test_runtime_and_quantizer_refuse_a_bad_header(gguf_bytes: bytes, tmp_path: Path) -> None:
    from edgeft.formats.gguf.quantize import quantize_gguf
    from edgeft.formats.gguf.runtime import LlamaCppRuntime

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_bytes[: len(gguf_bytes) // 2])
    with pytest.raises(EdgeftError, match="truncated"):
        LlamaCppRuntime(bad, threads=1)
    with pytest.raises(EdgeftError, match="truncated"):
        quantize_gguf(bad, tmp_path / "q.gguf", "q4_0")
    assert not (tmp_path / "q.gguf").exists()


# --- property tests: no input makes the header check or the manifest reader crash or hang ------------------

FUZZ = settings(
    max_examples=settings.default.max_examples * 3 // 2
)  # the profile's (conftest), and half again


def _only_edgeft_errors(fn: Callable[[], object]) -> None:
    try:
        fn()
    except EdgeftError as e:
        assert "\n" not in str(e)


@FUZZ
@given(data=st.binary(max_size=512))
def test_fuzz_gguf_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    p = tmp_path_factory.getbasetemp() / "fuzz-random.gguf"
    p.write_bytes(data)
    _only_edgeft_errors(lambda: check_gguf(p))


@FUZZ
@given(
    data=st.binary(min_size=0, max_size=256),
    counts=st.tuples(st.integers(-(1 << 63), (1 << 63) - 1), st.integers(-(1 << 63), (1 << 63) - 1)),
)
def test_fuzz_gguf_random_counts(tmp_path_factory: pytest.TempPathFactory, data: bytes, counts) -> None:
    p = tmp_path_factory.getbasetemp() / "fuzz-counts.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<Iqq", 3, *counts) + data)
    _only_edgeft_errors(lambda: check_gguf(p))


@FUZZ
@given(st.data())
def test_fuzz_gguf_mutations(
    gguf_bytes: bytes, made: Bundles, tmp_path_factory: pytest.TempPathFactory, data
) -> None:
    buf = bytearray(gguf_bytes)
    header_end = check_gguf(made.fresh / "model-q8_0.gguf").data_offset
    for _ in range(data.draw(st.integers(1, 8))):
        # mostly the header region (what the check reads), sometimes anywhere
        end = header_end if data.draw(st.booleans()) else len(buf)
        pos = data.draw(st.integers(0, end - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    p = tmp_path_factory.getbasetemp() / "fuzz-mutated.gguf"
    p.write_bytes(bytes(buf))
    _only_edgeft_errors(lambda: check_gguf(p))


def _nest(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20), _nest, max_leaves=30
)
MANIFEST_KEYS = st.sampled_from(
    ["schema_version", "passed", "files", "artifacts", "path", "format", "sha256"]
)


@FUZZ
@given(raw=st.binary(max_size=512))
def test_fuzz_manifest_random_bytes(raw: bytes) -> None:
    _only_edgeft_errors(lambda: parse_manifest(raw))
    _only_edgeft_errors(lambda: parse_sums(raw.decode("utf-8", errors="replace")))


@FUZZ
@given(
    doc=st.dictionaries(MANIFEST_KEYS, JSON | st.just(2), max_size=6),
    files=st.dictionaries(
        st.text(max_size=20), st.text(alphabet="0123456789abcdef", min_size=63, max_size=65)
    ),
    arts=st.lists(
        st.dictionaries(MANIFEST_KEYS, JSON | st.sampled_from(["gguf", "onnx", "a" * 64])), max_size=3
    ),
)
def test_fuzz_manifest_json(doc: dict, files: dict, arts: list) -> None:
    full = {"schema_version": 2, "files": files, "artifacts": arts} | doc
    _only_edgeft_errors(lambda: parse_manifest(json.dumps(full).encode()))


@FUZZ
@given(st.data())
def test_fuzz_manifest_mutations(made: Bundles, data) -> None:
    raw = bytearray((made.fresh / MANIFEST).read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    _only_edgeft_errors(lambda: parse_manifest(bytes(raw)))
