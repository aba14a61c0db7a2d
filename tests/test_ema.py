"""normfx.ema: batch statistics without touching the EMA (bitwise), the EMA while training, per call, on any
model (every BatchNorm kind normfx knows) without rewriting it; flags restored, even on errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normfx import ema, models
from normfx.errors import InputDataError, PolicyError
from normfx.layers import (
    BatchRenorm2d,
    GhostBatchNorm2d,
    SeparateBatchNorm2d,
    SyncBatchNorm,
    VirtualBatchNorm2d,
)


class Discriminator(nn.Module):
    """Every statistics layer kind in one model (a forward with its own structure: nothing is traced)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        c = 6
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.norms = nn.ModuleList([
            nn.BatchNorm2d(c), GhostBatchNorm2d(c, 2), BatchRenorm2d(c, r_max=1.5, d_max=0.5),
            VirtualBatchNorm2d(c, 4), SeparateBatchNorm2d(c, 2), nn.SyncBatchNorm(c), SyncBatchNorm(c),
        ])
        self.convs = nn.ModuleList([nn.Conv2d(c, c, 1) for _ in self.norms])
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(c, 4)
        self.head_bn = nn.BatchNorm1d(4, momentum=None)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        x = self.stem(x)
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        x = self.drop(x.mean((2, 3)))
        return self.out(self.head_bn(self.head(x)))


def make(dropout=0.0):
    torch.manual_seed(0)
    model = Discriminator(dropout)
    models.randomize_batchnorm(model, 1)
    with torch.no_grad():
        model.norms[4].running_mean[1].add_(0.3)
    model.train()
    model(images(0))  # fills the Virtual BN's recent-input buffer and moves every EMA once
    return model


def images(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, 5, 5), generator=g) * 1.3 + 0.2


def buffers(model):
    """Every buffer, persistent or not (Virtual BN's reference), and every counter."""
    return {name: b.clone() for name, b in model.named_buffers()}


def assert_bitwise(before, model):
    after = dict(model.named_buffers())
    assert set(after) == set(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


def flags(model):
    return [(n, m.training, getattr(m, "track_running_stats", None)) for n, m in model.named_modules()]


def test_no_ema_update_uses_batch_statistics_and_leaves_every_buffer_bitwise_untouched():
    model = make()
    twin = copy.deepcopy(model)
    before, modes = buffers(model), flags(model)
    x = images(1)
    with ema.no_ema_update(model) as same:
        assert same is model
        y = model(x)
        y.sum().backward()  # gradients flow through batch statistics
        y2 = model(images(2))
    assert_bitwise(before, model)
    assert flags(model) == modes
    assert torch.equal(y, twin(x))  # batch statistics, the same numbers as a training step
    assert model.stem.weight.grad.abs().max() > 0
    assert not torch.equal(y2, y)
    # the twin did update: the test can see a change when there is one
    assert any(not torch.equal(b, before[n]) for n, b in twin.named_buffers())
    assert int(twin.norms[1].num_batches_tracked) == int(before["norms.1.num_batches_tracked"]) + 4


def test_use_ema_while_training_is_the_eval_function_with_gradients():
    model = make()
    reference = copy.deepcopy(model).eval()
    before = buffers(model)
    x = images(3)
    with ema.use_ema(model):
        y = model(x)
        y.sum().backward()
    assert torch.equal(y, reference(x))
    assert model.stem.weight.grad.abs().max() > 0 and model.norms[0].weight.grad.abs().max() > 0
    assert_bitwise(before, model)
    assert model.training and all(m.training for m in model.modules())


def test_dropout_keeps_its_mode_inside_the_switches():
    model = make(dropout=0.5)
    with ema.use_ema(model):
        assert model.drop.training and not model.norms[0].training
    model.eval()
    with ema.no_ema_update(model):
        assert not model.drop.training and model.norms[0].training


def test_batch_statistics_in_eval_mode_with_and_without_the_update():
    model = make().eval()
    trained = copy.deepcopy(model).train()
    x = images(4)
    before = buffers(model)
    with ema.statistics(model, use="batch", update_ema=False):
        y = model(x)
    assert_bitwise(before, model)
    with ema.statistics(model, use="batch"):  # update_ema=None: batch statistics update the EMA, as in training
        y_updating = model(x)
    expected = trained(x)
    assert torch.equal(y, expected) and torch.equal(y_updating, expected)
    for name, value in trained.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], value), name
    assert not model.training and not model.norms[0].training


def test_per_call_gan_discriminator_steps():
    """D(real) updates the EMA, D(fake, update_ema=False) does not: the buffers end as if fake never ran."""
    d, twin = make(), make()
    real1, fake, real2 = images(5), images(6) * 3 + 1, images(7)
    d(real1)
    out_fake = ema.call(d, fake, update_ema=False)
    out_fake_ema = ema.call(d, fake, use="ema")
    d(real2)
    twin(real1)
    expected_fake = copy.deepcopy(twin)(fake)
    twin(real2)
    assert_bitwise(dict(twin.named_buffers()), d)
    assert torch.equal(out_fake, expected_fake)
    assert not torch.equal(out_fake_ema, out_fake)
    assert flags(d) == flags(twin)


def test_works_without_rewriting_and_restores_flags_on_errors():
    model = make()
    ids = [id(m) for m in model.modules()]
    modes = flags(model)
    with pytest.raises(RuntimeError, match="inside"), ema.no_ema_update(model):
        raise RuntimeError("inside")
    assert flags(model) == modes and [id(m) for m in model.modules()] == ids and type(model) is Discriminator


def test_bad_arguments_are_one_line_typed_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(InputDataError, match="layer 1 has no running statistics") as info:
        with ema.use_ema(model):
            pass
    assert "\n" not in str(info.value)
    with ema.no_ema_update(model):  # batch statistics and nothing to update: allowed
        model(images(1))
    for kwargs, match in (({"use": "running"}, "use must be"), ({"use": "ema", "update_ema": True}, "cannot update"),
                          ({"update_ema": "no"}, "update_ema must be")):
        with pytest.raises(PolicyError, match=match):
            with ema.statistics(model, **kwargs):
                pass
    names = [n for n, _ in ema.statistics_layers(make())]
    assert len(names) == 8 and "norms.4" in names and "head_bn" in names
