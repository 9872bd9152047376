"""Every input a user can cause is one line naming the file/field/value, never a traceback (issue 7).

Concrete cases found by hand: wrong-typed TOML tables, strings where numbers or booleans belong, NaN/inf
and out-of-range numbers, unsafe target names, unknown keys; JSONL quirks (BOM, U+2028, deep nesting,
non-UTF-8 bytes, giant lines); config.json shapes; CLI flags; and the last-resort handler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeft import config, targets
from edgeft.data import MAX_LINE_BYTES, load_jsonl
from edgeft.errors import EdgeftError
from edgeft.footprint import config_kv
from edgeft.formats.gguf.arch import prepare

PROFILE = (
    'name = "dev"\nthreads = 2\nram_mb = 1024\nram_budget_mb = 512\ncontext_length = 256\n'
    "bandwidth_gb_s = 3.5\n"
)
ARTIFACT = '[[artifacts]]\nformat = "gguf"\nquant = "q8_0"\n'
EXAMPLE = '{"prompt": "a", "completion": "b"}'


def one_line_error(fn: Callable[[], Any], *needles: str) -> str:
    """Run fn, expect EdgeftError with a one-line message holding every needle; return the message."""
    with pytest.raises(EdgeftError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def kv_cache_mb(model_dir: Path, context_length: int) -> float:
    """llama.cpp's f16 KV cache at `context_length` from a config.json, in MB."""
    return config_kv(model_dir, 2, "f16").bytes(context_length) / 1e6


# --- edgeft.toml ---------------------------------------------------------------------------------------


def resolve_with(tmp_path: Path, text: str | bytes, **flags: Any) -> config.BuildConfig:
    path = tmp_path / "edgeft.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = {"target": "host", "model": None, "data": None, "out": None} | flags
    return config.resolve(cwd=tmp_path, **args)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("lora = 3", ("edgeft.toml", "lora = 3", "should be a table")),
        ("budgets = 3", ("edgeft.toml", "budgets = 3", "should be a table")),
        ('budgets = {q4_0 = "x"}', ("budgets.q4_0 = 'x'", "should be a table", "kld_mean")),
        ("[budgets.q4_O]\nkld_mean = 0.1", ("unknown quant 'q4_O'", "q4_0", "onnx-int8-acc4")),
        ("[budgets.q4_0]\nkld_mean = nan", ("budgets.q4_0", "kld_mean", "nan", "finite")),
        ("[budgets.q4_0]\nkld_mean = inf", ("budgets.q4_0", "kld_mean", "inf", "finite")),
        ("[budgets.q4_0]\nkld_mean = -0.1", ("kld_mean", "-0.1", ">= 0")),
        ('[budgets.q4_0]\nkld_mean = "0.1"', ("kld_mean", "'0.1'", "number")),
        ("[budgets.q4_0]\ntop1 = 1.5", ("top1", "1.5", "from 0 to 1")),
        ('trust_remote_code = "false"', ("trust_remote_code", "--trust-remote-code", "remove it")),
        ("trust_remote_code = false", ("trust_remote_code", "--trust-remote-code")),
        ("threads = 0", ("edgeft.toml: threads = 0", "from 1 to 1024")),
        ("threads = -4", ("threads = -4", "from 1 to 1024")),
        ("threads = true", ("threads = true", "integer")),
        ('threads = "4"', ("threads = '4'", "integer")),
        ("threads = 1.5", ("threads = 1.5", "integer")),
        ('fail_on_drift = "yes"', ("fail_on_drift = 'yes'", "true or false")),
        ("target = 5", ("target = 5", "string")),
        ('model = ""', ("model = ''", "non-empty")),
        ('data = "a\\nb"', ("data = 'a\\nb'", "one-line")),
        ("artifacts = [1, 2]", ("unknown key(s) 'artifacts'", "known:", "lora")),
        ("[lora]\nr = true", ("lora.r = true", "integer from 1")),
        ("[lora]\nr = 0", ("lora.r = 0", "integer from 1")),
        ("[lora]\nr = 1.5", ("lora.r = 1.5", "integer")),
        ("[lora]\nlr = inf", ("lora.lr = inf", "finite")),
        ("[lora]\nlr = -1e-3", ("lora.lr = -0.001", "> 0")),
        ("[lora]\nepochs = nan", ("lora.epochs = nan", "finite")),
        ('[lora]\nepochs = "3"', ("lora.epochs = '3'", "number")),
        ("[lora]\ndropout = 1.0", ("lora.dropout = 1.0", "< 1")),
        ("[lora]\nseed = -1", ("lora.seed = -1", "from 0")),
        ("[lora]\nmax_len = 4", ("lora.max_len = 4", "from 8")),
        ("[lora]\ntarget_modules = [1]", ("lora.target_modules", "module names")),
        ('[lora]\ntarget_modules = "q_proj"', ("lora.target_modules = 'q_proj'", "list")),
        ("[lora]\ntarget_modules = []", ("lora.target_modules = ()", "1-256")),
        ('[lora]\nscheduler = "nope"', ("lora.scheduler = 'nope'", "cosine")),
        ("[lora]\nrank = 8", ("unknown LoRA setting(s) 'rank'", "known:", "r,")),
        ("a = " + "[" * 2000 + "]" * 2000, ("edgeft.toml: not valid TOML",)),
        ("a = " + "1" * 5000, ("edgeft.toml: not valid TOML",)),
        ("a = [", ("edgeft.toml: not valid TOML",)),
    ],
)
def test_edgeft_toml_field_errors(tmp_path: Path, text: str, needles: tuple[str, ...]) -> None:
    one_line_error(lambda: resolve_with(tmp_path, text), *needles)


