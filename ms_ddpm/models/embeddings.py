"""Embeddings shared by every network in `ms_ddpm.models`: the sinusoidal timestep embedding, and the class
embedding that conditions a network through its time embedding."""
import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.common.initializer import Normal


def timestep_embedding(timesteps, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, max_period=10000.0):
    """Transformer-style sinusoidal embedding of (integer or real) timesteps.

    DDPM (Ho et al. 2020, Appendix B) embeds t with the positional encoding of Vaswani et al. (2017, Sec. 3.5):
    frequencies exp(-log(max_period) * i / (half - downscale_freq_shift)), i = 0..half-1, sines first.
    `downscale_freq_shift=1` is the DDPM/annotated-diffusion variant (denominator half - 1); the names and defaults
    follow diffusers' `get_timestep_embedding`, so converted diffusers weights see the same features.

    Args:
        timesteps: (B,) tensor of timesteps (any numeric dtype; NCSN passes real noise levels).
        dim: embedding width; odd widths are zero-padded by one column.

    Returns:
        (B, dim) float32 tensor.
    """
    half = dim // 2
    # Frequencies in float64, rounded once: float32 exp() error is multiplied by t (up to 1000) in the argument.
    freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - downscale_freq_shift)).astype(np.float32)
    args = timesteps.astype(ms.float32)[:, None] * ms.Tensor(freqs)[None, :]
    emb = ops.cat((ops.sin(args), ops.cos(args)), axis=-1)
    if flip_sin_to_cos:
        emb = ops.cat((emb[:, half:], emb[:, :half]), axis=-1)
    if dim % 2 == 1:
        emb = ops.pad(emb, (0, 1))
    return emb


class SinusoidalPositionEmbeddings(nn.Cell):
    """Cell wrapper of `timestep_embedding` (the name used by the annotated-diffusion tutorial)."""

    def __init__(self, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0):
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def construct(self, timesteps):
        return timestep_embedding(timesteps, self.dim, self.flip_sin_to_cos, self.downscale_freq_shift)


def class_embedding_table(num_rows, dim):
    """A learned (num_rows, dim) class embedding initialised N(0, 1), as torch.nn.Embedding is in diffusers'
    `UNet2DModel` and lucidrains' guided U-Net. MindSpore's default, N(0, 0.01), starts the label's contribution a
    hundred times smaller than that and left it small: after 650 steps of configs/unet_mnist5k_cond_cpu.yaml the
    rows' norms were 0.1 to 0.45 and the grids showed no class."""
    return nn.Embedding(num_rows, dim, embedding_table=Normal(1.0))


def add_class_embedding(temb, class_embedding, cond, network, argument):
    """temb + class_embedding(cond): the label conditions the network wherever the time does (diffusers'
    `UNet2DModel` with class_embed_type None; the annotated U-Net likewise). A network built without a class
    embedding (`class_embedding` None) refuses labels, one built with one requires them; `network` and `argument`
    (the constructor argument that adds the embedding) name them in the message."""
    if class_embedding is None:
        if cond is not None:
            raise ValueError(f"{network}: this network is unconditional (built without {argument}): it takes no "
                             "class labels (cond)")
        return temb
    if cond is None:
        raise ValueError(f"{network}: this network is class-conditional ({argument}): pass cond, (B,) int32 class "
                         "labels")
    return temb + class_embedding(cond)
