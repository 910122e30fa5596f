"""The demo: a character-level pre-LN decoder on tiny shakespeare (./launch.sh demo).

Entry point for `--config=configs/demo.py:<arg>`; the preset (variants, every field commented)
lives in `flaxformer_lab/presets/demo.py`, so the package works without this folder.
"""

from flaxformer_lab.presets.demo import get_config  # pylint: disable=unused-import
