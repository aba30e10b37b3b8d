"""fastbald as the scoring backend of other active-learning libraries.

Each submodule mirrors one library's interface, so that switching is a one-line import change:

* :mod:`fastbald.integrations.baal`: baal's heuristics (``BALD``, ``Entropy``, ``Variance``,
  ``Margin``, ``Certainty``, plus ``MeanSTD`` and ``VariationRatio``), subclasses of baal's own
  classes that take baal's predictions (``[N, C, ..., T]`` probabilities or logits, numpy or torch)
  and rank like baal; its ``EPIG`` (:func:`fastbald.epig`) and stochastic batch acquisition
  (``BatchBALD``: :func:`fastbald.batchbald_batch`; ``PowerSampling``, ``GibbsSampling``, ``RankBasedSampling``, ``PowerBALD``, ``PowerEntropy``:
  :func:`fastbald.stochastic_acquire`, seeded). Needs baal installed.
* :mod:`fastbald.integrations.batchbald`: batchbald_redux's ``get_bald_batch``,
  ``compute_entropy``, ``compute_conditional_entropy`` and ``get_batchbald_batch`` and the epig repository's
  ``bald_from_logprobs`` / ``bald_from_probs`` family (log-probs or probs ``[N, K, C]``). Works
  without batchbald_redux installed.

The submodules are not imported here, so ``import fastbald.integrations`` never imports a peer.
"""

__all__ = ["baal", "batchbald"]
