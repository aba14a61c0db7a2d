"""Precise / adaptive BN statistics: numbers against a direct float64 computation, hooks, modes,
data forms, the policy route, the EMA diagnosis, and bad input."""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict

import numpy as np
import pytest
import torch
from helpers import assert_state_equal, rel_error, snapshot, storages
from torch import nn

import normfx
from normfx import models
from normfx.errors import InputDataError, ModelError, PolicyError
from normfx.layers import FrozenBatchNorm2d
from normfx.stats import (
    Moments,
    batch_moments,
    diagnose_ema,
    merge,
    recompute_stats,
    recompute_stats_with_report,
)
from normfx.stats.feed import progress_enabled

BN = nn.modules.batchnorm._BatchNorm
TOL = 1e-6


# --- the reference: float64 model, PyTorch's own train-mode BN, statistics over the concatenation ---


def _concat_stats(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    flat = torch.cat([x.double().transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
    return flat.mean(1), flat.var(1, unbiased=True), len(xs)


def observed_recompute(model: nn.Module, data, **kwargs) -> tuple[nn.Module, dict]:
    """``recompute_stats(model, data)`` plus, per BN, float64 statistics of every input it saw in that pass.

    An observer pre-hook on each BN of a copy of ``model`` records its inputs; ``recompute_stats``
    deep-copies the module with its hooks, so the observers see the pass itself. The statistics are
    computed directly in float64 over the concatenation of all calls.
    """
    watched = copy.deepcopy(model)
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, module in watched.named_modules():
        if isinstance(module, BN) and module.track_running_stats:
            module.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].detach().clone()))
    out = recompute_stats(watched, data, progress=False, **kwargs)
    return out, {name: _concat_stats(xs) for name, xs in seen.items()}


def reference_stats(model: nn.Module, batches, dtype: torch.dtype = torch.float64) -> dict:
    """Independent reference: a copy in ``dtype`` with PyTorch's own training-mode BN (everything else
    in eval), statistics of every BN input taken directly in float64 over the concatenation of all calls."""
    ref = copy.deepcopy(model).to(dtype).eval()
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, module in ref.named_modules():
        if isinstance(module, BN) and module.track_running_stats:
            module.train()
            module.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].detach().clone()))
    with torch.no_grad():
        for batch in batches:
            ref(batch.to(dtype))
    return {name: _concat_stats(xs) for name, xs in seen.items()}


def assert_stats_match(model: nn.Module, ref: dict, tol: float = TOL) -> None:
    """Tight: per channel, the variance to ``tol`` relative and the mean to ``tol`` sigma (plus the
    half-ulp rounding of the stored value: a float32 buffer holds 40.0 only to ±2.4e-6)."""
    modules = dict(model.named_modules())
    assert ref, "no BN layer was observed"
    for name, (mean, var, _) in ref.items():
        bn = modules[name]
        got_mean, got_var = bn.running_mean.double(), bn.running_var.double()
        assert rel_error(mean, got_mean) <= tol and rel_error(var, got_var) <= tol, name
        half_ulp = torch.finfo(bn.running_mean.dtype).eps / 2
        assert bool(((got_mean - mean).abs() <= tol * var.sqrt() + half_ulp * mean.abs()).all()), f"{name} mean"
        assert float(((got_var - var).abs() / var).max()) <= tol, f"{name} running_var"


def assert_close_to_float64_model(model: nn.Module, original: nn.Module, batches, tol: float = 1e-5) -> None:
    """Against the float64 run of the original (PyTorch's own training-mode BN): relative error
    max|Δ|/max|ref| of each statistic ≤ max(tol, 2 × the float32 run's own error), the house rule
    for comparisons with a float64 run (deep layers fed by 4-sample batch statistics amplify the
    float32 forward's rounding: measured 1e-6..3e-5 for PyTorch's own float32 run of the zoo)."""
    ref64 = reference_stats(original, batches, torch.float64)
    ref32 = reference_stats(original, batches, torch.float32)
    modules = dict(model.named_modules())
    assert ref64
    for name, (mean, var, _) in ref64.items():
        bn = modules[name]
        floor_mean, floor_var = rel_error(mean, ref32[name][0]), rel_error(var, ref32[name][1])
        assert rel_error(mean, bn.running_mean) <= max(tol, 2 * floor_mean), f"{name} running_mean"
        assert rel_error(var, bn.running_var) <= max(tol, 2 * floor_var), f"{name} running_var"


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    models.randomize_batchnorm(model, seed)
    return model.eval()


