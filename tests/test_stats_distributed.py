"""Precise BN under torch.distributed: 2 CPU processes (gloo) split the data; both ranks must end with
the single-process statistics over the union (≤ 1e-6), identical to each other; a failure on one rank
must fail both instead of hanging."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from helpers import rel_error, run_gloo_ranks

from normfx import models
from normfx.stats import diagnose_ema, recompute_stats_with_report

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6

SIZES = [6, 4, 6, 5, 3]  # unequal batches; rank 0 takes batches 0, 2, 4 and rank 1 takes 1, 3
MODELS = ("trap_shared_bn", "resnet18")  # a BN called twice per forward, and a deep net


def make_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn((n, 3, 32, 32), generator=g) * 1.5 + 0.5 for n in SIZES]


WORKER = textwrap.dedent(
    """
    import datetime, sys, traceback
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_stats_distributed import MODELS, make_batches
    from normfx import models
    from normfx.stats import diagnose_ema, recompute_stats_with_report

    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    batches = make_batches()[rank::world]
    result = {{}}
    for name in MODELS:
        model = models.create(name, seed=3)
        out, report = recompute_stats_with_report(model, batches, progress=False)
        result[name] = {{
            "state": {{k: v.clone() for k, v in out.state_dict().items()}},
            "details": {{e.name: (e.status, e.details.get("calls"), e.details.get("count"), e.details.get("world_size"))
                         for e in report.entries}},
        }}
    result["diagnosis"] = diagnose_ema(models.create("resnet18", seed=3), batches, progress=False).to_dict()
    # a bad batch on rank 1 only: both ranks must raise (no rank may wait forever in a collective)
    bad = batches if rank == 0 else batches[:1] + [torch.randn(2, 5, 32, 32)]
    try:
        recompute_stats_with_report(models.create("resnet18", seed=3), bad, progress=False)
        result["failure"] = None
    except Exception as exc:
        result["failure"] = (type(exc).__name__, str(exc))
    torch.save(result, f"{{out_dir}}/rank{{rank}}.pt")
    dist.destroy_process_group()
    """
)


def run_ranks(tmp_path: Path, world: int = 2) -> list[dict]:
    return run_gloo_ranks(WORKER.format(tests=str(ROOT / "tests")), tmp_path, world)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """One 2-process run serves every test of this module (starting processes is the slow part)."""
    return run_ranks(tmp_path_factory.mktemp("dist"))


def test_two_gloo_ranks_equal_single_process_over_the_union(ranks):
    batches = make_batches()
    for name in MODELS:
        single, report = recompute_stats_with_report(models.create(name, seed=3), batches, progress=False)
        expected = single.state_dict()
        bn_keys = [k for k in expected if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert bn_keys
        for key in bn_keys:
            a, b = ranks[0][name]["state"][key], ranks[1][name]["state"][key]
            assert torch.equal(a, b), f"{name} {key}: ranks differ"
            if key.endswith("num_batches_tracked"):
                assert torch.equal(a, expected[key]), key
            else:
                assert rel_error(expected[key], a) <= TOL, f"{name} {key}"
        # the report counts the union: calls and values per channel of all ranks, world size 2
        single_details = {e.name: (e.status, e.details.get("calls"), e.details.get("count")) for e in report.entries}
        for layer, (status, calls, count, world_size) in ranks[0][name]["details"].items():
            assert (status, calls, count) == single_details[layer]
            assert world_size == 2
        # everything else (weights) untouched and equal
        for key, value in expected.items():
            if key not in bn_keys:
                assert torch.equal(ranks[0][name]["state"][key], value)
    shared = ranks[0]["trap_shared_bn"]["details"]
    assert any(calls == 2 * len(SIZES) for _, calls, _, _ in shared.values())  # the BN used twice, both calls


def test_diagnosis_is_the_same_on_every_rank_and_failures_propagate(ranks):
    d0, d1 = ranks[0]["diagnosis"], ranks[1]["diagnosis"]
    assert d0 == d1 and d0["world_size"] == 2 and d0["batches"] == len(SIZES)
    single = diagnose_ema(models.create("resnet18", seed=3), make_batches(), progress=False).to_dict()
    for row, ref in zip(d0["layers"], single["layers"]):
        assert row["layer"] == ref["layer"] and row["calls"] == ref["calls"]
        assert abs(row["mean_shift_max"] - ref["mean_shift_max"]) <= 1e-5 * max(1.0, ref["mean_shift_max"])
    kind0, _ = ranks[0]["failure"]
    kind1, message1 = ranks[1]["failure"]
    assert kind0 == "RewriteError"  # rank 0's data was fine; it learns that another rank failed
    assert kind1 == "InputDataError" and "batch 1" in message1
