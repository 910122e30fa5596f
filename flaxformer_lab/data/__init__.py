"""Data: TFDS builders (array_record, no TensorFlow), tokenizers and grain pipelines.

Modules: builders (raw files -> prepared TFDS data), sources (prepared or synthetic examples),
tokenizers (byte | char | sentencepiece), preprocess (per-example functions: windows, packing
layout, masking), pipeline (grain graphs and the entry point).

In the train loop:

  data = make_datasets(config, process_index=jax.process_index(),
                       process_count=jax.process_count())
  data.check_vocab_size(config.model.vocab_size)     # one-line error if the model is too small
  data.tokenizer.save(os.path.join(workdir, 'tokenizer'))
  batch = next(data.train_iter)                       # dict of numpy arrays, per-process batch
  state = data.train_iter.get_state()                 # JSON-serializable; save beside the model
  data.train_iter.set_state(state)                    # resume with exactly the next batches
  for batch in data.eval_batches(): ...               # finite, deterministic, padded (weights 0)

Multi-process runs: call `prepare(config)` on process 0 first, then synchronize, so that the other
processes find the prepared data and the cached tokenizer.
"""

from flaxformer_lab.data.builders import DataError
from flaxformer_lab.data.pipeline import DataBundle
from flaxformer_lab.data.pipeline import check_vocab_size
from flaxformer_lab.data.pipeline import make_datasets
from flaxformer_lab.data.pipeline import prepare
from flaxformer_lab.data.tokenizers import Tokenizer
from flaxformer_lab.data.tokenizers import get_tokenizer
from flaxformer_lab.data.tokenizers import load_tokenizer

__all__ = [
    'DataBundle', 'DataError', 'Tokenizer', 'check_vocab_size', 'get_tokenizer',
    'load_tokenizer', 'make_datasets', 'prepare',
]