def batches_of(shape, sizes, seed=0, scale=2.0, offset=1.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=g) * scale + offset for n in sizes]


class Net(nn.Module):
    """conv(bias 40: mean ≫ sigma) → BN → ReLU → Dropout → conv → BN → pool → Linear → BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(6, momentum=None)
        self.fc = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5, momentum=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(x)).mean((2, 3))
        return self.bn3(self.fc(x))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = randomize(Net(), seed)
    with torch.no_grad():
        net.conv1.bias.add_(40.0)  # a channel mean 40x its sigma: the naive E[x²]−E[x]² loses digits
    return net


class SharedBN(nn.Module):
    """One BN called twice per forward, on two differently distributed inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)).mean((2, 3)) + self.bn(3.0 * self.b(x) + 2.0).mean((2, 3))


# --- the numbers ---------------------------------------------------------------------------------


def test_precise_equals_direct_float64_over_concatenated_data():
    net = make_net()
    data = batches_of((3, 12, 12), [8, 8, 5, 8, 3])  # unequal batches: weighting by elements matters
    out, observed = observed_recompute(net, data)
    assert set(observed) == {"bn1", "bn2", "bn3"}
    assert_stats_match(out, observed)
    assert_close_to_float64_model(out, net, data)
    _, report = recompute_stats_with_report(net, data)
    assert len(report.applied) == 3 and not report.skipped
    entry = next(e for e in report.entries if e.name == "bn1")
    assert entry.details["count"] == 32 * 144 and entry.details["calls"] == 5 and entry.details["mode"] == "precise"
    # statistics are reset, not blended: the old EMA values do not matter
    other = make_net()
    with torch.no_grad():
        for bn in (other.bn1, other.bn2, other.bn3):
            bn.running_mean.fill_(1e3)
            bn.running_var.fill_(1e-3)
    again = recompute_stats(other, data, progress=False)
    for name in ("bn1", "bn2", "bn3"):
        assert torch.equal(getattr(again, name).running_mean, getattr(out, name).running_mean)
        assert torch.equal(getattr(again, name).running_var, getattr(out, name).running_var)
    assert int(out.bn1.num_batches_tracked) == 5


def test_unbiased_not_mean_of_batch_variances():
    """The population variance differs from the average of per-batch variances: check we store the former."""
    bn = nn.BatchNorm1d(2).eval()
    data = [torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.tensor([[10.0, -1.0], [12.0, 5.0]])]
    out = recompute_stats(bn, data, progress=False)
    allx = torch.cat(data).double()
    assert torch.allclose(out.running_mean.double(), allx.mean(0), rtol=0, atol=1e-6)
    assert torch.allclose(out.running_var.double(), allx.var(0, unbiased=True), rtol=1e-7)
    mean_of_batch_vars = torch.stack([d.double().var(0) for d in data]).mean(0)
    assert not torch.allclose(out.running_var.double(), mean_of_batch_vars, rtol=1e-2)


def test_bn_used_twice_accumulates_every_call():
    torch.manual_seed(1)
    net = randomize(SharedBN(), 1)
    data = batches_of((3, 9, 9), [6, 6, 4], seed=1)
    out, observed = observed_recompute(net, data)
    assert observed["bn"][2] == 6  # two calls per batch
    assert_stats_match(out, observed)
    assert reference_stats(net, data)["bn"][2] == 6
    assert_close_to_float64_model(out, net, data)
    _, report = recompute_stats_with_report(net, data)
    (entry,) = report.applied
    assert entry.details["calls"] == 6 and entry.details["batches"] == 3
    assert entry.details["count"] == 16 * 49 + 16 * 81
    # neither the last call only (AIMET) nor the first only
    for branch in (net.a, lambda x: 3.0 * net.b(x) + 2.0):
        with torch.no_grad():
            one = {"bn": _concat_stats([branch(b) for b in data])}
        assert float((out.bn.running_mean.double() - one["bn"][0]).abs().max()) > 0.1


