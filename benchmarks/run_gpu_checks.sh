#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA device and torch already installed:
# the CUDA tests, the CPU snapshot tests with CUDA present, and the GPU benchmark.
#   benchmarks/run_gpu_checks.sh OUTDIR
# Without an install of shardkeep, the three source roots are put on PYTHONPATH; wheels of
# missing dependencies may wait in .whl/ (pyzmq, pyeclib, blake3 for Python 3.12).
set -uo pipefail
out=${1:-benchmarks/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/proto:$PWD/client:$PWD/daemon:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; df -h /dev/shm; nproc; free -g
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } \
    2>&1 | tee "$out/machine.txt"
# /dev/shm must hold two slots of the benchmark's state plus the tests' (a few GB)
shm_gb=$(df -BG --output=size /dev/shm | tail -1 | tr -dc 0-9)
if [ "${shm_gb:-0}" -lt 16 ]; then mount -o remount,size=32G /dev/shm && df -h /dev/shm | tee -a "$out/machine.txt"; fi
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_snapshot_restore.py 2>&1 | tee "$out/pytest.txt"
rc_tests=$?
timeout 240 python3 benchmarks/bench_gpu.py --size 1.6 --out "$out/gpu.json" 2>&1 | tee "$out/bench.txt"
rc_bench=$?
echo "tests rc=$rc_tests bench rc=$rc_bench"
exit $(( rc_tests || rc_bench ))
