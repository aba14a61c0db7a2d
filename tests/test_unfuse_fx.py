"""Policy ``unfuse`` on torch models: BN put back after the layers of a fused model, exact in eval, close in
train mode, and ``fuse`` gives the fused numbers back; every skip reason and every bad input."""

import copy
import logging

import pytest
import torch
from helpers import assert_state_equal, rel_error, snapshot, storages
from torch import nn

import normfx
from normfx import models
from normfx.errors import InputDataError, ModelError, PolicyError
from normfx.inspect import batchnorm_calls
from normfx.layers import FrozenBatchNorm2d, is_batchnorm


def _batches(name: str, count: int = 3, batch: int = 8, seed: int = 11) -> list[torch.Tensor]:
    return [models.example_input(name, batch=batch, seed=seed + i) for i in range(count)]


def _noise_floor(model: nn.Module, x: torch.Tensor) -> float:
    """The fp32 model's own relative error against its float64 run."""
    with torch.no_grad():
        y32 = model(x)
        y64 = copy.deepcopy(model).double()(x.double())
    return rel_error(y64, y32)


def _float64_run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def _bn_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_batchnorm(m))


@pytest.mark.parametrize("name", models.names())
def test_fuse_unfuse_fuse_round_trip_on_the_zoo(name):
    model = models.create(name, seed=3)
    x = models.example_input(name, batch=4, seed=3)
    fused = normfx.rewrite(model, "fuse", example_inputs=x)
    before = snapshot(fused)
    unfused, report = normfx.rewrite_with_report(fused, "unfuse", data=_batches(name))
    assert_state_equal(before, fused)  # the caller's model is untouched and shares nothing
    assert not storages(unfused) & storages(fused)
    assert _bn_count(unfused) - _bn_count(fused) == len(report.applied) >= 1
    assert all(e.details["statistics"].startswith("data") for e in report.applied)
    tolerance = max(1e-5, 2 * _noise_floor(fused, x))
    reference = _float64_run(fused, x)  # judged against the fused model's float64 run
    with torch.no_grad():
        assert rel_error(reference, unfused.eval()(x)) <= tolerance
        refused = normfx.rewrite(unfused, "fuse", example_inputs=x)
        assert rel_error(reference, refused(x)) <= tolerance
    assert batchnorm_calls(refused) == batchnorm_calls(fused)
    assert 0 < report.metrics["unfuse_train_mode_rel_error"] < 0.5
    explained = normfx.explain(fused, "unfuse", data=_batches(name))
    assert [(e.name, e.status) for e in explained.entries] == [(e.name, e.status) for e in report.entries]


def test_statistics_are_the_measured_moments_of_the_layer_output():
    model = models.create("resnet18", seed=1)
    fused = normfx.rewrite(model, "fuse")
    data = _batches("resnet18", count=2)
    unfused = normfx.rewrite(fused, "unfuse", data=data)
    conv, bn = unfused.conv1, unfused.conv1_bn
    assert conv.bias is None and fused.conv1.bias is not None
    with torch.no_grad():
        z = torch.cat([conv(x) for x in data]).double()
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3))
    assert rel_error(mean, bn.running_mean) <= 1e-6
    assert rel_error(var, bn.running_var) <= 1e-6
    assert rel_error((var + bn.eps).sqrt(), bn.weight) <= 1e-6  # gamma = sqrt(var + eps)
    assert rel_error(mean + fused.conv1.bias.double(), bn.bias) <= 1e-6  # beta = mean + b
    assert int(bn.num_batches_tracked) == 2


def test_train_mode_is_close_on_batches_of_the_same_data():
    model = models.create("resnet18", seed=1)
    fused = normfx.rewrite(model, "fuse")
    data = _batches("resnet18", count=4, batch=32)
    unfused, report = normfx.rewrite_with_report(fused, "unfuse", data=data)
    small = report.metrics["unfuse_train_mode_rel_error"]
    _, report_small = normfx.rewrite_with_report(fused, "unfuse", data=_batches("resnet18", count=4, batch=4))
    # batch statistics of 32 samples are closer to the population than those of 4
    assert small < report_small.metrics["unfuse_train_mode_rel_error"]
    assert small < 0.05
    unfused.train()
    with torch.no_grad():
        y_train = unfused(data[1])
    assert rel_error(fused(data[1]), y_train) < 0.05


