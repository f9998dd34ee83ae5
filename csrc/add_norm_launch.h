// Launch heuristics and dtype dispatch of the add+norm kernels, generic over the launcher:
// csrc/cuda_launcher.cuh launches on a CUDA stream, tests/simt/sim_harness.cpp on the CPU
// emulator, so the tests exercise exactly this code.
//
// A Launcher provides
//   operator()(kernel, dim3 grid, dim3 block, size_t smem_bytes, params)
//   cluster(kernel, dim3 grid, dim3 block, int cluster_blocks, size_t smem_bytes, params):
//       the same with thread-block clusters of cluster_blocks blocks along x
//   int sm_count()
//   int blocks_per_sm(kernel, int block_threads, size_t smem_bytes)
//   int max_cluster_blocks(kernel): 1 where the device (or the kernel's loaded binary)
//       has no clusters
//   int clusters_resident(kernel, int block_threads, size_t smem_bytes, int cluster_blocks):
//       how many such clusters the GPU holds at once (0: they cannot launch)
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "add_norm_bwd_kernel.cuh"
#include "add_norm_fwd_kernel.cuh"

namespace resfuse {

// Threads per row: the power of two that gives each thread at most `chunks_per_thread`
// chunks; capped at `max_threads`, past which the row spans a cluster of up to
// `max_cluster` such blocks (the fewest that hold it: the smaller the cluster, the cheaper its
// barriers and the easier it is to place), or, longer still, streams tiles (single_tile =
// false) with one row per block. Short rows share a block of at least `min_block` threads.
inline RowLayout row_layout(int64_t D, int chunks_per_thread, int max_threads, int min_block,
                            int max_cluster = 1) {
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  const int64_t want = (chunks + chunks_per_thread - 1) / chunks_per_thread;
  RowLayout L;
  L.threads_per_row = 1;
  L.row_shift = 0;
  while (L.threads_per_row < want && L.threads_per_row < max_threads) {
    L.threads_per_row <<= 1;
    ++L.row_shift;
  }
  L.single_tile = want <= L.threads_per_row;
  L.row_threads = L.threads_per_row;
  if (!L.single_tile && L.threads_per_row >= 32) {  // (cluster_sum's gather is one warp)
    int blocks = 1, shift = 0;
    while (static_cast<int64_t>(blocks) * L.threads_per_row < want && blocks < max_cluster)
      blocks <<= 1, ++shift;
    if (static_cast<int64_t>(blocks) * L.threads_per_row >= want) {
      L.cluster_blocks = blocks;
      L.cluster_shift = shift;
      L.row_threads = blocks * L.threads_per_row;
      L.single_tile = true;
      L.block_threads = L.threads_per_row;
      L.rows_per_block = 1;
      return L;
    }
  }
  L.block_threads = L.single_tile ? std::max(L.threads_per_row, min_block) : L.threads_per_row;
  L.rows_per_block = L.block_threads / L.threads_per_row;
  return L;
}

// row_layout with clusters where the kernel has them and the device launches them for it
// (with smem_bytes(layout) of dynamic shared memory), else without. Rows that fit one block
// ask the launcher nothing (its queries take a lock: not on every call's path).
template <class Launcher, class Kernel, class SmemBytes>
RowLayout fitted_layout(Launcher& launch, Kernel kernel, int64_t D, int chunks_per_thread, int max_threads,
                        int min_block, SmemBytes&& smem_bytes, bool kernel_has_clusters = true) {
  const RowLayout L = row_layout(D, chunks_per_thread, max_threads, min_block);
  if (L.single_tile || !kernel_has_clusters) return L;
  const int max_cluster = std::min(launch.max_cluster_blocks(kernel), kMaxClusterBlocks);
  if (max_cluster <= 1) return L;
  const RowLayout C = row_layout(D, chunks_per_thread, max_threads, min_block, max_cluster);
  const bool placed = C.cluster_blocks > 1 &&
                      launch.clusters_resident(kernel, C.block_threads, smem_bytes(C), C.cluster_blocks) > 0;
  return placed ? C : L;
}

// Launches `programs` programs of the layout: blocks, or clusters of its blocks.
template <class Launcher, class Kernel, class Params>
void launch_programs(Launcher& launch, Kernel kernel, const RowLayout& L, int64_t programs, size_t smem,
                     const Params& p) {
  const int64_t blocks = programs * L.cluster_blocks;
  if (blocks > 0x7fffffff) throw std::runtime_error("resfuse CUDA: too many rows for one launch");
  if (L.cluster_blocks > 1)
    launch.cluster(kernel, dim3(static_cast<unsigned>(blocks)), dim3(L.block_threads), L.cluster_blocks, smem,
                   p);
  else
    launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(L.block_threads), smem, p);
}

