// The CUDA backend's torch.library ops, in the `resfuse` namespace with CUDA kernels:
//
//   resfuse::cuda_add_norm_fwd(...) -> (y, h, mean)
//   resfuse::cuda_add_norm_bwd(...) -> (dx, dresidual, dweight, dbias, dbranch_scale)
//   resfuse::cuda_device_supported(int device) -> bool
//
// with the arguments of triton_kernels/launch.py's forward/backward (resfuse/cuda_ext.py
// calls them and registers their fake implementations). Absent outputs are empty tensors.
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
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default:
      STD_TORCH_CHECK(false, "resfuse CUDA: ", name, " must be float32, float16 or bfloat16, got ",
                      torch::headeronly::toString(t));
  }
  return DType::kFloat32;
}

void check_device(const Tensor& t, const char* name, int32_t device) {
  STD_TORCH_CHECK(t.is_cuda(), "resfuse CUDA: ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == device, "resfuse CUDA: ", name, " must be on cuda:",
                  device, ", got cuda:", t.get_device_index());
}

// A (rows, D) activation with unit column stride (any row stride).
resfuse::Operand activation(const Tensor& t, const char* name, int64_t rows, int64_t D,
                            int32_t device) {
  check_device(t, name, device);
  STD_TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == D, "resfuse CUDA: ", name,
                  " must have shape (", rows, ", ", D, ")");
  STD_TORCH_CHECK(t.stride(1) == 1 || D == 1, "resfuse CUDA: ", name,
                  " must have a unit stride along its last dimension");
  STD_TORCH_CHECK(t.stride(0) >= 0, "resfuse CUDA: ", name, " has a negative row stride");
  return resfuse::make_operand(t.data_ptr(), t.stride(0), to_dtype(t.scalar_type(), name), rows);
}

resfuse::Operand optional_activation(const std::optional<Tensor>& t, const char* name,
                                     int64_t rows, int64_t D, int32_t device) {
  return t.has_value() ? activation(*t, name, rows, D, device) : resfuse::Operand{};
}

resfuse::ParamVector param(const std::optional<Tensor>& t, const char* name, int64_t D,
                           int32_t device) {
  if (!t.has_value()) return resfuse::ParamVector{};
  check_device(*t, name, device);
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == D, "resfuse CUDA: ", name, " must have shape (",
                  D, ")");
  STD_TORCH_CHECK(t->stride(0) == 1 || D == 1, "resfuse CUDA: ", name, " must be contiguous");
  return resfuse::make_param(t->data_ptr(), to_dtype(t->scalar_type(), name));
}

// An fp32 vector of one value per row (rowscale, the LayerNorm mean).
const float* row_vector(const std::optional<Tensor>& t, const char* name, int64_t rows,
                        int32_t device) {
  if (!t.has_value()) return nullptr;
  check_device(*t, name, device);
  STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float, "resfuse CUDA: ", name, " must be float32");
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, "resfuse CUDA: ", name, " must have shape (",
                  rows, ")");
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
  STD_TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= kMaxD, "resfuse CUDA: the normalized size must be in [1, 2^30]");
}

