// The CPU backend's entry points: the instruction set (the best this CPU runs, or one a
// test chose), the parameters in fp32, the rows split over PyTorch's intra-op threads, and
// the parameter gradients summed over fixed row blocks in a fixed order.
#include "add_norm_cpu.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/Exception.h>

namespace resfuse {
namespace cpu {

extern const Kernels generic_kernels;
#if defined(__x86_64__) || defined(_M_X64)
extern const Kernels avx2_kernels;
extern const Kernels avx512_kernels;
#endif

namespace {

// the instruction sets this CPU runs, best first (generic always)
std::vector<const Kernels*> supported_kernels() {
  std::vector<const Kernels*> out;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
    out.push_back(&avx512_kernels);
  if (avx2) out.push_back(&avx2_kernels);
#endif
  out.push_back(&generic_kernels);
  return out;
}

const std::vector<const Kernels*>& supported() {
  static const std::vector<const Kernels*> all = supported_kernels();
  return all;
}

// the row loops in use: the best the CPU runs unless use_isa() chose another
std::atomic<const Kernels*> g_kernels{nullptr};

const Kernels& kernels() {
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = supported().front();
    g_kernels.store(k, std::memory_order_release);
  }
  return *k;
}

// a (D,) parameter in fp32: `fill` where absent, 1 + w when zero-centred (weights only)
float* to_float(const ParamVector& v, int D, float fill, bool zero_centered, float* out) {
  if (v.ptr == nullptr) {
    std::fill(out, out + D, fill);
    return out;
  }
  load_floats(v.ptr, v.dtype, out, D);
  if (zero_centered)
    for (int i = 0; i < D; ++i) out[i] += 1.0f;
  return out;
}

// the fewest columns of the parameter gradients' final sum one thread takes (1 KiB of a row)
constexpr int64_t kReduceColumns = 256;

// rows per parallel_for task: about 64K elements of work, at least one row
int64_t grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1)); }

}  // namespace

const char* isa() { return kernels().isa; }

int vector_elems() { return kernels().vector_elems; }

bool isa_supported(const std::string& name) {
  for (const Kernels* k : supported())
    if (name == k->isa) return true;
  return false;
}

const char* use_isa(const std::string& name) {
  const char* previous = isa();
  std::string names;
  for (const Kernels* k : supported()) {
    if (name == k->isa) {
      g_kernels.store(k, std::memory_order_release);
      return previous;
    }
    names += names.empty() ? k->isa : std::string(", ") + k->isa;
  }
  STD_TORCH_CHECK(false, "resfuse CPU: instruction set '", name, "' is not one this CPU runs (", names, ")");
  return previous;
}

int64_t row_blocks(int64_t rows, int64_t D) {
  const int64_t budget = std::max<int64_t>(1, kPartialBudget / std::max<int64_t>(D, 1));
  return std::max<int64_t>(1, std::min({rows, kMaxRowBlocks, budget}));
}

void forward(const FwdParams& p) {
  if (p.rows == 0) return;
  const int D = p.D;
  std::vector<float> params(static_cast<size_t>(5) * D);
  Affine a;
  a.weight = to_float(p.weight, D, 1.0f, p.zero_centered, params.data());
  a.bias = to_float(p.bias, D, 0.0f, false, params.data() + D);
  a.branch_weight = to_float(p.branch_weight, D, 1.0f, p.zero_centered, params.data() + 2 * D);
  a.branch_bias = to_float(p.branch_bias, D, 0.0f, false, params.data() + 3 * D);
  a.has_branch_scale = p.branch_scale.ptr != nullptr;
  a.branch_scale = to_float(p.branch_scale, D, 1.0f, false, params.data() + 4 * D);
  const Kernels& k = kernels();
  torch::stable::parallel_for(0, p.rows, grain(D), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(kForwardScratchRows) * D);
    k.forward_rows(p, a, begin, end, scratch.data());
  });
}

void backward(const BwdParams& p, const ParamGrads& grads) {
  const int D = p.D;
  std::vector<float> params(static_cast<size_t>(3) * D);
  Affine a;
  a.weight = to_float(p.weight, D, 1.0f, p.zero_centered, params.data());
  a.branch_weight = to_float(p.branch_weight, D, 1.0f, p.zero_centered, params.data() + D);
  a.has_branch_scale = p.branch_scale.ptr != nullptr;
  a.branch_scale = to_float(p.branch_scale, D, 1.0f, false, params.data() + 2 * D);

  float* const outs[kMaxParamGrads] = {grads.weight, grads.bias, grads.branch_scale, grads.branch_weight,
                                       grads.branch_bias};
  int wanted = 0;
  for (float* out : outs) wanted += out != nullptr;
  const int64_t blocks = row_blocks(p.rows, D);
  // the blocks' partial sums: (blocks, D) per gradient wanted, each block's zeroed by the
  // thread that sums it (zeroing them all up front ran on one thread: up to 64 x D x 5 floats)
  std::unique_ptr<float[]> partials(new float[static_cast<size_t>(wanted) * blocks * D]);
  float* base[kMaxParamGrads] = {};
  for (int g = 0, used = 0; g < kMaxParamGrads; ++g)
    if (outs[g]) base[g] = partials.get() + static_cast<size_t>(used++) * blocks * D;

  const Kernels& k = kernels();
  const int64_t rows = p.rows;
  if (rows > 0) {
    torch::stable::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch(static_cast<size_t>(kBackwardScratchRows) * D);
      for (int64_t b = b0; b < b1; ++b) {
        const auto at = [&](int g) { return base[g] ? base[g] + static_cast<size_t>(b) * D : nullptr; };
        for (int g = 0; g < kMaxParamGrads; ++g)
          if (base[g]) std::fill(at(g), at(g) + D, 0.0f);
        const PartialRows part{at(0), at(1), at(2), at(3), at(4)};
        k.backward_rows(p, a, rows * b / blocks, rows * (b + 1) / blocks, scratch.data(), part);
      }
    });
  }
  // out[col] = the blocks' partial sums added in block order (columns split over threads:
  // kReduceColumns at least, so that a row of D = 768 is summed by two threads, not one)
  if (wanted == 0) return;
  if (rows == 0) {
    for (float* out : outs)
      if (out) std::fill(out, out + D, 0.0f);
    return;
  }
  torch::stable::parallel_for(0, D, kReduceColumns, [&](int64_t c0, int64_t c1) {
    for (int g = 0; g < kMaxParamGrads; ++g) {
      if (!outs[g]) continue;
      for (int64_t c = c0; c < c1; ++c) outs[g][c] = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        const float* part = base[g] + static_cast<size_t>(b) * D;
        for (int64_t c = c0; c < c1; ++c) outs[g][c] += part[c];
      }
    }
  });
}

}  // namespace cpu
}  // namespace resfuse
