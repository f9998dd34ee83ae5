// The CPU kernels' row loops: included once per instruction set by add_norm_cpu_{generic,
// avx2,avx512}.cpp, each inside its own namespace (RESFUSE_CPU_ISA) and with its own target
// (a `#pragma GCC target` before the include), so that one source compiles to AVX-512, AVX2
// and portable code over add_norm_cpu_vec.h's `vec`; add_norm_cpu.cpp picks one at run time.
//
// One row at a time: the activations are read from memory once and the outputs written once
// (the bandwidth floor). A row stays in the core's L1/L2 while it is processed, so the passes
// a row needs (its sums, then y; the backward's statistics, its gradient sums, then dx) read
// it again from cache: fp32 rows as they are, 16-bit ones from an fp32 copy the first pass
// made in a scratch row of the thread. Each pass is one loop over vectors doing all of that
// pass's work (conversions, the add, the stores, the row sums), so a value loaded is used
// while it is in registers.
//
// Row sums add each vector into one of four accumulators (vector index modulo 4: four
// independent dependency chains), then the accumulators and lanes in a fixed order: a row's
// result depends on D and the instruction set only, not on where or when it runs.
// LayerNorm's variance is an exact second pass over the row in cache (row_stats); the backward
// needs two passes in all (norm_backward); where it measured faster, a pass from the cache
// prefetches the next row (prefetch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "../add_norm_params.h"
#include "add_norm_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

// The row loops are written as small lambdas passed to for_row / sum_row / row_stats; GCC
// left some of them as calls, once per vector (perf: a third of a plain norm's time in a
// lambda's operator()), so the lambdas and the loop helpers are forced inline.
//
// kNoClosureCopies: a lambda that uses another lambda (or a row input struct) captures it by
// reference, never by value. A by-value capture copies the other closure once per row, and GCC
// copies it in 64-byte vector moves from an object it has just built with 1-8 byte stores: a
// load that cannot be forwarded from those stores waits until the whole store buffer drains,
// behind the previous row's output stores that still wait for their cache lines (perf: a
// third of the fp32 LayerNorm backward and a fifth of the fp32 add + LayerNorm forward on
// such loads at D = 768-1024). The scalars they use stay captured by value.
#if defined(__GNUC__) || defined(__clang__)
#define RESFUSE_CPU_INLINE __attribute__((always_inline))
#else
#define RESFUSE_CPU_INLINE
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
RESFUSE_CPU_INLINE inline void for_row(int D, Body&& body) {
  int i = 0;
  for (; i + kWidth <= D; i += kWidth) body(i, kWidth);
  if (i < D) body(i, D - i);
}

