// The CPU kernels' row loops: included once per instruction set by add_norm_cpu_{generic,
// avx2,avx512}.cpp, each inside its own namespace (RESFUSE_CPU_ISA) and with its own target
// (a `#pragma GCC target` before the include), so that one source compiles to SSE2, AVX2 and
// AVX-512 code; add_norm_cpu.cpp picks one at run time (supported_kernels()).
//
// One row at a time, in fp32 scratch rows that stay in the core's cache: the activations
// are read from memory once and the outputs written once (the bandwidth floor), every
// intermediate (f, h, the statistics, the gradient's two row sums) lives in the scratch.
// Statistics are exact two-pass sums over the fp32 row (mean, then the squared deviations):
// no shift is needed on a CPU, so the forward's saved means are not read back.
//
// Loops are plain loops over fp32 arrays that the compiler vectorizes for the target; the
// row sums accumulate into kLanes independent partial sums (a fixed order for a given D,
// so a row's result does not depend on where it runs), which vectorize without reassociation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../add_norm_params.h"
#include "add_norm_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace resfuse {
namespace cpu {
namespace RESFUSE_CPU_ISA {

// --------------------------------------------------------------------------- conversions

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// round to nearest even; a NaN stays a (quiet) NaN
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? ((bits >> 16) | 0x40u) : rounded);
}

inline float half_to_float_soft(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while ((mant & 0x400u) == 0) mant <<= 1, --exp;
    bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half_soft(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);   // NaN
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // overflow (rounds to inf)
  if (abs < 0x38800000u) {  // subnormal half (or zero): round to nearest even in fixed point
    const int shift = 113 - static_cast<int>(abs >> 23);
    if (shift > 24) return sign;
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t halfway = 1u << (shift + 12), rest = mant & ((halfway << 1) - 1);
    uint32_t out = mant >> (shift + 13);
    if (rest > halfway || (rest == halfway && (out & 1u))) ++out;
    return static_cast<uint16_t>(sign | out);
  }
  const uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u) - 0x38000000u;
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

// a row (n elements) of `dtype` into fp32, and back
inline void load_row(const void* src, DType dtype, float* dst, int n) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else if (dtype == DType::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int i = 0;
#if defined(RESFUSE_CPU_F16C)
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    }
#endif
    for (; i < n; ++i) dst[i] = half_to_float_soft(s[i]);
  }
}

inline void store_row(const float* src, void* dst, DType dtype, int n) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else if (dtype == DType::kBFloat16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    int i = 0;
#if defined(RESFUSE_CPU_AVX512BF16)
    // one instruction per 16: round to nearest even, NaN kept
    for (; i + 16 <= n; i += 16) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), reinterpret_cast<const __m256i&>(v));
    }
#endif
    for (; i < n; ++i) d[i] = float_to_bf16(src[i]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    int i = 0;
#if defined(RESFUSE_CPU_F16C)
    for (; i + 8 <= n; i += 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    }
#endif
    for (; i < n; ++i) d[i] = float_to_half_soft(src[i]);
  }
}

inline const void* row_ptr(const Operand& op, int64_t row) {
  return static_cast<const char*>(op.ptr) + row * op.row_stride * dtype_bytes(op.dtype);
}

inline void* row_ptr_mut(const Operand& op, int64_t row) {
  return static_cast<char*>(op.ptr) + row * op.row_stride * dtype_bytes(op.dtype);
}

// --------------------------------------------------------------------------- row sums

inline float row_sum(const float* v, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += v[i + k];
  float s = 0.0f;
  for (; i < n; ++i) s += v[i];
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

inline float row_sum_sq_dev(const float* v, int n, float mean) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const float d = v[i + k] - mean;
      acc[k] += d * d;
    }
  float s = 0.0f;
  for (; i < n; ++i) s += (v[i] - mean) * (v[i] - mean);
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

inline float row_dot(const float* a, const float* b, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += a[i + k] * b[i + k];
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// (mean, rstd) of a row: RMSNorm's mean is 0 (no centring)
struct Stats {
  float mean, rstd;
};

inline Stats row_stats(const float* v, int n, bool is_rms, float eps) {
  const float mean = is_rms ? 0.0f : row_sum(v, n) / n;
  return {mean, 1.0f / std::sqrt(row_sum_sq_dev(v, n, mean) / n + eps)};
}

// --------------------------------------------------------------------------- forward

inline void add_lanes(float* acc, const float* v, int n) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += v[i + k];
  for (; i < n; ++i) acc[i % kLanes] += v[i];
}

