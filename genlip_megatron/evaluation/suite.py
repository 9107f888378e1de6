"""One interface for the encoder/caption evaluators, in the loop and standalone.

An :class:`Evaluator` is a callable ``evaluator(model) -> {metric key: value}`` on the HF-format
GenLIP module (the one inference implementation, ``probes.load_genlip_for_inference``). The
suite is built once from the run config (held-out samples read and decoded once), then:

- in the loop: ``run`` hands :meth:`EvaluatorSuite.on_checkpoint` to the trainer, which calls it
  with every checkpoint it saves (the trainer never imports this package); the suite loads that
  checkpoint on the logging rank and logs the metrics at that step;
- standalone: ``tools/evaluate.py CKPT_OR_HF_DIR --config run.yaml`` runs the same suite on a
  Megatron checkpoint or its HF export and prints the same keys on one ``EVAL`` line.

Both paths load the model with the same loader and run the same code on the same samples, so
the in-loop and standalone numbers are identical.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.config.data import DataConfig
from genlip_megatron.data.inference import EvalSample, iter_eval_samples
from genlip_megatron.data.tokenizer import TextTokenizer
from genlip_megatron.evaluation.captioning import caption_metrics, shared_prompt
from genlip_megatron.evaluation.demo_tasks import demo_zero_shot_task
from genlip_megatron.evaluation.zeroshot import ZeroShotTask, zero_shot_accuracy

logger = logging.getLogger(__name__)

__all__ = ["Evaluator", "CaptionEvaluator", "ZeroShotEvaluator", "EvaluatorSuite",
           "CheckpointSuiteHook", "build_suite", "eval_line"]


class Evaluator(Protocol):
    """``evaluator(model) -> metrics``; keys are ``/``-namespaced (``caption/cider``)."""

    name: str

    def __call__(self, model: GenLIPModel) -> dict[str, float]: ...


@dataclass
class CaptionEvaluator:
    """Caption loss/perplexity, greedy exact match and CIDEr-D (``captioning.py``)."""

    samples: list[EvalSample]
    tokenizer: TextTokenizer
    max_new_tokens: int = 48
    batch_size: int = 16
    name: str = "caption"
    last_captions: list[str] = field(default_factory=list)

    def __call__(self, model: GenLIPModel) -> dict[str, float]:
        metrics, self.last_captions = caption_metrics(
            model, self.samples, self.tokenizer, max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size)
        return metrics


@dataclass
class ZeroShotEvaluator:
    """Generative zero-shot top-1 accuracy (``zeroshot.py``) on labelled held-out images."""

    samples: list[EvalSample]
    labels: list[int]
    task: ZeroShotTask
    batch_size: int = 16
    name: str = "zeroshot"

    def __call__(self, model: GenLIPModel) -> dict[str, float]:
        acc, _ = zero_shot_accuracy(model, [(s.patches, s.grid) for s in self.samples],
                                    self.labels, shared_prompt(self.samples), self.task,
                                    image_batch=self.batch_size)
        return {"zeroshot/accuracy": acc, "zeroshot/chance": 1.0 / self.task.num_classes,
                "zeroshot/images": float(len(self.samples))}


@dataclass
class EvaluatorSuite:
    """The evaluators of a run; call with a model, or with a checkpoint path."""

    evaluators: list[Evaluator]

    def __call__(self, model: GenLIPModel) -> dict[str, float]:
        out: dict[str, float] = {}
        for ev in self.evaluators:
            out.update(ev(model))
        return dict(sorted(out.items()))

    def on_checkpoint(self, checkpoint: str) -> dict[str, float]:
        """Load ``checkpoint`` as the HF module (CPU, fp32) and evaluate it."""
        from genlip_megatron.probes.loading import load_genlip_for_inference

        model, _ = load_genlip_for_inference(checkpoint)
        return self(model)


def build_suite(data: DataConfig, tokenizer: TextTokenizer, *, max_samples: int = 200,
                max_new_tokens: int = 48, batch_size: int = 16,
                demo_tasks: bool = False) -> EvaluatorSuite:
    """Read ``data.eval_sources`` once (≤ ``max_samples``) and build the evaluators.

    ``demo_tasks``: add the demo's zero-shot task (labels known from the synthetic captions).
    """
    samples = list(iter_eval_samples(data, tokenizer, limit=max_samples))
    if not samples:
        raise ValueError("data.eval_sources yielded no usable held-out sample.")
    evaluators: list[Evaluator] = [CaptionEvaluator(samples, tokenizer, max_new_tokens,
                                                    batch_size)]
    if demo_tasks:
        picked, labels, task = demo_zero_shot_task(samples, tokenizer)
        if picked:
            evaluators.append(ZeroShotEvaluator(picked, labels, task, batch_size))
        else:
            logger.warning("no single-shape held-out image: the demo zero-shot task is off.")
    return EvaluatorSuite(evaluators)


def eval_line(metrics: dict[str, float], tag: str = "EVAL",
              extra: Optional[Sequence[str]] = None) -> str:
    """``EVAL key=value ...`` (sorted keys, 4 decimals; ``nan`` for missing values)."""
    parts = [f"{k}={v:.4f}" if math.isfinite(v) else f"{k}=nan" for k, v in
             sorted(metrics.items())]
    return " ".join([tag, *parts, *(extra or [])])


class CheckpointSuiteHook:
    """The trainer's checkpoint evaluator: ``hook(step, path)`` evaluates the checkpoint at the
    configured steps (``evaluation.suite_interval`` multiples and ``final_step``), {} otherwise.

    The suite (held-out samples decoded once) is built on the first call, on the logging rank
    only: the other ranks never call the hook.
    """

    def __init__(self, data: DataConfig, tokenizer_path: str, *, final_step: int,
                 interval: int = 0, max_samples: int = 200, max_new_tokens: int = 48,
                 batch_size: int = 16, demo_tasks: bool = False):
        self.data, self.tokenizer_path = data, tokenizer_path
        self.final_step, self.interval = final_step, interval
        self.options = dict(max_samples=max_samples, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, demo_tasks=demo_tasks)
        self._suite: Optional[EvaluatorSuite] = None

    @property
    def suite(self) -> EvaluatorSuite:
        if self._suite is None:
            from genlip_megatron.data.tokenizer import load_tokenizer

            self._suite = build_suite(self.data, load_tokenizer(self.tokenizer_path),
                                      **self.options)
        return self._suite

    def due(self, step: int) -> bool:
        return step == self.final_step or bool(self.interval and step % self.interval == 0)

    def __call__(self, step: int, path: str) -> dict[str, float]:
        return self.suite.on_checkpoint(path) if self.due(step) else {}
