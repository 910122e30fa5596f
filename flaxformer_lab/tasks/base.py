"""The objective interface: everything about one training objective, declared in one place.

An objective says
  - what it trains: the model families and heads it accepts (`families`, `heads`), and which head
    it is the default objective of (`default_for_heads`, used when a checkpoint is imported);
  - what data it needs and how examples become features: the kinds of data set it reads
    (`data_kinds`), the text fields a tokenizer learns from, per-example `tokenize`, an optional
    per-epoch random transform (masking), whether rows may be packed, the padded lengths and pad
    values of its sequence features, and `finalize` (a packed/padded batch -> its batch keys);
  - what the model sees (`model_inputs`) and how outputs are scored (`score` -> metric sums);
  - its loss *factory* `make_loss(models, frozen, config) -> loss_fn(params, batch, rng)`, which
    receives the named models (`model` with dropout, `eval_model`, and any frozen ones) and the
    frozen parameters it declared (`frozen_models`);
  - its config rules (`validate`) and default evaluations (`default_evals`).

The data pipeline, the config validation, the train loop and the Hugging Face importer ask the
objective; none of them tests an objective's name. Adding an objective is one file in this folder
(a subclass with `name = '...'`, registered by `@register`) plus a config that sets `config.task`.

Metrics are sums with their denominators (`*_sum`, `*_count`) so that they aggregate exactly over
micro-batches, devices and evaluation batches; `report` names the ratios that are logged.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from typing import Any, Callable, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def random_ids(config: Any, rng: np.random.Generator, shape) -> np.ndarray:
  """Token ids drawn uniformly above the special ids (benchmarks' synthetic batches)."""
  return rng.integers(5, int(config.model.vocab_size), size=shape).astype(np.int32)


def arange_rows(b: int, l: int) -> np.ndarray:
  return np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy()

from flaxformer_lab.losses import cross_entropy  # pylint: disable=unused-import  (re-exported)
from flaxformer_lab.models.config import ConfigError

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class DataContext:
  """What an objective's data functions may read: the tokenizer, the data set's field names and
  the run's lengths and data config."""
  tokenizer: Any
  spec: Any  # sources.Spec: kind, text_field, source_field, label_field, num_classes
  seq_len: int
  target_len: int
  data_config: Any


@dataclasses.dataclass(frozen=True)
class FrozenModel:
  """A model the objective uses but never trains (a distillation teacher)."""
  model_config: Any  # models.config.ModelConfig
  params: Any  # host numpy tree
  source: str  # where it came from (a run directory or hf:<dir>)
  fingerprint: str  # content hash of `params` (rundir.fingerprint)


class Objective:
  """Base class; subclasses override what differs (see the module docstring)."""

  name: ClassVar[str] = ''
  families: ClassVar[tuple[str, ...]] = ()
  heads: ClassVar[tuple[str, ...]] = ()
  default_for_heads: ClassVar[tuple[str, ...]] = ()
  data_kinds: ClassVar[tuple[str, ...]] = ()
  # metric name -> (numerator key, denominator key) reported as numerator / denominator
  report: ClassVar[Mapping[str, tuple[str, str]]] = {}
  perplexity: ClassVar[bool] = False
  tokens_key: ClassVar[str] = 'segment_ids'  # batch key whose non-zero entries count as tokens
  fans_out: ClassVar[bool] = False  # tokenize returns a list of elements (flattened)
  encoder_decoder_lengths: ClassVar[bool] = False  # a separate target_len for the decoder
  language_ids: ClassVar[bool] = False  # batches carry `language_ids` (model.num_languages needs it)

  def __init__(self, config: Any = None):
    self.config = config

  # --- config ------------------------------------------------------------------------------------

  def validate(self, config: Any, model_cfg: Any) -> None:
    """Raises ConfigError naming the key to change. Subclasses call super() and add rules."""
    if model_cfg.family not in self.families:
      raise ConfigError(f'config.task={self.name!r} needs model.family in {self.families}, got '
                        f'{model_cfg.family!r}')
    if model_cfg.head not in self.heads:
      raise ConfigError(f'config.task={self.name!r} needs model.head in {self.heads}, got '
                        f'{model_cfg.head!r}')
    if model_cfg.num_languages and not self.language_ids:
      raise ConfigError(
          f'model.num_languages={model_cfg.num_languages} adds language embeddings, but '
          f'config.task={self.name!r} gives no language_ids: set model.num_languages=0 or use an '
          'objective that gives them (xlm)')
    smoothing = float(config.get('label_smoothing', 0.0))
    if not 0.0 <= smoothing < 1.0:
      raise ConfigError(f'config.label_smoothing={smoothing} must be in [0, 1)')

  def adapt_config(self, config: Any, model_cfg: Any) -> None:
    """Adjusts data settings to a model imported with this objective's default head (e.g. no
    sentence pairs for an MLM head without a pair classifier)."""
    del config, model_cfg

  def default_evals(self, config: Any) -> dict[str, dict[str, Any]]:
    """Evaluations run when config.evals does not name them: metrics on the eval split."""
    return {'eval': dict(type='metrics', every=int(config.eval_every),
                         split=config.data.eval_split, max_batches=int(config.data.eval_batches))}

  def tokenizer(self, config: Any) -> Any:
    """A tokenizer the objective imposes (a teacher's), or None for the configured one."""
    del config
    return None

  def initialize(self, config: Any, host_params: Callable[[], Any],
                 frozen_models: Mapping[str, FrozenModel]) -> Any:
    """New parameters for a fresh run (a student copied from its teacher), or None to keep the
    initialized ones; `host_params()` fetches those. Called once, before step 1, after
    `init_from`."""
    del config, host_params, frozen_models
    return None

  def frozen_models(self, config: Any) -> dict[str, FrozenModel]:
    """Named frozen models (never differentiated, not in the optimizer state or checkpoint)."""
    del config
    return {}

  # --- data --------------------------------------------------------------------------------------

  def text_fields(self, spec: Any) -> tuple[str, ...]:
    """Fields a trained tokenizer learns from."""
    return (spec.text_field,)

  def target_len(self, data_config: Any) -> int:
    return (data_config.target_len or data_config.seq_len) if self.encoder_decoder_lengths else (
        data_config.seq_len)

  def check_data(self, data_config: Any, kind: str) -> None:
    """Raises ValueError when the data set (of `kind`) or its settings do not fit."""
    if kind not in self.data_kinds:
      raise ValueError(f'task {self.name!r} cannot read data set {data_config.name!r} (a {kind} '
                       f'data set); it needs one of kind {", ".join(self.data_kinds)}')

  def check_bundle(self, config: Any, bundle: Any) -> None:
    """Checks the model against the prepared data (e.g. the number of classes)."""
    del config, bundle

  def windows(self, spec: Any) -> bool:
    """Whether a stream data set is cut into fixed windows (one segment per row)."""
    del spec
    return False

  def documents(self, source: Any, split: str) -> Sequence[dict]:
    """The examples of `split` that `tokenize` receives."""
    return source.split(split)

  def read_documents(self, ctx: DataContext, source: Any, split: str) -> Sequence[Any]:
    """What the pipeline maps `tokenize` over: `documents(source, split)`, unless the objective
    must see the tokenizer to regroup them (RoBERTa's FULL-SENTENCES rows span documents)."""
    del ctx
    return self.documents(source, split)

  def train_streams(self, source: Any) -> list[Sequence[dict]] | None:
    """Several training streams (documents each), or None for one, `documents(source, 'train')`.
    Each stream is tokenized, transformed, packed and batched on its own, and the batches are
    interleaved in a fixed cycle, one of each stream in turn: every batch is homogeneous (XLM's
    alternating MLM / TLM steps)."""
    del source
    return None

  def tokenize(self, ctx: DataContext, index: int, example: dict) -> Any:
    """One example -> a feature dict (or a list of them when `fans_out`)."""
    raise NotImplementedError(f'{type(self).__name__} does not read examples')

  def random_transform(self, ctx: DataContext, documents: Sequence[dict]
                       ) -> Callable[[dict, np.random.Generator], dict] | None:
    """An (element, rng) -> element function applied anew every time an element is read (dynamic
    masking), or None."""
    del ctx, documents
    return None

  def packable(self, data_config: Any) -> bool:
    return bool(data_config.pack)

  def feature_lengths(self, seq_len: int, target_len: int) -> dict[str, int]:
    raise NotImplementedError

  def pad_values(self, tokenizer: Any) -> dict[str, int]:
    """Value that pads each sequence feature: the tokenizer's pad id unless overridden."""
    return {k: tokenizer.pad_id for k in self.feature_lengths(1, 1)}

  def finalize(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The objective's batch keys from a batch in the packer's layout (data/preprocess.py)."""
    raise NotImplementedError

  def synthetic_batch(self, config: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A full batch of random tokens with this objective's keys (one sequence per row, no
    padding), for benchmarks: `config.batch_size` rows of `config.data.seq_len`."""
    raise NotImplementedError(f'{type(self).__name__} has no synthetic batch')

  # --- model and loss ----------------------------------------------------------------------------

  def model_inputs(self, batch: Batch) -> dict[str, Any]:
    raise NotImplementedError

  def score(self, outputs: dict[str, Any], batch: Batch, label_smoothing: float
            ) -> dict[str, jax.Array]:
    raise NotImplementedError

  def loss(self, outputs, batch, label_smoothing: float = 0.0):
    """(mean loss, metric sums) for one batch."""
    sums = self.score(outputs, batch, label_smoothing)
    return sums['loss_sum'] / jnp.maximum(sums['loss_count'], 1.0), sums

  def make_loss(self, models: Mapping[str, Any], frozen: Mapping[str, Any], config: Any) -> LossFn:
    """The training loss: `loss_fn(params, batch, rng) -> (loss, metric sums)`.

    `models['model']` applies dropout (rng 'dropout'); `frozen` holds the parameters of the
    frozen models by name (traced arguments of the compiled step, never differentiated).
    """
    del frozen
    model, smoothing = models['model'], float(config.get('label_smoothing', 0.0))

    def loss_fn(params, batch, rng):
      outputs = model.apply({'params': params}, **self.model_inputs(batch), rngs={'dropout': rng})
      return self.loss(outputs, batch, smoothing)

    return loss_fn

  def make_eval(self, models: Mapping[str, Any], frozen: Mapping[str, Any], config: Any
                ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """`eval_fn(params, batch) -> metric sums` with the deterministic model, no smoothing."""
    del frozen, config
    model = models['eval_model']

    def eval_fn(params, batch):
      outputs = model.apply({'params': params}, **self.model_inputs(batch))
      return self.loss(outputs, batch, 0.0)[1]

    return eval_fn

  def summarize(self, sums: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Turns accumulated sums into reported metrics (loss, accuracy, perplexity...)."""
    out = {}
    for name, (num, den) in self.report.items():
      if sums.get(den, 0) > 0:
        out[f'{prefix}/{name}'] = float(sums[num]) / float(sums[den])
    if self.perplexity and f'{prefix}/nll' in out:
      out[f'{prefix}/perplexity'] = math.exp(min(out[f'{prefix}/nll'], 50.0))
    return out


# --- the registry ----------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Objective]] = {}


def paragraph_documents(source: Any, split: str) -> Sequence[Any]:
  """The documents of `split`: a stream data set's text cut into paragraphs (blank-line
  separated), any other kind's examples as they are."""
  examples = source.split(split)
  if source.spec.kind == 'stream':
    return [{'text': p} for ex in examples for p in ex['text'].split('\n\n') if p.strip()]
  return examples


def register(cls: type[Objective]) -> type[Objective]:
  """Class decorator: makes `cls` available as `config.task = cls.name`."""
  if not cls.name:
    raise TypeError(f'{cls.__name__} has no name')
  if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
    raise TypeError(f'two objectives are named {cls.name!r}')
  _REGISTRY[cls.name] = cls
  return cls


def _load_all() -> None:
  """Imports every module of this package, so that each file's `@register` has run."""
  package = importlib.import_module('flaxformer_lab.tasks')
  for info in pkgutil.iter_modules(package.__path__):
    if info.name != 'base':
      importlib.import_module(f'flaxformer_lab.tasks.{info.name}')


def objective_names() -> list[str]:
  _load_all()
  return sorted(_REGISTRY)


def get_objective(config_or_name: Any) -> Objective:
  """The objective of a config (`config.task`) or a name; ConfigError names the valid ones."""
  _load_all()
  name = config_or_name if isinstance(config_or_name, str) else config_or_name.task
  if name not in _REGISTRY:
    raise ConfigError(f'config.task={name!r} is not one of {", ".join(sorted(_REGISTRY))}')
  return _REGISTRY[name](None if isinstance(config_or_name, str) else config_or_name)


def objective_for_head(head: str) -> Objective | None:
  """The objective that trains `head` by default (importing a checkpoint), or None."""
  _load_all()
  for cls in _REGISTRY.values():
    if head in cls.default_for_heads:
      return cls(None)
  return None
