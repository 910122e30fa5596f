"""Host memory allocator settings for CPU runs: XLA's per-step buffers without fresh pages.

XLA:CPU allocates each execution's temporary buffer (1.1 GB for issue 12's GPT-2 row) with the C
library's malloc, which serves a block that large with a fresh `mmap` and returns it with `munmap`
when the step ends. The next step's buffer is new memory again, and the kernel zero-fills every
page on first touch: about 245,000 page faults per step of that row, a quarter of its CPU time
spent in the kernel (`perf stat -e page-faults`, `perf record`). glibc's tunables keep such blocks
in one heap that is never trimmed, so later steps reuse pages already mapped:

  arena_max=1       one arena (a non-main arena cannot grow past 64 MB and falls back to mmap)
  mmap_max=0        no block is served by its own mmap
  trim_threshold    freed memory at the top of the heap is kept, not returned to the system
  top_pad           the heap grows 256 MB at a time (without it the BERT row's first three steps
                    took 4.6-5.9 s each while the heap grew; with it, only the first, compiled, step)

The tunables are read when a process starts, so `reexec_with_tunables` re-executes the current
command with `GLIBC_TUNABLES` set, once, at the top of `bench` and `main`, before anything has
run. It does nothing when `GLIBC_TUNABLES` is already set (the user's own settings win), when
`FLAXFORMER_HOST_MALLOC=system`, off Linux/glibc, or where an accelerator is visible (the
accelerator's buffers do not come from malloc, and one arena would serialise a host's data
threads for no gain). The trade: a CPU process keeps its peak heap until it exits.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
            'glibc.malloc.trim_threshold=68719476736:glibc.malloc.top_pad=268435456')
ENV_SWITCH = 'FLAXFORMER_HOST_MALLOC'  # 'tuned' (default) or 'system'


def accelerator_visible() -> bool:
  """Whether JAX will likely pick a GPU or TPU (checked without initialising JAX)."""
  wanted = os.environ.get('JAX_PLATFORMS', os.environ.get('JAX_PLATFORM_NAME', '')).lower()
  if wanted:
    return any(p in wanted for p in ('cuda', 'gpu', 'rocm', 'tpu'))
  return any(os.path.exists(p) for p in ('/dev/nvidiactl', '/dev/kfd', '/dev/accel0', '/dev/vfio'))


def should_reexec(environ=None) -> bool:
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV_SWITCH, 'tuned')
  if mode not in ('tuned', 'system'):
    raise ValueError(f'{ENV_SWITCH}={mode!r} is not one of tuned, system')
  return (mode == 'tuned' and 'GLIBC_TUNABLES' not in environ
          and sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'
          and not accelerator_visible())


def main_module() -> str:
  """The module this process runs as `python -m <module>` ('' for a script, -c or a REPL)."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return (spec.name if spec is not None else '') or ''


def reexec_with_tunables(module: str) -> None:
  """Replaces this process (same pid) by the same command with `GLIBC_TUNABLES`; see above.

  Only when this process is `python -m <module>` itself: a caller that imported the module and
  calls its `main` (a test harness, a notebook) is never replaced.
  """
  if main_module() != module:
    return
  try:
    if not should_reexec():
      return
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, '-m', module, *sys.argv[1:]],
            dict(os.environ, GLIBC_TUNABLES=TUNABLES))
