"""One interface for the encoder/caption evaluators, in the loop and standalone.

An :class:`Evaluator` is a callable ``evaluator(model) -> {metric key: value}`` on the HF-format
GenLIP module (the one inference implementation, ``probes.load_genlip_for_inference``). The
suite is built once from the run config (held-out samples read and decoded once), then:

- in the loop: ``run`` hands :class:`CheckpointSuiteHook` to the trainer, which calls it with
  every checkpoint it saves (the trainer never imports this package), on every rank of the
  logging rank's data-parallel group: each of them loads the checkpoint, evaluates its share
  of the items and the partial results are reduced (``data_parallel.py``: identical to one
  process); the logging rank logs the metrics at that step;
- standalone: ``tools/evaluate.py CKPT_OR_HF_DIR --config run.yaml`` runs the same suite on a
  Megatron checkpoint or its HF export and prints the same keys on one ``EVAL`` line.

Both paths load the model with the same loader and run the same code on the same samples, so
the in-loop and standalone numbers are identical.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from genlip_megatron.convert.hf.modeling_genlip import GenLIPModel
from genlip_megatron.config.data import DataConfig
from genlip_megatron.data.inference import EvalSample, iter_eval_samples
from genlip_megatron.data.tokenizer import TextTokenizer
from genlip_megatron.evaluation.attention_sink import AttentionSinkEvaluator
from genlip_megatron.evaluation.attentive_probe import AttentiveProbeEvaluator
from genlip_megatron.evaluation.captioning import caption_block, caption_scores, shared_prompt
from genlip_megatron.evaluation.data_parallel import BatchedEvaluator, evaluate_spread, \
    ordered_blocks
from genlip_megatron.evaluation.demo_tasks import demo_zero_shot_task
from genlip_megatron.evaluation.gallery import GalleryEvaluator, write_gallery
from genlip_megatron.evaluation.probe_features import ProbeFeatures
from genlip_megatron.evaluation.segmentation_probe import SegmentationProbeEvaluator
from genlip_megatron.evaluation.zeroshot import ZeroShotTask, classify, score_candidates

logger = logging.getLogger(__name__)

__all__ = ["Evaluator", "SplitEvaluator", "CaptionEvaluator", "ZeroShotEvaluator", "EvaluatorSuite",
           "CheckpointSuiteHook", "build_suite", "probe_evaluators", "eval_line"]


class Evaluator(Protocol):
    """``evaluator(model) -> metrics``; keys are ``/``-namespaced (``caption/cider``).

    Such an evaluator runs whole on one rank (``data_parallel.evaluate_spread``); implement
    :class:`SplitEvaluator` to spread its items over the data-parallel ranks.
    """

    name: str

    def __call__(self, model: GenLIPModel) -> dict[str, float]: ...


class SplitEvaluator(Evaluator, Protocol):
    """An evaluator whose items can be split over ranks (``evaluation/data_parallel.py``).

    ``partial(model, indices)`` returns ``{"blocks": [(first_index, ...), ...]}``, one entry
    per batch of ``batch_size`` consecutive items (the indices given are whole batches);
    ``reduce(states)`` turns every rank's state into the metrics, with the blocks in item
    order (``data_parallel.ordered_blocks``). ``__call__`` is ``reduce([partial(all)])``.
    """

    num_items: int
    batch_size: int

    def partial(self, model: GenLIPModel, indices: Sequence[int]) -> dict: ...

    def reduce(self, states: Sequence[dict]) -> dict[str, float]: ...


@dataclass
class CaptionEvaluator(BatchedEvaluator):
    """Caption loss/perplexity, greedy exact match and CIDEr-D (``captioning.py``).

    State per batch: (first index, Σ NLL, tokens, captions); the reduction sums the NLL and
    tokens in batch order and scores the captions of the whole set (CIDEr-D is corpus-level).
    """

    samples: list[EvalSample]
    tokenizer: TextTokenizer
    max_new_tokens: int = 48
    batch_size: int = 16
    name: str = "caption"
    last_captions: list[str] = field(default_factory=list)

    def context(self) -> list[int]:
        return shared_prompt(self.samples)

    def block(self, model: GenLIPModel, batch: list[int], prompt: list[int]) -> tuple:
        return caption_block(model, [self.samples[i] for i in batch], self.tokenizer, prompt,
                             self.max_new_tokens)

    def reduce(self, states: Sequence[dict]) -> dict[str, float]:
        nll, tokens, captions = 0.0, 0, []
        for _, block_nll, block_tokens, caps in ordered_blocks(states):
            nll, tokens, captions = nll + block_nll, tokens + block_tokens, captions + caps
        self.last_captions = captions
        return caption_scores(nll, tokens, captions, [s.caption for s in self.samples])


@dataclass
class ZeroShotEvaluator(BatchedEvaluator):
    """Generative zero-shot top-1 accuracy (``zeroshot.py``) on labelled held-out images.

    State per batch: (first index, predicted classes); accuracy is counted over the whole set.
    """

    samples: list[EvalSample]
    labels: list[int]
    task: ZeroShotTask
    batch_size: int = 16
    name: str = "zeroshot"

    def context(self) -> list[int]:
        return shared_prompt(self.samples)

    def block(self, model: GenLIPModel, batch: list[int], prompt: list[int]) -> tuple:
        images = [(self.samples[i].patches, self.samples[i].grid) for i in batch]
        scores = score_candidates(model, images, prompt, self.task.candidates,
                                  image_batch=self.batch_size)
        return (classify(scores, self.task).cpu().tolist(),)

    def reduce(self, states: Sequence[dict]) -> dict[str, float]:
        pred = [p for _, preds in ordered_blocks(states) for p in preds]
        if len(pred) != len(self.labels):
            raise ValueError(f"zero-shot states cover {len(pred)} of {len(self.labels)} images.")
        correct = sum(int(p == y) for p, y in zip(pred, self.labels))
        return {"zeroshot/accuracy": correct / len(self.labels),
                "zeroshot/chance": 1.0 / self.task.num_classes,
                "zeroshot/images": float(len(self.samples))}


@dataclass
class EvaluatorSuite:
    """The evaluators of a run; call with a model, or with a checkpoint path.

    With a process ``group`` (the trainer passes the data-parallel group) the call is
    collective: every evaluator's items are split over the group's ranks, the partial results
    reduced, and every rank gets the same metrics, identical to a single process's
    (``evaluation/data_parallel.py``).
    """

    evaluators: list[Evaluator]

    def __call__(self, model: GenLIPModel, group: Optional[Any] = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for ev in self.evaluators:
            out.update(evaluate_spread(ev, model, group))
        return dict(sorted(out.items()))

    @property
    def gallery(self) -> Optional[GalleryEvaluator]:
        """The gallery evaluator (its ``images`` / ``html`` of the last call), if any."""
        return next((e for e in self.evaluators if isinstance(e, GalleryEvaluator)), None)

    def on_checkpoint(self, checkpoint: str, group: Optional[Any] = None) -> dict[str, float]:
        """Load ``checkpoint`` as the HF module (CPU, fp32) and evaluate it."""
        from genlip_megatron.probes.loading import load_genlip_for_inference

        model, _ = load_genlip_for_inference(checkpoint)
        return self(model, group)


def build_suite(data: DataConfig, tokenizer: TextTokenizer, *, max_samples: int = 200,
                max_new_tokens: int = 48, batch_size: int = 16, demo_tasks: bool = False,
                probe_train_samples: int = 0, sink_samples: int = 0,
                gallery_images: int = 0) -> EvaluatorSuite:
    """Read ``data.eval_sources`` once (≤ ``max_samples``) and build the evaluators.

    ``demo_tasks``: add the demo's zero-shot task (labels known from the synthetic captions).
    ``probe_train_samples``: read that many samples of ``data.sources`` (file order) as the
    probes' train split; the held-out samples are their test split. The attentive probe runs
    when both splits hold class labels (``cls``), the segmentation probe when both hold masks
    (``seg.png``); 0 turns the probes off.
    ``sink_samples``: attention-sink mass on the first that-many held-out samples.
    ``gallery_images``: the probe gallery of the first that-many held-out images.
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
    if probe_train_samples:
        evaluators += probe_evaluators(data, tokenizer, samples, probe_train_samples)
    if sink_samples:
        evaluators.append(AttentionSinkEvaluator(samples[:sink_samples], tokenizer, batch_size))
    if gallery_images:
        evaluators.append(GalleryEvaluator(samples[:gallery_images], tokenizer, max_new_tokens))
    return EvaluatorSuite(evaluators)


