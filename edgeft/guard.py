"""Checks on files from strangers (checkpoints, ONNX folders, GGUF) before any parser or loader sees them.

A file may point elsewhere (ONNX external data, shard indexes); nothing it names may lead outside the folder
it came in (ref: CVE-2022-25882, CVE-2024-27318 — ONNX external-data path traversal).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import EdgeftError


def _all_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers, sparse ones, attribute tensors, and those of subgraphs."""
    import onnx

    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def check_external_data(model_path: Path, root: Path | None = None) -> list[Path]:
    """Refuse an ONNX model whose external-data locations leave `root` (default: the model's directory).

    A location like "../x" or "/etc/x" makes the loader read (and a saver write) files outside the model
    directory (CVE-2022-25882, CVE-2024-27318 class). Returns the resolved data files the model uses.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    model_path = Path(model_path)
    root = Path(root if root is not None else model_path.parent).resolve()
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf/onnx raise assorted types for a bad file
        raise EdgeftError(f"{model_path}: not a readable ONNX model ({str(e).splitlines()[0]})") from None
    files: set[Path] = set()
    for tensor in _all_tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise EdgeftError(
                f"{model_path}: tensor '{tensor.name}' has external data at '{location}', outside {root}; "
                "refusing to load it"
            )
        files.add(target)
    return sorted(files)
