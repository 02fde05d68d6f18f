"""MuScleLoRA (Wu et al., ACL 2024): train a clean model on a possibly poisoned dataset.

Multi-scale low-rank adaptation on the penultimate dense layer (``purify_fast.nn``) shifts the
clean, high-frequency mapping down so it is learned before the low-frequency backdoor mapping;
standard LoRA on attention q/v; every other weight frozen; and **gradient alignment** (GA) keeps
each update pointed where a small clean reference set agrees.

Gradient alignment (METHODS.md §4), per trainable tensor, with ``g`` the training-batch gradient
and ``g_c`` the gradient on one batch of the clean reference pool::

    g_a = |⟨g, g_c⟩| / ‖g_c‖² · g_c                 (the length of g along g_c, on g_c's side)
    update = g_a                                      while ref_loss > 0.4 and ‖g_c‖ > 5e-7
    update = (1 − μ_e)·g_a + μ_e·g                    otherwise

with ``μ_e = max_raw_grad_ratio · (e + 1) / E`` rising linearly over the ``E`` epochs to
``max_raw_grad_ratio`` (0.1). The ``(e + 1)/E`` form (reconstructed: the official schedule is
only described as linear) lets a little raw gradient in from the first epoch once the reference
loss is low. One extra forward/backward per step (the reference batch).

The reference pool (96 examples for encoders, 128 for decoders) is split off the clean dev set;
the rest of the dev set picks the epoch kept (best clean dev accuracy).

Under ``accelerate launch`` with several processes the trainer runs data-parallel
(:func:`purify_fast.distributed.prepare_stage`, DDP over gloo or nccl): the training and the
reference loaders are both split across ranks, each backward averages its gradient over the
ranks (so ``g`` and ``g_c`` are the global-batch gradients), and the reference loss that picks
between the pure and the blended update is averaged too, so every rank applies the same update
and the replicas never drift apart. FSDP is refused: it shards each tensor over the ranks, and
the per-tensor dot products above would then be taken over one shard only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from purify_fast.data.text_dataset import TextDataset, make_loader
from purify_fast.defenses._common import check_classifier
from purify_fast.nn.multiscale_lora import (
    MultiScaleLoRALinear,
    MuscleLoRAConfig,
    encoder_mslr_path,
    inject_muscle_lora,
    merge_muscle_lora,
    model_family,
)
from purify_fast.training import (
    _to,
    accuracy,
    autocast,
    distributed_launch,
    flag,
    handing_back,
    model_device,
    rank_dropout_seed,
    rng_preserved,
    scheduler_steps,
    seed_everything,
)
from purify_fast.validation import int_at_least, one_of, real_in, seed_value

ABLATIONS = ("muscle-lora", "lora", "ga+lora", "lora+mslr")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class MuscleLoRATrainConfig:
    """Training hyper-parameters; ``None`` fields take the family default (METHODS.md §4):
    lr 2e-5 / epochs 10 / pool 96 for encoders, lr 1e-5 / epochs 5 / pool 128 for decoders."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 32
    max_length: int = 64
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    clip_norm: float | None = 1.0
    precision: str = "auto"
    seed: int = 0
    gradient_alignment: bool | None = None  # None: on (train_clean sets it from its ablation)
    ref_pool_size: int | None = None
    ref_batch_size: int | None = None
    loss_threshold: float = 0.4
    norm_threshold: float = 5e-7
    max_raw_grad_ratio: float = 0.1
    keep_best: bool = True
    eval_batch_size: int = 128
    progress: bool = True

    def __post_init__(self):
        # The checked values are stored (as TrainConfig does): lr="1e-3" or keep_best="no" passed
        # the checks and reached torch / the truth tests unconverted.
        for name in ("keep_best", "progress"):
            setattr(self, name, flag(name, getattr(self, name)))
        if self.gradient_alignment is not None:
            self.gradient_alignment = flag("gradient_alignment", self.gradient_alignment)
        self.epochs = int_at_least("epochs", self.epochs, 1, optional=True)
        self.lr = real_in("lr", self.lr, 0.0, lo_open=True, optional=True)
        self.precision = one_of("precision", self.precision, PRECISIONS)
        self.batch_size = int_at_least("batch_size", self.batch_size, 1)
        self.eval_batch_size = int_at_least("eval_batch_size", self.eval_batch_size, 1)
        self.ref_pool_size = int_at_least("ref_pool_size", self.ref_pool_size, 1, optional=True)
        self.max_raw_grad_ratio = real_in("max_raw_grad_ratio", self.max_raw_grad_ratio, 0.0, 1.0)
        self.clip_norm = real_in("clip_norm", self.clip_norm, 0.0, lo_open=True, optional=True)
        # [CLS]/BOS plus one token at least
        self.max_length = int_at_least("max_length", self.max_length, 2)
        self.ref_batch_size = int_at_least("ref_batch_size", self.ref_batch_size, 1, optional=True)
        self.weight_decay = real_in("weight_decay", self.weight_decay, 0.0)
        self.warmup_ratio = real_in("warmup_ratio", self.warmup_ratio, 0.0, 1.0, hi_open=True)
        self.loss_threshold = real_in("loss_threshold", self.loss_threshold, 0.0)
        self.norm_threshold = real_in("norm_threshold", self.norm_threshold, 0.0)
        self.seed = seed_value(self.seed)


