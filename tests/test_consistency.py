"""Consistency models (Song et al. 2023): the boundary-condition parametrisation and multistep sampling
(Algorithm 1) against diffusers' `CMStochasticIterativeScheduler` through its own loop, with our loop's noise
injected into its draws (graph mode against PyNative: tests/test_processes.py, with EDM's samplers).

Tolerance: rtol 1e-4 (atol 1e-4 of the largest value) in float32, as tests/test_processes.py (diffusers builds its
grid in float64 and casts it to float32, ms_ddpm keeps float64 host-side).
"""
from unittest import mock

import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.cli import main as cli_main
from ms_ddpm.config import Config, ConfigError
from ms_ddpm.processes import ConsistencyModel, create_process
from ms_ddpm.samplers import ConsistencySampler, create_sampler, samplers_for
from ms_ddpm.schedules import karras_sigmas
from tests.helpers import import_torch_reference
from tests.test_samplers import dummy_model

SHAPE = (3, 2, 4, 5)
RTOL = 1e-4


def ms_model(x, t):
    return ms.Tensor(dummy_model(x.asnumpy(), t.asnumpy()))


def process(**keys):
    return create_process(Config.from_dict({"diffusion": {"process": "consistency", **keys}}).diffusion)


def diffusers_loop(torch, diffusers, proc, steps, s_noise, seed):
    """The consistency pipeline's loop (x_T = init_noise_sigma z, scale_model_input, the network at each timestep,
    step), its noise draws replaced by those of our `sample()` from the same seed."""
    scheduler = diffusers.CMStochasticIterativeScheduler(
        num_train_timesteps=proc.num_levels, sigma_min=proc.sigma_min, sigma_max=proc.sigma_max,
        sigma_data=proc.sigma_data, s_noise=s_noise, rho=proc.rho, clip_denoised=proc.clip_denoised)
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)) * scheduler.init_noise_sigma
    draws = iter(lambda: torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)), None)
    module = "diffusers.schedulers.scheduling_consistency_models.randn_tensor"
    with mock.patch(module, side_effect=lambda *a, **k: next(draws)):
        for t in scheduler.timesteps:
            if steps == 1:
                next(draws)  # our loop draws the step's noise and scales it by 0; diffusers draws none
            model_input = scheduler.scale_model_input(x, t)
            out = torch.from_numpy(dummy_model(model_input.numpy(), np.full(SHAPE[0], float(t))))
            x = scheduler.step(out, t, x).prev_sample
    return scheduler.timesteps.numpy(), x.numpy()


@pytest.mark.parametrize("steps,keys,s_noise", [
    (1, {}, 1.0),
    (2, {}, 1.0),
    (3, {"clip_denoised": False}, 1.0),
    (4, {"num_levels": 18, "sigma_max": 40.0, "sigma_data": 0.8, "rho": 5.0, "clip_denoised": False}, 0.9),
    (40, {}, 1.0),
])
def test_consistency_sampling_matches_cm_stochastic_iterative_scheduler(steps, keys, s_noise):
    torch, diffusers = import_torch_reference()
    proc = process(**keys)
    ref_timesteps, expected = diffusers_loop(torch, diffusers, proc, steps, s_noise, seed=6)
    sampler = create_sampler("consistency", proc, s_noise=s_noise)
    sampler.set_timesteps(steps)
    x = sampler.sample(ms_model, SHAPE, seed=6, progress=False).asnumpy()
    np.testing.assert_allclose(sampler.timesteps, ref_timesteps, rtol=1e-6)
    assert sampler.init_noise_sigma == pytest.approx(float(proc.sigma_max))
    np.testing.assert_allclose(x, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert np.abs(x).std() > 0.05


def test_boundary_condition_and_the_paper_grid():
    """f(x; sigma_min) = x (c_skip 1, c_out 0: Song et al. 2023, Eq. 5); c_in and the levels are EDM's; K steps
    visit the levels k floor(N / K) of the N-level Karras grid and end at sigma_min."""
    proc = process(num_levels=40)
    c_skip, c_out, c_in, c_noise = proc.preconditioning(proc.sigma_min)
    assert (c_skip, c_out) == (1.0, 0.0)
    assert c_in == pytest.approx((proc.sigma_min**2 + 0.25) ** -0.5)
    assert c_noise == pytest.approx(250.0 * np.log(proc.sigma_min))
    sampler = create_sampler("consistency", proc)
    assert sampler.num_inference_steps == 1  # one-step generation by default
    sampler.set_timesteps(4)
    grid = karras_sigmas(0.002, 80.0, 40, 7.0)
    np.testing.assert_allclose(sampler.sigmas, [grid[0], grid[10], grid[20], grid[30], 0.002])


def test_registry_refusals(tmp_path, capsys):
    """The consistency sampler runs only its process and at most N steps; bad keys fail in one line; the trainer
    refuses the process (its training is not built) with exit status 2."""
    assert samplers_for("consistency") == ("consistency",)
    assert isinstance(create_sampler("consistency", process()), ConsistencySampler)
    with pytest.raises(ValueError, match=r"^sampler 'euler' does not run process 'consistency'; its samplers: "
                                         r"\['consistency'\]$"):
        create_sampler("euler", process())
    with pytest.raises(ValueError, match="does not run process 'edm'"):
        create_sampler("consistency", create_process(Config.from_dict({"diffusion": {"process": "edm"}}).diffusion))
    with pytest.raises(ValueError, match="num_inference_steps 41 exceeds the process's 40 levels"):
        create_sampler("consistency", process()).set_timesteps(41)
    with pytest.raises(ConfigError, match="num_levels must be an int >= 2"):
        Config.from_dict({"diffusion": {"process": "consistency", "num_levels": 1}})
    with pytest.raises(ValueError):
        ConsistencyModel(sigma_min=1.0, sigma_max=0.5)
    config = tmp_path / "cm.yaml"
    config.write_text(f"diffusion:\n  process: consistency\ndata:\n  image_size: 8\ntrain:\n  output_dir: {tmp_path}\n"
                      "  steps: 1\n  warmup_steps: 0\n  sampler: consistency\n  sample_steps: 1\n")
    code = cli_main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "is not trained by the denoising loss" in err
