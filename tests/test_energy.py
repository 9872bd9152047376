"""Energy per token on the device (edgeft/device/bench_on_device.py): each reader against a fake sysfs tree
or command output shaped as its documentation describes it, counter wrap-around, missing permissions, the
sampler's integration, and "not available" (never a number) on a machine without a counter."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgeft.device import bench_on_device as bod


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- Linux powercap / RAPL ------------------------------------------------------------------------------------
# ref: Linux Documentation/power/powercap/powercap.rst: /sys/class/powercap/intel-rapl:N (a package) with
# name ("package-N", or "psys" for the platform), energy_uj (cumulative µJ) and max_energy_range_uj (where
# energy_uj wraps to 0); intel-rapl:N:M are its subzones (core, uncore, dram), counted inside the package.


def _rapl_zone(root: Path, zone: str, name: str, energy: int, max_range: int = 262143328850) -> Path:
    z = root / "class" / "powercap" / zone
    _write(z / "name", name + "\n")
    _write(z / "energy_uj", f"{energy}\n")
    _write(z / "max_energy_range_uj", f"{max_range}\n")
    return z


def test_rapl_sums_the_packages_not_their_subzones(tmp_path: Path) -> None:
    p0 = _rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    _rapl_zone(tmp_path, "intel-rapl:0:0", "core", 500_000)
    p1 = _rapl_zone(tmp_path, "intel-rapl:1", "package-1", 7_000_000)
    source, why = bod.find_energy_source(tmp_path, run=lambda cmd: None, which=lambda name: None)
    assert source is not None and why == ""
    assert (source.name, source.kind, source.detail) == ("rapl", "counter", "powercap package-0+package-1")
    assert source.read() == 0.0  # joules since the first reading
    _write(p0 / "energy_uj", "3500000\n")  # +2.5 J
    _write(p1 / "energy_uj", "7250000\n")  # +0.25 J
    _write(tmp_path / "class" / "powercap" / "intel-rapl:0:0" / "energy_uj", "99999999\n")  # not counted
    assert source.read() == pytest.approx(2.75)


def test_rapl_counter_wrap_around(tmp_path: Path) -> None:
    z = _rapl_zone(tmp_path, "intel-rapl:0", "package-0", 999_000, max_range=1_000_000)
    source, _ = bod.find_energy_source(tmp_path, run=lambda cmd: None, which=lambda name: None)
    assert source is not None
    source.read()
    _write(z / "energy_uj", "1000\n")  # wrapped at 1_000_000: 1_000 µJ to the top, 1_000 after
    assert source.read() == pytest.approx(0.002)
    _write(z / "energy_uj", "501000\n")
    assert source.read() == pytest.approx(0.502)


def test_rapl_prefers_the_platform_zone(tmp_path: Path) -> None:
    _rapl_zone(tmp_path, "intel-rapl:0", "package-0", 10)
    _rapl_zone(tmp_path, "intel-rapl:1", "psys", 20)
    source, _ = bod.find_energy_source(tmp_path, run=lambda cmd: None, which=lambda name: None)
    assert source is not None and source.detail == "powercap psys"


def test_rapl_readable_by_root_only_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Since Linux 5.10 energy_uj is mode 0400 (CVE-2020-8694); the tests run as root, so the denial is
    played by the reader."""
    _rapl_zone(tmp_path, "intel-rapl:0", "package-0", 10)
    real = bod._read_text

    def denied(path: str) -> str:
        if path.endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(bod, "_read_text", denied)
    source, why = bod.find_energy_source(tmp_path, run=lambda cmd: None, which=lambda name: None)
    assert source is None
    assert "energy_uj is readable by root only" in why and "CVE-2020-8694" in why


# --- NVIDIA Jetson INA3221 ------------------------------------------------------------------------------------
# ref: Linux Documentation/hwmon/ina3221.rst: in[123]_input bus voltage (mV), curr[123]_input current (mA),
# in[123]_label the rail's name (JetPack 5/6 device trees label the module input VDD_IN). JetPack 4's
# ina3221x iio driver: in_power[012]_input (mW) and rail_name_[012].


