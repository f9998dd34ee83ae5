// The plain backward kernels' instantiations and the backward's host entry points.
#include "add_norm_api.h"
#include "add_norm_launch.h"
#include "cuda_launcher.cuh"

namespace resfuse {

// The branch-norm kernels are compiled by add_norm_bwd_branch_norm.cu, in parallel with these.
extern template int bwd_blocks_per_sm<true, CudaLauncher>(const BwdParams&, CudaLauncher&);
extern template void launch_bwd_kernel<true, CudaLauncher>(const BwdParams&, CudaLauncher&);

void plan_backward(BwdParams& p) {
  CudaLauncher launch;
  plan_backward(p, launch);
}

void launch_backward(const BwdParams& p, const ParamGrads& grads, void* stream) {
  CudaLauncher launch;
  launch.stream = static_cast<cudaStream_t>(stream);
  run_backward(p, grads, launch);
}

}  // namespace resfuse
