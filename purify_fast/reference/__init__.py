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
