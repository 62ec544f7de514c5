"""The NVIDIA GPU as the CUDA runtime sees it, through cuda-python (no PyTorch): which GPU, which driver, and
what a failed CUDA call means, named. Used by `edgekd build` and the TensorRT runner alike.
"""

from __future__ import annotations

from edgekd.errors import EdgeKDError

INSTALL = ("pip install 'edgekd[trt-cu12]' (CUDA 12 drivers, JetPack 6: 'edgekd[jetson]') or 'edgekd[trt-cu13]' "
           "(drivers >= 580)")

# The CUDA runtime errors a user meets before the first kernel, and what to do about each.
FIXES = {
    "cudaErrorInsufficientDriver": "the NVIDIA driver is older than this cuda-python's CUDA runtime (compiled into "
                                   "it): install a cuda-python no newer than the driver's CUDA (JetPack 6: "
                                   "'edgekd[jetson]', cuda-python 12.6.x) or update the driver",
    "cudaErrorNoDevice": "no CUDA GPU is visible: check nvidia-smi, CUDA_VISIBLE_DEVICES and the container's --gpus",
    "cudaErrorInitializationError": "the CUDA driver failed to initialise: check nvidia-smi and dmesg",
    "cudaErrorSystemDriverMismatch": "the driver's kernel module and user library differ: reboot or reinstall the "
                                     "driver",
    "cudaErrorCompatNotSupportedOnDevice": "CUDA forward compatibility is not supported on this GPU: update the driver",
}


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise EdgeKDError(f"cuda-python (with cuda.bindings, 12.6.1 or later) is not installed: {INSTALL}") from None
    return cudart


def error_name(cudart, err) -> str:
    try:
        result = cudart.cudaGetErrorName(err)
        name = result[1] if isinstance(result, tuple) else result
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # a broken runtime must still give a line, not a traceback
        return f"CUDA error {int(err)}"


def check(cudart, result, doing: str):
    """Unpack a cuda-python call's (err, *values); on error, one line with the error's name and the fix."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name, note = error_name(cudart, err), driver_note(cudart)
        fix = FIXES.get(name, "check the GPU and driver with nvidia-smi")
        if name == "cudaErrorInsufficientDriver" and "no NVIDIA driver" in note:  # CUDA reports a missing driver so
            fix = "this machine has no NVIDIA driver (libcuda): run on the GPU host, or check nvidia-smi there"
        elif name == "cudaErrorInsufficientDriver":
            fix = insufficient_driver_fix(cudart) or fix
        raise EdgeKDError(f"{doing} failed: {name} (CUDA error {int(err)}{note}): {fix}")
    return values[0] if len(values) == 1 else values


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def insufficient_driver_fix(cudart) -> str | None:
    """The pin that matches the driver: cuda-python's runtime version against the driver's CUDA version (a
    cuda-python of the driver's major is not enough: 12.9's runtime fails on JetPack 6's CUDA 12.6 driver)."""
    try:
        _, runtime = cudart.cudaRuntimeGetVersion()
        err, driver = cudart.cudaDriverGetVersion()
    except Exception:  # no libcuda to ask
        return None
    if int(err) != 0 or not driver or not runtime or runtime <= driver:
        return None
    major, minor = driver // 1000, driver % 1000 // 10
    return (f"this cuda-python's CUDA runtime is {_cuda_version(runtime)}, the driver supports CUDA "
            f"{_cuda_version(driver)}: pip install 'cuda-python>={major}.{minor},<{major}.{minor + 1}' "
            f"(on JetPack 6: 'edgekd[jetson]'), or update the driver")


def driver_note(cudart) -> str:
    try:
        err, version = cudart.cudaDriverGetVersion()
    except Exception:
        return ""
    if int(err) != 0 or not version:
        return "; no NVIDIA driver found"
    return f"; driver supports CUDA {version // 1000}.{version % 1000 // 10}"


def gpu_identity(device: int = 0) -> dict:
    """Name, compute capability, UUID and driver CUDA version of a GPU: what a TensorRT engine is tied to."""
    cudart = import_cudart()
    count = check(cudart, cudart.cudaGetDeviceCount(), "finding a CUDA GPU")
    if count == 0:
        raise EdgeKDError(f"no CUDA GPU is visible here: {FIXES['cudaErrorNoDevice']}")
    props = check(cudart, cudart.cudaGetDeviceProperties(device), "reading the GPU's properties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    identity = {"gpu": name.split("\x00")[0].strip(), "compute_capability": f"{props.major}.{props.minor}"}
    uuid = getattr(getattr(props, "uuid", None), "bytes", None)
    if uuid:
        raw = bytes(uuid) if not isinstance(uuid, str) else uuid.encode("latin-1")
        h = raw.hex()
        identity["uuid"] = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"  # as nvidia-smi -L prints it
    err, version = cudart.cudaDriverGetVersion()
    if int(err) == 0:
        identity["driver_cuda"] = f"{version // 1000}.{version % 1000 // 10}"
    return identity
