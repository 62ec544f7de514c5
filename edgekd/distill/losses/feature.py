"""Feature and relation distillation: FitNet, attention transfer, cosine+MSE; RKD, PKT, similarity-preserving.

Feature terms compare one student stage with one teacher stage (timm `feature_info` index, -1 = last); those
with a learned adapter create it in `bind`, from the two models' channel counts. The adapter belongs to the loss,
not to the student, so it never reaches the exported model. Relation terms compare how samples of a batch relate
to each other, so they are invariant to any shared reordering of the batch.

This was `edgekd.distill.feature_losses`, which imported the module that imported it back to register its
losses; it now registers into the `_registry` leaf, as `logit.py` does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.distill.features import stage_info
from edgekd.distill.losses._registry import StepOutputs, register_loss
from edgekd.errors import EdgeKDError


def _match_size(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.adaptive_avg_pool2d(student, teacher.shape[-2:])
    return student


class _StagePair(nn.Module):
    def __init__(self, student_stage: int = -1, teacher_stage: int = -1):
        super().__init__()
        self.student_stage, self.teacher_stage = int(student_stage), int(teacher_stage)

    def pair(self, out: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        return out.student_features[self.student_stage].float(), out.teacher_features[self.teacher_stage].float()

    def embeddings(self, out: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage outputs pooled to one vector per sample (the penultimate embedding at stage -1)."""
        s, t = self.pair(out)
        pool = lambda f: f.mean(dim=(2, 3)) if f.ndim == 4 else f.flatten(1)  # noqa: E731
        return pool(s), pool(t)


