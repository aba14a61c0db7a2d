"""Fast module access in the code torch.fx generates.

torch.fx writes a call to the module at ``stages.0.conv.0`` as ``getattr(getattr(self.stages, "0").conv, "0")(x)``:
one ``nn.Module.__getattr__`` (a Python function) per level. On a small deployed model that is a measurable
share of an eager forward (MobileOne after ``fuse``: 22 such calls, about 1.5 µs per level, ~8 % of the forward).
:class:`DirectModuleAccess` writes the same call as ``self._modules['stages']._modules['0']...(x)``: plain
dictionary reads, looked up afresh on every call (a submodule replaced later is the one called), with the
module tree, the state_dict keys and the graph unchanged. Only the generated source differs.

:func:`finish_code` also drops type annotations that are strings (a model written with ``from __future__ import
annotations`` has ``x: "torch.Tensor"``): torch.fx keeps them as string globals of the generated code, and
pickling the graph module (``torch.save(model)``) then fails inside torch.fx.

:class:`DeferredCode` is the code generator of a freshly traced graph while it is rewritten: torch.fx generates a
graph module's code when it is built, and that code would be thrown away by :func:`finish_code` (a 1.5–2 ms
codegen per 100 nodes: about a tenth of a ``fuse`` pass).
"""

from __future__ import annotations

import copy
import dataclasses
import keyword
import logging

from torch import fx
from torch.fx.graph import CodeGen, PythonCode

__all__ = ["DeferredCode", "DirectModuleAccess", "RewrittenGraphModule", "finish_code", "is_deferred", "unwritable_target",
           "use_direct_module_access"]

log = logging.getLogger(__name__)


def _getattr_chain(base: str, target: str) -> str:
    """The expression torch.fx writes for ``target`` (``torch.fx.graph._format_target``)."""
    expression = base
    for element in target.split("."):
        expression = f"{expression}.{element}" if element.isidentifier() else f'getattr({expression}, "{element}")'
    return expression


def _dictionary_chain(base: str, path: list[str]) -> str:
    return base + "".join(f"._modules[{element!r}]" for element in path)


class DirectModuleAccess(CodeGen):
    """torch.fx's code generator, with module lookups written as ``_modules`` dictionary reads."""

    def _gen_python_code(self, nodes, root_module: str, namespace, **kwargs) -> PythonCode:
        code = super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        swaps: dict[str, tuple[str, str]] = {}  # node name -> (torch.fx's expression, ours), each line at most once
        for node in nodes:
            if node.op == "call_module":  # the call's opening parenthesis included: the whole expression matches
                swaps[node.name] = (_getattr_chain(root_module, node.target) + "(",
                                    _dictionary_chain(root_module, node.target.split(".")) + "(")
            elif node.op == "get_attr" and "." in node.target:
                owner, _, attr = node.target.rpartition(".")
                swaps[node.name] = (_getattr_chain(root_module, node.target),
                                    _getattr_chain(_dictionary_chain(root_module, owner.split(".")), attr))
        if not swaps:
            return code
        # a node's line is ``name[ : annotation] = <target expression>[(args)][;  x = None ...]``
        lines = code.src.split("\n")
        for i, line in enumerate(lines):
            head, sep, rest = line.partition(" = ")
            swap = swaps.get(head.split(":")[0].strip()) if sep else None
            if swap and rest.startswith(swap[0]):
                lines[i] = f"{head}{sep}{swap[1]}{rest[len(swap[0]):]}"
        return dataclasses.replace(code, src="\n".join(lines))


class DeferredCode(CodeGen):
    """A placeholder code generator for a graph being rewritten: the module it builds refuses to run until
    :func:`finish_code` generates the real code."""

    def _gen_python_code(self, nodes, root_module: str, namespace, **kwargs) -> PythonCode:
        src = ("\ndef forward(self, *args, **kwargs):\n"
               "    raise RuntimeError('normfx: this graph module is still being rewritten (finish_code generates its "
               "code)')\n")
        return PythonCode(src, {}, None)


class RewrittenGraphModule(fx.GraphModule):
    """The graph module of a traced part. TorchScript cannot compile ``self._modules[...]``: ``torch.jit.script``
    gets a twin with torch.fx's own code (sharing this module's submodules and tensors). The class survives
    ``copy.deepcopy``; ``torch.save``/``torch.load`` gives back a plain ``GraphModule`` with torch.fx's code."""

    def __prepare_scriptable__(self) -> fx.GraphModule:
        if type(self.graph._codegen) not in (DirectModuleAccess, DeferredCode):
            return self
        graph = copy.deepcopy(self.graph)
        graph.set_codegen(CodeGen())
        return fx.GraphModule(self, graph, type(self).__name__)


def unwritable_target(graph: fx.Graph) -> str:
    """Why torch.fx's own code generator cannot write a module or attribute target of ``graph`` as Python (a
    Python keyword, a quote or a backslash in a name: pickling and torch.export regenerate that code), or ""."""
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        for element in str(node.target).split("."):
            if keyword.iskeyword(element):
                return f"its submodule name {node.target!r} holds the Python keyword {element!r}"
            if '"' in element or "\\" in element:
                return f"its submodule name {node.target!r} holds a quote or a backslash"
    return ""


def is_deferred(gm: fx.GraphModule) -> bool:
    return isinstance(gm.graph._codegen, DeferredCode)


def use_direct_module_access(gm: fx.GraphModule) -> fx.GraphModule:
    """Regenerate ``gm``'s code with :class:`DirectModuleAccess` (a graph with its own code generator, e.g. one
    from torch.export, keeps it). Returns ``gm``."""
    if type(gm.graph._codegen) in (CodeGen, DeferredCode):
        gm.graph.set_codegen(DirectModuleAccess())
    else:
        log.debug("keeping the graph's own code generator %s", type(gm.graph._codegen).__name__)
    gm.recompile()
    return gm


def finish_code(gm: fx.GraphModule) -> fx.GraphModule:
    """The last step of every fx rewrite (``rewrite_traceable_parts`` runs it on each traced part): drop string
    annotations, then :func:`use_direct_module_access`."""
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    return use_direct_module_access(gm)
