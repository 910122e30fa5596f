"""The task interface and the shared cross-entropy."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Batch = Mapping[str, jax.Array]


def cross_entropy(logits_BxLxV, targets_BxL, weights_BxL, label_smoothing: float = 0.0):
  """Weighted token cross entropy (nats) with optional label smoothing.

  Returns (loss_sum, nll_sum, correct_sum, weight_sum): `loss_sum` is what is optimized (smoothed),
  `nll_sum` the plain negative log-likelihood used for perplexity and reporting.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  if label_smoothing > 0:
    smooth = -jnp.mean(logp, axis=-1)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
  else:
    loss = nll
  w = weights_BxL.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets_BxL).astype(jnp.float32)
  return (jnp.sum(loss * w), jnp.sum(nll * w), jnp.sum(correct * w), jnp.sum(w))


@dataclasses.dataclass(frozen=True)
class Task:
  """An objective: which batch keys feed the model, and how its outputs are scored."""
  name: str
  model_inputs: Callable[[Batch], dict[str, Any]]
  score: Callable[[dict[str, Any], Batch, float], dict[str, jax.Array]]
  # metric name -> (numerator key, denominator key) reported as numerator / denominator
  report: Mapping[str, tuple[str, str]]
  perplexity: bool = False
  tokens_key: str = 'inputs'  # batch key whose non-padding entries count as processed tokens

  def loss(self, outputs, batch, label_smoothing: float = 0.0):
    """(mean loss, metric sums) for one batch."""
    sums = self.score(outputs, batch, label_smoothing)
    return sums['loss_sum'] / jnp.maximum(sums['loss_count'], 1.0), sums

  def summarize(self, sums: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Turns accumulated sums into reported metrics (loss, accuracy, perplexity...)."""
    import math  # pylint: disable=g-import-not-at-top
    out = {}
    for name, (num, den) in self.report.items():
      if sums.get(den, 0) > 0:
        out[f'{prefix}/{name}'] = float(sums[num]) / float(sums[den])
    if self.perplexity and f'{prefix}/nll' in out:
      out[f'{prefix}/perplexity'] = math.exp(min(out[f'{prefix}/nll'], 50.0))
    return out


def get_task(name: str) -> Task:
  from flaxformer_lab.tasks import classification, lm, mlm, seq2seq  # pylint: disable=g-import-not-at-top
  tasks = {'lm': lm.TASK, 'seq2seq': seq2seq.TASK, 'classification': classification.TASK,
           'mlm': mlm.TASK}
  if name not in tasks:
    raise ValueError(f'unknown task {name!r}; valid: {", ".join(sorted(tasks))}')
  return tasks[name]