def probe_evaluators(data: DataConfig, tokenizer: TextTokenizer, test: list[EvalSample],
                     train_samples: int, batch_size: int = 32) -> list[Evaluator]:
    """The attentive and segmentation probes over one shared feature cache (or a warning
    naming what is missing)."""
    train_cfg = dataclasses.replace(data, eval_sources=list(data.sources))
    train = [s for s in iter_eval_samples(train_cfg, tokenizer, limit=train_samples)
             if s.label >= 0 or s.mask is not None]
    test = [s for s in test if s.label >= 0 or s.mask is not None]
    out: list[Evaluator] = []
    features = ProbeFeatures(train, test, batch_size)
    if any(s.label >= 0 for s in train) and any(s.label >= 0 for s in test):
        n = 1 + max(s.label for s in train + test)
        out.append(AttentiveProbeEvaluator(features, n))
    else:
        logger.warning("attentive probe off: no class labels (cls) in %s of the train / "
                       "held-out samples.", "one" if train or test else "either")
    if any(s.mask is not None for s in train) and any(s.mask is not None for s in test):
        out.append(SegmentationProbeEvaluator(features))
    else:
        logger.warning("segmentation probe off: no masks (seg.png) in the train or held-out "
                       "samples.")
    return out


def eval_line(metrics: dict[str, float], tag: str = "EVAL",
              extra: Optional[Sequence[str]] = None) -> str:
    """``EVAL key=value ...`` (sorted keys, 4 decimals; ``nan`` for missing values)."""
    parts = [f"{k}={v:.4f}" if math.isfinite(v) else f"{k}=nan" for k, v in
             sorted(metrics.items())]
    return " ".join([tag, *parts, *(extra or [])])


