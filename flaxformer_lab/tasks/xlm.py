"""XLM's cross-lingual language modelling (Lample & Conneau, 2019): masked LM on monolingual
sentences alternating with translation LM (TLM) on parallel pairs, with a language id per token.

Steps (data.mlm_steps, XLM's --mlm_steps): a comma list of step kinds, e.g. 'en,de,en-de'. `en` is
an MLM step on English sentences, `en-de` a TLM step on English-German pairs. Every kind is its own
training stream (tokenized, masked, packed and batched alone), and the batches come one of each
kind in turn, in the listed order, so that every batch is homogeneous as in XLM's training loop
(which shuffles the order within a cycle; here it is fixed). Evaluation reads every kind's
examples of the split one after another.

Data: a parallel data set (multi30k, bible_en_es) whose languages data.source_lang and
data.target_lang are the steps' languages; a monolingual step reads one side of it. Language ids
are the index of the language in the sorted list of the two (XLM's lang2id, e.g. de 0, en 1).

Rows: a sentence is `</s> tokens </s>` (XLM's eos on both sides). MLM: one sentence per segment
(a longer one is cut into pieces of at most seq_len - 2 tokens). TLM: `</s> a </s> </s> b </s>`,
each side cut to seq_len // 2 - 2 tokens, positions restarting at 0 at the second sentence
(XLM's concat_batches with reset_positions) and each token carrying its side's language id.
Masking is dynamic (a new draw at every read) over both sides at once: data.mlm_probability of
the ordinary tokens, 80% [MASK], 10% random, 10% kept (preprocess.mask_tokens).

Batch: inputs, targets, weights, segment_ids, positions, language_ids [B, L].
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from flaxformer_lab.data import preprocess
from flaxformer_lab.data import sources
from flaxformer_lab.models.config import ConfigError
from flaxformer_lab.tasks import base
from flaxformer_lab.tasks import mlm


def parse_steps(text: str) -> list[tuple[str, ...]]:
  """'en,de,en-de' -> [('en',), ('de',), ('en', 'de')]; ConfigError naming data.mlm_steps."""
  steps = []
  for part in (p.strip() for p in str(text).split(',')):
    langs = tuple(part.split('-')) if part else ()
    if not 1 <= len(langs) <= 2 or not all(langs) or len(set(langs)) != len(langs):
      raise ConfigError(f"config.data.mlm_steps={text!r}: each step is a language ('en') or a "
                        f"pair of two ('en-de'), got {part!r}")
    steps.append(langs)
  return steps


def languages(data_config) -> tuple[str, ...]:
  """The two languages, sorted: language id = index (XLM's lang2id)."""
  return tuple(sorted({data_config.source_lang, data_config.target_lang}))


class _StepExamples(Sequence):
  """The examples of one step kind over a parallel split: {'langs': (...), 'texts': (...)}."""

  def __init__(self, examples: Sequence[dict], langs: tuple[str, ...]):
    self._examples, self.langs = examples, langs

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    ex = self._examples[index]
    return {'langs': self.langs, 'texts': tuple(ex[lang] for lang in self.langs)}


def sentence(ids: Sequence[int], budget: int, eos_id: int) -> list[int]:
  """`</s> ids[:budget] </s>`."""
  return [eos_id, *list(ids)[:budget], eos_id]


@base.register
class CrossLingualLanguageModelling(mlm.MaskedLanguageModelling):
  name = 'xlm'
  heads = ('mlm',)
  default_for_heads = ()
  data_kinds = ('parallel',)
  language_ids = True
  gathers_predictions = False  # every position is scored (packed rows)

  # --- config ----------------------------------------------------------------------------------

  def validate(self, config, model_cfg):
    super().validate(config, model_cfg)
    d = config.data
    steps = parse_steps(d.mlm_steps)
    langs = languages(d)
    for step in steps:
      for lang in step:
        if lang not in langs:
          raise ConfigError(f'config.data.mlm_steps={d.mlm_steps!r} names {lang!r}, but the data '
                            f'has {", ".join(langs)} (config.data.source_lang / target_lang)')
    if d.mlm_pairs:
      raise ConfigError("config.task='xlm' has no sentence-pair head: set config.data.mlm_pairs=''")
    if 0 < model_cfg.num_languages < len(langs):
      raise ConfigError(f'model.num_languages={model_cfg.num_languages} is fewer than the '
                        f'{len(langs)} languages of the data ({", ".join(langs)})')
    if model_cfg.type_vocab_size:
      raise ConfigError('config.task=xlm gives no token types: set model.type_vocab_size=0 (XLM '
                        'marks the languages with model.num_languages instead)')

  # --- data ------------------------------------------------------------------------------------

  def text_fields(self, spec):
    return (spec.source_field, spec.text_field)

  def _steps(self):
    return parse_steps(self.config.data.mlm_steps)

  def train_streams(self, source):
    return [_StepExamples(source.split('train'), step) for step in self._steps()]

  def documents(self, source, split):
    return sources.Concatenation([_StepExamples(source.split(split), step)
                                  for step in self._steps()])

  def read_documents(self, ctx, source, split):
    return self.documents(source, split)

  def tokenize(self, ctx, index, example):
    """Unmasked rows: 'inputs', 'token_positions', 'language_ids' (a list: MLM fans out)."""
    tok, lang_id = ctx.tokenizer, {lang: i for i, lang in enumerate(languages(ctx.data_config))}
    encoded = [tok.encode(t) for t in example['texts']]
    if len(encoded) == 1:  # MLM: pieces of at most seq_len - 2 tokens
      ids, budget = encoded[0], ctx.seq_len - 2
      pieces = [sentence(ids[s:s + budget], budget, tok.eos_id)
                for s in range(0, max(len(ids), 1), budget)]
      return [_row([p], [lang_id[example['langs'][0]]]) for p in pieces]
    budget = ctx.seq_len // 2 - 2  # TLM: both sides, positions restart at the second
    sides = [sentence(ids, budget, tok.eos_id) for ids in encoded]
    return [_row(sides, [lang_id[lang] for lang in example['langs']])]

  def random_transform(self, ctx, documents):
    del documents
    return functools.partial(_mask, ctx)

  def packable(self, data_config):
    return bool(data_config.pack)

  def feature_lengths(self, seq_len, target_len):
    return {'inputs': seq_len, 'targets': seq_len, 'weights': seq_len, 'token_positions': seq_len,
            'language_ids': seq_len}

  def pad_values(self, tokenizer):
    return {k: tokenizer.pad_id if k in ('inputs', 'targets') else 0
            for k in self.feature_lengths(1, 1)}

  def finalize(self, batch):
    i32 = lambda x: np.asarray(x, np.int32)
    return {'inputs': i32(batch['inputs']), 'targets': i32(batch['targets']),
            'weights': np.asarray(batch['weights'], np.float32),
            'segment_ids': i32(batch['inputs_segment_ids']),
            'positions': i32(batch['token_positions']),
            'language_ids': i32(batch['language_ids'])}

  def synthetic_batch(self, config, rng):
    """MLM's random batch as TLM rows: two halves, positions restarting, languages 0 / 1."""
    batch = super().synthetic_batch(config, rng)
    b, l = batch['inputs'].shape
    half = l // 2
    positions = base.arange_rows(b, l)
    positions[:, half:] -= half
    languages_ = np.zeros((b, l), np.int32)
    languages_[:, half:] = 1 if int(config.model.num_languages) > 1 else 0
    keep = ('inputs', 'targets', 'weights', 'segment_ids')
    return {**{k: batch[k] for k in keep}, 'positions': positions, 'language_ids': languages_}

  # --- model -----------------------------------------------------------------------------------

  def model_inputs(self, batch):
    return dict(input_ids=batch['inputs'], segment_ids=batch['segment_ids'],
                positions=batch['positions'], language_ids=batch['language_ids'])


def _row(sides: Sequence[Sequence[int]], lang_ids: Sequence[int]) -> dict[str, np.ndarray]:
  """Sentences one after another: positions restart and the language changes at each."""
  return {'inputs': np.asarray([t for s in sides for t in s], np.int32),
          'token_positions': np.concatenate([np.arange(len(s)) for s in sides]).astype(np.int32),
          'language_ids': np.concatenate([np.full(len(s), i) for s, i in zip(sides, lang_ids)]
                                         ).astype(np.int32)}


def _mask(ctx, row, rng):
  """A row -> its dynamically masked form (both sides of a pair at once)."""
  masked = preprocess.mask_tokens(row['inputs'], rng, probability=ctx.data_config.mlm_probability,
                                  tok=ctx.tokenizer)
  return {**row, **masked}
