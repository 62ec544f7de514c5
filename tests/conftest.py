import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

TINY_PROFILE = """
[study]
name = "tiny"
seeds = [0, 1]

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

[student]
model = "test_efficientnet"
epochs = 2
batch_size = 32
optimizer = "adamw"
lr = 0.01
precision = "fp32"
channels_last = "off"

[methods.kd]
ce = { weight = 0.5 }
kd = { weight = 0.5, temperature = 2.0 }
"""


@pytest.fixture
def tiny_profile(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_PROFILE)
    return path


def needs_fashion_mnist():
    return pytest.mark.skipif(not FASHION_DIR.is_dir(),
                              reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
