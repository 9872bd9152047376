"""The child process edgeft.template renders a stranger's chat template in: standard library and jinja2 only.

Per stdin line a request {"template", "variables", "renders": [[messages, add_generation_prompt], ...],
"max_chars", "now"}; per stdout line its answer: a JSON list, per render {"text": ...} or {"error": one line}. `now` (an ISO time, or null for the clock) is
what `strftime_now` formats, so a template that writes the date can be caught writing it. The parent sets the memory and CPU limits and the
wall-clock timeout; this side caps each rendering's length while it is produced. The environment is the one
transformers renders with (ref: transformers utils/chat_template_utils.py _cached_compile_jinja_template):
sandboxed, trim_blocks and lstrip_blocks, loop controls, a `{% generation %}` block, `tojson` keeping
non-ASCII, `raise_exception`, `strftime_now`, `dict`/`namespace` that refuse underscore names, and `tools` and
`documents` passed as none. jinja2 before 3.1.6 has known sandbox escapes (CVE-2024-56201, CVE-2024-56326,
CVE-2025-27516; transformers refuses it too): it is refused.
"""

import datetime
import json
import sys

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _TooLong(Exception):
    pass


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: its body, as transformers renders it when not tracking."""

    tags = {"generation"}

    def parse(self, parser):  # noqa: ANN001, ANN201 - jinja2's extension interface
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):  # noqa: ANN001, ANN202
        return caller()


class _Namespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):  # noqa: N805 - Namespace's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):  # noqa: ANN001, ANN204
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):  # noqa: ANN001, ANN205
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' ({name!r})")


class _Dict:
    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return dict.fromkeys(*args, **kwargs)


def _raise(message):  # noqa: ANN001, ANN202
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # noqa: ANN001, ANN202
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _printable(text):  # noqa: ANN001, ANN202
    """The text with control characters escaped: a template's message must not drive the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _line(e):  # noqa: ANN001, ANN202
    text = str(e).strip().splitlines()
    if type(e) is jinja2.exceptions.TemplateError and text:  # the template's raise_exception(message)
        return _printable(text[0][:200])
    return _printable(f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__)


def _version(text):  # noqa: ANN001, ANN202
    return tuple(int(p) if p.isdigit() else 0 for p in text.split(".")[:3])


def _compiled(req, cache):  # noqa: ANN001, ANN202
    """(template, or None and its syntax error) for a request; a few kept compiled between requests."""
    key = (req["template"], req.get("now"))
    if key not in cache:
        now = datetime.datetime.fromisoformat(req["now"]) if req.get("now") else None
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(
            raise_exception=_raise,
            strftime_now=lambda fmt: (now or datetime.datetime.now()).strftime(fmt),
            dict=_Dict(),
            namespace=_Namespace,
        )
        try:
            cache[key] = (env.from_string(req["template"]), None)
        except Exception as e:  # noqa: BLE001 - a syntax error is this template's answer to every render
            cache[key] = (None, _line(e))
        while len(cache) > 16:
            cache.pop(next(iter(cache)))
    return cache[key]


def answer(req, cache):  # noqa: ANN001, ANN201
    cap = int(req["max_chars"])
    template, broken = _compiled(req, cache)
    out = []
    for messages, gen in req["renders"]:
        if template is None:
            out.append({"error": broken})
            continue
        parts, n = [], 0
        try:
            chunks = template.generate(
                messages=messages, tools=None, documents=None, add_generation_prompt=gen, **req["variables"]
            )
            for chunk in chunks:
                n += len(chunk)
                if n > cap:
                    raise _TooLong
                parts.append(chunk)
            out.append({"text": "".join(parts)})
        except _TooLong:
            out.append({"error": f"grew past {cap} characters while rendering", "limit": True})
        except MemoryError:
            out.append({"error": "needed more memory than allowed", "limit": True})
        except RecursionError:
            out.append({"error": "recursed too deeply", "limit": True})
        except Exception as e:  # noqa: BLE001 - the template's own refusal (raise_exception) or its bug
            out.append({"error": _line(e)})
    return out


def main():  # noqa: ANN201
    """One request per stdin line, one answer per stdout line, until stdin ends (edgeft.template keeps one
    child for a process's renders and replaces it after a bound is hit)."""
    if _version(jinja2.__version__) < (3, 1, 6):
        sys.exit(f"jinja2 {jinja2.__version__} has known sandbox escapes; pip install 'jinja2>=3.1.6'")
    cache = {}
    for line in sys.stdin:
        sys.stdout.write(json.dumps(answer(json.loads(line), cache), ensure_ascii=False) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