ZOO = ["resnet18", "mobilenet_v2", "preact_resnet", "conv1d", "conv3d", "mlp", "trap_bn_act", "trap_shared_bn",
       "trap_syncbn", "trap_untraceable"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_match_reference(name):
    model = models.create(name, seed=3)
    # native input sizes: at 32x32 resnet18's layer4 normalizes 4 values per channel per batch, and
    # float32 rounding is amplified chaotically (measured 3e-5 for PyTorch's own float32 run)
    data = batches_of(models.info(name).input_shape, [8, 8, 6], seed=5, scale=1.0, offset=0.3)
    out, observed = observed_recompute(model, data)
    assert set(observed) == {n for n, m in model.named_modules() if isinstance(m, BN)}
    assert_stats_match(out, observed)
    assert_close_to_float64_model(out, model, data)
    assert type(out) is type(model)


def test_bn_subclass_with_activation_keeps_it():
    model = models.create("trap_bn_act", seed=0)
    data = batches_of(models.info("trap_bn_act").input_shape, [4, 4], seed=2)
    out, observed = observed_recompute(model, data)
    assert_stats_match(out, observed)
    acts = [m for m in out.modules() if isinstance(m, models.BatchNormAct2d)]
    assert acts and all(isinstance(m.act, nn.Module) for m in acts)


def test_channels_last_and_float64_models():
    net = make_net().to(memory_format=torch.channels_last)
    data = [b.to(memory_format=torch.channels_last) for b in batches_of((3, 10, 10), [6, 6])]
    out, observed = observed_recompute(net, data)
    assert_stats_match(out, observed)
    net64 = make_net().double()
    data64 = [b.double() for b in batches_of((3, 10, 10), [6, 6])]
    out, observed = observed_recompute(net64, data64)
    assert_stats_match(out, observed, tol=1e-12)
    assert_close_to_float64_model(out, net64, data64, tol=1e-12)


# --- the moments math ----------------------------------------------------------------------------


def _moments_error(x: torch.Tensor) -> tuple[float, float]:
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    m = batch_moments(x)
    assert m.count == flat.shape[1]
    var = flat.var(1, unbiased=False)
    return float(((m.mean - flat.mean(1)).abs() / var.sqrt()).max()), float(((m.var_biased - var).abs() / var).max())


@pytest.mark.parametrize("offset", [0.0, 3.0, 1e3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc", "ncl"])
def test_batch_moments_float64_accuracy(offset, layout):
    g = torch.Generator().manual_seed(7)
    shape = {"nchw": (16, 5, 24, 24), "channels_last": (16, 5, 24, 24), "nc": (64, 5), "ncl": (8, 5, 300)}[layout]
    scale = torch.tensor([0.01, 1.0, 5.0, 100.0, 0.5]).view(1, 5, *([1] * (len(shape) - 2)))
    x = torch.randn(shape, generator=g) * scale + offset
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    assert max(_moments_error(x)) <= TOL
    # a first sample far from the others: its mean is a bad shift, and the batch is redone around the mean
    x[0] += 300 * scale[0]
    assert max(_moments_error(x)) <= TOL


def test_the_redo_rule_is_what_keeps_a_bad_shift_accurate(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 4, 8, 8, generator=g)
    # the first sample's mean is the shift; (shift - mean)^2 can reach (N - 1) var: here ~250 var
    x[0] += 3000.0
    assert max(_moments_error(x)) <= TOL
    monkeypatch.setattr("normfx.stats.moments.SHIFT_TOLERANCE", float("inf"))
    assert max(_moments_error(x)) > 2 * TOL  # measured 3.3e-6 without the redo


def test_merge_is_chan_over_the_union():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, generator=g, dtype=torch.float64) * 3 + k for k, n in enumerate([5, 17, 2, 40])]
    merged = merge([batch_moments(p) for p in parts] + [Moments(0.0, torch.zeros(3), torch.zeros(3))])
    allx = torch.cat(parts)
    assert merged.count == 64
    assert torch.allclose(merged.mean, allx.mean(0), rtol=1e-14, atol=1e-14)
    assert torch.allclose(merged.var_unbiased, allx.var(0), rtol=1e-13)
    assert merge([]) is None


# --- what must not change ------------------------------------------------------------------------


class RecordingDropout(nn.Dropout):
    """Dropout that records the training flag of each call."""

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return super().forward(x)


def test_dropout_and_other_layers_stay_in_eval_even_for_a_train_mode_model():
    net = make_net()
    net.drop = RecordingDropout(0.5)
    net.train()
    data = batches_of((3, 12, 12), [8, 8])
    out = recompute_stats(net, data, progress=False)
    assert out.drop.seen == [False, False]  # dropout ran in eval during the pass
    assert net.drop.seen == []  # the caller's model never ran
    assert_close_to_float64_model(out, net, data)  # the reference runs dropout in eval
    again = recompute_stats(net, data, progress=False)
    assert torch.equal(again.bn2.running_var, out.bn2.running_var)  # deterministic: no random dropout mask
    assert all(m.training for m in out.modules())  # modes restored on the copy


def test_modes_and_momenta_restored_and_input_untouched():
    net = make_net()
    net.train()
    net.bn2.eval()
    net.drop.eval()
    before_state = snapshot(net)
    before_modes = {n: m.training for n, m in net.named_modules()}
    momenta = {n: m.momentum for n, m in net.named_modules() if isinstance(m, BN)}
    assert momenta == {"bn1": 0.1, "bn2": None, "bn3": 0.3}
    out = recompute_stats(net, batches_of((3, 12, 12), [8, 8]), progress=False)
    assert {n: m.training for n, m in out.named_modules()} == before_modes
    assert {n: m.momentum for n, m in out.named_modules() if isinstance(m, BN)} == momenta
    assert {n: m.training for n, m in net.named_modules()} == before_modes
    assert_state_equal(before_state, net)
    assert not storages(net) & storages(out)
    assert not out.bn1._forward_pre_hooks and not net.bn1._forward_pre_hooks
    assert not torch.equal(out.bn1.running_mean, net.bn1.running_mean)


# --- data forms ----------------------------------------------------------------------------------


class KwNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.net(image * scale)


def test_tuples_dicts_numpy_and_forward_callable_agree():
    net = make_net()
    data = batches_of((3, 12, 12), [8, 8, 4])
    expected = recompute_stats(net, data, progress=False)
    labels = [torch.zeros(len(b), dtype=torch.long) for b in data]
    variants = {
        "tuple": list(zip(data, labels)),
        "list": [[b, y] for b, y in zip(data, labels)],
        "numpy": [b.numpy() for b in data],
        "generator": (b for b in data),
    }
    for kind, batches in variants.items():
        got = recompute_stats(net, batches, progress=False)
        for name in ("bn1", "bn2", "bn3"):
            assert torch.equal(getattr(got, name).running_var, getattr(expected, name).running_var), kind
    got = recompute_stats(net, [{"x": b} for b in data], forward=lambda m, batch: m(batch["x"]), progress=False)
    assert torch.equal(got.bn1.running_mean, expected.bn1.running_mean)
    kw = KwNet()
    kw.net.load_state_dict(net.state_dict())
    got = recompute_stats(kw, [{"image": b, "scale": torch.tensor(1.0)} for b in data], progress=False)
    assert torch.equal(got.net.bn3.running_var, expected.bn3.running_var)


def test_num_batches_limits_the_data(caplog):
    net = make_net()
    data = batches_of((3, 12, 12), [8, 8, 8, 8])
    out, observed = observed_recompute(net, data, num_batches=2)
    assert_stats_match(out, observed)
    assert observed["bn1"][2] == 2
    _, report = recompute_stats_with_report(net, data, num_batches=2)
    assert report.applied[0].details["batches"] == 2
    with caplog.at_level(logging.WARNING, logger="normfx"):
        recompute_stats(net, data, num_batches=10, progress=False)
    assert "ran out after 4 batch" in caplog.text


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.unused = nn.BatchNorm2d(4)
        self.frozen = FrozenBatchNorm2d(4)
        self.untracked = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.untracked(self.frozen(self.main(x)))


def test_unreached_frozen_and_untracked_layers_are_reported(caplog):
    net = randomize(Branchy(), 4)
    unused_before = net.unused.running_mean.clone()
    with caplog.at_level(logging.WARNING, logger="normfx"):
        out, report = recompute_stats_with_report(net, batches_of((3, 8, 8), [4, 4]))
    status = {e.name: (e.status, e.reason) for e in report.entries}
    assert status["main.1"][0] == "applied"
    assert status["unused"][0] == "skipped" and "never reached" in status["unused"][1]
    assert status["frozen"][0] == "skipped" and "FrozenBatchNorm" in status["frozen"][1]
    assert status["untracked"][0] == "skipped" and "track_running_stats=False" in status["untracked"][1]
    assert "unused" in caplog.text and "never reached" in caplog.text
    assert torch.equal(out.unused.running_mean, unused_before)
    assert torch.equal(out.frozen.running_mean, net.frozen.running_mean)


# --- the policy route ----------------------------------------------------------------------------


def test_policies_precise_and_adaptive_through_rewrite():
    net = make_net()
    data = batches_of((3, 12, 12), [8, 8, 8])
    expected = recompute_stats(net, data, progress=False)
    for policy in ("precise", "adaptive"):
        out, report = normfx.rewrite_with_report(net, policy, data=data)
        assert {e.name for e in report.applied} == {"bn1", "bn2", "bn3"}
        assert all(e.rule == policy and e.details["mode"] == policy for e in report.applied)
        assert torch.equal(out.bn2.running_var, expected.bn2.running_var)
    out = normfx.rewrite(net, "precise:num_batches=1", data=data)
    assert torch.equal(out.bn3.running_var, recompute_stats(net, data[:1], progress=False).bn3.running_var)
    out, report = normfx.rewrite_with_report(net, {"bn1": "adaptive", "*": "keep"}, data=data)
    assert torch.equal(out.bn1.running_mean, expected.bn1.running_mean)
    assert torch.equal(out.bn2.running_mean, net.bn2.running_mean)  # not targeted: untouched
    assert report.applied_to("bn1") and not report.applied_to("bn2")
    with pytest.raises(InputDataError, match="needs data"):
        normfx.rewrite(net, "precise")


def test_explain_does_not_touch_data():
    class Exploding:
        def __iter__(self):
            raise AssertionError("explain must not iterate the data")

    report = normfx.explain(make_net(), "adaptive", data=Exploding())
    assert {e.name: e.status for e in report.entries} == {"bn1": "applied", "bn2": "applied", "bn3": "applied"}
    assert all("would recompute" in e.reason for e in report.entries)


def test_strict_fails_on_an_unreached_layer():
    with pytest.raises(normfx.errors.RewriteError, match="unused"):
        normfx.rewrite(randomize(Branchy(), 0), "precise", data=batches_of((3, 8, 8), [4]), strict=True)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_typed_one_line_errors():
    net = make_net()
    with pytest.raises(InputDataError, match="no batches"):
        recompute_stats(net, [], progress=False)
    with pytest.raises(InputDataError, match=r"batch 1 .*'bn3' \(BatchNorm1d\) gets 1 value per channel"):
        recompute_stats(net, batches_of((3, 12, 12), [4, 1]), progress=False)
    with pytest.raises(InputDataError, match=r"batch 0 \(tensor\(4, 5, 12, 12\) float32\) failed in the model's forward"):
        recompute_stats(net, batches_of((5, 12, 12), [4]), progress=False)
    with pytest.raises(InputDataError, match="single array of shape"):
        recompute_stats(net, torch.randn(4, 3, 12, 12), progress=False)
    with pytest.raises(InputDataError, match="num_batches must be >= 0"):
        recompute_stats(net, batches_of((3, 12, 12), [4]), num_batches=-1, progress=False)
    with pytest.raises(InputDataError, match="not iterable"):
        recompute_stats(net, 42, progress=False)
    with pytest.raises(InputDataError, match="batch of type str"):
        recompute_stats(net, ["abc"], progress=False)
    with pytest.raises(ModelError, match="no BatchNorm"):
        recompute_stats(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), batches_of((3, 4, 4), [2]), progress=False)
    with pytest.raises(ModelError, match="no BatchNorm layer with running statistics"):
        recompute_stats(nn.Sequential(FrozenBatchNorm2d(3)), batches_of((3, 4, 4), [2]), progress=False)
    with pytest.raises(PolicyError, match="unknown mode"):
        recompute_stats(net, batches_of((3, 12, 12), [4]), mode="ema")
    with pytest.raises(InputDataError, match="not finite"):
        recompute_stats(net, [torch.full((4, 3, 12, 12), float("nan"))], progress=False)
    for bad in ([], batches_of((5, 12, 12), [4]), batches_of((3, 12, 12), [1])):
        with pytest.raises(InputDataError) as info:
            recompute_stats(net, bad, progress=False)
        assert "\n" not in str(info.value)