def test_edgeft_toml_bytes_and_bom(tmp_path: Path) -> None:
    one_line_error(lambda: resolve_with(tmp_path, b'model = "\xff"\n'), "edgeft.toml", "not UTF-8")
    cfg = resolve_with(
        tmp_path, b"\xef\xbb\xbfthreads = 3\n[lora]\nr = 8\nepochs = 2\n[budgets.q4_0]\nkld_mean = 1\n"
    )
    assert cfg.threads == 3 and cfg.lora.r == 8 and cfg.lora.epochs == 2.0
    assert isinstance(cfg.lora.epochs, float) and cfg.budgets == {"q4_0": {"kld_mean": 1}}
    assert cfg.trust_remote_code is False


def test_budget_labels_and_apply(tmp_path: Path) -> None:
    cfg = resolve_with(
        tmp_path, '[budgets."gguf-q8_0"]\nkld_mean = 0.5\n[budgets."onnx-int8-acc4"]\ntop1 = 0.5\n'
    )
    profile = targets.load("host")
    before = next(a for a in profile.artifacts if a.quant == "q8_0").budget
    host = config.apply_budgets(profile, cfg.budgets)
    q8 = next(a for a in host.artifacts if a.quant == "q8_0")
    assert before.kld_mean != 0.5 and before.top1 is not None
    assert q8.budget.kld_mean == 0.5 and q8.budget.top1 == before.top1  # merged over the profile's budget


@pytest.mark.parametrize("flag", [0, -1, 5000])
def test_threads_flag_is_bounded(tmp_path: Path, flag: int) -> None:
    one_line_error(lambda: resolve_with(tmp_path, "", threads=flag), f"--threads = {flag}", "from 1 to 1024")


def test_lora_overrides_from_the_command_line() -> None:
    one_line_error(lambda: config.lora_settings({"r": True}, "--lora"), "--lora: lora.r = true")
    one_line_error(lambda: config.lora_settings({"lr": float("nan")}, "--lora"), "lora.lr = nan", "finite")
    one_line_error(lambda: config.LoraSettings(max_eval=-1), "lora.max_eval = -1")
    assert config.lora_settings({"lr": 1, "max_steps": 5}, "--lora").lr == 1.0


# --- target profiles -----------------------------------------------------------------------------------


