// simt.h: a CPU emulator of the subset of CUDA the resfuse kernels use, so that their source
// (csrc/*.cuh) compiles with g++ and runs on CPU tensors in the tests, without a GPU.
//
// Every CUDA thread of a block is a fiber with its own stack (started with makecontext, then
// switched with _setjmp/_longjmp, which unlike swapcontext make no system call). Blocks run
// one after another on the calling thread, except the blocks of one thread-block cluster,
// which run together (their fibers interleave) so that cluster barriers and distributed shared
// memory work. __syncthreads, the cluster barrier and the warp exchanges of __shfl_xor_sync
// are barriers: a fiber that reaches one yields to the scheduler until every thread of its
// block (cluster, warp) has arrived. Shared memory is per block: arrays declared with
// RESFUSE_SHARED_ARRAY and the dynamic shared memory are buffers of the running block (plain
// `__shared__` variables become function statics, which is right only without clusters),
// filled with NaN bytes so that reading one before writing it shows.
//
// Stricter than the hardware on purpose: a barrier that some threads of the block never
// reach (divergent __syncthreads, an early return) is reported as a deadlock, and shuffles
// must use the full-warp mask with all 32 lanes present.
//
// What this checks: indexing, tails, vector/scalar paths, row groups, reductions and their
// barrier pattern (cluster-wide ones included), the persistent loop and the deterministic
// partial sums. What it cannot: timing, occupancy, the memory model beyond barrier ordering,
// and the rounding of rsqrtf (the emulator uses 1/sqrt).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <vector_types.h>

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace simt {

struct Fiber {
  ucontext_t context;  // only to start the fiber on its stack
  jmp_buf resume;
  std::unique_ptr<char[]> stack;
  uint3 index{0, 0, 0};
  unsigned rank = 0;    // its block's rank in the cluster
  int waiting_on = -1;  // barrier index, or -1 when runnable
  uint64_t waiting_generation = 0;
  bool started = false;
  bool done = false;
};

struct Barrier {
  unsigned expected = 0, arrived = 0;
  uint64_t generation = 0;
};

// The shared memory of one block: the dynamic buffer and the RESFUSE_SHARED_ARRAY arrays
// (keyed by a tag per declaration).
struct BlockMemory {
  std::vector<unsigned char> dynamic;
  std::map<const void*, std::vector<unsigned char>> arrays;
  unsigned finished = 0;  // threads of the block that have returned
  bool exited = false;    // all of them: its shared memory is gone (poisoned here)
};

struct Launch {
  dim3 grid, block;
  unsigned threads = 0;  // per block
  unsigned cluster = 1;  // blocks per cluster (along x)
  unsigned warps = 0;    // per block
  size_t smem_bytes = 0;
  std::vector<BlockMemory> memory;  // per block of the running cluster
  std::vector<Fiber> fibers;        // rank * threads + thread
  // per block rank r: [r * (1 + warps)] its __syncthreads, [r * (1 + warps) + 1 + w] warp w;
  // the last one: the cluster barrier
  std::vector<Barrier> barriers;
  std::vector<uint64_t> shuffle_slots;  // per fiber
  jmp_buf scheduler;
  unsigned running = 0;  // fiber index
  uint3 cluster_base{0, 0, 0};
  std::function<void()> body;
  std::string error;

  unsigned block_barrier(unsigned rank) const { return rank * (1 + warps); }
  unsigned warp_barrier(unsigned rank, unsigned warp) const { return rank * (1 + warps) + 1 + warp; }
  unsigned cluster_barrier() const { return cluster * (1 + warps); }
};

constexpr size_t kStackBytes = 128 * 1024;

inline Launch* current = nullptr;
inline uint3 thread_idx{0, 0, 0};
inline uint3 block_idx{0, 0, 0};
inline unsigned linear_tid = 0;  // within the block
inline unsigned block_rank = 0;  // within the cluster

inline unsigned char* dynamic_smem() { return current->memory[block_rank].dynamic.data(); }

// The running block's instance of a shared array (one per declaration `tag`).
template <typename T>
T* block_shared(const void* tag, size_t count) {
  auto& arrays = current->memory[block_rank].arrays;
  auto it = arrays.find(tag);
  if (it == arrays.end()) it = arrays.emplace(tag, std::vector<unsigned char>(count * sizeof(T), 0xff)).first;
  return reinterpret_cast<T*>(it->second.data());
}

inline void fail(const std::string& what) {
  if (current->error.empty()) current->error = what;
}

// Arrive at barrier b and wait for the others (the last one to arrive releases it).
inline void wait(unsigned b) {
  Launch& L = *current;
  Barrier& B = L.barriers[b];
  if (++B.arrived == B.expected) {
    B.arrived = 0;
    ++B.generation;
    return;
  }
  Fiber& F = L.fibers[L.running];
  F.waiting_on = static_cast<int>(b);
  F.waiting_generation = B.generation;
  if (_setjmp(F.resume) == 0) _longjmp(L.scheduler, 1);
}

inline void cluster_sync() { wait(current->cluster_barrier()); }

// p, an address in the running block's shared memory, in block `rank`'s shared memory.
template <typename T>
T* map_shared_rank(T* p, unsigned rank) {
  Launch& L = *current;
  if (rank >= L.cluster) {
    fail("simt: map_shared_rank to a rank outside the cluster");
    return p;
  }
  if (L.memory[rank].exited) fail("simt: distributed shared memory of a block that has exited");
  const auto* a = reinterpret_cast<const unsigned char*>(p);
  const auto relocate = [&](const std::vector<unsigned char>& mine,
                            std::vector<unsigned char>& theirs) -> T* {
    if (a < mine.data() || a >= mine.data() + mine.size()) return nullptr;
    return reinterpret_cast<T*>(theirs.data() + (a - mine.data()));
  };
  BlockMemory& mine = L.memory[block_rank];
  if (T* q = relocate(mine.dynamic, L.memory[rank].dynamic)) return q;
  for (auto& [tag, bytes] : mine.arrays) {
    auto& theirs = L.memory[rank].arrays[tag];
    if (theirs.size() != bytes.size()) theirs.assign(bytes.size(), 0xff);
    if (T* q = relocate(bytes, theirs)) return q;
  }
  fail("simt: map_shared_rank of an address outside shared memory");
  return p;
}

// A block whose threads have all returned: on the GPU its shared memory may belong to the
// next block, so peers must not read it any more (NaN bytes, and map_shared_rank fails).
inline void block_exited(BlockMemory& m) {
  m.exited = true;
  std::memset(m.dynamic.data(), 0xff, m.dynamic.size());
  for (auto& [tag, bytes] : m.arrays) std::memset(bytes.data(), 0xff, bytes.size());
}

inline void fiber_entry() {
  Launch& L = *current;
  L.body();
  L.fibers[L.running].done = true;
  BlockMemory& m = L.memory[L.fibers[L.running].rank];
  if (++m.finished == L.threads && L.cluster > 1) block_exited(m);
  _longjmp(L.scheduler, 1);  // never returns: the stack is reset for the next cluster
}

// Runs the threads of one cluster (cluster blocks of L.threads) to completion.
inline void run_cluster(Launch& L) {
  for (BlockMemory& m : L.memory) {
    m.dynamic.assign(L.smem_bytes, 0xff);  // NaN patterns for fp32 and 16-bit types
    m.arrays.clear();
    m.finished = 0;
    m.exited = false;
  }
  for (Fiber& F : L.fibers) {
    F.context.uc_stack.ss_sp = F.stack.get();
    F.context.uc_stack.ss_size = kStackBytes;
    F.context.uc_link = nullptr;
    makecontext(&F.context, fiber_entry, 0);
    F.started = false;
    F.done = false;
    F.waiting_on = -1;
  }
  const unsigned total = static_cast<unsigned>(L.fibers.size());
  for (unsigned finished = 0; finished < total;) {
    bool progress = false;
    finished = 0;
    for (unsigned f = 0; f < total; ++f) {
      Fiber& F = L.fibers[f];
      if (F.done) {
        ++finished;
        continue;
      }
      if (F.waiting_on >= 0 && L.barriers[F.waiting_on].generation == F.waiting_generation) continue;
      F.waiting_on = -1;
      L.running = f;
      linear_tid = f % L.threads;
      block_rank = F.rank;
      thread_idx = F.index;
      block_idx = uint3{L.cluster_base.x + F.rank, L.cluster_base.y, L.cluster_base.z};
      if (_setjmp(L.scheduler) == 0) {
        if (F.started) _longjmp(F.resume, 1);
        F.started = true;
        setcontext(&F.context);
      }
      progress = true;
    }
    if (!progress && finished < total)
      throw std::runtime_error("simt: deadlock in the cluster at block (" + std::to_string(L.cluster_base.x) +
                               ", " + std::to_string(L.cluster_base.y) +
                               "): a barrier not reached by every thread");
  }
}

// Runs body() once per thread of every block of the grid; the blocks of each cluster of
// `cluster` consecutive blocks along x run together.
template <class Body>
void launch_cluster(dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster, Body&& body) {
  Launch L;
  L.grid = grid;
  L.block = block;
  L.cluster = cluster;
  L.threads = block.x * block.y * block.z;
  if (L.threads == 0 || L.threads > 1024) throw std::runtime_error("simt: bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("simt: empty grid");
  if (cluster == 0 || cluster > 8 || grid.x % cluster != 0)
    throw std::runtime_error("simt: a cluster of 1..8 blocks that divides the grid");
  if (smem_bytes > 48 * 1024) throw std::runtime_error("simt: dynamic shared memory above 48 KiB");
  L.smem_bytes = smem_bytes;
  L.warps = (L.threads + 31) / 32;
  L.memory.resize(cluster);
  L.barriers.resize(cluster * (1 + L.warps) + 1);
  for (unsigned r = 0; r < cluster; ++r) {
    L.barriers[L.block_barrier(r)].expected = L.threads;
    for (unsigned w = 0; w < L.warps; ++w)
      L.barriers[L.warp_barrier(r, w)].expected = L.threads - w * 32 < 32 ? L.threads - w * 32 : 32;
  }
  L.barriers[L.cluster_barrier()].expected = cluster * L.threads;
  L.shuffle_slots.assign(cluster * L.threads, 0);
  L.fibers.resize(cluster * L.threads);
  L.body = std::function<void()>(std::forward<Body>(body));
  for (unsigned f = 0; f < L.fibers.size(); ++f) {
    const unsigned tid = f % L.threads;
    L.fibers[f].stack.reset(new char[kStackBytes]);
    L.fibers[f].index = uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
    L.fibers[f].rank = f / L.threads;
    getcontext(&L.fibers[f].context);
  }
  Launch* previous = current;
  current = &L;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; x += cluster) {
          L.cluster_base = uint3{x, y, z};
          run_cluster(L);
        }
  } catch (...) {
    current = previous;
    throw;
  }
  current = previous;
  if (!L.error.empty()) throw std::runtime_error(L.error);
}

