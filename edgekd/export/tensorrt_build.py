"""TensorRT engines from a bundle's own ONNX files, with the TensorRT 10/11 Python API: `edgekd build`.

Engines are specific to the GPU model and the TensorRT version, so they are built on the device, from the
bundle alone: no PyTorch, no dataset. Networks are strongly typed (TensorRT 11 knows no other kind, and its
FP16/INT8 builder flags are gone): precision comes from the ONNX itself. FP32 builds from model.onnx (TF32
cleared, so "fp32" means FP32), FP16 from model.fp16.onnx, INT8 from the `trt` preset's Q/DQ model.

Layering: export, above edgekd.runtime. TensorRT's import, the GPU check and the engine-identity check that bench
also needs are in edgekd.runtime.tensorrt, the manifest in edgekd.runtime.manifest: this module imports no bench.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from edgekd.errors import EdgeKDError
from edgekd.runio import sha256_file
from edgekd.runtime.manifest import read_manifest, write_manifest
from edgekd.runtime.tensorrt import engine_builder, trt_major
from edgekd.targets import ENGINE_PRECISIONS, engine_target


def build_engine(trt, onnx_path: Path, engine_path: Path, input_shape: tuple[int, ...],
                 batch_range: tuple[int, int, int] = (1, 64, 256), workspace_mb: int = 1024) -> dict:
    """Build and save one serialized engine; returns what the manifest records about how it was built."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if trt_major(trt) >= 11:
        network = builder.create_network(0)  # strongly typed is the only kind
    else:
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeKDError(f"TensorRT cannot parse {onnx_path} ({errors[:300]}): check the Q/DQ report in the "
                          "manifest, or export again")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:  # on by default: FP32 layers would run in TF32 on Ampere and later
        config.clear_flag(tf32)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    lo, opt, hi = batch_range
    profile.set_shape(name, (lo, *input_shape), (opt, *input_shape), (hi, *input_shape))
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeKDError(f"TensorRT failed to build an engine from {onnx_path}: see the TensorRT log above")
    engine_path.write_bytes(bytes(serialized))
    return {"tensorrt": trt.__version__, "tf32": False, "batch_range": list(batch_range),
            "workspace_mb": workspace_mb, "build_s": round(time.perf_counter() - start, 2)}


def _deployment(manifest: dict, target) -> dict:
    """An engine is deployed only if the ONNX model it is built from is: the guard judged that model on validation
    (an INT8 or FP16 model past it is kept in the bundle, marked not deployed), and the engine computes the same."""
    key, source = next(((k, m) for k, m in manifest["models"].items() if m.get("file") == target.builds_from),
                       (None, {}))
    if source.get("deployed", True):
        return {}
    return {"deployed": False, "not_deployed": f"built from {key}, which is not deployed: {source.get('not_deployed')}"}


def build_engines(bundle: Path, precisions: tuple[str, ...] = ("fp32",), batch_range=(1, 64, 256),
                  workspace_mb: int = 1024, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Engines for a bundle from its own ONNX files, recorded in its manifest. Returns {key: manifest entry}.

    An engine already in the manifest is kept when it was built from the same ONNX file, by the same TensorRT,
    for the same GPU model, with the same batch range and workspace; anything else is rebuilt.
    """
    bundle = Path(bundle)
    for p in precisions:
        if p not in ENGINE_PRECISIONS:
            raise EdgeKDError(f"unknown engine precision {p!r}: choose from {', '.join(ENGINE_PRECISIONS)}")
    lo, opt, hi = batch_range
    if not 1 <= lo <= opt <= hi:
        raise EdgeKDError(f"--batch-range {lo},{opt},{hi} must be min <= opt <= max, all >= 1, e.g. 1,64,256")
    manifest = read_manifest(bundle)
    targets = [engine_target(p) for p in precisions]
    for t in targets:  # every source present before the first (slow) build
        if not (bundle / t.builds_from).is_file():
            fix = ("`edgekd export RUN_DIR --target onnx --fp16`" if t.precision == "fp16" else
                   "`edgekd export RUN_DIR --target int8 --int8-preset trt`" if t.precision == "int8" else
                   "`edgekd export RUN_DIR`")
            raise EdgeKDError(f"{bundle} has no {t.builds_from} to build {t.key} from: make it with {fix} "
                              "on the training machine and copy the bundle again")
    trt, identity = engine_builder()
    shape = tuple(manifest["input_shape"])
    built = {}
    for t in targets:
        source_sha = sha256_file(bundle / t.builds_from)
        wanted = {"source": t.builds_from, "source_sha256": source_sha, "tensorrt": trt.__version__,
                  "gpu": identity["gpu"], "compute_capability": identity["compute_capability"],
                  "batch_range": list(batch_range), "workspace_mb": workspace_mb}
        old = manifest["models"].get(t.key)
        if (not force and old and (bundle / t.file).is_file() and all(old.get(k) == v for k, v in wanted.items())
                and old.get("sha256") == sha256_file(bundle / t.file)):
            log(f"{t.key}: current (same ONNX, TensorRT {trt.__version__}, {identity['gpu']}), kept")
            built[t.key] = old
            continue
        log(f"{t.key}: building from {t.builds_from} on {identity['gpu']} with TensorRT {trt.__version__}")
        info = build_engine(trt, bundle / t.builds_from, bundle / t.file, shape, batch_range, workspace_mb)
        entry = {"file": t.file, "precision": t.precision, "format": "tensorrt", "bytes": (bundle / t.file).stat().st_size,
                 "sha256": sha256_file(bundle / t.file), **wanted, **identity, **info, **_deployment(manifest, t)}
        manifest["models"][t.key] = entry
        write_manifest(bundle, manifest)  # after each engine: nothing built is lost to a later failure
        built[t.key] = entry
        log(f"{t.key}: {entry['bytes'] / 2**20:.2f} MiB in {info['build_s']:.1f} s")
    return built