def load_profile(tmp_path: Path, text: str | bytes) -> targets.TargetProfile:
    path = tmp_path / "dev.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return targets.load(path)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (PROFILE + "artifacts = [1, 2]\n", ("dev.toml: artifacts[0] = 1", "should be a table")),
        (PROFILE + 'artifacts = "gguf"\n', ("dev.toml", "[[artifacts]]")),
        (PROFILE + ARTIFACT + "budget = 5\n", ("artifacts[0].budget = 5", "should be a table", "kld_mean")),
        (PROFILE + ARTIFACT + "speed = 1\n", ("artifacts[0]: unknown key(s) 'speed'", "known:", "quant")),
        (PROFILE + 'colour = "red"\n' + ARTIFACT, ("unknown key(s) 'colour'", "bandwidth_gb_s")),
        (PROFILE + ARTIFACT + "[artifacts.budget]\nkld_mean = nan\n", ("budget 'kld_mean' = nan", "finite")),
        (PROFILE + ARTIFACT + "[artifacts.budget]\ntop1 = inf\n", ("budget 'top1' = inf", "finite")),
        (PROFILE + ARTIFACT + '[artifacts.budget]\ntop1 = "high"\n', ("budget 'top1' = 'high'", "number")),
        (PROFILE + ARTIFACT + "[artifacts.budget]\nkld_median = 1\n", ("unknown budget(s) 'kld_median'",)),
        (PROFILE + ARTIFACT + 'ship = "no"\n', ("ship = 'no'", "true or false")),
        (
            PROFILE + '[[artifacts]]\nformat = "onnx"\nquant = "int8"\naccuracy_level = true\n',
            ("accuracy_level = true", "known: 0, 1, 2, 3, 4"),
        ),
        (PROFILE + "[[artifacts]]\nformat = 1\nquant = 2\n", ("field 'format' = 1", "str")),
    ],
)
def test_profile_table_errors(tmp_path: Path, text: str, needles: tuple[str, ...]) -> None:
    one_line_error(lambda: load_profile(tmp_path, text), *needles)


@pytest.mark.parametrize(
    ("field", "value", "needles"),
    [
        ("bandwidth_gb_s", "-1", ("field 'bandwidth_gb_s' = -1", "> 0")),
        ("bandwidth_gb_s", "0", ("field 'bandwidth_gb_s' = 0", "> 0")),
        ("bandwidth_gb_s", "nan", ("field 'bandwidth_gb_s' = nan", "finite")),
        ("bandwidth_gb_s", "inf", ("field 'bandwidth_gb_s' = inf", "finite")),
        ("bandwidth_gb_s", '"fast"', ("field 'bandwidth_gb_s' = 'fast'", "number")),
        ("bandwidth_gb_s", "true", ("field 'bandwidth_gb_s' = true", "number")),
        ("threads", "0", ("field 'threads' = 0", "from 1 to 1024")),
        ("threads", "-2", ("field 'threads' = -2", "from 1 to 1024")),
        ("threads", "true", ("field 'threads' = true", "integer")),
        ("threads", '"2"', ("field 'threads' = '2'", "integer")),
        ("ram_mb", "100000000000", ("field 'ram_mb' = 100000000000", "integer from 1")),
        ("context_length", "0", ("field 'context_length' = 0",)),
        ("name", '""', ("name = ''", "A-Z a-z 0-9", "directory")),
        ("name", '"../x"', ("name = '../x'", "directory")),
        ("name", '"/abs"', ("name = '/abs'",)),
        ("name", '"a/b"', ("name = 'a/b'",)),
        ("name", '".."', ("name = '..'",)),
        ("name", '".work"', ("name = '.work'", "not starting with '.'")),
        ("name", '"a\\\\b"', ("name = 'a\\\\b'",)),
        ("name", '"x' + "y" * 64 + '"', ("should be 1-64",)),
        ("name", "5", ("field 'name' = 5",)),
        ("description", "[1]", ("field 'description' = [1]", "one-line string")),
        ("arch", '"a\\nb"', ("field 'arch'", "one-line string")),
    ],
)
def test_profile_field_errors(tmp_path: Path, field: str, value: str, needles: tuple[str, ...]) -> None:
    lines = [ln for ln in PROFILE.splitlines() if not ln.startswith(f"{field} =")]
    text = "\n".join([*lines, f"{field} = {value}", ""]) + ARTIFACT
    one_line_error(lambda: load_profile(tmp_path, text), "dev.toml", *needles)


def test_profile_bytes_bom_and_missing_fields(tmp_path: Path) -> None:
    assert load_profile(tmp_path, b"\xef\xbb\xbf" + (PROFILE + ARTIFACT).encode()).name == "dev"
    one_line_error(lambda: load_profile(tmp_path, b"name = '\xfe'"), "dev.toml", "not UTF-8")
    one_line_error(
        lambda: load_profile(tmp_path, PROFILE.replace("threads = 2\n", "") + ARTIFACT), "'threads'"
    )
    one_line_error(lambda: targets.parse_profile([1], "x.toml"), "x.toml", "should be a table")  # type: ignore[arg-type]
    assert load_profile(tmp_path, PROFILE.replace('"dev"', '"my.dev_2-b"') + ARTIFACT).name == "my.dev_2-b"


# --- JSONL data ----------------------------------------------------------------------------------------


def load_bytes(tmp_path: Path, data: bytes) -> list:
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(data)
    return load_jsonl(path)


