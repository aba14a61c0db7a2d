"""Small ONNX graphs for the ONNX pass tests, built with ``onnx.helper``, with randomized BN statistics."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def bn_stats(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    """Randomized BN parameters: mean ≠ 0, var ≠ 1, gamma ≠ 1 (some negative), beta ≠ 0."""
    gamma = rng.uniform(0.4, 1.8, c) * np.where(rng.random(c) < 0.3, -1.0, 1.0)
    gamma[0] = -abs(gamma[0])  # at least one negative scale
    return {
        "scale": gamma.astype(np.float32),
        "B": rng.normal(0.5, 0.7, c).astype(np.float32),
        "mean": rng.normal(0.4, 0.8, c).astype(np.float32),
        "var": rng.uniform(0.2, 3.0, c).astype(np.float32),
    }


class Builder:
    """Accumulates nodes, initializers and I/O; ``model()`` makes the ModelProto, ``feeds()`` inputs."""

    def __init__(self, seed: int = 0, *, opset: int = 15, ir_version: int = 8) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset, self.ir_version = opset, ir_version
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, Sequence[Any]] = {}
        self._count = 0

    def _name(self, base: str) -> str:
        self._count += 1
        return f"{base}{self._count}"

    def input(self, name: str, shape: Sequence[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, FLOAT, list(shape)))
        self.shapes[name] = shape
        return name

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, shape: Sequence[int], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        return self.init(name, (self.rng.normal(0, s, shape)).astype(np.float32))

    def node(
        self, op: str, inputs: Sequence[str], n_out: int = 1, name: str | None = None,
        out: Sequence[str] | None = None, **attrs: Any,
    ) -> Any:
        outs = list(out) if out is not None else [self._name(f"{op.lower()}_out") for _ in range(n_out)]
        name = name if name is not None else self._name(op)
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def bn(
        self, x: str, c: int, *, name: str | None = None, out: str | None = None, eps: float = 1e-5, **attrs: Any
    ) -> str:
        base = name if name is not None else self._name("bn")
        prefix = self._name(f"{base or 'bn'}_")
        stats = bn_stats(self.rng, c)
        ins = [x] + [self.init(f"{prefix}.{k}", v) for k, v in stats.items()]
        kwargs = {"epsilon": eps, **attrs}
        return self.node("BatchNormalization", ins, name=base, out=[out] if out else None, **kwargs)

    def conv(self, x: str, cin: int, cout: int, k: int | Sequence[int], *, dims: int = 2, groups: int = 1,
             bias: bool = True, transpose: bool = False, name: str | None = None, **attrs: Any) -> str:
        kernel = [k] * dims if isinstance(k, int) else list(k)
        base = name or self._name("convt" if transpose else "conv")
        shape = [cin, cout // groups, *kernel] if transpose else [cout, cin // groups, *kernel]
        ins = [x, self.weight(f"{base}.weight", shape)]
        if bias:
            ins.append(self.init(f"{base}.bias", self.rng.normal(0, 0.3, cout).astype(np.float32)))
        return self.node("ConvTranspose" if transpose else "Conv", ins, name=base, group=groups, **attrs)

    def output(self, name: str, shape: Sequence[Any] | None = None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, FLOAT, list(shape) if shape is not None else None))
        return name

    def model(self, **fields: Any) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits, value_info=self.value_info)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], **fields)
        model.ir_version = self.ir_version
        if self.ir_version < 4:  # IR 3: every initializer is also a graph input
            declared = (helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits)
            model.graph.input.extend(declared)
        # outputs declared without a shape get the inferred one (the checker wants a shape field)
        inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.output}
        for vi in model.graph.output:
            if not vi.type.tensor_type.HasField("shape") and vi.name in inferred:
                vi.CopyFrom(inferred[vi.name])
        return model

    def feeds(self, batch: int = 3) -> dict[str, np.ndarray]:
        out = {}
        for vi in self.inputs:
            if vi.name not in self.shapes:  # an initializer declared as an input: its default is used
                continue
            shape = [batch if not isinstance(d, int) else d for d in self.shapes[vi.name]]
            out[vi.name] = self.rng.normal(0.3, 1.2, shape).astype(np.float32)
        return out
