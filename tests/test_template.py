"""A stranger's chat template rendered within bounds (edgeft.template): the same text transformers renders,
and a template that loops forever, grows a huge string, eats memory or recurses ends in one line naming it,
quickly, with this process untouched."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from test_recipe import GEMMA2, GEMMA3, LLAMA3, NUMBERED, QWEN25
from tinymodels import CHATML_TEMPLATE, LLAMA2_TEMPLATE
from transformers.utils.chat_template_utils import render_jinja_template

from edgeft.errors import EdgeftError
from edgeft.template import MAX_CHARS, BoundedRender, TemplateRefused, render_many

VARS = {"bos_token": "<s>", "eos_token": "</s>"}
CONVS = [
    [{"role": "user", "content": "hi ü"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]
# transformers' extras: {% generation %}, tojson keeping non-ASCII, namespace, loop controls
EXTRAS = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m | tojson }}{% endif %}{% endfor %}{{ ns.n }}"
    # transformers passes tools and documents as none (Mistral's templates test `tools is not none`)
    "{% if tools is none %}[no tools]{% endif %}{% if documents is not none %}[docs]{% endif %}"
)


@pytest.mark.parametrize(
    "template",
    [CHATML_TEMPLATE, LLAMA2_TEMPLATE, LLAMA3, GEMMA3, QWEN25, NUMBERED, EXTRAS],
    ids=["chatml", "llama2", "llama3", "gemma3", "qwen2.5", "numbered", "extras"],
)
def test_renders_as_transformers_does(template: str) -> None:
    renders = [(c, g) for c in CONVS for g in (False, True)]
    got = render_many(template, VARS, renders, where="t")
    for (conv, gen), text in zip(renders, got, strict=True):
        (want,), _ = render_jinja_template([conv], chat_template=template, add_generation_prompt=gen, **VARS)
        assert text == want


def test_the_templates_own_refusal_is_an_answer_not_a_fault() -> None:
    render = BoundedRender(GEMMA2, VARS, "t")
    assert render(CONVS[0], True).startswith("<s><start_of_turn>user")
    with pytest.raises(TemplateRefused, match="System role not supported"):
        render(CONVS[1], True)


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "did not finish"),
        ("{{ 'x' * 2000000000 }}", "needed more memory"),
        ("{% for i in range(100000) %}{{ 'abcdefghijk' }}{% endfor %}", f"grew past {MAX_CHARS} characters"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed too deeply"),
        ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
         "memory"),
    ],
    ids=["nested-loops", "huge-string", "long-output", "recursion", "doubling"],
)  # fmt: skip
def test_a_template_without_bounds_is_stopped_in_one_line(template: str, says: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(EdgeftError) as e:
        render_many(
            template, {}, [([{"role": "user", "content": "hi"}], True)], where="x/model.json", seconds=3
        )
    took = time.monotonic() - t0
    line = str(e.value)
    assert line.startswith("x/model.json: the chat template") and says in line and "\n" not in line
    assert took < 8, took


def test_a_templates_message_cannot_drive_the_terminal() -> None:
    (refused,) = render_many(
        "{{ raise_exception('\x1b[2J\x1b[32mok: all good\x07') }}", {}, [([], True)], where="t"
    )
    assert isinstance(refused, TemplateRefused) and "ok: all good" in str(refused)
    assert not any(ord(ch) < 0x20 for ch in str(refused)), str(refused)


def test_a_lower_limit_of_the_users_is_kept(tmp_path) -> None:
    """Under a user's `ulimit -t 10` (a hard CPU limit below the child's), rendering still works: the child's
    limits are never raised above the caller's."""
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_CPU, (10, 10)); "
        "from edgeft.template import render_many; "
        "print(render_many('{{ messages[0].content }}', {}, [([{'role': 'user', 'content': 'hi'}], True)], where='t'))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "['hi']", res.stderr[-2000:]


def test_many_renders_take_one_child() -> None:
    render = BoundedRender(CHATML_TEMPLATE, VARS, "t")
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(200)]
    t0 = time.monotonic()
    render.prefetch([(c, True) for c in convs])
    assert all(render(c, True).endswith("<|im_start|>assistant\n") for c in convs)
    assert time.monotonic() - t0 < 5
