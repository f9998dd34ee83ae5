// The backward kernel of the fused residual add + RMSNorm/LayerNorm, and the second step of its
// deterministic parameter-gradient reduction (the computation and its specialisation:
// add_norm_kernels.cuh).
#pragma once

#include "add_norm_kernels.cuh"

namespace resfuse {

// ------------------------------------------------------------------------------ backward

// Per-row coefficients of a norm's input gradient, from the row sums of d = v - shift, d^2,
// g*d and g (g = dout * w'):  xhat = (d - mean_d) * rstd,  dv = rstd * (g - c1 * xhat - c2),
// with c1 = mean(g * xhat) and c2 = mean(g) (zero for RMSNorm, where mean_d = 0 too).
struct GradCoefficients {
  float mean_d, rstd, c1, c2;
};

// Row sums per norm kind: RMSNorm {d^2, g*d}, LayerNorm {d, d^2, g*d, g}.
template <bool kRms>
struct GradSums {
  static constexpr int N = kRms ? 2 : 4;
  float s[N] = {};
};

template <bool kRms>
__device__ __forceinline__ GradCoefficients grad_coefficients(const float* s, int D, float eps) {
  if (kRms) {  // s = {sum d^2, sum g*d}
    const float rstd = fast_rsqrt(s[0] / D + eps);
    return {0.0f, rstd, rstd * s[1] / D, 0.0f};
  }
  // s = {sum d, sum d^2, sum g*d, sum g}
  const float mean_d = s[0] / D;
  const float var = fmaxf(s[1] / D - mean_d * mean_d, 0.0f);
  const float rstd = fast_rsqrt(var + eps);
  return {mean_d, rstd, rstd * (s[2] / D - mean_d * s[3] / D), s[3] / D};
}

// g = dout * w' (w' = 1 + w with zero-centred weights): the gradient reaching the normalised
// values.
__device__ __forceinline__ void times_weight(const ParamVector& weight, bool zero_centered, int col, int n,
                                             const float (&dout)[kChunk], float (&g)[kChunk]) {
  if (weight.ptr != nullptr && n > 0) {
    load_param_chunk(weight, col, n, g);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) g[e] = dout[e] * (zero_centered ? g[e] + 1.0f : g[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) g[e] = dout[e];
  }
}

// Adds one chunk's terms to a norm's row sums; d and dout are zero past the row's end.
template <bool kRms>
__device__ __forceinline__ void add_row_sums(const ParamVector& weight, bool zero_centered, int col, int n,
                                             const float (&d)[kChunk], const float (&dout)[kChunk],
                                             float* s) {
  float g[kChunk];
  times_weight(weight, zero_centered, col, n, dout, g);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    if (kRms) {
      s[0] += d[e] * d[e];
      s[1] += g[e] * d[e];
    } else {
      s[0] += d[e];
      s[1] += d[e] * d[e];
      s[2] += g[e] * d[e];
      s[3] += g[e];
    }
  }
}

// d = v - shift for the valid elements of a chunk (zero past the row's end).
__device__ __forceinline__ void subtract_shift(int n, float shift, float (&d)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) d[e] = e < n ? d[e] - shift : 0.0f;
}

// One chunk of a norm's backward, given its row's coefficients: xhat (for the weight's
// gradient, dout * xhat) and the input gradient dv. Past the row's end dv is not zero for
// LayerNorm: callers that sum it mask it.
template <bool kRms>
__device__ __forceinline__ void norm_backward_chunk(const ParamVector& weight, bool zero_centered, int col,
                                                    int n, const float (&d)[kChunk],
                                                    const float (&dout)[kChunk], const GradCoefficients& k,
                                                    float (&xhat)[kChunk], float (&dv)[kChunk]) {
  float g[kChunk];
  times_weight(weight, zero_centered, col, n, dout, g);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    xhat[e] = kRms ? d[e] * k.rstd : (d[e] - k.mean_d) * k.rstd;
    dv[e] = kRms ? (g[e] - xhat[e] * k.c1) * k.rstd : (g[e] - xhat[e] * k.c1 - k.c2) * k.rstd;
  }
}

