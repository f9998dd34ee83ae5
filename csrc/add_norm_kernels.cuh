// CUDA kernels of the fused residual add + RMSNorm/LayerNorm, forward and backward.
//
//   h = residual_scale * residual + ((x * branch_scale_value) * branch_scale[col]) * rowscale[row]
//   y = normalize(h) * w' (+ bias),   w' = 1 + weight if zero_centered else weight
//
// The semantics are those of resfuse/reference.py and of the Triton kernels
// (triton_kernels/add_norm_kernels.py), operation for operation: every load is widened to
// fp32, all arithmetic is fp32, each output is rounded once at its store. The forward
// normalises the fp32 h before rounding it to the residual dtype. The backward differentiates
// the norm at the *stored* h: it recomputes the row statistics from the values it reads (the
// forward's LayerNorm mean serves only as a shift that keeps the variance free of
// cancellation), so its Jacobian is exactly that of the tensor it sees; rstd is not saved.
//
// Specialisation: template arguments are the dtype set (TX: x and dx, TR: residual and
// dresidual, TH: h and dh, TY: y and dy; `Dyn` = each operand's dtype read at run time) and
// RMS vs LayerNorm. Everything else (presence of residual / weight / bias / branch scale /
// rowscale / dh / dresidual, zero-centred weight, D, strides, scales, the row layout) is a
// run-time value: warp-uniform branches cost nothing next to the memory traffic, and a
// handful of instantiations then cover every call.
//
// Layout (add_norm_params.h): `threads_per_row` threads share a row, each owning the 8-element
// chunks lane, lane + t, lane + 2t, ... (consecutive threads touch consecutive 16-byte words:
// coalesced 128-bit accesses). Several rows per block for small D. Rows longer than the
// register budget stream tiles of a full block in two passes; the second pass re-reads the
// row, which was just read, from L2.
#pragma once

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

// ------------------------------------------------------------------------------- forward

// h of one chunk, fp32, in the order of the reference: ((x * s) * bs) * rowscale + a * r.
template <class TX, class TR>
__device__ __forceinline__ void residual_sum(const FwdParams& p, int64_t row, int col, int n,
                                             float rowscale, float (&h)[kChunk]) {
  load_row_chunk<TX>(p.x, row, col, n, h);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) h[e] *= p.branch_scale_value;
  if (p.branch_scale.ptr != nullptr) {
    float bs[kChunk];
    load_param_chunk(p.branch_scale, col, n, bs);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) h[e] *= bs[e];
  }
  if (p.rowscale != nullptr) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) h[e] *= rowscale;
  }
  if (p.residual.ptr != nullptr) {
    float r[kChunk];
    load_row_chunk<TR>(p.residual, row, col, n, r);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) h[e] += r[e] * p.residual_scale;
  }
}

template <class TY, bool kRms>
__device__ __forceinline__ void normalize_store(const FwdParams& p, int64_t row, int col, int n,
                                                const float (&h)[kChunk], float mean, float rstd) {
  float y[kChunk];
#pragma unroll
  for (int e = 0; e < kChunk; ++e) y[e] = kRms ? h[e] * rstd : (h[e] - mean) * rstd;
  if (p.weight.ptr != nullptr) {
    float w[kChunk];
    load_param_chunk(p.weight, col, n, w);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) y[e] *= p.zero_centered ? w[e] + 1.0f : w[e];
  }
  if (p.bias.ptr != nullptr) {
    float b[kChunk];
    load_param_chunk(p.bias, col, n, b);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) y[e] += b[e];
  }
  store_row_chunk<TY>(p.y, row, col, n, y);
}

