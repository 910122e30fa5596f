"""Knowledge distillation during masked-LM pre-training (DistilBERT; Sanh et al., 2019).

A frozen teacher (a lab run directory or `hf:<dir>`, `config.distill.teacher`) and the student see
the same masked batches (the MLM data of mlm.py, without sentence pairs). The loss is Hugging Face's
research script's (examples/research_projects/distillation/distiller.py):

  alpha_ce  * KL(softmax(t / T) || softmax(s / T)) * T^2   the soft-target term, mean over positions
  alpha_mlm * cross entropy(s, masked tokens)              the student's own MLM loss
  alpha_cos * mean(1 - cos(h_s, h_t))                      last hidden states aligned

with defaults 5 / 2 / 1 and T = 2. As in the script's default (`restrict_ce_to_mask=False`), the KL
and cosine terms average over every real (non-padding) token; `distill.restrict_ce_to_mask=True`
averages the KL over the masked positions only. Each term is reported as its own metric.

The teacher is never differentiated, is not in the optimizer state and is not written into the
student's checkpoints; they record its source and a fingerprint of its parameters, and resuming
with another teacher is refused (train.py). `distill.student_init='teacher_layers'` initializes the
student from the teacher: layer i of the student is teacher layer `teacher_layers[i]` (DistilBERT:
[0, 2, 4, 7, 9, 11] of 12), embeddings and the MLM head are copied; `'none'` starts from scratch.
"""

from __future__ import annotations

import functools
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lab.models.config import ConfigError, ModelConfig
from flaxformer_lab.models.stack import convert_layer_params
from flaxformer_lab.tasks import base
from flaxformer_lab.tasks.mlm import MaskedLanguageModelling

# Student parameters that come from the teacher's per-layer stack when initialized from it.
_STACK = 'encoder'


def _teacher_source(config) -> str:
  teacher = str(config.distill.teacher or '')
  if not teacher:
    raise ConfigError('config.task=distill needs config.distill.teacher: a lab run directory of '
                      'an MLM model or hf:<dir> of a Hugging Face *ForMaskedLM checkpoint')
  return teacher


@functools.lru_cache(maxsize=4)
def _teacher_model_config(teacher: str) -> ModelConfig:
  if teacher.startswith('hf:'):
    from flaxformer_lab.interop import huggingface  # pylint: disable=g-import-not-at-top
    return huggingface.model_config_from_hf(teacher[3:])
  from flaxformer_lab import rundir  # pylint: disable=g-import-not-at-top
  return ModelConfig.from_dict(rundir.RunDir(teacher).load_config().model)


