// Device helpers shared by the resfuse kernels: dtypes, 8-element chunk I/O with 128-bit
// vector accesses (and a scalar path for tails and misaligned tensors), row-group reductions.
//
// The same source also compiles as plain C++ against tests/simt/simt.h (RESFUSE_SIMT), a CPU
// emulator of the few CUDA primitives used here, so the kernels' logic is tested without a GPU.
// Rules that keep that working: no early return in a kernel that synchronises, every shuffle
// with the full-warp mask executed by all 32 lanes, barriers in block-uniform control flow.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef RESFUSE_SIMT
#include "simt.h"
#else
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#endif

#include "add_norm_params.h"

// A statically sized shared-memory array. On the emulator, an array of the running block
// (blocks of one cluster run at the same time there, so a function static would be shared).
#ifdef RESFUSE_SIMT
#define RESFUSE_SHARED_ARRAY(T, name, count) \
  static const char name##_tag = 0;          \
  T* const name = simt::block_shared<T>(&name##_tag, (count))
#else
#define RESFUSE_SHARED_ARRAY(T, name, count) __shared__ T name[(count)]
#endif

namespace resfuse {

// Thread-block clusters (sm_90): the blocks of a cluster sync with one barrier and read each
// other's shared memory. Only launched with clusters where the loaded binary is sm_90 or newer
// (the launcher checks), so the older architectures' builds never reach these. (A block's
// rank in its cluster comes from blockIdx: see row_lane.)

// A barrier over every thread of the cluster, ordering their shared-memory writes before it
// ahead of the reads after it (release / acquire).
__device__ __forceinline__ void cluster_barrier() {
#if defined(RESFUSE_SIMT)
  simt::cluster_sync();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// The address p (in this block's shared memory) in the shared memory of block `rank`.
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank) {
#if defined(RESFUSE_SIMT)
  return simt::map_shared_rank(p, static_cast<unsigned>(rank));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, static_cast<unsigned>(rank));
#else
  return p;
#endif
}

// A dtype only known at run time: the kernels' generic instantiation for rare dtype mixes.
struct Dyn {};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float fast_rsqrt(float v) {
#ifdef RESFUSE_SIMT
  return 1.0f / std::sqrt(v);
#else
  return rsqrtf(v);
#endif
}

// Raw bits of one chunk as loaded from memory, before conversion: the backward prefetches the
// next row into these (half the registers of fp32 values for 16-bit types).
template <typename T>
struct RawChunk {
  uint4 w[sizeof(T) == 4 ? 2 : 1];
};
template <>
struct RawChunk<Dyn> {
  uint4 w[2];
};

// Chunk I/O for a concrete element type T. `n` is the number of valid elements (1..8) from
// p; the rest read as zero. 128-bit accesses when the operand allows them and n == 8.
template <typename T>
struct ChunkIO {
  static constexpr int kWords = sizeof(T) == 4 ? 2 : 1;

  __device__ __forceinline__ static void load_raw(const void* base, int64_t offset, DType, int n, bool vec,
                                                  RawChunk<T>& raw) {
    const T* p = static_cast<const T*>(base) + offset;
    if (vec && n == kChunk) {
#pragma unroll
      for (int i = 0; i < kWords; ++i) raw.w[i] = reinterpret_cast<const uint4*>(p)[i];
    } else {
      T* dst = reinterpret_cast<T*>(raw.w);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) dst[e] = e < n ? p[e] : from_float<T>(0.0f);
    }
  }

  __device__ __forceinline__ static void decode(const RawChunk<T>& raw, DType, float (&v)[kChunk]) {
    const T* src = reinterpret_cast<const T*>(raw.w);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) v[e] = to_float(src[e]);
  }

  __device__ __forceinline__ static void load(const void* base, int64_t offset, DType dt, int n, bool vec,
                                              float (&v)[kChunk]) {
    RawChunk<T> raw;
    load_raw(base, offset, dt, n, vec, raw);
    decode(raw, dt, v);
  }

  __device__ __forceinline__ static void store(void* base, int64_t offset, DType, int n, bool vec,
                                               const float (&v)[kChunk]) {
    T* p = static_cast<T*>(base) + offset;
    RawChunk<T> raw;
    T* vals = reinterpret_cast<T*>(raw.w);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) vals[e] = from_float<T>(v[e]);
    if (vec && n == kChunk) {
#pragma unroll
      for (int i = 0; i < kWords; ++i) reinterpret_cast<uint4*>(p)[i] = raw.w[i];
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e)
        if (e < n) p[e] = vals[e];
    }
  }
};

