"""Fidelity metrics on logits: next-token negative log-likelihood (perplexity), KL divergence of a variant's
next-token distribution from the baseline's, and top-1 agreement. All computed in float64 from the logits
each model produced; the same functions serve the baseline and every variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log p(ids[t+1] | ids[..t]) for every position t of ``logits [B, T, V]`` and ``ids [B, T]``: ``[B, T-1]``."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def kl_per_token(base_logits: torch.Tensor, var_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_variant) in nats at every position (``[..., V]`` logits -> ``[...]``); 0 for equal logits."""
    lb = torch.log_softmax(base_logits.double(), dim=-1)
    lv = torch.log_softmax(var_logits.double(), dim=-1)
    return (lb.exp() * (lb - lv)).sum(-1).clamp_min(0.0)


def top1_agree(base_logits: torch.Tensor, var_logits: torch.Tensor) -> torch.Tensor:
    """Boolean per position: the two models' most likely next tokens are the same."""
    return base_logits.argmax(-1) == var_logits.argmax(-1)


@dataclass(frozen=True)
class Summary:
    """Distribution summary of per-token values."""

    mean: float
    median: float
    p99: float
    max: float
    count: int

    @classmethod
    def of(cls, values: np.ndarray) -> Summary:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size == 0:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        return cls(float(v.mean()), float(np.median(v)), float(np.quantile(v, 0.99)), float(v.max()), int(v.size))


def perplexity(nll: np.ndarray) -> float:
    """exp(mean NLL) over all scored tokens."""
    nll = np.asarray(nll, dtype=np.float64)
    return float(math.exp(nll.mean())) if nll.size else math.nan