def test_batch_of_one_is_fine_for_bn2d_with_spatial_extent():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    data = batches_of((3, 6, 6), [1, 1, 1])
    out, observed = observed_recompute(model, data)
    assert_stats_match(out, observed)
    assert_close_to_float64_model(out, model, data)


def test_progress_bar_off_when_not_a_tty(monkeypatch):
    assert progress_enabled(False) is False
    monkeypatch.setattr("sys.stderr", open("/dev/null", "w"))
    assert progress_enabled(True) is False


# --- the EMA diagnosis ---------------------------------------------------------------------------


def test_diagnose_ema_numbers_table_json_and_plot(tmp_path):
    net = make_net()
    data = batches_of((3, 12, 12), [8, 8, 8])
    ref = reference_stats(net, data)
    before = snapshot(net)
    plot = tmp_path / "drift.png"
    diagnosis = diagnose_ema(net, data, plot=plot, progress=False)
    assert_state_equal(before, net)
    rows = {r.layer: r for r in diagnosis.rows}
    assert set(rows) == {"bn1", "bn2", "bn3"}
    for name, (mean, var, calls) in ref.items():
        bn = getattr(net, name)
        shift = (bn.running_mean.double() - mean).abs() / (var + bn.eps).sqrt()
        ratio = (bn.running_var.double() + bn.eps) / (var + bn.eps)
        assert rows[name].mean_shift_max == pytest.approx(float(shift.max()), rel=1e-5)
        assert rows[name].mean_shift_mean == pytest.approx(float(shift.mean()), rel=1e-5)
        assert rows[name].var_ratio_min == pytest.approx(float(ratio.min()), rel=1e-5)
        assert rows[name].var_ratio_max == pytest.approx(float(ratio.max()), rel=1e-5)
        assert rows[name].calls == calls
    payload = json.loads(json.dumps(diagnosis.to_dict()))
    assert [r["layer"] for r in payload["layers"]] == ["bn1", "bn2", "bn3"] and payload["batches"] == 3
    table = diagnosis.format()
    assert "bn2" in table and "shift max" in table and "largest mean shift" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # after precise BN the stored statistics are the precise ones: no drift left
    fixed = diagnose_ema(recompute_stats(net, data, progress=False), data, progress=False)
    for row in fixed.rows:
        assert row.mean_shift_max <= 1e-5 and abs(row.var_ratio_min - 1) <= 1e-5 and abs(row.var_ratio_max - 1) <= 1e-5


