"""The TensorRT, cuda-python and ONNX Runtime names the device code uses exist in every version it supports.

TensorRT cannot be installed on the machines that run this suite, so its Python API is checked against dumps
of its real binary bindings (tests/fixtures/api/tensorrt-10.3.txt, JetPack 6's TensorRT, and tensorrt-11.4.txt:
names, enum values, return types; make_snapshots.py there says how they are made). cuda-python is checked against snapshots of 12.x and 13.x and against the
installed one; ONNX Runtime's Python API against the installed module, its provider-option keys against a
snapshot.

How a name is found (in DEVICE_FILES, whole files read at test time: whatever they hold today; for runners.py
that is TrtRunner, CudaEventClock and OrtRunner):
  * Roots: `import tensorrt as X` (likewise cuda.bindings.runtime, onnxruntime), a parameter named `trt`,
    `cudart` or `ort`, `require("onnxruntime", ...)` / `importlib.import_module(...)`, and any function of the
    checked files (or KNOWN_ROOTS) that returns one of those: `trt = import_tensorrt()`,
    `trt, identity = engine_builder()`.
  * Types: `trt.Builder(...)` is a Builder; what a method returns or a property holds is what TRT_TYPES,
    CUDA_TYPES or ORT_TYPES say (`Builder.create_network` -> INetworkDefinition). Assignments to locals and
    to `self.x` (across a class's methods), tuple unpacking, arguments to functions of the checked files, and
    `check(...)` (edgekd.gpu's unpacking of cuda-python's `(err, value)`) carry types along. Every `X.name`
    read, written or called on a typed value is a use, checked against the snapshots (pybind11 base classes
    included).
  * A name used on a TensorRT/cuda-python value whose type the tables do not give fails the test, naming the
    table entry to add: nothing on such a value goes unchecked silently.
Guards (a guarded name must exist in one version, not all; in none is still an error, as a typo would be):
  * `if trt_major(trt) >= 11:`: any comparison of `trt_major(...)`, or of a variable assigned from it, with
    an integer, also under `not`/`and`/`or`, in `x if cond else y`, and for the rest of a block after such an
    `if` whose body returns or raises. The branch is checked against the versions it runs on only.
  * `getattr(obj, "NAME", default)`, `hasattr(obj, "NAME")`, and obj.NAME under `if hasattr(obj, "NAME"):`,
    after `if not hasattr(obj, "NAME"): raise`, or right of `hasattr(obj, "NAME") and`.
  * the body of a `try:` with an `except AttributeError` (or a tuple naming it); `except Exception` is none.
Not seen: TensorRT objects that reach code in other files, or go into containers and come back out; the
asserts that uses were found keep the test from passing when the checked files are no longer tracked.

Provider options: a dict literal is a provider-options dict when it is the second item of a 2-tuple
(`(provider, {...})`, the dict written there or in a local variable), an item of `provider_options=[...]`,
or has a `trt_` key. A literal provider name ("TensorrtExecutionProvider"/"CUDAExecutionProvider") picks the
key set; otherwise a dict with a `trt_` key is TensorRT's; otherwise its keys must belong to one of the two.
Keys must be string constants.
"""

from __future__ import annotations

import ast
import importlib
import operator
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "api"
TRT_BUILD = "edgekd/export/tensorrt_build.py"
TRT_RUNTIME = "edgekd/runtime/tensorrt.py"  # TensorRT's import and the engine check, for the build and the runner
RUNNERS = "edgekd/runtime/runners.py"
GPU = "edgekd/gpu.py"  # cuda-python helpers both of the others call
DEVICE_FILES = (TRT_BUILD, TRT_RUNTIME, RUNNERS, GPU)
# Dumps of NVIDIA's real binary bindings (make_snapshots.py tensorrt-wheel): 10.3 is JetPack 6's TensorRT, the
# floor; 11.4 the newest on PyPI when written
TRT_SNAPSHOTS = {"10": "tensorrt-10.3.txt", "11": "tensorrt-11.4.txt"}
CUDA_SNAPSHOTS = {"12": "cuda-python-12.txt", "13": "cuda-python-13.txt"}
ORT_OPTIONS = "onnxruntime-provider-options.txt"

PY = "py"  # a plain Python value (str, int, bool, list, numpy): nothing is checked on it

