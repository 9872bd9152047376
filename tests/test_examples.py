"""The example apps (examples/, copied into every bundle) answer the demo's held-out prompts exactly as the
fine-tuned float model does, reading everything about how to run the model from the bundle's model.json:
Python with llama-cpp-python and onnxruntime-genai (in a virtual environment holding only the runtimes, as a
device has), Node.js with node-llama-cpp 3.21.1 (installed with `npm ci` from the npm registry)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from edgeft import bundle, recipe, runspec
from edgeft.constants import MANIFEST, MODEL_JSON, MODEL_KV
from edgeft.formats.gguf import NODE_LLAMA_CPP
from edgeft.template import BoundedRender

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PY_GGUF, PY_ONNX, NODE = "python/chat_llama_cpp.py", "python/chat_onnxruntime_genai.py", "node/chat.mjs"
C = "c/chat.c"
N_PROMPTS = 4


@pytest.fixture(scope="module")
def float_answers(demo_bundle: Path) -> list[tuple[str, list[int], str]]:
    """(user prompt, prompt ids, greedy answer) of the fine-tuned float model in PyTorch for the first
    held-out prompts of the demo's fine-tune (its recorded eval split; the demo build keeps its work)."""
    from edgeft import verify
    from edgeft.formats.torch.runtime import TorchRuntime

    merged = demo_bundle.parent / ".work" / "build" / "merged"
    examples, source = verify.eval_examples(merged, None)
    assert examples and "held-out" in source, source
    rt = TorchRuntime(merged, threads=2)
    out = []
    try:
        for messages in [ex.prompt_messages for ex in examples[:N_PROMPTS]]:
            assert [m["role"] for m in messages] == ["user"]  # the demo's data has no system turn
            ids = rt.chat_prompt_ids(messages)
            gen = rt.generate(ids, 64, rt.end_ids)
            assert gen and gen[-1] in rt.end_ids, "the float model's answer did not end"
            out.append((messages[0]["content"], ids, rt.decode(gen[:-1])))
    finally:
        rt.close()
    return out


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)


def _answers(res: subprocess.CompletedProcess[str]) -> list[dict]:
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines()]


@pytest.fixture(scope="module")
def node_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo bundle whose examples/node has node-llama-cpp installed by `npm ci` (its lock)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("Node.js 20+ and npm are needed for the Node example (apt-get install nodejs npm)")
    dst = tmp_path_factory.mktemp("node") / demo_bundle.name
    shutil.copytree(demo_bundle, dst)
    res = _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=dst / "examples" / "node")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return dst


