"""Neural-network modules built on the ops: the MuScleLoRA multi-scale LoRA layer, its decoder
classification head, and their injection into Hugging Face sequence classifiers."""

from purify_fast.nn.multiscale_lora import (  # noqa: F401
    MSLRClassificationHead,
    MultiScaleLoRALinear,
    MuscleLoRAConfig,
    adapter_parameters,
    inject_muscle_lora,
    is_adapter_param,
    merge_muscle_lora,
    model_family,
)
