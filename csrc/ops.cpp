// The CUDA backend's torch.library ops, in the `resfuse` namespace with CUDA kernels:
//
//   resfuse::cuda_add_norm_fwd(...) -> (y, h, mean, mean_x)
//   resfuse::cuda_add_norm_bwd(...) -> (dx, dresidual, dweight, dbias, dbranch_scale,
//                                       dbranch_weight, dbranch_bias)
//   resfuse::cuda_device_supported(int device) -> bool
//   resfuse::cuda_row_layout(int device, int D, bool backward, bool branch_norm) -> int[]
//       [threads_per_row, rows_per_block, cluster_blocks, single_tile]: the launch layout
//   resfuse::cuda_launch_limits() -> int[]: the numbers the layouts are built from
//       (add_norm_params.h's kLaunchLimits; no device needed)
//
// whose arguments are those of op_args.h (shared with the CPU ops, cpu/ops_cpu.cpp): the
// tensors of resfuse/spec.py's Operands (forward) or BackwardInputs (backward) and the spec's
// flat form (resfuse/cuda_ext.py calls them and registers their fake implementations). A new
// boolean of the computation is a bit: these signatures do not change.
//
// Written against PyTorch's stable ABI (torch/csrc/stable, TORCH_TARGET_VERSION = 2.10): the
// library talks to libtorch through its C shim only, so one build loads into every torch
// >= 2.10 (with the CUDA major version it was compiled with) instead of the exact release
// it was built against. It needs no more than that ABI offers: tensor metadata and data
// pointers, empty(), a device guard and the current CUDA stream.
//
// The namespace is shared with the core's Python custom ops (resfuse::add_norm, ...), so
// these are registered as a library fragment.
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "add_norm_api.h"
#include "op_args.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace args = resfuse::op_args;

args::Device cuda_device(const Tensor& t) {
  STD_TORCH_CHECK(t.is_cuda(), "resfuse CUDA: the tensors must be CUDA tensors");
  return {"resfuse CUDA", true, t.get_device_index()};
}

void* current_stream(int32_t device) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "resfuse CUDA: cannot get the current CUDA stream");
  return stream;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_fwd(
    Tensor x, std::optional<Tensor> residual, std::optional<Tensor> weight, std::optional<Tensor> bias,
    std::optional<Tensor> branch_scale, std::optional<Tensor> rowscale, std::optional<Tensor> branch_weight,
    std::optional<Tensor> branch_bias, double eps, double residual_scale, double branch_scale_value,
    int64_t flags, ScalarType x_dtype, ScalarType residual_dtype, ScalarType h_dtype, ScalarType out_dtype) {
  const args::Device d = cuda_device(x);
  torch::stable::accelerator::DeviceGuard guard(d.index);
  args::Forward f = args::forward(x, residual, weight, bias, branch_scale, rowscale, branch_weight,
                                  branch_bias, eps, residual_scale, branch_scale_value, flags, x_dtype,
                                  residual_dtype, h_dtype, out_dtype, d);
  resfuse::launch_forward(f.p, current_stream(d.index));
  return {f.y, f.h, f.mean, f.mean_x};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_bwd(
    std::optional<Tensor> dy, std::optional<Tensor> dh, std::optional<Tensor> h, std::optional<Tensor> x,
    std::optional<Tensor> weight, std::optional<Tensor> branch_scale, std::optional<Tensor> rowscale,
    std::optional<Tensor> branch_weight, std::optional<Tensor> mean, std::optional<Tensor> mean_x, double eps,
    double residual_scale, double branch_scale_value, int64_t flags, ScalarType x_dtype,
    ScalarType residual_dtype, ScalarType h_dtype, ScalarType out_dtype) {
  const bool output_norm = (flags & resfuse::kFlagOutputNorm) != 0;
  const std::optional<Tensor>& like = output_norm ? h : dh;
  STD_TORCH_CHECK(like.has_value(),
                  "resfuse CUDA: the backward needs dy and h with the output norm, dh without it");
  const args::Device d = cuda_device(*like);
  torch::stable::accelerator::DeviceGuard guard(d.index);
  args::Backward b = args::backward(dy, dh, h, x, weight, branch_scale, rowscale, branch_weight, mean, mean_x,
                                    eps, residual_scale, branch_scale_value, flags, x_dtype, residual_dtype,
                                    h_dtype, out_dtype, d, /*needs_means=*/true);
  resfuse::BwdParams& p = b.p;
  resfuse::plan_backward(p);

  // One workspace for the per-program partial sums of every gradient wanted.
  int64_t wanted = 0;
  for (bool w : b.want) wanted += w;
  const int64_t part_size = static_cast<int64_t>(p.programs) * p.D;
  Tensor workspace = args::empty({wanted * part_size}, ScalarType::Float, *like);
  float* next = static_cast<float*>(workspace.data_ptr());
  float** parts[resfuse::kMaxParamGrads] = {&p.dweight_part, &p.dbias_part, &p.dbranch_part,
                                            &p.dbranch_weight_part, &p.dbranch_bias_part};
  for (int i = 0; i < resfuse::kMaxParamGrads; ++i) {
    if (b.want[i]) *parts[i] = next, next += part_size;
  }
  resfuse::launch_backward(p, b.out, current_stream(d.index));
  return {b.dx, b.dr, b.grads[0], b.grads[1], b.grads[2], b.grads[3], b.grads[4]};
}

std::vector<int64_t> launch_limits() {
  return std::vector<int64_t>(resfuse::kLaunchLimits, resfuse::kLaunchLimits + resfuse::kLaunchLimitCount);
}

bool device_supported(int64_t device) {
  torch::stable::accelerator::DeviceGuard guard(static_cast<int32_t>(device));
  return resfuse::current_device_supported();
}

std::vector<int64_t> row_layout(int64_t device, int64_t D, bool backward, bool branch_norm) {
  STD_TORCH_CHECK(D >= 1 && D <= args::kMaxD, "resfuse CUDA: D must be in [1, 2^30], got ", D);
  torch::stable::accelerator::DeviceGuard guard(static_cast<int32_t>(device));
  const resfuse::RowLayout L =
      backward ? resfuse::backward_layout(D, branch_norm) : resfuse::forward_layout(D);
  return {L.threads_per_row, L.rows_per_block, L.cluster_blocks, L.single_tile ? 1 : 0};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(resfuse, m) {
  m.def(RESFUSE_FWD_SCHEMA("cuda_add_norm_fwd"));
  m.def(RESFUSE_BWD_SCHEMA("cuda_add_norm_bwd"));
  m.def("cuda_device_supported(int device) -> bool");
  m.def("cuda_row_layout(int device, int D, bool backward, bool branch_norm) -> int[]");
  m.def("cuda_launch_limits() -> int[]");
}

STABLE_TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("cuda_add_norm_fwd", TORCH_BOX(&add_norm_fwd));
  m.impl("cuda_add_norm_bwd", TORCH_BOX(&add_norm_bwd));
}

STABLE_TORCH_LIBRARY_IMPL(resfuse, CompositeExplicitAutograd, m) {
  m.impl("cuda_device_supported", TORCH_BOX(&device_supported));
  m.impl("cuda_row_layout", TORCH_BOX(&row_layout));
  m.impl("cuda_launch_limits", TORCH_BOX(&launch_limits));
}
