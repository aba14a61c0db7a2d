"""Trace what can be traced: a submodule torch.fx cannot trace becomes a leaf, and its own children
are traced in turn, so one bad submodule does not cost the whole model its rewrites."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from torch import fx, nn

from ...layers import ProxyNormAct, StdConv, is_batchnorm
from .codegen import DeferredCode, RewrittenGraphModule, finish_code, is_deferred, unwritable_target

__all__ = ["NormTracer", "TracedPart", "rewrite_traceable_parts"]

log = logging.getLogger(__name__)


class NormTracer(fx.Tracer):
    """torch.fx tracer that keeps BatchNorm-like modules (subclasses included), ProxyNormAct and StdConv
    (whose eval-mode constants ``fuse`` folds) as leaves, and any module listed in ``opaque``; remembers the
    innermost module whose forward raised."""

    def __init__(self, opaque: set[str] | None = None) -> None:
        super().__init__()
        self.opaque = set(opaque or ())
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (is_batchnorm(m) or isinstance(m, (ProxyNormAct, StdConv)) or module_qualified_name in self.opaque
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


@dataclass
class TracedPart:
    """One traced graph: ``prefix`` is its module path in the whole model (``""`` for the root)."""

    prefix: str
    graph_module: fx.GraphModule
    opaque: list[str] = field(default_factory=list)

    def qualified(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix and name else (self.prefix or name)


def _trace(module: nn.Module) -> tuple[fx.GraphModule | None, list[str], str]:
    """Trace ``module``, turning failing submodules into leaves; ``(None, [], why)`` if the module's
    own forward cannot be traced."""
    opaque: list[str] = []
    limit = sum(1 for _ in module.modules())
    for _ in range(limit + 1):
        tracer = NormTracer(set(opaque))
        try:
            graph = tracer.trace(module)
        except Exception as exc:  # torch.fx raises TraceError, TypeError, ... on dynamic control flow
            failed = tracer.failed_module
            if not failed or failed in opaque:
                return None, [], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.info("torch.fx cannot trace %s (%s); treating it as a leaf", failed, type(exc).__name__)
            opaque.append(failed)
            continue
        unwritable = unwritable_target(graph)
        if unwritable:  # torch.fx itself could not write its code (our code could, but not pickle or torch.export)
            return None, [], f"torch.fx cannot write code for it: {unwritable}"
        name = module.__class__.__name__
        graph.set_codegen(DeferredCode())  # the rewrite changes the graph: its code is generated once, at the end
        return RewrittenGraphModule(tracer.root, graph, name), opaque, ""
    return None, [], "tracing did not converge"


def rewrite_traceable_parts(
    module: nn.Module,
    rewrite_graph: Callable[[TracedPart], fx.GraphModule],
    on_untraceable: Callable[[str, str], None],
    prefix: str = "",
    make_private: Callable[[nn.Module], nn.Module] = lambda m: m,
    wanted: Callable[[nn.Module], bool] = is_batchnorm,
) -> nn.Module:
    """Apply ``rewrite_graph`` to every traceable part of ``module``; returns the new module.

    The module is traced with failing submodules as leaves; each such leaf is handled the same way
    (recursively), and a module whose own forward is untraceable keeps its type while its children
    are rewritten. ``on_untraceable(path, why)`` is told about each module that could not be traced.
    ``make_private(m)`` returns a module safe to edit in place (a copy of a caller's module).
    ``wanted(m)`` says which modules the rewrite is about (default: BatchNorm): children of an
    untraceable module are traced only when they hold one.
    """
    graph_module, opaque, why = _trace(module)
    if graph_module is None:
        on_untraceable(prefix, why)
        module = make_private(module)
        for child_name, child in list(module.named_children()):
            if wanted(child) or not any(wanted(m) for m in child.modules()):
                continue  # nothing to rewrite inside; a lone wanted module here has no traced neighbours
            path = f"{prefix}.{child_name}" if prefix else child_name
            setattr(module, child_name,
                    rewrite_traceable_parts(child, rewrite_graph, on_untraceable, path, make_private, wanted))
        return module
    for name in opaque:
        path = f"{prefix}.{name}" if prefix else name
        on_untraceable(path, "torch.fx cannot trace it")
        inner = graph_module.get_submodule(name)
        graph_module.set_submodule(name, rewrite_traceable_parts(inner, rewrite_graph, on_untraceable, path, make_private,
                                                                 wanted))
    part = TracedPart(prefix, graph_module, list(opaque))
    result = rewrite_graph(part)
    if isinstance(result, fx.GraphModule) and is_deferred(result):  # the one place a traced part gets its code
        finish_code(result)
    return result
