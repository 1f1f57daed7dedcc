#!/usr/bin/env bash
# One-time set-up (idempotent): Fashion-MNIST from Debian when apt is available, and a virtual environment
# in .venv with siftguide and its dev extras. Re-running only re-installs when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "[setup] installing dataset-fashion-mnist (Debian package)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "[setup] apt install failed: siftguide will download Fashion-MNIST with torchvision on first use"
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.siftguide-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch, torchvision and siftguide[dev] into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  # pinned together: PyPI's torchvision needs the torch release it was built against
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, lightning, timm, kornia; print(f"torch {torch.__version__}, lightning {lightning.__version__}, timm {timm.__version__}, kornia {kornia.__version__}")')"
