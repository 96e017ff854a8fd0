"""Training losses: the diffusion loss with its per-pixel loss types and per-timestep weightings, NCSN's
denoising score matching, and the latent-diffusion autoencoder's reconstruction + KL loss.

`DiffusionLoss` weightings are written for the eps objective and carried over to the others through the identities
||x0_hat - x_0||^2 = ||eps_hat - eps||^2 / SNR and ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x_0||^2
(Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", Sec. 3.3), so the same weighting
means the same thing whatever the network predicts: an x0 loss is weighted by w * SNR, a v loss by
w * SNR / (SNR + 1). (The identities are exact for L2, approximate for L1/Huber.)
    none:    w = 1: L_simple (Ho et al. 2020, Eq. 14).
    p2:      w = 1 / (k + SNR)^gamma (Choi et al. 2022, "Perception Prioritized Training", Eq. 8).
    min_snr: w = min(SNR, gamma) / SNR (Hang et al. 2023, Eq. 11).

Both losses take the condition of the generation (`cond`, e.g. class labels, with the null label where the trainer
dropped it for classifier-free guidance) and hand it to the network.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .models import call_network
from .models.autoencoder_kl import kl_standard_normal, sample_posterior
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
    """Network plus diffusion: the training loss for a batch of clean images.

    construct(x_start, t, noise, cond=None): x_start (B, C, H, W) in [-1, 1], t (B,) int32 timesteps, noise
    (B, C, H, W) standard normal, cond the network's condition ((B,) int32 labels) or None; returns the scalar loss.
    t, noise and cond come from the caller so that a run is reproducible from one host RNG whose state is
    checkpointed, and identical in graph and PyNative mode.

    The loss is computed in float32 whatever dtype the network runs in (mixed precision).
    `huber` is smooth L1 with beta = 1 (PyTorch's `F.smooth_l1_loss`), the loss of the annotated-diffusion tutorial.
    """

    def __init__(self, network, diffusion, loss_type="l2", weighting="none", p2_gamma=1.0, p2_k=1.0, min_snr_gamma=5.0):
        # auto_prefix=False keeps the network's parameter names its own (no "network." prefix), so checkpoints
        # load into a bare network, as with MindSpore's WithLossCell
        super().__init__(auto_prefix=False)
        self.network = network
        self.diffusion = diffusion
        self.loss_type = check_choice("loss_type", loss_type, LOSS_TYPES)
        self.weighted = weighting != "none"
        self.weights = ms.Tensor(timestep_weights(diffusion, weighting, p2_gamma, p2_k, min_snr_gamma), ms.float32)

    def construct(self, x_start, t, noise, cond=None):
        x_t = self.diffusion.q_sample(x_start, t, noise)
        target = self.diffusion.training_target(x_start, t, noise)
        diff = call_network(self.network, x_t, t, cond).astype(ms.float32) - target
        if self.loss_type == "l1":
            loss = ops.abs(diff)
        elif self.loss_type == "l2":
            loss = diff * diff
        else:
            abs_diff = ops.abs(diff)
            loss = ops.where(abs_diff < 1.0, 0.5 * diff * diff, abs_diff - 0.5)
        loss = loss.mean(axis=(1, 2, 3))
        if self.weighted:
            loss = loss * ops.gather(self.weights, t, 0)
        return loss.mean()


class NCSNLoss(nn.Cell):
    """Denoising score matching over all noise levels with lambda(sigma) = sigma^2 (Song & Ermon 2019, Eqs. 5-6):

        loss = 1/2 E_{i, x, z} || sigma_i s(x + sigma_i z, i) + z ||^2

    (Eq. 5's target -(x_tilde - x) / sigma^2 = -z / sigma, times lambda = sigma^2). The norm sums over pixels,
    the expectation averages over the batch, as the NCSN code's `anneal_dsm_score_estimation`.

    construct(x, labels, noise, cond=None): x (B, C, H, W) data, labels (B,) int32 level indices drawn uniformly
    from [0, L), noise (B, C, H, W) standard normal, cond as in `DiffusionLoss`; returns the scalar loss. labels,
    noise and cond come from the caller, as in `DiffusionLoss`, so a run is reproducible from one host RNG.

    Args:
        network: callable (x, labels[, cond]) -> score estimate of x's shape.
        sigmas: (L,) noise levels, largest first (e.g. `geometric_sigmas`, or a `NoiseLevels` process's `.sigmas`).
    """

    def __init__(self, network, sigmas):
        super().__init__(auto_prefix=False)
        self.network = network
        self.sigmas = ms.Tensor(np.asarray(sigmas, dtype=np.float64), ms.float32)

    def construct(self, x, labels, noise, cond=None):
        sigma = ops.gather(self.sigmas, labels, 0).reshape((-1,) + (1,) * (x.ndim - 1))
        score = call_network(self.network, x + sigma * noise, labels, cond).astype(ms.float32)
        residual = sigma * score + noise
        return 0.5 * (residual * residual).reshape(x.shape[0], -1).sum(1).mean()


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
