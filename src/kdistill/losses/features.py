"""Feature losses: student features first, teacher features second.

- ``MGDLoss``: Yang et al., "Masked Generative Distillation", arXiv 2205.01529; reference
  implementation yzd-v/MGD (Apache-2.0) and ModelOpt 0.47 ``losses.py`` (Apache-2.0). Unlike
  ModelOpt, the teacher feature is detached and the random mask takes an optional generator.
- ``HintLoss``: Romero et al., "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550.
- ``CosineLoss``: cosine distance of features (as in DistilBERT, Sanh et al., arXiv 1910.01108).
- ``AttentionTransferLoss``: Zagoruyko & Komodakis, "Paying More Attention to Attention",
  arXiv 1612.03928; reference code szagoruyko/attention-transfer (MIT).
- ``RKDLoss``: Park et al., "Relational Knowledge Distillation", arXiv 1904.05068; reference code
  lenscloth/RKD (MIT).
- ``PKTLoss``: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
  Transfer", arXiv 1803.10837; reference code passalis/probabilistic_kt (MIT).
- ``SimilarityPreservingLoss``: Tung & Mori, "Similarity-Preserving Knowledge Distillation",
  arXiv 1907.09682.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._recipes import LossRecipe, feature_inputs
from .._validation import (
    MAX_SCALE,
    check_int,
    check_non_negative,
    check_positive,
    check_unit_interval,
)
from ._divergences import forward_kl, upcast
from ._registry import register_loss

__all__ = [
    "AttentionTransferLoss",
    "CosineLoss",
    "HintLoss",
    "MGDLoss",
    "PKTLoss",
    "RKDLoss",
    "SimilarityPreservingLoss",
]


# AttentionTransferLoss raises |A|^p: above this power float32 overflows for |A| > ~250.
_MAX_ATTENTION_POWER = 16.0


def _check_bchw(feats: Tensor, role: str) -> None:
    if not isinstance(feats, Tensor) or feats.dim() != 4:
        shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise ValueError(f"MGDLoss expects {role} features of shape [B, C, H, W], got {shape}.")


@register_loss(
    "mgd",
    recipe=LossRecipe(
        lambda: MGDLoss(2, 3, lambda_mgd=0.5),
        feature_inputs(2, 2, 3, 3, teacher_shape=(2, 3, 3, 3)),
        kind="features",
        zero_when_equal=False,
        random=True,
    ),
)
class MGDLoss(nn.Module):
    """Masked generative distillation on ``[B, C, H, W]`` feature maps.

    The student map is aligned to the teacher's channels (1×1 conv when counts differ), a random
    spatial mask drops each pixel with probability ``lambda_mgd``, a generator block (3×3 conv,
    ReLU, 3×3 conv) reconstructs the teacher map from what is left, and the loss is
    ``alpha_mgd · mean((generated − teacher)²)`` over all elements. The align and generator layers
    are parameters of the loss, trained with the student and saved in ``_loss_modules``.

    Args:
        num_student_channels: C of the student map (an int >= 1).
        num_teacher_channels: C of the teacher map (an int >= 1).
        alpha_mgd: Weight of the loss, finite and >= 0.
        lambda_mgd: Probability of masking a pixel, in [0, 1].
        generator: Optional ``torch.Generator`` for reproducible masks.
    """

    def __init__(
        self,
        num_student_channels: int,
        num_teacher_channels: int,
        alpha_mgd: float = 1.0,
        lambda_mgd: float = 0.65,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        num_student_channels = check_int("num_student_channels", num_student_channels, min_value=1)
        num_teacher_channels = check_int("num_teacher_channels", num_teacher_channels, min_value=1)
        self.num_student_channels = num_student_channels
        self.num_teacher_channels = num_teacher_channels
        self.alpha_mgd = check_non_negative("alpha_mgd", alpha_mgd, max_value=MAX_SCALE)
        self.lambda_mgd = check_unit_interval("lambda_mgd", lambda_mgd)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator or None, got {type(generator).__name__}."
            )
        self.generator = generator
        self.align: nn.Module = (
            nn.Conv2d(num_student_channels, num_teacher_channels, kernel_size=1)
            if num_student_channels != num_teacher_channels
            else nn.Identity()
        )
        self.generation = nn.Sequential(
            nn.Conv2d(num_teacher_channels, num_teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_teacher_channels, num_teacher_channels, kernel_size=3, padding=1),
        )

    def get_config(self) -> dict:
        """Constructor arguments as JSON values (the generator is runtime state, not saved)."""
        return {
            "num_student_channels": self.num_student_channels,
            "num_teacher_channels": self.num_teacher_channels,
            "alpha_mgd": self.alpha_mgd,
            "lambda_mgd": self.lambda_mgd,
        }

    def keep_mask(self, batch: int, height: int, width: int, device: torch.device) -> Tensor:
        """Random ``[B, 1, H, W]`` mask, 1 where a pixel is kept (probability 1 − lambda_mgd)."""
        gen_device = self.generator.device if self.generator is not None else device
        noise = torch.rand((batch, 1, height, width), generator=self.generator, device=gen_device)
        return (noise <= 1 - self.lambda_mgd).to(device)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            student_feats: ``[B, C_s, H, W]``.
            teacher_feats: ``[B, C_t, H, W]``, same B, H, W; detached here.
        """
        _check_bchw(student_feats, "student")
        _check_bchw(teacher_feats, "teacher")
        teacher_feats = teacher_feats.detach()
        if student_feats.shape[1] != self.num_student_channels:
            raise ValueError(
                f"MGDLoss was built for {self.num_student_channels} student channels, got "
                f"features of shape {tuple(student_feats.shape)}."
            )
        if teacher_feats.shape[1] != self.num_teacher_channels:
            raise ValueError(
                f"MGDLoss was built for {self.num_teacher_channels} teacher channels, got "
                f"features of shape {tuple(teacher_feats.shape)}."
            )
        if student_feats.shape[0] != teacher_feats.shape[0] or (
            student_feats.shape[2:] != teacher_feats.shape[2:]
        ):
            raise ValueError(
                f"Student features {tuple(student_feats.shape)} and teacher features "
                f"{tuple(teacher_feats.shape)} differ in batch or spatial size."
            )
        batch, _, height, width = teacher_feats.shape
        aligned = self.align(student_feats)
        keep = self.keep_mask(batch, height, width, aligned.device).to(aligned.dtype)
        generated = self.generation(aligned * keep)
        # float32 math; float64 stays float64 (gradcheck)
        return self.alpha_mgd * F.mse_loss(upcast(generated), upcast(teacher_feats))


