"""``CachedTeacher``: a stand-in teacher module that replays a ``TeacherCache``.

It is an ``nn.Module`` used as ``teacher_model`` in ``kdistill.convert``, so the criterion dict
written for the live teacher works unchanged: every cached layer ``L`` is a child module at the
same dotted path, called by ``CachedTeacher.forward`` with its cached output, so forward hooks on it
(the ones ``DistillationModel`` registers) see exactly what the live layer would have produced.

How a batch finds its cached rows. ``DistillationModel.forward`` calls the teacher with the very
inputs the student gets, so by default the cached teacher hashes each sample's inputs (as the build
did) and looks the hash up: the training loop does not change. To name the samples explicitly
(faster with ``verify_inputs=False``, and errors then name the sample ids), wrap the forward in
``with cached_teacher.sample_ids(ids): ...``.
"""

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..losses import TopKTeacher
from ..model import KD_USE_INPUTS
from ._format import sample_input_hashes
from .store import TeacherCache

__all__ = ["CachedTeacher"]


class _CachedLayer(nn.Module):
    """Stands in for one cached teacher layer: returns the cached output it is called with."""

    def forward(self, cached_output: Any) -> Any:
        """Return ``cached_output`` (forward hooks on this module see it as the layer output)."""
        return cached_output


class _Node(nn.Module):
    """An intermediate module of a dotted layer path (e.g. ``encoder`` in ``encoder.fc``)."""

    def forward(self, *args: Any) -> Any:
        """Not callable: only the cached leaves are."""
        raise RuntimeError("This part of a CachedTeacher holds cached layers; it is not callable.")


