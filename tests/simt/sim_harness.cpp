// The CUDA kernels of csrc/ run on the CPU emulator (simt.h) behind a C ABI for ctypes
// (tests/simt/sim_backend.py). The launch heuristics and dtype dispatch are the real ones
// (csrc/add_norm_launch.h); only the launcher differs. Built by the tests with g++.
// The same heuristics also answer, without running anything, what a GPU launch would be
// (resfuse_sim_plan_*: the static kernel model of tools/kernel_model.py).
#include <dlfcn.h>

#include <cmath>
#include <cstring>
#include <exception>
#include <string>
#include <tuple>
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

// One launch as a GPU launcher would issue it (resfuse_sim_plan_*): nothing runs.
struct PlannedLaunch {
  char kernel[256];  // the kernel's symbol (mangled): the instantiation that runs
  int64_t grid[3];
  int32_t block[3];
  int32_t cluster_blocks;
  int64_t smem_bytes;  // dynamic shared memory
  int32_t param_bytes;
  uint8_t params[1024];  // the kernel's parameter struct, as launched
  // the row layout in the parameters (the add+norm kernels; zeros for the reduction)
  int32_t threads_per_row, rows_per_block, single_tile;
};

// What a GPU's runtime would answer for a kernel (cudaOccupancyMaxActiveBlocksPerMultiprocessor,
// cudaOccupancyMaxActiveClusters): the caller computes it from the compiled binary.
typedef int32_t (*BlocksPerSmFn)(const char* kernel, int32_t block_threads, int64_t smem_bytes);
typedef int32_t (*ClustersResidentFn)(const char* kernel, int32_t block_threads, int64_t smem_bytes,
                                      int32_t cluster_blocks);

}  // extern "C"

namespace {

// A launcher of add_norm_launch.h that records its launches instead of running them, on a
// GPU of `sms` SMs with clusters of up to `max_cluster` blocks whose occupancy the caller
// answers. The kernels are named by their symbols (dladdr), the names nvcc gives the same
// instantiations.
struct PlanningLauncher {
  int sms = 1;
  int max_cluster = 1;
  BlocksPerSmFn blocks_per_sm_fn = nullptr;
  ClustersResidentFn clusters_fn = nullptr;
  std::vector<PlannedLaunch> launches;

  template <class K>
  static std::string symbol(K kernel) {
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(kernel), &info) != 0 && info.dli_sname != nullptr)
      return info.dli_sname;
    throw std::runtime_error("resfuse_sim_plan: a kernel without a symbol");
  }
  template <class K, class P>
  void record(K kernel, dim3 grid, dim3 block, int cluster_blocks, size_t smem, const P& params) {
    static_assert(sizeof(P) <= sizeof(PlannedLaunch::params), "the parameter struct outgrew the record");
    PlannedLaunch l{};
    const std::string name = symbol(kernel);
    std::strncpy(l.kernel, name.c_str(), sizeof(l.kernel) - 1);
    l.grid[0] = grid.x, l.grid[1] = grid.y, l.grid[2] = grid.z;
    l.block[0] = static_cast<int32_t>(block.x), l.block[1] = static_cast<int32_t>(block.y);
    l.block[2] = static_cast<int32_t>(block.z);
    l.cluster_blocks = cluster_blocks;
    l.smem_bytes = static_cast<int64_t>(smem);
    l.param_bytes = static_cast<int32_t>(sizeof(P));
    std::memcpy(l.params, &params, sizeof(P));
    if constexpr (requires { params.layout; }) {
      l.threads_per_row = params.layout.threads_per_row;
      l.rows_per_block = params.layout.rows_per_block;
      l.single_tile = params.layout.single_tile ? 1 : 0;
    }
    launches.push_back(l);
  }
  template <class... A>
  void operator()(void (*kernel)(A...), dim3 grid, dim3 block, size_t smem, const A&... args) {
    record(kernel, grid, block, 1, smem, std::get<0>(std::tie(args...)));
  }
  template <class... A>
  void cluster(void (*kernel)(A...), dim3 grid, dim3 block, int cluster_blocks, size_t smem,
               const A&... args) {
    record(kernel, grid, block, cluster_blocks, smem, std::get<0>(std::tie(args...)));
  }
  int sm_count() const { return sms; }
  template <class K>
  int blocks_per_sm(K kernel, int block_threads, size_t smem) const {
    return blocks_per_sm_fn(symbol(kernel).c_str(), block_threads, static_cast<int64_t>(smem));
  }
  template <class K>
  int max_cluster_blocks(K) const {
    return max_cluster;
  }
  template <class K>
  int clusters_resident(K kernel, int block_threads, size_t smem, int cluster_blocks) const {
    return clusters_fn(symbol(kernel).c_str(), block_threads, static_cast<int64_t>(smem), cluster_blocks);
  }
};

int copy_launches(const PlanningLauncher& launch, PlannedLaunch* out, int32_t capacity, int32_t* count) {
  if (static_cast<int64_t>(launch.launches.size()) > capacity) {
    last_error = "more launches than the caller's records";
    return 1;
  }
  for (size_t i = 0; i < launch.launches.size(); ++i) out[i] = launch.launches[i];
  *count = static_cast<int32_t>(launch.launches.size());
  return 0;
}

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
static resfuse::FwdParams forward_params(const SimTensor* t, const float* rowscale, float* mean,
                                         float* mean_x, int64_t rows, int32_t D, float eps,
                                         float residual_scale, float branch_scale_value, uint32_t flags) {
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
  return p;
}

