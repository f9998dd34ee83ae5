// CUDA kernels of the fused residual add + RMSNorm/LayerNorm, forward and backward.
//
//   f = x, or with the branch norm (sandwich layouts)  f = normalize(x) * w_b' (+ b_b)
//   h = residual_scale * residual + ((f * branch_scale_value) * branch_scale[col]) * rowscale[row]
//   y = normalize(h) * w' (+ bias),   w' = 1 + weight if zero_centered else weight
//
// (without the output norm there is no y: OLMo2's h = r + norm(x)). The semantics are those of
// resfuse/reference.py and of the Triton kernels (triton_kernels/add_norm_kernels.py),
// operation for operation: every load is widened to fp32, all arithmetic is fp32, each output
// is rounded once at its store. The forward normalises the fp32 h before rounding it to the
// residual dtype. The backward differentiates each norm at the tensor it reads (the stored h,
// and x): it recomputes the row statistics from those values (the forward's LayerNorm means
// serve only as shifts that keep the variance free of cancellation), so its Jacobian is
// exactly that of the tensor it sees; rstd is not saved.
//
// Specialisation: template arguments are the dtype set (TX: x and dx, TR: residual and
// dresidual, TH: h and dh, TY: y and dy; `Dyn` = each operand's dtype read at run time),
// RMS vs LayerNorm, and in the backward the branch norm (its x row and two more parameter-
// gradient accumulators live in registers next to the output norm's: a run-time flag would
// cost every call that register budget). Everything else (presence of residual / weights /
// biases / branch scale / rowscale / dh / dresidual / output norm, zero-centred weight, D,
// strides, scales, the row layout) is a run-time value: warp-uniform branches cost nothing
// next to the memory traffic, and a handful of instantiations then cover every call.
//
// Layout (add_norm_params.h): `threads_per_row` threads share a row, each owning the 8-element
// chunks lane, lane + t, lane + 2t, ... (consecutive threads touch consecutive 16-byte words:
// coalesced 128-bit accesses). Several rows per block for small D. Rows longer than one
// block's register budget span the blocks of a thread-block cluster on sm_90 (the chunks
// dealt across the cluster's threads as if one block, the row sums exchanged through
// distributed shared memory: still one read and one write per element); elsewhere, and for
// rows too long even for a cluster, they stream tiles of a full block in several passes,
// the later passes re-reading the row, which was just read, from L2.
//
// This header holds what both directions share (the chunk helpers, the row layout, row
// statistics, the affine); the kernels are in add_norm_fwd_kernel.cuh and
// add_norm_bwd_kernel.cuh.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace resfuse {

__device__ __forceinline__ int chunk_len(int D, int col) {
  const int n = D - col;
  return n <= 0 ? 0 : (n > kChunk ? kChunk : n);
}

__device__ __forceinline__ void zero(float (&v)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) v[e] = 0.0f;
}

// Zero past the row's end (the n valid elements of a chunk stay): row sums then count only
// the row's elements.
__device__ __forceinline__ void mask_tail(int n, float (&v)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) v[e] = e < n ? v[e] : 0.0f;
}

__device__ __forceinline__ void copy(const float (&from)[kChunk], float (&to)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) to[e] = from[e];
}

// A compiler-only memory barrier: a load after it is a load again, not the values of an
// earlier load of the same address kept alive in registers.
__device__ __forceinline__ void compiler_fence() { asm volatile("" ::: "memory"); }

// Where a thread works, from the launch indices and the layout only (values the compiler
// can re-derive at any point rather than hold in registers): its row group's `row_threads`
// threads (threads_per_row, times the blocks of a cluster), its lane among them (its chunks
// are lane, lane + row_threads, ...), and its program: the block, or cluster, that rows are
// dealt to and whose row of the partial-sum buffers it writes. A cluster's blocks are
// consecutive along x, so a block's rank in it is blockIdx.x mod cluster_blocks.
// kClusters = false: for a kernel never launched with clusters (one register fewer).
template <bool kClusters = true>
__device__ __forceinline__ int row_lane(const RowLayout& L) {
  const int rank = kClusters ? static_cast<int>(blockIdx.x) & (L.cluster_blocks - 1) : 0;
  return (rank << L.row_shift) + static_cast<int>(threadIdx.x & (L.threads_per_row - 1));
}
template <bool kClusters = true>
__device__ __forceinline__ int row_threads(const RowLayout& L) {
  return kClusters ? L.row_threads : L.threads_per_row;  // (the same value as the reducer's)
}
template <bool kClusters = true>
__device__ __forceinline__ unsigned row_program(const RowLayout& L) {
  return kClusters ? blockIdx.x >> L.cluster_shift : blockIdx.x;
}
template <bool kClusters = true>
__device__ __forceinline__ unsigned row_programs(const RowLayout& L) {
  return kClusters ? gridDim.x >> L.cluster_shift : gridDim.x;
}