@pytest.fixture(scope="module")
def c_chat(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle's C example built as its header says, against the llama.h and libllama llama-cpp-python
    installs (its include/ beside the package, its lib/ inside it)."""
    import llama_cpp

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed for the C example (apt-get install gcc)")
    pkg = Path(llama_cpp.__file__).parent
    inc, lib = pkg.parent / "include", pkg / "lib"
    assert (inc / "llama.h").is_file() and any(lib.glob("libllama.so*")), (inc, lib)
    out = tmp_path_factory.mktemp("c") / "chat"
    src = demo_bundle / "examples" / C
    flags = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{inc}", f"-L{lib}", f"-Wl,-rpath,{lib}"]
    res = _run([cc, *flags[:-2], str(src), *flags[-2:], "-lllama", "-o", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _c(c_chat: Path, bundle_dir: Path, *args: str) -> list[str]:
    return [str(c_chat), "--bundle", str(bundle_dir), *args]


def _describe(bundle_dir: Path, desc: dict) -> None:
    """A changed description, as both an app reading model.json and one reading model.kv see it."""
    (bundle_dir / MODEL_JSON).write_text(json.dumps(desc))
    (bundle_dir / MODEL_KV).write_text(runspec.flat(desc))


def _python(runtime_venv: Path, bundle_dir: Path, example: str, *args: str) -> list[str]:
    return [str(runtime_venv), "-I", str(bundle_dir / "examples" / example), *args]


def _node(bundle_dir: Path, *args: str) -> list[str]:
    return ["node", str(bundle_dir / "examples" / NODE), *args]


# --- what the bundle carries -------------------------------------------------------------------------------


def test_bundle_describes_how_to_run_the_model(demo_bundle: Path) -> None:
    from edgeft.loading import load_tokenizer

    desc = json.loads((demo_bundle / MODEL_JSON).read_text())
    manifest = json.loads((demo_bundle / MANIFEST).read_text())
    tok = load_tokenizer(demo_bundle / "tokenizer", notify=False)
    assert desc["schema_version"] == runspec.SCHEMA_VERSION
    assert desc["chat_template"] == tok.chat_template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert {"id": im_end, "text": "<|im_end|>"} in desc["tokens"]["end_of_turn"]
    assert desc["tokens"]["eos"] == {"id": tok.eos_token_id, "text": tok.eos_token}
    assert desc["prompt"]["system_prompt"] is None  # the demo's data has none: send none
    assert desc["generation"]["do_sample"] is False
    from edgeft.demo import DEMO_MODEL

    trained = json.loads((Path(DEMO_MODEL) / "config.json").read_text())["max_position_embeddings"]
    assert trained < manifest["device"]["context_length"]  # the demo's 512: the description says 512
    assert desc["context_length"] == min(manifest["device"]["context_length"], trained)
    assert desc["threads"] == manifest["device"]["threads"]
    assert [(a["path"], a["format"]) for a in desc["artifacts"]] == [
        (a["path"], a["format"]) for a in manifest["artifacts"]
    ]
    runtimes = {a["format"]: [r["name"] for r in a["runtimes"]] for a in desc["artifacts"]}
    assert runtimes == {
        "gguf": ["llama-cpp-python", "node-llama-cpp", "llama.cpp C API"],
        "onnx": ["onnxruntime-genai"],
    }
    pinned = json.loads((EXAMPLES / "node" / "package.json").read_text())["dependencies"]["node-llama-cpp"]
    node = next(r for a in desc["artifacts"] for r in a["runtimes"] if r["name"] == "node-llama-cpp")
    assert node["min_version"] == pinned == NODE_LLAMA_CPP
    # the examples travel with the bundle, byte for byte, hashed like every file
    for rel in sorted({f for files in runspec.example_files().values() for f in files}):
        assert (demo_bundle / "examples" / rel).read_bytes() == (EXAMPLES / rel).read_bytes(), rel
        assert manifest["files"][f"examples/{rel}"] == bundle.sha256_file(demo_bundle / "examples" / rel)
    assert manifest["files"][MODEL_JSON] == bundle.sha256_file(demo_bundle / MODEL_JSON)


def test_the_wheel_carries_every_example_file() -> None:
    """pyproject's force-include lists exactly the files a bundle copies (never a node_modules folder)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    included = project["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    want = {
        f"examples/{f}": f"edgeft/examples/{f}" for files in runspec.example_files().values() for f in files
    }
    assert {k: v for k, v in included.items() if k.startswith("examples/")} == want
    assert all((ROOT / k).is_file() for k in want)


def test_python_examples_run_on_python_3_8_with_the_standard_library_and_runtimes() -> None:
    scripts = sorted((EXAMPLES / "python").glob("*.py"))
    for script in scripts:
        names = set()
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add((node.module or "").split(".")[0])
        siblings = {"bundle_model", "bundle_checks"}  # beside them in every bundle
        allowed = set(sys.stdlib_module_names) | {"llama_cpp", "onnxruntime_genai", "jinja2", *siblings}
        assert names <= allowed, (script.name, names - allowed)
    vermin = "import sys; from vermin.main import main; sys.argv[0] = 'vermin'; sys.exit(main())"
    res = _run([sys.executable, "-c", vermin, "-t=3.8-", "--violations", "--no-tips", *map(str, scripts)])
    assert res.returncode == 0, res.stdout + res.stderr


# --- each example answers as the fine-tuned float model -----------------------------------------------------


@pytest.mark.parametrize("example", [PY_GGUF, PY_ONNX])
def test_python_example_answers_as_the_float_model(
    example: str, demo_bundle: Path, runtime_venv: Path, float_answers: list[tuple[str, list[int], str]]
) -> None:
    prompts = [p for p, _, _ in float_answers]
    got = _answers(_run(_python(runtime_venv, demo_bundle, example, "--json", *prompts), cwd=demo_bundle))
    assert [(g["prompt"], g["prompt_ids"], g["answer"]) for g in got] == float_answers


