"""Denoising networks: construct(x (B, C, H, W), t (B,), cond=None) -> (B, C_out, H, W); and the latent-diffusion
autoencoder (`autoencoder_kl`), which `ms-ddpm train` trains with its own loss and which shares the interface below.

`cond` is the condition of the generation: for now a (B,) int32 tensor of class labels. A class-conditional network
(built with `num_classes` / `num_class_embeds`) requires it, an unconditional one refuses it. Both networks expose
`num_class_embeds`, the number of rows of their class embedding (None when unconditional), and
`check_image_size(height, width)`, which refuses a size the network cannot take before anything is compiled, and
`RECOMPUTE_UNITS`, the block classes `recompute_blocks` marks for recomputation.
"""
import mindspore as ms
import numpy as np

from ..utils import check_choice
from .autoencoder_kl import AutoencoderKL
from .ddpm_unet import DDPMUNet
from .unet import Unet

MODELS = {"unet": Unet, "ddpm_unet": DDPMUNet, "autoencoder_kl": AutoencoderKL}


def create_model(name, **kwargs):
    """Build a network by name (one of MODELS) with its constructor arguments."""
    cls = MODELS[check_choice("model.name", name, MODELS)]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # an unknown, missing or badly typed constructor argument
        message = str(err).removeprefix(f"{cls.__name__}: ")  # the constructors' own messages name the class
        raise ValueError(f"model.kwargs do not fit {cls.__name__}: {message}") from None


def recompute_blocks(network):
    """Recompute the activations inside each of the network's blocks (its `RECOMPUTE_UNITS`: residual and attention
    blocks) in the backward pass instead of storing them: `Cell.recompute()`, gradient checkpointing (Chen et al.
    2016, "Training Deep Nets with Sublinear Memory Cost"). A block's output, which the U-Net's skips keep anyway,
    stays stored (MindSpore's default). The blocks do not nest, as `Cell.recompute` requires. With dropout > 0
    MindSpore does not promise that the recomputed forward draws the same masks. Returns the number of blocks."""
    blocks = [cell for _, cell in network.cells_and_names() if isinstance(cell, network.RECOMPUTE_UNITS)]
    for cell in blocks:
        cell.recompute()
    return len(blocks)


def call_network(network, x, t, cond=None):
    """network(x, t), or network(x, t, cond) when there is a condition: plain callables of (x, t) stay usable
    wherever nothing conditions them. Graph mode resolves the branch at compile time (cond is None or a tensor)."""
    if cond is None:
        return network(x, t)
    return network(x, t, cond)


def apply_batched(network, images, batch_size):
    """`network` (a Cell of one input) over images (N, ...) in batches of `batch_size`, the last one padded with
    zeros so that graph mode compiles one shape; its output (or tuple of outputs) as NumPy, N rows each."""
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        out = network(ms.Tensor(x))
        outputs.append([o.asnumpy()[:n] for o in (out if isinstance(out, tuple) else (out,))])
    joined = tuple(np.concatenate(column) for column in zip(*outputs))
    return joined if len(joined) > 1 else joined[0]


__all__ = ["Unet", "DDPMUNet", "AutoencoderKL", "MODELS", "create_model", "recompute_blocks", "call_network",
           "apply_batched"]
