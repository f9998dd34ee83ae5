// The CPU kernels' row loops: included once per instruction set by add_norm_cpu_{generic,
// avx2,avx512}.cpp, each inside its own namespace (RESFUSE_CPU_ISA) and with its own target
// (a `#pragma GCC target` before the include), so that one source compiles to AVX-512, AVX2
// and portable code over add_norm_cpu_vec.h's `vec`; add_norm_cpu.cpp picks one at run time.
//
// One row at a time: the activations are read from memory once and the outputs written once
// (the bandwidth floor); what a row needs again (h for y, h and g for the backward) is kept
// in fp32 scratch rows of the thread, which stay in the core's L1/L2. Each pass over a row
// is one loop over vectors doing all of that pass's work (conversions, the add, the stores,
// the row sums), so a byte loaded from memory is used while it is in registers.
//
// Row sums add each vector into one of four accumulators (vector index modulo 4: four
// independent dependency chains), then the accumulators and lanes in a fixed order: a row's
// result depends on D and the instruction set only, not on where or when it runs.
// Statistics are exact two-pass sums over the fp32 row in cache (mean, then the squared
// deviations): no shift is needed on a CPU.
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

#include "add_norm_cpu_vec.h"

// --------------------------------------------------------------------------- loops

// two row sums at once
struct vec2 {
  vec a, b;
};
inline vec2 operator+(vec2 x, vec2 y) { return {x.a + y.a, x.b + y.b}; }
inline vec2 first_lanes(vec2 x, int n) { return {first_lanes(x.a, n), first_lanes(x.b, n)}; }
inline vec2 zeros2() { return {zeros(), zeros()}; }

// body(i, n) for each vector of a row of D (n = kWidth but at the tail), in order
template <class Body>
inline void for_row(int D, Body&& body) {
  int i = 0;
  for (; i + kWidth <= D; i += kWidth) body(i, kWidth);
  if (i < D) body(i, D - i);
}

// The sum over a row of what body(i, n) returns for each vector (the lanes past n of the
// tail's ignored): four accumulators by vector index modulo 4, added in a fixed order.
static_assert(kSumVectors == 4, "sum_row keeps four accumulators");
template <class Acc, class Body>
inline Acc sum_row(int D, Acc zero, Body&& body) {
  Acc a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  int i = 0;
  for (; i + 4 * kWidth <= D; i += 4 * kWidth) {
    a0 = a0 + body(i, kWidth);
    a1 = a1 + body(i + kWidth, kWidth);
    a2 = a2 + body(i + 2 * kWidth, kWidth);
    a3 = a3 + body(i + 3 * kWidth, kWidth);
  }
  if (i + kWidth <= D) a0 = a0 + body(i, kWidth), i += kWidth;
  if (i + kWidth <= D) a1 = a1 + body(i, kWidth), i += kWidth;
  if (i + kWidth <= D) a2 = a2 + body(i, kWidth), i += kWidth;
  if (i < D) a3 = a3 + first_lanes(body(i, D - i), D - i);
  return (a0 + a1) + (a2 + a3);
}

// (mean, rstd) of a row: RMSNorm's mean is 0 (no centring)
struct Stats {
  float mean, rstd;
};

// The statistics of the fp32 row v (in cache), given its sum and sum of squares from the pass
// that wrote it: RMSNorm from the sum of squares; LayerNorm's variance is a second, exact pass
// over the squared deviations from the mean.
inline Stats stats_of(const float* v, int D, bool is_rms, float eps, vec2 sums) {
  if (is_rms) return {0.0f, 1.0f / std::sqrt(hsum(sums.b) / D + eps)};
  const float mean_s = hsum(sums.a) / D;
  const vec mean = splat(mean_s);
  const vec sq = sum_row(D, zeros(), [&](int i, int n) {
    const vec d = load(v + i, n) - mean;
    return d * d;
  });
  return {mean_s, 1.0f / std::sqrt(hsum(sq) / D + eps)};
}

inline const void* row_ptr(const Operand& op, int64_t row) {
  return static_cast<const char*>(op.ptr) + row * op.row_stride * dtype_bytes(op.dtype);
}

inline void* row_ptr_mut(const Operand& op, int64_t row) {
  return static_cast<char*>(op.ptr) + row * op.row_stride * dtype_bytes(op.dtype);
}

// n values of `dtype` into fp32 (the parameters, once per call)
inline void load_row(const void* src, DType dtype, float* dst, int n) {
  for_row(n, [&](int i, int m) { store(dst + i, m, load(src, dtype, i, m)); });
}

