"""The CPU kernels of ms_ddpm.kernels: equal to MindSpore's native ops (forward and gradient, both modes), the same
training losses with and without them, the fallback when they cannot be built, and the cache's build rules."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ms_ddpm.processes import GaussianDiffusion
from ms_ddpm.kernels import build
from ms_ddpm.kernels.group_norm import GroupNormKernels
from ms_ddpm.kernels.multi_tensor import MultiTensorKernels, multi_tensor_kernels
from ms_ddpm.kernels.threefry import ThreefryKernel
from ms_ddpm.losses import DiffusionLoss
from ms_ddpm.models import normalization
from ms_ddpm.models.convolution import Conv2d
from ms_ddpm.models.unet import Unet, WeightStandardizedConv2d
from ms_ddpm.schedules import get_beta_schedule
from ms_ddpm.train.adam import MultiTensorAdam, adam
from ms_ddpm.train.ema import EMA
from ms_ddpm.train.randomness import TrainingDraws, threefry2x32
from ms_ddpm.train.step import TrainStep

ROOT = Path(__file__).resolve().parents[1]

# (B, C, H, W, groups): the U-Nets' own (quick start, tutorial bottleneck, DDPM's 32 groups) and odd ones: one
# group, one channel per group, channels not a multiple of 16 with odd sizes, batch 1, a 1x1 image
SHAPES = [(32, 16, 28, 28, 4), (4, 112, 7, 7, 4), (2, 64, 8, 8, 32), (3, 20, 9, 5, 1), (1, 12, 5, 3, 12),
          (1, 6, 1, 1, 2)]
VARIANTS = [(False, False), (False, True), (True, False), (True, True)]  # (scale-shift, SiLU)


@pytest.fixture(scope="module")
def library():
    if shutil.which(build.compiler()) is None:
        pytest.skip(f"no C++ compiler {build.compiler()!r} on PATH: the kernels cannot be built here")
    return build.build()  # a compiler that is present must build them: a failure here is a test failure


class Variant(nn.Cell):
    """act(GroupNorm(x) * (1 + scale) + shift) by the kernels or by MindSpore's ops, gamma and beta as inputs."""

    def __init__(self, kernels, groups, film, silu):
        super().__init__()
        self.kernels, self.groups, self.film, self.silu = kernels, groups, film, silu

    def construct(self, x, gamma, beta, scale, shift):
        if self.kernels is not None:
            if self.film:
                return self.kernels(x, gamma, beta, scale, shift, self.silu)
            return self.kernels(x, gamma, beta, None, None, self.silu)
        y = ops.group_norm(x, self.groups, gamma, beta, 1e-5)
        if self.film:
            y = y * (scale + 1) + shift
        if self.silu:
            y = ops.silu(y)
        return y


class AllVariants(nn.Cell):
    """Outputs and input gradients (for the cotangent dy) of every variant, kernels first, then native ops:
    one graph per shape."""

    def __init__(self, library, groups):
        super().__init__()
        kernels = GroupNormKernels(str(library), groups, 1e-5)
        self.variants = nn.CellList([Variant(impl, groups, film, silu)
                                     for film, silu in VARIANTS for impl in (kernels, None)])
        self.grad = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, x, gamma, beta, scale, shift, dy):
        out = ()
        for variant in self.variants:
            out += ((variant(x, gamma, beta, scale, shift),) + self.grad(variant)(x, gamma, beta, scale, shift, dy),)
        return out


