"""The shared option checks, and every config dataclass that uses them: one bad value per option
kind (bool for an int, NaN, a non-number string, out of range) must raise a ValueError that names
the option; good values, including the edges of each range, must pass."""
import functools
import math
import re

import pytest
import torch

from purify_fast.attacks.badnets import BadNets
from purify_fast.attacks.encoder_backdoor import EncoderBackdoor
from purify_fast.defenses._common import FinetuneOptions
from purify_fast.defenses.e_pur import EPur
from purify_fast.defenses.fine_mixing import FineMixing
from purify_fast.defenses.fine_purifying import FinePurifying
from purify_fast.defenses.mimic import MIMICConfig
from purify_fast.defenses.mine import MINE
from purify_fast.defenses.muscle_lora import MuscleLoRATrainConfig
from purify_fast.nn import MultiScaleLoRALinear, MuscleLoRAConfig
from purify_fast.streaming import PurifyConfig
from purify_fast.training import TrainConfig
from purify_fast.validation import int_at_least, one_of, real_in

# the streaming config has no default method; its other options are checked with "mix"
StreamingMix = functools.partial(PurifyConfig, method="mix")


def test_int_at_least():
    assert int_at_least("n", 3) == 3
    assert int_at_least("n", 0, 0) == 0
    assert int_at_least("n", None, optional=True) is None
    with pytest.raises(ValueError, match=r"^n must be a positive int, got 0$"):
        int_at_least("n", 0)
    with pytest.raises(ValueError, match=r"n must be a non-negative int, got -1"):
        int_at_least("n", -1, 0)
    with pytest.raises(ValueError, match=r"n must be an int >= 2 or None, got 1"):
        int_at_least("n", 1, 2, optional=True)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(ValueError, match="n must be a positive int"):
            int_at_least("n", bad)


def test_real_in():
    assert real_in("x", 0) == 0.0 and real_in("x", 1, 0.0, 1.0) == 1.0
    assert real_in("x", "0.5", 0.0, 1.0) == 0.5  # numbers from a config file or CLI string
    assert real_in("x", None, 0.0, optional=True) is None
    cases = [
        (dict(lo=0.0, hi=1.0), 1.5, r"x must be in \[0, 1\], got 1.5"),
        (dict(lo=0.0, hi=1.0, lo_open=True, hi_open=True), 0.0, r"x must be in \(0, 1\), got 0.0"),
        (dict(lo=0.0, hi=1.0, hi_open=True), 1.0, r"x must be in \[0, 1\), got 1.0"),
        (dict(lo=0.0, lo_open=True), 0.0, "x must be a positive finite number, got 0.0"),
        (dict(lo=1.0, lo_open=True), 1.0, "x must be a finite number > 1, got 1.0"),
        (dict(lo=0.0), -1e-9, "x must be a finite number >= 0, got"),
        (dict(hi=2.0, hi_open=True), 2.0, "x must be a finite number < 2, got 2.0"),
        (dict(), math.inf, "x must be a finite number, got inf"),
    ]
    for bounds, value, message in cases:
        with pytest.raises(ValueError, match=message):
            real_in("x", value, **bounds)
    for bad in (math.nan, True, "abc", None, [0.5]):
        with pytest.raises(ValueError, match="^x must be in"):
            real_in("x", bad, 0.0, 1.0)