# What a member gives: the result of calling a method, or the value of a property. A class name means an
# instance of it (enum values included), a tuple the tuple a cuda-python call returns, PY a plain value.
# From the TensorRT Python API reference and the bindings' return types (python/src/infer/*.cpp, pyOnnx.cpp).
TRT_TYPES: dict[str, object] = {
    "__version__": PY,
    "get_plugin_registry": "IPluginRegistry",
    "init_libnvinfer_plugins": PY,
    "volume": PY,
    "nptype": PY,
    "get_nv_onnx_parser_version": PY,
    "ILogger.log": PY,
    "Logger.min_severity": "ILogger.Severity",
    "Builder.create_network": "INetworkDefinition",
    "Builder.create_builder_config": "IBuilderConfig",
    "Builder.create_optimization_profile": "IOptimizationProfile",
    "Builder.build_serialized_network": "IHostMemory",
    "Builder.build_engine_with_config": "ICudaEngine",
    "Builder.is_network_supported": PY,
    "Builder.logger": "ILogger",
    "Builder.get_plugin_registry": "IPluginRegistry",
    "Builder.num_DLA_cores": PY,
    "Builder.max_DLA_batch_size": PY,
    "Builder.max_threads": PY,
    "Builder.platform_has_fast_fp16": PY,
    "Builder.platform_has_fast_int8": PY,
    "Builder.platform_has_tf32": PY,
    "Builder.reset": PY,
    "Runtime.deserialize_cuda_engine": "ICudaEngine",
    "Runtime.load_runtime": "Runtime",
    "Runtime.logger": "ILogger",
    "Runtime.get_plugin_registry": "IPluginRegistry",
    "Runtime.num_DLA_cores": PY,
    "Runtime.DLA_core": PY,
    "Runtime.max_threads": PY,
    "Runtime.engine_host_code_allowed": PY,
    "ICudaEngine.create_execution_context": "IExecutionContext",
    "ICudaEngine.create_execution_context_without_device_memory": "IExecutionContext",
    "ICudaEngine.create_engine_inspector": "EngineInspector",
    "ICudaEngine.create_serialization_config": "ISerializationConfig",
    "ICudaEngine.serialize": "IHostMemory",
    "ICudaEngine.serialize_with_config": "IHostMemory",
    "ICudaEngine.name": PY,
    "ICudaEngine.num_io_tensors": PY,
    "ICudaEngine.num_layers": PY,
    "ICudaEngine.num_optimization_profiles": PY,
    "ICudaEngine.num_aux_streams": PY,
    "ICudaEngine.get_tensor_name": PY,
    "ICudaEngine.get_tensor_mode": "TensorIOMode",
    "ICudaEngine.get_tensor_shape": "Dims",
    "ICudaEngine.get_tensor_dtype": "DataType",
    "ICudaEngine.get_tensor_location": "TensorLocation",
    "ICudaEngine.get_tensor_format": "TensorFormat",
    "ICudaEngine.get_tensor_format_desc": PY,
    "ICudaEngine.get_tensor_profile_shape": PY,  # a list of three Dims
    "ICudaEngine.get_tensor_profile_values": PY,
    "ICudaEngine.get_tensor_bytes_per_component": PY,
    "ICudaEngine.get_tensor_components_per_element": PY,
    "ICudaEngine.get_tensor_vectorized_dim": PY,
    "ICudaEngine.is_shape_inference_io": PY,
    "ICudaEngine.device_memory_size": PY,
    "ICudaEngine.device_memory_size_v2": PY,
    "ICudaEngine.get_device_memory_size_for_profile": PY,
    "ICudaEngine.get_device_memory_size_for_profile_v2": PY,
    "ICudaEngine.engine_capability": "EngineCapability",
    "ICudaEngine.hardware_compatibility_level": "HardwareCompatibilityLevel",
    "ICudaEngine.profiling_verbosity": "ProfilingVerbosity",
    "ICudaEngine.refittable": PY,
    "ICudaEngine.streamable_weights_size": PY,
    "ICudaEngine.weight_streaming_budget_v2": PY,
    "IExecutionContext.engine": "ICudaEngine",
    "IExecutionContext.name": PY,
    "IExecutionContext.set_input_shape": PY,
    "IExecutionContext.get_tensor_shape": "Dims",
    "IExecutionContext.get_tensor_strides": "Dims",
    "IExecutionContext.set_tensor_address": PY,
    "IExecutionContext.get_tensor_address": PY,
    "IExecutionContext.execute_async_v3": PY,
    "IExecutionContext.execute_v2": PY,
    "IExecutionContext.infer_shapes": PY,
    "IExecutionContext.set_optimization_profile_async": PY,
    "IExecutionContext.active_optimization_profile": PY,
    "IExecutionContext.all_binding_shapes_specified": PY,
    "IExecutionContext.all_shape_inputs_specified": PY,
    "IExecutionContext.update_device_memory_size_for_shapes": PY,
    "INetworkDefinition.get_input": "ITensor",
    "INetworkDefinition.get_output": "ITensor",
    "INetworkDefinition.add_input": "ITensor",
    "INetworkDefinition.get_layer": "ILayer",
    "INetworkDefinition.num_inputs": PY,
    "INetworkDefinition.num_outputs": PY,
    "INetworkDefinition.num_layers": PY,
    "INetworkDefinition.name": PY,
    "INetworkDefinition.mark_output": PY,
    "INetworkDefinition.get_flag": PY,
    "INetworkDefinition.flags": PY,
    "INetworkDefinition.builder": "Builder",
    "ITensor.name": PY,
    "ITensor.shape": "Dims",
    "ITensor.dtype": "DataType",
    "ITensor.location": "TensorLocation",
    "ITensor.is_network_input": PY,
    "ITensor.is_network_output": PY,
    "ITensor.is_shape_tensor": PY,
    "ITensor.is_execution_tensor": PY,
    "ILayer.name": PY,
    "ILayer.type": "LayerType",
    "ILayer.num_inputs": PY,
    "ILayer.num_outputs": PY,
    "ILayer.get_input": "ITensor",
    "ILayer.get_output": "ITensor",
    "ILayer.precision": "DataType",
    "ILayer.get_output_type": "DataType",
    "IBuilderConfig.set_memory_pool_limit": PY,
    "IBuilderConfig.get_memory_pool_limit": PY,
    "IBuilderConfig.set_flag": PY,
    "IBuilderConfig.clear_flag": PY,
    "IBuilderConfig.get_flag": PY,
    "IBuilderConfig.flags": PY,
    "IBuilderConfig.add_optimization_profile": PY,
    "IBuilderConfig.num_optimization_profiles": PY,
    "IBuilderConfig.create_timing_cache": "ITimingCache",
    "IBuilderConfig.get_timing_cache": "ITimingCache",
    "IBuilderConfig.set_timing_cache": PY,
    "IBuilderConfig.builder_optimization_level": PY,
    "IBuilderConfig.profiling_verbosity": "ProfilingVerbosity",
    "IBuilderConfig.set_preview_feature": PY,
    "IBuilderConfig.get_preview_feature": PY,
    "IBuilderConfig.hardware_compatibility_level": "HardwareCompatibilityLevel",
    "IBuilderConfig.max_aux_streams": PY,
    "IBuilderConfig.set_tactic_sources": PY,
    "IBuilderConfig.get_tactic_sources": PY,
    "IOptimizationProfile.set_shape": PY,
    "IOptimizationProfile.get_shape": PY,  # a list of three Dims
    "IOptimizationProfile.set_shape_input": PY,
    "IOptimizationProfile.get_shape_input": PY,
    "OnnxParser.parse": PY,
    "OnnxParser.parse_from_file": PY,
    "OnnxParser.supports_model_v2": PY,
    "OnnxParser.supports_operator": PY,
    "OnnxParser.num_errors": PY,
    "OnnxParser.get_error": "ParserError",
    "OnnxParser.clear_errors": PY,
    "OnnxParser.set_flag": PY,
    "OnnxParser.get_flag": PY,
    "ParserError.code": "ErrorCode",
    "ParserError.desc": PY,
    "ParserError.file": PY,
    "ParserError.func": PY,
    "ParserError.line": PY,
    "ParserError.node": PY,
    "ParserError.node_name": PY,
    "ParserError.node_operator": PY,
    "IHostMemory.nbytes": PY,
    "IHostMemory.dtype": "DataType",
    "ITimingCache.serialize": "IHostMemory",
    "ITimingCache.combine": PY,
    "ITimingCache.reset": PY,
    "DataType.itemsize": PY,
}

CUDA_TYPES: dict[str, object] = {  # cuda-python runtime calls return (cudaError_t, values...)
    "cudaGetDeviceCount": ("cudaError_t", PY),
    "cudaGetDeviceProperties": ("cudaError_t", "cudaDeviceProp"),
    "cudaDriverGetVersion": ("cudaError_t", PY),
    "cudaRuntimeGetVersion": ("cudaError_t", PY),
    "cudaGetErrorName": ("cudaError_t", PY),
    "cudaGetErrorString": ("cudaError_t", PY),
    "cudaGetDevice": ("cudaError_t", PY),
    "cudaSetDevice": ("cudaError_t",),
    "cudaStreamCreate": ("cudaError_t", "cudaStream_t"),
    "cudaStreamCreateWithFlags": ("cudaError_t", "cudaStream_t"),
    "cudaStreamSynchronize": ("cudaError_t",),
    "cudaStreamDestroy": ("cudaError_t",),
    "cudaEventCreate": ("cudaError_t", "cudaEvent_t"),
    "cudaEventRecord": ("cudaError_t",),
    "cudaEventSynchronize": ("cudaError_t",),
    "cudaEventElapsedTime": ("cudaError_t", PY),
    "cudaEventDestroy": ("cudaError_t",),
    "cudaMalloc": ("cudaError_t", PY),
    "cudaFree": ("cudaError_t",),
    "cudaMemcpy": ("cudaError_t",),
    "cudaMemcpyAsync": ("cudaError_t",),
    "cudaMemGetInfo": ("cudaError_t", PY, PY),
    "cudaDeviceSynchronize": ("cudaError_t",),
    "cudaDeviceProp.name": PY,  # bytes
    "cudaDeviceProp.major": PY,
    "cudaDeviceProp.minor": PY,
    "cudaDeviceProp.totalGlobalMem": PY,
    "cudaDeviceProp.multiProcessorCount": PY,
    "cudaDeviceProp.uuid": "cudaUUID_t",
    "cudaUUID_t.bytes": PY,
}

ORT_TYPES: dict[str, object] = {
    "get_available_providers": PY,
    "get_device": PY,
    "get_build_info": PY,
    "__version__": PY,
    "InferenceSession.io_binding": "IOBinding",
    "InferenceSession.get_inputs": PY,
    "InferenceSession.get_outputs": PY,
    "InferenceSession.get_providers": PY,
    "InferenceSession.get_provider_options": PY,
    "InferenceSession.run": PY,
    "InferenceSession.run_with_iobinding": PY,
    "InferenceSession.run_with_ort_values": PY,
    "InferenceSession.disable_fallback": PY,
    "InferenceSession.set_providers": PY,
    "IOBinding.bind_ortvalue_input": PY,
    "IOBinding.bind_ortvalue_output": PY,
    "IOBinding.bind_input": PY,
    "IOBinding.bind_output": PY,
    "IOBinding.copy_outputs_to_cpu": PY,
    "IOBinding.get_outputs": PY,
    "IOBinding.synchronize_inputs": PY,
    "IOBinding.synchronize_outputs": PY,
    "OrtValue.ortvalue_from_numpy": "OrtValue",
    "OrtValue.numpy": PY,
    "OrtValue.shape": PY,
    "OrtValue.device_name": PY,
    "OrtValue.data_ptr": PY,
}


