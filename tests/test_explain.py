"""explain: every BN of every zoo model gets an entry with an action, and skips carry a reason."""

import json

import pytest

import normfx
from normfx import models
from normfx.layers import is_batchnorm


@pytest.mark.parametrize("policy", ["frozen", "unfrozen", "keep", "fuse"])
@pytest.mark.parametrize("name", models.names())
def test_explain_lists_every_bn_with_an_action(name, policy):
    model = models.create(name)
    bn_names = {n for n, m in model.named_modules() if is_batchnorm(m)}
    report = normfx.explain(model, policy, example_inputs=models.example_input(name))
    assert bn_names <= report.names()
    for entry in report.entries:
        assert entry.status in ("applied", "skipped", "kept")
        if entry.status != "applied":
            assert entry.reason, entry
    json.dumps(report.to_dict())  # JSON-able
    assert report.to_dict()["summary"]["applied"] == len(report.applied)


def test_explain_does_not_touch_the_model():
    model = models.create("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    normfx.explain(model, ["frozen", "unfrozen"])
    normfx.explain(model, "fuse")
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())
    assert type(model.bn1).__name__ == "BatchNorm2d"