template <class TX, class TR, class TH, class TY, bool kRms>
__global__ void __launch_bounds__(kFwdMaxThreads) add_norm_fwd_kernel(const FwdParams p) {
  __shared__ float scratch[2 * RowReducer::kMaxWarps * RowReducer::kMaxValues];
  const int t = p.layout.threads_per_row;
  const int slot = threadIdx.x >> p.layout.row_shift;
  const int lane = threadIdx.x & (t - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * p.layout.rows_per_block + slot;
  const bool row_ok = row < p.rows;  // rows past the end still join the reductions
  const int D = p.D;
  const float rowscale = (p.rowscale != nullptr && row_ok) ? p.rowscale[row] : 1.0f;
  RowReducer red{scratch, t, slot};
  float mean = 0.0f, rstd;

  if (p.layout.single_tile) {
    float h[kFwdChunks][kChunk];
#pragma unroll
    for (int c = 0; c < kFwdChunks; ++c) {
      const int col = (lane + c * t) * kChunk;
      const int n = row_ok ? chunk_len(D, col) : 0;
      if (n > 0) {
        residual_sum<TX, TR>(p, row, col, n, rowscale, h[c]);  // zero past the row's end
        if (p.h.ptr != nullptr) store_row_chunk<TH>(p.h, row, col, n, h[c]);
      } else {
        zero(h[c]);
      }
    }
    if (kRms) {
      float s[1] = {0.0f};
#pragma unroll
      for (int c = 0; c < kFwdChunks; ++c)
#pragma unroll
        for (int e = 0; e < kChunk; ++e) s[0] += h[c][e] * h[c][e];
      red.sum(s);
      rstd = fast_rsqrt(s[0] / D + p.eps);
    } else {
      // two passes over registers: the mean, then the centred sum of squares
      float s[1] = {0.0f};
#pragma unroll
      for (int c = 0; c < kFwdChunks; ++c)
#pragma unroll
        for (int e = 0; e < kChunk; ++e) s[0] += h[c][e];
      red.sum(s);
      mean = s[0] / D;
      float q[1] = {0.0f};
#pragma unroll
      for (int c = 0; c < kFwdChunks; ++c) {
        const int n = row_ok ? chunk_len(D, (lane + c * t) * kChunk) : 0;
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          const float dev = e < n ? h[c][e] - mean : 0.0f;
          q[0] += dev * dev;
        }
      }
      red.sum(q);
      rstd = fast_rsqrt(q[0] / D + p.eps);
    }
#pragma unroll
    for (int c = 0; c < kFwdChunks; ++c) {
      const int col = (lane + c * t) * kChunk;
      const int n = row_ok ? chunk_len(D, col) : 0;
      if (n > 0) normalize_store<TY, kRms>(p, row, col, n, h[c], mean, rstd);
    }
  } else {
    // Pass 1 streams the row for its statistics (and stores h); pass 2 recomputes h from x
    // and the residual (L2 hits) rather than reading back the rounded h, so y is the same
    // function of the fp32 h as in the single-tile path.
    const int tile = t * kFwdChunks * kChunk;
    float sum_sq = 0.0f, count = 0.0f, running_mean = 0.0f, m2 = 0.0f;
    for (int start = 0; start < D; start += tile) {
#pragma unroll
      for (int c = 0; c < kFwdChunks; ++c) {
        const int col = start + (lane + c * t) * kChunk;
        const int n = row_ok ? chunk_len(D, col) : 0;
        if (n == 0) continue;
        float h[kChunk];
        residual_sum<TX, TR>(p, row, col, n, rowscale, h);
        if (p.h.ptr != nullptr) store_row_chunk<TH>(p.h, row, col, n, h);
        if (kRms) {
#pragma unroll
          for (int e = 0; e < kChunk; ++e) sum_sq += h[e] * h[e];
        } else {
          float chunk_sum = 0.0f;
#pragma unroll
          for (int e = 0; e < kChunk; ++e) chunk_sum += h[e];
          const float chunk_mean = chunk_sum / n;
          float chunk_m2 = 0.0f;
#pragma unroll
          for (int e = 0; e < kChunk; ++e) {
            const float dev = e < n ? h[e] - chunk_mean : 0.0f;
            chunk_m2 += dev * dev;
          }
          RowReducer::chan_merge(count, running_mean, m2, static_cast<float>(n), chunk_mean, chunk_m2);
        }
      }
    }
    if (kRms) {
      float s[1] = {sum_sq};
      red.sum(s);
      rstd = fast_rsqrt(s[0] / D + p.eps);
    } else {
      red.moments(count, running_mean, m2);
      mean = running_mean;
      rstd = fast_rsqrt(m2 / D + p.eps);
    }
    for (int start = 0; start < D; start += tile) {
#pragma unroll
      for (int c = 0; c < kFwdChunks; ++c) {
        const int col = start + (lane + c * t) * kChunk;
        const int n = row_ok ? chunk_len(D, col) : 0;
        if (n == 0) continue;
        float h[kChunk];
        residual_sum<TX, TR>(p, row, col, n, rowscale, h);
        normalize_store<TY, kRms>(p, row, col, n, h, mean, rstd);
      }
    }
  }
  if (!kRms && lane == 0 && row_ok) p.mean[row] = mean;
}

