"""Checks on an onnxruntime-genai folder from a stranger before onnxruntime or onnx sees it: every file its
genai_config.json names and every external-data location stays inside the folder, and no native library is
loaded unless the user asked (ref: CVE-2022-25882, CVE-2024-27318 — ONNX external-data path traversal).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.formats.onnx.constants import ONNX_GENAI_CONFIG, ONNX_MODEL_FILE
from edgeft.guard import inside, read_json


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


# onnxruntime-genai loads native code a genai_config.json names: a custom-ops library (its constructor runs) or
# an execution provider's backend library. ref: onnxruntime-genai src/config.cpp (session_options
# "custom_ops_library", provider_options); QNN's "backend_path".
NATIVE_LIB_KEYS = ("custom_ops_library", "backend_path", "library_path", "custom_op_library")
NATIVE_LIB_SUFFIXES = (".so", ".dll", ".dylib")


def native_library_references(config: Any, where: str = "") -> list[str]:
    """Places in a genai_config.json that name a native library, as dotted paths."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{where}.{key}" if where else str(key)
            lib_key = str(key).lower() in NATIVE_LIB_KEYS or "library" in str(key).lower()
            if lib_key and value not in (None, "", [], {}):
                found.append(path)
            else:
                found += native_library_references(value, path)
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found += native_library_references(item, f"{where}[{i}]")
    elif isinstance(config, str):
        name = config.lower()
        if name.endswith(NATIVE_LIB_SUFFIXES) or ".so." in name:
            found.append(where)
    return found


def check_onnx_folder(folder: Path, *, allow_native_libs: bool = False) -> None:
    """An onnxruntime-genai folder may only point inside itself, and names no native library unless allowed
    (`--allow-native-libs`): every file its genai_config.json names, and every external-data location."""

    folder = Path(folder)
    cfg_path = inside(folder, ONNX_GENAI_CONFIG, what="file")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise EdgeftError(f'{cfg_path}: not an onnxruntime-genai config (no "model" object)')
    libs = native_library_references(cfg)
    if libs and not allow_native_libs:
        raise EdgeftError(
            f"{cfg_path}: names native code to load ({', '.join(libs)}); refusing it "
            "(pass --allow-native-libs if you trust this folder)"
        )
    decoder = cfg["model"].get("decoder") if isinstance(cfg["model"].get("decoder"), dict) else {}
    named = _named_files(cfg)
    if "model.decoder.filename" not in named:  # genai's default decoder file
        named["model.decoder.filename"] = decoder.get("filename", ONNX_MODEL_FILE)
    for where, filename in named.items():
        if not isinstance(filename, str) or not filename:
            raise EdgeftError(f"{cfg_path}: {where} is {filename!r}, not a file name")
        model_file = inside(folder, filename, what=where)
        if model_file.is_file() and model_file.suffix == ".onnx":
            check_external_data(model_file, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (folder / name).exists() or (folder / name).is_symlink():
            inside(folder, name, what="file")


def _named_files(config: Any, where: str = "") -> dict[str, Any]:
    """Every value a genai_config.json gives under a "filename" key (decoder, embedding, vision, speech,
    pipeline stages…), by dotted path: onnxruntime-genai opens each relative to the folder."""
    found: dict[str, Any] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{where}.{key}" if where else str(key)
            if str(key).lower() == "filename":
                found[path] = value
            else:
                found.update(_named_files(value, path))
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found.update(_named_files(item, f"{where}[{i}]"))
    return found
