"""XLM-R (Conneau et al., 2020): multilingual masked LM with one SentencePiece model.

Entry point for `--config=configs/xlmr.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/xlmr.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.xlmr import get_config  # pylint: disable=unused-import