def test_diagnose_lists_unreached_layers():
    diagnosis = diagnose_ema(randomize(Branchy(), 2), batches_of((3, 8, 8), [3]), progress=False)
    assert [r.layer for r in diagnosis.rows] == ["main.1"]
    assert diagnosis.unreached == ["unused"]
    assert "frozen" in diagnosis.skipped and "never reached" in diagnosis.format()
    assert np.isfinite(diagnosis.rows[0].var_ratio_mean)


def test_data_that_reaches_no_bn_is_an_error():
    data = batches_of((3, 12, 12), [4, 4])
    with pytest.raises(InputDataError, match="reached none of the 3 BatchNorm"):
        recompute_stats(make_net(), data, forward=lambda model, batch: None, progress=False)


def test_explain_without_data_says_data_is_needed():
    report = normfx.explain(make_net(), "precise")
    assert len(report.applied) == 3 and all("needs data=" in e.reason for e in report.applied)
    with pytest.raises(InputDataError, match="needs data"):
        normfx.rewrite(make_net(), "precise")


def test_errors_raised_by_the_data_iterator_name_the_batch():
    def broken():
        yield torch.randn(4, 3, 12, 12)
        raise ValueError("loader died")

    with pytest.raises(InputDataError, match="ValueError while producing batch 1: loader died"):
        recompute_stats(make_net(), broken(), progress=False)