// The sum over a row of what body(i, n) returns for each vector (the lanes past n of the
// tail's ignored): four accumulators by vector index modulo 4, added in a fixed order.
static_assert(kSumVectors == 4, "sum_row keeps four accumulators");
template <class Acc, class Body>
RESFUSE_CPU_INLINE inline Acc sum_row(int D, Acc zero, Body&& body) {
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

// The statistics of a row: body(i, n) gives its vector at i in the pass that reads it from
// memory (and does that pass's other work), again(i, n) reads it back from the cache.
// RMSNorm: the sum of squares of that pass. LayerNorm: its sum, then a second pass over the
// squared deviations from the mean: exact, no cancellation, no shift needed. (Welford in the
// first pass instead was slower here: its per-vector dependency chain and the merge of the
// lanes cost more than re-reading a row from L1: measured.)
template <class Body, class Again>
RESFUSE_CPU_INLINE inline Stats row_stats(int D, bool is_rms, float eps, Body&& body, Again&& again) {
  if (is_rms) {
    const vec sq = sum_row(D, zeros(), [&](int i, int n) RESFUSE_CPU_INLINE {
      const vec v = body(i, n);
      return v * v;
    });
    return {0.0f, 1.0f / std::sqrt(hsum(sq) / D + eps)};
  }
  const float mean_s = hsum(sum_row(D, zeros(), body)) / D;
  const vec mean = splat(mean_s);
  const vec sq = sum_row(D, zeros(), [&](int i, int n) RESFUSE_CPU_INLINE {
    const vec d = again(i, n) - mean;
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

// Software prefetch of the next row: the row loops read a row from memory in their first pass
// and from the cache in the later ones, so while a row's later passes run no load of theirs
// goes to memory, and the next row's first pass starts with misses the hardware prefetchers
// take a while to cover. A later pass that touches each vector of its row once also asks for
// the same offset of the next row:
// - the plain norms' forward (x in, y out): the whole next row of x, into L1 (LayerNorm rows
//   under kEarlyPrefetchRowBytes in their variance pass: x1.05-1.12 more at D = 768 fp32,
//   x0.94-0.98 at 4096, so longer ones in the y pass);
// - the backward (h, dy, dh in; dx and two rows of partial sums in L1 too): the first
//   kBackwardPrefetchBytes of the next row of each input, into L2 only: enough to cover the
//   start of the next row's stream. Whole rows into L1 evicted the current row's data (x0.87-
//   0.91 at D = 2048 fp32); whole rows, or their first 4 KiB, into L2 competed with the
//   hardware's own stream there (x0.95-1.00).
// - the add + norm forwards: the first kBackwardPrefetchBytes of the next rows of x and the
//   residual, into L2, in the y pass.
// Measured against ATen in one process (2 threads, 4096 rows, fp32 LayerNorm, the forward
// timed on its own, the backward after a fresh forward, 2 runs of 100-150 rounds each; ratios
// to no prefetch): forward x1.05-1.07 at D = 768, x1.30-1.40 at 2048, x1.19-1.31 at 4096;
// backward x1.04 at 768, x1.02 at 2048, x1.06-1.18 at 4096.
//
// Every output row is also prefetched for writing (PREFETCHW, prefetch_for_write) one row
// ahead, in the same passes: a store to a line not in L1 waits in the store buffer for the
// line (read for ownership), and a row's worth of such stores fills the buffer and stalls the
// loop; fetched a row early, the lines are there when the stores come. Measured in one process
// (each variant and ATen interleaved, 80-300 rounds; ratios to the same loops without it):
// plain LayerNorm forward x1.03-1.06 at D = 768 fp32, x1.18 at 2048; RMSNorm forward x1.19 at
// 1024 fp32, LayerNorm x1.16 at 4096 bf16; backward x1.20 at D = 768 fp32, x1.18 at 2048,
// x1.04 add + LayerNorm at 1024, x1.03 RMSNorm at 4096 bf16; the add + norm forwards, with
// the L2 prefetch of their inputs above: add + RMSNorm x1.16-1.33 (1024-4096, fp32 and bf16),
// add + LayerNorm x0.97-1.09 (the output prefetch alone there: x0.95-1.09).
inline const char* next_row(const Operand& op, int64_t row, int64_t end) {
  return op.ptr == nullptr ? nullptr : static_cast<const char*>(row_ptr(op, row + 1 < end ? row + 1 : row));
}

inline char* next_row_mut(const Operand& op, int64_t row, int64_t end) {
  return op.ptr == nullptr ? nullptr : static_cast<char*>(row_ptr_mut(op, row + 1 < end ? row + 1 : row));
}

constexpr int kBackwardPrefetchBytes = 2048;
constexpr int64_t kEarlyPrefetchRowBytes = 4096;

// the line of an output row that the store at element i writes, for writing (PREFETCHW)
RESFUSE_CPU_INLINE inline void prefetch_for_write(char* row, int i, int elem_bytes) {
#if defined(__GNUC__) || defined(__clang__)
  if (row != nullptr)
    __builtin_prefetch(row + static_cast<int64_t>(i) * elem_bytes, /*rw=*/1, /*locality=*/3);
#endif
}

template <bool kHeadIntoL2>
RESFUSE_CPU_INLINE inline void prefetch(const char* row, int i, int elem_bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const int64_t offset = static_cast<int64_t>(i) * elem_bytes;
  if (row == nullptr) return;
  if (kHeadIntoL2) {
    if (offset < kBackwardPrefetchBytes) __builtin_prefetch(row + offset, /*rw=*/0, /*locality=*/2);
  } else {
    __builtin_prefetch(row + offset, /*rw=*/0, /*locality=*/3);
  }
#endif
}

// n values of `dtype` into fp32 (the parameters, once per call)
inline void load_row(const void* src, DType dtype, float* dst, int n) {
  for_row(n, [&](int i, int m) { store(dst + i, m, load(src, dtype, i, m)); });
}

// --------------------------------------------------------------------------- forward

// The plain norms' forward (y = Norm(x): no add, no scale, no branch norm, h not stored),
// compiled per dtype: every value the loops test is a constant or a local copy, so the
// vector loops carry no per-vector flag tests, dtype switches or reloads of the parameters
// (in the general loop below those cost up to a third of a plain norm's time: perf).
template <DType XT, DType YT>
void plain_forward_rows(const FwdParams& p, const Affine& a, int64_t begin, int64_t end) {
  const int D = p.D;
  const bool is_rms = p.is_rms, has_bias = p.bias.ptr != nullptr;
  const float eps = p.eps;
  const float* const weight = a.weight;
  const float* const bias = a.bias;
  float* const means = p.mean;
  const Operand xs = p.x, ys = p.y;
  // LayerNorm rows that fit in L1 with the next one prefetch it during their variance pass
  // (earlier: longer to arrive before its first pass); longer rows, where that evicted the
  // row before its y pass, and RMSNorm (no variance pass) during the y pass (prefetch).
  const bool prefetch_early = !is_rms && static_cast<int64_t>(D) * dtype_bytes(XT) < kEarlyPrefetchRowBytes;
  for (int64_t row = begin; row < end; ++row) {
    const void* const x = row_ptr(xs, row);
    void* const y = row_ptr_mut(ys, row);
    const auto x_at = [x](int i, int n) RESFUSE_CPU_INLINE { return load_t<XT>(x, i, n); };
    const char* const x_next = next_row(xs, row, end);
    char* const y_next = next_row_mut(ys, row, end);
    // the next row's x (to read) and y (to write) at element i
    const auto prefetch_next = [=](int i) RESFUSE_CPU_INLINE {
      prefetch<false>(x_next, i, dtype_bytes(XT));
      prefetch_for_write(y_next, i, dtype_bytes(YT));
    };
    const Stats s =
        row_stats(D, is_rms, eps, x_at, [=, &x_at, &prefetch_next](int i, int n) RESFUSE_CPU_INLINE {
          if (prefetch_early) prefetch_next(i);
          return x_at(i, n);
        });
    if (means) means[row] = s.mean;
    const vec mean = splat(s.mean), rstd = splat(s.rstd);
    if (has_bias) {
      for_row(D, [=, &x_at, &prefetch_next](int i, int n) RESFUSE_CPU_INLINE {
        if (!prefetch_early) prefetch_next(i);
        store_t<YT>(y, i, n, fma((x_at(i, n) - mean) * rstd, load(weight + i, n), load(bias + i, n)));
      });
    } else {
      for_row(D, [=, &x_at, &prefetch_next](int i, int n) RESFUSE_CPU_INLINE {
        if (!prefetch_early) prefetch_next(i);
        store_t<YT>(y, i, n, (x_at(i, n) - mean) * rstd * load(weight + i, n));
      });
    }
  }
}

// the plain norm's forward for p's dtypes, or false when p is not a plain norm with x and y
// of one dtype (the general loop runs)
inline bool plain_forward(const FwdParams& p, const Affine& a, int64_t begin, int64_t end) {
  const bool plain = p.output_norm && !p.branch_norm && p.residual.ptr == nullptr && p.h.ptr == nullptr &&
                     !a.has_branch_scale && p.branch_scale_value == 1.0f && p.rowscale == nullptr;
  if (!plain || p.x.dtype != p.y.dtype) return false;
  if (p.x.dtype == DType::kFloat32) {
    plain_forward_rows<DType::kFloat32, DType::kFloat32>(p, a, begin, end);
  } else if (p.x.dtype == DType::kBFloat16) {
    plain_forward_rows<DType::kBFloat16, DType::kBFloat16>(p, a, begin, end);
  } else {
    plain_forward_rows<DType::kFloat16, DType::kFloat16>(p, a, begin, end);
  }
  return true;
}

// Per row: (branch norm: the statistics of x;) one pass computing h = residual_scale *
// residual + scale * f, storing h and summing it; then y = Norm(h), each output rounded once
// from the fp32 h. The later passes read h back from the cache: from the stored h when it is
// fp32, from x when h is x itself, else from an fp32 copy in a scratch row (recomputing h
// from 16-bit x and residual costs more than that copy: measured).
//
// Compiled per activation dtype T (or kAnyDType for mixed calls), and everything the vector
// loops test is copied into local values that the loops' lambdas capture by value: the stores
// through the output pointers cannot alias them, so the compiler keeps them in registers
// instead of reloading and testing them for every vector (perf showed those reloads).
template <int T>
void forward_rows_t(const FwdParams& p, const Affine& a, int64_t begin, int64_t end, float* scratch) {
  const int D = p.D;
  float* const hrow = scratch;
  const float rs_s = p.residual_scale;
  const vec rs = splat(rs_s);
  const bool has_residual = p.residual.ptr != nullptr, branch_norm = p.branch_norm, is_rms = p.is_rms;
  const bool has_branch_scale = a.has_branch_scale, output_norm = p.output_norm;
  const DType xt = p.x.dtype, rt = p.residual.dtype, ht = p.h.dtype, yt = p.y.dtype;
  const float* const weight = a.weight;
  const float* const bias = a.bias;
  const float* const branch_weight = a.branch_weight;
  const float* const branch_bias = a.branch_bias;
  const float* const branch_scale = a.branch_scale;
  const float* const rowscale = p.rowscale;
  float* const means = p.mean;
  float* const means_x = p.mean_x;
  const float eps = p.eps, scale_value = p.branch_scale_value;
  const Operand xs = p.x, rsd = p.residual, hs = p.h, ys = p.y;
  const int hb = dtype_bytes(ht), yb = dtype_bytes(yt), xb = dtype_bytes(xt), rb = dtype_bytes(rt);
  for (int64_t row = begin; row < end; ++row) {
    const float scale_s = scale_value * (rowscale ? rowscale[row] : 1.0f);
    const vec scale = splat(scale_s);
    const bool scaled = scale_s != 1.0f;
    const void* const x = row_ptr(xs, row);
    const void* const r = has_residual ? row_ptr(rsd, row) : nullptr;
    const auto x_at = [=](int i, int n) RESFUSE_CPU_INLINE { return act_load<T>(x, xt, i, n); };
    Stats bs{0.0f, 1.0f};
    if (branch_norm) {  // the branch norm's statistics need the whole row first
      bs = row_stats(D, is_rms, eps, x_at, x_at);
      if (means_x) means_x[row] = bs.mean;
    }
    const vec bmean = splat(bs.mean), brstd = splat(bs.rstd);
    // h at [i, i + n), from the inputs
    const auto h_at = [=, &x_at](int i, int n) RESFUSE_CPU_INLINE {
      vec f = x_at(i, n);
      if (branch_norm) f = fma((f - bmean) * brstd, load(branch_weight + i, n), load(branch_bias + i, n));
      if (has_branch_scale) {
        f = f * load(branch_scale + i, n) * scale;
      } else if (scaled) {
        f = f * scale;
      }
      if (has_residual) {
        const vec res = act_load<T>(r, rt, i, n);
        f = rs_s == 1.0f ? f + res : fma(res, rs, f);
      }
      return f;
    };
    void* const h_out = hs.ptr ? row_ptr_mut(hs, row) : nullptr;
    if (!output_norm) {
      for_row(D, [=, &h_at](int i, int n) RESFUSE_CPU_INLINE { act_store<T>(h_out, ht, i, n, h_at(i, n)); });
      continue;
    }
    const bool h_is_x = !has_residual && !branch_norm && !has_branch_scale && !scaled;
    const bool h_stored_fp32 = h_out != nullptr && ht == DType::kFloat32;
    const bool keep_copy = !h_is_x && !h_stored_fp32;
    const auto h_again = [=, &x_at](int i, int n) RESFUSE_CPU_INLINE {
      if (keep_copy) return load(hrow + i, n);
      return h_is_x ? x_at(i, n) : load_t<DType::kFloat32>(h_out, i, n);
    };
    const Stats s = row_stats(
        D, is_rms, eps,
        [=, &h_at](int i, int n) RESFUSE_CPU_INLINE {
          const vec h = h_at(i, n);
          if (h_out) act_store<T>(h_out, ht, i, n, h);
          if (keep_copy) store(hrow + i, n, h);
          return h;
        },
        h_again);
    if (means) means[row] = s.mean;
    const vec mean = splat(s.mean), rstd = splat(s.rstd);
    void* const y = row_ptr_mut(ys, row);
    char* const h_next = next_row_mut(hs, row, end);
    char* const y_next = next_row_mut(ys, row, end);
    const char* const x_next = next_row(xs, row, end);
    const char* const r_next = next_row(rsd, row, end);
    for_row(D, [=, &h_again](int i, int n) RESFUSE_CPU_INLINE {
      prefetch_for_write(h_next, i, hb);
      prefetch_for_write(y_next, i, yb);
      prefetch<true>(x_next, i, xb);
      prefetch<true>(r_next, i, rb);
      const vec xhat = (h_again(i, n) - mean) * rstd;
      act_store<T>(y, yt, i, n, fma(xhat, load(weight + i, n), load(bias + i, n)));
    });
  }
}

// the activations' one dtype, or kAnyDType when they differ
inline int uniform_dtype(std::initializer_list<Operand> ops) {
  int t = kAnyDType;
  for (const Operand& op : ops) {
    if (op.ptr == nullptr) continue;
    if (t == kAnyDType) {
      t = static_cast<int>(op.dtype);
    } else if (t != static_cast<int>(op.dtype)) {
      return kAnyDType;
    }
  }
  return t;
}

void forward_rows(const FwdParams& p, const Affine& a, int64_t begin, int64_t end, float* scratch) {
  if (plain_forward(p, a, begin, end)) return;
  switch (uniform_dtype({p.x, p.residual, p.h, p.y})) {
    case static_cast<int>(DType::kFloat32):
      return forward_rows_t<static_cast<int>(DType::kFloat32)>(p, a, begin, end, scratch);
    case static_cast<int>(DType::kBFloat16):
      return forward_rows_t<static_cast<int>(DType::kBFloat16)>(p, a, begin, end, scratch);
    case static_cast<int>(DType::kFloat16):
      return forward_rows_t<static_cast<int>(DType::kFloat16)>(p, a, begin, end, scratch);
    default:
      return forward_rows_t<kAnyDType>(p, a, begin, end, scratch);
  }
}

// --------------------------------------------------------------------------- backward

// A row the backward reads more than once: the first pass reads it from memory and, unless it
// is fp32 already, keeps an fp32 copy in a scratch row for the later passes (cheaper than
// converting again: measured). T: the activations' dtype the loop is compiled for.
template <int T>
struct RowInput {
  const void* ptr;
  DType dtype;
  float* copy;  // nullptr: re-read ptr (fp32)
  RowInput(const void* p, DType t, float* scratch)
      : ptr(p), dtype(t), copy(t == DType::kFloat32 ? nullptr : scratch) {}
  vec first(int i, int n) const {
    const vec v = act_load<T>(ptr, dtype, i, n);
    if (copy) store(copy + i, n, v);
    return v;
  }
  vec again(int i, int n) const { return copy ? load(copy + i, n) : load_t<DType::kFloat32>(ptr, i, n); }
};

// A norm's backward over a row in two passes: v its input, g the upstream gradient, w its
// weight (w'); adds the parameter gradients into the row block's partial sums (dweight:
// g * xhat, dbias: g) and gives out(i, n, the input's gradient) for each vector:
//   rstd * (g w' - xhat * mean(g w' xhat) - mean(g w'))  (no mean(g w') for RMS)
//
// Pass 1 (v and g from memory) sums, with d = v - shift: d, d^2, g w' d and g w'. The shift is
// the forward's row mean (LayerNorm; `saved_mean`), so d is centred already and the sums give
// the statistics and both means of the formula at once, exactly up to rounding:
//   mean = shift + sum(d) / D, var = sum(d^2) / D - (sum(d) / D)^2 (the correction is of the
//   order of h's rounding to its stored dtype: no cancellation),
//   sum(g w' xhat) = rstd * (sum(g w' d) - sum(d) / D * sum(g w')).
// Without a saved mean (a direct op call) an exact sum pass finds it first; RMSNorm's shift is
// 0 (no centring). Pass 2 (from the cache) forms xhat, the parameter gradients and out. One
// statistics pass less than re-deriving (mean, rstd) before the gradient sums (measured: the
// fp32 LayerNorm backward at D = 768 went from 4 passes over a row to 2).
struct BackwardSums {
  vec d, dd, gd, g;
};
inline BackwardSums operator+(BackwardSums x, BackwardSums y) {
  return {x.d + y.d, x.dd + y.dd, x.gd + y.gd, x.g + y.g};
}
inline BackwardSums first_lanes(BackwardSums x, int n) {
  return {first_lanes(x.d, n), first_lanes(x.dd, n), first_lanes(x.gd, n), first_lanes(x.g, n)};
}

// Forced inline, and its row inputs and `out` by reference (see kNoClosureCopies).
template <class V, class G, class Out>
RESFUSE_CPU_INLINE inline void norm_backward(const V& v, const G& g, const float* const w, int D, bool is_rms,
                                             float eps, const float* const saved_mean, float* const dweight,
                                             float* const dbias, const Out& out) {
  const bool mean_pass = !is_rms && saved_mean == nullptr;
  float shift_s = 0.0f;
  if (mean_pass)
    shift_s = hsum(sum_row(D, zeros(), [&](int i, int n) RESFUSE_CPU_INLINE { return v.first(i, n); })) / D;
  if (!is_rms && saved_mean) shift_s = *saved_mean;
  const vec shift = splat(shift_s);
  const auto sums = [&](const auto& v_at) RESFUSE_CPU_INLINE {
    return sum_row(D, BackwardSums{zeros(), zeros(), zeros(), zeros()},
                   [=, &v_at, &g](int i, int n) RESFUSE_CPU_INLINE {
                     const vec d = v_at(i, n) - shift;
                     const vec gw = g.first(i, n) * load(w + i, n);
                     return BackwardSums{d, d * d, gw * d, gw};
                   });
  };
  const BackwardSums s = mean_pass ? sums([&](int i, int n) RESFUSE_CPU_INLINE { return v.again(i, n); })
                                   : sums([&](int i, int n) RESFUSE_CPU_INLINE { return v.first(i, n); });
  const float sum_gw = hsum(s.g), sum_gd = hsum(s.gd);
  float rstd_s, mean_s, sum_gw_xhat;
  if (is_rms) {
    mean_s = 0.0f;
    rstd_s = 1.0f / std::sqrt(hsum(s.dd) / D + eps);
    sum_gw_xhat = rstd_s * sum_gd;
  } else {
    const float delta = hsum(s.d) / D;
    mean_s = shift_s + delta;
    rstd_s = 1.0f / std::sqrt(std::max(hsum(s.dd) / D - delta * delta, 0.0f) + eps);
    sum_gw_xhat = rstd_s * (sum_gd - delta * sum_gw);
  }
  const vec mean = splat(mean_s), rstd = splat(rstd_s);
  const vec c1 = splat(sum_gw_xhat / D), c2 = splat(is_rms ? 0.0f : sum_gw / D);
  for_row(D, [=, &v, &g, &out](int i, int n) RESFUSE_CPU_INLINE {
    const vec xhat = (v.again(i, n) - mean) * rstd;
    const vec gi = g.again(i, n);
    if (dweight) store(dweight + i, n, fma(gi, xhat, load(dweight + i, n)));
    if (dbias) store(dbias + i, n, load(dbias + i, n) + gi);
    const vec gw = gi * load(w + i, n);
    out(i, n, (gw - xhat * c1 - c2) * rstd);
  });
}

// Per row: the output norm's backward at h (dh_total = its input gradient + dh), then
// dresidual, the branch scales and dx, one vector at a time. With the branch norm, df is kept
// whole in a scratch row and the branch norm's backward runs over it and x. Compiled per
// activation dtype, with what the loops test in captured locals, as forward_rows_t.
template <int T>
void backward_rows_t(const BwdParams& p, const Affine& a, int64_t begin, int64_t end, float* scratch,
                     const PartialRows& part) {
  const int D = p.D;
  float* const hrow = scratch;  // fp32 copies of 16-bit h, dy and x
  float* const dyrow = scratch + D;
  float* const xrow = scratch + 2 * D;
  float* const df = scratch + 3 * D;  // the branch norm's upstream gradient
  const vec rs = splat(p.residual_scale);
  const bool branch_norm = p.branch_norm, is_rms = p.is_rms, has_branch_scale = a.has_branch_scale;
  const bool output_norm = p.output_norm;
  const DType xt = p.x.dtype, dht_t = p.dh.dtype, drt = p.dr.dtype, dxt = p.dx.dtype, ht = p.h.dtype,
              dyt = p.dy.dtype;
  const float* const branch_scale = a.branch_scale;
  const float* const weight = a.weight;
  const float* const branch_weight = a.branch_weight;
  const float* const rowscale = p.rowscale;
  const float* const means = p.mean;  // the forward's LayerNorm row means (or nullptr)
  const float* const means_x = p.mean_x;
  float* const dbranch_scale = part.branch_scale;
  const float eps = p.eps, scale_value = p.branch_scale_value;
  const Operand hs = p.h, dys = p.dy, dhs = p.dh, xs = p.x, drs = p.dr, dxs = p.dx;
  const int hb = dtype_bytes(ht), dyb = dtype_bytes(dyt), dhb = dtype_bytes(dht_t);
  const PartialRows parts = part;
  const int dxb = dtype_bytes(dxt), drb = dtype_bytes(drt);
  for (int64_t row = begin; row < end; ++row) {
    const float scale_s = scale_value * (rowscale ? rowscale[row] : 1.0f);
    const vec scale = splat(scale_s);
    const bool scaled = scale_s != 1.0f;
    const void* const dh = dhs.ptr ? row_ptr(dhs, row) : nullptr;
    const void* const x = xs.ptr ? row_ptr(xs, row) : nullptr;
    void* const dr = drs.ptr ? row_ptr_mut(drs, row) : nullptr;
    void* const dx = row_ptr_mut(dxs, row);
    const char* const h_next = next_row(hs, row, end);
    const char* const dy_next = next_row(dys, row, end);
    const char* const dh_next = next_row(dhs, row, end);
    char* const dx_next = next_row_mut(dxs, row, end);
    char* const dr_next = next_row_mut(drs, row, end);
    // dh_total at [i, i + n) -> dresidual, the branch scales, then dx (or df); the pass that
    // calls it (the last over the row but for the branch norm's) prefetches the next row
    const auto finish = [=](int i, int n, vec dht) RESFUSE_CPU_INLINE {
      prefetch<true>(h_next, i, hb);
      prefetch<true>(dy_next, i, dyb);
      prefetch<true>(dh_next, i, dhb);
      prefetch_for_write(dx_next, i, dxb);
      prefetch_for_write(dr_next, i, drb);
      if (dh) dht = dht + act_load<T>(dh, dht_t, i, n);
      if (dr) act_store<T>(dr, drt, i, n, dht * rs);
      if (scaled) dht = dht * scale;
      if (has_branch_scale) {
        const vec xv = act_load<T>(x, xt, i, n);
        if (dbranch_scale) store(dbranch_scale + i, n, fma(dht, xv, load(dbranch_scale + i, n)));
        dht = dht * load(branch_scale + i, n);
      }
      if (branch_norm) {
        store(df + i, n, dht);
      } else {
        act_store<T>(dx, dxt, i, n, dht);
      }
    };
    if (output_norm) {
      norm_backward(RowInput<T>(row_ptr(hs, row), ht, hrow), RowInput<T>(row_ptr(dys, row), dyt, dyrow),
                    weight, D, is_rms, eps, means ? means + row : nullptr, parts.weight, parts.bias, finish);
    } else {
      for_row(D, [=, &finish](int i, int n) RESFUSE_CPU_INLINE { finish(i, n, zeros()); });
    }
    if (branch_norm) {  // df whole: the branch norm's backward over the row
      norm_backward(RowInput<T>(x, xt, xrow),
                    RowInput<static_cast<int>(DType::kFloat32)>(df, DType::kFloat32, nullptr), branch_weight,
                    D, is_rms, eps, means_x ? means_x + row : nullptr, parts.branch_weight, parts.branch_bias,
                    [=](int i, int n, vec g) RESFUSE_CPU_INLINE { act_store<T>(dx, dxt, i, n, g); });
    }
  }
}

void backward_rows(const BwdParams& p, const Affine& a, int64_t begin, int64_t end, float* scratch,
                   const PartialRows& part) {
  switch (uniform_dtype({p.h, p.dy, p.dh, p.x, p.dr, p.dx})) {
    case static_cast<int>(DType::kFloat32):
      return backward_rows_t<static_cast<int>(DType::kFloat32)>(p, a, begin, end, scratch, part);
    case static_cast<int>(DType::kBFloat16):
      return backward_rows_t<static_cast<int>(DType::kBFloat16)>(p, a, begin, end, scratch, part);
    case static_cast<int>(DType::kFloat16):
      return backward_rows_t<static_cast<int>(DType::kFloat16)>(p, a, begin, end, scratch, part);
    default:
      return backward_rows_t<kAnyDType>(p, a, begin, end, scratch, part);
  }
}

}  // namespace RESFUSE_CPU_ISA
}  // namespace cpu
}  // namespace resfuse
