"""CachedTeacher: interchangeable with the live teacher in convert / compute_kd_loss."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import kdistill as mtd
from kdistill.cache import CachedTeacher, TeacherCache, teacher_fingerprint
from kdistill.losses import TopKLogitsKLLoss, TopKTeacher
from kdistill.testing.models import TinyMLP

BATCH = 6  # as in conftest.py
FP16_RTOL = 2e-3  # float16 storage: teacher values carry a relative rounding error up to 2^-11


def _build(teacher, loader, path, **kwargs):
    return TeacherCache.build(teacher, loader, path, progress=False, **kwargs)


def _criterion():
    return {
        ("", ""): mtd.LogitsDistillationLoss(temperature=2.0),
        ("fc2", "fc2"): torch.nn.MSELoss(),
    }


def _convert(student, teacher, criterion):
    balancer = mtd.StaticLossBalancer([0.4, 0.3]) if len(criterion) == 2 else None
    return mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {"teacher_model": teacher, "criterion": criterion, "loss_balancer": balancer},
            )
        ],
    )


def _train(model, loader, steps, use_ids=None):
    """Run ``steps`` SGD steps; return the per-step loss dicts and the final student state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    batches = iter(loader)
    for _ in range(steps):
        ids, x, y = next(batches)
        if use_ids is not None:
            with use_ids.sample_ids(ids):
                out = model(x)
        else:
            out = model(x)
        losses = model.compute_kd_loss(student_loss=F.cross_entropy(out, y), skip_balancer=True)
        total = (
            model.loss_balancer(dict(losses)) if model.loss_balancer else losses[next(iter(losses))]
        )
        opt.zero_grad()
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        history.append(({k: v.detach() for k, v in losses.items()}, grads))
    return history, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("explicit_ids", [False, True], ids=["by-input", "by-id"])
def test_float32_cache_trains_exactly_like_the_live_teacher(
    tmp_path, teacher, student, loader, explicit_ids
) -> None:
    _build(teacher, loader, tmp_path, layers=["", "fc2"], dtype=torch.float32)
    cached = CachedTeacher(tmp_path, teacher=teacher)
    live_model = _convert(copy.deepcopy(student), teacher, _criterion())
    cached_model = _convert(copy.deepcopy(student), cached, _criterion())
    live, live_state = _train(live_model, loader, 3)
    replay, cached_state = _train(cached_model, loader, 3, cached if explicit_ids else None)
    for (live_losses, live_grads), (cached_losses, cached_grads) in zip(live, replay, strict=True):
        assert live_losses.keys() == cached_losses.keys() and len(live_losses) == 3
        for key in live_losses:
            assert torch.equal(live_losses[key], cached_losses[key]), key
        assert live_grads.keys() == cached_grads.keys()
        for key in live_grads:
            assert torch.equal(live_grads[key], cached_grads[key]), key
    for key in live_state:
        assert torch.equal(live_state[key], cached_state[key]), key


def test_float16_cache_trains_within_tolerance(tmp_path, teacher, student, loader) -> None:
    _build(teacher, loader, tmp_path, layers=["", "fc2"])  # float16 storage
    live_model = _convert(copy.deepcopy(student), teacher, _criterion())
    cached_model = _convert(copy.deepcopy(student), CachedTeacher(tmp_path), _criterion())
    live, _ = _train(live_model, loader, 2)
    replay, _ = _train(cached_model, loader, 2)
    for (live_losses, live_grads), (cached_losses, cached_grads) in zip(live, replay, strict=True):
        for key in live_losses:
            torch.testing.assert_close(
                cached_losses[key], live_losses[key], rtol=FP16_RTOL, atol=1e-5
            )
        for key in live_grads:
            torch.testing.assert_close(
                cached_grads[key], live_grads[key], rtol=FP16_RTOL, atol=1e-4
            )


