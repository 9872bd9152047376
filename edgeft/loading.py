"""Loading models and tokenizers, in one place for finetune, merge, verify and the exporters.

One tokenization truth: a checkpoint's own tokenizer files — tokenizer.json's pipeline as written — are how
its model was pretrained. transformers 5 rebuilds some tokenizer classes from their own template and drops
what the file says (Qwen2Tokenizer imposes Qwen2's split regex, GPT2Tokenizer drops a `Digits` step,
LlamaTokenizer turns a SentencePiece `Prepend` normalizer into Metaspace "first"; ref: transformers 5
models/{qwen2,gpt2,llama}/tokenization_*.py, measured here with 5.24). `load_tokenizer` detects such a
rebuild, uses the file's pipeline instead and says so in one line; edgeft's own outputs carry the base's
tokenizer files byte for byte (`copy_tokenizer_files`), never a re-save.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

from edgeft.constants import PICKLE_SUFFIXES, TOKENIZER_FILES
from edgeft.errors import EdgeftError, show
from edgeft.files import atomic_dir, cache_root, sha256_file
from edgeft.guard import check_model_folder, inside, read_json, require_regular, safetensors_header
from edgeft.ui import info

# Parts of tokenizer.json that decide which ids a text becomes.
_PIPELINE_PARTS = ("normalizer", "pre_tokenizer", "model")
# BPE/Unigram model fields where None, "" and False mean the same (transformers writes one, tokenizers another).
_FALSY_SAME = ("continuing_subword_prefix", "end_of_word_suffix", "dropout", "ignore_merges", "byte_fallback")


def _looks_like_path(name: str) -> bool:
    """True for things meant as local paths; "org/name" hub ids are not."""
    p = Path(name).expanduser()
    return (
        p.is_absolute()
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or p.exists()
        or name.endswith("/")
    )


def resolve_model(model: str | Path) -> str:
    """A local model directory (checked: config.json, safetensors weights) or a hub id, as a string."""
    name = str(model)
    if isinstance(model, Path) or _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise EdgeftError(
                f"{path}: model directory not found (expected a local HF model dir or a hub id)"
            )
        if not path.is_dir() or not (path / "config.json").is_file():
            raise EdgeftError(f"{path}: not a Hugging Face model directory (no config.json)")
        check_model_folder(path)
        files = [f.name for f in path.iterdir()]
        if not any(f.endswith(".safetensors") for f in files):
            if any(f.endswith(PICKLE_SUFFIXES) for f in files):
                raise EdgeftError(
                    f"{path}: only pickle weights (.bin/.pt), which can run code when loaded; refusing. "
                    "Convert them to safetensors, or pass --allow-pickle to have edgeft convert them with "
                    "torch's weights-only loader"
                )
            raise EdgeftError(f"{path}: no .safetensors weights found")
        return str(path)
    return name


# Where --allow-pickle puts safetensors copies of pickle-only checkpoints, keyed by the pickles' digest.
def _unpickled_cache() -> Path:
    return cache_root() / "safetensors"


def unpickled(model: str) -> str:
    """For `--allow-pickle`: a local checkpoint with only pickle weights becomes a safetensors copy (cached,
    keyed by the pickles' sha256) that every later stage reads; anything else is returned unchanged.

    The pickles are read with torch's weights-only unpickler (`torch.load(weights_only=True)`), which
    reconstructs tensors and plain containers only and refuses any other global — never the full pickle
    machinery. Only transformers' own weight names are read (pytorch_model.bin, or the shards its index
    names inside the folder).
    """
    if not _looks_like_path(model):
        return model
    path = Path(model).expanduser()
    if not path.is_dir() or any(path.glob("*.safetensors")) or not (path / "config.json").is_file():
        return model
    check_model_folder(path)
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise EdgeftError(f"{index}: weight_map is not an object of tensor → shard file")
        shards = [inside(path, s, what="shard") for s in sorted(set(weight_map.values()))]
    else:
        shards = [inside(path, "pytorch_model.bin", what="weights file")]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise EdgeftError(
            f"{path}: pickle weights {missing[0]} not found (expected pytorch_model.bin or an index)"
        )

    key = hashlib.sha256(
        "".join(sha256_file(s) for s in [path / "config.json", *shards]).encode()
    ).hexdigest()
    dest = _unpickled_cache() / key[:24]
    if (dest / "model.safetensors").is_file():
        return str(dest)

    info(f"converting {path}'s pickle weights to safetensors (torch weights-only loader) → {dest}")
    with atomic_dir(dest, what="safetensors copy") as tmp:
        for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if (path / name).is_file():
                shutil.copyfile(inside(path, name, what="file"), tmp / name)
        _pickles_to_safetensors(shards, tmp / "model.safetensors")
    return str(dest)


def _pickles_to_safetensors(shards: list[Path], out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a stranger's file: unpickler, zip and tensor errors alike
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgeftError(f"{shard}: refused by torch's weights-only loader ({first})") from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise EdgeftError(f"{shard}: not a state dict of named tensors")
        tensors.update(state)
    seen: set[int] = set()
    for name, t in tensors.items():  # safetensors refuses shared storage (tied weights): one copy each
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.contiguous().clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
    save_file(tensors, str(out), metadata={"format": "pt"})


def local_dir(model: str | Path) -> Path:
    """The directory holding a model's files: the path itself, or the hub cache snapshot of a hub id."""
    name = str(model)
    if isinstance(model, Path) or _looks_like_path(name):
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=[*TOKENIZER_FILES, "config.json"]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise EdgeftError(f"{name}: cannot fetch the tokenizer files ({str(e).splitlines()[0]})") from None


