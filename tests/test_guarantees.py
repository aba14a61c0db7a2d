"""The guarantees table (docs/guarantees.md), row by row: for each bad input, across the command line and the
Python API, the exit code (or exception type), the one-line message, every input file byte-identical
afterwards, and no partial output (no new file or folder anywhere in the working folder).

Each row runs in a fresh copy of the same small assets (a tiny ONNX model and its broken variants, data files,
factories) with the working folder as current directory; CLI rows call ``normfx.cli.main`` in-process (two also
run ``python -m normfx`` as a real process).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import normfx
from normfx import models
from normfx.cli import main
from normfx.errors import InputDataError, ModelError, PolicyError, RewriteError

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "guarantees.md"
MODEL = "conv1d"  # the zoo's smallest conv model: (1, 1, 2048) in

FACTORIES = {
    "g_raising.py": "import torch\n\ndef batches():\n    yield torch.randn(4, 1, 2048)\n    raise RuntimeError('disk gone')\n",
    "g_lazy.py": "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.LazyBatchNorm1d(), nn.ReLU())\n",
    "g_untraceable.py": "from normfx import models\n\ndef build():\n    return models.create('trap_untraceable'), "
                        "models.example_input('trap_untraceable')\n",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    import onnx

    from normfx.export import export_onnx

    folder = tmp_path_factory.mktemp("assets")
    model = models.create(MODEL).eval()
    good = export_onnx(model, (models.example_input(MODEL),))
    (folder / "good.onnx").write_bytes(good.SerializeToString())
    data = good.SerializeToString()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 3])
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "text.onnx").write_text("this is not an ONNX model\n")
    (folder / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    onnx.save(good, str(folder / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    os.remove(folder / "ext.data")  # the external data is missing
    onnx.save(onnx.load_from_string(data), str(folder / "ext_ok.onnx"), save_as_external_data=True,
              location="ext_ok.data", size_threshold=0)
    dynamic = onnx.load_from_string(data)
    dynamic.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "length"
    onnx.save(dynamic, str(folder / "dynamic.onnx"))
    static = export_onnx(model, (models.example_input(MODEL, batch=2),), dynamic_batch=False)
    (folder / "batch2.onnx").write_bytes(static.SerializeToString())
    np.savez(folder / "ints.npz", np.zeros((1, 1, 2048), np.int64))
    np.save(folder / "wrong_shape.npy", np.zeros((1, 3, 2048), np.float32))
    np.save(folder / "empty.npy", np.zeros((0, 1, 2048), np.float32))
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save({"x": _Evil()}, folder / "evil.pt")  # unpickling would run `touch PWNED`
    torch.save(models.create("mlp").state_dict(), folder / "other.pt")
    (folder / "file.txt").write_text("a file, not a folder\n")
    for name, text in FACTORIES.items():
        (folder / name).write_text(text)
    return folder


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _bn_model(var: list[float], eps: float = 1e-5) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4, eps=eps)).eval()
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor(var))
    return model


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


@dataclass
class Row:
    id: str
    surface: str  # "CLI", "CLI (process)" or "API"
    what: str
    call: Any  # CLI: argv; API: a function of the working folder
    expect: Any  # CLI: exit code; API: exception type
    message: str  # a piece of the one-line message (a regular expression)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    extra: dict = field(default_factory=dict)


def _x() -> torch.Tensor:
    return models.example_input(MODEL)


ROWS = [
    # --- files that are not (whole) ONNX models
    Row("onnx-corrupt", "CLI", "corrupt ONNX file (random bytes)", ["export", "--model", "random.onnx", "--out", "o.onnx"],
        2, r"'random.onnx' is not a readable ONNX model \(corrupt, truncated or not ONNX\)"),
    Row("onnx-truncated", "CLI", "truncated ONNX file", ["check", "truncated.onnx", "good.onnx"],
        2, r"onnxruntime cannot load truncated.onnx: .*Protobuf parsing failed"),
    Row("onnx-empty", "CLI", "empty .onnx file", ["rewrite", "--model", "empty.onnx", "--policy", "fuse", "--out", "o.onnx"],
        2, r"'empty.onnx' is not an ONNX model \(no graph or IR version\)"),
    Row("onnx-not-onnx", "CLI (process)", "a text file named .onnx",
        ["export", "--model", "text.onnx", "--out", "o.onnx"], 2, r"'text.onnx' is not a readable ONNX model"),
    Row("onnx-missing", "CLI", "model file that does not exist", ["bench", "missing.onnx"], 2,
        r"ONNX file 'missing.onnx' does not exist"),
    Row("onnx-external-missing", "CLI", "external-data model whose data file is missing",
        ["export", "--model", "ext.onnx", "--out", "o.onnx"], 2, r"'ext.onnx': cannot load its external data"),
    Row("api-onnx-truncated", "API", "truncated ONNX file", lambda d: normfx.rewrite("truncated.onnx", "fuse"),
        ModelError, r"'truncated.onnx' is not a readable ONNX model"),
    # --- weights
    Row("weights-pickle-code", "CLI (process)", "weights file holding a pickle that runs code",
        ["rewrite", "--model", MODEL, "--weights", "evil.pt", "--policy", "fuse"], 2,
        r"cannot read weights 'evil.pt' as a torch state_dict \(loaded with weights_only=True"),
    Row("weights-misfit", "CLI", "weights of another model",
        ["export", "--model", MODEL, "--weights", "other.pt", "--out", "o.onnx"], 2,
        r"weights 'other.pt' do not fit the model"),
    Row("weights-onnx", "CLI", "--weights with an ONNX model",
        ["rewrite", "--model", "good.onnx", "--weights", "other.pt", "--policy", "fuse"], 2,
        r"--weights applies to torch models, not to an .onnx file"),
    # --- models that cannot be rewritten as asked
    Row("api-train-mode", "API", "model in training mode", lambda d: normfx.export(models.create(MODEL).train(), _x(), "o.onnx"),
        ModelError, r"the model is in training mode .*call model.eval\(\)"),
    Row("api-bn-negative-var", "API", "BN with a negative running variance",
        lambda d: normfx.rewrite(_bn_model([1.0, -1.0, 1.0, 1.0]), "fuse"), RewriteError,
        r"BN channel 1 has running_var \+ eps = -1 <= 0; recompute the statistics"),
    Row("api-bn-nan-var", "API", "BN with a NaN running variance",
        lambda d: normfx.export(_bn_model([1.0, float("nan"), 1.0, 1.0]), torch.randn(2, 1, 16), "o.onnx"), RewriteError,
        r"BN parameters or statistics contain NaN/inf; recompute the statistics"),
    Row("api-bn-zero-var-eps0", "API", "BN with zero variance and eps = 0",
        lambda d: normfx.rewrite(_bn_model([1.0, 0.0, 1.0, 1.0], eps=0.0), "fuse"), RewriteError,
        r"BN channel 1 has running_var \+ eps = 0 <= 0"),
    Row("untraceable-strict", "CLI", "untraceable model with --strict",
        ["rewrite", "--model", "trap_untraceable", "--policy", "fuse", "--strict"], 2,
        r"strict=True.*cannot be traced by torch.fx"),
    Row("untraceable-pt2", "CLI", "untraceable model saved as a torch.export program",
        ["rewrite", "--model", "g_untraceable:build", "--policy", "fuse", "--out", "new/o.pt2"], 2,
        r"cannot be saved as a torch.export program \(GuardOnDataDependentSymNode"),
    Row("structure-pt", "CLI", "fused model saved as a state_dict (.pt)",
        ["rewrite", "--model", MODEL, "--policy", "fuse", "--out", "new/o.pt"], 2,
        r"policy fuse changes the module structure \(removes .*write --out NAME.pt2"),
    Row("lazy-never-run", "CLI", "model with a never-run LazyBatchNorm",
        ["export", "--model", "g_lazy:build", "--input-shape", "1,1,16", "--out", "o.onnx"], 2,
        r"LazyBatchNorm1d '1' was never run, so its parameters and statistics do not exist yet"),
    Row("api-lazy-never-run", "API", "model with a never-run LazyBatchNorm",
        lambda d: normfx.rewrite(torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.LazyBatchNorm1d()), "fuse"),
        ModelError, r"LazyBatchNorm1d '1' was never run, so its parameters and statistics do not exist yet"),
    # --- shapes, dtypes, data
    Row("input-shape-channels", "CLI", "--input-shape with the wrong channel count",
        ["export", "--model", "resnet18", "--input-shape", "1,5,64,64", "--out", "o.onnx"], 2,
        r"resnet18 does not run on the example input of shape 1x5x64x64: RuntimeError: Given groups=1.*"
        r"this zoo model takes 3x64x64"),
    Row("dynamic-shape", "CLI", "graph with a dynamic non-batch axis and no --inputs", ["check", "dynamic.onnx", "dynamic.onnx"],
        2, r"input 'input' has a dynamic axis 2 \('length'\); pass explicit inputs"),
    Row("inputs-wrong-shape", "CLI", "--inputs of the wrong shape", ["check", "good.onnx", "good.onnx", "--inputs", "wrong_shape.npy"],
        2, r"input 'input' takes shape \[.*1, 2048\], got \[1, 3, 2048\] \(axis 1: 3 given, 1 expected\)"),
    Row("inputs-wrong-dtype", "CLI", "--inputs of integers for a float model",
        ["check", "good.onnx", "good.onnx", "--inputs", "ints.npz"], 2, r"input 'input' expects tensor\(float\), got an array of int64"),
    Row("data-empty", "CLI", "calibration data with no samples",
        ["rewrite", "--model", MODEL, "--policy", "precise", "--data", "empty.npy"], 2, r"data yielded no batches"),
    Row("data-objects", "CLI", "data file holding pickled objects",
        ["stats", "--model", MODEL, "--data", "objects.npy", "--out", "s.json"], 2,
        r"cannot read data file 'objects.npy': it is not an array of numbers"),
    Row("data-raises", "CLI", "data iterator that raises",
        ["rewrite", "--model", MODEL, "--policy", "precise", "--data", "g_raising:batches", "--out", "o.pt"], 2,
        r"the data raised RuntimeError while producing batch 1: disk gone"),
    Row("api-data-raises", "API", "data iterator that raises",
        lambda d: normfx.recompute_stats(models.create(MODEL), _raising()), InputDataError,
        r"the data raised RuntimeError while producing batch 1: disk gone"),
    Row("api-empty-input", "API", "empty example input (0 samples)",
        lambda d: normfx.export(models.create(MODEL).eval(), torch.randn(0, 1, 2048), "o.onnx"), InputDataError,
        r"example input 0 of the model is empty \(shape 0x1x2048\)"),
    Row("api-wrong-dtype", "API", "float64 example input for a float32 model",
        lambda d: normfx.export(models.create(MODEL).eval(), _x().double(), "o.onnx"), InputDataError,
        r"does not run on the example input of shape 1x1x2048: RuntimeError: expected scalar type Double"),
    Row("bench-shapes", "CLI", "bench baseline taking another batch size",
        ["bench", "good.onnx", "--baseline", "batch2.onnx", "--runs", "2"], 2,
        r"the baseline 'batch2.onnx' cannot run on the inputs of 'good.onnx'.*axis 0: 1 given, 2 expected.*a ratio needs "
        r"the same inputs"),
    Row("opset-unsupported", "CLI", "--opset 5", ["export", "--model", MODEL, "--opset", "5", "--out", "o.onnx"], 2,
        r"opset 5 is not supported: normfx exports and verifies ai.onnx opsets 7 to 23"),
    # --- outputs
    Row("out-is-input", "CLI", "output = input", ["export", "--model", "good.onnx", "--out", "good.onnx"], 2,
        r"output path 'good.onnx' is the input file 'good.onnx'"),
    Row("out-is-external-data", "CLI", "output = the model's external data file",
        ["export", "--model", "ext_ok.onnx", "--out", "ext_ok.data"], 2,
        r"output path 'ext_ok.data' is the input file '.*ext_ok.data'"),
    Row("outputs-collide", "CLI", "two outputs naming the same file",
        ["export", "--model", MODEL, "--out", "same.json", "--report", "same.json"], 2,
        r"--out and --report both name 'same.json': the two outputs collide"),
    Row("out-under-file", "CLI", "output under a file", ["export", "--model", "good.onnx", "--out", "file.txt/o.onnx", "--runs", "0"],
        2, r"file.txt' is a file, not a folder; choose another output path"),
    Row("out-unwritable", "CLI", "output folder that cannot be written (/proc)",
        ["export", "--model", "good.onnx", "--out", "/proc/normfx-test/o.onnx", "--runs", "0"], 2,
        r"cannot write '/proc/normfx-test/o.onnx': .* choose a writable output folder"),
    Row("out-is-folder", "CLI", "output that is a folder", ["rewrite", "--model", "good.onnx", "--policy", "fuse", "--out", "."],
        2, r"output path '\.' is a folder; give a file name"),
    Row("ctrl-c-write", "CLI", "Ctrl-C while the output is written",
        ["export", "--model", "good.onnx", "--out", "new/deeper/o.onnx", "--runs", "0"], 130, r"normfx: interrupted",
        patch=lambda mp: mp.setattr(os, "fsync", _interrupt)),
    Row("api-ctrl-c-write", "API", "Ctrl-C while the output is written",
        lambda d: normfx.export("good.onnx", None, "new/o.onnx"), KeyboardInterrupt, r"^$",
        patch=lambda mp: mp.setattr(os, "fsync", _interrupt)),
    # --- names
    Row("policy-unknown", "CLI", "unknown policy", ["explain", "--model", MODEL, "--policy", "fusee"], 2,
        r"unknown policy 'fusee' \(did you mean 'fuse'\?\); valid policies: "),
    Row("option-unknown", "CLI", "unknown option", ["explain", "--model", MODEL, "--policy", "fuse:fowrard=false"], 2,
        r"policy 'fuse': unknown option\(s\) fowrard \(did you mean 'forward'\?\); valid options: "),
    Row("option-type", "CLI", "option value of the wrong type", ["explain", "--model", MODEL, "--policy", "fuse:forward=maybe"], 2,
        r"policy 'fuse': option 'forward' expects bool \(true/false\), got 'maybe'$"),
    Row("api-option-type", "API", "keyword option of the wrong type",
        lambda d: normfx.rewrite(models.create(MODEL), "fuse", forward="yes"), PolicyError,
        r"policy 'fuse': option 'forward' expects bool \(True/False\), got str 'yes'$"),
    Row("model-unknown", "CLI", "unknown model name", ["export", "--model", "resnet19", "--out", "o.onnx"], 2,
        r"unknown model 'resnet19': give a zoo name"),
]


def _raising():
    yield models.example_input(MODEL, batch=4)
    raise RuntimeError("disk gone")


def _snapshot(folder: Path) -> tuple[dict[str, str], set[str]]:
    files, folders = {}, set()
    for path in folder.rglob("*"):
        rel = str(path.relative_to(folder))
        if "__pycache__" in rel:
            continue
        if path.is_dir():
            folders.add(rel)
        else:
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files, folders


def _run_process(argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "normfx", *argv], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)
    return done.returncode, done.stderr


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_guarantee(row: Row, assets, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(assets, work)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    for name in FACTORIES:
        sys.modules.pop(name[:-3], None)
    before = _snapshot(work)
    if row.patch:
        row.patch(monkeypatch)
    if row.surface.startswith("CLI"):
        if row.surface == "CLI (process)":
            code, err = _run_process(row.call, work)
        else:
            code = main(row.call)
            err = capsys.readouterr().err
        assert code == row.expect, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert re.search(row.message, lines[0]), lines[0]
    else:
        with pytest.raises(row.expect) as raised:
            row.call(work)
        message = str(raised.value)
        assert "\n" not in message.strip()
        assert re.search(row.message, message), message
    record = os.environ.get("NORMFX_GUARANTEES_RECORD")  # collects the real messages for docs/guarantees.md
    if record:
        with open(record, "a") as handle:
            handle.write(f"{row.id}\t{lines[0] if row.surface.startswith('CLI') else message}\n")
    monkeypatch.undo()
    after = _snapshot(work)
    assert after[0] == before[0], "an input file changed or a (partial) output appeared"
    assert after[1] == before[1], f"folders appeared: {sorted(after[1] - before[1])}"
    assert not os.path.exists("/proc/normfx-test")


def test_docs_table_lists_every_row():
    """docs/guarantees.md holds one table row per test row, with the same exit code / exception."""
    text = DOC.read_text()
    for row in ROWS:
        line = next((line for line in text.splitlines() if line.startswith(f"| `{row.id}` |")), None)
        assert line is not None, f"docs/guarantees.md has no row for {row.id}"
        expect = str(row.expect) if isinstance(row.expect, int) else row.expect.__name__
        assert f"| {expect} |" in line, line
    assert len(ROWS) >= 30
    assert "docs/guarantees.md" in (REPO / "README.md").read_text()
