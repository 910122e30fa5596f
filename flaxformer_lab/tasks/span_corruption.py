"""T5's span corruption (Raffel et al., 2020, section 3.1.4 and the `span_corruption` preprocessor
of the t5 library), re-implemented from its description: an encoder-decoder denoising objective.

A document's tokens are cut into pieces of `raw_length` tokens. In each piece a noise mask marks
round(noise_density * n) tokens as noise, grouped into round(num_noise / mean_noise_span_length)
spans; the noise and non-noise lengths are random partitions of their counts into that many
non-empty spans, and the spans alternate, non-noise first (`random_spans_noise_mask`). Then

  inputs  = every noise span replaced by one sentinel (`noise_span_to_unique_sentinel`) + EOS
  targets = every non-noise span replaced by one sentinel (`nonnoise_span_to_unique_sentinel`)
            + EOS, i.e. sentinel_0 span_0 sentinel_1 span_1 ... EOS

Sentinel i is id `model.vocab_size - 1 - i`: they count down from the top of the model's
vocabulary, above every tokenizer id (T5's extra_ids). `raw_length` is the longest piece whose
inputs fit data.seq_len (`t5_lengths`, the t5 library's random_spans_helper); data.target_len 0
takes the targets' length from it (T5: 568 raw tokens -> 512 inputs, 114 targets).
The mask is drawn anew every time a piece is read (dynamic, like masking in mlm).

Settings: data.noise_density (0.15), data.mean_noise_span_length (3.0).
Batch: the seq2seq objective's keys (its loss, metrics and evaluations are reused).
"""

from __future__ import annotations

import functools

import numpy as np

from flaxformer_lab.data import preprocess
from flaxformer_lab.models.config import ConfigError
from flaxformer_lab.tasks import base
from flaxformer_lab.tasks.seq2seq import SequenceToSequence


