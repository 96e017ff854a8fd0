"""DDPM and DDIM sampling loops against diffusers' schedulers on the same model, inputs and noise."""
from unittest import mock

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ms_ddpm.processes import GaussianDiffusion
from ms_ddpm.samplers import DDIMSampler, DDPMSampler, create_sampler, spaced_timesteps
from ms_ddpm.samplers.base import FusedStep
from ms_ddpm.schedules import get_beta_schedule
from tests.helpers import import_torch_reference

T = 1000
SHAPE = (3, 2, 4, 5)
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def dummy_model(x, t):
    """A fixed, smooth, non-trivial function of (x_t, t) standing in for a trained network (NumPy in, NumPy out)."""
    t = np.asarray(t, dtype=np.float64).reshape(-1, 1, 1, 1)
    return (0.8 * x + 0.3 * np.sin(2 * x + t / 150.0)).astype(np.float32)


def ms_model(x, t):
    return ms.Tensor(dummy_model(x.asnumpy(), t.asnumpy()))


def diffusers_loop(torch, diffusers, kind, steps, eta, objective, clip, spacing, seed, use_clipped_model_output):
    """The reference loop, fed the draws our `sample()` makes: x_T, then one noise array per stochastic step."""
    cls = diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler
    ref = cls(num_train_timesteps=T, prediction_type=PREDICTION_TYPES[objective], clip_sample=clip,
              timestep_spacing=spacing)
    ref.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
    for t in ref.timesteps:
        out = torch.from_numpy(dummy_model(x.numpy(), np.full(SHAPE[0], int(t))))
        if kind == "ddpm":
            noise = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
            with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", return_value=noise):
                x = ref.step(out, t, x).prev_sample
        else:
            noise = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)) if eta > 0 else None
            x = ref.step(out, t, x, eta=eta, variance_noise=noise,
                         use_clipped_model_output=use_clipped_model_output).prev_sample
    return ref.timesteps.numpy(), x.numpy()


CASES = [
    # (sampler, steps, eta, objective, clip, spacing)
    ("ddpm", 10, None, "eps", True, "leading"),
    ("ddpm", 50, None, "eps", False, "leading"),
    ("ddpm", 10, None, "v", False, "trailing"),
    ("ddpm", 50, None, "x0", True, "leading"),
    ("ddim", 10, 0.0, "eps", True, "leading"),
    ("ddim", 10, 1.0, "eps", False, "leading"),
    ("ddim", 50, 0.0, "eps", False, "leading"),
    ("ddim", 50, 1.0, "eps", True, "leading"),
    ("ddim", 10, 0.0, "v", False, "trailing"),
    ("ddim", 50, 0.5, "x0", True, "trailing"),
]


@pytest.mark.parametrize("kind,steps,eta,objective,clip,spacing,clipped_eps",
                         [case + (True,) for case in CASES] + [("ddim", 10, 0.0, "eps", True, "leading", False)])
def test_sampling_loop_matches_diffusers(kind, steps, eta, objective, clip, spacing, clipped_eps):
    """clipped_eps: DDIM's `use_clipped_model_output` (ours defaults to True, diffusers' to False; both ways)."""
    torch, diffusers = import_torch_reference()
    diffusion = GaussianDiffusion(get_beta_schedule("linear", T), objective=objective, clip_denoised=clip)
    kwargs = {} if kind == "ddpm" else {"eta": eta, "use_clipped_model_output": clipped_eps}
    sampler = create_sampler(kind, diffusion, timestep_spacing=spacing, **kwargs)
    sampler.set_timesteps(steps)
    ours = sampler.sample(ms_model, SHAPE, seed=7, progress=False).asnumpy()
    ref_timesteps, ref = diffusers_loop(torch, diffusers, kind, steps, eta, objective, clip, spacing, seed=7,
                                        use_clipped_model_output=clipped_eps)
    np.testing.assert_array_equal(sampler.timesteps, ref_timesteps)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.abs(ours).std() > 0.1  # the loop did not collapse to a constant


class CellModel(nn.Cell):
    """`dummy_model` as a Cell, so that graph mode can compile it into a `FusedStep`."""

    def construct(self, x, t):
        return 0.8 * x + 0.3 * ops.sin(2 * x + t.astype(ms.float32).reshape(-1, 1, 1, 1) / 150.0)


