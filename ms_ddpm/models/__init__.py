"""Denoising networks: construct(x (B, C, H, W), t (B,), cond=None) -> (B, C_out, H, W).

`cond` is the condition of the generation: for now a (B,) int32 tensor of class labels. A class-conditional network
(built with `num_classes` / `num_class_embeds`) requires it, an unconditional one refuses it. Both networks expose
`num_class_embeds`, the number of rows of their class embedding (None when unconditional), and
`check_image_size(height, width)`, which refuses a size the network cannot take before anything is compiled.
"""
from ..utils import check_choice
from .ddpm_unet import DDPMUNet
from .unet import Unet

MODELS = {"unet": Unet, "ddpm_unet": DDPMUNet}


def create_model(name, **kwargs):
    """Build a network by name (one of MODELS) with its constructor arguments."""
    cls = MODELS[check_choice("model.name", name, MODELS)]
    try:
        return cls(**kwargs)
    except TypeError as err:  # an unknown or missing constructor argument
        raise ValueError(f"model.kwargs do not fit {cls.__name__}: {err}") from None


def call_network(network, x, t, cond=None):
    """network(x, t), or network(x, t, cond) when there is a condition: plain callables of (x, t) stay usable
    wherever nothing conditions them. Graph mode resolves the branch at compile time (cond is None or a tensor)."""
    if cond is None:
        return network(x, t)
    return network(x, t, cond)


__all__ = ["Unet", "DDPMUNet", "MODELS", "create_model", "call_network"]