__device__ __forceinline__ void add_products(float (&acc)[kChunk], const float (&a)[kChunk],
                                             const float (&b)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) acc[e] += a[e] * b[e];
}

__device__ __forceinline__ void add_values(float (&acc)[kChunk], const float (&a)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) acc[e] += a[e];
}

// h's gradient (the output norm's plus h's own upstream gradient, in dh) leaves through the
// residual (stored as dresidual, scaled, when asked for) and the branch: dh becomes the
// gradient reaching the branch value f, df = dh * branch_scale_value.
template <class TH, class TR>
__device__ __forceinline__ void residual_and_branch_grad(const BwdParams& p, int64_t row, int col, int n,
                                                         float (&dh)[kChunk]) {
  if (p.dh.ptr != nullptr) {
    float up[kChunk];
    load_row_chunk<TH>(p.dh, row, col, n, up);
    add_values(dh, up);
  }
  if (p.dr.ptr != nullptr) {
    float dr[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) dr[e] = dh[e] * p.residual_scale;
    store_row_chunk<TR>(p.dr, row, col, n, dr);
  }
#pragma unroll
  for (int e = 0; e < kChunk; ++e) dh[e] *= p.branch_scale_value;
}

// dx of the plain branch (f = x, scaled by the rowscale and the branch-scale tensor): stored;
// the branch scale's gradient terms go into acc_dbs.
template <class TX>
__device__ __forceinline__ void plain_branch_grad(const BwdParams& p, int64_t row, int col, int n,
                                                  float rowscale, float (&df)[kChunk],
                                                  float (&acc_dbs)[kChunk]) {
  if (p.rowscale != nullptr) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) df[e] *= rowscale;
  }
  if (p.branch_scale.ptr != nullptr) {
    float xv[kChunk], bs[kChunk];
    load_row_chunk<TX>(p.x, row, col, n, xv);
    load_param_chunk(p.branch_scale, col, n, bs);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      acc_dbs[e] += df[e] * xv[e];  // d h / d bs = branch_scale_value * rowscale * x
      df[e] *= bs[e];
    }
  }
  store_row_chunk<TX>(p.dx, row, col, n, df);
}

// x - shift_x for one chunk (LayerNorm's branch norm; zero past the row's end).
template <class TX, bool kRms>
__device__ __forceinline__ void load_shifted_x(const BwdParams& p, int64_t row, int col, int n, float shift_x,
                                               float (&xs)[kChunk]) {
  load_row_chunk<TX>(p.x, row, col, n, xs);
  if (!kRms) subtract_shift(n, shift_x, xs);
}

// Asks L2 for one operand's chunks of a row ahead of time: the persistent loop's next loads
// then hit L2. (Holding the next row in registers instead would make the kernel spill.)
__device__ __forceinline__ void prefetch_row_l2(const BwdParams& p, const Operand& op, int64_t row, int lane,
                                                int t) {
#ifndef RESFUSE_SIMT
  if (op.ptr == nullptr || row >= p.rows) return;
#pragma unroll
  for (int c = 0; c < kBwdChunks; ++c) {
    const int col = (lane + c * t) * kChunk;
    if (chunk_len(p.D, col) == 0) continue;
    const char* a = static_cast<const char*>(op.ptr) + (row * op.row_stride + col) * dtype_bytes(op.dtype);
    asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
  }
#endif
}

// Dynamic shared memory of the backward, in floats: the staging area of write_partials (when
// a block holds several row groups), then the branch norm's bias accumulator (when there is
// one and the rows are in registers). At most 512 threads x 16 floats = 32 KiB, or 256 x 24
// = 24 KiB: within the default 48 KiB.
RESFUSE_HOST_DEVICE inline int bwd_scratch_floats(const RowLayout& L) {
  return L.rows_per_block > 1 ? L.block_threads * kChunk : 0;
}
RESFUSE_HOST_DEVICE inline int bwd_smem_floats(const RowLayout& L, bool smem_accumulator) {
  return bwd_scratch_floats(L) + (smem_accumulator ? L.block_threads * kBwdChunks * kChunk : 0);
}

