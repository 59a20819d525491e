#!/usr/bin/env bash
# Idempotent set-up of everything gmlp needs on a fresh Debian machine: offline datasets (apt), a
# virtual environment in .venv with PyTorch and the package (editable, with training and test extras).
# A second run reuses what is there. Environment: GMLP_VENV (default .venv), GMLP_SKIP_DATA=1 to skip data.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GMLP_VENV:-.venv}
PY=${PYTHON:-python3}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {  # apt_install PKG...: install the packages that are missing
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: apt-get install ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

if [ "${GMLP_SKIP_DATA:-0}" != "1" ]; then
  apt_install dataset-fashion-mnist
fi

if [ ! -x "$VENV/bin/python" ]; then
  # Debian's own python3 ships venv/ensurepip in a separate package
  "$PY" -c "import ensurepip, venv" >/dev/null 2>&1 || apt_install python3-venv
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "setup: installing torch (a few minutes)"
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
if [ "${GMLP_SKIP_DATA:-0}" != "1" ]; then  # offline text corpora and the tweet-sentiment set
  PYTHON="$VENV/bin/python" bash scripts/fetch_text_data.sh
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, gmlp; print("torch", torch.__version__, "gmlp", gmlp.__version__)'))"
