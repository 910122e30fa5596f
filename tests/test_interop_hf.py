"""Hugging Face interop: every supported family and head against transformers (torch, CPU).

Each case builds a randomly initialized HF model of small, unusual sizes (d_model 24, 3 heads,
3 layers, vocab 97, mlp 37; T5 with d_kv 7 and 2 decoder layers; ALBERT with E = 10), perturbs every
weight (so that biases and norm parameters are not 0 / 1), saves it with save_pretrained, loads it
in the lab and compares outputs on padded batches at every position (pads included: the lab
matches Hugging Face there too). Then lab -> HF -> lab must be exact, the exported directory must
hold the keys HF itself writes, and transformers must give the same outputs from it.
"""

from __future__ import annotations

import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

from flaxformer_lab.presets import common  # pylint: disable=g-import-not-at-top,g-bad-import-order
from flaxformer_lab.interop import hf_mapping  # pylint: disable=g-import-not-at-top
from flaxformer_lab.interop import huggingface as hf  # pylint: disable=g-import-not-at-top
from flaxformer_lab.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
from flaxformer_lab.models.transformer import build_model  # pylint: disable=g-import-not-at-top
from flaxformer_lab.models.transformer import dummy_inputs  # pylint: disable=g-import-not-at-top

jax.config.update('jax_default_matmul_precision', 'highest')
transformers.logging.set_verbosity_error()

TOL = 1e-4
V, D, H, L, F, P = 97, 24, 3, 3, 37, 40  # vocab, width, heads, layers, mlp, positions


def _bert_like(cls, **kw):
  kw = {'max_position_embeddings': P, **kw}
  return cls(vocab_size=V, hidden_size=D, num_attention_heads=H, num_hidden_layers=L,
             intermediate_size=F, **kw)