@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
def test_topk_cache_equals_the_live_teacher_truncated(
    tmp_path, teacher, student, loader, temperature
) -> None:
    _build(teacher, loader, tmp_path, top_k=4, temperature=temperature, dtype=torch.float32)
    cached = CachedTeacher(tmp_path)
    crit = lambda: {("", ""): TopKLogitsKLLoss(k=4, temperature=temperature)}  # noqa: E731
    live, live_state = _train(_convert(copy.deepcopy(student), teacher, crit()), loader, 3)
    replay, cached_state = _train(_convert(copy.deepcopy(student), cached, crit()), loader, 3)
    for (live_losses, live_grads), (cached_losses, cached_grads) in zip(live, replay, strict=True):
        for key in live_losses:
            assert torch.equal(live_losses[key], cached_losses[key]), key
        for key in live_grads:
            assert torch.equal(live_grads[key], cached_grads[key]), key
    for key in live_state:
        assert torch.equal(live_state[key], cached_state[key]), key


def test_topk_cache_matches_a_float64_hand_formula(tmp_path, teacher, data, loader) -> None:
    _build(teacher, loader, tmp_path, top_k=3, dtype=torch.float32)
    x = data[1]
    student_logits = torch.randn(BATCH, 10, dtype=torch.float64)
    sparse = CachedTeacher(tmp_path)(x[:BATCH])
    assert isinstance(sparse, TopKTeacher) and sparse.indices.dtype == torch.int64
    loss = TopKLogitsKLLoss(k=3)(student_logits.float(), sparse)
    # reference: KL over the teacher's top-3 classes plus one bucket for the rest, in float64
    with torch.no_grad():
        p = torch.softmax(teacher(x[:BATCH]).double(), dim=-1)
    q = torch.softmax(student_logits, dim=-1)
    top = p.topk(3, dim=-1).indices
    p_k, q_k = p.gather(1, top), q.gather(1, top)
    p_r, q_r = 1 - p_k.sum(1), 1 - q_k.sum(1)
    per_sample = (p_k * (p_k.log() - q_k.log())).sum(1) + p_r * (p_r.log() - q_r.log())
    torch.testing.assert_close(loss, per_sample.mean().float())


def test_output_dtype_and_device(tmp_path, teacher, loader, data) -> None:
    _build(teacher, loader, tmp_path, layers=["", "fc2"])
    x = data[1][:BATCH]
    assert CachedTeacher(tmp_path)(x).dtype == torch.float32
    assert CachedTeacher(tmp_path, output_dtype=None)(x).dtype == torch.float16
    with pytest.raises(TypeError, match=r"`output_dtype` must be a torch\.dtype"):
        CachedTeacher(tmp_path, output_dtype="half")


def test_stale_teacher_is_refused(tmp_path, teacher, loader) -> None:
    _build(teacher, loader, tmp_path)
    CachedTeacher(tmp_path, teacher=teacher)
    CachedTeacher(tmp_path, teacher=teacher_fingerprint(teacher))
    updated = copy.deepcopy(teacher)
    with torch.no_grad():
        updated.head.weight.mul_(1.01)
    with pytest.raises(ValueError, match=r"stale: the teacher's weights differ .*overwrite=True"):
        CachedTeacher(tmp_path, teacher=updated)
    with pytest.raises(TypeError, match=r"nn\.Module or a fingerprint"):
        CachedTeacher(tmp_path, teacher=3)


def test_corrupt_shard_is_refused_before_use(tmp_path, teacher, loader, data) -> None:
    cache = _build(teacher, loader, tmp_path, shard_bytes=1)
    entry = cache.manifest["shards"][1]
    shard = tmp_path / entry["file"]
    raw = bytearray(shard.read_bytes())
    raw[entry["fields"][":values"]["offset"] + 3] ^= 0x40  # flip one bit of one cached value
    shard.write_bytes(bytes(raw))
    cached = CachedTeacher(tmp_path)  # sizes are fine; checksums are checked on first use
    x = data[1]
    cached(x[:BATCH])  # shard 0 is intact
    with pytest.raises(ValueError, match=r"shard-00001\.bin.*fails its SHA-256 checksum"):
        cached(x[BATCH : 2 * BATCH])
    with pytest.raises(ValueError, match="fails its SHA-256 checksum"):
        TeacherCache(tmp_path).verify()


