import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd.cli import main
from edgekd.errors import EdgeKDError
from edgekd.export.bundle import ExportOptions, export_run, find_student_runs
from edgekd.export.qdq_rules import check_tensorrt_qdq
from edgekd.models import count_parameters, create_model


def test_bundle_contents_and_manifest(tiny_bundle):
    names = {p.name for p in tiny_bundle.iterdir()}
    assert {"model.onnx", "model.int8-cpu.onnx", "model.int8-trt.onnx", "model.safetensors", "eval.npz",
            "manifest.json"} <= names
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["dataset"] == "synthetic" and m["classes"] == ["bar0", "bar1", "bar2", "bar3"]
    assert m["input_shape"] == [1, 12, 12] and len(m["normalization"]["mean"]) == 1
    assert len(m["source"]["checkpoint_sha256"]) == 64 and m["packages"]["onnxruntime"]
    d = m["distill"]
    assert d["method"] == "kd" and d["teacher_acc"] is not None and "kd" in d["methods"]
    assert d["methods"]["kd"]["kd_gain"]["n"] == 1
    eval_set = np.load(tiny_bundle / "eval.npz")
    assert eval_set["images"].dtype == np.uint8 and len(eval_set["labels"]) == m["eval"]["samples"]
    assert m["eval"]["split"] == "test" and m["eval"]["subset"] is False
    phases = m["export_phases_s"]  # where the export's time went (benchmarks/study_speed.py)
    assert {"data and model", "onnx export", "test scoring", "int8 quantize_static", "int8 calibration"} <= set(phases)
    assert 0 < sum(phases.values()) <= m["export_s"] + 0.05


def test_onnx_matches_pytorch(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())["models"]["onnx-fp32"]
    assert m["exporter"] == "torchscript"  # the default, recorded
    assert m["parity"]["max_abs_logit_diff"] <= 1e-4 and m["parity"]["top1_agreement"] >= 0.999
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value  # dynamic batch


@pytest.mark.parametrize("name, shape, small_input", [("mobilenetv3_small_050", (1, 16, 16), True),
                                                      ("resnet10t", (1, 28, 28), False)])
def test_both_onnx_exporters_make_the_same_graph(tmp_path, name, shape, small_input):
    """The default TorchScript exporter (+ onnxscript's optimizer) against torch's dynamo exporter on edgekd's
    students: the same operators and node count, the same logits (what lets the faster one be the default)."""
    import collections

    import onnxruntime as ort
    import torch

    from edgekd.export.bundle import _export_onnx

    torch.manual_seed(0)
    model = create_model(name, 10, shape[0], small_input).eval()
    x = torch.randn(5, *shape)  # another batch size than the export's example: the batch axis is dynamic
    with torch.inference_mode():
        reference = model(x).numpy()
    graphs = {}
    for exporter in ("torchscript", "dynamo"):
        path = tmp_path / f"{exporter}.onnx"
        _export_onnx(model, path, shape, exporter=exporter)
        logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        assert np.abs(logits - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())
        graphs[exporter] = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert "Identity" not in graphs["torchscript"] and "Constant" not in graphs["torchscript"]
    pooled = {"ReduceMean", "GlobalAveragePool", "Flatten", "Reshape"}  # the head's pooling is spelled two ways
    strip = [{op: n for op, n in g.items() if op not in pooled} for g in graphs.values()]
    assert strip[0] == strip[1], graphs