@dataclass(frozen=True)
class Lib:
    key: str
    label: str
    modules: tuple[str, ...]  # import paths that give the module
    params: tuple[str, ...]  # parameter names taken to be the module
    types: dict
    table: str  # the name of `types` here, for messages


LIBS = {
    "trt": Lib("trt", "TensorRT", ("tensorrt",), ("trt",), TRT_TYPES, "TRT_TYPES"),
    "cuda": Lib("cuda", "cuda-python", ("cuda.bindings.runtime", "cuda.cudart"), ("cudart",), CUDA_TYPES,
                "CUDA_TYPES"),
    "ort": Lib("ort", "ONNX Runtime", ("onnxruntime",), ("ort",), ORT_TYPES, "ORT_TYPES"),
}
VERSION_FUNCS = {"trt_major": "trt"}  # calls that give a library's major version, for version guards
UNWRAP_FUNCS = {"check"}  # edgekd.gpu.check(cudart, result, doing) and its partial: cuda-python's values
KNOWN_ROOTS = {"import_tensorrt": "trt", "import_cudart": "cuda"}  # used when their own file is not checked


# -- API descriptions ---------------------------------------------------------------------------------------
class Api:
    label = ""
    source = ""

    def has(self, owner: str | None, attr: str) -> bool:
        raise NotImplementedError

    def kind(self, qual: str) -> str | None:
        """'class' or 'enum' for a class of the module, else None."""
        raise NotImplementedError

    def mro(self, qual: str) -> list[str]:
        return [qual]


SNAPSHOT_LINE = re.compile(r"^(?P<name>[\w.]+)(?: \[(?P<kind>class|enum)(?:: (?P<bases>[\w., ]+))?\]| = (?P<value>-?\d+)"
                           r"| -> (?P<returns>[\w.|]+))?$")


class SnapshotApi(Api):
    def __init__(self, path: Path, label: str):
        self.label, self.source = label, str(path.relative_to(ROOT))
        self.header: list[str] = []
        self.names: set[str] = set()
        self.kinds: dict[str, str] = {}
        self.bases: dict[str, list[str]] = {}
        self.values: dict[str, int] = {}  # enum member -> its integer value (the real-binary dumps only)
        self.returns: dict[str, set[str]] = {}  # member -> return types from its pybind11 signature ("py": plain)
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                self.header.append(line)
                continue
            m = SNAPSHOT_LINE.match(line)
            if not m:
                raise ValueError(f"{path}: unreadable line {line!r}")
            self.names.add(m["name"])
            if m["value"] is not None:
                self.values[m["name"]] = int(m["value"])
            if m["returns"]:
                self.returns[m["name"]] = set(m["returns"].split("|"))
            if m["kind"]:
                self.kinds[m["name"]] = m["kind"]
                self.bases[m["name"]] = [b.strip() for b in (m["bases"] or "").split(",") if b.strip()]

    def has(self, owner, attr):
        if owner is None:
            return attr in self.names
        return any(f"{c}.{attr}" in self.names for c in self.mro(owner))

    def kind(self, qual):
        return self.kinds.get(qual)

    def returns_of(self, owner, attr) -> set[str] | None:
        """What a member returns by its signature (inherited members included); None where the dump has none."""
        quals = [f"{c}.{attr}" for c in self.mro(owner)] if owner else [attr]
        return next((self.returns[q] for q in quals if q in self.returns), None)

    def mro(self, qual):
        out, todo = [], [qual]
        while todo:
            c = todo.pop(0)
            if c not in out:
                out.append(c)
                todo.extend(self.bases.get(c, []))
        return out


class LiveApi(Api):
    def __init__(self, module, label: str):
        self.module, self.label, self.source = module, label, f"the installed {module.__name__}"

    def _resolve(self, qual):
        obj = self.module
        for part in qual.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    def has(self, owner, attr):
        obj = self.module if owner is None else self._resolve(owner)
        return obj is not None and hasattr(obj, attr)

    def kind(self, qual):
        obj = self._resolve(qual)
        if not isinstance(obj, type):
            return None
        enum_like = hasattr(obj, "__members__") or any(b.__name__ in ("Enum", "FastEnum")
                                                        for b in obj.__mro__)
        return "enum" if enum_like else "class"


class Schema:
    """What the analysis needs to know of a library: the union of its versions' classes."""

    def __init__(self, apis: list[Api]):
        self.apis = apis

    def kind(self, qual):
        return next((k for a in self.apis if (k := a.kind(qual))), None)

    def mro(self, qual):
        return next((a.mro(qual) for a in self.apis if a.kind(qual)), [qual])

    def canonical(self, qual: str) -> str | None:
        """The class `qual` names, nested classes reached through a subclass included (Logger.Severity is
        ILogger.Severity); None when it names no class."""
        if self.kind(qual):
            return qual
        owner, _, attr = qual.rpartition(".")
        if not owner:
            return None
        return next((f"{c}.{attr}" for c in self.mro(owner) if self.kind(f"{c}.{attr}")), None)


# -- the analysis -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class T:
    """A value's type: a library's module, one of its classes (the class object), an instance, a member
    whose result is looked up in the types table when used, a member the table lacks, a tuple, or a version
    number."""

    lib: str
    kind: str  # module | class | inst | member | unresolved | tuple | version | self
    name: str = ""
    items: tuple = ()


SELF = T("", "self")


@dataclass(frozen=True)
class Ctx:
    versions: dict  # lib -> frozenset of version labels this code runs with
    guards: frozenset = frozenset()  # (lib, owner, attr) known to be checked for before use
    guard_all: bool = False  # inside `try: ... except AttributeError`


@dataclass(frozen=True)
class Use:
    lib: str
    owner: str | None
    attr: str
    path: str
    line: int
    scope: str
    expr: str
    versions: frozenset
    guarded: bool

    @property
    def name(self):
        return f"{self.owner}.{self.attr}" if self.owner else self.attr

    def where(self):
        return f"{self.path}:{self.line} ({self.scope}): `{self.expr}`"


def _meet(a: Ctx, b: Ctx) -> Ctx:
    return Ctx({k: a.versions[k] & b.versions[k] for k in a.versions}, a.guards | b.guards,
               a.guard_all or b.guard_all)


def _join(a: Ctx, b: Ctx) -> Ctx:
    return Ctx({k: a.versions[k] | b.versions[k] for k in a.versions}, a.guards & b.guards,
               a.guard_all and b.guard_all)


def _exits(body: list[ast.stmt]) -> bool:
    if not body:
        return False
    last = body[-1]
    if isinstance(last, (ast.Return, ast.Raise, ast.Continue, ast.Break)):
        return True
    return isinstance(last, ast.If) and _exits(last.body) and _exits(last.orelse)


def _catches_attribute_error(node: ast.Try) -> bool:
    for h in node.handlers:
        names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if any(isinstance(n, ast.Name) and n.id == "AttributeError" for n in names):
            return True
    return False


COMPARE = {ast.GtE: operator.ge, ast.Gt: operator.gt, ast.LtE: operator.le, ast.Lt: operator.lt,
           ast.Eq: operator.eq, ast.NotEq: operator.ne}
FLIP = {ast.GtE: ast.LtE, ast.Gt: ast.Lt, ast.LtE: ast.GtE, ast.Lt: ast.Gt, ast.Eq: ast.Eq,
        ast.NotEq: ast.NotEq}


