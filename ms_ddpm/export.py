"""`ms-ddpm export`: a checkpoint of `ms-ddpm train` as a diffusers folder, which PyTorch loads without ms_ddpm.

    ms-ddpm export --ckpt outputs/cifar10/ckpt_00800000.ckpt --out ddpm-cifar10
    # in PyTorch: diffusers.DDPMPipeline.from_pretrained("ddpm-cifar10"); here: DiffusionPipeline.from_pretrained

A `DDPMUNet` run (model.name ddpm_unet, unconditional or class-conditional) becomes a `DDPMPipeline` folder
(`ms_ddpm.diffusers_format`): unet/ (the UNet2DModel config and weights), scheduler/ (the run's chain as a
DDPMScheduler config) and model_index.json. An autoencoder run (model.name autoencoder_kl) becomes vae/, a diffusers
`AutoencoderKL`, whose scaling_factor is the one `latent.scaling_factor: auto` would use: its own when its arguments
set one, else 1 / std of its latents of the run's training split (encoded once, here). The weights are the EMA
weights when the checkpoint has them, unless `use_ema` is False.

Refused, in one line: the annotated U-Net (model.name unet), which diffusers has no class for; NCSN runs, which no
DDPMScheduler describes; latent runs, whose samples DDPMPipeline would not decode.
"""
from pathlib import Path

from .checkpoint import load_checkpoint, load_weights
from .config import Config
from .diffusers_format import (SCHEDULER, UNET, VAE, ConversionError, ddpm_scheduler_config, unet2d_config,
                               write_ddpm_pipeline, write_model)
from .latent import encode_split, resolve_scaling_factor
from .models import AutoencoderKL
from .models.ddpm_unet import to_diffusers_state_dict
from .pipeline import create_network, network_kwargs
from .processes import create_process
from .runtime import set_runtime


def check_exportable(cfg, path):
    """Refuse (ConversionError) a run that no diffusers folder represents."""
    if cfg.model.name == "unet":
        raise ConversionError(f"{path} is a model.name 'unet' run: diffusers has no class for the annotated U-Net; "
                              "export takes DDPMUNet runs (model.name ddpm_unet, diffusers' UNet2DModel) and "
                              "autoencoders (model.name autoencoder_kl)")
    if cfg.latent.autoencoder_kwargs is not None:
        raise ConversionError(f"{path} is a latent run: DDPMPipeline samples pixels and would not decode its latents "
                              "(its autoencoder's own checkpoint exports as a vae/ folder)")


def export_checkpoint(path, out, use_ema=True):
    """Write the diffusers folder of the run checkpoint `path` into `out` (made if need be; files of the same names
    are replaced). Returns (the folders written, "ema" or "raw" weights, the scaling factor written or None).

    Raises:
        CheckpointError: the checkpoint is missing, damaged or lacks its weights.
        ConversionError: the run has no diffusers form (see the module docstring).
    """
    state = load_checkpoint(path)
    cfg = Config.from_stored(state["config"])
    check_exportable(cfg, path)
    out = Path(out)
    # on the host in float32, whatever the run trained on: only an autoencoder's encoder runs
    cfg.train.mode, cfg.train.device, cfg.train.amp_level = "graph", "CPU", "O0"
    set_runtime(cfg.train)
    autoencoder = cfg.model.name == "autoencoder_kl"
    if not autoencoder:  # before the network is built: an NCSN run is refused here
        clip = create_process(cfg.diffusion).clip_denoised  # pixel space: clip_denoised None means clipping
        scheduler = ddpm_scheduler_config(cfg.diffusion, clip)
    net = create_network(cfg)
    kind = load_weights(net, state, path, use_ema)
    net.set_train(False)
    if autoencoder:
        scale = resolve_scaling_factor("auto", net, lambda: encode_split(net, cfg.data, "train").latents)
        config = AutoencoderKL.diffusers_config(cfg.model.kwargs, scale, cfg.data.image_size)
        write_model(out / VAE, config, to_diffusers_state_dict(net))
        return [out / VAE], kind, scale
    write_ddpm_pipeline(out, unet2d_config(network_kwargs(cfg)), scheduler, to_diffusers_state_dict(net))
    return [out / UNET, out / SCHEDULER, out / "model_index.json"], kind, None
