"""Evaluations built from `config.evals`, big_vision style.

`config.evals` maps a name to `{type, every, ...}`; the objective's `default_evals(config)` adds the
entries the config does not name (every objective: `eval`, metrics on the eval split). Types:

  metrics            the objective's metrics (loss, accuracy, perplexity, ...) on `split`;
                     `seq_len` > 0 evaluates at another length than training (a second pipeline,
                     built once): an LM stream split (tiny_shakespeare) is re-cut into
                     ceil((N - 1) / seq_len) non-overlapping windows, so every length scores the
                     same N - 1 targets when max_batches = 0 (max_batches = T / (batch x seq_len)
                     keeps the first T); a learned or sinusoidal table must hold seq_len rows
                     (model.max_len; rows past the training length stay untrained), the other
                     schemes take any length (experiments/position_extrapolation);
                     `data` = {key: value} evaluates on data built with those config.data keys
                     changed (a second pipeline, built once, same tokenizer), e.g. every arm of
                     a data-recipe ablation scored on the same rows (experiments/roberta_recipe)
  bleu               sacreBLEU of greedy or beam decoding on `split` (encoder_decoder)
  samples            a decoded sample from `prompt`, written to the log (decoder, encoder_decoder)
  teacher_agreement  distillation: how often the student's prediction equals the teacher's, and
                     KL(teacher || student), on the masked positions of `split`

`every`: k > 0 runs every k steps and at the end of training; 0 only at the end; < 0 never.
Scalars are written as `<prefix>/<metric>` (prefix default 'eval': `eval/loss`, `eval/bleu`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import numpy as np

from flaxformer_lab import sharding as shard_lib
from flaxformer_lab.models.config import ConfigError

_COMMON = {'type': '', 'every': 0, 'prefix': 'eval'}


@dataclasses.dataclass
class EvalContext:
  """What evaluators read: the run's pieces, built once by the train loop."""
  config: Any
  objective: Any
  setup: Any  # train.Setup: models, mesh, rules, shardings
  data: Any  # data.DataBundle
  frozen: Mapping[str, Any]  # frozen parameters on the mesh, by name
  frozen_shardings: Mapping[str, Any]
  _cache: dict = dataclasses.field(default_factory=dict)

  def cached(self, key, build):
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]


class Evaluator:
  """One entry of config.evals."""
  type: ClassVar[str] = ''
  options: ClassVar[dict[str, Any]] = {}  # the entry's keys (beyond type, every, prefix) + defaults
  families: ClassVar[tuple[str, ...]] = ('encoder', 'decoder', 'encoder_decoder')

  def __init__(self, name: str, entry: Mapping[str, Any], config: Any):
    self.name = name
    self.entry = {**_COMMON, **self.options, **dict(entry)}
    self.every = int(self.entry['every'])
    self.prefix = str(self.entry['prefix'])
    if 'split' in self.entry and not self.entry['split']:
      self.entry['split'] = config.data.eval_split
    if 'max_batches' in self.entry and self.entry['max_batches'] is None:
      self.entry['max_batches'] = int(config.data.eval_batches)

  def validate(self, config: Any, model_cfg: Any, objective: Any) -> None:
    unknown = sorted(set(self.entry) - set(_COMMON) - set(self.options))
    if unknown:
      raise ConfigError(f'config.evals.{self.name} has unknown key(s) {", ".join(unknown)}; '
                        f'a {self.type} evaluation takes {", ".join(sorted(self.options)) or "none"}'
                        ' besides type, every and prefix')
    if model_cfg.family not in self.families:
      raise ConfigError(f'config.evals.{self.name}: a {self.type} evaluation needs model.family in '
                        f'{self.families}, got {model_cfg.family!r}')
    del objective

  def metric_names(self, objective: Any) -> set[str]:
    """The scalar names this evaluator writes (to reject two entries writing the same one)."""
    del objective
    return set()

  def due(self, step: int, final: bool) -> bool:
    if self.every < 0:
      return False
    return final or (self.every > 0 and step % self.every == 0)

  def run(self, ctx: EvalContext, step: int, params: Any) -> tuple[dict[str, float], list[str]]:
    raise NotImplementedError


_TYPES: dict[str, type[Evaluator]] = {}


def _register(cls):
  _TYPES[cls.type] = cls
  return cls


