"""Feature and relation losses against numpy formulas written out independently, and their invariants."""

import numpy as np
import pytest
import torch

from edgekd.distill.losses import LOSSES, ComposedLoss, StepOutputs
from edgekd.models import create_model

FEATURE_LOSSES = [n for n in LOSSES if LOSSES.get(n).needs_features]


def _features(seed=0, b=6, c=4, h=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, h, generator=g), torch.randn(b, c, h, h, generator=g)


def _out(fs, ft):
    b = len(fs)
    return StepOutputs(torch.zeros(b, 3), torch.zeros(b, dtype=torch.long), torch.zeros(b, 3), {-1: fs}, {-1: ft})


def np_normalize(x, axis=1):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_at(fs, ft):
    a = lambda f: np_normalize((np.abs(f) ** 2).mean(1).reshape(len(f), -1))  # noqa: E731
    return ((a(fs) - a(ft)) ** 2).mean()


def np_sp(fs, ft):
    g = lambda f: np_normalize(f.reshape(len(f), -1) @ f.reshape(len(f), -1).T)  # noqa: E731
    return ((g(fs) - g(ft)) ** 2).sum() / len(fs) ** 2


def np_pkt(es, et):
    def cond(e):
        e = np_normalize(e)
        sim = (e @ e.T + 1) / 2
        return sim / sim.sum(1, keepdims=True)

    ps, pt = cond(es), cond(et)
    return (pt * np.log((pt + 1e-7) / (ps + 1e-7))).sum(1).mean()


def np_smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def np_rkd_distance(es, et):
    def dist(e):
        d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
        return d / d[d > 0].mean()

    return np_smooth_l1(dist(es), dist(et))


def np_rkd_angle(es, et):
    def angles(e):
        n = len(e)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out[i, j, k] = 0.0 if nu == 0 or nv == 0 else u @ v / (nu * nv)
        return out

    return np_smooth_l1(angles(es), angles(et))


@pytest.mark.parametrize("name, reference", [
    ("at", lambda s, t: np_at(s, t)),
    ("sp", lambda s, t: np_sp(s, t)),
    ("pkt", lambda s, t: np_pkt(s.mean((2, 3)), t.mean((2, 3)))),
    ("rkd", lambda s, t: np_rkd_distance(s.mean((2, 3)), t.mean((2, 3)))
     + 2 * np_rkd_angle(s.mean((2, 3)), t.mean((2, 3)))),
])
def test_against_numpy(name, reference):
    fs, ft = _features()
    value = LOSSES.get(name)()(_out(fs, ft))
    value = value["loss"] if isinstance(value, dict) else value
    assert value.item() == pytest.approx(reference(fs.double().numpy(), ft.double().numpy()), rel=1e-4)


def test_fitnet_and_cosmse_with_identity_adapter():
    fs, ft = _features()
    for name in ("fitnet", "cosmse"):
        loss = LOSSES.get(name)()
        loss.adapter = torch.nn.Conv2d(4, 4, 1, bias=False)
        with torch.no_grad():
            loss.adapter.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        value = loss(_out(fs, ft))
        mse = ((fs - ft) ** 2).mean().item()
        if name == "fitnet":
            assert value.item() == pytest.approx(mse, rel=1e-5)
        else:
            cos = torch.nn.functional.cosine_similarity(fs, ft, dim=1)
            assert value["mse"].item() == pytest.approx(mse, rel=1e-5)
            assert value["cosine"].item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
            assert set(value) == {"cosine", "mse", "loss"}


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp"])
def test_relation_losses_ignore_a_shared_permutation_of_samples(name):
    fs, ft = _features(1, b=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    a, b = LOSSES.get(name)()(_out(fs, ft)), LOSSES.get(name)()(_out(fs[perm], ft[perm]))
    a, b = (x["loss"] if isinstance(x, dict) else x for x in (a, b))
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["at", "rkd", "pkt", "sp"])
def test_zero_when_the_student_has_the_teachers_features(name):
    _, ft = _features(2)
    value = LOSSES.get(name)()(_out(ft.clone(), ft))
    value = value["loss"] if isinstance(value, dict) else value
    assert value.item() == pytest.approx(0, abs=1e-6)


def test_rkd_distance_is_scale_invariant():
    fs, ft = _features(3)
    a = LOSSES.get("rkd")()(_out(fs, ft))
    b = LOSSES.get("rkd")()(_out(fs * 10, ft))
    assert a["distance"].item() == pytest.approx(b["distance"].item(), rel=1e-5)
    assert a["angle"].item() == pytest.approx(b["angle"].item(), rel=1e-5)


def test_bind_builds_adapters_from_the_models_stages_and_features_flow():
    student, teacher = create_model("test_efficientnet", 4, 1), create_model("test_resnet", 4, 1)
    loss = ComposedLoss({"ce": {}, "fitnet": {"student_stage": -1, "teacher_stage": -2}, "rkd": {}}).bind(student,
                                                                                                       teacher)
    assert loss.stages() == ({-1}, {-2, -1})
    adapter = loss.terms["fitnet"].adapter
    assert adapter.in_channels == student.feature_info[-1]["num_chs"]
    assert adapter.out_channels == teacher.feature_info[-2]["num_chs"]
    from edgekd.distill.features import FeatureTap

    s_tap, t_tap = FeatureTap(student, {-1}), FeatureTap(teacher, {-2, -1})
    x = torch.randn(4, 1, 32, 32)
    logits, t_logits = student(x), teacher(x)
    parts = loss(StepOutputs(logits, torch.tensor([0, 1, 2, 3]), t_logits, s_tap.outputs, t_tap.outputs))
    assert {"ce", "fitnet", "rkd", "rkd.distance", "rkd.angle", "loss"} == set(parts)
    parts["loss"].backward()
    assert adapter.weight.grad is not None
    assert [n for n, _ in loss.named_parameters()] == ["terms.fitnet.adapter.weight"]  # trained with the student


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_every_feature_loss_is_differentiable(name):
    fs, ft = _features(4)
    fs.requires_grad_()
    loss = LOSSES.get(name)()
    if hasattr(loss, "bind"):
        loss.adapter = torch.nn.Conv2d(4, 4, 1)
    value = loss(_out(fs, ft))
    (value["loss"] if isinstance(value, dict) else value).backward()
    assert fs.grad is not None and torch.isfinite(fs.grad).all()


