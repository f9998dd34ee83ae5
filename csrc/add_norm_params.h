// Kernel parameters of the fused residual add + RMSNorm/LayerNorm, and the launch layout.
// Plain host/device structs: included by the kernels, the op registration (host C++ only),
// and the CPU emulator harness of the tests.
#pragma once

#include <cstdint>

namespace resfuse {

// Activation and parameter dtypes (the values are the ones the host code passes around).
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#if defined(__CUDACC__)
#define RESFUSE_HOST_DEVICE __host__ __device__
#else
#define RESFUSE_HOST_DEVICE
#endif

RESFUSE_HOST_DEVICE inline constexpr int dtype_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

constexpr int kChunk = 8;  // elements per thread access: 16 bytes of a 16-bit type, 32 of fp32

// The booleans of a call, packed in one integer: the `flags` argument of the ops
// (csrc/ops.cpp, and the CPU emulator of the tests). The same bits as resfuse/spec.py's
// Flag (tests/test_spec.py checks); unpack_flags below turns them into the parameters' fields.
enum Flag : uint32_t {
  kFlagRms = 1u << 0,
  kFlagZeroCentered = 1u << 1,
  kFlagBranchNorm = 1u << 2,
  kFlagOutputNorm = 1u << 3,
  kFlagStoreH = 1u << 4,
  kFlagResidual = 1u << 5,  // the operands that may be absent (the kernels test the pointers)
  kFlagWeight = 1u << 6,
  kFlagBias = 1u << 7,
  kFlagBranchScale = 1u << 8,
  kFlagRowscale = 1u << 9,
  kFlagBranchWeight = 1u << 10,
  kFlagBranchBias = 1u << 11,
  kFlagStoreDresidual = 1u << 12,
};

// Registers per thread: the forward keeps kFwdChunks chunks of h (16 fp32 values) of its row
// in registers (x, then f, then h, in place), the backward kBwdChunks chunks of h and dy (then
// of df and x with the branch norm) plus the parameter-gradient accumulators. Threads per row
// scale with D up to the maximum block. One block then holds a row in registers up to
//   forward  1024 threads x 2 chunks x 8 = 16384 elements (<= 64 registers at 1024 threads),
//   backward  512 threads x 2 chunks x 8 =  8192 elements (<= 128 registers at 512 threads),
// which ptxas allocates without spills for sm_80 and sm_90 (tests/test_cuda_build.py checks);
// on sm_90 a cluster of up to kMaxClusterBlocks such blocks holds 8x that (RowLayout), and
// longer rows, or any longer row elsewhere, stream tiles of a block in two passes (three with
// the branch norm). One instantiation per dtype set covers every D (no per-hidden-size
// kernels, and clusters are a run-time layout, not another instantiation).
constexpr int kFwdChunks = 2;
constexpr int kFwdMaxThreads = 1024;
constexpr int kFwdMinBlock = 128;
constexpr int kBwdChunks = 2;
constexpr int kBwdMaxThreads = 512;
constexpr int kBwdMinBlock = 256;

// A (rows, D) activation with unit column stride and any row stride. `vec`: the base pointer
// and the row stride allow 128-bit accesses (else the scalar path, e.g. odd D or an offset
// view). `ptr == nullptr` marks an absent operand.
struct Operand {
  void* ptr = nullptr;
  int64_t row_stride = 0;
  DType dtype = DType::kFloat32;
  bool vec = false;
};

// A per-channel vector of D elements (weight, bias, branch scale), any float dtype.
struct ParamVector {
  const void* ptr = nullptr;
  DType dtype = DType::kFloat32;
  bool vec = false;
};

// 128-bit accesses need a 16-byte aligned base and row stride (every chunk then starts on a
// 16-byte boundary); anything else takes the scalar path.
inline Operand make_operand(void* ptr, int64_t row_stride, DType dtype, int64_t rows) {
  Operand op;
  op.ptr = ptr;
  op.row_stride = row_stride;
  op.dtype = dtype;
  op.vec = ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 &&
           (rows <= 1 || (row_stride * dtype_bytes(dtype)) % 16 == 0);
  return op;
}

inline ParamVector make_param(const void* ptr, DType dtype) {
  ParamVector v;
  v.ptr = ptr;
  v.dtype = dtype;
  v.vec = ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  return v;
}

// How rows map onto threads: `threads_per_row` (a power of two) consecutive threads share a
// row, a block holds `rows_per_block` of them. single_tile: the row fits in registers.
// cluster_blocks > 1 (sm_90): a row too long for one block's registers spans the blocks of a
// thread-block cluster (one row per block, each block a slice of the row's chunks; the row
// sums go through distributed shared memory), instead of streaming tiles in several passes.
struct RowLayout {
  int threads_per_row = 1;
  int row_shift = 0;  // log2(threads_per_row)
  int block_threads = 1;
  int rows_per_block = 1;
  int cluster_blocks = 1;  // a power of two
  int cluster_shift = 0;   // log2(cluster_blocks)
  int row_threads = 1;     // threads_per_row * cluster_blocks: the threads sharing a row
  bool single_tile = true;
};

// The largest cluster the launch heuristics use: 8 is the portable maximum (16 needs an
// opt-in per kernel and fits fewer clusters per GPC). With 1024 (forward) / 512 (backward)
// threads per block that keeps rows of up to 131072 / 65536 elements in registers.
constexpr int kMaxClusterBlocks = 8;

// The longest row one block of each direction holds in registers (its largest block x its
// chunks per thread x 8): past it a row spans a cluster, or streams.
constexpr int64_t kFwdBlockRow = int64_t{kFwdMaxThreads} * kFwdChunks * kChunk;
constexpr int64_t kBwdBlockRow = int64_t{kBwdMaxThreads} * kBwdChunks * kChunk;

// What the launch heuristics are built from, in one list for the tests and the docs
// (resfuse.cuda_ext.launch_limits(): the cuda_launch_limits op, and the emulator's copy):
// the order of resfuse/cuda_ext.py's LIMIT_NAMES.
constexpr int64_t kLaunchLimits[] = {kChunk,         kFwdMaxThreads, kFwdBlockRow,
                                     kBwdMaxThreads, kBwdBlockRow,   kMaxClusterBlocks};
constexpr int kLaunchLimitCount = sizeof(kLaunchLimits) / sizeof(kLaunchLimits[0]);

struct FwdParams {
  Operand x, residual, y, h;  // residual: absent for plain norms; h: absent when not stored;
                              // y: absent without the output norm (norm_add)
  ParamVector weight, bias, branch_scale;
  ParamVector branch_weight, branch_bias;  // the branch norm's affine (either may be absent)
  const float* rowscale = nullptr;         // fp32, one per row
  float* mean = nullptr;                   // LayerNorm row means of h (the backward's shift)
  float* mean_x = nullptr;                 // LayerNorm row means of x, with the branch norm
  int64_t rows = 0;
  int D = 0;
  float eps = 0.0f, residual_scale = 1.0f, branch_scale_value = 1.0f;
  bool is_rms = true;  // selects the instantiation; the kernels take it as a template argument
  bool zero_centered = false;
  // The sandwich layouts: the branch value is norm(x) * w_b' (+ b_b) instead of x (same norm
  // kind, eps and weight convention as the output norm; never with a branch-scale tensor or
  // rowscale), and without the output norm there is no y (OLMo2: h = r + norm(x)).
  bool branch_norm = false;
  bool output_norm = true;
  RowLayout layout;
};

struct BwdParams {
  Operand dy, dh, h, x, dx, dr;  // dy, h: absent without the output norm; dh: absent when h got
                                 // no gradient; x: for a tensor branch scale or the branch
                                 // norm; dr: absent when dx or dh serves as dresidual
  ParamVector weight, branch_scale, branch_weight;
  const float* rowscale = nullptr;
  const float* mean = nullptr;    // LayerNorm: the forward's row means of h, a shift for the stats
  const float* mean_x = nullptr;  // LayerNorm with the branch norm: the row means of x, likewise
  // Per-program fp32 partial sums, (programs, D) each; nullptr when that gradient is not needed
  float* dweight_part = nullptr;
  float* dbias_part = nullptr;
  float* dbranch_part = nullptr;  // the branch scale tensor
  float* dbranch_weight_part = nullptr;
  float* dbranch_bias_part = nullptr;
  int64_t rows = 0;
  int D = 0;
  float eps = 0.0f, residual_scale = 1.0f, branch_scale_value = 1.0f;
  bool is_rms = true;
  bool zero_centered = false;
  bool has_bias = false;
  bool has_branch_bias = false;
  bool branch_norm = false;  // selects the instantiation (a template argument of the kernels)
  bool output_norm = true;
  RowLayout layout;
  int programs = 1;  // persistent grid size
};

// The flags' booleans into the parameters (the operands' presence comes from their pointers).
inline void unpack_flags(FwdParams& p, uint32_t flags) {
  p.is_rms = (flags & kFlagRms) != 0;
  p.zero_centered = (flags & kFlagZeroCentered) != 0;
  p.branch_norm = (flags & kFlagBranchNorm) != 0;
  p.output_norm = (flags & kFlagOutputNorm) != 0;
}

inline void unpack_flags(BwdParams& p, uint32_t flags) {
  p.is_rms = (flags & kFlagRms) != 0;
  p.zero_centered = (flags & kFlagZeroCentered) != 0;
  p.branch_norm = (flags & kFlagBranchNorm) != 0;
  p.output_norm = (flags & kFlagOutputNorm) != 0;
  // the bias gradients of a norm that exists
  p.has_bias = p.output_norm && (flags & kFlagBias) != 0;
  p.has_branch_bias = p.branch_norm && (flags & kFlagBranchBias) != 0;
}

// Where the backward's parameter gradients go: (D,) fp32 vectors, nullptr when not wanted.
struct ParamGrads {
  float* weight = nullptr;
  float* bias = nullptr;
  float* branch_scale = nullptr;
  float* branch_weight = nullptr;
  float* branch_bias = nullptr;
};

// Second step of the parameter gradients: out[k][col] = sum over programs of part[k][p][col],
// in a fixed order (bitwise reproducible; no atomics anywhere).
constexpr int kMaxParamGrads = 5;

struct PartialSums {
  const float* part[kMaxParamGrads] = {};
  float* out[kMaxParamGrads] = {};
  int count = 0;  // how many of part/out are used
  int programs = 0;
  int D = 0;
};

constexpr int kReduceCols = 32;
constexpr int kReduceSlices = 16;

}  // namespace resfuse