// ------------------------------------------------------------------------------ backward

// Per-row coefficients of the norm's input gradient, from the row sums of d = h - shift, d^2,
// g*d and g (g = dy * w'):  xhat = (d - mean_d) * rstd,  dh = rstd * (g - c1 * xhat - c2),
// with c1 = mean(g * xhat) and c2 = mean(g) (zero for RMSNorm, where mean_d = 0 too).
struct GradCoefficients {
  float mean_d, rstd, c1, c2;
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

__device__ __forceinline__ void times_weight(const BwdParams& p, int col, int n,
                                             const float (&dy)[kChunk], float (&g)[kChunk]) {
  if (p.weight.ptr != nullptr && n > 0) {
    load_param_chunk(p.weight, col, n, g);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) g[e] = dy[e] * (p.zero_centered ? g[e] + 1.0f : g[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) g[e] = dy[e];
  }
}

// Adds one chunk's terms to the row sums; d and dy are zero past the row's end.
template <bool kRms>
__device__ __forceinline__ void add_row_sums(const BwdParams& p, int col, int n,
                                             const float (&d)[kChunk], const float (&dy)[kChunk],
                                             float* s) {
  float g[kChunk];
  times_weight(p, col, n, dy, g);
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

// d = h - shift for the valid elements of a chunk (zero past the row's end).
__device__ __forceinline__ void subtract_shift(int n, float shift, float (&d)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) d[e] = e < n ? d[e] - shift : 0.0f;
}

// One chunk of the input gradients: the norm's dh plus h's own upstream gradient, stored as
// dresidual (scaled) and dx (through the branch scales); accumulates the parameter gradients.
template <class TX, class TR, class TH, bool kRms>
__device__ __forceinline__ void input_grads_chunk(const BwdParams& p, int64_t row, int col, int n,
                                                  const float (&d)[kChunk], const float (&dy)[kChunk],
                                                  const GradCoefficients& k, float rowscale,
                                                  float (&acc_dw)[kChunk], float (&acc_db)[kChunk],
                                                  float (&acc_dbs)[kChunk]) {
  float g[kChunk];
  times_weight(p, col, n, dy, g);
  float dh[kChunk];
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    const float xhat = kRms ? d[e] * k.rstd : (d[e] - k.mean_d) * k.rstd;
    dh[e] = kRms ? (g[e] - xhat * k.c1) * k.rstd : (g[e] - xhat * k.c1 - k.c2) * k.rstd;
    acc_dw[e] += dy[e] * xhat;  // dy is zero past the row's end
    if (!kRms) acc_db[e] += dy[e];  // RMSNorm has no bias
  }
  if (p.dh.ptr != nullptr) {
    float up[kChunk];
    load_row_chunk<TH>(p.dh, row, col, n, up);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) dh[e] += up[e];
  }
  if (p.dr.ptr != nullptr) {
    float dr[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) dr[e] = dh[e] * p.residual_scale;
    store_row_chunk<TR>(p.dr, row, col, n, dr);
  }
  float dx[kChunk];
