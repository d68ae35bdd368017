#!/usr/bin/env bash
# The test command: installs the pinned environment if needed (scripts/install.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k iterator` or `bash tests/run.sh -m "not slow"`.
# Tests run on UNILM_VL_TEST_WORKERS pytest-xdist workers (default 2; 0 runs them in this process);
# --dist loadfile keeps a module's tests on one worker (its module-scoped fixtures are built once); tests/conftest.py
# hands the modules with slow tests out first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/install.sh" --test
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
exec "$ROOT/.venv/bin/python" -m pytest -q -rs --durations=25 -n "${UNILM_VL_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
