"""Each dataset variant's statistics, exactly as specified, and the clean test split left untouched."""

import math

import pytest
import torch

from edgekd.config import DatasetConfig
from edgekd.data.splits import load_splits
from edgekd.data.variants import CORRUPTIONS, VariantConfig, apply_variant, corrupt, imbalance_counts
from edgekd.errors import EdgeKDError


@pytest.fixture(scope="module")
def splits():
    return load_splits("synthetic", DatasetConfig(source="synthetic", classes=5, samples_per_class=100,
                                                  image_size=14, val_fraction=0.2))


def _counts(s, classes=5):
    return torch.bincount(s.labels, minlength=classes).tolist()


def test_fraction_and_per_class_counts(splits):
    half = apply_variant(splits, VariantConfig(kind="fraction", fraction=0.25))
    assert _counts(half.splits.train) == [20] * 5 and _counts(half.splits.val) == [5] * 5
    few = apply_variant(splits, VariantConfig(kind="per_class", per_class=7))
    assert _counts(few.splits.train) == [7] * 5 and half.stats["train_per_class"] == [20] * 5
    assert torch.equal(few.splits.test.images, splits.test.images)


def test_imbalance_follows_the_exponential_profile(splits):
    v = apply_variant(splits, VariantConfig(kind="imbalance", ratio=10))
    # n_c = 80 * 10^(-c/4): 80, 44.98, 25.29, 14.22, 8
    assert _counts(v.splits.train) == [80, 44, 25, 14, 8]
    assert imbalance_counts(torch.tensor([500] * 10), 100.0).tolist() == [math.floor(500 * 100 ** (-c / 9) + 1e-9) for c in range(10)]
    assert torch.equal(v.splits.test.labels, splits.test.labels)


@pytest.mark.parametrize("noise", ["symmetric", "pairs"])
def test_label_noise_rate_and_transition(splits, noise):
    v = apply_variant(splits, VariantConfig(kind="label_noise", rate=0.2, noise=noise, pairs=[[0, 3]]))
    t = torch.tensor(v.stats["transition"])
    assert v.stats["noise_rate"] == pytest.approx(0.2)
    assert t.diagonal().tolist() == [64] * 5 and t.sum(1).tolist() == [80] * 5  # exactly 16 of 80 flipped
    if noise == "pairs":
        assert t[0, 3] == 16 and t[3, 0] == 16 and t[1, 2] == 16 and t[4, 0] == 16  # others: c -> c + 1
    else:
        off = t - torch.diag(t.diagonal())
        assert (off.sum(1) == 16).all() and (off > 0).sum() > 10  # spread over the other classes
    assert torch.equal(v.splits.train.images, splits.train.images)  # images untouched
    assert not torch.equal(v.splits.val.labels, splits.val.labels)  # held-out data is as noisy as training
    assert torch.equal(v.splits.test.labels, splits.test.labels)