@dataclass
class MuscleLoRAResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_dev_acc: float | None = None
    seconds: float = 0.0
    ga_steps: int = 0        # steps that used the pure aligned gradient on every tensor
    blended_steps: int = 0   # steps where at least one tensor blended in the raw gradient
    config: dict = field(default_factory=dict)
    # Before training: the share of the MSLR layer's outputs that the tanh after it (BERT's
    # pooler, RoBERTa's head) takes within 1 % of ±1 (see tanh_saturation); None for a decoder
    # head, which has no tanh.
    tanh_saturation: float | None = None


# A tanh output within 1 % of ±1 passes under 2 % of the gradient. When more than this share of
# the MSLR layer's outputs start there, training barely moves them: the offline MiniLM's pooler
# at METHODS' α 6 starts at 80 % (α 1: 13–18 %; benchmarks/results_muscle_lora.md).
SATURATION_WARN_SHARE = 0.5


@torch.no_grad()
def tanh_saturation(model, tokenizer, data: TextDataset, max_length: int = 64, n: int = 32,
                    precision: str = "fp32") -> float | None:
    """Share of the MSLR layer's outputs with ``|tanh(y)| > 0.99`` on the first ``n`` examples
    of ``data`` (eval mode: no dropout), for a BERT / RoBERTa model injected by
    :func:`inject_muscle_lora`, whose MSLR dense layer feeds a tanh; None for a decoder head (no
    tanh after its dense) or a layer placed by hand. The global RNG streams are left as they
    were (iterating a DataLoader draws its base seed from them), so measuring inside a seeded
    run does not change the run."""
    family = getattr(model, "muscle_lora_config", {}).get("family")
    if family not in ("bert", "roberta"):
        return None
    try:
        layer = model.get_submodule(encoder_mslr_path(model, family))
    except AttributeError:
        return None
    if not isinstance(layer, MultiScaleLoRALinear):
        return None
    outputs = []
    hook = layer.register_forward_hook(lambda mod, args, out: outputs.append(out.detach()))
    modes = [(m, m.training) for m in model.modules()]  # given back module by module
    device = model_device(model)
    first = data.subset(range(min(n, len(data))))
    try:
        model.eval()
        with rng_preserved():
            batch = next(iter(make_loader(first, tokenizer, len(first), max_length)))
        batch.pop("labels")
        with autocast(device, precision):
            model(**_to(batch, device))
    finally:
        hook.remove()
        for m, training in modes:
            m.train(training)
    if not outputs:  # the layer is not on the path of this model's forward
        return None
    return float((outputs[0].float().abs() > math.atanh(0.99)).float().mean())


# --------------------------------------------------------------------------- GA math

def raw_grad_ratio(epoch: int, epochs: int, max_ratio: float = 0.1) -> float:
    """``μ_e``: rises linearly with the 0-based ``epoch`` to ``max_ratio`` at the last epoch."""
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be in [0, {epochs}), got {epoch}")
    return float(max_ratio) * (epoch + 1) / epochs


