# Sourced, not run: `. tools/nvrtc-env.sh && cargo test` (the README's test command). Makes NVRTC loadable for the
# tests, which compile every kernel with it (tests/nvrtc.rs fails rather than skips without it), and exports
# WEMOE_NVRTC. NVRTC comes from, in order: $WEMOE_NVRTC; the library path; /usr/local/cuda/lib64; else the PyPI
# wheel nvidia-cuda-nvrtc, installed once into .venv-nvrtc in the clone (about 90 MB). It sets no shell options,
# so sourcing it leaves an interactive shell as it was; it returns non-zero when NVRTC cannot be had.
_wemoe_root=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)
if [ -z "${WEMOE_NVRTC:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
    if ls /usr/local/cuda/lib64/libnvrtc.so* >/dev/null 2>&1; then
        export WEMOE_NVRTC=/usr/local/cuda/lib64
    else
        _wemoe_lib=$(ls -d "$_wemoe_root"/.venv-nvrtc/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1 || true)
        if [ -z "$_wemoe_lib" ]; then
            echo "nvrtc-env: installing NVRTC from PyPI (nvidia-cuda-nvrtc) into .venv-nvrtc" >&2
            python3 -m venv "$_wemoe_root/.venv-nvrtc" \
                && "$_wemoe_root/.venv-nvrtc/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-nvrtc>=13,<14" \
                && _wemoe_lib=$(ls -d "$_wemoe_root"/.venv-nvrtc/lib/python3*/site-packages/nvidia/cu13/lib | head -1)
        fi
        [ -n "$_wemoe_lib" ] && export WEMOE_NVRTC=$_wemoe_lib
    fi
fi
echo "nvrtc-env: NVRTC from ${WEMOE_NVRTC:-the library path}" >&2
[ -n "${WEMOE_NVRTC:-}" ] || ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'