class CheckpointSuiteHook:
    """The trainer's checkpoint evaluator: ``hook(step, path)`` evaluates the checkpoint at the
    configured steps (``evaluation.suite_interval`` multiples and ``final_step``), {} otherwise.

    The trainer calls it on every rank of the logging rank's data-parallel group, with that
    group: the evaluators' items are split over those ranks (``data_parallel.py``) and every
    one of them returns the same metrics. The suite (held-out samples decoded once) is built on
    each of those ranks at the first call; the other ranks never call the hook.
    """

    def __init__(self, data: DataConfig, tokenizer_path: str, *, final_step: int,
                 interval: int = 0, max_samples: int = 200, max_new_tokens: int = 48,
                 batch_size: int = 16, demo_tasks: bool = False, probe_train_samples: int = 0,
                 sink_samples: int = 0, gallery_images: int = 0,
                 image_logger: Optional[Callable[[dict, int], None]] = None):
        self.data, self.tokenizer_path = data, tokenizer_path
        self.final_step, self.interval = final_step, interval
        self.options = dict(max_samples=max_samples, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, demo_tasks=demo_tasks,
                            probe_train_samples=probe_train_samples,
                            sink_samples=sink_samples, gallery_images=gallery_images)
        self.image_logger = image_logger
        """``log_images(images, step)`` of the run's metric logger (TensorBoard, W&B, ...)."""
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

    def __call__(self, step: int, path: str, group: Optional[Any] = None) -> dict[str, float]:
        if not self.due(step):
            return {}
        metrics = self.suite.on_checkpoint(path, group)
        self.publish_gallery(step, Path(path).parent / "gallery" / f"{Path(path).name}.html")
        return metrics

    def publish_gallery(self, step: int, page: Path) -> None:
        """Write the last gallery page to ``page`` and log its images at ``step``.

        The gallery is not split over ranks: the group's last rank (the logging rank) renders
        it, the others received its metrics only and have no page to write."""
        gallery = self.suite.gallery
        if gallery is None or not gallery.html:
            return
        logger.info("probe gallery: %s", write_gallery(gallery.html, page))
        if self.image_logger is not None:
            self.image_logger(gallery.images, step)