@torch.no_grad()
def align_gradients(grads: Sequence[torch.Tensor], ref_grads: Sequence[torch.Tensor],
                    ref_loss: float, mu: float, *, loss_threshold: float = 0.4,
                    norm_threshold: float = 5e-7) -> tuple[list[torch.Tensor], list[bool]]:
    """Per-tensor gradient alignment (module docstring). Returns the update for each tensor and
    whether it is the pure aligned gradient (``True``) or the blend (``False``).

    Dot products and norms are taken in fp32; each update keeps its tensor's dtype. A reference
    gradient of zero norm has no direction, so its aligned part is zero.
    """
    if len(grads) != len(ref_grads):
        raise ValueError(f"{len(grads)} gradients but {len(ref_grads)} reference gradients")
    out, pure = [], []
    for g, gc in zip(grads, ref_grads):
        if g.shape != gc.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} != reference {tuple(gc.shape)}")
        g32, gc32 = g.to(torch.float32), gc.to(torch.float32)
        n2 = float((gc32 * gc32).sum())
        if n2 > 0.0:
            ga = gc32 * (abs(float((g32 * gc32).sum())) / n2)
        else:
            ga = torch.zeros_like(gc32)
        use_aligned = ref_loss > loss_threshold and math.sqrt(n2) > norm_threshold
        upd = ga if use_aligned else (1.0 - mu) * ga + mu * g32
        out.append(upd.to(g.dtype))
        pure.append(use_aligned)
    return out, pure


