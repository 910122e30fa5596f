"""XLM (Lample & Conneau, 2019): masked LM and translation LM with language embeddings.

Entry point for `--config=configs/xlm.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/xlm.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.xlm import get_config  # pylint: disable=unused-import
