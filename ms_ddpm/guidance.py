"""Classifier-free guidance (Ho & Salimans 2021, "Classifier-Free Diffusion Guidance"; equation numbers refer to it).

One network is trained both conditionally and unconditionally: in training the label is replaced by the null label
with probability `diffusion.cond_drop_prob` (Algorithm 1). Sampling mixes the two predictions (Eq. 6, written in
diffusers' convention, where `guidance_scale` = 1 + the paper's w):

    out = out_uncond + guidance_scale (out_cond - out_uncond)

guidance_scale = 1 is the plain conditional network, 0 the unconditional one; above 1 the sample moves away from the
unconditional prediction, trading diversity for fidelity to the class.

Why the raw network output may be mixed whatever it predicts: Eq. 6 guides eps, and each objective's output is
affine in eps with coefficients fixed by x_t and t (Ho et al. 2020, Eq. 4; Salimans & Ho 2022, Sec. 4):
    eps:   eps
    x0:    x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
    v:     v = (eps - sqrt(1 - ab) x_t) / sqrt(ab)
    score: s = -eps / sqrt(1 - ab)   (VP; a VE / NCSN score network guides its output, the score, directly)
The two branches see the same x_t and t, so out = a eps + b x_t with the same a, b in both, and since the mixing
weights (1 - guidance_scale) + guidance_scale sum to 1, guiding the outputs equals guiding the implied eps and
converting back (tests/test_guidance.py checks it for each objective).

A network with a learned variance (2C output channels, `ms_ddpm.processes.split_output`) has its prediction half
mixed and the unconditional branch's variance half passed through, as improved-diffusion's guided sampling: the
variance is not affine in eps, and Eq. 6 says nothing about it.
"""
import mindspore as ms
from mindspore import nn, ops

from .processes import split_output


def trained_null_label(network, cfg):
    """The null label that `cfg.diffusion.cond_drop_prob` trains: the row after the classes of `cfg.data.class_names`
    (`Unet(num_classes=N)`'s row N). None without one: an unconditional network, no label dropout, or a class
    embedding with no row beyond the classes (e.g. a converted diffusers model)."""
    rows = getattr(network, "num_class_embeds", None)
    names = cfg.data.class_names
    if rows is None or not names or rows != len(names) + 1 or not cfg.diffusion.cond_drop_prob > 0:
        return None
    return len(names)


class ClassifierFreeGuidance(nn.Cell):
    """A guided network: construct(x (B, C, H, W), t (B,), cond (B,) int32 labels) -> the guided output, x's shape.

    Both predictions come from one call of `network` on the doubled batch (x, x), (t, t), (cond, null), so inside a
    sampler's compiled step (`ms_ddpm.samplers.base.FusedStep`) a guided step is still one graph launch. The scale
    is a Parameter, read when the graph runs: `set_guidance_scale` changes it without a recompile.

    Args:
        network: a class-conditional network whose label `null_label` is the unconditional branch.
        null_label: index of the null label (the number of real classes, `Unet(num_classes=N)`'s row N).
        guidance_scale: the scale, >= 0 (1: no guidance; use the network itself then, which costs half).
        learned_variance: whether the output's second half is a learned variance (the process's
            `learned_variance`), which is not mixed.
    """

    def __init__(self, network, null_label, guidance_scale, learned_variance=False):
        # auto_prefix=False: the network's parameters keep their names, so the wrapped network stays loadable
        super().__init__(auto_prefix=False)
        self.network = network
        self.null_label = int(null_label)
        self.learned_variance = bool(learned_variance)
        self.guidance_scale = ms.Parameter(ms.Tensor(0.0, ms.float32), name="guidance_scale", requires_grad=False)
        self.set_guidance_scale(guidance_scale)

    def set_guidance_scale(self, guidance_scale):
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (1: plain conditional sampling), got {guidance_scale!r}")
        self.guidance_scale.set_data(ms.Tensor(float(guidance_scale), ms.float32))

    def construct(self, x, t, cond):
        batch = x.shape[0]
        null = ops.full_like(cond, self.null_label)
        out = self.network(ops.cat((x, x)), ops.cat((t, t)), ops.cat((cond, null)))
        out_cond, out_uncond = out[:batch], out[batch:]
        # the output contract (`split_output` reads this Cell's `learned_variance`): v is None without one
        cond_pred, _ = split_output(self, out_cond)
        uncond_pred, uncond_v = split_output(self, out_uncond)
        mean = uncond_pred + self.guidance_scale.astype(out.dtype) * (cond_pred - uncond_pred)
        return mean if uncond_v is None else ops.cat((mean, uncond_v), axis=1)
