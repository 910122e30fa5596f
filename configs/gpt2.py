"""GPT-2 (Radford et al., 2019): a pre-LN decoder-only causal language model.

Entry point for `--config=configs/gpt2.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/gpt2.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.gpt2 import get_config  # pylint: disable=unused-import
