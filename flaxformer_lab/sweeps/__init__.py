"""Sweeps declared beside their config: grid helpers (for sweep files) and the backends.

  spec.py     sweep files, grid helpers, run names, override validation, run commands
  state.py    a run's status from its directory (done / diverged / failed / running / pending)
  local.py    subprocesses on this machine, N at a time
  slurm.py    submitit job arrays
  tpu.py      gcloud: copy the code to every worker, one run at a time on the pod
  results.py  status table, results.csv/.md, plots, TensorBoard HParams
The command line is `python -m flaxformer_lab.sweep` (flaxformer_lab/sweep.py).
"""

from flaxformer_lab.sweeps.spec import SweepError, axis, product, zipped  # noqa: F401
