#!/usr/bin/env python3
"""Answer prompts with the bundle's ONNX model in onnxruntime-genai, exactly as edgeft verified it.

    pip install onnxruntime-genai
    python3 examples/python/chat_onnxruntime_genai.py "turn off the kitchen lights"    # inside a bundle
    python3 examples/python/chat_onnxruntime_genai.py --bundle dist/raspberrypi "turn off the kitchen lights"

onnxruntime-genai renders model.json's chat template itself (`apply_chat_template(template_str=...)`, the
call C#, Java and Kotlin apps make too) and encodes it with the tokenizer files in the ONNX folder; the
greedy Generator stops at genai_config.json's end ids and at model.json's end-of-turn ids.
"""

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.dont_write_bytecode = True  # no __pycache__ inside the bundle: its files stay exactly what was shipped
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle_model  # noqa: E402 - the examples' shared helper, beside this file


def answer(
    path: Path, desc: Dict[str, Any], prompts: List[str], max_new: int, threads: int
) -> List[Tuple[List[int], str]]:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise bundle_model.ExampleError(
            "onnxruntime-genai is not installed: pip install onnxruntime-genai"
        ) from None
    config = og.Config(str(path))
    # ref: onnxruntime-genai src/config.h, Config::SessionOptions intra_op_num_threads
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    ends = {int(t["id"]) for t in desc["tokens"]["end_of_turn"]}
    out = []
    for prompt in prompts:
        messages = json.dumps(bundle_model.conversation(desc, prompt))
        text = tokenizer.apply_chat_template(
            messages,
            template_str=desc["chat_template"],
            add_generation_prompt=desc["prompt"]["add_generation_prompt"],
        )
        ids = [int(i) for i in tokenizer.encode(text)]
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
