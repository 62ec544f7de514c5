"""The compression ladder's pruning stage: Torch-Pruning on timm students, pruned weights that load into a fresh
model, and a study whose KD students are pruned, fine-tuned with KD, exported and re-run only when they must be."""

from pathlib import Path

import pytest
import torch

from edgekd.errors import EdgeKDError
from edgekd.models import count_parameters, create_model, load_weights
from edgekd.models.pruning import PRUNED, fit_to_weights, prune_channels
from edgekd.runio import save_tensors


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "resnet10t", "mobilenetv3_small_050"])
def test_pruned_model_is_smaller_and_reloads_from_its_weights(name, tmp_path):
    """Half the channels go (residual sums and depthwise convs kept consistent by Torch-Pruning), the classes stay,
    and a fresh model reshaped to the saved weights computes the same logits."""
    torch.manual_seed(0)
    model = create_model(name, 5, 1, small_input=True).eval()
    before = count_parameters(model)
    x = torch.randn(3, 1, 16, 16)
    prune_channels(model, x[:1], 0.5)
    after = count_parameters(model)
    assert after < 0.45 * before, (before, after)  # ~a quarter of a conv's weights remain when both sides halve
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 5)
    save_tensors(tmp_path / "model.safetensors", model.state_dict(), {PRUNED: "0.5"})
    fresh = load_weights(create_model(name, 5, 1, small_input=True), tmp_path / "model.safetensors").eval()
    assert count_parameters(fresh) == after
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)


def test_unpruned_weights_of_another_shape_still_refused(tmp_path):
    """Only a file that says it is pruned reshapes the model: a wrong checkpoint is still one clear line."""
    model = create_model("test_resnet", 5, 1)
    prune_channels(model, torch.zeros(1, 1, 16, 16), 0.5)
    save_tensors(tmp_path / "model.safetensors", model.state_dict())
    with pytest.raises(EdgeKDError, match="does not fit the model"):
        load_weights(create_model("test_resnet", 5, 1), tmp_path / "model.safetensors")


def test_prune_share_checked():
    with pytest.raises(EdgeKDError, match="between 0 and 1"):
        prune_channels(create_model("test_resnet", 5, 1), torch.zeros(1, 1, 16, 16), 1.0)


def test_fit_to_weights_refuses_layers_it_cannot_rebuild():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.LayerNorm([4]))
    with pytest.raises(EdgeKDError, match="cannot rebuild"):
        fit_to_weights(model, {"1.weight": [2], "1.bias": [2]})


def test_compress_profile_keys_checked(tiny_profile):
    from edgekd.config import ProfileError, load_profile

    with pytest.raises(ProfileError) as err:
        load_profile(tiny_profile, ["compress.prune=1.5", "compress.method=dkd"])
    assert "'compress.prune' must be the share of channels to remove" in str(err.value)
    with pytest.raises(ProfileError, match="'compress.method' names 'dkd', which is not a method"):
        load_profile(tiny_profile, ["compress.prune=0.5", "compress.method=dkd"])


def test_study_prunes_kd_students_and_reruns_only_what_changed(tiny_profile, tmp_path):
    """kd+prune50 runs beside kd: fewer parameters, fine-tuned with kd's losses from the same teacher, its own
    bundle with ONNX parity; re-running skips it; changing compress.prune makes a new pruned run and retrains
    nothing else."""
    from edgekd.config import load_profile
    from edgekd.export.bundle import ExportOptions, export_run
    from edgekd.runio import read_json
    from edgekd.workflows import distill as run_study

    sets = ["study.seeds=[0]", "compress.prune=0.5", "compress.finetune_epochs=1"]
    out = tmp_path / "runs"
    records = run_study(load_profile(tiny_profile, sets), out)
    by_method = {r["method"]: r for r in records if r["role"] == "kd"}
    assert set(by_method) == {"kd", "kd+prune50"}
    pruned, source = by_method["kd+prune50"], by_method["kd"]
    assert pruned["params"] < 0.6 * source["params"]
    metrics = read_json(out / "tiny" / "synthetic" / "base" / "kd+prune50" / "seed0" / "metrics.json")
    assert metrics["pruned"]["share"] == 0.5 and metrics["losses"] == {"ce": {"weight": 0.5},
                                                                       "kd": {"weight": 0.5, "temperature": 2.0}}
    assert metrics["epochs"] == 1 and metrics["key"]["config"]["compress"] == {"prune": 0.5, "method": "kd"}

    run = out / "tiny" / "synthetic" / "base" / "kd+prune50" / "seed0"
    logs = []
    bundle = export_run(run, ExportOptions(targets=("onnx",)), log=logs.append)
    manifest = read_json(bundle / "manifest.json")
    assert manifest["models"]["onnx-fp32"]["parity"]["top1_agreement"] == 1.0

    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    run_study(load_profile(tiny_profile, sets), out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == stamp  # all current

    records = run_study(load_profile(tiny_profile, [*sets[:1], "compress.prune=0.25", sets[2]]), out)
    assert {r["method"] for r in records if r["role"] == "kd"} == {"kd", "kd+prune25"}
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())  # kd+prune50 left as it was, not shown