// The block's row of one partial-sum buffer: the sum of its row groups' accumulators, added
// in slot order (deterministic). `smem` holds block_threads * kChunk floats.
template <bool kClusters>
__device__ __forceinline__ void write_partials(const BwdParams& p, float* part,
                                               float (&acc)[kBwdChunks][kChunk], int slot, int lane,
                                               float* smem) {
  const int t = row_threads<kClusters>(p.layout), rows_per_block = p.layout.rows_per_block;
  float* out = part + static_cast<int64_t>(row_program<kClusters>(p.layout)) * p.D;
  const bool vec = (p.D & 3) == 0;  // the buffer's rows are then 16-byte aligned
  if (rows_per_block == 1) {        // (the only case with clusters: t, lane span the cluster)
#pragma unroll
    for (int c = 0; c < kBwdChunks; ++c) {
      const int col = (lane + c * t) * kChunk;
      const int n = chunk_len(p.D, col);
      if (n > 0) ChunkIO<float>::store(out, col, DType::kFloat32, n, vec, acc[c]);
    }
    return;  // block-uniform: no barrier below is skipped by only part of the block
  }
#pragma unroll
  for (int c = 0; c < kBwdChunks; ++c) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) smem[threadIdx.x * kChunk + e] = acc[c][e];
    __syncthreads();
    if (slot == 0) {
      const int col = (lane + c * t) * kChunk;
      const int n = chunk_len(p.D, col);
      if (n > 0) {
        float s[kChunk];
        zero(s);
        for (int r = 0; r < rows_per_block; ++r)
#pragma unroll
          for (int e = 0; e < kChunk; ++e) s[e] += smem[(r * t + lane) * kChunk + e];
        ChunkIO<float>::store(out, col, DType::kFloat32, n, vec, s);
      }
    }
    __syncthreads();
  }
}

// A parameter-gradient accumulator in shared memory: element (c, e) of each thread's chunks
// at [(c * kChunk + e) * block_threads + threadIdx.x] (conflict-free). Only its thread touches
// it until write_smem_partials, so the row loop needs no barriers.
struct SmemAccumulator {
  float* base;  // nullptr: not used in this call
  int stride;   // block_threads

  __device__ __forceinline__ float& at(int c, int e) const {
    return base[(c * kChunk + e) * stride + threadIdx.x];
  }
  __device__ __forceinline__ void zero_all() const {
#pragma unroll
    for (int c = 0; c < kBwdChunks; ++c)
#pragma unroll
      for (int e = 0; e < kChunk; ++e) at(c, e) = 0.0f;
  }
  __device__ __forceinline__ void add(int c, const float (&v)[kChunk]) const {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) at(c, e) += v[e];
  }
};

// write_partials for an accumulator in shared memory: the block's row groups summed in slot
// order (the same order as write_partials), read straight from the accumulator.
template <bool kClusters>
__device__ __forceinline__ void write_smem_partials(const BwdParams& p, float* part,
                                                    const SmemAccumulator& acc, int slot, int lane) {
  const int t = row_threads<kClusters>(p.layout);  // lane, t: the columns (across a cluster)
  // the accumulator's index: the thread's place in its block
  const int block_t = kClusters ? p.layout.threads_per_row : t;
  const int block_lane = kClusters ? static_cast<int>(threadIdx.x & (block_t - 1)) : lane;
  float* out = part + static_cast<int64_t>(row_program<kClusters>(p.layout)) * p.D;
  const bool vec = (p.D & 3) == 0;
  __syncthreads();  // block-uniform: the other row groups' accumulators are complete
  if (slot != 0) return;
#pragma unroll
  for (int c = 0; c < kBwdChunks; ++c) {
    const int col = (lane + c * t) * kChunk;
    const int n = chunk_len(p.D, col);
    if (n == 0) continue;
    float s[kChunk];
    zero(s);
    for (int r = 0; r < p.layout.rows_per_block; ++r)
#pragma unroll
      for (int e = 0; e < kChunk; ++e)
        s[e] += acc.base[(c * kChunk + e) * acc.stride + r * block_t + block_lane];
    ChunkIO<float>::store(out, col, DType::kFloat32, n, vec, s);
  }
}

