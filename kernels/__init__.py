"""Triton kernels, installed as ``purify_fast.kernels`` (one module per op family)."""

from purify_fast.kernels.weight_space import (  # noqa: F401
    embedding_drift_scores,
    fisher_accumulate_,
    mix_random,
    philox_uint32,
    score_histogram,
    select_by_score,
)
from purify_fast.kernels.multiscale_lora import mslora_linear, mslora_project  # noqa: E402,F401
from purify_fast.kernels.attention_maps import attention_map_backward, attention_map_forward  # noqa: E402,F401
