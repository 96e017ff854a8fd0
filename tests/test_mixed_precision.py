"""Mixed precision as it runs (README, "Mixed precision": GroupNorm, softmax and the loss always run in float32): the
dtypes of the ops of the trainer's loss, read from the graph MindSpore compiles (O2, graph mode, the default) and
from the ops as PyNative runs them (O3), not from the cells' flags."""
import re

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ms_ddpm.models.normalization import GroupNorm
from ms_ddpm.train.trainer import Trainer
from tests.test_trainer import tiny_config

NODE = re.compile(r"^\s+%\d+\(.*?\) = (\w+)\(")


def compiled_ops(ir):
    """(op, dtypes of its tensor inputs and outputs, scope) of every node of a graph dumped by MindSpore, in the
    dump's (topological) order; a Custom op is named by its kernel function (GroupNormForward, ...)."""
    lines = ir.splitlines()
    nodes = []
    for i, line in enumerate(lines):
        match = NODE.match(line)
        if match:
            kernel = re.search(r'func_name: "[^"]*:(\w+)"', line)
            scope = re.search(r"scope: \((.*)\)", lines[i + 2])
            nodes.append((kernel.group(1) if kernel else match.group(1).removeprefix("PrimFunc_"),
                          re.findall(r"Tensor\[(\w+)\]", lines[i + 1]), scope.group(1) if scope else ""))
    return nodes


def batch():
    rng = np.random.default_rng(0)
    return (ms.Tensor(rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)), ms.Tensor(np.array([3, 70], np.int32)),
            ms.Tensor(rng.standard_normal((2, 1, 8, 8)).astype(np.float32)))


def test_o2_graph_runs_convolutions_in_float16_and_norms_softmax_loss_in_float32(tmp_path, monkeypatch):
    """The trainer's O2 float16 loss, compiled: every convolution is a float16 Conv2D (none the float32 CPU kernel),
    every GroupNorm and softmax takes float32, and the loss's ops after the network's output are float32. Read from
    the graph after type inference and validation (on CPU the backend then computes the float16 Conv2D in float32
    between casts, as it has no float16 convolution)."""
    trainer = Trainer(tiny_config(tmp_path / "run", amp_level="O2", amp_dtype="float16"))
    cells = [cell for _, cell in trainer.model.cells_and_names()]
    num_convs, num_norms = sum(isinstance(c, nn.Conv2d) for c in cells), sum(isinstance(c, GroupNorm) for c in cells)
    # only the validated graph is written (MindSpore's MS_DEV_DUMP_IR_PASSES), a few MB instead of every pass
    monkeypatch.setenv("MS_DEV_DUMP_IR_PASSES", "validate")
    ms.set_context(mode=ms.GRAPH_MODE, save_graphs=1, save_graphs_path=str(tmp_path / "ir"))
    try:
        loss = trainer.loss_fn(*batch())
    finally:
        ms.set_context(save_graphs=0)
    assert np.isfinite(float(loss.asnumpy()))
    nodes = compiled_ops(next((tmp_path / "ir").glob("*validate*.ir")).read_text())
    convs = [dtypes for op, dtypes, _ in nodes if op == "Conv2D"]
    assert len(convs) == num_convs and all(set(d) == {"Float16"} for d in convs), convs
    assert not [op for op, _, _ in nodes if op.startswith("Conv2d")]  # the CPU kernels' float32 convolutions
    norms = [dtypes for op, dtypes, _ in nodes if op.startswith("GroupNorm")]
    assert len(norms) == num_norms and all(set(d) == {"Float32"} for d in norms), norms
    softmaxes = [dtypes for op, dtypes, _ in nodes if op == "Softmax"]
    assert softmaxes and all(set(d) == {"Float32"} for d in softmaxes), softmaxes
    # the loss's ops: those after the network's last cast (its output to float32), bar the network's state updates
    last = max(i for i, (op, _, scope) in enumerate(nodes) if op == "Cast" and "network-" in scope)
    tail = [node for node in nodes[last + 1:] if "network-" not in node[2]]
    assert {"Sub", "Mul", "ReduceMean"} <= {op for op, _, _ in tail}
    assert all(set(dtypes) <= {"Float32"} for _, dtypes, _ in tail), tail


def test_o3_runs_with_norms_and_loss_in_float32(tmp_path):
    """O3 (every cell in float16 but the GroupNorms, which the trainer keeps in float32), PyNative: the network runs
    in float16 (every dense layer's output), yet every GroupNorm kernel is handed float32 and the loss is the float64
    mean squared error of the network's output to float32 rounding (1e-6; float16 arithmetic would be off by ~1e-3);
    the loss and every gradient are finite."""
    trainer = Trainer(tiny_config(tmp_path, amp_level="O3", amp_dtype="float16", mode="pynative"))
    norms = [cell for _, cell in trainer.model.cells_and_names() if isinstance(cell, GroupNorm)]
    if any(norm.kernels is None for norm in norms):
        pytest.skip("the CPU kernels are not built here")
    handed, dense, outputs = [], [], []
    for norm in norms:
        norm.kernels.register_forward_pre_hook(lambda cell, args: handed.append(args[0].dtype))
    for _, cell in trainer.model.cells_and_names():
        if isinstance(cell, nn.Dense):
            cell.register_forward_hook(lambda cell, args, out: dense.append(out.dtype))
    trainer.model.register_forward_hook(lambda cell, args, out: outputs.append(out.asnumpy().astype(np.float64)))
    x, t, noise = batch()
    loss = float(trainer.loss_fn(x, t, noise).asnumpy())
    assert dense and set(dense) == {ms.float16}, dense
    assert handed == [ms.float32] * len(norms)
    assert loss == pytest.approx(((outputs[0] - noise.asnumpy()) ** 2).mean(), rel=1e-6)
    value, grads = ms.value_and_grad(trainer.loss_fn, None, trainer.model.trainable_params())(x, t, noise)
    assert np.isfinite(float(value.asnumpy())) and all(np.isfinite(g.asnumpy()).all() for g in grads)


@pytest.mark.xfail(strict=True, reason="PyNative casts every op's inputs in a float16 cell, so Softmax's float32 "
                   "cast is undone; graph mode casts at the cell's boundary only (the O2 test above)")
def test_pynative_o2_runs_softmax_in_float32(tmp_path, monkeypatch):
    """The README's claim in PyNative: the softmax op of every attention computes in float32."""
    trainer = Trainer(tiny_config(tmp_path, amp_level="O2", amp_dtype="float16", mode="pynative"))
    ran, softmax = [], ops.softmax

    def recorded(x, *args, **kwargs):
        out = softmax(x, *args, **kwargs)
        ran.append(out.dtype)  # the op's own dtype, after PyNative's cast of its inputs
        return out

    monkeypatch.setattr(ops, "softmax", recorded)
    trainer.loss_fn(*batch())
    assert ran and set(ran) == {ms.float32}, ran
