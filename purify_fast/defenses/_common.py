"""Pieces every weight-space defense shares: matching suspect tensors to pre-trained ones, the
clean fine-tune stage, and splitting a small clean set into train/dev."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from purify_fast.checkpoint import MAX_UNMATCHED_SHARE
from purify_fast.data.text_dataset import TextDataset
from purify_fast.training import TrainConfig, accuracy, train
from purify_fast.validation import real_in


@dataclass
class FinetuneOptions:
    """The clean fine-tune after mixing / reset (METHODS.md: AdamW lr ~2e-5, a few epochs, keep
    the epoch best on clean dev accuracy). ``epochs=0`` skips it."""

    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 16
    max_length: int = 64
    weight_decay: float = 0.01
    precision: str = "fp32"
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        # Validates every field now, not after mixing / the Fisher pass, and keeps the checked
        # values (lr="1e-3" becomes 0.001 here and in the report).
        cfg = self.train_config()
        for name in ("epochs", "lr", "batch_size", "max_length", "weight_decay", "precision",
                     "seed", "progress"):
            setattr(self, name, getattr(cfg, name))

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           max_length=self.max_length, weight_decay=self.weight_decay,
                           precision=self.precision, seed=self.seed, keep_best=True,
                           progress=self.progress)

    def to_dict(self) -> dict:
        return asdict(self)


def check_model(model, name: str) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module (a loaded model), got {type(model).__name__}")
    return model


def check_classifier(model, tokenizer, name: str, num_labels: int | None = None,
                     data: str = "the data") -> None:
    """``model`` is a Hugging Face sequence classifier that ``tokenizer`` can feed: refused here
    with the fix, instead of an AttributeError / IndexError deep inside the first forward."""
    check_model(model, name)
    kind = type(model).__name__
    if not hasattr(model, "config") or not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(f"{name} must be a Hugging Face model (a PreTrainedModel), got {kind}")
    if not (kind.endswith("ForSequenceClassification") or hasattr(model, "classifier")
            or hasattr(model, "score")):
        raise TypeError(f"{name} ({kind}) has no classification head; load it with "
                        f"AutoModelForSequenceClassification.from_pretrained(dir, num_labels=N)")
    if num_labels is not None and getattr(model.config, "num_labels", num_labels) != num_labels:
        raise ValueError(f"{data} has {num_labels} labels but the {name} has "
                         f"{model.config.num_labels}")
    check_tokenizer(model, tokenizer, name)


def check_tokenizer(model, tokenizer, name: str) -> None:
    """A tokenizer object whose ids all have a row in ``model``'s input embedding."""
    if tokenizer is None:
        raise ValueError(f"a tokenizer is required with a {name} model object")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a tokenizer object (e.g. AutoTokenizer.from_pretrained"
                        f"(dir)), got {type(tokenizer).__name__}")
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    rows = getattr(emb, "num_embeddings", None)
    try:
        size = len(tokenizer)
    except TypeError:
        return
    if rows is not None and size > rows:
        raise ValueError(f"the tokenizer has {size} tokens but {name}'s embedding has {rows} rows: "
                         f"it is not this model's tokenizer (pass the one saved with the model)")
    from purify_fast.models.loading import check_pad_token

    check_pad_token(model, tokenizer, name)