def test_bom_crlf_and_unicode_line_separators(tmp_path: Path) -> None:
    exs = load_bytes(tmp_path, b"\xef\xbb\xbf" + EXAMPLE.encode() + b"\r\n\r\n" + EXAMPLE.encode())
    assert len(exs) == 2 and exs[1].source.endswith("tasks.jsonl:3")
    # Raw U+2028/U+2029/U+0085 are text inside a JSON string (str.splitlines would split there); the
    # C0 separators JSON only allows escaped.
    text = '{"prompt": "a\u2028b\u2029c\x85d\\u000be\\u000cf\\u001cg", "completion": "x\u2028y"}\n'
    (ex,) = load_bytes(tmp_path, text.encode())
    assert ex.prompt_messages[0]["content"] == "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg"
    assert ex.answer == "x\u2028y"


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        (b"[" * 100_000 + b"\n", ("tasks.jsonl:1", "nested too deeply")),
        (b'{"a":' * 100_000 + b"\n", ("tasks.jsonl:1", "nested too deeply")),
        (EXAMPLE.encode() + b"\n[1, 2]\n", ("tasks.jsonl:2", "JSON list, not an object")),
        (b'"text"\n', ("tasks.jsonl:1", "JSON str, not an object")),
        (b"null\n", ("tasks.jsonl:1", "JSON NoneType, not an object")),
        (
            EXAMPLE.encode() + b'\n{"prompt": "\xff", "completion": "b"}\n',
            ("tasks.jsonl:2", "not UTF-8", "0xff"),
        ),
        (b'{"prompt": ' + b"1" * 5000 + b"}\n", ("tasks.jsonl:1", "number too long")),
        (b'{"prompt": "\\ud800", "completion": "b"}\n', ("tasks.jsonl:1", "lone surrogate \\ud800")),
        (b'{"prompt": "a", "completion": "b"', ("tasks.jsonl:1", "invalid JSON")),
        (b"\n \n\t\n", ("tasks.jsonl", "no examples")),
        (b"", ("tasks.jsonl", "no examples")),
    ],
)
def test_malformed_jsonl_is_one_line(tmp_path: Path, data: bytes, needles: tuple[str, ...]) -> None:
    one_line_error(lambda: load_bytes(tmp_path, data), *needles)


def test_giant_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    data = EXAMPLE.encode() + b"\n" + b'{"prompt": "' + b"a" * (MAX_LINE_BYTES + 10)
    one_line_error(lambda: load_bytes(tmp_path, data), "tasks.jsonl:2", "longer than 16 MiB")


def test_jsonl_is_streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text((EXAMPLE + "\n") * 3)

    def whole_file(*_: Any, **__: Any) -> Any:
        raise AssertionError("load_jsonl read the whole file")

    monkeypatch.setattr(Path, "read_text", whole_file)
    monkeypatch.setattr(Path, "read_bytes", whole_file)
    assert len(load_jsonl(path)) == 3


# --- model config.json ---------------------------------------------------------------------------------

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 100,
}
CONFIG_CASES = [
    ({"hidden_size": None}, ("hidden_size is missing", "integer from 1")),
    ({"num_attention_heads": 0}, ("num_attention_heads = 0", "integer from 1")),
    ({"num_attention_heads": -4}, ("num_attention_heads = -4",)),
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, ("hidden_size 64 is not a multiple", "heads 5")),
    ({"num_hidden_layers": 10**9}, ("num_hidden_layers = 1000000000", "to 4096")),
    ({"num_attention_heads": True}, ("num_attention_heads = True",)),
    ({"num_attention_heads": "4"}, ("num_attention_heads = '4'",)),
]


def write_config(tmp_path: Path, overrides: dict[str, Any]) -> Path:
    cfg = {k: v for k, v in (LLAMA | overrides).items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        *CONFIG_CASES,
        ({"num_key_value_heads": 3}, ("num_attention_heads 4 is not a multiple of num_key_value_heads 3",)),
        ({"vocab_size": 10**12}, ("vocab_size = 1000000000000",)),
        ({"intermediate_size": 0}, ("intermediate_size = 0",)),
        ({"head_dim": 0}, ("head_dim = 0",)),
        ({"max_position_embeddings": -1}, ("max_position_embeddings = -1",)),
        ({"rope_theta": -1.0}, ("rope_theta = -1.0", "finite")),
        ({"rope_parameters": {"rope_theta": 0}}, ("rope theta 0.0", "rope_parameters")),
        ({"rope_parameters": [1, 2]}, ("malformed field", "TypeError")),
        ({"layer_types": 5}, ("malformed field",)),
        (
            {"architectures": "LlamaForCausalLM"},
            ("architectures = 'LlamaForCausalLM'", "list of class names"),
        ),
    ],
)
def test_gguf_export_refuses_bad_config_shapes(
    tmp_path: Path, overrides: dict, needles: tuple[str, ...]
) -> None:
    one_line_error(lambda: prepare(write_config(tmp_path, overrides)), "config.json", *needles)


