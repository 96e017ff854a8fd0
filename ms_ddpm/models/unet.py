"""The U-Net of "The Annotated Diffusion Model" (Rogge & Rasul 2022) and its MindSpore tutorial, as Cells.

Structure (Ronneberger et al. 2015 U-Net, as adapted by Ho et al. 2020 and lucidrains' denoising-diffusion-pytorch):
  init conv -> per level [block, block, linear attention, downsample] -> bottleneck [block, full attention, block]
  -> per level [concat skip, block, concat skip, block, linear attention, upsample] -> concat input -> block -> conv.
Blocks are ResNet blocks with weight-standardised convolutions, GroupNorm and scale-shift time conditioning, or
ConvNeXt blocks (Liu et al. 2022) as in the first version of the tutorial. The time embedding is the sinusoidal
one of `embeddings.py` followed by an MLP. Layer names follow the tutorial, so weights map one to one.

Cross-attention (latent diffusion, Rombach et al. 2022, Sec. 3.3): with `context_dim`, the attention of the levels
named in `cross_attention_levels` and the bottleneck's is a `SpatialTransformer` whose cross-attention reads context
tokens tau(y), here the `ClassEmbedder` tokens of the class labels, as LDM's class-conditional models do (its
middle block always holds one, as here).
"""
import mindspore as ms
from mindspore import nn, ops

from ..utils import check_choice, check_halvable, check_int, check_sizes
from .context_encoder import ClassEmbedder
from .convolution import Conv2d, conv2d
from .embeddings import SinusoidalPositionEmbeddings, add_class_embedding, class_embedding_table
from .normalization import GroupNorm
from .softmax import Softmax
from .transformer import SpatialTransformer

BLOCK_TYPES = ("resnet", "convnext")


class WeightStandardization(nn.Cell):
    """(w - mean) / sqrt(var + eps) per output channel (Qiao et al. 2019, Eq. 5), with a hand-written gradient.

    The gradient is the normalisation's own (that of GroupNorm with one group per output channel): with
    w_hat = (w - mean) * r, dw = r * (g - mean(g) - w_hat * mean(g * w_hat)). MindSpore's automatic one costs
    2-3x this on CPU (Tile and Pow ops around the reductions; docs/performance.md). The statistics stay on the
    4-D weight: reshaping it, faster still in GRAPH_MODE, slows PYNATIVE_MODE gradients several-fold.
    """

    def construct(self, weight, eps):
        w = weight.astype(ms.float32)
        centred = w - w.mean(axis=(1, 2, 3), keep_dims=True)
        return centred * ops.rsqrt((centred * centred).mean(axis=(1, 2, 3), keep_dims=True) + eps)

    def bprop(self, weight, eps, out, dout):
        # float32 in and out: under amp O2 this Cell is handed a float16 copy of the float32 Parameter, and the
        # gradient returned here is the Parameter's own (a custom bprop skips the cast's gradient)
        w, g = weight.astype(ms.float32), dout.astype(ms.float32)
        centred = w - w.mean(axis=(1, 2, 3), keep_dims=True)
        r = ops.rsqrt((centred * centred).mean(axis=(1, 2, 3), keep_dims=True) + eps)
        dw = r * (g - g.mean(axis=(1, 2, 3), keep_dims=True) - out * (g * out).mean(axis=(1, 2, 3), keep_dims=True))
        return dw, ops.zeros((), ms.float32)