__device__ __forceinline__ RowReducer row_reducer(const RowLayout& L, float* scratch) {
  RowReducer red{scratch, L.threads_per_row, static_cast<int>(threadIdx.x >> L.row_shift)};
  red.cluster_blocks = L.cluster_blocks;
  return red;
}

// A norm's row statistics: LayerNorm's mean (0 for RMSNorm) and rstd.
struct RowStats {
  float mean, rstd;
};

// Statistics of a row held in registers, C chunks per thread, zero past the row's end.
// RMSNorm: one reduction; LayerNorm: two over the registers (the mean, then the centred
// squares: no cancellation).
template <bool kRms, int C>
__device__ __forceinline__ RowStats register_row_stats(const float (&v)[C][kChunk], int lane, int t, int D,
                                                       bool row_ok, float eps, RowReducer& red) {
  float s[1] = {0.0f};
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int e = 0; e < kChunk; ++e) s[0] += kRms ? v[c][e] * v[c][e] : v[c][e];
  red.sum(s);
  if (kRms) return {0.0f, fast_rsqrt(s[0] / D + eps)};
  const float mean = s[0] / D;
  float q[1] = {0.0f};
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int n = row_ok ? chunk_len(D, (lane + c * t) * kChunk) : 0;
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      const float dev = e < n ? v[c][e] - mean : 0.0f;
      q[0] += dev * dev;
    }
  }
  red.sum(q);
  return {mean, fast_rsqrt(q[0] / D + eps)};
}

// Statistics of a row streamed chunk by chunk: RMSNorm a sum of squares, LayerNorm a running
// (count, mean, M2) merged per chunk with Chan et al.'s formula (no cancellation).
struct StreamedMoments {
  float count = 0.0f, mean = 0.0f, m2 = 0.0f;  // RMSNorm: m2 is the sum of squares

  template <bool kRms>
  __device__ __forceinline__ void add(const float (&v)[kChunk], int n) {
    if (kRms) {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) m2 += v[e] * v[e];
      return;
    }
    float chunk_sum = 0.0f;
#pragma unroll
    for (int e = 0; e < kChunk; ++e) chunk_sum += v[e];
    const float chunk_mean = chunk_sum / n;
    float chunk_m2 = 0.0f;
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      const float dev = e < n ? v[e] - chunk_mean : 0.0f;
      chunk_m2 += dev * dev;
    }
    RowReducer::chan_merge(count, mean, m2, static_cast<float>(n), chunk_mean, chunk_m2);
  }

  template <bool kRms>
  __device__ __forceinline__ RowStats finish(RowReducer& red, int D, float eps) {
    if (kRms) {
      float s[1] = {m2};
      red.sum(s);
      return {0.0f, fast_rsqrt(s[0] / D + eps)};
    }
    red.moments(count, mean, m2);
    return {mean, fast_rsqrt(m2 / D + eps)};
  }
};

// v <- normalize(v) * w' (+ b) for one chunk, given its row's statistics.
template <bool kRms>
__device__ __forceinline__ void normalize_affine(const ParamVector& weight, const ParamVector& bias,
                                                 bool zero_centered, int col, int n, const RowStats& s,
                                                 float (&v)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) v[e] = kRms ? v[e] * s.rstd : (v[e] - s.mean) * s.rstd;
  if (weight.ptr != nullptr) {
    float w[kChunk];
    load_param_chunk(weight, col, n, w);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) v[e] *= zero_centered ? w[e] + 1.0f : w[e];
  }
  if (bias.ptr != nullptr) {
    float b[kChunk];
    load_param_chunk(bias, col, n, b);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) v[e] += b[e];
  }
}

}  // namespace resfuse