#pragma unroll
  for (int e = 0; e < kChunk; ++e) dx[e] = dh[e] * p.branch_scale_value;
  if (p.rowscale != nullptr) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) dx[e] *= rowscale;
  }
  if (p.branch_scale.ptr != nullptr) {
    float xv[kChunk], bs[kChunk];
    load_row_chunk<TX>(p.x, row, col, n, xv);
    load_param_chunk(p.branch_scale, col, n, bs);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      acc_dbs[e] += dx[e] * xv[e];  // d h / d bs = branch_scale_value * rowscale * x
      dx[e] *= bs[e];
    }
  }
  store_row_chunk<TX>(p.dx, row, col, n, dx);
}

// Asks L2 for a row's h and dy ahead of time: the persistent loop's next loads then hit L2.
// (Holding the next row in registers instead would make the kernel spill.)
__device__ __forceinline__ void prefetch_grad_row_l2(const BwdParams& p, int64_t row, int lane) {
#ifndef RESFUSE_SIMT
  if (row >= p.rows) return;
  const int t = p.layout.threads_per_row;
#pragma unroll
  for (int c = 0; c < kBwdChunks; ++c) {
    const int col = (lane + c * t) * kChunk;
    if (chunk_len(p.D, col) == 0) continue;
    const char* h = static_cast<const char*>(p.h.ptr) + (row * p.h.row_stride + col) * dtype_bytes(p.h.dtype);
    const char* dy = static_cast<const char*>(p.dy.ptr) + (row * p.dy.row_stride + col) * dtype_bytes(p.dy.dtype);
    asm volatile("prefetch.global.L2 [%0];" ::"l"(h));
    asm volatile("prefetch.global.L2 [%0];" ::"l"(dy));
  }
#endif
}

// The block's row of one partial-sum buffer: the sum of its row groups' accumulators, added
// in slot order (deterministic). `smem` holds block_threads * kChunk floats.
__device__ __forceinline__ void write_partials(const BwdParams& p, float* part,
                                               float (&acc)[kBwdChunks][kChunk], int slot, int lane,
                                               float* smem) {
  const int t = p.layout.threads_per_row, rows_per_block = p.layout.rows_per_block;
  float* out = part + static_cast<int64_t>(blockIdx.x) * p.D;
  const bool vec = (p.D & 3) == 0;  // the buffer's rows are then 16-byte aligned
  if (rows_per_block == 1) {
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

// Rows that fit in registers: each row group walks rows blockIdx.x * rows_per_block + slot,
// + grid * rows_per_block, ... (persistent grid), reading h and dy once, with the next row
// requested into L2 while it reduces and writes the current one. The parameter gradients
// accumulate in registers over all of the program's rows: partial buffers are
// O(programs x D), not O(rows x D).
template <class TX, class TR, class TH, class TY, bool kRms>
__device__ __forceinline__ void bwd_rows_in_registers(const BwdParams& p, RowReducer& red,
                                                      int slot, int lane, float* smem) {
  constexpr int C = kBwdChunks;
  const int t = p.layout.threads_per_row, D = p.D;
  const int64_t step = static_cast<int64_t>(gridDim.x) * p.layout.rows_per_block;
  float acc_dw[C][kChunk], acc_db[C][kChunk], acc_dbs[C][kChunk];
#pragma unroll
  for (int c = 0; c < C; ++c) zero(acc_dw[c]), zero(acc_db[c]), zero(acc_dbs[c]);

  int64_t row = static_cast<int64_t>(blockIdx.x) * p.layout.rows_per_block + slot;
  // the loop bound is block-uniform (the block's first row), so every thread reaches the
  // same barriers; row groups past the end compute on zeros and store nothing
  for (int64_t base = row - slot; base < p.rows; base += step, row += step) {
    const bool row_ok = row < p.rows;
    float d[C][kChunk], dy[C][kChunk];  // h (then h - shift) and dy, fp32, zero past the end
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int col = (lane + c * t) * kChunk;
      const int n = row_ok ? chunk_len(D, col) : 0;
      if (n > 0) {
        load_row_chunk<TH>(p.h, row, col, n, d[c]);
        load_row_chunk<TY>(p.dy, row, col, n, dy[c]);
      } else {
        zero(d[c]), zero(dy[c]);
      }
    }
    prefetch_grad_row_l2(p, row + step, lane);
    const float shift = (!kRms && row_ok) ? p.mean[row] : 0.0f;
    float s[kRms ? 2 : 4] = {};
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int n = row_ok ? chunk_len(D, (lane + c * t) * kChunk) : 0;
      if (!kRms) subtract_shift(n, shift, d[c]);
      add_row_sums<kRms>(p, (lane + c * t) * kChunk, n, d[c], dy[c], s);
    }
    red.sum(s);
    const GradCoefficients k = grad_coefficients<kRms>(s, D, p.eps);
    const float rowscale = (p.rowscale != nullptr && row_ok) ? p.rowscale[row] : 1.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int col = (lane + c * t) * kChunk;
      const int n = row_ok ? chunk_len(D, col) : 0;
      if (n > 0)
        input_grads_chunk<TX, TR, TH, kRms>(p, row, col, n, d[c], dy[c], k, rowscale, acc_dw[c],
                                            acc_db[c], acc_dbs[c]);
    }
  }
  if (p.dweight_part != nullptr) write_partials(p, p.dweight_part, acc_dw, slot, lane, smem);
  if (!kRms && p.dbias_part != nullptr) write_partials(p, p.dbias_part, acc_db, slot, lane, smem);
  if (p.dbranch_part != nullptr) write_partials(p, p.dbranch_part, acc_dbs, slot, lane, smem);
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

