"""Jetson facts from real command outputs and sysfs layouts: tests/fixtures/jetson/ (sources: SOURCES.md)."""

import json
import re
from pathlib import Path

import pytest

from edgekd.bench.monitor import (
    PowerReader,
    find_power_reader,
    integrate_power,
    jetson_info,
    list_power_rails,
    parse_jetson_clocks,
    parse_nvpmodel,
)

FIXTURES = Path(__file__).parent / "fixtures" / "jetson"
BOARDS = ["nano", "xavier_nx", "orin_nano", "agx_orin"]


def text(name: str) -> str:
    return (FIXTURES / name).read_text()


def sysfs(tmp_path: Path, board: str) -> tuple[Path, dict]:
    """The board's INA3221 sysfs tree, written under tmp_path; returns (the drivers root, what to expect)."""
    spec = json.loads((FIXTURES / board / "power_sysfs.json").read_text())
    root = tmp_path / board / "sys/bus/i2c/drivers"
    for rel, content in spec["files"].items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    return root, spec["expect"]


# -- nvpmodel -q ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("nano/nvpmodel_q_5w.txt", {"name": "5W", "id": 1}),
    ("xavier_nx/nvpmodel_q.txt", {"name": "MODE_15W_2CORE", "id": 0}),
    ("orin_nano/nvpmodel_q.txt", {"name": "15W", "id": 0}),
    ("agx_orin/nvpmodel_q.txt", {"name": "MODE_30W", "id": 2}),
    ("agx_xavier/nvpmodel_q_fan_first.txt", {"name": "MAXN", "id": None}),  # this capture has no id line
])
def test_nvpmodel_every_board(name, expected):
    assert parse_nvpmodel(text(name)) == expected


def test_nvpmodel_fan_mode_line_first_is_not_the_power_mode():
    """Dev kits with a fan print `NV Fan Mode:` before the power mode; the old code took that first line."""
    out = text("xavier_nx/nvpmodel_q.txt")
    assert out.splitlines()[0].startswith("NV Fan Mode")
    assert parse_nvpmodel(out) == {"name": "MODE_15W_2CORE", "id": 0}


def test_nvpmodel_other_forms():
    jetpack4 = "NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN\n0\n"
    assert parse_nvpmodel(jetpack4) == {"name": "MAXN", "id": 0}
    # --verbose prefixes the mode line and follows the id with parameter lines
    verbose = ("NVPM VERB: Config file: /etc/nvpmodel.conf\nNV Fan Mode:quiet\n"
               "NVPM VERB: Current mode: NV Power Mode: MODE_15W_6CORE\n2\n"
               "NVPM VERB: PARAM CPU_ONLINE: ARG CORE_0: PATH /sys/devices/system/cpu/cpu0/online\n")
    assert parse_nvpmodel(verbose) == {"name": "MODE_15W_6CORE", "id": 2}
    assert parse_nvpmodel(None) is None and parse_nvpmodel("") is None
    assert parse_nvpmodel("NVPM ERROR: failed to read PARAM EMC\n") is None


# -- jetson_clocks --show ------------------------------------------------------------------------------------
OLD_REGEX = re.compile(r"MinFreq=(\d+).*MaxFreq=\1")  # what monitor.py used to call "on"


@pytest.mark.parametrize("name, state, pinned, not_pinned, offline", [
    ("nano/jetson_clocks_show_5w.txt", "partial", ["cpu0", "cpu1"], ["GPU", "EMC"], ["cpu2", "cpu3"]),
    ("nano/jetson_clocks_show_5w_after_jetson_clocks.txt", "on", ["cpu0", "cpu1", "GPU", "EMC"], [],
     ["cpu2", "cpu3"]),
    ("xavier_nx/jetson_clocks_show_RECONSTRUCTED.txt", "off", [],
     ["cpu0", "cpu1", "cpu2", "cpu3", "cpu4", "cpu5", "GPU", "EMC"], []),
    ("orin_nano/jetson_clocks_show.txt", "off", [],
     ["cpu0", "cpu1", "cpu2", "cpu3", "cpu4", "cpu5", "GPU", "EMC"], []),
    ("agx_orin/jetson_clocks_show_30w.txt", "off", [],
     ["cpu0", "cpu1", "cpu2", "cpu3", "cpu4", "cpu5", "cpu6", "cpu7", "GPU", "EMC"],
     ["cpu8", "cpu9", "cpu10", "cpu11"]),
    ("agx_orin/jetson_clocks_show_30w_after_jetson_clocks.txt", "on",
     ["cpu0", "cpu1", "cpu2", "cpu3", "cpu4", "cpu5", "cpu6", "cpu7", "GPU", "EMC"], [],
     ["cpu8", "cpu9", "cpu10", "cpu11"]),
])
def test_jetson_clocks_every_board(name, state, pinned, not_pinned, offline):
    got = parse_jetson_clocks(text(name))
    assert got["state"] == state
    assert got["pinned"] == pinned and got["not_pinned"] == not_pinned and got["offline"] == offline
    assert got["undetermined"] == []


