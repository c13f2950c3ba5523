"""Running the teacher for a cache build: eval mode, hooks on the cached layers, shard fields."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..losses import TopKTeacher
from ._batch import layer_tensor

__all__ = ["TeacherRunner", "layer_fields"]


def layer_fields(
    name: str, output: Tensor, top_k: int | None, temperature: float, dtype: torch.dtype
) -> list[tuple[str, Tensor]]:
    """The shard fields of one layer for one batch (see ``_format``)."""
    if top_k is None:
        return [(f"{name}:values", output.detach().to(dtype))]
    if top_k > output.shape[-1]:
        raise ValueError(
            f"`top_k`={top_k} for layer {name!r} exceeds its {output.shape[-1]} classes; use "
            f"top_k <= {output.shape[-1]} or cache the full output (top_k=None)."
        )
    # The one truncation used by the sparse losses, so a cached and a live top-k teacher agree.
    sparse = TopKTeacher.from_logits(output.detach(), top_k, temperature)
    assert sparse.log_tail_mass is not None, "TopKTeacher.from_logits always sets the tail mass"
    return [
        (f"{name}:topk_log_probs", sparse.log_probs.to(dtype)),
        (f"{name}:topk_indices", sparse.indices.to(torch.int32)),
        (f"{name}:tail_log_mass", sparse.log_tail_mass.float()),
    ]


class TeacherRunner:
    """The teacher in eval mode with forward hooks on the cached layers (a context manager).

    On exit the hooks are removed and every submodule's own train/eval mode is restored.
    """

    def __init__(self, teacher: nn.Module, layers: list[dict[str, Any]], dtype: torch.dtype):
        self.teacher = teacher
        self.layers = layers
        self.dtype = dtype
        params = list(teacher.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.outputs: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._training = [(module, module.training) for module in teacher.modules()]

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            self.outputs[name] = output

        return record

    def __enter__(self) -> "TeacherRunner":
        self.teacher.eval()
        for layer in self.layers:
            if layer["name"]:
                module = self.teacher.get_submodule(layer["name"])
                self._handles.append(module.register_forward_hook(self._hook(layer["name"])))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for module, flag in self._training:
            module.training = flag

    def fields(self, inputs: Tensor | Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
        """Run the teacher on one batch; the shard fields of every layer (on the CPU)."""
        self.outputs.clear()
        with torch.no_grad():
            if isinstance(inputs, Tensor):
                self.outputs[""] = self.teacher(inputs.to(self.device))
            else:
                self.outputs[""] = self.teacher(**{k: v.to(self.device) for k, v in inputs.items()})
        fields = []
        for layer in self.layers:
            name = layer["name"]
            if name not in self.outputs:
                raise RuntimeError(
                    f"Teacher layer {name!r} was not called by the teacher's forward, so it has "
                    "no output to cache; choose layers that run (see `kdistill inspect`)."
                )
            tensor = layer_tensor(self.outputs[name], name).to("cpu")
            temperature = layer["temperature"] or 1.0
            fields += layer_fields(name, tensor, layer["top_k"], temperature, self.dtype)
        self.outputs.clear()
        return fields
