"""Property-based fuzzing of the loaders a user feeds: no input makes them raise anything but a one-line
EdgeftError, or hang (issue 7). Documents are built from strategies that know the schemas (so deep
validation paths are reached) and mixed with arbitrary values and raw bytes (so nothing is assumed).

Each test runs ~200 examples with a per-example deadline; the whole file stays well under a minute.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from edgeft import config, targets
from edgeft.constants import BUDGET_KINDS
from edgeft.data import Example, load_jsonl
from edgeft.errors import EdgeftError
from edgeft.formats.gguf.constants import GGUF_QUANTS
from edgeft.formats.onnx.constants import ONNX_QUANTS

FUZZ = settings()  # the profile conftest loads (HYPOTHESIS_PROFILE: quick, ci, thorough)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edgeft-fuzz-") as d:
        yield Path(d)


def only_edgeft_errors(fn: Callable[[], Any]) -> Any:
    """fn's result, or None when it raised EdgeftError with a one-line message; anything else fails."""
    try:
        result = fn()
    except EdgeftError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        event("refused")  # --hypothesis-show-statistics: how often each outcome was reached
        return None
    event("accepted")
    return result


# --- value strategies ----------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)  # TOML cannot spell surrogates
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.0, 0.5, 1.0, 2, 8, 16, 1024, 1e9, math.nan, math.inf, -math.inf]),
    text,
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict]) -> dict[str, Any]:
    """A plausible table, often with one field dropped, given any value, or a stray key added."""
    doc = dict(draw(base))
    how = draw(st.sampled_from(["keep", "keep", "keep", "value", "drop", "stray"]))
    if how == "value" and doc:
        doc[draw(st.sampled_from(sorted(doc)))] = draw(values)
    elif how == "drop" and doc:
        del doc[draw(st.sampled_from(sorted(doc)))]
    elif how == "stray":
        doc[draw(text)] = draw(values)
    return doc


def table_of(
    optional: dict[str, st.SearchStrategy[Any]], required: dict[str, st.SearchStrategy[Any]] | None = None
) -> st.SearchStrategy[dict[str, Any]]:
    return mutated(st.fixed_dictionaries(required or {}, optional=optional))


budget_tables = table_of(
    {k: st.floats(0, 1) | st.sampled_from([-1, 2, math.nan, math.inf]) for k in BUDGET_KINDS}
)
lora_tables = table_of(
    {
        "r": st.integers(1, 64),
        "alpha": st.integers(1, 128),
        "dropout": st.floats(0, 0.99),
        "target_modules": st.lists(st.sampled_from(["q_proj", "v_proj", "", "a b"]), max_size=3),
        "lr": st.floats(1e-6, 1) | st.sampled_from([0.0, -1.0, math.inf, math.nan]),
        "epochs": st.floats(0.1, 10) | st.integers(1, 5),
        "batch_size": st.integers(1, 64),
        "grad_accum": st.integers(1, 8),
        "max_len": st.integers(8, 4096),
        "eval_fraction": st.floats(0, 0.99),
        "max_eval": st.integers(0, 300),
        "seed": st.integers(0, 2**32) | st.integers(-(2**40), 2**40),
        "warmup_ratio": st.floats(0, 0.99),
        "weight_decay": st.floats(0, 1),
        "scheduler": st.sampled_from(["linear", "cosine", "nope", "reduce_lr_on_plateau"]),
        "max_steps": st.integers(-1, 10),
        "logging_steps": st.integers(1, 10),
    }
)
quant_keys = (
    st.sampled_from([*GGUF_QUANTS, *ONNX_QUANTS, "gguf-q4_0", "onnx-int8-acc4", "q4_O", "x-y"]) | text
)
edgeft_docs = table_of(
    {
        "model": st.sampled_from(["m", "org/model", ""]),
        "data": st.sampled_from(["d.jsonl", "x/../y"]),
        "target": st.sampled_from(["host", "raspberrypi", "toaster"]),
        "out": st.sampled_from(["dist", "/tmp/x"]),
        "fail_on_drift": st.booleans(),
        "trust_remote_code": st.booleans() | text,
        "threads": st.integers(-2, 2000),
        "lora": lora_tables,
        "budgets": st.dictionaries(quant_keys, budget_tables, max_size=3),
    }
)
PAIRS = [("gguf", q) for q in GGUF_QUANTS] + [("onnx", q) for q in ONNX_QUANTS]
artifact_tables = mutated(
    st.tuples(
        st.sampled_from(PAIRS) | st.sampled_from([("tflite", "x"), ("gguf", "int8"), ("onnx", "q3_xs")]),
        st.fixed_dictionaries(
            {},
            optional={
                "accuracy_level": st.integers(0, 4) | st.integers(-1, 5) | st.booleans(),
                "ship": st.booleans(),
                "budget": budget_tables,
            },
        ),
    ).map(lambda t: {"format": t[0][0], "quant": t[0][1], **t[1]})
)
profile_docs = table_of(
    {"description": text, "arch": text},
    required={
        "name": st.just("dev") | st.sampled_from(["a.b_c-1", "", "..", "../x", "/abs", ".work", "a/b"]),
        "threads": st.integers(1, 16) | st.integers(-2, 2000),
        "ram_mb": st.integers(1000, 2**25),
        "ram_budget_mb": st.integers(1, 1000) | st.integers(-1, 2000),
        "context_length": st.integers(1, 8192) | st.integers(-1, 2**25),
        "bandwidth_gb_s": st.floats(0.1, 100) | st.sampled_from([0, -1, math.nan, math.inf, 1e6]),
        "artifacts": st.lists(artifact_tables, min_size=1, max_size=3) | st.lists(values, max_size=2),
    },
)


