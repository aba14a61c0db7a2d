"""Pure math of the pre-activation fold (normfx/preact.py): the split through each activation, the kept-BN
re-parameterization, and the offset solver."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normfx.errors import RewriteError
from normfx.preact import (
    OffsetSolver,
    activation_reference,
    apply_split,
    propagate_channels,
    reparameterize_bn,
    sign_flip,
    split_activation,
)

CASES = [("relu", None), ("relu6", None), ("leaky_relu", np.array([0.1])), ("prelu", np.array([0.25])),
         ("prelu", "per_channel")]


def _bn(rng, c):
    scale = rng.uniform(0.3, 2.0, c) * np.where(rng.random(c) < 0.4, -1.0, 1.0)
    scale[0], scale[1], scale[2] = 1.3, -0.7, 0.0  # s > 0, s < 0 and s = 0 channels always present
    return scale, rng.normal(0, 0.5, c)


@pytest.mark.parametrize("act,slope", CASES)
@pytest.mark.parametrize("stream", ["one", "signed"])
def test_split_is_exact_for_positive_negative_and_zero_scales(act, slope, stream):
    rng = np.random.default_rng(0)
    c = 7
    s, t = _bn(rng, c)
    if isinstance(slope, str):
        slope = rng.uniform(-0.5, 0.5, c)
    a = np.ones(c) if stream == "one" else rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.5, -1, 1)
    x = rng.normal(0, 3, (4, c, 5, 5))
    split = split_activation(s, t, act, slope=slope, stream_scale=a)
    z = a.reshape(1, c, 1, 1) * x + split.offset.reshape(1, c, 1, 1)  # what the producers now store
    expected = activation_reference(act, s.reshape(1, c, 1, 1) * x + t.reshape(1, c, 1, 1), slope)
    np.testing.assert_allclose(apply_split(split, z), expected, rtol=0, atol=1e-12)
    assert split.gain[2] == 0 and split.offset[2] == 0  # s = 0: a constant channel, no offset needed
    assert split.constant[2] == pytest.approx(float(activation_reference(act, t[2:3], slope if slope is None or
                                                                        slope.size == 1 else slope[2:3])[0]))


def test_relu_keeps_its_form_when_every_scale_is_positive():
    split = split_activation(np.array([0.5, 2.0]), np.array([0.1, -0.3]), "relu")
    assert np.all(split.lower == 0) and np.all(np.isinf(split.upper))
    np.testing.assert_allclose(split.offset, [0.2, -0.15])
    np.testing.assert_allclose(split.gain, [0.5, 2.0])


def test_relu6_moves_its_clip_to_six_over_k_and_keeps_it_at_unit_stream_scale():
    split = split_activation(np.array([2.0, -3.0]), np.array([0.0, 0.0]), "relu6")
    np.testing.assert_allclose(split.upper, [3.0, 0.0])
    np.testing.assert_allclose(split.lower, [0.0, -2.0])
    same = split_activation(np.array([2.0, -3.0]), np.array([0.4, 0.1]), "relu6", stream_scale=np.array([2.0, -3.0]))
    np.testing.assert_allclose(same.upper, [6.0, 6.0])  # the stream carries the scale: ReLU6 stays ReLU6
    np.testing.assert_allclose(same.gain, [1.0, 1.0])


def test_prelu_with_slope_zero_and_negative_scale_is_refused_with_the_reason():
    with pytest.raises(RewriteError, match="slope 0 with a negative scale"):
        split_activation(np.array([1.0, -1.0]), np.zeros(2), "prelu", slope=np.array([0.2, 0.0]))


def test_unknown_activation_is_refused():
    with pytest.raises(RewriteError, match="not positively homogeneous"):
        split_activation(np.ones(2), np.zeros(2), "silu")


def test_reparameterized_bn_reads_the_stored_tensor_exactly():
    rng = np.random.default_rng(1)
    c = 5
    mean, var, w, b, eps = rng.normal(size=c), rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=c), 1e-5
    a, o = rng.uniform(0.5, 2, c) * np.array([1, -1, 1, -1, 1]), rng.normal(size=c)
    x = rng.normal(size=(3, c))
    mean2, w2 = reparameterize_bn(mean, w, a, o)
    bn = (x - mean) / np.sqrt(var + eps) * w + b
    np.testing.assert_allclose(((a * x + o) - mean2) / np.sqrt(var + eps) * w2 + b, bn, atol=1e-12)


def _chain_solver(blocks: int, rng):
    """stem conv → [BN reads x_k; x_{k+1} = x_k + conv_k] like a pre-activation ResNet stage."""
    solver = OffsetSolver()
    solver.producer("stem", 3)
    keys = ["stem"]
    wants = []
    for k in range(blocks):
        s, t = rng.uniform(0.5, 2, 3) * np.array([1, -1, 1]), rng.normal(size=3)
        solver.site(k, keys[-1], s, t, "relu")
        wants.append((keys[-1], s, t))
        solver.producer(f"branch{k}", 3)
        solver.add(f"x{k + 1}", [keys[-1], f"branch{k}"])
        keys.append(f"x{k + 1}")
    solver.require_zero(keys[-1], False, "the model output")
    return solver, wants, keys


def test_solver_carries_every_offset_of_a_residual_stream():
    rng = np.random.default_rng(2)
    solver, wants, keys = _chain_solver(4, rng)
    solution = solver.solve()
    assert not solution.kept
    for key, s, t in wants:
        a = solution.scale[key]
        np.testing.assert_allclose(solution.offset[key], a * t / s, atol=1e-12)
    np.testing.assert_allclose(solution.offset[keys[-1]], 0, atol=1e-12)
    np.testing.assert_array_equal(solution.scale[keys[-1]], 1)  # the output needs the true values
    assert np.all(solution.scale["stem"] == 1)  # one class: fixed by the output


def test_solver_keeps_the_second_of_two_readers_of_one_tensor_with_the_reason():
    solver = OffsetSolver()
    solver.producer("conv", 2)
    solver.cat("cat1", ["conv"])
    solver.site("first", "conv", np.array([1.0, 2.0]), np.array([0.5, 0.5]), "relu", "'first'")
    solver.site("second", "cat1", np.array([1.0, 2.0]), np.array([-0.5, 0.5]), "relu", "'second'")
    solution = solver.solve()
    assert list(solution.kept) == ["second"]
    assert "'first' needs" in solution.kept["second"]
    np.testing.assert_allclose(solution.offset["conv"], solution.scale["conv"] * np.array([0.5, 0.25]))


def test_solver_cannot_carry_an_offset_on_a_source_and_says_where_it_comes_from():
    solver = OffsetSolver()
    solver.source("x", 2, "the model input 'x'")
    solver.site("bn", "x", np.array([1.0, 1.0]), np.array([0.1, 0.0]), "relu")
    solution = solver.solve()
    assert "comes from the model input 'x'" in solution.kept["bn"]


def test_solver_max_pool_takes_a_positive_stream_scale_only():
    solver = OffsetSolver()
    solver.producer("conv", 2)
    solver.pool("pool", "conv", positive=True)
    solver.site("bn", "pool", np.array([-2.0, 3.0]), np.array([1.0, 1.0]), "relu")
    solution = solver.solve()
    np.testing.assert_allclose(solution.scale["conv"], [2.0, 3.0])
    np.testing.assert_allclose(solution.offset["pool"], [-1.0, 1.0])  # a·t/s


def test_solver_selects_channel_slices():
    solver = OffsetSolver()
    solver.producer("conv", 4)
    solver.select("lo", "conv", [0, 1])
    solver.select("hi", "conv", [2, 3])
    solver.site("a", "lo", np.ones(2), np.array([1.0, 2.0]), "relu")
    solver.site("b", "hi", np.ones(2), np.array([3.0, 4.0]), "relu")
    solution = solver.solve()
    np.testing.assert_allclose(solution.offset["conv"], [1, 2, 3, 4])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(0, 10_000), st.sampled_from(["relu", "relu6", "leaky_relu"]))
def test_split_identity_over_channel_counts(c, seed, act):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=c)
    s[rng.random(c) < 0.2] = 0.0
    t, a = rng.normal(size=c), rng.uniform(0.2, 3, c) * np.where(rng.random(c) < 0.5, -1, 1)
    slope = np.array([0.05]) if act == "leaky_relu" else None
    split = split_activation(s, t, act, slope=slope, stream_scale=a)
    x = rng.normal(0, 4, (2, c, 3))
    z = a.reshape(1, c, 1) * x + split.offset.reshape(1, c, 1)
    expected = activation_reference(act, s.reshape(1, c, 1) * x + t.reshape(1, c, 1), slope)
    np.testing.assert_allclose(apply_split(split, z), expected, atol=1e-10)


def test_sign_flip_rewrites_a_relu_clamp_as_sign_relu_sign():
    inf = np.inf
    lower, upper = np.array([0.0, -inf, 0.0, 5.0]), np.array([inf, 0.0, inf, 7.0])
    gain = np.array([2.0, -3.0, 1.0, 0.0])  # the last channel is dead: its bounds do not matter
    signs = sign_flip(lower, upper, gain)
    np.testing.assert_array_equal(signs, [1.0, -1.0, 1.0, 1.0])
    z = np.random.default_rng(0).normal(size=(4, 100))
    clamped = np.clip(z, lower[:, None], upper[:, None])
    live = gain != 0
    np.testing.assert_array_equal((signs[:, None] * np.maximum(signs[:, None] * z, 0))[live], clamped[live])
    assert sign_flip(np.zeros(2), np.array([6.0, 6.0])) is None  # ReLU6 bounds


def test_propagate_channels_through_add_cat_and_select():
    ops = {"sum": ("add", ["a", "b"]), "cat": ("cat", ["sum", "c"]), "half": ("select", ["cat"]),
           "back": ("cat", ["d", "e"])}
    channels = {"a": 4, "c": 3, "back": 9, "d": 5}
    propagate_channels(ops, channels, lambda node, n: n // 2)
    assert channels == {"a": 4, "b": 4, "sum": 4, "c": 3, "cat": 7, "half": 3, "back": 9, "d": 5, "e": 4}
