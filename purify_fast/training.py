"""A small fine-tuning loop shared by the attacks and by every defense's clean fine-tune stage.

AdamW over the parameters that have ``requires_grad`` (so callers freeze by flipping that flag),
linear decay after an optional warmup, gradient-norm clipping, fp32 or bf16 autocast (CPU and
GPU), seeded shuffling, a tqdm bar per epoch, clean dev accuracy after each epoch, and the weights
of the epoch with the best dev accuracy restored at the end (``keep_best``); a loss that turns
NaN/Inf stops the run with an error instead of an epoch of NaN weights being kept.

Launched with several processes by ``accelerate launch`` (``WORLD_SIZE`` > 1), the loop runs
data-parallel through :func:`purify_fast.distributed.prepare_stage`: each rank takes its
share of every epoch's batches, gradients are averaged (gloo on CPU, nccl on GPU), so the global
batch is ``world_size × batch_size``; every rank scores the whole dev set on identical weights, so
all ranks keep the same epoch. Models that need FSDP go through ``prepare_stage`` in a loop of
their own (restoring the best epoch here copies full state dicts, which FSDP shards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from purify_fast.data.text_dataset import TextDataset, make_loader
from purify_fast.validation import int_at_least, one_of, real_in, seed_value

PRECISIONS = ("fp32", "bf16")


def flag(name: str, value) -> bool:
    """``value`` as a bool; only a bool (or numpy bool) is accepted: ``"no"`` or ``0`` would be
    taken as a truth value silently."""
    if isinstance(value, bool):
        return value
    try:
        import numpy as np

        if isinstance(value, np.bool_):
            return bool(value)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{name} must be True or False, got {value!r}")


@dataclass
class TrainConfig:
    """Fine-tuning hyper-parameters (METHODS.md: AdamW lr ~2e-5, a few epochs, clip 1.0)."""

    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 32
    max_length: int = 64
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    clip_norm: float | None = 1.0
    precision: str = "fp32"
    seed: int = 0
    keep_best: bool = True
    eval_batch_size: int = 128
    progress: bool = True
    # A bf16 / fp16 model trains in fp32 (cast back at the end): an AdamW step of ~lr is far
    # below a bf16 weight's spacing (2**-8 of its size), so most coordinates would never move
    # (an audit measured 11 % of a bf16 tiny LLaMA's weights changed by a clean fine-tune where
    # fp32 changed all). The whole model is held in fp32 while it trains (frozen weights too:
    # twice their memory) and computes in fp32 unless ``precision="bf16"`` (autocast); False
    # trains in the model's own dtype, steps below its spacing lost.
    fp32_weights: bool = True

    def __post_init__(self):
        # The checked values are stored: a string such as lr="1e-3" would pass the check and
        # fail deep inside torch otherwise.
        for name in ("keep_best", "progress", "fp32_weights"):
            setattr(self, name, flag(name, getattr(self, name)))
        self.epochs = int_at_least("epochs", self.epochs, 0)
        self.lr = real_in("lr", self.lr, 0.0, lo_open=True)
        self.batch_size = int_at_least("batch_size", self.batch_size, 1)
        self.eval_batch_size = int_at_least("eval_batch_size", self.eval_batch_size, 1)
        self.max_length = int_at_least("max_length", self.max_length, 2)  # [CLS] + one token
        self.weight_decay = real_in("weight_decay", self.weight_decay, 0.0)
        self.warmup_ratio = real_in("warmup_ratio", self.warmup_ratio, 0.0, 1.0, hi_open=True)
        self.clip_norm = real_in("clip_norm", self.clip_norm, 0.0, lo_open=True, optional=True)
        self.precision = one_of("precision", self.precision, PRECISIONS)
        self.seed = seed_value(self.seed)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1        # 0 = the weights before training (only when no epoch ran)
    best_dev_acc: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs. Library calls that seed wrap it in
    :func:`rng_preserved`, so the caller's own streams are left as they were."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# The seed a CUDA generator starts from when nobody seeds it (torch's default_rng_seed_val, also
# a fresh torch.Generator()'s initial_seed()).
_TORCH_DEFAULT_SEED = torch.Generator().initial_seed()


@contextlib.contextmanager
def rng_preserved():
    """Save the global RNG states (Python, numpy, torch CPU and, once initialised, CUDA) and put
    them back on exit: a seeded library call stays deterministic inside without reseeding the
    caller's streams (its later draws then depend on its own seed, not on ours)."""
    py = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_state = None, None
    cpu = torch.get_rng_state()
    cuda = (torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    # Before CUDA starts, torch.manual_seed only queues the CUDA seed (applied when it starts):
    # a seeding inside would replace the caller's queued one. Private torch state, hence getattr.
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    queued = None
    if cuda is None and tracker is not None:
        queued = (tracker.manual_seed_all_cb, tracker.manual_seed_cb, list(tracker.call_order))
    try:
        yield
    finally:
        random.setstate(py)
        if np is not None:
            np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        elif queued is not None:
            if torch.cuda.is_initialized():  # it started inside, under our seed: the caller's again
                calls = [call for call in queued[2] if call is not None]
                for call in calls:
                    call[0]()
                if not calls:  # the caller never seeded: torch's own initial CUDA seed
                    torch.cuda.manual_seed_all(_TORCH_DEFAULT_SEED)
            else:
                tracker.manual_seed_all_cb, tracker.manual_seed_cb = queued[:2]
                tracker.call_order = queued[2]


def world_size() -> int:
    """Processes in this launch (``WORLD_SIZE``, 1 when not launched by accelerate/torchrun)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed_launch() -> bool:
    """True when this process is one of several (``accelerate launch`` sets ``WORLD_SIZE``)."""
    return world_size() > 1


def scheduler_steps(epochs: int, batches: int, *, per_rank: bool = False) -> int:
    """How often a stage steps its LR schedule: accelerate's scheduler wrapper steps it once per
    process for each optimizer step, and each of N processes takes ceil(batches / N) steps per
    epoch of a loader accelerate shards (with ``per_rank``, ``batches`` is already this
    process's count). A schedule of ``epochs * batches`` steps ran out early whenever N did not
    divide the batches (the last steps at lr 0; an audit saw half the epochs of a 4-batch run)."""
    n = world_size()
    steps = batches if per_rank else math.ceil(batches / n)
    return max(1, epochs * steps * n)


def rank_dropout_seed(seed: int, accelerator) -> None:
    """After the stage is wrapped: each process draws its own dropout masks (the same seed on
    every rank gave every rank the same masks); data order has its own shared generator."""
    if accelerator is not None:
        torch.manual_seed(seed + accelerator.process_index)


def release_stage(accelerator, net) -> None:
    """Take accelerate's wrappers off the caller's model (a mixed-precision launch patches its
    forward with autocast, which would stay for every later evaluation)."""
    if accelerator is not None:
        accelerator.unwrap_model(net, keep_fp32_wrapper=False)


@contextlib.contextmanager
def handing_back(model, stage: dict | None = None):
    """Around a training stage: the caller's ``model`` goes back to its own train/eval mode when
    the stage fails (it was left training), and accelerate's wrappers come off on every exit path
    (:func:`release_stage` of ``stage["accelerator"]`` and ``stage["net"]``, which the stage fills
    in once it is prepared; a mixed-precision launch patches the forward with autocast)."""
    stage = {} if stage is None else stage
    was_training = model.training
    try:
        yield stage
    except BaseException:
        model.train(was_training)
        raise
    finally:
        release_stage(stage.get("accelerator"), stage.get("net"))


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict(model, tokenizer, dataset: TextDataset, *, batch_size: int = 128, max_length: int = 64,
            precision: str = "fp32", progress: bool = False) -> torch.Tensor:
    """Predicted labels for every example of ``dataset`` (int64 ``[N]``, CPU), in eval mode."""
    from tqdm.auto import tqdm

    device = model_device(model)
    was_training = model.training
    model.eval()
    preds = []
    try:
        for batch in tqdm(make_loader(dataset, tokenizer, batch_size, max_length), desc="eval",
                          leave=False, disable=not progress):
            batch = _to(batch, device)
            batch.pop("labels")
            with autocast(device, precision):
                logits = model(**batch).logits
            preds.append(logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds)


def accuracy(model, tokenizer, dataset: TextDataset, **kwargs) -> float:
    preds = predict(model, tokenizer, dataset, **kwargs)
    return float((preds == torch.tensor(dataset.labels)).float().mean())


def train(model, tokenizer, train_data: TextDataset, dev_data: TextDataset | None = None,
          config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Fine-tune ``model`` in place on ``train_data``; returns the per-epoch history.

    Only parameters with ``requires_grad`` are optimised. With ``dev_data`` and ``keep_best``, the
    model ends with the weights of the fine-tuned epoch that scored best on clean dev accuracy (the
    earliest on a tie); the untouched weights (epoch 0, recorded in the history) only when
    ``epochs`` is 0.
    Gradient hooks registered by the caller (e.g. masking embedding rows) apply as usual; gradients
    left on the model by earlier work are cleared first (they would fold into the first step).
    A training loss that is not finite (or a weight that is not, after an epoch) stops the run
    with a FloatingPointError naming the epoch and step: NaN logits argmax to class 0, so such an
    epoch could otherwise win keep-best. The model is then left part-trained (discard it).
    The global RNGs are seeded with ``config.seed`` for the run and restored afterwards.
    """
    config = dataclasses.replace(config, **overrides) if config and overrides else (
        config or TrainConfig(**overrides))
    model.zero_grad(set_to_none=True)  # before the fp32 cast: a bf16 .grad would not fit
    # See TrainConfig.fp32_weights. Cast in place (the Parameter objects, and the caller's
    # gradient hooks on them, stay; AdamW's state is created at the first step) and before any
    # data-parallel wrapping, which then broadcasts and syncs the fp32 weights. Cast back
    # whatever happens: a failed call must not leave the caller an fp32 model.
    dtypes = {}
    if config.fp32_weights and any(p.dtype in (torch.bfloat16, torch.float16)
                                   for p in model.parameters() if p.requires_grad):
        dtypes = {t: t.dtype for t in (*model.parameters(), *model.buffers())
                  if t.is_floating_point()}
        for t in dtypes:
            t.data = t.data.float()
    try:
        with rng_preserved():
            return _train(model, tokenizer, train_data, dev_data, config)
    finally:
        for t, dtype in dtypes.items():  # back to the model's own dtypes, rounded once
            t.data = t.data.to(dtype)
            if isinstance(t, torch.nn.Parameter):
                t.grad = None  # an fp32 gradient left by a failed step would not fit


def _any_rank(flag: bool, accelerator, device) -> bool:
    """``flag`` or'ed over the processes of a launch, so that every rank stops together (one
    rank raising alone would leave the others waiting in the next all-reduce)."""
    if accelerator is None:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=device), reduction="sum") > 0)