def test_jetson_clocks_nano_5w_is_not_on():
    """In 5 W mode nvpmodel pins the Nano's cores (MinFreq = MaxFreq) while the GPU still scales: the old
    one-line regex said "on"; the GPU and EMC are not pinned."""
    out = text("nano/jetson_clocks_show_5w.txt")
    assert OLD_REGEX.search(out)  # the old code's "on"
    got = parse_jetson_clocks(out)
    assert got["state"] == "partial"
    assert got["units"]["GPU"] == {"min": 76800000, "max": 614400000, "current": 460800000, "at_max": False,
                                   "pinned": False}
    assert got["units"]["EMC"]["freq_override"] is False and got["power_mode"] == "5W"


def test_jetson_clocks_old_regex_matched_a_shared_first_digit():
    """`MinFreq=(\\d+).*MaxFreq=\\1` has no word boundary: EMC 204000000 vs 2133000000 share a "2"."""
    out = text("orin_nano/jetson_clocks_show.txt")
    assert OLD_REGEX.search(out)
    assert parse_jetson_clocks(out)["state"] == "off"


def test_jetson_clocks_offline_cores_do_not_count():
    """After jetson_clocks on an AGX Orin in 30 W mode the offline cores keep MinFreq < MaxFreq."""
    got = parse_jetson_clocks(text("agx_orin/jetson_clocks_show_30w_after_jetson_clocks.txt"))
    assert got["state"] == "on"
    assert got["units"]["cpu8"]["online"] is False and got["units"]["cpu8"]["pinned"] is False
    assert "DLA0_CORE" not in got["units"] and got["power_mode"] == "MODE_30W"


def test_jetson_clocks_newer_format_without_online_field_or_freq_override():
    got = parse_jetson_clocks(text("orin_nano/jetson_clocks_show_no_online_field.txt"))
    assert all(got["units"][f"cpu{i}"]["online"] for i in range(6))  # from "Online CPUs: 0-5, Offline CPUs: "
    assert got["units"]["cpu0"]["governor"] == "schedutil"
    assert got["undetermined"] == ["EMC"]  # at MaxFreq, but with no FreqOverride field that proves nothing
    assert got["state"] == "off" and got["not_pinned"] == [f"cpu{i}" for i in range(6)] + ["GPU"]


def test_jetson_clocks_online_list_marks_cores_without_online_field():
    out = ("Online CPUs: 0-1\n"
           "cpu0:  Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: WFI=0\n"
           "cpu2:  Governor=schedutil MinFreq=729600 MaxFreq=1510400 CurrentFreq=729600 IdleStates: WFI=1\n"
           "GPU MinFreq=624750000 MaxFreq=624750000 CurrentFreq=624750000\n")
    got = parse_jetson_clocks(out)
    assert got["offline"] == ["cpu2"] and got["state"] == "on"


def test_jetson_clocks_without_root_is_unknown():
    assert parse_jetson_clocks("Error: Run this script(/usr/bin/jetson_clocks) as a root user") is None
    assert parse_jetson_clocks(None) is None


# -- power rails ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("board", BOARDS)
def test_power_reader_every_board(tmp_path, board):
    root, expect = sysfs(tmp_path, board)
    reader = find_power_reader(root)
    assert isinstance(reader, PowerReader)
    assert reader.rails == expect["rails"] and expect["method"] in reader.method
    assert reader.read() == pytest.approx(expect["watts"])
    assert [r.name for r in list_power_rails(root)] == expect["available"]


