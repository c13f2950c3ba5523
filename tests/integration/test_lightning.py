"""``kdistill.lightning.distill`` / ``KDModule`` with a real ``lightning.Trainer`` on CPU."""

import copy
import doctest

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

import kdistill as mtd  # noqa: E402
from kdistill.lightning import KDModule, distill  # noqa: E402
from kdistill.testing.models import TinyMLP  # noqa: E402

pytestmark = pytest.mark.integration

TEMPERATURE, KD_WEIGHT, LR, STEPS = 2.0, 0.75, 0.5, 4


class Classifier(L.LightningModule):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyMLP(hidden=hidden)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_ce", loss)  # the module's own logging keeps working
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_ce", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def make_loader(seed: int = 0) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x, y = (
        torch.randn(4 * STEPS, 16, generator=gen),
        torch.randint(0, 10, (4 * STEPS,), generator=gen),
    )
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def make_trainer(tmp_path, **kwargs) -> "L.Trainer":
    options = {
        "accelerator": "cpu",
        "max_steps": STEPS,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def hand_kd(student_logits, teacher_logits) -> torch.Tensor:
    """T² · mean over samples of Σ p_t (log p_t − log p_s), written out."""
    log_p_s = (student_logits / TEMPERATURE).log_softmax(-1)
    log_p_t = (teacher_logits / TEMPERATURE).log_softmax(-1)
    return TEMPERATURE**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


def distilled(teacher) -> KDModule:
    return distill(
        Classifier(),
        student="net",
        teacher_model=teacher,
        criterion=mtd.LogitsDistillationLoss(temperature=TEMPERATURE),
        loss_balancer=mtd.StaticLossBalancer(kd_loss_weight=KD_WEIGHT),
    )


def test_fit_matches_a_plain_pytorch_kd_loop_and_checkpoints_exclude_teacher(tmp_path):
    teacher = TinyMLP(hidden=64)
    teacher_start = copy.deepcopy(teacher.state_dict())
    module = distilled(teacher)
    start = copy.deepcopy(module.net.state_dict())
    teacher_calls = []
    teacher.register_forward_hook(lambda *_: teacher_calls.append(1))

    trainer = make_trainer(tmp_path, limit_val_batches=2, val_check_interval=STEPS)
    trainer.fit(module, make_loader(), make_loader(seed=1))
    # the teacher ran once per training step, never in the validation run
    assert len(teacher_calls) == STEPS

    # the same steps written by hand: SGD on 0.75 · KD + 0.25 · CE
    reference = TinyMLP()
    reference.load_state_dict(start)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for x, y in make_loader():
        logits = reference(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        kd, ce = hand_kd(logits, teacher_logits), F.cross_entropy(logits, y)
        loss = KD_WEIGHT * kd + (1 - KD_WEIGHT) * ce
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # after fit the module holds the plain, trained student (and no teacher)
    assert type(module.net) is TinyMLP
    assert sum(p.numel() for p in module.parameters()) == sum(
        p.numel() for p in Classifier().parameters()
    )
    torch.testing.assert_close(module.net.state_dict(), reference.state_dict())

    # components logged with self.log (the last step's values); the module's own log too
    metrics = trainer.callback_metrics
    assert {"kd_loss", "student_loss", "total_loss", "LogitsDistillationLoss_0", "train_ce"} <= set(
        metrics
    )
    torch.testing.assert_close(
        metrics["total_loss"],
        KD_WEIGHT * metrics["kd_loss"] + (1 - KD_WEIGHT) * metrics["student_loss"],
    )
    assert "val_ce" in metrics

    # frozen, unchanged, never in the optimizer
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_start.items())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}

    # checkpoints: no teacher; load into the plain class and into a distilled module
    path = tmp_path / "kd.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert set(state) == {f"net.{k}" for k in TinyMLP().state_dict()}
    plain = Classifier.load_from_checkpoint(path)
    assert type(plain) is Classifier
    torch.testing.assert_close(plain.net.state_dict(), reference.state_dict())
    again = distilled(TinyMLP(hidden=64))
    again.load_state_dict(state)  # strict: the missing teacher entries are expected
    torch.testing.assert_close(again.net.state_dict(), reference.state_dict())


def test_kd_only_without_balancer_and_deepcopy(tmp_path):
    module = distill(
        Classifier(),
        student="net",
        teacher_model=TinyMLP(hidden=64),
        criterion=mtd.LogitsDistillationLoss(),
    )
    clone = copy.deepcopy(module)
    assert type(clone) is type(module) and type(clone.net) is TinyMLP
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(clone, make_loader())
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["total_loss"], metrics["kd_loss"])
    assert "student_loss" in metrics  # logged, not trained on


class ManualClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize(
    ("make_module", "kwargs", "error", "match"),
    [
        (lambda: torch.nn.Linear(2, 2), {}, TypeError, "must be a lightning.LightningModule"),
        (Classifier, {"student": "nett"}, ValueError, "is not a submodule"),
        (ManualClassifier, {}, ValueError, "manual optimization"),
        (lambda: distilled(TinyMLP()), {}, RuntimeError, "already distilled"),
    ],
    ids=["not-lightning", "unknown-student", "manual-optimization", "twice"],
)
def test_distill_validation(make_module, kwargs, error, match):
    options = {
        "student": "net",
        "teacher_model": TinyMLP(),
        "criterion": mtd.LogitsDistillationLoss(),
    }
    options.update(kwargs)
    with pytest.raises(error, match=match):
        distill(make_module(), **options)


def test_kdmodule_is_not_built_directly():
    with pytest.raises(TypeError, match="not built directly"):
        KDModule()


def test_docstring_examples():
    import kdistill.lightning as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} doctest(s) failed"


class CrashingClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def test_student_is_converted_only_during_fit_also_when_fit_raises(tmp_path):
    teacher = TinyMLP(hidden=64)
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(isinstance(pl_module.net, mtd.DistillationModel))

    module = distill(
        CrashingClassifier(),
        student="net",
        teacher_model=teacher,
        criterion=mtd.LogitsDistillationLoss(),
    )
    assert type(module.net) is TinyMLP
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, limit_val_batches=0, callbacks=[Probe()]).fit(module, make_loader())
    assert seen == [True, True]
    assert type(module.net) is TinyMLP
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training
    # validate outside fit runs the plain student; fit again distills again
    make_trainer(tmp_path).validate(module, make_loader(), verbose=False)
    module.__class__.training_step = Classifier.training_step  # stop crashing
    make_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, make_loader())
    assert type(module.net) is TinyMLP


def test_loss_module_checkpoint_entries_load_outside_fit(tmp_path):
    class ConvClassifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            from kdistill.testing import TinyCNN

            self.net = TinyCNN(1, 4)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum() * 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    from kdistill.testing import TinyCNN

    def make():
        return distill(
            ConvClassifier(),
            student="net",
            teacher_model=TinyCNN(1, 6),
            criterion={("conv2", "conv2"): mtd.MGDLoss(4, 6)},
        )

    module = make()
    loss = module._kd_config["criterion"][("conv2", "conv2")]
    with torch.no_grad():
        loss.align.weight.fill_(0.25)
    x = torch.randn(4, 1, 6, 6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, loader)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("net._loss_modules.0.") for k in state)
    again = make()
    again.load_state_dict(state)
    restored = again._kd_config["criterion"][("conv2", "conv2")]
    torch.testing.assert_close(restored.align.weight, loss.align.weight)
