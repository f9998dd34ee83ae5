// The launcher of add_norm_launch.h for real GPUs: the caller's stream, kernel-launch errors
// as exceptions, SM count and occupancy from the runtime (cached: no per-call queries).
#pragma once

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include <cuda_runtime.h>

#include "add_norm_params.h"

namespace resfuse {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("resfuse CUDA extension: ") + what + ": " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
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

  // A launch configuration with thread-block clusters of cluster_blocks blocks along x;
  // `attribute` must outlive the configuration.
  cudaLaunchConfig_t cluster_config(dim3 grid, dim3 block, size_t smem, int cluster_blocks,
                                    cudaLaunchAttribute& attribute) const {
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = static_cast<unsigned>(cluster_blocks);
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
    return config;
  }

  // Thread-block clusters (sm_90), launched through cudaLaunchKernelEx.
  template <class... A>
  void cluster(void (*kernel)(A...), dim3 grid, dim3 block, int cluster_blocks, size_t smem,
               const A&... args) const {
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config = cluster_config(grid, block, smem, cluster_blocks, attribute);
    check_cuda(cudaLaunchKernelEx(&config, kernel, args...), "cluster kernel launch");
  }

  // Clusters need a device that launches them and the kernel's sm_90+ binary: a build for
  // older architectures only (its cluster code compiled out) must never be launched with them.
  template <class Kernel>
  int max_cluster_blocks(Kernel kernel) const {
    static std::mutex mutex;
    static std::map<std::pair<int, const void*>, int> cache;
    const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    int cluster_launch = 0;
    check_cuda(cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device), "cluster support");
    cudaFuncAttributes attributes;
    check_cuda(cudaFuncGetAttributes(&attributes, kernel), "kernel attributes");
    return cache[key] = (cluster_launch != 0 && attributes.binaryVersion >= 90) ? kMaxClusterBlocks : 1;
  }

  template <class Kernel>
  int clusters_resident(Kernel kernel, int block_threads, size_t smem, int cluster_blocks) const {
    static std::mutex mutex;
    static std::map<std::tuple<int, const void*, int, size_t, int>, int> cache;
    const auto key =
        std::make_tuple(device, reinterpret_cast<const void*>(kernel), block_threads, smem, cluster_blocks);
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config =
        cluster_config(dim3(static_cast<unsigned>(cluster_blocks)),
                       dim3(static_cast<unsigned>(block_threads)), smem, cluster_blocks, attribute);
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // "cannot place such a cluster" is an answer: no clusters
      n = 0;
    }
    return cache[key] = n;
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
