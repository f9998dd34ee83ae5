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
// whose arguments are the tensors of resfuse/spec.py's Operands (forward) or BackwardInputs
// (backward) and the spec's flat form, AddNormSpec.flat(): eps, residual_scale,
// branch_scale_value, flags (the booleans, add_norm_params.h's Flag bits), and the dtypes of
// x, the residual, h and y (resfuse/cuda_ext.py calls them and registers their fake
// implementations). Absent outputs are empty tensors. A new boolean of the computation is a
// bit: these signatures do not change.
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

namespace {

using resfuse::DType;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t kMaxD = int64_t{1} << 30;  // column offsets are 32-bit in the kernels

DType to_dtype(ScalarType t, const char* name) {
  switch (t) {
    case ScalarType::Float:
      return DType::kFloat32;
    case ScalarType::Half:
      return DType::kFloat16;
    case ScalarType::BFloat16:
      return DType::kBFloat16;
    default:
      STD_TORCH_CHECK(false, "resfuse CUDA: ", name, " must be float32, float16 or bfloat16, got ",
                      torch::headeronly::toString(t));
  }
  return DType::kFloat32;
}

void check_device(const Tensor& t, const char* name, int32_t device) {
  STD_TORCH_CHECK(t.is_cuda(), "resfuse CUDA: ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == device, "resfuse CUDA: ", name, " must be on cuda:", device,
                  ", got cuda:", t.get_device_index());
}

// A (rows, D) activation with unit column stride (any row stride).
resfuse::Operand activation(const Tensor& t, const char* name, int64_t rows, int64_t D, int32_t device) {
  check_device(t, name, device);
  STD_TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == D, "resfuse CUDA: ", name,
                  " must have shape (", rows, ", ", D, ")");
  STD_TORCH_CHECK(t.stride(1) == 1 || D == 1, "resfuse CUDA: ", name,
                  " must have a unit stride along its last dimension");
  STD_TORCH_CHECK(t.stride(0) >= 0, "resfuse CUDA: ", name, " has a negative row stride");
  return resfuse::make_operand(t.data_ptr(), t.stride(0), to_dtype(t.scalar_type(), name), rows);
}

resfuse::Operand optional_activation(const std::optional<Tensor>& t, const char* name, int64_t rows,
                                     int64_t D, int32_t device) {
  return t.has_value() ? activation(*t, name, rows, D, device) : resfuse::Operand{};
}

resfuse::ParamVector param(const std::optional<Tensor>& t, const char* name, int64_t D, int32_t device) {
  if (!t.has_value()) return resfuse::ParamVector{};
  check_device(*t, name, device);
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == D, "resfuse CUDA: ", name, " must have shape (", D, ")");
  STD_TORCH_CHECK(t->stride(0) == 1 || D == 1, "resfuse CUDA: ", name, " must be contiguous");
  return resfuse::make_param(t->data_ptr(), to_dtype(t->scalar_type(), name));
}

// An fp32 vector of one value per row (rowscale, the LayerNorm mean).
const float* row_vector(const std::optional<Tensor>& t, const char* name, int64_t rows, int32_t device) {
  if (!t.has_value()) return nullptr;
  check_device(*t, name, device);
  STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float, "resfuse CUDA: ", name, " must be float32");
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, "resfuse CUDA: ", name, " must have shape (", rows,
                  ")");
  STD_TORCH_CHECK(t->stride(0) == 1 || rows <= 1, "resfuse CUDA: ", name, " must be contiguous");
  return static_cast<const float*>(t->data_ptr());
}

Tensor empty(std::vector<int64_t> shape, ScalarType dtype, const Tensor& like) {
  return torch::stable::empty(shape, dtype, std::nullopt, like.device());
}

void* current_stream(int32_t device) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "resfuse CUDA: cannot get the current CUDA stream");
  return stream;
}

