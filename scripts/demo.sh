#!/usr/bin/env bash
# README command 1: set everything up (idempotent), then run the main job.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/setup.sh >&2
exec .venv/bin/python scripts/demo.py "$@"
