"""The INT8 mechanism: ONNX Runtime static quantization of one FP32 model, and the scoring of what it makes.

Two presets: `cpu` (U8 activations, S8 per-channel weights, Q/DQ: fast on ORT's x86/ARM kernels) and `trt`
(symmetric S8 activations and weights, per-channel weights, dedicated Q/DQ pairs: TensorRT's explicit
quantization). The FP32 graph goes through ORT's quantization pre-processing first: without it, initializers the
exporter shares through Identity nodes leave convolutions unquantised and the "INT8" model runs slower than FP32.

Every model starts from ONNX Runtime's quantizer (quantize_static), once per calibration and placement. A model with
float groups is that fully quantized model with a float region cut back in (`FloatRegions`): the groups' nodes as
the FP32 graph has them, together with every group that would still put a Q/DQ on one of their activations (the
"closure": leaving out one node leaves its tensors quantized by its neighbours and gains nothing, measured). Inside
the region tensors flow in float; what enters it from INT8 neighbours is their dequantized output, what leaves it is
quantized as before. That takes ~3 ms where a quantize_static call with `nodes_to_exclude` took ~1.5 s (most of an
export's time: a sensitivity analysis makes one model per group). Two runtime facts shape this:
- ORT's session-time WeightBiasQuantization pass re-quantizes a float Conv/Gemm that sits between a
  DequantizeLinear and a QuantizeLinear with *per-tensor* INT8 weights; on a depthwise conv that took a digits
  student from 91% to 10%. Every quantized model is checked for such convs (`ort_requantized`) and the float
  region grows until there are none.
- 16-bit activations for the float groups (ORT's `TensorQuantOverrides`, QUInt16) are as accurate but ran 2x
  slower than the closure (ORT's CPU kernels have no 8x16-bit paths), so they are not used.
Both presets may keep any group float, Conv/Gemm included: TensorRT runs a layer without Q/DQ in floating point
(explicit quantization converts precision only where Q/DQ nodes say so), and its rule check (qdq_rules.py) lists
such layers rather than failing them. The `trt` preset's `inputs` placement (OpTypesToExcludeOutputQuantization for
Conv/Gemm/MatMul: Q/DQ on the inputs of weighted ops, TensorRT's recommended placement) is a candidate the search
weighs against the default one.

Calibration gives ORT's own ranges (its `create_calibrator`; min/max ones computed faster, to the bit), once per
(method, images), kept in ORT's calibration-cache format, so the dozens of quantizations of a search or a
sensitivity analysis calibrate once.

Split from edgekd.export.int8 (which keeps the policy: which methods exist and how ptq-search chooses) so that
edgekd.export.sensitivity, which int8's search calls, needs this module only and never int8.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.export.qdq_rules import graph_links
from edgekd.runtime.evalset import is_multilabel
from edgekd.runtime.runners import optimization_level
from edgekd.timing import Stopwatch

CALIB_METHODS = ("minmax", "entropy", "percentile")
PLACEMENTS = ("all", "inputs")  # Q/DQ on every quantizable tensor, or on the inputs of weighted ops only
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
REMOVABLE_ACTIVATIONS = ("Relu", "Clip")  # ORT folds these into the producer's output Q/DQ
GATES = ("HardSigmoid", "Sigmoid")
POOLS = ("ReduceMean", "GlobalAveragePool")
ENTROPY_BINS = 512  # ORT's default (128) gives one candidate threshold; 2048 (TensorRT's) took 3 min per calibration
PERCENTILE = 99.999


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


@dataclass(frozen=True)
class Preset:
    activation: str  # QUInt8 | QInt8
    symmetric_activations: bool
    dedicated_pairs: bool
    quantize_bias: bool  # TensorRT takes float biases and fuses them; int32 bias Q/DQ is not for it
    placements: tuple[str, ...]  # what ptq-search may choose from
    # 7-bit weights. ONNX Runtime's x86 integer kernels (QLinearConv, U8S8) add pairs of u8 x s8 products in int16
    # and saturate: with full-range per-channel weights a quickstart student flipped 45.9% of its validation
    # answers under ORT's fused kernels while the same Q/DQ model, run op by op in float, flipped 8.5% (the collapse
    # of issue 21). 7-bit weights cannot saturate (9.5% either way); per-tensor weights hide it only partly (10.6%).
    # TensorRT computes INT8 in int32: no such loss, full range.
    reduce_range: bool = False
    # Score its models with the Q/DQ run as written, in float (graph optimizations off), not by ORT's x86 integer
    # kernels: the target, TensorRT, accumulates INT8 products in int32 as the float emulation does, without their
    # int16 saturation. On a quickstart student the `trt` preset's minmax model changed 35.6% of FP32's validation
    # answers under ORT's kernels and 18.8% as written (benchmarks/int8_saturation.py measures the cpu side).
    score_as_written: bool = False
    # Does ptq-search choose the calibration (methods and sizes, edgekd.export.int8) or take the configured one?
    # Symmetric activations spend half their range on values a post-ReLU tensor never takes, and an outlier
    # stretches the other half: their calibration decides. On Fashion-MNIST (seeds 0-1, both families) the `trt`
    # preset's search chose percentile over 4x the images for 3 of 4 escalated models, and without it two of them
    # kept 20% of their weights float instead of 0-5% (benchmarks/results/int8_guard-fashion-mnist-rules*); the
    # `cpu` preset's choice among six changed nothing there and was noise on the quickstart (40% of its search).
    search_calibration: bool = False


PRESETS = {
    "cpu": Preset("QUInt8", symmetric_activations=False, dedicated_pairs=False, quantize_bias=True,
                  placements=("all",), reduce_range=True),
    "trt": Preset("QInt8", symmetric_activations=True, dedicated_pairs=True, quantize_bias=False,
                  placements=PLACEMENTS, score_as_written=True, search_calibration=True),
}


CALIB_BATCH = 32
CALIB_CHUNK = 256  # images per collect_data call: the histogram calibrators hold every intermediate output of one
# Quantizer._minmax holds a batch's calibrated tensors at once: at most this many bytes (the quickstart's students:
# 3 MiB, Fashion-MNIST's 7-11 MiB; a 224x224 ResNet-50's: gigabytes), else ORT's own calibrator, which keeps only
# their reductions
MINMAX_OUTPUT_BYTES = 512 * 2**20


def calibration_chunks(images: np.ndarray) -> list[np.ndarray]:
    """`images` as the calibrators take them: chunks of CALIB_CHUNK in equal batches of CALIB_BATCH (the entropy
    and percentile calibrators stack a call's batches into one array), and what is left past the last whole batch as
    a chunk of its own, one shorter batch. Every image counts (INT8 rules revision 13; until 12 a chunk's remainder
    went unused: 480 of the 506 images a digits bundle named)."""
    whole = len(images) - len(images) % CALIB_BATCH
    chunks = [images[i : min(i + CALIB_CHUNK, whole)] for i in range(0, whole, CALIB_CHUNK)]
    return [*chunks, images[whole:]] if whole < len(images) else chunks


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over one of calibration_chunks: its equal batches."""

    def __init__(self, input_name: str, chunk: np.ndarray):
        self.input_name = input_name
        size = min(CALIB_BATCH, len(chunk))
        self.batches = iter([chunk[i : i + size] for i in range(0, len(chunk), size)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


@dataclass(frozen=True)
class Recipe:
    """Everything a quantization is made of, apart from the model and the preset."""

    method: str = "minmax"
    images: int = 512
    placement: str = "all"
    float_groups: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"method": self.method, "images": self.images, "placement": self.placement,
                "float_groups": list(self.float_groups)}


@dataclass(frozen=True)
class NodeGroup:
    """What one sensitivity row quantizes or keeps float: a weighted op (Conv/Gemm/MatMul) with the Relu/Clip ORT
    folds into it, or one other quantizable node (Add, Mul, pooling, reshape). Its nodes go to ORT's
    `nodes_to_quantize` / `nodes_to_exclude`; quantizing a weighted op quantizes its input and output activations
    and its weights."""

    name: str  # readable: the weight's name (blocks.2.0.conv_dw), or the nearest upstream weight's name + op
    nodes: tuple[str, ...]
    op: str
    tags: tuple[str, ...] = ()  # stem, classifier, depthwise, se, gate, hardswish, residual
    tensors: tuple[str, ...] = ()  # the activations its nodes quantize (inputs and output)

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "nodes": list(self.nodes), "tags": list(self.tags),
                "activations": list(self.tensors)}


def quantizable_op_types() -> set[str]:
    """The op types ORT's quantize_static quantizes by default in Q/DQ format (its own registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def _label(n) -> str:
    w = n.input[1]
    return w[: -len(".weight")] if w.endswith(".weight") else (n.name or w)


class _Topology:
    """One graph's initializers, producer/consumer links and weighted nodes, which every grouping walk reads:
    built once, not per node."""

    def __init__(self, graph):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producers, self.consumers = graph_links(graph)
        self.outputs = {o.name for o in graph.output}
        self.weighted = {n.name for n in graph.node
                         if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in self.inits}

    def upstream_weighted(self, n):
        """The nearest weighted node above n (breadth first over its inputs), or None."""
        producers = self.producers
        seen, frontier = set(), [i for i in n.input if i in producers]
        while frontier:
            nxt = []
            for t in frontier:
                p = producers[t]
                if p.name in self.weighted:
                    return p
                if p.name not in seen:
                    seen.add(p.name)
                    nxt += [i for i in p.input if i in producers]
            frontier = nxt
        return None

    def reaches_output(self, start: str) -> bool:
        """Does tensor `start` reach a graph output without passing a weighted node? Then its op is the classifier:
        nothing weighted comes after it."""
        seen, frontier = set(), [start]
        while frontier:
            t = frontier.pop()
            if t in self.outputs:
                return True
            for c in self.consumers.get(t, []):
                if c.name in seen or c.name in self.weighted:
                    continue
                seen.add(c.name)
                frontier += list(c.output)
        return False

    def gate_of(self, n):
        """The (hard) sigmoid feeding Mul n, if any."""
        producers = self.producers
        return next((producers[i] for i in n.input if i in producers and producers[i].op_type in GATES), None)

    def is_swish(self, n) -> bool:
        """Mul(x, HardSigmoid(x)): a HardSwish (or SiLU) ORT's pre-processing decomposed."""
        g = self.gate_of(n) if n.op_type == "Mul" else None
        return g is not None and g.input[0] in n.input

    def squeeze_excitation(self) -> tuple[set[str], set[str]]:
        """(gating Muls, weighted nodes inside their branch) of the squeeze-excitation blocks: pool -> conv -> act
        -> conv -> (hard) sigmoid -> Mul with the features. A gated Mul without a pool upstream is not one."""
        se_nodes: set[str] = set()
        gates: set[str] = set()
        for n in self.graph.node:
            if n.op_type != "Mul" or self.gate_of(n) is None or self.is_swish(n):
                continue
            frontier, seen, found, pooled = list(self.gate_of(n).input), set(), set(), False
            while frontier:
                p = self.producers.get(frontier.pop())
                if p is None or p.name in seen:
                    continue
                seen.add(p.name)
                if p.op_type in POOLS:
                    pooled = True
                elif (p.name in self.weighted or p.op_type in (*REMOVABLE_ACTIVATIONS, *GATES, "HardSwish")
                      or self.is_swish(p)):
                    found |= {p.name} & self.weighted
                    frontier += list(p.input)
            if pooled:
                gates.add(n.name)
                se_nodes |= found
        return gates, se_nodes

    def weighted_group(self, n, se_nodes: set[str]) -> tuple[list[str], str, list[str]]:
        """(nodes, name, tags) of a weighted op's group: the op and a lone Relu/Clip after it, which ORT folds into
        the op's output Q/DQ and so cannot be quantized apart from it."""
        nodes = [n.name]
        users = self.consumers.get(n.output[0], [])
        if len(users) == 1 and users[0].op_type in REMOVABLE_ACTIVATIONS:
            nodes.append(users[0].name)
        tags = []
        if self.upstream_weighted(n) is None:
            tags.append("stem")
        if self.reaches_output(n.output[0]):
            tags.append("classifier")
        w = self.inits[n.input[1]]
        group_attr = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and group_attr > 1 and len(w.dims) > 1 and w.dims[1] == 1:
            tags.append("depthwise")
        if n.name in se_nodes:
            tags.append("se")
        return nodes, _label(n), tags

    def other_group(self, n, gates: set[str]) -> tuple[list[str], str, list[str]]:
        """(nodes, name, tags) of a node without weights: named after the nearest weight above it, which is what a
        reader can find in the model."""
        anchor = self.upstream_weighted(n)
        name = f"{_label(anchor) if anchor is not None else 'input'}/{n.op_type}"
        tags = ["se", "gate"] if n.name in gates else ["hardswish"] if self.is_swish(n) else []
        if n.op_type == "Add" and sum(i in self.producers for i in n.input) == 2:
            tags.append("residual")
        return [n.name], name, tags

    def activations(self, n, nodes: list[str]) -> tuple[str, ...]:
        """The activations a group quantizes: its first node's inputs (a weighted op's data input only: the rest
        are its weight and bias) and its last node's outputs."""
        last = next(m for m in self.graph.node if m.name == nodes[-1])
        tensors = [i for i in (n.input[:1] if n.name in self.weighted else n.input) if i and i not in self.inits]
        tensors += [o for o in last.output if o]
        return tuple(dict.fromkeys(tensors))


def node_groups(model) -> list[NodeGroup]:
    """The model's quantizable node groups in graph order, named after their weights where they have one."""
    topo = _Topology(model.graph)
    quantizable = quantizable_op_types()
    gates, se_nodes = topo.squeeze_excitation()
    groups, taken, names = [], set(), {}
    for n in model.graph.node:
        if n.name in taken or n.op_type not in quantizable:
            continue
        if n.name in topo.weighted:
            nodes, name, tags = topo.weighted_group(n, se_nodes)
        else:
            nodes, name, tags = topo.other_group(n, gates)
        taken.update(nodes)
        count = names.get(name, 0)  # e.g. two Adds below one conv: names address groups, so #2 keeps them apart
        names[name] = count + 1
        groups.append(NodeGroup(name if not count else f"{name}#{count + 1}", tuple(nodes), n.op_type, tuple(tags),
                                topo.activations(n, nodes)))
    return groups


class Quantizer:
    """One FP32 model and one preset: pre-processed once, calibrated once per (method, images), quantized by ORT
    once per calibration and placement, and cut into (FloatRegions) as often as a search or a sensitivity analysis
    needs. Use as a context manager (it owns a temporary directory)."""

    def __init__(self, fp32_onnx: Path, preset: str, watch: Stopwatch | None = None):
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if preset not in PRESETS:
            raise EdgeKDError(f"unknown INT8 preset {preset!r}: use cpu or trt")
        self.preset_name, self.preset = preset, PRESETS[preset]
        self.watch = watch or Stopwatch()
        self._tmp = tempfile.TemporaryDirectory(prefix="edgekd-int8-")
        self.dir = Path(self._tmp.name)
        self.pre = self.dir / "pre.onnx"
        with self.watch("int8 pre-processing"):
            quant_pre_process(str(fp32_onnx), str(self.pre), skip_symbolic_shape=True)
        model = onnx.load(str(self.pre))
        unnamed = [n for n in model.graph.node if not n.name]
        for i, n in enumerate(unnamed):  # node names are how ORT's include/exclude lists address nodes
            n.name = f"edgekd_{n.op_type}_{i}"
        if unnamed:
            onnx.save(model, str(self.pre))
        self.input_name = model.graph.input[0].name
        self.groups = node_groups(model)
        sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
        by_name = {n.name: n for n in model.graph.node}
        self.weights = {g.name: sum(sizes.get(by_name[n].input[1], 0) for n in g.nodes
                                    if by_name[n].op_type in WEIGHTED_OPS and len(by_name[n].input) > 1)
                        for g in self.groups}  # weight elements per group: what INT8 makes 4x smaller
        self.by_name = {g.name: g for g in self.groups}
        self.last_float: list[str] = []  # the groups the last quantize() left out (a recipe's groups and closure)
        self._count = 0
        self._pre_model = model
        grouped = {n for g in self.groups for n in g.nodes}
        self._ungrouped = {n.name for n in model.graph.node if n.name not in grouped}
        self._full: dict[tuple[Path, str], Path] = {}  # (calibration cache, placement) -> the fully quantized model
        self._regions: dict[Path, FloatRegions] = {}  # per fully quantized model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def float_weight_share(self, names: Sequence[str]) -> float:
        """The share of the model's weights (elements) that the named groups keep in float."""
        total = sum(self.weights.values())
        return sum(self.weights[n] for n in names) / total if total else 0.0

    def group(self, name: str) -> NodeGroup:
        if name not in self.by_name:
            raise EdgeKDError(f"unknown node group {name!r}: the model has "
                              f"{', '.join(g.name for g in self.groups[:6])}, ... ({len(self.groups)} groups)")
        return self.by_name[name]

    def closure(self, names: Sequence[str]) -> list[NodeGroup]:
        """The groups to leave out so that the named groups' activations carry no Q/DQ: them, and every group that
        quantizes one of their tensors."""
        tensors = {t for n in names for t in self.group(n).tensors}
        return [g for g in self.groups if g.name in names or tensors & set(g.tensors)]

    def quantize(self, out: Path, calibration: np.ndarray, recipe: Recipe = Recipe(),
                 only: Sequence[str] | None = None) -> Path:
        """Quantize to `out` as `recipe` says (its `images` are `calibration`); `only` (group names), if given, are
        all that is quantized, the rest stays float."""
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if recipe.method not in CALIB_METHODS:
            raise EdgeKDError(f"unknown calibration method {recipe.method!r}: use {', '.join(CALIB_METHODS)}")
        if recipe.placement not in PLACEMENTS:
            raise EdgeKDError(f"unknown Q/DQ placement {recipe.placement!r}: use {', '.join(PLACEMENTS)}")
        if len(calibration) == 0:
            raise EdgeKDError("no calibration images: raise --calib-size")
        if only is not None and not only:
            raise EdgeKDError("`only` names no groups (ORT would read an empty list as 'quantize everything')")
        p = self.preset
        extra = {"ActivationSymmetric": p.symmetric_activations, "WeightSymmetric": True,
                 "DedicatedQDQPair": p.dedicated_pairs, "QuantizeBias": p.quantize_bias}
        if recipe.placement == "inputs":
            extra["OpTypesToExcludeOutputQuantization"] = list(WEIGHTED_OPS)
        left_out = self.closure(recipe.float_groups) if recipe.float_groups else []
        with self.watch("int8 calibration"):
            cache = self.calibrate(calibration, recipe.method)

        def ort_quantize(path: Path, nodes: list[str] | None) -> Path:
            noisy = logging.getLogger()
            level = noisy.level
            noisy.setLevel(logging.ERROR)  # "please pre-process": it is done
            try:
                with self.watch("int8 quantize_static"):
                    quantize_static(str(self.pre), str(path), None, quant_format=QuantFormat.QDQ, per_channel=True,
                                    reduce_range=p.reduce_range, activation_type=getattr(QuantType, p.activation),
                                    weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                                    calibrate_method=_ort_method(recipe.method), extra_options=extra,
                                    calibration_cache_path=str(cache))
            finally:
                noisy.setLevel(level)
            return path

        if only:  # `only` measures what ORT runs, whatever it is
            return ort_quantize(out, [n for g in only for n in self.group(g).nodes])
        full = self._full.get((cache, recipe.placement))
        if full is None:
            full = self._full[(cache, recipe.placement)] = ort_quantize(self.scratch("full"), None)
        with self.watch("int8 float regions"):
            if full not in self._regions:
                self._regions[full] = FloatRegions(self._pre_model, full.read_bytes())
            for _ in range(8):
                model, trapped = self._regions[full].cut({n for g in left_out for n in g.nodes}, self._ungrouped,
                                                         {t for g in self.groups if g not in left_out for t in g.tensors})
                if not trapped:
                    Path(out).write_bytes(model.SerializeToString())  # onnx.save scans for external data: 5 ms
                    self.last_float = [g.name for g in left_out]
                    return Path(out)
                # A float conv between Q/DQ: leave out what quantizes its input and output too.
                tensors = {t for n in trapped for t in n}
                grow = [g for g in self.groups if g not in left_out and tensors & set(g.tensors)]
                if not grow:
                    break
                left_out += grow
        raise EdgeKDError(f"ONNX Runtime would re-quantize float node(s) {', '.join(str(t) for t in trapped)} with "
                          "per-tensor weights (its WeightBiasQuantization pass): keep fewer groups float")

    def calibrate(self, calibration: np.ndarray, method: str) -> Path:
        """ORT's calibration of (method, images), computed once and kept as ORT's own calibration cache.

        Computed here with ORT's `create_calibrator` rather than inside `quantize_static`, because
        `quantize_static` does not pass the histogram settings on: its entropy calibrator then has 128 bins for 128
        quantized bins, one candidate threshold, and returns the min/max range (entropy == minmax); and its
        percentile calibrator is symmetric (|x| histograms), which gives asymmetric U8 activations a negative half
        that post-ReLU tensors never use (microsoft/onnxruntime#10571). Here: entropy with ENTROPY_BINS bins, and
        percentile symmetric only where the preset's activations are. Min/max ranges: ORT's, computed faster
        (_minmax)."""
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        digest = hashlib.sha1(np.ascontiguousarray(calibration).tobytes()).hexdigest()[:16]
        cache = self.dir / f"calib-{method}-{digest}.json"
        if cache.is_file():
            return cache
        if method == "minmax":
            ranges = self._minmax(calibration)
            if ranges is not None:
                save_tensors_data(ranges, cache)
                return cache
        options = {"entropy": {"num_bins": ENTROPY_BINS, "num_quantized_bins": 128},
                   "percentile": {"num_bins": 2048, "percentile": PERCENTILE,
                                  "symmetric": self.preset.symmetric_activations}}.get(method, {})
        calibrator = create_calibrator(self.pre, sorted(quantizable_op_types()),
                                       augmented_model_path=str(self.dir / "augmented.onnx"),
                                       calibrate_method=_ort_method(method), extra_options=options)
        with contextlib.redirect_stdout(io.StringIO()):  # they print progress
            for chunk in calibration_chunks(calibration):
                calibrator.collect_data(_Batches(self.input_name, chunk))
            save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
        return cache

    def _minmax(self, calibration: np.ndarray):
        """ORT's MinMaxCalibrater's ranges, the same to the bit, in half its time (0.11 vs 0.23 s on the
        quickstart's students): the tensors it calibrates (every float input and output of a quantizable node that
        is not an initializer, from the same shape inference) made graph outputs of one session at its optimization
        level and threads, and their min and max taken here over the same batches (calibration_chunks), instead of
        ReduceMin/ReduceMax nodes that its Python inserts one by one into a copy of the graph it then writes and reads
        back. A min or a max is exact whatever computes it. None (ORT's calibrator then) where a batch's outputs
        would pass MINMAX_OUTPUT_BYTES or their size is not known: ORT's graph keeps only the reductions, this one
        every calibrated tensor of a batch at once (a 224x224 ResNet-50's are gigabytes)."""
        import itertools

        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

        model = onnx.shape_inference.infer_shapes(onnx.load(str(self.pre)))
        graph = model.graph
        infos = {vi.name: vi for vi in graph.value_info}
        infos.update({o.name: o for o in graph.output})
        infos.update({i.name: i for i in graph.input})
        initializers = {t.name for t in graph.initializer}
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        ops = quantizable_op_types()
        tensors = list(dict.fromkeys(
            t for n in graph.node if n.op_type in ops for t in itertools.chain(n.input, n.output)
            if t in infos and t not in initializers and infos[t].type.HasField("tensor_type")
            and infos[t].type.tensor_type.elem_type in floats))
        per_image = 0
        for t in tensors:
            dims = infos[t].type.tensor_type.shape.dim[1:]  # after the batch
            if not all(d.HasField("dim_value") for d in dims):
                return None
            per_image += math.prod(d.dim_value for d in dims) * (2 if infos[t].type.tensor_type.elem_type ==
                                                                  onnx.TensorProto.FLOAT16 else 4)
        if per_image * CALIB_BATCH > MINMAX_OUTPUT_BYTES:
            return None
        outputs = {o.name for o in graph.output}
        graph.output.extend(infos[t] for t in tensors if t not in outputs)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's calibrator runs it
        # the job's threads, not every core (ORT's default): a bundle job beside a training is given one. The ranges
        # are the same at 1, 2 and 4 threads (measured on the quickstart's and Fashion-MNIST's students)
        options.intra_op_num_threads = scoring_workers()
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        columns = [names.index(t) for t in tensors]
        low: dict[str, np.floating] = {}
        high: dict[str, np.floating] = {}
        for chunk in calibration_chunks(calibration):
            for batch in _Batches(self.input_name, chunk).batches:
                values = session.run(None, {self.input_name: batch})
                for t, c in zip(tensors, columns, strict=True):
                    low[t] = min(low.get(t, np.inf), values[c].min())
                    high[t] = max(high.get(t, -np.inf), values[c].max())
        return TensorsData(CalibrationMethod.MinMax, {t: (np.array([low[t]], dtype=np.float32),
                                                          np.array([high[t]], dtype=np.float32)) for t in tensors})

    def scratch(self, tag: str = "q") -> Path:
        """A fresh file name in the working directory for a candidate model."""
        self._count += 1
        return self.dir / f"{tag}-{self._count}.onnx"


@dataclass
class _Node:
    """A node as FloatRegions reads it: names as plain Python values (reading them off protobuf messages is most of
    the time of a cut), and where its NodeProto comes from: the full model's node `index`, or the FP32 one's."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: tuple[str, ...]
    index: int  # in its source graph
    from_pre: bool = False
    changed: bool = False  # inputs differ from its source's


def _nodes(graph, from_pre: bool = False) -> list[_Node]:
    return [_Node(n.name, n.op_type, list(n.input), tuple(n.output), i, from_pre) for i, n in enumerate(graph.node)]


class FloatRegions:
    """Cuts float regions into one fully quantized Q/DQ model (`full`, serialized), made from `pre` (the
    pre-processed FP32 model): the graphs read once, each cut then a parse of `full` and a reordering of its nodes.
    Node and tensor names are the ones ORT keeps from `pre`."""

    def __init__(self, pre, full: bytes):
        import onnx

        self.pre, self.full = pre, full
        template = onnx.ModelProto.FromString(full)
        self.pre_nodes = _nodes(pre.graph, from_pre=True)
        self.full_nodes = _nodes(template.graph)
        self.by_name = {n.name: n for n in self.full_nodes}
        self.producer = {o: n for n in self.full_nodes for o in n.outputs}
        self.pre_inits = {t.name: t for t in pre.graph.initializer}
        self.full_inits = [t.name for t in template.graph.initializer]
        # elements per initializer (a Q/DQ scale's tells per-tensor from per-channel): ort_requantized's test
        self.sizes = {t.name: math.prod(t.dims) for t in (*pre.graph.initializer, *template.graph.initializer)}
        self.inputs = {i.name for i in template.graph.input}
        self.outputs = {o.name for o in template.graph.output}

    def cut(self, region: set[str], ungrouped: set[str], still_quantized: set[str]):
        """`full` with the nodes named in `region` computing in float as `pre` has them: float weights and biases,
        float tensors between region nodes, their INT8 neighbours' dequantized outputs where they enter, and the
        Q/DQ that quantizes their outputs for INT8 consumers kept. Nodes ORT folded away (a Relu into its conv's Q
        range) come back with their group. `ungrouped`: nodes that belong to no group (ORT has no INT8 kernel for
        them: HardSwish) and read a Q/DQ only for a neighbour's sake; they read the float tensor instead where no
        tensor of `still_quantized` (the INT8 groups' activations) is involved. Returns (the ModelProto, its
        ort_requantized nodes)."""
        import onnx

        made_in_region = {o for n in self.pre_nodes if n.name in region for o in n.outputs}
        have, added, restored = set(self.full_inits), [], []
        for p in self.pre_nodes:
            if p.name not in region:
                continue
            node = _Node(p.name, p.op_type, list(p.inputs), p.outputs, p.index, from_pre=True, changed=True)
            for i, name in enumerate(p.inputs):
                if name in self.pre_inits:  # the float weight or bias; ORT may have reused its name for a bias DQ's
                    alias = f"{name}_float" if name in self.producer else name
                    if alias not in have:
                        added.append((alias, name))
                        have.add(alias)
                    node.inputs[i] = alias
                elif name in still_quantized and name not in made_in_region and p.name in self.by_name:
                    node.inputs[i] = self.by_name[p.name].inputs[i]  # from an INT8 neighbour: what it read
            restored.append(node)
        outputs = {o for n in restored for o in n.outputs}
        kept = [n for n in self.full_nodes if n.name not in region
                and not (n.op_type == "DequantizeLinear" and outputs.intersection(n.outputs))]  # made in float
        for k, n in enumerate(kept):
            if n.name not in ungrouped:
                continue
            for i, name in enumerate(n.inputs):
                dq = self.producer.get(name)
                q = self.producer.get(dq.inputs[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
                if q is not None and q.op_type == "QuantizeLinear" and q.inputs[0] not in still_quantized:
                    if not n.changed:
                        n = kept[k] = _Node(n.name, n.op_type, list(n.inputs), n.outputs, n.index, changed=True)
                    n.inputs[i] = q.inputs[0]
        nodes = _topological(_live(kept + restored, self.outputs), self.inputs | have)
        model = onnx.ModelProto.FromString(self.full)
        graph = model.graph
        source = {False: list(graph.node), True: self.pre.graph.node}
        protos = []
        for n in nodes:
            proto = source[n.from_pre][n.index]
            if n.changed:
                proto = onnx.NodeProto()
                proto.CopyFrom(source[n.from_pre][n.index])
                del proto.input[:]
                proto.input.extend(n.inputs)
            protos.append(proto)
        del graph.node[:]
        graph.node.extend(protos)
        for alias, name in added:
            tensor = graph.initializer.add()
            tensor.CopyFrom(self.pre_inits[name])
            tensor.name = alias
        used = {i for n in nodes for i in n.inputs}
        inits = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(inits)
        sizes = {**self.sizes, **{alias: self.sizes[name] for alias, name in added}}
        return model, _requantized(nodes, {t for t in have if t in used}, sizes)


def _live(nodes: list[_Node], outputs: set[str]) -> list[_Node]:
    """The nodes the graph outputs depend on."""
    producer = {o: n for n in nodes for o in n.outputs}
    stack, seen = list(outputs), set()
    while stack:
        n = producer.get(stack.pop())
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        stack.extend(i for i in n.inputs if i)
    return [n for n in nodes if id(n) in seen]


def _topological(nodes: list[_Node], available: set[str]) -> list[_Node]:
    """`nodes` in an order where each node comes after the producers of its inputs (ONNX requires it)."""
    done, ready = set(available), []
    pending = [(n, [i for i in n.inputs if i]) for n in nodes]
    while pending:
        waiting = []
        for n, inputs in pending:
            if done.issuperset(inputs):
                ready.append(n)
                done.update(n.outputs)
            else:
                waiting.append((n, inputs))
        if len(waiting) == len(pending):
            n = waiting[0][0]
            raise EdgeKDError(f"float region: {n.name} reads a tensor no node makes ({', '.join(n.inputs)})")
        pending = waiting
    return ready


def _requantized(nodes: list[_Node], inits: set[str], sizes: dict[str, int]) -> list[tuple[str, str]]:
    """ort_requantized's test, on a graph's nodes, initializer names and sizes."""
    producers = {o: n for n in nodes for o in n.outputs}
    consumers: dict[str, list[_Node]] = {}
    for n in nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    found = []
    for n in nodes:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.inputs) < 2 or n.inputs[1] not in inits:
            continue
        dq = producers.get(n.inputs[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[1] not in inits or sizes[dq.inputs[1]] != 1:
            continue
        tensor, users = n.outputs[0], consumers.get(n.outputs[0], [])
        while len(users) == 1 and users[0].op_type in REMOVABLE_ACTIVATIONS:
            tensor, users = users[0].outputs[0], consumers.get(users[0].outputs[0], [])
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            q = producers.get(dq.inputs[0])
            found.append((q.inputs[0] if q is not None and q.op_type == "QuantizeLinear" else n.inputs[0], tensor))
    return found


def ort_requantized(model) -> list[tuple[str, str]]:
    """Float Conv/Gemm nodes ORT's CPU session would turn into INT8 ones with per-tensor weights (its
    WeightBiasQuantization pass, onnxruntime/core/optimizer/qdq_transformer/weight_bias_quantization.cc): a float
    weight initializer, the input from a per-tensor DequantizeLinear, the output (through Relu/Clip, unbranched)
    into a QuantizeLinear. Returns their (input, output) tensors. `model`: a file or a ModelProto."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    return _requantized(_nodes(model.graph), set(sizes), sizes)


