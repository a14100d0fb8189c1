#!/usr/bin/env bash
# One GPU session in one call: the GPU tests, the kernel floors, the cifar and paper
# presets. Everything lands in "${OUT:-bench/results}/<gpu>/" (JSON with the environment
# and raw samples, Markdown, PNG) plus the logs; commit that folder.
#
#     OUT=/some/dir bash bench/gpu_run.sh [--quick]
#
# --quick: fewer cases (one network per preset, two sparsities), for a device budget
# of a few minutes. Needs CUDA, not an install (runs from the checkout) nor internet.
set -uo pipefail
cd "$(dirname "$0")/.."

quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "no CUDA device: nothing to do" >&2
    exit 2
}
slug=$(python -c "from bench.env import device_slug; print(device_slug('cuda'))")
dest="${OUT:-bench/results}/${slug}"
mkdir -p "$dest"
status=0

echo "== GPU tests" | tee "$dest/gpu_tests.log"
env -u TRITON_INTERPRET python -m pytest -q -m gpu tests/ 2>&1 | tail -40 | tee -a "$dest/gpu_tests.log"
status=$((status | PIPESTATUS[0]))

echo "== kernel floors"
python -m bench.kernel_floors --dtype float16 --out "$dest/kernel_floors_float16.json" \
    2>&1 | tee "$dest/kernel_floors.log"

if [[ $quick == 1 ]]; then
    python -m bench --preset cifar --models res18 --sparsities 0.5 0.8 --dtype float16 \
        --providers cudnn masked narrow triton-dense ours --out "$dest" 2>&1 | tail -60
    python -m bench --preset paper --models res18 --sparsities 0.5 0.8 --dtype float16 \
        --providers cudnn narrow ours --out "$dest" 2>&1 | tail -60
else
    for dtype in float16 bfloat16; do
        python -m bench --preset cifar --dtype "$dtype" --out "$dest" 2>&1 | tail -80
        python -m bench --preset paper --dtype "$dtype" --out "$dest" 2>&1 | tail -80
    done
fi
echo "results in $dest"
exit $status
