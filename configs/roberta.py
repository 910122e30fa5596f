"""RoBERTa (Liu et al., 2019): BERT trained longer, dynamic masking, no NSP, byte BPE.

Entry point for `--config=configs/roberta.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/roberta.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.roberta import get_config  # pylint: disable=unused-import