@dataclass(frozen=True)
class Score:
    accuracy: float
    agreement: float  # top-1 agreement with the FP32 model on the same images
    kl: float  # mean KL(FP32 softmax || candidate softmax): finer than accuracy on a small split
    drop_se: float = 0.0  # standard error of (FP32 - candidate) accuracy, paired on the same images
    flips_se: float = 0.0  # standard error of the share of images whose top-1 differs from FP32's

    def drop(self, fp32: Score) -> float:
        return fp32.accuracy - self.accuracy

    @property
    def flips(self) -> float:
        """The share of images whose answer differs from FP32's. Label-free, so a split with wrong labels (a
        label-noise variant's validation) measures it as well as a clean one; and it bounds the accuracy change on
        any labelled set: |Δacc| <= flips."""
        return 1.0 - self.agreement

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "agreement": self.agreement, "kl": self.kl, "drop_se": self.drop_se,
                "flips_se": self.flips_se}


def _clustered_se(values: np.ndarray, clusters: np.ndarray | None) -> float:
    """Standard error of the mean of `values`, resampling whole clusters: the views of one validation image
    (crops of it) are not independent images, and treating them as such understates the error up to
    sqrt(views)-fold."""
    if clusters is not None:
        counts = np.bincount(clusters)
        values = np.bincount(clusters, weights=values)[counts > 0] / counts[counts > 0]
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def scoring_workers() -> int:
    """Candidates scored at once: one per core this process may use, each session on one thread. ONNX Runtime's
    CPU kernels give these models bitwise the same logits at 1 thread as at 2 (measured on the quickstart's FP32
    and INT8 students, fused and as written), and a model this small gains little from a second intra-op thread
    (29 vs 33 ms for 1,287 images), so two sessions side by side score ~1.8x as many candidates per second. A job
    given fewer threads than the machine's (a worker beside others: torch's threads, set for its job) uses those."""
    import os
    import sys

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch = sys.modules.get("torch")
    return max(1, min(cores, torch.get_num_threads()) if torch is not None else cores)


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """One pool for the process: ONNX Runtime releases the GIL while it builds and runs a session."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(scoring_workers(), thread_name_prefix="edgekd-score")
    return _POOL


class Evaluator:
    """Accuracy of ONNX models on one labelled split (the validation split, for every choice made here), with
    agreement and KL against the FP32 model's outputs on the same images. `clusters[i]`: which original image row
    i is a view of (validation_views), so that standard errors count images, not views.

    `submit` scores a candidate in the background (scoring_workers at a time) while the caller makes the next one;
    `wait` collects it. `score` scores one now, its batches shared out over the workers. Both give the same score
    for the same model: only the order of work changes. The FP32 reference is computed in the background from the
    start."""

    def __init__(self, fp32_onnx: Path | None, images: np.ndarray, labels: np.ndarray, batch_size: int = 512,
                 clusters: np.ndarray | None = None, watch: Stopwatch | None = None, labels_trusted: bool = True,
                 reference: np.ndarray | None = None):
        """`labels_trusted`: False where the split's labels are known to be corrupted (a label-noise variant's
        validation split): the guard then judges by the label-free share of answers changed alone. `reference`:
        the FP32 model's logits on `images` where they are known (then `fp32_onnx` is not run)."""
        if len(images) == 0:
            raise EdgeKDError("the validation split is empty: INT8 choices need one (raise val_fraction)")
        self.images, self.labels, self.batch_size = images, np.asarray(labels), batch_size
        self.labels_trusted = labels_trusted
        self.clusters = None if clusters is None else np.asarray(clusters, dtype=np.int64)
        self.evaluations = 0
        self._scores: dict[tuple[str, bool], Score] = {}
        self.watch = watch or Stopwatch()
        self._reference: Future = Future()
        if reference is None:  # in the background: a bundle calibrates and quantizes meanwhile
            self.evaluations += 1
            self._reference = _pool().submit(self.logits, Path(fp32_onnx).read_bytes())
        else:
            self._reference.set_result(reference)
        self._fp32: Score | None = None

    @property
    def reference(self) -> np.ndarray:
        """The FP32 model's logits on the split: what every candidate is compared with."""
        self._await_reference()
        return self._reference.result()

    def _await_reference(self) -> None:
        """Waited for in the caller's thread (the wait is "validation scoring"), before any candidate goes to the
        scoring workers, so that no worker waits inside the pool for another's job."""
        if not self._reference.done():
            with self.watch("validation scoring"):
                self._reference.result()

    @property
    def fp32(self) -> Score:
        """The FP32 model's own score on the split."""
        if self._fp32 is None:
            self._fp32 = self._score(self.reference)
        return self._fp32

    def ranking_view(self, max_images: int) -> Evaluator:
        """What a ranking scores its candidates on: the plain view of each image (validation_views puts it first),
        at most `max_images` of them spread evenly over the split, against the same FP32 reference. A ranking orders
        candidates and certifies nothing, and its candidates cost more to open (an ORT session, ~20 ms) than to run
        on one view of the quickstart's 143 images (~4 ms) but not on nine (~35 ms); on Fashion-MNIST's 6,000
        validation images a `trt` candidate scored as written took ~2 s, and a ranking's 20 most of a bundle's
        export."""
        n = self.images_scored
        views = n < len(self.labels) and np.array_equal(self.clusters[:n], np.arange(n))
        plain = n if views else len(self.labels)
        if plain <= max_images and not views:
            return self
        rows = np.arange(plain) if plain <= max_images else np.linspace(0, plain - 1, max_images).round().astype(int)
        return Evaluator(None, self.images[rows], self.labels[rows], self.batch_size, watch=self.watch,
                         labels_trusted=self.labels_trusted, reference=self.reference[rows])

    @property
    def images_scored(self) -> int:
        """Distinct images (not views) behind each score."""
        return len(self.labels) if self.clusters is None else int(len(np.unique(self.clusters)))

    def logits(self, model: Path | bytes, as_written: bool = False, batches: Sequence[int] | None = None) -> np.ndarray:
        """`model`: a file or its bytes. `as_written`: graph optimizations off, every Q/DQ run in float
        (Preset.score_as_written); otherwise what an ONNX Runtime CPU deployment runs, its fused integer kernels
        included. `batches`: which of the split's batches (all by default), concatenated in that order. Safe to call
        from several threads."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = optimization_level(ort, as_written)
        options.log_severity_level = 3
        options.intra_op_num_threads = 1  # see scoring_workers: same logits, sessions side by side instead
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        starts = range(0, len(self.images), self.batch_size)
        return np.concatenate([session.run(None, {name: self.images[starts[b] : starts[b] + self.batch_size]})[0]
                               for b in (range(len(starts)) if batches is None else batches)])

    def _split_logits(self, content: bytes, as_written: bool) -> np.ndarray:
        """The model's logits with its batches shared out over the scoring workers, a session each, for a caller
        that waits for them (a bisection's probe): each batch is the one `logits` runs, so the logits are the
        same bit for bit, and the wait is one session's opening plus a share of the batches instead of all of
        them (~40 vs ~60 ms on the quickstart's 1,287 validation views, for one session's opening more)."""
        count = -(-len(self.images) // self.batch_size)
        workers = min(scoring_workers(), count)
        shares = [list(range(w, count, workers)) for w in range(workers)]  # batch b on worker b % workers
        parts = [_pool().submit(self.logits, content, as_written, share) for share in shares]
        rows = [p.result() for p in parts]
        ordered, taken = [], [0] * workers
        for b in range(count):  # back into batch order
            w, size = b % workers, min(self.batch_size, len(self.images) - b * self.batch_size)
            ordered.append(rows[w][taken[w] : taken[w] + size])
            taken[w] += size
        return np.concatenate(ordered)

    def _score(self, logits: np.ndarray) -> Score:
        """Multi-label data (labels [N, classes]): an answer is one (image, class) decision, present or not
        (logit > 0), so accuracy is the share of decisions right and `flips` the share changed, both clustered by
        image; KL is the mean binary KL per decision."""
        ref = self.reference
        clusters = self.clusters
        if is_multilabel(self.labels):
            p, q = ref.astype(np.float64), logits.astype(np.float64)
            kl = float((_sigmoid(p) * (_log_sigmoid(p) - _log_sigmoid(q))
                        + _sigmoid(-p) * (_log_sigmoid(-p) - _log_sigmoid(-q))).mean())
            truth = self.labels.astype(bool)
            right, ref_right = ((logits > 0) == truth).reshape(-1), ((ref > 0) == truth).reshape(-1)
            flipped = ((logits > 0) != (ref > 0)).reshape(-1).astype(np.float64)
            image = clusters if clusters is not None else np.arange(len(logits))
            clusters = np.repeat(image, self.labels.shape[1])
        else:
            p, q = _log_softmax(ref), _log_softmax(logits)
            kl = float((np.exp(p) * (p - q)).sum(1).mean())
            right, ref_right = logits.argmax(1) == self.labels, ref.argmax(1) == self.labels
            flipped = (logits.argmax(1) != ref.argmax(1)).astype(np.float64)
        diff = ref_right.astype(np.float64) - right  # paired: +1 lost, -1 gained, 0 same
        return Score(float(right.mean()), float(1.0 - flipped.mean()), max(kl, 0.0),
                     _clustered_se(diff, clusters), _clustered_se(flipped, clusters))

    def score_logits(self, logits: np.ndarray) -> Score:
        """The score of a model another runtime ran on `images` (an ExecuTorch program), against the same FP32."""
        return self._score(np.asarray(logits))

    def _cached(self, model: Path, as_written: bool) -> tuple[tuple[str, bool], bytes, Score | None]:
        """The model's (score key, content, score if already made): one score per (file content, way of running
        it), since the guard re-scores the model a search just chose, which is the very candidate it scored."""
        content = Path(model).read_bytes()
        key = (hashlib.sha1(content).hexdigest(), as_written)
        return key, content, self._scores.get(key)

    def submit(self, model: Path, as_written: bool = False) -> Future:
        """The model's score, computed in the background while the caller makes the next candidate. The file may
        be overwritten or removed once this returns (its content is read here)."""
        self._await_reference()
        key, content, known = self._cached(model, as_written)
        if known is not None:
            done: Future = Future()
            done.set_result(known)
            return done
        self.evaluations += 1

        def compute() -> Score:
            self._scores[key] = self._score(self.logits(content, as_written))
            return self._scores[key]

        return _pool().submit(compute)

    def wait(self, pending: Future) -> Score:
        """A submitted score; the time spent waiting for it is the export's "validation scoring"."""
        with self.watch("validation scoring"):
            return pending.result()

    def score(self, model: Path, as_written: bool = False) -> Score:
        """The model's score, now: its batches shared out over the scoring workers (_split_logits), the same
        score `submit` gives."""
        self._await_reference()
        key, content, known = self._cached(model, as_written)
        if known is not None:
            return known
        self.evaluations += 1
        with self.watch("validation scoring"):
            self._scores[key] = self._score(self._split_logits(content, as_written))
        return self._scores[key]


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(x))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))
