#!/usr/bin/env python3
"""The smallest app using an edgeft bundle: answer one prompt with a shipped artifact, greedily.

    python3 chat.py BUNDLE_DIR "turn off the kitchen lights" [--artifact RELPATH] [--max-tokens N]

Needs only Python 3 and the artifact's runtime (no edgeft). The prompt goes through the artifact's own chat
template, as in an app: a GGUF through llama-cpp-python's `create_chat_completion` (the template stored in
the GGUF), an ONNX folder through onnxruntime-genai's `Tokenizer.apply_chat_template` and `Generator`. By
default the first artifact in manifest.json whose runtime is installed here. Prints the answer; on failure
one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# format → (module, install line)
RUNTIMES = {
    "gguf": ("llama_cpp", "pip install llama-cpp-python"),
    "onnx": ("onnxruntime_genai", "pip install onnxruntime-genai"),
}


class ChatError(Exception):
    """A one-line failure (printed as `chat.py: error: ...`)."""


def _importable(fmt: str) -> bool:
    try:
        importlib.import_module(RUNTIMES[fmt][0])
    except Exception:  # noqa: BLE001 - ImportError, or OSError from a missing shared library
        return False
    return True


def pick_artifact(bundle: Path, rel: str | None) -> tuple[Path, str]:
    """(path, format) of `rel`, or of the first manifest artifact whose runtime imports here."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        entries = [e for e in manifest["artifacts"] if isinstance(e, dict)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ChatError(f"{bundle}: no readable manifest.json with artifacts ({type(e).__name__})") from None
    known = {e.get("path"): e.get("format") for e in entries if e.get("format") in RUNTIMES}
    if rel is not None:
        if rel not in known:
            raise ChatError(f"{rel}: not an artifact of this bundle (have: {', '.join(map(str, known))})")
        if not _importable(known[rel]):
            module, line = RUNTIMES[known[rel]]
            raise ChatError(f"{rel} needs {module}, which is not installed here: {line}")
        choice = rel
    else:
        usable = [p for p, fmt in known.items() if _importable(fmt)]
        if not usable:
            lines = " or ".join(sorted({RUNTIMES[f][1] for f in known.values()}))
            raise ChatError(f"no artifact's runtime is installed here: {lines or 'the bundle lists none'}")
        choice = usable[0]
    path = (bundle / str(choice)).resolve()
    root = bundle.resolve()
    if (path != root and root not in path.parents) or not path.exists():  # Path.is_relative_to is 3.9+
        raise ChatError(f"{choice}: missing from the bundle")
    return path, known[choice]


def answer_gguf(path: Path, prompt: str, max_tokens: int, threads: int | None) -> str:
    """llama-cpp-python, as an app calls it: `create_chat_completion` with the GGUF's chat template."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, verbose=False)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens
        )
    finally:
        llm.close()
    return out["choices"][0]["message"]["content"] or ""


def answer_onnx(path: Path, prompt: str, max_tokens: int, threads: int | None) -> str:
    """onnxruntime-genai, as an app calls it: chat template, encode, greedy `Generator`, decode."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    if threads:
        # ref: onnxruntime-genai src/config.h, Config::SessionOptions intra_op_num_threads.
        config.overlay(
            json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}})
        )
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    text = tokenizer.apply_chat_template(
        json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
    )
    ids = tokenizer.encode(text)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return str(tokenizer.decode(generator.get_sequence(0)[len(ids) :]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="chat.py",
        description="Answer one prompt with an artifact of this bundle (greedy, through its chat template).",
        epilog='Example: python3 chat.py . "turn off the kitchen lights"',
    )
    ap.add_argument("bundle", type=Path, help="the bundle folder (holds manifest.json)")
    ap.add_argument("prompt", help="the user's message")
    ap.add_argument(
        "--artifact", default=None, help="artifact path in the bundle (default: the first usable)"
    )
    ap.add_argument("--max-tokens", type=int, default=128, help="longest answer in tokens")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's)")
    a = ap.parse_args(argv)
    try:
        if a.max_tokens < 1:
            raise ChatError(f"--max-tokens = {a.max_tokens} should be 1 or more")
        path, fmt = pick_artifact(a.bundle, a.artifact)
        answer = (answer_gguf if fmt == "gguf" else answer_onnx)(path, a.prompt, a.max_tokens, a.threads)
    except ChatError as e:
        print(f"chat.py: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a runtime's load or generate error, shown as one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"chat.py: error: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(answer.encode("utf-8", errors="replace") + b"\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
