"""The GGUF header, read by edgeft itself within fixed bounds before llama.cpp or gguf-py parses a stranger's
file; and the marker key that says edgeft wrote a GGUF (only such a file is ever overwritten)."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn

import gguf

from edgeft.errors import EdgeftError

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
    # key -> its GGUF value type (gguf.GGUFValueType: 6 = float32, 8 = string, 9 = array, ...): llama.cpp's
    # getters assert the type they expect, so a check that a value is usable needs it, not just the value
    types: Mapping[str, int] = field(default_factory=dict)

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
    types: dict[str, int] = {}
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
        types[key] = vtype
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
        types,
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


# The key edgeft writes into every GGUF it makes (early in the file), so that only such a file is overwritten.
GGUF_MARKER_KEY = "edgeft.version"


def is_edgeft_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF whose metadata holds edgeft's marker key (parsed, not searched for)."""
    try:
        return GGUF_MARKER_KEY in gguf_keys(path)
    except EdgeftError:
        return False


def ensure_replaceable_file(out: Path) -> None:
    """Refuse to overwrite `out` unless it is absent or a GGUF edgeft wrote (its marker key)."""
    out = Path(out)
    if not out.exists():
        return
    if out.is_file() and not out.is_symlink() and is_edgeft_gguf(out):
        return
    raise EdgeftError(f"{out}: exists and was not written by edgeft; choose another output or move it away")
