"""A prompt recipe an app without a Jinja engine builds its prompt from by string concatenation, derived from
the chat template and proven against it.

Apps that embed llama.cpp through `llama.h` have no template engine: `llama_chat_apply_template` knows a fixed
list of templates matched by heuristics, which is how fine-tunes with their own template get the wrong prompt
(ollama #6823; unsloth #798, #1823). The recipe is, for each role, the literal text before and after a
message's content, the text before the first message, what a system message becomes (`sent` as its own turn,
`merged` into the first user message, or `unsupported`), and the generation prompt. It is derived by rendering
the template on conversations of sentinel contents and cutting at the sentinels, then proven: on every
conversation given and on probes (several turns, a system message, empty content, content holding the
recipe's own markers) the concatenated prompt must equal the template's rendering exactly. A template the
recipe cannot express (loops over tools, conditionals on content, turns numbered differently) fails the proof
and gets no recipe, with the reason, never a wrong one. Whitespace trimming of each content (Llama 3's
`| trim`) is the one content change a recipe carries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.probes import first_difference

Messages = list[dict[str, str]]
# render(messages, add_generation_prompt) -> the template's text; raises for a conversation it refuses
Render = Callable[[Messages, bool], str]

# Sentinel contents: plain ASCII words no template writes itself and no tokenizer merges with its neighbours'
# markers in a way that matters (only the text is cut here).
U1, A1, U2, S1 = "EdgeftUserOne", "EdgeftAssistantOne", "EdgeftUserTwo", "EdgeftSystemOne"
SYSTEM_MODES = ("sent", "merged", "unsupported")


@dataclass(frozen=True)
class Turn:
    prefix: str
    suffix: str


@dataclass(frozen=True)
class Recipe:
    """How to build the prompt: see `build`."""

    start: str  # before the first message when no system message is sent
    user: Turn
    assistant: Turn
    system_mode: str  # "sent" | "merged" | "unsupported" (the template drops or refuses it: send none)
    system: Turn  # sent: its whole turn, `start` included; merged: around the system text in the first user content
    generation_prompt: str
    trim: bool = False  # each content stripped of leading and trailing whitespace first (Llama 3's `| trim`)

    @staticmethod
    def from_json(d: Any) -> Recipe:
        """model.json's `recipe` back as a Recipe; TypeError on any other shape (it is read from strangers)."""

        def text(v: Any) -> str:
            if not isinstance(v, str):
                raise TypeError("a recipe's texts are strings")
            return v

        def turn(v: Any) -> Turn:
            if not isinstance(v, dict):
                raise TypeError("a recipe's turn is an object")
            return Turn(text(v.get("prefix")), text(v.get("suffix")))

        if not isinstance(d, dict) or not isinstance(d.get("system"), dict):
            raise TypeError("a recipe is an object with a system object")
        mode, trim = d["system"].get("mode"), d.get("trim", False)
        if mode not in SYSTEM_MODES or not isinstance(trim, bool):
            raise TypeError(f"a recipe's system mode is one of {SYSTEM_MODES} and its trim a boolean")
        return Recipe(
            text(d.get("start")),
            turn(d.get("user")),
            turn(d.get("assistant")),
            mode,
            turn(d["system"]),
            text(d.get("generation_prompt")),
            trim,
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["system"] = {"mode": self.system_mode, **d["system"]}
        del d["system_mode"]
        return d


def build(recipe: Recipe, messages: Messages, add_generation_prompt: bool = True) -> str:
    """The prompt by concatenation, as an app without a template engine builds it (docs/apps.md)."""
    msgs = list(messages)
    text, pending = recipe.start, ""
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
    if (
        system is not None and recipe.system_mode != "unsupported"
    ):  # unsupported: left out, as the template does
        system = system.strip() if recipe.trim else system
        wrapped = recipe.system.prefix + system + recipe.system.suffix
        if recipe.system_mode == "sent":
            text = wrapped
        else:
            pending = wrapped
    for m in msgs:
        turn = {"user": recipe.user, "assistant": recipe.assistant}.get(m["role"])
        if turn is None:
            raise ValueError(f"role {m['role']!r} has no place in the recipe")
        content = m["content"].strip() if recipe.trim else m["content"]
        if pending and m["role"] == "user":
            content, pending = pending + content, ""
        text += turn.prefix + content + turn.suffix
    return text + (recipe.generation_prompt if add_generation_prompt else "")


def _once(text: str, needle: str) -> int:
    if text.count(needle) != 1:
        raise _NoRecipe(f"a message's content appears {text.count(needle)} times in the rendering, not once")
    return text.index(needle)


class _NoRecipe(Exception):
    """Why the template cannot be a recipe (one line)."""


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :]


