"""T5 (Raffel et al., 2020): a pre-LN encoder-decoder with relative position biases.

Entry point for `--config=configs/t5.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/t5.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.t5 import get_config  # pylint: disable=unused-import
