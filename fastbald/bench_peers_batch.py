"""The peers of ``fastbald bench batch``, for side-by-side timing (not part of fastbald's API).

``epig_repo_*``: the EPIG of the epig repository (github.com/fbickfordsmith/epig, not on PyPI),
reproduced operation for operation from its ``src/uncertainty/epig_logprobs.py``
(``epig_from_logprobs_using_matmul``, commit 73d0af36b79e11a948f569a858862de2998f972b),
``src/uncertainty/epig_probs.py`` (``epig_from_probs_using_matmul``,
``expected_joint_entropy_from_probs``, commit 9039a800fcb22cb5f06c20d8c1628f2b98fdf60f) and
``src/uncertainty/bald_probs.py`` (``entropy_from_probs``, ``marginal_entropy_from_probs``, commit
ad9ec5a85da32e284779fae09ee73681b5c0d86d); its ``check`` (``src/uncertainty/utils.py``) only
logs a warning for out-of-range scores and is kept. The repository's trainers call it on each pool
minibatch of their DataLoader (``estimate_epig_minibatch``); ``epig_repo_minibatched`` does the same.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor


def _check(scores: Tensor, max_value: float = math.inf, epsilon: float = 1e-6, score_type: str = "") -> Tensor:
    # src/uncertainty/utils.py: warn if any score is negative, NaN or above max_value.
    if not torch.all((scores + epsilon >= 0) & (scores - epsilon <= max_value)):
        logging.getLogger("epig").debug(
            f"Invalid {score_type} score (min = {torch.min(scores).item()}, max = {torch.max(scores).item()})"
        )
    return scores


def _entropy_from_probs(probs: Tensor) -> Tensor:
    logprobs = torch.zeros_like(probs)
    logprobs[probs > 0] = torch.log(probs[probs > 0])
    return -torch.sum(probs * logprobs, dim=-1)


def _marginal_entropy_from_probs(probs: Tensor) -> Tensor:
    assert probs.ndim == 3
    probs = torch.mean(probs, dim=1)  # [N, Cl]
    scores = _entropy_from_probs(probs)  # [N,]
    return _check(scores, max_value=math.log(probs.shape[-1]), score_type="ME")


def _expected_joint_entropy_from_probs(probs_pool: Tensor, probs_targ: Tensor) -> Tensor:
    assert probs_pool.ndim == probs_targ.ndim == 3
    N_t, K, Cl = probs_targ.shape
    probs_pool = probs_pool.permute(0, 2, 1)  # [N_p, Cl, K]
    probs_targ = probs_targ.permute(1, 0, 2)  # [K, N_t, Cl]
    probs_targ = probs_targ.reshape(K, N_t * Cl)  # [K, N_t * Cl]
    probs_joint = probs_pool @ probs_targ / K  # [N_p, Cl, N_t * Cl]
    scores = -torch.sum(torch.xlogy(probs_joint, probs_joint), dim=(-2, -1)) / N_t  # [N_p,]
    return _check(scores, max_value=math.log(Cl**2), score_type="JE")


def _epig_from_probs_using_matmul(probs_pool: Tensor, probs_targ: Tensor) -> Tensor:
    _, _, Cl = probs_targ.shape
    entropy_pool = _marginal_entropy_from_probs(probs_pool)  # [N_p,]
    entropy_targ = _marginal_entropy_from_probs(probs_targ)  # [N_t,]
    entropy_joint = _expected_joint_entropy_from_probs(probs_pool, probs_targ)  # [N_p,]
    scores = entropy_pool + torch.mean(entropy_targ) - entropy_joint  # [N_p,]
    return _check(scores, max_value=math.log(Cl**2), score_type="EPIG")


def epig_repo_from_logprobs_using_matmul(logprobs_pool: Tensor, logprobs_targ: Tensor) -> Tensor:
    """The epig repository's ``epig_from_logprobs_using_matmul`` (whole pool in one call)."""
    probs_pool = torch.exp(logprobs_pool)  # [N_p, K, Cl]
    probs_targ = torch.exp(logprobs_targ)  # [N_t, K, Cl]
    return _epig_from_probs_using_matmul(probs_pool, probs_targ)


def epig_repo_minibatched(logprobs_pool: Tensor, logprobs_targ: Tensor, batch_size: int = 1000) -> Tensor:
    """The same per pool minibatch, concatenated, as the repository's trainers do."""
    return torch.cat(
        [
            epig_repo_from_logprobs_using_matmul(logprobs_pool[i : i + batch_size], logprobs_targ)
            for i in range(0, logprobs_pool.shape[0], batch_size)
        ]
    )
