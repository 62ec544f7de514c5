"""Batch mixing (mixup, cutmix) and online teaching: the formulas against their references, and a KD student's
teacher running on the student's very mixed batch (a teacher cache holds no mixed images)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import TINY_PROFILE

from edgekd.data.augment import mix_batch
from edgekd.distill.losses import LOSSES
from edgekd.distill.losses._registry import StepOutputs


def test_mixup_is_the_convex_combination_with_the_partner_and_replays():
    x = torch.randn(8, 1, 6, 6)
    mixed, partner, lam = mix_batch(x, "mixup", 0.4, seed=3)
    assert 0 < lam < 1 and sorted(partner.tolist()) == list(range(8))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])
    again, partner2, lam2 = mix_batch(x, "mixup", 0.4, seed=3)  # a resumed run draws the same
    assert lam2 == lam and torch.equal(partner2, partner) and torch.equal(again, mixed)


def test_cutmix_pastes_one_box_of_the_partner_and_lam_is_the_share_left():
    x = torch.arange(8 * 10 * 10, dtype=torch.float32).reshape(8, 1, 10, 10)
    for seed in range(20):
        mixed, partner, lam = mix_batch(x, "cutmix", 1.0, seed=seed)
        own = (mixed == x).float().mean(dim=(1, 2, 3))  # pixels are all distinct: own pixels are where it equals x
        from_partner = (mixed == x[partner]).float().mean(dim=(1, 2, 3))
        moved = partner != torch.arange(8)
        assert torch.allclose(own[moved], torch.full_like(own[moved], lam))
        assert torch.allclose(from_partner[moved], torch.full_like(own[moved], 1 - lam))


def test_cross_entropy_of_a_mixed_batch_weighs_both_labels():
    logits, a, b = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 2, 1, 0, 1, 0])
    ce = LOSSES.get("ce")()
    got = ce(StepOutputs(logits, a, mixed_targets=b, mix_weight=0.3))
    assert torch.allclose(got, 0.3 * F.cross_entropy(logits, a) + 0.7 * F.cross_entropy(logits, b))
    assert torch.allclose(ce(StepOutputs(logits, a)), F.cross_entropy(logits, a))


def test_online_teacher_sees_the_students_exact_mixed_batch(tmp_path, monkeypatch):
    import edgekd.distill.train as train
    from edgekd.config import load_profile
    from edgekd.distill.teacher import LiveTeacher
    from edgekd.workflows import distill

    mixed_batches, teacher_batches = [], []
    original_mix, original_outputs = train.mix_batch, LiveTeacher.outputs

    def recording_mix(*args, **kwargs):
        out = original_mix(*args, **kwargs)
        mixed_batches.append(out[0].detach().clone())
        return out

    def recording_outputs(self, idx, views, x):
        teacher_batches.append(x.detach().clone())
        return original_outputs(self, idx, views, x)

    monkeypatch.setattr(train, "mix_batch", recording_mix)
    monkeypatch.setattr(LiveTeacher, "outputs", recording_outputs)
    profile = tmp_path / "p.toml"
    profile.write_text(TINY_PROFILE.replace("seeds = [0, 1]", "seeds = [0]\nteacher_cache = false")
                       .replace('optimizer = "adamw"', 'optimizer = "adamw"\nmix = "cutmix"'))
    distill(load_profile(profile), tmp_path / "runs")
    assert teacher_batches and len(teacher_batches) <= len(mixed_batches)  # scratch mixes too, with no teacher
    kd = mixed_batches[-len(teacher_batches):]  # the KD student's steps, in order
    assert all(torch.equal(t, m) for t, m in zip(teacher_batches, kd, strict=True))


def test_mixing_with_a_teacher_cache_or_dkd_is_refused(tmp_path):
    from edgekd.check import check_profile

    profile = tmp_path / "p.toml"
    profile.write_text(TINY_PROFILE.replace('optimizer = "adamw"', 'optimizer = "adamw"\nmix = "mixup"')
                       + "\n[methods.dkd]\ndkd = { weight = 1.0 }\n")
    problems = check_profile(profile).problems
    assert any("mixes images no teacher cache has outputs for" in p and "teacher_cache = false" in p for p in problems)
    assert any("dkd splits KD by the image's labelled class" in p for p in problems)
