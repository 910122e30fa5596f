"""Per-example preprocessing: pure numpy functions that the objectives (flaxformer_lab/tasks) and
pipeline.py map.

Feature layout before batching (what grain's packer produces, and `pad_single` mimics for one
example per row): for every sequence feature `f` of length L, `f` [L], `f_segment_ids` [L]
(0 = padding, k = k-th example in the row) and `f_positions` [L] (restarting at 0 per segment).
An objective's `finalize` turns a batch of that layout into its batch keys.

Special ids (bos, eos, cls, sep, mask, ...) are read from the tokenizer passed in, so a tokenizer
with another id layout (e.g. a pretrained vocabulary wrapped in the `Tokenizer` interface) works.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from flaxformer_lab.data import tokenizers as tok_lib

_SENTENCE_END = re.compile(r'[.!?]["\')\]]*(\s+)')


def _i32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.int32)


# --- lm -------------------------------------------------------------------------------------------


def num_windows(stream_len: int, seq_len: int, *, full_only: bool) -> int:
  """Windows of a token stream: each target position (stream[1:]) lies in exactly one."""
  targets = max(stream_len - 1, 0)
  return targets // seq_len if full_only else -(-targets // seq_len)


def lm_window(stream: np.ndarray, index: int, seq_len: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Window `index` of a continuous token stream, already in final batch-row form.

  inputs = stream[i*L : i*L+L], targets = the same shifted by one; a short last window is
  padded with pad_id (segment_ids 0, weights 0 there).
  """
  start = index * seq_len
  chunk = stream[start:start + seq_len + 1]  # [<= L+1]
  n = len(chunk) - 1  # real targets in this window
  real = np.arange(seq_len) < n  # [L]
  inputs = np.full(seq_len, pad_id, np.int32)
  targets = np.full(seq_len, pad_id, np.int32)
  inputs[:n] = chunk[:n]
  targets[:n] = chunk[1:n + 1]
  return {'inputs': inputs, 'targets': targets, 'segment_ids': _i32(real),
          'positions': _i32(np.where(real, np.arange(seq_len), 0)),
          'weights': real.astype(np.float32)}


def lm_document(ids: Sequence[int], seq_len: int,
                tok: tok_lib.Tokenizer) -> list[dict[str, np.ndarray]]:
  """A document as LM segments: [BOS] ids -> ids [EOS], cut into pieces of at most seq_len."""
  full = _i32([tok.bos_id, *ids, tok.eos_id])
  inputs, targets = full[:-1], full[1:]  # [n+1] each
  return [{'inputs': inputs[s:s + seq_len], 'targets': targets[s:s + seq_len]}
          for s in range(0, len(inputs), seq_len)]


# --- seq2seq / classification ---------------------------------------------------------------------


def seq2seq_example(src: Sequence[int], tgt: Sequence[int], seq_len: int, target_len: int,
                    tok: tok_lib.Tokenizer) -> dict[str, np.ndarray]:
  """encoder: src (truncated) + EOS; decoder_inputs: BOS + tgt; decoder_targets: tgt + EOS."""
  src = list(src)[:seq_len - 1]
  tgt = list(tgt)[:target_len - 1]
  return {'encoder_inputs': _i32(src + [tok.eos_id]),
          'decoder_inputs': _i32([tok.bos_id] + tgt),
          'decoder_targets': _i32(tgt + [tok.eos_id])}


def classification_example(ids: Sequence[int], label: int, seq_len: int,
                           tok: tok_lib.Tokenizer) -> dict[str, np.ndarray]:
  """[CLS] ids (truncated) [SEP] and the label."""
  return {'inputs': _i32([tok.cls_id, *list(ids)[:seq_len - 2], tok.sep_id]),
          'label': np.int32(label)}