class Analyzer:
    """Finds every use of a library name in some Python sources (see the module docstring)."""

    def __init__(self, schemas: dict[str, Schema], labels: dict[str, list[str]]):
        self.schemas, self.labels = schemas, labels
        self.active = {k for k, v in labels.items() if v}  # libraries being checked; the others are ignored
        self.func_returns: dict[str, T | None] = {}
        self.param_types: dict[tuple[str, str, str], T] = {}
        self.class_attrs: dict[tuple[str, str], dict[str, T | None]] = {}
        self.functions: dict[tuple[str, str], ast.FunctionDef] = {}
        self.uses: list[Use] = []
        self.problems: list[str] = []
        self.quiet = False

    # entry
    def run(self, sources: dict[str, str]) -> Analyzer:
        trees = {path: ast.parse(text, filename=path) for path, text in sources.items()}
        for tree_path, tree in trees.items():
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.functions[(tree_path, node.name)] = node
                elif isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            self.functions[(tree_path, f"{node.name}.{sub.name}")] = sub
        for final in (False, False, False, True):  # types flow through calls and self.x: let them settle
            self.uses, self.problems, self.quiet = [], [], not final
            for path, tree in trees.items():
                self.path, self.cls, self.returns = path, None, []
                start = Ctx({k: frozenset(v) for k, v in self.labels.items()})
                self.block(tree.body, {}, start, "<module>")
        return self

    # records
    def use(self, lib, owner, attr, node, ctx, scope, guarded=False):
        if self.quiet:
            return
        guarded = guarded or ctx.guard_all or (lib, owner, attr) in ctx.guards
        expr = ast.unparse(node)
        self.uses.append(Use(lib, owner, attr, self.path, node.lineno, scope, expr if len(expr) < 90 else
                             expr[:87] + "...", ctx.versions.get(lib, frozenset()), guarded))

    def problem(self, node, scope, text):
        if not self.quiet:
            self.problems.append(f"{self.path}:{node.lineno} ({scope}): `{ast.unparse(node)[:90]}`: {text}")

    # types
    def from_table(self, lib: str, value) -> T | None:
        if value == PY or value is None:
            return None
        if isinstance(value, tuple):
            return T(lib, "tuple", items=tuple(self.from_table(lib, v) for v in value))
        return T(lib, "inst", value)

    def resolve(self, t: T | None) -> T | None:
        """A member's result, from the library's types table (walking pybind11 base classes)."""
        if t is None or t.kind != "member":
            return t
        lib = LIBS[t.lib]
        owner, _, attr = t.name.rpartition(".")
        keys = [f"{c}.{attr}" for c in self.schemas[t.lib].mro(owner)] if owner else [attr]
        for key in keys:
            if key in lib.types:
                return self.from_table(t.lib, lib.types[key])
        return T(t.lib, "unresolved", t.name)

    def attr_on(self, recv: T | None, attr: str, node, ctx, scope, guarded=False) -> T | None:
        if recv is None or recv.kind in ("tuple", "version", "self") or recv.lib not in self.active:
            return None
        recv = self.resolve(recv)
        if recv is None:
            return None
        lib, schema = LIBS[recv.lib], self.schemas[recv.lib]
        if recv.kind == "unresolved":
            self.problem(node, scope, f"cannot tell what {lib.label}'s {recv.name} gives, so `.{attr}` "
                                      f"on it goes unchecked: add {recv.name!r} to {lib.table} in "
                                      "tests/test_api_surface.py (the class it returns, or PY for a plain "
                                      "value)")
            return None
        if recv.kind == "inst" and schema.kind(recv.name) == "enum" and attr in ("name", "value"):
            return None  # every pybind11 / Python enum member has them
        owner = None if recv.kind == "module" else recv.name
        self.use(recv.lib, owner, attr, node, ctx, scope, guarded)
        qual = f"{owner}.{attr}" if owner else attr
        if cls := schema.canonical(qual):
            return T(recv.lib, "class", cls)
        if recv.kind == "class" and schema.kind(recv.name) == "enum":
            return T(recv.lib, "inst", recv.name)
        return T(recv.lib, "member", qual)

    def call_result(self, ftype: T) -> T | None:
        if ftype.kind == "class":
            return T(ftype.lib, "inst", ftype.name)
        if ftype.kind in ("member", "unresolved"):
            return self.resolve(T(ftype.lib, "member", ftype.name))
        return None

    # statements
    def block(self, body, env, ctx, scope):
        for node in body:
            ctx = self.stmt(node, env, ctx, scope)
        return ctx

    def stmt(self, node, env, ctx, scope):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                self.expr(d, env, ctx, scope)
            self.function(node, env, ctx, scope)
        elif isinstance(node, ast.ClassDef):
            saved = self.cls
            self.cls = node.name
            attrs = self.class_attrs.setdefault((self.path, node.name), {})
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.function(sub, env, ctx, node.name, method=True)
                elif isinstance(sub, (ast.Assign, ast.AnnAssign)) and sub.value is not None:
                    t = self.expr(sub.value, env, ctx, node.name)
                    for target in (sub.targets if isinstance(sub, ast.Assign) else [sub.target]):
                        if isinstance(target, ast.Name) and (t is not None or target.id not in attrs):
                            attrs[target.id] = t
                else:
                    self.stmt(sub, dict(env), ctx, node.name)
            self.cls = saved
        elif isinstance(node, ast.Import):
            for a in node.names:
                lib = self.lib_of_module(a.name)
                bound = a.asname or a.name.split(".")[0]
                env[bound] = T(lib, "module") if lib and (a.asname or "." not in a.name) else None
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                lib = self.lib_of_module(f"{node.module}.{a.name}")
                env[a.asname or a.name] = T(lib, "module") if lib else env.get(a.asname or a.name)
        elif isinstance(node, ast.Assign):
            t = self.expr(node.value, env, ctx, scope)
            for target in node.targets:
                self.bind(target, t, env, ctx, scope)
        elif isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self.bind(node.target, self.expr(node.value, env, ctx, scope), env, ctx, scope)
        elif isinstance(node, ast.AugAssign):
            self.expr(node.value, env, ctx, scope)
            self.target_uses(node.target, env, ctx, scope)
        elif isinstance(node, ast.Return):
            t = self.expr(node.value, env, ctx, scope) if node.value else None
            self.returns.append(t)
        elif isinstance(node, ast.If):
            self.expr(node.test, env, ctx, scope)
            yes, no = self.gate(node.test, env, ctx, scope)
            self.block(node.body, env, yes, scope)
            self.block(node.orelse, env, no, scope)
            if _exits(node.body) and not _exits(node.orelse):
                return no
            if _exits(node.orelse) and not _exits(node.body):
                return yes
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            guarded = replace(ctx, guard_all=True) if _catches_attribute_error(node) else ctx
            self.block(node.body, env, guarded, scope)
            for h in node.handlers:
                if h.name:
                    env[h.name] = None
                self.block(h.body, env, ctx, scope)
            self.block(node.orelse, env, guarded, scope)
            self.block(node.finalbody, env, ctx, scope)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self.expr(node.iter, env, ctx, scope)
            self.bind(node.target, None, env, ctx, scope)
            self.block(node.body, env, ctx, scope)
            self.block(node.orelse, env, ctx, scope)
        elif isinstance(node, ast.While):
            self.expr(node.test, env, ctx, scope)
            yes, _ = self.gate(node.test, env, ctx, scope)
            self.block(node.body, env, yes, scope)
            self.block(node.orelse, env, ctx, scope)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                t = self.expr(item.context_expr, env, ctx, scope)
                if item.optional_vars is not None:
                    self.bind(item.optional_vars, t, env, ctx, scope)
            self.block(node.body, env, ctx, scope)
        else:
            self.generic(node, env, ctx, scope)
        return ctx

    def function(self, node, env, ctx, scope, method=False):
        qual = node.name if scope == "<module>" and not method else f"{scope}.{node.name}"
        fenv = dict(env)
        args = node.args
        params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
        for a in [*params, args.vararg, args.kwarg]:
            if a is not None:
                fenv[a.arg] = None
        for d in [*args.defaults, *args.kw_defaults]:
            if d is not None:
                self.expr(d, env, ctx, scope)
        for i, a in enumerate(params):
            if method and i == 0 and not any(isinstance(d, ast.Name) and d.id == "staticmethod"
                                             for d in node.decorator_list):
                fenv[a.arg] = SELF
                continue
            by_name = next((T(lib.key, "module") for lib in LIBS.values() if a.arg in lib.params), None)
            fenv[a.arg] = by_name or self.param_types.get((self.path, qual, a.arg))
        saved = self.returns
        self.returns = []
        self.block(node.body, fenv, ctx, qual)
        if scope == "<module>":
            self.func_returns[node.name] = next((t for t in self.returns if t is not None), None)
        elif method:
            self.func_returns[f"{self.path}:{qual}"] = next((t for t in self.returns if t is not None), None)
        self.returns = saved

    def lib_of_module(self, dotted: str) -> str | None:
        return next((lib.key for lib in LIBS.values() if dotted in lib.modules), None)

    def bind(self, target, t, env, ctx, scope):
        if isinstance(target, ast.Name):
            env[target.id] = t
        elif isinstance(target, (ast.Tuple, ast.List)):
            items = t.items if t is not None and t.kind == "tuple" else ()
            starred = any(isinstance(e, ast.Starred) for e in target.elts)
            for i, e in enumerate(target.elts):
                if t is not None and t.kind == "unresolved":
                    sub = t
                elif not starred and i < len(items):
                    sub = items[i]
                else:
                    sub = None
                if isinstance(e, ast.Starred):
                    self.bind(e.value, None, env, ctx, scope)
                else:
                    self.bind(e, sub, env, ctx, scope)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                and env.get(target.value.id) is SELF and self.cls:
            attrs = self.class_attrs.setdefault((self.path, self.cls), {})
            if t is not None or attrs.get(target.attr) is None:
                attrs[target.attr] = t
        else:
            self.target_uses(target, env, ctx, scope)

    def target_uses(self, target, env, ctx, scope):
        """An assignment to `obj.attr` (or obj[...]) uses attr of obj's type."""
        if isinstance(target, ast.Attribute):
            recv = self.expr(target.value, env, ctx, scope)
            self.attr_on(recv, target.attr, target, ctx, scope)
        elif isinstance(target, ast.Subscript):
            self.expr(target.value, env, ctx, scope)
            self.expr(target.slice, env, ctx, scope)
        elif isinstance(target, ast.Name):
            pass
        else:
            self.generic(target, env, ctx, scope)

    # guards
    def peek(self, node, env, ctx, scope):
        saved, self.quiet = self.quiet, True
        try:
            return self.expr(node, env, ctx, scope)
        finally:
            self.quiet = saved

    def gate(self, test, env, ctx, scope) -> tuple[Ctx, Ctx]:
        """The contexts in which the true and the false branch of `test` run."""
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            yes, no = self.gate(test.operand, env, ctx, scope)
            return no, yes
        if isinstance(test, ast.BoolOp):
            parts = [self.gate(v, env, ctx, scope) for v in test.values]
            yes, no = parts[0]
            for y, n in parts[1:]:
                if isinstance(test.op, ast.And):
                    yes, no = _meet(yes, y), _join(no, n)
                else:
                    yes, no = _join(yes, y), _meet(no, n)
            return yes, no
        if isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "hasattr" \
                and len(test.args) == 2 and isinstance(test.args[1], ast.Constant):
            recv = self.resolve(self.peek(test.args[0], env, ctx, scope))
            if recv is not None and recv.lib and recv.kind in ("module", "class", "inst"):
                owner = None if recv.kind == "module" else recv.name
                return replace(ctx, guards=ctx.guards | {(recv.lib, owner, test.args[1].value)}), ctx
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in COMPARE:
            left, right, op = test.left, test.comparators[0], type(test.ops[0])
            if isinstance(left, ast.Constant):
                left, right, op = right, left, FLIP[op]
            t = self.peek(left, env, ctx, scope)
            if t is not None and t.kind == "version" and isinstance(right, ast.Constant) \
                    and isinstance(right.value, int):
                labels = ctx.versions[t.lib]
                hold = {v for v in labels
                        if not v[:1].isdigit() or COMPARE[op](int(v.split(".")[0]), right.value)}
                free = {v for v in labels if not v[:1].isdigit() or v not in hold}
                return (Ctx({**ctx.versions, t.lib: frozenset(hold)}, ctx.guards, ctx.guard_all),
                        Ctx({**ctx.versions, t.lib: frozenset(free)}, ctx.guards, ctx.guard_all))
        return ctx, ctx

    # expressions
    def generic(self, node, env, ctx, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, env, ctx, scope)
            elif isinstance(child, ast.stmt):
                self.stmt(child, env, ctx, scope)
            else:
                self.generic(child, env, ctx, scope)

    def expr(self, node, env, ctx, scope) -> T | None:
        if node is None:
            return None
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and env.get(node.value.id) is SELF and self.cls:
                return self.class_attrs.get((self.path, self.cls), {}).get(node.attr)
            recv = self.expr(node.value, env, ctx, scope)
            return self.attr_on(recv, node.attr, node, ctx, scope)
        if isinstance(node, ast.Call):
            return self.call(node, env, ctx, scope)
        if isinstance(node, (ast.Tuple, ast.List)):
            return T("", "tuple", items=tuple(self.expr(e, env, ctx, scope) for e in node.elts))
        if isinstance(node, ast.Subscript):
            t = self.expr(node.value, env, ctx, scope)
            self.expr(node.slice, env, ctx, scope)
            index = node.slice.value if isinstance(node.slice, ast.Constant) else None
            if t is not None and t.kind == "tuple" and isinstance(index, int) \
                    and -len(t.items) <= index < len(t.items):
                return t.items[index]
            return None
        if isinstance(node, ast.IfExp):
            self.expr(node.test, env, ctx, scope)
            yes, no = self.gate(node.test, env, ctx, scope)
            a, b = self.expr(node.body, env, yes, scope), self.expr(node.orelse, env, no, scope)
            return a if a is not None else b
        if isinstance(node, ast.BoolOp):
            here = ctx
            for v in node.values:
                self.expr(v, env, here, scope)
                yes, no = self.gate(v, env, here, scope)
                here = yes if isinstance(node.op, ast.And) else no
            return None
        if isinstance(node, ast.NamedExpr):
            t = self.expr(node.value, env, ctx, scope)
            env[node.target.id] = t
            return t
        if isinstance(node, ast.Lambda):
            inner = dict(env)
            for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                inner[a.arg] = None
            self.expr(node.body, inner, ctx, scope)
            return None
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = dict(env)
            for gen in node.generators:
                self.expr(gen.iter, inner, ctx, scope)
                self.bind(gen.target, None, inner, ctx, scope)
                for cond in gen.ifs:
                    self.expr(cond, inner, ctx, scope)
            for part in ("elt", "key", "value"):
                if hasattr(node, part):
                    self.expr(getattr(node, part), inner, ctx, scope)
            return None
        self.generic(node, env, ctx, scope)
        return None

    def call(self, node, env, ctx, scope) -> T | None:
        f = node.func
        fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        args = node.args
        if isinstance(f, ast.Name) and f.id in ("getattr", "hasattr") and len(args) >= 2 \
                and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
            recv = self.expr(args[0], env, ctx, scope)
            for a in args[2:]:
                self.expr(a, env, ctx, scope)
            guarded = f.id == "hasattr" or len(args) == 3
            t = self.attr_on(recv, args[1].value, node, ctx, scope, guarded=guarded)
            return None if f.id == "hasattr" else t
        ftype = self.expr(f, env, ctx, scope)
        argtypes = [self.expr(a, env, ctx, scope) for a in args]
        kwtypes = {k.arg: self.expr(k.value, env, ctx, scope) for k in node.keywords}
        self.pass_arguments(f, argtypes, kwtypes, env)
        if ftype is not None and ftype.lib and ftype.kind in ("class", "member", "unresolved"):
            return self.call_result(ftype)
        if fname in UNWRAP_FUNCS:
            for t in argtypes:
                if t is not None and t.lib and t.kind == "tuple":
                    rest = t.items[1:]
                    return rest[0] if len(rest) == 1 else T(t.lib, "tuple", items=rest) if rest else None
                if t is not None and t.kind == "unresolved":
                    return t
            return None
        if isinstance(f, ast.Name) and f.id in VERSION_FUNCS:
            return T(VERSION_FUNCS[f.id], "version")
        if fname in ("require", "import_module") and args and isinstance(args[0], ast.Constant):
            lib = self.lib_of_module(str(args[0].value))
            return T(lib, "module") if lib else None
        if isinstance(f, ast.Name):
            if f.id in self.func_returns:
                return self.func_returns[f.id]
            if f.id in KNOWN_ROOTS:
                return T(KNOWN_ROOTS[f.id], "module")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and env.get(f.value.id) is SELF:
            return self.func_returns.get(f"{self.path}:{self.cls}.{f.attr}")
        return None

    def pass_arguments(self, f, argtypes, kwtypes, env):
        """Typed arguments to a function of the checked files type its parameters (from the next pass on)."""
        if isinstance(f, ast.Name):
            key = next(((p, q) for (p, q) in self.functions if q == f.id and p == self.path), None) \
                or next(((p, q) for (p, q) in self.functions if q == f.id), None)
            skip = 0
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and env.get(f.value.id) is SELF:
            key, skip = (self.path, f"{self.cls}.{f.attr}"), 1
            if key not in self.functions:
                return
        else:
            return
        if key is None:
            return
        node = self.functions[key]
        names = [a.arg for a in [*node.args.posonlyargs, *node.args.args]][skip:]
        for name, t in [*zip(names, argtypes, strict=False), *kwtypes.items()]:
            if t is not None and t.lib and name:
                self.param_types.setdefault((key[0], key[1], name), t)