HF_CONFIGS = {
    'bert': lambda: _bert_like(transformers.BertConfig, hidden_act='gelu', num_labels=3),
    'roberta': lambda: _bert_like(transformers.RobertaConfig, type_vocab_size=1,
                                  max_position_embeddings=P + 2, layer_norm_eps=1e-5),
    'xlmr': lambda: _bert_like(transformers.XLMRobertaConfig, type_vocab_size=1,
                               max_position_embeddings=P + 2),
    'albert': lambda: _bert_like(transformers.AlbertConfig, embedding_size=10),
    'albert3': lambda: _bert_like(transformers.AlbertConfig, embedding_size=10,
                                  num_hidden_groups=3, hidden_act='gelu'),
    'distilbert': lambda: transformers.DistilBertConfig(
        vocab_size=V, dim=D, n_heads=H, n_layers=L, hidden_dim=F, max_position_embeddings=P),
    'gpt2': lambda: transformers.GPT2Config(vocab_size=V, n_embd=D, n_head=H, n_layer=L, n_inner=F,
                                            n_positions=P, bos_token_id=1, eos_token_id=2),
    'gpt2_untied': lambda: transformers.GPT2Config(
        vocab_size=V, n_embd=D, n_head=H, n_layer=L, n_inner=F, n_positions=P,
        activation_function='gelu', tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    't5': lambda: transformers.T5Config(vocab_size=V, d_model=D, d_kv=7, d_ff=F, num_layers=L,
                                        num_decoder_layers=2, num_heads=H,
                                        relative_attention_num_buckets=8,
                                        relative_attention_max_distance=12),
    't5_v11': lambda: transformers.T5Config(
        vocab_size=V, d_model=D, d_kv=7, d_ff=F, num_layers=L, num_decoder_layers=2, num_heads=H,
        feed_forward_proj='gated-gelu', tie_word_embeddings=False),
    'bart': lambda: transformers.BartConfig(
        vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=2, encoder_attention_heads=H,
        decoder_attention_heads=H, encoder_ffn_dim=F, decoder_ffn_dim=F, max_position_embeddings=P,
        scale_embedding=True),
    # Stacks of different shapes: the decoder has its own heads and feed-forward width.
    'bart_asym': lambda: transformers.BartConfig(
        vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=2, encoder_attention_heads=H,
        decoder_attention_heads=2, encoder_ffn_dim=F, decoder_ffn_dim=29,
        max_position_embeddings=P),
    'marian_asym': lambda: transformers.MarianConfig(
        vocab_size=V, d_model=D, encoder_layers=2, decoder_layers=L, encoder_attention_heads=2,
        decoder_attention_heads=H, encoder_ffn_dim=29, decoder_ffn_dim=F,
        max_position_embeddings=P, pad_token_id=V - 1, decoder_start_token_id=V - 1,
        eos_token_id=0),
    'marian': lambda: transformers.MarianConfig(
        vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=2, encoder_attention_heads=H,
        decoder_attention_heads=H, encoder_ffn_dim=F, decoder_ffn_dim=F, max_position_embeddings=P,
        activation_function='swish', scale_embedding=True, pad_token_id=V - 1,
        decoder_start_token_id=V - 1, eos_token_id=0),
}

CASES = [
    ('bert', 'BertModel'), ('bert', 'BertForMaskedLM'), ('bert', 'BertForSequenceClassification'),
    ('bert', 'BertForPreTraining'), ('bert', 'BertForTokenClassification'),
    ('roberta', 'RobertaModel'), ('roberta', 'RobertaForMaskedLM'),
    ('roberta', 'RobertaForSequenceClassification'),
    ('xlmr', 'XLMRobertaForMaskedLM'), ('xlmr', 'XLMRobertaForSequenceClassification'),
    ('albert', 'AlbertModel'), ('albert', 'AlbertForMaskedLM'),
    ('albert', 'AlbertForSequenceClassification'), ('albert3', 'AlbertForPreTraining'),
    ('distilbert', 'DistilBertModel'), ('distilbert', 'DistilBertForMaskedLM'),
    ('distilbert', 'DistilBertForSequenceClassification'),
    ('gpt2', 'GPT2Model'), ('gpt2', 'GPT2LMHeadModel'), ('gpt2_untied', 'GPT2LMHeadModel'),
    ('t5', 'T5Model'), ('t5', 'T5ForConditionalGeneration'), ('t5', 'T5EncoderModel'),
    ('t5_v11', 'T5ForConditionalGeneration'),
    ('bart', 'BartModel'), ('bart', 'BartForConditionalGeneration'),
    ('marian', 'MarianModel'), ('marian', 'MarianMTModel'),
    ('bart_asym', 'BartForConditionalGeneration'), ('marian_asym', 'MarianMTModel'),
]


def make_hf(kind: str, arch: str, path: str, seed: int = 0):
  """A perturbed random HF model saved with save_pretrained; returns the torch model."""
  torch.manual_seed(seed)
  model = getattr(transformers, arch)(HF_CONFIGS[kind]()).eval()
  with torch.no_grad():
    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if n.endswith('final_logits_bias')]
    for name, p in tensors:
      if 'embed_positions' in name and kind.startswith('marian'):
        continue  # Marian's sinusoidal tables are fixed (and checked on load)
      p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.3))
  model.save_pretrained(path)
  return model


def inputs(cfg: ModelConfig, seed: int = 0, batch: int = 3, length: int = 9, target: int = 7):
  """Random ids with right padding (pad tokens under attention_mask 0) in rows 1 and 2."""
  rng = np.random.default_rng(seed)
  real = [t for t in range(3, cfg.vocab_size) if t != cfg.pad_id]
  mask = np.ones((batch, length), np.int64)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids = np.where(mask == 1, rng.choice(real, (batch, length)), cfg.pad_id)
  kw = {'input_ids': ids, 'attention_mask': mask}
  if cfg.type_vocab_size > 1:
    kw['token_type_ids'] = (np.arange(length)[None] >= 4).astype(np.int64).repeat(batch, 0)
  if cfg.family == 'encoder_decoder':
    dmask = np.ones((batch, target), np.int64)
    dmask[0, 5:] = 0
    kw['decoder_input_ids'] = np.where(dmask == 1, rng.choice(real, (batch, target)), cfg.pad_id)
    kw['decoder_attention_mask'] = dmask
  return kw


def hf_outputs(model, kw) -> np.ndarray:
  with torch.no_grad():
    out = model(**{k: torch.tensor(v) for k, v in kw.items()})
  for name in ('logits', 'prediction_logits', 'last_hidden_state'):
    if getattr(out, name, None) is not None:
      return out[name].numpy()
  raise AssertionError(f'no output in {type(out)}')


def _init(cfg: ModelConfig, seed: int = 0):
  """Unboxed numpy params of a lab model (jitted init)."""
  init = jax.jit(lambda r: nn.meta.unbox(build_model(cfg).init(r, **dummy_inputs(cfg))['params']))
  return jax.tree.map(np.asarray, jax.device_get(init(jax.random.PRNGKey(seed))))


