"""INT8 sensitivity and ptq-search on tiny hand-made ONNX models: a fragile layer ranks first, float groups carry
no Q/DQ, choices follow the validation split, and the trt preset keeps TensorRT's rules."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd.errors import EdgeKDError
from edgekd.export.int8 import (
    Evaluator,
    Quantizer,
    Recipe,
    make_int8,
    search_calibration,
    search_ptq,
    smallest_holding,
    validation_views,
)
from edgekd.export.qdq_rules import check_tensorrt_qdq
from edgekd.export.quantize import ort_requantized
from edgekd.export.sensitivity import analyse, float_order, sensitivity_table

CLASSES = 4


def tiny_model(path, fragile: bool, seed: int = 0):
    """input [N,1,8,8] -> conv_a 3x3 (6 ch) -> Relu -> conv_b 1x1 (6 ch) -> Relu -> GlobalAveragePool -> Flatten
    -> classifier (Gemm). `fragile`: conv_b's last channel is always 0 (bias -10 before the Relu) and each classifier
    row puts a weight of 300 on it, so a row's per-channel INT8 scale is ~2.4 and its real weights (~0.3) round to 0:
    harmless in float, ruinous in INT8, and in the classifier's own group only."""
    rng = np.random.default_rng(seed)
    wa = rng.normal(0, 0.5, (6, 1, 3, 3)).astype(np.float32)
    wb = rng.normal(0, 0.5, (6, 6, 1, 1)).astype(np.float32)
    bb = rng.normal(0, 0.1, 6).astype(np.float32)
    wc = rng.normal(0, 1.0, (CLASSES, 6)).astype(np.float32)
    if fragile:
        wb[5], bb[5] = 0.0, -10.0
        wc = rng.normal(0, 0.3, (CLASSES, 6)).astype(np.float32)
        wc[:, 5] = 300.0
    # centred logits, so that every class wins on some images: minus the mean logit over sample images
    x = images(512, 99)
    pooled = np.maximum(_conv(np.maximum(_conv(x, wa, 1), 0), wb, 0) + bb[None, :, None, None], 0).mean((2, 3))
    bc = -(pooled @ wc.T).mean(0).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (wa, "conv_a.weight"), (np.zeros(6, np.float32), "conv_a.bias"), (wb, "conv_b.weight"), (bb, "conv_b.bias"),
        (wc, "classifier.weight"), (bc, "classifier.bias")]]
    nodes = [helper.make_node("Conv", ["input", "conv_a.weight", "conv_a.bias"], ["a"], name="conv_a", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
             helper.make_node("Conv", ["a_relu", "conv_b.weight", "conv_b.bias"], ["b"], name="conv_b"),
             helper.make_node("Relu", ["b"], ["b_relu"], name="relu_b"),
             helper.make_node("GlobalAveragePool", ["b_relu"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "classifier.weight", "classifier.bias"], ["logits"], name="classifier",
                              transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _conv(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """Plain numpy convolution (stride 1), for the bias that centres the tiny model's logits."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    out = x.shape[-1] - k + 1
    cols = np.stack([x[:, :, i : i + out, j : j + out] for i in range(k) for j in range(k)], axis=2)
    return np.einsum("nckhw,ock->nohw", cols, w.reshape(w.shape[0], w.shape[1], k * k))


def images(n: int, seed: int) -> np.ndarray:
    """Noise with a per-image contrast and brightness: features that differ from image to image."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 1, 8, 8)) * rng.uniform(0.2, 3, (n, 1, 1, 1)) + rng.uniform(-1, 1, (n, 1, 1, 1))
    return x.astype(np.float32)


def predictions(path, x) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].argmax(1)


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    path = tiny_model(tmp_path_factory.mktemp("int8") / "fragile.onnx", fragile=True)
    x = images(256, 1)
    val = Evaluator(path, x, predictions(path, x))  # labels = FP32's answers: FP32 scores 100%
    assert len(set(val.labels)) > 1
    return path, val


def test_node_groups_name_weights_and_tag_stem_and_classifier(fragile):
    with Quantizer(fragile[0], "cpu") as q:
        groups = {g.name: g for g in q.groups}
    assert {"conv_a", "conv_b", "classifier"} <= set(groups)
    assert groups["conv_a"].nodes == ("conv_a", "relu_a") and "stem" in groups["conv_a"].tags
    assert "classifier" in groups["classifier"].tags and groups["classifier"].op == "Gemm"


def test_sensitivity_ranks_the_fragile_layer_first(fragile):
    path, val = fragile
    with Quantizer(path, "cpu") as q:
        report = analyse(q, images(64, 2), Recipe("minmax", 64), val)
        worst = report.worst()
        assert worst[0].group.name == "classifier"
        assert worst[0].only.accuracy < 0.6 < min(r.only.accuracy for r in worst[1:])  # its INT8 alone ruins it
        assert worst[0].leave_one_out.accuracy > report.int8_all.accuracy + 0.3  # float, it gives it back
        assert float_order(report)[0][0] == "classifier"
        record = report.to_dict()
    assert record["split"] == "validation" and record["groups"][0]["name"] == "classifier"
    assert record["groups"][0]["only"]["change_pts"] < -40
    assert sensitivity_table(record, "t").row_count == len(record["groups"])


def test_mixed_precision_float_groups_have_no_qdq_in_the_graph(fragile, tmp_path):
    path, val = fragile
    out = tmp_path / "mixed.onnx"
    with Quantizer(path, "cpu") as q:
        q.quantize(out, images(64, 2), Recipe("minmax", 64, float_groups=("classifier",)))
        left_out = set(q.last_float)
    graph = onnx.load(str(out)).graph
    producers = {o: n for n in graph.node for o in n.output}
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert all(i not in producers or producers[i].op_type != "DequantizeLinear" for i in gemm.input), \
        "a float classifier reads no dequantized input or weight"
    assert {i.name for i in graph.initializer} >= {"classifier.weight"}  # its float weight, untouched
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(producers[c.input[1]].op_type == "DequantizeLinear" for c in convs)
    assert "classifier" in left_out and "conv_a" not in left_out
    assert not ort_requantized(out)
    assert Evaluator(path, val.images, val.labels).score(out).accuracy > 0.9


@pytest.mark.parametrize("preset", ["cpu", "trt"])
def test_float_regions_are_cut_into_one_quantized_model_exactly(tmp_path, preset):
    """A model with float groups is the fully quantized model with those groups' nodes as in FP32: every group
    float gives the FP32 model's logits exactly, none gives the INT8 model's, and one group in between is valid ONNX
    whose float nodes read no Q/DQ; ORT's quantizer runs once per calibration, not once per candidate."""
    import onnxruntime as ort

    path = tiny_model(tmp_path / "plain.onnx", fragile=False)
    x = images(64, 3)

    def logits(model):
        return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    with Quantizer(path, preset) as q:
        calib = images(64, 2)
        full = q.quantize(tmp_path / "full.onnx", calib, Recipe("minmax", 64))
        every = q.quantize(tmp_path / "every.onnx", calib, Recipe("minmax", 64, float_groups=tuple(
            g.name for g in q.groups)))
        np.testing.assert_array_equal(logits(every), logits(path))
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(every)).graph.node)
        one = q.quantize(tmp_path / "one.onnx", calib, Recipe("minmax", 64, float_groups=("conv_b",)))
        onnx.checker.check_model(str(one), full_check=True)
        assert len(q._full) == 1  # one quantize_static for the three models with this calibration
        assert not np.array_equal(logits(one), logits(full)) and not np.array_equal(logits(one), logits(path))
    graph = onnx.load(str(one)).graph
    producers = {o: n for n in graph.node for o in n.output}
    conv_b = next(n for n in graph.node if n.name == "conv_b")
    assert conv_b.input[1] == "conv_b.weight" and (conv_b.input[0] not in producers
                                                   or producers[conv_b.input[0]].op_type != "DequantizeLinear")


def test_a_lone_float_conv_between_qdq_is_caught(fragile, tmp_path):
    """ORT's WeightBiasQuantization would give conv_b per-tensor INT8 weights at session start; the guard sees it."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = fragile[0]
    out = tmp_path / "lone.onnx"
    with Quantizer(path, "cpu") as q:
        cache = q.calibrate(images(64, 2), "minmax")
        quantize_static(str(q.pre), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=["conv_b", "relu_b"], calibration_cache_path=str(cache))
        assert ort_requantized(out) == [("a_relu", "b_relu")]
        q.quantize(tmp_path / "grown.onnx", images(64, 2), Recipe("minmax", 64, float_groups=("conv_b",)))
        assert not ort_requantized(tmp_path / "grown.onnx")


def test_mixed_precision_never_leaves_nothing_in_int8(fragile, tmp_path):
    """An unreachable target (1 point, two standard errors, on 256 images: only 100% agreement meets it) must not
    walk the search to an all-float graph: it stops while a weighted layer is still INT8 and says it missed. (With
    32 calibration images the float classifier still changes 1.2% of the answers.)"""
    info, _ = make_int8(fragile[0], tmp_path / "strict.onnx", "cpu", lambda n: images(n, 2), 64,
                        method="ptq-search", calib_size=32, val=fragile[1], max_drop=0.01)
    assert not info["mixed_precision"]["reached_target"]
    assert info["mixed_precision"]["float_groups"] == ["classifier"]
    assert {n.op_type for n in onnx.load(str(tmp_path / "strict.onnx")).graph.node} >= {"QuantizeLinear"}


def test_the_float_budget_counts_the_weights_left_float_closures_included(fragile, tmp_path):
    """max_float bounds the share of the weights left float, closures included. In the fragile model the classifier
    holds 24 of the 114 weights (21%); floating it also floats the Flatten beside it (no weights). A budget under
    21% cannot float it, however much it would help; one above can."""
    from edgekd.export.int8 import search_ptq

    path, val = fragile

    def search(max_float):
        with Quantizer(path, "cpu") as q:
            assert q.float_weight_share(["classifier"]) == pytest.approx(24 / 114)
            assert q.float_weight_share([g.name for g in q.closure(["classifier"])]) == pytest.approx(24 / 114)
            return search_ptq(q, tmp_path / "s.onnx", lambda n: images(n, 2), [64], val, max_drop=0.0,
                              max_float=max_float, methods=("minmax",))

    small, enough = search(0.2), search(0.25)
    assert small.float_closure == [] and not small.mixed_precision_steps and not small.reached_target
    assert "classifier" in enough.float_closure and enough.float_weight_share <= 0.25
    assert enough.to_dict()["mixed_precision"]["float_weight_share"] == enough.float_weight_share


def test_the_search_fixes_the_fragile_model_and_records_its_choices(fragile, tmp_path):
    path, val = fragile
    info, sensitivity = make_int8(path, tmp_path / "search.onnx", "cpu", lambda n: images(n, 2), 200,
                                  method="ptq-search", calib_size=64, val=val, max_drop=0.1)
    assert info["method"] == "ptq-search" and info["calibration"]["chosen_on"] == "validation"
    assert info["mixed_precision"]["float_groups"] == ["classifier"] and info["mixed_precision"]["reached_target"]
    assert info["mixed_precision"]["steps"][0]["float"] == "classifier"
    assert info["validation"]["int8_all"]["accuracy"] < 0.6 and info["validation"]["int8"]["accuracy"] > 0.95
    assert sensitivity is None  # not asked for: the ranking's few leave-one-out candidates are in ranked_units
    assert [(c["method"], c["images"]) for c in info["calibration"]["candidates"]] == [("minmax", 64)]  # as configured
    assert info["mixed_precision"]["ranked_units"][0]["groups"] == ["classifier"]  # 4 groups: ranked one by one


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 40, 91])
def test_mixed_precision_finds_the_smallest_holding_k_by_bisection(n):
    """For every threshold the smallest k that holds, in at most bit_length(n) judged candidates (a walk over
    k = 1, 2, ... judged k of them), none judged twice; None when nothing holds."""
    for first in [*range(n), None]:  # prefix index from which the model holds; None: never
        judged = []

        def holds(i, first=first, judged=judged):
            assert 0 <= i < n and i not in judged
            judged.append(i)
            return first is not None and i >= first

        assert smallest_holding(n, holds) == first
        assert len(judged) <= n.bit_length(), (first, judged)
    assert smallest_holding(0, lambda i: True) is None


def test_large_models_are_ranked_by_a_few_contiguous_runs_of_groups():
    from edgekd.export.quantize import NodeGroup
    from edgekd.export.sensitivity import RANK_UNITS, contiguous_units

    groups = [NodeGroup(f"g{i}", (f"n{i}",), "Conv") for i in range(91)]
    units = contiguous_units(groups)
    assert len(units) <= RANK_UNITS and [g for u in units for g in u] == groups  # every group once, in graph order
    assert contiguous_units(groups[:RANK_UNITS]) == [[g] for g in groups[:RANK_UNITS]]  # small: one by one


def test_an_asked_sensitivity_analysis_is_recorded_and_orders_mixed_precision(fragile, tmp_path):
    """--int8-sensitivity: every group alone and left out, recorded; mixed precision then follows its ranking
    instead of making ranking candidates of its own."""
    path, val = fragile
    info, sensitivity = make_int8(path, tmp_path / "s.onnx", "cpu", lambda n: images(n, 2), 200,
                                  method="ptq-search", calib_size=64, val=val, max_drop=0.1, sensitivity=True)
    assert sensitivity is not None and sensitivity["groups"][0]["name"] == "classifier"
    mixed = info["mixed_precision"]
    assert mixed["float_groups"] == ["classifier"] and not mixed["ranked_units"]
    assert mixed["ranking"].startswith("leave-one-out KL removed per group left out")


def test_the_model_written_is_the_one_the_search_scored(fragile, tmp_path):
    """A calibration draw may give fewer images than asked (a stratified cap: 512 -> 506 on digits), and asked for
    506 it draws another set. The model written must be quantized from the images its scored candidate was."""
    from edgekd.export.int8 import quantize

    path, val = fragile

    def draw(n):  # fewer than asked, and a different set for every size
        return images(n - 3, 1000 + n)

    out = tmp_path / "short.onnx"
    info, _ = make_int8(path, out, "cpu", draw, 200, method="ptq-search", calib_size=64, val=val, max_drop=1.0)
    assert info["calibration"]["images"] == 61 and not info["mixed_precision"]["float_groups"]
    quantize(path, tmp_path / "scored.onnx", draw(64), "cpu")  # the candidate it scored: calibrated on draw(64)
    assert out.read_bytes() == (tmp_path / "scored.onnx").read_bytes()


def test_calibration_is_chosen_by_answers_kept_on_validation(tmp_path):
    """Two calibrations, one with two huge outlier images: minmax stretches every range with them and changes many
    of FP32's answers. The search scores both on the validation images only, whose labels are all wrong on purpose
    (the choice is label-free: answers kept against FP32), and must pick the clean one."""
    path = tiny_model(tmp_path / "plain.onnx", fragile=False, seed=3)
    calib = images(128, 4)
    calib[:2] *= 60
    clean, dirty = calib[2:], calib
    with Quantizer(path, "cpu") as q:
        x_val = images(300, 5)
        by = {n: q.quantize(tmp_path / f"{n}.onnx", c, Recipe("minmax", len(c))) for n, c in (("clean", clean),
                                                                                          ("dirty", dirty))}
        val = Evaluator(path, x_val, (predictions(path, x_val) + 1) % 4)  # every label wrong
        flips = {n: val.score(by[n]).flips for n in by}
        assert flips["dirty"] > flips["clean"] + 0.05, f"the calibrations must differ for this test: {flips}"
        recipe, score, rows, _ = search_calibration(q, lambda n: calib[len(calib) - n:], [len(clean), len(dirty)], val,
                                                 methods=("minmax",))
    assert recipe.images == len(clean) and score.flips == flips["clean"] and score.accuracy == 0.0
    assert {r["images"] for r in rows} == {len(clean), len(dirty)}


def test_trt_preset_keeps_tensorrt_rules(fragile, tmp_path):
    """The trt preset may keep a Conv/Gemm float (TensorRT runs a layer without Q/DQ in floating point): the search
    keeps the fragile classifier float, gets its accuracy back, and the rule check passes and names the float layer."""
    path, val = fragile
    out = tmp_path / "trt.onnx"
    info, _ = make_int8(path, out, "trt", lambda n: images(n, 2), 64, method="ptq-search", calib_size=64, val=val,
                        max_drop=0.15)
    report = check_tensorrt_qdq(out)
    assert report.ok, report.problems
    assert {c["placement"] for c in info["calibration"]["candidates"]} == {"all", "inputs"}
    assert {c["method"] for c in info["calibration"]["candidates"]} == {"minmax", "percentile"}  # searched for trt
    assert info["mixed_precision"]["float_groups"] == ["classifier"] and info["mixed_precision"]["reached_target"]
    assert info["validation"]["int8_all"]["accuracy"] < 0.6 < 0.85 < info["validation"]["int8"]["accuracy"]
    assert "classifier" in report.float_layers and report.quantized_weights >= 2  # the convs stay INT8
    graph = onnx.load(str(out)).graph
    classifier = next(n for n in graph.node if n.name == "classifier")
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in classifier.input)  # no Q/DQ at all: float


def test_plain_ptq_unchanged_and_needs_no_validation(fragile, tmp_path):
    info, sensitivity = make_int8(fragile[0], tmp_path / "ptq.onnx", "cpu", lambda n: images(n, 2), 500,
                                  calib_size=64)
    assert info == {"method": "ptq", "calibration": {"split": "train", "images": 64, "method": "minmax"}}
    assert sensitivity is None
    with pytest.raises(EdgeKDError, match="validation"):
        make_int8(fragile[0], tmp_path / "x.onnx", "cpu", lambda n: images(n, 2), 500, method="ptq-search")
    with pytest.raises(EdgeKDError, match="unknown INT8 method"):
        make_int8(fragile[0], tmp_path / "x.onnx", "cpu", lambda n: images(n, 2), 500, method="qat")


def test_search_never_sees_more_than_validation(fragile, tmp_path):
    """search_ptq scores candidates with the Evaluator it is given and nothing else."""
    path, val = fragile
    seen = []

    class Spy(Evaluator):
        def logits(self, model, as_written=False):
            seen.append(len(self.images))
            return super().logits(model, as_written)

    spy = Spy(path, val.images, val.labels)
    with Quantizer(path, "cpu") as q:
        search_ptq(q, tmp_path / "s.onnx", lambda n: images(n, 2), [64], spy, max_drop=0.01,
                   methods=("minmax",))
    assert set(seen) == {len(val.images)}


def test_a_small_validation_split_is_scored_on_its_augmentation_views_plain_view_first():
    import torch

    x = torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    views, labels, n = validation_views(x, np.array([3, 1]), padding=1, hflip=False, min_images=10)
    assert n == 5 and views.shape == (10, 1, 4, 4) and labels.tolist() == [3, 1] * 5
    assert (views[:2] == x.numpy()).all() and not (views[2:4] == x.numpy()).all()
    big, _, n = validation_views(x, np.array([3, 1]), padding=2, hflip=True, min_images=2)
    assert n == 1 and (big == x.numpy()).all()


def test_rankings_score_the_plain_view_of_at_most_so_many_images_against_the_same_fp32(fragile):
    """Evaluator.ranking_view: the first row of each image (validation_views puts the plain view first), at most
    `max_images` of them spread over the split, scored against the FP32 logits already computed; without views and
    under the cap it is the evaluator itself."""
    path, val = fragile
    assert val.ranking_view(1000) is val
    x = images(40, 7)
    labels = predictions(path, x)
    views = Evaluator(path, np.concatenate([x, x[:, :, ::-1].copy()]), np.concatenate([labels, labels]),
                      clusters=np.tile(np.arange(40), 2))
    plain = views.ranking_view(1000)
    assert plain.images_scored == 40 and len(plain.labels) == 40 and plain.evaluations == 0  # FP32 not run again
    np.testing.assert_array_equal(plain.reference, views.reference[:40])
    assert plain.fp32.accuracy == 1.0 and plain.score(path).flips == 0.0
    few = views.ranking_view(5)  # rows 0, 10, 20, 29, 39 of the plain view: spread, not the first five
    np.testing.assert_array_equal(few.images, x[[0, 10, 20, 29, 39]])
    np.testing.assert_array_equal(few.reference, views.reference[[0, 10, 20, 29, 39]])
    assert len(val.ranking_view(100).labels) == 100 and val.ranking_view(100).images_scored == 100


def _collapsing_copy(tiny_study, root, factor: float = 1000):
    """The tiny study with its KD student given one activation outlier: channel 0 of blocks.3.0's output `factor`
    times larger and the next (linear) pointwise conv's input weights as much smaller, so FP32 computes what it did,
    while per-tensor INT8 activations of that tensor lose every other channel (and at 1e5, FP16 overflows)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    study = root / "tiny"
    shutil.copytree(tiny_study, study, ignore=shutil.ignore_patterns("bundle", "plan.json", "summary.json"))
    run = study / "synthetic" / "base" / "kd" / "seed0"
    weights = load_file(run / "model.safetensors")
    meta = safe_open(str(run / "model.safetensors"), "pt").metadata()
    weights["blocks.3.0.bn3.weight"][0] *= factor
    weights["blocks.3.0.bn3.bias"][0] *= factor
    weights["blocks.4.0.conv_pw.weight"][:, 0] /= factor
    save_file(weights, run / "model.safetensors", metadata=meta)
    return study, run


def test_the_guard_escalates_a_collapsed_int8_model_on_validation(tiny_study, tmp_path):
    """Plain ptq collapses the outlier student (it loses more than int8_max_drop on the validation split); the
    guard makes it again with ptq-search, which floats the outlier, and deploys that; every step is recorded."""
    from edgekd.export.bundle import ExportOptions, export_run

    _, run = _collapsing_copy(tiny_study, tmp_path)
    logs = []
    # 5%: the tiny study's barely trained student (34-36% accuracy) changes 1.4% of its answers at best, up to 2.6% by
    # the guard's upper bound (its validation split is small) on an AMD EPYC; trained and quantized on an Intel
    # Xeon with AMX, 2.4%, up to 4.2%. Plain ptq changes 85% of them on both.
    bundle = export_run(run, ExportOptions(targets=("onnx", "int8"), int8_presets=("cpu",), calib_size=64,
                                           int8_max_drop=5.0), log=logs.append)
    model = json.loads((bundle / "manifest.json").read_text())["models"]["onnx-int8-cpu"]
    steps = model["guard"]["steps"]
    assert steps[0]["val_flips_pts"] > 50 and steps[0]["held_by"] is None  # the guard's rule
    assert steps[1]["held_by"] and min(steps[1]["val_flips_bound_pts"], steps[1]["val_drop_bound_pts"]) <= 5.0
    assert steps[0]["method"] == "ptq" and steps[0]["val_drop_pts"] > 1.0  # the collapse, seen on validation
    assert [s["method"] for s in steps] == ["ptq", "ptq-search"] and steps[1]["val_drop_pts"] <= 5.0, steps
    assert steps[1]["val_flips_pts"] < steps[0]["val_flips_pts"] / 10  # the outlier floated: the collapse is gone
    assert model["deployed"], steps[1]
    assert model["method"] == "ptq-search" and model["guard"]["split"] == "validation"
    assert any("ptq " in line and "-> deployed (ptq-search)" in line for line in logs)


def test_an_fp16_model_that_overflows_is_caught_on_validation_and_not_deployed(tiny_study, tmp_path):
    """FP16's failure is overflow: an activation of 1e5 is inf in FP16 (its largest is 65504), though FP32 is
    unchanged. The guard scores model.fp16.onnx on the validation split and leaves it undeployed; the same student
    without the outlier deploys its FP16 model."""
    from edgekd.export.bundle import ExportOptions, export_run

    _, run = _collapsing_copy(tiny_study, tmp_path, factor=1e5)
    options = ExportOptions(targets=("onnx",), fp16=True)
    overflowing = json.loads((export_run(run, options, log=lambda line: None) / "manifest.json").read_text())
    healthy = json.loads((export_run(run.parent.parent / "scratch" / "seed0", options, log=lambda line: None)
                          / "manifest.json").read_text())
    model = overflowing["models"]["onnx-fp16"]
    assert overflowing["models"]["onnx-fp32"]["parity"]["ok"]  # FP32 computes what it did
    assert not model["deployed"] and model["guard"]["steps"][0]["val_flips_pts"] > 1.0, model["guard"]
    assert "validation" in model["not_deployed"] and model["guard"]["split"] == "validation"
    assert healthy["models"]["onnx-fp16"]["deployed"], healthy["models"]["onnx-fp16"]["guard"]
    assert healthy["models"]["onnx-fp16"]["guard"]["steps"][0]["val_flips_pts"] <= 1.0


def test_a_model_no_method_saves_is_not_deployed_not_benched_and_shown_as_failed(tiny_study, tmp_path):
    """Without an escalation that holds, the collapsed INT8 model stays in the bundle marked not deployed with its
    drop and reason; bench leaves it out (unless named by --model) and the report lists it as a failed export,
    kept out of the INT8 KD gain."""
    from edgekd.bench.harness import BenchOptions, bench_bundle, save_bench
    from edgekd.export.bundle import ExportOptions, export_run
    from edgekd.report import build_report

    study, run = _collapsing_copy(tiny_study, tmp_path)
    options = ExportOptions(targets=("onnx", "int8"), int8_presets=("cpu",), calib_size=64, int8_escalation=())
    bundles = [export_run(r, options, log=lambda line: None) for r in (run, run.parent.parent / "scratch" / "seed0")]
    model = json.loads((bundles[0] / "manifest.json").read_text())["models"]["onnx-int8-cpu"]
    assert not model["deployed"] and "changes" in model["not_deployed"] and "validation" in model["not_deployed"]
    assert (bundles[0] / model["file"]).is_file()  # kept, for --model
    bench = BenchOptions(batch_sizes=(1,), iters=3, warmup=1)
    record = bench_bundle(bundles[0], bench)
    assert "onnx-int8-cpu" not in [r["model"] for r in record["results"]] and "onnx-int8-cpu" in record["not_deployed"]
    asked = bench_bundle(bundles[0], BenchOptions(batch_sizes=(1,), iters=3, warmup=1, models=("onnx-int8-cpu",)))
    assert [r["model"] for r in asked["results"]] == ["onnx-int8-cpu"]
    for bundle in bundles:
        save_bench(bench_bundle(bundle, bench) if bundle != bundles[0] else record)
    report = build_report(study)
    assert [(r["method"], r["model"]) for r in report.not_deployed] == [("kd", "onnx-int8-cpu")]
    text = (study / "report" / "report.md").read_text()
    assert "INT8 models not deployed (1)" in text and "changes" in text
    row = next(r for r in report.retention if r["deployed"].startswith("onnx-int8-cpu"))
    assert row["not_deployed"] == 1 and row["gain_int8"] is None  # never averaged into a KD gain
    assert "1 seed(s): KD 1, scratch 0" in text


def test_the_guard_judges_by_upper_bounds_on_two_certificates():
    """(RULES_REVISION 9.) A model that changes 0.54% of the validation answers with a clustered SE of 0.27% may change more than 1% on
    other images (one did, and lost 1.11 points on test): each certificate is held to measured + GUARD_Z SEs. The
    paired accuracy drop certifies too where labels are trusted (a Fashion-MNIST MobileNet: 1.28% changed, up to
    1.57%, but 0.13 points lost, up to 0.42: deployed), never on labels known to be noisy; a holding candidate ranks
    above every other."""
    from edgekd.export.int8 import GUARD_Z, Guard, drop_bound, flips_bound
    from edgekd.export.quantize import Score

    fp32 = Score(0.9, 1.0, 0.0)
    sure, doubtful = Score(0.9, 1 - 0.0054, 0.01), Score(0.9, 1 - 0.0054, 0.01, flips_se=0.0027)
    label_free = Guard(0.01)
    assert label_free.holds(sure) and not label_free.holds(doubtful)
    assert abs(flips_bound(doubtful) - (0.0054 + GUARD_Z * 0.0027)) < 1e-12
    steady = Score(0.9, 1 - 0.007, 0.02, flips_se=0.001)
    assert label_free.holds(steady) and label_free.better(steady, doubtful) and not label_free.better(doubtful, steady)

    fashion = Score(0.9 - 0.00133, 1 - 0.0128, 0.02, drop_se=0.00146, flips_se=0.00147)
    assert abs(drop_bound(fashion, fp32) - (0.00133 + GUARD_Z * 0.00146)) < 1e-12
    trusted = Guard(0.01, fp32)
    assert trusted.holds(fashion) and trusted.held_by(fashion) == "accuracy drop"
    assert not label_free.holds(fashion) and label_free.held_by(fashion) is None  # noisy labels: changed answers only
    assert trusted.held_by(sure) == "answers changed" or trusted.held_by(sure) == "accuracy drop"
    lossy = Score(0.9 - 0.012, 1 - 0.03, 0.05, drop_se=0.002, flips_se=0.002)  # loses 1.2 points: neither holds
    assert not trusted.holds(lossy) and trusted.better(fashion, lossy) and trusted.held_by(lossy) is None
    # between two that hold, fewer answers changed wins, though both lose nothing measurable
    assert trusted.better(sure, fashion) and not trusted.better(fashion, sure)
    # a quickstart-sized split bounds the drop too loosely (2 SE = 0.9 points of a 1-point limit) to certify: a model
    # changing 4% of the answers at no measured drop is held to the share changed, and refused
    loose = Score(0.9, 1 - 0.04, 0.03, drop_se=0.0045, flips_se=0.006)
    assert drop_bound(loose, fp32) <= 0.01 and not trusted.holds(loose) and trusted.held_by(loose) is None
    assert trusted.bounds(fashion) == {"flips_bound_pts": round(flips_bound(fashion) * 100, 3),
                                       "drop_bound_pts": round(drop_bound(fashion, fp32) * 100, 3)}




def test_a_score_made_now_is_the_score_made_in_the_background(fragile, monkeypatch):
    """Evaluator.score shares a model's batches out over the scoring workers (a session each) and puts them back in
    order: the same logits, so the same score, as one session running them all (submit)."""
    import edgekd.export.quantize as quantize

    monkeypatch.setattr(quantize, "scoring_workers", lambda: 3)  # eight batches of 9 (the last of 7): 3, 3, 2
    path, _ = fragile
    x = images(70, 11)
    labels = predictions(path, x)
    whole, split = Evaluator(path, x, labels, batch_size=9), Evaluator(path, x, labels, batch_size=9)
    one, now = whole.wait(whole.submit(path)), split.score(path)
    np.testing.assert_array_equal(split._split_logits(path.read_bytes(), False), whole.reference)
    assert now == one and now.agreement == 1.0 and split.evaluations == 2  # FP32, then the model: once each
    assert split.score(path) is now and split.evaluations == 2  # the same content again: not scored again


@pytest.mark.parametrize("n", [64, 300])  # 300: chunks of 256 and 32, then a batch of 12
def test_min_max_calibration_gives_ort_calibrators_ranges_to_the_bit(tmp_path, n):
    """Quantizer._minmax against ORT's own MinMaxCalibrater (create_calibrator, as calibrate() ran it before) fed
    the same chunks, on a timm MobileNetV3 exported as a bundle exports it (its hard-swish, SE gates and adds): the
    same tensors, the same min and max of each."""
    import timm
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data

    from edgekd.export.bundle import _export_onnx
    from edgekd.export.quantize import _Batches, _ort_method, calibration_chunks, quantizable_op_types

    path = tmp_path / "student.onnx"
    _export_onnx(timm.create_model("mobilenetv3_small_050", num_classes=10, in_chans=1).eval(), path, (1, 16, 16))
    x = np.random.default_rng(0).normal(0, 1.5, (n, 1, 16, 16)).astype(np.float32)
    with Quantizer(path, "cpu") as q:
        ours = load_tensors_data(q.calibrate(x, "minmax")).data
        theirs = create_calibrator(q.pre, sorted(quantizable_op_types()), augmented_model_path=str(tmp_path / "a.onnx"),
                                   calibrate_method=_ort_method("minmax"))
        for chunk in calibration_chunks(x):
            theirs.collect_data(_Batches(q.input_name, chunk))
        theirs = theirs.compute_data().data
    assert len(ours) > 100 and ours.keys() == theirs.keys()
    for name, data in theirs.items():
        assert [float(v[0]) for v in data.range_value] == [float(v[0]) for v in ours[name].range_value], name


def test_min_max_calibration_past_its_memory_budget_is_ort_calibrators(fragile, monkeypatch):
    """A model whose calibrated tensors would pass MINMAX_OUTPUT_BYTES a batch is calibrated by ORT's own
    MinMaxCalibrater (which holds only their reductions): the same ranges either way."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    import edgekd.export.quantize as quantize

    path, _ = fragile
    x = images(45, 3)
    with Quantizer(path, "cpu") as q:
        fast = load_tensors_data(q.calibrate(x, "minmax")).data
    monkeypatch.setattr(quantize, "MINMAX_OUTPUT_BYTES", 0)
    with Quantizer(path, "cpu") as q:
        assert q._minmax(x) is None
        slow = load_tensors_data(q.calibrate(x, "minmax")).data
    assert fast.keys() == slow.keys() and all(
        [float(np.ravel(v)[0]) for v in fast[k].range_value] == [float(np.ravel(v)[0]) for v in slow[k].range_value]
        for k in fast)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_every_calibration_image_counts(fragile, method):
    """The calibration draws n images and names n (the manifest's calibration.images): every one of them is seen,
    the last of a count that is no multiple of the batch too. Until rules revision 12 the images past a chunk's last
    whole batch of 32 were dropped (506 -> 480 on digits)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    from edgekd.export.quantize import calibration_chunks

    path, _ = fragile
    assert [len(c) for c in calibration_chunks(np.zeros((300, 1)))] == [256, 32, 12]
    assert [len(c) for c in calibration_chunks(np.zeros((64, 1)))] == [64]
    x = images(45, 3)  # a batch of 32 and one of 13
    x[-1] = 40.0  # the last image only (2% of the input's values: inside percentile's 99.999%): far out of the rest
    with Quantizer(path, "cpu") as q:
        high = float(np.ravel(load_tensors_data(q.calibrate(x, method)).data["input"].range_value[1])[0])
    assert high > 39 and x[:-1].max() < 20


@pytest.mark.parametrize("n", [1, 2, 5, 9, 41])
def test_past_the_top_judges_the_last_candidate_first(n):
    """Where the top unit floated (prefix `top`) did not hold: the smallest holding prefix past it, by bisection
    after the last one; one candidate judged when even the last does not hold (half the quickstart's students); a
    last candidate over the float budget (None) leaves bisection to decide."""
    from edgekd.export.int8 import past_the_top

    for top in range(-1, n):
        for first in [*range(top + 1, n), None]:
            judged = []

            def holds(i, first=first, judged=judged, top=top):
                assert top < i < n and i not in judged
                judged.append(i)
                return first is not None and i >= first

            assert past_the_top(n, top, holds) == first
            assert len(judged) <= 1 + max(0, n - top - 2).bit_length()
            if first is None and top < n - 1:
                assert judged == [n - 1]
        if top < n - 2:  # the last over the budget: found below it, or None
            assert past_the_top(n, top, lambda i: None if i == n - 1 else i >= n - 2) == n - 2
            assert past_the_top(n, top, lambda i: None if i == n - 1 else False) is None
