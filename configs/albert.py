"""ALBERT (Lan et al., 2020): factorized embeddings, cross-layer sharing, MLM + SOP.

Entry point for `--config=configs/albert.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/albert.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.albert import get_config  # pylint: disable=unused-import
