#!/usr/bin/env bash
# One entry point for people and CI:  bash scripts/run.sh demo [ARGS]  |  bash scripts/run.sh test [PYTEST ARGS]
# Uses the active virtual environment, or creates ./.venv, and installs the project with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

stamp=".venv-installed.stamp"
if [ ! -f "$VIRTUAL_ENV/$stamp" ] || [ pyproject.toml -nt "$VIRTUAL_ENV/$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -e ".[test]"
    touch "$VIRTUAL_ENV/$stamp"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
what="${1:-}"
shift || true
case "$what" in
    demo) exec python -m open_clip_po.demo "$@" ;;
    # Two pytest-xdist workers by default (PO_TEST_WORKERS=0: one process); worksteal evens out the long tests.
    test) exec python -m pytest -n "${PO_TEST_WORKERS:-2}" --dist worksteal "$@" ;;
    *) echo "usage: bash scripts/run.sh {demo|test} [ARGS...]" >&2; exit 2 ;;
esac