def host_params(params):
  """Parameters as host arrays on every process (gathered across processes when sharded)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def _sum_batches(step_fn, ctx: EvalContext, params, batches) -> dict[str, float]:
  totals: dict[str, float] = {}
  sh = shard_lib.batch_sharding(ctx.setup.mesh)
  with shard_lib.use_mesh(ctx.setup.mesh, ctx.setup.rules):
    for batch in batches:
      sums = step_fn(params, shard_lib.make_global_batch(batch, sh), ctx.frozen)
      for k, v in jax.device_get(sums).items():
        totals[k] = totals.get(k, 0.0) + float(v)
  return totals


def _jit_eval(ctx: EvalContext, fn_of):
  """jit of `fn(params, batch, frozen)` built from the objective, placed like the train step."""
  setup = ctx.setup

  def step_fn(params, batch, frozen):
    return fn_of(frozen)(params, batch)

  return jax.jit(step_fn, in_shardings=(setup.state_shardings['params'],
                                        shard_lib.batch_sharding(setup.mesh),
                                        dict(ctx.frozen_shardings)),
                 out_shardings=shard_lib.replicated(setup.mesh))


@_register
class MetricsEval(Evaluator):
  type = 'metrics'
  options = {'split': '', 'max_batches': None, 'seq_len': 0, 'data': {}}

  def overrides(self) -> dict[str, Any]:
    """The config.data keys this evaluation changes (`data`, plus `seq_len` when > 0)."""
    data = self.entry['data']
    out = dict(data.to_dict() if hasattr(data, 'to_dict') else data)
    if int(self.entry['seq_len']):
      out['seq_len'] = int(self.entry['seq_len'])
    return out

  def data_config(self, config):
    """A copy of the run's config with this evaluation's data overrides applied."""
    config = copy.deepcopy(config)
    with config.unlocked():
      for key, value in self.overrides().items():
        try:
          config.data[key] = value
        except (TypeError, ValueError) as e:
          raise ConfigError(f'config.evals.{self.name}.data.{key}={value!r} does not fit '
                            f'config.data.{key}={config.data[key]!r}: {e}') from e
    return config

  def validate(self, config, model_cfg, objective):
    super().validate(config, model_cfg, objective)
    seq_len = int(self.entry['seq_len'])
    if seq_len < 0:
      raise ConfigError(f'config.evals.{self.name}.seq_len={seq_len} must be >= 0 (0 = training)')
    data = self.entry['data']
    if not hasattr(data, 'items'):
      raise ConfigError(f'config.evals.{self.name}.data={data!r} must be a dict of config.data '
                        'keys to evaluate with, e.g. dict(mlm_masking="static")')
    unknown = sorted(k for k in data.keys() if k not in config.data)
    if unknown:
      raise ConfigError(f'config.evals.{self.name}.data has unknown key(s) {", ".join(unknown)}:'
                        ' it overrides config.data, which has no such key')
    if seq_len and 'seq_len' in data:
      raise ConfigError(f'config.evals.{self.name} sets both seq_len and data.seq_len: keep one')
    seq_len = int(self.overrides().get('seq_len', 0))
    if seq_len and model_cfg.position in ('learned', 'sinusoidal') and (
        seq_len + model_cfg.position_offset > model_cfg.max_len):
      raise ConfigError(f'config.evals.{self.name}.seq_len={seq_len} does not fit the '
                        f'{model_cfg.position} position table of model.max_len='
                        f'{model_cfg.max_len}: raise model.max_len (the table rows past the '
                        'training length are then never trained) or lower the length')
    if data:
      try:
        objective.validate(self.data_config(config), model_cfg)
      except ConfigError as e:
        raise ConfigError(f'config.evals.{self.name}.data: {e}') from e

  def metric_names(self, objective):
    return {f'{self.prefix}/{m}' for m in objective.report}

  def _data(self, ctx: EvalContext):
    changed = {k: v for k, v in self.overrides().items() if ctx.config.data[k] != v}
    if not changed:
      return ctx.data

    def build():
      from flaxformer_lab import data as data_lib  # pylint: disable=g-import-not-at-top
      return data_lib.make_datasets(self.data_config(ctx.config),
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(), tokenizer=ctx.data.tokenizer)

    return ctx.cached(('data', tuple(sorted(changed.items()))), build)

  def run(self, ctx, step, params):
    step_fn = ctx.cached('metrics_step', lambda: _jit_eval(
        ctx, lambda frozen: ctx.objective.make_eval(ctx.setup.models, frozen, ctx.config)))
    batches = self._data(ctx).eval_batches(self.entry['split'], int(self.entry['max_batches']))
    totals = _sum_batches(step_fn, ctx, params, batches)
    return ctx.objective.summarize(totals, self.prefix), []


@_register
class BleuEval(Evaluator):
  type = 'bleu'
  options = {'split': '', 'max_batches': None, 'strategy': 'greedy', 'num_beams': 4,
             'length_penalty': 0.6}
  families = ('encoder_decoder',)

  def validate(self, config, model_cfg, objective):
    super().validate(config, model_cfg, objective)
    if self.entry['strategy'] not in ('greedy', 'beam'):
      raise ConfigError(f'config.evals.{self.name}.strategy={self.entry["strategy"]!r} is not '
                        "'greedy' or 'beam'")

  def metric_names(self, objective):
    return {f'{self.prefix}/bleu'}

  def run(self, ctx, step, params):
    from flaxformer_lab import decoding  # pylint: disable=g-import-not-at-top
    batches = ctx.data.eval_batches(self.entry['split'], int(self.entry['max_batches']))
    score = decoding.bleu_score(ctx.config, host_params(params), ctx.data.tokenizer, batches,
                                strategy=self.entry['strategy'],
                                num_beams=int(self.entry['num_beams']),
                                length_penalty=float(self.entry['length_penalty']))
    return {f'{self.prefix}/bleu': score}, []


@_register
class SamplesEval(Evaluator):
  type = 'samples'
  options = {'prompt': '', 'max_new_tokens': 64, 'temperature': 0.8, 'top_k': 0, 'top_p': 0.95}
  families = ('decoder', 'encoder_decoder')

  def validate(self, config, model_cfg, objective):
    super().validate(config, model_cfg, objective)
    if int(self.entry['max_new_tokens']) < 1:
      raise ConfigError(f'config.evals.{self.name}.max_new_tokens must be >= 1')
    if float(self.entry['temperature']) < 0:
      raise ConfigError(f'config.evals.{self.name}.temperature must be >= 0')
    if not 0 < float(self.entry['top_p']) <= 1:
      raise ConfigError(f'config.evals.{self.name}.top_p must be in (0, 1]')

  def run(self, ctx, step, params):
    from flaxformer_lab import decoding  # pylint: disable=g-import-not-at-top
    text = decoding.sample_text(ctx.config, host_params(params), ctx.data.tokenizer,
                                str(self.entry['prompt']), seed=step,
                                max_new_tokens=int(self.entry['max_new_tokens']),
                                temperature=float(self.entry['temperature']),
                                top_k=int(self.entry['top_k']), top_p=float(self.entry['top_p']))
    return {}, [f'sample at step {step}: {text!r}']


@_register
class TeacherAgreementEval(Evaluator):
  type = 'teacher_agreement'
  options = {'split': '', 'max_batches': None}

  def validate(self, config, model_cfg, objective):
    super().validate(config, model_cfg, objective)
    if not hasattr(objective, 'make_agreement'):
      raise ConfigError(f'config.evals.{self.name}: a teacher_agreement evaluation needs an '
                        f'objective with a teacher (config.task=distill), not {objective.name!r}')

  def metric_names(self, objective):
    return {f'{self.prefix}/teacher_agreement', f'{self.prefix}/teacher_kl'}

  def run(self, ctx, step, params):
    step_fn = ctx.cached('agreement_step', lambda: _jit_eval(
        ctx, lambda frozen: ctx.objective.make_agreement(ctx.setup.models, frozen, ctx.config)))
    batches = ctx.data.eval_batches(self.entry['split'], int(self.entry['max_batches']))
    t = _sum_batches(step_fn, ctx, params, batches)
    n = max(t['count'], 1.0)
    return {f'{self.prefix}/teacher_agreement': t['agree_sum'] / n,
            f'{self.prefix}/teacher_kl': t['kl_sum'] / n}, []


def evaluator_types() -> list[str]:
  return sorted(_TYPES)


def build_evaluators(config: Any, objective: Any, model_cfg: Any) -> list[Evaluator]:
  """The evaluations of a run, validated (ConfigError, one line, names the entry)."""
  entries = dict(objective.default_evals(config))
  for name, entry in (config.get('evals') or {}).items():
    entries[name] = entry.to_dict() if hasattr(entry, 'to_dict') else dict(entry)
  out, written = [], {}
  for name, entry in entries.items():
    kind = entry.get('type', '')
    if kind not in _TYPES:
      raise ConfigError(f'config.evals.{name}.type={kind!r} is not one of '
                        f'{", ".join(evaluator_types())}')
    ev = _TYPES[kind](name, entry, config)
    ev.validate(config, model_cfg, objective)
    for metric in ev.metric_names(objective):
      if metric in written:
        raise ConfigError(f'config.evals.{name} and config.evals.{written[metric]} both write '
                          f'{metric}: give one of them another prefix')
      written[metric] = name
    out.append(ev)
  return out


def mean_of(values) -> float:
  return float(np.mean(values)) if len(values) else float('nan')