def _counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a piece of `length` tokens (the t5 library's rounding)."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span)), 1)
  return num_noise, min(num_spans, length - num_noise)  # every non-noise span non-empty


def t5_lengths(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(raw tokens, targets length): the longest raw piece whose corrupted inputs, EOS included,
  fit `inputs_length`, and the length of its targets (EOS included)."""
  def lengths(raw):
    noise, spans = _counts(raw, noise_density, mean_span)
    return raw - noise + spans + 1, noise + spans + 1
  raw = 2
  while lengths(raw + 1)[0] <= inputs_length:
    raw += 1
  return raw, lengths(raw)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator
                         ) -> np.ndarray:
  """A uniformly random partition of `num_items` into `num_segments` non-empty lengths."""
  first = np.zeros(num_items, np.int32)  # 1 where a new segment starts (after item 0)
  first[rng.permutation(num_items - 1)[:num_segments - 1] + 1] = 1
  return np.bincount(np.cumsum(first), minlength=num_segments).astype(np.int32)


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float,
                            rng: np.random.Generator) -> np.ndarray:
  """Boolean [length]: True on noise. Non-noise and noise spans alternate, non-noise first."""
  if length < 2:
    return np.zeros(length, bool)
  num_noise, num_spans = _counts(length, noise_density, mean_span)
  noise = _random_segmentation(num_noise, num_spans, rng)
  nonnoise = _random_segmentation(length - num_noise, num_spans, rng)
  spans = np.stack([nonnoise, noise], axis=1).reshape(-1)  # [nonnoise_0, noise_0, ...]
  return np.repeat(np.arange(len(spans)) % 2 == 1, spans)


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  vocab_size: int) -> np.ndarray:
  """Each run of masked tokens becomes one sentinel: vocab_size - 1, vocab_size - 2, ..."""
  previous = np.concatenate([[False], noise_mask[:-1]])
  first = noise_mask & ~previous
  sentinels = vocab_size - np.cumsum(first)
  out = np.where(first, sentinels, tokens)
  return out[~(noise_mask & previous)].astype(np.int32)


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                     vocab_size: int) -> np.ndarray:
  """Each run of unmasked tokens becomes one sentinel (the targets)."""
  return noise_span_to_unique_sentinel(tokens, ~noise_mask, vocab_size)


def corrupt(tokens: np.ndarray, rng: np.random.Generator, *, noise_density: float,
            mean_span: float, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of one piece, without EOS."""
  tokens = np.asarray(tokens, np.int32)
  mask = random_spans_noise_mask(len(tokens), noise_density, mean_span, rng)
  return (noise_span_to_unique_sentinel(tokens, mask, vocab_size),
          nonnoise_span_to_unique_sentinel(tokens, mask, vocab_size))


def reconstruct(inputs: np.ndarray, targets: np.ndarray, vocab_size: int,
                num_sentinels: int) -> np.ndarray:
  """The original piece from inputs and targets (both without EOS): each sentinel of the inputs
  is replaced by the tokens that follow the same sentinel in the targets."""
  is_sentinel = lambda t: t >= vocab_size - num_sentinels
  spans, current = {}, None
  for t in targets:
    if is_sentinel(t):
      current = int(t)
      spans[current] = []
    elif current is not None:
      spans[current].append(int(t))
  out = []
  for t in inputs:
    out.extend(spans.get(int(t), []) if is_sentinel(t) else [int(t)])
  return np.asarray(out, np.int32)


@base.register
class SpanCorruption(SequenceToSequence):
  name = 'span_corruption'
  default_for_heads = ()
  data_kinds = ('text', 'stream')
  fans_out = True

  # --- config ----------------------------------------------------------------------------------

  def _settings(self, data_config) -> tuple[float, float]:
    return (float(data_config.get('noise_density', 0.15)),
            float(data_config.get('mean_noise_span_length', 3.0)))

  def validate(self, config, model_cfg):
    super().validate(config, model_cfg)
    density, span = self._settings(config.data)
    if not 0.0 < density < 1.0:
      raise ConfigError(f'config.data.noise_density={density} must be in (0, 1)')
    if span < 1.0:
      raise ConfigError(f'config.data.mean_noise_span_length={span} must be >= 1')
    raw, targets = t5_lengths(int(config.data.seq_len), density, span)
    if config.data.target_len and config.data.target_len < targets:
      raise ConfigError(f'config.data.target_len={config.data.target_len} is shorter than the '
                        f'{targets} target tokens of a {raw}-token piece: set it to 0 or >= '
                        f'{targets}')

  def check_bundle(self, config, bundle):
    """The sentinels must lie above every tokenizer id."""
    density, span = self._settings(config.data)
    needed = _counts(self.raw_length(config.data), density, span)[1]
    free = int(config.model.vocab_size) - bundle.tokenizer.vocab_size
    if free < needed:
      raise ConfigError(f'config.model.vocab_size={config.model.vocab_size} leaves {free} ids above '
                        f"the tokenizer's {bundle.tokenizer.vocab_size} for the {needed} sentinels "
                        f'a piece needs: raise it to at least {bundle.tokenizer.vocab_size + needed}')

  # --- data ------------------------------------------------------------------------------------

  def raw_length(self, data_config) -> int:
    return t5_lengths(int(data_config.seq_len), *self._settings(data_config))[0]

  def target_len(self, data_config):
    return data_config.target_len or t5_lengths(int(data_config.seq_len),
                                                *self._settings(data_config))[1]

  def text_fields(self, spec):
    return (spec.text_field,)

  def documents(self, source, split):
    return base.paragraph_documents(source, split)

  def tokenize(self, ctx, index, example):
    """Pieces of `raw_length` tokens (uncorrupted; `random_transform` corrupts them)."""
    ids = np.asarray(ctx.tokenizer.encode(example[ctx.spec.text_field]), np.int32)
    raw = self.raw_length(ctx.data_config)
    return [{'tokens': ids[s:s + raw]} for s in range(0, len(ids), raw) if len(ids[s:s + raw]) >= 2]

  def random_transform(self, ctx, documents):
    del documents
    return functools.partial(self._corrupt, ctx)

  def _corrupt(self, ctx, piece, rng):
    density, span = self._settings(ctx.data_config)
    inputs, targets = corrupt(piece['tokens'], rng, noise_density=density, mean_span=span,
                              vocab_size=int(self.config.model.vocab_size))
    return preprocess.seq2seq_example(inputs, targets, ctx.seq_len, ctx.target_len, ctx.tokenizer)