# --- mlm ------------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
  """Sentences of `text`: cut after . ! ? (and closing quotes/brackets) followed by space.

  Only the whitespace at a cut is dropped; joining the sentences with ' ' gives `text` back
  when its whitespace was single spaces.
  """
  sentences, start = [], 0
  for m in _SENTENCE_END.finditer(text):
    sentences.append(text[start:m.start(1)])
    start = m.end(1)
  sentences.append(text[start:])
  return [s for s in sentences if s.strip()]


def mlm_chunks(sentences: Sequence[Sequence[int]], budget: int,
               doc: int) -> list[dict[str, np.ndarray]]:
  """Groups consecutive tokenized sentences into chunks of at most `budget` tokens.

  A sentence longer than the budget is cut into budget-sized pieces. Each chunk keeps the start
  offsets of its sentences ('bounds') so that sentence-pair tasks can cut between sentences, its
  document `doc` and its index in the document `chunk` (static masking seeds on both).
  """
  chunks, tokens, bounds = [], [], []

  def flush():
    if tokens:
      chunks.append({'tokens': _i32(tokens), 'bounds': _i32(bounds), 'doc': np.int32(doc),
                     'chunk': np.int32(len(chunks))})

  for sentence in sentences:
    for s in range(0, len(sentence), budget):
      piece = list(sentence[s:s + budget])
      if tokens and len(tokens) + len(piece) > budget:
        flush()
        tokens, bounds = [], []
      bounds.append(len(tokens))
      tokens.extend(piece)
  flush()
  return chunks


def full_sentences(documents: Sequence[Sequence[Sequence[int]]], budget: int,
                   separator: int) -> list[dict[str, np.ndarray]]:
  """RoBERTa's FULL-SENTENCES inputs: the tokenized sentences of consecutive documents packed
  into rows of at most `budget` tokens, crossing document boundaries with `separator` between
  two documents (never at the start or end of a row).

  A sentence longer than the budget is cut into budget-sized pieces; a sentence that does not
  fit starts the next row. Row k is {'tokens', 'bounds' (sentence starts), 'doc': k, 'chunk': 0}.
  """
  rows, tokens, bounds = [], [], []
  for sentences in documents:
    boundary = bool(tokens)  # a separator goes before this document's first sentence
    for sentence in sentences:
      for s in range(0, len(sentence), budget):
        piece = list(sentence[s:s + budget])
        need = len(piece) + int(boundary)
        if tokens and len(tokens) + need > budget:
          rows.append({'tokens': _i32(tokens), 'bounds': _i32(bounds), 'doc': np.int32(len(rows)),
                       'chunk': np.int32(0)})
          tokens, bounds, boundary = [], [], False
        if boundary:
          tokens.append(separator)
          boundary = False
        bounds.append(len(tokens))
        tokens.extend(piece)
  if tokens:
    rows.append({'tokens': _i32(tokens), 'bounds': _i32(bounds), 'doc': np.int32(len(rows)),
                 'chunk': np.int32(0)})
  return rows


def mlm_single(chunk: dict[str, np.ndarray], tok: tok_lib.Tokenizer) -> dict[str, np.ndarray]:
  """[CLS] chunk [SEP], one token type."""
  inputs = _i32([tok.cls_id, *chunk['tokens'], tok.sep_id])
  return {'inputs': inputs, 'token_type_ids': np.zeros_like(inputs)}