// Rows longer than the register budget (one row per block, rows_per_block == 1): pass 1
// streams the row's tiles for the four row sums, pass 2 re-reads them (L2 hits) for the input
// gradients and adds each chunk's parameter gradients into the block's own row of the
// partial buffers. Every element of that row is owned by one thread for the whole kernel, so
// the read-modify-writes need no synchronisation, and the row stays in L2.
template <class TX, class TR, class TH, class TY, bool kRms>
__device__ __forceinline__ void bwd_rows_streamed(const BwdParams& p, RowReducer& red, int lane) {
  const int t = p.layout.threads_per_row, D = p.D;
  const int tile = t * kBwdChunks * kChunk;
  const int64_t part_offset = static_cast<int64_t>(blockIdx.x) * D;
  float* dw_row = p.dweight_part != nullptr ? p.dweight_part + part_offset : nullptr;
  float* db_row = p.dbias_part != nullptr ? p.dbias_part + part_offset : nullptr;
  float* dbs_row = p.dbranch_part != nullptr ? p.dbranch_part + part_offset : nullptr;
  const bool vec = (D & 3) == 0;
  float zeros[kChunk];
  zero(zeros);
  for (int start = 0; start < D; start += tile) {
#pragma unroll
    for (int c = 0; c < kBwdChunks; ++c) {
      const int col = start + (lane + c * t) * kChunk;
      const int n = chunk_len(D, col);
      if (n == 0) continue;
      if (dw_row != nullptr) ChunkIO<float>::store(dw_row, col, DType::kFloat32, n, vec, zeros);
      if (db_row != nullptr) ChunkIO<float>::store(db_row, col, DType::kFloat32, n, vec, zeros);
      if (dbs_row != nullptr) ChunkIO<float>::store(dbs_row, col, DType::kFloat32, n, vec, zeros);
    }
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {  // block-uniform
    const float shift = kRms ? 0.0f : p.mean[row];
    float s[kRms ? 2 : 4] = {};
    for (int start = 0; start < D; start += tile) {
#pragma unroll
      for (int c = 0; c < kBwdChunks; ++c) {
        const int col = start + (lane + c * t) * kChunk;
        const int n = chunk_len(D, col);
        if (n == 0) continue;
        float d[kChunk], dy[kChunk];
        load_row_chunk<TH>(p.h, row, col, n, d);
        load_row_chunk<TY>(p.dy, row, col, n, dy);
        if (!kRms) subtract_shift(n, shift, d);
        add_row_sums<kRms>(p, col, n, d, dy, s);
      }
    }
    red.sum(s);
    const GradCoefficients k = grad_coefficients<kRms>(s, D, p.eps);
    const float rowscale = p.rowscale != nullptr ? p.rowscale[row] : 1.0f;
    for (int start = 0; start < D; start += tile) {
#pragma unroll
      for (int c = 0; c < kBwdChunks; ++c) {
        const int col = start + (lane + c * t) * kChunk;
        const int n = chunk_len(D, col);
        if (n == 0) continue;
        float d[kChunk], dy[kChunk];
        load_row_chunk<TH>(p.h, row, col, n, d);
        load_row_chunk<TY>(p.dy, row, col, n, dy);
        if (!kRms) subtract_shift(n, shift, d);
        float dw[kChunk], db[kChunk], dbs[kChunk];
        zero(dw), zero(db), zero(dbs);
        input_grads_chunk<TX, TR, TH, kRms>(p, row, col, n, d, dy, k, rowscale, dw, db, dbs);
        add_to_partial(dw_row, col, n, vec, dw);
        add_to_partial(db_row, col, n, vec, db);
        add_to_partial(dbs_row, col, n, vec, dbs);
      }
    }
  }
}

template <class TX, class TR, class TH, class TY, bool kRms>
__global__ void __launch_bounds__(kBwdMaxThreads) add_norm_bwd_kernel(const BwdParams p) {
  __shared__ float scratch[2 * RowReducer::kMaxWarps * RowReducer::kMaxValues];
#ifdef RESFUSE_SIMT
  float* smem = reinterpret_cast<float*>(simt::dynamic_smem());
#else
  extern __shared__ float smem[];  // rows_per_block > 1: block_threads * kChunk floats
#endif
  const int t = p.layout.threads_per_row;
  const int slot = threadIdx.x >> p.layout.row_shift;
  const int lane = threadIdx.x & (t - 1);
  RowReducer red{scratch, t, slot};
  if (p.layout.single_tile)
    bwd_rows_in_registers<TX, TR, TH, TY, kRms>(p, red, slot, lane, smem);
  else
    bwd_rows_streamed<TX, TR, TH, TY, kRms>(p, red, lane);
}

// Second step of the parameter gradients: a (kReduceSlices x kReduceCols) block sums
// kReduceCols columns of one buffer, each slice a fixed stride of programs, then slice 0 adds
// the slices in order. With programs == 0 (no rows) it writes zeros. (A template only so that
// every translation unit may instantiate it.)
template <int kSlices>
__global__ void __launch_bounds__(kReduceCols * kSlices) reduce_partials_kernel(const PartialSums s) {
  __shared__ float buf[kSlices][kReduceCols + 1];
  const int k = blockIdx.y;
  // selects rather than s.part[k]: a dynamic index into the parameter struct would put
  // it on the stack
  const float* part = k == 0 ? s.part[0] : (k == 1 ? s.part[1] : s.part[2]);
  float* out = k == 0 ? s.out[0] : (k == 1 ? s.out[1] : s.out[2]);
  const int col = blockIdx.x * kReduceCols + threadIdx.x;
  float acc = 0.0f;
  if (col < s.D)
    for (int r = threadIdx.y; r < s.programs; r += kSlices)
      acc += part[static_cast<int64_t>(r) * s.D + col];
  buf[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < s.D) {
    float total = 0.0f;
    for (int i = 0; i < kSlices; ++i) total += buf[i][threadIdx.x];
    out[col] = total;
  }
}

}  // namespace resfuse
