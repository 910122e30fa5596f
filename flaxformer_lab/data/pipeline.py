"""Grain input pipelines: a config in, a `DataBundle` (tokenizer, train iterator, eval batches) out.

Batches are dicts of numpy arrays (int32; `weights` float32), B = per-process batch, with the keys
the objective's `finalize` gives (each objective's module docstring in flaxformer_lab/tasks lists
them). The pipeline asks the objective (`config.task`) everything that depends on it: the kinds of
data set it reads, how an example becomes features, the random transform applied every time an
example is read (masking), whether rows pack, the padded lengths and pad values, and the batch keys.

segment_ids: 0 = padding, k = k-th example packed into the row; positions restart at 0 in each
segment. A stream data set may be cut into fixed windows instead (the objective's `windows`; one
segment per row, no packing). Evaluation never packs: one example per row, so every process gets
the same number of eval batches and no example is dropped or counted twice.

Train order: every process builds the same global batches and keeps its rows; shuffled with
config.data.shuffle_seed (reshuffled every epoch), tokenized, and randomly transformed (masked)
anew every time an example is read. The train iterator is grain's `DatasetIterator`: `get_state()` is a small
JSON-serializable dict and `set_state(state)` resumes with exactly the batches that would have
come next.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator

from absl import flags
import grain
import numpy as np

from flaxformer_lab.data import preprocess
from flaxformer_lab.data import sources as sources_lib
from flaxformer_lab.data import tokenizers as tok_lib
from flaxformer_lab.tasks.base import DataContext
from flaxformer_lab.tasks.base import get_objective

_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)


class _Identity(grain.experimental.FlatMapTransform):
  """Flattens the list an upstream map produced (one document -> its segments)."""

  max_fan_out = 1 << 20

  def flat_map(self, element):
    return element


@dataclasses.dataclass
class DataBundle:
  """Everything the train loop reads from the data pipeline."""

  tokenizer: tok_lib.Tokenizer
  train_iter: grain.DatasetIterator  # infinite; get_state()/set_state() for checkpoints
  train_dataset: grain.IterDataset  # iter(train_dataset) gives a fresh iterator from the start
  task: str
  batch_size: int  # examples per batch on this process (global batch / process_count)
  seq_len: int  # L (lm, classification, mlm) or Ls (seq2seq encoder)
  target_len: int  # Lt (seq2seq decoder); equals seq_len for the other tasks
  num_classes: int  # classification: number of labels; 0 otherwise
  eval_split: str
  _pipeline: '_Pipeline'
  _eval_rows: dict = dataclasses.field(default_factory=dict)  # (split, max_batches) -> rows

  @property
  def vocab_size(self) -> int:
    """The smallest vocab_size the model may have."""
    return self.tokenizer.vocab_size

  def check_vocab_size(self, model_vocab_size: int) -> None:
    check_vocab_size(model_vocab_size, self.tokenizer)

  def eval_batches(self, split: str | None = None,
                   max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """A fresh, finite, deterministic pass over `split` (default config.data.eval_split).

    One example per row; the last batch is filled with all-zero rows (weights 0). Every process
    yields the same number of batches. `max_batches` (default config.data.eval_batches, 0 = all)
    keeps only the first batches.
    """
    split = split or self.eval_split
    if max_batches is None:
      max_batches = self._pipeline.cfg.eval_batches
    key = (split, max_batches)
    if key not in self._eval_rows:
      self._eval_rows[key] = self._pipeline.eval_rows(split, max_batches)
    return self._pipeline.eval_batches(self._eval_rows[key])


def check_vocab_size(model_vocab_size: int, tokenizer: tok_lib.Tokenizer) -> None:
  """Raises a one-line ValueError when the model's vocabulary cannot hold the tokenizer's ids."""
  if model_vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f'config.model.vocab_size={model_vocab_size} is smaller than the {tokenizer.kind} '
        f"tokenizer's {tokenizer.vocab_size} ids: set config.model.vocab_size to at least "
        f'{tokenizer.vocab_size}')


def _check_config(config: Any, objective: Any, kind: str, process_count: int) -> None:
  d = config.data
  objective.check_data(d, kind)
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{process_count} processes')
  if d.seq_len < 4 or (d.target_len and d.target_len < 2):
    raise ValueError('config.data.seq_len must be >= 4 and target_len 0 or >= 2')
  if not 0 <= d.shuffle_seed < 2**32:
    raise ValueError('config.data.shuffle_seed must be in [0, 2**32)')


class _Pipeline:
  """The grain graphs of one run, built from the objective's element functions."""

  def __init__(self, config: Any, objective: Any, source: sources_lib.Source,
               tokenizer: tok_lib.Tokenizer, process_index: int, process_count: int):
    self.cfg = config.data
    self.objective = objective
    self.source = source
    self.spec = source.spec
    self.tokenizer = tokenizer
    self.process_index, self.process_count = process_index, process_count
    self.batch_size = config.batch_size // process_count
    self.seq_len = self.cfg.seq_len
    self.target_len = objective.target_len(self.cfg)
    self.ctx = DataContext(tokenizer=tokenizer, spec=self.spec, seq_len=self.seq_len,
                           target_len=self.target_len, data_config=self.cfg)
    self.lengths = objective.feature_lengths(self.seq_len, self.target_len)
    self.windows = objective.windows(self.spec)
    self.pad_values = objective.pad_values(tokenizer)  # windows: inputs, targets

  def stream_tokens(self, split: str) -> np.ndarray:
    """The token stream of a stream split: its texts encoded and concatenated."""
    ids = [i for ex in self.source.split(split) for i in self.tokenizer.encode(ex['text'])]
    return np.asarray(ids, np.int32)

  def tokenize(self, index: int, example: dict) -> Any:
    return self.objective.tokenize(self.ctx, index, example)

  # --- train --------------------------------------------------------------------------------------

  def train_dataset(self) -> grain.IterDataset:
    """The infinite, shuffled, batched training IterDataset of this process.

    Every process builds the same global batches and keeps its own contiguous rows, so a run's
    data (and so its losses) do not depend on the number of processes: 1 process x 8 devices and
    2 processes x 4 devices see identical global batches.
    """
    seed = self.cfg.shuffle_seed
    if self.windows:
      stream = self.stream_tokens('train')
      n = preprocess.num_windows(len(stream), self.seq_len, full_only=True)
      ds = grain.MapDataset.range(n)
      ds = ds.shuffle(seed).repeat().map(
          functools.partial(preprocess.lm_window, stream, seq_len=self.seq_len,
                            pad_id=self.tokenizer.pad_id))
      ds = ds.to_iter_dataset(_READ_OPTIONS).batch(self.global_batch_size, drop_remainder=True)
      return self._with_workers(ds.map(self._process_rows))

    streams = self.objective.train_streams(self.source)
    if streams is None:
      ds = self._document_batches(
          self.objective.read_documents(self.ctx, self.source, 'train'), seed)
    else:  # one batch of each stream in turn (equal proportions: a fixed cycle)
      ds = grain.IterDataset.mix([self._document_batches(docs, (seed + i) % 2**32)
                                  for i, docs in enumerate(streams)])
    return self._with_workers(ds.map(self._process_rows))

  def _document_batches(self, documents, seed: int) -> grain.IterDataset:
    """Global batches of `documents`: tokenized, shuffled, transformed, packed or padded."""
    docs = grain.MapDataset.source(documents)
    tokenized = docs.map_with_index(self.tokenize)
    ds = tokenized.shuffle(seed).repeat().to_iter_dataset(_READ_OPTIONS)
    if self.objective.fans_out:
      ds = grain.experimental.FlatMapIterDataset(ds, _Identity())
    transform = self.objective.random_transform(self.ctx, docs)
    if transform is not None:
      ds = ds.random_map(transform, seed=seed)
    if self.objective.packable(self.cfg):
      ds = grain.experimental.FirstFitPackIterDataset(
          ds, length_struct=dict(self.lengths), num_packing_bins=self.global_batch_size, seed=seed,
          shuffle_bins=True, padding_struct=dict(self.pad_values))
    else:
      ds = ds.map(functools.partial(preprocess.pad_single, lengths=self.lengths,
                                    values=self.pad_values))
    ds = ds.batch(self.global_batch_size, drop_remainder=True)
    return ds.map(self.objective.finalize)

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * self.process_count

  def _process_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous slice of a global batch."""
    lo = self.process_index * self.batch_size
    return {k: v[lo:lo + self.batch_size] for k, v in batch.items()}

  def _with_workers(self, ds: grain.IterDataset) -> grain.IterDataset:
    if self.cfg.num_workers > 0:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside app.run: defaults
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.num_workers))
    return ds

  # --- eval ---------------------------------------------------------------------------------------

  def _eval_rows(self, split: str, limit: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of `split` in order, one example each (at most `limit` rows when limit > 0)."""
    count = 0
    if self.windows:
      stream = self.stream_tokens(split)
      for i in range(preprocess.num_windows(len(stream), self.seq_len, full_only=False)):
        if limit and count >= limit:
          return
        count += 1
        yield preprocess.lm_window(stream, i, self.seq_len, self.tokenizer.pad_id)
      return
    docs = self.objective.read_documents(self.ctx, self.source, split)
    transform = self.objective.random_transform(self.ctx, docs)
    for index, example in enumerate(docs):
      features = self.tokenize(index, example)
      for j, element in enumerate(features if isinstance(features, list) else [features]):
        if limit and count >= limit:
          return
        if transform is not None:  # the same draw in every evaluation
          element = transform(element, np.random.default_rng([self.cfg.shuffle_seed, index, j]))
        count += 1
        yield preprocess.pad_single(element, self.lengths, self.pad_values)

  def eval_rows(self, split: str, max_batches: int) -> list[dict[str, np.ndarray]]:
    """All rows the first `max_batches` eval batches of every process need (0 = the split)."""
    limit = max_batches * self.batch_size * self.process_count if max_batches > 0 else 0
    rows = list(self._eval_rows(split, limit))
    if not rows:
      raise ValueError(f'{self.source.name}: split {split!r} gave no evaluation examples')
    return rows

  def eval_batches(self, rows: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of `rows` as batches; every process yields the same number."""
    b = self.batch_size
    n_batches = math.ceil(math.ceil(len(rows) / self.process_count) / b)
    mine = rows[self.process_index::self.process_count]
    padding = preprocess.padding_row(rows[0], self.pad_values)  # segment_ids 0 -> weights 0
    for i in range(n_batches):
      batch = preprocess.stack_rows(mine[i * b:(i + 1) * b], b, padding)
      yield batch if self.windows else self.objective.finalize(batch)


def text_fields(config: Any, spec: sources_lib.Spec) -> tuple[str, ...]:
  """The fields a trained tokenizer learns from (the objective's choice)."""
  return get_objective(config).text_fields(spec)


def load_or_train_tokenizer(config: Any, source: sources_lib.Source) -> tok_lib.Tokenizer:
  """The configured tokenizer, trained on the training split (or loaded from its cache)."""
  fields = text_fields(config, source.spec)
  return tok_lib.get_tokenizer(config.data, cache_dir=source.tokenizer_cache_dir,
                               train_texts=source.texts('train', fields), text_fields=fields)


def prepare(config: Any) -> tok_lib.Tokenizer:
  """Builds the data set and trains/caches the tokenizer; idempotent.

  In a multi-process run call this on process 0 first (then synchronize), so that the other
  processes find the prepared data and the cached tokenizer instead of building them too.
  """
  return load_or_train_tokenizer(config, sources_lib.open_source(config.data))


def make_datasets(config: Any, *, process_index: int = 0, process_count: int = 1,
                  tokenizer: tok_lib.Tokenizer | None = None) -> DataBundle:
  """The data pipeline of `config` (configs/common.py `base_config()`) for one process.

  Args:
    config: the run's ConfigDict (reads config.task -- the objective --, config.batch_size and
      config.data.*).
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()); each reads a disjoint shard.
    tokenizer: a tokenizer to use (e.g. `load_tokenizer(workdir/...)` on restore) instead of
      the configured one.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  objective = get_objective(config)
  source = sources_lib.open_source(config.data)
  _check_config(config, objective, source.spec.kind, process_count)
  tokenizer = tokenizer or load_or_train_tokenizer(config, source)
  pipe = _Pipeline(config, objective, source, tokenizer, process_index, process_count)
  source.split(config.data.eval_split)  # fail now, not at the first evaluation
  train = pipe.train_dataset()
  return DataBundle(
      tokenizer=tokenizer, train_iter=iter(train), train_dataset=train, task=config.task,
      batch_size=pipe.batch_size, seq_len=pipe.seq_len, target_len=pipe.target_len,
      num_classes=source.spec.num_classes, eval_split=config.data.eval_split, _pipeline=pipe)
