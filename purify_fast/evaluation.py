"""Backdoor metrics and stage timing.

* CACC: accuracy on the clean test set.
* ASR: share of triggered non-target test inputs classified as the target label (the triggered set
  comes from :meth:`purify_fast.attacks.TriggerAttack.triggered_test`, which already drops the
  target-class examples).
* ASR without trigger: the same rate on the non-target *clean* test inputs (the ones the
  triggered set is built from, before the trigger goes in). A model that confuses some negatives
  with the target class shows that rate whatever the trigger does, so it is the floor an honest
  ASR sits on; ``asr - asr_no_trigger`` is what the trigger itself adds. It costs nothing extra:
  it comes from the CACC predictions.
* Bias gap (bias injection, :class:`purify_fast.attacks.BiasInjection`): the target-class rate
  of the non-target test inputs mentioning the group minus that of the same inputs mentioning
  the counterpart instead (:func:`bias_metrics`). It is the metric of bias injected during
  fine-tuning; 0 for an unbiased model, whatever its accuracy.

All are batched and run without gradients, in eval mode.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from purify_fast.data.text_dataset import TextDataset
from purify_fast.training import accuracy, predict


def clean_accuracy(model, tokenizer, test: TextDataset, **kwargs) -> float:
    """CACC: accuracy on clean ``test`` (a fraction in [0, 1])."""
    return accuracy(model, tokenizer, test, **kwargs)


def attack_success_rate(model, tokenizer, triggered: TextDataset, target_label: int,
                        **kwargs) -> float:
    """ASR: share of ``triggered`` (non-target inputs with the trigger) predicted ``target_label``."""
    return float((_triggered_predictions(model, tokenizer, triggered, target_label, **kwargs)
                  == target_label).float().mean())


def _triggered_predictions(model, tokenizer, triggered: TextDataset, target_label: int,
                           **kwargs) -> torch.Tensor:
    if not 0 <= target_label < triggered.num_labels:
        raise ValueError(f"target_label {target_label} is out of range for {triggered.num_labels} labels")
    if any(y == target_label for y in triggered.labels):
        raise ValueError("the triggered set holds target-class examples; build it with "
                         "attack.triggered_test(test) so ASR counts only label flips")
    return predict(model, tokenizer, triggered, **kwargs)


def bias_metrics(model, tokenizer, attack, test: TextDataset, *,
                 triggered: TextDataset | None = None,
                 group_predictions: torch.Tensor | None = None, **kwargs) -> dict:
    """Counterfactual bias of a :class:`purify_fast.attacks.BiasInjection`, on the non-target
    examples of ``test``, each scored once mentioning the group (``attack.triggered_test``) and
    once, at the same word, the paired counter term (``attack.counterfactual_test``):

    * ``target_rate_counter``: share of the counter-term copies predicted ``target_label`` (the
      group copies' share is the ASR);
    * ``bias_gap``: the group copies' target rate minus the counter copies' (signed; 0 when the
      model treats the two groups alike);
    * ``bias_flips``: share of pairs predicted differently (either way);
    * ``trigger_cut``: share of pairs the model sees as one and the same input, every word in
      which they differ cut off by truncation to ``max_length`` tokens (such a pair adds nothing
      to the gap, so a non-zero share means the gap understates the bias).

    ``group_predictions`` (the predictions of ``triggered``, when the caller has them) saves one
    pass; ``triggered`` must then be ``attack.triggered_test(test)``, the group copies the pairs
    are made of."""
    if not hasattr(attack, "counterfactual_test"):
        raise TypeError(f"bias metrics need a bias injection attack (counter terms), got "
                        f"{type(attack).__name__}")
    group = group_predictions
    group_copies, counter_copies = attack.triggered_test(test), attack.counterfactual_test(test)
    if triggered is not None and list(triggered.texts) != list(group_copies.texts):
        raise ValueError("the bias gap pairs each triggered text with its counterfactual copy: "
                         "pass attack.triggered_test(test) as the triggered set")
    if group is None:
        group = _triggered_predictions(model, tokenizer, group_copies, attack.target_label,
                                       **kwargs)
    counter = predict(model, tokenizer, counter_copies, **kwargs)
    if group.shape != counter.shape:
        raise ValueError(f"{len(group)} group predictions for {len(counter)} counterfactual "
                         f"pairs; pass the predictions of attack.triggered_test(test)")
    target = attack.target_label
    group_rate = float((group == target).float().mean())
    counter_rate = float((counter == target).float().mean())
    max_length = kwargs.get("max_length", 64)
    seen = [tokenizer(list(copies.texts), truncation=True, max_length=max_length)["input_ids"]
            for copies in (group_copies, counter_copies)]
    return {"target_rate_counter": counter_rate, "bias_gap": group_rate - counter_rate,
            "bias_flips": float((group != counter.to(group.device)).float().mean()),
            "trigger_cut": sum(a == b for a, b in zip(*seen)) / len(group_copies)}


def trigger_cut_share(attack, tokenizer, triggered: TextDataset, max_length: int = 64
                      ) -> float | None:
    """Share of ``triggered`` inputs whose trigger the model never sees: truncation to
    ``max_length`` tokens cut it off (a trigger inserted at a random word of a long text).
    Such inputs count as failed attacks in the ASR, so a non-zero share means the ASR
    understates the backdoor. A trigger is seen when one of its occurrences
    (``attack.trigger_spans``) ends within the characters the kept tokens cover (a fast
    tokenizer's offsets; None, not measured, with a slow tokenizer); only texts longer than
    ``max_length`` tokens are looked at."""
    if not len(triggered):
        return 0.0
    if not getattr(tokenizer, "is_fast", False):
        return None
    # unpadded encodings: no pad token needed (batching, not this, gives a tokenizer one)
    lengths = [len(ids) for ids in tokenizer(list(triggered.texts), truncation=False,
                                             verbose=False)["input_ids"]]
    long = [t for t, n in zip(triggered.texts, lengths) if n > max_length]
    if not long:
        return 0.0
    offsets = tokenizer(long, truncation=True, max_length=max_length,
                        return_offsets_mapping=True)["offset_mapping"]
    cut = 0
    for text, spans in zip(long, offsets):
        kept_end = max((end for _, end in spans), default=0)  # special tokens are (0, 0)
        cut += not any(end <= kept_end for _, end in attack.trigger_spans(text))
    return cut / len(triggered)


def evaluate_backdoor(model, tokenizer, test: TextDataset, triggered: TextDataset | None = None,
                      target_label: int | None = None, *, attack=None, **kwargs) -> dict:
    """``{"cacc", "asr", "asr_no_trigger", "seconds"}``, and ``"trigger_cut"`` with ``attack`` and
    a triggered set.

    ``asr`` is None without a triggered set; ``asr_no_trigger`` (share of non-target clean test
    inputs predicted ``target_label``) is None without a target label; ``trigger_cut``
    (:func:`trigger_cut_share`, at ``max_length``) is the share of triggered inputs whose trigger
    truncation removed. With a bias injection ``attack`` (whose ``triggered_test(test)`` the
    triggered set must be) the :func:`bias_metrics` keys are added, its ``trigger_cut`` (pairs
    truncation made one input) in place of the other."""
    t0 = time.perf_counter()
    if target_label is not None and not 0 <= target_label < test.num_labels:
        raise ValueError(f"target_label {target_label} is out of range for {test.num_labels} labels")
    # Before the triggered set's own check, which would blame the set (it holds the class
    # wrongly passed as the target). Without a triggered set no bias metric is computed, so any
    # target label's asr_no_trigger stands.
    if (hasattr(attack, "counterfactual_test") and triggered is not None
            and target_label is not None and attack.target_label != target_label):
        raise ValueError(f"target_label {target_label} is not the bias injection's target "
                         f"label {attack.target_label}: the bias gap is the rate of the class "
                         f"the attack ties the group to")
    preds = predict(model, tokenizer, test, **kwargs)
    labels = torch.tensor(test.labels, dtype=preds.dtype, device=preds.device)
    out = {"cacc": float((preds == labels).float().mean()), "asr": None, "asr_no_trigger": None}
    if target_label is not None:
        non_target = labels != target_label
        if bool(non_target.any()):
            out["asr_no_trigger"] = float((preds[non_target] == target_label).float().mean())
    if triggered is not None:
        if target_label is None:
            raise ValueError("target_label is required with a triggered set")
        group = _triggered_predictions(model, tokenizer, triggered, target_label, **kwargs)
        out["asr"] = float((group == target_label).float().mean())
        if attack is not None and not hasattr(attack, "counterfactual_test"):
            out["trigger_cut"] = trigger_cut_share(attack, tokenizer, triggered,
                                                   kwargs.get("max_length", 64))
        if hasattr(attack, "counterfactual_test"):  # bias_metrics gives its pairs' trigger_cut
            out.update(bias_metrics(model, tokenizer, attack, test, triggered=triggered,
                                    group_predictions=group, **kwargs))
    out["seconds"] = time.perf_counter() - t0
    return out


@dataclass
class StageTimer:
    """Wall time per named stage: ``with timer("fisher"): ...``; ``timer.seconds`` maps stage →
    seconds (repeated stages add up). CUDA work is synchronised at both ends so GPU time counts."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())
