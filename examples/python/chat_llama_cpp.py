#!/usr/bin/env python3
"""Answer prompts with the bundle's GGUF in llama-cpp-python, exactly as edgeft verified it.

    pip install llama-cpp-python
    python3 examples/python/chat_llama_cpp.py "turn off the kitchen lights"            # inside a bundle
    python3 examples/python/chat_llama_cpp.py --bundle dist/raspberrypi "turn off the kitchen lights"

The chat template, its variables, the system prompt (none unless model.json names one), the end-of-turn
tokens and the greedy settings all come from the bundle's model.json (bundle_model.py). The prompt ids are
llama.cpp's own tokenization of the rendered template; the answer ends at llama.cpp's end-of-generation
tokens and at model.json's end-of-turn ids.

A base + adapter artifact (a folder: the base model's GGUF and one LoRA adapter GGUF per task) loads its base
and applies one adapter at model.json's scale (`--task NAME` picks it; default: the first listed), which
answers as the merged model does.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.dont_write_bytecode = True  # no __pycache__ inside the bundle: its files stay exactly what was shipped
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle_model  # noqa: E402 - the examples' shared helper, beside this file


def answer(
    path: Path,
    desc: Dict[str, Any],
    prompts: List[str],
    max_new: int,
    threads: Tuple[int, int],
    adapter: Optional[bundle_model.Adapter] = None,
) -> List[Tuple[List[int], str]]:
    llama_cpp = bundle_model.runtime("llama_cpp", "llama-cpp-python")
    gen = desc["generation"]
    # a LoRA adapter (file, scale) applied on the base model `path` (ref: llama-cpp-python Llama lora_path,
    # lora_scale: llama_adapter_lora_init, then set on the context)
    lora = {} if adapter is None else {"lora_path": str(adapter[0]), "lora_scale": adapter[1]}
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=int(desc["context_length"]),
        n_threads=threads[0],
        n_threads_batch=threads[1],
        verbose=False,
        **lora,
    )
    ends = set(bundle_model.end_ids(desc))
    # llama.cpp ends at its own end-of-generation tokens; model.json's end-of-turn ids end the answer too
    at_end = llama_cpp.StoppingCriteriaList([lambda ids, _logits: int(ids[-1]) in ends])
    out = []
    try:
        for prompt in prompts:
            text = bundle_model.prompt_text(desc, prompt)
            ids = llm.tokenize(
                text.encode("utf-8"),
                add_bos=desc["prompt"]["add_special_tokens"],
                special=desc["prompt"]["parse_special"],
            )
            bundle_model.fits(desc, len(ids), max_new)
            res = llm.create_completion(  # a list of ids is fed as is; it stops at end-of-generation tokens
                prompt=ids,
                max_tokens=max_new,
                temperature=gen["temperature"],
                top_k=gen["top_k"],
                repeat_penalty=gen["repeat_penalty"],
                stop=desc["stop_strings"] or None,
                stopping_criteria=at_end,
            )
            out.append(([int(i) for i in ids], res["choices"][0]["text"]))
    finally:
        llm.close()
    return out


if __name__ == "__main__":
    sys.exit(bundle_model.main("chat_llama_cpp.py", "gguf", answer, adapters=True))
