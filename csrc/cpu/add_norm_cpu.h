// The CPU backend of the fused residual add + RMSNorm/LayerNorm: the same FwdParams /
// BwdParams as the CUDA kernels (add_norm_params.h, built by the shared argument checks of
// op_args.h), run by row loops compiled for several instruction sets (add_norm_cpu_rows.h)
// on PyTorch's intra-op thread pool (torch::stable::parallel_for: the threads and the
// torch.set_num_threads() of the process, no second OpenMP runtime).
#pragma once

#include <cstdint>
#include <string>

#include "../add_norm_params.h"

namespace resfuse {
namespace cpu {

// The per-channel parameters of a call in fp32, prepared once per call: the weights already
// in their w' form (1 + w when zero-centred, ones when absent), the biases zeros when absent.
struct Affine {
  const float* weight = nullptr;
  const float* bias = nullptr;
  const float* branch_weight = nullptr;
  const float* branch_bias = nullptr;
  const float* branch_scale = nullptr;
  bool has_branch_scale = false;
};

// One row block's partial sums of the parameter gradients, (D,) each; nullptr when that
// gradient is not wanted.
struct PartialRows {
  float* weight = nullptr;
  float* bias = nullptr;
  float* branch_scale = nullptr;
  float* branch_weight = nullptr;
  float* branch_bias = nullptr;
};

// The row loops of one instruction set.
struct Kernels {
  const char* isa;
  int vector_elems;  // fp32 lanes of its vectors: rows are processed this many elements at a time
  void (*forward_rows)(const FwdParams&, const Affine&, int64_t begin, int64_t end, float* scratch);
  void (*backward_rows)(const BwdParams&, const Affine&, int64_t begin, int64_t end, float* scratch,
                        const PartialRows&);
};

// Row sums keep this many vectors' worth of independent partial sums (add_norm_cpu_rows.h).
constexpr int kSumVectors = 4;

// fp32 scratch rows (of D floats) each direction needs per thread: a copy of h; copies of
// 16-bit h, dy and x and the branch norm's upstream gradient (add_norm_cpu_rows.h).
constexpr int kForwardScratchRows = 1;
constexpr int kBackwardScratchRows = 4;

// The backward sums the parameter gradients of fixed row blocks, then the blocks in order:
// the block boundaries depend on the shape only, so the gradients are bitwise the same for
// any number of threads (and runs). At most kMaxRowBlocks blocks, fewer when their partial
// sums would take more than kPartialBudget floats per gradient.
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kPartialBudget = int64_t{1} << 22;
int64_t row_blocks(int64_t rows, int64_t D);

// n values of `dtype` as fp32 (the baseline build of the conversions)
void load_floats(const void* src, DType dtype, float* dst, int n);

// The instruction set of the row loops in use ("avx512", "avx2", "generic"): the best this
// CPU runs, unless use_isa() chose a lower one (tests cover every set on one machine).
const char* isa();
// the fp32 lanes of its vectors
int vector_elems();
bool isa_supported(const std::string& name);
// switch to `name` (an error when this CPU does not run it); returns the previous one
const char* use_isa(const std::string& name);

// y, h (and the LayerNorm row means) of a forward.
void forward(const FwdParams& p);

// dx, dresidual into p's operands; the parameter gradients, (D,) fp32, into `grads` (the
// row blocks' partial sums in a buffer of its own; p.*_part are not used).
void backward(const BwdParams& p, const ParamGrads& grads);

}  // namespace cpu
}  // namespace resfuse
