// The ops' arguments into the kernels' parameters, for every device the ops run on: the CUDA
// registration (ops.cpp) and the CPU one (cpu/ops_cpu.cpp) check and convert the same
// arguments the same way, and allocate the same outputs; each then runs its own kernels.
//
// The ops take the tensors of resfuse/spec.py's Operands (forward) or BackwardInputs
// (backward) and the spec's flat form, AddNormSpec.flat(): eps, residual_scale,
// branch_scale_value, flags (the booleans, add_norm_params.h's Flag bits), and the dtypes of
// x, the residual, h and y. Absent outputs are empty tensors. Written against PyTorch's
// stable ABI (torch/csrc/stable, TORCH_TARGET_VERSION = 2.10).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "add_norm_params.h"

namespace resfuse {
namespace op_args {
// internal linkage: each extension's op file uses these privately, and torch::stable::Tensor
// members would otherwise give the result structs more visibility than their fields' type
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t kMaxD = int64_t{1} << 30;  // column offsets are 32-bit in the kernels

// Where an op runs: the messages' prefix, and the device its tensors must be on.
struct Device {
  const char* name;  // "resfuse CUDA" / "resfuse CPU"
  bool cuda;
  int32_t index;  // CUDA device index (CPU: -1)
};

inline DType to_dtype(ScalarType t, const Device& d, const char* name) {
  switch (t) {
    case ScalarType::Float:
      return DType::kFloat32;
    case ScalarType::Half:
      return DType::kFloat16;
    case ScalarType::BFloat16:
      return DType::kBFloat16;
    default:
      STD_TORCH_CHECK(false, d.name, ": ", name, " must be float32, float16 or bfloat16, got ",
                      torch::headeronly::toString(t));
  }
  return DType::kFloat32;
}

inline void check_device(const Tensor& t, const char* name, const Device& d) {
  if (d.cuda) {
    STD_TORCH_CHECK(t.is_cuda(), d.name, ": ", name, " must be a CUDA tensor");
    STD_TORCH_CHECK(t.get_device_index() == d.index, d.name, ": ", name, " must be on cuda:", d.index,
                    ", got cuda:", t.get_device_index());
  } else {
    STD_TORCH_CHECK(t.is_cpu(), d.name, ": ", name, " must be a CPU tensor");
  }
}

inline void check_dims(const Tensor& t, const char* name, const Device& d) {
  STD_TORCH_CHECK(t.dim() == 2, d.name, ": ", name, " must be 2-D (rows, D), got ", t.dim(), " dimensions");
  STD_TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= kMaxD, d.name, ": the normalized size must be in [1, 2^30]");
}

// A (rows, D) activation with unit column stride (any row stride).
inline Operand activation(const Tensor& t, const char* name, int64_t rows, int64_t D, const Device& d) {
  check_device(t, name, d);
  STD_TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == D, d.name, ": ", name,
                  " must have shape (", rows, ", ", D, ")");
  // (an empty tensor may have any strides: the gradient of y.sum() over no rows is an
  // expanded zero-stride one, and contiguous() leaves it so; nothing of it is read)
  STD_TORCH_CHECK(t.stride(1) == 1 || D == 1 || rows == 0, d.name, ": ", name,
                  " must have a unit stride along its last dimension");
  STD_TORCH_CHECK(t.stride(0) >= 0, d.name, ": ", name, " has a negative row stride");
  return make_operand(t.data_ptr(), t.stride(0), to_dtype(t.scalar_type(), d, name), rows);
}

inline Operand optional_activation(const std::optional<Tensor>& t, const char* name, int64_t rows, int64_t D,
                                   const Device& d) {
  return t.has_value() ? activation(*t, name, rows, D, d) : Operand{};
}

inline ParamVector param(const std::optional<Tensor>& t, const char* name, int64_t D, const Device& d) {
  if (!t.has_value()) return ParamVector{};
  check_device(*t, name, d);
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == D, d.name, ": ", name, " must have shape (", D, ")");
  STD_TORCH_CHECK(t->stride(0) == 1 || D == 1, d.name, ": ", name, " must be contiguous");
  return make_param(t->data_ptr(), to_dtype(t->scalar_type(), d, name));
}

