"""Checks on files from strangers (checkpoints, ONNX folders, GGUF) before any parser or loader sees them.

A file may point elsewhere (ONNX external data, shard indexes); nothing it names may lead outside the folder
it came in (ref: CVE-2022-25882, CVE-2024-27318 — ONNX external-data path traversal).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import gguf

from edgeft.errors import EdgeftError


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
    from edgeft.constants import TOKENIZER_FILES

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
    from edgeft.constants import ONNX_GENAI_CONFIG, ONNX_MODEL_FILE

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


# --- GGUF header: checked by edgeft itself before llama.cpp (or gguf-py) parses a stranger's file -------------
# File layout and limits. ref: llama.cpp ggml/include/gguf.h (layout, GGUF_MAGIC, GGUF_VERSION,
# GGUF_DEFAULT_ALIGNMENT, general.alignment) and ggml/src/gguf.cpp gguf_init_from_reader (every check below
# mirrors one there); value types and tensor type sizes from gguf-py's constants (GGUFValueType,
# GGML_QUANT_SIZES).
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # v1 is refused by llama.cpp ("GGUFv1 is no longer supported"); 3 is GGUF_VERSION
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_KEY_ALIGNMENT = "general.alignment"
GGUF_MAX_STRING_LENGTH = 1 << 30  # ref: gguf.cpp GGUF_MAX_STRING_LENGTH
GGUF_MAX_ARRAY_ELEMENTS = 1 << 30  # ref: gguf.cpp GGUF_MAX_ARRAY_ELEMENTS
GGML_MAX_DIMS = 4  # ref: ggml/include/ggml.h
GGML_MAX_NAME = 64  # ref: ggml.h; gguf.cpp refuses tensor names of GGML_MAX_NAME bytes or more
GGUF_MAX_KEY_BYTES = 1 << 16  # edgeft's own bound: keys are dotted names (no writer makes them this long)
_HEADER_BYTES = 24  # magic u32, version u32, n_tensors i64, n_kv i64
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a non-empty key, value type, the smallest value (u8/i8/bool)
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length (an empty name), n_dims = 0, ggml type, data offset
_INT64_MAX = (1 << 63) - 1
_WINDOW = 1 << 16  # bytes read at a time: the header is read in small pieces, the tensor data never
_U32, _I32, _U64, _I64 = (struct.Struct(f) for f in ("<I", "<i", "<Q", "<q"))
# Fixed-size GGUF value types → bytes per value (STRING and ARRAY are variable). ref: gguf.cpp gguf_type_size
_VALUE_BYTES: dict[int, int] = {
    int(t): n
    for t, n in (
        (gguf.GGUFValueType.UINT8, 1),
        (gguf.GGUFValueType.INT8, 1),
        (gguf.GGUFValueType.UINT16, 2),
        (gguf.GGUFValueType.INT16, 2),
        (gguf.GGUFValueType.UINT32, 4),
        (gguf.GGUFValueType.INT32, 4),
        (gguf.GGUFValueType.FLOAT32, 4),
        (gguf.GGUFValueType.BOOL, 1),
        (gguf.GGUFValueType.UINT64, 8),
        (gguf.GGUFValueType.INT64, 8),
        (gguf.GGUFValueType.FLOAT64, 8),
    )
}
_STRING, _ARRAY, _UINT32 = (
    int(gguf.GGUFValueType.STRING),
    int(gguf.GGUFValueType.ARRAY),
    int(gguf.GGUFValueType.UINT32),
)
# ggml tensor type → (elements per block, bytes per block). ref: gguf-py GGML_QUANT_SIZES (ggml.c type_traits)
_GGML_TYPES: dict[int, tuple[int, int]] = {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()}
_GGML_NAMES: dict[int, str] = {int(t): t.name.lower() for t in gguf.GGML_QUANT_SIZES}
# Scalar value types → struct format. ref: gguf-py GGUFValueType, gguf.cpp gguf_type_size
_SCALARS: dict[int, struct.Struct] = {
    int(t): struct.Struct(f)
    for t, f in (
        (gguf.GGUFValueType.UINT8, "<B"),
        (gguf.GGUFValueType.INT8, "<b"),
        (gguf.GGUFValueType.UINT16, "<H"),
        (gguf.GGUFValueType.INT16, "<h"),
        (gguf.GGUFValueType.UINT32, "<I"),
        (gguf.GGUFValueType.INT32, "<i"),
        (gguf.GGUFValueType.FLOAT32, "<f"),
        (gguf.GGUFValueType.BOOL, "<?"),
        (gguf.GGUFValueType.UINT64, "<Q"),
        (gguf.GGUFValueType.INT64, "<q"),
        (gguf.GGUFValueType.FLOAT64, "<d"),
    )
}
SCALAR_STRING_BYTES = 4096  # scalar strings kept in GGUFHeader.values (names, types; not chat templates)
SCALAR_ARRAY_ELEMENTS = 1024  # numeric arrays kept there too (per-layer head counts; not vocabulary scores)
KEPT_VALUES = 1 << 16  # values, array elements and string bytes kept in all: past it a header is refused


Value = int | float | bool | str | list[int | float | bool]  # a metadata value GGUFHeader keeps


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor info of a checked GGUF header: `shape` in ggml order (ne[0], the row length, first, as
    gguf-py's ReaderTensor.shape), `type` the ggml type name in lower case (e.g. "q4_k")."""

    name: str
    shape: tuple[int, ...]
    type: str
    n_bytes: int
    offset: int = 0  # from the start of the tensor data (GGUFHeader.data_offset)