def mlm_pair(chunk: dict[str, np.ndarray], rng: np.random.Generator, mode: str,
             random_segment: Callable[[np.random.Generator, int, int], np.ndarray],
             tok: tok_lib.Tokenizer) -> dict[str, np.ndarray]:
  """[CLS] A [SEP] B [SEP] from a chunk of >= 2 tokens, with `pair_label`.

  The chunk is cut between two sentences (or inside its only sentence) into A and B.
  sop: with probability 1/2 A and B are swapped (pair_label 1), else kept in order (0).
  nsp: with probability 1/2 B is replaced by text from another document (1), else kept (0).
  `random_segment(rng, max_len, doc)` returns up to max_len tokens of a document other than doc.
  """
  tokens, bounds = chunk['tokens'], chunk['bounds']
  if len(tokens) < 2:
    raise ValueError('a sentence pair needs a chunk of at least 2 tokens')
  if len(bounds) >= 2:
    cut = int(bounds[rng.integers(1, len(bounds))])
  else:
    cut = int(rng.integers(1, len(tokens)))
  a, b = tokens[:cut], tokens[cut:]
  label = int(rng.random() < 0.5)
  if label and mode == 'sop':
    a, b = b, a
  elif label and mode == 'nsp':
    b = random_segment(rng, len(b), int(chunk['doc']))
  elif mode not in ('sop', 'nsp'):
    raise ValueError(f"mlm_pairs must be '', 'nsp' or 'sop', got {mode!r}")
  inputs = _i32([tok.cls_id, *a, tok.sep_id, *b, tok.sep_id])
  token_types = np.zeros_like(inputs)
  token_types[len(a) + 2:] = 1  # B and its [SEP]
  return {'inputs': inputs, 'token_type_ids': token_types, 'pair_label': np.int32(label)}


def random_ordinary_ids(rng: np.random.Generator, n: int, tok: tok_lib.Tokenizer) -> np.ndarray:
  """n ids drawn uniformly from the tokenizer's non-special ids."""
  special = np.asarray(tok.special_ids)
  ids = rng.integers(0, tok.vocab_size, size=n, dtype=np.int32)
  while (bad := np.isin(ids, special)).any():
    ids[bad] = rng.integers(0, tok.vocab_size, size=int(bad.sum()), dtype=np.int32)
  return ids


def num_to_predict(n: int, probability: float, max_predictions: int = 0) -> int:
  """BERT's count of selected tokens among n candidates: round(probability * n), at least one
  (when n > 0), at most `max_predictions` (max_predictions_per_seq; 0 = no cap)."""
  k = min(n, max(1, int(round(probability * n))))
  return min(k, max_predictions) if max_predictions > 0 else k


def ngram_spans(candidates: np.ndarray, n_select: int, rng: np.random.Generator,
                max_ngram: int) -> list[tuple[int, int]]:
  """ALBERT's n-gram masking: spans (start index into `candidates`, n) covering at most
  `n_select` candidates, with n in 1..max_ngram drawn with p(n) proportional to 1/n.

  As ALBERT's create_pretraining_data: the start candidates are visited in random order; a span
  covers consecutive positions only (n is drawn among the lengths that fit before a gap, e.g. a
  [SEP], with the 1/n weights renormalized); when it would exceed `n_select` it is shortened, and
  one that overlaps a chosen span is skipped. (The released code, with its default
  favor_shorter_ngram, reverses the weights; this follows the paper's p(n) ~ 1/n. Spans are of
  tokens, not of whole words as there.)
  """
  m = len(candidates)
  # run[i]: consecutive positions from candidate i on (capped at max_ngram).
  run = np.ones(m, np.int64)
  for i in range(m - 2, -1, -1):
    if candidates[i + 1] == candidates[i] + 1:
      run[i] = min(run[i + 1] + 1, max_ngram)
  weights = 1.0 / np.arange(1, max_ngram + 1)
  covered = np.zeros(m, bool)
  spans, count = [], 0
  for start in rng.permutation(m):
    if count >= n_select:
      break
    if covered[start]:
      continue
    w = weights[:run[start]]
    n = int(rng.choice(len(w), p=w / w.sum())) + 1
    n = min(n, n_select - count)  # shorter n-grams rather than exceeding the count
    if covered[start:start + n].any():
      continue
    covered[start:start + n] = True
    spans.append((int(start), n))
    count += n
  return spans


