#!/usr/bin/env bash
# The test command: installs the pinned environment if needed (scripts/install.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k iterator` or `bash tests/run.sh -m "not slow"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/install.sh" --test
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
exec "$ROOT/.venv/bin/python" -m pytest -q -rs --durations=15 "$@"