// The run-time dtype: a warp-uniform switch over the three concrete paths.
template <>
struct ChunkIO<Dyn> {
  __device__ __forceinline__ static void load_raw(const void* base, int64_t offset, DType dt, int n, bool vec,
                                                  RawChunk<Dyn>& raw) {
    switch (dt) {
      case DType::kFloat32:
        ChunkIO<float>::load_raw(base, offset, dt, n, vec, reinterpret_cast<RawChunk<float>&>(raw));
        break;
      case DType::kFloat16:
        ChunkIO<__half>::load_raw(base, offset, dt, n, vec, reinterpret_cast<RawChunk<__half>&>(raw));
        break;
      default:
        ChunkIO<__nv_bfloat16>::load_raw(base, offset, dt, n, vec,
                                         reinterpret_cast<RawChunk<__nv_bfloat16>&>(raw));
    }
  }

  __device__ __forceinline__ static void decode(const RawChunk<Dyn>& raw, DType dt, float (&v)[kChunk]) {
    switch (dt) {
      case DType::kFloat32:
        ChunkIO<float>::decode(reinterpret_cast<const RawChunk<float>&>(raw), dt, v);
        break;
      case DType::kFloat16:
        ChunkIO<__half>::decode(reinterpret_cast<const RawChunk<__half>&>(raw), dt, v);
        break;
      default:
        ChunkIO<__nv_bfloat16>::decode(reinterpret_cast<const RawChunk<__nv_bfloat16>&>(raw), dt, v);
    }
  }

  __device__ __forceinline__ static void load(const void* base, int64_t offset, DType dt, int n, bool vec,
                                              float (&v)[kChunk]) {
    switch (dt) {
      case DType::kFloat32:
        ChunkIO<float>::load(base, offset, dt, n, vec, v);
        break;
      case DType::kFloat16:
        ChunkIO<__half>::load(base, offset, dt, n, vec, v);
        break;
      default:
        ChunkIO<__nv_bfloat16>::load(base, offset, dt, n, vec, v);
    }
  }

  __device__ __forceinline__ static void store(void* base, int64_t offset, DType dt, int n, bool vec,
                                               const float (&v)[kChunk]) {
    switch (dt) {
      case DType::kFloat32:
        ChunkIO<float>::store(base, offset, dt, n, vec, v);
        break;
      case DType::kFloat16:
        ChunkIO<__half>::store(base, offset, dt, n, vec, v);
        break;
      default:
        ChunkIO<__nv_bfloat16>::store(base, offset, dt, n, vec, v);
    }
  }
};

// Typed views of the operands: T is the compile-time element type (or Dyn).
template <typename T>
__device__ __forceinline__ void load_row_chunk(const Operand& op, int64_t row, int col, int n,
                                               float (&v)[kChunk]) {
  ChunkIO<T>::load(op.ptr, row * op.row_stride + col, op.dtype, n, op.vec, v);
}

template <typename T>
__device__ __forceinline__ void store_row_chunk(const Operand& op, int64_t row, int col, int n,
                                                const float (&v)[kChunk]) {
  ChunkIO<T>::store(op.ptr, row * op.row_stride + col, op.dtype, n, op.vec, v);
}

__device__ __forceinline__ void load_param_chunk(const ParamVector& pv, int col, int n, float (&v)[kChunk]) {
  ChunkIO<Dyn>::load(pv.ptr, col, pv.dtype, n, pv.vec, v);
}

// Sum over the threads of one row group (`threads_per_row` consecutive threads, a power of
// two; with a cluster, the whole block, and the row continues in the cluster's other blocks).
// Within a warp: an xor butterfly, whose result is bitwise identical in every lane (each
// step adds the same two values). Across warps: one partial per warp in shared memory, then
// every thread adds the row's partials in the same fixed order. Across a cluster's blocks:
// see cluster_sum. Deterministic; one __syncthreads per call (with a cluster, a cluster
// barrier and a second __syncthreads), the scratch alternating between two halves so that a
// warp (block) running ahead into the next reduction cannot overwrite partials still being
// read: it would first have to pass the next call's barrier, which the readers reach only
// after reading.
struct RowReducer {
  static constexpr int kMaxWarps = 32;
  static constexpr int kMaxValues = 4;
  // [parity][warp][value], then for clusters [parity][this block's partial, the total][value]
  static constexpr int kScratchFloats = 2 * kMaxWarps * kMaxValues + 4 * kMaxValues;
  float* scratch;          // shared, kScratchFloats
  int threads_per_row;     // block-uniform
  int row_slot;            // which row of the block this thread works on
  int cluster_blocks = 1;  // > 1: the row spans the cluster (then one row per block)
  int parity = 0, cluster_parity = 0;

