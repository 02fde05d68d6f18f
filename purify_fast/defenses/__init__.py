"""Backdoor defenses for pre-trained models. Each calls :mod:`purify_fast.ops` for the heavy
weight-space work; :func:`purify` is the one-call entry point."""

from purify_fast.defenses._common import FinetuneOptions  # noqa: F401
from purify_fast.defenses.api import METHODS, purify  # noqa: F401
from purify_fast.defenses.e_pur import EPur  # noqa: F401
from purify_fast.defenses.fine_mixing import FineMixing  # noqa: F401
from purify_fast.defenses.fine_purifying import FinePurifying, diagonal_fisher  # noqa: F401
from purify_fast.defenses.mimic import MIMIC, MIMICConfig, linear_probe  # noqa: F401
