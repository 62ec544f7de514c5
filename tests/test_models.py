import pytest
import torch

from edgekd.errors import EdgeKDError
from edgekd.models import count_parameters, create_model, load_weights
from edgekd.runio import save_tensors


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_byobnet", "mobilenetv3_small_050"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_any_timm_model_adapts_to_classes_and_channels(name, in_chans):
    model = create_model(name, 7, in_chans).eval()
    assert model(torch.randn(2, in_chans, 32, 32)).shape == (2, 7)


def test_small_input_drops_the_stem_pool_only():
    full = create_model("resnet10t", 10, 1, small_input=False)
    small = create_model("resnet10t", 10, 1, small_input=True)
    assert isinstance(small.maxpool, torch.nn.Identity) and not isinstance(full.maxpool, torch.nn.Identity)
    assert count_parameters(full) == count_parameters(small)
    x = torch.randn(1, 1, 28, 28)
    assert small.eval().forward_features(x).shape[-1] == 2 * full.eval().forward_features(x).shape[-1]


def test_unknown_model_suggests_names():
    with pytest.raises(EdgeKDError, match="unknown model 'resnet181': did you mean"):
        create_model("resnet181", 10, 1)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_teacher_checkpoints_load_safely(tmp_path, suffix):
    source = create_model("test_resnet", 5, 1)
    path = tmp_path / f"teacher{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    else:
        save_tensors(path, source.state_dict())
    target = load_weights(create_model("test_resnet", 5, 1), path)
    for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(EdgeKDError, match="not found"):
        load_weights(create_model("test_resnet", 5, 1), tmp_path / "nope.safetensors")
    path = tmp_path / "other.safetensors"
    save_tensors(path, create_model("test_resnet", 3, 1).state_dict())
    with pytest.raises(EdgeKDError, match="does not fit the model"):
        load_weights(create_model("test_resnet", 5, 1), path)
    pickled = tmp_path / "evil.pth"
    torch.save({"obj": object()}, pickled)
    with pytest.raises(EdgeKDError, match="weights_only=True"):
        load_weights(create_model("test_resnet", 5, 1), pickled)
