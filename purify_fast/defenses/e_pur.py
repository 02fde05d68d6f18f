"""E-PUR, embedding purification (Zhang et al., Findings of EMNLP 2022).

For every vocabulary row ``i`` of the input word embedding::

    d_i = ‖E_ft[i] − E_pre[i]‖₂          (drift, computed by ops.embedding_drift_scores)
    f_i = count of token i in a clean corpus under the model's tokenizer
    s_i = d_i / log(max(f_i, c))          (c = 20)

Rows that drifted far more than their clean frequency explains (trigger words) score high; the
top ``top_n`` (or all with ``s_i >= score_threshold``) go back to ``E_pre``. Special tokens are
never ranked (they occur in every input and drift for ordinary reasons). E-PUR touches only the
embedding, so it composes with every other defense: run it first.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from purify_fast import ops
from purify_fast.data.text_dataset import TextDataset, token_frequencies
from purify_fast.defenses._common import check_model, embedding_name
from purify_fast.ops.weight_space import check_drift_c
from purify_fast.validation import int_at_least, real_in


@dataclass
class EPur:
    """E-PUR options.

    top_n: rows to reset (default 200); ignored when ``score_threshold`` is given.
    score_threshold: reset every row with ``s_i >= score_threshold`` instead of a fixed count.
    c: frequency floor inside the log (default 20; must be > 1).
    max_length: tokenisation cut-off when counting frequencies (None = whole texts).
    backend: kernel backend for ``ops.embedding_drift_scores``.
    """

    top_n: int = 200
    score_threshold: float | None = None
    c: float = 20.0
    max_length: int | None = None
    backend: str | None = None

    def __post_init__(self):
        # the checked values are kept: score_threshold="1" is stored (and reported) as 1.0
        if self.score_threshold is None:
            self.top_n = int_at_least("top_n", self.top_n, 0)
        else:
            self.score_threshold = real_in("score_threshold", self.score_threshold, 0.0)
        self.c = real_in("c", self.c, 1.0, lo_open=True)  # log(c) must be positive
        # the op's own fp32 test (1 + 1e-9 and 1e39 fail there), here before any model work
        check_drift_c(self.c)

    @staticmethod
    def check_corpus(corpus) -> None:
        if not isinstance(corpus, TextDataset) or len(corpus) == 0:
            raise ValueError("E-PUR needs a non-empty clean corpus (TextDataset) to count token "
                             "frequencies")

    def scores(self, suspect, pretrained_emb: torch.Tensor, tokenizer,
               corpus: TextDataset) -> torch.Tensor:
        """fp32 ``[V]`` E-PUR scores of ``suspect``'s embedding rows; special tokens get -inf."""
        emb = suspect.get_input_embeddings().weight.detach()
        freqs = token_frequencies(corpus, tokenizer, emb.shape[0], self.max_length).to(emb.device)
        s = ops.embedding_drift_scores(pretrained_emb.to(emb.dtype), emb, freqs, c=self.c,
                                       backend=self.backend)
        special = [i for i in (getattr(tokenizer, "all_special_ids", []) or []) if 0 <= i < len(s)]
        if special:
            s[torch.tensor(special, device=s.device)] = -torch.inf
        return s

    def apply(self, suspect, pretrained_state: dict, tokenizer, corpus: TextDataset):
        """A purified copy of ``suspect`` and the stage report (inputs are not modified)."""
        check_model(suspect, "suspect")
        self.check_corpus(corpus)
        t0 = time.perf_counter()
        name = embedding_name(suspect)
        pre = pretrained_state.get(name)
        emb = suspect.get_input_embeddings().weight
        if pre is None or tuple(pre.shape) != tuple(emb.shape):
            raise ValueError(f"the pre-trained weights have no embedding {name!r} of shape "
                             f"{tuple(emb.shape)} (got {None if pre is None else tuple(pre.shape)})")
        pre = pre.detach().to(device=emb.device, dtype=emb.dtype)
        s = self.scores(suspect, pre, tokenizer, corpus)
        rankable = torch.isfinite(s)
        if self.score_threshold is not None:
            rows = torch.nonzero(rankable & (s >= float(self.score_threshold))).flatten()
            rows = rows[torch.sort(s[rows], descending=True, stable=True).indices]
        else:
            # Ties at the n-th score break by row index, as purify-checkpoint's E-PUR does
            # (topk would pick an arbitrary subset of tied rows).
            k = min(self.top_n, int(rankable.sum()))
            order = torch.sort(torch.where(rankable, s, -torch.inf), descending=True, stable=True)
            rows = order.indices[:k]
        model = copy.deepcopy(suspect)
        with torch.no_grad():
            model.get_input_embeddings().weight[rows] = pre[rows]
        model.eval()
        shown = rows[:20].tolist()
        report = {
            "embedding": name,
            "rows_reset": int(rows.numel()),
            "top_tokens": [{"id": i, "token": tokenizer.convert_ids_to_tokens(i),
                            "score": float(s[i])} for i in shown],
            "reset_ids": rows.tolist(),
            "corpus": {"name": corpus.name, "texts": len(corpus)},  # where f came from
            "options": {"top_n": self.top_n, "score_threshold": self.score_threshold,
                        "c": self.c, "max_length": self.max_length},
            "seconds": time.perf_counter() - t0,
        }
        return model, report