def test_truncated_or_missing_shard_is_refused(tmp_path, teacher, loader) -> None:
    cache = _build(teacher, loader, tmp_path, shard_bytes=1)
    last = tmp_path / cache.manifest["shards"][-1]["file"]
    last.write_bytes(last.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        CachedTeacher(tmp_path)
    last.unlink()
    with pytest.raises(ValueError, match="missing"):
        CachedTeacher(tmp_path)


def test_incomplete_cache_is_refused(tmp_path, teacher, loader) -> None:
    calls = []

    def fail(module, args):
        calls.append(1)
        if len(calls) == 2:  # after the first shard (one batch) is written
            raise KeyboardInterrupt

    handle = teacher.register_forward_pre_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, loader, tmp_path, shard_bytes=1)
    handle.remove()
    with pytest.raises(RuntimeError, match=r"incomplete.*TeacherCache\.build again"):
        CachedTeacher(tmp_path)
    with pytest.raises(ValueError, match="No teacher cache"):
        CachedTeacher(tmp_path / "elsewhere")


def test_lookup_errors(tmp_path, teacher, loader, data) -> None:
    _build(teacher, loader, tmp_path)
    cached = CachedTeacher(tmp_path)
    ids, x, _ = data
    with pytest.raises(ValueError, match=r"1 of the 6 samples .*positions \[2\]\) are not in"):
        cached(x[:BATCH].index_fill(0, torch.tensor([2]), 0.0))
    with cached.sample_ids(ids[:BATCH]):
        with pytest.raises(ValueError, match="gave 6 ids but the batch has 5 samples"):
            cached(x[:5])
        with pytest.raises(ValueError, match=r"inputs of sample ids \[114\] differ"):
            cached(x[:BATCH].index_fill(0, torch.tensor([2]), 0.0))
    with cached.sample_ids([1, 2]), pytest.raises(ValueError, match=r"ids \[1, 2\] are not in"):
        cached(x[:2])
    with pytest.raises(TypeError, match="one input tensor"):
        cached(inputs=x[:2], other=x[:2])
    unchecked = CachedTeacher(tmp_path, verify_inputs=False)
    with unchecked.sample_ids(ids[:BATCH]):  # trusted ids: the inputs are not hashed
        assert torch.equal(unchecked(torch.zeros(BATCH, 16)), cached(x[:BATCH]))


def test_shuffled_batches_are_served_by_input(tmp_path, teacher, loader, data) -> None:
    _build(teacher, loader, tmp_path, dtype=torch.float32)
    cached = CachedTeacher(tmp_path)
    ids, x, _ = data
    order = torch.randperm(len(ids))
    by_input = cached(x[order])
    with cached.sample_ids(ids[order]):
        by_id = cached(x[order])
    assert torch.equal(by_input, by_id)
    full = torch.cat([cached(x[i : i + BATCH]) for i in range(0, len(ids), BATCH)])
    assert torch.equal(by_input, full[order])


class _Nested(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.block(x))


def test_dotted_layers_keep_their_names_and_hooks(tmp_path, student, loader) -> None:
    teacher = _Nested()
    _build(teacher, loader, tmp_path, layers=["block.0", "block", ""], dtype=torch.float32)
    cached = CachedTeacher(tmp_path)
    assert {"block", "block.0"} <= {n for n, _ in cached.named_modules()}
    criterion = {("fc1", "block.0"): torch.nn.MSELoss(), ("fc2", "block"): torch.nn.MSELoss()}
    balancer = mtd.StaticLossBalancer([0.5, 0.5])
    live = mtd.convert(
        copy.deepcopy(student),
        mode=[
            (
                "kd_loss",
                {"teacher_model": teacher, "criterion": dict(criterion), "loss_balancer": balancer},
            )
        ],
    )
    replay = mtd.convert(
        copy.deepcopy(student),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": cached,
                    "criterion": dict(criterion),
                    "loss_balancer": mtd.StaticLossBalancer([0.5, 0.5]),
                },
            )
        ],
    )
    _, x, _ = next(iter(loader))
    live(x)
    replay(x)
    expected = live.compute_kd_loss(skip_balancer=True)
    got = replay.compute_kd_loss(skip_balancer=True)
    for key in expected:
        assert torch.equal(expected[key], got[key])


def test_uncached_layer_is_unknown_to_convert(tmp_path, teacher, student, loader) -> None:
    _build(teacher, loader, tmp_path)
    with pytest.raises(ValueError, match="teacher layer 'fc2'"):
        mtd.convert(
            student,
            mode=[
                (
                    "kd_loss",
                    {
                        "teacher_model": CachedTeacher(tmp_path),
                        "criterion": {("fc2", "fc2"): torch.nn.MSELoss()},
                    },
                )
            ],
        )