def test_agx_orin_has_no_vdd_in_and_sums_its_module_rails(tmp_path):
    """The old find_vdd_in looked for VDD_IN only and found nothing on an AGX Orin."""
    root, _ = sysfs(tmp_path, "agx_orin")
    reader = find_power_reader(root)
    assert reader is not None
    assert reader.rails == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]
    assert "VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0" in reader.method and "no VDD_IN" in reader.method
    assert reader() == pytest.approx(reader.read())  # callable, like the old find_vdd_in's result
    rails = {r.name: r for r in list_power_rails(root)}
    assert "NC" not in rails and "sum of shunt voltages" not in rails
    assert rails["VDDQ_VDD2_1V8AO"].device == "1-0041" and rails["VDDQ_VDD2_1V8AO"].channel == 2


def test_nano_jetpack4_reads_milliwatts(tmp_path):
    root, _ = sysfs(tmp_path, "nano")
    reader = find_power_reader(root)
    assert reader.rails == ["POM_5V_IN"] and reader.channels[0].files[0].name == "in_power0_input"
    assert reader.read() == pytest.approx(1.963)


def test_iio_rail_without_power_file_uses_voltage_times_current(tmp_path):
    root, _ = sysfs(tmp_path, "nano")
    (root / "ina3221x/6-0040/iio:device0/in_power0_input").unlink()
    assert find_power_reader(root).read() == pytest.approx(5008 * 392 / 1e6)


def test_unreadable_rail_gives_no_reader(tmp_path, monkeypatch):
    """JetPack 4 may make the INA3221 files root-only: no reader, and jetson_info says why."""
    root, _ = sysfs(tmp_path, "nano")
    denied = root / "ina3221x/6-0040/iio:device0/in_power0_input"
    read_text = Path.read_text

    def guarded(self, *args, **kwargs):  # chmod 000 does not stop root, so refuse the read here
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", guarded)
    assert [r.name for r in list_power_rails(root)] == ["POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"]
    assert find_power_reader(root) is None
    (tmp_path / "nano/etc").mkdir()
    (tmp_path / "nano/etc/nv_tegra_release").write_text("# R32 (release), REVISION: 7.1\n")
    monitor = jetson_info(tmp_path / "nano", run=lambda cmd: None)["power_monitor"]
    assert monitor["rails"] == ["POM_5V_IN"] and "PermissionError" in monitor["error"]


def test_unknown_layout_sums_every_rail_and_says_so(tmp_path):
    hwmon = tmp_path / "ina3221/1-0040/hwmon/hwmon0"  # synthetic: labels no Jetson rule knows
    hwmon.mkdir(parents=True)
    for n, (label, mv, ma) in enumerate([("RAIL_A", 5000, 100), ("RAIL_B", 5000, 300)], start=1):
        (hwmon / f"in{n}_label").write_text(label + "\n")
        (hwmon / f"in{n}_input").write_text(f"{mv}\n")
        (hwmon / f"curr{n}_input").write_text(f"{ma}\n")
    reader = find_power_reader(tmp_path)
    assert reader.rails == ["RAIL_A", "RAIL_B"] and reader.read() == pytest.approx(2.0)
    assert "sum of all 2 rails" in reader.method and "may over- or under-count" in reader.method


def test_no_monitor_no_reader(tmp_path):
    assert find_power_reader(tmp_path / "none") is None and find_power_reader(tmp_path) is None
    assert list_power_rails(tmp_path / "none") == []


# -- energy over the timed window ----------------------------------------------------------------------------
def ramp(t0: float, t1: float, watts: float, step: float = 0.05) -> list[tuple[float, float]]:
    n = round((t1 - t0) / step)
    return [(t0 + i * step, watts) for i in range(n)]


def test_energy_with_fewer_than_10_samples_is_refused():
    """Three samples made an energy figure before; now it is refused with the reason and the fix."""
    p = integrate_power([(0.0, 5.0), (1.0, 7.0), (2.0, 5.0)], inferences=100)
    assert set(p) == {"refused", "samples"} and p["samples"] == 3
    assert "only 3 power samples" in p["refused"] and "--duration" in p["refused"]
    p = integrate_power(ramp(0.0, 0.3, 5.0), 10, window=(0.0, 0.3), rails=["VDD_IN"], method="input rail")
    assert "refused" in p and "timed window" in p["refused"] and p["rails"] == ["VDD_IN"]


