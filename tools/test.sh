#!/usr/bin/env bash
# The test command: makes NVRTC loadable, then runs `cargo test` with any arguments given.
# The kernel tests compile every kernel with NVRTC (tests/nvrtc.rs), and fail rather than skip without it.
# NVRTC comes from, in order: $WEMOE_NVRTC; a CUDA toolkit on the loader's path or in /usr/local/cuda;
# else the PyPI wheel nvidia-cuda-nvrtc, installed once into .venv-nvrtc inside the clone (about 90 MB).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${WEMOE_NVRTC:-}" ]; then
    if ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
        :  # on the library path already
    elif ls /usr/local/cuda/lib64/libnvrtc.so* >/dev/null 2>&1; then
        export WEMOE_NVRTC=/usr/local/cuda/lib64
    else
        venv=.venv-nvrtc
        lib=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1 || true)
        if [ -z "$lib" ]; then
            echo "tools/test.sh: installing NVRTC from PyPI (nvidia-cuda-nvrtc) into $venv" >&2
            python3 -m venv "$venv"
            "$venv/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-nvrtc>=13,<14"
            lib=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13/lib | head -1)
        fi
        export WEMOE_NVRTC=$PWD/$lib
    fi
fi
echo "tools/test.sh: NVRTC from ${WEMOE_NVRTC:-the library path}" >&2
exec cargo test "$@"