def test_spurious_cue_rate_and_test_groups(splits):
    v = apply_variant(splits, VariantConfig(kind="spurious", p=0.9))
    assert abs(v.stats["bias_aligned_rate"] - 0.9) < 0.05
    assert set(v.extra_tests) == {"aligned", "conflicting"}
    assert torch.equal(v.splits.test.images, splits.test.images)
    size = max(2, 14 // 7)
    for name, s in v.extra_tests.items():
        assert torch.equal(s.labels, splits.test.labels)
        corner = s.images[:, :, :size, :size].float().mean(dim=(1, 2, 3))  # class 0's slot
        has_zero_cue = corner == 255
        if name == "aligned":
            assert torch.equal(has_zero_cue, s.labels == 0)
        else:
            assert not (has_zero_cue & (s.labels == 0)).any()


def test_class_subset_relabels_everywhere(splits):
    v = apply_variant(splits, VariantConfig(kind="classes", classes=[1, 3]))
    assert v.splits.classes == ["bar1", "bar3"]
    for s in (v.splits.train, v.splits.val, v.splits.test):
        assert set(s.labels.tolist()) == {0, 1}
    assert len(v.splits.test) == int(((splits.test.labels == 1) | (splits.test.labels == 3)).sum())


def test_corruptions_and_resolution(splits):
    v = apply_variant(splits, VariantConfig(kind="corruption", severities=[1, 5]))
    assert set(v.extra_tests) == {f"{k}@{s}" for k in CORRUPTIONS for s in (1, 5)}
    clean = splits.test.images.float()
    for kind in CORRUPTIONS:
        mild = (v.extra_tests[f"{kind}@1"].images.float() - clean).abs().mean()
        strong = (v.extra_tests[f"{kind}@5"].images.float() - clean).abs().mean()
        assert 0 < mild < strong, kind
    assert torch.equal(v.splits.test.images, splits.test.images)
    r = apply_variant(splits, VariantConfig(kind="resolution", resolution=7))
    assert r.extra_tests["resolution@7"].images.shape == splits.test.images.shape
    assert corrupt(splits.test.images[:2], "jpeg", 3).dtype == torch.uint8


@pytest.mark.parametrize("cfg, message", [
    (VariantConfig(kind="fractoin"), "unknown variant kind"),
    (VariantConfig(kind="fraction", fraction=1.5), "must be in (0, 1]"),
    (VariantConfig(kind="per_class", per_class=10_000), "between 1 and 80"),
    (VariantConfig(kind="label_noise", rate=1.2), "0 <= rate < 1"),
    (VariantConfig(kind="classes", classes=[1]), "at least two"),
])
def test_variant_errors(splits, cfg, message):
    with pytest.raises(EdgeKDError) as info:
        apply_variant(splits, cfg)
    assert message in str(info.value)


def test_variants_are_seeded(splits):
    a = apply_variant(splits, VariantConfig(kind="label_noise", rate=0.3, seed=1))
    b = apply_variant(splits, VariantConfig(kind="label_noise", rate=0.3, seed=1))
    c = apply_variant(splits, VariantConfig(kind="label_noise", rate=0.3, seed=2))
    assert torch.equal(a.splits.train.labels, b.splits.train.labels)
    assert not torch.equal(a.splits.train.labels, c.splits.train.labels)


def test_shift_on_any_variant_changes_no_training_data(splits):
    v = apply_variant(splits, VariantConfig(kind="base", shift=True, corruptions=["blur"], severities=[2],
                                            resolution=7))
    assert set(v.extra_tests) == {"blur@2", "resolution@7"}
    assert torch.equal(v.splits.train.images, splits.train.images)


def test_labels_keep_a_stratified_share_and_unlabel_the_rest(splits):
    """labels: every training image stays; a stratified share (at least one per class) keeps its label, the rest
    get UNLABELED; validation keeps the same labeled share (a user with 5% of the labels has no more held out), the
    test split is untouched."""
    from edgekd.data.sampling import UNLABELED

    v = apply_variant(splits, VariantConfig(kind="labels", fraction=0.05))
    train = v.splits.train
    assert len(train) == len(splits.train) and torch.equal(train.images, splits.train.images)
    labeled = train.labels >= 0
    assert torch.bincount(train.labels[labeled], minlength=5).tolist() == [4] * 5  # round(80 * 0.05)
    assert (train.labels[~labeled] == UNLABELED).all()
    assert torch.equal(train.labels[labeled], splits.train.labels[labeled])  # the kept labels are the true ones
    assert torch.equal(v.splits.test.labels, splits.test.labels)
    val_counts = torch.bincount(splits.val.labels, minlength=5)
    assert torch.bincount(v.splits.val.labels, minlength=5).tolist() == torch.round(val_counts * 0.05).clamp_min(1).long().tolist()
    assert (v.stats["labeled"], v.stats["unlabeled"], v.stats["train_per_class"]) == (20, 380, [4] * 5)
    tiny = apply_variant(splits, VariantConfig(kind="labels", fraction=0.001))
    assert torch.bincount(tiny.splits.train.labels[tiny.splits.train.labels >= 0], minlength=5).tolist() == [1] * 5


def test_cross_entropy_skips_unlabeled_images_and_dkd_uses_the_teachers_class():
    from edgekd.distill.losses import LOSSES, StepOutputs

    logits, teacher = torch.randn(6, 4), torch.randn(6, 4)
    targets = torch.tensor([0, -1, 2, -1, 3, 1])
    ce = LOSSES.get("ce")()
    kept = targets >= 0
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(ce(StepOutputs(logits, targets)), expected)
    assert ce(StepOutputs(logits, torch.full((6,), -1))).item() == 0.0  # a batch without labels: no CE, no nan
    dkd = LOSSES.get("dkd")(alpha=1.0, beta=8.0, temperature=4.0)
    filled = torch.where(kept, targets, teacher.argmax(1))
    torch.testing.assert_close(dkd(StepOutputs(logits, targets, teacher)), dkd(StepOutputs(logits, filled, teacher)))
