"""Optional MLflow tracking (`--mlflow URI` / MLFLOW_TRACKING_URI), against a local file store."""

import json
import os
import sys

import pytest

from edgekd.cli import build_parser, main
from edgekd.tracking import TAG_SUPERSEDED, sync_study, tracking_uri


def test_without_mlflow_one_line_says_how_to_install_it(tmp_path, tiny_profile, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow fails, as where it is not installed
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "runs"
    assert main(["distill", str(tiny_profile), "--out", str(out), "--mlflow", f"file://{tmp_path}/mlruns"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--mlflow needs mlflow" in err and "pip install 'edgekd[mlflow]'" in err
    assert not (out / "tiny").exists()  # refused before anything trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")  # set for other tools: a note only
    notes = []
    assert tracking_uri(None, notes.append) is None
    assert len(notes) == 1 and "not tracked: pip install 'edgekd[mlflow]'" in notes[0]


def test_distill_and_study_take_an_mlflow_uri():
    for command in ("distill", "study"):
        assert build_parser().parse_args([command, "p.toml", "--mlflow", "file:///m"]).mlflow == "file:///m"


def test_distill_logs_params_epochs_and_bundles_to_a_file_store(tmp_path, tiny_profile, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'edgekd[mlflow]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(os.environ, "MLFLOW_ALLOW_FILE_STORE", "")  # restored (removed) after the test ...
    del os.environ["MLFLOW_ALLOW_FILE_STORE"]  # ... and absent during it: a file URI must work without it
    uri, out = f"file://{tmp_path}/mlruns", tmp_path / "runs"
    assert main(["distill", str(tiny_profile), "--out", str(out), "--set", "study.seeds=[0]", "--mlflow", uri]) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["synthetic/base/kd/seed0", "synthetic/base/scratch/seed0", "synthetic/base/teacher/seed0"]
    study = out / "tiny" / "synthetic" / "base"
    kd = runs["synthetic/base/kd/seed0"]
    metrics = json.loads((study / "kd" / "seed0" / "metrics.json").read_text())
    assert kd.data.params["role"] == "kd" and kd.data.params["train.lr"] == "0.01"
    assert kd.data.params["loss.kd.temperature"] == "2.0" and kd.data.params["data.train"] == "144"
    assert kd.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    history = client.get_metric_history(kd.info.run_id, "epoch/val_acc")
    assert sorted((m.step, m.value) for m in history) == [(h["epoch"], h["val_acc"]) for h in metrics["history"]]
    assert {a.path for a in client.list_artifacts(kd.info.run_id, "record")} >= {"record/metrics.json",
                                                                                 "record/profile.json"}
    assert kd.info.status == "FINISHED"

    bundle = study / "kd" / "seed0" / "bundle"  # as `edgekd export` leaves it (files only matter here)
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"models": {}}')
    (bundle / "model.onnx").write_bytes(b"onnx")
    synced = sync_study(out / "tiny", uri, log=lambda line: None)
    assert (synced.logged, synced.unchanged, synced.bundles) == (0, 3, 1)  # only what changed is logged
    assert {a.path for a in client.list_artifacts(kd.info.run_id, "bundle")} == {"bundle/manifest.json",
                                                                                 "bundle/model.onnx"}
    assert sync_study(out / "tiny", uri, log=lambda line: None).bundles == 0

    metrics["test_acc"] = 0.99  # retrained: a new MLflow run, the old one points to it
    (study / "kd" / "seed0" / "metrics.json").write_text(json.dumps(metrics))
    synced = sync_study(out / "tiny", uri, log=lambda line: None)
    assert (synced.logged, synced.unchanged, synced.bundles) == (1, 2, 1)
    new = client.get_run(client.get_run(kd.info.run_id).data.tags[TAG_SUPERSEDED])
    assert new.data.metrics["test_acc"] == 0.99 and new.info.run_name == "synthetic/base/kd/seed0"