class CachedTeacher(nn.Module):
    """A teacher that returns cached outputs instead of running a model.

    Use it as ``teacher_model`` in ``kdistill.convert`` with the same criterion as for the live
    teacher: the teacher's output (layer ``""``) is returned by ``forward``, and every other cached
    layer is a child module at the same dotted path whose forward hooks fire with the cached value.
    Full layers come back as tensors ``[B, *sample_shape]`` (cast to ``output_dtype``), top-k
    layers as a ``kdistill.TopKTeacher`` (the input of ``TopKLogitsKLLoss``). A layer that was
    not cached is unknown to ``convert``, which then lists the cached ones. Outputs are placed on
    the device of the inputs. ``layerwise_kd``, which needs teacher layer *inputs*, is refused.

    Samples are found by hashing their inputs (see ``sample_input_hashes``), or by the ids given
    with ``sample_ids(ids)``; with ids and ``verify_inputs`` (the default), the inputs' hashes
    must match those recorded at build time, so a dataset that changed is refused.

    A cache of several named teachers (``TeacherCache.build({"big": ..., "expert": ...}, ...)``)
    stands in for all of them: its layers ``"big"``, ``"expert.fc"`` are children at those
    paths, ``kd_teacher_names`` lists the teachers (so ``convert`` checks the criterion as for
    several live teachers), and the criterion written for the live teachers, tuple teacher sides
    included, gives the same losses.

    Args:
        path: Cache directory (or an opened ``TeacherCache``).
        teacher: Optional live teacher (or its fingerprint string): the cache must have been
            built from exactly these weights, else ``ValueError`` (stale cache). For a cache of
            several teachers, a dict ``{name: module}`` of all or some of them, each checked
            against its own fingerprint.
        verify_inputs: With explicit sample ids, check each sample's input hash as well.
        output_dtype: dtype of returned values (top-k log-probs included); ``None`` keeps the
            storage dtype. Defaults to float32, what a float32 teacher returns.

    Raises:
        ValueError: Stale cache (``teacher`` differs), missing / truncated shard, bad format.
        RuntimeError: The cache is incomplete (its build was interrupted).

    Example:
        >>> import tempfile, torch, kdistill as mtd
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> teacher, x = torch.nn.Linear(4, 3), torch.randn(8, 4)
        >>> loader = DataLoader(TensorDataset(torch.arange(8), x), batch_size=4)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = mtd.TeacherCache.build(
        ...     teacher, loader, tmp.name, dtype=torch.float32, progress=False)
        >>> cached = mtd.CachedTeacher(tmp.name, teacher=teacher)
        >>> torch.equal(cached(x[4:8]), teacher(x[4:8]).detach())  # batch 2 of the build
        True
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        path: str | Path | TeacherCache,
        *,
        teacher: nn.Module | str | Mapping[str, nn.Module] | None = None,
        verify_inputs: bool = True,
        output_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        cache = path if isinstance(path, TeacherCache) else TeacherCache(path)
        if teacher is not None:
            cache.check_teacher(teacher)
        if output_dtype is not None and not isinstance(output_dtype, torch.dtype):
            raise TypeError(f"`output_dtype` must be a torch.dtype or None, got {output_dtype!r}.")
        self.cache = cache
        self.verify_inputs = bool(verify_inputs)
        self.output_dtype = output_dtype
        self._pending_ids: Tensor | None = None
        self._kd_uses: dict[str, frozenset[str]] = {}
        for layer in sorted(cache.layers, key=lambda name: name.count(".")):  # parents first
            if layer:
                self._add_layer(layer)

    def _add_layer(self, layer: str) -> None:
        """Add a ``_CachedLayer`` at the dotted path ``layer``, with ``_Node`` parents."""
        parent: nn.Module = self
        *parents, leaf = layer.split(".")
        for part in parents:
            child = dict(parent.named_children()).get(part)
            if child is None:
                self._check_free(parent, part, layer)
                child = _Node()
                parent.add_module(part, child)
            parent = child  # a _Node, or a cached parent layer
        self._check_free(parent, leaf, layer)
        parent.add_module(leaf, _CachedLayer())

    def _check_free(self, parent: nn.Module, name: str, layer: str) -> None:
        if name in dict(parent.named_children()) or hasattr(parent, name):
            raise ValueError(
                f"Cached layer name {layer!r} of the cache at {str(self.cache.path)!r} clashes "
                f"with an attribute of CachedTeacher ({name!r}); rename the teacher module or "
                "cache its parent layer instead."
            )

    @property
    def kd_teacher_names(self) -> tuple[str, ...] | None:
        """The cached teachers' names (teacher protocol; ``None`` for a one-teacher cache)."""
        return self.cache.teacher_names

    def extra_repr(self) -> str:
        """Show the cache path and size."""
        return f"path={str(self.cache.path)!r}, num_samples={self.cache.num_samples}"

    @contextlib.contextmanager
    def sample_ids(self, ids: Tensor | list[int]) -> Iterator[None]:
        """Within the context, forward calls serve the samples with these ids (``[B]``, in order).

        Example: ``with cached.sample_ids(ids): out = model(x)``.
        """
        previous = self._pending_ids
        self._pending_ids = torch.as_tensor(ids).to("cpu", torch.int64).flatten()
        try:
            yield
        finally:
            self._pending_ids = previous

    def _teacher_inputs(self, args: tuple, kwargs: dict) -> Tensor | Mapping[str, Tensor]:
        """Pick the inputs the cache was keyed on from the call arguments."""
        keys = self.cache.input_keys
        if keys is None:
            candidates = [a for a in args[:1] if isinstance(a, Tensor)]
            if not candidates and not args and len(kwargs) == 1:
                candidates = [v for v in kwargs.values() if isinstance(v, Tensor)]
            if not candidates:
                raise TypeError(
                    "The cache was built with one input tensor (teacher(inputs)); call the model "
                    "with that tensor as its first argument."
                )
            return candidates[0]
        source = args[0] if args and isinstance(args[0], Mapping) else kwargs
        missing = [key for key in keys if key not in source]
        if missing:
            raise ValueError(
                f"The cache was built with keyword inputs {keys}; this call lacks {missing}."
            )
        return {key: source[key] for key in keys}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Return the cached teacher output for this batch (``None`` if ``""`` was not cached).

        Args:
            *args: The inputs the student gets (the teacher's inputs at build time).
            **kwargs: Likewise.

        Raises:
            ValueError: Samples that are not cached, or whose inputs changed since the build.
        """
        self._check_hooks()
        inputs = self._teacher_inputs(args, kwargs)
        first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
        device, batch_size = first.device, first.shape[0]
        ids = self._pending_ids
        if ids is None:
            rows = self.cache.locate_inputs(sample_input_hashes(inputs, self.cache.input_keys))
        else:
            if len(ids) != batch_size:
                raise ValueError(
                    f"sample_ids() gave {len(ids)} ids but the batch has {batch_size} samples."
                )
            rows = self.cache.locate(ids)
            if self.verify_inputs:
                self.cache.check_samples(ids, sample_input_hashes(inputs, self.cache.input_keys))
        output = None
        for layer in self.cache.layers:
            value = self._load(layer, rows, device)
            if layer:
                self.get_submodule(layer)(value)  # fires the hooks registered on that layer
            else:
                output = value
        return output

    def set_kd_uses_(self, uses: Mapping[str, frozenset[str]] | None) -> None:
        """Record what a ``DistillationModel`` reads from this teacher (its teacher protocol).

        ``convert`` calls it with ``{layer: {"output"} or {"output", "inputs"}}``, ``export``
        with ``None``; ``forward`` then refuses the uses a cache cannot serve.
        """
        self._kd_uses = dict(uses or {})

    def _check_hooks(self) -> None:
        """Refuse uses a cache cannot serve, instead of feeding the hooks wrong values."""
        if "" not in self.cache.layers and "" in self._kd_uses:
            raise RuntimeError(
                "The teacher's output ('') is used (e.g. by a criterion pair with teacher layer "
                f"''), but the cache holds only layers {self.cache.layers}. Rebuild it with "
                "layers=['', ...], or pair the loss with a cached layer."
            )
        for name, module in self.named_modules():
            uses = self._kd_uses.get(name, frozenset()) if name else frozenset()
            if isinstance(module, _Node) and uses:
                raise RuntimeError(
                    f"Teacher layer {name!r} is used, but only layers inside it are cached "
                    f"({self.cache.layers}). Rebuild the cache with {name!r} in `layers`."
                )
            if isinstance(module, _CachedLayer) and KD_USE_INPUTS in uses:
                raise RuntimeError(
                    f"Layer {name!r} of a CachedTeacher is used by 'layerwise_kd', which feeds "
                    "the teacher layer's inputs to the student; a cache holds layer outputs only. "
                    "Use 'kd_loss' with a cached teacher, or a live teacher for 'layerwise_kd'."
                )

    def _load(self, layer: str, rows: Tensor, device: torch.device) -> Tensor | TopKTeacher:
        fields = self.cache.gather(layer, rows)
        dtype = self.output_dtype
        if len(fields) == 1:
            return fields[0].to(device=device, dtype=dtype or fields[0].dtype)
        log_probs, indices, tail = fields
        return TopKTeacher(
            log_probs.to(device=device, dtype=dtype or log_probs.dtype),
            indices.to(device=device, dtype=torch.int64),
            tail.to(device=device),
            self.cache.layer_info(layer)["temperature"],
        )
