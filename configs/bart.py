"""BART (Lewis et al., 2020): a denoising encoder-decoder with learned positions.

Entry point for `--config=configs/bart.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/bart.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.bart import get_config  # pylint: disable=unused-import
