"""report.html: one self-contained page per bundle, rendered from the manifest alone.

Unit tests on render_html with synthetic manifests (a point per candidate, the Pareto frontier, escaping of
hostile strings, nothing fetched, untrusted shapes), the page a real bundle carries (listed and hashed like
report.md, equal to a re-render of its manifest.json), and the page as headless Chromium draws it.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import bundles
import numpy as np
import pytest

from edgeft.check import check_bundle, parse_sums
from edgeft.constants import MANIFEST, REPORT_HTML, SHA256SUMS
from edgeft.report_html import pareto, points, render_html
from edgeft.targets import ArtifactSpec

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;'
GGUF_BLUE, ONNX_ORANGE = (0x2B, 0x6C, 0xB0), (0xC0, 0x56, 0x21)  # report_html.FORMAT_STYLES


def candidate(label: str, fmt: str, mb: float, kld: float | None, chosen: bool = False) -> dict[str, Any]:
    """A manifest `candidates` entry as the search writes it; kld None = not measured (drift all null)."""
    measured = kld is not None
    drift = {
        "kld_mean": kld,
        "kld_p99": kld * 10 if measured else None,
        "top1": 0.97 if measured else None,
        "ppl_ratio": 1.0 if measured else None,
        "task_accuracy": 0.95 if measured else None,
        "prompt_ids_match": 1.0 if measured else None,
        "answers_match": 0.98 if measured else None,
    }
    return {
        "label": label,
        "slot": fmt,
        "format": fmt,
        "quant": label.split("-")[-1],
        "options": {"imatrix": "imatrix" in label, "head_type": None, "accuracy_level": None},
        "bytes": int(mb * 1e6),
        "decode_bytes_per_token": int(mb * 0.9e6),
        "est_decode_tok_s": 4e9 / (mb * 0.9e6),
        "drift": drift,
        "latency": {
            "prefill_tok_s": 900.0,
            "decode_tok_s": 2e8 / (mb * 1e6),
            "ttft_ms": 7.0,
            "peak_rss_mb": 60,
        }
        if measured
        else None,
        "fits_ram": True,
        "violations": ["kld_mean = 0.3, budget <= 0.15"] if measured and kld > 0.15 else [],
        "verdict": "chosen: fastest on the device within every budget" if chosen else "not the fastest",
        "chosen": chosen,
    }


# The Pareto frontier by size: q4_0 (0.02) → q4_k_m+imatrix (0.003) → q8_0 (0.0001) → onnx-int8 (0.0: a KLD
# of 0 still counts); q4_k_m, q5_k_m and int4 are each beaten by a smaller candidate with lower KLD.
CANDIDATES = [
    candidate("gguf-q8_0", "gguf", 8.0, 1e-4),
    candidate("gguf-q5_k_m", "gguf", 5.0, 0.004),
    candidate("gguf-q4_k_m+imatrix", "gguf", 4.0, 0.003, chosen=True),
    candidate("gguf-q4_k_m", "gguf", 4.0, 0.03),
    candidate("gguf-q4_0", "gguf", 3.5, 0.02),
    candidate("gguf-iq4_nl", "gguf", 3.6, None),  # stopped early: not measured
    candidate("onnx-int8", "onnx", 9.0, 0.0, chosen=True),
    candidate("onnx-int4", "onnx", 5.5, 0.3),
]


def manifest(cands: list[dict[str, Any]] | None = None, **more: Any) -> dict[str, Any]:
    """A manifest shaped like write_bundle's (two shipped artifacts), with `candidates` when given."""
    art = {
        "path": "model-q4_k_m.gguf",
        "format": "gguf",
        "quant": "q4_k_m",
        "bytes": 4_000_000,
        "drift": {
            "kld_mean": 0.003,
            "kld_p99": 0.03,
            "top1": 0.97,
            "ppl_ratio": 1.01,
            "task_accuracy": 0.95,
            "prompt_ids_match": 1.0,
            "answers_match": 0.98,
            "prompt_diff": None,
            "answer_diff": "conversation 3: first difference at token 2",
        },
        "latency": {"prefill_tok_s": 900.0, "decode_tok_s": 50.0, "ttft_ms": 7.0, "peak_rss_mb": 60.0},
        "decode_bytes_per_token": 3_600_000,
        "tensor_types": {"q5_0": 0.7, "q4_k": 0.2, "q6_k": 0.1},
        "output_head": {"type": "q6_k", "share": 0.1},
        "ram_need_mb": 9.0,
        "budget": {"kld_mean": 0.15, "task_accuracy_drop": 0.05},
        "within_budget": True,
    }
    onnx = copy.deepcopy(art) | {"path": "onnx-int8", "format": "onnx", "quant": "int8", "bytes": 9_000_000}
    onnx["tensor_types"] = {"float": 0.5, "int8 (MatMulNBits)": 0.5}
    doc: dict[str, Any] = {
        "schema_version": 2,
        "target": "tiny-device",
        "passed": True,
        "base_model": "tiny-llama",
        "device": {"description": "test device", "threads": 2, "ram_budget_mb": 512, "context_length": 256},
        "reference": {"task_accuracy": 0.95, "base_task_accuracy": 0.1, "latency": None},
        "data": {"eval_examples": 40, "eval_source": "held-out split"},
        "artifacts": [art, onnx],
        "skipped": [],
    }
    if cands is not None:
        doc["candidates"] = cands
    return doc | more