// An fp32 vector of one value per row (rowscale, the LayerNorm mean).
inline const float* row_vector(const std::optional<Tensor>& t, const char* name, int64_t rows,
                               const Device& d) {
  if (!t.has_value()) return nullptr;
  check_device(*t, name, d);
  STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float, d.name, ": ", name, " must be float32");
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, d.name, ": ", name, " must have shape (", rows, ")");
  STD_TORCH_CHECK(t->stride(0) == 1 || rows <= 1, d.name, ": ", name, " must be contiguous");
  return static_cast<const float*>(t->data_ptr());
}

// A contiguous uninitialized tensor on like's device. Through the C shim's empty_strided, not
// torch::stable::empty: that one boxes its arguments and finds aten::empty by name in the
// dispatcher on every call (about 1.5 us each, 4 outputs a call: a quarter of a small
// call's host time, measured on the CPU backend).
inline Tensor empty(std::initializer_list<int64_t> shape, ScalarType dtype, const Tensor& like) {
  int64_t sizes[2] = {0, 0}, strides[2] = {1, 1};
  const int64_t ndim = static_cast<int64_t>(shape.size());
  STD_TORCH_CHECK(ndim >= 1 && ndim <= 2, "resfuse: empty() takes 1 or 2 dimensions");
  std::copy(shape.begin(), shape.end(), sizes);
  if (ndim == 2) strides[0] = sizes[1];
  int32_t device_type = 0, device_index = 0;
  STD_TORCH_CHECK(aoti_torch_get_device_type(like.get(), &device_type) == AOTI_TORCH_SUCCESS,
                  "resfuse: no device type");
  STD_TORCH_CHECK(aoti_torch_get_device_index(like.get(), &device_index) == AOTI_TORCH_SUCCESS,
                  "resfuse: no device index");
  AtenTensorHandle handle = nullptr;
  STD_TORCH_CHECK(
      aoti_torch_empty_strided(ndim, sizes, strides,
                               torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype)),
                               device_type, device_index, &handle) == AOTI_TORCH_SUCCESS,
      "resfuse: could not allocate an output");
  return Tensor(handle);
}

// --------------------------------------------------------------------------- forward

struct Forward {
  FwdParams p;
  Tensor y, h, mean, mean_x;
};

inline Forward forward(const Tensor& x, const std::optional<Tensor>& residual,
                       const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& branch_scale, const std::optional<Tensor>& rowscale,
                       const std::optional<Tensor>& branch_weight, const std::optional<Tensor>& branch_bias,
                       double eps, double residual_scale, double branch_scale_value, int64_t flags,
                       ScalarType x_dtype, ScalarType residual_dtype, ScalarType h_dtype,
                       ScalarType out_dtype, const Device& d) {
  check_dims(x, "x", d);
  const int64_t rows = x.size(0), D = x.size(1);
  const bool is_rms = (flags & kFlagRms) != 0;
  const bool branch_norm = (flags & kFlagBranchNorm) != 0;
  const bool output_norm = (flags & kFlagOutputNorm) != 0;
  const bool store_h = (flags & kFlagStoreH) != 0;
  STD_TORCH_CHECK(!branch_norm || (!branch_scale.has_value() && !rowscale.has_value()), d.name,
                  ": the branch norm does not combine with branch_scale tensors or rowscale");
  STD_TORCH_CHECK(branch_norm || (!branch_weight.has_value() && !branch_bias.has_value()), d.name,
                  ": branch_weight / branch_bias need branch_norm");
  STD_TORCH_CHECK(output_norm || store_h, d.name, ": without the output norm h is the output: store_h");

  Forward f;
  FwdParams& p = f.p;
  p.x = activation(x, "x", rows, D, d);
  p.residual = optional_activation(residual, "residual", rows, D, d);
  p.weight = param(weight, "weight", D, d);
  p.bias = param(bias, "bias", D, d);
  p.branch_scale = param(branch_scale, "branch_scale", D, d);
  p.rowscale = row_vector(rowscale, "rowscale", rows, d);
  p.branch_weight = param(branch_weight, "branch_weight", D, d);
  p.branch_bias = param(branch_bias, "branch_bias", D, d);
  to_dtype(x_dtype, d, "x_dtype");
  to_dtype(residual_dtype, d, "residual_dtype");
  to_dtype(h_dtype, d, "h_dtype");
  to_dtype(out_dtype, d, "out_dtype");

  const auto rows_or_empty = [&](bool wanted) { return empty({wanted ? rows : 0}, ScalarType::Float, x); };
  f.y = output_norm ? empty({rows, D}, out_dtype, x) : empty({0}, out_dtype, x);
  f.h = store_h ? empty({rows, D}, h_dtype, x) : empty({0}, h_dtype, x);
  f.mean = rows_or_empty(!is_rms && output_norm);
  f.mean_x = rows_or_empty(!is_rms && branch_norm);
  if (output_norm) p.y = activation(f.y, "y", rows, D, d);
  if (store_h) p.h = activation(f.h, "h", rows, D, d);
  if (!is_rms && output_norm) p.mean = static_cast<float*>(f.mean.data_ptr());
  if (!is_rms && branch_norm) p.mean_x = static_cast<float*>(f.mean_x.data_ptr());
  p.rows = rows;
  p.D = static_cast<int>(D);
  p.eps = static_cast<float>(eps);
  p.residual_scale = static_cast<float>(residual_scale);
  p.branch_scale_value = static_cast<float>(branch_scale_value);
  unpack_flags(p, static_cast<uint32_t>(flags));
  return f;
}