def assert_close(actual, expected, what):
    """Equal to 1e-5 of the reference's largest magnitude (elementwise relative error is meaningless at zeros)."""
    scale = max(float(np.abs(expected).max()), 1e-30)
    err = float(np.abs(actual - expected).max()) / scale
    assert err <= 1e-5, f"{what}: max error {err:.2e} of the largest value {scale:.3g}"


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_kernels_equal_native_ops(library, shape, mode):
    ms.set_context(mode=mode)
    b, c, h, w, groups = shape
    rng = np.random.default_rng(sum(shape))
    # an offset mean, so that a variance computed without centring first would show
    x = rng.standard_normal((b, c, h, w)).astype(np.float32) * 2 + 3
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    scale, shift = (rng.standard_normal((b, c, 1, 1)).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((b, c, h, w)).astype(np.float32)
    out = AllVariants(library, groups)(*map(ms.Tensor, (x, gamma, beta, scale, shift, dy)))
    names = ("y", "dx", "dgamma", "dbeta", "dscale", "dshift")
    for i, (film, silu) in enumerate(VARIANTS):
        kernel, native = out[2 * i], out[2 * i + 1]
        for name, k, n in zip(names, kernel, native):
            if name in ("dscale", "dshift") and not film:
                continue
            assert k.shape == n.shape, name
            assert_close(k.asnumpy(), n.asnumpy(), f"{name}, scale-shift {film}, SiLU {silu}")


# (B, Ci, H, W, Co, kernel size, bias, weight-standardised): the U-Nets' own and odd ones (batch 1, a 1x1 image,
# widths not multiples of 8)
CONVOLUTIONS = [(32, 16, 28, 28, 16, 3, True, True), (4, 56, 14, 14, 112, 1, True, False),
                (2, 28, 7, 7, 96, 1, False, False), (1, 3, 5, 7, 5, 3, True, False), (3, 20, 1, 1, 4, 3, True, True)]


class ConvolutionGradients(nn.Cell):
    """(dx, dweight[, dbias]) for the cotangent dy."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.params = ms.ParameterTuple(conv.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, x, dy):
        (dx,), dparams = self.grad(self.conv, self.params)(x, dy)
        return (dx,) + dparams


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("case", CONVOLUTIONS, ids=lambda c: "x".join(map(str, c[:6])) + "-bias" * c[6] + "-ws" * c[7])
def test_convolution_kernels_equal_native_ops(library, case, mode):
    ms.set_context(mode=mode)
    b, ci, h, w, co, k, bias, ws = case
    convs = []
    for _ in range(2):  # the same weights twice: one conv by the kernels, one by MindSpore's ops
        ms.set_seed(0)
        convs.append(WeightStandardizedConv2d(ci, co) if ws else
                     Conv2d(ci, co, k, has_bias=bias, pad_mode="pad", padding=k // 2))
    assert convs[0].kernels is not None
    convs[1].kernels = None
    rng = np.random.default_rng(sum(case))
    x = ms.Tensor(rng.standard_normal((b, ci, h, w)).astype(np.float32))
    dy = ms.Tensor(rng.standard_normal((b, co, h, w)).astype(np.float32))
    kernel, native = ((conv(x),) + ConvolutionGradients(conv)(x, dy) for conv in convs)
    for name, kv, nv in zip(("y", "dx", "dweight", "dbias"), kernel, native):
        assert kv.shape == nv.shape, name
        assert_close(kv.asnumpy(), nv.asnumpy(), name)


def test_convolutions_the_kernels_lack_stay_native(library):
    """Strides, dilations, groups, other paddings and kernel sizes keep MindSpore's convolution."""
    assert Conv2d(4, 4, 3, pad_mode="pad", padding=1).kernels is not None
    assert Conv2d(4, 4, 1).kernels is not None  # nn.Conv2d's default pad_mode "same"
    for kwargs in (dict(stride=2), dict(dilation=2), dict(group=2), dict(pad_mode="valid"), dict(padding=(0, 1, 0, 1))):
        kwargs.setdefault("pad_mode", "pad")
        assert Conv2d(4, 4, 3, **kwargs).kernels is None, kwargs
    assert Conv2d(4, 4, 7, pad_mode="pad", padding=3).kernels is None
    conv = Conv2d(4, 6, 3, pad_mode="pad", padding=1)
    conv.weight.set_dtype(ms.float16)
    conv.bias.set_dtype(ms.float16)
    x = ms.Tensor(np.ones((1, 4, 5, 5), np.float16))  # float16, as under mixed precision
    assert conv(x).dtype == ms.float16  # MindSpore's float16 convolution, not the float32 kernel


def test_group_counts_are_kept_apart_on_the_same_input_shape(library):
    """PyNative mode reuses shape inference for one kernel and the same input shapes: GroupNorms of 4 and of 8 groups
    on inputs of one shape must still each get their own statistics."""
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 16, 4, 4)).astype(np.float32))
    for groups in (4, 8, 4):
        norm = normalization.GroupNorm(groups, 16)
        expected = ops.silu(ops.group_norm(x, groups, norm.gamma, norm.beta, 1e-5)).asnumpy()
        assert_close(norm(x, silu=True).asnumpy(), expected, f"{groups} groups")


