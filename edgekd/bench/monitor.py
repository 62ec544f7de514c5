"""What a bench run samples beside the timing: process memory, GPU memory, and board power on a Jetson.

Numpy and the standard library only (and Python 3.10: this half runs on JetPack 6). Samplers run in a thread
at a coarse interval, so they cost the timed loop next to nothing (the inference calls release the GIL).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, not current, off Linux


class Sampler(threading.Thread):
    """Calls `read()` every `interval` seconds and keeps (timestamp, value) pairs until stopped."""

    def __init__(self, read, interval: float):
        super().__init__(daemon=True)
        self.read, self.interval = read, interval
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            try:
                self.samples.append((time.perf_counter(), float(self.read())))
            except (OSError, ValueError):
                return
            self._stop_event.wait(self.interval)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self._stop_event.set()
        self.join()
        try:
            self.samples.append((time.perf_counter(), float(self.read())))
        except (OSError, ValueError):
            pass


def gpu_memory_mib(pid: int | None = None) -> float | None:
    """This process's GPU memory from nvidia-smi (not on Jetson, whose memory is shared with the CPU)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    pid = pid or os.getpid()
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1])
    return None


# -- Jetson --------------------------------------------------------------------------------------------------
# The parsers take a command's text, the power functions a sysfs root, so tests feed them captured outputs;
# jetson_info() runs the commands. Real captures of the formats: tests/fixtures/jetson/ (see SOURCES.md).


def parse_nvpmodel(text: str | None) -> dict | None:
    """The power mode from `nvpmodel -q`: {"name": "MAXN", "id": 0}, or None when no mode line is there.

    The output is not one line: dev kits with a fan print `NV Fan Mode:quiet` first, JetPack 4 prints
    `NVPM WARN: fan mode is not set!`, non-root runs add `NVPM ERROR` lines after the id, and `--verbose` puts
    `NVPM VERB: Current mode: ` in front of the mode line. The id is the number on the line after the name
    (None where the output has no such line).
    """
    if not text:
        return None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.search(r"NV Power Mode:\s*(\S+)", line)
        if match:
            following = next((s.strip() for s in lines[i + 1:] if s.strip()), "")
            return {"name": match.group(1), "id": int(following) if following.isdigit() else None}
    return None


_CLOCK_LINE = re.compile(  # "cpu0: [Online=1] Go[n]vernor=... MinFreq=...", "GPU MinFreq=...", "EMC ..."
    r"^\s*(?P<unit>cpu\d+|GPU|EMC)\s*:?\s+(?:Online=(?P<online>\d)\s+)?(?:Go\w*=(?P<governor>\S+)\s+)?"
    r"MinFreq=(?P<min>\d+)\s+MaxFreq=(?P<max>\d+)\s+CurrentFreq=(?P<cur>\d+)"
    r"(?:.*?FreqOverride=(?P<override>\d))?")


