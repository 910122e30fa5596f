"""The Transformer (Vaswani et al., 2017): the post-LN encoder-decoder of the paper.

Entry point for `--config=configs/transformer.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/transformer.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.transformer import get_config  # pylint: disable=unused-import