# -- checking uses against versions -------------------------------------------------------------------------
def verify(uses: list[Use], lib: str, apis: dict[str, Api]) -> list[str]:
    label, problems = LIBS[lib].label, []
    hint = "".join(f"`if {f}({LIBS[lib].params[0]}) >= N:`, " for f, k in VERSION_FUNCS.items() if k == lib)
    for u in uses:
        if u.lib != lib:
            continue
        present = [v for v, api in apis.items() if api.has(u.owner, u.attr)]
        if u.guarded:
            if not present:
                problems.append(f"{u.where()}: {u.name} exists in no {label} version checked "
                                f"({', '.join(a.source for a in apis.values())}), guarded or not: a typo?")
            continue
        missing = [v for v in apis if v in u.versions and v not in present]
        if missing:
            problems.append(
                f"{u.where()}: {label} {', '.join(missing)} has no {u.name} "
                f"(see {', '.join(apis[v].source for v in missing)}; "
                f"present in: {', '.join(present) or 'none'}). "
                f"Use the name every version has, or guard it: {hint}`getattr(obj, \"NAME\", None)`, "
                "`hasattr`, `try/except AttributeError`")
    return problems


def analyze(sources: dict[str, str], apis: dict[str, dict[str, Api]]) -> Analyzer:
    schemas = {k: Schema(list(apis.get(k, {}).values())) for k in LIBS}
    labels = {k: list(apis.get(k, {}).keys()) for k in LIBS}
    return Analyzer(schemas, labels).run(sources)