int resfuse_sim_forward(const SimTensor* t, const float* rowscale, float* mean, float* mean_x, int64_t rows,
                        int32_t D, float eps, float residual_scale, float branch_scale_value, uint32_t flags,
                        int32_t max_threads, int32_t sms, int32_t per_sm, int32_t max_cluster,
                        int32_t* threads_per_row, int32_t* cluster_blocks) {
  try {
    using namespace resfuse;
    FwdParams p =
        forward_params(t, rowscale, mean, mean_x, rows, D, eps, residual_scale, branch_scale_value, flags);
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

// What the forward would launch on a GPU (no kernel runs; the pointers are never read).
int resfuse_sim_plan_forward(const SimTensor* t, const float* rowscale, float* mean, float* mean_x,
                             int64_t rows, int32_t D, float eps, float residual_scale,
                             float branch_scale_value, uint32_t flags, int32_t sms, int32_t max_cluster,
                             BlocksPerSmFn blocks_per_sm, ClustersResidentFn clusters_resident,
                             PlannedLaunch* out, int32_t capacity, int32_t* count) {
  try {
    using namespace resfuse;
    FwdParams p =
        forward_params(t, rowscale, mean, mean_x, rows, D, eps, residual_scale, branch_scale_value, flags);
    PlanningLauncher launch;
    launch.sms = sms;
    launch.max_cluster = max_cluster;
    launch.blocks_per_sm_fn = blocks_per_sm;
    launch.clusters_fn = clusters_resident;
    run_forward(p, launch);
    return copy_launches(launch, out, capacity, count);
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// tensors: dy, dh, h, x, dx, dr, weight, branch_scale, branch_weight
static resfuse::BwdParams backward_params(const SimTensor* t, const float* rowscale, const float* mean,
                                          const float* mean_x, int64_t rows, int32_t D, float eps,
                                          float residual_scale, float branch_scale_value, uint32_t flags) {
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
  return p;
}

static void set_partials(resfuse::BwdParams& p, float* const* parts) {
  float** part_ptrs[resfuse::kMaxParamGrads] = {&p.dweight_part, &p.dbias_part, &p.dbranch_part,
                                                &p.dbranch_weight_part, &p.dbranch_bias_part};
  for (int i = 0; i < resfuse::kMaxParamGrads; ++i) *part_ptrs[i] = parts[i];
}

static resfuse::ParamGrads param_grads(float* const* grads) {
  resfuse::ParamGrads out;
  out.weight = grads[0];
  out.bias = grads[1];
  out.branch_scale = grads[2];
  out.branch_weight = grads[3];
  out.branch_bias = grads[4];
  return out;
}

// grads: dweight, dbias, dbranch_scale, dbranch_weight, dbranch_bias (nullptr when not
// wanted). The partial buffers are allocated here and filled with NaN: a program that
// skipped writing its row would poison the sums.
int resfuse_sim_backward(const SimTensor* t, const float* rowscale, const float* mean, const float* mean_x,
                         float* const* grads, int64_t rows, int32_t D, float eps, float residual_scale,
                         float branch_scale_value, uint32_t flags, int32_t max_threads, int32_t sms,
                         int32_t per_sm, int32_t max_cluster, int32_t* programs, int32_t* cluster_blocks) {
  try {
    using namespace resfuse;
    BwdParams p =
        backward_params(t, rowscale, mean, mean_x, rows, D, eps, residual_scale, branch_scale_value, flags);
    SimLauncher launch;
    launch.sms = sms;
    launch.per_sm = per_sm;
    launch.max_cluster = max_cluster;
    plan_backward(p, launch, max_threads);
    const size_t part_size = static_cast<size_t>(p.programs) * D;
    std::vector<float> parts(kMaxParamGrads * part_size, std::nanf(""));
    float* part_ptrs[kMaxParamGrads] = {};
    for (int i = 0; i < kMaxParamGrads; ++i)
      if (grads[i] != nullptr) part_ptrs[i] = parts.data() + i * part_size;
    set_partials(p, part_ptrs);
    run_backward(p, param_grads(grads), launch);
    *programs = p.programs;
    *cluster_blocks = p.layout.cluster_blocks;
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// What the backward would launch on a GPU (no kernel runs): its kernel, then the reduction
// of the partial sums, whose buffers (`parts`, (programs, D) each, nullptr where a gradient
// is not wanted) the caller names; `programs` receives the persistent grid's size.
int resfuse_sim_plan_backward(const SimTensor* t, const float* rowscale, const float* mean,
                              const float* mean_x, float* const* grads, float* const* parts, int64_t rows,
                              int32_t D, float eps, float residual_scale, float branch_scale_value,
                              uint32_t flags, int32_t sms, int32_t max_cluster, BlocksPerSmFn blocks_per_sm,
                              ClustersResidentFn clusters_resident, PlannedLaunch* out, int32_t capacity,
                              int32_t* count, int32_t* programs) {
  try {
    using namespace resfuse;
    BwdParams p =
        backward_params(t, rowscale, mean, mean_x, rows, D, eps, residual_scale, branch_scale_value, flags);
    PlanningLauncher launch;
    launch.sms = sms;
    launch.max_cluster = max_cluster;
    launch.blocks_per_sm_fn = blocks_per_sm;
    launch.clusters_fn = clusters_resident;
    plan_backward(p, launch);
    set_partials(p, parts);
    run_backward(p, param_grads(grads), launch);
    *programs = p.programs;
    return copy_launches(launch, out, capacity, count);
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

}  // extern "C"