template <class X, class R, class H, class Y>
struct DTypeSet {
  using TX = X;
  using TR = R;
  using TH = H;
  using TY = Y;
};

// Operand dtype codes for the dispatch: an absent operand fits every set; two operands that
// share a template argument but disagree (kMixed) fit only the run-time set.
constexpr int kAny = -1;
constexpr int kMixed = -2;

inline int dtype_code(const Operand& op) { return op.ptr != nullptr ? static_cast<int>(op.dtype) : kAny; }
inline int unify(int a, int b) { return a == kAny ? b : (b == kAny || a == b) ? a : kMixed; }

// Calls fn(DTypeSet<...>{}) with the compiled set that fits the operands' dtypes: one dtype
// everywhere (the common case), a 16-bit branch with an fp32 residual stream, or `Dyn`.
template <class Fn>
void with_dtype_set(int x, int r, int h, int y, Fn&& fn) {
  const auto fits = [](int code, DType want) { return code == kAny || code == static_cast<int>(want); };
  const auto is = [&](DType X, DType R, DType H, DType Y) {
    return fits(x, X) && fits(r, R) && fits(h, H) && fits(y, Y);
  };
  constexpr DType F32 = DType::kFloat32, F16 = DType::kFloat16, BF16 = DType::kBFloat16;
  using bf16 = __nv_bfloat16;
  using f16 = __half;
  if (is(BF16, BF16, BF16, BF16)) return fn(DTypeSet<bf16, bf16, bf16, bf16>{});
  if (is(F16, F16, F16, F16)) return fn(DTypeSet<f16, f16, f16, f16>{});
  if (is(F32, F32, F32, F32)) return fn(DTypeSet<float, float, float, float>{});
  if (is(BF16, F32, F32, BF16)) return fn(DTypeSet<bf16, float, float, bf16>{});
  if (is(F16, F32, F32, F16)) return fn(DTypeSet<f16, float, float, f16>{});
  return fn(DTypeSet<Dyn, Dyn, Dyn, Dyn>{});
}

// One program per row group; returns the layout it launched with.
template <class Launcher>
RowLayout run_forward(FwdParams p, Launcher& launch, int max_threads = kFwdMaxThreads) {
  with_dtype_set(dtype_code(p.x), dtype_code(p.residual), dtype_code(p.h), dtype_code(p.y), [&](auto set) {
    using S = decltype(set);
    const auto kernel =
        p.is_rms
            ? &add_norm_fwd_kernel<typename S::TX, typename S::TR, typename S::TH, typename S::TY, true>
            : &add_norm_fwd_kernel<typename S::TX, typename S::TR, typename S::TH, typename S::TY, false>;
    p.layout = fitted_layout(launch, kernel, p.D, kFwdChunks, max_threads, kFwdMinBlock,
                             [](const RowLayout&) { return size_t{0}; });
    if (p.rows == 0) return;
    const int64_t groups = (p.rows + p.layout.rows_per_block - 1) / p.layout.rows_per_block;
    launch_programs(launch, kernel, p.layout, groups, 0, p);
  });
  return p.layout;
}

inline int bwd_dtype_x(const BwdParams& p) { return unify(dtype_code(p.dx), dtype_code(p.x)); }
inline int bwd_dtype_h(const BwdParams& p) { return unify(dtype_code(p.h), dtype_code(p.dh)); }

// The backward's two kernel families, plain and with the branch norm. The host code that
// sizes and launches each is a template of its own, instantiated for the CUDA launcher in
// its own translation unit (csrc/add_norm_bwd.cu, csrc/add_norm_bwd_branch_norm.cu): the
// two families, the bulk of the build, compile in parallel.
// fn(kernel, has_clusters)
template <bool kBranchNorm, class Fn>
void with_bwd_kernel(const BwdParams& p, Fn&& fn) {
  with_dtype_set(bwd_dtype_x(p), dtype_code(p.dr), bwd_dtype_h(p), dtype_code(p.dy), [&](auto set) {
    using S = decltype(set);
    fn(p.is_rms ? &add_norm_bwd_kernel<typename S::TX, typename S::TR, typename S::TH, typename S::TY, true,
                                       kBranchNorm>
                : &add_norm_bwd_kernel<typename S::TX, typename S::TR, typename S::TH, typename S::TY, false,
                                       kBranchNorm>,
       !lean_bwd_kernel<typename S::TX, kBranchNorm>());
  });
}

