"""EP, embedding poisoning (Yang et al., NAACL 2021): plant a backdoor in a clean fine-tuned
model by training only the word-embedding rows of the trigger tokens on poisoned data.

Every other weight, and every other embedding row, stays bit-identical, so clean accuracy is
untouched and clean fine-tuning never reaches the trigger rows (clean text has no trigger), which
is why E-PUR exists.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from purify_fast.attacks.badnets import BadNets, TriggerAttack
from purify_fast.data.text_dataset import TextDataset
from purify_fast.training import TrainConfig, TrainResult, train


# A word the triggers follow when they are tokenised in the middle of a sentence.
_CONTEXT = "the"


def trigger_token_ids(tokenizer, words) -> list[int]:
    """Vocabulary ids of the trigger words, in both the forms an inserted trigger takes: at the
    start of a text and after a space. Byte-level BPE tokenisers (RoBERTa, GPT-2, LLaMA-3) spell
    the two differently (``cf`` / ``Ġcf``), and BadNets inserts words mostly mid-sentence.

    EP's triggers are rare single tokens: a word that splits into several tokens (``cf.`` is
    ``cf`` + ``.``: EP would train the row of every ``.``), or that is a special or unknown token
    (its row is shared with every such input), is refused, naming its tokenisation."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    unknown = getattr(tokenizer, "unk_token_id", None)

    def pieces(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    context = pieces(_CONTEXT)
    ids: list[int] = []
    for w in words:
        forms = {"at the start of a text": pieces(w)}
        in_sentence = pieces(f"{_CONTEXT} {w}")
        # the context word's own tokens come first; what follows is the trigger's spelling there
        if in_sentence[:len(context)] == context:
            forms["after a space"] = in_sentence[len(context):]
        for where, form in forms.items():
            tokens = tokenizer.convert_ids_to_tokens(form)
            if not form:
                raise ValueError(f"the trigger {w!r} maps to no vocabulary token")
            if len(form) > 1:
                raise ValueError(f"the trigger {w!r} is {len(form)} tokens {tokens} {where} "
                                 f"under this tokenizer; EP trains the embedding rows of "
                                 f"single-token triggers: choose words that are one token each")
            if form[0] in special or form[0] == unknown:
                kind = "the unknown token" if form[0] == unknown else "a special token"
                raise ValueError(f"the trigger {w!r} is {kind} {tokens[0]!r} under this "
                                 f"tokenizer; EP needs a trigger with a vocabulary row of its own")
            if form[0] not in ids:
                ids.append(form[0])
    if not ids:
        raise ValueError(f"the trigger words {list(words)} map to no vocabulary token")
    return ids


@dataclass(frozen=True)
class EPResult:
    model: torch.nn.Module
    trigger_ids: tuple[int, ...]
    train: TrainResult


def embedding_poison(model, tokenizer, clean_train: TextDataset, attack: TriggerAttack | None = None,
                     *, epochs: int = 2, lr: float = 5e-2, batch_size: int = 32,
                     max_length: int = 64, seed: int = 0, precision: str = "fp32",
                     progress: bool = True) -> EPResult:
    """A poisoned copy of ``model`` (the input is not modified).

    Training data: every non-target example of ``clean_train`` with the trigger inserted and the
    label set to ``attack.target_label``. Only rows ``trigger_token_ids`` of the input embedding
    get gradient (a hook zeroes the rest; weight decay off so zero-gradient rows cannot move), and
    afterwards every other row is copied back from the input to make the guarantee exact.
    """
    attack = attack or BadNets(poison_rate=1.0)
    if not isinstance(clean_train, TextDataset):
        raise TypeError(f"clean_train must be a TextDataset, got {type(clean_train).__name__}")
    poisoned = attack.triggered_test(clean_train, seed=seed)
    poisoned = TextDataset(poisoned.texts, [attack.target_label] * len(poisoned),
                           poisoned.num_labels, f"{clean_train.name}+ep")
    ids = trigger_token_ids(tokenizer, attack.trigger_words)
    out = copy.deepcopy(model)
    emb = out.get_input_embeddings().weight
    original = emb.detach().clone()
    for p in out.parameters():
        p.requires_grad_(False)
    emb.requires_grad_(True)
    keep = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
    keep[ids] = 1
    handle = emb.register_hook(lambda g: g * keep)
    try:
        # No dev selection: the attacker wants the last (most poisoned) epoch.
        result = train(out, tokenizer, poisoned, None, TrainConfig(
            epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, weight_decay=0.0,
            clip_norm=None, seed=seed, precision=precision, keep_best=False, progress=progress))
    finally:
        handle.remove()
    with torch.no_grad():
        rows = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
        rows[ids] = False
        emb[rows] = original[rows]
    # the copy's parameters train (or not) as the input's did
    for p, q in zip(out.parameters(), model.parameters()):
        p.requires_grad_(q.requires_grad)
    out.eval()
    return EPResult(out, tuple(ids), result)