def test_one_of():
    assert one_of("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"mode must be one of 'a', 'b'; got 'c'"):
        one_of("mode", "c", ("a", "b"))


@pytest.mark.parametrize("make, option, bad", [
    (TrainConfig, "epochs", True),
    (TrainConfig, "epochs", -1),
    (TrainConfig, "lr", math.nan),
    (TrainConfig, "lr", "fast"),
    (TrainConfig, "warmup_ratio", 1.0),
    (TrainConfig, "clip_norm", 0.0),
    (TrainConfig, "batch_size", 0),
    (TrainConfig, "precision", "fp8"),
    (TrainConfig, "weight_decay", math.nan),
    (TrainConfig, "weight_decay", -1.0),
    (TrainConfig, "eval_batch_size", 0),
    (TrainConfig, "max_length", 1),
    (TrainConfig, "seed", -1),
    (TrainConfig, "seed", 2**64),
    (TrainConfig, "seed", 1.5),
    (FinetuneOptions, "weight_decay", math.nan),
    (FinetuneOptions, "seed", 2**32),
    (EPur, "c", 1.0),
    (EPur, "c", "x"),
    (MuscleLoRATrainConfig, "epochs", 0),
    (MuscleLoRATrainConfig, "lr", -1.0),
    (MuscleLoRATrainConfig, "ref_pool_size", 0),
    (MuscleLoRATrainConfig, "max_raw_grad_ratio", 1.5),
    (MIMICConfig, "student_layers", 0),
    (MIMICConfig, "mine_steps", 0),
    (MIMICConfig, "epochs", 0),  # it would hand back the untrained student
    (MIMICConfig, "backend", "gpu"),
    (MIMICConfig, "mine_hidden", 0),
    (MIMICConfig, "max_length", 1),
    (MuscleLoRATrainConfig, "max_length", 1),
    (MuscleLoRAConfig, "backend", "gpu"),
    (MIMICConfig, "ssl_temperature", 0.0),
    (MIMICConfig, "attn_weight", math.inf),
    (MIMICConfig, "mi_source", "both"),
    (MIMICConfig, "mi_b", -1e9),
    (MIMICConfig, "warmup_ratio", 7.0),
    (MuscleLoRATrainConfig, "loss_threshold", math.nan),
    (MuscleLoRATrainConfig, "norm_threshold", -1.0),
    (MuscleLoRATrainConfig, "weight_decay", -1.0),
    (MuscleLoRATrainConfig, "warmup_ratio", 5.0),
    (MuscleLoRAConfig, "lora_r", 0),
    (MuscleLoRAConfig, "alpha", math.inf),
    (MuscleLoRAConfig, "r_in", 0),
    (MuscleLoRAConfig, "mode", "wavelet"),
    (MuscleLoRAConfig, "lora_dropout", 1.0),
    (functools.partial(MultiScaleLoRALinear, torch.nn.Linear(4, 3)), "alpha", math.nan),
    (functools.partial(MultiScaleLoRALinear, torch.nn.Linear(4, 3)), "r_in", 0),
    (MINE, "batch_size", 1),
    (MINE, "holdout", 1.0),
    (MINE, "ema", 0.0),
    (FineMixing, "rho", 1.01),
    (FineMixing, "rho", math.nan),
    (FineMixing, "select", "largest"),
    (FineMixing, "sweep_tolerance", -0.1),
    (FinePurifying, "rho", -0.1),
    (FinePurifying, "eps", 0.0),
    (FinePurifying, "indicator", "curvature"),
    (FinePurifying, "scope", "layer"),
    (FinePurifying, "fisher_batch_size", 0),
    (EPur, "top_n", -1),
    (EPur, "score_threshold", -1.0),
    (BadNets, "poison_rate", 2.0),
    (BadNets, "target_label", -1),
    (EncoderBackdoor, "steps", 0),
    (StreamingMix, "rho", 1.5),
    (StreamingMix, "c", 1.0),
    (StreamingMix, "top_n", -1),
    (StreamingMix, "score_threshold", -2.0),
    (StreamingMix, "seed", 2**32),
    (StreamingMix, "method", "prune"),
])
def test_configs_name_the_bad_option(make, option, bad):
    with pytest.raises(ValueError, match=rf"^{option} must be .*got {re.escape(repr(bad))}$"):
        make(**{option: bad})


@pytest.mark.parametrize("make, values", [
    (TrainConfig, dict(epochs=0, lr=1e-5, warmup_ratio=0.0, clip_norm=None, batch_size=1)),
    (TrainConfig, dict(weight_decay=0.0, seed=2**32 - 1, eval_batch_size=1, max_length=2)),
    (MuscleLoRATrainConfig, dict(epochs=None, lr=None, ref_pool_size=None, max_raw_grad_ratio=1.0)),
    (MIMICConfig, dict(student_layers=None, epochs=1, attn_weight=0.0, ssl_weight=0.0)),
    (MINE, dict(batch_size=2, holdout=0.5, ema=1.0)),
    (FineMixing, dict(rho=0.0, rho_sweep=(0.9, 0.1), sweep_tolerance=0.0)),
    (FinePurifying, dict(rho=1.0, scope="per_tensor", fisher_at="pretrained")),
    (EPur, dict(top_n=0)),
    (EPur, dict(score_threshold=0.0)),
    (BadNets, dict(poison_rate=1.0, target_label=0)),
    (StreamingMix, dict(method="fine-purifying", rho=None, seed=2**32 - 1, top_n=0)),
])
def test_configs_accept_edge_values(make, values):
    cfg = make(**values)
    if isinstance(cfg, FineMixing):
        assert cfg.rho_sweep == (0.1, 0.9)  # sorted ascending for the smallest-qualifying search


def test_rho_sweep_needs_a_list():
    for bad in ((), "0.3", 0.3):
        with pytest.raises(ValueError, match="rho_sweep must be a non-empty list"):
            FineMixing(rho_sweep=bad)
    with pytest.raises(ValueError, match=r"rho_sweep value must be in \[0, 1\], got 1.2"):
        FineMixing(rho_sweep=(0.3, 1.2))


@pytest.mark.parametrize("make, kwargs, exc, match", [
    (MIMICConfig, {"student_overrides": [1]}, TypeError, "student_overrides must be a dict"),
    (MuscleLoRAConfig, {"scales": "124"}, TypeError, "got the string '124'"),
    (MuscleLoRAConfig, {"scales": [0]}, ValueError, "scales must all be positive"),
    (MuscleLoRAConfig, {"scales": []}, ValueError, "scales is empty"),
    (MuscleLoRAConfig, {"use_lora": "no"}, TypeError, "use_lora must be True or False"),
    (MuscleLoRAConfig, {"use_mslr": 1}, TypeError, "use_mslr must be True, False or None"),
    (TrainConfig, {"keep_best": "no"}, TypeError, "^keep_best must be True or False, got 'no'$"),
    (TrainConfig, {"progress": "no"}, TypeError, "^progress must be True or False, got 'no'$"),
    (TrainConfig, {"progress": 1}, TypeError, "^progress must be True or False, got 1$"),
    (TrainConfig, {"fp32_weights": None}, TypeError, "^fp32_weights must be True or False"),
    (FinetuneOptions, {"progress": "no"}, TypeError, "^progress must be True or False"),
])
def test_configs_refuse_values_of_the_wrong_kind(make, kwargs, exc, match):
    """Refused when the config is built, not after peft injected LoRA or MINE ran for minutes."""
    with pytest.raises(exc, match=match):
        make(**kwargs)


def test_configs_store_the_checked_values():
    """A value that passes as a number-like string is stored as the number: lr="1e-3" used to
    pass the check, stay a string and fail deep inside torch; score_threshold="1" showed in the
    report as a string. numpy bools are bools."""
    import numpy as np

    cfg = TrainConfig(lr="1e-3", warmup_ratio="0.1", clip_norm="1.0", weight_decay="0",
                      keep_best=np.bool_(False), progress=np.True_)
    assert (cfg.lr, cfg.warmup_ratio, cfg.clip_norm, cfg.weight_decay) == (1e-3, 0.1, 1.0, 0.0)
    assert all(type(v) is float
               for v in (cfg.lr, cfg.warmup_ratio, cfg.clip_norm, cfg.weight_decay))
    assert cfg.keep_best is False and cfg.progress is True
    seed = TrainConfig(seed=np.int64(3)).seed
    assert seed == 3 and type(seed) is int
    opts = FinetuneOptions(lr="2e-4", weight_decay="0.5")
    assert (opts.lr, opts.weight_decay) == (2e-4, 0.5) and type(opts.lr) is float
    assert opts.to_dict()["lr"] == 2e-4
    epur = EPur(score_threshold="1", c="20")
    assert epur.score_threshold == 1.0 and type(epur.score_threshold) is float
    assert epur.c == 20.0 and type(epur.c) is float
