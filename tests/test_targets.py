"""Target profiles: every shipped profile validates; bad profiles fail with one clear line."""

import re
from pathlib import Path

import pytest

from edgeft import formats, targets
from edgeft.errors import EdgeftError


def test_every_shipped_profile_loads() -> None:
    profiles = targets.load_all()
    names = {p.name for p in profiles}
    assert {"raspberrypi", "host"} <= names
    for p in profiles:
        assert p.artifacts, p.name
        assert 0 < p.ram_budget_mb <= p.ram_mb
        for a in p.artifacts:
            assert a.quant in formats.get(a.format).quants
            if a.ship:
                assert a.budget.kld_mean is not None, f"{p.name} {a.label} has no KLD budget"
        assert p.name in p.summary()


def test_raspberrypi_profile_facts() -> None:
    pi = targets.load("raspberrypi")
    assert pi.threads == 4 and pi.arch == "aarch64"
    # one searched slot per format; without the search, q4_0 (with the importance matrix) and ONNX int8
    gguf, onnx = pi.artifacts
    assert (gguf.label, onnx.label) == ("gguf-q4_0-imatrix", "onnx-int8-acc4")
    assert {c.quant for c in gguf.search} == {"q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_nl", "q4_0"}
    assert {c.quant for c in onnx.search} == {"int8", "int4"}
    assert all(c.budget == gguf.budget for c in gguf.search)  # candidates compete under the slot's budget


def test_search_slots_in_a_profile(tmp_path: Path) -> None:
    base = (
        'name = "d"\nthreads = 2\nram_mb = 100\nram_budget_mb = 90\ncontext_length = 64\n'
        'bandwidth_gb_s = 1.0\n[[artifacts]]\nformat = "gguf"\nquant = "q4_0"\n'
    )
    path = tmp_path / "d.toml"
    path.write_text(base + 'search = ["q8_0", "q4_k_m"]\nhead_type = "q8_0"\n')
    slot = targets.load(path).artifacts[0]
    labels = [c.label for c in slot.search]
    assert labels == [
        "gguf-q8_0",
        "gguf-q4_k_m-imatrix",
        "gguf-q4_k_m-imatrix-head_q8_0",
        "gguf-q4_k_m",
        "gguf-q4_k_m-head_q8_0",
    ]
    path.write_text(base + "imatrix = false\n")
    assert targets.load(path).artifacts[0].label == "gguf-q4_0" and not targets.load(path).artifacts[0].search
    for bad, said in (
        ('search = ["q4_0", "q9"]', "unknown gguf quant(s) 'q9'"),
        ('imatrix = "both"', 'or "both" (with a search list)'),
        ('search = ["q4_0", "q4_0"]', "names a quant twice"),
        ('head_type = ["q8_0", "q6_k"]', "only a search slot tries several"),
        ('head_type = "q4_0"', "head_type 'q4_0' is not more precise than q4_0"),
        (
            '[[artifacts]]\nformat = "gguf"\nquant = "q8_0"\nsearch = ["q8_0", "q4_0"]',
            "two shipped artifacts could be the same gguf file",
        ),
    ):
        path.write_text(base + bad + "\n")
        with pytest.raises(EdgeftError, match=re.escape(said)):
            targets.load(path)


def test_unknown_target_lists_available() -> None:
    with pytest.raises(EdgeftError) as e:
        targets.load("toaster")
    assert "toaster" in str(e.value) and "raspberrypi" in str(e.value)


def test_profile_from_path_and_field_errors(tmp_path: Path) -> None:
    good = tmp_path / "dev.toml"
    good.write_text(
        'name = "dev"\nthreads = 2\nram_mb = 1024\nram_budget_mb = 512\ncontext_length = 256\n'
        'bandwidth_gb_s = 3.5\n[[artifacts]]\nformat = "gguf"\nquant = "q8_0"\n[artifacts.budget]\nkld_mean = 0.01\n'
    )
    p = targets.load(good)
    assert p.name == "dev" and p.artifacts[0].budget.kld_mean == 0.01

    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('"q8_0"', '"q3_xs"'))
    with pytest.raises(EdgeftError, match=r"bad\.toml.*q3_xs.*q4_0"):
        targets.load(bad)
    bad.write_text(good.read_text().replace("threads = 2", 'threads = "two"'))
    with pytest.raises(EdgeftError, match="threads"):
        targets.load(bad)
    bad.write_text(good.read_text().replace("kld_mean", "kld_median"))
    with pytest.raises(EdgeftError, match="kld_median"):
        targets.load(bad)


def test_onnx_primary_profiles() -> None:
    for name in ("android-arm64", "windows-x64"):
        p = targets.load(name)
        assert p.artifacts[0].format == "onnx", name


