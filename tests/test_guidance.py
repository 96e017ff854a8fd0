"""Classifier-free guidance (Ho & Salimans 2021): the formula on a network with known outputs, for every objective,
guidance scale 1 as the plain conditional prediction, and one network call on the doubled batch per step."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ms_ddpm.guidance import ClassifierFreeGuidance
from ms_ddpm.processes import VPSDE, GaussianDiffusion, predict_eps, predict_x0
from ms_ddpm.samplers import create_sampler
from ms_ddpm.schedules import get_beta_schedule

NUM_CLASSES = 3  # labels 0..2, the null label 3
SHAPE = (4, 1, 3, 3)


class KnownNetwork(nn.Cell):
    """A fixed function of (x, t, label) standing in for a class-conditional network; the label enters both
    additively and multiplied with x, so the two branches differ in their dependence on x as well."""

    num_class_embeds = NUM_CLASSES + 1

    def construct(self, x, t, cond):
        c = cond.astype(ms.float32).reshape(-1, 1, 1, 1)
        time = t.astype(ms.float32).reshape(-1, 1, 1, 1)
        return 0.8 * x + 0.3 * ops.sin(2 * x + time / 150.0) + 0.2 * c - 0.1 * c * x


def known(x, t, labels):
    """KnownNetwork's output in NumPy float64."""
    c = labels.astype(np.float64).reshape(-1, 1, 1, 1)
    return 0.8 * x + 0.3 * np.sin(2 * x + t.reshape(-1, 1, 1, 1) / 150.0) + 0.2 * c - 0.1 * c * x


@pytest.fixture(params=[ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def mode(request):
    ms.set_context(mode=request.param)
    return request.param


@pytest.fixture(scope="module")
def guided():
    """One guided Cell for the module: graph mode compiles it once, the scale is changed through its Parameter."""
    return ClassifierFreeGuidance(KnownNetwork(), NUM_CLASSES, 2.0)


def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([10, 400, 700, 999], np.int32)
    labels = np.array([0, 2, 1, 2], np.int32)
    return x, t, labels


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 7.0])
def test_guided_output_is_the_formula_on_the_two_branches(guided, mode, scale):
    """out = out_uncond + w (out_cond - out_uncond), out_uncond at the null label, both from the known network."""
    x, t, labels = inputs()
    guided.set_guidance_scale(scale)
    got = guided(ms.Tensor(x), ms.Tensor(t), ms.Tensor(labels)).asnumpy()
    out_cond = known(x, t, labels)
    out_uncond = known(x, t, np.full_like(labels, NUM_CLASSES))
    np.testing.assert_allclose(got, out_uncond + scale * (out_cond - out_uncond), rtol=1e-5, atol=1e-5)
    if scale == 1.0:  # guidance scale 1 is the plain conditional prediction
        np.testing.assert_allclose(got, out_cond, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_mixing_the_outputs_equals_guiding_the_implied_eps(guided, objective):
    """The network output of each objective is affine in eps with coefficients of (x_t, t), so guiding the raw
    outputs and converting gives the eps, x0 (and the VP score) that guiding eps itself gives (module docstring of
    ms_ddpm.guidance)."""
    x, t, labels = inputs()
    scale = 3.0
    guided.set_guidance_scale(scale)
    out = guided(ms.Tensor(x), ms.Tensor(t), ms.Tensor(labels))
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 1000), objective=objective)
    ab = ms.Tensor(diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1).astype(np.float32))
    xt = ms.Tensor(x)
    branches = [ms.Tensor(known(x, t, v).astype(np.float32)) for v in (labels, np.full_like(labels, NUM_CLASSES))]
    eps_cond, eps_uncond = (predict_eps(objective, b, xt, ab).asnumpy() for b in branches)
    guided_eps = eps_uncond + scale * (eps_cond - eps_uncond)
    np.testing.assert_allclose(predict_eps(objective, out, xt, ab).asnumpy(), guided_eps, rtol=1e-4, atol=1e-4)
    # and back: the x0 of the guided output is the x0 of the guided eps
    np.testing.assert_allclose(predict_x0(objective, out, xt, ab).asnumpy(),
                               predict_x0("eps", ms.Tensor(guided_eps), xt, ab).asnumpy(), rtol=1e-4, atol=1e-4)
    # the score the SDE samplers use, s = -eps / sqrt(1 - ab), guided the same way
    sde = VPSDE.from_diffusion(diffusion)
    label = int(t[0])
    score = sde.score(out[:1], xt[:1], label).asnumpy()
    scores = [sde.score(b[:1], xt[:1], label).asnumpy() for b in branches]
    np.testing.assert_allclose(score, scores[1] + scale * (scores[0] - scores[1]), rtol=1e-4, atol=1e-4)


class CountingNetwork(KnownNetwork):
    """KnownNetwork recording the batch size of every call (PyNative runs construct in Python)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def construct(self, x, t, cond):
        self.calls.append(x.shape[0])
        return super().construct(x, t, cond)


def test_a_guided_sampling_step_is_one_call_on_the_doubled_batch():
    """DDIM with the guided network: each step calls the network once, on 2B images (conditional and null)."""
    network = CountingNetwork()
    sampler = create_sampler("ddim", GaussianDiffusion(get_beta_schedule("linear", 100)))
    sampler.set_timesteps(3)
    x, _, labels = inputs()
    sampler.sample(ClassifierFreeGuidance(network, NUM_CLASSES, 2.0), SHAPE, seed=0, progress=False,
                   cond=ms.Tensor(labels))
    assert network.calls == [2 * SHAPE[0]] * 3


def test_negative_guidance_scale_is_refused():
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        ClassifierFreeGuidance(KnownNetwork(), NUM_CLASSES, -0.5)
