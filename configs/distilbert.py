"""DistilBERT (Sanh et al., 2019): a 6-layer BERT trained by knowledge distillation.

Entry point for `--config=configs/distilbert.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/distilbert.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.distilbert import get_config  # pylint: disable=unused-import
