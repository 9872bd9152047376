#!/usr/bin/env python3
"""Answer prompts with the bundle's ONNX model in onnxruntime-genai, exactly as edgeft verified it.

    pip install onnxruntime-genai
    python3 examples/python/chat_onnxruntime_genai.py "turn off the kitchen lights"    # inside a bundle
    python3 examples/python/chat_onnxruntime_genai.py --bundle dist/raspberrypi "turn off the kitchen lights"

model.json's chat template is rendered with its template variables as the fine-tune rendered it
(bundle_model.render, Jinja2) and encoded by onnxruntime-genai's tokenizer (the ONNX folder's tokenizer files)
with model.json's add_special_tokens; the greedy Generator stops at genai_config.json's end ids and at
model.json's end-of-turn ids. Apps in C#, Java or Kotlin render with `Tokenizer.ApplyChatTemplate(template,
messages, ...)` instead, passing model.json's `chat_template`.
"""

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.dont_write_bytecode = True  # no __pycache__ inside the bundle: its files stay exactly what was shipped
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle_checks  # noqa: E402 - the folder checks every loader of a bundle runs (edgeft's own module)
import bundle_model  # noqa: E402 - the examples' shared helper, beside this file


def answer(
    path: Path, desc: Dict[str, Any], prompts: List[str], max_new: int, threads: Tuple[int, int]
) -> List[Tuple[List[int], str]]:
    og = bundle_model.runtime("onnxruntime_genai", "onnxruntime-genai")
    try:  # before onnxruntime-genai reads anything: no native library, nothing outside the folder
        bundle_checks.check_onnx_folder(path)
    except bundle_checks.FolderError as e:
        raise bundle_model.ExampleError(str(e)) from None
    config = og.Config(str(path))
    # ref: onnxruntime-genai src/config.h, Config::SessionOptions intra_op_num_threads
    config.overlay(
        json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads[0]}}}})
    )
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    # the rendered text carries its own BOS and markers: encode adds no special tokens unless model.json says
    # so (ref: onnxruntime-genai Tokenizer.update_options, ort-extensions "add_special_tokens")
    tokenizer.update_options(add_special_tokens=str(bool(desc["prompt"]["add_special_tokens"])).lower())
    ends = set(bundle_model.end_ids(desc))
    out = []
    for prompt in prompts:
        text = bundle_model.prompt_text(desc, prompt)
        ids = [int(i) for i in tokenizer.encode(text)]
        bundle_model.fits(desc, len(ids), max_new)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=desc["generation"]["do_sample"], max_length=len(ids) + max_new)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        new: List[int] = []
        while not generator.is_done() and len(new) < max_new:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in ends:
                break
            new.append(token)
        out.append((ids, str(tokenizer.decode(new))))
    return out


if __name__ == "__main__":
    sys.exit(bundle_model.main("chat_onnxruntime_genai.py", "onnx", answer))
