"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", Sec. 3.1 and Appendix G) as MindSpore Cells, in diffusers' `AutoencoderKL` layout.

The encoder E maps an image x (B, C, H, W) to the moments of a diagonal Gaussian posterior q(z | x) over latents
(B, latent_channels, H / f, W / f), f = 2**(levels - 1); the decoder D maps a latent back to an image. Both are the
convolutional networks of Esser et al. 2021 (VQGAN) that LDM reuses: ResNet blocks with GroupNorm and SiLU, a stride-2
convolution between levels, and a ResNet-attention-ResNet block at the lowest resolution. The "slight KL-penalty
towards a standard normal" of the LDM first stage is `kl_standard_normal`; the diffusion model then runs on
z * `scaling_factor` (Sec. 4.3.2 and Appendix D.1: the factor that gives the training latents unit variance).

Every sub-cell carries the name of its diffusers module (Encoder/Decoder, DownEncoderBlock2D, UpDecoderBlock2D,
UNetMidBlock2D, ResnetBlock2D, Attention), so a diffusers checkpoint loads after the GroupNorm rename of
`ddpm_unet.convert_diffusers_state_dict` (`load_diffusers_weights`); `AutoencoderKL.from_diffusers_config` reads
the model's `config.json`.
"""
import mindspore as ms
from mindspore import nn, ops

from ..utils import check_halvable, check_sizes
from .convolution import conv2d
from .ddpm_unet import AttentionBlock, Downsample2D, Upsample2D
from .normalization import GroupNorm
from .state_dict import check_diffusers_options

__all__ = ["AutoencoderKL", "kl_standard_normal", "sample_posterior"]

# diffusers builds every GroupNorm of the autoencoder (ResNet blocks, attention, output) with this epsilon.
NORM_EPS = 1e-6
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range, so exp(logvar) stays finite
# (LDM's ldm/modules/distributions/distributions.py does the same).
LOGVAR_RANGE = (-30.0, 20.0)


class ResnetBlock2D(nn.Cell):
    """Pre-activation residual block without a timestep input (diffusers' ResnetBlock2D with temb_channels=None):
    (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels, out_channels, num_groups):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = conv2d(in_channels, out_channels, 3)
        self.norm2 = GroupNorm(num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = conv2d(out_channels, out_channels, 3)
        # a 1x1 projection only where the width changes, as in diffusers
        self.conv_shortcut = conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class DownEncoderBlock2D(nn.Cell):
    """One encoder level: `num_layers` ResNet blocks, then a stride-2 convolution unless it is the last level.
    (B, C_in, H, W) -> (B, C_out, H/2, W/2), or (B, C_out, H, W) at the last level."""

    def __init__(self, in_channels, out_channels, num_layers, add_downsample, num_groups):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, num_groups) for j in range(num_layers)
        ])
        # diffusers' Encoder passes downsample_padding=0: the (0, 1, 0, 1) padding of DDPM's Downsample2D
        self.downsamplers = nn.CellList([Downsample2D(out_channels)] if add_downsample else [])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
        return x


