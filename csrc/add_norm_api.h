// Host entry points of the compiled kernels (csrc/add_norm_{fwd,bwd}.cu), called by the op
// registration in csrc/ops.cpp. No CUDA or torch types: streams travel as void*.
#pragma once

#include "add_norm_params.h"

namespace resfuse {

// Launch on `stream` (a cudaStream_t of the current device, which the caller has set).
void launch_forward(const FwdParams& p, void* stream);

// Fills p.layout and p.programs (the persistent grid, i.e. rows of each partial buffer).
void plan_backward(BwdParams& p);

// p.*_part point at (programs, D) fp32 buffers for the gradients wanted; the outputs are (D,).
void launch_backward(const BwdParams& p, const ParamGrads& grads, void* stream);

// The layouts the launch heuristics pick on the current device for hidden size D (bf16
// kernels; the other dtype sets agree except the branch-norm backward's run-time-dtype one,
// which never uses clusters): for tests and benchmark reports.
RowLayout forward_layout(int64_t D);
RowLayout backward_layout(int64_t D, bool branch_norm);

// Whether this build holds kernels that run on the current device (its compute capability
// against the TORCH_CUDA_ARCH_LIST the extension was compiled for).
bool current_device_supported();

}  // namespace resfuse