void check_dims(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.dim() == 2, "resfuse CUDA: ", name, " must be 2-D (rows, D), got ", t.dim(),
                  " dimensions");
  STD_TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= kMaxD,
                  "resfuse CUDA: the normalized size must be in [1, 2^30]");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_fwd(
    Tensor x, std::optional<Tensor> residual, std::optional<Tensor> weight, std::optional<Tensor> bias,
    std::optional<Tensor> branch_scale, std::optional<Tensor> rowscale, std::optional<Tensor> branch_weight,
    std::optional<Tensor> branch_bias, double eps, double residual_scale, double branch_scale_value,
    int64_t flags, ScalarType x_dtype, ScalarType residual_dtype, ScalarType h_dtype, ScalarType out_dtype) {
  check_dims(x, "x");
  STD_TORCH_CHECK(x.is_cuda(), "resfuse CUDA: x must be a CUDA tensor");
  const int32_t device = x.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const int64_t rows = x.size(0), D = x.size(1);
  const bool is_rms = (flags & resfuse::kFlagRms) != 0;
  const bool branch_norm = (flags & resfuse::kFlagBranchNorm) != 0;
  const bool output_norm = (flags & resfuse::kFlagOutputNorm) != 0;
  const bool store_h = (flags & resfuse::kFlagStoreH) != 0;
  STD_TORCH_CHECK(!branch_norm || (!branch_scale.has_value() && !rowscale.has_value()),
                  "resfuse CUDA: the branch norm does not combine with branch_scale tensors or rowscale");
  STD_TORCH_CHECK(branch_norm || (!branch_weight.has_value() && !branch_bias.has_value()),
                  "resfuse CUDA: branch_weight / branch_bias need branch_norm");
  STD_TORCH_CHECK(output_norm || store_h, "resfuse CUDA: without the output norm h is the output: store_h");

  resfuse::FwdParams p;
  p.x = activation(x, "x", rows, D, device);
  p.residual = optional_activation(residual, "residual", rows, D, device);
  p.weight = param(weight, "weight", D, device);
  p.bias = param(bias, "bias", D, device);
  p.branch_scale = param(branch_scale, "branch_scale", D, device);
  p.rowscale = row_vector(rowscale, "rowscale", rows, device);
  p.branch_weight = param(branch_weight, "branch_weight", D, device);
  p.branch_bias = param(branch_bias, "branch_bias", D, device);
  to_dtype(x_dtype, "x_dtype");
  to_dtype(residual_dtype, "residual_dtype");
  to_dtype(h_dtype, "h_dtype");
  to_dtype(out_dtype, "out_dtype");

  const auto rows_or_empty = [&](bool wanted) { return empty({wanted ? rows : 0}, ScalarType::Float, x); };
  Tensor y = output_norm ? empty({rows, D}, out_dtype, x) : empty({0}, out_dtype, x);
  Tensor h = store_h ? empty({rows, D}, h_dtype, x) : empty({0}, h_dtype, x);
  Tensor mean = rows_or_empty(!is_rms && output_norm);
  Tensor mean_x = rows_or_empty(!is_rms && branch_norm);
  if (output_norm) p.y = activation(y, "y", rows, D, device);
  if (store_h) p.h = activation(h, "h", rows, D, device);
  if (!is_rms && output_norm) p.mean = static_cast<float*>(mean.data_ptr());
  if (!is_rms && branch_norm) p.mean_x = static_cast<float*>(mean_x.data_ptr());
  p.rows = rows;
  p.D = static_cast<int>(D);
  p.eps = static_cast<float>(eps);
  p.residual_scale = static_cast<float>(residual_scale);
  p.branch_scale_value = static_cast<float>(branch_scale_value);
  resfuse::unpack_flags(p, static_cast<uint32_t>(flags));
  resfuse::launch_forward(p, current_stream(device));
  return {y, h, mean, mean_x};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_bwd(
    std::optional<Tensor> dy, std::optional<Tensor> dh, std::optional<Tensor> h, std::optional<Tensor> x,
    std::optional<Tensor> weight, std::optional<Tensor> branch_scale, std::optional<Tensor> rowscale,
    std::optional<Tensor> branch_weight, std::optional<Tensor> mean, std::optional<Tensor> mean_x, double eps,
    double residual_scale, double branch_scale_value, int64_t flags, ScalarType x_dtype,
    ScalarType residual_dtype, ScalarType h_dtype, ScalarType out_dtype) {
  const bool is_rms = (flags & resfuse::kFlagRms) != 0;
  const bool branch_norm = (flags & resfuse::kFlagBranchNorm) != 0;
  const bool output_norm = (flags & resfuse::kFlagOutputNorm) != 0;
  const bool store_dresidual = (flags & resfuse::kFlagStoreDresidual) != 0;
  const bool has_bias = (flags & resfuse::kFlagBias) != 0;
  const bool has_branch_bias = (flags & resfuse::kFlagBranchBias) != 0;
  // With the output norm it is differentiated at h, for dy; without it (norm_add) the
  // gradient reaching h is dh alone.
  STD_TORCH_CHECK(output_norm ? (dy.has_value() && h.has_value()) : dh.has_value(),
                  "resfuse CUDA: the backward needs dy and h with the output norm, dh without it");
  const Tensor& like = output_norm ? *h : *dh;
  check_dims(like, output_norm ? "h" : "dh");
  STD_TORCH_CHECK(like.is_cuda(), "resfuse CUDA: ", output_norm ? "h" : "dh", " must be a CUDA tensor");
  const int32_t device = like.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const int64_t rows = like.size(0), D = like.size(1);

  resfuse::BwdParams p;
  if (output_norm) {
    p.dy = activation(*dy, "dy", rows, D, device);
    p.h = activation(*h, "h", rows, D, device);
  }
  p.dh = optional_activation(dh, "dh", rows, D, device);
  p.x = optional_activation(x, "x", rows, D, device);
  p.weight = output_norm ? param(weight, "weight", D, device) : resfuse::ParamVector{};
  p.branch_scale = param(branch_scale, "branch_scale", D, device);
  p.branch_weight = param(branch_weight, "branch_weight", D, device);
  STD_TORCH_CHECK(!(branch_scale.has_value() || branch_norm) || x.has_value(),
                  "resfuse CUDA: the branch_scale gradient and the branch norm need x");
  STD_TORCH_CHECK(!branch_norm || (!branch_scale.has_value() && !rowscale.has_value()),
                  "resfuse CUDA: the branch norm does not combine with branch_scale tensors or rowscale");
  STD_TORCH_CHECK(branch_norm || (!branch_weight.has_value() && !has_branch_bias),
                  "resfuse CUDA: branch_weight / branch_bias need branch_norm");
  p.rowscale = row_vector(rowscale, "rowscale", rows, device);
  if (output_norm) p.mean = row_vector(mean, "mean", rows, device);
  if (branch_norm) p.mean_x = row_vector(mean_x, "mean_x", rows, device);
  STD_TORCH_CHECK(is_rms || !output_norm || p.mean != nullptr,
                  "resfuse CUDA: the LayerNorm backward needs the row means of h");
  STD_TORCH_CHECK(is_rms || !branch_norm || p.mean_x != nullptr,
                  "resfuse CUDA: the LayerNorm backward needs the row means of x");
  to_dtype(x_dtype, "x_dtype");
  to_dtype(residual_dtype, "residual_dtype");
  to_dtype(h_dtype, "h_dtype");
  to_dtype(out_dtype, "out_dtype");

  const bool want[resfuse::kMaxParamGrads] = {output_norm && weight.has_value(), output_norm && has_bias,
                                              branch_scale.has_value(), branch_weight.has_value(),
                                              branch_norm && has_branch_bias};
  Tensor dx = empty({rows, D}, x_dtype, like);
  Tensor dr = store_dresidual ? empty({rows, D}, residual_dtype, like) : empty({0}, residual_dtype, like);
  std::vector<Tensor> grads;
  for (bool wanted : want) grads.push_back(empty({wanted ? D : 0}, ScalarType::Float, like));
  p.dx = activation(dx, "dx", rows, D, device);
  if (store_dresidual) p.dr = activation(dr, "dresidual", rows, D, device);
  p.rows = rows;
  p.D = static_cast<int>(D);
  p.eps = static_cast<float>(eps);
  p.residual_scale = static_cast<float>(residual_scale);
  p.branch_scale_value = static_cast<float>(branch_scale_value);
  resfuse::unpack_flags(p, static_cast<uint32_t>(flags));
  resfuse::plan_backward(p);

  // One workspace for the per-program partial sums of every gradient wanted.
  int64_t wanted = 0;
  for (bool w : want) wanted += w;
  const int64_t part_size = static_cast<int64_t>(p.programs) * D;
  Tensor workspace = empty({wanted * part_size}, ScalarType::Float, like);
  float* next = static_cast<float*>(workspace.data_ptr());
  float** parts[resfuse::kMaxParamGrads] = {&p.dweight_part, &p.dbias_part, &p.dbranch_part,
                                            &p.dbranch_weight_part, &p.dbranch_bias_part};
  resfuse::ParamGrads out;
  float** outs[resfuse::kMaxParamGrads] = {&out.weight, &out.bias, &out.branch_scale, &out.branch_weight,
                                           &out.branch_bias};
  for (int i = 0; i < resfuse::kMaxParamGrads; ++i) {
    if (!want[i]) continue;
    *parts[i] = next, next += part_size;
    *outs[i] = static_cast<float*>(grads[i].data_ptr());
  }
  resfuse::launch_backward(p, out, current_stream(device));
  return {dx, dr, grads[0], grads[1], grads[2], grads[3], grads[4]};
}

std::vector<int64_t> launch_limits() {
  return std::vector<int64_t>(resfuse::kLaunchLimits, resfuse::kLaunchLimits + resfuse::kLaunchLimitCount);
}

bool device_supported(int64_t device) {
  torch::stable::accelerator::DeviceGuard guard(static_cast<int32_t>(device));
  return resfuse::current_device_supported();
}

std::vector<int64_t> row_layout(int64_t device, int64_t D, bool backward, bool branch_norm) {
  STD_TORCH_CHECK(D >= 1 && D <= kMaxD, "resfuse CUDA: D must be in [1, 2^30], got ", D);
  torch::stable::accelerator::DeviceGuard guard(static_cast<int32_t>(device));
  const resfuse::RowLayout L =
      backward ? resfuse::backward_layout(D, branch_norm) : resfuse::forward_layout(D);
  return {L.threads_per_row, L.rows_per_block, L.cluster_blocks, L.single_tile ? 1 : 0};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(resfuse, m) {
  // the spec's flat form after the tensors (resfuse/spec.py, AddNormSpec.flat)
#define RESFUSE_SPEC_ARGS                                                                      \
  "float eps, float residual_scale, float branch_scale_value, int flags, ScalarType x_dtype, " \
  "ScalarType residual_dtype, ScalarType h_dtype, ScalarType out_dtype"
  m.def(
      "cuda_add_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor? branch_scale, Tensor? rowscale, Tensor? branch_weight, Tensor? branch_bias, " RESFUSE_SPEC_ARGS
      ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_add_norm_bwd(Tensor? dy, Tensor? dh, Tensor? h, Tensor? x, Tensor? weight, "
      "Tensor? branch_scale, Tensor? rowscale, Tensor? branch_weight, Tensor? mean, "
      "Tensor? mean_x, " RESFUSE_SPEC_ARGS ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
#undef RESFUSE_SPEC_ARGS
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
