"""ONNX passes (onnx-graphsurgeon), one file per rule family; the math is :mod:`normfx.fold`.

- :mod:`.io` — load a private copy of a model (file or ModelProto), name BatchNormalization nodes
- :mod:`.keep` / :mod:`.fuse` — the ``keep`` and ``fuse`` policies (``run(model, ctx)``)
- :mod:`.conv_bn` — Conv / ConvTranspose → BN          (backward fold)
- :mod:`.gemm_bn` — Gemm / MatMul(+Add) → BN            (backward fold)
- :mod:`.bn_conv` — BN → Conv / ConvTranspose           (forward fold; padded convs exactly)
- :mod:`.bn_gemm` — BN → Gemm / MatMul                  (forward fold)
- :mod:`.standalone_bn` — a BN nothing folds: kept (ORT's kernel is the cheapest form)
- :mod:`.unfuse` — the ``unfuse`` policy: Conv / ConvTranspose / Gemm / MatMul(+Add) → layer (no bias) → BN;
  :mod:`.unfuse_sites` finds and checks its layers
- :mod:`.bn`, :mod:`.chain`, :mod:`.shapes`, :mod:`.constants`, :mod:`.edits`, :mod:`.rule`,
  :mod:`.names`, :mod:`.workspace` — shared: reading a BN, shape chains, symbolic shapes, constant
  subgraphs, surgery helpers, the rule result types, fresh names, and the gs import/export
"""
