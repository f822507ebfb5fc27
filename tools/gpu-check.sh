#!/usr/bin/env bash
# One prepared GPU check (DESIGN.md section 3, METHOD.md): the engine's view of the machine (doctor, with
# ptxas' resources for the card's arch), every kernel against the CPU reference on the GPU, the whole model
# graph on the GPU against the fixtures' references, then the kernel benchmarks and where the whole model's
# GPU time goes (each backend operation timed), with a summary printed last.
#
#   tools/gpu-check.sh                 build here (needs cargo) and run here
#   tools/gpu-check.sh --stage DIR     build here, run the benchmark's whole-model path on the host emulation
#                                      (a tiny model), and copy the stripped binaries to DIR (for a GPU machine
#                                      without a Rust toolchain; same x86-64 Linux), with fusion-bench's wheel
#   tools/gpu-check.sh --prebuilt DIR  run binaries staged by --stage
#
# NVRTC: the machine's own (its CUDA toolkit or its Python's nvidia-cuda-nvrtc) unless WEMOE_NVRTC names
# one: a CUBIN from an NVRTC newer than the driver may not load. Full logs go to $OUT (or ./gpu-check-out).
set -euo pipefail
cd "$(dirname "$0")/.."

stage() {
    local dir=$1
    mkdir -p "$dir"
    local json
    cargo build --release --bin wemoe-engine
    json=$(cargo test --release --no-run --test kernels --message-format=json 2>/dev/null)
    local tests
    tests=$(echo "$json" | grep -o '"executable":"[^"]*kernels-[^"]*"' | tail -1 | cut -d'"' -f4)
    json=$(cargo test --release --no-run --test cuda_backend --message-format=json 2>/dev/null)
    local graph
    graph=$(echo "$json" | grep -o '"executable":"[^"]*cuda_backend-[^"]*"' | tail -1 | cut -d'"' -f4)
    json=$(cargo bench --no-run --bench gpu --message-format=json 2>/dev/null)
    local bench
    bench=$(echo "$json" | grep -o '"executable":"[^"]*gpu-[^"]*"' | tail -1 | cut -d'"' -f4)
    # The benchmark's whole-model path, run here on the host emulation at a tiny size before any card's
    # minutes are spent on it.
    "$bench" --bench --emulated >/dev/null || { echo "gpu-bench --emulated failed: not staging" >&2; return 1; }
    cp target/release/wemoe-engine "$dir/wemoe-engine"
    cp "$tests" "$dir/kernel-tests"
    cp "$graph" "$dir/graph-tests"
    cp "$bench" "$dir/gpu-bench"
    strip "$dir"/wemoe-engine "$dir"/kernel-tests "$dir"/graph-tests "$dir"/gpu-bench 2>/dev/null || true
    # FusionBench's wheel beside them, for its side of the comparison there (the GPU machines' image has torch
    # and transformers but not fusion-bench): the version the CPU comparisons use, else the latest.
    local python=python3 version spec=fusion-bench
    [ -x .venv/bin/python ] && python=.venv/bin/python
    version=$("$python" -c 'import importlib.metadata as m; print(m.version("fusion-bench"))' 2>/dev/null) \
        && spec="fusion-bench==$version"
    rm -f "$dir"/fusion_bench-*.whl
    "$python" -m pip download -q --no-deps --only-binary :all: -d "$dir" "$spec" \
        || echo "warning: no fusion-bench wheel staged: FusionBench's side will be skipped there" >&2
    ls -la "$dir"
}

mode=${1:-}
case "$mode" in
    --stage) stage "${2:?--stage needs a folder}"; exit 0 ;;
    --prebuilt) bin=${2:?--prebuilt needs a folder} ;;
    "") bin=target/gpu-check; stage "$bin" ;;
    *) echo "usage: $0 [--stage DIR | --prebuilt DIR]" >&2; exit 2 ;;
esac

out=${OUT:-gpu-check-out}
mkdir -p "$out"

if [ -z "${WEMOE_NVRTC:-}" ]; then
    for candidate in /usr/local/cuda/lib64 $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
        if ls "$candidate"/libnvrtc.so.* >/dev/null 2>&1; then export WEMOE_NVRTC=$candidate; break; fi
    done
fi
# cuBLAS (the dense reference in the benchmarks) from the same places.
export LD_LIBRARY_PATH=${WEMOE_NVRTC:-}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export WEMOE_CACHE_DIR=${WEMOE_CACHE_DIR:-/tmp/wemoe-gpu-check-cache}  # outside $out: only logs come back

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
echo "WEMOE_NVRTC=${WEMOE_NVRTC:-unset}"

set +e  # from here on, a failing step is reported and the rest still runs
echo "== doctor"
"$bin/wemoe-engine" doctor 2>&1 | tee "$out/doctor.txt"

echo "== kernels on the GPU against the CPU reference"
"$bin/kernel-tests" --ignored --nocapture --test-threads 1 2>&1 | tee "$out/kernel-tests.txt"
tests_rc=${PIPESTATUS[0]}

echo "== the model graph on the GPU against transformers, FusionBench and torch autograd (fixtures)"
WEMOE_FIXTURES=$PWD/tests/fixtures "$bin/graph-tests" --ignored --test-threads 1 2>&1 | tee "$out/graph-tests.txt"
graph_rc=${PIPESTATUS[0]}

echo "== benchmarks"
"$bin/gpu-bench" --bench 2>&1 | tee "$out/bench.txt"

echo "== where the whole model's GPU time goes: each backend operation timed (WEMOE_OP_TIMES)"
WEMOE_OP_TIMES=1 "$bin/gpu-bench" --bench --end-to-end-only 2>&1 | tee "$out/op-times.txt"

echo "== FusionBench's WEMoE layer on the same card (PyTorch)"
# fusion-bench travels as a wheel: staged beside the binaries by --stage (or put in .whl by hand), since the
# GPU machines' image does not have it.
wheel=$(ls "$bin"/fusion_bench-*.whl .whl/fusion_bench-*.whl 2>/dev/null | head -1)
if [ -n "$wheel" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fb-site "$wheel" \
        && export PYTHONPATH=/tmp/fb-site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no fusion-bench wheel in $bin or .whl: its import below fails unless the machine has it"
fi
PYTHONUNBUFFERED=1 python3 tools/bench_fusionbench_gpu.py 2>&1 | tee "$out/fusionbench.txt" || true

echo "== summary"
grep -E "^kernel-check" "$out/kernel-tests.txt" || echo "no kernel-check lines: see $out/kernel-tests.txt"
grep -E "^\| |fused per-sample /|^device|^tuned" "$out/bench.txt" || true
grep -E "^\| B=|^device" "$out/fusionbench.txt" || true
# Each table's first twelve rows and its products' total and rate.
awk '/^backend operation/ {n = 13} n > 0 {n--; print; next} /^products:/ {print}' "$out/op-times.txt" || true
grep -E "^test |test result" "$out/graph-tests.txt" || true
echo "kernel tests exit status: $tests_rc; graph tests exit status: $graph_rc"
[ "$tests_rc" = 0 ] && [ "$graph_rc" = 0 ]
