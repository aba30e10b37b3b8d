"""fastbald: fused Bayesian active-learning acquisition scores (BALD, Max Entropy, Variation
Ratios, Mean STD, margin, least confidence) for large image pools."""

from .acquire import METHODS, acquire
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

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "METRICS",
    "PoolScores",
    "acquire",
    "backends",
    "bald",
    "expected_entropy",
    "least_confidence",
    "margin",
    "mean_std",
    "predictive_entropy",
    "reference_scores",
    "scores",
    "variation_ratio",
]
