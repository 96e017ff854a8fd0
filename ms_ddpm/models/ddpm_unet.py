"""The U-Net of DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Appendix B) as MindSpore Cells.

Appendix B: a PixelCNN++-style U-Net with group normalisation, two (``num_res_blocks``) wide-ResNet blocks per
resolution level, single-head self-attention at the 16x16 level and in the middle, the timestep fed in through the
Transformer sinusoidal embedding, dropout 0.1 on CIFAR-10; 35.7M parameters for 32x32 images.

Every sub-cell carries the name of the corresponding module of diffusers' ``UNet2DModel`` as configured for the
published ``google/ddpm-cifar10-32`` checkpoint (block_out_channels (128, 256, 256, 256), down blocks
DownBlock2D / AttnDownBlock2D / DownBlock2D / DownBlock2D, layers_per_block 2, norm_num_groups 32, norm_eps 1e-6,
flip_sin_to_cos False, freq_shift 1, downsample_padding 0, attention_head_dim None). Converting its weights is
therefore a rename of GroupNorm ``weight``/``bias`` to ``gamma``/``beta`` (and of the legacy attention names
``query``/``key``/``value``/``proj_attn`` to ``to_q``/``to_k``/``to_v``/``to_out.0``); see
`convert_diffusers_state_dict` and `load_diffusers_weights`, and `to_diffusers_state_dict` for the way back.

Shapes: images are (B, C, H, W), timesteps (B,) integers or floats, the output is the epsilon prediction
(B, C_out, H, W).
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ..utils import check_halvable, check_int, check_sizes
from .convolution import Conv2d
from .embeddings import add_class_embedding, class_embedding_table, timestep_embedding
from .normalization import GroupNorm
from .softmax import Softmax

__all__ = ["DDPMUNet", "convert_diffusers_state_dict", "load_diffusers_weights", "to_diffusers_state_dict"]


def _conv3x3(in_channels, out_channels):
    return Conv2d(in_channels, out_channels, 3, pad_mode="pad", padding=1, has_bias=True)


class TimestepEmbedding(nn.Cell):
    """Two-layer MLP on the sinusoidal features: (B, ch) -> (B, 4 * ch)."""

    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Dense(in_channels, time_embed_dim)
        self.linear_2 = nn.Dense(time_embed_dim, time_embed_dim)

    def construct(self, emb):
        return self.linear_2(ops.silu(self.linear_1(emb)))


class ResnetBlock2D(nn.Cell):
    """Pre-activation residual block with an additive timestep bias: (B, C_in, H, W), (B, T) -> (B, C_out, H, W)."""

    def __init__(self, in_channels, out_channels, temb_channels, dropout, num_groups, eps):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, in_channels, eps=eps)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.time_emb_proj = nn.Dense(temb_channels, out_channels)
        self.norm2 = GroupNorm(num_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        # DDPM's "nin_shortcut": a 1x1 projection only where the width changes, as in diffusers.
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1, pad_mode="valid", has_bias=True)
        else:
            self.conv_shortcut = None

    def construct(self, x, temb):
        # GroupNorm and SiLU: one fused kernel on CPU (normalization.py)
        h = self.conv1(self.norm1(x, silu=True))
        h = h + self.time_emb_proj(ops.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h, silu=True)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Cell):
    """Single-head self-attention over the H*W positions with a residual connection: (B, C, H, W) -> same."""

    def __init__(self, channels, num_groups, eps):
        super().__init__()
        self.group_norm = GroupNorm(num_groups, channels, eps=eps)
        self.to_q = nn.Dense(channels, channels)
        self.to_k = nn.Dense(channels, channels)
        self.to_v = nn.Dense(channels, channels)
        # A CellList so that the projection is named `to_out.0`, like diffusers' [Linear, Dropout] ModuleList.
        self.to_out = nn.CellList([nn.Dense(channels, channels)])
        self.scale = float(channels) ** -0.5
        self.softmax = Softmax()  # float32 (diffusers' upcast_softmax), so that half-precision runs do not saturate

    def construct(self, x):
        b, c, height, width = x.shape
        h = self.group_norm(x).reshape(b, c, height * width).transpose(0, 2, 1)  # (B, N, C)
        q = self.to_q(h)
        k = self.to_k(h)
        v = self.to_v(h)
        scores = ops.bmm(q, k.transpose(0, 2, 1)) * self.scale  # (B, N, N)
        weights = self.softmax(scores)
        out = self.to_out[0](ops.bmm(weights, v))
        return x + out.transpose(0, 2, 1).reshape(b, c, height, width)


class Downsample2D(nn.Cell):
    """Stride-2 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels):
        super().__init__()
        # Padding (top, bottom, left, right) = (0, 1, 0, 1): TensorFlow's "SAME" padding for a stride-2 3x3 conv on
        # an even size, which the original DDPM code used and diffusers reproduces with downsample_padding=0.
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, pad_mode="pad", padding=(0, 1, 0, 1), has_bias=True)

    def construct(self, x):
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Nearest-neighbour x2 upsampling then a 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def construct(self, x):
        b, c, height, width = x.shape
        # Nearest x2 as a broadcast: exact, and no dependence on interpolate's scale-factor rounding rules.
        x = ops.broadcast_to(x[:, :, :, None, :, None], (b, c, height, 2, width, 2))
        return self.conv(x.reshape(b, c, 2 * height, 2 * width))


