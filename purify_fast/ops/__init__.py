"""The thin public API over the kernel backends: one function per op, each validating its inputs
and dispatching to ``backend="auto"|"torch"|"triton"|"cpp"|"cuda"`` (or ``PURIFY_FAST_BACKEND``).
One module per op family."""

from purify_fast.ops.weight_space import (  # noqa: F401
    INDICATORS,
    ScoreHistogram,
    Threshold,
    embedding_drift_scores,
    fisher_accumulate_,
    global_score_threshold,
    mix_weights,
    reset_by_score,
    score_histogram,
    select_threshold,
)
from purify_fast.ops.multiscale_lora import multiscale_lora  # noqa: E402,F401
from purify_fast.ops.attention_maps import attention_layer_mse, attention_map_loss  # noqa: E402,F401
