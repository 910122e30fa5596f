"""Tokenizers: round trips, special ids, SentencePiece training cache, save/load."""

import gzip
import os

import pytest

from flaxformer_lab.presets.common import data_config
from flaxformer_lab.presets.common import default_data_dir
from flaxformer_lab.data import tokenizers as tok_lib
from flaxformer_lab.data.pipeline import check_vocab_size

SAMPLES = ['Hello, world!', '  two  spaces\tand tab\n\nnew lines\n', 'Ünïcödé £ 漢字 🙂',
           '',
           '[MASK] <s> </s> <pad> are plain text here']


def _multi30k_lines(lang, n):
  shared = default_data_dir()
  path = os.path.join(shared, f'multi30k/train.{lang}.gz') if shared else ''
  if not os.path.isfile(path):
    pytest.skip('shared/data is not beside the repository')
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return [next(f).rstrip('\n') for _ in range(n)]


def _check_layout(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.num_special) == (4, 5, 6, 7)


def test_byte_tokenizer_round_trip():
  tok = tok_lib.ByteTokenizer()
  _check_layout(tok)
  assert tok.vocab_size == 263
  for s in SAMPLES:
    ids = tok.encode(s)
    assert ids == [b + 7 for b in s.encode('utf-8')]
    assert tok.decode(ids) == s
  assert tok.decode([tok.bos_id] + tok.encode('ab') + [tok.eos_id, tok.pad_id, tok.mask_id]) == 'ab'
  assert tok.decode([tok.unk_id]) == '\ufffd'


def test_char_tokenizer_round_trip_unknown_and_save(tmp_path):
  tok = tok_lib.CharTokenizer.train(['hello', 'world\n'])
  _check_layout(tok)
  assert tok.chars == sorted(set('helloworld\n'))
  assert tok.vocab_size == 7 + len(tok.chars)
  assert tok.decode(tok.encode('low\nrow')) == 'low\nrow'
  assert tok.encode('hz')[1] == tok.unk_id and tok.decode(tok.encode('hz')) == 'h\ufffd'
  tok.save(str(tmp_path))
  again = tok_lib.load_tokenizer(str(tmp_path))
  assert isinstance(again, tok_lib.CharTokenizer) and again.chars == tok.chars
  assert again.encode('hello') == tok.encode('hello')


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_sentencepiece_trains_round_trips_and_saves(tmp_path, model_type):
  lines = _multi30k_lines('en', 1500) + _multi30k_lines('de', 1500)
  tok = tok_lib.SentencePieceTokenizer.train(lines, vocab_size=800, model_type=model_type)
  _check_layout(tok)
  assert 600 <= tok.vocab_size <= 800
  held_out = _multi30k_lines('en', 1600)[1500:] + SAMPLES
  for s in held_out:
    assert tok.decode(tok.encode(s)) == s
  ids = [i for s in lines[:200] for i in tok.encode(s)]
  assert min(ids) >= tok.num_special  # no specials from plain text
  assert len(ids) < sum(len(s.encode()) for s in lines[:200]) / 2  # pieces, not bytes
  tok.save(str(tmp_path))
  again = tok_lib.load_tokenizer(str(tmp_path))
  assert again.vocab_size == tok.vocab_size
  assert again.encode(held_out[0]) == tok.encode(held_out[0])


def test_get_tokenizer_caches_and_does_not_retrain(tmp_path, monkeypatch):
  cfg = data_config(tokenizer='sentencepiece', sp_vocab_size=600, sp_input_sentence_size=2000)
  lines = _multi30k_lines('de', 800)
  calls = []
  train = tok_lib.SentencePieceTokenizer.train

  def spy(*args, **kwargs):
    calls.append(1)
    return train(*args, **kwargs)

  monkeypatch.setattr(tok_lib.SentencePieceTokenizer, 'train', spy)
  first = tok_lib.get_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=lambda: iter(lines),
                                text_fields=('de', 'en'))
  assert calls == [1]
  model = tmp_path / 'spm_unigram_600_de-en' / 'spm.model'
  mtime = model.stat().st_mtime_ns
  second = tok_lib.get_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=None,
                                 text_fields=('de', 'en'))
  assert calls == [1] and model.stat().st_mtime_ns == mtime
  assert second.encode(lines[0]) == first.encode(lines[0])
  # A different vocabulary size is a different cache entry (and trains).
  cfg.sp_vocab_size = 620
  tok_lib.get_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=lambda: iter(lines),
                        text_fields=('de', 'en'))
  assert calls == [1, 1]


