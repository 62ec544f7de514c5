"""TensorRT as the device finds it: importing it, and whether an engine was built for this GPU and TensorRT.

Layering: edgekd.runtime. `edgekd build` (edgekd.export.tensorrt_build) imports TensorRT and checks the GPU here
before building; the TensorRT runner imports it here to run an engine; `edgekd bench` refuses an engine built
for another GPU model or TensorRT version here. TensorRT itself is imported inside the functions, never at
module level.
"""

from __future__ import annotations

from pathlib import Path

from edgekd.errors import EdgeKDError

WHERE = ("TensorRT engines are built and run on an NVIDIA GPU with TensorRT 10 or 11: JetPack's own TensorRT on a "
         "Jetson (a venv with --system-site-packages), pip install 'edgekd[trt-cu12]' or 'edgekd[trt-cu13]' on an "
         "x86 server")


def import_tensorrt():
    """The tensorrt module with its bindings, or the one-line error that says where TensorRT comes from."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgeKDError(f"TensorRT is not installed here: {WHERE}") from None
    if not hasattr(trt, "Builder"):  # PyPI's placeholder package imports but has no bindings
        raise EdgeKDError(f"the installed tensorrt package has no runtime libraries: {WHERE}")
    return trt


def trt_major(trt) -> int:
    """TensorRT's major version: 11 dropped the weakly typed networks and their precision flags."""
    return int(trt.__version__.split(".")[0])


def engine_builder():
    """TensorRT and the GPU it will build for, checked before any work: (trt module, GPU identity)."""
    from edgekd.gpu import gpu_identity

    trt = import_tensorrt()
    return trt, gpu_identity()


def check_engine_matches(record: dict, bundle: Path | None = None) -> dict:
    """Refuse an engine built for another GPU model or TensorRT version: TensorRT engines are not portable.

    Returns this GPU's identity. Same model, another physical GPU (UUID) is allowed: NVIDIA ties engines to the
    GPU model, and a fleet of identical GPUs shares one build; the bench record says when the UUID differs.
    """
    trt, here = engine_builder()
    theirs = (record.get("tensorrt"), record.get("gpu"), record.get("compute_capability"))
    ours = (trt.__version__, here["gpu"], here["compute_capability"])
    if theirs != ours:
        raise EdgeKDError(
            f"engine {record.get('file')} was built with TensorRT {theirs[0]} for {theirs[1]} (sm {theirs[2]}), this "
            f"is TensorRT {ours[0]} on {ours[1]} (sm {ours[2]}): rebuild it here with `edgekd build "
            f"{bundle or 'BUNDLE'}`")
    return here


def engine_note(entry: dict, bundle: Path) -> dict:
    """Refuses an engine for another GPU model or TensorRT; records whether it is the very GPU it was built on."""
    here = check_engine_matches(entry, bundle)
    return {"built_on": entry.get("uuid"), "running_on": here.get("uuid"),
            "same_gpu": entry.get("uuid") == here.get("uuid") if entry.get("uuid") and here.get("uuid") else None}