def _leaves_equal(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@pytest.mark.parametrize('kind,arch', CASES, ids=[f'{k}-{a}' for k, a in CASES])
def test_matches_transformers_and_round_trips(kind, arch, tmp_path):
  src, dst = str(tmp_path / 'hf'), str(tmp_path / 'export')
  model = make_hf(kind, arch, src)
  # Looped layers, op by op: half the time of compiling each small model. The default scanned,
  # jitted path is compared with transformers by the tests below.
  loaded = hf.load(src, scan_layers=False)
  loaded.jit = False
  assert loaded.architecture == arch
  kw = inputs(loaded.model_config)
  ref = hf_outputs(model, kw)
  out = np.asarray(loaded(**kw))
  assert out.shape == ref.shape
  diff = float(np.max(np.abs(out - ref)))
  print(f'{kind}/{arch}: max abs diff {diff:.2e} (all positions, pads included)')
  assert diff <= TOL, f'{arch}: max abs diff {diff}'

  hf.save(loaded, dst)
  ours, theirs = (load_file(os.path.join(d, 'model.safetensors')) for d in (dst, src))
  assert set(ours) == set(theirs), 'exported keys differ from those HF itself writes'
  assert all(np.array_equal(ours[k], theirs[k]) for k in ours), 'HF -> lab -> HF is not exact'
  again = hf.load(dst, scan_layers=False)
  assert again.model_config == loaded.model_config
  assert _leaves_equal(again.params, loaded.params), 'lab -> HF -> lab is not exact'
  exported = getattr(transformers, arch).from_pretrained(dst).eval()
  diff2 = float(np.max(np.abs(hf_outputs(exported, kw) - out)))
  assert diff2 <= TOL, f'transformers on the exported {arch}: max abs diff {diff2}'


def test_t5_v11_untied_lm_head(tmp_path):
  """A T5 v1.1 checkpoint whose lm_head differs from `shared` (as released v1.1 models store):
  transformers unties them, and so does the lab (tie_embeddings False, no output scaling)."""
  src = str(tmp_path / 'hf')
  make_hf('t5_v11', 'T5ForConditionalGeneration', src)
  file = os.path.join(src, 'model.safetensors')
  sd = load_file(file)
  sd['lm_head.weight'] = np.random.default_rng(0).normal(size=(V, D)).astype(np.float32)
  save_file(sd, file, metadata={'format': 'pt'})
  model = transformers.T5ForConditionalGeneration.from_pretrained(src).eval()
  loaded = hf.load(src)
  cfg = loaded.model_config
  assert not cfg.tie_embeddings and not cfg.logits_scale_tied and cfg.activation == 'geglu_tanh'
  kw = inputs(cfg)
  assert np.max(np.abs(np.asarray(loaded(**kw)) - hf_outputs(model, kw))) <= TOL
  dst = str(tmp_path / 'export')
  hf.save(loaded, dst)
  exported = transformers.T5ForConditionalGeneration.from_pretrained(dst).eval()
  assert np.max(np.abs(hf_outputs(exported, kw) - np.asarray(loaded(**kw)))) <= TOL
  assert _leaves_equal(hf.load(dst).params, loaded.params)


def test_class_is_taken_from_the_weights_when_config_json_understates_it(tmp_path):
  """bert-base-uncased says BertForMaskedLM but stores BertForPreTraining's pooler and NSP head."""
  src = str(tmp_path / 'hf')
  make_hf('bert', 'BertForPreTraining', src)
  with open(os.path.join(src, 'config.json')) as f:
    meta = json.load(f)
  meta['architectures'] = ['BertForMaskedLM']
  with open(os.path.join(src, 'config.json'), 'w') as f:
    json.dump(meta, f)
  loaded = hf.load(src)
  assert loaded.architecture == 'BertForPreTraining' and loaded.model_config.head == 'mlm_nsp'
  model = transformers.BertForMaskedLM.from_pretrained(src).eval()  # ignores pooler and NSP
  kw = inputs(loaded.model_config)
  assert np.max(np.abs(np.asarray(loaded(**kw)) - hf_outputs(model, kw))) <= TOL


def test_pytorch_bin_with_tied_duplicates(tmp_path):
  """pytorch_model.bin (torch.load, weights_only) stores tied weights twice: accepted when equal."""
  src = str(tmp_path / 'hf')
  model = make_hf('bert', 'BertForMaskedLM', src)
  os.remove(os.path.join(src, 'model.safetensors'))
  torch.save(model.state_dict(), os.path.join(src, 'pytorch_model.bin'))
  assert 'cls.predictions.decoder.weight' in model.state_dict()
  loaded = hf.load(src)
  kw = inputs(loaded.model_config)
  assert np.max(np.abs(np.asarray(loaded(**kw)) - hf_outputs(model, kw))) <= TOL


def test_lab_presets_export_to_transformers(tmp_path):
  """A lab model trained from scratch (random init here) opens in transformers with equal logits."""
  from flaxformer_lab.presets import gpt2, roberta  # pylint: disable=g-import-not-at-top
  # The RoBERTa MLM preset keeps RobertaModel's pooler: exported as RobertaForMaskedLM with the
  # pooler weights, as roberta-base is (transformers ignores them; the lab reads them back).
  for name, config, arch in (('gpt2', gpt2.get_config('tiny'), 'GPT2LMHeadModel'),
                             ('roberta', roberta.get_config('tiny'), 'RobertaForMaskedLM')):
    config.model.update(vocab_size=101, d_model=24, num_heads=3, mlp_dim=37, max_len=40)
    cfg = ModelConfig.from_dict(config.model)
    params = _init(cfg, seed=1)
    path = hf.save((config, params), str(tmp_path / name))
    assert _leaves_equal(hf.load(path, scan_layers=cfg.scan_layers).params, params)
    with open(os.path.join(path, 'config.json')) as f:
      assert json.load(f)['architectures'] == [arch]
    model = getattr(transformers, arch).from_pretrained(path).eval()
    loaded = hf.load(path)
    kw = inputs(cfg)
    ours = np.asarray(loaded(**kw))
    assert np.max(np.abs(hf_outputs(model, kw) - ours)) <= TOL
    lab = jax.jit(build_model(cfg).apply)({'params': params}, **hf.hf_inputs(cfg, **kw))['logits']
    assert np.max(np.abs(np.asarray(lab) - ours)) <= TOL


def test_unrepresentable_lab_configs_are_refused(tmp_path):
  from flaxformer_lab.presets import roberta  # pylint: disable=g-import-not-at-top
  # RoBERTa's classifier reads <s>, not a pooler: a lab classifier on the pooler has no HF class.
  config = roberta.get_config('tiny,task=classification')
  config.model.pooler = True
  # The config is checked before any weight is read.
  with pytest.raises(hf_mapping.UnsupportedError, match=r'model\.pooler=True'):
    hf.save((config, None), str(tmp_path / 'a'))
  config.model.pooler = False
  config.model.activation = 'swiglu'
  with pytest.raises(hf_mapping.UnsupportedError, match=r'model\.activation'):
    hf.save((config, None), str(tmp_path / 'b'))
  config.model.activation = 'gelu'
  config.model.position_offset = 3  # HF computes RoBERTa positions from pad_token_id + 1
  with pytest.raises(hf_mapping.UnsupportedError, match=r'model\.position_offset=3'):
    hf.save((config, None), str(tmp_path / 'c'))
  assert not os.path.exists(str(tmp_path / 'a'))


# --- strictness ----------------------------------------------------------------------------------
def _edit(path, fn):
  file = os.path.join(path, 'model.safetensors')
  sd = load_file(file)
  fn(sd)
  save_file(sd, file, metadata={'format': 'pt'})


@pytest.fixture(scope='module')
def bert_mlm_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('bert_mlm'))
  make_hf('bert', 'BertForMaskedLM', path)
  return path