def test_get_tokenizer_byte_and_errors():
  with pytest.raises(ValueError, match='too small'):
    tok_lib.SentencePieceTokenizer.train(['abc'], vocab_size=100)
  assert isinstance(tok_lib.get_tokenizer(data_config(tokenizer='byte')), tok_lib.ByteTokenizer)
  with pytest.raises(ValueError, match='unknown tokenizer'):
    tok_lib.get_tokenizer(data_config(tokenizer='unigram'))
  with pytest.raises(ValueError, match='no training text'):
    tok_lib.get_tokenizer(data_config(tokenizer='char'))


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    tok_lib.load_tokenizer(str(tmp_path))
  tok_lib.ByteTokenizer().save(str(tmp_path))
  assert isinstance(tok_lib.load_tokenizer(str(tmp_path)), tok_lib.ByteTokenizer)


def test_check_vocab_size_message():
  tok = tok_lib.ByteTokenizer()
  check_vocab_size(263, tok)
  with pytest.raises(ValueError, match='config.model.vocab_size=256 .* at least 263'):
    check_vocab_size(256, tok)


def test_sentencepiece_pickles():
  import pickle
  tok = tok_lib.SentencePieceTokenizer.train(
      ['a b c d e f g h i j k l m n o p'] * 50, vocab_size=300)
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode('a b c') == tok.encode('a b c')


@pytest.mark.parametrize('kind,first_specials', [
    ('wordpiece', ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']),
    ('bpe', ['<s>', '<pad>', '</s>', '<unk>', '<mask>'])])
def test_wordpiece_and_bpe_train_cache_and_pickle(tmp_path, monkeypatch, kind, first_specials):
  import pickle
  lines = _multi30k_lines('en', 1500)
  cfg = data_config(tokenizer=kind, tokenizer_vocab_size=700)
  calls = []
  train = tok_lib.train_hf_tokenizer
  monkeypatch.setattr(tok_lib, 'train_hf_tokenizer',
                      lambda *a, **k: calls.append(1) or train(*a, **k))
  tok = tok_lib.get_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=lambda: iter(lines))
  assert tok.vocab_size == 700 and calls == [1]
  assert all(tok.decode([i]) == '' for i in tok.special_ids if i != tok.unk_id)  # dropped
  pieces = [tok._tok.id_to_token(i) for i in range(5)]  # pylint: disable=protected-access
  assert pieces == first_specials
  assert tok.pad_id == pieces.index('[PAD]' if kind == 'wordpiece' else '<pad>')
  assert (tok.cls_id, tok.sep_id) == ((2, 3) if kind == 'wordpiece' else (0, 2))
  again = tok_lib.get_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=None)
  assert calls == [1]  # loaded from tmp_path/<kind>_700_text, not retrained
  assert os.path.isdir(tmp_path / f'{kind}_700_text')
  sample = lines[0] + ' [MASK] <s>'
  assert again.encode(sample) == tok.encode(sample)
  assert pickle.loads(pickle.dumps(tok)).encode(sample) == tok.encode(sample)
  ids = tok.encode(lines[1])
  assert len(ids) < len(lines[1]) / 2  # pieces, not characters
  if kind == 'bpe':
    assert tok.decode(tok.encode(SAMPLES[2])) == SAMPLES[2]  # byte-level: any text
  with pytest.raises(ValueError, match='too small'):
    tok_lib.train_hf_tokenizer(lines, kind=kind, vocab_size=100)
  # An older config without tokenizer_vocab_size reads sp_vocab_size.
  old = data_config(tokenizer=kind, sp_vocab_size=650)
  del old['tokenizer_vocab_size']
  assert tok_lib.cache_name(old, ('text',)) == f'{kind}_650_text'