// --------------------------------------------------------------------------- backward

struct Backward {
  BwdParams p;
  Tensor dx, dr;
  std::vector<Tensor> grads;       // (D,) fp32 each, empty where not wanted
  bool want[kMaxParamGrads] = {};  // which of grads are wanted
  ParamGrads out;                  // their data pointers
};

inline Backward backward(const std::optional<Tensor>& dy, const std::optional<Tensor>& dh,
                         const std::optional<Tensor>& h, const std::optional<Tensor>& x,
                         const std::optional<Tensor>& weight, const std::optional<Tensor>& branch_scale,
                         const std::optional<Tensor>& rowscale, const std::optional<Tensor>& branch_weight,
                         const std::optional<Tensor>& mean, const std::optional<Tensor>& mean_x, double eps,
                         double residual_scale, double branch_scale_value, int64_t flags, ScalarType x_dtype,
                         ScalarType residual_dtype, ScalarType h_dtype, ScalarType out_dtype, const Device& d,
                         bool needs_means) {
  const bool is_rms = (flags & kFlagRms) != 0;
  const bool branch_norm = (flags & kFlagBranchNorm) != 0;
  const bool output_norm = (flags & kFlagOutputNorm) != 0;
  const bool store_dresidual = (flags & kFlagStoreDresidual) != 0;
  const bool has_bias = (flags & kFlagBias) != 0;
  const bool has_branch_bias = (flags & kFlagBranchBias) != 0;
  // With the output norm it is differentiated at h, for dy; without it (norm_add) the
  // gradient reaching h is dh alone.
  STD_TORCH_CHECK(output_norm ? (dy.has_value() && h.has_value()) : dh.has_value(), d.name,
                  ": the backward needs dy and h with the output norm, dh without it");
  const Tensor& like = output_norm ? *h : *dh;
  check_dims(like, output_norm ? "h" : "dh", d);
  check_device(like, output_norm ? "h" : "dh", d);
  const int64_t rows = like.size(0), D = like.size(1);

  Backward b;
  BwdParams& p = b.p;
  if (output_norm) {
    p.dy = activation(*dy, "dy", rows, D, d);
    p.h = activation(*h, "h", rows, D, d);
  }
  p.dh = optional_activation(dh, "dh", rows, D, d);
  p.x = optional_activation(x, "x", rows, D, d);
  p.weight = output_norm ? param(weight, "weight", D, d) : ParamVector{};
  p.branch_scale = param(branch_scale, "branch_scale", D, d);
  p.branch_weight = param(branch_weight, "branch_weight", D, d);
  STD_TORCH_CHECK(!(branch_scale.has_value() || branch_norm) || x.has_value(), d.name,
                  ": the branch_scale gradient and the branch norm need x");
  STD_TORCH_CHECK(!branch_norm || (!branch_scale.has_value() && !rowscale.has_value()), d.name,
                  ": the branch norm does not combine with branch_scale tensors or rowscale");
  STD_TORCH_CHECK(branch_norm || (!branch_weight.has_value() && !has_branch_bias), d.name,
                  ": branch_weight / branch_bias need branch_norm");
  p.rowscale = row_vector(rowscale, "rowscale", rows, d);
  if (output_norm) p.mean = row_vector(mean, "mean", rows, d);
  if (branch_norm) p.mean_x = row_vector(mean_x, "mean_x", rows, d);
  // the CUDA kernels need the forward's means as their statistics' shift; the CPU ones use them when given
  STD_TORCH_CHECK(!needs_means || is_rms || !output_norm || p.mean != nullptr, d.name,
                  ": the LayerNorm backward needs the row means of h");
  STD_TORCH_CHECK(!needs_means || is_rms || !branch_norm || p.mean_x != nullptr, d.name,
                  ": the LayerNorm backward needs the row means of x");
  to_dtype(x_dtype, d, "x_dtype");
  to_dtype(residual_dtype, d, "residual_dtype");
  to_dtype(h_dtype, d, "h_dtype");
  to_dtype(out_dtype, d, "out_dtype");

  const bool want[kMaxParamGrads] = {output_norm && weight.has_value(), output_norm && has_bias,
                                     branch_scale.has_value(), branch_weight.has_value(),
                                     branch_norm && has_branch_bias};
  b.dx = empty({rows, D}, x_dtype, like);
  b.dr = store_dresidual ? empty({rows, D}, residual_dtype, like) : empty({0}, residual_dtype, like);
  float** outs[kMaxParamGrads] = {&b.out.weight, &b.out.bias, &b.out.branch_scale, &b.out.branch_weight,
                                  &b.out.branch_bias};
  for (int i = 0; i < kMaxParamGrads; ++i) {
    b.want[i] = want[i];
    b.grads.push_back(empty({want[i] ? D : 0}, ScalarType::Float, like));
    if (want[i]) *outs[i] = static_cast<float*>(b.grads[i].data_ptr());
  }
  p.dx = activation(b.dx, "dx", rows, D, d);
  if (store_dresidual) p.dr = activation(b.dr, "dresidual", rows, D, d);
  p.rows = rows;
  p.D = static_cast<int>(D);
  p.eps = static_cast<float>(eps);
  p.residual_scale = static_cast<float>(residual_scale);
  p.branch_scale_value = static_cast<float>(branch_scale_value);
  unpack_flags(p, static_cast<uint32_t>(flags));
  return b;
}

}  // namespace
}  // namespace op_args
}  // namespace resfuse

// the spec's flat form after the tensors (resfuse/spec.py, AddNormSpec.flat), in the schemas
#define RESFUSE_SPEC_ARGS                                                                      \
  "float eps, float residual_scale, float branch_scale_value, int flags, ScalarType x_dtype, " \
  "ScalarType residual_dtype, ScalarType h_dtype, ScalarType out_dtype"
#define RESFUSE_FWD_SCHEMA(name)                                                           \
  name "(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? branch_scale, " \
       "Tensor? rowscale, Tensor? branch_weight, Tensor? branch_bias, " RESFUSE_SPEC_ARGS  \
       ") -> "                                                                             \
       "(Tensor, Tensor, Tensor, Tensor)"
#define RESFUSE_BWD_SCHEMA(name)                                                                   \
  name "(Tensor? dy, Tensor? dh, Tensor? h, Tensor? x, Tensor? weight, Tensor? branch_scale, "     \
       "Tensor? rowscale, Tensor? branch_weight, Tensor? mean, Tensor? mean_x, " RESFUSE_SPEC_ARGS \
       ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