def candidate_groups(page: str) -> list[str]:
    """The data-label of every element marked as a candidate point."""
    return re.findall(r'<g class="candidate" data-label="([^"]*)"', page)


def test_one_point_per_candidate_and_the_pareto_frontier() -> None:
    page = render_html(manifest(CANDIDATES))
    labels = candidate_groups(page)
    assert labels == sorted(labels, key=lambda x: x.endswith(("+imatrix", "int8")))  # chosen drawn last
    assert sorted(labels) == sorted(c["label"] for c in CANDIDATES)
    assert page.count('class="candidate"') == len(CANDIDATES)
    assert page.count('data-measured="false"') == 1  # iq4_nl, on the "not measured" strip
    assert "not measured" in page
    front = re.findall(r'data-label="([^"]*)"[^>]*data-pareto="true"', page)
    assert sorted(front) == sorted(["gguf-q4_0", "gguf-q4_k_m+imatrix", "gguf-q8_0", "onnx-int8"])
    assert [p.label for p in pareto(points(manifest(CANDIDATES))[0])] == [
        "gguf-q4_0",
        "gguf-q4_k_m+imatrix",
        "gguf-q8_0",
        "onnx-int8",
    ]
    assert page.count('class="pareto"') == 1
    # the candidates table: a row per candidate, the chosen ones highlighted and explained
    assert page.count('<tr class="chosen">') == 2
    assert page.count("chosen: fastest on the device within every budget") >= 2
    assert "kld_mean = 0.3, budget &lt;= 0.15" in page


def test_without_candidates_the_shipped_artifacts_are_plotted() -> None:
    for cands in (None, []):
        page = render_html(manifest(cands))
        assert candidate_groups(page) == ["model-q4_k_m.gguf", "onnx-int8"]
        assert "no candidate search" in page


def test_hostile_strings_are_escaped() -> None:
    cands = [candidate(HOSTILE, "gguf", 3.0, 0.01, chosen=True), candidate("b", HOSTILE, 4.0, None)]
    cands[0]["verdict"] = HOSTILE
    cands[0]["options"] = {HOSTILE: True}
    doc = manifest(cands, target=HOSTILE, base_model=HOSTILE)
    doc["artifacts"][0]["tensor_types"] = {HOSTILE: 1.0}
    doc["artifacts"][0]["output_head"] = {"type": HOSTILE, "share": 0.5}
    doc["artifacts"][0]["path"] = HOSTILE
    doc["artifacts"][0]["drift"]["answer_diff"] = HOSTILE
    doc["skipped"] = [{"artifact": HOSTILE, "reason": HOSTILE}]
    doc["device_latency"] = [{"where": HOSTILE, "recorded": HOSTILE, "result": {"artifacts": []}}]
    page = render_html(doc)
    assert "<script" not in page and "<img" not in page and "onerror=alert(1)>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&amp;amp;" in page  # the label's own "&amp;" is text, not an entity
    assert len(candidate_groups(page)) == 2


