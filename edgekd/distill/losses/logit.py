"""Logit distillation losses (KD, DKD, DIST, LSKD) and the hard-label cross-entropy, registered by name.

They read the step's logits only (`StepOutputs.student_logits` / `teacher_logits`), so a teacher cache serves them;
the feature and relation losses, which need stage outputs, are in `feature.py`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.distill.losses._registry import StepOutputs, register_loss


@register_loss("ce", needs_teacher=False, multilabel=True)
class CrossEntropy(nn.Module):
    """The hard-label term; label smoothing comes from the student's training config. Images without a label (a
    `labels` variant's, target -1) are skipped: the mean is over the batch's labeled images, 0 when it has none.

    Multi-label data: binary cross-entropy of each class's sigmoid, summed over the classes and averaged over the
    images (the per-image scale of softmax cross-entropy and of the binary KD term beside it); label smoothing
    pulls each 0/1 target towards 1/2."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if self.multilabel:
            targets = out.targets.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
            logits = out.student_logits.float()
            return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / max(1, len(logits))
        loss = self._mean(out.student_logits, out.targets)
        if out.mixed_targets is None:
            return loss
        # mixup's and cutmix's loss: the two labels' cross-entropies weighted by their share of the image
        return out.mix_weight * loss + (1 - out.mix_weight) * self._mean(out.student_logits, out.mixed_targets)

    def _mean(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum",
                                label_smoothing=self.label_smoothing)
        return total / (targets >= 0).sum().clamp_min(1)


def kd_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: KL(p_t^T || p_s^T), batch mean, times T^2 so gradients keep their scale across T."""
    log_p_s = F.log_softmax(student.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def binary_kd_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-label KD: per class, KL(Bernoulli(sigmoid(t / T)) || Bernoulli(sigmoid(s / T))), summed over the classes,
    averaged over the batch, times T^2: the BinaryKL loss of mdistiller-based multi-label KD code
    (T^2 * (KL(p_t || p_s) + KL(1 - p_t || 1 - p_s)).sum() / N), in log-space here (logsigmoid) instead of clamping
    the probabilities at 1e-8, so a confident teacher's term stays exact."""
    s, t = student.float() / temperature, teacher.float() / temperature
    p_t = torch.sigmoid(t)
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum() / max(1, len(kl)) * temperature**2


@register_loss("kd", multilabel=True)
class VanillaKD(nn.Module):
    """Hinton's KD; on multi-label data its binary form per class (binary_kd_divergence)."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if self.multilabel:
            return binary_kd_divergence(out.student_logits, out.teacher_logits, self.temperature)
        return kd_divergence(out.student_logits, out.teacher_logits, self.temperature)


@register_loss("dkd")
class DecoupledKD(nn.Module):
    """DKD (Zhao et al., CVPR 2022): KD split into target-class (TCKD) and non-target-class (NCKD) terms.

    As mdistiller's `dkd_loss`: alpha * KL(b_t || b_s) + beta * KL(q_t || q_s), each summed over classes,
    divided by the batch size and times T^2; b is the binary (target, rest) distribution, q the distribution
    over the non-target classes. Every log-probability comes from log-sum-exp of the logits, never from the
    log of a probability: log b = log_softmax([z_y, logsumexp(z_{!=y})]), log q = log_softmax(z_{!=y}). So a
    confident student keeps its gradient at any logit margin (clamping p at 1e-12 zeroed it beyond ~27.6 T).
    Half-precision logits are computed in float32; float64 stays float64.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    @staticmethod
    def log_probs(z: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log binary (target, rest) probabilities [N, 2] and log non-target probabilities [N, K], 0 at the target.

        The target is masked to -inf (no boolean indexing, so no host sync on a GPU); its log q is then set to
        0, which makes its KL term exp(0) * (0 - 0) = 0 rather than 0 * (-inf - -inf) = nan, with no gradient.
        """
        rest = z.masked_fill(gt, float("-inf"))
        binary = torch.stack([(z * gt).sum(1), rest.logsumexp(1)], 1)
        return F.log_softmax(binary, 1), F.log_softmax(rest, 1).masked_fill(gt, 0.0)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        T = self.temperature
        dtype = torch.promote_types(out.student_logits.dtype, torch.float32)
        s, t = out.student_logits.to(dtype) / T, out.teacher_logits.to(dtype) / T
        # An unlabeled image (a `labels` variant) splits target from non-target at the teacher's class.
        target = torch.where(out.targets >= 0, out.targets, out.teacher_logits.argmax(1))
        gt = F.one_hot(target, s.shape[1]).bool()
        b_s, q_s = self.log_probs(s, gt)
        b_t, q_t = self.log_probs(t, gt)
        tckd = F.kl_div(b_s, b_t, reduction="batchmean", log_target=True) * T**2
        nckd = F.kl_div(q_s, q_t, reduction="batchmean", log_target=True) * T**2
        return self.alpha * tckd + self.beta * nckd


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return 1 - F.cosine_similarity(a, b, dim=dim, eps=1e-8).mean()


@register_loss("dist")
class DIST(nn.Module):
    """DIST (Huang et al., NeurIPS 2022): match the teacher's class ranking per sample (inter-class) and per class
    across the batch (intra-class) with Pearson correlation instead of exact probabilities."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, out: StepOutputs) -> torch.Tensor:
        T = self.temperature
        y_s = F.softmax(out.student_logits.float() / T, 1)
        y_t = F.softmax(out.teacher_logits.float() / T, 1)
        inter = _pearson_distance(y_s, y_t, dim=1) * T**2
        intra = _pearson_distance(y_s, y_t, dim=0) * T**2
        return self.beta * inter + self.gamma * intra


@register_loss("lskd")
class LogitStandardizedKD(nn.Module):
    """KD on z-scored logits (Sun et al., CVPR 2024): the student matches the teacher's logit *shape*, not its
    scale, so a small student is not forced to reproduce a large teacher's logit range."""

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        self.temperature = temperature

    @staticmethod
    def standardize(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        return kd_divergence(self.standardize(out.student_logits), self.standardize(out.teacher_logits),
                             self.temperature)