// Rows of dy and x stay in registers, except in the branch-norm kernel with run-time dtypes
// (its loads take more registers): that one reads each chunk again where it is needed rather
// than spill, and has no cluster layout (cluster_sum's registers would make it spill; it
// streams long rows instead: a rare dtype mix at a rare width).
template <class TX, bool kBranchNorm>
RESFUSE_HOST_DEVICE constexpr bool lean_bwd_kernel() {
  return kBranchNorm && std::is_same<TX, Dyn>::value;
}

// Rows that fit in registers: each row group walks rows program * rows_per_block + slot,
// + programs * rows_per_block, ... (persistent grid; a program is a block, or a cluster), reading each
// operand once, with the next row requested into L2 while it reduces and writes the current one. Per row: the
// output norm's backward from h and dy (one reduction), the gradient reaching h and the branch value f; then
// either dx of the plain branch, or the branch norm's backward from x and df (a second reduction). The
// parameter gradients accumulate in registers over all of the program's rows: partial buffers are O(programs
// x D), not O(rows x D).
template <class TX, class TR, class TH, class TY, bool kRms, bool kBranchNorm>
__device__ __forceinline__ void bwd_rows_in_registers(const BwdParams& p, RowReducer& red, int slot, int lane,
                                                      float* smem) {
  constexpr int C = kBwdChunks;
  constexpr bool kLean = lean_bwd_kernel<TX, kBranchNorm>();
  constexpr bool kClusters = !kLean;
  const int t = row_threads<kClusters>(p.layout), D = p.D;
  const int64_t step = static_cast<int64_t>(row_programs<kClusters>(p.layout)) * p.layout.rows_per_block;
  // Parameter-gradient accumulators: the output norm's weight and bias, then the branch's:
  // the branch-scale tensor (plain), or the branch norm's weight and bias. The branch norm's
  // bias accumulator sits in shared memory (bwd_smem_floats): a fourth one in registers, next
  // to the rows of h, dy and x, would spill.
  float acc_dw[C][kChunk], acc_db[C][kChunk], acc_dbranch[C][kChunk];
#pragma unroll
  for (int c = 0; c < C; ++c) zero(acc_dw[c]), zero(acc_db[c]), zero(acc_dbranch[c]);
  const SmemAccumulator acc_dbranch_bias{
      kBranchNorm && p.has_branch_bias ? smem + bwd_scratch_floats(p.layout) : nullptr,
      p.layout.block_threads};
  if (acc_dbranch_bias.base != nullptr) acc_dbranch_bias.zero_all();

  int64_t row = static_cast<int64_t>(row_program<kClusters>(p.layout)) * p.layout.rows_per_block + slot;
  // the loop bound is block- (and cluster-) uniform (the program's first row), so every
  // thread reaches the same barriers; row groups past the end compute on zeros, store nothing
  for (int64_t base = row - slot; base < p.rows; base += step, row += step) {
    const bool row_ok = row < p.rows;
    float df[C][kChunk];  // the gradient reaching h, then the branch value f
    if (p.output_norm) {
      // h - shift and dy, fp32, zero past the end. The lean variant reads dy's chunks again
      // where they are needed (by the same thread, moments after the first read: L1 hits).
      float d[C][kChunk], dy_row[kLean ? 1 : C][kChunk];
      const float shift = (!kRms && row_ok) ? p.mean[row] : 0.0f;
      GradSums<kRms> s;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int col = (lane + c * t) * kChunk;
        const int n = row_ok ? chunk_len(D, col) : 0;
        float dy[kChunk];
        if (n > 0) {
          load_row_chunk<TH>(p.h, row, col, n, d[c]);
          load_row_chunk<TY>(p.dy, row, col, n, dy);
        } else {
          zero(d[c]), zero(dy);
        }
        if (!kRms) subtract_shift(n, shift, d[c]);
        add_row_sums<kRms>(p.weight, p.zero_centered, col, n, d[c], dy, s.s);
        if constexpr (!kLean) copy(dy, dy_row[c]);
      }
      prefetch_row_l2(p, p.h, row + step, lane, t);
      prefetch_row_l2(p, p.dy, row + step, lane, t);
      red.sum(s.s);
      const GradCoefficients k = grad_coefficients<kRms>(s.s, D, p.eps);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int col = (lane + c * t) * kChunk;
        const int n = row_ok ? chunk_len(D, col) : 0;
        float dy[kChunk], xhat[kChunk];
        if constexpr (!kLean) {
          copy(dy_row[c], dy);
        } else if (n > 0) {
          compiler_fence();
          load_row_chunk<TY>(p.dy, row, col, n, dy);
        } else {
          zero(dy);
        }
        norm_backward_chunk<kRms>(p.weight, p.zero_centered, col, n, d[c], dy, k, xhat, df[c]);
        add_products(acc_dw[c], dy, xhat);  // dy is zero past the row's end
        if (p.has_bias) add_values(acc_db[c], dy);
      }
    } else {
#pragma unroll
      for (int c = 0; c < C; ++c) zero(df[c]);
    }
    if (kBranchNorm) {
      prefetch_row_l2(p, p.x, row + step, lane, t);
      if (!p.output_norm) prefetch_row_l2(p, p.dh, row + step, lane, t);
    }
    const float rowscale = (!kBranchNorm && p.rowscale != nullptr && row_ok) ? p.rowscale[row] : 1.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int col = (lane + c * t) * kChunk;
      const int n = row_ok ? chunk_len(D, col) : 0;
      if (n > 0) {
        residual_and_branch_grad<TH, TR>(p, row, col, n, df[c]);
        if (!kBranchNorm) plain_branch_grad<TX>(p, row, col, n, rowscale, df[c], acc_dbranch[c]);
      }
    }
    if (kBranchNorm) {
      // the branch norm's backward at x, for the upstream gradient df
      constexpr bool kHoldX = !kLean;
      const float shift_x = (!kRms && row_ok) ? p.mean_x[row] : 0.0f;
      float xs_row[kHoldX ? C : 1][kChunk];  // x - shift_x, zero past the end
      GradSums<kRms> s;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int col = (lane + c * t) * kChunk;
        const int n = row_ok ? chunk_len(D, col) : 0;
        mask_tail(n, df[c]);  // LayerNorm's dh is not zero there
        float xs[kChunk];
        if (n > 0)
          load_shifted_x<TX, kRms>(p, row, col, n, shift_x, xs);
        else
          zero(xs);
        add_row_sums<kRms>(p.branch_weight, p.zero_centered, col, n, xs, df[c], s.s);
        if constexpr (kHoldX) copy(xs, xs_row[c]);
      }
      red.sum(s.s);
      const GradCoefficients kb = grad_coefficients<kRms>(s.s, D, p.eps);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int col = (lane + c * t) * kChunk;
        const int n = row_ok ? chunk_len(D, col) : 0;
        if (n == 0) continue;
        float xs[kChunk], xhat[kChunk], dx[kChunk];
        if constexpr (kHoldX) {
          copy(xs_row[c], xs);
        } else {
          compiler_fence();
          load_shifted_x<TX, kRms>(p, row, col, n, shift_x, xs);
        }
        norm_backward_chunk<kRms>(p.branch_weight, p.zero_centered, col, n, xs, df[c], kb, xhat, dx);
        add_products(acc_dbranch[c], df[c], xhat);
        if (acc_dbranch_bias.base != nullptr) acc_dbranch_bias.add(c, df[c]);
        store_row_chunk<TX>(p.dx, row, col, n, dx);
      }
    }
  }
  if (p.dweight_part != nullptr) write_partials<kClusters>(p, p.dweight_part, acc_dw, slot, lane, smem);
  if (p.dbias_part != nullptr) write_partials<kClusters>(p, p.dbias_part, acc_db, slot, lane, smem);
  if (kBranchNorm) {
    if (p.dbranch_weight_part != nullptr)
      write_partials<kClusters>(p, p.dbranch_weight_part, acc_dbranch, slot, lane, smem);
    if (p.dbranch_bias_part != nullptr)
      write_smem_partials<kClusters>(p, p.dbranch_bias_part, acc_dbranch_bias, slot, lane);
  } else if (p.dbranch_part != nullptr) {
    write_partials<kClusters>(p, p.dbranch_part, acc_dbranch, slot, lane, smem);
  }
}
__device__ __forceinline__ void add_to_partial(float* part_row, int col, int n, bool vec,
                                               const float (&v)[kChunk]) {
  if (part_row == nullptr) return;
  float a[kChunk];
  ChunkIO<float>::load(part_row, col, DType::kFloat32, n, vec, a);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) a[e] += v[e];
  ChunkIO<float>::store(part_row, col, DType::kFloat32, n, vec, a);
}