def test_nothing_is_fetched() -> None:
    page = render_html(manifest(CANDIDATES, device_latency=[device_run()]))
    assert not re.search(r"\b(src|href|xlink:href|action|srcset)\s*=", page, re.I)
    assert not re.search(r"url\(|@import|<script|<link|<iframe|<object|<embed", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page  # the CSP meta: even a hand-edited page cannot fetch or run code


def device_run(decode: float = 12.5) -> dict[str, Any]:
    result = {
        "artifacts": [
            {"path": "model-q4_k_m.gguf", "status": "ok", "prefill_tok_s": 80.0, "decode_tok_s": decode},
            {"path": "onnx-int8", "status": "missing_runtime", "reason": "onnxruntime-genai not installed"},
        ]
    }
    return {"where": "pi@rpi5", "recorded": "2026-11-30T08:00:00Z", "result": result}


def test_device_latency_next_to_host() -> None:
    assert "No device run recorded yet" in render_html(manifest(CANDIDATES))
    page = render_html(manifest(CANDIDATES, device_latency=[device_run(99.0), device_run(12.5)]))
    assert "pi@rpi5" in page and "No device run recorded yet" not in page
    assert "50.0 / 12.5" in page and "50.0 / 99.0" not in page  # host / the newest device run
    assert "missing_runtime: onnxruntime-genai not installed" in page
    assert page.count('class="device-speed"') == 1  # the decode speed the device measured, in plot 2


def test_tensor_types_and_budget_failures() -> None:
    doc = manifest(CANDIDATES)
    doc["artifacts"][1]["drift"]["kld_mean"] = 0.5
    doc["artifacts"][1]["within_budget"] = False
    page = render_html(doc)
    assert "output head: q6_k (10.0%)" in page
    assert (
        "q5_0: 70.0% of the weight bytes" in page and "int8 (MatMulNBits): 50.0% of the weight bytes" in page
    )
    assert '<td class="bad">0.50000</td>' in page
    assert '<td class="bad t">FAIL: kld_mean = 0.5, budget &lt;= 0.15</td>' in page
    assert page.count('<td class="bad') == 3  # those two, and onnx-int4's violations among the candidates


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"candidates": "x", "artifacts": None, "device_latency": 3},
        {"candidates": [1, None, {"bytes": "big", "drift": [], "latency": "fast", "options": 5}]},
        {
            "artifacts": [
                {"bytes": float("nan"), "tensor_types": {"q4_0": "half"}, "budget": {"kld_mean": "x"}}
            ]
        },
        {"device_latency": [1, {"result": []}, {"where": "d", "result": {"artifacts": [None, {"path": 3}]}}]},
    ],
)
def test_odd_manifests_render(doc: dict[str, Any]) -> None:
    """A damaged manifest (hand-edited, older or newer) renders with dashes, one point per dict entry."""
    page = render_html(doc)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    entries = doc.get("candidates") if isinstance(doc.get("candidates"), list) else doc.get("artifacts")
    assert len(candidate_groups(page)) == sum(isinstance(e, dict) for e in entries or [])


def test_the_bundle_carries_report_html(tiny_llama: Path, tmp_path: Path) -> None:
    """write_bundle writes report.html, lists and hashes it like report.md; a re-render gives the same page."""
    arts = bundles.exported(tiny_llama, tmp_path, [ArtifactSpec("gguf", "q8_0")])
    b = bundles.write(tiny_llama, arts, tmp_path / "out")
    m = json.loads((b / MANIFEST).read_text())
    page = (b / REPORT_HTML).read_text(encoding="utf-8")
    assert m["files"][REPORT_HTML] == bundles.bundle.sha256_file(b / REPORT_HTML)
    assert parse_sums((b / SHA256SUMS).read_text())[REPORT_HTML] == m["files"][REPORT_HTML]
    assert page == render_html(m)
    assert candidate_groups(page) == ["model-q8_0.gguf"]  # no search in these facts: the shipped artifact
    report = check_bundle(b, load=False)
    assert report.passed, report.findings


