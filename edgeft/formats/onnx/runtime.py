"""onnxruntime runtime: scores and extends token ids of an onnxruntime-genai model directory.

Scoring runs the decoder graph once in a plain onnxruntime.InferenceSession (empty KV cache, all positions'
logits); generation runs onnxruntime-genai's own greedy loop, the path a deployed app uses. Each engine is
created on first use, so a benchmark that only generates never holds two copies of the weights.
onnxruntime is imported lazily (here and in edgeft/formats/onnx/), so edgeft imports without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeft import template
from edgeft.errors import EdgeftError
from edgeft.formats.onnx.constants import ONNX_GENAI_CONFIG, ONNX_MODEL_FILE
from edgeft.formats.onnx.folder import check_external_data, check_onnx_folder
from edgeft.guard import read_json

# onnxruntime's type strings for the float I/O dtypes a CPU decoder can have.
_ORT_FLOATS: dict[str, Any] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


class OrtRuntime:
    """An onnxruntime-genai model directory, implementing edgeft.runtime.Runtime."""

    def __init__(
        self,
        path: Path,
        *,
        threads: int | None = None,
        n_ctx: int = 512,
        all_logits: bool = True,
        allow_native_libs: bool = False,
    ) -> None:
        path = Path(path)
        cfg_path = path / ONNX_GENAI_CONFIG
        if not cfg_path.is_file():
            raise EdgeftError(f"{path}: not an onnxruntime-genai model directory (no {ONNX_GENAI_CONFIG})")
        # No native library named by the config, and no file it names outside the folder, before any load.
        check_onnx_folder(path, allow_native_libs=allow_native_libs)
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            model_cfg = cfg["model"]
            dec = model_cfg["decoder"]
            # ref: onnxruntime-genai src/config.h (model.decoder.{filename,head_size,num_key_value_heads,
            # num_hidden_layers,inputs,outputs}, model.{vocab_size,context_length}).
            self._file = path / dec.get("filename", ONNX_MODEL_FILE)
            self._head_size = int(dec["head_size"])
            self._kv_heads = int(dec["num_key_value_heads"])
            self._layers = int(dec["num_hidden_layers"])
            self._inputs: dict[str, str] = dict(dec.get("inputs", {}))
            self._outputs: dict[str, str] = dict(dec.get("outputs", {}))
            # Layers whose KV cache is window-sized (GroupQueryAttention sliding_window_cache): an empty past
            # still needs the window's capacity ("KV cache capacity (0) must be at least local_window_size").
            # ref: onnxruntime_genai/models/builders/base.py make_genai_config, decoder.sliding_window.
            window = dec.get("sliding_window") or {}
            self._window_caps = {int(i): int(window["window_size"]) for i in window.get("layers", [])}
            self.n_vocab: int = int(model_cfg["vocab_size"])
            eos = model_cfg.get("eos_token_id", [])
            self._eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
            context = int(model_cfg.get("context_length", n_ctx))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise EdgeftError(f"{cfg_path}: not a usable genai config ({type(e).__name__}: {e})") from None
        if not self._file.is_file():
            raise EdgeftError(f"{self._file}: decoder model file does not exist")
        check_external_data(self._file, path)  # refuse weights outside the model dir before any load
        self.path = path
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.n_ctx = min(n_ctx, context)
        self.all_logits = all_logits
        self._session: Any = None  # onnxruntime.InferenceSession, created by logits()
        self._og_model: Any = None  # onnxruntime_genai.Model, created by generate()
        self._og_tokenizer: Any = None  # onnxruntime_genai.Tokenizer, created by chat_prompt_ids()

    # --- scoring: plain onnxruntime -----------------------------------------------------------------------

    def _check_ids(self, ids: list[int], extra: int = 0) -> None:
        if not ids:
            raise EdgeftError("no token ids to evaluate")
        if len(ids) + extra > self.n_ctx:
            raise EdgeftError(
                f"{len(ids) + extra} tokens do not fit the ONNX context of {self.n_ctx}; raise n_ctx "
                "(up to the model's context_length)"
            )
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise EdgeftError(f"token id {bad[0]} is outside the ONNX model's vocabulary of {self.n_vocab}")

    def _get_session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3  # errors only: keep stderr clean
            try:
                self._session = ort.InferenceSession(str(self._file), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise EdgeftError(f"{self._file}: onnxruntime cannot load it ({_first_line(e)})") from None
        return self._session

    def _feeds(self, ids: list[int]) -> dict[str, np.ndarray]:
        sess = self._get_session()
        n = len(ids)
        names = self._inputs
        ids_name = names.get("input_ids", "input_ids")
        mask_name = names.get("attention_mask", "attention_mask")
        pos_name = names.get("position_ids", "position_ids")
        key_fmt = names.get("past_key_names", "past_key_values.%d.key")
        value_fmt = names.get("past_value_names", "past_key_values.%d.value")
        past = {key_fmt % i: i for i in range(self._layers)} | {value_fmt % i: i for i in range(self._layers)}
        feeds: dict[str, np.ndarray] = {}
        for inp in sess.get_inputs():
            if inp.name == ids_name:
                feeds[inp.name] = np.array([ids], dtype=np.int64)
            elif inp.name == mask_name:
                feeds[inp.name] = np.ones((1, n), dtype=np.int64)
            elif inp.name == pos_name:
                feeds[inp.name] = np.arange(n, dtype=np.int64)[None, :]
            elif inp.name in past:
                dtype = _ORT_FLOATS.get(inp.type)
                if dtype is None:
                    raise EdgeftError(f"{self._file}: KV input {inp.name} has unsupported type {inp.type}")
                # [batch, kv_heads, capacity, head_size], no past tokens (the mask covers `ids` only); symbolic
                # dims come from genai_config.json.
                cap = self._window_caps.get(past[inp.name], 0)
                feeds[inp.name] = np.zeros((1, self._kv_heads, cap, self._head_size), dtype=dtype)
            else:
                raise EdgeftError(f"{self._file}: unexpected decoder input '{inp.name}'")
        return feeds

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits for every position of `ids` in a fresh context, float32 [len(ids), n_vocab]."""
        if not self.all_logits:
            raise EdgeftError("ONNX runtime opened with all_logits=False; per-position logits need it")
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        sess = self._get_session()
        out_name = self._outputs.get("logits", "logits")
        (logits,) = sess.run([out_name], self._feeds(ids))
        return np.asarray(logits[0, :, : self.n_vocab], dtype=np.float32)

    # --- generation: onnxruntime-genai ----------------------------------------------------------------------

    def _get_og_model(self) -> Any:
        if self._og_model is None:
            import onnxruntime_genai as og

            # Scoring and generation run one after the other (verify, bench): never hold both copies of the
            # weights; the scoring session is recreated if logits() is called again.
            self._session = None

            try:
                config = og.Config(str(self.path))
                # Threads via an overlay of the decoder's session options. ref: onnxruntime-genai
                # src/config.h, Config::SessionOptions intra_op_num_threads / inter_op_num_threads.
                overlay = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
                config.overlay(json.dumps({"model": {"decoder": {"session_options": overlay}}}))
                self._og_model = og.Model(config)
            except Exception as e:  # noqa: BLE001 - og raises RuntimeError and others
                msg = f"{self.path}: onnxruntime-genai cannot load it ({_first_line(e)})"
                raise EdgeftError(msg) from None
        return self._og_model

    def generate(self, ids: Sequence[int], n: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation: up to `n` new ids, ending after (and including) the first of `stop_ids`.

        onnxruntime-genai's Generator, the loop an app runs. It ends after the model's EOS (the id itself
        is emitted); when that EOS is not one of `stop_ids`, the same generator goes on: `rewind_to` drops
        the EOS it has not evaluated yet and `append_tokens` feeds it back, one decode step, never a second
        prefill (issue 8: a restart inside a timed window understated decode speed).
        """
        import onnxruntime_genai as og

        ids = [int(i) for i in ids]
        self._check_ids(ids, max(n, 0))
        stops = {int(s) for s in stop_ids}
        model = self._get_og_model()
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max(n, 1))
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        out: list[int] = []
        while len(out) < n:
            if gen.is_done():
                if not out:  # done before any token: the context is full
                    break
                gen.rewind_to(len(ids) + len(out) - 1)
                gen.append_tokens([out[-1]])
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            out.append(tok)
            if tok in stops:
                break
        return out

    # --- the app path: onnxruntime-genai's own template, tokenizer and stop ids ----------------------------

    def _get_og_tokenizer(self) -> Any:
        if self._og_tokenizer is None:
            import onnxruntime_genai as og

            try:
                self._og_tokenizer = og.Tokenizer(self._get_og_model())
            except Exception as e:  # noqa: BLE001 - og raises RuntimeError and others
                raise EdgeftError(
                    f"{self.path}: onnxruntime-genai cannot load the tokenizer ({_first_line(e)})"
                ) from None
        return self._og_tokenizer

    def vet(self, conversations: list[list[dict[str, str]]]) -> None:
        """The folder's chat template (tokenizer_config.json's, else chat_template.jinja: what onnxruntime-genai's
        tokenizer renders) rendered within bounds first, with the bos and eos text the config names."""
        cfg_path = self.path / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        cfg = cfg if isinstance(cfg, dict) else {}
        tmpl = cfg.get("chat_template")
        if not isinstance(tmpl, str) and (self.path / "chat_template.jinja").is_file():
            tmpl = (self.path / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
        if not isinstance(tmpl, str) or not tmpl:
            return

        def text(v: Any) -> str:
            return v if isinstance(v, str) else str(v.get("content", "")) if isinstance(v, dict) else ""

        variables = {"bos_token": text(cfg.get("bos_token")), "eos_token": text(cfg.get("eos_token"))}
        renders = [(list(m), True) for m in conversations]
        template.vet(tmpl, variables, renders, where=f"{self.path}: its chat template")

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids an app feeds the model: `Tokenizer.apply_chat_template` (generation prompt) + `encode`."""
        self.vet([messages])  # at once when a batch vetted it already
        tok = self._get_og_tokenizer()
        try:
            prompt = tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
            return [int(i) for i in tok.encode(prompt)]
        except Exception as e:  # noqa: BLE001 - template and tokenizer errors surface as RuntimeError
            raise EdgeftError(
                f"{self.path}: onnxruntime-genai cannot render the chat prompt ({_first_line(e)})"
            ) from None

    def text_ids(self, text: str) -> list[int]:
        """onnxruntime-genai's ids of a prompt text (`Tokenizer.encode`, as chat_prompt_ids encodes)."""
        return [int(i) for i in self._get_og_tokenizer().encode(text)]

    @property
    def end_ids(self) -> list[int]:
        """The ids onnxruntime-genai's generator stops after: genai_config.json's eos_token_id."""
        return list(self._eos_ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Answer text the way onnxruntime-genai's tokenizer decodes it."""
        return str(self._get_og_tokenizer().decode(np.asarray([int(i) for i in ids], dtype=np.int32)))

    def close(self) -> None:
        """Free the sessions (all are recreated on next use)."""
        self._session = None
        self._og_tokenizer = None
        self._og_model = None

    def __enter__(self) -> OrtRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