def test_energy_window_excludes_warm_up_samples():
    """50 W during warm-up (0-1 s), 5 W while timed (1-3 s): only the window counts."""
    samples = ramp(0.0, 1.0, 50.0) + ramp(1.0, 3.0, 5.0) + [(3.0, 5.0)]
    whole = integrate_power(samples, 200)
    assert whole["average_w"] > 15  # the warm-up leaks into the whole span
    p = integrate_power(samples, 200, window=(1.0, 3.0), rails=["VDD_IN"], method="input rail VDD_IN")
    assert p["average_w"] == pytest.approx(5.0) and p["energy_j"] == pytest.approx(10.0)
    assert p["duration_s"] == pytest.approx(2.0) and p["samples"] == 41
    assert p["energy_per_inference_mj"] == pytest.approx(50.0)
    assert p["rails"] == ["VDD_IN"] and p["method"] == "input rail VDD_IN"


def test_energy_window_length_not_sample_span():
    """Energy covers the whole timed window, even where the first/last sample is a little inside it."""
    samples = [(1.02 + 0.1 * i, 4.0) for i in range(20)]  # 1.02 .. 2.92
    p = integrate_power(samples, 40, window=(1.0, 3.0))
    assert p["average_w"] == pytest.approx(4.0) and p["energy_j"] == pytest.approx(8.0)


def test_energy_whole_span_two_argument_call():
    samples = [(0.1 * i, 6.0) for i in range(21)]  # 2 s at 6 W
    p = integrate_power(samples, 100)
    assert set(p) == {"average_w", "energy_j", "duration_s", "samples", "energy_per_inference_mj"}
    assert p["energy_j"] == pytest.approx(12.0) and p["average_w"] == pytest.approx(6.0)
    assert p["energy_per_inference_mj"] == pytest.approx(120.0) and p["samples"] == 21


def test_energy_trapezoid_sorted_and_min_samples():
    samples = [(0.1 * i, 5.0 + (i % 2) * 2.0) for i in range(11)]  # alternating 5 and 7 W
    shuffled = samples[5:] + samples[:5]  # Sampler's last sample comes after the thread's: order by time
    p = integrate_power(shuffled, 10)
    assert p["average_w"] == pytest.approx(6.0) and p["samples"] == 11
    assert "refused" in integrate_power(samples, 10, min_samples=12)
    assert "refused" in integrate_power(samples, 0)
    assert "refused" in integrate_power([], 10)


# -- jetson_info ---------------------------------------------------------------------------------------------
def test_jetson_info_uses_the_parsers_and_reports_the_rails(tmp_path):
    drivers, _ = sysfs(tmp_path, "agx_orin")
    root = tmp_path / "agx_orin"
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 38968081\n")
    outputs = {"nvpmodel": text("agx_orin/nvpmodel_q.txt"),
               "jetson_clocks": text("agx_orin/jetson_clocks_show_30w.txt")}
    info = jetson_info(root, run=lambda cmd: outputs[cmd[0]])
    assert info["l4t"].startswith("# R36")
    assert info["nvpmodel"] == {"name": "MODE_30W", "id": 2}
    assert info["jetson_clocks"]["state"] == "off" and info["jetson_clocks"]["offline"][0] == "cpu8"
    assert info["jetson_clocks"]["units"]["GPU"] == {"min": 306000000, "max": 612000000, "current": 306000000,
                                                     "pinned": False}
    monitor = info["power_monitor"]
    assert monitor["rails"] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"] and "sum" in monitor["method"]
    assert monitor["available"][-1] == "VDDQ_VDD2_1V8AO"
    assert monitor["watts_now"] == pytest.approx(6.827, abs=1e-3)
    json.dumps(info)  # goes into bench.json as is


def test_jetson_info_without_commands_or_monitor(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R32 (release), REVISION: 7.1\n")
    info = jetson_info(tmp_path, run=lambda cmd: None)
    assert info["nvpmodel"].startswith("unknown") and info["jetson_clocks"].startswith("unknown")
    assert info["power_monitor"] == "not exposed"
    assert jetson_info(tmp_path / "not-a-jetson") is None