def _flatten_batch(feats: Tensor, role: str, loss_name: str) -> Tensor:
    """``[B, ...]`` -> float ``[B, D]`` (at least float32) for the relational losses."""
    if not isinstance(feats, Tensor):
        raise TypeError(
            f"{loss_name} expects {role} features as a Tensor, got {type(feats).__name__}."
        )
    if feats.dim() < 2 or feats.shape[0] < 2:
        raise ValueError(
            f"{loss_name} compares samples within a batch: {role} features must have shape "
            f"[B, ...] with B >= 2, got {tuple(feats.shape)}."
        )
    return upcast(feats.reshape(feats.shape[0], -1))


def _check_batch_pair(student: Tensor, teacher: Tensor, loss_name: str) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{loss_name}: student features {tuple(student.shape)} and teacher features "
            f"{tuple(teacher.shape)} have different batch sizes."
        )


def _feature_axis(feats: Tensor) -> int:
    """Channel axis 1 for ``[B, C, H, W]`` maps, else the last axis (``[..., D]``)."""
    return 1 if feats.dim() == 4 else -1


class _ProjectedFeatureLoss(nn.Module):
    """Optional learned projector from the student's feature size to the teacher's.

    The projector is an ``nn.Linear(student_dim, teacher_dim)`` applied along the feature axis:
    the last axis of ``[..., D]`` inputs, the channel axis of ``[B, C, H, W]`` maps, where it is
    exactly a 1×1 convolution. Its parameters belong to the loss, so a ``DistillationModel``
    trains them with the student and saves them under ``_loss_modules``.
    """

    _loss_name = ""

    def __init__(self, student_dim: int | None, teacher_dim: int | None) -> None:
        super().__init__()
        if (student_dim is None) != (teacher_dim is None):
            raise ValueError(
                f"{self._loss_name} needs both `student_dim` and `teacher_dim` for its projector "
                f"(or neither), got student_dim={student_dim!r}, teacher_dim={teacher_dim!r}."
            )
        if student_dim is not None:
            student_dim = check_int("student_dim", student_dim, min_value=1)
        if teacher_dim is not None:
            teacher_dim = check_int("teacher_dim", teacher_dim, min_value=1)
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.projector = (
            nn.Linear(student_dim, teacher_dim) if student_dim and teacher_dim else None
        )

    def _project(self, student_feats: Tensor, teacher_feats: Tensor) -> tuple[Tensor, Tensor]:
        """Check shapes, project the student, return both in float (at least float32)."""
        for role, feats in (("student", student_feats), ("teacher", teacher_feats)):
            if not isinstance(feats, Tensor) or feats.dim() < 1:
                got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
                raise ValueError(
                    f"{self._loss_name} expects {role} features [..., D] or [B, C, H, W], "
                    f"got {got}."
                )
        axis = _feature_axis(student_feats)
        if self.projector is not None:
            if student_feats.shape[axis] != self.student_dim:
                raise ValueError(
                    f"{self._loss_name} was built with student_dim={self.student_dim}, but the "
                    f"student features of shape {tuple(student_feats.shape)} have "
                    f"{student_feats.shape[axis]} features on axis {axis}."
                )
            # run the projector in its own dtype (a bf16 model has a bf16 projector)
            moved = student_feats.to(self.projector.weight.dtype).movedim(axis, -1)
            student_feats = self.projector(moved).movedim(-1, axis)
        if student_feats.shape != teacher_feats.shape:
            s_dim, t_dim = (
                student_feats.shape[axis],
                teacher_feats.shape[_feature_axis(teacher_feats)],
            )
            raise ValueError(
                f"{self._loss_name}: student features of shape {tuple(student_feats.shape)} and "
                f"teacher features of shape {tuple(teacher_feats.shape)} differ. If only the "
                f"feature size differs, add a projector: {self._loss_name}(student_dim={s_dim}, "
                f"teacher_dim={t_dim})."
            )
        return upcast(student_feats), upcast(teacher_feats)