def _copy(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  return dst


def test_missing_unexpected_misshaped_weights_are_named(bert_mlm_dir, tmp_path):
  key = 'bert.encoder.layer.1.attention.self.key.weight'
  p = _copy(bert_mlm_dir, str(tmp_path / 'missing'))
  _edit(p, lambda sd: sd.pop(key))
  with pytest.raises(hf.HFCheckpointError, match=r'missing weight\(s\): ' + re.escape(key)):
    hf.load(p)
  p = _copy(bert_mlm_dir, str(tmp_path / 'unexpected'))
  extra = 'bert.encoder.layer.3.output.dense.bias'
  _edit(p, lambda sd: sd.update({extra: np.zeros(D, np.float32)}))
  with pytest.raises(hf.HFCheckpointError, match=r'unexpected.*layer\.3\.output\.dense\.bias'):
    hf.load(p)
  p = _copy(bert_mlm_dir, str(tmp_path / 'shape'))
  _edit(p, lambda sd: sd.update({'cls.predictions.bias': np.zeros(V + 1, np.float32)}))
  with pytest.raises(hf.HFCheckpointError,
                     match=r'mis-shaped.*cls\.predictions\.bias: \[98\] in the checkpoint, \[97\]'):
    hf.load(p)
  p = _copy(bert_mlm_dir, str(tmp_path / 'untied'))
  _edit(p, lambda sd: sd.update({'cls.predictions.decoder.weight': np.ones((V, D), np.float32)}))
  with pytest.raises(hf.HFCheckpointError, match=r'cls\.predictions\.decoder\.weight differs'):
    hf.load(p)


def test_buffers_are_checked_not_dropped(tmp_path):
  p = str(tmp_path / 'marian')
  make_hf('marian', 'MarianModel', p)
  hf.load(p)  # the stored sinusoidal tables equal the lab's
  _edit(p, lambda sd: sd['encoder.embed_positions.weight'].__iadd__(0.1))
  with pytest.raises(hf.HFCheckpointError, match=r'encoder\.embed_positions\.weight differs'):
    hf.load(p)
  p = str(tmp_path / 'bart')
  make_hf('bart', 'BartForConditionalGeneration', p)
  _edit(p, lambda sd: sd.pop('final_logits_bias'))
  with pytest.raises(hf.HFCheckpointError, match='missing.*final_logits_bias'):
    hf.load(p)
  loaded = hf.load(p, zero_fill=('final_logits_bias',))  # HF's own fallback, asked for explicitly
  assert not np.any(np.asarray(loaded.params['lm_head']['bias']))


# --- init_from=hf:<dir> and the converter --------------------------------------------------------
def _lab_bert(head='classification', **kw):
  from flaxformer_lab.presets import bert  # pylint: disable=g-import-not-at-top
  config = bert.get_config('tiny,task=classification')
  config.model.update(vocab_size=V, d_model=D, num_heads=H, num_layers=L, mlp_dim=F, max_len=P,
                      head=head, **kw)
  return config


def test_load_params_for_config_fills_the_body_and_names_fresh_head(bert_mlm_dir):
  from flaxformer_lab import train  # pylint: disable=g-import-not-at-top
  config = _lab_bert()
  cfg = ModelConfig.from_dict(config.model)
  params, fresh = hf.load_params_for_config(bert_mlm_dir, cfg)
  # BertForMaskedLM has no pooler: BERT's classifier reads it, so it starts fresh with the head.
  assert sorted(fresh) == ['classifier/output/bias', 'classifier/output/kernel',
                           'pooler/dense/bias', 'pooler/dense/kernel']
  merged = train.merge_params(_init(cfg), params, allowed_missing=fresh)
  mlm = hf.load(bert_mlm_dir)
  assert _leaves_equal(merged['encoder'], jax.device_get(mlm.params['encoder']))
  assert np.array_equal(merged['tokens']['embedding'], mlm.params['tokens']['embedding'])
  # The same head with the checkpoint's shapes loads everything.
  params, fresh = hf.load_params_for_config(bert_mlm_dir, cfg.replace(head='mlm', pooler=False))
  assert fresh == ()
  # A body that differs is an error naming the field (not a silent partial load).
  with pytest.raises(hf.HFCheckpointError, match=r'model\.norm_position'):
    hf.load_params_for_config(bert_mlm_dir, cfg.replace(norm_position='pre'))
  with pytest.raises(hf.HFCheckpointError,
                     match=r'positions/embedding: \[40, 24\] in the checkpoint'):
    hf.load_params_for_config(bert_mlm_dir, cfg.replace(max_len=64))


def test_convert_writes_a_run_directory_the_trainer_restores(bert_mlm_dir, tmp_path):
  from flaxformer_lab import convert  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import rundir  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  config, fresh = convert.convert(bert_mlm_dir, workdir)
  assert fresh == () and config.task == 'mlm'
  assert rundir.RunDir(workdir).load_config().model.to_dict() == config.model.to_dict()
  params = rundir.RunDir(workdir).restore_params()
  assert _leaves_equal(params, jax.device_get(hf.load(bert_mlm_dir).params))



def test_convert_to_hf_exports_a_run_directory(bert_mlm_dir, tmp_path):
  """`python -m flaxformer_lab.convert --to_hf` writes a run's checkpoint in the HF layout that
  transformers opens with the same outputs; an existing checkpoint is never overwritten."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import convert  # pylint: disable=g-import-not-at-top
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
  convert.convert(bert_mlm_dir, workdir)
  cmd = [sys.executable, '-m', 'flaxformer_lab.convert', '--to_hf', f'--workdir={workdir}',
         f'--hf_dir={out}']
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'BertForMaskedLM' in done.stdout
  ours, theirs = (load_file(os.path.join(d, 'model.safetensors')) for d in (out, bert_mlm_dir))
  assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
  kw = inputs(hf.load(out).model_config)
  original = transformers.BertForMaskedLM.from_pretrained(bert_mlm_dir).eval()
  exported = transformers.BertForMaskedLM.from_pretrained(out).eval()
  assert np.max(np.abs(hf_outputs(exported, kw) - hf_outputs(original, kw))) == 0.0
  before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  lines = again.stderr.strip().splitlines()
  assert again.returncode == 2 and len(lines) == 1 and 'already holds a checkpoint' in lines[0]
  assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before


# --- tokenizers ----------------------------------------------------------------------------------
def test_tokenizer_json_is_loaded_and_wrapped(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  from flaxformer_lab.interop import hf_tokenizer  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'hf')
  make_hf('bert', 'BertForMaskedLM', path)
  words = ['the', 'cat', 'sat', 'on', 'mat', '##s', 'a', 'dog']
  vocab = {w: i for i, w in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token='[UNK]'))
  tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.decoder = tokenizers.decoders.WordPiece()
  tok.add_special_tokens(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token='[UNK]', pad_token='[PAD]', cls_token='[CLS]',
      sep_token='[SEP]', mask_token='[MASK]')
  fast.save_pretrained(path)
  loaded = hf.load(path)
  t = loaded.tokenizer
  text = 'The cats sat on a dog mat'
  assert t.encode(text) == fast(text, add_special_tokens=False)['input_ids']
  assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == (0, 1, 2, 3, 4)
  assert set(t.special_ids) == {0, 1, 2, 3, 4} and t.vocab_size == len(vocab)
  assert t.decode([2] + t.encode(text) + [3, 0]) == 'the cats sat on a dog mat'
  t.save(str(tmp_path / 'saved'))
  again = hf_tokenizer.HFTokenizer.load_saved(str(tmp_path / 'saved'))
  assert again.encode(text) == t.encode(text) and again.mask_id == 4
  hf.save(loaded, str(tmp_path / 'export'))  # the tokenizer files travel with the export
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'export'))(
      text, add_special_tokens=False)['input_ids'] == t.encode(text)


def test_sentencepiece_model_is_loaded(tmp_path):
  spm = pytest.importorskip('sentencepiece')
  from flaxformer_lab.interop import hf_tokenizer  # pylint: disable=g-import-not-at-top
  path = str(tmp_path)
  text = ['the quick brown fox jumps over the lazy dog'] * 20 + ['a b c d e f g h'] * 5
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_prefix=os.path.join(path, 'spiece'), vocab_size=30,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'model_type': 't5', 'pad_token_id': 0, 'eos_token_id': 1,
               'decoder_start_token_id': 0}, f)
  tok = hf_tokenizer.load_hf_tokenizer(path, hf.read_hf_config(path))
  sp = spm.SentencePieceProcessor(model_file=os.path.join(path, 'spiece.model'))
  assert tok.encode('the lazy fox') == sp.encode('the lazy fox')
  assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, 0)
  assert tok.decode(tok.encode('the lazy fox') + [1]) == 'the lazy fox'


def test_preset_defaults_are_not_leaking():
  """Every structural model field is set from config.json, whatever the family preset says."""
  preset = ModelConfig.from_dict(common.model_config())
  for fam in hf_mapping.FAMILIES.values():
    for arch in fam.archs:
      fields = fam.model_fields({}, arch, True) if fam.name != 'albert' else fam.model_fields(
          {'hidden_size': 768}, arch, True)
      for name in ('family', 'norm_position', 'norm_type', 'position', 'activation',
                   'attention_scale', 'qkv_bias', 'tie_embeddings', 'embedding_norm', 'pad_id',
                   'head', 'position_offset', 'scale_embedding'):
        assert name in fields, (fam.name, arch, name)
  assert preset  # the defaults themselves are valid