def test_gguf_export_refuses_a_config_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    one_line_error(lambda: prepare(tmp_path), "config.json", "not a JSON object")


@pytest.mark.parametrize(("overrides", "needles"), CONFIG_CASES)
def test_kv_cache_estimate_refuses_bad_config_shapes(tmp_path: Path, overrides: dict, needles: tuple) -> None:
    one_line_error(lambda: kv_cache_mb(write_config(tmp_path, overrides), 2048), "config.json", *needles)


def test_kv_cache_estimate(tmp_path: Path) -> None:
    # 2 (K, V) x 2 layers x 2 kv heads x 16 head dim x 2048 tokens x 2 bytes
    assert kv_cache_mb(write_config(tmp_path, {}), 2048) == 2 * 2 * 2 * 16 * 2048 * 2 / 1e6
    (tmp_path / "config.json").write_text("{")
    one_line_error(lambda: kv_cache_mb(tmp_path, 1), "config.json", "cannot read JSON")


# --- the command line ----------------------------------------------------------------------------------


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    full = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200") | (env or {})
    full.pop("EDGEFT_DEBUG", None) if not env or "EDGEFT_DEBUG" not in env else None
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=full, timeout=300
    )


def assert_one_line(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert res.returncode == code, (res.returncode, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (("--runs", "0"), ("--runs = 0", "from 1 to 1000")),
        (("--runs", "-3"), ("--runs = -3",)),
        (("--threads", "0"), ("--threads = 0", "from 1 to 1024")),
        (("--threads", "-1"), ("--threads = -1",)),
    ],
)
def test_bench_flags_are_one_line(tmp_path: Path, flags: tuple[str, ...], needles: tuple[str, ...]) -> None:
    res = run("-m", "edgeft", "bench", "--artifact", str(tmp_path / "m.gguf"), *flags)
    assert_one_line(res, 2, *needles)


@pytest.mark.parametrize(
    "command",
    [
        ("verify", "--reference", "ref", "--artifact", "m.gguf"),
        ("check", "bundle"),
    ],
)
def test_threads_is_bounded_before_any_runtime(tmp_path: Path, command: tuple[str, ...]) -> None:
    res = run("-m", "edgeft", *command, "--threads", "-1", cwd=tmp_path)
    assert_one_line(res, 2, "--threads = -1")


def test_build_with_a_bad_config_or_profile_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "edgeft.toml").write_text('target = "host"\nlora = 3\n')
    assert_one_line(run("-m", "edgeft", "build", cwd=tmp_path), 2, "edgeft.toml", "lora = 3")
    (tmp_path / "edgeft.toml").write_text('target = "host"\ntrust_remote_code = "false"\n')
    assert_one_line(run("-m", "edgeft", "build", cwd=tmp_path), 2, "trust_remote_code", "--trust-remote-code")
    (tmp_path / "evil.toml").write_text(PROFILE.replace('"dev"', '"../x"') + ARTIFACT)
    (tmp_path / "edgeft.toml").write_text('target = "evil.toml"\n')
    assert_one_line(run("-m", "edgeft", "build", cwd=tmp_path), 2, "evil.toml", "name = '../x'")
    assert not (tmp_path / "x").exists() and not (tmp_path / "dist").exists()


CRASH = (
    "import sys; sys.argv = ['edgeft', 'targets']\n"
    "import edgeft.cli, edgeft.targets\n"
    "def boom():\n    raise ZeroDivisionError('a bug\\nin two lines')\n"
    "edgeft.targets.load_all = boom\n"
    "edgeft.cli.main()\n"
)


def test_last_resort_handler_is_one_line_and_debug_shows_the_traceback() -> None:
    line = assert_one_line(run("-c", CRASH), 1, "ZeroDivisionError: a bug in two lines")
    assert line.endswith("(set EDGEFT_DEBUG=1 for the traceback)")
    res = run("-c", CRASH, env={"EDGEFT_DEBUG": "1"})
    assert res.returncode == 1 and "Traceback" in res.stderr and "ZeroDivisionError" in res.stderr