def _cpu_list(spec: str) -> set[int]:
    """'0-3,5' -> {0, 1, 2, 3, 5} (the kernel's cpu list format)."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            lo, hi = map(int, part.split("-"))
            cpus.update(range(lo, hi + 1))
        elif part.isdigit():
            cpus.add(int(part))
    return cpus


def parse_jetson_clocks(text: str | None) -> dict | None:
    """What `jetson_clocks --show` says about clock pinning, per unit and overall.

    `jetson_clocks` pins each online CPU core (MinFreq raised to MaxFreq), the GPU (MinFreq = MaxFreq) and
    the memory clock (EMC: FreqOverride=1, rate set to MaxFreq; its MinFreq stays). So a CPU core or the GPU
    is pinned when MinFreq == MaxFreq, EMC when FreqOverride == 1. EMC lines without FreqOverride (newer
    scripts) say nothing either way: EMC is then "undetermined" and left out of the decision, as are offline
    cores (they keep their old limits) and DLA/PVA lines. state: "on" when every counted unit is pinned,
    "off" when none is, "partial" otherwise ("unknown" when nothing is left to count). nvpmodel alone can pin
    a unit (a Nano in 5 W mode runs its cores at MinFreq = MaxFreq while the GPU still scales): that is
    "partial", not "on".

    Returns {"state", "units": {name: {"min", "max", "current", "at_max", "pinned", ...}}, "pinned",
    "not_pinned", "offline", "undetermined", "power_mode"}, or None when the text has no clock lines (not run
    as root: the script prints only an error).
    """
    if not text:
        return None
    online_cpus: set[int] | None = None
    units: dict[str, dict] = {}
    power_mode = None
    for line in text.splitlines():
        listed = re.match(r"\s*Online CPUs:\s*([\d,\- ]*)", line)
        if listed:
            online_cpus = _cpu_list(listed.group(1))
            continue
        mode = re.match(r"\s*NV Power Mode:\s*(\S+)", line)
        if mode:
            power_mode = mode.group(1)
            continue
        m = _CLOCK_LINE.match(line)
        if not m:
            continue
        name = m.group("unit")
        lo, hi, cur = int(m.group("min")), int(m.group("max")), int(m.group("cur"))
        unit = {"min": lo, "max": hi, "current": cur, "at_max": cur == hi}
        if name.startswith("cpu"):
            unit["online"] = None if m.group("online") is None else m.group("online") == "1"
            unit["governor"] = m.group("governor")
            unit["pinned"] = lo == hi
        elif name == "GPU":
            unit["pinned"] = lo == hi
        else:  # EMC
            override = m.group("override")
            unit["freq_override"] = None if override is None else override == "1"
            unit["pinned"] = unit["freq_override"]
        units[name] = unit
    if not units:
        return None
    for name, unit in units.items():  # newer scripts print no Online= field: the "Online CPUs:" list says
        if name.startswith("cpu") and unit["online"] is None:
            unit["online"] = online_cpus is None or int(name[3:]) in online_cpus
    offline = [n for n, u in units.items() if n.startswith("cpu") and not u["online"]]
    undetermined = [n for n, u in units.items() if u["pinned"] is None]
    counted = [n for n in units if n not in offline and n not in undetermined]
    pinned = [n for n in counted if units[n]["pinned"]]
    not_pinned = [n for n in counted if not units[n]["pinned"]]
    state = "unknown" if not counted else "on" if not not_pinned else "off" if not pinned else "partial"
    return {"state": state, "units": units, "pinned": pinned, "not_pinned": not_pinned, "offline": offline,
            "undetermined": undetermined, "power_mode": power_mode}


# INA3221 power monitors. JetPack 5/6: hwmon, in<N>_label with in<N>_input (mV) and curr<N>_input (mA), under
# /sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<K>/. JetPack 4: iio, rail_name_<N> with
# in_power<N>_input (mW) (and in_voltage/in_current), under
# /sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device<K>/.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")  # what the whole module draws: Orin Nano/NX, Xavier NX, TX2 / Nano, TX1
# Boards without an input rail, whose module input is the sum of these rails (all of them must be there).
MODULE_INPUT_RAILS = {
    # AGX Orin: the INA3221 at 0x40 measures VDD_GPU_SOC, VDD_CPU_CV and VIN_SYS_5V0 (the module's 5 V
    # system rail, which NVIDIA describes as feeding the IOs and DDR); the one at 0x41 has VDDQ_VDD2_1V8AO
    # between two NC channels: left out, as a DDR/always-on sub-rail it would be counted twice.
    "AGX Orin": ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),
}
_SKIP_LABELS = ("NC", "sum of shunt voltages")


@dataclass(frozen=True)
class PowerRail:
    """One INA3221 channel: `read()` gives watts."""

    name: str
    device: str  # the I2C device, e.g. "1-0040"
    channel: int
    files: tuple[Path, ...]  # (power mW,) or (voltage mV, current mA)

    def read(self) -> float:
        values = [float(f.read_text().strip()) for f in self.files]
        return values[0] / 1e3 if len(values) == 1 else values[0] * values[1] / 1e6


class PowerReader:
    """Board power in watts from one or more INA3221 rails; `rails` and `method` say which and how.

    Call `read()`, or the reader itself.
    """

    def __init__(self, channels: list[PowerRail], method: str):
        self.channels = list(channels)
        self.rails = [c.name for c in self.channels]
        self.method = method

    def read(self) -> float:
        return sum(c.read() for c in self.channels)

    __call__ = read

    def describe(self) -> dict:
        return {"rails": self.rails, "method": self.method}

    def __repr__(self) -> str:
        return f"PowerReader(rails={self.rails}, method={self.method!r})"


def list_power_rails(root: Path = Path("/sys/bus/i2c/drivers")) -> list[PowerRail]:
    """Every labelled INA3221 channel under `root` with readings ("NC", "sum of shunt voltages" left out)."""
    root = Path(root)
    found: dict[tuple[str, int], PowerRail] = {}
    for label in root.glob("ina3221*/*/hwmon/hwmon*/in*_label"):
        n = int(re.fullmatch(r"in(\d+)_label", label.name).group(1))
        volts, amps = label.parent / f"in{n}_input", label.parent / f"curr{n}_input"
        device = label.parent.parent.parent.name
        name = _read_label(label)
        if name and name not in _SKIP_LABELS and volts.is_file() and amps.is_file():
            found.setdefault((device, n), PowerRail(name, device, n, (volts, amps)))
    for label in root.glob("ina3221*/*/iio:device*/rail_name_*"):
        n = int(label.name.rsplit("_", 1)[1])
        device = label.parent.parent.name
        power = label.parent / f"in_power{n}_input"
        volts, amps = label.parent / f"in_voltage{n}_input", label.parent / f"in_current{n}_input"
        files = (power,) if power.is_file() else (volts, amps) if volts.is_file() and amps.is_file() else None
        name = _read_label(label)
        if name and name not in _SKIP_LABELS and files:
            found.setdefault((device, n), PowerRail(name, device, n, files))
    return [found[k] for k in sorted(found)]


def _read_label(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _choose_rails(rails: list[PowerRail]) -> PowerReader | None:
    by_name = {r.name: r for r in rails}
    for name in INPUT_RAILS:
        if name in by_name:
            return PowerReader([by_name[name]], f"input rail {name}: everything the module draws")
    for board, names in MODULE_INPUT_RAILS.items():
        if all(n in by_name for n in names):
            summed = " + ".join(names)
            method = (f"sum of the module's input rails {summed} ({board}: no VDD_IN rail; the carrier "
                      "board's own draw is not measured)")
            return PowerReader([by_name[n] for n in names], method)
    if rails:
        found = ", ".join(r.name for r in rails)
        return PowerReader(rails, f"sum of all {len(rails)} rails found ({found}): no input rail and no "
                                  "known rail layout, so this may over- or under-count")
    return None


def find_power_reader(root: Path = Path("/sys/bus/i2c/drivers")) -> PowerReader | None:
    """The board's power reader: its input rail (VDD_IN, POM_5V_IN) where it has one, else the sum of its
    module input rails (AGX Orin), else the sum of every rail (labelled so). None when no readable rail is
    found (not a Jetson, or the files are root-only: JetPack 4 on a Nano wants `chmod o+r` on them)."""
    reader = _choose_rails(list_power_rails(root))
    if reader is None:
        return None
    try:
        reader.read()
    except (OSError, ValueError):
        return None
    return reader


def _power_monitor_info(root: Path) -> dict | str:
    rails = list_power_rails(root)
    reader = _choose_rails(rails)
    if reader is None:
        return "not exposed"
    info = {**reader.describe(), "available": [r.name for r in rails]}
    try:
        info["watts_now"] = round(reader.read(), 3)
    except (OSError, ValueError) as e:
        info["error"] = f"not readable ({type(e).__name__}: {e}); energy will not be measured"
    return info


def integrate_power(samples: list[tuple[float, float]], inferences: int,
                    window: tuple[float, float] | None = None, min_samples: int = 10,
                    rails: list[str] | None = None, method: str | None = None) -> dict:
    """Average power and energy per inference from timestamped power samples, over the timed window only.

    Only samples inside `window` = (t0, t1) count (None: the whole sampled span), so warm-up and engine
    preparation never leak in (no interpolation across the window's edges either: a sample outside it is
    warm-up power). The average power is the trapezoid average over the in-window samples; energy is that
    average times the window's length, the time the `inferences` took. With fewer than `min_samples` samples
    in the window the figures would be noise: {"refused": reason, "samples": n} comes back instead.
    """
    extra = {k: v for k, v in (("rails", rails), ("method", method)) if v is not None}
    pts = np.array([(t, w) for t, w in samples if np.isfinite(t) and np.isfinite(w)], dtype=float)
    pts = pts.reshape(-1, 2)
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    if window is not None:
        t0, t1 = float(window[0]), float(window[1])
        pts = pts[(pts[:, 0] >= t0) & (pts[:, 0] <= t1)]
        span = f"{t1 - t0:.2f} s timed window"
    elif len(pts):
        t0, t1 = float(pts[0, 0]), float(pts[-1, 0])
        span = f"{t1 - t0:.2f} s sampled span"
    else:
        t0 = t1 = 0.0
        span = "run"
    n = len(pts)
    if n < max(min_samples, 2) or t1 <= t0 or pts[-1, 0] <= pts[0, 0]:
        counted = f"{n} power sample{'' if n == 1 else 's'}"
        return {"refused": f"only {counted} in the {span}; run longer with --duration", "samples": n, **extra}
    if inferences <= 0:
        return {"refused": f"no inferences in the {span}", "samples": n, **extra}
    t, w = pts[:, 0], pts[:, 1]
    average = float(np.sum((w[1:] + w[:-1]) * np.diff(t)) / 2 / (t[-1] - t[0]))
    duration = t1 - t0
    energy = average * duration
    return {"average_w": average, "energy_j": energy, "duration_s": duration, "samples": n,
            "energy_per_inference_mj": 1000 * energy / inferences, **extra}


def _run(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def jetson_info(root: Path = Path("/"), run=_run) -> dict | None:
    """The Jetson's L4T release, power mode, clock pinning and power monitor; None off a Jetson.

    `root` and `run` (command -> stdout or None) are there for tests.
    """
    root = Path(root)
    release = root / "etc/nv_tegra_release"
    if not release.is_file():
        return None
    info: dict = {"l4t": release.read_text().splitlines()[0].strip()}
    mode = parse_nvpmodel(run(["nvpmodel", "-q"]))
    info["nvpmodel"] = mode or "unknown (nvpmodel not readable)"
    clocks = parse_jetson_clocks(run(["jetson_clocks", "--show"]))
    if clocks:
        summary = {k: clocks[k] for k in ("state", "pinned", "not_pinned", "offline", "undetermined")}
        summary["units"] = {n: {k: u[k] for k in ("min", "max", "current", "pinned")}
                            for n, u in clocks["units"].items()}
        info["jetson_clocks"] = summary
    else:
        info["jetson_clocks"] = "unknown (jetson_clocks --show needs root)"
    info["power_monitor"] = _power_monitor_info(root / "sys/bus/i2c/drivers")
    return info


def gpu_info() -> dict | None:
    return parse_gpu_query(_run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader"]))


def parse_gpu_query(text: str | None) -> dict | None:
    """The first GPU of `nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader`; None
    without nvidia-smi. Anything else it printed (its one-line "NVIDIA-SMI has failed because it couldn't
    communicate with the NVIDIA driver") is recorded as such: this runs after all timing, and must not lose a bench."""
    if not text:
        return None
    lines = text.splitlines()
    parts = [p.strip() for p in lines[0].split(",")]
    if len(parts) != 3:
        return {"gpu": None, "nvidia_smi": lines[0].strip()[:200]}
    name, driver, memory = parts
    return {"gpu": name, "driver": driver, "memory": memory, "count": len(lines)}