class UpDecoderBlock2D(nn.Cell):
    """One decoder level: `num_layers` ResNet blocks, then nearest x2 and a 3x3 convolution unless it is the last.
    (B, C_in, H, W) -> (B, C_out, 2H, 2W), or (B, C_out, H, W) at the last level."""

    def __init__(self, in_channels, out_channels, num_layers, add_upsample, num_groups):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, num_groups) for j in range(num_layers)
        ])
        self.upsamplers = nn.CellList([Upsample2D(out_channels)] if add_upsample else [])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class UNetMidBlock2D(nn.Cell):
    """ResNet block, single-head self-attention over all positions, ResNet block: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels, num_groups):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, num_groups) for _ in range(2)])
        # diffusers: attention_head_dim = channels, i.e. one head; residual connection and float32 softmax included
        self.attentions = nn.CellList([AttentionBlock(channels, num_groups, NORM_EPS)])

    def construct(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Cell):
    """E: (B, in_channels, H, W) -> (B, 2 * latent_channels, H / f, W / f), the posterior's mean and log-variance
    stacked on the channel axis (diffusers' Encoder with double_z=True)."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, num_groups):
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = conv2d(in_channels, widths[0], 3)
        self.down_blocks = nn.CellList([
            DownEncoderBlock2D(widths[max(i - 1, 0)], widths[i], layers_per_block, i < len(widths) - 1, num_groups)
            for i in range(len(widths))
        ])
        self.mid_block = UNetMidBlock2D(widths[-1], num_groups)
        self.conv_norm_out = GroupNorm(num_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = conv2d(widths[-1], 2 * latent_channels, 3)

    def construct(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(ops.silu(self.conv_norm_out(h)))


class Decoder(nn.Cell):
    """D: (B, latent_channels, h, w) -> (B, out_channels, h * f, w * f). Mirrors the encoder, with one ResNet block
    more per level (diffusers' Decoder: layers_per_block + 1)."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, num_groups):
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = conv2d(latent_channels, widths[0], 3)
        self.mid_block = UNetMidBlock2D(widths[0], num_groups)
        self.up_blocks = nn.CellList([
            UpDecoderBlock2D(widths[max(i - 1, 0)], widths[i], layers_per_block + 1, i < len(widths) - 1, num_groups)
            for i in range(len(widths))
        ])
        self.conv_norm_out = GroupNorm(num_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = conv2d(widths[-1], out_channels, 3)

    def construct(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(ops.silu(self.conv_norm_out(h)))


def kl_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) per image: 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar) over (C, H, W).

    The closed form of Kingma & Welling 2014 ("Auto-Encoding Variational Bayes", Appendix B); summed as diffusers'
    `DiagonalGaussianDistribution.kl()`. Computed in float32. (B, C, h, w), (B, C, h, w) -> (B,).
    """
    mean, logvar = mean.astype(ms.float32), logvar.astype(ms.float32)
    return 0.5 * (mean * mean + ops.exp(logvar) - 1.0 - logvar).sum(axis=(1, 2, 3))


def sample_posterior(mean, logvar, noise):
    """z = mean + exp(logvar / 2) * noise, noise ~ N(0, I): the reparameterisation of Kingma & Welling 2014,
    Sec. 2.4, which lets the reconstruction loss be differentiated through the sample. Shapes all (B, C, h, w)."""
    return mean + ops.exp(0.5 * logvar) * noise


# AutoencoderKL options this implementation hard-wires: option -> (diffusers' default when absent, value required).
_FIXED_OPTIONS = {
    "act_fn": ("silu", "silu"),
    "use_quant_conv": (True, True),
    "use_post_quant_conv": (True, True),
    "mid_block_add_attention": (True, True),
    # latent normalisations beyond a single scale (SD3 / Flux VAEs shift, others standardise per channel)
    "shift_factor": (None, None),
    "latents_mean": (None, None),
    "latents_std": (None, None),
}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
# Read into AutoencoderKL's arguments: option -> diffusers' default when absent.
_ARGUMENTS = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (64,), "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 32, "scaling_factor": 0.18215,
}
# Options that change neither the weights nor the computation: the tile size of diffusers' tiled decoding, and
# whether its float16 pipelines upcast the VAE (its GroupNorms run in float32 here anyway).
_IGNORED_OPTIONS = ("sample_size", "force_upcast")


class AutoencoderKL(nn.Cell):
    """The LDM first stage in diffusers' `AutoencoderKL` layout.

    Args (diffusers' names and defaults):
        in_channels, out_channels: image channels of the input and of the reconstruction.
        block_out_channels: width of each level; every level but the last halves H and W, so f = 2**(levels - 1).
        layers_per_block: ResNet blocks per encoder level (the decoder has one more per level).
        latent_channels: channels of z.
        norm_num_groups: GroupNorm groups; must divide every width.
        scaling_factor: the diffusion model sees z * scaling_factor (0.18215 is Stable Diffusion 1.x/2.x's value,
            diffusers' default, which a converted VAE's config sets); None (the default here): no factor of its own,
            an autoencoder trained here, whose latents `latent.scaling_factor: auto` measures
            (`ms_ddpm.latent.resolve_scaling_factor`).

    encode(x): (B, in_channels, H, W), H and W multiples of f -> (mean, logvar), each (B, latent_channels, H/f, W/f),
    logvar clamped to [-30, 20]. decode(z): (B, latent_channels, h, w) -> (B, out_channels, h*f, w*f), for z in the
    autoencoder's own scale (divide a diffusion sample by `scaling_factor` first). construct(x) reconstructs x
    through the posterior mean (diffusers' forward with sample_posterior=False).
    """

    # the units `models.recompute_blocks` recomputes (train.recompute): the ResNet blocks and the mid-block attention
    RECOMPUTE_UNITS = (ResnetBlock2D, AttentionBlock)
    #: no class conditioning (the interface `ms_ddpm.models` networks share)
    num_class_embeds = None

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1,
                 latent_channels=4, norm_num_groups=32, scaling_factor=None):
        super().__init__()
        if len(block_out_channels) < 1:
            raise ValueError("AutoencoderKL: block_out_channels needs at least one level, e.g. (128, 256, 512, 512)")
        check_sizes(in_channels=in_channels, out_channels=out_channels, layers_per_block=layers_per_block,
                    latent_channels=latent_channels)
        if scaling_factor is not None and not scaling_factor > 0:
            raise ValueError(f"AutoencoderKL: scaling_factor must be positive, got {scaling_factor!r}")
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(block_out_channels) - 1)
        self.scaling_factor = None if scaling_factor is None else float(scaling_factor)
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups)
        # 1x1 convolutions around the latent, kept from the VQ-GAN layout (Esser et al. 2021), where they map into
        # and out of the codebook space
        self.quant_conv = conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = conv2d(latent_channels, latent_channels, 1)

    @classmethod
    def from_diffusers_config(cls, config):
        """An AutoencoderKL built from a diffusers `AutoencoderKL` config dict (its config.json).

        Raises:
            ValueError: naming the option, when the config asks for something this AutoencoderKL cannot represent
                (other block types or activations, no quant convs, no mid-block attention, a shift or per-channel
                latent statistics, unknown options).
        """
        return cls(**cls.diffusers_config_kwargs(config))

    @staticmethod
    def diffusers_config_kwargs(config):
        """The constructor arguments for a diffusers `AutoencoderKL` config dict; ValueError as above."""
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"config is for {config['_class_name']}, not AutoencoderKL")
        check_diffusers_options(config, "AutoencoderKL", _FIXED_OPTIONS,
                                set(_BLOCK_TYPES) | set(_ARGUMENTS) | set(_IGNORED_OPTIONS))
        kwargs = {key: config.get(key, default) for key, default in _ARGUMENTS.items()}
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        levels = len(kwargs["block_out_channels"])
        for key, block_type in _BLOCK_TYPES.items():
            types = list(config.get(key, (block_type,)))
            if types != [block_type] * levels:
                raise ValueError(f"AutoencoderKL needs {key} = {levels} x {block_type} (one per block_out_channels "
                                 f"entry), config has {types}")
        return kwargs

    @staticmethod
    def diffusers_config(kwargs, scaling_factor, sample_size):
        """The diffusers `AutoencoderKL` config dict (config.json) of constructor arguments `kwargs` (missing ones at
        their defaults) with `scaling_factor`: the inverse of `diffusers_config_kwargs`. `sample_size` is the image
        size above which diffusers' tiled decoding tiles (the training images')."""
        args = {**_ARGUMENTS, **kwargs, "scaling_factor": float(scaling_factor)}
        args["block_out_channels"] = list(args["block_out_channels"])
        levels = len(args["block_out_channels"])
        config = {"_class_name": "AutoencoderKL", **args, "sample_size": sample_size}
        config.update({key: [block_type] * levels for key, block_type in _BLOCK_TYPES.items()})
        config.update({key: required for key, (_, required) in _FIXED_OPTIONS.items()})
        return config

    def check_image_size(self, height, width):
        """Refuse (ValueError) an image size that is not a multiple of f = 2**(levels - 1) (the decoder would not
        restore it), before any graph is compiled."""
        check_halvable("AutoencoderKL", height, width, len(self.encoder.down_blocks) - 1, "block_out_channels")

    def latent_shape(self, shape):
        """The shape (B, latent_channels, H/f, W/f) of the latents of images of `shape` (B, C, H, W)."""
        f = self.downsample_factor
        return (shape[0], self.latent_channels, shape[2] // f, shape[3] // f)

    def encode(self, x):
        """x (B, C, H, W) -> posterior mean and clamped log-variance, each (B, latent_channels, H/f, W/f)."""
        self.check_image_size(x.shape[-2], x.shape[-1])
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = ops.chunk(moments, 2, axis=1)
        return mean, ops.clamp(logvar, LOGVAR_RANGE[0], LOGVAR_RANGE[1])

    def decode(self, z):
        """z (B, latent_channels, h, w), unscaled -> image (B, out_channels, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def construct(self, x):
        """x (B, C, H, W) -> reconstruction D(mean of q(z | x)) (B, out_channels, H, W)."""
        mean, _ = self.encode(x)
        return self.decode(mean)
