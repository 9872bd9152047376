"""Checks on an artifact folder from a stranger before a runtime sees any of its files, shared by every loader
of a bundle: `edgeft check`, `edgeft bench` and verify on the host (edgeft/formats/onnx/folder.py), the
device script (bench_on_device.py, beside this file in every bundle) and the Python examples (a copy in
examples/python/). Standard library only, Python 3.8+ (checked by vermin), because it runs on devices.

An onnxruntime-genai folder may only point inside itself, and names no native library unless the user asked
(`--allow-native-libs`): onnxruntime-genai loads a `custom_ops_library` (its constructor runs) or a provider's
backend library that genai_config.json names, opens every `filename` it gives relative to the folder, and
onnxruntime reads each tensor's external data from the `location` the model names (ref: CVE-2022-25882,
CVE-2024-27318: ONNX external-data path traversal). The model file is read as protobuf here, within bounds,
without the onnx package (a device has only the runtime).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator

GENAI_CONFIG = "genai_config.json"
DEFAULT_MODEL_FILE = "model.onnx"
MAX_CONFIG_BYTES = 1 << 20  # a genai_config.json is a few KB
MAX_GRAPH_DEPTH = 32  # subgraphs within subgraphs (If/Loop bodies): a real model nests a few
# onnxruntime-genai loads native code a genai_config.json names: a custom-ops library or an execution
# provider's backend library. ref: onnxruntime-genai src/config.cpp (session_options "custom_ops_library",
# provider_options); QNN's "backend_path".
NATIVE_LIB_KEYS = ("custom_ops_library", "backend_path", "library_path", "custom_op_library")
NATIVE_LIB_SUFFIXES = (".so", ".dll", ".dylib")
# session_options keys onnxruntime-genai understands without touching a file or loading code (ref:
# onnxruntime-genai src/config.cpp SessionOptions_Element): any other key is passed to onnxruntime as a session
# config entry unchecked, and `enable_profiling` takes a file path prefix, so they need --allow-native-libs.
SAFE_SESSION_OPTIONS = frozenset(
    {
        "log_id",
        "log_severity_level",
        "intra_op_num_threads",
        "inter_op_num_threads",
        "enable_cpu_mem_arena",
        "enable_mem_pattern",
        "disable_cpu_ep_fallback",
        "disable_quant_qdq",
        "enable_quant_qdq_cleanup",
        "graph_optimization_level",
        "use_env_allocators",
        "provider_options",
    }
)
# Keys whose value onnxruntime-genai opens as a file relative to the folder (ref: src/config.cpp: filename,
# config_filename, adapter_filename, shared_initializers' data_file).
PATH_KEY_SUFFIXES = ("filename", "_file", "_path")


class FolderError(ValueError):
    """The folder is refused; the message is one line naming the file and what to do."""


# --- ONNX protobuf, the few fields that name external data (ref: onnx/onnx.proto; field numbers checked
# against the onnx package's descriptors in tests/test_safety.py) -------------------------------------------
MODEL_GRAPH, MODEL_FUNCTIONS, MODEL_TRAINING_INFO = 7, 25, 20  # ModelProto.graph, .functions, .training_info
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15  # GraphProto
FUNCTION_NODE, FUNCTION_ATTRIBUTE_PROTO = 7, 11  # FunctionProto.node, .attribute_proto (default attributes)
NODE_ATTRIBUTE = 5  # NodeProto.attribute
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS = 5, 6, 10, 11, 22, 23
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14  # TensorProto
SPARSE_VALUES, SPARSE_INDICES = 1, 2  # SparseTensorProto
ENTRY_KEY, ENTRY_VALUE = 1, 2  # StringStringEntryProto


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise FolderError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf: memoryview) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message: a memoryview for length-delimited fields, else an int."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise FolderError("a length past the end of the file")
            value, i = buf[i : i + n], i + n
        else:
            raise FolderError(f"wire type {wire}")
        if i > len(buf):
            raise FolderError("a field past the end of the file")
        yield num, value


def _tensor(buf: memoryview) -> tuple[str, str | None, bool]:
    """A TensorProto's name, its external-data location (None when it has none) and whether it says EXTERNAL."""
    name, location, external = "", None, False
    for num, v in _fields(buf):
        if num == TENSOR_NAME and isinstance(v, memoryview):
            name = bytes(v).decode("utf-8", "replace")
        elif num == TENSOR_DATA_LOCATION and v == 1:
            external = True
        elif num == TENSOR_EXTERNAL_DATA and isinstance(v, memoryview):
            # the location as onnxruntime opens it: undecodable bytes kept (never replaced by U+FFFD)
            entry = {k: os.fsdecode(bytes(x)) for k, x in _fields(v) if isinstance(x, memoryview)}
            if entry.get(ENTRY_KEY) == "location":
                location = entry.get(ENTRY_VALUE, "")
    return name, location, external


