"""Denoising networks: construct(x (B, C, H, W), t (B,)) -> (B, C_out, H, W)."""
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


__all__ = ["Unet", "DDPMUNet", "MODELS", "create_model"]
