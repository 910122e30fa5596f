"""Objectives, one per file: everything about an objective (data, model inputs, loss, metrics,
evaluations) is declared by its `Objective` subclass (see base.py). `config.task` names one."""

from flaxformer_lab.tasks.base import DataContext
from flaxformer_lab.tasks.base import FrozenModel
from flaxformer_lab.tasks.base import Objective
from flaxformer_lab.tasks.base import get_objective
from flaxformer_lab.tasks.base import objective_for_head
from flaxformer_lab.tasks.base import objective_names
from flaxformer_lab.tasks.base import register

__all__ = ['DataContext', 'FrozenModel', 'Objective', 'get_objective', 'objective_for_head',
           'objective_names', 'register']