def test_jetson_hwmon_reads_the_module_input_rail(tmp_path: Path) -> None:
    hw = tmp_path / "bus" / "i2c" / "drivers" / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    for n, (label, mv, ma) in enumerate(
        [("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 400), ("VDD_SOC", 5000, 300)], start=1
    ):
        _write(hw / f"in{n}_label", label + "\n")
        _write(hw / f"in{n}_input", f"{mv}\n")
        _write(hw / f"curr{n}_input", f"{ma}\n")
    # in4-in7 are shunt voltages in µV and curr4 the summed current (mainline ina3221): never power rails;
    # a channel labelled NC is unconnected, a disabled one reads nothing
    _write(hw / "in4_input", "123456\n")
    _write(hw / "curr4_input", "1900\n")
    source, _ = bod.find_energy_source(tmp_path, run=lambda cmd: None, which=lambda name: None)
    assert source is not None and (source.name, source.kind) == ("jetson-ina3221", "power")
    assert source.detail == "INA3221 VDD_IN" and source.read() == pytest.approx(6.0)  # 5 V × 1.2 A
    # without a VDD_IN label every connected, enabled rail of channels 1-3 counts
    (hw / "in1_label").write_text("VDD_GPU\n")
    (hw / "in3_label").write_text("NC\n")
    source, _ = bod.find_energy_source(tmp_path, run=lambda cmd: None, which=lambda name: None)
    assert source is not None and source.read() == pytest.approx(5 * (1.2 + 0.4))
    _write(hw / "in2_enable", "0\n")
    source, _ = bod.find_energy_source(tmp_path, run=lambda cmd: None, which=lambda name: None)
    assert source is not None and source.read() == pytest.approx(5 * 1.2)


def test_jetson_iio_power_in_milliwatts(tmp_path: Path) -> None:
    dev = tmp_path / "bus" / "i2c" / "drivers" / "ina3221x" / "6-0040" / "iio:device0"
    _write(dev / "rail_name_0", "POM_5V_IN\n")
    _write(dev / "in_power0_input", "4800\n")
    _write(dev / "rail_name_1", "POM_5V_GPU\n")
    _write(dev / "in_power1_input", "900\n")
    source, _ = bod.find_energy_source(tmp_path, run=lambda cmd: None, which=lambda name: None)
    assert source is not None and source.detail == "INA3221 POM_5V_IN" and source.read() == pytest.approx(4.8)


# --- Raspberry Pi 5 PMIC ---------------------------------------------------------------------------------------
# ref: Raspberry Pi documentation, computers/os.adoc "vcgencmd": pmic_read_adc (Raspberry Pi 5) prints each
# rail's current and voltage, one per line, as below (values from a Pi 5 at idle).
PMIC_ADC = """\
 3V7_WL_SW_A current(0)=0.00390372A
   3V3_SYS_A current(1)=0.05368340A
   1V8_SYS_A current(2)=0.15617700A
  DDR_VDD2_A current(3)=0.01952120A
  DDR_VDDQ_A current(4)=0.00000000A
   1V1_SYS_A current(5)=0.18741000A
   0V8_SYS_A current(6)=0.34358800A
  VDD_CORE_A current(7)=0.79470000A
 3V7_WL_SW_V volt(8)=3.74737000V
   3V3_SYS_V volt(9)=3.31591000V
   1V8_SYS_V volt(10)=1.79987000V
  DDR_VDD2_V volt(11)=1.11186000V
  DDR_VDDQ_V volt(12)=0.60708200V
   1V1_SYS_V volt(13)=1.10502000V
   0V8_SYS_V volt(14)=0.80073200V
  VDD_CORE_V volt(15)=0.72036100V
     EXT5V_V volt(24)=5.15606000V
      BATT_V volt(25)=0.00683760V
"""


def test_pi5_pmic_sums_current_times_voltage_per_rail() -> None:
    want = (
        0.00390372 * 3.74737
        + 0.0536834 * 3.31591
        + 0.156177 * 1.79987
        + 0.0195212 * 1.11186
        + 0.0 * 0.607082
        + 0.18741 * 1.10502
        + 0.343588 * 0.800732
        + 0.7947 * 0.720361
    )
    assert bod.parse_pmic_adc(PMIC_ADC) == pytest.approx(want)  # EXT5V_V and BATT_V have no current: out
    assert bod.parse_pmic_adc('error=1 error_msg="Command not registered"') is None


def test_pi5_pmic_through_vcgencmd(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def run(cmd: list[str]) -> str | None:
        calls.append(cmd)
        return PMIC_ADC

    source, _ = bod.find_energy_source(tmp_path, run=run, which=lambda name: f"/usr/bin/{name}")
    assert source is not None and (source.name, source.kind) == ("pi5-pmic", "power")
    assert source.read() == pytest.approx(bod.parse_pmic_adc(PMIC_ADC))
    assert calls[-1] == ["vcgencmd", "pmic_read_adc"]
    # a Raspberry Pi 4's firmware has no PMIC ADC: vcgencmd fails, so there is no source (and no number)
    source, why = bod.find_energy_source(
        tmp_path, run=lambda cmd: None, which=lambda name: "/usr/bin/vcgencmd"
    )
    assert source is None and "no energy or power counter" in why


# --- integration over time, and the machine without a counter ---------------------------------------------------


def test_sampler_integrates_power_and_reads_counters() -> None:
    t0 = time.perf_counter()
    power = bod.EnergySource("fake", "power", lambda: 2.0, "2 W", 0.01)
    counter = bod.EnergySource("fake", "counter", lambda: 3.0 * (time.perf_counter() - t0), "3 W", 0.01)
    for source, watts in ((power, 2.0), (counter, 3.0)):
        with bod.EnergySampler(source) as s:
            a = time.perf_counter()
            time.sleep(0.2)
            b = time.perf_counter()
            time.sleep(0.05)
        assert s.error is None and len(s.times) >= 5
        assert s.between(a, b) == pytest.approx(watts * (b - a), rel=0.15)
    marks = [(a, a + 0.05, b)]
    e = bod.phase_energy(s, marks, prompt_tokens=10, decode_tokens=30)
    assert e["prefill_j_per_token"] == pytest.approx(3.0 * 0.05 / 10, rel=0.2)
    assert e["decode_j_per_token"] == pytest.approx(3.0 * (b - a - 0.05) / 30, rel=0.2)
    assert e["decode_w"] == pytest.approx(3.0, rel=0.2)
    assert bod.idle_watts(power, seconds=0.1) == pytest.approx(2.0)


def test_a_phase_shorter_than_the_samples_gets_no_number() -> None:
    """A burst between two power readings is invisible to them: a window under MIN_SAMPLES_PER_WINDOW
    readings gets no figure and says which setting to raise."""
    source = bod.EnergySource("fake", "power", lambda: 2.0, "2 W", 0.05)
    with bod.EnergySampler(source) as s:
        a = time.perf_counter()
        time.sleep(0.02)
        b = time.perf_counter()
        time.sleep(0.4)
        c = time.perf_counter()
    e = bod.phase_energy(s, [(a, b, c)], prompt_tokens=8, decode_tokens=40)
    assert (
        e["prefill_j_per_token"] is None and "prefill lasted" in e["note"] and "--prompt-tokens" in e["note"]
    )
    assert e["decode_j_per_token"] == pytest.approx(2.0 * (c - b) / 40, rel=0.15)


def test_a_counter_that_never_moves_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    stuck = bod.EnergySource("rapl", "counter", lambda: 0.0, "powercap psys", 0.02)
    monkeypatch.setattr(bod, "find_energy_source", lambda *a, **k: (stuck, ""))
    monkeypatch.setattr(bod, "IDLE_SECONDS", 0.1)
    a = argparse.Namespace(energy=True)
    facts = bod.energy_facts(a)
    assert facts["available"] is False and "did not advance" in facts["reason"] and a.energy is False


def test_a_source_that_stops_answering_gives_an_error_not_a_number() -> None:
    reads = [0]

    def read() -> float:  # answers twice, then the sysfs file goes away (an unplugged monitor)
        reads[0] += 1
        if reads[0] > 2:
            raise FileNotFoundError(2, "No such file or directory", "in1_input")
        return 1.0

    source = bod.EnergySource("flaky", "power", read, "", 0.01)
    with bod.EnergySampler(source) as s:
        time.sleep(0.1)
    assert s.error is not None
    assert bod.phase_energy(s, [(0.0, 1.0, 2.0)], 1, 1) == {"error": s.error}


def test_no_counter_here_is_not_available(tmp_path: Path) -> None:
    """The build machine (a VM without powercap) has none: the benchmark says so, with no number."""
    import argparse

    source, why = bod.find_energy_source(tmp_path, run=lambda cmd: None, which=lambda name: None)
    assert source is None and why.startswith("no energy or power counter here")
    if not Path("/sys/class/powercap").exists() and not Path("/sys/bus/i2c/drivers").exists():
        a = argparse.Namespace(energy=True)
        facts = bod.energy_facts(a)
        assert facts == {"available": False, "reason": bod.find_energy_source()[1]} and a.energy is False


def test_the_report_shows_energy_per_token_or_why_not() -> None:
    from edgeft import bundle

    def manifest(energy: dict, art_energy: dict | None) -> dict:
        art = {"path": "model-q4_0.gguf", "status": "ok", "energy": art_energy, "sweep": []}
        result = {"device": {"energy": energy}, "artifacts": [art]}
        return {"artifacts": [], "device_latency": [{"where": "pi@pi5", "recorded": "now", "result": result}]}

    measured = {"available": True, "detail": "PMIC rails (vcgencmd pmic_read_adc)", "idle_w": 2.5}
    per_token = {"decode_j_per_token": 0.125, "prefill_j_per_token": 0.004, "decode_w": 6.75}
    text = bundle.render_device_section(manifest(measured, per_token))
    assert "Energy (PMIC rails (vcgencmd pmic_read_adc); idle 2.50 W, measured first):" in text
    assert "model-q4_0.gguf: 0.1250 J per decoded token, 0.00400 J per prompt token, 6.75 W" in text
    assert "(+4.25 W over idle)" in text
    why = "no energy or power counter here (looked for ...)"
    text = bundle.render_device_section(manifest({"available": False, "reason": why}, None))
    assert f"Energy: not available ({why})." in text and "J per" not in text
