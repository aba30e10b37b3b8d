"""fastbald: fused Bayesian active-learning acquisition scores (BALD, Max Entropy, Variation
Ratios, Mean STD, margin, least confidence) for large image pools."""

from . import _ops
from .acquire import METHODS, acquire
from .batchbald import BatchResult, batchbald_batch
from .epig import epig
from .loop import ActiveLearningLoop, LoopProtocol
from .mc import MCDropout, mc_logits
from .pool import PoolResult, SyntheticPool, score_pool
from .reference import METRICS, reference_scores
from .scores import (
    PoolScores,
    backends,
    bald,
    expected_entropy,
    least_confidence,
    margin,
    mean_std,
    predictive_entropy,
    scores,
    variation_ratio,
)
from .stochastic import sampling_probabilities, stochastic_acquire

# Load the native ops now (a few ms): torch.ops.fastbald.* exist after ``import fastbald``, and
# torch.compile never meets the loader inside a traced function. A missing build is recorded
# (see backends()) and the pure-PyTorch backend is used.
_ops.load()

__version__ = "0.1.0"

__all__ = [
    "ActiveLearningLoop",
    "BatchResult",
    "LoopProtocol",
    "MCDropout",
    "METHODS",
    "METRICS",
    "PoolResult",
    "PoolScores",
    "SyntheticPool",
    "acquire",
    "backends",
    "batchbald_batch",
    "bald",
    "epig",
    "expected_entropy",
    "least_confidence",
    "margin",
    "mc_logits",
    "mean_std",
    "predictive_entropy",
    "reference_scores",
    "sampling_probabilities",
    "score_pool",
    "stochastic_acquire",
    "scores",
    "variation_ratio",
]
