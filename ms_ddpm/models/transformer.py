"""Cross-attention conditioning of latent diffusion (Rombach et al. 2022, Sec. 3.3): a transformer over the pixels
of a feature map whose second attention reads a context sequence, e.g. the tokens of `ClassEmbedder`.

Eq. 3 of the paper: Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with Q = W_Q phi(z_t) from the U-Net's
features and K = W_K tau(y), V = W_V tau(y) from the context tau(y). The block is LDM's BasicTransformerBlock
(pre-LayerNorm self-attention, cross-attention, GEGLU feed-forward, each residual) inside the SpatialTransformer
wrapper (GroupNorm, projection in, blocks, projection out, residual), with the module names of diffusers'
`BasicTransformerBlock` and `Transformer2DModel`, so their weights load through `ddpm_unet.load_diffusers_weights`.

Shapes: feature maps (B, C, H, W); token sequences (B, N, dim); context (B, L, context_dim).
"""
import mindspore as ms
from mindspore import nn, ops

from .convolution import conv2d
from .normalization import GroupNorm
from .softmax import Softmax

__all__ = ["LayerNorm", "GEGLU", "FeedForward", "CrossAttention", "BasicTransformerBlock", "SpatialTransformer"]

# q k^T as one kernel that reads k transposed (see unet.py: explicit transposes cost more than these products on CPU)
_matmul_nt = ops.BatchMatMul(transpose_b=True)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis (Ba et al. 2016) whose statistics are computed in float32 whatever the input
    dtype, as the package's GroupNorm; eps 1e-5 as torch and diffusers (MindSpore's default is 1e-7)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__((dim,), epsilon=eps)

    def construct(self, x):
        return super().construct(x.astype(ms.float32)).astype(x.dtype)


class GEGLU(nn.Cell):
    """Gated GELU, FFN_GEGLU of Shazeer 2020 ("GLU Variants Improve Transformer", Sec. 2): one projection to
    2 * dim_out, split into a value and a gate, value * GELU(gate) (exact, erf-based GELU as diffusers).
    (..., dim_in) -> (..., dim_out)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Dense(dim_in, 2 * dim_out)

    def construct(self, x):
        value, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return value * ops.gelu(gate, approximate="none")


class FeedForward(nn.Cell):
    """GEGLU to 4 * dim, dropout, linear back to dim (diffusers' FeedForward, `net.0` / `net.2`): (..., dim) -> same."""

    def __init__(self, dim, dropout=0.0, mult=4):
        super().__init__()
        self.net = nn.CellList([GEGLU(dim, mult * dim), nn.Dropout(p=dropout), nn.Dense(mult * dim, dim)])

    def construct(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class CrossAttention(nn.Cell):
    """Multi-head attention of queries from x over keys and values from a context (Eq. 3 above); self-attention
    when the context is x itself. Projections without bias except the output one, as in LDM and diffusers.

    construct(x, context): (B, N, query_dim), (B, L, context_dim) -> (B, N, query_dim).
    """

    def __init__(self, query_dim, context_dim, heads, head_dim, dropout=0.0):
        super().__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.to_q = nn.Dense(query_dim, inner_dim, has_bias=False)
        self.to_k = nn.Dense(context_dim, inner_dim, has_bias=False)
        self.to_v = nn.Dense(context_dim, inner_dim, has_bias=False)
        # [Dense, Dropout] named to_out.0 / to_out.1 like diffusers' ModuleList
        self.to_out = nn.CellList([nn.Dense(inner_dim, query_dim), nn.Dropout(p=dropout)])
        self.softmax = Softmax()  # float32, like every softmax of the package

    def _split_heads(self, x):
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, heads, n, head_dim)

    def construct(self, x, context):
        b, n, _ = x.shape
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        weights = self.softmax(_matmul_nt(q * self.scale, k))  # (B, heads, N, L)
        out = ops.matmul(weights, v).transpose(0, 2, 1, 3).reshape(b, n, self.heads * self.head_dim)
        return self.to_out[1](self.to_out[0](out))


class BasicTransformerBlock(nn.Cell):
    """x + SelfAttn(LN(x)), then + CrossAttn(LN(x), context), then + FF(LN(x)) (pre-norm, Vaswani et al. 2017's
    sub-layers; diffusers' BasicTransformerBlock with layer_norm, geglu and cross_attention_dim).

    construct(x, context): (B, N, dim), (B, L, context_dim) -> (B, N, dim).
    """

    def __init__(self, dim, num_heads, head_dim, context_dim, dropout=0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, num_heads, head_dim, dropout)
        self.norm2 = LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, num_heads, head_dim, dropout)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def construct(self, x, context):
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Cell):
    """A stack of BasicTransformerBlocks over the H*W positions of a feature map, with a residual around it
    (LDM's SpatialTransformer; diffusers' Transformer2DModel on continuous input).

    Args:
        in_channels: C of the feature map.
        num_heads, head_dim: attention heads and their width; the blocks run at num_heads * head_dim.
        context_dim: width of the context tokens.
        depth: number of BasicTransformerBlocks (diffusers' num_layers).
        num_groups: groups of the input GroupNorm (eps 1e-6, as diffusers).
        use_linear_projection: project in and out with Dense layers on the tokens (Stable Diffusion 2) instead of
            1x1 convolutions on the map (LDM, Stable Diffusion 1); the same maps, laid out differently.
        dropout: inside attention outputs and the feed-forward.

    proj_out starts at zero, as in LDM's code, so that a new SpatialTransformer is the identity and a U-Net that
    gains one starts from its unconditional behaviour.

    construct(x, context): (B, in_channels, H, W), (B, L, context_dim) -> (B, in_channels, H, W).
    """

    def __init__(self, in_channels, num_heads, head_dim, context_dim, depth=1, num_groups=32,
                 use_linear_projection=False, dropout=0.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"SpatialTransformer: depth must be at least 1, got {depth}")
        inner_dim = num_heads * head_dim
        self.inner_dim = inner_dim
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Dense(in_channels, inner_dim)
            self.proj_out = nn.Dense(inner_dim, in_channels, weight_init="zeros", bias_init="zeros")
        else:
            self.proj_in = conv2d(in_channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1, has_bias=True, weight_init="zeros",
                                      bias_init="zeros")
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner_dim, num_heads, head_dim, context_dim, dropout) for _ in range(depth)
        ])

    def construct(self, x, context):
        b, c, height, width = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.reshape(b, c, height * width).transpose(0, 2, 1))
        else:
            h = self.proj_in(h).reshape(b, self.inner_dim, height * width).transpose(0, 2, 1)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).transpose(0, 2, 1).reshape(b, c, height, width)
        else:
            h = self.proj_out(h.transpose(0, 2, 1).reshape(b, self.inner_dim, height, width))
        return x + h