def test_the_kernels_keep_the_dtype_and_propagate_non_finite_values(library):
    """A float16 input comes back float16 (computed in float32), and an inf in one group makes that group NaN and
    leaves the others finite: what the loss scaler's overflow check relies on."""
    norm = normalization.GroupNorm(2, 4)
    assert norm.kernels is not None
    x = np.ones((2, 4, 3, 3), np.float32)
    x[0, 0, 1, 1] = np.inf
    y = norm(ms.Tensor(x), silu=True).asnumpy()
    assert np.isnan(y[0, :2]).all() and np.isfinite(y[0, 2:]).all() and np.isfinite(y[1]).all()
    assert norm(ms.Tensor(x.astype(np.float16))).dtype == ms.float16


def _tiny_training(steps, jit):
    """`steps` clipped Adam steps of a tiny U-Net with an EMA (clipped at norm 0.5, so that the clipping binds):
    (net, TrainStep, losses, gradient norms, {what: values after them} of the weights, moments and EMA)."""
    ms.set_seed(0)
    net = Unet(dim=8, dim_mults=(1,), channels=1, heads=2, dim_head=8)  # one level: one compile less deep
    loss = DiffusionLoss(net, GaussianDiffusion(get_beta_schedule("linear", 100)), loss_type="l2")
    optimizer = adam(net.trainable_params(), ms.Tensor(np.linspace(1e-3, 5e-4, steps, dtype=np.float32)))
    ema = EMA(net, decay=0.9)
    step = TrainStep(loss, optimizer, ms.amp.StaticLossScaler(1.0), TrainingDraws(0, 100), grad_clip=0.5, ema=ema,
                     jit=jit)
    x0 = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32))
    out = [step(x0) for _ in range(steps)]
    losses = np.array([float(loss.asnumpy()) for loss, _, _ in out])
    norms = np.array([float(norm.asnumpy()) for _, _, norm in out])
    state = {what: np.concatenate([p.asnumpy().ravel() for p in params]) for what, params in
             [("weights", optimizer.parameters), ("Adam's first moments", optimizer.moment1),
              ("Adam's second moments", optimizer.moment2), ("EMA weights", ema.ema_weights)]}
    return net, step, losses, norms, state


def _uses_kernels(net, step):
    cells = [cell for _, cell in net.cells_and_names() if isinstance(cell, (normalization.GroupNorm, Conv2d))]
    uses = {cell.kernels is not None for cell in cells} | {step.multi_tensor is not None,
                                                           step.ema.multi_tensor is not None,
                                                           isinstance(step.optimizer, MultiTensorAdam)}
    assert len(uses) == 1, "some parts used the kernels, others not"
    return uses.pop()


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, pytest.param(ms.PYNATIVE_MODE, marks=pytest.mark.slow)],
                         ids=["graph", "pynative"])
def test_training_with_and_without_kernels_agrees(library, monkeypatch, mode):
    """20 clipped Adam steps of a tiny U-Net with a learning-rate schedule and an EMA: the same losses, gradient
    norms, weights, Adam moments and EMA weights to 1e-5 with the kernels (GroupNorm, convolutions, the step's
    multi-tensor norm, clipping, Adam and EMA) and with MindSpore's ops. (PyNative runs some 3,000 ops a step one
    by one, minutes for 40 steps on 2 cores: marked slow.)"""
    ms.set_context(mode=mode)
    jit = mode == ms.GRAPH_MODE
    net, step, losses, norms, state = _tiny_training(20, jit)
    assert _uses_kernels(net, step)
    monkeypatch.setattr(build, "_loaded", {"library": None})  # as if the library could not be built
    net, step, native_losses, native_norms, native_state = _tiny_training(20, jit)
    assert not _uses_kernels(net, step)
    assert np.ptp(losses) > 0.1  # the weights move
    assert (native_norms > 0.5).all()  # the clipping binds at every step
    np.testing.assert_allclose(losses, native_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, native_norms, rtol=1e-5)
    for what in state:
        assert_close(state[what], native_state[what], what)