def test_converted_model_pickles_and_deep_copies(tmp_path, teacher, student, loader, data) -> None:
    _build(teacher, loader, tmp_path, dtype=torch.float32)
    model = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": CachedTeacher(tmp_path),
                    "criterion": mtd.LogitsDistillationLoss(),
                },
            )
        ],
    )
    x = data[1][:BATCH]
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), model(x))
        assert torch.equal(clone.compute_kd_loss(), model.compute_kd_loss())
    assert torch.equal(
        model.teacher_model.cache.gather("", torch.tensor([0]))[0],
        copy.deepcopy(model).teacher_model.cache.gather("", torch.tensor([0]))[0],
    )


def test_keyword_inputs(tmp_path) -> None:
    class Teacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(11, 10)

        def forward(self, input_ids, attention_mask):
            return self.embed(input_ids) * attention_mask[..., None]

    teacher = Teacher()
    ids, mask = torch.randint(0, 11, (4, 3)), torch.ones(4, 3)
    batches = [{"sample_id": torch.arange(4), "input": {"input_ids": ids, "attention_mask": mask}}]
    _build(teacher, batches, tmp_path, dtype=torch.float32)
    cached = CachedTeacher(tmp_path)
    expected = teacher(ids, mask).detach()
    assert torch.equal(cached(input_ids=ids, attention_mask=mask, labels=ids), expected)
    assert torch.equal(cached({"input_ids": ids, "attention_mask": mask}), expected)
    with pytest.raises(ValueError, match=r"this call lacks \['attention_mask'\]"):
        cached(input_ids=ids)


def test_verify_checks_teacher_and_data(tmp_path, teacher, data) -> None:
    ids, x, y = data
    loader = DataLoader(TensorDataset(ids, x, y), batch_size=BATCH)
    cache = _build(teacher, loader, tmp_path)
    shuffled = DataLoader(TensorDataset(ids, x, y), batch_size=4, shuffle=True)
    cache.verify(teacher=teacher, dataloader=shuffled)  # any order and batch size
    changed = DataLoader(
        TensorDataset(ids, x.index_fill(0, torch.tensor([19]), 1.0)), batch_size=BATCH
    )
    with pytest.raises(ValueError, match=r"inputs of sample ids \[233\] differ"):
        cache.verify(dataloader=changed)
    with pytest.raises(ValueError, match="weights differ"):
        cache.verify(teacher=TinyMLP(16, 32, 10))
    with pytest.raises(ValueError, match=r"Layer 'fc1' is not cached; cached layers: \[''\]"):
        cache.layer_info("fc1")


def test_uncached_output_and_layerwise_are_refused(
    tmp_path, teacher, student, loader, data
) -> None:
    _build(teacher, loader, tmp_path, layers=["fc2"])
    x = data[1][:BATCH]
    model = mtd.convert(
        copy.deepcopy(student),
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": CachedTeacher(tmp_path),
                    "criterion": mtd.LogitsDistillationLoss(),
                },
            )
        ],
    )
    with pytest.raises(RuntimeError, match=r"teacher's output \(''\) is used.*\['fc2'\]"):
        model(x)
    layerwise = mtd.convert(
        copy.deepcopy(student),
        mode=[
            (
                "layerwise_kd",
                {
                    "teacher_model": CachedTeacher(tmp_path),
                    "criterion": {("fc2", "fc2"): torch.nn.MSELoss()},
                },
            )
        ],
    )
    with pytest.raises(RuntimeError, match="'fc2' of a CachedTeacher is used by 'layerwise_kd'"):
        layerwise(x)
    assert CachedTeacher(tmp_path)(x) is None  # no hooks: nothing to serve at the root


def test_uncached_parent_of_a_cached_layer_is_refused(tmp_path, student, loader) -> None:
    _build(_Nested(), loader, tmp_path, layers=["", "block.0"])
    model = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": CachedTeacher(tmp_path),
                    "criterion": {("fc2", "block"): torch.nn.MSELoss()},
                },
            )
        ],
    )
    with pytest.raises(RuntimeError, match=r"layer 'block' is used, but only layers inside it"):
        model(next(iter(loader))[1])