def _graph_tensors(buf: memoryview, depth: int, nodes_field: int = GRAPH_NODE) -> Iterator[memoryview]:
    """Every TensorProto of a graph (or a function: `nodes_field`): initializers, sparse ones, attribute
    tensors, and those of subgraphs."""
    if depth > MAX_GRAPH_DEPTH:
        raise FolderError(f"graphs nested deeper than {MAX_GRAPH_DEPTH}")
    for num, v in _fields(buf):
        if not isinstance(v, memoryview):
            continue
        if nodes_field == GRAPH_NODE and num == GRAPH_INITIALIZER:
            yield v
        elif nodes_field == GRAPH_NODE and num == GRAPH_SPARSE_INITIALIZER:
            yield from (
                x for n, x in _fields(v) if n in (SPARSE_VALUES, SPARSE_INDICES) and isinstance(x, memoryview)
            )
        elif num == nodes_field:
            for n, attr in _fields(v):
                if n == NODE_ATTRIBUTE and isinstance(attr, memoryview):
                    yield from _attribute_tensors(attr, depth)
        elif nodes_field == FUNCTION_NODE and num == FUNCTION_ATTRIBUTE_PROTO:
            yield from _attribute_tensors(v, depth)


def _attribute_tensors(buf: memoryview, depth: int) -> Iterator[memoryview]:
    for num, v in _fields(buf):
        if not isinstance(v, memoryview):
            continue
        if num in (ATTR_T, ATTR_TENSORS):
            yield v
        elif num in (ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS):
            yield from (
                x for n, x in _fields(v) if n in (SPARSE_VALUES, SPARSE_INDICES) and isinstance(x, memoryview)
            )
        elif num in (ATTR_G, ATTR_GRAPHS):
            yield from _graph_tensors(v, depth + 1)


def external_data_locations(model_path: Path) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor of an ONNX model that keeps its data in another file."""
    try:
        raw = read_regular(Path(model_path), None)
    except OSError as e:
        raise FolderError(f"{model_path}: cannot be read ({e.strerror or e})") from None
    found = []
    try:
        buf = memoryview(raw)
        tensors: list[memoryview] = []
        for num, v in _fields(buf):
            if num == MODEL_GRAPH and isinstance(v, memoryview):
                tensors += _graph_tensors(v, 0)
            elif num == MODEL_FUNCTIONS and isinstance(v, memoryview):
                tensors += _graph_tensors(v, 0, FUNCTION_NODE)
            elif num == MODEL_TRAINING_INFO:
                raise FolderError("it carries training_info, which an inference model has no use for")
        for t in tensors:
            name, location, external = _tensor(t)
            if location is not None or external:
                found.append((name, location or ""))
    except FolderError as e:
        raise FolderError(f"{model_path}: not a readable ONNX model ({e})") from None
    return found


# --- files and folders ---------------------------------------------------------------------------------------


def read_regular(path: Path, cap: int | None) -> bytes:
    """A regular file's bytes (at most cap + 1), never through a symlink nor from a FIFO or device."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise OSError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        return f.read() if cap is None else f.read(cap + 1)


