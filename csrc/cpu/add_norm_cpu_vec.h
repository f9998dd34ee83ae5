// One instruction set's vector of fp32 values (`vec`, kWidth lanes) and its loads and stores
// of fp32 / fp16 / bf16 rows: included by add_norm_cpu_rows.h inside namespace
// RESFUSE_CPU_ISA, after the file that includes it chose the target:
//   RESFUSE_CPU_AVX512  AVX-512 F/BW/VL/BF16: 16 lanes, vcvtneps2bf16 for bf16 stores
//   RESFUSE_CPU_AVX2    AVX2 + FMA + F16C: 8 lanes
//   (neither)           portable C++: 8 lanes as an array the compiler vectorizes if it can
// bf16 and fp16 are converted in registers; every conversion to 16 bits rounds to nearest
// even and keeps NaNs (quiet), and the scalar conversions of the row tails give the same bits.
// Included inside a namespace: the system headers (<cstdint>, <cstring>, the intrinsics) are
// the includer's.
#pragma once

// --------------------------------------------------------------------------- scalars

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

inline float half_to_float(uint16_t h) {
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

inline uint16_t float_to_half(float f) {
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

inline float scalar_load(const void* base, DType dtype, int i) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t v = static_cast<const uint16_t*>(base)[i];
  return dtype == DType::kBFloat16 ? bf16_to_float(v) : half_to_float(v);
}

inline void scalar_store(void* base, DType dtype, int i, float v) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = dtype == DType::kBFloat16 ? float_to_bf16(v) : float_to_half(v);
  }
}

// --------------------------------------------------------------------------- vectors

#if defined(RESFUSE_CPU_AVX512)

