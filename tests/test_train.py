from dataclasses import replace

import pytest
import torch

from edgekd.config import DatasetConfig, TrainConfig
from edgekd.data.augment import ViewAugment
from edgekd.data.splits import load_splits
from edgekd.distill.execution import Execution
from edgekd.distill.losses import ComposedLoss
from edgekd.distill.train import lr_factor, train
from edgekd.models import create_model

EX = Execution("fp32", False, "cpu")
CFG = TrainConfig(model="test_resnet", epochs=4, batch_size=32, lr=0.05, precision="fp32",
                  channels_last="off")


def _data():
    return load_splits("synthetic", DatasetConfig(source="synthetic", classes=4, samples_per_class=60,
                                                  image_size=12))


def _run(run_dir, on_step=None):
    torch.manual_seed(0)
    model = create_model(CFG.model, 4, 1)
    history = train(model, _data(), CFG, ComposedLoss({"ce": {}}), EX, ViewAugment(1, True), seed=0,
                    run_dir=run_dir, on_step=on_step, log=lambda line: None)
    return model, history


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("every_s, resumed_at", [(0.0, 2), (3600.0, 1)])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch, every_s, resumed_at):
    """Killed in epoch 3, resumed from the last checkpoint: epoch 2's when one is written after every epoch, epoch
    1's (always written) when the interval (CHECKPOINT_EVERY_S) had not passed since; the same numbers either way."""
    import edgekd.distill.train as train_module

    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY_S", every_s)
    reference, ref_history = _run(tmp_path / "straight")

    def kill_in_epoch_three(report):
        if report.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(tmp_path / "killed", kill_in_epoch_three)
    lines = []
    torch.manual_seed(0)
    model = create_model(CFG.model, 4, 1)
    history = train(model, _data(), CFG, ComposedLoss({"ce": {}}), EX, ViewAugment(1, True), seed=0,
                    run_dir=tmp_path / "killed", log=lines.append)
    assert lines[0] == f"resumed at epoch {resumed_at}/4"
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3, 4]
    assert [h["val_acc"] for h in history["history"]] == [h["val_acc"] for h in ref_history["history"]]
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_training_learns_and_keeps_the_best_validation_epoch(tmp_path):
    _, history = _run(tmp_path / "run")
    vals = [h["val_acc"] for h in history["history"]]
    assert history["best_val"] == pytest.approx(max(vals), abs=1e-5)
    assert vals[history["best_epoch"] - 1] == max(vals) and max(vals) > 0.5  # 4 classes: chance is 0.25
    assert history["history"][-1]["ce"] < history["history"][0]["ce"]


def test_lr_schedule_warms_up_then_decays_to_zero():
    values = [lr_factor(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False)) and values[-1] < 1e-3


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_good_checkpoint(tmp_path):
    from dataclasses import replace

    from edgekd.errors import EdgeKDError

    torch.manual_seed(0)
    model = create_model(CFG.model, 4, 1)
    with torch.no_grad():
        model.get_classifier().weight.fill_(float("nan"))  # what an exploding loss leaves behind
    with pytest.raises(EdgeKDError, match="diverged in epoch 1 .* ramp the distillation term in"):
        train(model, _data(), replace(CFG, epochs=2), ComposedLoss({"ce": {}}), EX, ViewAugment(1, True), seed=0,
              run_dir=tmp_path, log=lambda line: None)
    assert not (tmp_path / "checkpoint.json").exists()  # nothing non-finite was saved as progress


def test_the_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """No host synchronisation inside the step: what the loop reads back (.item(), .tolist(), .cpu(), a tensor's
    truth value) is counted, and the count does not grow with the steps of an epoch, with progress shown every 10
    steps as the CLI does. On a GPU each such read waits for every queued kernel."""
    reads = {"n": 0}
    for name in ("item", "tolist", "cpu", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def reads_for(samples: int) -> tuple[int, int]:
        data = load_splits("synthetic", DatasetConfig(source="synthetic", classes=4, samples_per_class=samples,
                                                      image_size=12))
        model = create_model(CFG.model, 4, 1)
        reads["n"] = 0
        shown = []
        train(model, data, replace(CFG, epochs=2, batch_size=8), ComposedLoss({"ce": {}}), EX,
              ViewAugment(1, True), seed=0, run_dir=tmp_path / str(samples), on_step=shown.append,
              log=lambda line: None)
        return reads["n"], len(data.train) // 8

    few, few_steps = reads_for(30)
    many, many_steps = reads_for(90)
    assert many_steps >= 3 * few_steps - 3
    assert many == few, (few, many)  # per epoch (loss, validation), not per step