class MultiTensorOps(nn.Cell):
    """square_sum and scale of a tuple of tensors, then the EMA's lerp of Parameters `a` towards `b` in place, by the
    kernels or by MindSpore's ops."""

    def __init__(self, kernels, a):
        super().__init__()
        self.kernels = kernels
        self.a = ms.ParameterTuple([ms.Parameter(x.copy(), name=f"a{i}") for i, x in enumerate(a)])

    def construct(self, c, b):
        if self.kernels is not None:
            out = (self.kernels.square_sum(*self.a),) + self.kernels.scale(c, *self.a)
            self.kernels.lerp_(c, *self.a, *b)
            return out
        out = (ops.addn([ops.reduce_sum(ops.square(x)) for x in self.a]),) + tuple(x * c for x in self.a)
        for x, y in zip(self.a, b):
            ops.assign(x, x + (y - x) * c)
        return out


# weights of the quick start's shapes (a conv kernel, a bias, a dense layer's), sizes not a multiple of 16, and a
# single tensor
MULTI_TENSOR_SHAPES = [[(16, 1, 3, 3), (16,), (64, 16), (1,), (5, 7, 3)], [(3,)]]


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("shapes", MULTI_TENSOR_SHAPES, ids=["mixed", "one"])
def test_multi_tensor_kernels_equal_native_ops(library, shapes, mode):
    """Two calls, so that the second lerp starts from the first's result in the Parameters."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(0)
    a = [ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    b = tuple(ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    c = ms.Tensor(np.float32(0.37))
    kernels, native = MultiTensorOps(MultiTensorKernels(str(library), len(shapes)), a), MultiTensorOps(None, a)
    for _ in range(2):
        got, expected = kernels(c, b), native(c, b)
        assert len(got) == len(expected) == 1 + len(shapes)
        for i, (x, y) in enumerate(zip(got, expected)):
            assert x.shape == y.shape, f"output {i}"
            assert_close(x.asnumpy(), y.asnumpy(), f"output {i}")
    for i, (x, y) in enumerate(zip(kernels.a, native.a)):
        assert_close(x.asnumpy(), y.asnumpy(), f"lerp of Parameter {i}")
    assert not np.allclose(kernels.a[0].asnumpy(), a[0].asnumpy())  # the Parameters moved


def test_multi_tensor_kernels_are_for_float32_arrays_only(library):
    lib = build.Library(library, True)
    weights = [ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="w")]
    assert multi_tensor_kernels(lib, weights) is not None
    assert multi_tensor_kernels(None, weights) is None
    assert multi_tensor_kernels(lib, weights + [ms.Parameter(ms.Tensor(np.ones(3, np.float16)), name="h")]) is None
    assert multi_tensor_kernels(lib, weights + [ms.Parameter(ms.Tensor(np.float32(1)), name="s")]) is None


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_threefry_kernel_equals_native_ops(library, mode):
    """Random123's first known answer, then random keys and counters over the whole uint32 range: the same
    integers, bit for bit."""
    ms.set_context(mode=mode)
    kernel = ThreefryKernel(str(library))
    x0, x1 = kernel(ms.Tensor([0, 0], ms.int64), ms.Tensor(0, ms.int64), ms.Tensor([0], ms.int64))
    assert (int(x0.asnumpy()[0]), int(x1.asnumpy()[0])) == (0x6B200159, 0x99BA4EFE)
    rng = np.random.default_rng(0)
    for shape in [(7, 393), (1,)]:
        key = tuple(int(k) for k in rng.integers(0, 2**32, 2))
        c0 = ms.Tensor(int(rng.integers(0, 2**32)), ms.int64)
        c1 = ms.Tensor(rng.integers(0, 2**32, shape), ms.int64)
        got = kernel(ms.Tensor(key, ms.int64), c0, c1)
        expected = threefry2x32(key, c0, c1)
        for x, y in zip(got, expected):
            assert x.dtype == ms.int64 and x.shape == shape
            np.testing.assert_array_equal(x.asnumpy(), y.asnumpy())


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_training_draws_with_and_without_kernels_agree(library, monkeypatch, mode):
    """t and dropped labels of a micro-batch identical with the Threefry kernel and with native ops, the noise
    (Box-Muller of the same integers) to float32 rounding: graph mode compiles the float arithmetic of the two graphs
    differently (a few elements 1 ulp apart)."""
    ms.set_context(mode=mode)
    labels = ms.Tensor(np.arange(6, dtype=np.int32) % 10)
    args = (ms.Tensor(12, ms.int32), ms.Tensor(6, ms.int32), (6, 3, 5, 5), labels)
    drawer = TrainingDraws(seed=2**40 + 7, num_labels=1000, drop_prob=0.3, null_label=10)
    assert drawer.threefry is not None
    monkeypatch.setattr(build, "_loaded", {"library": None})
    native = TrainingDraws(seed=2**40 + 7, num_labels=1000, drop_prob=0.3, null_label=10)
    assert native.threefry is None
    (t, noise, dropped), (native_t, native_noise, native_dropped) = drawer(*args), native(*args)
    np.testing.assert_array_equal(t.asnumpy(), native_t.asnumpy())
    np.testing.assert_array_equal(dropped.asnumpy(), native_dropped.asnumpy())
    assert_close(noise.asnumpy(), native_noise.asnumpy(), "noise")


def test_missing_compiler_falls_back_to_native_ops_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MS_DDPM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="ms_ddpm.kernels.build"):
        norms = [normalization.GroupNorm(2, 4) for _ in range(2)]
    assert all(norm.kernels is None for norm in norms)
    (record,) = caplog.records  # once per process, however many layers ask
    assert "CPU kernels unavailable, using MindSpore's native ops" in record.getMessage()
    assert "no-such-compiler" in record.getMessage() and "\n" not in record.getMessage()
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32))
    expected = ops.silu(ops.group_norm(x, 2, norms[0].gamma, norms[0].beta, 1e-5))
    assert_close(norms[0](x, silu=True).asnumpy(), expected.asnumpy(), "fallback")


def test_disabled_kernels_warn_nothing(monkeypatch, caplog):
    monkeypatch.setenv("MS_DDPM_KERNELS", "0")
    monkeypatch.setattr(build, "_loaded", {})
    with caplog.at_level(logging.WARNING):
        assert normalization.GroupNorm(1, 4).kernels is None
    assert not caplog.records


def test_empty_cache_is_filled_atomically_by_concurrent_builds(library, tmp_path):
    """Two processes building into one empty cache at once: both load the same library, no temporary file stays,
    and the file name carries the MindSpore version."""
    env = dict(os.environ, MS_DDPM_KERNEL_CACHE=str(tmp_path), PYTHONPATH=str(ROOT))
    code = "from ms_ddpm.kernels.build import build; import ctypes; p = build(); ctypes.CDLL(str(p)); print(p)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = {proc.communicate(timeout=300)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(paths) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(paths.pop()).name]
    assert f"mindspore{ms.__version__}" in next(tmp_path.iterdir()).name


def test_library_name_depends_on_the_cpu(library, monkeypatch):
    """A library built where -march=native means other instructions is never picked up here."""
    here = build.library_path(build.compiler())
    real_run = build._run

    def other_cpu(cmd):
        out = real_run(cmd)
        return out + "#define __AVX512F__ 1\n" if "-dM" in cmd else out

    monkeypatch.setattr(build, "_run", other_cpu)
    assert build.library_path(build.compiler()) != here