@register_loss(
    "hint",
    recipe=LossRecipe(
        lambda: HintLoss(student_dim=2, teacher_dim=3),
        feature_inputs(2, 2, 3, 3, teacher_shape=(2, 3, 3, 3)),
        kind="features",
        zero_when_equal=False,
    ),
)
class HintLoss(_ProjectedFeatureLoss):
    """FitNets hint loss (Romero et al., ICLR 2015, arXiv 1412.6550): ``mean((r(s) − t)²)``.

    ``r`` is the learned regressor (projector) from the student's hint layer to the teacher's:
    ``nn.Linear(student_dim, teacher_dim)`` on the last axis of ``[..., D]`` features, a 1×1
    convolution over the channels of ``[B, C, H, W]`` maps; without dims it is the identity and
    the shapes must match. The squared error is averaged over every element (torch's
    ``mse_loss``), in float32; the teacher is detached. No masking.

    Args:
        student_dim: D (or C) of the student features; with ``teacher_dim``, adds the projector.
        teacher_dim: D (or C) of the teacher features.

    Example:
        >>> import torch
        >>> loss = HintLoss(student_dim=8, teacher_dim=16)
        >>> loss(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)).shape
        torch.Size([])
    """

    _loss_name = "HintLoss"

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__(student_dim, teacher_dim)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            student_feats: ``[..., D_s]`` or ``[B, C_s, H, W]``.
            teacher_feats: ``[..., D_t]`` or ``[B, C_t, H, W]``; detached here.
        """
        student, teacher = self._project(student_feats, teacher_feats.detach())
        return F.mse_loss(student, teacher)


@register_loss(
    "cosine", recipe=LossRecipe(lambda: CosineLoss(), feature_inputs(2, 3, 4), kind="features")
)
class CosineLoss(_ProjectedFeatureLoss):
    """``mean(1 − cos(r(s), t))``: cosine distance along the feature axis, averaged over positions.

    The feature axis is the last one of ``[..., D]`` inputs and the channel axis of
    ``[B, C, H, W]`` maps; every other position (sample, token, pixel) gives one cosine
    (``F.cosine_similarity``, eps 1e-8), in float32. Scale-free, so it matches directions only
    (e.g. hidden-state alignment in DistilBERT, Sanh et al., arXiv 1910.01108). ``r`` is an
    optional learned projector as in ``HintLoss``. Teacher detached; no masking.

    Args:
        student_dim: D (or C) of the student features; with ``teacher_dim``, adds the projector.
        teacher_dim: D (or C) of the teacher features.
    """

    _loss_name = "CosineLoss"

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__(student_dim, teacher_dim)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            student_feats: ``[..., D_s]`` or ``[B, C_s, H, W]``.
            teacher_feats: ``[..., D_t]`` or ``[B, C_t, H, W]``; detached here.
        """
        student, teacher = self._project(student_feats, teacher_feats.detach())
        cosine = F.cosine_similarity(student, teacher, dim=_feature_axis(student), eps=1e-8)
        return (1 - cosine).mean()