class WeightStandardizedConv2d(Conv2d):
    """3x3 convolution whose kernel is standardised per output channel before use (Qiao et al. 2019,
    "Weight Standardization"); the tutorial pairs it with GroupNorm, with which it trains more stably.
    On CPU in float32, standardisation, convolution and bias are one kernel (`Conv2d`)."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 3, pad_mode="pad", padding=1, has_bias=True, standardize_eps=1e-5)
        self.standardize = WeightStandardization()

    def construct(self, x):
        if self.kernels is not None and x.dtype == ms.float32:
            return self.kernels(x, self.weight, self.bias, self.standardize_eps)
        eps = 1e-5 if x.dtype == ms.float32 else 1e-3
        weight = self.standardize(self.weight, eps)
        return ops.conv2d(x, weight.astype(x.dtype), self.bias.astype(x.dtype), pad_mode="pad", padding=1)


class Block(nn.Cell):
    """Weight-standardised conv -> GroupNorm -> optional scale-shift (FiLM) -> SiLU."""

    def __init__(self, dim, dim_out, groups):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out)
        self.norm = GroupNorm(groups, dim_out)

    def construct(self, x, scale=None, shift=None):
        # GroupNorm, scale-shift and SiLU: one fused kernel on CPU (normalization.py)
        return self.norm(self.proj(x), scale, shift, silu=True)


class ResnetBlock(nn.Cell):
    """Two Blocks with a residual connection; the time embedding sets the first block's scale and shift
    (the "scale-shift norm" of Dhariwal & Nichol 2021, Sec. 3). Dropout sits between the two blocks, as in DDPM."""

    def __init__(self, dim, dim_out, time_emb_dim, groups, dropout=0.0):
        super().__init__()
        self.mlp = nn.SequentialCell(nn.SiLU(), nn.Dense(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups)
        self.dropout = nn.Dropout(p=dropout)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def construct(self, x, time_emb):
        scale, shift = ops.chunk(self.mlp(time_emb)[:, :, None, None], 2, axis=1)
        h = self.block1(x, scale, shift)
        h = self.block2(self.dropout(h))
        return h + self.res_conv(x)


class ConvNextBlock(nn.Cell):
    """ConvNeXt block (Liu et al. 2022) with the time embedding added after the depthwise 7x7 convolution."""

    def __init__(self, dim, dim_out, time_emb_dim, mult=2, dropout=0.0):
        super().__init__()
        self.mlp = nn.SequentialCell(nn.GELU(approximate=False), nn.Dense(time_emb_dim, dim))
        self.ds_conv = conv2d(dim, dim, 7, groups=dim)
        self.net = nn.SequentialCell(
            GroupNorm(1, dim),
            conv2d(dim, dim_out * mult, 3),
            nn.GELU(approximate=False),
            nn.Dropout(p=dropout),
            GroupNorm(1, dim_out * mult),
            conv2d(dim_out * mult, dim_out, 3),
        )
        self.res_conv = conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def construct(self, x, time_emb):
        h = self.ds_conv(x) + self.mlp(time_emb)[:, :, None, None]
        return self.net(h) + self.res_conv(x)


def _split_heads(qkv, heads):
    """(B, 3*heads*d, H, W) -> three (B, heads, d, H*W) tensors."""
    b, c, h, w = qkv.shape
    return [t.reshape(b, heads, c // (3 * heads), h * w) for t in ops.chunk(qkv, 3, axis=1)]


# Batched matmuls that read their operands transposed (A @ B^T, A^T @ B, A^T @ B^T). MindSpore's CPU kernels take
# the transposes as flags; `ops.matmul(a.swapaxes(-1, -2), b)` runs explicit Transpose ops forward and backward,
# which cost more than the products here (docs/performance.md).
_matmul_nt = ops.BatchMatMul(transpose_b=True)
_matmul_tn = ops.BatchMatMul(transpose_a=True)
_matmul_tt = ops.BatchMatMul(transpose_a=True, transpose_b=True)


class Attention(nn.Cell):
    """Multi-head dot-product self-attention over all pixels (Vaswani et al. 2017), used at the bottleneck.
    The softmax runs in float32 (a mixed-precision trouble spot)."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_qkv = conv2d(dim, dim_head * heads * 3, 1, has_bias=False)
        self.softmax = Softmax()
        self.to_out = conv2d(dim_head * heads, dim, 1)

    def construct(self, x):
        b, _, h, w = x.shape
        q, k, v = _split_heads(self.to_qkv(x), self.heads)
        sim = _matmul_tn(q * self.scale, k)  # q^T k: (B, heads, N, N)
        attn = self.softmax(sim)
        out = _matmul_nt(v, attn)  # v attn^T: (B, heads, d, N), already channels-first
        return self.to_out(out.reshape(b, -1, h, w))