def test_node_example_answers_as_the_float_model(
    node_bundle: Path, float_answers: list[tuple[str, list[int], str]]
) -> None:
    prompts = [p for p, _, _ in float_answers]
    got = _answers(_run(_node(node_bundle, "--json", *prompts)))  # the bundle it sits in, by default
    assert [(g["prompt"], g["prompt_ids"], g["answer"]) for g in got] == float_answers
    plain = _run(_node(node_bundle, prompts[0]))  # without --json: the answer alone, one line
    assert plain.returncode == 0 and plain.stdout == float_answers[0][2] + "\n", plain.stderr[-2000:]


def test_c_example_answers_as_the_float_model(
    demo_bundle: Path, c_chat: Path, float_answers: list[tuple[str, list[int], str]]
) -> None:
    """No template engine, no JSON parser: the prompt by concatenation from model.kv's recipe, tokenized by
    llama.h with special tokens parsed, greedy to the end-of-turn ids — the float model's ids and answers."""
    prompts = [p for p, _, _ in float_answers]
    got = _answers(_run(_c(c_chat, demo_bundle, "--json", *prompts)))
    assert [(g["prompt"], g["prompt_ids"], g["answer"]) for g in got] == float_answers
    plain = _run(_c(c_chat, demo_bundle, prompts[0]))
    assert plain.returncode == 0 and plain.stdout == float_answers[0][2] + "\n", plain.stderr[-2000:]


def test_c_example_reads_escaped_values_and_a_system_prompt(
    demo_bundle: Path, c_chat: Path, tmp_path: Path
) -> None:
    """model.kv's escapes (tabs, newlines, backslashes, control bytes) reach the prompt as the characters
    model.json holds: the C example's ids for a system prompt holding them are the template's."""
    from edgeft.loading import load_tokenizer

    dst = tmp_path / demo_bundle.name
    shutil.copytree(demo_bundle, dst)
    desc = json.loads((dst / MODEL_JSON).read_text())
    system = "Be exact.\tTabs,\nlines, a back\\slash\\n, \x01 and ü = ok"
    desc["prompt"]["system_prompt"] = system
    _describe(dst, desc)
    kv = (dst / MODEL_KV).read_text()
    assert "\\t" in kv and "\\x01" in kv and "\\\\" in kv and "\x01" not in kv
    tok = load_tokenizer(dst / "tokenizer", notify=False)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    want = list(tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"])  # fmt: skip
    (got,) = _answers(_run(_c(c_chat, dst, "--json", "--max-tokens", "2", "hi")))
    assert got["prompt_ids"] == want


def test_c_example_without_a_recipe_is_one_line(demo_bundle: Path, c_chat: Path, tmp_path: Path) -> None:
    dst = tmp_path / demo_bundle.name
    shutil.copytree(demo_bundle, dst)
    desc = json.loads((dst / MODEL_JSON).read_text())
    desc["recipe"], desc["recipe_reason"] = None, "the template reorders the messages"
    _describe(dst, desc)
    _one_line_failure(_c(c_chat, dst, "hi"), "no recipe", "the template reorders the messages")


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("context_length=0", "`context_length` is not a number from 1 to"),
        ("context_length=100000000", "`context_length` is not a number from 1 to"),
        ("threads=2147483647", "`threads` is not a number"),
        ("end_of_turn=abc", "an end_of_turn id is not a number"),
        ("end_of_turn=99999999", "an end_of_turn id is not a number"),
        ("max_new_tokens=-1", "`max_new_tokens` is not a number"),
        ("recipe.start=\\x00", "a bad escape in a value"),
        ("recipe.start=\\", "a bad escape in a value"),
        ("recipe.system.mode=shouted", "recipe.system.mode is not sent, merged or unsupported"),
        (
            "recipe=0\nrecipe_reason=\\x1b[2J\\x1b[32mok: all good",
            "no recipe (\\x1b[2J\\x1b[32mok: all good)",
        ),
        ("artifact=/etc/passwd", "is not a file inside the bundle"),
        ("artifact=../../../etc/passwd", "is not a file inside the bundle"),
    ],
)
def test_c_example_refuses_a_hostile_model_kv_in_one_line(
    demo_bundle: Path, c_chat: Path, tmp_path: Path, case: str, says: str
) -> None:
    """model.kv comes with the bundle: a value out of range, a bad escape or a path leading out is one line
    (control characters shown escaped), never an abort, a hang or gigabytes of context."""
    dst = tmp_path / demo_bundle.name
    shutil.copytree(demo_bundle, dst)
    kv = (dst / MODEL_KV).read_text()
    key = case.split("=", 1)[0]
    first = next(line for line in kv.splitlines() if line.startswith(key + "="))
    (dst / MODEL_KV).write_text(kv.replace(first + "\n", case + "\n", 1))
    line = _one_line_failure(_c(c_chat, dst, "hi"), says)
    assert "\x1b" not in line