def check_sources(sources: dict[str, str], lib: str, apis: dict[str, Api]) -> tuple[list[str], Analyzer]:
    """Problems with the names `sources` use from `lib`, against the versions in `apis`."""
    result = analyze(sources, {lib: apis})
    unresolved = [p for p in result.problems if f"{LIBS[lib].table} " in p]
    return unresolved + verify(result.uses, lib, apis), result


# -- provider options ---------------------------------------------------------------------------------------
PROVIDER_NAMES = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def provider_option_dicts(source: str, path: str = RUNNERS) -> list[tuple[str | None, ast.Dict, str]]:
    """(provider or None, dict literal, where) for every provider-options dict (see the module docstring)."""
    tree = ast.parse(source)
    found: dict[int, tuple[str | None, ast.Dict, str]] = {}

    def add(d: ast.Dict, provider: str | None):
        """A provider named with the dict wins over one guessed from its keys."""
        keys = [k.value for k in d.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
        old = found.get(id(d))
        if provider is None:
            provider = old[0] if old else None
        if provider is None and any(k.startswith("trt_") for k in keys):
            provider = "TensorrtExecutionProvider"
        found[id(d)] = (provider, d, f"{path}:{d.lineno}")

    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module))]
    for scope in scopes:
        named: dict[str, ast.Dict] = {}
        for n in ast.walk(scope):
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict):
                for t in n.targets:
                    if isinstance(t, ast.Name):
                        named[t.id] = n.value
        for n in ast.walk(scope):
            if isinstance(n, ast.Tuple) and len(n.elts) == 2:
                first, second = n.elts
                d = second if isinstance(second, ast.Dict) else named.get(getattr(second, "id", None))
                if d is not None:
                    named_provider = isinstance(first, ast.Constant) and first.value in PROVIDER_NAMES
                    add(d, first.value if named_provider else None)
            elif isinstance(n, ast.keyword) and n.arg == "provider_options" and isinstance(n.value, ast.List):
                for e in n.value.elts:
                    d = e if isinstance(e, ast.Dict) else named.get(getattr(e, "id", None))
                    if d is not None:
                        add(d, None)
            elif isinstance(n, ast.Dict) and any(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                                 and k.value.startswith("trt_") for k in n.keys):
                add(n, None)
    return list(found.values())


def load_provider_options() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {p: set() for p in PROVIDER_NAMES}
    for line in (FIXTURES / ORT_OPTIONS).read_text().splitlines():
        if line and not line.startswith("#"):
            provider, key = line.split(".", 1)
            keys.setdefault(provider, set()).add(key)
    return keys


def provider_option_problems(source: str, allowed: dict[str, set[str]], path: str = RUNNERS):
    problems, dicts = [], provider_option_dicts(source, path)
    for provider, d, where in dicts:
        for k in d.keys:
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                problems.append(f"{where}: a provider-options key that is not a string constant "
                                f"({ast.unparse(k) if k else '**'}): this test cannot check it")
                continue
            ok = k.value in allowed[provider] if provider else any(k.value in s for s in allowed.values())
            if not ok:
                problems.append(f"{where}: {k.value!r} is no {provider or 'TensorRT or CUDA'} execution "
                                f"provider option of ONNX Runtime (tests/fixtures/api/{ORT_OPTIONS})")
    return problems, dicts


# -- fixtures -----------------------------------------------------------------------------------------------
def _read(rel: str) -> str | None:
    path = ROOT / rel
    return path.read_text() if path.is_file() else None


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    found = {rel: text for rel in DEVICE_FILES if (text := _read(rel)) is not None}
    assert {TRT_BUILD, TRT_RUNTIME, RUNNERS} <= set(found), "the TensorRT code moved: update DEVICE_FILES"
    return found