def inside(folder: Path, rel: str, what: str) -> Path:
    """folder/rel, refused unless it stays inside `folder` once every link is resolved."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise FolderError(f"{folder}: {what} is {str(rel)[:200]!r}, not a file inside the folder")
    if os.path.isabs(rel):
        raise FolderError(
            f"{folder}: {what} {rel[:200]!r} is an absolute path, outside the folder; refusing it"
        )
    path = folder / rel
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError, RuntimeError):
        raise FolderError(f"{folder}: {what} {rel[:200]!r} leads outside the folder; refusing it") from None
    return path


def native_library_references(config: Any, where: str = "", depth: int = 0) -> list[str]:
    """Places in a genai_config.json that name a native library, as dotted paths."""
    found: list[str] = []
    if depth > 64:
        return [where or "(root)"]  # nested past any real config: treated as hiding something
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{where}.{key}" if where else str(key)
            lib_key = str(key).lower() in NATIVE_LIB_KEYS or "library" in str(key).lower()
            if lib_key and value not in (None, "", [], {}):
                found.append(path)
            else:
                found += native_library_references(value, path, depth + 1)
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found += native_library_references(item, f"{where}[{i}]", depth + 1)
    elif isinstance(config, str):
        name = config.lower()
        if name.endswith(NATIVE_LIB_SUFFIXES) or ".so." in name:
            found.append(where)
    return found


def unchecked_session_options(config: Any, where: str = "", depth: int = 0) -> list[str]:
    """Places in a genai_config.json whose session options reach onnxruntime unchecked: keys outside
    SAFE_SESSION_OPTIONS, and provider options that are not empty (a provider can load libraries)."""
    found: list[str] = []
    if depth > 64:
        return [where or "(root)"]
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{where}.{key}" if where else str(key)
            if str(key) == "session_options" and isinstance(value, dict):
                found += [f"{path}.{k}" for k in value if k not in SAFE_SESSION_OPTIONS]
                providers = value.get("provider_options", [])
                if providers not in ([], None) and not (
                    isinstance(providers, list) and all(p in ({}, {"cpu": {}}) for p in providers)
                ):
                    found.append(f"{path}.provider_options")
            else:
                found += unchecked_session_options(value, path, depth + 1)
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found += unchecked_session_options(item, f"{where}[{i}]", depth + 1)
    return found


def named_files(config: Any, where: str = "", depth: int = 0) -> dict[str, Any]:
    """Every value a genai_config.json gives under a key naming a file (filename, config_filename,
    adapter_filename, data_file, ..._path) in the decoder, embedding, vision, speech, pipeline stages…, by
    dotted path: onnxruntime-genai opens each relative to the folder."""
    found: dict[str, Any] = {}
    if depth > 64:
        return found
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{where}.{key}" if where else str(key)
            if str(key).lower().endswith(PATH_KEY_SUFFIXES) and not isinstance(value, (dict, list)):  # noqa: UP038 - Python 3.8 on devices
                found[path] = value
            else:
                found.update(named_files(value, path, depth + 1))
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found.update(named_files(item, f"{where}[{i}]", depth + 1))
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: onnxruntime-genai's streaming parser applies every copy
    of a repeated key, json.loads only the last, so a repeat could hide a setting from these checks."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k[:60]!r} is given twice in one object")
        out[k] = v
    return out


def read_genai_config(folder: Path) -> dict[str, Any]:
    """genai_config.json as a dict with a "model" object; FolderError in one line otherwise."""
    path = inside(folder, GENAI_CONFIG, "the config")
    try:
        raw = read_regular(path, MAX_CONFIG_BYTES)
    except OSError as e:
        raise FolderError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise FolderError(f"{path}: more than {MAX_CONFIG_BYTES} bytes, more than a config holds")
    try:
        cfg = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FolderError(f"{path}: not JSON ({str(e)[:120]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise FolderError(f'{path}: not an onnxruntime-genai config (no "model" object)')
    return cfg


def check_onnx_folder(folder: Path, allow_native_libs: bool = False) -> list[Path]:
    """Refuse an onnxruntime-genai folder that names a native library (unless allowed) or a file outside
    itself (in genai_config.json, or as a tensor's external data); the external-data files it uses."""
    folder = Path(folder)
    cfg = read_genai_config(folder)
    cfg_path = folder / GENAI_CONFIG
    libs = native_library_references(cfg) + unchecked_session_options(cfg)
    if libs and not allow_native_libs:
        raise FolderError(
            f"{cfg_path}: names native code to load, or settings onnxruntime applies unchecked "
            f"({', '.join(libs)[:300]}); refusing it "
            "(pass --allow-native-libs if you trust this folder)"
        )
    decoder = cfg["model"].get("decoder") if isinstance(cfg["model"].get("decoder"), dict) else {}
    named = named_files(cfg)
    if "model.decoder.filename" not in named:  # genai's default decoder file
        named["model.decoder.filename"] = decoder.get("filename", DEFAULT_MODEL_FILE)
    data: list[Path] = []
    root = folder.resolve()
    for where, filename in sorted(named.items()):
        if filename is None and not where.endswith("filename"):
            continue
        if not isinstance(filename, str) or not filename:
            raise FolderError(f"{cfg_path}: {where} is {str(filename)[:100]!r}, not a file name")
        model_file = inside(folder, filename, where)
        # a model file onnxruntime reads, whatever its name: its external data is checked too
        if model_file.is_file() and where.lower().endswith(".filename"):
            for tensor, location in external_data_locations(model_file):
                target = (root / location).resolve() if location else root
                if not location or os.path.isabs(location) or root not in target.parents:
                    raise FolderError(
                        f"{model_file}: tensor {tensor[:100]!r} has external data at {location[:200]!r}, "
                        f"outside {folder}; refusing to load it"
                    )
                data.append(target)
    # a bundle's folders hold regular files only: no link to a secret, FIFO or device
    for entry in os.scandir(folder):
        if entry.is_symlink() or not (
            entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)
        ):
            raise FolderError(
                f"{folder / entry.name}: not a regular file (a link, FIFO or device); refusing it"
            )
    return sorted(set(data))
