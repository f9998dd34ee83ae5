// The row loops for AVX-512 (F, BW, VL, BF16) CPUs (picked at run time: supported_kernels()).
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
#pragma clang attribute push(                                                             \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c,prfchw"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c,prfchw")
#endif
// GCC 12's AVX-512 intrinsics start some results from _mm512_undefined_*() and then warn
// that those may be used uninitialized (a known false positive of the compiler's headers)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#define RESFUSE_CPU_AVX512 \
  1  // add_norm_cpu_vec.h's 16-lane vectors (no predefined macro follows a target pragma)
#define RESFUSE_CPU_ISA avx512
#include "add_norm_cpu_rows.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif

namespace resfuse {
namespace cpu {
extern const Kernels avx512_kernels = {"avx512", avx512::kWidth, &avx512::forward_rows,
                                       &avx512::backward_rows};
}  // namespace cpu
}  // namespace resfuse
#endif
