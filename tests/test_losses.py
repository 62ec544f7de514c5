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


def test_ramp_raises_a_terms_weight_linearly_over_its_fraction_of_training():
    loss = ComposedLoss({"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0, "ramp": 0.2}})
    ce, kd = 0.3230766348485291, 0.25576018833781083
    for progress, factor in ((0.0, 0.0), (0.05, 0.25), (0.2, 1.0), (0.7, 1.0)):
        total = loss(StepOutputs(STUDENT, TARGETS, TEACHER, progress=progress))["loss"].item()
        assert total == pytest.approx(0.1 * ce + factor * 0.9 * kd, rel=1e-5)


@pytest.mark.parametrize("spec, message", [
    ({"kd": {"temprature": 2}}, "unknown profile key 'methods.x.kd.temprature'"),
    ({"kd": {"ramp": 2}}, "'methods.x.kd.ramp' is 2.0: use a fraction of training"),
    ({"kld": {}}, "unknown loss 'kld': did you mean 'kd'?"),
    ({}, "names no loss"),
])
def test_composed_loss_errors(spec, message):
    with pytest.raises(EdgeKDError, match=None) as info:
        ComposedLoss(spec, "methods.x")
    assert message in str(info.value)


@pytest.mark.parametrize("name", [n for n in LOSSES if not LOSSES.get(n).needs_features])
def test_every_logit_loss_is_differentiable(name):
    s = STUDENT.clone().requires_grad_()
    LOSSES.get(name)()(StepOutputs(s, TARGETS, TEACHER)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


# -- logit methods beyond vanilla KD, each against a numpy formula written out independently ----------------
def numpy_dkd(s, t, y, alpha, beta, T):
    ps, pt = _softmax(s / T), _softmax(t / T)
    n = len(y)
    bs = np.stack([ps[np.arange(n), y], 1 - ps[np.arange(n), y]], 1)
    bt = np.stack([pt[np.arange(n), y], 1 - pt[np.arange(n), y]], 1)
    tckd = (bt * np.log(bt / bs)).sum(1).mean() * T**2
    nckd = 0.0
    for i in range(n):
        keep = np.arange(s.shape[1]) != y[i]
        qs, qt = _softmax(s[i : i + 1, keep] / T)[0], _softmax(t[i : i + 1, keep] / T)[0]
        nckd += (qt * np.log(qt / qs)).sum()
    return alpha * tckd + beta * nckd / n * T**2


def numpy_pearson_distance(a, b, axis):
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    r = (a * b).sum(axis) / np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    return 1 - r.mean()


def numpy_dist(s, t, beta, gamma, T):
    ys, yt = _softmax(s / T), _softmax(t / T)
    return (beta * numpy_pearson_distance(ys, yt, 1) + gamma * numpy_pearson_distance(ys, yt, 0)) * T**2


def numpy_lskd(s, t, T):
    def z(x):
        return (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True)

    return numpy_kd(z(s), z(t), T)


def _random(seed=0, n=8, k=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 2, torch.randn(n, k, generator=g) * 2, torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("name, kwargs, reference", [
    ("dkd", {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}, lambda s, t, y: numpy_dkd(s, t, y, 1.0, 8.0, 4.0)),
    ("dkd", {"alpha": 0.5, "beta": 2.0, "temperature": 1.0}, lambda s, t, y: numpy_dkd(s, t, y, 0.5, 2.0, 1.0)),
    ("dist", {"beta": 1.0, "gamma": 2.0, "temperature": 1.0}, lambda s, t, y: numpy_dist(s, t, 1.0, 2.0, 1.0)),
    ("dist", {"beta": 1.0, "gamma": 1.0, "temperature": 4.0}, lambda s, t, y: numpy_dist(s, t, 1.0, 1.0, 4.0)),
    ("lskd", {"temperature": 2.0}, lambda s, t, y: numpy_lskd(s, t, 2.0)),
])
def test_logit_methods_against_numpy(name, kwargs, reference):
    s, t, y = _random()
    value = LOSSES.get(name)(**kwargs)(StepOutputs(s, y, t)).item()
    assert value == pytest.approx(reference(s.double().numpy(), t.double().numpy(), y.numpy()), rel=1e-4)


@pytest.mark.parametrize("name", ["kd", "dkd", "dist", "lskd"])
def test_logit_methods_vanish_when_the_student_copies_the_teacher(name):
    s, t, y = _random(1)
    assert LOSSES.get(name)()(StepOutputs(t.clone(), y, t)).item() == pytest.approx(0, abs=1e-5)
    assert LOSSES.get(name)()(StepOutputs(s, y, t)).item() > 1e-3


def test_dkd_with_equal_weights_is_close_to_kd_decomposition():
    # Zhao et al.: KD = TCKD + (1 - p_t^target) * NCKD; with beta = 1 - p_t on each sample they coincide.
    s, t, y = _random(2, n=1)
    T = 3.0
    pt = _softmax(t.double().numpy() / T)[0, y.item()]
    dkd = LOSSES.get("dkd")(alpha=1.0, beta=1 - pt, temperature=T)(StepOutputs(s, y, t)).item()
    kd = LOSSES.get("kd")(temperature=T)(StepOutputs(s, y, t)).item()
    assert dkd == pytest.approx(kd, rel=1e-4)


def test_lskd_ignores_the_teachers_logit_scale():
    s, t, y = _random(3)
    a = LOSSES.get("lskd")()(StepOutputs(s, y, t)).item()
    b = LOSSES.get("lskd")()(StepOutputs(s, y, t * 5 + 3)).item()
    assert a == pytest.approx(b, rel=1e-5)
    assert LOSSES.get("kd")()(StepOutputs(s, y, t)).item() != pytest.approx(
        LOSSES.get("kd")()(StepOutputs(s, y, t * 5 + 3)).item(), rel=1e-2)


# -- DKD for a confident student: golden values from mdistiller's dkd_loss, exact in float64 -----------------
# megvii-research/mdistiller, mdistiller/distillers/DKD.py, `dkd_loss`:
#   b = cat_mask(softmax(z / T)): (p_target, sum of the rest); tckd = kl_div(log b_s, b_t, sum) * T^2 / N
#   q = softmax(z / T - 1000 * gt_mask);                         nckd = kl_div(log q_s, q_t, sum) * T^2 / N
#   loss = alpha * tckd + beta * nckd
# Below, log b is written as log-sum-exp (log b_target = z_y - lse(z), log b_rest = lse(z_{!=y}) - lse(z)),
# which is the same number as log(softmax) in exact arithmetic but has no cancellation in float64 for these
# inputs (log(1 - p_target) would lose 3 digits at a margin of 30); the rest follows the reference line by
# line.
def _lse(x, axis=1):
    m = x.max(axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis, keepdims=True))).squeeze(axis)


def mdistiller_dkd(s, t, y, alpha, beta, T):
    s, t = np.asarray(s, np.float64) / T, np.asarray(t, np.float64) / T
    n, k = s.shape
    gt = np.zeros((n, k), bool)
    gt[np.arange(n), y] = True

    def log_b(z):
        return np.stack([z[gt] - _lse(z), _lse(np.where(gt, -np.inf, z)) - _lse(z)], 1)

    def log_q(z):
        z = z - 1000.0 * gt
        return z - _lse(z)[:, None]

    def kl_sum(log_p_s, log_p_t):  # F.kl_div(log p_s, p_t, size_average=False); 0 where p_t = 0
        p_t = np.exp(log_p_t)
        return np.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum()

    tckd = kl_sum(log_b(s), log_b(t)) * T**2 / n
    nckd = kl_sum(log_q(s), log_q(t)) * T**2 / n
    return alpha * tckd + beta * nckd


def mdistiller_dkd_grad(s, t, y, alpha, beta, T):
    """d loss / d student logits, worked out by hand from the formula above.

    With p = softmax(z), q = softmax(z_{!=y}) and z = s / T:
    d tckd / d z_j = p_s,j - b_t,target [j = y] - b_t,rest q_s,j [j != y],
    d nckd / d z_j = (q_s,j - q_t,j) [j != y], both times T^2 / N, and d z / d s = 1 / T.
    """
    s, t = np.asarray(s, np.float64) / T, np.asarray(t, np.float64) / T
    n, k = s.shape
    gt = np.zeros((n, k), bool)
    gt[np.arange(n), y] = True

    def parts(z):
        p = np.exp(z - _lse(z)[:, None])
        rest = np.where(gt, -np.inf, z)
        q = np.exp(rest - _lse(rest)[:, None])
        log_b_rest = _lse(rest) - _lse(z)
        return p, q, np.stack([1 - np.exp(log_b_rest), np.exp(log_b_rest)], 1)

    p_s, q_s, _ = parts(s)
    _, q_t, b_t = parts(t)
    d_tckd = p_s - gt * b_t[:, :1] - b_t[:, 1:] * q_s
    d_nckd = q_s - q_t
    return (alpha * d_tckd + beta * d_nckd) * T / n


def _dkd(s, t, y, dtype, **kwargs):
    s = torch.tensor(s, dtype=dtype, requires_grad=True)
    loss = LOSSES.get("dkd")(**kwargs)(StepOutputs(s, torch.tensor(y), torch.tensor(t, dtype=dtype)))
    loss.backward()
    return loss, s.grad


# Issue 14: clamping p at 1e-12 before the log gave 13.122 with a zero gradient for the first case and
# 0.5598 with a zero gradient for the second (every margin above ~27.6 T). With two classes the non-target
# distribution has one class, so NCKD is 0 and beta does not matter; the closed forms below are alpha * KL of
# the binary parts. The golden values agree with the closed forms evaluated with Python's decimal module at
# 50 digits (14.30685281944014827..., 0.61595561211032730...; gradients sigmoid(-30) - 1/2 and
# (sigmoid(30) - sigmoid(3)) / 2).
def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


DKD_CONFIDENT = [
    # s = [0, 30], t = [0, 0], y = 0, alpha = beta = 1, T = 1: 15 + log(1/2) + log1p(e^-30), grad ~ [-.5, .5]
    ([[0.0, 30.0]], [[0.0, 0.0]], [0], dict(alpha=1.0, beta=1.0, temperature=1.0), 14.306852819440148,
     [[-0.4999999999999064, 0.4999999999999064]], 15 + np.log(0.5) + np.log1p(np.exp(-30.0))),
    # the profiles' alpha = beta = 0.5, T = 1: s = [30, 0], t = [3, 0], y = 0, grad (sig(30) - sig(3)) / 2
    ([[30.0, 0.0]], [[3.0, 0.0]], [0], dict(alpha=0.5, beta=0.5, temperature=1.0), 0.6159556121103273,
     [[0.0237129365887366, -0.0237129365887366]],
     0.5 * (1 / (1 + np.exp(-3.0)) * (_log_sigmoid(3.0) - _log_sigmoid(30.0))
            + 1 / (1 + np.exp(3.0)) * (_log_sigmoid(-3.0) - _log_sigmoid(-30.0)))),
]


@pytest.mark.parametrize("s, t, y, kwargs, golden, golden_grad, closed_form", DKD_CONFIDENT)
def test_dkd_keeps_its_gradient_for_a_confident_student(s, t, y, kwargs, golden, golden_grad, closed_form):
    T = kwargs["temperature"]
    assert golden == pytest.approx(closed_form, rel=1e-14)
    assert golden == pytest.approx(mdistiller_dkd(s, t, y, kwargs["alpha"], kwargs["beta"], T), rel=1e-14)
    np.testing.assert_allclose(mdistiller_dkd_grad(s, t, y, kwargs["alpha"], kwargs["beta"], T), golden_grad,
                               rtol=0, atol=1e-13)
    loss, grad = _dkd(s, t, y, torch.float64, **kwargs)
    assert loss.item() == pytest.approx(golden, rel=1e-13)
    np.testing.assert_allclose(grad.numpy(), golden_grad, rtol=0, atol=1e-13)
    loss, grad = _dkd(s, t, y, torch.float32, **kwargs)  # the training path: float32 keeps it too
    assert loss.item() == pytest.approx(golden, rel=1e-6)
    np.testing.assert_allclose(grad.numpy(), golden_grad, rtol=1e-5, atol=1e-7)


def test_dkd_confident_batch_with_non_target_classes_against_mdistiller():
    # four classes, a batch of two, margins of 40 T and 30 T: both TCKD and NCKD are non-zero
    s = [[0.0, 80.0, 3.0, -2.0], [1.0, -1.0, 0.5, 61.0]]
    t = [[1.0, 0.0, 2.0, 0.5], [0.0, 2.0, -1.0, 4.0]]
    y, alpha, beta, T = [0, 3], 1.0, 8.0, 2.0
    loss, grad = _dkd(s, t, y, torch.float64, alpha=alpha, beta=beta, temperature=T)
    assert loss.item() == pytest.approx(mdistiller_dkd(s, t, y, alpha, beta, T), rel=1e-13)
    reference_grad = mdistiller_dkd_grad(s, t, y, alpha, beta, T)
    np.testing.assert_allclose(grad.numpy(), reference_grad, rtol=1e-12, atol=1e-14)
    assert np.abs(grad.numpy()).max() > 0.1