def weights_dir(model: str | Path) -> Path:
    """The directory holding a model's safetensors weights and config: the path itself, or the hub cache
    snapshot of a hub id (fetched now if the cache lacks it)."""
    name = str(model)
    if isinstance(model, Path) or _looks_like_path(name):
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json", *TOKENIZER_FILES]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise EdgeftError(f"{name}: cannot fetch the weights ({str(e).splitlines()[0]})") from None


# --- tokenizers --------------------------------------------------------------------------------------------


def _canonical(part: str, node: Any) -> Any:
    """A tokenizer.json part with spellings that do not change behaviour made equal."""
    if part != "model" or not isinstance(node, dict):
        return node
    node = dict(node)
    for key in _FALSY_SAME:
        if not node.get(key):
            node.pop(key, None)
    if isinstance(node.get("merges"), list):
        node["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in node["merges"]]
    return node


def pipeline_differences(tokenizer: Any, tokenizer_json: Path) -> list[str]:
    """Which parts of the file's pipeline (normalizer, pre_tokenizer, model) a loaded tokenizer does not use."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return list(_PIPELINE_PARTS)
    loaded = json.loads(backend.to_str())
    written = read_json(tokenizer_json)
    return [p for p in _PIPELINE_PARTS if _canonical(p, loaded.get(p)) != _canonical(p, written.get(p))]


def load_tokenizer(model: str | Path, *, trust_remote_code: bool = False, notify: bool = True) -> Any:
    """The tokenizer of a model dir, adapter dir or hub id, running the pipeline its tokenizer.json spells.

    When transformers' class for it rebuilds a different pipeline, the file's is used instead (one line on
    stderr says so). A tokenizer without a pad token gets its eos as pad (training batches need one).
    """
    from transformers import AutoTokenizer, TokenizersBackend

    name = str(model)
    if isinstance(model, Path) or _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise EdgeftError(
                f"{path}: directory not found (expected a model or adapter dir with a tokenizer)"
            )
        name = str(path)
        check_tokenizer_files(path)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise EdgeftError(f"{name}: cannot load the tokenizer ({first[:200]})") from None
    tj = local_dir(name) / "tokenizer.json"
    if tj.is_file():
        differs = pipeline_differences(tok, tj)
        if differs:
            rebuilt = type(tok).__name__
            try:
                tok = TokenizersBackend.from_pretrained(name)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise EdgeftError(f"{tj}: cannot load as written ({str(e).splitlines()[0]})") from None
            still = pipeline_differences(tok, tj)
            if still:
                raise EdgeftError(f"{tj}: cannot run its own {', '.join(still)} in transformers")
            if notify:
                info(
                    f"tokenizer: transformers' {rebuilt} would rebuild the {' and '.join(differs)} of {tj}; "
                    "using the file's own pipeline (the one the model was trained with)"
                )
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise EdgeftError(f"{name}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def check_tokenizer_files(folder: Path) -> None:
    """A model folder's tokenizer files as a stranger wrote them: JSON that parses within bounds, and a
    chat_template that is a template (text, or a list of {name, template}); else one line naming the file and
    field. transformers would ignore an int template with warnings, and the GGUF would ship without one."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            doc = read_json(folder / name)  # one line for a nested-too-deep or broken file
            if name == "tokenizer_config.json" and isinstance(doc, dict) and "chat_template" in doc:
                t = doc["chat_template"]
                named = isinstance(t, list) and all(
                    isinstance(x, dict)
                    and isinstance(x.get("name"), str)
                    and isinstance(x.get("template"), str)
                    for x in t
                )
                if not (t is None or isinstance(t, str) or named):
                    raise EdgeftError(
                        f"{folder / name}: chat_template is {show(t)} ({type(t).__name__}), not a template; "
                        "write the template text there (or remove the key)"
                    )


def tokenizer_files(model: str | Path) -> list[Path]:
    """The tokenizer and chat-template files a model directory (or hub snapshot) has."""
    src = local_dir(model)
    return [src / f for f in TOKENIZER_FILES if (src / f).is_file()]


def copy_tokenizer_files(model: str | Path, dst: Path) -> list[str]:
    """Copy the model's own tokenizer files into `dst` unchanged (never a re-save); returns their names."""
    if Path(str(model)).is_dir():
        check_model_folder(Path(str(model)))  # no file may lead outside the folder (e.g. a symlinked secret)
    files = tokenizer_files(model)
    if not files:
        raise EdgeftError(f"{model}: no tokenizer files (tokenizer.json or tokenizer.model) to carry along")
    for f in files:
        shutil.copyfile(f, Path(dst) / f.name)  # copyfile: a symlink's target content, never the link
    return [f.name for f in files]


# --- models ------------------------------------------------------------------------------------------------


def load_model(model: str | Path, *, dtype: Any = None, trust_remote_code: bool = False) -> Any:
    """A causal LM from a local dir or hub id, safetensors only, in `dtype` (default float32)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    name = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise EdgeftError(f"{name}: unsupported or unreadable model config ({str(e).splitlines()[0]})") from e
    dtype = dtype or torch.float32
    widened = None
    if Path(name).is_dir() and not trust_remote_code and getattr(config, "quantization_config", None) is None:
        widened = _widened_state(Path(name), dtype)
    try:
        if widened is not None and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            return cls.from_pretrained(None, config=config, state_dict=widened, dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(
            name,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as e:
        raise EdgeftError(
            f"{name}: {type(config).__name__} is not a supported causal LM ({str(e).splitlines()[0]})"
        ) from e
    except (OSError, SafetensorError) as e:
        raise EdgeftError(f"{name}: cannot load safetensors weights ({str(e).splitlines()[0]})") from e


# ref: safetensors docs "Format": the dtype names of a header; the floating ones a checkpoint stores weights in
_STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_STORED_BYTES = {"F32": 4, "BF16": 2, "F16": 2}


def _widened_state(folder: Path, dtype: Any) -> dict[str, Any] | None:
    """The weights of a 16-bit checkpoint as `dtype` (float32) tensors, each read from its file with read(),
    or None when the folder is not that (already float32, other dtypes, a header this reader does not take):
    from_pretrained then loads it the ordinary way.

    Why: from_pretrained(dtype=float32) on a bf16 folder holds every float32 weight and every page of the
    mapped file at once: 3.2 GB peak RSS for a 0.5B model whose float32 weights are 2.0 GB. Given these
    tensors as its state_dict, it builds the same float32 model (buffers, tied weights, key renames all its
    own) around them without a copy, and the mapped pages are never touched: a 2.3 GB peak."""
    import torch

    files = _weight_files(folder)
    extents = [(f, _tensor_extents(f)) for f in files]
    if not files or any(e is None for _, e in extents):
        return None
    kinds = {dt for _, e in extents for _o, dt, _s in (e or {}).values()}
    if not kinds <= {"BF16", "F16"} or not kinds:
        return None  # a float32 file needs no widening; anything else takes the ordinary path
    state: dict[str, Any] = {}
    for f, entries in extents:
        with open(f, "rb") as fh:
            for name, (offset, dt, shape) in (entries or {}).items():
                buf = bytearray(math.prod(shape) * _STORED_BYTES[dt])
                fh.seek(offset)
                if fh.readinto(buf) != len(buf):
                    return None
                src = getattr(torch, _STORED_DTYPES[dt])
                state[name] = (
                    torch.frombuffer(buf, dtype=src).reshape(shape).to(dtype)
                    if buf
                    else torch.zeros(shape, dtype=dtype)
                )
                del buf
    return state


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained reads: model.safetensors, else the shards its index names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if require_regular(inside(folder, single.name, what="weights file")).is_file():
        return [single]
    try:
        content = read_json(index) if index.is_file() else None
    except EdgeftError:
        return []
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return []
    shards = [require_regular(inside(folder, v, what="shard")) for v in sorted(set(weight_map.values()))]
    return shards if all(s.is_file() for s in shards) else []


def _tensor_extents(f: Path) -> dict[str, tuple[int, str, tuple[int, ...]]] | None:
    """name -> (absolute offset, dtype, shape) of every tensor of a safetensors file, or None if any is not
    a 32- or 16-bit float tensor whose extent is exactly its shape's bytes inside the file, apart from the
    others."""
    try:
        n, header = safetensors_header(f)
        size = f.stat().st_size
    except (EdgeftError, OSError):
        return None
    out: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str):
            return None
        dt, shape, span = meta["dtype"], meta.get("shape"), meta.get("data_offsets")
        if dt not in _STORED_BYTES or not isinstance(shape, list) or not isinstance(span, list):
            return None
        if not all(type(d) is int and d >= 0 for d in shape) or len(span) != 2:
            return None
        if not all(type(x) is int for x in span):
            return None
        if math.prod(max(d, 1) for d in shape) >= 1 << 62:  # a 0-element tensor torch cannot even shape
            return None
        start, end = 8 + n + span[0], 8 + n + span[1]
        if not (8 + n <= start and end - start == math.prod(shape) * _STORED_BYTES[dt] and end <= size):
            return None
        out[name] = (start, dt, tuple(shape))
    # Extents must not overlap (safetensors' own rule), so what is read is bounded by the file's size.
    spans = sorted((start, start + math.prod(shape) * _STORED_BYTES[dt]) for start, dt, shape in out.values())
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
        return None
    return out


def checkpoint_dtype(model: str | Path) -> str:
    """The floating dtype a checkpoint stores its weights in ("float32" | "bfloat16" | "float16")."""
    name = resolve_model(model)
    path = Path(name)
    if path.is_dir():
        from safetensors import safe_open

        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    dt = st.get_slice(key).get_dtype()
                    if dt in _STORED_DTYPES:
                        return _STORED_DTYPES[dt]
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name)
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    dt = str(dt).removeprefix("torch.") if dt is not None else "float32"
    return dt if dt in _STORED_DTYPES.values() else "float32"


def model_fingerprint(model: str | Path) -> dict[str, str]:
    """What identifies a model's content: every file of a local folder with its sha256, or a Hub id with its
    snapshot revision (what a stage's cache key and the manifest record)."""

    name = str(model)
    if isinstance(model, Path) or _looks_like_path(name):
        path = Path(name).expanduser()
        return {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.is_file()}
    return {"hub_id": name, "revision": local_dir(name).name}
