// The plain backward kernels' instantiations and the backward's host entry points.
#include "add_norm_api.h"
#include "add_norm_launch.h"
#include "cuda_launcher.cuh"

namespace resfuse {

// The branch-norm kernels are compiled by add_norm_bwd_branch_norm.cu, in parallel with these.
extern template void plan_backward_kernel<true, CudaLauncher>(BwdParams&, CudaLauncher&, int);
extern template void launch_bwd_kernel<true, CudaLauncher>(const BwdParams&, CudaLauncher&);

void plan_backward(BwdParams& p) {
  CudaLauncher launch;
  plan_backward(p, launch);
}

RowLayout backward_layout(int64_t D, bool branch_norm) {
  CudaLauncher launch;
  BwdParams p;
  p.D = static_cast<int>(D);
  p.rows = 1;
  p.branch_norm = branch_norm;
  plan_backward(p, launch);
  return p.layout;
}

void launch_backward(const BwdParams& p, const ParamGrads& grads, void* stream) {
  CudaLauncher launch;
  launch.stream = static_cast<cudaStream_t>(stream);
  run_backward(p, grads, launch);
}

}  // namespace resfuse