def _turns(render: Render) -> tuple[str, Turn, Turn, str]:
    """start, user turn, assistant turn and generation prompt, cut from renderings of sentinel contents."""
    r3 = render([_m("user", U1), _m("assistant", A1), _m("user", U2)], False)
    p1, pa, p2 = _once(r3, U1), _once(r3, A1), _once(r3, U2)
    if not p1 < pa < p2:
        raise _NoRecipe("the template reorders the messages")
    seg0, seg1 = r3[:p1], r3[p1 + len(U1) : pa]
    seg2, user_suffix = r3[pa + len(A1) : p2], r3[p2 + len(U2) :]
    if not seg1.startswith(user_suffix):
        raise _NoRecipe("a user turn ends differently in the middle of a conversation than at its end")
    # where the assistant turn ends and the next user turn begins: from a conversation ending with the
    # assistant (else the longest text both the start and the turn boundary end with)
    r2 = render([_m("user", U1), _m("assistant", A1)], False)
    assistant_suffix = r2[_once(r2, A1) + len(A1) :]
    if seg2.startswith(assistant_suffix) and seg0.endswith(seg2[len(assistant_suffix) :]):
        user_prefix = seg2[len(assistant_suffix) :]
    else:
        user_prefix = _common_suffix(seg0, seg2)
    start = seg0[: len(seg0) - len(user_prefix)]
    assistant = Turn(seg1[len(user_suffix) :], seg2[: len(seg2) - len(user_prefix)])
    r1, rg = render([_m("user", U1)], False), render([_m("user", U1)], True)
    if not rg.startswith(r1):
        raise _NoRecipe("the generation prompt is not text added at the end")
    return start, Turn(user_prefix, user_suffix), assistant, rg[len(r1) :]


def _system_candidates(render: Render, start: str, user: Turn) -> list[tuple[str, Turn]]:
    """The ways a system message could fit the renderings: its own turn, merged into the first user message,
    or unsupported (the template refuses it, or drops it)."""
    try:
        rs = render([_m("system", S1), _m("user", U1)], False)
    except EdgeftError:
        raise  # past the renderer's bounds: the caller's one line
    except Exception:  # noqa: BLE001 - a template refusing system messages raises its own error type
        return [("unsupported", Turn("", ""))]
    if S1 not in rs:
        return [("unsupported", Turn("", ""))]
    ps, pu = _once(rs, S1), _once(rs, U1)
    out = []
    if ps < pu - len(user.prefix) and rs[pu - len(user.prefix) : pu] == user.prefix:
        head = rs[: pu - len(user.prefix)]
        out.append(("sent", Turn(head[:ps], head[ps + len(S1) :])))
    lead = start + user.prefix
    if rs.startswith(lead) and len(lead) <= ps < pu:
        out.append(("merged", Turn(rs[len(lead) : ps], rs[ps + len(S1) : pu])))
    return out or [("unsupported", Turn("", ""))]


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def probes(recipe_strings: Sequence[str]) -> list[Messages]:
    """Conversations the proof runs besides the caller's: several turns, a system message, empty content and
    content holding the recipe's own marker text."""
    markers = "".join(s for s in recipe_strings if s)[:200] or "<|im_start|>"
    return [
        [_m("user", "hello")],
        [_m("user", "a"), _m("assistant", "b"), _m("user", "c")],
        [_m("user", "a"), _m("assistant", "b"), _m("user", "c"), _m("assistant", "d"), _m("user", "e")],
        [_m("system", "be brief"), _m("user", "hi")],
        [_m("system", "be brief"), _m("user", "a"), _m("assistant", "b"), _m("user", "c")],
        [_m("user", "")],
        [_m("user", "a"), _m("assistant", ""), _m("user", "c")],
        [_m("user", "a"), _m("assistant", "<think>why</think>so"), _m("user", "c")],
        [_m("user", f"quote {markers} end")],
        [_m("user", " leading and trailing spaces \n")],
    ]