def test_accuracy_level_only_for_onnx_int(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    base = 'name = "t"\nthreads = 1\nram_mb = 10\nram_budget_mb = 5\ncontext_length = 8\nbandwidth_gb_s = 1\n'
    f.write_text(base + '[[artifacts]]\nformat = "gguf"\nquant = "q4_0"\naccuracy_level = 4\n')
    with pytest.raises(EdgeftError, match="accuracy_level"):
        targets.load(f)
    f.write_text(base + '[[artifacts]]\nformat = "onnx"\nquant = "int8"\naccuracy_level = 7\n')
    with pytest.raises(EdgeftError, match="accuracy_level = 7"):
        targets.load(f)
    f.write_text(base + '[[artifacts]]\nformat = "onnx"\nquant = "int8"\nship = false\n')
    with pytest.raises(EdgeftError, match="ship at least one"):
        targets.load(f)
    # each format checks its own options; another format's option set to something is one line, left empty
    # it asks for nothing; a float candidate of a search is built without an activation precision
    f.write_text(base + '[[artifacts]]\nformat = "onnx"\nquant = "int8"\nhead_type = "q8_0"\n')
    with pytest.raises(EdgeftError, match="head_type applies to gguf quants only, not onnx"):
        targets.load(f)
    f.write_text(
        base + '[[artifacts]]\nformat = "onnx"\nquant = "int8"\naccuracy_level = 4\nimatrix = false\n'
        'search = ["int8", "fp32"]\n'
    )
    slot = targets.load(f).artifacts[0]
    assert [c.label for c in slot.search] == ["onnx-int8-acc4", "onnx-fp32"]


def test_budget_violations_name_metric_value_budget() -> None:
    b = targets.DriftBudget(kld_mean=0.01, top1=0.9, task_accuracy_drop=0.05)
    ok = b.violations({"kld_mean": 0.005, "top1": 0.95, "task_accuracy": 0.9}, reference_accuracy=0.92)
    assert ok == []
    bad = b.violations({"kld_mean": 0.02, "top1": 0.5, "task_accuracy": 0.8}, reference_accuracy=0.92)
    assert len(bad) == 3
    assert any("kld_mean = 0.02" in v and "0.01" in v for v in bad)
    assert b.violations({"kld_mean": float("nan"), "top1": 1.0}, None)


def test_device_profiles_name_their_isa_and_how_to_reach_it() -> None:
    profiles = {p.name: p for p in targets.load_all()}
    assert {"raspberrypi-4", "jetson-orin-nano", "apple-silicon", "linux-x64-avx2"} <= set(profiles)
    for p in profiles.values():
        assert p.notes, p.name
        assert set(p.isa) <= set(targets.ISA_FEATURES)
        if p.arch != "native":
            assert p.isa, f"{p.name} names no ISA features"
        if p.arch == "aarch64":
            assert "neon" in p.isa, p.name
    pi4, pi5 = profiles["raspberrypi-4"], profiles["raspberrypi"]
    assert pi4.ram_mb == 4096 and "dotprod" not in pi4.isa and pi4.bandwidth_gb_s < pi5.bandwidth_gb_s
    assert "dotprod" in pi5.isa and "i8mm" not in pi5.isa  # Cortex-A76: ARMv8.2 dotprod, no i8mm
    assert "dotprod" in profiles["jetson-orin-nano"].isa and "i8mm" not in profiles["jetson-orin-nano"].isa
    assert {"avx2", "fma"} <= set(profiles["linux-x64-avx2"].isa)
    assert "| neon |" in pi4.summary()  # the ISA column: NEON only


def test_isa_and_notes_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    base = 'name = "t"\nthreads = 1\nram_mb = 10\nram_budget_mb = 5\ncontext_length = 8\nbandwidth_gb_s = 1\n'
    art = '[[artifacts]]\nformat = "gguf"\nquant = "q4_0"\n'
    f.write_text(base + 'isa = ["neon", "dotprod"]\nnotes = "build with GGML_NATIVE"\n' + art)
    p = targets.load(f)
    assert p.isa == ("neon", "dotprod") and p.notes == "build with GGML_NATIVE"
    f.write_text(base + 'isa = ["neon", "dotprd"]\n' + art)
    with pytest.raises(EdgeftError, match=r"t\.toml: unknown isa feature\(s\) 'dotprd'.*dotprod"):
        targets.load(f)
    f.write_text(base + 'isa = "avx2"\n' + art)
    with pytest.raises(EdgeftError, match="isa = 'avx2' should be a list"):
        targets.load(f)
    f.write_text(base + 'isa = ["avx2", "avx2"]\n' + art)
    with pytest.raises(EdgeftError, match="twice"):
        targets.load(f)
    f.write_text(base + "notes = 3\n" + art)
    with pytest.raises(EdgeftError, match="notes = 3"):
        targets.load(f)


def test_an_export_refuses_another_formats_option() -> None:
    """Even a level of 0 ("unset" to the builder) is an ONNX option a GGUF export refuses, in one line."""
    from edgeft import formats
    from edgeft.spec import ArtifactSpec

    with pytest.raises(
        EdgeftError, match="m.gguf: accuracy_level applies to onnx quants only, not gguf q4_0"
    ):
        formats.refuse_foreign_options(ArtifactSpec("gguf", "q4_0", accuracy_level=0), "m.gguf")
    formats.refuse_foreign_options(ArtifactSpec("gguf", "q4_0", imatrix=True, head_type="q8_0"), "m.gguf")
