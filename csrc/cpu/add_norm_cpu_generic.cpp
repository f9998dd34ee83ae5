// The row loops for any x86-64 (SSE2) or other CPU: the fallback of supported_kernels().
#define RESFUSE_CPU_ISA generic
#include "add_norm_cpu_rows.h"

namespace resfuse {
namespace cpu {
extern const Kernels generic_kernels = {"generic", generic::kWidth, &generic::forward_rows,
                                        &generic::backward_rows};

void load_floats(const void* src, DType dtype, float* dst, int n) { generic::load_row(src, dtype, dst, n); }
}  // namespace cpu
}  // namespace resfuse