# --- the page in a browser --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")


def decode_png(data: bytes) -> np.ndarray:
    """RGB pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes), without Pillow.
    ref: PNG spec (W3C, 2nd ed.) §9.2 filter types 0-4 (None, Sub, Up, Average, Paeth)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert hdr is not None, "no IHDR chunk"
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, f"unsupported PNG layout {hdr}"
    bpp, raw = (3 if ctype == 2 else 4), zlib.decompress(b"".join(idat))
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if kind == 1:  # Sub: a running sum per channel
            px = np.frombuffer(bytes(line), np.uint8).reshape(w, bpp)
            line = bytearray(np.cumsum(px, axis=0, dtype=np.uint64).astype(np.uint8).tobytes())
        elif kind == 2:  # Up
            line = bytearray(
                (np.frombuffer(bytes(line), np.uint8) + np.frombuffer(bytes(prev), np.uint8)).tobytes()
            )
        elif kind in (3, 4):  # Average, Paeth: depend on the byte just decoded
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                if kind == 3:
                    line[i] = (line[i] + ((a + b) >> 1)) & 255
                    continue
                c = prev[i - bpp] if i >= bpp else 0
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return np.frombuffer(b"".join(rows), np.uint8).reshape(h, w, bpp)[:, :, :3]


def test_decode_png_reads_every_filter() -> None:
    """The decoder against a PNG built here with each filter on one row each (so the browser test's
    pixel counts are not an artefact of decoding)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img[2] = img[1]  # an Up row of zeros
    rows, prev = [], np.zeros(7 * 3, np.int32)
    for f, row in enumerate(img.reshape(5, -1).astype(np.int32)):
        left = np.concatenate([np.zeros(3, np.int32), row[:-3]])
        upleft = np.concatenate([np.zeros(3, np.int32), prev[:-3]])
        if f == 3:
            pred = (left + prev) // 2
        elif f == 4:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        else:
            pred = [np.zeros_like(row), left, prev][f]
        rows.append(bytes([f]) + ((row - pred) % 256).astype(np.uint8).tobytes())
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 7, 5, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )
    assert np.array_equal(decode_png(png), img)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed here (.ci/run installs it)")
def test_chromium_draws_a_point_per_candidate(tmp_path: Path) -> None:
    """Headless Chromium renders the page: the screenshot is not blank and shows both formats' markers,
    and the DOM it parsed holds one candidate point per candidate (escaping kept the markup whole)."""
    cands = [*CANDIDATES, candidate(HOSTILE, "gguf", 6.0, 0.01)]
    page = tmp_path / "report.html"
    page.write_text(render_html(manifest(cands, device_latency=[device_run()])), encoding="utf-8")
    shot = tmp_path / "out.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--no-first-run",
        f"--screenshot={shot}",
        "--dump-dom",
        "--window-size=1200,2000",
        page.as_uri(),
    ]
    start = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    print(f"chromium: {time.monotonic() - start:.1f}s")
    dom = res.stdout
    assert len(re.findall(r'<g class="candidate"', dom)) == len(cands)
    assert "<script" not in dom  # the hostile label stayed text
    img = decode_png(shot.read_bytes())
    assert img.shape == (2000, 1200, 3)
    flat = img.reshape(-1, 3)
    colours = np.unique(flat, axis=0)
    inked = (flat < 250).any(axis=1).mean()
    assert len(colours) > 200 and 0.03 < inked < 0.8, (len(colours), inked)
    for colour in (GGUF_BLUE, ONNX_ORANGE):  # filled markers of both formats are drawn
        assert (flat == colour).all(axis=1).sum() > 100, colour