def test_c_example_reads_model_kv_only_as_a_regular_file(
    demo_bundle: Path, c_chat: Path, tmp_path: Path
) -> None:
    """A FIFO (a read that never ends) or a link to /dev/zero in model.kv's place: one line, at once."""
    for name, make in (("fifo", os.mkfifo), ("link", lambda p: os.symlink("/dev/zero", p))):
        dst = tmp_path / name
        shutil.copytree(demo_bundle, dst)
        (dst / MODEL_KV).unlink()
        make(dst / MODEL_KV)
        _one_line_failure(_c(c_chat, dst, "hi"), str(dst / MODEL_KV))


def test_an_installed_node_example_leaves_the_bundle_whole(node_bundle: Path) -> None:
    """`npm ci` inside a bundle's examples/node (as its README says) is the user's install: `edgeft check`
    does not count it, and `edgeft bench --remote` would not upload it (remote.local_files)."""
    from edgeft import remote
    from edgeft.check import check_bundle

    assert any((node_bundle / "examples" / "node" / "node_modules").rglob("package.json"))
    report = check_bundle(node_bundle, load=False)
    assert report.findings == [], [f.line() for f in report.findings]
    assert not [rel for rel in remote.local_files(node_bundle) if "node_modules" in rel]


# --- nothing is hard-coded: a changed description changes what they feed the model --------------------------

CHANGED_SYSTEM = "Answer with one JSON object."
CHANGED_BOS = "<|endoftext|>"  # a template variable model.json gives (the demo's tokenizer has no BOS)
# a block tag on its own line (trim_blocks drops its newline, lstrip_blocks its indent) and the variable
CHANGED_PREFIX = "  {% if true %}\n{{ bos_token }}Home assistant.{{ '\\n' }}{% endif %}\n"


