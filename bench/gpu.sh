#!/usr/bin/env bash
# The benchmark suite on a CUDA device in a single call; prints one table.
#
# For a lent GPU (the `device` tool's `run`, command `bash bench/gpu.sh`): the
# generation service picks CUDA by itself when torch sees it, and the
# in-process runs use --device cuda, so every figure of `make bench` is
# measured again on the GPU, batching target ≥ 3×. The Python it uses must
# have a CUDA build of torch and the rest of requirements.txt: $PYTHON if
# set, else .venv/bin/python, else python3, the first whose torch sees CUDA.
#
# The hunyuan3d backend runs first, on CUDA in fp16: with the real weights when
# HUNYUAN3D_MODEL_PATH names their folder (config.yaml, model.fp16.safetensors),
# else with the published architecture (about 2.5 B parameters) and random
# weights written on the fly into a temporary folder, which cost the same time
# and memory. It reports seconds per object alone and in a batch, the batching
# ratio, and, served with mixed resolutions, peak VRAM against the 85 % budget
# and the out-of-memory batches. Its Python runs on the CPU too:
# `.venv/bin/python -m bench.hunyuan3d --tiny --serve`.
#
# Without real weights the hunyuan3d suite then runs the variants side by side
# at octree resolution 256 (bench/hunyuan3d_variants.py), each at the
# published size with random weights and its own default steps: standard (30,
# dense decoding), Turbo (5, dense), Turbo with FlashVDM and the lighter
# turbo VAE, and mini-Turbo with FlashVDM. Targets (issue 17): Turbo with
# FlashVDM ≤ 1.5 s per object alone and ≤ 0.75 s per object in a batch,
# mini-Turbo ≤ 0.5 s alone; also the dense / lightning decoding ratio.
#
# Device scaling (the `devices` suite): the same burst against one worker on
# cuda:0 and against one worker per CUDA device torch sees
# (GENERATION_DEVICES=cuda:0,...,cuda:N-1); the target is ≥ 0.9 × N × the
# one-device throughput. With a single GPU it runs two workers on cuda:0
# instead, which shows their overhead and fairness, not a speed-up.
#
# Bounded: the suites stop starting after BENCH_BUDGET_S (default 420 s) and
# the whole call after BENCH_TIMEOUT_S (default 570 s), so a 10-minute device
# call always returns. Full results: bench/RESULTS-gpu.md, bench/results-gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        PY="$candidate"
        break
    fi
done
if [ -z "$PY" ]; then
    echo "bench/gpu.sh: no Python whose torch sees a CUDA device (set PYTHON=/path/to/python)" >&2
    nvidia-smi -L >&2 2>/dev/null || echo "bench/gpu.sh: nvidia-smi found no GPU either" >&2
    exit 2
fi
if ! "$PY" -c 'import grpc, grpc_tools, fastapi, uvicorn, httpx, prometheus_client, trimesh, fast_simplification, skimage, psutil, xatlas, safetensors, yaml, hy3dgen' 2>/dev/null; then
    echo "bench/gpu.sh: $PY lacks packages of requirements.txt (pip install -r requirements.txt, keeping its CUDA torch)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'

# The stubs under pb/ are generated, not committed.
if [ ! -f pb/.built ]; then
    PYTHON="$PY" scripts/build_protos.sh || exit 2
fi

exec timeout --signal=INT "${BENCH_TIMEOUT_S:-570}" "$PY" -m bench.run \
    --device cuda \
    --suites "${BENCH_SUITES:-hunyuan3d,latency,batching,devices,resolution,leak}" \
    --hunyuan-model "${HUNYUAN3D_MODEL_PATH:-published}" --hunyuan-serve \
    --budget-s "${BENCH_BUDGET_S:-420}" \
    --leak-jobs "${LEAK_JOBS:-300}" --leak-timeout 90 \
    --markdown bench/RESULTS-gpu.md --json bench/results-gpu.json \
    "$@"
