r"""Generate text with a trained run, or score an encoder_decoder run with sacreBLEU.

  python -m flaxformer_lab.generate --workdir=/tmp/demo --prompt="ROMEO:" --strategy=sample \
      --temperature=0.8 --top_p=0.95 --max_new_tokens=200
  python -m flaxformer_lab.generate --workdir=/tmp/tf_tiny --source="A man rides a bike." \
      --strategy=beam --num_beams=4
  python -m flaxformer_lab.generate --workdir=/tmp/tf_tiny --bleu_split=test

Reads `<workdir>/config.json`, `<workdir>/tokenizer` and the latest (or `--step`) checkpoint's
params. `--prompt` / `--source` may be repeated: the texts are decoded together as one batch.
"""

from __future__ import annotations

import sys
import time

from absl import flags
from absl import logging

from flaxformer_lab import errors

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (config.json, tokenizer/, '
                               'checkpoints/).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the latest).')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Decoder models: text to continue (repeatable).')
_SOURCE = flags.DEFINE_multi_string('source', [], 'encoder_decoder models: text to translate / '
                                    'transform (repeatable).')
_STRATEGY = flags.DEFINE_enum('strategy', 'greedy', ['greedy', 'sample', 'beam'],
                              'Decoding strategy.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 100, 'Most tokens generated per text.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature (0 = greedy).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0 = all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1 = off).')
_NUM_BEAMS = flags.DEFINE_integer('num_beams', 4, 'Beam width.')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 0.6,
                                     'Beam alpha of ((5 + length) / 6) ** alpha.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1,
                                    'Samples per prompt (seeds seed, seed+1, ...).')
_BLEU_SPLIT = flags.DEFINE_string('bleu_split', '', 'encoder_decoder: report sacreBLEU on this '
                                  'split (e.g. validation, test) instead of generating.')
_BLEU_BATCHES = flags.DEFINE_integer('bleu_batches', 0, 'Eval batches for BLEU (0 = the whole '
                                     'split).')
_SHOW = flags.DEFINE_integer('show', 3, 'BLEU: examples printed (source, reference, hypothesis).')


fail = errors.fail


def check_flags() -> None:
  """Decoding flags that cannot work: one line naming the flag (exit status 2)."""
  checks = [
      (_MAX_NEW, _MAX_NEW.value >= 1, 'must be >= 1'),
      (_TEMPERATURE, _TEMPERATURE.value >= 0, 'must be >= 0 (0 = greedy)'),
      (_TOP_K, _TOP_K.value >= 0, 'must be >= 0 (0 = all tokens)'),
      (_TOP_P, 0 < _TOP_P.value <= 1, 'must be in (0, 1] (1 = off)'),
      (_NUM_BEAMS, _NUM_BEAMS.value >= 1, 'must be >= 1'),
      (_NUM_SAMPLES, _NUM_SAMPLES.value >= 1, 'must be >= 1'),
      (_BLEU_BATCHES, _BLEU_BATCHES.value >= 0, 'must be >= 0 (0 = the whole split)'),
  ]
  if _STEP.value is not None:
    checks.append((_STEP, _STEP.value >= 0, 'must be >= 0 (a saved checkpoint step)'))
  for flag, ok, rule in checks:
    if not ok:
      fail(f'--{flag.name}={flag.value} {rule}')
  for name, texts in (('prompt', _PROMPT.value), ('source', _SOURCE.value)):
    if any(not t.strip() for t in texts):
      fail(f'--{name} is empty: give some text' + (
          ', or leave --prompt out for an unconditional sample' if name == 'prompt' else ''))


