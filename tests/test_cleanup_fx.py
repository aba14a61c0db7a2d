"""Nothing left behind in ``fuse``'s fx output: no Identity, no Dropout in eval, no Sequential wrapper around a
folded BN+activation module's activation; kept modules keep their state_dict keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import fx_calls, rel_error
from torch import nn

import normfx
from normfx import models
from normfx.models import BatchNormAct2d

NO_OPS = (nn.Identity, nn.modules.dropout._DropoutNd, nn.Sequential)
DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


def _randomized(model: nn.Module, seed: int = 4) -> nn.Module:
    models.randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _left_behind(model: nn.Module) -> dict:
    return {k: v for k, v in fx_calls(model).items()
            if (isinstance(k, type) and issubclass(k, NO_OPS)) or k in DROPOUT_FUNCTIONS}


@pytest.mark.parametrize("name", models.names())
def test_fused_zoo_graph_has_no_identity_dropout_or_sequential_call(name):
    model = models.create(name, seed=3)
    x = models.example_input(name, batch=2, seed=3)
    with torch.no_grad():
        y = model(x)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert _left_behind(fused) == {}
    with torch.no_grad():
        assert rel_error(y, fused(x)) <= 1e-5
    dropouts = sum(isinstance(m, nn.Dropout) for m in model.modules())
    if dropouts:  # the classifier's Dropout (eval) is removed and named in one note
        assert any("identity in eval" in n and "Dropout" in n for n in report.notes)


class _Net(nn.Module):
    def __init__(self, act=nn.ReLU, drop_training: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = BatchNormAct2d(4, act_layer=act)
        self.skip = nn.Identity()
        self.drop = nn.Dropout2d(0.3)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.drop_training = drop_training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.skip(self.bn(self.conv(x))))
        return F.dropout(self.conv2(y), 0.1, self.training)


def test_bn_act_keeps_its_activation_as_a_direct_call_at_its_own_key():
    model = _randomized(_Net(act=lambda: nn.PReLU(4)))
    with torch.no_grad():
        model.bn.act.weight.uniform_(0.1, 0.4)
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert _left_behind(fused) == {}
    assert fx_calls(fused)[nn.PReLU] == 1
    assert set(fused.state_dict()) == {"conv.weight", "conv.bias", "bn.act.weight", "conv2.weight", "conv2.bias"}
    assert rel_error(model(x), fused(x)) <= 1e-5
    note = next(n for n in report.notes if "identity in eval" in n)
    assert "Identity 'skip'" in note and "Dropout2d 'drop'" in note and "dropout()" in note


def test_dropout_in_train_mode_and_identity_subclass_with_own_forward_stay():
    class Doubling(nn.Identity):
        def forward(self, x):
            return 2 * x

    model = _randomized(_Net())
    model.skip = Doubling()  # not a leaf for torch.fx: traced into its multiplication, which stays
    x = torch.randn(2, 3, 8, 8)
    assert rel_error(model(x), normfx.rewrite(model, "fuse")(x)) <= 1e-5
    model.drop.train()  # a Dropout the user left in train mode is not a no-op
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert fx_calls(fused)[nn.Dropout2d] == 1
    assert not any("Dropout2d" in n for n in report.notes)


def test_bn_act_module_called_twice_folds_at_bothfx_calls():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 3, padding=0, bias=False)
            self.bn = BatchNormAct2d(4, act_layer=nn.SiLU)

        def forward(self, x):
            return self.bn(self.a(x)) - self.bn(self.b(x))

    model = _randomized(Twice())
    x = torch.randn(2, 3, 6, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert [e.status for e in report.entries] == ["applied", "applied"]
    assert _left_behind(fused) == {} and fx_calls(fused)[nn.SiLU] == 2
    assert not any(k.startswith("bn.") and "running" in k for k in fused.state_dict())
    assert rel_error(model(x), fused(x)) <= 1e-5


def test_drop_path_in_eval_leaves_no_call():
    class DropPath(nn.Module):  # as timm's: the identity unless training with drop_prob > 0
        def __init__(self, drop_prob: float = 0.1) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop_prob
            return x * keep / (1 - self.drop_prob)

    model = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), DropPath(), nn.ReLU()))
    fused = normfx.rewrite(model, "fuse")
    assert [n.op for n in fused.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