@base.register
class Distillation(MaskedLanguageModelling):
  name = 'distill'
  families = ('encoder',)
  heads = ('mlm', 'mlm_nsp')
  default_for_heads = ()
  gathers_predictions = False  # the KL term reads every position's logits
  report = {'loss': ('loss_sum', 'loss_count'),
            'kl_loss': ('kl_sum', 'kl_count'),
            'mlm_loss': ('mlm_loss_sum', 'loss_count'),
            'mlm_accuracy': ('correct_sum', 'loss_count'),
            'cos_loss': ('cos_sum', 'cos_count')}

  # --- config ----------------------------------------------------------------------------------

  def validate(self, config, model_cfg):
    super().validate(config, model_cfg)
    if 'distill' not in config:
      raise ConfigError('config.task=distill needs a config.distill section '
                        '(presets.common.distill_config(); see configs/distilbert.py:distill)')
    d = config.distill
    if config.data.mlm_pairs:
      raise ConfigError('config.task=distill trains without sentence pairs (as DistilBERT): set '
                        "config.data.mlm_pairs=''")
    if float(d.temperature) <= 0:
      raise ConfigError(f'config.distill.temperature={d.temperature} must be > 0')
    for name in ('alpha_ce', 'alpha_mlm', 'alpha_cos'):
      if float(d[name]) < 0:
        raise ConfigError(f'config.distill.{name}={d[name]} must be >= 0')
    if d.student_init not in ('teacher_layers', 'none'):
      raise ConfigError(f"config.distill.student_init={d.student_init!r} is not 'teacher_layers' "
                        "or 'none'")
    teacher = _teacher_source(config)
    try:
      t = _teacher_model_config(teacher)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f'config.distill.teacher={teacher}: {str(e).splitlines()[0]}') from e
    if t.family != 'encoder' or t.head not in ('mlm', 'mlm_nsp'):
      raise ConfigError(f'config.distill.teacher={teacher} is a {t.family} with head {t.head!r}; '
                        'the teacher must be an encoder with an MLM head')
    if t.vocab_size != model_cfg.vocab_size:
      raise ConfigError(f'the teacher has vocab_size {t.vocab_size}, the student '
                        f'{model_cfg.vocab_size}: set config.model.vocab_size={t.vocab_size}')
    if float(d.alpha_cos) > 0 and t.d_model != model_cfg.d_model:
      raise ConfigError(f'the cosine loss needs the teacher width ({t.d_model}) = student width '
                        f'({model_cfg.d_model}): set config.distill.alpha_cos=0 or model.d_model')
    if d.student_init == 'teacher_layers':
      layers = [int(i) for i in d.teacher_layers]
      if t.d_model != model_cfg.d_model or t.mlp_dim != model_cfg.mlp_dim or (
          t.num_heads != model_cfg.num_heads):
        raise ConfigError(
            f'distill.student_init=teacher_layers copies teacher layers, so the student needs '
            f'the teacher width (d_model {t.d_model}, mlp_dim {t.mlp_dim}, num_heads '
            f'{t.num_heads}); got {model_cfg.d_model}/{model_cfg.mlp_dim}/{model_cfg.num_heads}: '
            "change the student or set distill.student_init='none'")
      if len(layers) != model_cfg.num_layers:
        raise ConfigError(f'config.distill.teacher_layers has {len(layers)} entries for a student '
                          f'of model.num_layers={model_cfg.num_layers}')
      if any(not 0 <= i < t.num_layers for i in layers):
        raise ConfigError(f'config.distill.teacher_layers={layers} names layers outside the '
                          f"teacher's 0..{t.num_layers - 1}")
      if model_cfg.share_layers not in (0, model_cfg.num_layers) or (
          t.share_layers not in (0, t.num_layers)):
        raise ConfigError('distill.student_init=teacher_layers needs unshared layers '
                          '(model.share_layers=0) in teacher and student')

  def default_evals(self, config):
    out = super().default_evals(config)
    out['teacher'] = dict(type='teacher_agreement', every=int(config.eval_every),
                          split=config.data.eval_split,
                          max_batches=int(config.data.eval_batches))
    return out

  # --- the teacher -----------------------------------------------------------------------------

  def frozen_models(self, config):
    from flaxformer_lab import rundir  # pylint: disable=g-import-not-at-top
    teacher = _teacher_source(config)
    cfg = _teacher_model_config(teacher)
    if teacher.startswith('hf:'):
      from flaxformer_lab.interop import huggingface  # pylint: disable=g-import-not-at-top
      params, fresh = huggingface.load_params_for_config(teacher[3:], cfg)
      if fresh:
        raise ConfigError(f'config.distill.teacher={teacher} lacks weights the teacher needs: '
                          f'{", ".join(fresh[:4])}')
    else:
      params = rundir.RunDir(teacher).restore_params()
    params = jax.tree.map(np.asarray, params)
    return {'teacher': base.FrozenModel(cfg, params, teacher, rundir.fingerprint(params))}

  def tokenizer(self, config):
    from flaxformer_lab import rundir  # pylint: disable=g-import-not-at-top
    return rundir.source_tokenizer(_teacher_source(config))

  def initialize(self, config, host_params, frozen_models):
    if config.distill.student_init == 'none':
      return None
    return init_student_from_teacher(host_params(), frozen_models['teacher'].params,
                                     [int(i) for i in config.distill.teacher_layers])

  # --- loss ------------------------------------------------------------------------------------

  def terms(self, s_out, t_out, batch, config):
    """The metric sums of the three terms (and the total) for one batch."""
    d = config.distill
    temperature = float(d.temperature)
    t_out = jax.tree.map(jax.lax.stop_gradient, t_out)
    real = (batch['segment_ids'] != 0).astype(jnp.float32)  # [B, L]
    masked = batch['weights'].astype(jnp.float32)  # [B, L]
    kl_weights = masked if d.restrict_ce_to_mask else real
    s_logp = jax.nn.log_softmax(s_out['logits'].astype(jnp.float32) / temperature, axis=-1)
    t_logp = jax.nn.log_softmax(t_out['logits'].astype(jnp.float32) / temperature, axis=-1)
    kl_BxL = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * temperature**2
    s_h, t_h = s_out['hidden'].astype(jnp.float32), t_out['hidden'].astype(jnp.float32)
    cos_BxL = jnp.sum(s_h * t_h, -1) / jnp.maximum(
        jnp.linalg.norm(s_h, axis=-1) * jnp.linalg.norm(t_h, axis=-1), 1e-8)
    mlm_loss, nll, correct, count = base.cross_entropy(s_out['logits'], batch['targets'], masked)
    kl_sum, kl_count = jnp.sum(kl_BxL * kl_weights), jnp.sum(kl_weights)
    cos_sum, cos_count = jnp.sum((1.0 - cos_BxL) * real), jnp.sum(real)
    total = (float(d.alpha_ce) * kl_sum / jnp.maximum(kl_count, 1.0)
             + float(d.alpha_mlm) * mlm_loss / jnp.maximum(count, 1.0)
             + float(d.alpha_cos) * cos_sum / jnp.maximum(cos_count, 1.0))
    # loss_sum / loss_count is the total: scaled by the MLM denominator to aggregate like it.
    return dict(loss_sum=total * count, loss_count=count, kl_sum=kl_sum, kl_count=kl_count,
                mlm_loss_sum=mlm_loss, nll_sum=nll, correct_sum=correct, cos_sum=cos_sum,
                cos_count=cos_count)

  def make_loss(self, models, frozen, config):
    student, teacher = models['model'], models['teacher']
    t_params = frozen['teacher']

    def loss_fn(params, batch, rng):
      inputs = self.model_inputs(batch)
      s_out = student.apply({'params': params}, **inputs, rngs={'dropout': rng})
      t_out = teacher.apply({'params': t_params}, **self.teacher_inputs(batch, models))
      sums = self.terms(s_out, t_out, batch, config)
      return sums['loss_sum'] / jnp.maximum(sums['loss_count'], 1.0), sums

    return loss_fn

  def make_eval(self, models, frozen, config):
    student, teacher = models['eval_model'], models['teacher']

    def eval_fn(params, batch):
      s_out = student.apply({'params': params}, **self.model_inputs(batch))
      t_out = teacher.apply({'params': frozen['teacher']}, **self.teacher_inputs(batch, models))
      return self.terms(s_out, t_out, batch, config)

    return eval_fn

  def make_agreement(self, models, frozen, config):
    """`fn(params, batch) -> {agree_sum, kl_sum, count}` over the masked positions: how often the
    student's top prediction is the teacher's, and KL(teacher || student) at T = 1."""
    del config
    student, teacher = models['eval_model'], models['teacher']

    def fn(params, batch):
      s = student.apply({'params': params}, **self.model_inputs(batch))['logits']
      t = teacher.apply({'params': frozen['teacher']}, **self.teacher_inputs(batch, models))
      t = t['logits']
      w = batch['weights'].astype(jnp.float32)
      agree = (jnp.argmax(s, -1) == jnp.argmax(t, -1)).astype(jnp.float32)
      s_logp = jax.nn.log_softmax(s.astype(jnp.float32), -1)
      t_logp = jax.nn.log_softmax(t.astype(jnp.float32), -1)
      kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), -1)
      return {'agree_sum': jnp.sum(agree * w), 'kl_sum': jnp.sum(kl * w), 'count': jnp.sum(w)}

    return fn

  @staticmethod
  def teacher_inputs(batch, models):
    """The teacher sees the student's inputs; token types only if it has them."""
    inputs = dict(input_ids=batch['inputs'], segment_ids=batch['segment_ids'],
                  positions=batch['positions'])
    if models['teacher'].config.type_vocab_size:
      inputs['token_type_ids'] = batch['token_type_ids']
    return inputs


