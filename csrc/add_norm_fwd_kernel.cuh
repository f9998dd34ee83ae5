// The forward kernel of the fused residual add + RMSNorm/LayerNorm (the computation and its
// specialisation: add_norm_kernels.cuh).
#pragma once

#include "add_norm_kernels.cuh"

namespace resfuse {

// ------------------------------------------------------------------------------- forward

// The branch norm of one chunk of x (in place), zero past the row's end.
template <bool kRms>
__device__ __forceinline__ void normalize_branch(const FwdParams& p, int col, int n, const RowStats& bx,
                                                 float (&f)[kChunk]) {
  normalize_affine<kRms>(p.branch_weight, p.branch_bias, p.zero_centered, col, n, bx, f);
  mask_tail(n, f);
}

// The branch value f of one chunk: x, or with the branch norm norm(x) * w_b' (+ b_b).
template <class TX, bool kRms>
__device__ __forceinline__ void branch_value(const FwdParams& p, int64_t row, int col, int n,
                                             const RowStats& bx, float (&f)[kChunk]) {
  load_row_chunk<TX>(p.x, row, col, n, f);
  if (p.branch_norm) normalize_branch<kRms>(p, col, n, bx, f);
}

// h of one chunk from its branch value (in place), fp32, in the order of the reference:
// ((f * s) * bs) * rowscale + a * r.
template <class TR>
__device__ __forceinline__ void add_residual(const FwdParams& p, int64_t row, int col, int n, float rowscale,
                                             float (&h)[kChunk]) {
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
                                                float (&h)[kChunk], const RowStats& s) {
  normalize_affine<kRms>(p.weight, p.bias, p.zero_centered, col, n, s, h);
  store_row_chunk<TY>(p.y, row, col, n, h);
}

template <class TX, class TR, class TH, class TY, bool kRms>
__global__ void __launch_bounds__(kFwdMaxThreads) add_norm_fwd_kernel(const FwdParams p) {
  RESFUSE_SHARED_ARRAY(float, scratch, RowReducer::kScratchFloats);
  constexpr int C = kFwdChunks;
  const int t = p.layout.row_threads;
  const int slot = threadIdx.x >> p.layout.row_shift;
  const int lane = row_lane(p.layout);
  const int64_t row = static_cast<int64_t>(row_program(p.layout)) * p.layout.rows_per_block + slot;
  const bool row_ok = row < p.rows;  // rows past the end still join the reductions
  const int D = p.D;
  const float rowscale = (p.rowscale != nullptr && row_ok) ? p.rowscale[row] : 1.0f;
  RowReducer red = row_reducer(p.layout, scratch);
  RowStats bx{0.0f, 0.0f}, hs{0.0f, 0.0f};  // the branch norm's and the output norm's

  if (p.layout.single_tile) {
    // x, normalised in place with the branch norm, then h: one row in registers throughout
    float h[C][kChunk];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int col = (lane + c * t) * kChunk;
      const int n = row_ok ? chunk_len(D, col) : 0;
      if (n > 0)
        load_row_chunk<TX>(p.x, row, col, n, h[c]);  // zero past the row's end
      else
        zero(h[c]);
    }
    if (p.branch_norm) {
      bx = register_row_stats<kRms>(h, lane, t, D, row_ok, p.eps, red);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int col = (lane + c * t) * kChunk;
        const int n = row_ok ? chunk_len(D, col) : 0;
        if (n > 0) normalize_branch<kRms>(p, col, n, bx, h[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int col = (lane + c * t) * kChunk;
      const int n = row_ok ? chunk_len(D, col) : 0;
      if (n > 0) {
        add_residual<TR>(p, row, col, n, rowscale, h[c]);
        if (p.h.ptr != nullptr) store_row_chunk<TH>(p.h, row, col, n, h[c]);
      }
    }
    if (p.output_norm) {
      hs = register_row_stats<kRms>(h, lane, t, D, row_ok, p.eps, red);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int col = (lane + c * t) * kChunk;
        const int n = row_ok ? chunk_len(D, col) : 0;
        if (n > 0) normalize_store<TY, kRms>(p, row, col, n, h[c], hs);
      }
    }
  } else {
    // Streamed: (with the branch norm, a pass over x for its statistics), a pass for h's
    // statistics that stores h, and a pass that recomputes h from x and the residual (L2
    // hits) rather than reading back the rounded h, so y is the same function of the fp32 h
    // as in the single-tile path.
    const int tile = t * C * kChunk;
    if (p.branch_norm) {
      StreamedMoments m;
      for (int start = 0; start < D; start += tile) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int col = start + (lane + c * t) * kChunk;
          const int n = row_ok ? chunk_len(D, col) : 0;
          if (n == 0) continue;
          float v[kChunk];
          load_row_chunk<TX>(p.x, row, col, n, v);
          m.add<kRms>(v, n);
        }
      }
      bx = m.finish<kRms>(red, D, p.eps);
    }
    StreamedMoments m;
    for (int start = 0; start < D; start += tile) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int col = start + (lane + c * t) * kChunk;
        const int n = row_ok ? chunk_len(D, col) : 0;
        if (n == 0) continue;
        float h[kChunk];
        branch_value<TX, kRms>(p, row, col, n, bx, h);
        add_residual<TR>(p, row, col, n, rowscale, h);
        if (p.h.ptr != nullptr) store_row_chunk<TH>(p.h, row, col, n, h);
        if (p.output_norm) m.add<kRms>(h, n);
      }
    }
    if (p.output_norm) {
      hs = m.finish<kRms>(red, D, p.eps);
      for (int start = 0; start < D; start += tile) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int col = start + (lane + c * t) * kChunk;
          const int n = row_ok ? chunk_len(D, col) : 0;
          if (n == 0) continue;
          float h[kChunk];
          branch_value<TX, kRms>(p, row, col, n, bx, h);
          add_residual<TR>(p, row, col, n, rowscale, h);
          normalize_store<TY, kRms>(p, row, col, n, h, hs);
        }
      }
    }
  }
  if (!kRms && lane == 0 && row_ok) {
    if (p.mean != nullptr) p.mean[row] = hs.mean;
    if (p.mean_x != nullptr) p.mean_x[row] = bx.mean;
  }
  red.leave_cluster();
}

}  // namespace resfuse