class LinearAttention(nn.Cell):
    """Linear attention (Shen et al. 2021, "Efficient Attention"): softmax of q over features and of k over pixels,
    so the cost grows linearly with the number of pixels; used at every resolution."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_qkv = conv2d(dim, dim_head * heads * 3, 1, has_bias=False)
        self.softmax = Softmax()
        self.to_out = nn.SequentialCell(conv2d(dim_head * heads, dim, 1), GroupNorm(1, dim))

    def construct(self, x):
        b, _, h, w = x.shape
        q, k, v = _split_heads(self.to_qkv(x), self.heads)
        # q's softmax runs over features: moved to the last axis, because MindSpore's CPU softmax and its gradient's
        # reductions over a middle axis cost several times one transpose plus a last-axis softmax
        q = self.softmax(q.swapaxes(-1, -2)) * self.scale  # (B, heads, N, d)
        k = self.softmax(k)
        context = _matmul_nt(k, v)  # k v^T: (B, heads, d, e)
        out = _matmul_tt(context, q)  # context^T q^T: (B, heads, e, N)
        return self.to_out(out.reshape(b, -1, h, w))


class PreNormResidual(nn.Cell):
    """x + fn(GroupNorm(1 group)(x)): the tutorial's Residual(PreNorm(dim, fn))."""

    def __init__(self, dim, fn):
        super().__init__()
        self.norm = GroupNorm(1, dim)
        self.fn = fn

    def construct(self, x):
        return x + self.fn(self.norm(x))


class Downsample(nn.Cell):
    """Halve H and W without losing pixels: space-to-depth (each 2x2 patch to 4 channels), then a 1x1 conv."""

    def __init__(self, dim, dim_out):
        super().__init__()
        self.conv = conv2d(dim * 4, dim_out, 1)

    def construct(self, x):
        # the tutorial's Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        return self.conv(x)