class DownBlock2D(nn.Cell):
    """One resolution level of the encoder (diffusers' DownBlock2D, or AttnDownBlock2D when `attention`).

    construct: (B, C_in, H, W), (B, T) -> the last hidden state and the tuple of skip activations (one per ResNet
    block, plus the downsampled output when the level downsamples) that the decoder concatenates back in.
    """

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, add_downsample, attention, dropout,
                 num_groups, eps):
        super().__init__()
        resnets = [
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, temb_channels, dropout, num_groups,
                          eps)
            for j in range(num_layers)
        ]
        self.resnets = nn.CellList(resnets)
        if attention:
            self.attentions = nn.CellList([AttentionBlock(out_channels, num_groups, eps) for _ in range(num_layers)])
        else:
            self.attentions = None
        self.downsamplers = nn.CellList([Downsample2D(out_channels)] if add_downsample else [])

    def construct(self, x, temb):
        outputs = ()
        if self.attentions is None:
            for resnet in self.resnets:
                x = resnet(x, temb)
                outputs += (x,)
        else:
            for resnet, attention in zip(self.resnets, self.attentions):
                x = attention(resnet(x, temb))
                outputs += (x,)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            outputs += (x,)
        return x, outputs


class UpBlock2D(nn.Cell):
    """One resolution level of the decoder (diffusers' UpBlock2D, or AttnUpBlock2D when `attention`).

    Has `num_layers` (= num_res_blocks + 1) ResNet blocks, each fed the concatenation of the running hidden state and
    one skip activation. construct: (B, C_prev, H, W), a tuple of `num_layers` skips in encoder order, (B, T) ->
    (B, C_out, 2H, 2W) when the level upsamples, else (B, C_out, H, W).
    """

    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, add_upsample,
                 attention, dropout, num_groups, eps):
        super().__init__()
        resnets = []
        for j in range(num_layers):
            # The last block of a level takes the skip that entered the matching encoder level (width in_channels).
            skip_channels = in_channels if j == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if j == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in_channels + skip_channels, out_channels, temb_channels, dropout,
                                         num_groups, eps))
        self.resnets = nn.CellList(resnets)
        if attention:
            self.attentions = nn.CellList([AttentionBlock(out_channels, num_groups, eps) for _ in range(num_layers)])
        else:
            self.attentions = None
        self.upsamplers = nn.CellList([Upsample2D(out_channels)] if add_upsample else [])
        self.num_layers = num_layers

    def construct(self, x, skips, temb):
        # Skips are consumed last-first, mirroring the encoder; indexing instead of pop() keeps graph mode happy.
        if self.attentions is None:
            for j, resnet in enumerate(self.resnets):
                x = resnet(ops.cat((x, skips[-1 - j]), axis=1), temb)
        else:
            for j, resnet in enumerate(self.resnets):
                x = self.attentions[j](resnet(ops.cat((x, skips[-1 - j]), axis=1), temb))
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class UNetMidBlock2D(nn.Cell):
    """ResNet block, attention, ResNet block at the lowest resolution: (B, C, H, W), (B, T) -> (B, C, H, W)."""

    def __init__(self, channels, temb_channels, dropout, num_groups, eps):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(channels, channels, temb_channels, dropout, num_groups, eps),
            ResnetBlock2D(channels, channels, temb_channels, dropout, num_groups, eps),
        ])
        self.attentions = nn.CellList([AttentionBlock(channels, num_groups, eps)])

    def construct(self, x, temb):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class DDPMUNet(nn.Cell):
    """Epsilon-prediction U-Net of Ho et al. (2020), Appendix B, in diffusers' UNet2DModel layout.

    Args:
        in_channels: image channels C.
        out_channels: output channels (default: `in_channels`).
        ch: base width; level i has ``ch * ch_mult[i]`` channels and the time embedding has ``4 * ch``.
        ch_mult: width multipliers, one per resolution level; every level but the last halves the resolution.
        num_res_blocks: ResNet blocks per encoder level (the decoder uses one more per level).
        attn_resolutions: resolutions (``image_size / 2**level``) whose levels get self-attention.
        image_size: training resolution; fixes which levels `attn_resolutions` selects.
        dropout: dropout rate inside the ResNet blocks (0.1 for CIFAR-10 in the paper).
        num_groups, eps: GroupNorm groups and epsilon.
        num_class_embeds: None (unconditional), or the rows K of a learned class embedding added to the time
            embedding: diffusers' ``UNet2DModel(num_class_embeds=K)`` with ``class_embed_type=None``, weights
            ``class_embedding``. Classifier-free guidance needs a null row: K = classes + 1, the last row null.

    construct(x, t, cond=None): x (B, in_channels, H, W) with H and W multiples of ``2**(len(ch_mult) - 1)``, t (B,)
    timesteps (integers, or floats from the Euler family's samplers), cond (B,) int32 labels in [0, K) (required
    when num_class_embeds is set, refused otherwise)
    -> (B, out_channels, H, W).
    """

    # the units `recompute_blocks` recomputes (train.recompute)
    RECOMPUTE_UNITS = (ResnetBlock2D, AttentionBlock)

    def __init__(self, in_channels=3, out_channels=None, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), image_size=32, dropout=0.1, num_groups=32, eps=1e-6, num_class_embeds=None):
        super().__init__()
        check_sizes(in_channels=in_channels, ch=ch, num_res_blocks=num_res_blocks, image_size=image_size,
                    num_groups=num_groups, ch_mult=ch_mult, out_channels=out_channels)
        if num_class_embeds is not None:
            num_class_embeds = check_int("num_class_embeds", num_class_embeds, 1)
        if len(ch_mult) < 1:
            raise ValueError("DDPMUNet: ch_mult needs at least one level, e.g. (1, 2, 2, 2).")
        num_levels = len(ch_mult)
        self.size_multiple = 2 ** (num_levels - 1)
        if image_size < self.size_multiple or image_size % self.size_multiple != 0:
            below = max(image_size // self.size_multiple, 1) * self.size_multiple
            raise ValueError(
                f"DDPMUNet: image_size={image_size} must be a positive multiple of 2**(len(ch_mult)-1) = "
                f"{self.size_multiple} for {num_levels} levels; valid sizes are {self.size_multiple}, "
                f"{2 * self.size_multiple}, {3 * self.size_multiple}, ... (nearest: {below} or "
                f"{below + self.size_multiple})."
            )
        resolutions = [image_size // 2 ** level for level in range(num_levels)]
        unknown = [r for r in attn_resolutions if r not in resolutions]
        if unknown:
            raise ValueError(
                f"DDPMUNet: attn_resolutions {tuple(unknown)} match no level for image_size={image_size}; "
                f"choose from the level resolutions {resolutions}."
            )
        out_channels = in_channels if out_channels is None else out_channels
        self.ch = ch
        widths = [ch * m for m in ch_mult]
        temb_channels = 4 * ch

        self.conv_in = _conv3x3(in_channels, widths[0])
        self.time_embedding = TimestepEmbedding(ch, temb_channels)
        self.num_class_embeds = num_class_embeds
        self.class_embedding = (None if num_class_embeds is None
                                else class_embedding_table(num_class_embeds, temb_channels))

        down_blocks = []
        for level in range(num_levels):
            down_blocks.append(DownBlock2D(
                widths[max(level - 1, 0)], widths[level], temb_channels, num_res_blocks,
                add_downsample=level < num_levels - 1, attention=resolutions[level] in attn_resolutions,
                dropout=dropout, num_groups=num_groups, eps=eps,
            ))
        self.down_blocks = nn.CellList(down_blocks)

        self.mid_block = UNetMidBlock2D(widths[-1], temb_channels, dropout, num_groups, eps)

        up_blocks = []
        for i in range(num_levels):
            level = num_levels - 1 - i  # the encoder level this decoder stage mirrors
            up_blocks.append(UpBlock2D(
                in_channels=widths[max(level - 1, 0)], prev_output_channel=widths[min(level + 1, num_levels - 1)],
                out_channels=widths[level], temb_channels=temb_channels, num_layers=num_res_blocks + 1,
                add_upsample=level > 0, attention=resolutions[level] in attn_resolutions,
                dropout=dropout, num_groups=num_groups, eps=eps,
            ))
        self.up_blocks = nn.CellList(up_blocks)

        self.conv_norm_out = GroupNorm(num_groups, widths[0], eps=eps)
        self.conv_out = _conv3x3(widths[0], out_channels)

    def check_image_size(self, height, width):
        """Refuse (ValueError) an input size the levels cannot halve. The trainer and the pipeline call it before
        any graph is compiled (a failure inside compilation comes with MindSpore's C++ stack); construct calls it
        for direct users."""
        check_halvable("DDPMUNet", height, width, len(self.down_blocks) - 1, "ch_mult")

    def construct(self, x, t, cond=None):
        """x (B, C, H, W), t (B,) timesteps, cond (B,) class labels or None -> epsilon prediction
        (B, out_channels, H, W)."""
        self.check_image_size(x.shape[-2], x.shape[-1])
        # freq_shift 1 and sin-before-cos: the DDPM/TF ordering used by the google/ddpm-* checkpoints.
        temb = self.time_embedding(timestep_embedding(t, self.ch, flip_sin_to_cos=False, downscale_freq_shift=1))
        temb = add_class_embedding(temb, self.class_embedding, cond, "DDPMUNet", "num_class_embeds")

        h = self.conv_in(x)
        skips = (h,)
        for block in self.down_blocks:
            h, outputs = block(h, temb)
            skips += outputs

        h = self.mid_block(h, temb)

        for block in self.up_blocks:
            n = block.num_layers
            h = block(h, skips[-n:], temb)
            skips = skips[:-n]

        return self.conv_out(ops.silu(self.conv_norm_out(h)))


# diffusers' former AttentionBlock named the projections like this, and the published google/ddpm-cifar10-32
# `diffusion_pytorch_model.bin` still uses them (diffusers renames them on load).
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# The torch.nn.GroupNorm modules of UNet2DModel and AutoencoderKL, and the GroupNorm (norm) and LayerNorms
# (norm1-3) of Transformer2DModel; MindSpore calls their affine parameters gamma/beta.
_NORM_MODULES = ("norm", "norm1", "norm2", "norm3", "group_norm", "conv_norm_out")
_NORM_PARAMS = {"weight": "gamma", "bias": "beta"}
# torch.nn.Embedding's table is `weight`, MindSpore's nn.Embedding's `embedding_table`.
_EMBEDDING_PARAMS = {"class_embedding.weight": "class_embedding.embedding_table"}


def convert_diffusers_state_dict(state_dict):
    """Rename a diffusers state dict (name -> array) to MindSpore parameter names (name -> np.ndarray).

    Serves every network here that carries diffusers' module names: DDPMUNet (UNet2DModel), AutoencoderKL and the
    transformer blocks. Accepts both the current attention names (to_q/to_k/to_v/to_out.0) and the legacy ones
    (query/key/value/proj_attn), and a class embedding (`class_embedding.weight`); names already in MindSpore form
    pass through unchanged. Shapes are unchanged: torch and MindSpore share the (out, in[, kh, kw]) layout.
    """
    converted = {}
    for name, value in state_dict.items():
        if name in _EMBEDDING_PARAMS:
            converted[_EMBEDDING_PARAMS[name]] = np.asarray(value)
            continue
        module, _, param = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf in _LEGACY_ATTENTION_NAMES:
            module = f"{parent}.{_LEGACY_ATTENTION_NAMES[leaf]}" if parent else _LEGACY_ATTENTION_NAMES[leaf]
        elif leaf in _NORM_MODULES:
            param = _NORM_PARAMS.get(param, param)
        converted[f"{module}.{param}"] = np.asarray(value)
    return converted


def _name_list(names, limit=20):
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_diffusers_weights(net, state_dict):
    """Convert a diffusers state dict and load it into `net` (a DDPMUNet, AutoencoderKL, ...), strictly.

    Raises:
        ValueError: when names are missing or unexpected, or shapes differ; the message lists them.

    Returns:
        `net`, with its parameters replaced.
    """
    converted = convert_diffusers_state_dict(state_dict)
    params = {p.name: p for p in net.get_parameters()}
    missing = sorted(set(params) - set(converted))
    unexpected = sorted(set(converted) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"diffusers state dict does not match this {type(net).__name__} configuration: "
            f"{len(missing)} missing [{_name_list(missing)}]; {len(unexpected)} unexpected [{_name_list(unexpected)}] "
            "(names after conversion to MindSpore naming)."
        )
    mismatched = [
        f"{name}: checkpoint {tuple(converted[name].shape)} vs network {tuple(p.shape)}"
        for name, p in params.items() if tuple(converted[name].shape) != tuple(p.shape)
    ]
    if mismatched:
        raise ValueError(f"diffusers state dict has shape mismatches: {_name_list(mismatched)}.")
    to_load = {
        name: ms.Parameter(ms.Tensor(converted[name], dtype=p.dtype), name=name) for name, p in params.items()
    }
    param_not_loaded, ckpt_not_loaded = ms.load_param_into_net(net, to_load, strict_load=True)
    if param_not_loaded or ckpt_not_loaded:
        raise ValueError(
            f"load_param_into_net left parameters unloaded: {_name_list(sorted(param_not_loaded))}; "
            f"unused: {_name_list(sorted(ckpt_not_loaded))}."
        )
    return net


def to_diffusers_state_dict(net):
    """`net`'s parameters (a DDPMUNet, AutoencoderKL, ...) under diffusers' names, name -> float32 np.ndarray: the
    inverse of `convert_diffusers_state_dict` (the current attention names), through the same tables."""
    embedding_names = {ours: theirs for theirs, ours in _EMBEDDING_PARAMS.items()}
    norm_params = {ours: theirs for theirs, ours in _NORM_PARAMS.items()}
    state_dict = {}
    for p in net.get_parameters():
        name = embedding_names.get(p.name)
        if name is None:
            module, _, param = p.name.rpartition(".")
            if module.rpartition(".")[2] in _NORM_MODULES:
                param = norm_params.get(param, param)
            name = f"{module}.{param}"
        state_dict[name] = p.asnumpy().astype(np.float32)
    return state_dict