def test_without_data_identity_statistics_and_a_warning(caplog):
    model = models.create("conv1d", seed=2)
    x = models.example_input("conv1d", batch=3)
    fused = normfx.rewrite(model, "fuse", example_inputs=x)
    with caplog.at_level(logging.WARNING):
        unfused, report = normfx.rewrite_with_report(fused, "unfuse")
    assert any("train mode" in r.getMessage() for r in caplog.records)
    assert any("identity statistics" in n for n in report.notes)
    assert all(e.details["statistics"] == "identity" for e in report.applied)
    bn = next(m for m in unfused.modules() if is_batchnorm(m))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and torch.equal(bn.weight, torch.ones_like(bn.weight))
    with torch.no_grad():
        assert rel_error(fused(x), unfused(x)) <= 1e-6


def test_layers_already_followed_by_a_norm_are_skipped_with_that_reason():
    model = models.create("resnet18")
    partly = normfx.rewrite(model, {"layer1.*": "keep", "*": "fuse"})  # layer1 keeps its BNs
    report = normfx.explain(partly, "unfuse")
    conv = next(e for e in report.entries if e.name == "layer1.0.conv1")
    assert conv.status == "skipped" and "already followed by BatchNorm2d 'layer1.0.bn1'" in conv.reason
    assert report.applied_to("layer2.0.conv1")
    with pytest.raises(normfx.errors.RewriteError, match="skipped"):
        normfx.rewrite(partly, "unfuse", strict=True)

    class Normalized(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gn, self.conv2 = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.nn.functional.layer_norm(self.conv2(torch.relu(self.gn(self.conv(x)))), (4, 6, 6))
            return self.fc(y.mean((2, 3)))

    report = normfx.explain(Normalized(), "unfuse:classifier=true", example_inputs=torch.randn(2, 3, 8, 8))
    reasons = {e.name: e.reason for e in report.entries}
    assert "GroupNorm 'gn'" in reasons["conv"] and "layer_norm()" in reasons["conv2"]
    assert report.applied_to("fc")


def test_a_model_with_nothing_to_unfuse_is_a_clear_error():
    model = models.create("resnet18")  # not fused: every conv is followed by its BN
    with pytest.raises(ModelError, match=r"no layer to unfuse \(20 already followed by a normalization, 1 producing "
                                         r"the model output\)") as info:
        normfx.rewrite(model, "unfuse")
    assert "\n" not in str(info.value)
    report = normfx.explain(model, "unfuse")  # explain reports every layer, and what rewrite would say
    assert len(report.skipped) == 21 and any("rewrite would refuse" in n for n in report.notes)
    with pytest.raises(ModelError, match="no layer to unfuse"):
        normfx.rewrite(model, "unfuse", data=_batches("resnet18", count=1))
    # excluding every layer with an override is no error: nothing was asked
    fused = normfx.rewrite(model, "fuse")
    assert not normfx.explain(fused, {"*": "keep"}).applied


def test_the_classifier_is_the_head_not_the_residual_stream():
    fused = normfx.rewrite(models.create("resnet18"), "fuse")
    fused.fc = nn.Identity()  # a backbone returning features: every conv feeds the output through residual adds
    report = normfx.explain(fused, "unfuse")
    assert not report.skipped and report.applied_to("layer4.1.conv2") and report.applied_to("layer4.0.downsample.0")

    class Two(nn.Module):  # (logits, features)
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

        def forward(self, x):
            features = torch.relu(self.conv(x)).mean((2, 3))
            return self.fc(features), features

    reasons = {e.name: e.reason for e in normfx.explain(Two(), "unfuse").entries}
    assert "classifier" in reasons["fc"] and "classifier" in reasons["conv"]  # conv's output is an output too


def test_classifier_is_left_unless_asked_and_overrides_choose_layers():
    fused = normfx.rewrite(models.create("resnet18"), "fuse")
    data = _batches("resnet18", count=1)
    report = normfx.explain(fused, "unfuse", data=data)
    fc = next(e for e in report.entries if e.name == "fc")
    assert fc.status == "skipped" and "classifier" in fc.reason and "classifier=true" in fc.reason
    unfused, report = normfx.rewrite_with_report(fused, "unfuse:classifier=true", data=data)
    assert isinstance(unfused.fc_bn, nn.BatchNorm1d) and report.applied_to("fc")
    with torch.no_grad():
        assert rel_error(fused(data[0]), unfused(data[0])) <= 1e-5
    partial, report = normfx.rewrite_with_report(fused, {"layer4.*": "keep", "*": "unfuse"}, data=data)
    assert not any(e.name.startswith("layer4") for e in report.applied)
    assert report.applied_to("layer3.0.conv1")
    assert not any(name.startswith("layer4") and is_batchnorm(m) for name, m in partial.named_modules())


@pytest.mark.parametrize("norm,cls", [("batchnorm", nn.BatchNorm2d), ("frozen", FrozenBatchNorm2d), ("sync", nn.SyncBatchNorm)])
def test_norm_option_chooses_the_inserted_class(norm, cls):
    fused = normfx.rewrite(models.create("bn_conv", seed=4), "fuse")
    data = _batches("bn_conv", count=2)
    unfused, report = normfx.rewrite_with_report(fused, f"unfuse:norm={norm},eps=0.001,momentum=0.05", data=data)
    inserted = [unfused.get_submodule(e.details["bn"]) for e in report.applied]
    assert inserted and all(type(m) is cls for m in inserted)
    assert all(m.eps == 1e-3 and m.momentum == 0.05 for m in inserted)
    with torch.no_grad():
        assert rel_error(fused(data[0]), unfused(data[0])) <= 1e-5
    if norm == "frozen":
        assert "unfuse_train_mode_rel_error" not in report.metrics  # Frozen BN has no train mode


def test_bad_options_and_inputs_are_one_clear_line():
    fused = normfx.rewrite(models.create("conv1d"), "fuse")
    with pytest.raises(PolicyError, match="batchnorm, frozen, sync"):
        normfx.rewrite(fused, "unfuse:norm=groupnorm")
    for bad in ("eps=0", "eps=inf", "eps=nan"):
        with pytest.raises(PolicyError, match="eps must be a finite number > 0"):
            normfx.rewrite(fused, f"unfuse:{bad}")
    for bad in ("momentum=1.5", "momentum=-0.1"):
        with pytest.raises(PolicyError, match=r"momentum must be in \[0, 1\]"):
            normfx.rewrite(fused, f"unfuse:{bad}")
    with pytest.raises(ModelError, match="no Conv/ConvTranspose/Linear"):
        normfx.rewrite(nn.Sequential(nn.ReLU(), nn.Tanh()), "unfuse")
    wrong = [torch.randn(4, 5, 64)]  # conv1d wants 3 channels
    with pytest.raises(InputDataError, match="batch 0") as info:
        normfx.rewrite(fused, "unfuse", data=wrong)
    assert "\n" not in str(info.value)
    with pytest.raises(InputDataError, match="no batches"):
        normfx.rewrite(fused, "unfuse", data=[])


def test_linear_on_tokens_is_skipped_unless_its_input_is_proven_2d():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(6, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.relu(self.proj(x)))

    model = Tokens().eval()
    report = normfx.explain(model, "unfuse")
    assert "pass example_inputs or data" in next(e for e in report.entries if e.name == "proj").reason
    report = normfx.explain(model, "unfuse", example_inputs=torch.randn(2, 5, 6))
    assert "3-D input" in next(e for e in report.entries if e.name == "proj").reason
    out, report = normfx.rewrite_with_report(model, "unfuse", data=[torch.randn(16, 6)])
    assert report.applied_to("proj") and isinstance(out.proj_bn, nn.BatchNorm1d)


def test_one_shot_generator_data_and_a_custom_feed():
    batches = _batches("mlp", count=3, batch=16)
    fused = normfx.rewrite(models.create("mlp", seed=5), "fuse", example_inputs=batches[0])
    from_list, report = normfx.rewrite_with_report(fused, "unfuse", data=batches)
    assert len(report.applied) == 2  # fc1, fc2 (Linear input proven 2-D by the first batch)
    from_generator = normfx.rewrite(fused, "unfuse", data=(b for b in batches))
    for (name, a), (_, b) in zip(from_list.state_dict().items(), from_generator.state_dict().items()):
        assert torch.equal(a, b), name
    calls = []

    def feed(model, batch):
        calls.append(batch["x"].shape[0])
        return model(batch["x"])

    normfx.rewrite(fused, "unfuse", data=[{"x": b} for b in batches], feed=feed)
    assert calls[-3:] == [16, 16, 16]


@pytest.mark.parametrize("name", ["conv1d", "unet", "mlp"])
def test_one_shot_generators_on_conv_models(name):
    x = models.example_input(name, batch=8)
    fused = normfx.rewrite(models.create(name, seed=5), "fuse", example_inputs=x)
    batches = _batches(name, count=3)
    from_list, report = normfx.rewrite_with_report(fused, "unfuse", data=batches)
    from_generator, report_g = normfx.rewrite_with_report(fused, "unfuse", data=(b for b in batches))
    assert report_g.metrics == report.metrics
    for (key, a), (_, b) in zip(from_list.state_dict().items(), from_generator.state_dict().items()):
        assert torch.equal(a, b), key


def test_explain_does_not_eat_a_generator():
    fused = normfx.rewrite(models.create("mlp", seed=5), "fuse", example_inputs=models.example_input("mlp", batch=4))
    generator = iter(_batches("mlp", count=3))
    report = normfx.explain(fused, "unfuse", data=generator)
    assert len(list(generator)) == 3
    assert all("one-shot iterator" in e.reason for e in report.skipped if e.name in ("fc1", "fc2"))


def test_batches_of_one_sample_are_enough_to_measure():
    x = models.example_input("mlp", batch=4)
    fused = normfx.rewrite(models.create("mlp", seed=5), "fuse", example_inputs=x)
    singles = list(torch.split(models.example_input("mlp", batch=12, seed=3), 1))
    unfused, report = normfx.rewrite_with_report(fused, "unfuse", data=singles)
    assert len(report.applied) == 2 and all(e.details["statistics"] == "data" for e in report.applied)
    with torch.no_grad():
        z = torch.cat(singles) @ unfused.fc1.weight.T
    assert rel_error(z.double().var(0), unfused.fc1_bn.running_var) <= 1e-6
    one, report = normfx.rewrite_with_report(fused, "unfuse", data=singles[:1])  # one value: no variance
    assert all(e.details["statistics"] == "identity" for e in report.applied)
    assert all("a variance needs 2" in e.reason for e in report.applied)


def test_frozen_layers_get_frozen_batchnorms():
    fused = normfx.rewrite(models.create("conv1d"), "fuse").requires_grad_(False)
    unfused = normfx.rewrite(fused, "unfuse", data=_batches("conv1d", count=1))
    assert not any(p.requires_grad for p in unfused.parameters())


def test_fine_tuning_sees_bn_parameters():
    fused = normfx.rewrite(models.create("resnet18"), "fuse")
    unfused = normfx.rewrite(fused, "unfuse", data=_batches("resnet18", count=1))
    names = {n for n, p in unfused.named_parameters() if p.requires_grad}
    assert "conv1.weight" in names and "conv1.bias" not in names
    assert {"conv1_bn.weight", "conv1_bn.bias"} <= names
