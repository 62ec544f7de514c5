import numpy as np
import pytest
import torch

from edgekd.distill.losses import LOSSES, ComposedLoss, StepOutputs
from edgekd.errors import EdgeKDError

STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.1, -1.0, 2.0]])
TEACHER = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
TARGETS = torch.tensor([1, 2])


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def numpy_kd(s, t, temperature):
    pt, ps = _softmax(t / temperature), _softmax(s / temperature)
    return (pt * (np.log(pt) - np.log(ps))).sum(1).mean() * temperature**2


# Golden values worked out once by hand in numpy (see numpy_kd): KL(p_t || p_s) at T, batch mean, times T^2.
@pytest.mark.parametrize("temperature, golden", [(1.0, 0.23465759807427944), (2.0, 0.25389564616859983),
                                                 (4.0, 0.25576018833781083)])
def test_kd_golden(temperature, golden):
    loss = LOSSES.get("kd")(temperature=temperature)(StepOutputs(STUDENT, TARGETS, TEACHER))
    assert loss.item() == pytest.approx(golden, rel=1e-5)  # float32 arithmetic
    assert golden == pytest.approx(numpy_kd(STUDENT.double().numpy(), TEACHER.double().numpy(), temperature), rel=1e-8)


def test_kd_random_against_numpy():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    loss = LOSSES.get("kd")(temperature=3.0)(StepOutputs(s, torch.zeros(16, dtype=torch.long), t))
    assert loss.item() == pytest.approx(numpy_kd(s.double().numpy(), t.double().numpy(), 3.0), rel=1e-5)


def test_kd_is_zero_when_student_copies_teacher():
    assert LOSSES.get("kd")(4.0)(StepOutputs(TEACHER, TARGETS, TEACHER)).item() == pytest.approx(0, abs=1e-7)


def test_kd_temperature_scaling_keeps_gradient_scale():
    # With the T^2 factor, at high T the loss tends to the logit-matching limit (1/2N) sum (z_s - z_t - mean)^2,
    # so it neither vanishes nor explodes as T grows.
    values = [LOSSES.get("kd")(t)(StepOutputs(STUDENT, TARGETS, TEACHER)).item() for t in (8.0, 32.0, 128.0)]
    d = (STUDENT - TEACHER) - (STUDENT - TEACHER).mean(1, keepdim=True)
    limit = (d**2).sum(1).mean().item() / (2 * 3)
    assert values[-1] == pytest.approx(limit, rel=1e-2)
    assert abs(values[1] - limit) < abs(values[0] - limit)


def test_ce_golden_and_label_smoothing():
    ce = LOSSES.get("ce")()(StepOutputs(STUDENT, TARGETS))
    assert ce.item() == pytest.approx(0.3230766348485291, rel=1e-6)
    smooth = LOSSES.get("ce")(0.1)(StepOutputs(STUDENT, TARGETS))
    logp = np.log(_softmax(STUDENT.numpy()))
    expected = (0.9 * -logp[[0, 1], TARGETS.numpy()] + 0.1 * -logp.mean(1)).mean()
    assert smooth.item() == pytest.approx(expected, rel=1e-6)


def test_composed_loss_weights_and_components():
    loss = ComposedLoss({"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}})
    parts = loss(StepOutputs(STUDENT, TARGETS, TEACHER))
    assert set(parts) == {"ce", "kd", "loss"}
    assert parts["loss"].item() == pytest.approx(0.1 * 0.3230766348485291 + 0.9 * 0.25576018833781083, rel=1e-5)
    assert loss.needs_teacher and not ComposedLoss({"ce": {}}).needs_teacher


@pytest.mark.parametrize("spec, message", [
    ({"kd": {"temprature": 2}}, "unknown profile key 'methods.x.kd.temprature'"),
    ({"kld": {}}, "unknown loss 'kld': did you mean 'kd'?"),
    ({}, "names no loss"),
])
def test_composed_loss_errors(spec, message):
    with pytest.raises(EdgeKDError, match=None) as info:
        ComposedLoss(spec, "methods.x")
    assert message in str(info.value)


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_is_differentiable(name):
    s = STUDENT.clone().requires_grad_()
    LOSSES.get(name)()(StepOutputs(s, TARGETS, TEACHER)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
