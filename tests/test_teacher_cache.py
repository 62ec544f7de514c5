"""The cache must hand every sample of a shuffled, augmented batch the teacher output of its own view."""

import torch

from edgekd.config import DatasetConfig
from edgekd.data.augment import ViewAugment
from edgekd.data.splits import load_splits
from edgekd.distill.execution import Execution
from edgekd.distill.teacher import LiveTeacher, Normalize, TeacherCache, build_cache
from edgekd.models import create_model

EX = Execution("fp32", False, "cpu")


def _setup(classes=6):
    data = load_splits("synthetic", DatasetConfig(source="synthetic", classes=classes, samples_per_class=12,
                                                  image_size=12))
    torch.manual_seed(0)
    teacher = LiveTeacher(create_model("test_resnet", classes, 1), EX)
    return data, teacher, ViewAugment(2, True), Normalize(data.mean, data.std, "cpu")


def test_cached_outputs_match_running_the_teacher(tmp_path):
    data, teacher, augment, normalize = _setup()
    key = {"num_classes": data.num_classes, "topk": 0, "teacher": "t"}
    cache, info = build_cache(tmp_path / "cache", key, teacher, data.train.images, augment, normalize,
                              seeds=[0, 1], epochs=3, batch_size=16)
    n = len(data.train)
    assert info["teacher_forwards"] == int(cache.filled.sum()) <= 2 * 3 * n
    for seed in (0, 1):
        for epoch in range(3):
            order, views = augment.draw_epoch(n, seed, epoch)
            idx = order[:20]  # a shuffled batch, as training draws it
            x = normalize(augment.apply(data.train.images[idx], views[idx]))
            before = int(cache.filled.sum())
            got = cache.outputs(idx, views[idx], x)
            assert int(cache.filled.sum()) == before, "planned views must already be cached"
            torch.testing.assert_close(got, teacher(x), atol=2e-3, rtol=2e-3)  # fp16 storage


def test_unplanned_views_are_computed_from_the_batch_and_kept(tmp_path):
    data, teacher, augment, normalize = _setup()
    cache = TeacherCache(len(data.train), augment.num_views, data.num_classes)
    cache.live = teacher
    idx = torch.tensor([5, 1, 7, 3])
    views = torch.tensor([0, 49, 17, 17])
    x = normalize(augment.apply(data.train.images[idx], views))
    first = cache.outputs(idx, views, x)
    assert cache.fills == 4 and int(cache.filled.sum()) == 4
    torch.testing.assert_close(first, teacher(x), atol=2e-3, rtol=2e-3)
    cache.live = None  # a second lookup must not need the teacher
    torch.testing.assert_close(cache.outputs(idx, views, x), first)


def test_saved_cache_is_reused_only_for_the_same_key(tmp_path):
    data, teacher, augment, normalize = _setup()
    key = {"num_classes": data.num_classes, "topk": 0, "teacher": "a"}
    built, _ = build_cache(tmp_path / "c", key, teacher, data.train.images, augment, normalize, [0], 2, 32)
    again, info = build_cache(tmp_path / "c", key, teacher, data.train.images, augment, normalize, [0], 2, 32)
    assert torch.equal(again.values, built.values) and info["teacher_forwards"] == int(built.filled.sum())
    assert TeacherCache.load(tmp_path / "c", {**key, "teacher": "b"}, "cpu") is None


def test_topk_keeps_the_largest_logits():
    cache = TeacherCache(3, 2, num_classes=8, topk=3)
    logits = torch.tensor([[0.0, 5, 1, 7, -2, 3, 0.5, 0.2]])
    cache.store(torch.tensor([1]), torch.tensor([1]), logits)
    dense = cache.lookup(torch.tensor([1]), torch.tensor([1]))
    assert dense[0, [1, 3, 5]].tolist() == [5.0, 7.0, 3.0]
    assert dense[0, [0, 2, 4, 6, 7]].tolist() == [3.0] * 5  # floor: the smallest kept logit
    assert dense.argmax().item() == 3


def test_ensemble_teacher_averages_softened_outputs():
    from edgekd.distill.teacher import EnsembleTeacher

    class Fixed:
        def __init__(self, logits):
            self.logits = logits

        def __call__(self, x):
            return self.logits

    a, b = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 1.0]])
    T = 3.0
    ensemble = EnsembleTeacher([Fixed(a), Fixed(b)], [0.9, 0.6], T)
    out = ensemble.outputs(None, None, None)
    expected = 0.6 * torch.softmax(a / T, 1) + 0.4 * torch.softmax(b / T, 1)
    torch.testing.assert_close(torch.softmax(out / T, 1), expected)