@pytest.mark.parametrize("kind,steps,eta,objective,clip,spacing", [CASES[0], CASES[3], CASES[7], CASES[8]])
def test_fused_graph_step_equals_the_op_by_op_loop(kind, steps, eta, objective, clip, spacing):
    """GRAPH_MODE runs network + update as one compiled graph per step (coefficients as 0-d float32 tensors);
    PyNative runs the same `update` op by op with float64 coefficients: the chains agree to float32 rounding."""
    diffusion = GaussianDiffusion(get_beta_schedule("linear", T), objective=objective, clip_denoised=clip)
    kwargs = {} if kind == "ddpm" else {"eta": eta}
    sampler = create_sampler(kind, diffusion, timestep_spacing=spacing, **kwargs)
    sampler.set_timesteps(steps)
    model = CellModel()
    op_by_op = sampler.sample(model, SHAPE, seed=5, progress=False).asnumpy()
    assert sampler._fused_step(model) is None
    ms.set_context(mode=ms.GRAPH_MODE)
    fused = sampler._fused_step(model)
    assert isinstance(fused, FusedStep) and sampler._fused_step(model) is fused  # built once per model
    graph = sampler.sample(model, SHAPE, seed=5, progress=False).asnumpy()
    np.testing.assert_allclose(graph, op_by_op, rtol=1e-5, atol=1e-5 * np.abs(op_by_op).max())
    assert np.abs(graph).std() > 0.1


def test_ddpm_step_mean_equals_p_mean_variance():
    """A full-length DDPM step without noise is the mean of p(x_{t-1} | x_t) (Ho et al. Eq. 11 via Eq. 7)."""
    diffusion = GaussianDiffusion(get_beta_schedule("cosine", 100))
    sampler = DDPMSampler(diffusion)
    x = ms.Tensor(np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32))
    for t in (99, 40, 1):
        t_batch = ms.Tensor(np.full(SHAPE[0], t, np.int32))
        out = ms_model(x, t_batch)
        step = sampler.step(out, t, x, ms.Tensor(np.zeros(SHAPE, np.float32)))
        mean, var, _, x0 = diffusion.p_mean_variance(out, x, t_batch)
        np.testing.assert_allclose(step.prev_sample.asnumpy(), mean.asnumpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(step.pred_original_sample.asnumpy(), x0.asnumpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var.asnumpy().ravel(), diffusion.posterior_variance[t], rtol=1e-6)


def test_ddim_eta1_has_ddpm_variance_and_eta0_is_deterministic():
    diffusion = GaussianDiffusion(get_beta_schedule("linear", T))
    ddim = DDIMSampler(diffusion, eta=0.0)
    ddim.set_timesteps(20)
    a = ddim.sample(ms_model, SHAPE, seed=1, progress=False).asnumpy()
    x_T = ms.Tensor(np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32))
    b = ddim.sample(ms_model, SHAPE, seed=999, x_T=x_T, progress=False).asnumpy()
    np.testing.assert_array_equal(a, b)  # eta = 0 draws no noise: x_T fixes the sample
    assert not ddim.stochastic and DDIMSampler(diffusion, eta=1.0).stochastic


def test_sample_progressive_yields_every_step_and_seed_fixes_the_result():
    diffusion = GaussianDiffusion(get_beta_schedule("linear", T))
    sampler = DDPMSampler(diffusion)
    sampler.set_timesteps(5)
    steps = list(sampler.sample_progressive(ms_model, SHAPE, seed=3, progress=False))
    assert len(steps) == 5 and all(s.prev_sample.shape == SHAPE for s in steps)
    again = sampler.sample(ms_model, SHAPE, seed=3, progress=False)
    np.testing.assert_array_equal(steps[-1].prev_sample.asnumpy(), again.asnumpy())
    other = sampler.sample(ms_model, SHAPE, seed=4, progress=False)
    assert not np.allclose(other.asnumpy(), again.asnumpy())


def test_step_draws_its_own_noise_when_none_is_given():
    diffusion = GaussianDiffusion(get_beta_schedule("linear", T))
    x = ms.Tensor(np.zeros(SHAPE, np.float32))
    out = DDPMSampler(diffusion).step(x, 500, x)
    assert out.prev_sample.shape == SHAPE and float(out.prev_sample.std()) > 0


def test_spacings():
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "leading"), [750, 500, 250, 0])
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "linspace"), [999, 666, 333, 0])
    np.testing.assert_array_equal(spaced_timesteps(10, 10, "leading"), np.arange(10)[::-1])


def test_bad_sampler_arguments_name_the_choices():
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 100))
    with pytest.raises(ValueError, match=r"sampler must be one of \['ddpm', 'ddim', 'euler_maruyama', 'pc', 'ode', "
                                         r"'dpm_solver', 'ald', 'euler', 'euler_ancestral', 'heun', 'consistency'\], "
                                         r"got 'lms'"):
        create_sampler("lms", diffusion)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer from 1 to the 100 training"):
        DDIMSampler(diffusion).set_timesteps(101)
    with pytest.raises(ValueError, match=r"timestep_spacing must be one of \['leading', 'trailing', 'linspace'\]"):
        DDIMSampler(diffusion, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DDIMSampler(diffusion, eta=-1)