def _diverged(what: str, config: TrainConfig, epoch: int, where: str) -> FloatingPointError:
    hints = [f"a lower lr (now {config.lr:g})"]
    if config.precision != "fp32":
        hints.append("precision='fp32'")
    if not config.fp32_weights:
        hints.append("fp32_weights=True")
    return FloatingPointError(f"training diverged: {what} at epoch {epoch}, {where}; stopped "
                              f"rather than keep a non-finite epoch. Try {' or '.join(hints)}")


def _train(model, tokenizer, train_data: TextDataset, dev_data: TextDataset | None,
           config: TrainConfig) -> TrainResult:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    if len(train_data) == 0:
        raise ValueError(f"train_data {train_data.name!r} is empty")
    if getattr(model.config, "num_labels", train_data.num_labels) != train_data.num_labels:
        raise ValueError(f"model has {model.config.num_labels} labels but {train_data.name!r} has "
                         f"{train_data.num_labels}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter of the model requires grad: nothing to train")
    device = model_device(model)
    seed_everything(config.seed)
    loader = make_loader(train_data, tokenizer, config.batch_size, config.max_length,
                         shuffle=True, seed=config.seed)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    total = scheduler_steps(config.epochs, len(loader))
    sched = get_linear_schedule_with_warmup(opt, int(config.warmup_ratio * total), total)
    eval_kw = dict(batch_size=config.eval_batch_size, max_length=config.max_length,
                   precision=config.precision)

    accelerator, net = None, model  # ``net`` is what the loop calls: the model, or its DDP wrapper
    if distributed_launch():
        from purify_fast.distributed import prepare_stage

        accelerator, net, opt, loader, sched = prepare_stage(model, opt, loader, scheduler=sched)
        device = accelerator.device
        rank_dropout_seed(config.seed, accelerator)

    # the caller's model back in its own mode when training fails, unwrapped whatever happens;
    # on success it ends in eval mode
    with handing_back(model, {"accelerator": accelerator, "net": net}):
        result = TrainResult()
        start = time.perf_counter()
        best_state = None
        if dev_data is not None and config.keep_best:
            # The dev accuracy before training is recorded, but the untouched weights are a
            # candidate only when no epoch runs: "keep the best epoch" picks among fine-tuned
            # epochs, and with a small dev split the untouched suspect often ties or wins by one
            # example, which would skip the clean fine-tune altogether.
            acc0 = accuracy(model, tokenizer, dev_data, **eval_kw)
            result.history.append({"epoch": 0, "loss": None, "dev_acc": acc0, "steps": 0,
                                   "seconds": 0.0})
            if config.epochs == 0:
                result.best_epoch, result.best_dev_acc = 0, acc0
        model.train()
        for epoch in range(1, config.epochs + 1):
            t0, loss_sum, n = time.perf_counter(), 0.0, 0
            bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                       disable=not config.progress or (accelerator is not None
                                                       and not accelerator.is_main_process))
            net.train()
            for step, batch in enumerate(bar, 1):
                batch = _to(batch, device)
                with autocast(device, config.precision):
                    loss = net(**batch).loss
                loss_value = float(loss.detach())
                if _any_rank(not math.isfinite(loss_value), accelerator, device):
                    raise _diverged(f"the training loss is {loss_value}", config, epoch,
                                    f"step {step}/{len(loader)}")
                if accelerator is not None:
                    accelerator.backward(loss)
                    if config.clip_norm is not None:
                        accelerator.clip_grad_norm_(params, config.clip_norm)
                else:
                    loss.backward()
                    if config.clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                loss_sum += loss_value * len(batch["labels"])
                n += len(batch["labels"])
                bar.set_postfix(loss=f"{loss_sum / n:.4f}")
            # a non-finite gradient at the epoch's last step shows only in the weights
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise _diverged("a weight is not finite", config, epoch, "after its last step")
            # ``steps``: batches this process ran (its shard of the epoch under a multi-process
            # run).
            row = {"epoch": epoch, "loss": loss_sum / max(n, 1), "dev_acc": None,
                   "steps": len(loader), "seconds": time.perf_counter() - t0}
            if dev_data is not None:
                row["dev_acc"] = accuracy(model, tokenizer, dev_data, **eval_kw)
                if config.keep_best and (best_state is None
                                         or row["dev_acc"] > result.best_dev_acc):
                    result.best_epoch, result.best_dev_acc = epoch, row["dev_acc"]
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result.history.append(row)
        if best_state is not None and result.best_epoch != config.epochs:
            model.load_state_dict(best_state)
        if dev_data is not None and not config.keep_best:
            result.best_epoch = config.epochs
            result.best_dev_acc = result.history[-1]["dev_acc"] if result.history else None
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