@dataclass(frozen=True)
class GGUFHeader:
    """What check_gguf read: counts, alignment, where the tensor data starts and how much of it there is; the
    tensor infos and the metadata values but long strings and arrays (SCALAR_STRING_BYTES, SCALAR_ARRAY_ELEMENTS).

    Reading these here takes ~0.1 s on a 49k-token vocabulary, where gguf-py's GGUFReader builds a numpy
    view of every vocabulary string first (~6 s): every header-only question edgeft asks goes through here.
    """

    version: int
    n_tensors: int
    n_kv: int
    alignment: int
    data_offset: int
    data_bytes: int
    keys: frozenset[str] = frozenset()
    tensors: tuple[GGUFTensor, ...] = ()
    values: Mapping[str, Value] = field(default_factory=dict)
    long: Mapping[str, str] = field(default_factory=dict)  # key -> what it holds, for values not kept
    path: Path = Path()

    def value(self, key: str) -> Value | None:
        """The key's value, None when the file has no such key; a value too long to keep (a vocabulary, a
        chat template) is refused when asked for, never read as missing."""
        if key in self.long:
            raise EdgeftError(
                f"{self.path}: metadata {key!r} is {self.long[key]}, not the short value it should be"
            )
        return self.values.get(key)


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _show(raw: bytes) -> str:
    """A key or tensor name for a message: printable, at most 80 characters."""
    text = raw.decode("utf-8", errors="replace")
    return repr(text if len(text) <= 80 else text[:77] + "...")


