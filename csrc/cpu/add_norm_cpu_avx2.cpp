// The row loops for AVX2 + FMA + F16C CPUs (picked at run time: supported_kernels()).
#if defined(__x86_64__) || defined(_M_X64)
// the system headers first, compiled for the baseline target (their inline functions must not
// take this file's target)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../add_norm_params.h"
#include "add_norm_cpu.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,prfchw"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,prfchw")
#endif
#define RESFUSE_CPU_AVX2 \
  1  // add_norm_cpu_vec.h's 8-lane vectors (no predefined macro follows a target pragma)
#define RESFUSE_CPU_ISA avx2
#include "add_norm_cpu_rows.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif

namespace resfuse {
namespace cpu {
extern const Kernels avx2_kernels = {"avx2", avx2::kWidth, &avx2::forward_rows, &avx2::backward_rows};
}  // namespace cpu
}  // namespace resfuse
#endif