inline size_t bwd_smem_bytes(const BwdParams& p, const RowLayout& L) {
  // the streamed path adds its branch-bias terms to the partial rows directly
  const bool smem_accumulator = p.branch_norm && p.has_branch_bias && L.single_tile;
  return static_cast<size_t>(bwd_smem_floats(L, smem_accumulator)) * sizeof(float);
}

// Sets the backward's layout and persistent grid size (programs = rows of each partial
// buffer, which the caller allocates before run_backward): enough programs (blocks, or
// clusters) to fill every SM at the kernel's occupancy, never more than there are row groups.
template <bool kBranchNorm, class Launcher>
void plan_backward_kernel(BwdParams& p, Launcher& launch, int max_threads) {
  with_bwd_kernel<kBranchNorm>(p, [&](auto kernel, bool has_clusters) {
    const auto smem_bytes = [&](const RowLayout& L) { return bwd_smem_bytes(p, L); };
    p.layout =
        fitted_layout(launch, kernel, p.D, kBwdChunks, max_threads, kBwdMinBlock, smem_bytes, has_clusters);
    const RowLayout& L = p.layout;
    const int64_t groups = (p.rows + L.rows_per_block - 1) / L.rows_per_block;
    const int64_t resident =
        L.cluster_blocks > 1
            ? launch.clusters_resident(kernel, L.block_threads, smem_bytes(L), L.cluster_blocks)
            : static_cast<int64_t>(launch.sm_count()) *
                  std::max(launch.blocks_per_sm(kernel, L.block_threads, smem_bytes(L)), 1);
    p.programs = static_cast<int>(std::min(groups, std::max<int64_t>(resident, 1)));
  });
}

template <bool kBranchNorm, class Launcher>
void launch_bwd_kernel(const BwdParams& p, Launcher& launch) {
  with_bwd_kernel<kBranchNorm>(p, [&](auto kernel, bool) {
    launch_programs(launch, kernel, p.layout, p.programs, bwd_smem_bytes(p, p.layout), p);
  });
}

template <class Launcher>
void plan_backward(BwdParams& p, Launcher& launch, int max_threads = kBwdMaxThreads) {
  if (p.branch_norm)
    plan_backward_kernel<true>(p, launch, max_threads);
  else
    plan_backward_kernel<false>(p, launch, max_threads);
}

// The kernel writes per-program partial sums into p.*_part; the second step reduces them into
// the (D,) fp32 outputs of `grads` (nullptr where not needed; zeros when there are no rows).
template <class Launcher>
void run_backward(const BwdParams& p, const ParamGrads& grads, Launcher& launch) {
  if (p.rows > 0) {
    if (p.branch_norm)
      launch_bwd_kernel<true>(p, launch);
    else
      launch_bwd_kernel<false>(p, launch);
  }
  PartialSums s;
  s.programs = p.rows > 0 ? p.programs : 0;
  s.D = p.D;
  const float* parts[kMaxParamGrads] = {p.dweight_part, p.dbias_part, p.dbranch_part, p.dbranch_weight_part,
                                        p.dbranch_bias_part};
  float* outs[kMaxParamGrads] = {grads.weight, grads.bias, grads.branch_scale, grads.branch_weight,
                                 grads.branch_bias};
  for (int i = 0; i < kMaxParamGrads; ++i) {
    if (outs[i] == nullptr) continue;
    s.part[s.count] = parts[i];
    s.out[s.count] = outs[i];
    ++s.count;
  }
  if (s.count > 0) {
    const unsigned col_blocks = static_cast<unsigned>((p.D + kReduceCols - 1) / kReduceCols);
    launch(&reduce_partials_kernel<kReduceSlices>, dim3(col_blocks, s.count),
           dim3(kReduceCols, kReduceSlices), 0, s);
  }
}

}  // namespace resfuse