@pytest.fixture(scope="module")
def changed(
    node_bundle: Path,
    float_answers: list[tuple[str, list[int], str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[str], list[list[int]]]:
    """A copy of the demo bundle (Node example installed) whose model.json has another template and a system
    prompt; two held-out prompts; and the ids the changed description means for them, rendered and tokenized
    by the fine-tune's own tokenizer (the reference recipe)."""
    from edgeft.loading import load_tokenizer

    dst = tmp_path_factory.mktemp("changed") / node_bundle.name
    shutil.copytree(node_bundle, dst, ignore=shutil.ignore_patterns("node_modules"))
    (dst / "examples" / "node" / "node_modules").symlink_to(
        node_bundle / "examples" / "node" / "node_modules"
    )
    desc = json.loads((dst / MODEL_JSON).read_text())
    desc["chat_template"] = CHANGED_PREFIX + desc["chat_template"]
    desc["template_variables"]["bos_token"] = CHANGED_BOS
    desc["prompt"]["system_prompt"] = CHANGED_SYSTEM
    # the changed template's own recipe, as a build derives it (for the C example, which reads model.kv)
    render = BoundedRender(desc["chat_template"], desc["template_variables"], "changed model.json")
    found, why = recipe.derive(render, [[{"role": "system", "content": CHANGED_SYSTEM}]])
    assert (
        found is not None and found.start != json.loads((dst / MODEL_JSON).read_text())["recipe"]["start"]
    ), why
    desc["recipe"] = found.to_json()
    _describe(dst, desc)
    tok = load_tokenizer(dst / "tokenizer", notify=False)
    prompts = [p for p, _, _ in float_answers[:2]]
    want = []
    for prompt in prompts:
        msgs = [{"role": "system", "content": CHANGED_SYSTEM}, {"role": "user", "content": prompt}]
        text = tok.apply_chat_template(
            msgs,
            chat_template=desc["chat_template"],
            add_generation_prompt=True,
            tokenize=False,
            bos_token=CHANGED_BOS,  # transformers passes keyword arguments to the template as variables
        )
        assert text.startswith(CHANGED_BOS + "Home assistant.\n<|im_start|>system\n" + CHANGED_SYSTEM), text
        want.append(list(tok(text, add_special_tokens=False)["input_ids"]))
    return dst, prompts, want


def test_examples_follow_a_changed_description(
    changed: tuple[Path, list[str], list[list[int]]],
    runtime_venv: Path,
    c_chat: Path,
    float_answers: list[tuple[str, list[int], str]],
) -> None:
    dst, prompts, want = changed
    short = ("--json", "--max-tokens", "4", *prompts)
    runs = {
        PY_GGUF: _python(runtime_venv, dst, PY_GGUF, *short),
        PY_ONNX: _python(runtime_venv, dst, PY_ONNX, *short),
        NODE: _node(dst, *short),
        C: _c(c_chat, dst, *short),
    }
    originals = {p: ids for p, ids, _ in float_answers}
    for name, cmd in runs.items():
        got = [g["prompt_ids"] for g in _answers(_run(cmd))]
        assert got == want, name
        assert all(ids != originals[p] for p, ids in zip(prompts, got, strict=True)), name


# --- failures are one line -----------------------------------------------------------------------------------


def test_examples_fail_in_one_line(
    demo_bundle: Path, node_bundle: Path, runtime_venv: Path, c_chat: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "not-a-bundle"
    empty.mkdir()
    cases = [
        (_python(runtime_venv, demo_bundle, PY_GGUF, "--bundle", str(empty), "hi"), "model.json"),
        (
            _python(runtime_venv, demo_bundle, PY_ONNX, "--artifact", "nope", "hi"),
            "nope: not a onnx artifact",
        ),
        (_python(runtime_venv, demo_bundle, PY_GGUF, "--max-tokens", "0", "hi"), "--max-tokens = 0"),
        (_python(runtime_venv, demo_bundle, PY_GGUF, "--max-tokens", "abc", "hi"), "--max-tokens"),
        (_python(runtime_venv, demo_bundle, PY_ONNX), "PROMPT"),
        (_node(node_bundle, "--bundle", str(empty), "hi"), "model.json"),
        (_node(node_bundle, "--artifact", "../../etc/passwd", "hi"), "not a gguf artifact"),
        (_c(c_chat, empty, "hi"), "model.kv"),
        (_c(c_chat, demo_bundle, "--artifact", "onnx-int4", "hi"), "onnx-int4: not a GGUF artifact"),
        (_c(c_chat, demo_bundle, "--artifact", "../../etc/passwd", "hi"), "lists no ../../etc/passwd"),
        (_c(c_chat, demo_bundle, "--max-tokens", "0", "hi"), "--max-tokens"),
        (_c(c_chat, demo_bundle, "--max-tokens", "abc", "hi"), "--max-tokens"),
        (_c(c_chat, demo_bundle), "PROMPT"),
    ]
    for cmd, needle in cases:
        res = _run(cmd)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and res.stdout == "", (cmd, res.stdout, res.stderr)
        assert len(lines) == 1 and ": error: " in lines[0] and needle in lines[0], (cmd, lines)


def test_a_missing_runtime_is_named_with_its_install_line(demo_bundle: Path, tmp_path: Path) -> None:
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    for example, package in ((PY_GGUF, "llama-cpp-python"), (PY_ONNX, "onnxruntime-genai")):
        res = _run([str(venv / "bin" / "python"), "-I", str(demo_bundle / "examples" / example), "hi"])
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and f"pip install {package}" in lines[0], lines


# --- a device run tells the app how many threads to use ------------------------------------------------------


def test_device_threads_reach_model_json(demo_bundle: Path, tmp_path: Path) -> None:
    """A device run sets each measured artifact's threads in model.json (a local run does not), rewriting
    the bundle in one step that keeps the user's npm install and still passes `edgeft check`."""
    from edgeft.check import check_bundle

    dst = tmp_path / demo_bundle.name
    shutil.copytree(demo_bundle, dst)
    dep = dst / "examples" / "node" / "node_modules" / "dep" / "index.js"
    dep.parent.mkdir(parents=True)
    dep.write_text("export default 1;\n")
    arts = {a["format"]: a["path"] for a in json.loads((dst / MANIFEST).read_text())["artifacts"]}
    result = {
        "artifacts": [
            {"path": arts["gguf"], "status": "ok", "best_threads": {"decode": 2, "prefill": 4}},
            {"path": arts["onnx"], "status": "failed", "best_threads": {"decode": 1, "prefill": 1}},
        ]
    }
    before = (dst / MODEL_JSON).read_text()
    bundle.record_device_run(dst, result, "localhost")  # the build machine is not the device
    assert (dst / MODEL_JSON).read_text() == before
    bundle.record_device_run(dst, result, "pi@raspberrypi.local")
    desc = json.loads((dst / MODEL_JSON).read_text())
    threads = {a["path"]: a["threads"] for a in desc["artifacts"]}
    assert threads == {
        arts["gguf"]: {"decode": 2, "prefill": 4, "measured_on": "pi@raspberrypi.local"},
        arts["onnx"]: None,  # a failed run measured nothing
    }
    assert dep.read_text() == "export default 1;\n"  # the user's install survived the rewrite
    report = check_bundle(dst, load=False)
    assert report.findings == [] and report.unverified == ["examples/node/node_modules"]


# --- a base + adapter artifact answers as the merged one ----------------------------------------------------

LORA, MERGED = "model-q8_0-lora", "model-q8_0.gguf"  # the adapter_bundle's two q8_0 artifacts


@pytest.fixture(scope="module")
def adapter_node_bundle(
    adapter_bundle: Path, node_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the bundle shipping the demo's q8_0 merged and as base + adapter, its examples/node using
    node_bundle's `npm ci` install (a link to it)."""
    dst = tmp_path_factory.mktemp("adapter-node") / adapter_bundle.name
    shutil.copytree(adapter_bundle, dst)
    (dst / "examples" / "node" / "node_modules").symlink_to(
        node_bundle / "examples" / "node" / "node_modules"
    )
    return dst


def _adapter_entry(bundle_dir: Path) -> dict:
    """The base + adapter artifact's model.json entry, checked to be one (and the merged one not)."""
    entries = {a["path"]: a for a in json.loads((bundle_dir / MODEL_JSON).read_text())["artifacts"]}
    assert entries[MERGED]["format"] == entries[LORA]["format"] == "gguf", entries
    assert "base" not in entries[MERGED] and "adapters" not in entries[MERGED]
    entry = entries[LORA]
    assert entry["base"].startswith(LORA + "/") and (bundle_dir / entry["base"]).is_file(), entry
    assert entry["adapters"] and all((bundle_dir / a["path"]).is_file() for a in entry["adapters"]), entry
    return entry


def _same_answers_as_merged(cmd: list[str], float_answers: list[tuple[str, list[int], str]]) -> None:
    """`cmd` (an example with --json, no prompts or artifact yet) answers the held-out prompts with the base +
    adapter artifact as the float model did, and exactly as with the merged artifact."""
    prompts = [p for p, _, _ in float_answers]
    lora = _answers(_run([*cmd, "--artifact", LORA, *prompts]))
    assert [(g["prompt"], g["prompt_ids"], g["answer"]) for g in lora] == float_answers
    assert lora == _answers(_run([*cmd, "--artifact", MERGED, *prompts]))


def test_python_example_runs_a_base_and_adapter_artifact(
    adapter_bundle: Path, runtime_venv: Path, float_answers: list[tuple[str, list[int], str]]
) -> None:
    entry = _adapter_entry(adapter_bundle)
    _same_answers_as_merged(_python(runtime_venv, adapter_bundle, PY_GGUF, "--json"), float_answers)
    # the task named explicitly is the default (the first listed)
    task = ("--task", entry["adapters"][0]["task"])
    prompts = [p for p, _, _ in float_answers]
    got = _answers(_run(_python(runtime_venv, adapter_bundle, PY_GGUF, "--json", *task, *prompts)))
    assert [(g["prompt"], g["prompt_ids"], g["answer"]) for g in got] == float_answers


def test_node_example_runs_a_base_and_adapter_artifact(
    adapter_node_bundle: Path, float_answers: list[tuple[str, list[int], str]]
) -> None:
    entry = _adapter_entry(adapter_node_bundle)
    _same_answers_as_merged(_node(adapter_node_bundle, "--json"), float_answers)
    task = ("--task", entry["adapters"][0]["task"])
    prompts = [p for p, _, _ in float_answers]
    got = _answers(_run(_node(adapter_node_bundle, "--json", "--artifact", LORA, *task, *prompts)))
    assert [(g["prompt"], g["prompt_ids"], g["answer"]) for g in got] == float_answers


def test_c_example_runs_a_base_and_adapter_artifact(
    adapter_bundle: Path, c_chat: Path, float_answers: list[tuple[str, list[int], str]]
) -> None:
    entry = _adapter_entry(adapter_bundle)
    _same_answers_as_merged(_c(c_chat, adapter_bundle, "--json"), float_answers)
    task = ("--task", entry["adapters"][0]["task"])
    prompts = [p for p, _, _ in float_answers]
    got = _answers(_run(_c(c_chat, adapter_bundle, "--json", "--artifact", LORA, *task, *prompts)))
    assert [(g["prompt"], g["prompt_ids"], g["answer"]) for g in got] == float_answers


def test_the_adapter_is_what_answers(
    adapter_node_bundle: Path,
    runtime_venv: Path,
    c_chat: Path,
    float_answers: list[tuple[str, list[int], str]],
    tmp_path: Path,
) -> None:
    """At scale 0 (model.json's scale reaches the runtime) the base alone answers, and not as the fine-tune:
    the adapter's matching answers above are its own."""
    dst = tmp_path / adapter_node_bundle.name
    shutil.copytree(adapter_node_bundle, dst, symlinks=True)
    desc = json.loads((dst / MODEL_JSON).read_text())
    entry = next(a for a in desc["artifacts"] if a["path"] == LORA)
    entry["adapters"][0]["scale"] = 0.0
    _describe(dst, desc)
    prompts = [p for p, _, _ in float_answers]
    args = ("--json", "--artifact", LORA, *prompts)
    for cmd in (_python(runtime_venv, dst, PY_GGUF, *args), _node(dst, *args), _c(c_chat, dst, *args)):
        got = _answers(_run(cmd))
        assert [g["prompt_ids"] for g in got] == [ids for _, ids, _ in float_answers], cmd
        assert [g["answer"] for g in got] != [a for _, _, a in float_answers], cmd


def _one_line_failure(cmd: list[str], *needles: str) -> str:
    res = _run(cmd)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and res.stdout == "", (cmd, res.stdout, res.stderr)
    assert len(lines) == 1 and ": error: " in lines[0], (cmd, res.stderr)
    assert "Traceback" not in res.stderr and all(n in lines[0] for n in needles), (cmd, lines)
    return lines[0]


def test_an_unknown_task_is_one_line(adapter_node_bundle: Path, runtime_venv: Path, c_chat: Path) -> None:
    known = [a["task"] for a in _adapter_entry(adapter_node_bundle)["adapters"]]
    for run in (
        lambda *args: _python(runtime_venv, adapter_node_bundle, PY_GGUF, *args),
        lambda *args: _node(adapter_node_bundle, *args),
        lambda *args: _c(c_chat, adapter_node_bundle, *args),
    ):
        _one_line_failure(run("--artifact", LORA, "--task", "nosuch", "hi"), "nosuch", LORA, *known)
        # a merged model has no tasks: asking for one is refused, not ignored
        _one_line_failure(run("--artifact", MERGED, "--task", known[0], "hi"), known[0], MERGED)


def test_an_adapter_path_outside_the_bundle_is_refused(
    adapter_node_bundle: Path, runtime_venv: Path, c_chat: Path, tmp_path: Path
) -> None:
    """model.json's base and adapter paths are confined to the bundle's real folder (symlinks resolved) and
    must name regular files: a working adapter file outside it is refused, each time in one line."""
    dst = tmp_path / "copy" / adapter_node_bundle.name
    shutil.copytree(adapter_node_bundle, dst, symlinks=True)
    original = json.loads((dst / MODEL_JSON).read_text())
    entry = _adapter_entry(dst)
    outside = tmp_path / "copy" / "x.gguf"  # beside the bundle: "../x.gguf" from its root
    shutil.copyfile(dst / entry["adapters"][0]["path"], outside)
    link = f"{LORA}/adapter-elsewhere.gguf"
    (dst / link).symlink_to(outside)
    (dst / LORA / "sub.gguf").mkdir()
    cases = [  # (field, path written into model.json, what the one line says)
        ("adapter", "../x.gguf", "not a file inside the bundle"),
        ("adapter", link, "not a file inside the bundle"),  # inside by name, outside once resolved
        ("adapter", str(outside), "not a file inside the bundle"),
        ("base", "../x.gguf", "not a file inside the bundle"),
        ("adapter", LORA, "not a file inside the bundle"),  # not in the artifact's folder
        ("adapter", "tokenizer/tokenizer.json", "not a file inside the bundle"),  # another file of the bundle
        ("adapter", f"{LORA}/sub.gguf", "not a regular file"),  # a folder inside the artifact's folder
    ]
    for n, (field, path, needle) in enumerate(cases):
        desc = json.loads(json.dumps(original))
        lora = next(a for a in desc["artifacts"] if a["path"] == LORA)
        if field == "base":
            lora["base"] = path
        else:
            lora["adapters"][0]["path"] = path
        _describe(dst, desc)
        args = ("--artifact", LORA, "hi")
        # Node (the slower to start) on every other case: the apps share the rule, each case runs in Python and C
        node = (_node(dst, *args),) if n % 2 == 0 else ()
        apps = (_python(runtime_venv, dst, PY_GGUF, *args), _c(c_chat, dst, *args), *node)
        for cmd in apps:
            _one_line_failure(cmd, path, needle)
    # the same copy with its model.json back runs: only the paths were refused
    _describe(dst, original)
    for cmd in (_python(runtime_venv, dst, PY_GGUF, *args), _node(dst, *args), _c(c_chat, dst, *args)):
        assert _run(cmd).returncode == 0, cmd


# --- a hostile template in model.json: one line, in bounded time, in every example ---------------------------


@pytest.mark.parametrize(
    ("template", "says"),
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "did not finish",
        ),
        ("{% for i in range(100000) %}{{ 'abcdefghijk' }}{% endfor %}", "grew past 200000 characters"),
        ("{{ raise_exception('\x1b[2J\x1b[32mok') }}", "\\x1b[2J"),
    ],
    ids=["nested-loops", "long-output", "escape-codes"],
)
def test_a_hostile_template_is_bounded_in_the_examples(
    node_bundle: Path, runtime_venv: Path, tmp_path: Path, template: str, says: str
) -> None:
    import os

    dst = tmp_path / node_bundle.name
    shutil.copytree(node_bundle, dst, ignore=shutil.ignore_patterns("node_modules"))
    (dst / "examples" / "node" / "node_modules").symlink_to(
        node_bundle / "examples" / "node" / "node_modules"
    )
    desc = json.loads((dst / MODEL_JSON).read_text())
    desc["chat_template"] = template
    (dst / MODEL_JSON).write_text(json.dumps(desc))
    env = dict(os.environ, EDGEFT_RENDER_SECONDS="3")
    for cmd in (_python(runtime_venv, dst, PY_GGUF, "hi"), _node(dst, "hi")):
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and "chat_template" in lines[0], (cmd, res.stderr)
        assert says in lines[0] and "\x1b" not in res.stderr, lines
        assert time.monotonic() - t0 < 30


def test_a_prompt_longer_than_the_context_is_named_as_that(
    node_bundle: Path, runtime_venv: Path, c_chat: Path
) -> None:
    long = " ".join(f"word{i}" for i in range(600))  # ~2300 tokens, past the demo's 512
    for cmd in (
        _python(runtime_venv, node_bundle, PY_GGUF, long),
        _python(runtime_venv, node_bundle, PY_ONNX, long),
        _node(node_bundle, long),
        _c(c_chat, node_bundle, long),
    ):
        line = _one_line_failure(cmd, "do not fit the context of 512 tokens")
        assert "prompt (" in line, line
