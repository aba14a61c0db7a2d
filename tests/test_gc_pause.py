"""Graph passes run with Python's cyclic collector paused, and leave it as they found it."""

import gc

import pytest

import normfx
from normfx import models
from normfx.gc_pause import paused_gc


@pytest.mark.parametrize("enabled_before", [True, False])
def test_paused_gc_restores_the_collector_state_even_on_error(enabled_before):
    (gc.enable if enabled_before else gc.disable)()
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert gc.isenabled() == enabled_before
        with pytest.raises(ValueError), paused_gc():
            raise ValueError("a failing pass")
        assert gc.isenabled() == enabled_before
    finally:
        gc.enable()


def test_a_fuse_pass_runs_without_collections_and_leaves_the_collector_on(monkeypatch):
    model = models.create("resnet18", seed=1)
    x = models.example_input("resnet18", batch=1)
    states = []
    from normfx.passes.fx import fuse

    original = fuse.run

    def spying(work, ctx):
        states.append(gc.isenabled())
        return original(work, ctx)

    monkeypatch.setattr(fuse, "run", spying)  # policies import their pass when they run it
    normfx.rewrite(model, "fuse", example_inputs=x)
    assert states == [False]
    assert gc.isenabled()


def test_a_step_that_reads_data_runs_with_the_collector_on(monkeypatch):
    model = models.create("resnet18", seed=1)
    x = models.example_input("resnet18", batch=2)
    states = {}
    from normfx import stats
    from normfx.passes.fx import fuse

    for module, name in ((stats, "run_precise"), (fuse, "run")):
        original = getattr(module, name)

        def spying(work, ctx, original=original, label=name):
            states[label] = gc.isenabled()
            return original(work, ctx)

        monkeypatch.setattr(module, name, spying)
    normfx.rewrite(model, ["precise", "fuse"], example_inputs=x, data=[x, x])
    assert states == {"run_precise": True, "run": False}
