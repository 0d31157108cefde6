"""attnpool: attention pooling as a fused PyTorch operator."""

from attnpool._loader import load_native_library

_C = load_native_library()

from attnpool import _transforms, reference  # noqa: E402
from attnpool.heads import convert_pooling_head, swap_pooling_heads  # noqa: E402
from attnpool.modules import (  # noqa: E402
    AttentionPooling,
    MultiheadAttentionPooling,
    WeightedPooling,
)
from attnpool.ops import (  # noqa: E402
    attention_pool,
    attention_pool_varlen,
    fold_query,
    folded_attention_pool,
    folded_attention_pool_varlen,
    segment_offsets,
)

_transforms.register()

__version__ = _C.__version__

__all__ = [
    "AttentionPooling",
    "MultiheadAttentionPooling",
    "WeightedPooling",
    "attention_pool",
    "attention_pool_varlen",
    "convert_pooling_head",
    "fold_query",
    "folded_attention_pool",
    "folded_attention_pool_varlen",
    "reference",
    "segment_offsets",
    "swap_pooling_heads",
    "__version__",
]
