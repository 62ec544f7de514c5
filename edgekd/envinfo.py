"""Machine facts for run records and `edgekd env`: versions, CPU, threads, GPU. Imports nothing heavy itself."""

from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = ("edgekd", "numpy", "torch", "torchvision", "timm", "onnx", "onnxruntime", "tensorrt", "rich")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
            "cores": os.cpu_count(), "packages": package_versions()}
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
