"""Feature-map losses: masked generative distillation.

- ``MGDLoss``: Yang et al., "Masked Generative Distillation", arXiv 2205.01529; reference
  implementation yzd-v/MGD (Apache-2.0) and ModelOpt 0.47 ``losses.py`` (Apache-2.0). Unlike
  ModelOpt, the teacher feature is detached and the random mask takes an optional generator.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_loss

__all__ = ["MGDLoss"]


def _check_bchw(feats: Tensor, role: str) -> None:
    if not isinstance(feats, Tensor) or feats.dim() != 4:
        shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise ValueError(f"MGDLoss expects {role} features of shape [B, C, H, W], got {shape}.")


class MGDLoss(nn.Module):
    """Masked generative distillation on ``[B, C, H, W]`` feature maps.

    The student map is aligned to the teacher's channels (1×1 conv when counts differ), a random
    spatial mask drops each pixel with probability ``lambda_mgd``, a generator block (3×3 conv,
    ReLU, 3×3 conv) reconstructs the teacher map from what is left, and the loss is
    ``alpha_mgd · mean((generated − teacher)²)`` over all elements. The align and generator layers
    are parameters of the loss, trained with the student and saved in ``_loss_modules``.

    Args:
        num_student_channels: C of the student map.
        num_teacher_channels: C of the teacher map.
        alpha_mgd: Weight of the loss.
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
        for name, value in (
            ("num_student_channels", num_student_channels),
            ("num_teacher_channels", num_teacher_channels),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if not 0 <= lambda_mgd <= 1:
            raise ValueError(f"`lambda_mgd` must be in [0, 1], got {lambda_mgd!r}.")
        self.num_student_channels = num_student_channels
        self.num_teacher_channels = num_teacher_channels
        self.alpha_mgd = float(alpha_mgd)
        self.lambda_mgd = float(lambda_mgd)
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
        return self.alpha_mgd * F.mse_loss(generated.float(), teacher_feats.float())


register_loss("mgd", MGDLoss)
