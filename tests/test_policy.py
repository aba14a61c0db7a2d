"""Policy parsing, the registry and per-layer overrides."""

import pytest

import normfx
from normfx.errors import PolicyError
from normfx.policy import Option, PolicySpec, Step, get_policy, parse_policy, policy_names, register_policy


def test_builtin_policies_registered():
    assert {"keep", "frozen", "unfrozen", "fuse", "precise", "adaptive"} <= set(policy_names())


def test_step_with_options_is_typed():
    step = Step.parse("fuse:forward=false,duplicate_shared=0")
    assert step.name == "fuse"
    assert step.option("forward") is False
    assert step.option("duplicate_shared") is False
    assert str(step) == "fuse:duplicate_shared=False,forward=False"
    assert Step.parse("fuse").option("forward") is True


def test_unknown_policy_lists_valid_names():
    with pytest.raises(PolicyError) as err:
        parse_policy("fusee")
    message = str(err.value)
    assert "'fusee'" in message and "fuse" in message and "frozen" in message and "keep" in message


def test_unknown_option_lists_valid_options():
    with pytest.raises(PolicyError, match="unknown option.*bogus.*valid options: border_correction, duplicate_shared, forward"):
        parse_policy("fuse:bogus=1")


def test_option_without_value_and_bad_type():
    with pytest.raises(PolicyError, match="key=value"):
        parse_policy("fuse:forward")
    with pytest.raises(PolicyError, match="expects bool"):
        parse_policy("fuse:forward=maybe")
    with pytest.raises(PolicyError, match="expects int"):
        parse_policy("precise:num_batches=ten")
    with pytest.raises(PolicyError, match="given twice"):
        parse_policy("fuse:forward=true,forward=false")


def test_keyword_options_fill_steps_and_unknown_keywords_raise():
    policy = parse_policy("fuse", {"forward": False})
    assert policy.ordered_steps()[0].option("forward") is False
    with pytest.raises(PolicyError, match="unknown option"):
        parse_policy("frozen", {"forward": False})


def test_sequence_and_overrides_first_match_wins():
    policy = parse_policy({"backbone.*": "frozen", "head.*": ["frozen", "unfrozen"], "*": "keep"})
    assert [s.name for s in policy.steps_for("backbone.layer1.bn")] == ["frozen"]
    assert [s.name for s in policy.steps_for("head.bn")] == ["frozen", "unfrozen"]
    assert [s.name for s in policy.steps_for("neck.bn")] == ["keep"]
    assert [s.name for s in policy.ordered_steps()] == ["frozen", "unfrozen", "keep"]
    first = parse_policy({"a*": "frozen", "ab*": "keep"})
    assert [s.name for s in first.steps_for("abc")] == ["frozen"]
    assert parse_policy(["frozen", "unfrozen"]).ordered_steps() == [Step.parse("frozen"), Step.parse("unfrozen")]


@pytest.mark.parametrize("bad", [[], {}, 3, [3], None])
def test_malformed_policies_raise(bad):
    with pytest.raises(PolicyError):
        parse_policy(bad)


def test_registry_accepts_new_policy_and_refuses_duplicates():
    def run(model, ctx):
        for name, module in model.named_modules():
            if ctx.targets(name) and normfx.layers.is_batchnorm(module):
                ctx.report.add(name, ctx.rule, "kept", "test policy")
        return model

    spec = PolicySpec("test-noop", "does nothing", {"level": Option("level", int, 1)}, torch_pass=run)
    register_policy(spec, replace=True)
    assert get_policy("test-noop").options["level"].default == 1
    with pytest.raises(PolicyError, match="already registered"):
        register_policy(spec)
    with pytest.raises(PolicyError, match="invalid policy name"):
        register_policy(PolicySpec("bad:name", ""))


def test_torchscript_modules_are_refused_with_a_hint():
    import torch

    from normfx.errors import ModelError

    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval())
    with pytest.raises(ModelError, match="pass the eager nn.Module"):
        normfx.rewrite(scripted, "fuse")
    with pytest.raises(ModelError, match="pass the eager nn.Module"):
        normfx.recompute_stats(scripted, [torch.randn(2, 3, 4, 4)])
