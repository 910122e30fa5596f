"""Shared config pieces, re-exported for config files and experiments: see
`flaxformer_lab/presets/common.py` (argument parsing, model defaults, training sections)."""

from flaxformer_lab.presets.common import *  # pylint: disable=wildcard-import,unused-wildcard-import
from flaxformer_lab.presets.common import base_config, data_config, default_data_dir  # pylint: disable=unused-import
from flaxformer_lab.presets.common import logical_axis_rules, mesh_config, model_config  # pylint: disable=unused-import
from flaxformer_lab.presets.common import optim_config, parse_arg  # pylint: disable=unused-import