constexpr int kWidth = 16;
struct vec {
  __m512 v;
};
inline vec splat(float a) { return {_mm512_set1_ps(a)}; }
inline vec operator+(vec a, vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline vec operator-(vec a, vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline vec operator*(vec a, vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline vec fma(vec a, vec b, vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
// a fixed sequence of shuffles and adds: the same bits for the same lanes
inline float hsum(vec a) { return _mm512_reduce_add_ps(a.v); }
// the first n lanes of a, zeros after
inline vec first_lanes(vec a, int n) {
  return {_mm512_maskz_mov_ps(static_cast<__mmask16>((1u << n) - 1u), a.v)};
}
inline vec load_f32(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store_f32(float* p, vec a) { _mm512_storeu_ps(p, a.v); }
inline vec load_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
}
inline void store_bf16(uint16_t* p, vec a) {
  const __m256bh packed = _mm512_cvtneps_pbh(a.v);
  __m256i bits;
  std::memcpy(&bits, &packed, sizeof(bits));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
}
inline vec load_f16(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void store_f16(uint16_t* p, vec a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#elif defined(RESFUSE_CPU_AVX2)

constexpr int kWidth = 8;
struct vec {
  __m256 v;
};
inline vec splat(float a) { return {_mm256_set1_ps(a)}; }
inline vec operator+(vec a, vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline vec operator-(vec a, vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline vec operator*(vec a, vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline vec fma(vec a, vec b, vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline float hsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline vec first_lanes(vec a, int n) {
  alignas(32) static const int32_t ones_then_zeros[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                          0,  0,  0,  0,  0,  0,  0,  0};
  const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones_then_zeros + 8 - n));
  return {_mm256_and_ps(a.v, _mm256_castsi256_ps(mask))};
}
inline vec load_f32(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void store_f32(float* p, vec a) { _mm256_storeu_ps(p, a.v); }
inline vec load_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
}
inline void store_bf16(uint16_t* p, vec a) {
  // round to nearest even in the integer bits (float_to_bf16, 8 at a time); NaNs quiet
  const __m256i bits = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  const __m256i high = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
  // 32 -> 16 bits: packus works within 128-bit lanes; the permute puts the halves together
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high, high), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline vec load_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void store_f16(uint16_t* p, vec a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#else

constexpr int kWidth = 8;
struct vec {
  float v[kWidth];
};
inline vec splat(float a) {
  vec r;
  for (int k = 0; k < kWidth; ++k) r.v[k] = a;
  return r;
}
inline vec operator+(vec a, vec b) {
  for (int k = 0; k < kWidth; ++k) a.v[k] += b.v[k];
  return a;
}
inline vec operator-(vec a, vec b) {
  for (int k = 0; k < kWidth; ++k) a.v[k] -= b.v[k];
  return a;
}
inline vec operator*(vec a, vec b) {
  for (int k = 0; k < kWidth; ++k) a.v[k] *= b.v[k];
  return a;
}
inline vec fma(vec a, vec b, vec c) { return a * b + c; }
inline float hsum(vec a) {
  return ((a.v[0] + a.v[1]) + (a.v[2] + a.v[3])) + ((a.v[4] + a.v[5]) + (a.v[6] + a.v[7]));
}
inline vec first_lanes(vec a, int n) {
  for (int k = n; k < kWidth; ++k) a.v[k] = 0.0f;
  return a;
}
inline vec load_f32(const float* p) {
  vec r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void store_f32(float* p, vec a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline vec load_bf16(const uint16_t* p) {
  vec r;
  for (int k = 0; k < kWidth; ++k) r.v[k] = bf16_to_float(p[k]);
  return r;
}
inline void store_bf16(uint16_t* p, vec a) {
  for (int k = 0; k < kWidth; ++k) p[k] = float_to_bf16(a.v[k]);
}
inline vec load_f16(const uint16_t* p) {
  vec r;
  for (int k = 0; k < kWidth; ++k) r.v[k] = half_to_float(p[k]);
  return r;
}
inline void store_f16(uint16_t* p, vec a) {
  for (int k = 0; k < kWidth; ++k) p[k] = float_to_half(a.v[k]);
}

#endif

inline vec zeros() { return splat(0.0f); }

// --------------------------------------------------------------------------- row access

// Elements [i, i + n) of a row of dtype T as a vector (n < kWidth only at a row's tail: the
// lanes past n are zero). Rows are read and written exactly, never past their end.
template <DType T>
inline vec load_t(const void* row, int i, int n) {
  if (n == kWidth) {
    if (T == DType::kFloat32) return load_f32(static_cast<const float*>(row) + i);
    if (T == DType::kBFloat16) return load_bf16(static_cast<const uint16_t*>(row) + i);
    return load_f16(static_cast<const uint16_t*>(row) + i);
  }
  alignas(64) float staged[kWidth] = {};
  for (int k = 0; k < n; ++k) staged[k] = scalar_load(row, T, i + k);
  return load_f32(staged);
}

template <DType T>
inline void store_t(void* row, int i, int n, vec a) {
  if (n == kWidth) {
    if (T == DType::kFloat32) return store_f32(static_cast<float*>(row) + i, a);
    if (T == DType::kBFloat16) return store_bf16(static_cast<uint16_t*>(row) + i, a);
    return store_f16(static_cast<uint16_t*>(row) + i, a);
  }
  alignas(64) float staged[kWidth];
  store_f32(staged, a);
  for (int k = 0; k < n; ++k) scalar_store(row, T, i + k, staged[k]);
}

// the same with the dtype known at run time only
inline vec load(const void* row, DType dtype, int i, int n) {
  if (dtype == DType::kFloat32) return load_t<DType::kFloat32>(row, i, n);
  if (dtype == DType::kBFloat16) return load_t<DType::kBFloat16>(row, i, n);
  return load_t<DType::kFloat16>(row, i, n);
}

inline void store(void* row, DType dtype, int i, int n, vec a) {
  if (dtype == DType::kFloat32) return store_t<DType::kFloat32>(row, i, n, a);
  if (dtype == DType::kBFloat16) return store_t<DType::kBFloat16>(row, i, n, a);
  return store_t<DType::kFloat16>(row, i, n, a);
}

// An activation's loads and stores in a loop compiled for one dtype (T >= 0, a DType: the
// common case, all activations of a call in one dtype) or for any (T = kAnyDType: the dtype
// is read at run time, for calls that mix dtypes).
constexpr int kAnyDType = -1;

template <int T>
inline vec act_load(const void* row, DType dtype, int i, int n) {
  if constexpr (T == kAnyDType) {
    return load(row, dtype, i, n);
  } else {
    return load_t<static_cast<DType>(T)>(row, i, n);
  }
}

template <int T>
inline void act_store(void* row, DType dtype, int i, int n, vec a) {
  if constexpr (T == kAnyDType) {
    store(row, dtype, i, n, a);
  } else {
    store_t<static_cast<DType>(T)>(row, i, n, a);
  }
}

// fp32 arrays (the scratch rows, the parameters, the partial sums)
inline vec load(const float* p, int n) {
  if (n == kWidth) return load_f32(p);
  alignas(64) float staged[kWidth] = {};
  for (int k = 0; k < n; ++k) staged[k] = p[k];
  return load_f32(staged);
}

inline void store(float* p, int n, vec a) {
  if (n == kWidth) return store_f32(p, a);
  alignas(64) float staged[kWidth];
  store_f32(staged, a);
  for (int k = 0; k < n; ++k) p[k] = staged[k];
}