std::tuple<Tensor, Tensor, Tensor> add_norm_fwd(
    Tensor x, std::optional<Tensor> residual, std::optional<Tensor> weight,
    std::optional<Tensor> bias, std::optional<Tensor> branch_scale, std::optional<Tensor> rowscale,
    double eps, double residual_scale, double branch_scale_value, bool is_rms,
    bool zero_centered_weight, bool store_h, ScalarType residual_dtype, ScalarType out_dtype) {
  check_dims(x, "x");
  STD_TORCH_CHECK(x.is_cuda(), "resfuse CUDA: x must be a CUDA tensor");
  const int32_t device = x.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const int64_t rows = x.size(0), D = x.size(1);

  resfuse::FwdParams p;
  p.x = activation(x, "x", rows, D, device);
  p.residual = optional_activation(residual, "residual", rows, D, device);
  p.weight = param(weight, "weight", D, device);
  p.bias = param(bias, "bias", D, device);
  p.branch_scale = param(branch_scale, "branch_scale", D, device);
  p.rowscale = row_vector(rowscale, "rowscale", rows, device);
  to_dtype(residual_dtype, "residual_dtype");
  to_dtype(out_dtype, "out_dtype");

  Tensor y = empty({rows, D}, out_dtype, x);
  Tensor h = store_h ? empty({rows, D}, residual_dtype, x) : empty({0}, residual_dtype, x);
  Tensor mean = is_rms ? empty({0}, ScalarType::Float, x) : empty({rows}, ScalarType::Float, x);
  p.y = activation(y, "y", rows, D, device);
  if (store_h) p.h = activation(h, "h", rows, D, device);
  p.mean = is_rms ? nullptr : static_cast<float*>(mean.data_ptr());
  p.rows = rows;
  p.D = static_cast<int>(D);
  p.eps = static_cast<float>(eps);
  p.residual_scale = static_cast<float>(residual_scale);
  p.branch_scale_value = static_cast<float>(branch_scale_value);
  p.is_rms = is_rms;
  p.zero_centered = zero_centered_weight;
  resfuse::launch_forward(p, current_stream(device));
  return {y, h, mean};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> add_norm_bwd(
    Tensor dy, std::optional<Tensor> dh, Tensor h, std::optional<Tensor> x,
    std::optional<Tensor> weight, std::optional<Tensor> branch_scale,
    std::optional<Tensor> rowscale, std::optional<Tensor> mean, double eps, double residual_scale,
    double branch_scale_value, bool is_rms, bool zero_centered_weight, bool has_bias,
    bool store_dresidual, ScalarType x_dtype, ScalarType residual_dtype) {
  check_dims(h, "h");
  STD_TORCH_CHECK(h.is_cuda(), "resfuse CUDA: h must be a CUDA tensor");
  const int32_t device = h.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const int64_t rows = h.size(0), D = h.size(1);

  resfuse::BwdParams p;
  p.dy = activation(dy, "dy", rows, D, device);
  p.dh = optional_activation(dh, "dh", rows, D, device);
  p.h = activation(h, "h", rows, D, device);
  p.x = optional_activation(x, "x", rows, D, device);
  p.weight = param(weight, "weight", D, device);
  p.branch_scale = param(branch_scale, "branch_scale", D, device);
  STD_TORCH_CHECK(!branch_scale.has_value() || x.has_value(),
                  "resfuse CUDA: the branch_scale gradient needs x");
  p.rowscale = row_vector(rowscale, "rowscale", rows, device);
  p.mean = row_vector(mean, "mean", rows, device);
  STD_TORCH_CHECK(is_rms || p.mean != nullptr, "resfuse CUDA: the LayerNorm backward needs the row means");
  to_dtype(x_dtype, "x_dtype");
  to_dtype(residual_dtype, "residual_dtype");

  Tensor dx = empty({rows, D}, x_dtype, h);
  Tensor dr = store_dresidual ? empty({rows, D}, residual_dtype, h) : empty({0}, residual_dtype, h);
  const auto vector_or_empty = [&](bool wanted) {
    return empty({wanted ? D : 0}, ScalarType::Float, h);
  };
  Tensor dw = vector_or_empty(weight.has_value());
  Tensor db = vector_or_empty(has_bias);
  Tensor dbs = vector_or_empty(branch_scale.has_value());
  p.dx = activation(dx, "dx", rows, D, device);
  if (store_dresidual) p.dr = activation(dr, "dresidual", rows, D, device);
  p.rows = rows;
  p.D = static_cast<int>(D);
  p.eps = static_cast<float>(eps);
  p.residual_scale = static_cast<float>(residual_scale);
  p.branch_scale_value = static_cast<float>(branch_scale_value);
  p.is_rms = is_rms;
  p.zero_centered = zero_centered_weight;
  p.has_bias = has_bias;
  resfuse::plan_backward(p);

  // One workspace for the per-program partial sums of every gradient wanted.
  const int64_t wanted = int64_t{weight.has_value()} + int64_t{has_bias} + int64_t{branch_scale.has_value()};
  const int64_t part_size = static_cast<int64_t>(p.programs) * D;
  Tensor workspace = empty({wanted * part_size}, ScalarType::Float, h);
  float* next = static_cast<float*>(workspace.data_ptr());
  if (weight.has_value()) p.dweight_part = next, next += part_size;
  if (has_bias) p.dbias_part = next, next += part_size;
  if (branch_scale.has_value()) p.dbranch_part = next;

  const auto data_or_null = [](Tensor& t) { return t.numel() > 0 ? static_cast<float*>(t.data_ptr()) : nullptr; };
  resfuse::launch_backward(p, weight.has_value() ? data_or_null(dw) : nullptr,
                           has_bias ? data_or_null(db) : nullptr,
                           branch_scale.has_value() ? data_or_null(dbs) : nullptr,
                           current_stream(device));
  return {dx, dr, dw, db, dbs};
}

bool device_supported(int64_t device) {
  torch::stable::accelerator::DeviceGuard guard(static_cast<int32_t>(device));
  return resfuse::current_device_supported();
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(resfuse, m) {
  m.def("cuda_add_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
        "Tensor? branch_scale, Tensor? rowscale, float eps, float residual_scale, "
        "float branch_scale_value, bool is_rms, bool zero_centered_weight, bool store_h, "
        "ScalarType residual_dtype, ScalarType out_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_add_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? x, Tensor? weight, "
        "Tensor? branch_scale, Tensor? rowscale, Tensor? mean, float eps, float residual_scale, "
        "float branch_scale_value, bool is_rms, bool zero_centered_weight, bool has_bias, "
        "bool store_dresidual, ScalarType x_dtype, ScalarType residual_dtype) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_device_supported(int device) -> bool");
}

STABLE_TORCH_LIBRARY_IMPL(resfuse, CUDA, m) {
  m.impl("cuda_add_norm_fwd", TORCH_BOX(&add_norm_fwd));
  m.impl("cuda_add_norm_bwd", TORCH_BOX(&add_norm_bwd));
}

STABLE_TORCH_LIBRARY_IMPL(resfuse, CompositeExplicitAutograd, m) {
  m.impl("cuda_device_supported", TORCH_BOX(&device_supported));
}
