"""Readable PyTorch references of every op: the truth the kernels are tested against.

One module per op family; each function has the same signature as the backend launchers.
"""

from purify_fast.reference.weight_space import (  # noqa: F401
    INDICATORS,
    embedding_drift_scores,
    fisher_accumulate_,
    key_hash,
    mix_random,
    philox_keep_threshold,
    philox_uint32,
    score_histogram,
    scores,
    select_by_score,
)
from purify_fast.reference.multiscale_lora import (  # noqa: E402,F401
    apply_scaling,
    expand_scales,
    merged_weight,
    multiscale_lora_backward,
    scaling_matrix,
)
from purify_fast.reference.multiscale_lora import multiscale_lora as multiscale_lora_reference  # noqa: E402,F401,E501
from purify_fast.reference.attention_maps import attention_map, attention_row_loss  # noqa: E402,F401