class _Bounded:
    """Little-endian reads over a file that never go past its size: a read is checked against the bytes left
    before anything is read, and bytes come in small windows (no buffer grows with a count the file claims)."""

    def __init__(self, f: BinaryIO, size: int, path: Path) -> None:
        self.f, self.size, self.path = f, size, path
        self.pos = 0
        self.buf = b""
        self.base = 0

    def fail(self, problem: str) -> NoReturn:
        raise EdgeftError(f"{self.path}: not a usable GGUF file: {problem}; re-export or re-download it")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(
                f"truncated: {what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size}"
            )

    def window(self, n: int) -> int:
        """Make buf hold bytes [pos, pos + n) (n already checked by need) and return pos's index in it."""
        off = self.pos - self.base
        if off < 0 or off + n > len(self.buf):
            self.f.seek(self.pos)
            self.buf = self.f.read(max(n, _WINDOW))
            self.base, off = self.pos, 0
            if len(self.buf) < n:
                self.fail(f"the file changed while it was read (short read at byte {self.pos})")
        return off

    def num(self, st: struct.Struct, what: str) -> int:
        self.need(st.size, what)
        off = self.window(st.size)
        (value,) = st.unpack_from(self.buf, off)
        self.pos += st.size
        return int(value)

    def scalar(self, vtype: int, what: str) -> int | float | bool:
        return self.scalars(vtype, 1, what)[0]

    def scalars(self, vtype: int, count: int, what: str) -> list[int | float | bool]:
        st = struct.Struct(f"<{count}{_SCALARS[vtype].format[1:]}")
        self.need(st.size, what)
        off = self.window(st.size)
        values = list(st.unpack_from(self.buf, off))
        self.pos += st.size
        return values

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str, limit: int) -> bytes:
        """A length-prefixed string of at most `limit` bytes, returned."""
        n = self.num(_U64, f"{what} length")
        if n > limit:
            self.fail(f"{what} is {n} bytes long (at most {limit} allowed)")
        self.need(n, what)
        off = self.window(n)
        self.pos += n
        return self.buf[off : off + n]

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` length-prefixed strings (a string array: vocabularies hold 10^5 of them)."""
        self.need(8 * count, what)  # every element has at least its 8-byte length
        unpack, size, max_len = _U64.unpack_from, self.size, GGUF_MAX_STRING_LENGTH
        for i in range(count):
            off = self.pos - self.base
            if off < 0 or off + 8 > len(self.buf):
                self.need(8, f"{what} element {i} length")
                off = self.window(8)
            (n,) = unpack(self.buf, off)
            if n > max_len:
                self.fail(f"{what} element {i} is {n} bytes long (llama.cpp allows at most {max_len})")
            if n > size - self.pos - 8:
                self.need(8 + n, f"{what} element {i}")
            self.pos += 8 + n


def check_gguf(path: Path) -> GGUFHeader:
    """Refuse a GGUF file whose header is damaged or hostile, before llama.cpp or gguf-py parses it.

    Reads only the header (metadata and tensor infos), in small windows, and checks every count and length
    against the bytes the file really has, so a truncated file or an absurd count is one EdgeftError naming
    the file — never a hang, a huge allocation or a crash in a native parser.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte or an unencodable character in the path
        shown = str(path) if str(path).isprintable() else repr(str(path))
        raise EdgeftError(
            f"{shown}: cannot read the GGUF file ({getattr(e, 'strerror', None) or e})"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise EdgeftError(f"{path}: not a regular file; a GGUF model is one file")
    try:
        with open(path, "rb") as f:
            return _read_header(_Bounded(f, st.st_size, path))
    except OSError as e:
        raise EdgeftError(f"{path}: cannot read the GGUF file ({e.strerror or e})") from None


def _read_header(r: _Bounded) -> GGUFHeader:
    r.need(4, "the magic")
    off = r.window(4)
    magic = r.buf[off : off + 4]
    if magic != GGUF_MAGIC:
        r.fail(f"starts with {magic!r}, not {GGUF_MAGIC!r}")
    r.pos = 4
    version = r.num(_U32, "the version")
    if version & 0xFFFF == 0 and version:
        r.fail(
            f"version {version:#x} looks byte-swapped (a big-endian GGUF); llama.cpp here reads little-endian"
        )
    if version not in GGUF_VERSIONS:
        r.fail(f"GGUF version {version}; llama.cpp reads versions {' and '.join(map(str, GGUF_VERSIONS))}")
    n_tensors = r.num(_I64, "the tensor count")
    n_kv = r.num(_I64, "the metadata count")
    room = r.size - _HEADER_BYTES
    if not 0 <= n_tensors <= room // _MIN_TENSOR_BYTES:
        r.fail(f"the header claims {n_tensors} tensors; a {r.size}-byte file cannot describe that many")
    if not 0 <= n_kv <= room // _MIN_KV_BYTES:
        r.fail(f"the header claims {n_kv} metadata entries; a {r.size}-byte file cannot hold that many")
    if n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KV_BYTES > room:
        r.fail(
            f"the header claims {n_tensors} tensors and {n_kv} metadata entries, "
            f"more than a {r.size}-byte file can hold"
        )
    alignment = GGUF_DEFAULT_ALIGNMENT
    keys: set[str] = set()
    values: dict[str, Value] = {}
    long: dict[str, str] = {}
    kept = 0  # values, array elements and string bytes kept in values, up to KEPT_VALUES

    def keep(units: int) -> None:
        """Count a value about to be kept (a scalar, or an array's elements, or a string's bytes; at least 1)."""
        nonlocal kept
        kept += max(1, units)
        if kept > KEPT_VALUES:
            r.fail(f"more metadata than a model header holds (over {KEPT_VALUES} values, elements and bytes)")

    tensors: list[GGUFTensor] = []
    for i in range(n_kv):
        raw = r.string(f"metadata key {i}", GGUF_MAX_KEY_BYTES)
        if not raw:
            r.fail(f"metadata key {i} is empty")
        key = _text(r, raw, f"metadata key {i}")
        if key in keys:
            r.fail(f"metadata key {_show(raw)} appears twice")
        keys.add(key)
        what = f"metadata {_show(raw)}"
        vtype = r.num(_I32, f"{what} type")
        if vtype == _ARRAY:
            etype = r.num(_I32, f"{what} array type")
            count = r.num(_U64, f"{what} array length")
            if count > GGUF_MAX_ARRAY_ELEMENTS:
                r.fail(
                    f"{what} is an array of {count} elements (llama.cpp allows at most {GGUF_MAX_ARRAY_ELEMENTS})"
                )
            if etype == _STRING:
                r.skip_strings(count, what)
                long[key] = f"an array of {count} strings"
            elif etype in _VALUE_BYTES and count <= SCALAR_ARRAY_ELEMENTS:
                keep(count)
                values[key] = r.scalars(etype, count, what)  # per-layer numbers, one read
            elif etype in _VALUE_BYTES:
                r.skip(count * _VALUE_BYTES[etype], f"{what} ({count} elements)")
                long[key] = f"an array of {count} numbers"
            else:
                r.fail(f"{what} is an array of unknown GGUF type {etype}")
        elif vtype == _STRING:
            n = r.num(_U64, f"{what} length")
            r.pos -= 8
            if n <= SCALAR_STRING_BYTES:
                keep(n)
                values[key] = _text(r, r.string(what, SCALAR_STRING_BYTES), what, nul=True)
            else:
                r.skip_strings(1, what)
                long[key] = f"a {n}-byte string"
        elif vtype in _VALUE_BYTES:
            if key == GGUF_KEY_ALIGNMENT and vtype == _UINT32:
                alignment = r.num(_U32, what)
                if alignment == 0 or alignment & (alignment - 1):
                    r.fail(f"general.alignment is {alignment}, not a power of 2")
            else:
                keep(1)
                values[key] = r.scalar(vtype, what)
        else:
            r.fail(f"{what} has unknown GGUF type {vtype}")
        if key == GGUF_KEY_ALIGNMENT and vtype != _UINT32:
            r.fail("general.alignment is not a uint32 (llama.cpp requires one)")
    names: set[str] = set()
    expected = 0  # tensors are stored in order, each padded to the alignment (gguf.cpp checks the same)
    end = 0
    for i in range(n_tensors):
        raw = r.string(f"tensor {i} name", GGML_MAX_NAME - 1)
        what = f"tensor {_show(raw)}"
        name = _text(r, raw, what)
        if name in names:
            r.fail(f"{what} appears twice")
        names.add(name)
        n_dims = r.num(_U32, f"{what} dimension count")
        if n_dims > GGML_MAX_DIMS:
            r.fail(f"{what} has {n_dims} dimensions (ggml allows at most {GGML_MAX_DIMS})")
        elements = 1
        dims = []
        for j in range(n_dims):
            d = r.num(_I64, f"{what} dimension {j}")
            if d <= 0:
                r.fail(f"{what} dimension {j} is {d}; dimensions must be positive")
            elements *= d
            if elements > _INT64_MAX:
                r.fail(f"{what} has more elements than an int64 counts")
            dims.append(d)
        ttype = r.num(_I32, f"{what} type")
        if ttype not in _GGML_TYPES:
            r.fail(f"{what} has unknown ggml type {ttype}")
        block, block_bytes = _GGML_TYPES[ttype]
        if (dims[0] if dims else 1) % block:
            r.fail(
                f"{what} rows of {dims[0] if dims else 1} elements are not a multiple of its type's block of {block}"
            )
        nbytes = elements // block * block_bytes
        offset = r.num(_U64, f"{what} data offset")
        if offset % alignment:
            r.fail(f"{what} data offset {offset} is not a multiple of the alignment {alignment}")
        if offset != expected:
            r.fail(f"{what} data offset is {offset}, expected {expected} (tensors are stored in order)")
        if nbytes > r.size:
            r.fail(f"{what} claims {nbytes} bytes of data, more than the whole file ({r.size} bytes)")
        end = offset + nbytes
        expected = _pad(end, alignment)
        tensors.append(GGUFTensor(name, tuple(dims), _GGML_NAMES[ttype], nbytes, offset))
    data_offset = _pad(r.pos, alignment) if n_tensors else r.pos
    if data_offset + end > r.size:
        r.fail(
            f"truncated: the tensor data ends at byte {data_offset + end} but the file ends at byte {r.size}"
        )
    return GGUFHeader(
        version,
        n_tensors,
        n_kv,
        alignment,
        data_offset,
        end,
        frozenset(keys),
        tuple(tensors),
        values,
        long,
        r.path,
    )


def _text(r: _Bounded, raw: bytes, what: str, *, nul: bool = False) -> str:
    """A GGUF string as text: UTF-8, as the GGUF spec says its strings are (gguf-py's reader fails on others);
    names and keys without NUL bytes too, since llama.cpp compares them as C strings and would find another
    key or tensor than the one read here (ref: ggml/src/gguf.cpp gguf_find_key, strcmp)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        r.fail(f"{what} is not UTF-8 text")
    if not nul and "\0" in text:
        r.fail(f"{what} holds a NUL byte")
    return text


def gguf_keys(path: Path) -> frozenset[str]:
    """The metadata keys of a GGUF whose header passes check_gguf."""
    return check_gguf(path).keys
