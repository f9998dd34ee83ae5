// The CUDA kernels of csrc/ run on the CPU emulator (simt.h) behind a C ABI for ctypes
// (tests/simt/sim_backend.py). The launch heuristics and dtype dispatch are the real ones
// (csrc/add_norm_launch.h); only the launcher differs. Built by the tests with g++.
#include <cmath>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "add_norm_launch.h"

namespace {

// A GPU of `sms` SMs that holds `per_sm` blocks each and launches clusters of up to
// `max_cluster` blocks (1: none, like a pre-sm_90 device).
struct SimLauncher {
  int sms = 1;
  int per_sm = 1;
  int max_cluster = 1;
  int launches = 0;

  template <class... A>
  void operator()(void (*kernel)(A...), dim3 grid, dim3 block, size_t smem, const A&... args) {
    ++launches;
    simt::launch(grid, block, smem, [&] { kernel(args...); });
  }
  template <class... A>
  void cluster(void (*kernel)(A...), dim3 grid, dim3 block, int cluster_blocks, size_t smem,
               const A&... args) {
    ++launches;
    simt::launch_cluster(grid, block, smem, static_cast<unsigned>(cluster_blocks), [&] { kernel(args...); });
  }
  int sm_count() const { return sms; }
  template <class K>
  int blocks_per_sm(K, int, size_t) const {
    return per_sm;
  }
  template <class K>
  int max_cluster_blocks(K) const {
    return max_cluster;
  }
  template <class K>
  int clusters_resident(K, int, size_t, int cluster_blocks) const {
    return sms * per_sm / cluster_blocks;
  }
};

thread_local std::string last_error;

}  // namespace

extern "C" {

struct SimTensor {
  void* ptr;
  int64_t row_stride;
  int32_t dtype;
};

const char* resfuse_sim_last_error() { return last_error.c_str(); }

// The kernels' launch limits (add_norm_params.h's kLaunchLimits), as cuda_launch_limits has them.
void resfuse_sim_limits(int64_t* out, int32_t n) {
  for (int i = 0; i < n && i < resfuse::kLaunchLimitCount; ++i) out[i] = resfuse::kLaunchLimits[i];
}

// tensors: x, residual, y, h, weight, bias, branch_scale, branch_weight, branch_bias
// (ptr == nullptr when absent)
int resfuse_sim_forward(const SimTensor* t, const float* rowscale, float* mean, float* mean_x, int64_t rows,
                        int32_t D, float eps, float residual_scale, float branch_scale_value, uint32_t flags,
                        int32_t max_threads, int32_t sms, int32_t per_sm, int32_t max_cluster,
                        int32_t* threads_per_row, int32_t* cluster_blocks) {
  try {
    using namespace resfuse;
    FwdParams p;
    p.x = make_operand(t[0].ptr, t[0].row_stride, DType(t[0].dtype), rows);
    p.residual = make_operand(t[1].ptr, t[1].row_stride, DType(t[1].dtype), rows);
    p.y = make_operand(t[2].ptr, t[2].row_stride, DType(t[2].dtype), rows);
    p.h = make_operand(t[3].ptr, t[3].row_stride, DType(t[3].dtype), rows);
    p.weight = make_param(t[4].ptr, DType(t[4].dtype));
    p.bias = make_param(t[5].ptr, DType(t[5].dtype));
    p.branch_scale = make_param(t[6].ptr, DType(t[6].dtype));
    p.branch_weight = make_param(t[7].ptr, DType(t[7].dtype));
    p.branch_bias = make_param(t[8].ptr, DType(t[8].dtype));
    p.rowscale = rowscale;
    p.mean = mean;
    p.mean_x = mean_x;
    p.rows = rows;
    p.D = D;
    p.eps = eps;
    p.residual_scale = residual_scale;
    p.branch_scale_value = branch_scale_value;
    unpack_flags(p, flags);  // the ops' own decoding (csrc/add_norm_params.h)
    SimLauncher launch;
    launch.sms = sms;
    launch.per_sm = per_sm;
    launch.max_cluster = max_cluster;
    const RowLayout layout = run_forward(p, launch, max_threads);
    *threads_per_row = layout.threads_per_row;
    *cluster_blocks = layout.cluster_blocks;
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// tensors: dy, dh, h, x, dx, dr, weight, branch_scale, branch_weight; grads: dweight, dbias,
// dbranch_scale, dbranch_weight, dbranch_bias (nullptr when not wanted). The partial buffers
// are allocated here and filled with NaN: a program that skipped writing its row would poison
// the sums.
int resfuse_sim_backward(const SimTensor* t, const float* rowscale, const float* mean, const float* mean_x,
                         float* const* grads, int64_t rows, int32_t D, float eps, float residual_scale,
                         float branch_scale_value, uint32_t flags, int32_t max_threads, int32_t sms,
                         int32_t per_sm, int32_t max_cluster, int32_t* programs, int32_t* cluster_blocks) {
  try {
    using namespace resfuse;
    BwdParams p;
    p.dy = make_operand(t[0].ptr, t[0].row_stride, DType(t[0].dtype), rows);
    p.dh = make_operand(t[1].ptr, t[1].row_stride, DType(t[1].dtype), rows);
    p.h = make_operand(t[2].ptr, t[2].row_stride, DType(t[2].dtype), rows);
    p.x = make_operand(t[3].ptr, t[3].row_stride, DType(t[3].dtype), rows);
    p.dx = make_operand(t[4].ptr, t[4].row_stride, DType(t[4].dtype), rows);
    p.dr = make_operand(t[5].ptr, t[5].row_stride, DType(t[5].dtype), rows);
    p.weight = make_param(t[6].ptr, DType(t[6].dtype));
    p.branch_scale = make_param(t[7].ptr, DType(t[7].dtype));
    p.branch_weight = make_param(t[8].ptr, DType(t[8].dtype));
    p.rowscale = rowscale;
    p.mean = mean;
    p.mean_x = mean_x;
    p.rows = rows;
    p.D = D;
    p.eps = eps;
    p.residual_scale = residual_scale;
    p.branch_scale_value = branch_scale_value;
    unpack_flags(p, flags);
    SimLauncher launch;
    launch.sms = sms;
    launch.per_sm = per_sm;
    launch.max_cluster = max_cluster;
    plan_backward(p, launch, max_threads);
    const size_t part_size = static_cast<size_t>(p.programs) * D;
    std::vector<float> parts(kMaxParamGrads * part_size, std::nanf(""));
    float** part_ptrs[kMaxParamGrads] = {&p.dweight_part, &p.dbias_part, &p.dbranch_part,
                                         &p.dbranch_weight_part, &p.dbranch_bias_part};
    for (int i = 0; i < kMaxParamGrads; ++i)
      if (grads[i] != nullptr) *part_ptrs[i] = parts.data() + i * part_size;
    ParamGrads out;
    out.weight = grads[0];
    out.bias = grads[1];
    out.branch_scale = grads[2];
    out.branch_weight = grads[3];
    out.branch_bias = grads[4];
    run_backward(p, out, launch);
    *programs = p.programs;
    *cluster_blocks = p.layout.cluster_blocks;
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

}  // extern "C"
