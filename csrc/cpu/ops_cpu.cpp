// The CPU backend's torch.library ops, in the `resfuse` namespace, for CPU tensors:
//
//   resfuse::cpu_add_norm_fwd(...) -> (y, h, mean, mean_x)
//   resfuse::cpu_add_norm_bwd(...) -> (dx, dresidual, dweight, dbias, dbranch_scale,
//                                      dbranch_weight, dbranch_bias)
//   resfuse::cpu_isa() -> str: the instruction set of the row loops in use
//   resfuse::cpu_isa_supported(str name) -> bool: whether this CPU runs `name`
//   resfuse::cpu_use_isa(str name) -> str: switch to `name`, returns the previous one
//   resfuse::cpu_row_blocks(int rows, int D) -> int: the backward's fixed row blocks
//   resfuse::cpu_limit(str name) -> int: the row loops' layout constants, for the tests
//
// with the CUDA ops' signatures and argument checks (op_args.h). Built into resfuse._C_cpu by
// setup.py whenever a C++ compiler is there, with or without nvcc; written against PyTorch's
// stable ABI like the CUDA extension (one build for every torch >= 2.10).
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include <torch/csrc/stable/library.h>

#include "../op_args.h"
#include "add_norm_cpu.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace args = resfuse::op_args;

const args::Device kCpu = {"resfuse CPU", false, -1};

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_fwd(
    Tensor x, std::optional<Tensor> residual, std::optional<Tensor> weight, std::optional<Tensor> bias,
    std::optional<Tensor> branch_scale, std::optional<Tensor> rowscale, std::optional<Tensor> branch_weight,
    std::optional<Tensor> branch_bias, double eps, double residual_scale, double branch_scale_value,
    int64_t flags, ScalarType x_dtype, ScalarType residual_dtype, ScalarType h_dtype, ScalarType out_dtype) {
  args::Forward f = args::forward(x, residual, weight, bias, branch_scale, rowscale, branch_weight,
                                  branch_bias, eps, residual_scale, branch_scale_value, flags, x_dtype,
                                  residual_dtype, h_dtype, out_dtype, kCpu);
  resfuse::cpu::forward(f.p);
  return {f.y, f.h, f.mean, f.mean_x};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_bwd(
    std::optional<Tensor> dy, std::optional<Tensor> dh, std::optional<Tensor> h, std::optional<Tensor> x,
    std::optional<Tensor> weight, std::optional<Tensor> branch_scale, std::optional<Tensor> rowscale,
    std::optional<Tensor> branch_weight, std::optional<Tensor> mean, std::optional<Tensor> mean_x, double eps,
    double residual_scale, double branch_scale_value, int64_t flags, ScalarType x_dtype,
    ScalarType residual_dtype, ScalarType h_dtype, ScalarType out_dtype) {
  // the forward's LayerNorm means are the statistics' shift when given (add_norm_cpu_rows.h), else found
  args::Backward b = args::backward(dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x,
                                    eps, residual_scale, branch_scale_value, flags, x_dtype, residual_dtype,
                                    h_dtype, out_dtype, kCpu, /*needs_means=*/false);
  resfuse::cpu::backward(b.p, b.out);
  return {b.dx, b.dr, b.grads[0], b.grads[1], b.grads[2], b.grads[3], b.grads[4]};
}

std::string isa() { return resfuse::cpu::isa(); }

bool isa_supported(std::string name) { return resfuse::cpu::isa_supported(name); }

std::string use_isa(std::string name) { return resfuse::cpu::use_isa(name); }

int64_t row_blocks(int64_t rows, int64_t D) { return resfuse::cpu::row_blocks(rows, D); }

// the constants where the row loops change what they do: a test at each size +- 1 covers them
int64_t limit(std::string name) {
  if (name == "vector_elems") return resfuse::cpu::vector_elems();
  if (name == "sum_elems") return resfuse::cpu::kSumVectors * resfuse::cpu::vector_elems();
  if (name == "max_row_blocks") return resfuse::cpu::kMaxRowBlocks;
  if (name == "partial_budget") return resfuse::cpu::kPartialBudget;
  STD_TORCH_CHECK(false, "cpu_limit: unknown name '", name,
                  "' (vector_elems, sum_elems, max_row_blocks, partial_budget)");
  return 0;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(resfuse, m) {
  m.def(RESFUSE_FWD_SCHEMA("cpu_add_norm_fwd"));
  m.def(RESFUSE_BWD_SCHEMA("cpu_add_norm_bwd"));
  m.def("cpu_isa() -> str");
  m.def("cpu_isa_supported(str name) -> bool");
  m.def("cpu_use_isa(str name) -> str");
  m.def("cpu_row_blocks(int rows, int D) -> int");
  m.def("cpu_limit(str name) -> int");
}

STABLE_TORCH_LIBRARY_IMPL(resfuse, CPU, m) {
  m.impl("cpu_add_norm_fwd", TORCH_BOX(&add_norm_fwd));
  m.impl("cpu_add_norm_bwd", TORCH_BOX(&add_norm_bwd));
}

STABLE_TORCH_LIBRARY_IMPL(resfuse, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_BOX(&isa));
  m.impl("cpu_isa_supported", TORCH_BOX(&isa_supported));
  m.impl("cpu_use_isa", TORCH_BOX(&use_isa));
  m.impl("cpu_row_blocks", TORCH_BOX(&row_blocks));
  m.impl("cpu_limit", TORCH_BOX(&limit));
}
