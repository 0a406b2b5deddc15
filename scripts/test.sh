#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up, run the tests, type-check, lint,
# build the docs site.
# Arguments go to pytest. pytest's exit status wins; any failing step fails the script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/setup.sh

pytest_rc=0
.venv/bin/python -m pytest -q "$@" || pytest_rc=$?
if [[ $pytest_rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests: that is a failure here" >&2
fi

mypy_rc=0
.venv/bin/mypy || mypy_rc=$?                 # files and --strict from pyproject.toml
ruff_rc=0
.venv/bin/ruff check vmtransport tests bench scripts plugins || ruff_rc=$?
# The guide and the API reference (docs/site), warnings as errors.
docs_rc=0
docs_out=$(mktemp -d)
.venv/bin/python -m sphinx -W --keep-going -q -b html docs/site "$docs_out" || docs_rc=$?
rm -rf "$docs_out"

if [[ $pytest_rc -ne 0 ]]; then
    echo "test.sh: pytest failed (exit $pytest_rc)" >&2
    exit "$pytest_rc"
fi
if [[ $mypy_rc -ne 0 || $ruff_rc -ne 0 || $docs_rc -ne 0 ]]; then
    echo "test.sh: mypy exit $mypy_rc, ruff exit $ruff_rc, docs (sphinx -W) exit $docs_rc" >&2
    exit 1
fi
