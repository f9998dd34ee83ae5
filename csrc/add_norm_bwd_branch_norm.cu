// The backward kernels with the branch norm (norm_add_norm / norm_add): their own translation
// unit, compiled in parallel with add_norm_bwd.cu, which launches them through these.
#include "add_norm_launch.h"
#include "cuda_launcher.cuh"

namespace resfuse {

template void plan_backward_kernel<true, CudaLauncher>(BwdParams&, CudaLauncher&, int);
template void launch_bwd_kernel<true, CudaLauncher>(const BwdParams&, CudaLauncher&);

}  // namespace resfuse