class Upsample(nn.Cell):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv."""

    def __init__(self, dim, dim_out):
        super().__init__()
        self.conv = conv2d(dim, dim_out, 3)

    def construct(self, x):
        return self.conv(ops.interpolate(x, size=(x.shape[-2] * 2, x.shape[-1] * 2), mode="nearest"))


class UNetLevel(nn.Cell):
    """One resolution level: two blocks, linear attention (or a `SpatialTransformer` over the context, or none:
    `Unet`'s attention_levels), and a resampler (or a 3x3 conv at the last level)."""

    def __init__(self, block1, block2, attn, resample):
        super().__init__()
        self.block1 = block1
        self.block2 = block2
        self.attn = attn
        self.resample = resample
        # a Python constant, so graph mode resolves the call's form at compile time
        self.cross_attention = isinstance(attn, SpatialTransformer)

    def attend(self, x, context):
        """The level's attention: over its pixels, or also over the context tokens (B, L, context_dim)."""
        return self.attn(x, context) if self.cross_attention else self.attn(x)


class Unet(nn.Cell):
    """The annotated-diffusion U-Net.

    Args:
        dim: base width; level i has dim * dim_mults[i] channels; the time embedding has 4 * dim.
        dim_mults: width multipliers per level; H and W must be divisible by 2 ** (len(dim_mults) - 1).
        channels: image channels (1 or 3); out_dim defaults to it.
        init_dim: width of the first conv (default dim).
        block_type: "resnet" (default) or "convnext".
        resnet_block_groups: GroupNorm groups in ResNet blocks; every level's width must be divisible by it.
        heads, dim_head: attention heads and width per head (linear and full attention).
        dropout: dropout probability inside each block.
        num_classes: None (unconditional), or the number N of classes of a class-conditional network: a learned
            embedding of N + 1 rows (row N is the null label, the unconditional branch of classifier-free guidance,
            Ho & Salimans 2021) is added to the time embedding, so the label conditions every block as the time does;
            with `context_dim`, the labels enter through cross-attention instead.
        context_dim: None, or the width of the context tokens (LDM's name): the label becomes `ClassEmbedder`
            tokens (its N + 1 rows, the null label included) that the SpatialTransformers of
            `cross_attention_levels` and of the bottleneck attend to. Needs num_classes.
        attention_levels: indices of the levels (0 .. len(dim_mults) - 1, on the way down and the same level on
            the way up) that attend; None: every level, as the annotated U-Net. The others have no attention (the
            DDPM paper's CIFAR-10 U-Net attends at 16x16 only, Ho et al. 2020, Appendix B); the bottleneck always
            attends.
        cross_attention_levels: indices of attending levels whose linear attention becomes a SpatialTransformer
            (`heads` x `dim_head`, GroupNorm of `resnet_block_groups`, depth 1); needs context_dim.

    construct(x, t, cond=None): x (B, channels, H, W) float, t (B,) timesteps, cond (B,) int32 labels in [0, N]
    (class-conditional networks only, and required there) -> (B, out_dim, H, W).
    """

    # the units `recompute_blocks` recomputes (train.recompute): the residual blocks and the attention blocks
    # (PreNormResidual wraps each linear and full attention)
    RECOMPUTE_UNITS = (ResnetBlock, ConvNextBlock, PreNormResidual, SpatialTransformer)

    def __init__(self, dim, dim_mults=(1, 2, 4, 8), channels=3, init_dim=None, out_dim=None, block_type="resnet",
                 resnet_block_groups=4, heads=4, dim_head=32, dropout=0.0, num_classes=None, context_dim=None,
                 attention_levels=None, cross_attention_levels=()):
        super().__init__()
        check_choice("block_type", block_type, BLOCK_TYPES)
        check_sizes(dim=dim, channels=channels, resnet_block_groups=resnet_block_groups, heads=heads,
                    dim_head=dim_head, dim_mults=dim_mults, init_dim=init_dim, out_dim=out_dim)
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, 1)
        cross_attention_levels = _check_cross_attention(context_dim, cross_attention_levels, num_classes,
                                                        len(dim_mults))
        attention_levels = (tuple(range(len(dim_mults))) if attention_levels is None
                            else _check_levels("attention_levels", attention_levels, len(dim_mults)))
        if not set(cross_attention_levels) <= set(attention_levels):
            raise ValueError(f"Unet: cross_attention_levels {list(cross_attention_levels)} must be among "
                             f"attention_levels {list(attention_levels)} (the levels that attend)")
        self.channels = channels
        init_dim = init_dim or dim
        time_dim = dim * 4

        def block(dim_in, dim_out):
            if block_type == "resnet":
                return ResnetBlock(dim_in, dim_out, time_dim, resnet_block_groups, dropout)
            return ConvNextBlock(dim_in, dim_out, time_dim, dropout=dropout)

        def attention(d, level):
            if level in cross_attention_levels:
                return SpatialTransformer(d, heads, dim_head, context_dim, num_groups=resnet_block_groups,
                                          dropout=dropout)
            if level in attention_levels:
                return PreNormResidual(d, LinearAttention(d, heads, dim_head))
            return nn.Identity()

        self.init_conv = conv2d(channels, init_dim, 1)
        self.time_mlp = nn.SequentialCell(
            SinusoidalPositionEmbeddings(dim),
            nn.Dense(dim, time_dim),
            nn.GELU(approximate=False),
            nn.Dense(time_dim, time_dim),
        )
        #: rows of the class embedding or of the context encoder's table: the N classes and the null label
        #: (None: unconditional)
        self.num_class_embeds = None if num_classes is None else num_classes + 1
        through_time = num_classes is not None and context_dim is None
        self.class_embedding = class_embedding_table(num_classes + 1, time_dim) if through_time else None
        #: tau(y): labels -> context tokens (None: no cross-attention)
        self.context_encoder = None if context_dim is None else ClassEmbedder(num_classes, context_dim)
        dims = [init_dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        downs = []
        for i, (dim_in, dim_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            resample = conv2d(dim_in, dim_out, 3) if last else Downsample(dim_in, dim_out)
            downs.append(UNetLevel(block(dim_in, dim_in), block(dim_in, dim_in), attention(dim_in, i), resample))
        # one assignment of a built list: appending to a CellList leaves parameter names unprefixed
        self.downs = nn.CellList(downs)
        mid_dim = dims[-1]
        self.mid_block1 = block(mid_dim, mid_dim)
        if context_dim is None:
            self.mid_attn = PreNormResidual(mid_dim, Attention(mid_dim, heads, dim_head))
        else:  # LDM's middle block: ResBlock, SpatialTransformer, ResBlock
            self.mid_attn = SpatialTransformer(mid_dim, heads, dim_head, context_dim, num_groups=resnet_block_groups,
                                               dropout=dropout)
        self.mid_block2 = block(mid_dim, mid_dim)
        ups = []
        for i, (dim_in, dim_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            resample = conv2d(dim_out, dim_in, 3) if last else Upsample(dim_out, dim_in)
            ups.append(UNetLevel(block(dim_out + dim_in, dim_out), block(dim_out + dim_in, dim_out),
                                 attention(dim_out, len(in_out) - 1 - i), resample))
        self.ups = nn.CellList(ups)
        self.out_dim = out_dim or channels
        self.final_res_block = block(init_dim * 2, dim)
        self.final_conv = conv2d(dim, self.out_dim, 1)

    def check_image_size(self, height, width):
        """Refuse (ValueError) an image size the levels cannot halve. The trainer and the pipeline call it before
        any graph is compiled (a failure inside compilation comes with MindSpore's C++ stack); construct calls it
        for direct users."""
        check_halvable("Unet", height, width, len(self.downs) - 1, "dim_mults")

    def construct(self, x, time, cond=None):
        self.check_image_size(x.shape[-2], x.shape[-1])
        x = self.init_conv(x)
        r = x
        context = None
        if self.context_encoder is None:
            t = add_class_embedding(self.time_mlp(time), self.class_embedding, cond, "Unet", "num_classes")
        else:
            if cond is None:
                raise ValueError("Unet: this network is class-conditional (num_classes, through cross-attention): "
                                 "pass cond, (B,) int32 class labels")
            t = self.time_mlp(time)
            context = self.context_encoder(cond)  # (B, 1, context_dim)
        skips = []
        for level in self.downs:
            x = level.block1(x, t)
            skips.append(x)
            x = level.attend(level.block2(x, t), context)
            skips.append(x)
            x = level.resample(x)
        x = self.mid_block1(x, t)
        x = self.mid_attn(x) if context is None else self.mid_attn(x, context)
        x = self.mid_block2(x, t)
        # skips are read from the end by index: list.pop() does not compile in graph mode
        n = len(skips)
        for i, level in enumerate(self.ups):
            x = level.block1(ops.cat((x, skips[n - 1 - 2 * i]), axis=1), t)
            x = level.block2(ops.cat((x, skips[n - 2 - 2 * i]), axis=1), t)
            x = level.resample(level.attend(x, context))
        x = self.final_res_block(ops.cat((x, r), axis=1), t)
        return self.final_conv(x)


def _check_cross_attention(context_dim, levels, num_classes, num_levels):
    """The level indices of `cross_attention_levels` as a tuple, or ValueError naming the fix."""
    levels = tuple(levels or ())
    if context_dim is None:
        if levels:
            raise ValueError(f"Unet: cross_attention_levels {list(levels)} need context_dim (the context tokens' "
                             "width, e.g. 32)")
        return levels
    check_int("context_dim", context_dim, 1)
    if num_classes is None:
        raise ValueError("Unet: context_dim needs num_classes: the context tokens are those of the class labels "
                         "(ClassEmbedder)")
    return _check_levels("cross_attention_levels", levels, num_levels)


def _check_levels(name, levels, num_levels):
    """`levels` as a tuple of distinct level indices in 0 .. num_levels - 1, or ValueError naming the fix."""
    levels = tuple(levels)
    bad = [level for level in levels if isinstance(level, bool) or not isinstance(level, int)
           or not 0 <= level < num_levels]
    if bad or len(set(levels)) != len(levels):
        raise ValueError(f"Unet: {name} must be distinct level indices in 0..{num_levels - 1} "
                         f"(one per dim_mults entry), got {list(levels)}")
    return levels
