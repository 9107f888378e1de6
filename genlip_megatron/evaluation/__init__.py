"""What a run produced: evaluations above training and probes in the layering.

``captions``: end-of-run greedy captions on held-out images (exact match) and the unigram
baseline of the training labels. The run entry (``genlip_megatron/run.py``) calls these; the
trainer never imports this package.
"""