def test_half_precision_overflow_is_reported_not_stored():
    model = nn.Sequential(nn.BatchNorm2d(2)).half().eval()
    with pytest.raises(InputDataError, match="not finite in torch.float16"):
        recompute_stats(model, [(torch.randn(4, 2, 6, 6) * 300).half()], progress=False)


def test_policy_takes_feed_for_dict_batches():
    net = make_net()
    data = [{"image": b} for b in batches_of((3, 12, 12), [4, 4])]
    viaforward = normfx.rewrite(net, "precise", data=data, feed=lambda model, batch: model(batch["image"]))
    direct = recompute_stats(net, [d["image"] for d in data], progress=False)
    for key, value in direct.state_dict().items():
        assert torch.equal(viaforward.state_dict()[key], value), key


def test_bn_called_with_a_keyword_input_is_measured():
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(input=self.conv(x))

    model = randomize(KeywordCall(), 3).eval()
    data = batches_of((3, 10, 10), [4, 4])
    result, report = recompute_stats_with_report(model, data, progress=False)
    assert [e.status for e in report.entries] == ["applied"]
    with torch.no_grad():
        z = torch.cat([model.conv(b) for b in data]).double()
    expected = z.transpose(0, 1).reshape(4, -1)
    assert rel_error(expected.mean(1), result.bn.running_mean) <= 1e-6
    assert rel_error(expected.var(1), result.bn.running_var) <= 1e-6
