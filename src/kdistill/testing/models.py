"""Tiny models for tests, examples and benchmarks (no torchvision)."""

import torch
from torch import Tensor, nn

__all__ = ["TinyCNN", "TinyMLP", "tiny_cnn", "tiny_mlp"]


class TinyMLP(nn.Module):
    """A ``D -> hidden -> hidden -> C`` ReLU MLP with layers ``fc1``, ``fc2``, ``head``.

    Args:
        in_features: D of the input ``[B, D]``.
        hidden: Width of both hidden layers.
        num_classes: C of the output logits ``[B, C]``.
        dropout: Dropout probability after each hidden layer (0 disables).
    """

    def __init__(
        self, in_features: int = 16, hidden: int = 32, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` ``[B, D]`` to logits ``[B, C]``."""
        x = self.dropout(torch.relu(self.fc1(x)))
        x = self.dropout(torch.relu(self.fc2(x)))
        return self.head(x)


class TinyCNN(nn.Module):
    """Two 3×3 conv blocks and a linear head; feature layers ``conv1``, ``conv2``, head ``head``.

    Args:
        in_channels: C of the input ``[B, C, H, W]``.
        channels: Channels of both conv layers (``conv2`` outputs ``[B, channels, H, W]``).
        num_classes: Number of output logits.
    """

    def __init__(self, in_channels: int = 1, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` ``[B, C, H, W]`` to logits ``[B, num_classes]``."""
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def tiny_mlp(in_features: int = 16, hidden: int = 32, num_classes: int = 10) -> TinyMLP:
    """Factory for ``TinyMLP`` (importable by name, so usable as a saved teacher factory)."""
    return TinyMLP(in_features, hidden, num_classes)


def tiny_cnn(in_channels: int = 1, channels: int = 8, num_classes: int = 10) -> TinyCNN:
    """Factory for ``TinyCNN``."""
    return TinyCNN(in_channels, channels, num_classes)
