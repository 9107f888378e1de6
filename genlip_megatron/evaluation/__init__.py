"""What a run produced: evaluations above training and probes in the layering.

The run entry (``genlip_megatron/run.py``) builds these and hands the trainer callables; the
trainer never imports this package.

- ``captions``: end-of-run greedy captions on held-out images (exact match) and the unigram
  baseline of the training labels;
- ``suite``: the evaluator interface and suite run on checkpoints in the loop and by
  ``tools/evaluate.py`` (``captioning``: caption loss / perplexity, exact match, CIDEr-D
  (``cider``); ``zeroshot``: generative zero-shot with the KV cache; ``demo_tasks``: the demo's
  labelled task; ``attentive_probe`` / ``segmentation_probe``: probes on frozen features cached
  by ``probe_features``; ``attention_sink``: sink mass per layer; ``gallery``: captions and
  patch readouts as images and an HTML page).
"""
