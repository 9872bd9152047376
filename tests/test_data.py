"""edgeft.data: JSONL parsing and its errors, the seeded split, and answer-only training labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinymodels import cached_model, load_tokenizer

from edgeft import data
from edgeft.errors import EdgeftError


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pc(i: int) -> str:
    return json.dumps({"prompt": f"turn on light {i}", "completion": f'{{"id":{i}}}'})


def test_both_line_formats_parse(tmp_path: Path) -> None:
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    f = write(tmp_path / "d.jsonl", [pc(1), "", "   ", json.dumps({"messages": msgs})])
    exs = data.load_jsonl(f)
    assert len(exs) == 2
    assert exs[0].prompt_messages == [{"role": "user", "content": "turn on light 1"}]
    assert exs[0].answer == '{"id":1}'
    assert exs[0].source == f"{f}:1"
    assert exs[1].prompt_messages == msgs[:2]
    assert exs[1].answer == "hello"
    assert exs[1].source == f"{f}:4"


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ('{"prompt": "a", "completion": ', "invalid JSON"),
        ('{"prompt": "a"}', 'missing field "completion"'),
        ('{"prompt": "a", "completion": 3}', "not a string"),
        ('["a", "b"]', "not an object"),
        ('{"text": "a"}', "no prompt/completion or messages"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "last message must be the assistant"),
        ('{"messages": [{"role": "bot", "content": "a"}]}', "role is 'bot'"),
        ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "b"}]}', "content"),
        ('{"prompt": "a", "completion": "b", "messages": []}', "both"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, needle: str) -> None:
    f = write(tmp_path / "d.jsonl", [pc(1), "", bad, pc(2)])
    with pytest.raises(EdgeftError) as e:
        data.load_jsonl(f)
    assert f"{f}:3: " in str(e.value)
    assert needle in str(e.value)
    assert "expected" in str(e.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(EdgeftError, match="not found"):
        data.load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(EdgeftError, match="no examples"):
        data.load_jsonl(write(tmp_path / "e.jsonl", ["", " "]))


def test_dataset_sha256_changes_with_content(tmp_path: Path) -> None:
    a = data.dataset_sha256(write(tmp_path / "a.jsonl", [pc(1)]))
    b = data.dataset_sha256(write(tmp_path / "b.jsonl", [pc(2)]))
    assert len(a) == 64 and a != b


def test_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    exs = data.load_jsonl(write(tmp_path / "d.jsonl", [pc(i) for i in range(50)]))
    train, evals = data.split(exs, 0.2, seed=3)
    assert (train, evals) == data.split(exs, 0.2, seed=3)
    assert len(evals) == 10 and len(train) == 40
    srcs_t, srcs_e = {e.source for e in train}, {e.source for e in evals}
    assert not srcs_t & srcs_e
    assert srcs_t | srcs_e == {e.source for e in exs}
    assert data.split(exs, 0.2, seed=4)[1] != evals
    # max_eval shortens the eval list without returning held-out examples to train
    train_c, evals_c = data.split(exs, 0.2, seed=3, max_eval=4)
    assert train_c == train and len(evals_c) == 4 and set(map(id, evals_c)) <= set(map(id, evals))
    assert data.split(exs[:1], 0.5) == (exs[:1], [])


def test_load_split_prefers_sibling_eval_file(tmp_path: Path) -> None:
    f = write(tmp_path / "task.jsonl", [pc(i) for i in range(10)])
    assert len(data.load_split(f, 0.2)[1]) == 2
    write(tmp_path / "task.eval.jsonl", [pc(100), pc(101), pc(102)])
    train, evals = data.load_split(f, 0.2)
    assert len(train) == 10 and [e.answer for e in evals] == ['{"id":100}', '{"id":101}', '{"id":102}']


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_labels_mask_everything_but_the_answer(kind: str) -> None:
    tok = load_tokenizer(cached_model("llama", kind))
    ex = data.Example(
        messages=(
            {"role": "user", "content": "dim the bedroom lights to 30 percent"},
            {"role": "assistant", "content": '{"action":"set_brightness","value":30}'},
        ),
        source="x:1",
    )
    ids, labels = data.train_ids(tok, ex, max_len=512)
    prompt = data.prompt_ids(tok, ex)
    assert len(ids) == len(labels)
    assert ids[: len(prompt)] == prompt
    assert all(lab == data.IGNORE_INDEX for lab in labels[: len(prompt)])
    answer = [lab for lab in labels if lab != data.IGNORE_INDEX]
    assert answer == ids[len(prompt) :]
    assert answer[-1] in data.stop_ids(tok)  # the end-of-turn token is learned too
    assert tok.decode(answer, skip_special_tokens=True).strip() == ex.answer
    assert data.answer_text_matches(tok.decode(answer[:-1]) + "  ", ex)
    assert not data.answer_text_matches(tok.decode(answer[:-3]), ex)
    # truncation keeps the whole answer and drops prompt tokens from the left
    ids_t, labels_t = data.train_ids(tok, ex, max_len=len(answer) + 3)
    assert len(ids_t) == len(answer) + 3 and labels_t[3:] == answer


def test_chatml_prompt_and_stop_ids() -> None:
    tok = load_tokenizer(cached_model("llama", "bpe"))
    ex = data.Example(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}), "x:1")
    text = tok.decode(data.prompt_ids(tok, ex))
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in data.stop_ids(tok)
    assert data.template_end_of_turn(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    _, labels = data.train_ids(tok, ex, 64)
    tail = tok.decode([lab for lab in labels if lab != data.IGNORE_INDEX])
    assert tail == "yo<|im_end|>"  # the "\n" after <|im_end|> is not trained


def test_template_that_refuses_a_conversation_is_one_line() -> None:
    tok = load_tokenizer(cached_model("llama", "bpe"))
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m['content'] }}{% endfor %}"
    ex = data.Example(
        (
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ),
        "f.jsonl:7",
    )
    with pytest.raises(
        EdgeftError, match=r"^f.jsonl:7: the chat template cannot render this conversation \(no system\)$"
    ):
        data.prompt_ids(tok, ex)


def test_plain_prompt_without_chat_template() -> None:
    tok = load_tokenizer(cached_model("llama", "bpe"))
    tok.chat_template = None
    ex = data.Example(({"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}), "x:1")
    prompt = data.prompt_ids(tok, ex)
    assert tok.decode(prompt) == "2+2=\n"  # edgeft's plain template: turns one per line, then a newline
    ids, labels = data.train_ids(tok, ex, 64)
    assert ids[: len(prompt)] == prompt
    assert [lab for lab in labels if lab != data.IGNORE_INDEX] == ids[len(prompt) :]
    assert labels[-1] == tok.eos_token_id
