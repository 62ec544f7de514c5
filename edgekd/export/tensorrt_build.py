"""TensorRT engines from the bundle's ONNX models, with the TensorRT 10/11 Python API, imported lazily.

Networks are strongly typed (required by TensorRT 11, where the FP16/INT8 builder flags are gone): precision
comes from the ONNX itself. FP32 builds from model.onnx, FP16 from model.fp16.onnx (weights and compute in
half, exported by torch), INT8 from the `trt` preset's Q/DQ model (explicit quantization).
"""

from __future__ import annotations

from pathlib import Path

from edgekd.errors import EdgeKDError

WHERE = ("TensorRT engines are built and run on an NVIDIA GPU (x86 server or Jetson) with TensorRT 10 or 11: "
         "`pip install tensorrt cuda-python` there (JetPack ships both)")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgeKDError(f"TensorRT is not installed here: {WHERE}") from None
    if not hasattr(trt, "Builder"):  # PyPI's placeholder package imports but has no bindings
        raise EdgeKDError(f"the installed tensorrt package has no runtime libraries: {WHERE}")
    return trt


def gpu_identity() -> dict:
    """Name and compute capability of GPU 0, from the CUDA runtime (no torch)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise EdgeKDError(f"cuda-python is not installed: {WHERE}") from None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise EdgeKDError(f"no CUDA GPU is visible here: {WHERE}")
    err, props = cudart.cudaGetDeviceProperties(0)
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def build_engine(onnx_path: Path, engine_path: Path, input_shape: tuple[int, int, int],
                 batch_range: tuple[int, int, int] = (1, 64, 256), workspace_mb: int = 1024) -> dict:
    """Build and save a serialized engine; returns what the manifest records about it."""
    trt = import_tensorrt()
    identity = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    major = int(trt.__version__.split(".")[0])
    network = builder.create_network(0 if major >= 11 or flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeKDError(f"TensorRT cannot parse {onnx_path} ({errors[:300]}): check the Q/DQ report in the "
                          "manifest, or export again")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    lo, opt, hi = batch_range
    profile.set_shape(name, (lo, *input_shape), (opt, *input_shape), (hi, *input_shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeKDError(f"TensorRT failed to build an engine from {onnx_path}: see the TensorRT log above")
    engine_path.write_bytes(bytes(serialized))
    return {"tensorrt": trt.__version__, **identity, "batch_range": list(batch_range), "source": Path(onnx_path).name}


def check_engine_matches(record: dict) -> None:
    """Refuse an engine built for another GPU or TensorRT version: TensorRT engines are not portable."""
    trt = import_tensorrt()
    here = gpu_identity()
    if record.get("tensorrt") != trt.__version__ or record.get("compute_capability") != here["compute_capability"]:
        raise EdgeKDError(
            f"engine was built with TensorRT {record.get('tensorrt')} for {record.get('gpu')} (sm "
            f"{record.get('compute_capability')}), this is TensorRT {trt.__version__} on {here['gpu']} (sm "
            f"{here['compute_capability']}): rebuild it here with `edgekd export RUN_DIR --target trt`"
        )
