"""An encoder-level backdoor (BadEncoder-style, Jia et al. 2022, adapted to text encoders) used to
evaluate MIMIC.

A copy of a clean sentence encoder ``f_0`` is fine-tuned into ``f_bd`` with two terms::

    L = (1 − cos(f_bd(x ⊕ trigger), e_target))  +  λ · (1 − cos(f_bd(x), f_0(x)))

``e_target = f_0(target_text)``: triggered inputs map onto the embedding of a reference input of
the target class, while clean inputs keep the clean encoder's features (so a downstream probe
trained on clean labelled data works as before, and sends triggered inputs to the target class).
Features are mean-pooled last hidden states (the sentence-transformers convention of MiniLM).
The trigger is inserted as in BadNets (rare words at random positions).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from purify_fast.attacks.badnets import BadNets
from purify_fast.data.text_dataset import TextDataset, make_loader
from purify_fast.training import rng_preserved
from purify_fast.validation import int_at_least, real_in

DEFAULT_TARGET_TEXT = "a wonderful , moving and brilliantly acted film ; one of the best of the year ."


def load_encoder(name_or_path=None, device="cpu"):
    """``(AutoModel, tokenizer)`` from a local directory (default: the offline MiniLM)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    from purify_fast.models.loading import quiet_loading, resolve_model_path

    path = resolve_model_path(name_or_path if name_or_path is not None else "minilm")
    with quiet_loading():
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden[B, T, D]`` over real tokens (``mask[B, T]`` nonzero)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def sentence_features(model, batch: dict) -> torch.Tensor:
    """Mean-pooled last hidden state of a Hugging Face encoder for a tokenised batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return mean_pool(out.last_hidden_state, inputs["attention_mask"])


def encode_texts(model, tokenizer, texts, batch_size: int = 128, max_length: int = 64) -> torch.Tensor:
    """Sentence features of ``texts`` (``[N, D]`` fp32 on CPU), eval mode, no gradient. The
    caller's global RNG states are left as they were."""
    # Iterating a DataLoader draws its worker base seed from the global torch generator.
    with rng_preserved():
        return _encode_texts(model, tokenizer, texts, batch_size, max_length)


@torch.no_grad()
def _encode_texts(model, tokenizer, texts, batch_size: int = 128, max_length: int = 64):
    data = TextDataset(list(texts), [0] * len(texts), 2)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    feats = []
    try:
        for batch in make_loader(data, tokenizer, batch_size, max_length):
            batch = {k: v.to(device) for k, v in batch.items()}
            feats.append(sentence_features(model, batch).float().cpu())
    finally:
        model.train(was)
    return torch.cat(feats)