QAT_SETS = ["study.name=qat", "study.seeds=[0]", "datasets={digits={image_size=8, hflip=false, crop_padding=1}}",
            "teacher.epochs=6", "student.epochs=6", "teacher.batch_size=64", "student.batch_size=64"]


@pytest.fixture(scope="module")
def qat_study(tmp_path_factory):
    """A tiny KD student on real data (digits at 8x8): confident enough that INT8 parity is about the export,
    not about near-ties of an untrained model."""
    from conftest import TINY_PROFILE

    from edgekd.config import load_profile
    from edgekd.workflows import distill as run_study

    root = tmp_path_factory.mktemp("qat")
    (root / "qat.toml").write_text(TINY_PROFILE)
    run_study(load_profile(root / "qat.toml", QAT_SETS), root / "runs")
    return root / "runs" / "qat" / "digits" / "base"


def test_qat_kd_exports_learned_scales_with_parity(qat_study):
    """qat-kd fine-tunes with the run's own losses and teacher, exports Q/DQ ONNX that ONNX Runtime runs, agreeing
    with the fake-quant PyTorch model on >= 99% of the test images (export_run refuses less); the trt preset passes
    the TensorRT Q/DQ rule check; scratch fine-tunes with cross-entropy alone."""
    import onnx

    from edgekd.distill.qat import qat_int8
    from edgekd.export.bundle import ExportOptions, export_run
    from edgekd.runio import read_json

    for role, losses in (("kd", {"ce", "kd"}), ("scratch", {"ce"})):
        bundle = export_run(qat_study / role / "seed0", ExportOptions(
            targets=("onnx", "int8"), int8_presets=("cpu", "trt"), int8_method="qat-kd", qat_epochs=1,
            int8_max_drop=100.0),  # the mechanics of qat-kd, not the guard: the tiny student changes many answers
            log=lambda line: None, qat=qat_int8)
        models = read_json(bundle / "manifest.json")["models"]
        for preset in ("cpu", "trt"):
            info = models[f"onnx-int8-{preset}"]
            assert info["method"] == "qat-kd" and set(info["losses"]) == losses
            assert info["teacher"] is (role == "kd")
            assert info["parity"]["top1_agreement"] >= 0.99
            assert abs(info["accuracy_change_vs_fp32"]) < 0.05
            ops = {n.op_type for n in onnx.load(str(bundle / info["file"])).graph.node}
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert models["onnx-int8-trt"]["tensorrt_qdq_check"]["ok"]
        assert not (bundle / "qat-cpu").exists()  # the fine-tune's checkpoints are gone once the model is written


def test_qat_kd_key_and_method_checked(qat_study, tmp_path, capsys):
    """qat-kd's settings are part of the bundle's key (a changed qat_epochs re-exports); a bad method is one line."""
    from edgekd.cli import main
    from edgekd.export.bundle import ExportOptions, export_key

    run = qat_study / "kd" / "seed0"
    one, two = (export_key(run, ExportOptions(int8_method="qat-kd", qat_epochs=e)) for e in (1, 2))
    assert one != two and export_key(run, ExportOptions()) != one
    assert main(["export", str(run), "--int8-method", "qat-kd", "--qat-epochs", "0"]) == 2
    assert "--qat-epochs must be at least 1" in capsys.readouterr().err
    # a profile may ask for it too (the check once knew only the post-training methods and refused it)
    quickstart = str(Path(__file__).parents[1] / "profiles" / "quickstart.toml")
    assert main(["check", quickstart, "--set", "deploy.int8_method=qat-kd"]) == 0
    assert main(["check", quickstart, "--set", "deploy.int8_method=qat"]) == 2
    assert "must be ptq, ptq-search, qat-kd, got 'qat'" in capsys.readouterr().err


