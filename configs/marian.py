"""Marian (Junczys-Dowmunt et al., 2018): an encoder-decoder translation model.

Entry point for `--config=configs/marian.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/marian.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.marian import get_config  # pylint: disable=unused-import