def test_attention_transfer_refuses_maps_that_meet_1x1():
    from edgekd.errors import EdgeKDError

    for resize in ("pool_larger", "upsample_student"):
        at = LOSSES.get("at")(resize=resize)
        # a 1x1 student map (pooled teacher or replicated student: flat either way), or a 1x1 teacher map
        for fs, ft in ((torch.randn(4, 8, 1, 1), torch.randn(4, 16, 1, 1)),
                       (torch.randn(4, 8, 1, 1), torch.randn(4, 16, 2, 2)),
                       (torch.randn(4, 8, 2, 2), torch.randn(4, 16, 1, 1))):
            with pytest.raises(EdgeKDError, match="1x1 at this input size"):
                at(_out(fs, ft))
        assert at(_out(torch.randn(4, 8, 2, 2), torch.randn(4, 16, 4, 4))).item() > 0


# -- AT between maps of different sizes (issue 14) -----------------------------------------------------------
# The references pool the larger map to the smaller one's grid before taking attention maps:
#   HobbitLong/RepDistiller, distiller_zoo/AT.py, Attention.at_loss, and
#   megvii-research/mdistiller, mdistiller/distillers/AT.py, single_stage_at_loss:
#     if s_H > t_H: f_s = adaptive_avg_pool2d(f_s, (t_H, t_H))
#     elif s_H < t_H: f_t = adaptive_avg_pool2d(f_t, (s_H, s_H))
#     at(f) = F.normalize(f.pow(p).mean(1).view(N, -1)); loss = (at(f_s) - at(f_t)).pow(2).mean()
def np_block_pool(f, size):
    """adaptive_avg_pool2d to `size` when it divides the map: the mean of each block."""
    n, c, h, w = f.shape
    assert h % size == 0 and w % size == 0
    return f.reshape(n, c, size, h // size, size, w // size).mean((3, 5))


def np_at_reference(fs, ft, p=2):
    s_h, t_h = fs.shape[2], ft.shape[2]
    if s_h > t_h:
        fs = np_block_pool(fs, t_h)
    elif s_h < t_h:
        ft = np_block_pool(ft, s_h)
    a = lambda f: np_normalize((f**p).mean(1).reshape(len(f), -1))  # noqa: E731
    return ((a(fs) - a(ft)) ** 2).mean()


def _fashion_mnist_at_maps(seed=5):
    # the fashion-mnist-methods `at` profile at 28 px: mobilenetv3_small_050 stage -2 is 24x2x2,
    # resnet10t stage -2 is 256x4x4 (post-activation, so non-negative)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 24, 2, 2, generator=g).relu(), torch.randn(6, 256, 4, 4, generator=g).relu()


def test_attention_transfer_pools_the_teacher_to_a_smaller_students_grid_as_the_references_do():
    fs, ft = _fashion_mnist_at_maps()
    value = LOSSES.get("at")()(_out(fs, ft)).item()
    reference = np_at_reference(fs.double().numpy(), ft.double().numpy())
    assert value == pytest.approx(reference, rel=1e-5)
    # the student's grid is what is compared: 2x2 attention maps, not 4x4
    upsampled = np_at(np.repeat(np.repeat(fs.double().numpy(), 2, 2), 2, 3), ft.double().numpy())
    assert abs(reference - upsampled) > 0.05 * reference


def test_attention_transfer_pools_a_larger_student_to_the_teachers_grid():
    ft, fs = _fashion_mnist_at_maps(6)  # the student map is the 4x4 one here
    for resize in ("pool_larger", "upsample_student"):  # the same when the student is the larger map
        value = LOSSES.get("at")(resize=resize)(_out(fs, ft)).item()
        assert value == pytest.approx(np_at_reference(fs.double().numpy(), ft.double().numpy()), rel=1e-5)


def test_attention_transfer_can_still_replicate_the_student_to_the_teachers_grid():
    # edgekd's behaviour before issue 14, kept as an option
    fs, ft = _fashion_mnist_at_maps(7)
    value = LOSSES.get("at")(resize="upsample_student")(_out(fs, ft)).item()
    replicated = np.repeat(np.repeat(fs.double().numpy(), 2, 2), 2, 3)
    assert value == pytest.approx(np_at(replicated, ft.double().numpy()), rel=1e-5)


def test_attention_transfer_resize_is_a_declared_and_checked_profile_key():
    from edgekd.errors import EdgeKDError

    loss = ComposedLoss({"at": {"weight": 1000.0, "student_stage": -2, "teacher_stage": -2,
                                "resize": "upsample_student"}}, "methods.at")
    assert loss.terms["at"].resize == "upsample_student"
    assert ComposedLoss({"at": {}}).terms["at"].resize == "pool_larger"
    with pytest.raises(EdgeKDError, match="use one of pool_larger, upsample_student"):
        ComposedLoss({"at": {"resize": "bilinear"}}, "methods.at")
    with pytest.raises(EdgeKDError, match="takes weight, ramp, student_stage, teacher_stage, p, resize"):
        ComposedLoss({"at": {"resise": "pool_larger"}}, "methods.at")