@pytest.fixture(scope="module")
def trt_apis() -> dict[str, Api]:
    return {v: SnapshotApi(FIXTURES / f, v) for v, f in TRT_SNAPSHOTS.items()}


@pytest.fixture(scope="module")
def cuda_apis() -> dict[str, Api]:
    return {v: SnapshotApi(FIXTURES / f, v) for v, f in CUDA_SNAPSHOTS.items()}


def _fail(problems: list[str]):
    if problems:
        pytest.fail(f"{len(problems)} problem(s):\n" + "\n".join(f"- {p}" for p in problems), pytrace=False)


# -- the snapshots themselves -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*TRT_SNAPSHOTS.values(), *CUDA_SNAPSHOTS.values(), ORT_OPTIONS])
def test_snapshot_is_sorted_with_its_source_in_the_header(name):
    lines = (FIXTURES / name).read_text().splitlines()
    header = [x for x in lines if x.startswith("#")]
    body = [x for x in lines if x and not x.startswith("#")]
    assert lines[:len(header)] == header, "the header comes first"
    assert body == sorted(body) and len(body) == len(set(body)) and len(body) > 50
    text = "\n".join(header)
    if name.startswith("tensorrt"):  # the real binary, named by its sha256
        assert re.search(r"sha256 [0-9a-f]{64}", text) and "tensorrt-cu12-bindings" in text
    elif name.startswith("cuda"):
        assert re.search(r"cuda-bindings \d+\.", text)
    else:
        assert "microsoft/onnxruntime" in text and re.search(r"[0-9a-f]{40}", text)


