"""The versions of the tools that shaped a build's artifacts (the manifest, model.json and the reference key
record them)."""

from __future__ import annotations

from importlib import metadata

from edgeft import __version__, formats


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shaped the artifacts."""
    out = {"edgeft": __version__}
    libraries = [d for f in formats.EXPORT_FORMATS.values() for d in f.distributions]
    for dist in ("torch", "transformers", "peft", *libraries):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
