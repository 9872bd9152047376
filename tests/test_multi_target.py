"""Several targets from one build: one fine-tune, one float reference, each distinct candidate exported and
measured once, a bundle per target that passes `edgeft check`, an index, and a resume after a kill between
targets. Counted from what ran (spies on the stage functions), not from timing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from edgeft import config, formats, pipeline, reference, stages, verify
from edgeft.check import check_bundle
from edgeft.config import LoraSettings

PROFILE = """name = "{name}"
description = "test device {name}"
threads = 2
ram_mb = 1024
ram_budget_mb = 512
context_length = 256
bandwidth_gb_s = 4.0
"""
SLOT = '[[artifacts]]\nformat = "gguf"\nquant = "{quant}"\n[artifacts.budget]\nkld_mean = {kld}\n'


def _profiles(tmp: Path) -> tuple[str, str]:
    """tiny-a ships q8_0; tiny-b ships q8_0 (under another budget) and q4_0: q8_0 is the shared candidate."""
    a, b = tmp / "a.toml", tmp / "b.toml"
    a.write_text(PROFILE.format(name="tiny-a") + SLOT.format(quant="q8_0", kld=1.0))
    b.write_text(
        PROFILE.format(name="tiny-b")
        + SLOT.format(quant="q8_0", kld=2.0)
        + SLOT.format(quant="q4_0", kld=5.0)
    )
    return str(a), str(b)


def _data(path: Path, n: int = 30) -> Path:
    with path.open("w") as f:
        for i in range(n):
            room = ["kitchen", "hall", "office"][i % 3]
            f.write(json.dumps({"prompt": f"lights on in the {room} {i}", "completion": f"on {room}"}) + "\n")
    return path


class Spies:
    """How often each heavy stage really ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()
        for module, name in (
            (stages, "finetune"),
            (reference, "run_reference"),
            (verify, "compare"),
            (verify, "weights_drift"),
        ):
            self._count(monkeypatch, module, name, name)
        real_export, real_open = formats.export_file, formats.open_runtime

        def export(model_dir, spec, out, job=formats.ExportJob()):  # noqa: ANN001, ANN202, B008
            self.calls[f"export {spec.label}"] += 1
            return real_export(model_dir, spec, out, job)

        def open_runtime(path, **kw):  # noqa: ANN001, ANN003, ANN202
            self.opened[Path(path).name] += 1
            return real_open(path, **kw)

        monkeypatch.setattr(formats, "export_file", export)
        monkeypatch.setattr(formats, "open_runtime", open_runtime)

    def _count(self, monkeypatch: pytest.MonkeyPatch, module: object, attr: str, key: str) -> None:
        real = getattr(module, attr)

        def spy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            self.calls[key] += 1
            return real(*a, **kw)

        monkeypatch.setattr(module, attr, spy)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("multi")
    _data(tmp / "tasks.jsonl")
    return tmp


def _cfg(tiny_llama: Path, inputs: Path, out: Path) -> config.BuildConfig:
    return config.BuildConfig(
        targets=_profiles(inputs),
        model=str(tiny_llama),
        data=inputs / "tasks.jsonl",
        out=out,
        lora=LoraSettings(epochs=1, eval_fraction=0.2),
        fail_on_drift=False,
        threads=2,
    )


