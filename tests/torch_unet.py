"""The annotated-diffusion U-Net in PyTorch, laid out so that its weights load one to one into `ms_ddpm.models.Unet`.

Test- and benchmark-only (it imports torch, which ms_ddpm itself never needs; install it with the `dev` extra).
It serves the equivalence tests (same weights, same inputs, same outputs and gradients as the MindSpore network)
and `scripts/benchmark.py` (the PyTorch eager yardstick).

The layers are those of "The Annotated Diffusion Model" (Rogge & Rasul 2022): weight-standardised 3x3 convolutions,
GroupNorm, scale-shift time conditioning, ConvNeXt blocks, full and linear attention, PreNorm + residual,
space-to-depth downsampling and nearest-neighbour upsampling. Module names follow `ms_ddpm.models.unet` instead of
the tutorial's positional `nn.ModuleList`s (`downs.0.block1` rather than `downs.0.0`), so that
`mindspore_state_from_torch` only has to rename GroupNorm's `weight` / `bias` to MindSpore's `gamma` / `beta`.
Two choices follow ms_ddpm rather than the tutorial's code, where the two differ:
  - `final_res_block` takes `2 * init_dim` input channels (the tutorial writes `2 * dim`, which breaks when
    init_dim != dim);
  - ResNet and ConvNeXt blocks carry an `nn.Dropout` (p = 0 by default, so the function is the tutorial's).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLOCK_TYPES = ("resnet", "convnext")


class SinusoidalPositionEmbeddings(nn.Module):
    """sin / cos of t * exp(-log(10000) * i / (half - 1)), i = 0..half-1 (DDPM, Appendix B; the tutorial's embedding).

    The frequencies are computed in float64 and rounded to float32 once, as ms_ddpm does: a float32 exp() is off by
    an ulp or so, which t (up to 1000) turns into ~1e-4 radians of phase.
    """

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        half = dim // 2
        freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1)).astype(np.float32)
        self.register_buffer("freqs", torch.from_numpy(freqs), persistent=False)

    def forward(self, time):
        args = time.float()[:, None] * self.freqs[None, :]
        emb = torch.cat((args.sin(), args.cos()), dim=-1)
        return F.pad(emb, (0, 1)) if self.dim % 2 == 1 else emb


class WeightStandardizedConv2d(nn.Conv2d):
    """3x3 'same' convolution with its kernel standardised per output channel (Qiao et al. 2019)."""

    def __init__(self, dim, dim_out):
        super().__init__(dim, dim_out, 3, padding=1)

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        weight = (self.weight - mean) * (var + eps).rsqrt()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Block(nn.Module):
    """Weight-standardised conv -> GroupNorm -> optional scale-shift -> SiLU."""

    def __init__(self, dim, dim_out, groups):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x, scale=None, shift=None):
        x = self.norm(self.proj(x))
        if scale is not None:
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two Blocks and a residual; the time embedding gives the first block's scale and shift."""

    def __init__(self, dim, dim_out, time_emb_dim, groups, dropout=0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb):
        scale, shift = self.mlp(time_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x, scale, shift)
        h = self.block2(self.dropout(h))
        return h + self.res_conv(x)


class ConvNextBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022) with the time embedding added after the depthwise 7x7 convolution."""

    def __init__(self, dim, dim_out, time_emb_dim, mult=2, dropout=0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(time_emb_dim, dim))
        self.ds_conv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.net = nn.Sequential(
            nn.GroupNorm(1, dim),
            nn.Conv2d(dim, dim_out * mult, 3, padding=1),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.GroupNorm(1, dim_out * mult),
            nn.Conv2d(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb):
        h = self.ds_conv(x) + self.mlp(time_emb)[:, :, None, None]
        return self.net(h) + self.res_conv(x)


def _split_heads(qkv, heads):
    """(B, 3*heads*d, H, W) -> three (B, heads, d, H*W): the tutorial's rearrange 'b (h c) x y -> b h c (x y)'."""
    b, c, h, w = qkv.shape
    return [t.reshape(b, heads, c // (3 * heads), h * w) for t in qkv.chunk(3, dim=1)]


class Attention(nn.Module):
    """Multi-head softmax self-attention over all pixels (the bottleneck's)."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_qkv = nn.Conv2d(dim, dim_head * heads * 3, 1, bias=False)
        self.to_out = nn.Conv2d(dim_head * heads, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = _split_heads(self.to_qkv(x), self.heads)
        # the tutorial subtracts the row maximum first; softmax does that itself
        sim = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("bhij,bhdj->bhid", attn, v)  # (B, heads, N, d)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))  # 'b h (x y) d -> b (h d) x y'


class LinearAttention(nn.Module):
    """Linear attention (Shen et al. 2021): softmax of q over features and of k over pixels."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_qkv = nn.Conv2d(dim, dim_head * heads * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(dim_head * heads, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = _split_heads(self.to_qkv(x), self.heads)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class PreNormResidual(nn.Module):
    """x + fn(GroupNorm(1, dim)(x)): the tutorial's Residual(PreNorm(dim, fn))."""

    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x):
        return x + self.fn(self.norm(x))


class Downsample(nn.Module):
    """Space-to-depth ('b c (h p1) (w p2) -> b (c p1 p2) h w', p1 = p2 = 2), then a 1x1 conv."""

    def __init__(self, dim, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim * 4, dim_out, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv."""

    def __init__(self, dim, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetLevel(nn.Module):
    """One resolution level: two blocks, linear attention, and a resampler (a 3x3 conv at the last level)."""

    def __init__(self, block1, block2, attn, resample):
        super().__init__()
        self.block1 = block1
        self.block2 = block2
        self.attn = attn
        self.resample = resample


class Unet(nn.Module):
    """The annotated-diffusion U-Net; constructor arguments and forward(x, t) as `ms_ddpm.models.unet.Unet`."""

    def __init__(self, dim, dim_mults=(1, 2, 4, 8), channels=3, init_dim=None, out_dim=None, block_type="resnet",
                 resnet_block_groups=4, heads=4, dim_head=32, dropout=0.0, attention_levels=None):
        super().__init__()
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {list(BLOCK_TYPES)}, got {block_type!r}")
        self.channels = channels
        init_dim = init_dim or dim
        time_dim = dim * 4

        def block(dim_in, dim_out):
            if block_type == "resnet":
                return ResnetBlock(dim_in, dim_out, time_dim, resnet_block_groups, dropout)
            return ConvNextBlock(dim_in, dim_out, time_dim, dropout=dropout)

        def linear_attention(d, level):
            if attention_levels is None or level in attention_levels:
                return PreNormResidual(d, LinearAttention(d, heads, dim_head))
            return nn.Identity()

        self.init_conv = nn.Conv2d(channels, init_dim, 1)
        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim),
        )
        dims = [init_dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.downs = nn.ModuleList()
        for i, (dim_in, dim_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            resample = nn.Conv2d(dim_in, dim_out, 3, padding=1) if last else Downsample(dim_in, dim_out)
            self.downs.append(UNetLevel(block(dim_in, dim_in), block(dim_in, dim_in),
                                        linear_attention(dim_in, i), resample))
        mid_dim = dims[-1]
        self.mid_block1 = block(mid_dim, mid_dim)
        self.mid_attn = PreNormResidual(mid_dim, Attention(mid_dim, heads, dim_head))
        self.mid_block2 = block(mid_dim, mid_dim)
        self.ups = nn.ModuleList()
        for i, (dim_in, dim_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            resample = nn.Conv2d(dim_out, dim_in, 3, padding=1) if last else Upsample(dim_out, dim_in)
            self.ups.append(UNetLevel(block(dim_out + dim_in, dim_out), block(dim_out + dim_in, dim_out),
                                      linear_attention(dim_out, len(in_out) - 1 - i), resample))
        self.out_dim = out_dim or channels
        self.final_res_block = block(init_dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, self.out_dim, 1)

    def forward(self, x, time):
        x = self.init_conv(x)
        r = x
        t = self.time_mlp(time)
        skips = []
        for level in self.downs:
            x = level.block1(x, t)
            skips.append(x)
            x = level.attn(level.block2(x, t))
            skips.append(x)
            x = level.resample(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        for level in self.ups:
            x = level.block1(torch.cat((x, skips.pop()), dim=1), t)
            x = level.block2(torch.cat((x, skips.pop()), dim=1), t)
            x = level.resample(level.attn(x))
        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x)


def mindspore_names(model):
    """{PyTorch parameter name: MindSpore parameter name}: GroupNorm's `weight` / `bias` become `gamma` / `beta`,
    every other name stays as it is."""
    renamed = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.GroupNorm):
            prefix = module_name + "." if module_name else ""
            renamed[prefix + "weight"] = prefix + "gamma"
            renamed[prefix + "bias"] = prefix + "beta"
    return {name: renamed.get(name, name) for name, _ in model.named_parameters()}


def mindspore_state_from_torch(model):
    """{MindSpore parameter name: float32 NumPy array} for `model`'s parameters (names as `mindspore_names`).

    Every array is a copy, so the result stays valid while the PyTorch model trains on.
    """
    names = mindspore_names(model)
    return {names[name]: p.detach().cpu().numpy().astype(np.float32, copy=True)
            for name, p in model.named_parameters()}


def diffusion_loss(model, x_start, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, objective="eps",
                   loss_type="l2", weights=None):
    """`ms_ddpm.losses.DiffusionLoss` in PyTorch: q_sample, the objective's target, per-pixel loss, mean.

    Args:
        model: callable (x_t, t) -> network output.
        x_start, noise: (B, C, H, W) float tensors; t: (B,) int64 timesteps.
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: (T,) float32 tensors (the diffusion's tables).
        objective: "eps", "x0" or "v"; loss_type: "l1", "l2" or "huber" (smooth L1, beta 1).
        weights: optional (T,) per-timestep loss weights (ms_ddpm.losses.timestep_weights).
    """
    a = sqrt_alphas_cumprod[t][:, None, None, None]
    s = sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
    x_t = a * x_start + s * noise
    target = {"eps": noise, "x0": x_start, "v": a * noise - s * x_start}[objective]
    diff = model(x_t, t) - target
    if loss_type == "l1":
        loss = diff.abs()
    elif loss_type == "l2":
        loss = diff * diff
    elif loss_type == "huber":
        loss = F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none", beta=1.0)
    else:
        raise ValueError(f"loss_type must be one of ['l1', 'l2', 'huber'], got {loss_type!r}")
    loss = loss.mean(dim=(1, 2, 3))
    if weights is not None:
        loss = loss * weights[t]
    return loss.mean()
