"""model.json: how an app runs the bundle's model the way edgeft verified it.

One small file beside the artifacts, separate from manifest.json on purpose: manifest.json is the build's
record (provenance, drift, digests, device runs) and grows with every benchmark; model.json is the run-time
contract an app ships with — chat template, special tokens, when to stop, the settings verify answered with —
and changes only when the model does. The examples in the bundle (examples/ in the repo) read it and hard-code
none of it: the same model answered differently in llama.cpp, Ollama and onnxruntime-genai because each
carried its own template and stop list (ref: ollama #6823, #8363; onnxruntime-genai #1824; llama.cpp #7062).

The prompt recipe is the fine-tune's (edgeft.data.chat_prompt_ids): render `chat_template` with
`messages`, `add_generation_prompt` and `template_variables` (Jinja2 with trim_blocks and lstrip_blocks, as
transformers and llama-cpp-python render), then tokenize the text with special tokens parsed and nothing
added (the rendered text carries its own BOS and markers). Generation is greedy until any `end_of_turn` id.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from edgeft import data, formats, recipe
from edgeft.footprint import max_positions
from edgeft.targets import MAX_THREADS

# model.json layout version; bumped whenever a key changes meaning.
SCHEMA_VERSION = 1

# The example files every bundle carries (examples/ in the repo); each format adds those that run it
# (Format.example_files).
COMMON_EXAMPLE_FILES = ("README.md", "python/bundle_model.py")


def example_files() -> dict[str, tuple[str, ...]]:
    """Example files by the format they run ("" = every bundle)."""
    return {"": COMMON_EXAMPLE_FILES} | {n: f.example_files for n, f in formats.EXPORT_FORMATS.items()}


def examples_dir() -> Path:
    """Where the examples live: inside the installed package, or `examples/` in a source checkout."""
    installed = resources.files("edgeft") / "examples"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parent.parent / "examples"


def copy_examples(dst: Path, shipped: Iterable[str]) -> None:
    """Copy into `dst` the examples that run the `shipped` formats (never node_modules or caches)."""
    src, by_format = examples_dir(), example_files()
    for fmt in ("", *sorted(set(shipped))):
        for rel in by_format.get(fmt, ()):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def common_system_prompt(conversations: Sequence[Sequence[dict[str, str]]]) -> str | None:
    """The system message every verified conversation starts with, or None when they have none or differ
    (then an app sends none, as verify did for each conversation without one)."""
    firsts = {c[0]["content"] if c and c[0].get("role") == "system" else None for c in conversations}
    return firsts.pop() if len(firsts) == 1 else None


def _token(tokenizer: Any, i: int | None) -> dict[str, Any] | None:
    if i is None:
        return None
    return {"id": int(i), "text": str(tokenizer.convert_ids_to_tokens(int(i)))}


def describe(
    tokenizer_dir: Path,
    *,
    artifacts: Sequence[dict[str, Any]],
    versions: dict[str, str],
    context_length: int,
    threads: int,
    max_new_tokens: int,
    system_prompt: str | None,
    conversations: Sequence[Sequence[dict[str, str]]] = (),
) -> dict[str, Any]:
    """model.json's content for the model in `tokenizer_dir` and the bundle's shipped `artifacts` (manifest
    entries: path, format). `versions` are the tool versions the build verified with."""
    from edgeft.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, notify=False)
    end_of_turn = [_token(tok, i) for i in data.stop_ids(tok)]
    variables = {
        k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str) and k.endswith("_token")
    }
    runs = []
    for a in artifacts:
        fmt = a["format"]
        runtimes = []
        for app in formats.get(fmt).apps:
            # the build verified this artifact with the installed Python runtime; a package pinned in the
            # examples with the version edgeft's tests run (older versions are untested, so not claimed)
            pinned = app.get("pinned")
            version = pinned or versions.get(app.get("version_of", app["name"]))
            verified = "edgeft's example tests" if pinned or "version_of" in app else "this build's verify"
            shown = {k: app[k] for k in ("name", "package", "example")}
            runtimes.append({**shown, "min_version": version, "verified_by": verified})
        # threads measured on a device (with_device_threads) replace the profile's `threads` for it
        run = {
            "path": a["path"],
            "format": fmt,
            "quant": a.get("quant"),
            "runtimes": runtimes,
            "threads": None,
        }
        if a.get("adapters"):  # a base + adapter folder: the model file, and which adapter answers which task
            run["base"] = f"{a['path']}/{a['base']}"
            run["adapters"] = [
                {"task": task, "path": f"{a['path']}/{name}", "scale": 1.0}
                for task, name in a["adapters"].items()
            ]
        runs.append(run)
    template = data.chat_template(tok)

    found, why = recipe.from_template(
        template, variables, [list(c) for c in conversations], where=f"{tokenizer_dir} chat template"
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "chat_template": template,
        # the prompt by string concatenation, for apps without a template engine (edgeft.recipe): proven equal
        # to the template's rendering on the held-out prompts and probes; null with the reason otherwise
        "recipe": found.to_json() if found is not None else None,
        "recipe_reason": why,
        "template_variables": dict(sorted(variables.items())),
        "prompt": {
            "add_generation_prompt": True,
            "add_special_tokens": False,  # the rendered template carries BOS and turn markers itself
            "parse_special": True,  # "<|im_start|>" in the text is one special token, not characters
            "system_prompt": system_prompt,  # null: send no system message (a runtime's default changes answers)
        },
        "tokens": {
            "bos": _token(tok, tok.bos_token_id),
            "eos": _token(tok, tok.eos_token_id),
            "end_of_turn": end_of_turn,  # generation ends at any of these
        },
        "stop_strings": [t["text"] for t in end_of_turn],  # the same, for runtimes that stop on text
        "generation": {
            "do_sample": False,  # greedy, as verify answered
            "temperature": 0.0,
            "top_k": 1,
            "repeat_penalty": 1.0,
            "max_new_tokens": int(max_new_tokens),
        },
        # the profile's, but never past what the model was trained for (llama.cpp warns of overflow there)
        "context_length": min(int(context_length), max_positions(tokenizer_dir)),
        "threads": int(threads),
        "artifacts": runs,
    }


def with_device_threads(described: Any, result: Any, where: str) -> dict[str, Any] | None:
    """model.json with each artifact's `threads` set from a bench_on_device.py result: the thread counts that
    decoded and prefilled fastest there ({"decode", "prefill", "measured_on"}); None when model.json is not
    one edgeft wrote or the run measured nothing."""
    if not isinstance(described, dict) or not isinstance(described.get("artifacts"), list):
        return None
    arts = result.get("artifacts") if isinstance(result, dict) else None
    dev = result.get("device") if isinstance(result, dict) else None
    cores = dev.get("cores") if isinstance(dev, dict) else None
    limit = (
        cores
        if isinstance(cores, int) and not isinstance(cores, bool) and 0 < cores <= MAX_THREADS
        else MAX_THREADS
    )
    best = {
        a.get("path"): a["best_threads"]
        for a in (arts if isinstance(arts, list) else [])
        if isinstance(a, dict) and a.get("status") == "ok" and isinstance(a.get("best_threads"), dict)
    }
    changed = False
    for entry in described["artifacts"]:
        b = best.get(entry.get("path")) if isinstance(entry, dict) else None
        if b and all(
            isinstance(b.get(k), int) and not isinstance(b.get(k), bool) and 1 <= b[k] <= limit
            for k in ("decode", "prefill")
        ):
            entry["threads"] = {"decode": b["decode"], "prefill": b["prefill"], "measured_on": where}
            changed = True
    return described if changed else None


# model.kv: model.json's facts for a program without a JSON parser (examples/c/chat.c), written beside it by
# the same writers. Line-based so C reads it with fgets: `key=value`, the value's backslash, control bytes
# and DEL escaped as \\, \n, \r, \t or \xHH (UTF-8 passes as it is), a repeated key is a list, and
# `artifact.*` keys belong to the `artifact=` line above them.
KV_HEADER = "# edgeft model.kv 1: model.json for programs without a JSON parser (edgeft.runspec.flat)"
_KV_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def kv_escape(text: str) -> str:
    """A value for one model.kv line (see KV_HEADER)."""
    return "".join(
        _KV_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
        for ch in text
    )


def flat(described: dict[str, Any]) -> str:
    """model.kv's text for a model.json (describe's output): the recipe, how to tokenize, when to stop, the
    settings and the artifacts, nothing a C program would need a JSON parser for."""
    lines = [KV_HEADER, f"schema_version={described['schema_version']}"]

    def put(key: str, value: object) -> None:
        v = int(value) if isinstance(value, bool) else value
        lines.append(f"{key}={kv_escape(str(v))}")

    rec = described.get("recipe")
    put("recipe", rec is not None)
    if rec is None:
        put("recipe_reason", described.get("recipe_reason") or "")
    else:
        put("recipe.start", rec["start"])
        for role in ("user", "assistant"):
            put(f"recipe.{role}.prefix", rec[role]["prefix"])
            put(f"recipe.{role}.suffix", rec[role]["suffix"])
        put("recipe.system.mode", rec["system"]["mode"])
        put("recipe.system.prefix", rec["system"]["prefix"])
        put("recipe.system.suffix", rec["system"]["suffix"])
        put("recipe.generation_prompt", rec["generation_prompt"])
        put("recipe.trim", rec["trim"])
    prompt = described["prompt"]
    put("prompt.add_special_tokens", prompt["add_special_tokens"])
    put("prompt.parse_special", prompt["parse_special"])
    if prompt.get("system_prompt") is not None:
        put("prompt.system_prompt", prompt["system_prompt"])
    for t in described["tokens"]["end_of_turn"]:
        put("end_of_turn", t["id"])
    put("max_new_tokens", described["generation"]["max_new_tokens"])
    put("context_length", described["context_length"])
    put("threads", described["threads"])
    for a in described["artifacts"]:
        put("artifact", a["path"])
        put("artifact.format", a["format"])
        if isinstance(a.get("threads"), dict):  # measured on a device (with_device_threads)
            put("artifact.threads", f"{a['threads']['decode']} {a['threads']['prefill']}")
        if a.get("base"):
            put("artifact.base", a["base"])
            for ad in a.get("adapters", []):  # task and scale first: a path may hold spaces
                put("artifact.adapter", f"{ad['task']} {ad['scale']} {ad['path']}")
    return "\n".join(lines) + "\n"