def test_two_targets_share_one_fine_tune_and_resume_after_a_kill_between_them(
    tiny_llama: Path, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the first target's bundle, then run again: across both runs the fine-tune, the float
    reference and each export ran once; in each run the shared q8_0 was opened and measured once."""
    out = tmp_path / "dist"
    real_ship = stages.ship
    shipped: list[str] = []

    def ship_then_die(run, target, *rest):  # noqa: ANN001, ANN002, ANN202
        if shipped:
            raise KeyboardInterrupt  # killed after the first target's bundle is written
        shipped.append(target.name)
        return real_ship(run, target, *rest)

    with monkeypatch.context() as m:
        first = Spies(m)
        m.setattr(stages, "ship", ship_then_die)
        with pytest.raises(KeyboardInterrupt):
            pipeline.build(_cfg(tiny_llama, inputs, out))
    assert first.calls["finetune"] == 1 and first.calls["run_reference"] == 1
    assert first.calls["export gguf-q8_0"] == 1 and first.calls["export gguf-q4_0-imatrix"] == 1
    assert first.opened["model-q8_0.gguf"] == 1  # judged for tiny-a, its drift taken for tiny-b
    assert shipped == ["tiny-a"] and (out / "tiny-a" / "manifest.json").is_file()
    assert not (out / "tiny-b").exists() and (out / ".work" / "build" / "merged").is_dir()

    again = Spies(monkeypatch)
    built = pipeline.build(_cfg(tiny_llama, inputs, out))
    assert [r.target for r in built] == ["tiny-a", "tiny-b"]
    assert again.calls["finetune"] == 0 and again.calls["run_reference"] == 0
    assert not [k for k in again.calls if k.startswith("export")]  # every artifact was reused
    assert set(built.results[1].reused) >= {
        "finetune",
        "merge",
        "gguf-q8_0",
        "gguf-q4_0-imatrix",
        "reference",
    }
    assert again.opened["model-q8_0.gguf"] == 1 and again.opened["model-q4_0-imatrix.gguf"] == 1
    assert again.calls["compare"] == 2 and built.measured_once >= 1
    a, b = (json.loads((r.bundle_dir / "manifest.json").read_text()) for r in built)
    assert a["target"] == "tiny-a" and b["target"] == "tiny-b"
    shared = [next(x for x in m["artifacts"] if x["quant"] == "q8_0") for m in (a, b)]
    assert shared[0]["drift"] == shared[1]["drift"] and shared[0]["sha256"] == shared[1]["sha256"]
    assert [x["budget"]["kld_mean"] for x in shared] == [1.0, 2.0]  # each target's own budget
    for r in built:
        report = check_bundle(r.bundle_dir, load=False)
        assert report.passed, report.findings
    page = (out / "index.html").read_text()
    assert built.index == out / "index.html"
    assert 'href="tiny-a/report.html"' in page and 'href="tiny-b/report.html"' in page
    assert page.count("model-q8_0.gguf") == 2 and "model-q4_0.gguf" in page
    assert not (out / ".work").exists()  # removed once every target is written


def test_target_all_and_lists_in_edgeft_toml(tmp_path: Path) -> None:
    from edgeft.targets import available

    cfg = config.resolve(target=["all"], model=None, data=None, out=None, cwd=tmp_path)
    assert cfg.targets == tuple(available()) and len(cfg.targets) >= 3
    (tmp_path / "edgeft.toml").write_text('target = ["raspberrypi", "windows-x64", "raspberrypi"]\n')
    cfg = config.resolve(target=None, model=None, data=None, out=None, cwd=tmp_path)
    assert cfg.targets == ("raspberrypi", "windows-x64")
    (tmp_path / "edgeft.toml").write_text("target = []\n")
    with pytest.raises(Exception, match="target = \\[\\] names no profile"):
        config.resolve(target=None, model=None, data=None, out=None, cwd=tmp_path)


def test_targets_whose_bundles_would_collide_are_refused(tmp_path: Path) -> None:
    """Two profiles writing one bundle folder (names equal but for case), or a name that is a rejected
    bundle's folder, are one line each before any work."""
    from edgeft.errors import EdgeftError
    from edgeft.targets import load

    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(PROFILE.format(name="Pi") + SLOT.format(quant="q8_0", kld=1.0))
    b.write_text(PROFILE.format(name="pi") + SLOT.format(quant="q8_0", kld=1.0))
    with pytest.raises(EdgeftError, match="targets Pi, pi would write the same bundle folder"):
        pipeline.build(config.BuildConfig(targets=(str(a), str(b)), out=tmp_path / "dist"))
    assert not (tmp_path / "dist").exists()
    a.write_text(PROFILE.format(name="pi.rejected") + SLOT.format(quant="q8_0", kld=1.0))
    with pytest.raises(EdgeftError, match="ends in .rejected"):
        load(a)
