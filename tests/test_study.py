"""`edgekd study` end to end on tiny data, the report it builds, and the paired statistics behind it."""

import csv
import json
import time

import pytest

from edgekd.cli import main
from edgekd.distill.summary import Spread, paired_gain
from edgekd.report.plots import pareto_front

VARIANTS = ("variants={base={kind='base'}, noisy={kind='label_noise', rate=0.25}, "
            "shift={kind='corruption', corruptions=['blur', 'contrast'], severities=[1, 3]}}")


def test_study_end_to_end_and_rerun(tiny_profile, tmp_path, capsys):
    args = ["study", str(tiny_profile), "--out", str(tmp_path), "--set", "study.seeds=[0, 1]",
            "--set", "student.epochs=1", "--set", VARIANTS, "--set", "deploy.iters=5",
            "--set", "deploy.batch_sizes=[1, 8]", "--set", "deploy.int8_presets=['cpu']"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "KD gain by dataset factor" in text and "label noise" in text and "after onnx-int8-cpu" in text
    root = tmp_path / "tiny"
    report = root / "report"
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "<table>" in page
    for name in ("kd_gain_by_factor.png", "accuracy_vs_latency_b8.png", "int8_retention.png", "shift_curves.png",
                 "report.md", "runs.csv", "variants.csv", "deploy.csv"):
        assert (report / name).is_file(), name
    rows = list(csv.DictReader(open(report / "variants.csv")))
    assert {r["variant"] for r in rows} == {"base", "noisy", "shift"}
    assert all(r["gain_n"] == "2" for r in rows)
    deploy = list(csv.DictReader(open(report / "deploy.csv")))
    # a 1-epoch student's INT8 model may be refused by the guard: the bench skips it and says so in its record
    refused = sum(len(json.loads(b.read_text()).get("not_deployed") or {}) for b in root.glob("*/*/*/*/bundle/bench-*.json"))
    assert {r["deployed"] for r in deploy} == {"onnx-fp32", "onnx-int8-cpu"}
    assert len(deploy) == (3 * 4 * 2 - refused) * 2  # 3 variants x 4 roles-and-seeds x 2 models, 2 batch sizes each
    bench = root / "synthetic" / "noisy" / "kd" / "seed1" / "bundle" / "bench-ort-cpu.json"
    stamp = bench.stat().st_mtime

    start = time.perf_counter()
    assert main(args) == 0  # nothing to train, export or bench again: only the report is rebuilt
    assert time.perf_counter() - start < 30
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 1 + 3 + 3 * 2 * 2 * 3  # teacher, caches; students, bundles, benches
    assert "done " not in out and "rerun " not in out
    assert bench.stat().st_mtime == stamp

    assert main(["report", str(root)]) == 0
    assert "report.html" in capsys.readouterr().out


def test_report_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_paired_gain_keeps_negative_gains_and_pairs_by_seed():
    gain = paired_gain({0: 0.80, 1: 0.90, 2: 0.70}, {0: 0.85, 1: 0.88, 3: 0.99})
    assert gain.n == 2 and gain.mean == pytest.approx(((0.80 - 0.85) + (0.90 - 0.88)) / 2)
    assert gain.mean < 0


def test_spread_interval_against_student_t():
    s = Spread.of([0.1, 0.2, 0.3, 0.4])
    assert s.std == pytest.approx(0.1290994, rel=1e-6)
    assert s.ci95 == pytest.approx(3.182 * 0.1290994 / 2, rel=1e-4)
    assert Spread.of([0.5]).ci95 == 0.0


def test_pareto_front():
    points = [(1.0, 90.0), (2.0, 95.0), (1.5, 89.0), (3.0, 94.0), (0.5, 80.0)]
    assert pareto_front(points) == [(0.5, 80.0), (1.0, 90.0), (2.0, 95.0)]


def test_summary_json_is_rewritten_by_the_report(tiny_study):
    from edgekd.report import build_report

    build_report(tiny_study)
    summary = json.loads((tiny_study / "summary.json").read_text())
    assert all("kind" in r for r in summary)


def test_two_student_families_pair_within_their_family(tiny_profile, tmp_path):
    from edgekd.config import load_profile
    from edgekd.distill.summary import summarize
    from edgekd.workflows import distill as run_study

    profile = load_profile(tiny_profile, [
        "study.seeds=[0]", "student.epochs=1",
        "students={plain={model='test_resnet', epochs=1, batch_size=32, precision='fp32', channels_last='off'}}"])
    records = run_study(profile, tmp_path)
    roles = sorted((r["role"], r["method"], r["family"], r["model"]) for r in records if r["role"] in ("scratch", "kd"))
    assert roles == [("kd", "kd", "", "test_efficientnet"), ("kd", "kd", "plain", "test_resnet"),
                     ("scratch", "", "", "test_efficientnet"), ("scratch", "", "plain", "test_resnet")]
    assert (tmp_path / "tiny" / "synthetic" / "base" / "kd@plain" / "seed0" / "model.safetensors").is_file()
    summaries = {s.variant: s for s in summarize(records)}
    assert set(summaries) == {"base", "base@plain"} and summaries["base@plain"].student_model == "test_resnet"
    from edgekd.export.bundle import ExportOptions, export_run

    bundle = export_run(tmp_path / "tiny" / "synthetic" / "base" / "kd@plain" / "seed0", ExportOptions(),
                        log=lambda line: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["student"]["model"] == "test_resnet" and manifest["distill"]["teacher_acc"] is not None


def test_multi_teacher_method(tiny_profile, tmp_path):
    from edgekd.config import ProfileError, load_profile
    from edgekd.workflows import distill as run_study

    sets = ["study.seeds=[0]", "student.epochs=1",
            "teachers={second={model='test_efficientnet', epochs=1, batch_size=32, precision='fp32', "
            "channels_last='off'}}",
            "methods={kd={kd={weight=1.0}}, mtkd={teachers=['main', 'second'], combine='val_weighted', "
            "kd={weight=1.0, temperature=2.0}}}"]
    records = run_study(load_profile(tiny_profile, sets), tmp_path)
    teachers = sorted((r["role"], r["family"]) for r in records if r["role"] == "teacher")
    assert teachers == [("teacher", ""), ("teacher", "second")]
    root = tmp_path / "tiny" / "synthetic" / "base"
    mtkd = json.loads((root / "mtkd" / "seed0" / "metrics.json").read_text())
    assert mtkd["teachers"] == ["main", "second"] and mtkd["teacher_cache"] is False
    assert json.loads((root / "kd" / "seed0" / "metrics.json").read_text())["teacher_cache"] is True
    with pytest.raises(ProfileError, match="not a teacher"):
        load_profile(tiny_profile, ["methods={m={teachers=['main', 'nope'], kd={weight=1.0}}}"])


def test_a_labels_variants_scratch_student_trains_on_its_labeled_images_for_every_images_steps(tiny_profile, tmp_path):
    """The supervised baseline of a `labels` variant: cross-entropy on the labeled images in full batches, as many
    steps as a run over every image; the KD student sees every image. The teacher (regime "variant") is the same
    kind of baseline."""
    from edgekd.config import load_profile
    from edgekd.workflows import distill as run_study

    sets = ["study.seeds=[0]", "study.teacher_regime='variant'", "teacher.epochs=1", "student.epochs=2",
            "student.batch_size=8", "variants={lab={kind='labels', fraction=0.25}}"]
    run_study(load_profile(tiny_profile, sets), tmp_path)
    root = tmp_path / "tiny" / "synthetic" / "lab"
    scratch, kd, teacher = (json.loads((root / role / "seed0" / "metrics.json").read_text())
                            for role in ("scratch", "kd", "teacher"))
    every = kd["data"]["sizes"]["train"]
    labeled = scratch["labeled_only"]["images"]
    assert labeled == kd["variant_stats"]["labeled"] and labeled < every / 3
    assert scratch["labeled_only"]["min_steps"] == 2 * (every // 8)  # the KD student's steps
    assert scratch["epochs"] == -(-2 * (every // 8) // (labeled // 8)) > 2
    assert "labeled_only" not in kd and kd["epochs"] == 2
    assert teacher["labeled_only"]["images"] == labeled
    assert scratch["data"] == kd["data"]  # the variant's description, not the subset's
    assert kd["data"]["sizes"]["val"] < scratch["data"]["sizes"]["train"] / 3  # validation: the labeled share
    assert kd["key"]["data"]["variant_revision"] == 2  # runs of the kind's earlier version are stale


def _record(role, seed, acc, shifted=None):
    return {"dataset": "d", "variant": "base", "role": role, "method": role, "seed": seed, "test_acc": acc,
            "model": "m", "kind": "base", "extra_test_acc": shifted or {}}


def test_shifted_accuracy_spreads_over_seeds_not_corruptions():
    from edgekd.report.tables import variant_rows

    # Two corruptions far apart, two seeds close together: the spread must be the seeds' (small), not 0.3.
    records = [_record("scratch", 0, 0.9, {"blur@1": 0.8, "noise@5": 0.2}),
               _record("scratch", 1, 0.9, {"blur@1": 0.82, "noise@5": 0.22}),
               _record("kd", 0, 0.92, {"blur@1": 0.85, "noise@5": 0.25}),
               _record("kd", 1, 0.92, {"blur@1": 0.85, "noise@5": 0.31})]
    (row,) = variant_rows(records)
    assert row["scratch_shift_mean"].mean == pytest.approx(0.51) and row["scratch_shift_mean"].std == pytest.approx(
        Spread.of([0.5, 0.52]).std)
    assert row["shift_gain"].mean == pytest.approx(((0.55 - 0.5) + (0.58 - 0.52)) / 2)


def test_int8_retention_keeps_each_preset_apart():
    from edgekd.report import int8_retention

    def row(role, seed, deployed, acc):
        return {"dataset": "d", "variant": "v", "family": "", "role": role, "method": role, "seed": seed,
                "deployed": deployed, "accuracy": acc}

    deploy = [row(role, seed, dep, acc) for (role, dep), accs in {
        ("scratch", "onnx-fp32"): (0.80, 0.82), ("kd", "onnx-fp32"): (0.85, 0.85),
        ("scratch", "onnx-int8-cpu"): (0.70, 0.82), ("kd", "onnx-int8-cpu"): (0.84, 0.84),
        ("scratch", "onnx-int8-trt"): (0.80, 0.80), ("kd", "onnx-int8-trt"): (0.78, 0.80)}.items()
        for seed, acc in enumerate(accs)]
    rows = {r["deployed"]: r for r in int8_retention(deploy)}
    assert set(rows) == {"onnx-int8-cpu", "onnx-int8-trt"}
    assert rows["onnx-int8-cpu"]["gain_fp32"].mean == pytest.approx(0.04)
    assert rows["onnx-int8-cpu"]["gain_int8"].mean == pytest.approx((0.14 + 0.02) / 2)
    assert rows["onnx-int8-trt"]["gain_int8"].mean == pytest.approx(-0.01)  # negative gains stay negative

    # with the method each INT8 model was made by, and other methods the bundles scored (deploy.int8_compare)
    for r in deploy:
        r["int8_method"] = "ptq" if "int8" in r["deployed"] else ""
    compared = [{**row(role, seed, "onnx-int8-cpu", acc), "int8_method": "qat-kd"}
                for role, accs in (("scratch", (0.79, 0.81)), ("kd", (0.85, 0.84))) for seed, acc in enumerate(accs)]
    rows = {r["deployed"]: r for r in int8_retention(deploy, compared)}
    assert set(rows) == {"onnx-int8-cpu (ptq)", "onnx-int8-trt (ptq)", "onnx-int8-cpu (qat-kd)"}
    assert rows["onnx-int8-cpu (qat-kd)"]["gain_int8"].mean == pytest.approx((0.06 + 0.03) / 2)
    assert rows["onnx-int8-cpu (qat-kd)"]["gain_fp32"].mean == rows["onnx-int8-cpu (ptq)"]["gain_fp32"].mean


def test_methods_by_variants_table_and_heatmap():
    from edgekd.report import _method_table
    from edgekd.report.plots import method_gain_heatmap
    from edgekd.report.tables import variant_rows

    records = []
    for variant, base in (("full", 0.90), ("small", 0.70)):
        for seed in (0, 1, 2):
            for role, method, delta in (("scratch", "", 0.0), ("kd", "kd", 0.02), ("kd", "at", -0.01)):
                records.append({"dataset": "d", "variant": variant, "role": role, "method": method, "seed": seed,
                                "test_acc": base + delta + 0.001 * seed, "model": "m", "kind": "base"})
    rows = variant_rows(records)
    lines = _method_table(rows)
    assert lines[3] == "| method | d full (m) | d small (m) |"
    assert lines[5].startswith("| scratch | 90.10 ± 0.10 | 70.10")
    at_line = next(line for line in lines if line.startswith("| at |"))
    assert "(-1.00 ± 0.00)" in at_line  # a method that hurts shows its negative gain
    assert method_gain_heatmap(rows).startswith(b"\x89PNG")
    assert _method_table([r for r in rows if r["method"] == "kd"]) == []  # one method: no comparison table