def init_student_from_teacher(student: Any, teacher: Any, teacher_layers: list[int]) -> Any:
  """The student's parameters with layer i taken from teacher layer `teacher_layers[i]` and every
  other student parameter (embeddings, heads, norms) copied from the teacher's same path.

  Works for scanned (`layers`, stacked) and looped (`layers_i`) trees on either side. A student
  parameter the teacher lacks, or of another shape, is an error naming it; teacher parameters
  the student lacks (token types, pooler, pair head) are left out.
  """
  scanned = 'layers' in student.get(_STACK, {})
  s_flat = traverse_util.flatten_dict(convert_layer_params(student, scanned=False), sep='/')
  t_flat = traverse_util.flatten_dict(convert_layer_params(teacher, scanned=False), sep='/')
  out, problems = {}, []
  for key, value in s_flat.items():
    parts = key.split('/')
    source = key
    if parts[0] == _STACK and parts[1].startswith('layers_'):
      i = int(parts[1][len('layers_'):])
      source = '/'.join([_STACK, f'layers_{teacher_layers[i]}', *parts[2:]])
    if source not in t_flat:
      problems.append(f'{key} (teacher has no {source})')
      continue
    t_value = np.asarray(t_flat[source])
    if t_value.shape != np.shape(value):
      problems.append(f'{key}: teacher {list(t_value.shape)} vs student {list(np.shape(value))}')
      continue
    out[key] = t_value.astype(np.asarray(value).dtype)
  if problems:
    raise ConfigError('cannot initialize the student from the teacher: ' + '; '.join(problems[:4])
                      + ("; set distill.student_init='none'" if problems else ''))
  return convert_layer_params(traverse_util.unflatten_dict(out, sep='/'), scanned=scanned)
