#!/usr/bin/env bash
# Sourced by demo.sh and test.sh (or by you: `source setup.sh`): enters a Python environment with the
# requirements installed. Uses the active virtual environment if there is one, else creates ./.venv.
# torch is installed first, pinned, only when it is missing: a bare `torch` requirement on a machine without
# it would pull whatever build pip picks. On Linux without an NVIDIA GPU (no nvidia-smi) it comes from PyTorch's CPU
# index (about 200 MB instead of several GB of CUDA libraries). Set TORCH_SPEC to choose another version (e.g.
# TORCH_SPEC="torch==2.5.1") and TORCH_INDEX to take torch (only torch) from another index; TORCH_INDEX= (empty)
# takes pip's default. pip's own PIP_INDEX_URL (replaces PyPI for every install here, e.g. a mirror; then the CPU
# index is not picked for you) and PIP_EXTRA_INDEX_URL (adds an index next to it) are honoured too.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    python3 -m venv .venv || { echo "error: python3 -m venv failed (on Debian/Ubuntu: apt install python3-venv)" >&2; return 1 2>/dev/null || exit 1; }
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! python -c "import torch" 2>/dev/null; then
  if [ -z "${TORCH_INDEX+set}" ] && [ -z "${PIP_INDEX_URL:-}" ] && [ "$(uname -s)" = Linux ] \
      && ! command -v nvidia-smi >/dev/null 2>&1; then
    TORCH_INDEX=https://download.pytorch.org/whl/cpu
    echo "[setup] no NVIDIA GPU here (no nvidia-smi): the CPU build of torch (TORCH_INDEX= for pip's default)"
  fi
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}${TORCH_INDEX:+ from $TORCH_INDEX} (a few minutes)"
  python -m pip install --progress-bar on ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH_SPEC:-torch==2.13.0}" \
    || { echo "error: could not install ${TORCH_SPEC:-torch==2.13.0}${TORCH_INDEX:+ from $TORCH_INDEX}" >&2; return 1 2>/dev/null || exit 1; }
fi
stamp=".venv-requirements.sha"
want=$(cat requirements.txt "${EXTRA_REQUIREMENTS:-/dev/null}" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VIRTUAL_ENV/$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt ${EXTRA_REQUIREMENTS:-}"
  python -m pip install --progress-bar on -r requirements.txt ${EXTRA_REQUIREMENTS:+-r "$EXTRA_REQUIREMENTS"} || { echo "error: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
  echo "$want" > "$VIRTUAL_ENV/$stamp"
fi