inline void add_sq_lanes(float* acc, const float* v, int n) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += v[i + k] * v[i + k];
  for (; i < n; ++i) acc[i % kLanes] += v[i] * v[i];
}

inline float lanes_total(const float* acc) {
  float s = 0.0f;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// (mean, rstd) of the fp32 row `v`, given its sum and (for RMSNorm) its sum of squares: a
// LayerNorm's variance is the exact second pass over the (cached) row
inline Stats stats_from(const float* v, int n, bool is_rms, float eps, float sum, float sum_sq) {
  if (is_rms) return {0.0f, 1.0f / std::sqrt(sum_sq / n + eps)};
  const float mean = sum / n;
  return {mean, 1.0f / std::sqrt(row_sum_sq_dev(v, n, mean) / n + eps)};
}

void forward_rows(const FwdParams& p, const Affine& a, int64_t begin, int64_t end, float* scratch) {
  const int D = p.D;
  float* __restrict__ hrow = scratch;     // the row's h in fp32 (and, first, the branch value)
  float* __restrict__ tmp = scratch + D;  // one chunk of the residual / of y
  const float rs = p.residual_scale;
  for (int64_t row = begin; row < end; ++row) {
    const float scale = p.branch_scale_value * (p.rowscale ? p.rowscale[row] : 1.0f);
    Stats bstats{0.0f, 1.0f};
    if (p.branch_norm) {  // the branch norm's statistics need the whole row first
      load_row(row_ptr(p.x, row), p.x.dtype, hrow, D);
      bstats = row_stats(hrow, D, p.is_rms, p.eps);
      if (p.mean_x) p.mean_x[row] = bstats.mean;
    }
    float sum[kLanes] = {}, sum_sq[kLanes] = {};
    for (int c0 = 0; c0 < D; c0 += kChunkElems) {
      const int n = std::min(kChunkElems, D - c0);
      float* __restrict__ h = hrow + c0;
      if (p.branch_norm) {
        const float* bw = a.branch_weight + c0;
        const float* bb = a.branch_bias + c0;
        for (int i = 0; i < n; ++i) h[i] = (h[i] - bstats.mean) * bstats.rstd * bw[i] + bb[i];
      } else {
        load_row(static_cast<const char*>(row_ptr(p.x, row)) + c0 * dtype_bytes(p.x.dtype), p.x.dtype, h, n);
      }
      if (a.has_branch_scale) {
        const float* bs = a.branch_scale + c0;
        for (int i = 0; i < n; ++i) h[i] = h[i] * bs[i] * scale;
      } else if (scale != 1.0f) {
        for (int i = 0; i < n; ++i) h[i] *= scale;
      }
      if (p.residual.ptr) {
        load_row(static_cast<const char*>(row_ptr(p.residual, row)) + c0 * dtype_bytes(p.residual.dtype),
                 p.residual.dtype, tmp, n);
        if (rs == 1.0f) {
          for (int i = 0; i < n; ++i) h[i] += tmp[i];
        } else {
          for (int i = 0; i < n; ++i) h[i] += rs * tmp[i];
        }
      }
      if (p.h.ptr) {
        store_row(h, static_cast<char*>(row_ptr_mut(p.h, row)) + c0 * dtype_bytes(p.h.dtype), p.h.dtype, n);
      }
      if (p.output_norm) {
        if (p.is_rms) {
          add_sq_lanes(sum_sq, h, n);
        } else {
          add_lanes(sum, h, n);
        }
      }
    }
    if (!p.output_norm) continue;
    // from the fp32 h, not the stored one: each output rounded once
    const Stats s = stats_from(hrow, D, p.is_rms, p.eps, lanes_total(sum), lanes_total(sum_sq));
    if (p.mean) p.mean[row] = s.mean;
    char* y = static_cast<char*>(row_ptr_mut(p.y, row));
    for (int c0 = 0; c0 < D; c0 += kChunkElems) {
      const int n = std::min(kChunkElems, D - c0);
      const float* __restrict__ h = hrow + c0;
      const float* __restrict__ w = a.weight + c0;
      const float* __restrict__ b = a.bias + c0;
      for (int i = 0; i < n; ++i) tmp[i] = (h[i] - s.mean) * s.rstd * w[i] + b[i];
      store_row(tmp, y + c0 * dtype_bytes(p.y.dtype), p.y.dtype, n);
    }
  }
}

// --------------------------------------------------------------------------- backward

// The norm's backward at `v` (its input, read back) for the upstream gradient `g_in`: writes
// the input's gradient into `out` (which may alias g_in) and adds the parameter gradients
// into the block's partial sums (dweight: g_in * xhat, dbias: g_in).
inline void norm_backward(const float* v, const float* g_in, const float* w, int D, bool is_rms, float eps,
                          float* dweight, float* dbias, float* out, float* xhat) {
  const Stats s = row_stats(v, D, is_rms, eps);
  for (int i = 0; i < D; ++i) xhat[i] = (v[i] - s.mean) * s.rstd;
  if (dweight)
    for (int i = 0; i < D; ++i) dweight[i] += g_in[i] * xhat[i];
  if (dbias)
    for (int i = 0; i < D; ++i) dbias[i] += g_in[i];
  // g = g_in * w'; out = rstd * (g - xhat * mean(g * xhat) - mean(g))  (no mean(g) for RMS)
  float gx_acc[kLanes] = {}, g_acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= D; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const float g = g_in[i + k] * w[i + k];
      gx_acc[k] += g * xhat[i + k];
      g_acc[k] += g;
    }
  float gx = 0.0f, gs = 0.0f;
  for (; i < D; ++i) {
    const float g = g_in[i] * w[i];
    gx += g * xhat[i];
    gs += g;
  }
  for (int k = 0; k < kLanes; ++k) gx += gx_acc[k], gs += g_acc[k];
  const float c1 = gx / D, c2 = is_rms ? 0.0f : gs / D;
  for (int j = 0; j < D; ++j) out[j] = s.rstd * (g_in[j] * w[j] - xhat[j] * c1 - c2);
}