@register_loss(
    "attention_transfer",
    recipe=LossRecipe(lambda: AttentionTransferLoss(), feature_inputs(2, 3, 3, 3), kind="features"),
)
class AttentionTransferLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, arXiv 1612.03928).

    Each ``[B, C, H, W]`` map becomes a spatial attention vector
    ``a = normalize(mean_c |A_c|^p)`` of length H·W (L2-normalised per sample); the loss is
    ``mean((a_s − a_t)²)`` over the B·H·W entries, as in the authors' code
    (szagoruyko/attention-transfer, MIT). Channel counts may differ; batch and spatial sizes
    must match. Float32 math, teacher detached, no masking.

    Args:
        p: Exponent p of the attention map, > 0 and at most 16 (the paper uses 2; larger powers
            overflow float32 for activations above about 250).
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = check_positive("p", p, max_value=_MAX_ATTENTION_POWER)

    def attention(self, feats: Tensor) -> Tensor:
        """``[B, C, *spatial]`` -> L2-normalised attention ``[B, prod(spatial)]``."""
        attention = upcast(feats).abs().pow(self.p).mean(dim=1)
        return F.normalize(attention.reshape(feats.shape[0], -1), dim=1)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        """Compute the loss for ``[B, C_s, H, W]`` and ``[B, C_t, H, W]`` maps."""
        for role, feats in (("student", student_feats), ("teacher", teacher_feats)):
            if not isinstance(feats, Tensor) or feats.dim() < 3:
                got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
                raise ValueError(
                    f"AttentionTransferLoss expects {role} feature maps [B, C, H, W], got {got}."
                )
        if (student_feats.shape[0], *student_feats.shape[2:]) != (
            teacher_feats.shape[0],
            *teacher_feats.shape[2:],
        ):
            raise ValueError(
                f"AttentionTransferLoss: student maps {tuple(student_feats.shape)} and teacher "
                f"maps {tuple(teacher_feats.shape)} must share batch and spatial sizes (channels "
                "may differ); resize one side with F.interpolate."
            )
        student = self.attention(student_feats)
        teacher = self.attention(teacher_feats.detach())
        return (student - teacher).pow(2).mean()


def _pairwise_distances(feats: Tensor) -> Tensor:
    """Euclidean distances ``[B, B]`` of ``[B, D]`` rows, 0 on the diagonal, finite gradients."""
    batch = feats.shape[0]
    squared = (feats[:, None, :] - feats[None, :, :]).pow(2).sum(-1)  # [B, B]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=feats.device)
    # clamp before sqrt: the diagonal (and coincident points) would have an infinite gradient
    distances = squared.clamp(min=1e-12).sqrt()
    return torch.where(off_diagonal, distances, distances.new_zeros(()))


def _normalized_distances(feats: Tensor) -> Tensor:
    """Pairwise distances divided by their mean over the B·(B−1) off-diagonal pairs."""
    distances = _pairwise_distances(feats)
    batch = feats.shape[0]
    mean = distances.sum() / (batch * (batch - 1))
    return distances / mean.clamp(min=1e-12)


def _triplet_angles(feats: Tensor) -> Tensor:
    """``cos ∠(x_i, x_j, x_k) = <e_ji, e_jk>`` for all triplets ``[B, B, B]`` (0 if i or k = j)."""
    directions = F.normalize(feats[None, :, :] - feats[:, None, :], p=2, dim=2)  # [B, B, D]
    return torch.bmm(directions, directions.transpose(1, 2))


