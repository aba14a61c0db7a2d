"""Numeric helpers shared by the tests."""

from __future__ import annotations

import collections

import onnx
import torch
from torch import nn

from normfx import models
from normfx.layers import ProxyNormAct, is_batchnorm


def rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max|Δ| / max|y_ref| in float64."""
    reference, candidate = reference.detach().double(), candidate.detach().double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def fp32_tolerance(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Relative tolerance between two float32 runs of ``model``'s function on ``x``: ``max(1e-5, (k + 1) x floor)``,
    floor = the model's own float32 error against its float64 run (the house rule for deep models, see
    ``normfx.noise``; k + 1 because both runs carry a floor). 1e-5 for every model with a floor under ~3e-6."""
    from normfx.noise import DEFAULT_RTOL, K_FLOOR, measure_baseline
    from normfx.verify import as_runner

    floor = max(measure_baseline(model, as_runner(model)[0], [x.detach().numpy()]).floors)
    return max(DEFAULT_RTOL, (K_FLOOR + 1) * floor)


def storages(module: torch.nn.Module) -> set[int]:
    """Data pointers of every parameter and buffer (to prove nothing is shared)."""
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers()) if t.numel()}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def randomize_proxy_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every ProxyNormAct parameter and GroupNorm affine away from its init (a fold of defaults proves nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ProxyNormAct):
                c = module.num_channels
                module.weight.copy_((torch.rand(c, generator=generator) * 1.5 + 0.25)
                                    * torch.where(torch.rand(c, generator=generator) < 0.2, -1.0, 1.0))
                module.bias.copy_(torch.randn(c, generator=generator) * 0.5)
                module.proxy_weight.copy_(torch.randn(c, generator=generator) * 0.2)
                module.proxy_bias.copy_(torch.randn(c, generator=generator) * 0.2)
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.3)
            elif is_batchnorm(module):
                models.randomize_batchnorm(module, seed)
    return model.eval()


def constant_nodes(proto: onnx.ModelProto) -> list[str]:
    """Nodes (other than Constant) whose every input is a constant: an initializer, a Constant, or such a node's
    output — work that depends on no input, e.g. proxy statistics computed at run time."""
    known = {i.name for i in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant":
            known.update(node.output)
        elif inputs and all(i in known for i in inputs):
            known.update(node.output)
            found.append(node.op_type)
    return found


def run_gloo_ranks(worker_source: str, tmp_path, world: int = 2, extra_args: tuple[str, ...] = ()) -> list:
    """Run ``worker_source`` as ``world`` processes (argv: rank, world, rendezvous file, output folder, *extra_args)
    on one machine with the repository importable and one thread each; every rank must exit 0 and write
    ``<tmp_path>/rank<r>.pt``. Returns what each rank saved."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = Path(tmp_path) / "worker.py"
    script.write_text(worker_source)
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(Path(tmp_path) / "rendezvous"),
                               str(tmp_path), *extra_args], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{logs[rank]}"
    return [torch.load(Path(tmp_path) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def fx_calls(model: torch.nn.Module, by_name: bool = False) -> collections.Counter:
    """What every torch.fx graph of ``model`` calls: module types (``call_module``) and function/method targets,
    counted; with ``by_name``, each keyed by its name (``"PReLU"``, ``"mul"``)."""

    from torch import fx

    counts: collections.Counter = collections.Counter()
    for module in model.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_module":
                kind = type(module.get_submodule(node.target))
                counts[kind.__name__ if by_name else kind] += 1
            elif node.op in ("call_function", "call_method"):
                counts[getattr(node.target, "__name__", str(node.target)) if by_name else node.target] += 1
    return counts


def load_example(name: str):
    """Import ``examples/<name>.py`` as module ``name`` (registered in sys.modules while in use, so its dataclasses
    resolve their annotations), with ``examples/`` importable; a context manager yielding the module."""
    import contextlib
    import importlib.util
    import os
    import sys

    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

    @contextlib.contextmanager
    def loaded():
        sys.path.insert(0, examples)
        try:
            spec = importlib.util.spec_from_file_location(name, os.path.join(examples, f"{name}.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            yield module
        finally:
            sys.modules.pop(name, None)
            sys.path.remove(examples)

    return loaded()
