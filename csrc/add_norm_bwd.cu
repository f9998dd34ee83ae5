// The backward kernels' instantiations and their host entry points.
#include "add_norm_api.h"
#include "add_norm_launch.h"
#include "cuda_launcher.cuh"

namespace resfuse {

void plan_backward(BwdParams& p) {
  CudaLauncher launch;
  plan_backward(p, launch);
}

void launch_backward(const BwdParams& p, float* dweight, float* dbias, float* dbranch, void* stream) {
  CudaLauncher launch;
  launch.stream = static_cast<cudaStream_t>(stream);
  run_backward(p, dweight, dbias, dbranch, launch);
}

}  // namespace resfuse