  template <int N>
  __device__ __forceinline__ void sum(float (&v)[N]) {
    static_assert(N <= kMaxValues, "RowReducer scratch holds kMaxValues per warp");
    const int width = threads_per_row < 32 ? threads_per_row : 32;
    for (int offset = width >> 1; offset > 0; offset >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
    }
    if (threads_per_row > 32) {
      float* buf = scratch + parity * (kMaxWarps * kMaxValues);
      parity ^= 1;
      const int warp = threadIdx.x >> 5;
      if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) buf[warp * N + i] = v[i];
      }
      __syncthreads();
      const int warps = threads_per_row >> 5;
      const int first = row_slot * warps;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        float s = 0.0f;
        for (int w = 0; w < warps; ++w) s += buf[(first + w) * N + i];
        v[i] = s;
      }
    }
    if (cluster_blocks > 1) {
      cluster_sum(v, cluster_parity);
      cluster_parity ^= 1;
    }
  }

  // The cluster step of sum: each block's partial goes to its shared memory; lane r of
  // warp 0 reads block r's (one remote load per block and value, not one per thread), an
  // xor butterfly adds them (the same bits in every lane, and in every block: each gets
  // the same inputs), and the total reaches the block's threads through shared memory.
  template <int N>
  __device__ __forceinline__ void cluster_sum(float (&v)[N], int half) {
    float* slots = scratch + 2 * kMaxWarps * kMaxValues + half * 2 * kMaxValues;  // [partial, total]
    if (threadIdx.x == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) slots[i] = v[i];
    }
    cluster_barrier();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      float w[N];
      const float* peer = cluster_peer(slots, lane < cluster_blocks ? lane : 0);
#pragma unroll
      for (int i = 0; i < N; ++i) w[i] = lane < cluster_blocks ? peer[i] : 0.0f;
      for (int offset = kMaxClusterBlocks >> 1; offset > 0; offset >>= 1) {
#pragma unroll
        for (int i = 0; i < N; ++i) w[i] += __shfl_xor_sync(0xffffffffu, w[i], offset);
      }
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) slots[kMaxValues + i] = w[i];
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = slots[kMaxValues + i];
  }

  // Before a block of a cluster exits: its shared memory must outlive the other blocks'
  // reads of the last reduction's partials.
  __device__ __forceinline__ void leave_cluster() {
    if (cluster_blocks > 1) cluster_barrier();
  }

  // Count, mean and sum of squared deviations of a row, merged with Chan et al.'s pairwise
  // formula (no cancellation, unlike sum(h^2) - n*mean^2). Merges always take the lower
  // lane's (or warp's) partial as the left operand so every thread gets the same bits.
  __device__ __forceinline__ static void chan_merge(float& n, float& mean, float& m2, float nb, float mean_b,
                                                    float m2b) {
    if (nb == 0.0f) return;
    if (n == 0.0f) {
      n = nb, mean = mean_b, m2 = m2b;
      return;
    }
    const float total = n + nb;
    const float delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2b + delta * delta * (n * nb / total);
    n = total;
  }

  __device__ __forceinline__ void moments(float& n, float& mean, float& m2) {
    const int width = threads_per_row < 32 ? threads_per_row : 32;
    const int lane = threadIdx.x & 31;
    for (int offset = width >> 1; offset > 0; offset >>= 1) {
      const float on = __shfl_xor_sync(0xffffffffu, n, offset);
      const float omean = __shfl_xor_sync(0xffffffffu, mean, offset);
      const float om2 = __shfl_xor_sync(0xffffffffu, m2, offset);
      if (lane & offset) {  // the other lane is the lower one: it goes on the left
        float ln = on, lmean = omean, lm2 = om2;
        chan_merge(ln, lmean, lm2, n, mean, m2);
        n = ln, mean = lmean, m2 = lm2;
      } else {
        chan_merge(n, mean, m2, on, omean, om2);
      }
    }
    if (threads_per_row > 32) {  // (streamed rows only: never spans a cluster)
      float* buf = scratch + parity * (kMaxWarps * kMaxValues);
      parity ^= 1;
      const int warp = threadIdx.x >> 5;
      if (lane == 0) buf[warp * 3] = n, buf[warp * 3 + 1] = mean, buf[warp * 3 + 2] = m2;
      __syncthreads();
      const int warps = threads_per_row >> 5;
      const int first = row_slot * warps;
      n = 0.0f, mean = 0.0f, m2 = 0.0f;
      for (int w = first; w < first + warps; ++w)
        chan_merge(n, mean, m2, buf[w * 3], buf[w * 3 + 1], buf[w * 3 + 2]);
    }
  }
};

}  // namespace resfuse