class _Adapted(_StagePair):
    """Terms that map student channels to teacher channels with a learned 1x1 convolution (FitNet's regressor)."""

    def __init__(self, student_stage: int = -1, teacher_stage: int = -1):
        super().__init__(student_stage, teacher_stage)
        self.adapter: nn.Module | None = None  # made in bind(); an instance attribute, so nn.Module registers it

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        cs = stage_info(student, self.student_stage)["num_chs"]
        ct = stage_info(teacher, self.teacher_stage)["num_chs"]
        self.adapter = nn.Conv2d(cs, ct, kernel_size=1, bias=False)

    def adapted(self, out: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.pair(out)
        s = self.adapter(s) if self.adapter is not None else s
        return _match_size(s, t), t


@register_loss("fitnet", needs_features=True, multilabel=True)  # label-free
class FitNet(_Adapted):
    """Romero et al., ICLR 2015: regress the teacher's feature map through a 1x1 adapter (MSE)."""

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s, t = self.adapted(out)
        return F.mse_loss(s, t)


@register_loss("cosmse", needs_features=True, multilabel=True)  # label-free
class CosineMSE(_Adapted):
    """Direction (1 - cosine similarity per position) plus magnitude (MSE) of adapted features."""

    def __init__(self, student_stage: int = -1, teacher_stage: int = -1, mse_weight: float = 1.0):
        super().__init__(student_stage, teacher_stage)
        self.mse_weight = mse_weight

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        s, t = self.adapted(out)
        cosine = (1 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
        mse = F.mse_loss(s, t)
        return {"cosine": cosine, "mse": mse, "loss": cosine + self.mse_weight * mse}


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


AT_RESIZE = ("pool_larger", "upsample_student")


@register_loss("at", needs_features=True, multilabel=True)  # label-free
class AttentionTransfer(_StagePair):
    """Zagoruyko & Komodakis, ICLR 2017: match L2-normalised spatial attention maps (channel mean of |f|^p).

    Maps of different sizes are brought to one grid first. `resize = "pool_larger"` (the default) follows the
    reference codes (RepDistiller's `distiller_zoo/AT.py`, mdistiller's `single_stage_at_loss`): the larger
    feature map is average-pooled (`adaptive_avg_pool2d`) to the smaller one's grid before its attention map
    is taken, e.g. a 4x4 teacher map to a 2x2 student's. The references compare heights and pool to a square;
    here each side goes to the smaller of the two. `resize = "upsample_student"` is edgekd's behaviour before
    issue 14: the student's map goes to the teacher's grid, replicated when smaller (pooled when larger).
    """

    def __init__(self, student_stage: int = -1, teacher_stage: int = -1, p: float = 2.0,
                 resize: str = "pool_larger"):
        super().__init__(student_stage, teacher_stage)
        if resize not in AT_RESIZE:
            raise EdgeKDError(f"at: resize is {resize!r}: use one of {', '.join(AT_RESIZE)}")
        self.p, self.resize = p, resize

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s, t = self.pair(out)
        grid = tuple(min(a, b) for a, b in zip(s.shape[-2:], t.shape[-2:], strict=True))
        if grid == (1, 1):
            # A 1x1 map normalises to 1 whatever the student computes: no gradient, and the run is scratch.
            # So does a 1x1 map replicated to the teacher's grid, and a map pooled to a 1x1 one's grid.
            sizes = ["x".join(map(str, f.shape[-2:])) for f in (s, t)]
            raise EdgeKDError(f"at: student stage {self.student_stage} is {sizes[0]} and teacher stage "
                              f"{self.teacher_stage} {sizes[1]}, so their attention maps meet 1x1 at this "
                              "input size and attention transfer has nothing to match; choose an earlier "
                              "stage, e.g. at = { student_stage = -2, teacher_stage = -2 }")
        if self.resize == "upsample_student":
            s = _match_size(s, t)
        else:
            s, t = (F.adaptive_avg_pool2d(f, grid) if f.shape[-2:] != grid else f for f in (s, t))
        return (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    d = (e.unsqueeze(1) - e.unsqueeze(0)).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device))


@register_loss("rkd", needs_features=True, multilabel=True)  # label-free
class RelationalKD(_StagePair):
    """Park et al., CVPR 2019: match pairwise distances (normalised by their mean) and triplet angles."""

    def __init__(self, student_stage: int = -1, teacher_stage: int = -1, distance_weight: float = 1.0,
                 angle_weight: float = 2.0):
        super().__init__(student_stage, teacher_stage)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    @staticmethod
    def distance_term(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ds, dt = _pairwise_distances(s), _pairwise_distances(t)
        ds = ds / ds[ds > 0].mean()
        dt = dt / dt[dt > 0].mean()
        return F.smooth_l1_loss(ds, dt)

    @staticmethod
    def angle_term(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        def angles(e):
            diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = e_j - e_i, unit
            return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # cos of angle j-i-k

        return F.smooth_l1_loss(angles(s), angles(t))

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        s, t = self.embeddings(out)
        distance, angle = self.distance_term(s, t), self.angle_term(s, t)
        return {"distance": distance, "angle": angle,
                "loss": self.distance_weight * distance + self.angle_weight * angle}


@register_loss("pkt", needs_features=True, multilabel=True)  # label-free
class ProbabilisticKT(_StagePair):
    """Passalis & Tefas, ECCV 2018: match the conditional probabilities that cosine similarities between the
    batch's samples define (KL, teacher to student)."""

    @staticmethod
    def conditional(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, dim=1)
        sim = (e @ e.t() + 1) / 2
        return sim / sim.sum(1, keepdim=True)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s, t = self.embeddings(out)
        ps, pt = self.conditional(s), self.conditional(t)
        eps = 1e-7
        return (pt * torch.log((pt + eps) / (ps + eps))).sum(1).mean()


@register_loss("sp", needs_features=True, multilabel=True)  # label-free
class SimilarityPreserving(_StagePair):
    """Tung & Mori, ICCV 2019: the batch's row-normalised Gram matrices of stage activations should agree."""

    @staticmethod
    def gram(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)
        return F.normalize(f @ f.t(), p=2, dim=1)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s, t = self.pair(out)
        b = len(s)
        return (self.gram(s) - self.gram(t)).pow(2).sum() / b**2