// chunk c0 of an operand's row, as a byte pointer
inline const void* chunk(const Operand& op, int64_t row, int c0) {
  return static_cast<const char*>(row_ptr(op, row)) + static_cast<int64_t>(c0) * dtype_bytes(op.dtype);
}

inline void* chunk_mut(const Operand& op, int64_t row, int c0) {
  return static_cast<char*>(row_ptr_mut(op, row)) + static_cast<int64_t>(c0) * dtype_bytes(op.dtype);
}

// Per row, in chunks: (A) h into the scratch row and its sums; (B) xhat in place of h, the
// gradient g = dy * w' into a second scratch row, the two row sums of the gradient and the
// weight / bias partial sums; (C) dh_total = rstd * (g - xhat * mean(g xhat) - mean(g))
// (+ dh), then dresidual, the branch scales and dx, a chunk at a time. With the branch norm,
// (C) keeps df whole and the branch norm's backward runs over the row.
void backward_rows(const BwdParams& p, const Affine& a, int64_t begin, int64_t end, float* scratch,
                   const PartialRows& part) {
  const int D = p.D;
  float* __restrict__ hrow = scratch;          // h, then xhat (or dh_total without the output norm)
  float* __restrict__ grow = scratch + D;      // g = dy * w', then df with the branch norm
  float* __restrict__ tmp = scratch + 2 * D;   // a chunk of dy / dh / x / outputs
  float* __restrict__ xrow = scratch + 3 * D;  // the branch norm: x, then its xhat
  const float rs = p.residual_scale;
  for (int64_t row = begin; row < end; ++row) {
    const float scale = p.branch_scale_value * (p.rowscale ? p.rowscale[row] : 1.0f);
    float c1 = 0.0f, c2 = 0.0f, rstd = 1.0f;
    if (p.output_norm) {
      float sum[kLanes] = {}, sum_sq[kLanes] = {};
      for (int c0 = 0; c0 < D; c0 += kChunkElems) {  // (A)
        const int n = std::min(kChunkElems, D - c0);
        load_row(chunk(p.h, row, c0), p.h.dtype, hrow + c0, n);
        if (p.is_rms) {
          add_sq_lanes(sum_sq, hrow + c0, n);
        } else {
          add_lanes(sum, hrow + c0, n);
        }
      }
      const Stats s = stats_from(hrow, D, p.is_rms, p.eps, lanes_total(sum), lanes_total(sum_sq));
      rstd = s.rstd;
      float gx[kLanes] = {}, gs[kLanes] = {};
      for (int c0 = 0; c0 < D; c0 += kChunkElems) {  // (B)
        const int n = std::min(kChunkElems, D - c0);
        float* __restrict__ xh = hrow + c0;
        float* __restrict__ g = grow + c0;
        const float* __restrict__ w = a.weight + c0;
        load_row(chunk(p.dy, row, c0), p.dy.dtype, tmp, n);
        for (int i = 0; i < n; ++i) {
          xh[i] = (xh[i] - s.mean) * s.rstd;
          g[i] = tmp[i] * w[i];
        }
        if (part.weight) {
          float* __restrict__ dw = part.weight + c0;
          for (int i = 0; i < n; ++i) dw[i] += tmp[i] * xh[i];
        }
        if (part.bias) {
          float* __restrict__ db = part.bias + c0;
          for (int i = 0; i < n; ++i) db[i] += tmp[i];
        }
        int i = 0;
        for (; i + kLanes <= n; i += kLanes)
          for (int k = 0; k < kLanes; ++k) gx[k] += g[i + k] * xh[i + k], gs[k] += g[i + k];
        for (; i < n; ++i) gx[i % kLanes] += g[i] * xh[i], gs[i % kLanes] += g[i];
      }
      c1 = lanes_total(gx) / D;
      c2 = p.is_rms ? 0.0f : lanes_total(gs) / D;
    }
    for (int c0 = 0; c0 < D; c0 += kChunkElems) {  // (C)
      const int n = std::min(kChunkElems, D - c0);
      // dh_total, in grow (in place of g) / in hrow without the output norm
      float* __restrict__ dht = p.output_norm ? grow + c0 : hrow + c0;
      if (p.output_norm) {
        const float* __restrict__ xh = hrow + c0;
        for (int i = 0; i < n; ++i) dht[i] = rstd * (dht[i] - xh[i] * c1 - c2);
        if (p.dh.ptr) {
          load_row(chunk(p.dh, row, c0), p.dh.dtype, tmp, n);
          for (int i = 0; i < n; ++i) dht[i] += tmp[i];
        }
      } else {
        load_row(chunk(p.dh, row, c0), p.dh.dtype, dht, n);
      }
      if (p.dr.ptr) {
        for (int i = 0; i < n; ++i) tmp[i] = dht[i] * rs;
        store_row(tmp, chunk_mut(p.dr, row, c0), p.dr.dtype, n);
      }
      if (scale != 1.0f)
        for (int i = 0; i < n; ++i) dht[i] *= scale;
      if (a.has_branch_scale) {
        load_row(chunk(p.x, row, c0), p.x.dtype, tmp, n);
        if (part.branch_scale) {
          float* __restrict__ dbs = part.branch_scale + c0;
          for (int i = 0; i < n; ++i) dbs[i] += dht[i] * tmp[i];
        }
        const float* __restrict__ bs = a.branch_scale + c0;
        for (int i = 0; i < n; ++i) dht[i] *= bs[i];
      }
      if (!p.branch_norm) store_row(dht, chunk_mut(p.dx, row, c0), p.dx.dtype, n);
    }
    if (p.branch_norm) {  // df whole (in grow / hrow): the branch norm's backward over the row
      float* df = p.output_norm ? grow : hrow;
      load_row(row_ptr(p.x, row), p.x.dtype, xrow, D);
      norm_backward(xrow, df, a.branch_weight, D, p.is_rms, p.eps, part.branch_weight, part.branch_bias, df,
                    xrow);
      store_row(df, row_ptr_mut(p.dx, row), p.dx.dtype, D);
    }
  }
}

}  // namespace RESFUSE_CPU_ISA
}  // namespace cpu
}  // namespace resfuse