def split_reference_pool(dev: TextDataset, size: int, seed: int = 0
                         ) -> tuple[TextDataset, TextDataset]:
    """``(reference_pool, remaining_dev)``: a seeded, label-stratified pool of ``size`` examples
    split off the clean dev set; the remainder keeps choosing the best epoch."""
    check_reference_pool(len(dev), size)
    # Exactly `size` examples, each class in proportion (largest remainders get the rounding):
    # per-class rounding alone could take the whole dev set and leave nothing to select with.
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(dev.labels):
        by_class.setdefault(y, []).append(i)
    for members in by_class.values():
        rng.shuffle(members)
    n = len(dev)
    quota = {c: size * len(m) // n for c, m in by_class.items()}
    by_remainder = sorted(by_class, key=lambda c: (-(size * len(by_class[c]) % n), c))
    for c in by_remainder[:size - sum(quota.values())]:
        quota[c] += 1
    chosen = sorted(i for c, m in by_class.items() for i in m[:quota[c]])
    taken = set(chosen)
    rest = [i for i in range(n) if i not in taken]
    return (dev.subset(chosen, f"{dev.name}/ref-pool"), dev.subset(rest, f"{dev.name}/select"))


def check_reference_pool(dev_size: int, size: int) -> None:
    if dev_size <= size:
        raise ValueError(f"the clean dev set has {dev_size} examples; the reference pool needs "
                         f"{size} plus at least one left for model selection (pass a larger dev "
                         f"set or a smaller ref_pool_size, --ref-pool-size on the command line)")


def _check_training_data(train_data: TextDataset, dev_data: TextDataset,
                         config: MuscleLoRATrainConfig, family: str) -> None:
    if len(train_data) == 0:
        raise ValueError(f"train_data {train_data.name!r} is empty")
    if train_data.num_labels != dev_data.num_labels:
        raise ValueError(f"train has {train_data.num_labels} labels, dev {dev_data.num_labels}")
    if len(dev_data) == 0:
        raise ValueError(f"dev_data {dev_data.name!r} is empty: the best epoch is chosen on it")
    if config.gradient_alignment is not False:
        check_reference_pool(len(dev_data), _pool_size(config, family))


def _pool_size(config: MuscleLoRATrainConfig, family: str) -> int:
    """The reference pool: the configured size, else 128 for decoders, 96 for encoders."""
    return config.ref_pool_size or (128 if family == "decoder" else 96)


def _cycle(loader) -> Iterator[dict]:
    while True:
        yield from loader


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


# --------------------------------------------------------------------------- trainer

def train_muscle_lora(model, tokenizer, train_data: TextDataset, dev_data: TextDataset,
                      config: MuscleLoRATrainConfig | None = None, **overrides) -> MuscleLoRAResult:
    """Train the adapters of an injected model (:func:`purify_fast.nn.inject_muscle_lora`) in
    place, with gradient alignment against a reference pool split off ``dev_data``. The model ends
    with the epoch of best clean accuracy on the rest of ``dev_data`` (adapters still unmerged).
    The global RNGs are seeded with ``config.seed`` for the run and restored afterwards (also
    when it fails)."""
    config = dataclasses.replace(config or MuscleLoRATrainConfig(), **overrides)
    with rng_preserved():
        return _train_muscle_lora(model, tokenizer, train_data, dev_data, config)


def _train_muscle_lora(model, tokenizer, train_data: TextDataset, dev_data: TextDataset,
                       config: MuscleLoRATrainConfig) -> MuscleLoRAResult:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    family = model_family(model) if not hasattr(model, "muscle_lora_config") else \
        model.muscle_lora_config["family"]
    decoder = family == "decoder"
    epochs = config.epochs or (5 if decoder else 10)
    lr = config.lr or (1e-5 if decoder else 2e-5)
    pool_size = _pool_size(config, family)
    _check_training_data(train_data, dev_data, config, family)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameter: inject MuScleLoRA first (inject_muscle_lora)")
    device = model_device(model)
    precision = _resolve_precision(config.precision, device)
    seed_everything(config.seed)

    ga = config.gradient_alignment is not False
    if ga:
        pool, select = split_reference_pool(dev_data, pool_size, seed=config.seed)
        ref_loader = make_loader(pool, tokenizer, config.ref_batch_size or config.batch_size,
                                 config.max_length, shuffle=True, seed=config.seed + 1)
        ref_iter = _cycle(ref_loader)
    else:
        select = dev_data
    loader = make_loader(train_data, tokenizer, config.batch_size, config.max_length,
                         shuffle=True, seed=config.seed)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([g for g in ({"params": decay, "weight_decay": config.weight_decay},
                                         {"params": no_decay, "weight_decay": 0.0}) if g["params"]],
                            lr=lr)
    total = scheduler_steps(epochs, len(loader))
    sched = get_linear_schedule_with_warmup(opt, int(config.warmup_ratio * total), total)
    eval_kw = {"batch_size": config.eval_batch_size, "max_length": config.max_length,
                   "precision": precision}

    accelerator, net = None, model  # ``net``: what the loop calls (the model or its DDP wrapper)
    if distributed_launch():
        from accelerate.utils import DistributedType

        from purify_fast.distributed import prepare_stage

        loaders = (loader, ref_loader) if ga else (loader,)
        accelerator, net, opt, *loaders, sched = prepare_stage(model, opt, *loaders,
                                                               scheduler=sched)
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("MuScleLoRA's gradient alignment needs whole gradient tensors; "
                             "FSDP shards them. Launch with DDP (the adapters are small).")
        loader = loaders[0]
        if ga:
            ref_iter = _cycle(loaders[1])
        device = accelerator.device
        rank_dropout_seed(config.seed, accelerator)

    def loss_and_grads(batch) -> tuple[float, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        with autocast(device, precision):
            loss = net(**_to(batch, device)).loss
        if accelerator is not None:
            accelerator.backward(loss)  # gradients come back averaged over the ranks
            # the same loss on every rank, so every rank takes the same GA branch
            loss = accelerator.reduce(loss.detach(), reduction="mean")
        else:
            loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        return float(loss.detach()), grads

    # the caller's model back in its own mode when training fails, unwrapped whatever happens;
    # on success it ends in eval mode
    with handing_back(model, {"accelerator": accelerator, "net": net}):
        result = MuscleLoRAResult(config=dict(dataclasses.asdict(config), epochs=epochs, lr=lr,
                                              ref_pool_size=pool_size if ga else 0,
                                              precision=precision))
        start = time.perf_counter()
        result.tanh_saturation = tanh_saturation(model, tokenizer, train_data, config.max_length,
                                                 precision=precision)
        if (result.tanh_saturation is not None and result.tanh_saturation > SATURATION_WARN_SHARE
                and (accelerator is None or accelerator.is_main_process)):
            warnings.warn(
                f"the MSLR layer starts saturated: {100 * result.tanh_saturation:.0f} % of its "
                f"outputs on the first training examples sit where the tanh after it passes "
                f"under 2 % of the gradient (alpha {model.muscle_lora_config['alpha']:g}), so "
                f"training will barely move them; lower the alpha (MuscleLoRAConfig.alpha, "
                f"train-clean --alpha). On the offline MiniLM alpha 6 starts 80 % saturated and "
                f"barely trains, alpha 1 starts at 13-18 % and trains", stacklevel=3)
        # Only adapters train, so the best epoch is fully described by the trainable tensors.
        snapshot = lambda: [p.detach().clone() for p in params]
        best = None
        if config.keep_best:
            # Recorded, not a candidate (as in purify_fast.training.train): the fresh adapters are
            # the base model with an untrained head, which is not a trained model.
            acc0 = accuracy(model, tokenizer, select, **eval_kw)
            result.history.append({"epoch": 0, "loss": None, "dev_acc": acc0, "steps": 0,
                                   "seconds": 0.0})
        net.train()
        for epoch in range(epochs):
            mu = raw_grad_ratio(epoch, epochs, config.max_raw_grad_ratio)
            t0, loss_sum, ref_sum, n, steps = time.perf_counter(), 0.0, 0.0, 0, 0
            bar = tqdm(loader, desc=f"muscle-lora {epoch + 1}/{epochs}", leave=False,
                       disable=not config.progress or (accelerator is not None
                                                       and not accelerator.is_main_process))
            for batch in bar:
                loss, grads = loss_and_grads(batch)
                if ga:
                    grads = [g.clone() for g in grads]
                    ref_loss, ref_grads = loss_and_grads(next(ref_iter))
                    update, pure = align_gradients(grads, ref_grads, ref_loss, mu,
                                                   loss_threshold=config.loss_threshold,
                                                   norm_threshold=config.norm_threshold)
                    for p, u in zip(params, update):
                        p.grad = u
                    result.ga_steps += all(pure)
                    result.blended_steps += not all(pure)
                    ref_sum += ref_loss
                if config.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
                opt.step()
                sched.step()
                for p in params:
                    p.grad = None
                b = len(batch["labels"])
                loss_sum, n, steps = loss_sum + loss * b, n + b, steps + 1
                bar.set_postfix(loss=f"{loss_sum / n:.4f}")
            # ``steps``: batches this process ran (its shard of the epoch under a multi-process
            # run).
            row = {"epoch": epoch + 1, "loss": loss_sum / max(n, 1), "steps": steps,
                   "ref_loss": ref_sum / steps if ga and steps else None, "mu": mu,
                   "dev_acc": accuracy(model, tokenizer, select, **eval_kw),
                   "seconds": time.perf_counter() - t0}
            result.history.append(row)
            if config.keep_best and (best is None or row["dev_acc"] > result.best_dev_acc):
                result.best_epoch, result.best_dev_acc, best = epoch + 1, row["dev_acc"], snapshot()
            net.train()
        if config.keep_best and best is not None and result.best_epoch != epochs:
            with torch.no_grad():
                for p, b in zip(params, best):
                    p.copy_(b)
        if not config.keep_best:
            result.best_epoch, result.best_dev_acc = epochs, result.history[-1]["dev_acc"]
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def ablation_settings(ablation: str) -> tuple[bool, bool]:
    """``(use_mslr, gradient_alignment)`` of an ablation name."""
    table = {"muscle-lora": (True, True), "lora": (False, False), "ga+lora": (False, True),
             "lora+mslr": (True, False)}
    if ablation not in table:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    return table[ablation]


@contextlib.contextmanager
def _adapters_out_on_failure(model):
    """Around injecting and training: a run that fails (an error, Ctrl-C) takes the adapters out
    again, so the caller's model is the one it passed (its own modules, requires_grad flags and
    attributes) and can be passed again (a model left injected was refused: "inject once").
    Its own weights train only with ``train_head``: the caller calls the yielded function once
    the adapters are in, and those that will train are copied then, to be put back."""
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attributes = set(vars(model))
    ours = {id(p) for p in model.parameters()}
    trained: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def keep_trained_weights():
        trained.extend((p, p.detach().clone()) for p in model.parameters()
                       if p.requires_grad and id(p) in ours)

    try:
        yield keep_trained_weights
    except BaseException:
        with torch.no_grad():
            for p, value in trained:
                p.copy_(value)
        # parents first: each path is set on its original parent, so the tree is the original
        for path in sorted((p for p in modules if p), key=lambda p: p.count(".")):
            parent_path, _, child = path.rpartition(".")
            parent = modules[parent_path] if parent_path else model
            if getattr(parent, child, None) is not modules[path]:
                setattr(parent, child, modules[path])
        for name in set(vars(model)) - attributes:  # muscle_lora_config, peft's peft_config
            delattr(model, name)
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        raise


def train_clean(model, tokenizer, train_data: TextDataset, dev_data: TextDataset, *,
                method: str = "muscle-lora", ablation: str = "muscle-lora",
                inject: MuscleLoRAConfig | None = None,
                config: MuscleLoRATrainConfig | None = None, return_result: bool = False,
                merged_dtype: torch.dtype | None = None, **overrides):
    """Train a clean model on possibly poisoned ``train_data`` and return it **merged**: every
    adapter folded into its base layer, the original architecture back (ready for
    ``save_pretrained``). ``ablation``: ``muscle-lora`` (MSLR + LoRA + GA), ``lora``,
    ``ga+lora``, ``lora+mslr``. With ``return_result=True`` returns ``(model, result)``.
    ``merged_dtype`` casts the model before the merge (``torch.float32`` keeps the whole update
    of a bf16 model; see :func:`purify_fast.nn.merge_muscle_lora`). The merged model's
    parameters keep the ``requires_grad`` flags they had when it was passed.

    ``model`` may be a model object or a local checkpoint path / ``"minilm"`` (then ``tokenizer``
    may be None and is loaded with it, after seeding with ``config.seed`` so the fresh frozen
    classifier head is reproducible). A model object keeps the head it was loaded with: seed
    before :func:`purify_fast.models.load_classifier` for a reproducible run.

    The global RNGs are seeded with ``config.seed`` (the head above, the adapters' init, the
    training) and the caller's states are restored afterwards, also when the call fails.
    """
    if method != "muscle-lora":
        raise ValueError(f"method must be 'muscle-lora', got {method!r}")
    for what, data in (("train_data", train_data), ("dev_data", dev_data)):
        if not isinstance(data, TextDataset):  # before any model is loaded
            raise TypeError(f"{what} must be a TextDataset, got {type(data).__name__}")
    use_mslr, ga = ablation_settings(ablation)
    # The ablation decides these two; a caller's other value would be overridden without a word.
    chosen = overrides.get("gradient_alignment", config.gradient_alignment if config else None)
    if chosen is not None and bool(chosen) != ga:
        raise ValueError(f"gradient alignment is set by ablation={ablation!r} (it {'uses' if ga else 'drops'} "
                         f"it); choose the ablation ('muscle-lora', 'lora', 'ga+lora', 'lora+mslr') "
                         f"instead of config.gradient_alignment")
    if inject is not None and inject.use_mslr is not None and inject.use_mslr != use_mslr:
        raise ValueError(f"the MSLR layer is set by ablation={ablation!r} (it "
                         f"{'uses' if use_mslr else 'drops'} it); choose the ablation instead of "
                         f"inject.use_mslr")
    inject = dataclasses.replace(inject or MuscleLoRAConfig(), use_mslr=use_mslr)
    overrides.pop("gradient_alignment", None)
    config = dataclasses.replace(config or MuscleLoRATrainConfig(), gradient_alignment=ga,
                                 **overrides)
    with rng_preserved():  # the seeding below is ours; the caller's streams come back
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from purify_fast.models import load_classifier

            # A checkpoint without a head of this size (the offline MiniLM) gets a fresh random
            # classifier that MuScleLoRA keeps frozen: seed it so a run is reproducible.
            seed_everything(config.seed)
            model, tok = load_classifier(model, train_data.num_labels)
            tokenizer = tokenizer or tok
        check_classifier(model, tokenizer, "model", train_data.num_labels, "train_data")
        # Everything that would fail in training is checked before the model is changed in place:
        # a failed call must leave a model that can be passed again.
        _check_training_data(train_data, dev_data, config, model_family(model))
        seed_everything(config.seed)  # the adapters' random init is part of the seeded run
        # The merge makes every parameter trainable; the caller's flags (a frozen embedding) come
        # back after it, by name (the merge restores the names).
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        with _adapters_out_on_failure(model) as keep_trained_weights:
            inject_muscle_lora(model, inject)
            keep_trained_weights()  # the classifier head's, with train_head
            result = train_muscle_lora(model, tokenizer, train_data, dev_data, config)
        result.config["ablation"] = ablation
        result.config["inject"] = dict(model.muscle_lora_config)
        merge_muscle_lora(model, merged_dtype)
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
        model.eval()
        return (model, result) if return_result else model
