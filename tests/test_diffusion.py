"""Forward process, prediction conversions and training losses."""
import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.processes import GaussianDiffusion, predict_eps, predict_x0, vp_alpha_sigma
from ms_ddpm.losses import DiffusionLoss, timestep_weights
from ms_ddpm.schedules import get_beta_schedule
from tests.helpers import import_torch_reference

RNG = np.random.default_rng(0)
X0 = RNG.uniform(-1, 1, (4, 1, 6, 6)).astype(np.float32)
NOISE = RNG.standard_normal((4, 1, 6, 6)).astype(np.float32)
T_BATCH = np.array([0, 10, 500, 999], np.int32)


def test_q_sample_and_v_target_match_diffusers():
    torch, diffusers = import_torch_reference()
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    d = GaussianDiffusion(get_beta_schedule("cosine", 1000), objective="v")
    x0, noise, t = ms.Tensor(X0), ms.Tensor(NOISE), ms.Tensor(T_BATCH)
    tx0, tnoise, tt = torch.from_numpy(X0), torch.from_numpy(NOISE), torch.from_numpy(T_BATCH).long()
    # atol: diffusers' float32 cumprod is off by ~1e-5 relative at t = 999, where alpha_bar ~ 1e-5
    np.testing.assert_allclose(d.q_sample(x0, t, noise).asnumpy(), ref.add_noise(tx0, tnoise, tt).numpy(), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(d.training_target(x0, t, noise).asnumpy(), ref.get_velocity(tx0, tnoise, tt).numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_predictions_invert_the_forward_process(objective):
    """Given the exact target, predict_x0 and predict_eps recover x_0 and eps (Eq. 4 and its inverses)."""
    d = GaussianDiffusion(get_beta_schedule("linear", 1000), objective=objective)
    x0, noise, t = ms.Tensor(X0), ms.Tensor(NOISE), ms.Tensor(T_BATCH[1:])  # t=0 is ill-conditioned for eps
    x0, noise = x0[1:], noise[1:]
    x_t = d.q_sample(x0, t, noise)
    target = d.training_target(x0, t, noise)
    alpha_bar = ms.Tensor(d.alphas_cumprod[T_BATCH[1:]].reshape(-1, 1, 1, 1), ms.float32)
    alpha, sigma = vp_alpha_sigma(alpha_bar)
    np.testing.assert_allclose(predict_x0(objective, target, x_t, alpha, sigma).asnumpy(), x0.asnumpy(), atol=2e-3)
    np.testing.assert_allclose(predict_eps(objective, target, x_t, alpha, sigma).asnumpy(), noise.asnumpy(), atol=2e-3)


def test_loss_weights_match_their_formulas():
    d = GaussianDiffusion(get_beta_schedule("linear", 1000), objective="eps")
    snr = np.cumprod(1 - d.betas) / (1 - np.cumprod(1 - d.betas))
    np.testing.assert_allclose(timestep_weights(d, "none"), 1.0)
    np.testing.assert_allclose(timestep_weights(d, "min_snr", min_snr_gamma=5), np.minimum(snr, 5) / snr)
    np.testing.assert_allclose(timestep_weights(d, "p2", p2_gamma=0.5, p2_k=1), (1 + snr) ** -0.5)
    v = GaussianDiffusion(d.betas, objective="v")
    np.testing.assert_allclose(timestep_weights(v, "min_snr"), np.minimum(snr, 5) / (snr + 1))  # Hang et al.
    x0 = GaussianDiffusion(d.betas, objective="x0")
    np.testing.assert_allclose(timestep_weights(x0, "min_snr"), np.minimum(snr, 5))


@pytest.mark.parametrize("objective", ["x0", "v"])
def test_weighted_losses_agree_across_objectives(objective):
    """The same network error costs the same under every objective once weighted (L2, any weighting)."""
    d_eps = GaussianDiffusion(get_beta_schedule("linear", 1000), objective="eps")
    d_obj = GaussianDiffusion(d_eps.betas, objective=objective)
    x0, noise, t = ms.Tensor(X0), ms.Tensor(NOISE), ms.Tensor(T_BATCH[1:])
    x0, noise = x0[1:], noise[1:]
    x_t = d_eps.q_sample(x0, t, noise)
    eps_hat = noise + 0.1  # a network that is wrong by 0.1 in eps
    alpha_bar = ms.Tensor(d_eps.alphas_cumprod[T_BATCH[1:]].reshape(-1, 1, 1, 1), ms.float32)
    x0_hat = predict_x0("eps", eps_hat, x_t, *vp_alpha_sigma(alpha_bar))
    pred = x0_hat if objective == "x0" else alpha_bar**0.5 * eps_hat - (1 - alpha_bar) ** 0.5 * x0_hat
    target = d_obj.training_target(x0, t, noise)
    for weighting in ("p2", "min_snr"):
        w_eps = timestep_weights(d_eps, weighting)[T_BATCH[1:]]
        w_obj = timestep_weights(d_obj, weighting)[T_BATCH[1:]]
        err_eps = (0.1**2) * w_eps
        err_obj = ((pred - target) ** 2).mean(axis=(1, 2, 3)).asnumpy() * w_obj
        np.testing.assert_allclose(err_obj, err_eps, rtol=2e-3)


class Identity(ms.nn.Cell):
    def construct(self, x, t):
        return x * 0.5


@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_matches_torch_in_both_modes(loss_type, weighting):
    torch, _ = import_torch_reference()
    d = GaussianDiffusion(get_beta_schedule("linear", 1000))
    loss_fn = DiffusionLoss(Identity(), d, loss_type=loss_type, weighting=weighting)
    x_t = np.sqrt(d.alphas_cumprod[T_BATCH]).reshape(-1, 1, 1, 1) * X0 + np.sqrt(
        1 - d.alphas_cumprod[T_BATCH]).reshape(-1, 1, 1, 1) * NOISE
    pred, target = torch.from_numpy(0.5 * x_t), torch.from_numpy(NOISE.astype(np.float64))
    per_pixel = {"l1": torch.nn.functional.l1_loss, "l2": torch.nn.functional.mse_loss,
                 "huber": torch.nn.functional.smooth_l1_loss}[loss_type](pred, target, reduction="none")
    w = torch.from_numpy(timestep_weights(d, weighting)[T_BATCH])
    expected = (per_pixel.mean(dim=(1, 2, 3)) * w).mean().item()
    for mode in (ms.PYNATIVE_MODE, ms.GRAPH_MODE):
        ms.set_context(mode=mode)
        got = loss_fn(ms.Tensor(X0), ms.Tensor(T_BATCH), ms.Tensor(NOISE)).asnumpy()
        assert got == pytest.approx(expected, rel=1e-5)


def test_bad_loss_arguments_name_the_choices():
    d = GaussianDiffusion(get_beta_schedule("linear", 10))
    with pytest.raises(ValueError, match=r"loss_type must be one of \['l1', 'l2', 'huber'\]"):
        DiffusionLoss(Identity(), d, loss_type="mse")
    with pytest.raises(ValueError, match=r"loss_weighting must be one of \['none', 'p2', 'min_snr'\]"):
        DiffusionLoss(Identity(), d, weighting="snr")