@pytest.mark.parametrize("version, name", [("10.3.0", "tensorrt-10.3.txt"), ("11.4.0.106", "tensorrt-11.4.txt")])
def test_committed_tensorrt_dumps_are_what_the_real_wheels_give(version, name):
    """.ci/run downloads the real bindings wheels: the dumps are regenerated and must match what is committed."""
    import os
    import sys

    wheels = os.environ.get("EDGEKD_TRT_WHEELS")
    if not wheels:
        pytest.skip("EDGEKD_TRT_WHEELS is not set (.ci/run downloads tensorrt-cu12-bindings 10.3.0 and 11.4.0.106)")
    wheel = next(Path(wheels).glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    sys.path.insert(0, str(FIXTURES))
    try:
        from make_snapshots import tensorrt_wheel_snapshot
    finally:
        sys.path.remove(str(FIXTURES))
    fresh = [x for x in tensorrt_wheel_snapshot(str(wheel)) if not x.startswith("#")]
    committed = [x for x in (FIXTURES / name).read_text().splitlines() if x and not x.startswith("#")]
    assert fresh == committed


def test_snapshots_hold_what_they_should(trt_apis, cuda_apis):
    """Known facts, so that a broken regeneration cannot pass as a new API."""
    for api in trt_apis.values():
        assert api.has("Builder", "create_network") and api.has("IExecutionContext", "execute_async_v3")
        assert api.has("Logger", "WARNING"), "Logger inherits ILogger's exported severities"
        assert api.kind("BuilderFlag") == "enum" and api.has("BuilderFlag", "TF32")
        assert api.has(None, "__version__")
    assert trt_apis["10"].has("BuilderFlag", "INT8") and not trt_apis["11"].has("BuilderFlag", "INT8")
    assert trt_apis["10"].has("Builder", "platform_has_fast_fp16")
    assert not trt_apis["11"].has("Builder", "platform_has_fast_fp16")
    assert "__version__: 10.3.0" in "\n".join(trt_apis["10"].header)  # JetPack 6's, not a newer 10.x
    assert "__version__: 11." in "\n".join(trt_apis["11"].header)
    # the facts a fake must copy: STRONGLY_TYPED moved; execute_async_v3 and set_tensor_address return bool
    assert trt_apis["10"].values["NetworkDefinitionCreationFlag.STRONGLY_TYPED"] == 1
    assert trt_apis["11"].values["NetworkDefinitionCreationFlag.STRONGLY_TYPED"] == 0
    assert not trt_apis["10"].has("Builder", "build_engine_with_config")
    for api in trt_apis.values():
        assert api.returns["IExecutionContext.execute_async_v3"] == {"py"}
        assert api.returns["Builder.create_network"] == {"INetworkDefinition"}
    for api in cuda_apis.values():
        assert api.has("cudaDeviceProp", "uuid") and api.has("cudaMemcpyKind", "cudaMemcpyHostToDevice")
        assert api.has(None, "cudaGetDeviceProperties")
    assert cuda_apis["12"].has("cudaDeviceProp", "clockRate")
    assert not cuda_apis["13"].has("cudaDeviceProp", "clockRate")
    keys = load_provider_options()
    assert {"trt_engine_cache_enable", "trt_profile_min_shapes", "device_id"} \
        <= keys["TensorrtExecutionProvider"]
    assert {"device_id", "gpu_mem_limit", "cudnn_conv_algo_search"} <= keys["CUDAExecutionProvider"]


def test_the_type_table_agrees_with_the_real_signatures(trt_apis):
    """TRT_TYPES was written from the API reference; the real bindings' pybind11 signatures now say what each
    method and property returns: where both speak, they must agree (in every version that has the member)."""
    wrong = []
    for key, value in TRT_TYPES.items():
        want = {"py" if v == PY else v for v in (value if isinstance(value, tuple) else (value,))}
        owner, _, attr = key.rpartition(".")
        for api in trt_apis.values():
            found = api.returns_of(owner or None, attr)
            if found is not None and found != want:
                wrong.append(f"{key}: table says {sorted(want)}, TensorRT {api.label} returns {sorted(found)}")
    _fail(wrong)


def test_type_tables_name_real_members(trt_apis, cuda_apis):
    """A typo in TRT_TYPES / CUDA_TYPES would make the analysis follow a member that does not exist."""
    for table, apis in ((TRT_TYPES, trt_apis), (CUDA_TYPES, cuda_apis)):
        for key, value in table.items():
            owner, _, attr = key.rpartition(".")
            assert any(a.has(owner or None, attr) for a in apis.values()), key
            for v in value if isinstance(value, tuple) else (value,):
                assert v == PY or any(a.kind(v) for a in apis.values()), f"{key} -> {v}"


# -- the device code ----------------------------------------------------------------------------------------
def test_tensorrt_names_exist_in_tensorrt_10_and_11(sources, trt_apis):
    problems, result = check_sources(sources, "trt", trt_apis)
    uses = [u for u in result.uses if u.lib == "trt"]
    # Not vacuous: the builder and the runner are still tracked, from the module down to the engine's methods.
    assert any(u.path == TRT_BUILD and u.owner == "Builder" for u in uses), "no Builder use in the build code"
    assert any(u.path == TRT_RUNTIME and u.scope == "check_engine_matches" for u in uses), \
        "no TensorRT use found in the engine check"
    assert any(u.path == RUNNERS and u.scope.startswith("TrtRunner.") and u.owner == "IExecutionContext"
               for u in uses), "no execution-context use found in TrtRunner"
    _fail(problems)


def test_cudart_names_exist_in_cuda_python_12_and_13(sources, cuda_apis):
    problems, result = check_sources(sources, "cuda", cuda_apis)
    uses = [u for u in result.uses if u.lib == "cuda"]
    assert any(u.scope.startswith("TrtRunner.") for u in uses), "no cudart use found in TrtRunner"
    _fail(problems)


def test_cudart_names_exist_in_the_installed_cuda_python(sources):
    try:
        cudart = importlib.import_module("cuda.bindings.runtime")
    except (ImportError, OSError, RuntimeError) as exc:
        pytest.skip(f"cuda-python (cuda.bindings) cannot be imported here ({exc}); the 12.x/13.x snapshots "
                    "were checked")
    from importlib.metadata import PackageNotFoundError, version

    try:
        label = version("cuda-bindings")
    except PackageNotFoundError:
        label = "installed"
    problems, _ = check_sources(sources, "cuda", {label: LiveApi(cudart, label)})
    _fail(problems)


def test_onnxruntime_names_exist_in_the_installed_onnxruntime(sources):
    ort = pytest.importorskip("onnxruntime")
    apis = {ort.__version__: LiveApi(ort, ort.__version__)}
    problems, result = check_sources({RUNNERS: sources[RUNNERS]}, "ort", apis)
    assert any(u.owner == "InferenceSession" for u in result.uses if u.lib == "ort"), "OrtRunner not tracked"
    _fail(problems)


def test_provider_option_keys_exist_in_onnxruntime(sources):
    problems, dicts = provider_option_problems(sources[RUNNERS], load_provider_options())
    assert any(p == "TensorrtExecutionProvider" and d.keys for p, d, _ in dicts), \
        f"no TensorRT provider-options dict found in {RUNNERS}: if ort-trt is gone, drop this check"
    _fail(problems)


# -- the checker can fail ----------------------------------------------------------------------------------
SELF_TEST = '''
import tensorrt as trt

def build(onnx: bytes, major: int):
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(0)
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)                       # gone in 11
    fast = builder.platform_has_fast_fp16                         # gone in 11
    form = trt.AttentionIOForm.PADDED_BHND                        # new in 11
    name = network.get_input(0).nam                               # a typo, in both
    level = trt.Logger.Severity.WARNING                           # ILogger.Severity, through Logger: fine
    return network
'''

SELF_TEST_GUARDED = '''
import tensorrt as trt
from somewhere import trt_major

def build(trt):
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = builder.create_builder_config()
    if trt_major(trt) < 11:
        config.set_flag(trt.BuilderFlag.INT8)
    major = trt_major(trt)
    form = trt.AttentionIOForm.PADDED_BHND if major >= 11 else None
    if major >= 11:
        pass
    else:
        fast = builder.platform_has_fast_fp16
    int8 = getattr(trt.BuilderFlag, "INT8", None)
    if hasattr(builder, "platform_has_fast_int8") and builder.platform_has_fast_int8:
        pass
    try:
        config.set_flag(trt.BuilderFlag.FP16)
    except AttributeError:
        pass
    if trt_major(trt) >= 11:
        return config
    config.clear_flag(trt.BuilderFlag.FP8)
    return getattr(trt.BuilderFlag, "INT9", None)                 # guarded, but in no version: a typo
'''


def test_a_planted_tensorrt_10_16_call_fails_against_jetpacks_10_3(sources, trt_apis):
    """The build code calling Builder.build_engine_with_config (TensorRT 10.16 and 11 have it, JetPack 6's 10.3 does
    not): the old source snapshot of 10.16 let it pass; the dump of the real 10.3 binary does not."""
    call = "builder.build_serialized_network(network, config)"
    assert call in sources[TRT_BUILD], "the build call moved: plant the name elsewhere"
    planted = {**sources, TRT_BUILD: sources[TRT_BUILD].replace(call, "builder.build_engine_with_config(network, config)")}
    problems, _ = check_sources(planted, "trt", trt_apis)
    assert [p for p in problems if "build_engine_with_config" in p] and all(
        "TensorRT 10 has no Builder.build_engine_with_config" in p for p in problems), problems


def test_self_test_reports_names_missing_in_one_version(trt_apis):
    problems, _ = check_sources({"x.py": SELF_TEST}, "trt", trt_apis)
    text = "\n".join(problems)
    assert "TensorRT 11 has no BuilderFlag.INT8" in text
    assert "TensorRT 11 has no Builder.platform_has_fast_fp16" in text
    assert "TensorRT 10 has no AttentionIOForm" in text
    assert "TensorRT 10, 11 has no ITensor.nam" in text
    assert len(problems) == 5, text  # AttentionIOForm.PADDED_BHND too: nothing else


def test_self_test_accepts_guarded_names(trt_apis):
    problems, result = check_sources({"x.py": SELF_TEST_GUARDED}, "trt", trt_apis)
    assert [p for p in problems if "INT9" not in p] == [], problems
    assert len(problems) == 1 and "exists in no TensorRT version" in problems[0]
    assert any(u.name == "BuilderFlag.FP8" and u.versions == {"10"} for u in result.uses)


def test_self_test_reports_what_it_cannot_resolve(trt_apis):
    source = ("import tensorrt as trt\n"
              "def f(trt):\n"
              "    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b'')\n"
              "    inspector = engine.create_engine_inspector()\n"
              "    return inspector.get_layer_information(0).upper()\n")
    saved = TRT_TYPES.pop("ICudaEngine.create_engine_inspector")
    try:
        problems, _ = check_sources({"x.py": source}, "trt", trt_apis)
    finally:
        TRT_TYPES["ICudaEngine.create_engine_inspector"] = saved
    assert len(problems) == 1 and "add 'ICudaEngine.create_engine_inspector' to TRT_TYPES" in problems[0]
    problems, _ = check_sources({"x.py": source}, "trt", trt_apis)
    assert len(problems) == 1 and "add 'EngineInspector.get_layer_information' to TRT_TYPES" in problems[0]


def test_self_test_follows_calls_self_and_ignores_other_trt_names(trt_apis):
    source = '''
def import_tensorrt():
    import tensorrt as trt
    return trt

def engine_builder():
    trt = import_tensorrt()
    return trt, {}

def helper(rt, blob):
    return rt.deserialize_cuda_engin(blob)                        # typo, reached through a call

class Runner:
    def __init__(self):
        trt, _ = engine_builder()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger())
        self.engine = helper(self.runtime, b"")

    def go(self):
        trt = {"trt_fp16_enable": False}                          # a dict that happens to be called trt
        trt.get("Builder")
        return self.trt.Bulder                                    # typo through self
'''
    problems, _ = check_sources({"x.py": source}, "trt", trt_apis)
    text = "\n".join(problems)
    assert "Runtime.deserialize_cuda_engin" in text and "has no Bulder" in text and len(problems) == 2, text


def test_self_test_cudart(cuda_apis):
    source = '''
from cuda.bindings import runtime as cudart
from edgekd.gpu import check

def f(device):
    props = check(cudart, cudart.cudaGetDeviceProperties(device), "x")
    rate = props.clockRate                                        # gone in cuda-python 13
    err, version = cudart.cudaDriverGetVersion()
    uuid = getattr(getattr(props, "uuid", None), "bytes", None)
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevic            # typo
    return cudart.cudaFooBar(0)                                   # no such function
'''
    problems, _ = check_sources({"x.py": source}, "cuda", cuda_apis)
    text = "\n".join(problems)
    assert "cuda-python 13 has no cudaDeviceProp.clockRate" in text
    assert "cudaMemcpyKind.cudaMemcpyHostToDevic" in text and "has no cudaFooBar" in text
    assert len(problems) == 3, text


def test_self_test_provider_options():
    source = '''
def providers(wanted, cache):
    trt = {"device_id": 0, "trt_engine_cache_enabled": True, "trt_fp16_enable": False}
    return [(wanted, trt), ("CUDAExecutionProvider", {"device_id": 0, "cuda_mem_limit": 1}),
            ("CUDAExecutionProvider", {"trt_fp16_enable": True}), "CPUExecutionProvider"]
'''
    problems, dicts = provider_option_problems(source, load_provider_options(), "x.py")
    text = "\n".join(problems)
    assert len(dicts) == 3
    assert "'trt_engine_cache_enabled' is no TensorrtExecutionProvider" in text
    assert "'cuda_mem_limit' is no CUDAExecutionProvider" in text
    assert "'trt_fp16_enable' is no CUDAExecutionProvider" in text and len(problems) == 3, text
