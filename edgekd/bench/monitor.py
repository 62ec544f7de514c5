"""What a bench run samples beside the timing: process memory, GPU memory, and board power on a Jetson.

Numpy and the standard library only. Samplers run in a thread at a coarse interval, so they cost the timed loop
next to nothing (the inference calls release the GIL).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
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
        self.samples.append((time.perf_counter(), float(self.read())))


def gpu_memory_mib(pid: int | None = None) -> float | None:
    """This process's GPU memory from nvidia-smi (not on Jetson, whose memory is shared with the CPU)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    pid = pid or os.getpid()
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1])
    return None


# -- Jetson --------------------------------------------------------------------------------------------------
def find_vdd_in(root: Path = Path("/sys/bus/i2c/drivers")) -> callable | None:
    """A reader of the board's input power (watts) from its INA3221 monitor, where the board exposes it.

    JetPack 5/6: hwmon files in*_label == "VDD_IN" with in*_input (mV) and curr*_input (mA).
    JetPack 4: iio files rail_name_N == "VDD_IN" (or POM_5V_IN) with in_power N _input (mW).
    """
    for label in sorted(root.glob("ina3221*/*/hwmon/hwmon*/in*_label")):
        if label.read_text().strip() == "VDD_IN":
            n = re.search(r"in(\d+)_label", label.name).group(1)
            volts, amps = label.parent / f"in{n}_input", label.parent / f"curr{n}_input"
            if volts.is_file() and amps.is_file():
                return lambda: float(volts.read_text()) * float(amps.read_text()) / 1e6
    for rail in sorted(root.glob("ina3221x/*/iio:device*/rail_name_*")):
        if rail.read_text().strip() in ("VDD_IN", "POM_5V_IN"):
            n = rail.name.rsplit("_", 1)[1]
            power = rail.parent / f"in_power{n}_input"
            if power.is_file():
                return lambda: float(power.read_text()) / 1e3
    return None


def integrate_power(samples: list[tuple[float, float]], inferences: int) -> dict | None:
    """Average power and energy per inference from timestamped power samples (trapezoid rule)."""
    if len(samples) < 2 or inferences <= 0:
        return None
    t, w = np.array(samples).T
    energy = float(np.trapezoid(w, t)) if hasattr(np, "trapezoid") else float(np.trapz(w, t))
    duration = float(t[-1] - t[0])
    return {"average_w": energy / duration, "energy_j": energy, "duration_s": duration, "samples": len(samples),
            "energy_per_inference_mj": 1000 * energy / inferences}


def _run(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def jetson_info() -> dict | None:
    release = Path("/etc/nv_tegra_release")
    if not release.is_file():
        return None
    info = {"l4t": release.read_text().splitlines()[0].strip()}
    mode = _run(["nvpmodel", "-q"])
    info["nvpmodel"] = mode.splitlines()[0] if mode else "unknown (nvpmodel not readable)"
    clocks = _run(["jetson_clocks", "--show"])
    if clocks:
        info["jetson_clocks"] = "on" if re.search(r"MinFreq=(\d+).*MaxFreq=\1", clocks) else "off or partial"
    else:
        info["jetson_clocks"] = "unknown (needs root)"
    info["power_monitor"] = "VDD_IN" if find_vdd_in() else "not exposed"
    return info


def gpu_info() -> dict | None:
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if not out:
        return None
    name, driver, memory = [p.strip() for p in out.splitlines()[0].split(",")]
    return {"gpu": name, "driver": driver, "memory": memory}
