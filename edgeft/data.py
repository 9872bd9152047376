"""Task data: load JSONL examples, split them, and turn them into token ids the same way everywhere.

Fine-tuning, evaluation and every runtime use these functions, so the prompt a model is trained on is
byte-for-byte the prompt it is later asked to complete.

A data file is JSONL, one example per line, either
    {"prompt": "...", "completion": "..."}                      (becomes a user turn and an assistant turn)
or  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (last turn: assistant)
Blank lines are skipped. An explicit held-out split can be given as a sibling file `<stem>.eval.jsonl`
(see `load_split`); otherwise `split` holds out a seeded random fraction.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft import template
from edgeft.errors import EdgeftError
from edgeft.files import sha256_file

ROLES = ("system", "user", "assistant")
# End-of-turn tokens used by common chat templates; any that the vocabulary has also end an answer.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
IGNORE_INDEX = -100
EVAL_SUFFIX = ".eval.jsonl"


@dataclass(frozen=True)
class Example:
    """One task example: chat turns ending with the assistant's answer, and where it came from."""

    messages: tuple[dict[str, str], ...]
    source: str  # "file:line", for error messages

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """All turns before the last assistant turn: what the model is asked to continue."""
        return [dict(m) for m in self.messages[: self._last_assistant()]]

    @property
    def answer(self) -> str:
        """The content of the last assistant turn: the expected answer."""
        return self.messages[self._last_assistant()]["content"]

    def _last_assistant(self) -> int:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "assistant":
                return i
        raise EdgeftError(f"{self.source}: no assistant turn")


# --- loading ------------------------------------------------------------------------------------------


def _encodable(msgs: tuple[dict[str, str], ...], where: str) -> tuple[dict[str, str], ...]:
    """Refuse text a tokenizer cannot encode: JSON may spell lone UTF-16 surrogates ("\\ud800")."""
    for i, m in enumerate(msgs):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            char = ord(m["content"][e.start])
            raise EdgeftError(
                f"{where}: turn {i + 1} holds a lone surrogate \\u{char:04x}, which is not text; fix the escape"
            ) from None
    return msgs


