"""Machine facts for run records and `edgekd env`: versions, CPU, threads, GPU. Imports nothing heavy itself."""

from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = ("edgekd", "numpy", "torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
            "openvino", "executorch", "rich")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features inference speed depends on: x86 SIMD widths and int8/bf16 dot products, Arm NEON and dot product.
_ARM_NAMES = {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16"}
_SPEED_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8", "neon", "dotprod", "i8mm", "bf16", "fp16",
                "sve", "sve2")


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The speed-relevant CPU flags /proc/cpuinfo lists (avx2, avx512*, vnni, amx*, neon, dotprod, ...), Arm
    feature names given their usual names (asimd = neon, asimddp = dotprod); empty where it cannot be read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            names = {_ARM_NAMES.get(n, n) for n in value.split()}
            return sorted(n for n in names if n in _SPEED_FLAGS or n.startswith(("avx512", "amx")))
    return []


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(with_torch: bool = True) -> dict:
    info = {"python": platform.python_version(), "os": platform.platform(), "cpu": cpu_model(),
            "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "packages": package_versions()}
    if with_torch:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["compute_capability"] = f"{props.major}.{props.minor}"
            info["cuda_version"] = torch.version.cuda
        info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return info
