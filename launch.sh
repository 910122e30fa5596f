#!/usr/bin/env bash
# flaxformer_lab launcher.
#   ./launch.sh demo    create .venv from requirements.txt if missing, then train the embedded default
#                       (a character-level decoder on tiny shakespeare, CPU) and print a sample
#   ./launch.sh test    same environment plus test requirements, then run the test suite
#   ./launch.sh train --config=configs/gpt2.py:tiny --workdir=/tmp/run [--config.key=value ...]
#   ./launch.sh sweep --sweep=experiments/prepost_ln/config.py:smoke --workdir=/tmp/sweep
#                       [--backend=local|slurm|tpu] [--parallel=N] [--dry_run] [--status] [--summarize]
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(pwd)"
VENV="${FLAXFORMER_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

ensure_venv() {
  local reqs="$1" stamp="$VENV/.installed-$(basename "$1")"
  if [ ! -x "$PY" ]; then
    echo "[launch] creating $VENV" >&2
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  if [ ! -f "$stamp" ] || [ "$reqs" -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ] \
     || [ pyproject.toml -nt "$stamp" ]; then
    echo "[launch] installing $reqs" >&2
    "$PY" -m pip install -q -r "$reqs"
    # The package itself, editable: `python -m flaxformer_lab.main` then works from any directory.
    "$PY" -m pip install -q --no-deps -e "$ROOT"
    touch "$stamp"
  fi
}

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
cmd="${1:-demo}"; shift || true
case "$cmd" in
  demo)
    ensure_venv requirements.txt
    WORKDIR="${DEMO_WORKDIR:-$ROOT/workdirs/demo}"
    "$PY" -m flaxformer_lab.main --config=configs/demo.py --workdir="$WORKDIR" "$@"
    "$PY" -m flaxformer_lab.generate --workdir="$WORKDIR" --prompt="ROMEO:" --max_new_tokens=300 \
      --strategy=sample --temperature=0.8 --top_k=40 --seed=0
    ;;
  test)
    ensure_venv requirements-test.txt
    set +e
    "$PY" -m pytest tests -q -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "[launch] pytest collected no tests: failing" >&2; exit 1; fi
    exit "$rc"
    ;;
  train)
    ensure_venv requirements.txt
    exec "$PY" -m flaxformer_lab.main "$@"
    ;;
  sweep)
    ensure_venv requirements.txt
    exec "$PY" -m flaxformer_lab.sweep "$@"
    ;;
  *)
    echo "usage: ./launch.sh demo|test|train|sweep [args]" >&2; exit 2 ;;
esac
