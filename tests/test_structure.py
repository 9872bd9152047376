"""The package's shape: no import cycle among edgeft's modules, counting the imports inside functions too
(a cycle hidden in a function-level import is still a cycle a reader has to untangle)."""

from __future__ import annotations

import ast
from pathlib import Path

import edgeft

ROOT = Path(edgeft.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the edgeft modules it imports anywhere in its source (a package's own ancestors left out:
    importing a submodule always runs its package first, which is not a cycle of the code's making)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (
                    ".".join(package[: len(package) - node.level + 1] + [node.module or ""])
                    if node.level
                    else node.module or ""
                )
                names = [base.strip(".")] + [f"{base.strip('.')}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_edgeft_modules() -> None:
    graph = import_graph()
    assert len(graph) > 30 and graph["edgeft.pipeline"]  # the walk sees the package
    assert "edgeft.loading" in graph["edgeft.reference"]  # imported inside reference_key only: it counts
    assert cycles(graph) == []


# --- formats: everything format-specific lives in its package (edgeft/formats/<name>/) ------------------------

# The device scripts run where edgeft is not installed (stdlib and the runtimes only), so they carry their own
# table of each format's runtime module: the device side of the registry. The example apps (installed as
# edgeft/examples/) are apps, each driving one format's runtime.
FORMAT_FREE_EXEMPT = ("edgeft/formats/", "edgeft/device/", "edgeft/examples/")
# Libraries only a format's package may import (each is one format's runtime or file library).
FORMAT_LIBRARIES = ("gguf", "onnx", "onnxruntime", "onnxruntime_genai", "llama_cpp")


def format_mentions(path: Path) -> list[str]:
    """Where a module names a format in code (docstrings and comments aside): a format's name as a string,
    a FORMAT_* / GGUF_* / ONNX_* name, an import of a format package or of a format's own library."""
    import io
    import tokenize

    from edgeft import formats

    names = set(formats.names())
    found = []
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for i, tok in enumerate(tokens):
        where = f"{path.relative_to(ROOT.parent)}:{tok.start[0]}"
        if tok.type == tokenize.NAME and (
            tok.string.startswith("FORMAT_") or tok.string.lower().startswith(tuple(names))
        ):
            found.append(f"{where}: {tok.string}")
        elif tok.type == tokenize.STRING:
            prev = next(
                (t for t in reversed(tokens[:i]) if t.type not in (tokenize.NL, tokenize.INDENT)), None
            )
            docstring = prev is None or prev.type in (tokenize.NEWLINE, tokenize.DEDENT) or prev.string == ":"
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                continue
            if not docstring and value in names:
                found.append(f"{where}: {tok.string}")
    for node in ast.walk(ast.parse(path.read_text())):
        mods = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for mod in mods:
            top = mod.split(".")[0]
            if top in FORMAT_LIBRARIES or any(mod.startswith(f"edgeft.formats.{n}") for n in names):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: import {mod}")
    return found


def test_no_module_outside_the_format_packages_names_a_format() -> None:
    """A third format is one package and one registry line: nothing else in edgeft names gguf or onnx."""
    outside = [
        f
        for f in sorted(ROOT.rglob("*.py"))
        if not str(f.relative_to(ROOT.parent)).startswith(FORMAT_FREE_EXEMPT)
    ]
    assert len(outside) > 20
    found = [m for f in outside for m in format_mentions(f)]
    assert found == []


def test_the_format_grep_sees_a_format_named() -> None:
    """The check above would catch each kind of mention (so its silence means something)."""
    hits = format_mentions(ROOT / "formats" / "gguf" / "__init__.py")
    assert any(": 'gguf'" in h or ': "gguf"' in h for h in hits)
    assert any("GGUF_" in h for h in hits)
    assert any("import edgeft.formats.gguf" in h for h in hits)
