"""Objectives: batch -> model inputs, and model outputs + batch -> loss and metric sums.

A task knows nothing of meshes or the loop; the loop knows nothing of a task's internals. Metrics are
returned as sums with their denominators (`*_sum`, `*_count`) so they aggregate exactly over
micro-batches, devices and evaluation batches.
"""

from flaxformer_lab.tasks.base import Task, get_task

__all__ = ['Task', 'get_task']