@register_loss("rkd", recipe=LossRecipe(lambda: RKDLoss(), feature_inputs(4, 3), kind="features"))
class RKDLoss(nn.Module):
    """Relational knowledge distillation (Park et al., CVPR 2019, arXiv 1904.05068).

    Features are flattened to ``[B, D]`` (student and teacher D may differ). Distance term: the
    pairwise Euclidean distances, each divided by the mean distance over the B·(B−1) pairs, are
    compared with the Huber loss (``smooth_l1``, δ = 1) averaged over the B² entries. Angle
    term: the cosines ``<e_ji, e_jk>`` of the unit difference vectors for all B³ triplets,
    compared the same way. Loss = ``distance_weight · distance + angle_weight · angle``, as in
    the authors' code (lenscloth/RKD, MIT). Float32 math, teacher detached, needs B >= 2.

    Args:
        distance_weight: Weight of the distance term, finite and >= 0 (paper: 25).
        angle_weight: Weight of the angle term, finite and >= 0 (paper: 50).
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = check_non_negative(
            "distance_weight", distance_weight, max_value=MAX_SCALE
        )
        self.angle_weight = check_non_negative("angle_weight", angle_weight, max_value=MAX_SCALE)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        """Compute the loss for ``[B, ...]`` student and teacher features."""
        student = _flatten_batch(student_feats, "student", "RKDLoss")
        teacher = _flatten_batch(teacher_feats.detach(), "teacher", "RKDLoss")
        _check_batch_pair(student_feats, teacher_feats, "RKDLoss")
        distance = F.smooth_l1_loss(_normalized_distances(student), _normalized_distances(teacher))
        angle = F.smooth_l1_loss(_triplet_angles(student), _triplet_angles(teacher))
        return self.distance_weight * distance + self.angle_weight * angle


def _cosine_conditional_log_probs(feats: Tensor, eps: float) -> Tensor:
    """PKT's ``log P(j | i)`` ``[B, B]`` from the cosine kernel ``(1 + cos)/2`` of ``[B, D]``."""
    unit = feats / (feats.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.T + 1) / 2 + eps  # [B, B], in (0, 1 + eps]
    return (kernel / kernel.sum(dim=1, keepdim=True)).log()


@register_loss("pkt", recipe=LossRecipe(lambda: PKTLoss(), feature_inputs(4, 3), kind="features"))
class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, arXiv 1803.10837).

    Features are flattened to ``[B, D]`` (dims may differ). Each side's cosine kernel
    ``K_ij = (1 + cos(x_i, x_j))/2 + eps`` is normalised per row into a conditional distribution
    ``P(j | i)``; the loss is ``Σ_i KL(P_T(· | i) ‖ P_S(· | i)) / B²``, the normalisation of the
    authors' code (passalis/probabilistic_kt, MIT), there written as a mean over the B² entries.
    Adding eps before normalising (the reference adds it inside the log) keeps each row an exact
    distribution, so the loss is ≥ 0. Float32 math, teacher detached, needs B >= 2.

    Args:
        eps: Smoothing of the norms and the kernel, > 0 and at most 1.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = check_positive("eps", eps, max_value=1.0)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        """Compute the loss for ``[B, ...]`` student and teacher features."""
        student = _flatten_batch(student_feats, "student", "PKTLoss")
        teacher = _flatten_batch(teacher_feats.detach(), "teacher", "PKTLoss")
        _check_batch_pair(student_feats, teacher_feats, "PKTLoss")
        kl = forward_kl(
            _cosine_conditional_log_probs(student, self.eps),
            _cosine_conditional_log_probs(teacher, self.eps),
        )
        return kl.sum() / student.shape[0] ** 2


@register_loss(
    "similarity_preserving",
    recipe=LossRecipe(lambda: SimilarityPreservingLoss(), feature_inputs(4, 3), kind="features"),
)
class SimilarityPreservingLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, arXiv 1907.09682).

    Features are flattened to ``Q`` ``[B, D]`` (dims may differ); the batch similarity
    ``G = Q·Qᵀ`` ``[B, B]`` is L2-normalised row by row and the loss is
    ``‖G̃_T − G̃_S‖_F² / B²``. The paper's weight γ is left to the balancer. Float32 math, teacher
    detached, needs B >= 2.
    """

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        """Compute the loss for ``[B, ...]`` student and teacher features."""
        student = _flatten_batch(student_feats, "student", "SimilarityPreservingLoss")
        teacher = _flatten_batch(teacher_feats.detach(), "teacher", "SimilarityPreservingLoss")
        _check_batch_pair(student_feats, teacher_feats, "SimilarityPreservingLoss")
        student_sim = F.normalize(student @ student.T, dim=1)
        teacher_sim = F.normalize(teacher @ teacher.T, dim=1)
        return (teacher_sim - student_sim).pow(2).sum() / student.shape[0] ** 2
