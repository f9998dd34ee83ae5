// The launcher of add_norm_launch.h for real GPUs: the caller's stream, kernel-launch errors
// as exceptions, SM count and occupancy from the runtime (cached: no per-call queries).
#pragma once

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include <cuda_runtime.h>

namespace resfuse {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("resfuse CUDA extension: ") + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

inline int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

struct CudaLauncher {
  cudaStream_t stream = nullptr;
  int device = current_device();

  template <class... A>
  void operator()(void (*kernel)(A...), dim3 grid, dim3 block, size_t smem, const A&... args) const {
    kernel<<<grid, block, smem, stream>>>(args...);
    check_cuda(cudaGetLastError(), "kernel launch");
  }

  int sm_count() const {
    static std::mutex mutex;
    static std::map<int, int> cache;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(device);
    if (it != cache.end()) return it->second;
    int n = 0;
    check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "SM count");
    return cache[device] = n;
  }

  template <class Kernel>
  int blocks_per_sm(Kernel kernel, int block_threads, size_t smem) const {
    static std::mutex mutex;
    static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
    const auto key = std::make_tuple(device, reinterpret_cast<const void*>(kernel), block_threads, smem);
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, block_threads, smem), "occupancy");
    return cache[key] = n;
  }
};

}  // namespace resfuse