def mask_tokens(inputs: np.ndarray, rng: np.random.Generator, *, probability: float,
                tok: tok_lib.Tokenizer, max_predictions: int = 0,
                max_ngram: int = 1) -> dict[str, np.ndarray]:
  """BERT's masking of one sequence (dynamic when `rng` is new at every read).

  Selects `num_to_predict(n, probability, max_predictions)` of the n ordinary tokens (not one of
  `tok.special_ids`: pad, bos, eos, unk, [CLS], [SEP], [MASK]) uniformly, or with
  max_ngram > 1 as ALBERT's n-gram spans (`ngram_spans`); of those, 80% become [MASK], 10% a
  random ordinary token, 10% stay (drawn per token). Returns the masked 'inputs', 'targets' (the
  original tokens everywhere) and 'weights' (1.0 on selected).
  """
  inputs = _i32(inputs)
  candidates = np.flatnonzero(~np.isin(inputs, np.asarray(tok.special_ids)))
  n_select = num_to_predict(len(candidates), probability, max_predictions)
  if max_ngram > 1 and n_select:
    selected = np.concatenate([candidates[s:s + n] for s, n in
                               ngram_spans(candidates, n_select, rng, max_ngram)])
  else:
    selected = rng.choice(candidates, size=n_select, replace=False) if n_select else candidates
  r = rng.random(len(selected))
  masked = inputs.copy()
  masked[selected[r < 0.8]] = tok.mask_id
  randomized = selected[(r >= 0.8) & (r < 0.9)]
  masked[randomized] = random_ordinary_ids(rng, len(randomized), tok)
  weights = np.zeros(len(inputs), np.float32)
  weights[selected] = 1.0
  return {'inputs': masked, 'targets': inputs, 'weights': weights}


def gathered_predictions(example: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """BERT's gathered form of a masked example: masked_lm_positions / _ids / _weights [size], the
  selected positions in order, their original tokens and 1.0, padded with 0 (weight 0)."""
  positions = np.flatnonzero(example['weights'] > 0)
  if len(positions) > size:
    raise ValueError(f'{len(positions)} masked positions exceed max_predictions_per_seq={size}')
  out = {'masked_lm_positions': np.zeros(size, np.int32),
         'masked_lm_ids': np.zeros(size, np.int32),
         'masked_lm_weights': np.zeros(size, np.float32)}
  out['masked_lm_positions'][:len(positions)] = positions
  out['masked_lm_ids'][:len(positions)] = example['targets'][positions]
  out['masked_lm_weights'][:len(positions)] = 1.0
  return out


# --- padding and final keys -----------------------------------------------------------------------


def pad_single(example: dict[str, np.ndarray], lengths: dict[str, int],
               values: dict[str, int] | None = None) -> dict[str, np.ndarray]:
  """One example per row, in the packer's layout (segment id 1 on real tokens).

  Sequence features are padded to `lengths` with `values` (default 0).
  """
  out = {}
  for key, value in example.items():
    if key not in lengths:
      out[key] = value
      continue
    length, n = lengths[key], len(value)
    if n > length:
      raise ValueError(f'{key} has {n} tokens, more than its length {length}')
    padded = np.full(length, (values or {}).get(key, 0), dtype=value.dtype)
    padded[:n] = value
    out[key] = padded
    out[f'{key}_segment_ids'] = _i32(np.arange(length) < n)
    out[f'{key}_positions'] = _i32(np.where(np.arange(length) < n, np.arange(length), 0))
  return out


def padding_row(row: dict[str, np.ndarray], values: dict[str, int]) -> dict[str, np.ndarray]:
  """A row shaped like `row` that holds no example: segment ids 0 (so weights 0), features
  filled with their pad `values`, everything else 0."""
  return {k: np.full_like(v, values.get(k, 0)) for k, v in row.items()}


def stack_rows(rows: Sequence[dict[str, np.ndarray]], batch_size: int,
               padding: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacks up to batch_size rows, filling the rest with copies of `padding`."""
  rows = list(rows) + [padding] * (batch_size - len(rows))
  return {key: np.stack([r[key] for r in rows]) for key in padding}
