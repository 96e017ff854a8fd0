"""Classifier-free guidance (Ho & Salimans 2021): the formula on a network with known outputs, for every objective,
guidance scale 1 as the plain conditional prediction, one network call on the doubled batch per step, and guided
sampling end to end with every diffusion sampler and objective on Gaussian data of known class means."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ms_ddpm.guidance import ClassifierFreeGuidance
from ms_ddpm.processes import VPSDE, GaussianDiffusion, predict_eps, predict_x0, vp_alpha_sigma
from ms_ddpm.samplers import create_sampler, samplers_for
from ms_ddpm.schedules import get_beta_schedule
from tests.helpers import alpha_bar_at

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
    alpha, sigma = vp_alpha_sigma(ab)
    eps_cond, eps_uncond = (predict_eps(objective, b, xt, alpha, sigma).asnumpy() for b in branches)
    guided_eps = eps_uncond + scale * (eps_cond - eps_uncond)
    np.testing.assert_allclose(predict_eps(objective, out, xt, *vp_alpha_sigma(ab)).asnumpy(), guided_eps, rtol=1e-4, atol=1e-4)
    # and back: the x0 of the guided output is the x0 of the guided eps
    np.testing.assert_allclose(predict_x0(objective, out, xt, *vp_alpha_sigma(ab)).asnumpy(),
                               predict_x0("eps", ms.Tensor(guided_eps), xt, *vp_alpha_sigma(ab)).asnumpy(), rtol=1e-4, atol=1e-4)
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


# Class c's data are N(CLASS_MEANS[c], S_DATA^2) per pixel; the null label's (the unconditional model's) mean is 0
CLASS_MEANS = np.array([-0.6, 0.1, 0.5, 0.0])
S_DATA = 0.4


def exact_output(objective, alpha_bar, x, mean):
    """The optimal network output for N(mean, S_DATA^2) data, float64: eps = (x - sqrt(ab) mean) sqrt(1 - ab) /
    (ab S^2 + 1 - ab), and the x0 and v it implies (Ho et al. 2020, Eq. 4; Salimans & Ho 2022, Sec. 4)."""
    eps = (x - np.sqrt(alpha_bar) * mean) * np.sqrt(1 - alpha_bar) / (alpha_bar * S_DATA**2 + 1 - alpha_bar)
    if objective == "eps":
        return eps
    if objective == "x0":
        return (x - np.sqrt(1 - alpha_bar) * eps) / np.sqrt(alpha_bar)
    return (eps - np.sqrt(1 - alpha_bar) * x) / np.sqrt(alpha_bar)


class GaussianClassNetwork(nn.Cell):
    """The exact class-conditional network of the Gaussian classes (PyNative: it computes in NumPy)."""

    num_class_embeds = NUM_CLASSES + 1

    def __init__(self, objective, alphas_cumprod):
        super().__init__()
        self.objective, self.alphas_cumprod = objective, alphas_cumprod

    def construct(self, x, t, cond):
        alpha_bar = alpha_bar_at(self.alphas_cumprod, t.asnumpy()).reshape(-1, 1, 1, 1)  # t fractional for euler, heun
        mean = CLASS_MEANS[cond.asnumpy()].reshape(-1, 1, 1, 1)
        return ms.Tensor(exact_output(self.objective, alpha_bar, x.asnumpy().astype(np.float64), mean)
                         .astype(np.float32))


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", samplers_for("ddpm"))
def test_guided_sampling_equals_sampling_the_mixed_prediction(name, objective):
    """Every diffusion sampler, 20 steps, PyNative: sampling the guided network (scale 2, i.e. Ho & Salimans' w = 1)
    with labels equals sampling, from the same seed, the plain model that returns (1 + w) out_cond - w out_uncond
    (their Eq. 6) mixed by hand in float64. That mixture is the exact network of N(mu_c + w (mu_c - mu_null), S^2),
    so each class's samples have that mean (-1.2, 0.2 and 1.0, unguided -0.6, 0.1 and 0.5), within 0.15: 400 pixels
    a class give a standard error of 0.02, and 20 steps a bias of up to 0.09 (Euler-Maruyama)."""
    scale, w, per_class = 2.0, 1.0, 100
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 1000), objective=objective, clip_denoised=False)
    network = GaussianClassNetwork(objective, diffusion.alphas_cumprod)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)
    shape = (len(labels), 1, 2, 2)

    def mixed(x, t):
        alpha_bar = alpha_bar_at(diffusion.alphas_cumprod, t.asnumpy()).reshape(-1, 1, 1, 1)
        x = x.asnumpy().astype(np.float64)
        out_cond = exact_output(objective, alpha_bar, x, CLASS_MEANS[labels].reshape(-1, 1, 1, 1))
        out_uncond = exact_output(objective, alpha_bar, x, CLASS_MEANS[NUM_CLASSES])
        return ms.Tensor(((1 + w) * out_cond - w * out_uncond).astype(np.float32))

    samples = []
    for model, cond in [(ClassifierFreeGuidance(network, NUM_CLASSES, scale), ms.Tensor(labels)), (mixed, None)]:
        sampler = create_sampler(name, diffusion)  # a fresh one: multistep samplers keep history
        sampler.set_timesteps(20)
        samples.append(sampler.sample(model, shape, seed=0, progress=False, cond=cond).asnumpy())
    np.testing.assert_allclose(samples[0], samples[1], rtol=1e-4, atol=1e-4)
    guided_means = CLASS_MEANS[NUM_CLASSES] + scale * (CLASS_MEANS[:NUM_CLASSES] - CLASS_MEANS[NUM_CLASSES])
    means = samples[0].reshape(NUM_CLASSES, -1).mean(axis=1)
    np.testing.assert_allclose(means, guided_means, atol=0.15)


def test_negative_guidance_scale_is_refused():
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        ClassifierFreeGuidance(KnownNetwork(), NUM_CLASSES, -0.5)
