"""Training losses: the diffusion loss of every noise process, with DDPM's per-pixel loss types and per-timestep
weightings, and the latent-diffusion autoencoder's reconstruction + KL loss.

`DiffusionLoss` weightings are written for the eps objective and carried over to the others through the identities
||x0_hat - x_0||^2 = ||eps_hat - eps||^2 / SNR and ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x_0||^2
(Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", Sec. 3.3), so the same weighting
means the same thing whatever the network predicts: an x0 loss is weighted by w * SNR, a v loss by
w * SNR / (SNR + 1). (The identities are exact for L2, approximate for L1/Huber.)
    none:    w = 1: L_simple (Ho et al. 2020, Eq. 14).
    p2:      w = 1 / (k + SNR)^gamma (Choi et al. 2022, "Perception Prioritized Training", Eq. 8).
    min_snr: w = min(SNR, gamma) / SNR (Hang et al. 2023, Eq. 11).

A learned variance (DDPM's `variance_type: learned_range`, Nichol & Dhariwal 2021) adds the bound: L_hybrid =
L_simple + lambda L_vlb (their Sec. 3.1), L_vlb = T E_t[L_t] estimated by the drawn t's term in bits/dim
(`ms_ddpm.metrics.likelihood.vb_terms_bpd`: the KL of Eq. 5, the discretised decoder at t = 0) with the gradient
to the mean stopped, so the bound trains the variance half only and L_simple the prediction: lambda T L_t, which
for lambda = 0.001 is improved-diffusion's `LossType.RESCALED_MSE` (its vb term times T / 1000). The weightings
apply to L_simple alone.

`DiffusionLoss` takes the condition of the generation (`cond`, e.g. class labels, with the null label where the
trainer dropped it for classifier-free guidance) and hands it to the network.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .metrics.likelihood import vb_terms_bpd
from .models import call_network
from .models.autoencoder_kl import kl_standard_normal, sample_posterior
from .processes import split_output
from .utils import check_choice

LOSS_TYPES = ("l1", "l2", "huber")
WEIGHTINGS = ("none", "p2", "min_snr")


def timestep_weights(diffusion, weighting, p2_gamma=1.0, p2_k=1.0, min_snr_gamma=5.0):
    """Per-timestep loss weights, shape (T,), float64, for `diffusion.objective`."""
    check_choice("loss_weighting", weighting, WEIGHTINGS)
    snr = diffusion.snr
    if weighting == "none":
        return np.ones_like(snr)
    w_eps = 1.0 / (p2_k + snr) ** p2_gamma if weighting == "p2" else np.minimum(snr, min_snr_gamma) / snr
    return w_eps * {"eps": 1.0, "x0": snr, "v": snr / (snr + 1.0)}[diffusion.objective]


class DiffusionLoss(nn.Cell):
    """Network plus noise process: the training loss for a batch of clean images, for every process of
    `ms_ddpm.processes` (its `training_terms` say what the network sees and what it regresses on):
        ddpm   L_simple on eps / x0 / v (Ho et al. 2020, Eq. 14), with the loss types and weightings above
        ncsn   denoising score matching over the levels (Song & Ermon 2019, Eqs. 5-6: 1/2 sum over pixels
               ||sigma_i s(x + sigma_i z, i) + z||^2, averaged over the batch)
        edm    ||F - (x_0 - c_skip x) / c_out||^2, the EDM loss written for F (Karras et al. 2022, Eq. 8)
        flow   ||u_theta(x_t, t) - (eps - x_0)||^2 (Esser et al. 2024, Eq. 4)

    construct(x_start, t, noise, cond=None): x_start (B, C, H, W) in [-1, 1]; t (B,) the process's time (int32
    timesteps or level indices; float32 sigma for EDM, t for flow); noise (B, C, H, W) standard normal; cond the
    network's condition ((B,) int32 labels) or None; returns the scalar loss. t, noise and cond come from the caller
    so that a run is reproducible from one counter-based generator (`ms_ddpm.train.randomness`), and identical in
    graph and PyNative mode.

    The loss is computed in float32 whatever dtype the network runs in (mixed precision). `loss_type` and
    `weighting` are process ddpm's settings (`DDPMConfig.loss_options`); the other processes regress with L2,
    weighted as their papers. `huber` is smooth L1 with beta = 1 (PyTorch's `F.smooth_l1_loss`), the loss of the
    annotated-diffusion tutorial. `vlb_weight`: lambda of L_hybrid, for a process with a learned variance.
    """

    def __init__(self, network, process, loss_type="l2", weighting="none", p2_gamma=1.0, p2_k=1.0, min_snr_gamma=5.0,
                 vlb_weight=0.001):
        # auto_prefix=False keeps the network's parameter names its own (no "network." prefix), so checkpoints
        # load into a bare network, as with MindSpore's WithLossCell
        super().__init__(auto_prefix=False)
        self.network = network
        self.process = process
        self.loss_type = check_choice("loss_type", loss_type, LOSS_TYPES)
        self.weighted = weighting != "none"
        if process.name != "ddpm" and (self.weighted or loss_type != "l2"):
            raise ValueError(f"loss_type and loss weighting are settings of process ddpm; process {process.name!r} "
                             "regresses with l2 as its paper")
        if self.weighted:
            self.weights = ms.Tensor(timestep_weights(process, weighting, p2_gamma, p2_k, min_snr_gamma), ms.float32)
        # lambda L_vlb = lambda T E_t[L_t]: the drawn t's term times lambda T
        self.vlb_scale = float(vlb_weight) * (process.num_timesteps or 0) if process.learned_variance else 0.0

    def construct(self, x_start, t, noise, cond=None):
        model_input, time, target, weight = self.process.training_terms(x_start, t, noise)
        output = call_network(self.network, model_input, time, cond).astype(ms.float32)
        prediction, v = split_output(self.process, output)
        diff = prediction - target
        if self.loss_type == "l1":
            loss = ops.abs(diff)
        elif self.loss_type == "l2":
            loss = diff * diff
        else:
            abs_diff = ops.abs(diff)
            loss = ops.where(abs_diff < 1.0, 0.5 * diff * diff, abs_diff - 0.5)
        loss = loss.mean(axis=(1, 2, 3))
        if weight is not None:
            loss = loss * weight
        if self.weighted:
            loss = loss * ops.gather(self.weights, t, 0)
        if v is not None:  # the bound through the variance half only (Nichol & Dhariwal 2021, Sec. 3.1)
            frozen = ops.cat((ops.stop_gradient(prediction), v), axis=1)
            loss = loss + self.vlb_scale * vb_terms_bpd(self.process, frozen, x_start, model_input, t)
        return loss.mean()


class AutoencoderLoss(nn.Cell):
    """The first-stage loss of latent diffusion without its perceptual and adversarial terms (Rombach et al. 2022,
    Sec. 3.1 and Appendix G; LDM's LPIPSWithDiscriminator with those weights at 0 and its log-variance at 0):

        loss = mean over the batch of [ sum over pixels |x - D(z)|  (l1; l2: squared)  +  kl_weight KL(q(z|x) || N(0, I)) ]

    with z = mean + std * eps drawn from the posterior by the reparameterisation (Kingma & Welling 2014, Sec. 2.4),
    so the reconstruction error is differentiated through the sample, and the KL in closed form
    (`kl_standard_normal`, their Appendix B). Sums over pixels, as LDM, so `kl_weight` keeps the paper's meaning.

    construct(x_start, t, noise, cond=None): x_start (B, C, H, W) images in [-1, 1]; t unused (the training step's
    interface); noise (B, latent_channels, H/f, W/f) standard normal, the eps of the posterior sample; cond must be
    None. Returns the scalar loss; `terms` gives its two terms per image.
    """

    def __init__(self, autoencoder, loss_type="l1", kl_weight=1e-6):
        super().__init__(auto_prefix=False)  # the autoencoder's parameter names stay its own, as DiffusionLoss's
        self.autoencoder = autoencoder
        self.loss_type = check_choice("autoencoder.loss_type", loss_type, ("l1", "l2"))
        self.kl_weight = float(kl_weight)

    def noise_shape(self, shape):
        """The shape of the posterior sample's eps for images of `shape`: the latents' (the training step asks)."""
        return self.autoencoder.latent_shape(shape)

    def terms(self, x_start, noise):
        """(reconstruction error, KL), each (B,) float32: the two terms of the loss per image."""
        mean, logvar = self.autoencoder.encode(x_start)
        reconstruction = self.autoencoder.decode(sample_posterior(mean, logvar, noise))
        diff = reconstruction.astype(ms.float32) - x_start.astype(ms.float32)
        error = ops.abs(diff) if self.loss_type == "l1" else diff * diff
        return error.sum(axis=(1, 2, 3)), kl_standard_normal(mean, logvar)

    def construct(self, x_start, t, noise, cond=None):
        reconstruction, kl = self.terms(x_start, noise)
        return (reconstruction + self.kl_weight * kl).mean()