def prove(render: Render, recipe: Recipe, conversations: Sequence[Messages]) -> str | None:
    """None when the recipe's prompt equals the template's rendering, generation prompt included (the app
    path: model.json's add_generation_prompt), on every conversation and probe; else the first difference, in
    one line."""
    strings = [recipe.start, recipe.user.prefix, recipe.user.suffix, recipe.assistant.prefix]
    convs = [*conversations, *probes(strings)]
    _prefetch(render, [(list(c), True) for c in convs])
    for conv in convs:
        has_system = bool(conv) and conv[0]["role"] == "system"
        try:
            want = render(list(conv), True)
        except EdgeftError:
            raise  # past the renderer's bounds: the caller's one line
        except Exception as e:  # noqa: BLE001 - the template's own refusal
            if has_system and recipe.system_mode == "unsupported":
                continue  # refused with a system message: the recipe sends none (the template drops it: compared)
            return f"the template refuses a conversation the recipe builds ({str(e).splitlines()[0][:80]!r})"
        try:
            got = build(recipe, conv, True)
        except ValueError as e:
            return str(e)
        at = first_difference(want, got)
        if at is not None:
            return (
                f"the recipe's prompt differs from the template's at character {at} of a "
                f"{len(conv)}-message conversation ({want[max(0, at - 20) : at + 20]!r})"
            )
    return None


def _prefetch(render: Render, renders: list[tuple[Messages, bool]]) -> None:
    """Let a renderer that batches (edgeft.template.BoundedRender) render these in one go."""
    prefetch = getattr(render, "prefetch", None)
    if prefetch is not None:
        prefetch(renders)


# Two instants a template's `strftime_now` is given while its recipe is derived: a template that writes the
# date or time (Llama 3.2's "Today Date") renders them differently, and a recipe would freeze the build's day.
CLOCKS = ("2001-02-03T04:05:06", "2012-11-10T09:08:07")


def from_template(
    template: str, variables: dict[str, Any], conversations: Sequence[Messages], where: str
) -> tuple[Recipe | None, str | None]:
    """The proven recipe of a chat template, rendered within bounds (edgeft.template), or (None, why); None
    for a template that writes the date or time. A template past the bounds is an EdgeftError naming `where`."""
    from edgeft.template import BoundedRender

    render = BoundedRender(template, variables, where, now=CLOCKS[0])
    other = BoundedRender(template, variables, where, now=CLOCKS[1])
    probe = [_m("system", S1), _m("user", U1)]
    for r in (render, other):
        r.prefetch([(probe, True), (probe[1:], True)])
    for conv in (probe, probe[1:]):
        try:
            same = render(conv, True) == other(conv, True)
        except EdgeftError:
            raise  # past the renderer's bounds: the caller's one line
        except Exception:  # noqa: BLE001 - refused alike at both instants; derive finds out why
            continue
        if not same:
            return None, "the template writes the date or time (strftime_now): a fixed recipe would freeze it"
    return derive(render, conversations)


def derive(render: Render, conversations: Sequence[Messages] = ()) -> tuple[Recipe | None, str | None]:
    """The proven recipe of a template, or (None, why) in one line."""
    u1, a1, u2 = _m("user", U1), _m("assistant", A1), _m("user", U2)
    sentinels = [[u1, a1, u2], [u1, a1], [u1], [_m("system", S1), u1]]
    _prefetch(render, [(c, False) for c in sentinels] + [([u1], True)])
    try:
        start, user, assistant, gen = _turns(render)
    except _NoRecipe as e:
        return None, str(e)
    except EdgeftError:
        raise  # past the renderer's bounds: the caller's one line
    except Exception as e:  # noqa: BLE001 - the template refused a plain user/assistant conversation
        return None, f"the template cannot render a plain conversation ({str(e).splitlines()[0][:80]})"
    try:
        systems = _system_candidates(render, start, user)
    except _NoRecipe as e:
        return None, f"a system message: {e}"
    first = None
    for trim in (False, True):
        for mode, turn in systems:
            recipe = Recipe(start, user, assistant, mode, turn, gen, trim)
            why = prove(render, recipe, conversations)
            if why is None:
                return recipe, None
            first = first or why
    return None, first
