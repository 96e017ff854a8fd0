"""Context encoders tau(y) of latent diffusion (Rombach et al. 2022, Sec. 3.3): a condition y -> a token sequence
(B, L, context_dim) that the cross-attention of `transformer.SpatialTransformer` reads.

A text encoder would produce the same shape from captions; `ClassEmbedder` produces it from class labels, as LDM's
class-conditional ImageNet models do (ldm/modules/encoders/modules.py, ClassEmbedder: one learned token per class).
"""
from mindspore import nn
from mindspore.common.initializer import Normal

__all__ = ["ClassEmbedder"]


class ClassEmbedder(nn.Cell):
    """Class labels (B,) int32 -> context tokens (B, num_tokens, context_dim), one learned table row per class.

    Row `num_classes` is the null label, the unconditional input of classifier-free guidance (Ho & Salimans 2022),
    as for the U-Nets' class embeddings: labels run over 0 ... num_classes, the last meaning "no class".
    With one token the cross-attention weights are all 1, so each class adds a learned vector through W_V and the
    output projection (as in LDM); `num_tokens` > 1 gives the attention something to choose between.
    """

    def __init__(self, num_classes, context_dim, num_tokens=1):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("context_dim", context_dim), ("num_tokens", num_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClassEmbedder: {name} must be a positive integer, got {value!r}")
        self.num_classes = num_classes
        self.null_label = num_classes
        self.num_tokens = num_tokens
        self.context_dim = context_dim
        # N(0, 1) rows, torch.nn.Embedding's initialisation (LDM's ClassEmbedder); MindSpore's default is N(0, 0.01)
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * context_dim, embedding_table=Normal(1.0))

    def construct(self, labels):
        """labels (B,) int32 in [0, num_classes] -> (B, num_tokens, context_dim)."""
        return self.embedding(labels).reshape(labels.shape[0], self.num_tokens, self.context_dim)
