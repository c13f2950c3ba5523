"""The batch convention and how a teacher layer's output becomes the tensor a cache stores."""

from types import SimpleNamespace

import pytest
import torch

from kdistill.cache import TeacherCache
from kdistill.cache._batch import input_keys, layer_tensor, split_batch
from kdistill.losses._utils import extract_logits


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t,
        lambda t: (t, torch.zeros(1)),
        lambda t: [t],
        lambda t: {"logits": t, "hidden": torch.zeros(1)},
        lambda t: SimpleNamespace(logits=t, loss=None),  # like a Hugging Face ModelOutput
    ],
    ids=["tensor", "tuple", "list", "mapping", "object"],
)
def test_layer_outputs_are_unwrapped_like_the_logit_losses(make) -> None:
    logits = torch.randn(2, 5)
    assert layer_tensor(make(logits), "head") is logits
    assert layer_tensor(make(logits), "head") is extract_logits(make(logits), "teacher")


@pytest.mark.parametrize(
    ("output", "match"),
    [
        ("text", r"Cannot find teacher layer 'head' logits in an output of type str"),
        ({"logits": [1.0]}, r"Teacher layer 'head' returned a `logits` of type list"),
        ((), "Cannot find teacher layer 'head' logits"),
    ],
    ids=["str", "mapping-list", "empty-tuple"],
)
def test_layer_outputs_that_hold_no_tensor(output, match) -> None:
    with pytest.raises(TypeError, match=match):
        layer_tensor(output, "head")


class _DictTeacher(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.head(x), "features": x}


def test_a_cache_stores_the_logits_of_a_mapping_output(tmp_path) -> None:
    teacher, x = _DictTeacher(), torch.randn(5, 4)
    batches = [{"sample_id": torch.arange(5), "input": x, "labels": torch.zeros(5)}]
    cache = TeacherCache.build(teacher, batches, tmp_path, dtype=torch.float32, progress=False)
    with torch.no_grad():
        expected = teacher.head(x)
    assert torch.equal(cache.gather("", cache.locate(torch.arange(5)))[0], expected)


def test_split_batch_forms() -> None:
    ids, x = torch.arange(3), torch.randn(3, 2)
    for batch in ((ids, x), [ids, x, torch.zeros(3)], {"sample_id": [0, 1, 2], "input": x}):
        got_ids, got_x = split_batch(batch)
        assert got_ids.dtype == torch.int64 and torch.equal(got_ids, ids) and got_x is x
    assert input_keys(x) is None
    assert input_keys({"mask": x, "input_ids": x}) == ["input_ids", "mask"]