def test_explain_maps_agreement_and_cue_share(tiny_profile, tmp_path):
    """[explain]: a Grad-CAM job per variant after its students (captum at the last stage): each student's agreement
    with the teacher's maps, the cue share on a spurious variant's bias-conflicting images, a grid in the report;
    a second run finds it current."""
    import numpy as np

    from edgekd.config import load_profile
    from edgekd.explain import mass_share, rank_correlation, top_iou
    from edgekd.runio import read_json
    from edgekd.workflows import distill as run_study
    from edgekd.workflows import plan_jobs

    a = np.random.default_rng(0).random((3, 6, 6))
    assert rank_correlation(a, a) == pytest.approx(1.0) and rank_correlation(a, -a) == pytest.approx(-1.0)
    assert top_iou(a, a, 0.2) == 1.0 and mass_share(a, np.ones_like(a, bool)) == pytest.approx(1.0)

    sets = ["study.seeds=[0, 1]", "student.epochs=1", "teacher.epochs=2", "explain.images=8",
            "variants={base={kind=\"base\"}, cue={kind=\"spurious\", p=0.95}}"]
    profile = load_profile(tiny_profile, sets)
    explain = [j for j in plan_jobs(profile, tmp_path / "tiny") if j.kind == "explain"]
    assert [j.label for j in explain] == ["synthetic/base/explain/seed0", "synthetic/cue/explain/seed0"]
    assert len(explain[0].deps) == 5  # the teacher, and scratch and kd of each seed
    from edgekd.workflows import study as run_full_study

    run_study(profile, tmp_path)  # `distill` runs the explain jobs too: they need the trained models only
    record = read_json(tmp_path / "tiny" / "synthetic" / "cue" / "explain" / "seed0" / "explain.json")
    run_full_study(profile, tmp_path)
    assert read_json(tmp_path / "tiny" / "synthetic" / "cue" / "explain" / "seed0" / "explain.json") == record
    record = read_json(tmp_path / "tiny" / "synthetic" / "cue" / "explain" / "seed0" / "explain.json")
    students = [m for m in record["models"].values() if m["role"] != "teacher"]
    assert record["images"] == 8 and record["cue"] and len(students) == 4
    assert all(-1 <= m["rank_corr"] <= 1 and 0 <= m["top_iou"] <= 1 and 0 <= m["cue_share"] <= 1 for m in students)
    text = (tmp_path / "tiny" / "report" / "report.md").read_text()
    assert "Where the students look" in text and "gradcam_synthetic_cue.png" in text
    assert (tmp_path / "tiny" / "report" / "gradcam_synthetic_cue.png").stat().st_size > 1000
    stamp = (tmp_path / "tiny" / "synthetic" / "cue" / "explain" / "seed0" / "explain.json").stat().st_mtime_ns
    run_full_study(profile, tmp_path)
    assert (tmp_path / "tiny" / "synthetic" / "cue" / "explain" / "seed0" / "explain.json").stat().st_mtime_ns == stamp


def test_cli_done_line_of_an_explain_job():
    from edgekd.cli import _done_line
    from edgekd.pipeline.graph import Job

    job = Job("d", "base", "explain", 0, __import__("pathlib").Path("x"), kind="explain")
    assert _done_line(job, {"models": {"a": {}, "b": {}}, "images": 8, "wall_s": 1.0}).startswith(
        "Grad-CAM of 2 models on 8 test images")


def test_int8_compare_scores_other_methods_for_the_retention_table(tiny_profile, tmp_path, capsys):
    """deploy.int8_compare: each bundle scores the other INT8 methods on its evaluation images and records them
    (nothing of them left in the bundle); the report's retention table gets a row per method and preset."""
    import csv
    import json

    from edgekd.cli import main

    args = ["study", str(tiny_profile), "--out", str(tmp_path), "--set", "study.seeds=[0]", "--set",
            "student.epochs=1", "--set", "deploy.iters=3", "--set", "deploy.batch_sizes=[1]",
            "--set", "deploy.int8_presets=['cpu', 'trt']", "--set", "deploy.int8_compare=['ptq-search']"]
    assert main(args) == 0
    bundle = tmp_path / "tiny" / "synthetic" / "base" / "kd" / "seed0" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for preset in ("cpu", "trt"):
        other = manifest["int8_compare"][preset]["ptq-search"]
        assert 0 <= other["accuracy"] <= 1 and "mixed_precision" in other
        assert manifest["models"][f"onnx-int8-{preset}"]["method"] == "ptq"
    assert not [p for p in bundle.iterdir() if p.is_dir()]  # the compared models were scored, not kept
    rows = list(csv.DictReader(open(tmp_path / "tiny" / "report" / "int8_retention.csv")))
    assert {r["deployed"] for r in rows} == {f"onnx-int8-{p} ({m})" for p in ("cpu", "trt") for m in ("ptq", "ptq-search")}
    from edgekd.distill.qat import qat_int8, qat_trainer
    from edgekd.export.bundle import ExportOptions

    assert qat_trainer(ExportOptions(int8_compare=("qat-kd",))) is qat_int8  # a compared qat-kd trains too
    assert qat_trainer(ExportOptions(int8_compare=("ptq-search",))) is None
    assert main(["check", str(tiny_profile), "--set", "deploy.int8_compare=['qat']"]) == 2
    assert "deploy.int8_compare" in capsys.readouterr().err
    assert main(["export", str(bundle.parent), "--int8-compare", "ptq,qat"]) == 2
    assert "--int8-compare 'qat': use some of ptq, ptq-search, qat-kd" in capsys.readouterr().err
