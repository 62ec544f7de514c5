import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Each test measures its own execution choices: none leaks in from, or out to, the user's machine cache
os.environ["EDGEKD_EXECUTION_CACHE"] = "none"

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

TINY_PROFILE = """
[study]
name = "tiny"
seeds = [0, 1]
trainings_at_once = 1  # no measuring in every test (tests/test_sharing.py measures)

[datasets.synthetic]
classes = 4
samples_per_class = 40
image_size = 12
crop_padding = 1
hflip = true

[teacher]
model = "test_resnet"
epochs = 3
batch_size = 32
precision = "fp32"
channels_last = "off"
compile = "off"  # no measuring in every test (tests/test_execution.py measures)

[student]
model = "test_efficientnet"
epochs = 2
batch_size = 32
optimizer = "adamw"
lr = 0.01
precision = "fp32"
channels_last = "off"
compile = "off"  # no measuring in every test (tests/test_execution.py measures)

[methods.kd]
ce = { weight = 0.5 }
kd = { weight = 0.5, temperature = 2.0 }
"""


def tiny_profile_with(dataset: str, extra: str = "", name: str = "tiny") -> str:
    """TINY_PROFILE's models and KD method on another dataset table (`dataset`: a [datasets.X] table), with more
    tables after it."""
    head, rest = TINY_PROFILE.split("[datasets.synthetic]", 1)
    models = rest[rest.index("[teacher]"):]
    return head.replace('name = "tiny"', f'name = "{name}"') + dataset.strip() + "\n\n" + models + extra


@pytest.fixture
def tiny_profile(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_PROFILE)
    return path


def needs_fashion_mnist():
    return pytest.mark.skipif(not FASHION_DIR.is_dir(),
                              reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """A finished tiny study (synthetic data, tiny timm models), shared by the export and bench tests."""
    from edgekd.config import load_profile
    from edgekd.workflows import distill as run_study

    root = tmp_path_factory.mktemp("study")
    (root / "tiny.toml").write_text(TINY_PROFILE)
    run_study(load_profile(root / "tiny.toml", ["study.seeds=[0]"]), root / "runs")
    return root / "runs" / "tiny"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_study):
    from edgekd.export.bundle import ExportOptions, export_run

    run = tiny_study / "synthetic" / "base" / "kd" / "seed0"
    # int8_max_drop 100: the barely trained tiny student's plain ptq changes many answers; these fixtures are about
    # the bundle and its device path, and keep plain ptq deployed (test_int8 tests the guard)
    return export_run(run, ExportOptions(targets=("onnx", "int8"), calib_size=64, int8_max_drop=100.0),
                      log=lambda line: None)


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith(("torch.", "torchvision", "timm")):
            raise ImportError("torch is blocked for this test")
sys.meta_path.insert(0, Block())
from edgekd.cli import main
code = main(sys.argv[2:])
assert "torch" not in sys.modules
imported = [m for m in sys.modules for prefix in sys.argv[1].split(",") if prefix and m.startswith(prefix)]
assert not imported, f"imported {imported}"
sys.exit(code)
"""


def run_without_torch(*args, python: str = sys.executable, env: dict | None = None, forbid: tuple[str, ...] = ()):
    """`edgekd ARGS` in a fresh interpreter where importing torch, torchvision or timm fails (as on a device
    without them); `forbid` names module prefixes that must not be imported either."""
    import subprocess

    return subprocess.run([python, "-c", BLOCK_TORCH, ",".join(forbid), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})
