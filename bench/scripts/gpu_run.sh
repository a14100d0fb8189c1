#!/usr/bin/env bash
# One GPU session in one call: the GPU tests, the kernel floors, the cifar and paper
# presets (eager and CUDA-graph replay). Everything lands in "${OUT:-bench/results}/<gpu>/"
# (JSON with the environment and raw samples, Markdown, PNG, one log per step); commit
# that folder.
#
#     OUT=/some/dir [PYTHON=python3] bash bench/scripts/gpu_run.sh [--quick]
#
# --quick: one network per preset and two sparsities, for a device budget of minutes:
# the kernels offer only the configs the static kernel report ranks best
# (SPARSE_OPS_TUNING=quick), tuned configs are cached on disk and reused by every later
# step (TRITON_CACHE_AUTOTUNING), and the whole run stops starting steps once
# QUICK_BUDGET_S seconds (default 450) have passed; each step is cut at what is left.
# Needs CUDA; runs from the checkout (no install, no internet). Exit status 1 if any
# step failed or any benchmark output was wrong. A summary table ends the output.
set -uo pipefail
started=$(date +%s)
out_root=${OUT:-}
[[ -n "$out_root" && "$out_root" != /* ]] && out_root="$PWD/$out_root"  # caller's folder
cd "$(dirname "$0")/../.."  # the checkout's root
unset TRITON_INTERPRET  # kernels must compile for the GPU, not run in the interpreter

PY=${PYTHON:-python}
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
budget=${QUICK_BUDGET_S:-450}
if [[ $quick == 1 ]]; then
    export SPARSE_OPS_TUNING=quick TRITON_CACHE_AUTOTUNING=1
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/sparse-ops-triton-cache}
fi
$PY -c "import torch" || { echo "$PY cannot import torch (set PYTHON=...)" >&2; exit 2; }
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "no CUDA device: nothing to do" >&2
    exit 2
}
slug=$($PY -c "from sparse_ops_bench.env import device_slug; print(device_slug('cuda'))")
[[ -n "$slug" ]] || { echo "cannot name the GPU" >&2; exit 2; }
dest="${out_root:-bench/results}/${slug}"
mkdir -p "$dest"
status=0

# Random (unstructured) tickets are regrouped on the fly, which needs Mt-KaHyPar.
methods=(refill regroup random)
$PY -c "import mtkahypar" 2>/dev/null || {
    echo "mtkahypar missing: random tickets skipped" | tee "$dest/notes.log"
    methods=(refill regroup)
}

summary=()
step() {  # step NAME COMMAND...: full log in $dest/NAME.log, its tail on stdout
    local name=$1
    shift
    local now left begin rc
    now=$(date +%s)
    left=$((budget - (now - started)))
    if [[ $quick == 1 && $left -lt 20 ]]; then
        echo "== $name: skipped, the --quick budget of ${budget}s is spent"
        summary+=("$(printf '%-22s %-10s %5s' "$name" skipped -)")
        return
    fi
    echo "== $name"
    begin=$now
    if [[ $quick == 1 ]]; then
        timeout --signal=INT --kill-after=10 "$left" "$@" >"$dest/$name.log" 2>&1
    else
        "$@" >"$dest/$name.log" 2>&1
    fi
    rc=$?
    tail -40 "$dest/$name.log"
    local verdict=ok
    if [[ $rc == 124 ]]; then
        verdict="cut (budget)"
        status=1
    elif [[ $rc != 0 ]]; then
        verdict="exit $rc"
        status=1
    fi
    [[ $verdict == ok ]] || echo "!! $name: $verdict"
    summary+=("$(printf '%-22s %-10s %5ss' "$name" "$verdict" $(($(date +%s) - begin)))")
}

step gpu_tests $PY -m pytest -q -m gpu tests/
step kernel_floors $PY -m sparse_ops_bench.scripts.kernel_floors --dtype float16 \
    --out "$dest/kernel_floors_float16.json"

if [[ $quick == 1 ]]; then
    common=(--sparsities 0.5 0.8 --dtype float16 --methods refill regroup)
    step cifar_res18 $PY -m sparse_ops_bench --preset cifar --models res18 "${common[@]}" \
        --providers cudnn folded masked narrow triton-dense ours --out "$dest"
    step cifar_res18_graph $PY -m sparse_ops_bench --preset cifar --models res18 "${common[@]}" \
        --providers cudnn folded narrow triton-dense ours --graph --out "$dest/graph"
    step paper_res18 $PY -m sparse_ops_bench --preset paper --models res18 "${common[@]}" \
        --providers cudnn narrow ours --out "$dest"
else
    for dtype in float16 bfloat16; do
        step "cifar_$dtype" $PY -m sparse_ops_bench --preset cifar --dtype "$dtype" \
            --methods "${methods[@]}" --out "$dest"
        step "cifar_${dtype}_graph" $PY -m sparse_ops_bench --preset cifar --dtype "$dtype" \
            --methods refill regroup --graph --out "$dest/graph"
        step "paper_$dtype" $PY -m sparse_ops_bench --preset paper --dtype "$dtype" --out "$dest"
    done
fi
echo
echo "== summary ($(($(date +%s) - started)) s in all; results in $dest)"
printf '%s\n' "${summary[@]}"
$PY -m sparse_ops_bench.scripts.summary "$dest" 2>/dev/null || true
exit $status
