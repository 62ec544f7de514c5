"""End to end on tiny data: the CLI, the run directory, resuming, and one-line errors for bad input."""

import json

import pytest

from edgekd.cli import main
from edgekd.config import load_profile
from edgekd.pipeline.events import Reporter
from edgekd.workflows import distill as run_study


def test_distill_end_to_end(tiny_profile, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["distill", str(tiny_profile), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "KD gain" in text and "synthetic" in text
    root = out / "tiny"
    summary = json.loads((root / "summary.json").read_text())
    roles = sorted((r["role"], r["seed"]) for r in summary)
    assert roles == [("kd", 0), ("kd", 1), ("scratch", 0), ("scratch", 1), ("teacher", 0), ("teacher_cache", 0)]
    for r in summary:
        if r["role"] != "teacher_cache":
            assert {"dataset", "variant", "role", "method", "seed", "test_acc", "val_acc", "params",
                    "wall_s"} <= set(r)
    kd_dir = root / "synthetic" / "base" / "kd" / "seed1"
    for name in ("profile.json", "metrics.json", "model.safetensors", "train.log", "predictions.safetensors"):
        assert (kd_dir / name).is_file(), name
    assert not (kd_dir / "checkpoint.safetensors").exists()
    metrics = json.loads((kd_dir / "metrics.json").read_text())
    assert metrics["method"] == "kd" and metrics["teacher_cache"] is True and 0 <= metrics["teacher_agreement"] <= 1
    assert len(metrics["per_class_test_acc"]) == 4 and metrics["epochs"] == 2
    assert set(metrics["history"][0]) >= {"ce", "kd", "loss", "val_acc"}
    assert json.loads((kd_dir / "profile.json").read_text())["profile"]["student"]["epochs"] == 2
    assert (root / "synthetic" / "base" / "teacher_cache" / "seed0" / "teacher_cache.safetensors").is_file()
    assert {"balanced_test_acc", "ece"} <= set(metrics)

    # A second run trains nothing; --set changes the profile without touching the file.
    assert main(["distill", str(tiny_profile), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 6


class InterruptDuring(Reporter):
    def __init__(self, label, at_step):
        self.label, self.at_step, self.log = label, at_step, []

    def advance(self, job, completed, loss, images_per_s, epoch=""):
        if job.label == self.label and completed >= self.at_step:
            raise KeyboardInterrupt

    def finish(self, job, metrics, skipped):
        self.log.append((job.label, skipped))


def test_interrupted_study_continues_where_it_stopped(tiny_profile, tmp_path):
    profile = load_profile(tiny_profile, ["student.epochs=3", "study.seeds=[0]"])
    first = InterruptDuring("synthetic/base/kd/seed0", at_step=6)  # 5 steps per epoch: in epoch 2
    with pytest.raises(KeyboardInterrupt):
        run_study(profile, tmp_path, first)
    assert [label for label, _ in first.log] == ["synthetic/base/teacher/seed0", "synthetic/base/teacher_cache/seed0",
                                                 "synthetic/base/scratch/seed0"]
    second = InterruptDuring("none", 0)
    records = run_study(profile, tmp_path, second)
    assert second.log == [(label, True) for label, _ in first.log] + [("synthetic/base/kd/seed0", False)]
    log = (tmp_path / "tiny" / "synthetic" / "base" / "kd" / "seed0" / "train.log").read_text()
    assert "resumed at epoch 1/3" in log
    assert len(records) == 4


@pytest.mark.parametrize("override, message", [
    ("student.epoch=3", "unknown profile key 'student.epoch': did you mean 'epochs'?"),
    ("teacher.model=resnet181", "unknown model 'resnet181': did you mean"),
    ("datasets.synthetic.source='imagefolder'", "data_dir' (or --data-dir) is"),
    ("methods.kd.kd.temprature=3", "unknown profile key 'methods.kd.kd.temprature'"),
])
def test_bad_input_gives_one_line_errors(tiny_profile, tmp_path, capsys, override, message):
    args = ["distill", str(tiny_profile), "--out", str(tmp_path), "--set", override]
    if "imagefolder" in override:
        args += ["--data-dir", str(tmp_path / "missing")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and err.count("edgekd: error:") == 1


def test_missing_dataset_directory(tmp_path, capsys, monkeypatch):
    from edgekd.data.sources import SOURCES

    monkeypatch.setattr(SOURCES.get("mnist"), "system_dirs", ())
    monkeypatch.delenv("EDGEKD_DATA", raising=False)
    profile = tmp_path / "p.toml"
    profile.write_text("[datasets.mnist]\n")
    assert main(["distill", str(profile), "--out", str(tmp_path), "--data-dir", str(tmp_path / "nope")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "which does not exist" in err and "--download" in err
    (tmp_path / "nope").mkdir()
    assert main(["distill", str(profile), "--out", str(tmp_path), "--data-dir", str(tmp_path / "nope")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "mnist: no IDX files found" in err and "--download" in err


def test_empty_image_folder(tmp_path, capsys):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    profile = tmp_path / "p.toml"
    profile.write_text(f"[datasets.pets]\nsource = 'imagefolder'\ndata_dir = '{tmp_path / 'empty'}'\n")
    assert main(["distill", str(profile), "--out", str(tmp_path)]) == 2
    assert "no readable images" in " ".join(capsys.readouterr().err.split())


def test_datasets_and_env_commands(capsys):
    assert main(["datasets"]) == 0
    text = capsys.readouterr().out
    for name in ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder", "synthetic"):
        assert name in text
    assert "/usr/share/datasets/fashion-mnist" in text
    assert main(["env"]) == 0
    assert "torch" in capsys.readouterr().out


def test_variants_study_clean_teacher_regime(tiny_profile, tmp_path):
    profile = load_profile(tiny_profile, [
        "study.seeds=[0]", "student.epochs=1", "teacher.epochs=1",
        "variants={base={kind='base'}, noisy={kind='label_noise', rate=0.2}, cue={kind='spurious', p=0.9}, "
        "small={kind='imbalance', ratio=4.0}}"])
    records = run_study(profile, tmp_path)
    teachers = [r for r in records if r["role"] == "teacher"]
    assert [r["variant"] for r in teachers] == ["base"]  # one clean teacher teaches every variant
    assert {r["variant"] for r in records if r["role"] == "kd"} == {"base", "noisy", "cue", "small"}
    root = tmp_path / "tiny" / "synthetic"
    cue = json.loads((root / "cue" / "kd" / "seed0" / "metrics.json").read_text())
    assert set(cue["extra_test_acc"]) == {"aligned", "conflicting"} and 0 <= cue["worst_group_acc"] <= 1
    assert cue["variant_stats"]["kind"] == "spurious"
    noisy = json.loads((root / "noisy" / "scratch" / "seed0" / "profile.json").read_text())
    assert noisy["variant"]["noise_rate"] == pytest.approx(0.2, abs=0.01)
    small = json.loads((root / "small" / "kd" / "seed0" / "metrics.json").read_text())
    assert {"head_acc", "tail_acc"} <= set(small) and small["variant_stats"]["train_per_class"][0] > \
        small["variant_stats"]["train_per_class"][-1]


def test_check_command_reports_each_profile(tiny_profile, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_profile.read_text().replace('model = "test_resnet"', 'model = "test_resnett"'))
    assert main(["check", str(tiny_profile), str(bad), "--out", str(tmp_path / "runs")]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith(f"ok {tiny_profile}: tiny: synthetic (144 train, 16 val, 40 test); 1 variant(s)")
    assert len(captured.err.splitlines()) == 1
    assert captured.err.startswith(f"edgekd: error: {bad}: profile key 'teacher.model': unknown model "
                                   "'test_resnett': did you mean test_resnet,")
    assert not (tmp_path / "runs").exists()


def test_a_failed_write_is_one_line(monkeypatch, capsys):
    import errno
    import os

    import edgekd.cli

    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/study/summary.json")

    monkeypatch.setattr(edgekd.cli, "cmd_env", full)
    assert main(["env"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/runs/study/summary.json: No space left on device: free space" in err
