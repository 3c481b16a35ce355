#!/usr/bin/env bash
# What tests/test_app_browser.py needs: Debian's Chromium (never `playwright install`, which
# downloads its own browser) and the app's Python packages. Run as root, from the repo root.
set -euo pipefail
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y chromium   # /usr/bin/chromium
pip install "gradio>=6.31,<6.32" playwright gradio_client