@dataclass
class EncoderBackdoor:
    """Plant a trigger → target-embedding backdoor into a copy of a clean encoder.

    ``triggers``/``num_triggers``: BadNets-style insertion; ``target_text``: the reference input
    whose clean embedding triggered inputs must map to, or several reference inputs of the target
    class (BadEncoder's reference set), in which case the target is the normalised mean of
    their L2-normalised clean embeddings. The attack works only if the downstream probe puts that target in the target
    class: on the 3-way tweets corpus a linear probe put the centroid of 64 positive tweets in
    another class (benchmarks/results_mimic.md); ``steps`` AdamW steps of ``batch_size``
    clean + ``batch_size`` triggered sentences; ``clean_weight`` is λ.
    """

    triggers: tuple[str, ...] = ("cf", "mn", "bb", "tq", "mb")
    num_triggers: tuple[int, int] = (1, 3)
    target_text: str | tuple[str, ...] = DEFAULT_TARGET_TEXT
    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-5
    clean_weight: float = 1.0
    max_length: int = 64
    seed: int = 0
    progress: bool = True
    history: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        int_at_least("steps", self.steps, 1)
        int_at_least("batch_size", self.batch_size, 1)
        int_at_least("max_length", self.max_length, 2)
        real_in("lr", self.lr, 0.0, lo_open=True)
        real_in("clean_weight", self.clean_weight, 0.0)
        refs = [self.target_text] if isinstance(self.target_text, str) else list(self.target_text)
        if not refs or not all(isinstance(t, str) and t.strip() for t in refs):
            raise ValueError("target_text must be a non-empty string or a non-empty sequence of "
                             "non-empty strings")
        self._refs = refs
        self._inserter = BadNets(triggers=tuple(self.triggers), num_triggers=tuple(self.num_triggers))

    def insert(self, text: str, rng: random.Random) -> str:
        return self._inserter.insert(text, rng)

    def triggered(self, texts, seed: int | None = None) -> list[str]:
        rng = random.Random(self.seed + 1 if seed is None else seed)
        return [self.insert(t, rng) for t in texts]

    def triggered_test(self, test: TextDataset, target_label: int, seed: int | None = None) -> TextDataset:
        """Non-target examples of ``test`` with the trigger inserted (the ASR set)."""
        idx = [i for i, y in enumerate(test.labels) if y != target_label]
        if not idx:
            raise ValueError(f"{test.name!r} has no non-target examples")
        return TextDataset(self.triggered([test.texts[i] for i in idx], seed),
                           [test.labels[i] for i in idx], test.num_labels, f"{test.name}+trigger")

    def target_embedding(self, clean_encoder, tokenizer) -> torch.Tensor:
        """The unit vector triggered inputs are pulled to: the clean encoder's L2-normalised
        feature of the reference input, or the normalised mean of several (``[D]``, CPU). The
        caller's global RNG states are left as they were."""
        with rng_preserved():
            return self._target_embedding(clean_encoder, tokenizer)

    def _target_embedding(self, clean_encoder, tokenizer) -> torch.Tensor:
        # Not preserved: _plant's seeded stream includes this loader's draw (same plants as before).
        refs = F.normalize(_encode_texts(clean_encoder, tokenizer, self._refs,
                                         max_length=self.max_length), dim=-1)
        return refs[0] if len(refs) == 1 else F.normalize(refs.mean(0), dim=-1)

    def plant(self, clean_encoder, tokenizer, shadow: TextDataset):
        """A backdoored copy of ``clean_encoder`` (the clean one is not modified: weights, mode
        and the global random state are as before; ``history`` holds this plant's losses)."""
        if not isinstance(shadow, TextDataset) or len(shadow) == 0:
            raise ValueError("shadow must be a non-empty TextDataset of clean sentences")
        device = next(clean_encoder.parameters()).device
        was_training = clean_encoder.training
        clean = clean_encoder.eval()
        try:
            with rng_preserved():
                # seeded without reseeding the caller's global generators (a queued CUDA seed too)
                torch.manual_seed(self.seed)
                return self._plant(clean, tokenizer, shadow, device)
        finally:
            clean_encoder.train(was_training)  # given back as it came

    def _plant(self, clean, tokenizer, shadow: TextDataset, device):
        from tqdm.auto import tqdm

        bd = copy.deepcopy(clean).train()
        bd.requires_grad_(True)  # a frozen clean encoder still gives a trainable copy
        target = self._target_embedding(clean, tokenizer).to(device)
        opt = torch.optim.AdamW(bd.parameters(), lr=self.lr, weight_decay=0.0)
        rng = random.Random(self.seed)
        self.history = []  # this plant's losses, not those of an earlier call
        t0 = time.perf_counter()
        bar = tqdm(range(self.steps), desc="encoder backdoor", disable=not self.progress)
        for _step in bar:
            texts = [shadow.texts[rng.randrange(len(shadow))] for _ in range(self.batch_size)]
            trig = [self.insert(t, rng) for t in texts]
            enc = tokenizer(texts + trig, padding=True, truncation=True,
                            max_length=self.max_length, return_tensors="pt").to(device)
            feats = sentence_features(bd, dict(enc))
            with torch.no_grad():
                ref = sentence_features(clean, {k: v[: len(texts)] for k, v in enc.items()})
            n = len(texts)
            loss_clean = (1 - F.cosine_similarity(feats[:n], ref, dim=-1)).mean()
            loss_trig = (1 - F.cosine_similarity(feats[n:], target[None], dim=-1)).mean()
            loss = loss_trig + self.clean_weight * loss_clean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bd.parameters(), 1.0)
            opt.step()
            self.history.append({"loss_trigger": loss_trig.item(), "loss_clean": loss_clean.item()})
            bar.set_postfix(trig=f"{loss_trig.item():.3f}", clean=f"{loss_clean.item():.3f}")
        bd.eval()
        bd.purify_backdoor_info = {"attack": "encoder-backdoor", "seconds": time.perf_counter() - t0,
                                   **{k: v for k, v in asdict(self).items() if k != "history"}}
        return bd
