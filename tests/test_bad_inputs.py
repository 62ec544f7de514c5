"""Bad input, as a new user hands it in: every case gets exit code 2 and at most three lines naming the problem and
the fix, never a traceback, before any training starts, and a finished run in the same --out keeps its files.

Most cases stop in the plan check (edgekd/check.py), so the whole battery runs in seconds on the tiny study.
"""

import errno
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PROFILE
from PIL import Image

from edgekd.cli import main

FASHION_PROFILE = TINY_PROFILE.replace("[datasets.synthetic]\nclasses = 4\nsamples_per_class = 40\nimage_size = 12",
                                       "[datasets.fashion-mnist]\ntrain_limit = 200\ntest_limit = 100")


@dataclass
class Ctx:
    """Where a case runs: a finished tiny study in `out`, a profile for it, and a scratch folder of its own."""

    out: Path  # holds tiny/..., a finished study of TINY_PROFILE
    profile: Path
    tmp: Path
    finished_run: Path  # a finished KD student inside `out`
    monkeypatch: pytest.MonkeyPatch | None = None

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def distill(self, *extra: str) -> list[str]:
        return ["distill", str(self.profile), "--out", str(self.out), *extra]

    def run_copy(self) -> Path:
        """A copy of the finished student run, to damage."""
        run = self.tmp / "run"
        shutil.copytree(self.finished_run, run, ignore=shutil.ignore_patterns("bundle"))
        return run

    def images(self, classes: dict[str, int], garbage: bool = False) -> Path:
        """An image folder: class -> number of 8x8 PNGs (or of text files named .png, with garbage)."""
        root = self.tmp / "images"
        rng = np.random.default_rng(0)
        for name, n in classes.items():
            (root / name).mkdir(parents=True)
            for i in range(n):
                if garbage:
                    (root / name / f"{i}.png").write_text("not an image")
                else:
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
        return root

    def folder_profile(self, root: Path, val_fraction: float = 0.1) -> list[str]:
        text = TINY_PROFILE.replace("[datasets.synthetic]\nclasses = 4\nsamples_per_class = 40\nimage_size = 12",
                                    f"[datasets.pets]\nsource = 'imagefolder'\ndata_dir = '{root}'\nimage_size = 8\n"
                                    f"val_fraction = {val_fraction}")
        return ["distill", str(self.write("pets.toml", text)), "--out", str(self.out)]

    def bundle(self, manifest: str | dict, onnx: bytes | None = None) -> Path:
        """A bundle directory holding this manifest (and a model.onnx and eval set when given)."""
        bundle = self.tmp / "bundle"
        bundle.mkdir()
        (bundle / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        if onnx is not None:
            (bundle / "model.onnx").write_bytes(onnx)
            np.savez_compressed(bundle / "eval.npz", images=np.zeros((4, 1, 12, 12), np.uint8),
                                labels=np.zeros(4, np.int64))
        return bundle


def _pickled_checkpoint(ctx: Ctx) -> list[str]:
    path = ctx.tmp / "teacher.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Ctx}, f, protocol=2)  # a class, not weights: weights_only loading must refuse it
    return ctx.distill("--set", f"teacher.checkpoint='{path}'")


def _truncated_weights(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["export", str(run)]


def _damaged_metrics(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    (run / "metrics.json").write_text('{"role": "kd", "test_acc": 0.9')
    return ["export", str(run)]


def _disk_full(ctx: Ctx) -> list[str]:
    def full(*args, **kwargs):  # every file edgekd writes starts as a temporary file (runio._atomic)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(ctx.out))

    ctx.monkeypatch.setattr(tempfile, "mkstemp", full)
    return ctx.distill()


def _read_only_out(ctx: Ctx) -> list[str]:
    out = ctx.tmp / "read-only"
    out.mkdir()
    out.chmod(0o500)
    return ["distill", str(ctx.profile), "--out", str(out / "runs")]


@dataclass
class Case:
    name: str
    args: Callable[[Ctx], list[str]]  # the command line; may write files under ctx.tmp first
    expect: str  # in the error output, whitespace collapsed
    marks: list = field(default_factory=list)


NO_TENSORRT = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")

def _truncated_evalset(c) -> list[str]:
    bundle = c.bundle({"models": {}, "normalization": {"mean": [0.5], "std": [0.5]}}, onnx=b"x")
    data = (bundle / "eval.npz").read_bytes()
    (bundle / "eval.npz").write_bytes(data[: len(data) // 2])
    return ["bench", str(bundle), "--iters", "1"]


CASES = [
    # -- the 13 the issue found handled already -------------------------------------------------------------------
    Case("missing profile", lambda c: ["distill", str(c.tmp / "nope.toml")], "not found"),
    Case("garbage profile", lambda c: ["distill", str(c.write("g.toml", "this = = is not ]] toml"))],
         "is not valid TOML"),
    Case("unknown key", lambda c: c.distill("--set", "nosuch.key=1"), "unknown profile key 'nosuch'"),
    Case("misspelt key", lambda c: c.distill("--set", "student.epoch=3"),
         "unknown profile key 'student.epoch': did you mean 'epochs'?"),
    Case("wrong type", lambda c: c.distill("--set", "student.epochs='three'"), "'student.epochs' must be int"),
    Case("negative epochs", lambda c: c.distill("--set", "student.epochs=-1"), "'student.epochs' must be at least 1"),
    Case("bad --set", lambda c: c.distill("--set", "student.epochs"), "needs the form key=value"),
    Case("unknown variant kind", lambda c: c.distill("--set", "variants.x.kind='fractoin'"),
         "unknown variant kind 'fractoin'"),
    Case("unknown loss parameter", lambda c: c.distill("--set", "methods.kd.kd.temprature=3"),
         "unknown profile key 'methods.kd.kd.temprature'"),
    Case("empty image folder", lambda c: c.folder_profile(c.images({"cats": 0, "dogs": 0})), "no readable images"),
    Case("missing bundle", lambda c: ["bench", str(c.tmp / "nobundle")], "is not a bundle"),
    Case("bad --batch-sizes", lambda c: ["bench", str(c.tmp), "--batch-sizes", "1,x"],
         "must be integers separated by commas"),
    Case("export of an empty directory", lambda c: ["export", str(c.tmp)], "no finished student runs"),
    # -- the 13 that trained first, failed late or raised a traceback -------------------------------------------------
    Case("unknown loss name", lambda c: c.distill("--set", "methods.odd.nosuchloss={weight=1.0}"),
         "'methods.odd.nosuchloss': unknown loss 'nosuchloss'"),
    Case("noise rate 1.5", lambda c: c.distill("--set", "variants.noisy30={kind='label_noise', rate=1.5}"),
         "'variants.noisy30.rate' must be a share with 0 <= rate < 1, got 1.5"),
    Case("fraction 0", lambda c: c.distill("--set", "variants.quarter={kind='fraction', fraction=0.0}"),
         "'variants.quarter.fraction' must be in (0, 1], got 0.0"),
    Case("--jobs 0", lambda c: ["study", str(c.profile), "--out", str(c.out), "--jobs", "0"],
         "--jobs must be at least 1"),
    Case("unknown teacher.model, teacher run exists", lambda c: c.distill("--set", "teacher.model=resnet181"),
         "'teacher.model': unknown model 'resnet181': did you mean resnet18"),
    Case("missing teacher.checkpoint, teacher run exists",
         lambda c: c.distill("--set", f"teacher.checkpoint='{c.tmp / 'teacher.safetensors'}'"),
         "'teacher.checkpoint' names"),
    Case("--data-dir that does not exist", lambda c: ["distill", str(c.write("f.toml", FASHION_PROFILE)), "--out",
                                                      str(c.out), "--data-dir", "/no/such/dir"],
         "is '/no/such/dir', which does not exist"),
    Case("empty profile", lambda c: ["distill", str(c.write("empty.toml", "# nothing yet\n"))],
         "is empty: start from a complete one, e.g. cp profiles/quickstart.toml"),
    Case("too few images for the validation split", lambda c: c.folder_profile(c.images({"cats": 6, "dogs": 6})),
         "class 'cats' (and 1 more class) would get 5 train, 0 val, 1 test images"),
    Case("one-class folder", lambda c: c.folder_profile(c.images({"cats": 12})), "has 1 class (cats)"),
    Case("bench: corrupt manifest.json", lambda c: ["bench", str(c.bundle('{"models": {'))],
         "manifest.json is not valid JSON"),
    Case("export: truncated model.safetensors", _truncated_weights,
         "model.safetensors is not a readable safetensors file (incomplete metadata, file not fully covered)"),
    Case("export --target trt without TensorRT", lambda c: ["export", str(c.finished_run), "--target", "trt"],
         "--target trt needs TensorRT, which is not installed here", [NO_TENSORRT]),
    Case("pickled teacher checkpoint", _pickled_checkpoint, "cannot be read with weights_only=True"),
    # -- what else a user hits -------------------------------------------------------------------------------------
    Case("fashion-mnist with --data-dir to an empty directory",
         lambda c: ["distill", str(c.write("f.toml", FASHION_PROFILE)), "--out", str(c.out), "--data-dir",
                    str(c.tmp)], "fashion-mnist: no IDX files found"),
    Case("bundle from a newer edgekd", lambda c: ["bench", str(c.bundle({"schema_version": 99, "models": {}}))],
         "schema_version 99 is newer than edgekd"),
    Case("image folder of unreadable files only",
         lambda c: c.folder_profile(c.images({"cats": 3, "dogs": 3}, garbage=True)),
         "no readable images in"),
    Case("disk full (no file can be made in --out)", _disk_full, "cannot be written (No space left on device)"),
    Case("read-only --out", _read_only_out, "cannot be written (Permission denied)", [NOT_ROOT]),
    Case("--out is a file", lambda c: ["distill", str(c.profile), "--out", str(c.write("runs", ""))],
         "cannot be a directory"),
    Case("three problems at once", lambda c: c.distill("--set", "teacher.model=resnet181", "--set",
                                                       "variants.noisy30={kind='label_noise', rate=1.5}",
                                                       "--set", "methods.odd.nosuchloss={weight=1.0}"),
         "unknown loss 'nosuchloss'"),
    Case("bench: a model file that is not ONNX",
         lambda c: ["bench", str(c.bundle({"models": {"onnx-fp32": {"file": "model.onnx", "precision": "fp32"}},
                                          "normalization": {"mean": [0.5], "std": [0.5]}}, onnx=b"\x08garbage")),
                    "--iters", "1", "--batch-sizes", "1"],
         "cannot be loaded"),
    Case("bench: truncated eval.npz", _truncated_evalset, "eval.npz is missing or damaged"),
    Case("build: --fp16 on a bundle without model.fp16.onnx",
         lambda c: ["build", str(c.bundle({"models": {}, "input_shape": [1, 12, 12]}, onnx=b"x")), "--fp16"],
         "no model.fp16.onnx to build trt-fp16 from"),
    Case("unknown data source", lambda c: c.distill("--set", "datasets.synthetic.source='imagenet'"),
         "unknown data source 'imagenet'"),
    Case("per_class above the smallest class",
         lambda c: c.distill("--set", "variants.few={kind='per_class', per_class=1000}"),
         "'variants.few.per_class' must be between 1 and 36, got 1000"),
    Case("study with deploy.targets = trt", lambda c: ["study", str(c.profile), "--out", str(c.out), "--set",
                                                       "deploy.targets=['trt']"], "'deploy.targets' must be"),
    Case("study.device = cuda without a GPU", lambda c: c.distill("--set", "study.device='cuda'"),
         "torch sees no CUDA GPU here", [NO_CUDA]),
    Case("export: damaged metrics.json", _damaged_metrics, "metrics.json is not valid JSON"),
    Case("another teacher.model than the finished teacher run's",
         lambda c: c.distill("--set", "teacher.model='test_efficientnet'"),
         "was trained as test_resnet, but the profile now asks for test_efficientnet: pass --force"),
    Case("unknown --int8-preset", lambda c: ["export", str(c.finished_run), "--target", "int8", "--int8-preset",
                                             "gpu"], "--int8-preset 'gpu' must name some of cpu, trt"),
]


@pytest.fixture(scope="module")
def finished(tiny_study, tmp_path_factory):
    """A copy of the finished tiny study (one seed) as an --out directory, and its profile."""
    out = tmp_path_factory.mktemp("finished")
    shutil.copytree(tiny_study, out / "tiny", ignore=shutil.ignore_patterns("bundle"))
    profile = tmp_path_factory.mktemp("profile") / "tiny.toml"
    profile.write_text(TINY_PROFILE.replace("seeds = [0, 1]", "seeds = [0]"))
    return out, profile


def _snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_bad_input(case, finished, tmp_path, capsys, monkeypatch):
    out, profile = finished
    args = case.args(Ctx(out, profile, tmp_path, out / "tiny" / "synthetic" / "base" / "kd" / "seed0", monkeypatch))
    before = _snapshot(out, tmp_path)
    assert main(args) == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text
    assert 1 <= len(lines) <= 3, text
    assert case.expect in " ".join(captured.err.split()), captured.err
    monkeypatch.undo()
    # Nothing was made or changed: no run started (no checkpoint.json anywhere new), the finished one is intact.
    assert _snapshot(out, tmp_path) == before


def test_three_problems_get_a_line_each(finished, tmp_path, capsys):
    out, profile = finished
    assert main(["distill", str(profile), "--out", str(out), "--set", "teacher.model=resnet181", "--set",
                 "variants.noisy30={kind='label_noise', rate=1.5}", "--set", "methods.odd.nosuchloss={weight=1.0}"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("edgekd: error: ") for line in lines)
    assert ["rate" in lines[0], "nosuchloss" in lines[1], "resnet181" in lines[2]] == [True, True, True]


def test_damaged_runs_are_recomputed(finished, tmp_path, capsys):
    """A run whose files are corrupt counts as unfinished: distill runs it again, and leaves the others alone."""
    out, profile = finished
    root = tmp_path / "tiny"
    shutil.copytree(out / "tiny", root)
    scratch, kd = (root / "synthetic" / "base" / role / "seed0" for role in ("scratch", "kd"))
    (scratch / "metrics.json").write_text("{")
    weights = kd / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    teacher = root / "synthetic" / "base" / "teacher" / "seed0"
    kept = _snapshot(teacher)
    assert main(["distill", str(profile), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2  # the teacher and its cache
    for run in (scratch, kd):
        assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
        assert (run / "model.safetensors").stat().st_size > 1000
    assert _snapshot(teacher) == kept


def test_damaged_checkpoint_starts_over(tmp_path):
    from edgekd.distill.train import discard_unusable_checkpoint

    (tmp_path / "checkpoint.json").write_text('{"epoch": 1}')  # its tensors are gone
    assert "cannot be opened" in discard_unusable_checkpoint(tmp_path)
    assert not (tmp_path / "checkpoint.json").exists()
    assert discard_unusable_checkpoint(tmp_path) is None


def test_check_command_prints_ok_and_the_plan(finished, capsys):
    out, profile = finished
    assert main(["check", str(profile), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"ok {profile}: tiny: synthetic (") and text.count("\n") == 1
    assert "teacher test_resnet; student test_efficientnet; 1 method(s) (kd); seeds 0: 4 jobs" in text


@pytest.mark.parametrize("profile", sorted(Path(__file__).parent.parent.glob("profiles/*.toml")), ids=lambda p: p.name)
def test_shipped_profiles_pass_the_check(profile):
    """Every shipped profile checks clean, with nothing left to run first."""
    from edgekd.check import check_profile

    if "fashion" in profile.name and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    checked = check_profile(profile, deploy=True)
    assert not checked.problems
    assert checked.summary().startswith(f"{checked.profile.study.name}: ")


@pytest.mark.parametrize("source", ["digits", "synthetic", "imagefolder"])
def test_check_sizes_the_splits_as_loading_does(source, tmp_path):
    """The check counts images without loading them; loading must make exactly the splits it counted."""
    from edgekd.config import DatasetConfig
    from edgekd.data.sampling import class_counts
    from edgekd.data.sources import SOURCES
    from edgekd.data.splits import load_splits, split_sizes

    data_dir = ""
    if source == "imagefolder":
        data_dir = str(Ctx(tmp_path, tmp_path, tmp_path, tmp_path).images({"a": 9, "b": 13, "c": 7}))
    cfg = DatasetConfig(source=source, data_dir=data_dir, val_fraction=0.15, train_limit=100, classes=3,
                        samples_per_class=30)
    sizes = SOURCES.get(source).sizes(cfg)
    counted = split_sizes(sizes.train, sizes.test, cfg)
    loaded = load_splits("x", cfg)
    for split in ("train", "val", "test"):
        assert class_counts(getattr(loaded, split).labels, len(sizes.classes)).tolist() == counted[split].tolist()


def test_bundle_problems_name_each_damaged_file(tmp_path):
    """What bench and build can check before opening a model: files missing, or not the ones exported."""
    from edgekd.check import bundle_problems
    from edgekd.runio import sha256_file

    bundle = tmp_path / "run" / "bundle"
    bundle.mkdir(parents=True)
    (bundle / "model.onnx").write_bytes(b"exported bytes")
    np.savez_compressed(bundle / "eval.npz", images=np.zeros((2, 1, 4, 4), np.uint8), labels=np.zeros(2, np.int64))
    models = {"onnx-fp32": {"file": "model.onnx", "precision": "fp32", "sha256": sha256_file(bundle / "model.onnx")},
              "onnx-int8-cpu": {"file": "model.int8-cpu.onnx", "precision": "int8"}}
    (bundle / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": models}))
    assert bundle_problems(bundle) == [f"{bundle / 'model.int8-cpu.onnx'} is missing, though the manifest lists it as "
                                       f"onnx-int8-cpu: export the run again (edgekd export {bundle.parent})"]
    (bundle / "model.onnx").write_bytes(b"exported byte")
    (bundle / "eval.npz").write_bytes((bundle / "eval.npz").read_bytes()[:50])
    problems = bundle_problems(bundle)
    assert len(problems) == 3 and "model.onnx is not the file exported as onnx-fp32" in problems[0]
    assert "eval.npz is missing or damaged" in problems[2]
