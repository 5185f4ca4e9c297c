#!/usr/bin/env bash
# Install headless Chromium and its WebDriver (Debian apt: chromium, chromium-driver) for the
# real-browser check of the MLflow UI, scripts/check_mlflow_ui.py:
#
#     bash scripts/ci_chromium.sh && .venv/bin/python scripts/check_mlflow_ui.py
#
# Idempotent: nothing is installed when both are there.  Exit 1 when they cannot be installed
# (no apt, no root and no sudo, no network), so that CI can skip the check and say why.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "== chromium and chromedriver present: $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "!! no apt-get: install chromium and chromedriver by hand" >&2
  exit 1
fi
echo "== installing chromium and chromium-driver (apt)"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  chromium chromium-driver fonts-dejavu-core
echo "== $(chromium --version 2>/dev/null | head -1); $(chromedriver --version | head -1)"