// The gradient reaching h for one streamed chunk: the output norm's (from its row
// coefficients; dy and xhat are returned for the parameter gradients), then through
// residual_and_branch_grad the gradient reaching f. Zero past the row's end.
template <class TR, class TH, class TY, bool kRms>
__device__ __forceinline__ void streamed_branch_grad(const BwdParams& p, int64_t row, int col, int n,
                                                     float shift, const GradCoefficients& k,
                                                     float (&dy)[kChunk], float (&xhat)[kChunk],
                                                     float (&df)[kChunk]) {
  if (p.output_norm) {
    float d[kChunk];
    load_row_chunk<TH>(p.h, row, col, n, d);
    load_row_chunk<TY>(p.dy, row, col, n, dy);
    if (!kRms) subtract_shift(n, shift, d);
    norm_backward_chunk<kRms>(p.weight, p.zero_centered, col, n, d, dy, k, xhat, df);
    mask_tail(n, df);
  } else {
    zero(dy), zero(xhat), zero(df);
  }
  residual_and_branch_grad<TH, TR>(p, row, col, n, df);
}

// Rows longer than the register budget (one row per block, rows_per_block == 1): pass 1
// streams the row's tiles for the output norm's row sums (and the branch norm's statistics
// of x); pass 2 re-reads them (L2 hits) for the input gradients and adds each chunk's
// parameter gradients into the block's own row of the partial buffers. With the branch norm
// its gradient sums are complete only after pass 2, so pass 3 recomputes df and writes dx.
// Every element of the partial rows is owned by one thread for the whole kernel, so the
// read-modify-writes need no synchronisation, and the row stays in L2.
template <class TX, class TR, class TH, class TY, bool kRms, bool kBranchNorm>
__device__ __forceinline__ void bwd_rows_streamed(const BwdParams& p, RowReducer& red, int lane) {
  const int t = p.layout.threads_per_row, D = p.D;
  const int tile = t * kBwdChunks * kChunk;
  const int64_t part_offset = static_cast<int64_t>(blockIdx.x) * D;
  const auto part_row = [&](float* part) { return part != nullptr ? part + part_offset : nullptr; };
  float* dw_row = part_row(p.dweight_part);
  float* db_row = part_row(p.dbias_part);
  float* dbs_row = kBranchNorm ? nullptr : part_row(p.dbranch_part);
  float* dbw_row = kBranchNorm ? part_row(p.dbranch_weight_part) : nullptr;
  float* dbb_row = kBranchNorm ? part_row(p.dbranch_bias_part) : nullptr;
  const bool vec = (D & 3) == 0;
  float zeros[kChunk];
  zero(zeros);
  for (int start = 0; start < D; start += tile) {
#pragma unroll
    for (int c = 0; c < kBwdChunks; ++c) {
      const int col = start + (lane + c * t) * kChunk;
      const int n = chunk_len(D, col);
      if (n == 0) continue;
      float* const parts[] = {dw_row, db_row, dbs_row, dbw_row, dbb_row};
#pragma unroll
      for (int i = 0; i < kMaxParamGrads; ++i)
        if (parts[i] != nullptr) ChunkIO<float>::store(parts[i], col, DType::kFloat32, n, vec, zeros);
    }
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {  // block-uniform
    const float shift = (!kRms && p.output_norm) ? p.mean[row] : 0.0f;
    const float shift_x = (!kRms && kBranchNorm) ? p.mean_x[row] : 0.0f;
    GradSums<kRms> s, sb;  // the output norm's and the branch norm's
    for (int start = 0; start < D; start += tile) {
#pragma unroll
      for (int c = 0; c < kBwdChunks; ++c) {
        const int col = start + (lane + c * t) * kChunk;
        const int n = chunk_len(D, col);
        if (n == 0) continue;
        if (p.output_norm) {
          float d[kChunk], dy[kChunk];
          load_row_chunk<TH>(p.h, row, col, n, d);
          load_row_chunk<TY>(p.dy, row, col, n, dy);
          if (!kRms) subtract_shift(n, shift, d);
          add_row_sums<kRms>(p.weight, p.zero_centered, col, n, d, dy, s.s);
        }
        if (kBranchNorm) {
          float xs[kChunk], none[kChunk];
          load_shifted_x<TX, kRms>(p, row, col, n, shift_x, xs);
          zero(none);  // the terms of df come in pass 2
          add_row_sums<kRms>(ParamVector{}, false, col, n, xs, none, sb.s);
        }
      }
    }
    GradCoefficients k{}, kb{};
    if (p.output_norm) {
      red.sum(s.s);
      k = grad_coefficients<kRms>(s.s, D, p.eps);
    }
    if (kBranchNorm) {
      red.sum(sb.s);
      kb = grad_coefficients<kRms>(sb.s, D, p.eps);  // mean_d and rstd of x; c1, c2 after pass 2
    }
    const float rowscale = (!kBranchNorm && p.rowscale != nullptr) ? p.rowscale[row] : 1.0f;
    GradSums<kRms> sg;  // the branch norm's sums of g * d and g (the others stay zero)
    for (int start = 0; start < D; start += tile) {
#pragma unroll
      for (int c = 0; c < kBwdChunks; ++c) {
        const int col = start + (lane + c * t) * kChunk;
        const int n = chunk_len(D, col);
        if (n == 0) continue;
        float dy[kChunk], xhat[kChunk], df[kChunk], terms[kChunk];
        streamed_branch_grad<TR, TH, TY, kRms>(p, row, col, n, shift, k, dy, xhat, df);
        if (dw_row != nullptr) {
          zero(terms);
          add_products(terms, dy, xhat);
          add_to_partial(dw_row, col, n, vec, terms);
        }
        add_to_partial(db_row, col, n, vec, dy);
        if (!kBranchNorm) {
          zero(terms);
          plain_branch_grad<TX>(p, row, col, n, rowscale, df, terms);
          add_to_partial(dbs_row, col, n, vec, terms);
        } else {
          float xs[kChunk], xhat_b[kChunk], unused[kChunk];
          load_shifted_x<TX, kRms>(p, row, col, n, shift_x, xs);
          float g[kChunk];
          times_weight(p.branch_weight, p.zero_centered, col, n, df, g);
#pragma unroll
          for (int e = 0; e < kChunk; ++e) {
            if (kRms) {
              sg.s[1] += g[e] * xs[e];
            } else {
              sg.s[2] += g[e] * xs[e];
              sg.s[3] += g[e];
            }
          }
          norm_backward_chunk<kRms>(ParamVector{}, false, col, n, xs, df, kb, xhat_b, unused);
          if (dbw_row != nullptr) {
            zero(terms);
            add_products(terms, df, xhat_b);
            add_to_partial(dbw_row, col, n, vec, terms);
          }
          add_to_partial(dbb_row, col, n, vec, df);
        }
      }
    }
    if (kBranchNorm) {
      red.sum(sg.s);
#pragma unroll
      for (int i = 0; i < GradSums<kRms>::N; ++i) sb.s[i] += sg.s[i];
      kb = grad_coefficients<kRms>(sb.s, D, p.eps);
      for (int start = 0; start < D; start += tile) {
#pragma unroll
        for (int c = 0; c < kBwdChunks; ++c) {
          const int col = start + (lane + c * t) * kChunk;
          const int n = chunk_len(D, col);
          if (n == 0) continue;
          float dy[kChunk], xhat[kChunk], df[kChunk], xs[kChunk], dx[kChunk];
          streamed_branch_grad<TR, TH, TY, kRms>(p, row, col, n, shift, k, dy, xhat, df);
          load_shifted_x<TX, kRms>(p, row, col, n, shift_x, xs);
          norm_backward_chunk<kRms>(p.branch_weight, p.zero_centered, col, n, xs, df, kb, xhat, dx);
          store_row_chunk<TX>(p.dx, row, col, n, dx);
        }
      }
    }
  }
}

template <class TX, class TR, class TH, class TY, bool kRms, bool kBranchNorm>
__global__ void __launch_bounds__(kBwdMaxThreads) add_norm_bwd_kernel(const BwdParams p) {
  RESFUSE_SHARED_ARRAY(float, scratch, RowReducer::kScratchFloats);
#ifdef RESFUSE_SIMT
  float* smem = reinterpret_cast<float*>(simt::dynamic_smem());
#else
  extern __shared__ float smem[];  // rows_per_block > 1: block_threads * kChunk floats
#endif
  const int slot = threadIdx.x >> p.layout.row_shift;
  constexpr bool kClusters = !lean_bwd_kernel<TX, kBranchNorm>();
  const int lane = row_lane<kClusters>(p.layout);
  RowReducer red = row_reducer(p.layout, scratch);
  if (!kClusters) red.cluster_blocks = 1;  // compiles cluster_sum out
  if (p.layout.single_tile)
    bwd_rows_in_registers<TX, TR, TH, TY, kRms, kBranchNorm>(p, red, slot, lane, smem);
  else
    bwd_rows_streamed<TX, TR, TH, TY, kRms, kBranchNorm>(p, red, lane);
  red.leave_cluster();
}

// Second step of the parameter gradients: a (kReduceSlices x kReduceCols) block sums
// kReduceCols columns of one buffer, each slice a fixed stride of programs, then slice 0 adds
// the slices in order. With programs == 0 (no rows) it writes zeros. (A template only so that
// every translation unit may instantiate it.)
template <int kSlices>
__global__ void __launch_bounds__(kReduceCols* kSlices) reduce_partials_kernel(const PartialSums s) {
  __shared__ float buf[kSlices][kReduceCols + 1];
  const int k = blockIdx.y;
  // selects rather than s.part[k]: a dynamic index into the parameter struct would put
  // it on the stack
  const float* part = s.part[0];
  float* out = s.out[0];
#pragma unroll
  for (int i = 1; i < kMaxParamGrads; ++i)
    if (k == i) part = s.part[i], out = s.out[i];
  const int col = blockIdx.x * kReduceCols + threadIdx.x;
  float acc = 0.0f;
  if (col < s.D)
    for (int r = threadIdx.y; r < s.programs; r += kSlices) acc += part[static_cast<int64_t>(r) * s.D + col];
  buf[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < s.D) {
    float total = 0.0f;
    for (int i = 0; i < kSlices; ++i) total += buf[i][threadIdx.x];
    out[col] = total;
  }
}

}  // namespace resfuse