// --------------------------------------------------------------------------- forward

// Per row: (branch norm: x into the scratch row and its statistics;) one pass computing h =
// residual_scale * residual + scale * f, storing h, keeping it in the scratch row and summing
// it; then y = Norm(h) from the scratch row, each output rounded once from fp32.
void forward_rows(const FwdParams& p, const Affine& a, int64_t begin, int64_t end, float* scratch) {
  const int D = p.D;
  float* __restrict__ hrow = scratch;
  const float rs_s = p.residual_scale;
  const vec rs = splat(rs_s);
  const bool has_residual = p.residual.ptr != nullptr;
  for (int64_t row = begin; row < end; ++row) {
    const float scale_s = p.branch_scale_value * (p.rowscale ? p.rowscale[row] : 1.0f);
    const vec scale = splat(scale_s);
    const void* x = row_ptr(p.x, row);
    const void* r = has_residual ? row_ptr(p.residual, row) : nullptr;
    void* h_out = p.h.ptr ? row_ptr_mut(p.h, row) : nullptr;
    Stats bs{0.0f, 1.0f};
    if (p.branch_norm) {  // the branch norm's statistics need the whole row first
      const vec2 sums = sum_row(D, zeros2(), [&](int i, int n) {
        const vec v = load(x, p.x.dtype, i, n);
        store(hrow + i, n, v);
        return vec2{v, v * v};
      });
      bs = stats_of(hrow, D, p.is_rms, p.eps, sums);
      if (p.mean_x) p.mean_x[row] = bs.mean;
    }
    const vec bmean = splat(bs.mean), brstd = splat(bs.rstd);
    const vec2 sums = sum_row(D, zeros2(), [&](int i, int n) {
      vec f;
      if (p.branch_norm) {
        f = fma((load(hrow + i, n) - bmean) * brstd, load(a.branch_weight + i, n),
                load(a.branch_bias + i, n));
      } else {
        f = load(x, p.x.dtype, i, n);
      }
      if (a.has_branch_scale) {
        f = f * load(a.branch_scale + i, n) * scale;
      } else if (scale_s != 1.0f) {
        f = f * scale;
      }
      if (has_residual) {
        const vec res = load(r, p.residual.dtype, i, n);
        f = rs_s == 1.0f ? f + res : fma(res, rs, f);
      }
      if (h_out) store(h_out, p.h.dtype, i, n, f);
      store(hrow + i, n, f);
      return vec2{f, f * f};
    });
    if (!p.output_norm) continue;
    // from the fp32 h, not the stored one: each output rounded once
    const Stats s = stats_of(hrow, D, p.is_rms, p.eps, sums);
    if (p.mean) p.mean[row] = s.mean;
    const vec mean = splat(s.mean), rstd = splat(s.rstd);
    void* y = row_ptr_mut(p.y, row);
    for_row(D, [&](int i, int n) {
      const vec xhat = (load(hrow + i, n) - mean) * rstd;
      store(y, p.y.dtype, i, n, fma(xhat, load(a.weight + i, n), load(a.bias + i, n)));
    });
  }
}

// --------------------------------------------------------------------------- backward

// A norm's backward over a row in cache: `v` its input (overwritten with xhat), `g_in` the
// upstream gradient (overwritten with the input's gradient), `w` its weight (w'); adds the
// parameter gradients into the row block's partial sums (dweight: g_in * xhat, dbias: g_in).
//   out = rstd * (g - xhat * mean(g * xhat) - mean(g)), g = g_in * w'  (no mean(g) for RMS)
inline void norm_backward(float* v, float* g_in, const float* w, int D, bool is_rms, float eps,
                          float* dweight, float* dbias, vec2 sums) {
  const Stats s = stats_of(v, D, is_rms, eps, sums);
  const vec mean = splat(s.mean), rstd = splat(s.rstd);
  const vec2 g = sum_row(D, zeros2(), [&](int i, int n) {
    const vec xhat = (load(v + i, n) - mean) * rstd;
    store(v + i, n, xhat);
    const vec gi = load(g_in + i, n);
    if (dweight) store(dweight + i, n, fma(gi, xhat, load(dweight + i, n)));
    if (dbias) store(dbias + i, n, load(dbias + i, n) + gi);
    const vec gw = gi * load(w + i, n);
    return vec2{gw * xhat, gw};
  });
  const vec c1 = splat(hsum(g.a) / D), c2 = splat(is_rms ? 0.0f : hsum(g.b) / D);
  for_row(D, [&](int i, int n) {
    const vec gw = load(g_in + i, n) * load(w + i, n);
    store(g_in + i, n, (gw - load(v + i, n) * c1 - c2) * rstd);
  });
}