def matched_tensors(suspect: torch.nn.Module, pretrained_state: dict) -> dict[str, torch.Tensor]:
    """Pre-trained counterpart of every floating-point parameter of ``suspect`` that has one
    (same name and shape), cast to the suspect's dtype and device. Parameters without one (a new
    classifier head) are absent and so stay as in the suspect. A counterpart of another shape, or
    more than :data:`MAX_UNMATCHED_SHARE` of the weights without one, is an error: ``pretrained``
    is then not the model the suspect was fine-tuned from."""
    if not isinstance(pretrained_state, dict):
        raise TypeError(f"pretrained state must be a dict of tensors, got {type(pretrained_state).__name__}")
    out, missing, reshaped, total = {}, [], [], 0
    for name, p in suspect.named_parameters():
        if not p.is_floating_point():
            continue
        total += p.numel()
        pre = pretrained_state.get(name)
        if pre is None:
            missing.append((name, p.numel()))
        elif tuple(pre.shape) != tuple(p.shape):
            reshaped.append(f"{name} {tuple(p.shape)} vs pre-trained {tuple(pre.shape)}")
        else:
            out[name] = pre.detach().to(device=p.device, dtype=p.dtype)
    if not out:
        raise ValueError("no parameter of the suspect model has a pre-trained counterpart of the "
                         "same name and shape: is `pretrained` the model it was fine-tuned from?")
    if reshaped:
        raise ValueError(f"{len(reshaped)} suspect tensor(s) have a pre-trained counterpart of "
                         f"another shape (e.g. {reshaped[0]}): `pretrained` is another model "
                         f"configuration than the suspect's")
    unmatched = sum(n for _, n in missing)
    if unmatched > MAX_UNMATCHED_SHARE * total:
        names = ", ".join(n for n, _ in missing[:3])
        raise ValueError(f"{len(missing)} suspect tensors ({100 * unmatched / total:.0f} % of its "
                         f"weights; e.g. {names}) have no pre-trained counterpart: `pretrained` "
                         f"is not the model the suspect was fine-tuned from, and purifying only "
                         f"the part that matches would leave the rest untouched")
    return out


def embedding_name(model: torch.nn.Module) -> str:
    """State-dict name of the input word embedding matrix."""
    weight = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        if p is weight:
            return name
    raise ValueError("the model's input embedding is not one of its parameters")


def clean_dev_split(clean: TextDataset, dev: TextDataset | None, dev_fraction: float,
                    seed: int) -> tuple[TextDataset, TextDataset | None]:
    """The clean fine-tune set and the clean dev set used to keep the best epoch.

    With no ``dev`` given, ``dev_fraction`` of ``clean`` is held out (0 disables selection)."""
    dev_fraction = real_in("dev_fraction", dev_fraction, 0.0, 1.0, hi_open=True)
    if not isinstance(clean, TextDataset):
        raise TypeError(f"clean_data must be a TextDataset, got {type(clean).__name__}")
    if len(clean) == 0:
        raise ValueError("clean_data is empty")
    if dev is not None:
        if not isinstance(dev, TextDataset):
            raise TypeError(f"dev_data must be a TextDataset, got {type(dev).__name__}")
        if dev.num_labels != clean.num_labels:
            raise ValueError(f"dev_data has {dev.num_labels} labels, clean_data {clean.num_labels}")
        return clean, dev
    if dev_fraction == 0:
        return clean, None
    train_part, dev_part = clean.split((1.0 - dev_fraction, dev_fraction), seed=seed,
                                       names=[f"{clean.name}/clean-train", f"{clean.name}/clean-dev"])
    if len(dev_part) == 0 or len(train_part) == 0:
        raise ValueError(f"clean_data has {len(clean)} examples: too few to hold out "
                         f"dev_fraction={dev_fraction}; pass dev_data or more clean data")
    return train_part, dev_part


def clean_finetune(model, tokenizer, clean: TextDataset, dev: TextDataset | None,
                   options: FinetuneOptions) -> dict:
    """Fine-tune ``model`` (a defense's own copy) in place on the clean set; the report part of
    the stage.

    Every floating-point parameter trains, whatever its ``requires_grad`` flag (METHODS: the
    mixed / reset model is fine-tuned as a whole; a suspect frozen for inference would otherwise
    fail here, a partly frozen one silently train only its trainable part); the flags are put
    back afterwards, so the purified copy carries the suspect's."""
    if options.epochs == 0:
        return {"epochs": 0}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            if p.is_floating_point():
                p.requires_grad_(True)
        result = train(model, tokenizer, clean, dev, options.train_config())
    finally:
        for p, was in flags:
            p.requires_grad_(was)
    return {"epochs": options.epochs, "best_epoch": result.best_epoch,
            "best_dev_acc": result.best_dev_acc, "history": result.history}


def dev_accuracy(model, tokenizer, dev: TextDataset | None, max_length: int) -> float | None:
    return None if dev is None else accuracy(model, tokenizer, dev, max_length=max_length)