def test_onnx_has_exactly_the_students_parameters(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    onnx_params = sum(numpy_helper.to_array(t).size for t in model.graph.initializer
                      if numpy_helper.to_array(t).dtype == np.float32 and t.dims)
    # BatchNorm folding merges 4 vectors per norm into the conv: compare with the unfolded count minus those.
    student = create_model(manifest["student"]["model"], 4, 1)
    bn = sum(p.numel() for n, p in student.named_parameters() if "bn" in n)
    assert count_parameters(student) - bn <= onnx_params <= count_parameters(student) + 2 * bn


def test_int8_presets(tiny_bundle):
    models = json.loads((tiny_bundle / "manifest.json").read_text())["models"]
    for preset in ("cpu", "trt"):
        m = models[f"onnx-int8-{preset}"]
        assert m["calibration"] == {"split": "train", "images": 64, "method": "minmax"}
        assert m["precision"] == "int8" and 0 <= m["accuracy"] <= 1
        assert m["accuracy_change_vs_fp32"] == pytest.approx(m["accuracy"] - models["onnx-fp32"]["accuracy"])
    # each preset scored as its target computes: cpu by ONNX Runtime's integer kernels, trt with its Q/DQ as written
    # (in float: TensorRT's int32 arithmetic, not ORT's saturating x86 kernels)
    from edgekd.runtime.evalset import accuracy, load_eval, predict
    from edgekd.runtime.runners import OrtRunner

    images, labels = load_eval(tiny_bundle)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    norm = manifest["normalization"]
    for preset, as_written in (("cpu", False), ("trt", True)):
        runner = OrtRunner(tiny_bundle / f"model.int8-{preset}.onnx", as_written=as_written)
        assert models[f"onnx-int8-{preset}"]["accuracy"] == accuracy(predict(runner, images, norm["mean"],
                                                                             norm["std"]), labels)
        assert ("as written" in models[f"onnx-int8-{preset}"]["scored_as"]) == as_written
    graph = onnx.load(str(tiny_bundle / "model.int8-cpu.onnx")).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert convs and all(producers.get(c.input[1]) == "DequantizeLinear" for c in convs), "unquantised convs"


def test_trt_preset_follows_tensorrt_rules_and_cpu_preset_does_not(tiny_bundle):
    good = check_tensorrt_qdq(tiny_bundle / "model.int8-trt.onnx")
    assert good.ok, good.problems
    assert good.quantized_weights > 0 and good.activation_pairs > 0
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["models"]["onnx-int8-trt"]["tensorrt_qdq_check"]["ok"] is True
    bad = check_tensorrt_qdq(tiny_bundle / "model.int8-cpu.onnx")
    assert not bad.ok and any("zero point is uint8" in p for p in bad.problems)
    assert not check_tensorrt_qdq(tiny_bundle / "model.onnx").ok  # no Q/DQ at all


def _qdq_graph(zero_point=0, per_channel=True, share_q=False, opset=13):
    w = np.ones((4, 1, 3, 3), np.int8)
    scale = np.full(4 if per_channel else (), 0.1, np.float32)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(scale, "w_s"),
             numpy_helper.from_array(np.zeros(4 if per_channel else (), np.int8), "w_z"),
             numpy_helper.from_array(np.array(0.05, np.float32), "a_s"),
             numpy_helper.from_array(np.array(zero_point, np.int8), "a_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], name="wdq", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if share_q:
        nodes.append(helper.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xd2"], name="dq2"))
        outputs.append(helper.make_tensor_value_info("xd2", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("kwargs, problem", [
    ({}, None),
    ({"zero_point": 3}, "is not 0"),
    ({"per_channel": False}, "not per output channel"),
    ({"share_q": True}, "dedicated Q/DQ pairs"),
    ({"opset": 12}, "opset 12 < 13"),
])
def test_qdq_rules_on_handmade_graphs(kwargs, problem):
    report = check_tensorrt_qdq(_qdq_graph(**kwargs))
    if problem is None:
        assert report.ok, report.problems
    else:
        assert not report.ok and any(problem in p for p in report.problems), report.problems


def test_trt_target_without_tensorrt_says_where_it_works(tiny_study, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_study / "synthetic" / "base" / "scratch" / "seed0", run,
                    ignore=shutil.ignore_patterns("bundle"))
    with pytest.raises(EdgeKDError, match="TensorRT .*(not installed|no runtime libraries).*NVIDIA GPU"):
        export_run(run, ExportOptions(targets=("trt", "int8")), log=lambda line: None)
    # checked before the ONNX and INT8 work, not after it
    assert not (run / "bundle").exists()


def test_a_run_copied_out_of_its_study_exports(tiny_study, tmp_path, monkeypatch):
    """A run directory on its own (copied elsewhere, given as a relative path) exports; its bundle simply has no
    study accuracies to summarise (it once failed with an IndexError on the missing study levels)."""
    shutil.copytree(tiny_study / "synthetic" / "base" / "kd" / "seed0", tmp_path / "seed0",
                    ignore=shutil.ignore_patterns("bundle"))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "seed0"]) == 0
    distill = json.loads((tmp_path / "seed0" / "bundle" / "manifest.json").read_text())["distill"]
    assert distill["role"] == "kd" and "scratch_acc" not in distill


def test_export_errors(tiny_study, tmp_path, capsys):
    with pytest.raises(EdgeKDError, match="does not exist"):
        find_student_runs(tmp_path / "nope")
    with pytest.raises(EdgeKDError, match="no finished student runs"):
        find_student_runs(tiny_study / "synthetic" / "base" / "teacher")
    assert main(["export", str(tmp_path)]) == 2
    assert "run `edgekd distill` first" in " ".join(capsys.readouterr().err.split())


def test_feature_distilled_student_exports_without_its_adapter(tmp_path, tiny_profile):
    from safetensors.torch import load_file

    from edgekd.config import load_profile
    from edgekd.workflows import distill as run_study

    profile = load_profile(tiny_profile, ["study.seeds=[0]", "student.epochs=1",
                                          "methods={fitnet={ce={weight=1.0}, fitnet={weight=1.0}}, "
                                          "rkd={ce={weight=1.0}, rkd={weight=1.0}}}"])
    records = run_study(profile, tmp_path)
    assert {r["role"] for r in records} == {"teacher", "scratch", "kd"}  # no teacher cache: features run live
    root = tmp_path / "tiny" / "synthetic" / "base"
    metrics = json.loads((root / "fitnet" / "seed0" / "metrics.json").read_text())
    assert metrics["teacher_cache"] is False and "fitnet" in metrics["history"][0]
    assert "rkd.distance" in json.loads((root / "rkd" / "seed0" / "metrics.json").read_text())["history"][0]
    student = create_model("test_efficientnet", 4, 1)
    assert set(load_file(root / "fitnet" / "seed0" / "model.safetensors")) == set(student.state_dict())

    def onnx_parameters(run):
        bundle = export_run(run, ExportOptions(targets=("onnx",)), log=lambda line: None)
        model = onnx.load(str(bundle / "model.onnx"))
        return sum(numpy_helper.to_array(t).size for t in model.graph.initializer if t.dims)

    assert onnx_parameters(root / "fitnet" / "seed0") == onnx_parameters(root / "scratch" / "seed0")


def test_parity_is_judged_against_the_logits_scale_and_still_catches_a_wrong_export():
    """A confident student (logits near 500) whose ONNX model differs by 0.08 (1.6e-4 of the scale, 100% top-1
    agreement) is a correct export; logits off by their own size, or a changed top-1, are not."""
    import numpy as np

    from edgekd.export.bundle import ExportOptions, logit_parity

    rng = np.random.default_rng(0)
    reference = rng.normal(0, 100, (64, 10))
    reference[np.arange(64), rng.integers(0, 10, 64)] = 500.0
    options = ExportOptions()
    close = logit_parity(reference + rng.uniform(-0.08, 0.08, reference.shape), reference, options)
    assert close["ok"] and close["max_abs_logit_diff"] > 1e-3  # refused by the old absolute 1e-3
    wrong = logit_parity(reference * rng.uniform(0.5, 1.5, reference.shape), reference, options)
    assert not wrong["ok"]
    swapped = reference.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # tiny scale, but other answers
    assert not logit_parity(swapped / 1000, reference / 1000, options)["ok"]


def test_a_bundle_is_keyed_by_how_its_normalization_constants_are_computed(tiny_study, monkeypatch):
    """The bundle normalises its evaluation, calibration and validation images with constants computed from the data
    (NORMALIZATION_REVISION): computed another way, the INT8 models differ (a Fashion-MNIST study's, by the change to
    numpy float64), so a bundle made the old way is not reused as if it were this one."""
    import edgekd.export.bundle as bundle
    from edgekd.export.bundle import ExportOptions, export_key

    run = tiny_study / "synthetic" / "base" / "kd" / "seed0"
    key = export_key(run, ExportOptions(targets=("onnx", "int8")))
    assert key["data"]["normalization"] == bundle.NORMALIZATION_REVISION
    monkeypatch.setattr(bundle, "NORMALIZATION_REVISION", bundle.NORMALIZATION_REVISION + 1)
    assert export_key(run, ExportOptions(targets=("onnx", "int8"))) != key


def test_a_run_exported_again_gives_the_same_files_at_any_threads(tiny_study, tmp_path):
    """The same run and options make the same bundle, file for file, whatever the threads the export is given: at
    one, the INT8 candidates are scored one at a time; at two, in the background and each bisection probe's batches
    on two sessions at once (Evaluator.score). The guard searches here (a 0.1-point limit), so the ranking, the
    bisection and both presets' calibrations all run."""
    import torch

    run = tiny_study / "synthetic" / "base" / "kd" / "seed0"
    options = ExportOptions(targets=("onnx", "int8"), int8_presets=("cpu", "trt"), calib_size=40, int8_max_drop=0.1)
    made, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            copy = tmp_path / f"threads{n}"
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("bundle"))
            manifest = json.loads((export_run(copy, options, log=lambda line: None) / "manifest.json").read_text())
            made.append({k: m["sha256"] for k, m in manifest["models"].items()})
    finally:
        torch.set_num_threads(threads)
    assert made[0] == made[1] and set(made[0]) == {"onnx-fp32", "onnx-int8-cpu", "onnx-int8-trt"}
    steps = manifest["models"]["onnx-int8-cpu"]["guard"]["steps"]
    assert [s["method"] for s in steps] == ["ptq", "ptq-search"]  # the search ran
    assert manifest["models"]["onnx-int8-cpu"]["mixed_precision"]["steps"]  # and its bisection