// Per row: (A) h into a scratch row and its sums; (B) xhat in place of h, g = dy * w' into a
// second scratch row, the two row sums of the gradient and the weight / bias partial sums;
// (C) dh_total = rstd * (g - xhat * mean(g xhat) - mean(g)) (+ dh), then dresidual, the branch
// scales and dx, one vector at a time. With the branch norm, (C) keeps df whole (in the second
// scratch row) and the branch norm's backward runs over the row.
void backward_rows(const BwdParams& p, const Affine& a, int64_t begin, int64_t end, float* scratch,
                   const PartialRows& part) {
  const int D = p.D;
  float* __restrict__ hrow = scratch;          // h, then xhat
  float* __restrict__ grow = scratch + D;      // g = dy * w', then df with the branch norm
  float* __restrict__ xrow = scratch + 2 * D;  // the branch norm: x, then its xhat
  const vec rs = splat(p.residual_scale);
  for (int64_t row = begin; row < end; ++row) {
    const float scale_s = p.branch_scale_value * (p.rowscale ? p.rowscale[row] : 1.0f);
    const vec scale = splat(scale_s);
    vec c1 = zeros(), c2 = zeros(), rstd = splat(1.0f);
    if (p.output_norm) {
      const void* h = row_ptr(p.h, row);
      const vec2 sums = sum_row(D, zeros2(), [&](int i, int n) {  // (A)
        const vec v = load(h, p.h.dtype, i, n);
        store(hrow + i, n, v);
        return vec2{v, v * v};
      });
      const Stats s = stats_of(hrow, D, p.is_rms, p.eps, sums);
      const vec mean = splat(s.mean);
      rstd = splat(s.rstd);
      const void* dy = row_ptr(p.dy, row);
      const vec2 g = sum_row(D, zeros2(), [&](int i, int n) {  // (B)
        const vec xhat = (load(hrow + i, n) - mean) * rstd;
        store(hrow + i, n, xhat);
        const vec dyv = load(dy, p.dy.dtype, i, n);
        if (part.weight) store(part.weight + i, n, fma(dyv, xhat, load(part.weight + i, n)));
        if (part.bias) store(part.bias + i, n, load(part.bias + i, n) + dyv);
        const vec gw = dyv * load(a.weight + i, n);
        store(grow + i, n, gw);
        return vec2{gw * xhat, gw};
      });
      c1 = splat(hsum(g.a) / D);
      c2 = splat(p.is_rms ? 0.0f : hsum(g.b) / D);
    }
    const void* dh = p.dh.ptr ? row_ptr(p.dh, row) : nullptr;
    const void* x = p.x.ptr ? row_ptr(p.x, row) : nullptr;
    void* dr = p.dr.ptr ? row_ptr_mut(p.dr, row) : nullptr;
    void* dx = row_ptr_mut(p.dx, row);
    for_row(D, [&](int i, int n) {  // (C)
      vec dht;
      if (p.output_norm) {
        dht = (load(grow + i, n) - load(hrow + i, n) * c1 - c2) * rstd;
        if (dh) dht = dht + load(dh, p.dh.dtype, i, n);
      } else {
        dht = load(dh, p.dh.dtype, i, n);
      }
      if (dr) store(dr, p.dr.dtype, i, n, dht * rs);
      if (scale_s != 1.0f) dht = dht * scale;
      if (a.has_branch_scale) {
        const vec xv = load(x, p.x.dtype, i, n);
        if (part.branch_scale) store(part.branch_scale + i, n, fma(dht, xv, load(part.branch_scale + i, n)));
        dht = dht * load(a.branch_scale + i, n);
      }
      if (p.branch_norm) {
        store(grow + i, n, dht);
      } else {
        store(dx, p.dx.dtype, i, n, dht);
      }
    });
    if (p.branch_norm) {  // df whole in grow: the branch norm's backward over the row
      const vec2 sums = sum_row(D, zeros2(), [&](int i, int n) {
        const vec v = load(x, p.x.dtype, i, n);
        store(xrow + i, n, v);
        return vec2{v, v * v};
      });
      norm_backward(xrow, grow, a.branch_weight, D, p.is_rms, p.eps, part.branch_weight, part.branch_bias,
                    sums);
      for_row(D, [&](int i, int n) { store(dx, p.dx.dtype, i, n, load(grow + i, n)); });
    }
  }
}

}  // namespace RESFUSE_CPU_ISA
}  // namespace cpu
}  // namespace resfuse
