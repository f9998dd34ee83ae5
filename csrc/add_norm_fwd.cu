// The forward kernels' instantiations (one translation unit per direction: they compile in
// parallel) and their host entry point.
#include "add_norm_api.h"
#include "add_norm_launch.h"
#include "cuda_launcher.cuh"

namespace resfuse {

void launch_forward(const FwdParams& p, void* stream) {
  CudaLauncher launch;
  launch.stream = static_cast<cudaStream_t>(stream);
  run_forward(p, launch);
}

RowLayout forward_layout(int64_t D) {
  CudaLauncher launch;
  FwdParams p;  // no operands: the first dtype set; no rows: plans, launches nothing
  p.D = static_cast<int>(D);
  return run_forward(p, launch);
}

bool current_device_supported() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, &reduce_partials_kernel<kReduceSlices>);
  if (err == cudaSuccess) return true;
  (void)cudaGetLastError();  // clear it: "no kernel image" is an answer here, not a failure
  return false;
}

}  // namespace resfuse
