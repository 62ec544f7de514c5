"""The compression ladder's pruning stage: Torch-Pruning on timm students, pruned weights that load into a fresh
model, and a study whose KD students are pruned, fine-tuned with KD, exported and re-run only when they must be."""

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
    from edgekd.distill.study import run_study
    from edgekd.export.bundle import ExportOptions, export_run
    from edgekd.runio import read_json

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
