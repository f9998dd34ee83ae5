#!/usr/bin/env bash
# The owed GPU run of the CUDA backend, in one command, on a machine with an NVIDIA GPU, nvcc,
# PyTorch with CUDA and pytest (the workplace's GPU image has them all):
#
#   tools/gpu_check.sh [steps...]        (make gpu-check; default: all steps in this order)
#
#   wheel     install dist/resfuse-*.whl, built elsewhere (CI: torch 2.14.1), into a scratch
#             dir and run it against the reference on this torch: the stable-ABI claim
#   build     build the extension from source for this GPU (editable, with line info)
#   test      the GPU tests of the cuda backend (RESFUSE_REQUIRE_CUDA_EXT=1: a missing
#             extension fails), then the shared matrices (add + norm and the sandwich
#             layouts) with backend=cuda
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck, initcheck on every kernel path
#             (the sandwich layouts' included)
#   bench     first bandwidth figures, cuda against triton, add + norm and the sandwich
#             layouts (benchmarks/cuda_bandwidth.py)
#
# Logs and a summary go to $OUT (default build/gpu-check). Exit status: failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
STEPS=${*:-wheel build test sanitize bench}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
failed=0
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

note() { echo "$*" | tee -a "$SUMMARY"; }
run_step() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*"
  if "$@" 2>&1 | tee "$OUT/$name.log"; then
    note "PASS $name ($((SECONDS - start)) s)"
  else
    note "FAIL $name ($((SECONDS - start)) s): see $OUT/$name.log"
    failed=$((failed + 1))
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$SUMMARY"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$SUMMARY"
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")

step_wheel() {
  local wheel
  wheel=$(ls dist/resfuse-*.whl 2>/dev/null | head -1)
  if [ -z "$wheel" ]; then echo "no dist/resfuse-*.whl: carry dist/ from a machine that ran make wheel"; return 1; fi
  rm -rf /tmp/resfuse-wheel && $PY -m pip install -q --no-deps --no-index --target /tmp/resfuse-wheel "$wheel" || return 1
  (cd /tmp && PYTHONPATH=/tmp/resfuse-wheel $PY - <<'PYEOF'
import torch, resfuse
from resfuse import cuda_ext
assert resfuse.__file__.startswith("/tmp/resfuse-wheel"), resfuse.__file__
print("wheel built with", cuda_ext.build_info(), "running on torch", torch.__version__)
print(resfuse.backends())
assert resfuse.backends()["cuda"].available, resfuse.backends()["cuda"].reason
x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
r = torch.randn_like(x); w = torch.randn(4096, device="cuda", requires_grad=True)
y, h = resfuse.add_rms_norm(x, r, w, backend="cuda")
y_ref, h_ref = resfuse.add_rms_norm(x, r, w, backend="torch")
assert torch.equal(h, h_ref)
torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
g = torch.autograd.grad(y.float().sum(), (x, w)); g_ref = torch.autograd.grad(y_ref.float().sum(), (x, w))
for a, b in zip(g, g_ref):
    torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=2e-2)
wb = torch.randn(4096, device="cuda", requires_grad=True)  # the sandwich layouts' kernels
y, h = resfuse.norm_add_norm(x, r, wb, w, backend="cuda")
y_ref, h_ref = resfuse.norm_add_norm(x, r, wb, w, backend="torch")
torch.testing.assert_close(h.float(), h_ref.float(), atol=2e-2, rtol=2e-2)
torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
g = torch.autograd.grad(y.float().sum(), (x, wb)); g_ref = torch.autograd.grad(y_ref.float().sum(), (x, wb))
for a, b in zip(g, g_ref):
    torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=2e-2)
print("the wheel's kernels run and agree with the reference on this torch")
PYEOF
  )
}

step_build() {
  TORCH_CUDA_ARCH_LIST="$ARCH" RESFUSE_FORCE_CUDA_BUILD=1 RESFUSE_LINEINFO=1 \
    RESFUSE_PTXAS_LOG="$OUT/ptxas.log" MAX_JOBS=${MAX_JOBS:-16} \
    $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . || return 1
  $PY -c "import resfuse; print(resfuse.backends()); assert resfuse.backends()['cuda'].available"
}

step_test() {
  export RESFUSE_TEST_DEVICE=cuda RESFUSE_REQUIRE_CUDA_EXT=1
  $PY -m pytest -q -p no:cacheprovider tests/test_cuda_gpu.py tests/test_gpu.py \
    tests/test_cuda_build.py -k "not spills and not compile_for" || return 1
  $PY -m pytest -q -p no:cacheprovider tests/test_add_norm.py tests/test_norm_add_norm.py \
    tests/test_ops.py tests/test_modules.py -k "cuda"
}

step_sanitize() {
  local tool rc=0
  for tool in memcheck racecheck synccheck initcheck; do
    echo "--- compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 7 $PY tools/sanitize_cases.py || rc=1
  done
  return $rc
}

step_bench() {
  $PY -m benchmarks.cuda_bandwidth --json "$OUT/bandwidth.json"
}

for step in $STEPS; do
  run_step "$step" "step_$step"
done
cat "$SUMMARY"
exit $failed