# --- a minimal TOML writer (inline tables only; tomllib reads them as the same dicts) -------------------


def toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_str(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_doc(doc: dict[str, Any]) -> str:
    return "".join(f"{toml_str(k)} = {toml_value(v)}\n" for k, v in doc.items())


def test_toml_writer_round_trips() -> None:
    import tomllib

    doc = {"a": [1, 2.5, 'x"\\\n\x7f'], "b": {"c": True, "d": {"e": -3}}, "f": []}
    assert tomllib.loads(toml_doc(doc)) == doc


# --- edgeft.toml ---------------------------------------------------------------------------------------


def check_config(cfg: config.BuildConfig | None) -> None:
    """What a config that loads must hold: bounded, finite, typed."""
    if cfg is None:
        return
    assert cfg.threads is None or (type(cfg.threads) is int and 1 <= cfg.threads <= targets.MAX_THREADS)
    assert type(cfg.fail_on_drift) is bool and cfg.trust_remote_code is False
    for name, (ok, _) in config.LORA_RULES.items():
        assert ok(getattr(cfg.lora, name)), name
    for table in cfg.budgets.values():
        assert all(math.isfinite(v) and not isinstance(v, bool) for v in table.values())
    for name in ("host", "raspberrypi"):
        only_edgeft_errors(lambda n=name: config.apply_budgets(targets.load(n), cfg.budgets))


@FUZZ
@given(doc=edgeft_docs)
def test_edgeft_toml_documents(work: Path, doc: dict[str, Any]) -> None:
    (work / "edgeft.toml").write_text(toml_doc(doc), encoding="utf-8")
    cfg = only_edgeft_errors(lambda: config.resolve(target=None, model=None, data=None, out=None, cwd=work))
    check_config(cfg)


@FUZZ
@given(data=st.binary(max_size=400) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_edgeft_toml_bytes(work: Path, data: bytes) -> None:
    (work / "edgeft.toml").write_bytes(data)
    check_config(
        only_edgeft_errors(lambda: config.resolve(target="host", model=None, data=None, out=None, cwd=work))
    )


@FUZZ
@given(table=lora_tables)
def test_lora_flags(table: dict[str, Any]) -> None:
    settings_ = only_edgeft_errors(lambda: config.lora_settings(table, "--lora"))
    if settings_ is not None:
        assert all(ok(getattr(settings_, k)) for k, (ok, _) in config.LORA_RULES.items())


# --- target profiles -----------------------------------------------------------------------------------


def check_profile(p: targets.TargetProfile | None) -> None:
    if p is None:
        return
    assert targets.NAME_PATTERN.fullmatch(p.name) and "/" not in p.name and not p.name.startswith(".")
    assert math.isfinite(p.bandwidth_gb_s) and p.bandwidth_gb_s > 0
    assert 1 <= p.threads <= targets.MAX_THREADS and 0 < p.ram_budget_mb <= p.ram_mb
    for a in p.artifacts:
        assert a.accuracy_level is None or type(a.accuracy_level) is int
        for v in vars(a.budget).values():
            assert v is None or (math.isfinite(v) and v >= 0)
    assert "\n" not in p.summary()


@FUZZ
@given(doc=profile_docs)
def test_profile_documents(work: Path, doc: dict[str, Any]) -> None:
    path = work / "profile.toml"
    path.write_text(toml_doc(doc), encoding="utf-8")
    check_profile(only_edgeft_errors(lambda: targets.load(path)))
    check_profile(only_edgeft_errors(lambda: targets.parse_profile(doc, "doc")))


@FUZZ
@given(data=st.binary(max_size=400))
def test_profile_bytes(work: Path, data: bytes) -> None:
    path = work / "bytes.toml"
    path.write_bytes(data)
    check_profile(only_edgeft_errors(lambda: targets.load(path)))


@FUZZ
@given(table=budget_tables | values)
def test_budget_tables(table: Any) -> None:
    budget = only_edgeft_errors(lambda: targets.parse_budget(table, "--budget"))
    if budget is not None:
        assert all(v is None or math.isfinite(v) for v in vars(budget).values())


# --- JSONL data ----------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["prompt", "completion", "messages", "role", "content"]) | text, inner, max_size=4
        )
    ),
    max_leaves=10,
)
message_lists = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": st.text(max_size=20)}
    ),
    max_size=4,
)
examples = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=30), "completion": st.text(max_size=30)}),
    st.fixed_dictionaries({"messages": message_lists}),
    json_values,
)
lines = st.one_of(
    examples.map(lambda v: json.dumps(v, ensure_ascii=False)),
    examples.map(json.dumps),
    st.sampled_from(["", " ", "[" * 5000, '{"prompt": "a\u2028b", "completion": "c"}', "\ufeff{}"]),
    st.text(max_size=40),
)
jsonl_files = st.one_of(
    st.lists(lines, max_size=6).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
    st.tuples(
        st.sampled_from([b"", b"\xef\xbb\xbf"]),
        st.lists(lines, max_size=4),
        st.sampled_from([b"\n", b"\r\n"]),
    ).map(lambda t: t[0] + t[2].join(s.encode("utf-8", "surrogatepass") for s in t[1])),
    st.binary(max_size=500),
)


@FUZZ
@given(data=jsonl_files)
def test_jsonl_files(work: Path, data: bytes) -> None:
    path = work / "tasks.jsonl"
    path.write_bytes(data)
    exs = only_edgeft_errors(lambda: load_jsonl(path))
    for ex in exs or []:
        assert isinstance(ex, Example) and ex.messages[-1]["role"] == "assistant"
        assert all(isinstance(m["content"], str) for m in ex.messages)
        ex.answer.encode("utf-8")  # text a tokenizer can encode
        assert ex.source.startswith(f"{path}:")
