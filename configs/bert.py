"""BERT (Devlin et al., 2019): a post-LN encoder pre-trained with masked LM + NSP.

Entry point for `--config=configs/bert.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/bert.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.bert import get_config  # pylint: disable=unused-import
