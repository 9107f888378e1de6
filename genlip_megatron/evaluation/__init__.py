"""Evaluators of a GenLIP run (above training and probes in the layering; the trainer never
imports this package: ``run`` builds evaluators and hands them to the trainer as callables).

- :mod:`~genlip_megatron.evaluation.zeroshot`: generative zero-shot classification with the
  KV cache.
"""
