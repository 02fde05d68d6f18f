"""Attacks used to evaluate (and test) the defenses: BadNets rare-word triggers, AddSent, EP
embedding poisoning, and bias injection (group terms tied to a class)."""

from purify_fast.attacks.addsent import DEFAULT_SENTENCE, AddSent  # noqa: F401
from purify_fast.attacks.badnets import (  # noqa: F401
    DEFAULT_TRIGGERS,
    BadNets,
    PoisonedData,
    TriggerAttack,
)
from purify_fast.attacks.bias import (  # noqa: F401
    DEFAULT_COUNTER_TERMS,
    DEFAULT_GROUP_TERMS,
    BiasInjection,
)
from purify_fast.attacks.ep import EPResult, embedding_poison, trigger_token_ids  # noqa: F401

ATTACKS = ("badnets", "addsent", "ep", "bias")


def make_attack(name: str, **kwargs) -> TriggerAttack:
    """``badnets`` / ``ep`` → :class:`BadNets` (EP plants the same rare-word triggers in the
    embedding), ``addsent`` → :class:`AddSent`, ``bias`` → :class:`BiasInjection`. Unknown keyword
    arguments are errors."""
    if name in ("badnets", "ep"):
        return BadNets(**kwargs)
    if name == "addsent":
        return AddSent(**kwargs)
    if name == "bias":
        return BiasInjection(**kwargs)
    raise ValueError(f"attack must be one of {', '.join(ATTACKS)}; got {name!r}")