def _parse_line(obj: Any, where: str) -> Example:
    """Validate one decoded JSON line and build its Example; raises EdgeftError naming `where`."""
    expected = (
        'expected {"prompt": str, "completion": str} or {"messages": [{"role": ..., "content": str}, ...]}'
    )
    if not isinstance(obj, dict):
        raise EdgeftError(f"{where}: line is a JSON {type(obj).__name__}, not an object; {expected}")
    has_pc = "prompt" in obj or "completion" in obj
    if has_pc and "messages" in obj:
        raise EdgeftError(f"{where}: has both prompt/completion and messages; {expected}")
    if has_pc:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise EdgeftError(f'{where}: missing field "{key}"; {expected}')
            if not isinstance(obj[key], str):
                raise EdgeftError(
                    f'{where}: field "{key}" is {type(obj[key]).__name__}, not a string; {expected}'
                )
        if not obj["completion"].strip():
            raise EdgeftError(f'{where}: field "completion" is empty; {expected}')
        msgs = (
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["completion"]},
        )
        return Example(messages=_encodable(msgs, where), source=where)
    if "messages" not in obj:
        raise EdgeftError(f"{where}: no prompt/completion or messages field; {expected}")
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        raise EdgeftError(f'{where}: field "messages" must be a non-empty list; {expected}')
    msgs_list: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise EdgeftError(f"{where}: messages[{i}] is {type(m).__name__}, not an object; {expected}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise EdgeftError(f"{where}: messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise EdgeftError(
                f"{where}: messages[{i}].content is {type(content).__name__}, not a string; {expected}"
            )
        msgs_list.append({"role": role, "content": content})
    if msgs_list[-1]["role"] != "assistant":
        raise EdgeftError(f"{where}: the last message must be the assistant's answer; {expected}")
    if not msgs_list[-1]["content"].strip():
        raise EdgeftError(f"{where}: the assistant's answer is empty; {expected}")
    if len(msgs_list) < 2:
        raise EdgeftError(f"{where}: needs at least one turn before the assistant's answer; {expected}")
    return Example(messages=_encodable(tuple(msgs_list), where), source=where)


MAX_LINE_BYTES = 16 << 20  # one example a line; a longer line is not a chat example but a broken file
_BOM = b"\xef\xbb\xbf"


def _decode_line(raw: bytes, where: str) -> Any:
    """One line's bytes → decoded JSON; EdgeftError naming `where` for bad UTF-8, bad or too deep JSON."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeftError(
            f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
        ) from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise EdgeftError(
            f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one object a line"
        ) from None
    except RecursionError:
        raise EdgeftError(
            f"{where}: JSON nested too deeply to be an example; expected one object a line"
        ) from None
    except ValueError:  # an integer past Python's digit limit (sys.get_int_max_str_digits)
        raise EdgeftError(
            f"{where}: invalid JSON (a number too long to read); expected one object a line"
        ) from None


def load_jsonl(path: Path) -> list[Example]:
    """All examples of a JSONL file; any malformed line raises EdgeftError("FILE:LINE: ...").

    The file is read a line at a time (lines end at LF only: U+2028 inside a JSON string is text, not a
    line break), a UTF-8 BOM is skipped, and a line over MAX_LINE_BYTES is refused without reading it whole.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgeftError(f"{path}: data file not found (expected a JSONL file of prompt/completion lines)")
    examples: list[Example] = []
    try:
        with path.open("rb") as f:
            n = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                n += 1
                where = f"{path}:{n}"
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise EdgeftError(
                        f"{where}: line longer than {MAX_LINE_BYTES >> 20} MiB; expected one example a line"
                    )
                if n == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                if raw.strip():
                    examples.append(_parse_line(_decode_line(raw, where), where))
    except OSError as e:
        raise EdgeftError(f"{path}: cannot read ({e.strerror or e})") from None
    if not examples:
        raise EdgeftError(f"{path}: no examples (the file is empty); expected one JSON object a line")
    return examples


def dataset_sha256(path: Path) -> str:
    """SHA-256 of the data file's bytes, to record exactly which data a model was tuned on."""
    return sha256_file(path)


# --- splitting ----------------------------------------------------------------------------------------


def split(
    examples: Sequence[Example], eval_fraction: float = 0.1, seed: int = 0, max_eval: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Seeded, deterministic (train, eval) split; both keep file order and share no example.

    At least one example is held out when eval_fraction > 0 and there are two or more. `max_eval` caps how
    many held-out examples are returned (for speed) without putting the others back into train.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise EdgeftError(f"eval_fraction is {eval_fraction}; expected 0 <= eval_fraction < 1")
    n = len(examples)
    n_eval = 0 if eval_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = order[:n_eval]
    train = [ex for i, ex in enumerate(examples) if i not in set(held)]
    # max_eval only shortens the eval list; train never depends on it, so no held-out example leaks.
    shown = set(held if max_eval is None else held[: max(0, max_eval)])
    evals = [ex for i, ex in enumerate(examples) if i in shown]
    return train, evals


def eval_file_for(path: Path) -> Path:
    """The explicit held-out file that goes with a data file: `<stem>.eval.jsonl` beside it."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".jsonl") + EVAL_SUFFIX)


def load_split(
    path: Path, eval_fraction: float = 0.1, seed: int = 0, max_eval: int | None = None
) -> tuple[list[Example], list[Example]]:
    """(train, eval) for a data file: its sibling `<stem>.eval.jsonl` if present, else `split` of the file."""
    path = Path(path)
    examples = load_jsonl(path)
    eval_path = eval_file_for(path)
    if eval_path.is_file() and eval_path != path:
        evals = load_jsonl(eval_path)
        return examples, evals[:max_eval] if max_eval is not None else evals
    return split(examples, eval_fraction, seed, max_eval)


def split_record(path: Path, evals: Sequence[Example]) -> dict[str, Any]:
    """What a fine-tune records about its held-out split, so verify scores exactly those examples later."""
    examples = []
    for ex in evals:
        file, line = ex.source.rsplit(":", 1)
        examples.append(f"{Path(file).resolve()}:{line}")
    files = sorted({e.rsplit(":", 1)[0] for e in examples}) or [str(Path(path).resolve())]
    return {"files": {f: sha256_file(Path(f)) for f in files}, "examples": examples}


def _checked_split(record: Any, where: str) -> tuple[dict[str, str], list[str]]:
    """A split record's files {path: sha256} and examples ["path:line"], type-checked."""
    bad = EdgeftError(f"{where}: eval_split record is malformed; re-run finetune")
    if not isinstance(record, dict):
        raise bad
    files, sources = record.get("files"), record.get("examples")
    if not isinstance(files, dict) or not isinstance(sources, list):
        raise bad
    for digest in files.values():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise bad
    for s in sources:
        if (
            not isinstance(s, str)
            or not re.fullmatch(r".+:[0-9]{1,9}", s)
            or s.rsplit(":", 1)[0] not in files
        ):
            raise bad
    return files, sources


def split_digest(record: Any, where: str) -> str:
    """A digest of a recorded split that names its content, not where it lay: the data files' sha256 and the
    examples' line numbers in them (the same data in another folder gives the same digest)."""
    files, sources = _checked_split(record, where)
    content = [f"{files[s.rsplit(':', 1)[0]]}:{s.rsplit(':', 1)[1]}" for s in sources]
    return hashlib.sha256("\n".join(content).encode()).hexdigest()


def load_recorded_split(record: Any, where: str) -> list[Example]:
    """The held-out examples a fine-tune recorded (see split_record), refusing data that changed since.

    The record names the user's data files by absolute path (they lie outside any model folder); a file is
    read only when its sha256 is the recorded one, so a record can point at nothing its writer did not
    already have byte for byte.
    """
    files, sources = _checked_split(record, where)
    loaded: dict[str, Example] = {}
    for f, digest in files.items():
        if not Path(f).is_file():
            raise EdgeftError(f"{where}: the fine-tune's eval data {f} is gone; pass --data to choose data")
        if sha256_file(Path(f)) != digest:
            raise EdgeftError(
                f"{where}: {f} changed since the fine-tune (sha256 differs); pass --data to choose data"
            )
        loaded.update({ex.source: ex for ex in load_jsonl(Path(f))})
    missing = [s for s in sources if s not in loaded]
    if missing:
        raise EdgeftError(f"{where}: recorded eval example {missing[0]} not found")
    return [loaded[s] for s in sources]


# --- token ids ----------------------------------------------------------------------------------------


def adds_bos(tokenizer: Any) -> bool:
    """Whether plain encoding puts the BOS token first (the tokenizer's own behaviour, not a config guess)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return len(with_special) > len(plain) and bos is not None and with_special[0] == bos


def plain_chat_template(tokenizer: Any) -> str:
    """The chat template edgeft gives a model that has none (a base model tuned on prompt/completion data):
    the turns' text one per line, BOS first if the tokenizer adds one, a newline as the generation prompt.
    Every runtime renders it the same way, and the exporters write it into the artifacts, so an app's chat
    call feeds the model exactly what it was tuned on."""
    bos = "{{ bos_token }}" if adds_bos(tokenizer) else ""
    return (
        bos
        + "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '\\n' }}{% endif %}"
    )


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template, or plain_chat_template when it has none."""
    tmpl = getattr(tokenizer, "chat_template", None)
    return tmpl if isinstance(tmpl, str) and tmpl else plain_chat_template(tokenizer)


def template_variables(tokenizer: Any) -> dict[str, Any]:
    """What transformers gives a chat template besides the messages: the special tokens' text."""
    return {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str | list)}


def _template_where(tokenizer: Any) -> str:
    return f"{getattr(tokenizer, 'name_or_path', '') or 'the model'}: its chat template"


def vet(tokenizer: Any, renders: list[tuple[list[dict[str, str]], bool]]) -> None:
    """Render these through the tokenizer's chat template within bounds first, in one batch (edgeft.template
    vet): transformers then renders the same inputs in this process, known to finish."""
    template.vet(
        chat_template(tokenizer), template_variables(tokenizer), renders, where=_template_where(tokenizer)
    )


def vet_examples(tokenizer: Any, examples: Sequence[Example]) -> None:
    """vet() every rendering train_ids and prompt_ids make of these examples, in one batch."""
    renders = [(list(ex.prompt_messages), True) for ex in examples]
    renders += [
        ([*ex.prompt_messages, {"role": "assistant", "content": ex.answer}], False) for ex in examples
    ]
    vet(tokenizer, renders)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The conversation through the chat template as transformers renders it (its environment and
    variables), rendered within bounds in a child (edgeft.template; at once when a batch vetted it already)."""
    try:
        text = template.rendered(
            chat_template(tokenizer),
            template_variables(tokenizer),
            messages,
            generation_prompt,
            where=_template_where(tokenizer),
        )
    except template.TemplateRefused as e:  # raise_exception(...) in the template, or its own bug
        raise EdgeftError(f"the chat template cannot render this conversation ({str(e)[:200]})") from None
    if not isinstance(text, str):
        raise EdgeftError("the tokenizer's chat template did not render to text")
    return text


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Ids a model answers from: the conversation through the chat template, with the generation prompt.

    The rendered template carries its own BOS/markers, so no special tokens are added again.
    """
    return _encode(tokenizer, _render(tokenizer, messages, True), special=False)


def prompt_ids(tokenizer: Any, ex: Example) -> list[int]:
    """Ids a runtime generates the example's answer from (see chat_prompt_ids)."""
    try:
        return chat_prompt_ids(tokenizer, ex.prompt_messages)
    except EdgeftError as e:
        raise type(e)(f"{ex.source}: {e}") from None


_SENTINEL = "\u2063edgeft-answer\u2063"


def template_end_of_turn(tokenizer: Any) -> int | None:
    """The special token the chat template puts right after an assistant answer (e.g. <|im_end|>), if any."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = _render(tokenizer, msgs, False)
    except template.TemplateBoundsError:
        raise
    except Exception:  # noqa: BLE001 - a template may refuse this shape; then there is nothing to learn
        return None
    if _SENTINEL not in text:
        return None
    tail = _encode(tokenizer, text.split(_SENTINEL, 1)[1], special=False)
    specials = set(getattr(tokenizer, "all_special_ids", [])) | {
        int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    return next((t for t in tail if t in specials), None)


def stop_ids(tokenizer: Any) -> list[int]:
    """Ids that end a greedy answer: eos, the template's end-of-turn token, known end-of-turn tokens."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    eot = template_end_of_turn(tokenizer)
    for i in [*(eos if isinstance(eos, list) else [eos]), eot]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    for tok in END_OF_TURN_TOKENS:
        i = _token_id(tokenizer, tok)
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a token that the vocabulary holds, else None (the fast tokenizer's own lookup: copying the
    whole vocabulary with get_vocab costs ~40 ms on a 49k vocabulary, once per example adds up)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        i = backend.token_to_id(token)
        return None if i is None else int(i)
    return tokenizer.get_vocab().get(token)


def train_ids(tokenizer: Any, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example; labels are -100 everywhere but the answer and its end token.

    The input starts with exactly `prompt_ids(tokenizer, ex)`, so training sees what inference sees. Too
    long examples lose prompt tokens from the left first, then answer tokens from the right.
    """
    prompt = prompt_ids(tokenizer, ex)
    stop_list = stop_ids(tokenizer)
    stops, end = set(stop_list), next(iter(stop_list), None)
    rest: list[int] | None = None
    full_msgs = ex.prompt_messages + [{"role": "assistant", "content": ex.answer}]
    try:
        full = _render(tokenizer, full_msgs, False)
    except EdgeftError as e:
        raise type(e)(f"{ex.source}: {e}") from None
    head = _render(tokenizer, ex.prompt_messages, True)
    if full.startswith(head):
        rest = _encode(tokenizer, full[len(head) :], special=False)
        cut = next((i for i, t in enumerate(rest) if t in stops), None)
        # Learn the answer and its end-of-turn token; text after it (e.g. "\n") is not the answer's.
        rest = rest[: cut + 1] if cut is not None else rest + ([end] if end is not None else [])
    if rest is None:
        rest = _encode(tokenizer, ex.answer, special=False) + ([end] if end is not None else [])
    if max_len < 2:
        raise EdgeftError(f"max_len is {max_len}; expected at least 2")
    if len(prompt) + len(rest) > max_len:
        keep_prompt = max(1, max_len - len(rest))
        prompt = prompt[-keep_prompt:]
        rest = rest[: max_len - len(prompt)]
    return prompt + rest, [IGNORE_INDEX] * len(prompt) + rest


def answer_text_matches(text: str, ex: Example) -> bool:
    """Exact match (surrounding whitespace aside) of a decoded greedy answer with the expected answer."""
    return text.strip() == ex.answer.strip()