def check_lengths(config, tokenizer, texts) -> None:
  """A text longer than the learned/sinusoidal position table is refused (it cannot be read)."""
  from flaxformer_lab.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_dict(config.model)
  if cfg.position not in ('learned', 'sinusoidal'):
    return
  room = cfg.max_len - 1  # BOS (decoder) or EOS (encoder) takes one row
  if cfg.family == 'decoder':
    room -= 1  # and at least one new token must fit
  for text in texts:
    n = len(tokenizer.encode(text))
    if n > room:
      fail(f'the text {text[:40]!r}{"..." if len(text) > 40 else ""} is {n} tokens, more than '
           f'the {room} that fit the {cfg.position} position table (model.max_len={cfg.max_len}):'
           ' shorten it')


def load_run(workdir: str, step: int | None = None):
  """(config, params, tokenizer) of a run directory (rundir.py: no optimizer or mesh is built)."""
  from flaxformer_lab import rundir  # pylint: disable=g-import-not-at-top
  run = rundir.RunDir(workdir)
  config = run.load_config()
  tokenizer = run.load_tokenizer()
  return config, run.restore_params(step), tokenizer


def run_bleu(config, params, tokenizer) -> None:
  from flaxformer_lab import data as data_lib  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import decoding  # pylint: disable=g-import-not-at-top
  with config.unlocked():
    config.data.eval_split = _BLEU_SPLIT.value
  bundle = data_lib.make_datasets(config, tokenizer=tokenizer)
  batches = bundle.eval_batches(_BLEU_SPLIT.value, _BLEU_BATCHES.value)
  start = time.time()
  result = decoding.evaluate_bleu(
      config, params, tokenizer, batches, strategy='beam' if _STRATEGY.value == 'beam' else
      'greedy', num_beams=_NUM_BEAMS.value, length_penalty=_LENGTH_PENALTY.value,
      max_new_tokens=_MAX_NEW.value if FLAGS['max_new_tokens'].present else None)
  shown = list(zip(result.sources, result.references, result.hypotheses))[:_SHOW.value]
  for src, ref, hyp in shown:
    print(f'source:     {src}\nreference:  {ref}\nhypothesis: {hyp}\n')
  print(f'{len(result.hypotheses)} examples of split {_BLEU_SPLIT.value!r} in '
        f'{time.time() - start:.1f}s')
  print(result.details)
  print(f'BLEU = {result.score:.2f}')


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    fail('--workdir is required')
  check_flags()
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)  # orbax/jax INFO/WARNING chatter off; --verbosity=0 restores it
  from flaxformer_lab import decoding  # pylint: disable=g-import-not-at-top
  config, params, tokenizer = load_run(_WORKDIR.value, _STEP.value)
  family = config.model.family
  if family not in ('decoder', 'encoder_decoder'):
    fail(f'model.family={family!r} does not generate text')
  if _BLEU_SPLIT.value:
    if family != 'encoder_decoder':
      fail('--bleu_split needs an encoder_decoder run')
    run_bleu(config, params, tokenizer)
    return
  texts = _PROMPT.value if family == 'decoder' else _SOURCE.value
  if family == 'decoder' and _SOURCE.value:
    fail('this is a decoder run: use --prompt, not --source')
  if family == 'encoder_decoder' and _PROMPT.value:
    fail('this is an encoder_decoder run: use --source, not --prompt')
  if not texts:
    if family == 'encoder_decoder':
      fail('give at least one --source (or --bleu_split)')
    texts = ['']  # unconditional sample from BOS
  check_lengths(config, tokenizer, texts)
  for i in range(_NUM_SAMPLES.value):
    start = time.time()
    outs = decoding.generate_texts(
        config, params, tokenizer, texts, max_new_tokens=_MAX_NEW.value,
        strategy=_STRATEGY.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, num_beams=_NUM_BEAMS.value, length_penalty=_LENGTH_PENALTY.value,
        seed=_SEED.value + i)
    took = time.time() - start
    for text, out in zip(texts, outs):
      if family == 'decoder':
        print(f'{text}{out}')
      else:
        print(f'{text}\n-> {out}')
      print('-' * 40)
    print(f'({len(texts)} texts, {took:.2f}s including compilation)', file=sys.stderr)


if __name__ == '__main__':
  errors.run(main)