template <class Body>
void launch(dim3 grid, dim3 block, size_t smem_bytes, Body&& body) {
  launch_cluster(grid, block, smem_bytes, 1, std::forward<Body>(body));
}

}  // namespace simt

#define threadIdx (simt::thread_idx)
#define blockIdx (simt::block_idx)
#define blockDim (simt::current->block)
#define gridDim (simt::current->grid)

inline void __syncthreads() { simt::wait(simt::current->block_barrier(simt::block_rank)); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "simt: shuffle of a wide type");
  simt::Launch& L = *simt::current;
  const unsigned me = simt::linear_tid, warp = me / 32, lane = me % 32;
  const unsigned barrier = L.warp_barrier(simt::block_rank, warp);
  if (mask != 0xffffffffu || L.barriers[barrier].expected != 32)
    simt::fail("simt: shuffles must involve all 32 lanes of a full warp");
  const unsigned other = warp * 32 + ((lane ^ static_cast<unsigned>(lane_mask)) & 31u);
  const unsigned first = simt::block_rank * L.threads;  // this block's fibers
  std::memcpy(&L.shuffle_slots[first + me], &value, sizeof(T));
  simt::wait(barrier);
  T out;
  std::memcpy(&out, &L.shuffle_slots[first + (other < L.threads ? other : me)], sizeof(T));
  simt::wait(barrier);
  return out;
}
