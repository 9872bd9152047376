"""Checks on files from strangers (checkpoints, ONNX folders, GGUF) before any parser or loader sees them.

A file may point elsewhere (ONNX external data, shard indexes); nothing it names may lead outside the folder
it came in (ref: CVE-2022-25882, CVE-2024-27318 — ONNX external-data path traversal).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

from edgeft.constants import TOKENIZER_FILES
from edgeft.errors import EdgeftError

# --- folders from strangers: nothing they name may lead outside them ------------------------------------------


def read_json(path: Path) -> Any:
    """A JSON file's content; EdgeftError naming the file when it cannot be read or parsed."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would never end the read
            raise EdgeftError(f"{path}: not a regular file; expected a JSON file")
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise EdgeftError(f"{path}: cannot read JSON ({e})") from None


def safetensors_header(f: Path) -> tuple[int, dict[str, Any]]:
    """(header length, JSON header) of a safetensors file, the header at most 100 MB and the file's size;
    EdgeftError naming the file when it is not that.

    ref: safetensors docs "Format": 8-byte little-endian header length, then a JSON header of
    {name: {dtype, shape, data_offsets}} and an optional "__metadata__", then the data."""
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(Path(f).stat().st_size, 100 << 20):
                raise ValueError(f"header length {n}")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, RecursionError, struct.error) as exc:
        raise EdgeftError(f"{f}: not a readable safetensors file ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise EdgeftError(f"{f}: not a readable safetensors file (its header is not a JSON object)")
    return n, header


def inside(root: Path, name: str | Path, *, what: str) -> Path:
    """`root / name` resolved (symlinks followed), refused unless it stays inside `root`.

    A model folder whose chat_template.jinja links to ~/.ssh/id_rsa would otherwise have the secret embedded
    in the GGUF; a shard index entry "../x.safetensors" would read weights from anywhere.
    """
    root = Path(root).resolve()
    if Path(name).is_absolute():
        raise EdgeftError(
            f"{root}: {what} {str(name)!r} is an absolute path; files must stay inside the folder"
        )
    target = (root / name).resolve()
    if not target.is_relative_to(root):
        raise EdgeftError(f"{root}: {what} {str(name)!r} leads outside the folder (to {target}); refusing it")
    return target


def check_model_folder(model_dir: Path) -> None:
    """Every file a Hugging Face model folder is read through stays inside it: config, tokenizer and chat
    template files, safetensors weights and the shards an index names."""

    model_dir = Path(model_dir)
    for f in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (model_dir / f).exists() or (model_dir / f).is_symlink():
            inside(model_dir, f, what="file")
    for f in model_dir.glob("*.safetensors"):
        require_regular(inside(model_dir, f.name, what="weights file"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        inside(model_dir, index.name, what="file")
        content = read_json(index)
        weight_map = content.get("weight_map", {}) if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise EdgeftError(f"{index}: weight_map is not an object of tensor → shard file")
        for shard in set(weight_map.values()):
            if not isinstance(shard, str):
                raise EdgeftError(f"{index}: shard name {shard!r} is not a string")
            require_regular(inside(model_dir, shard, what="shard"))


def require_regular(path: Path) -> Path:
    """A weights file that exists must be a regular file: a FIFO or device would hang or never end a read."""
    if path.exists() and not path.is_file():
        raise EdgeftError(f"{path}: not a regular file; weights are files")
    return path
