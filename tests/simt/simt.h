// simt.h: a CPU emulator of the subset of CUDA the resfuse kernels use, so that their source
// (csrc/*.cuh) compiles with g++ and runs on CPU tensors in the tests, without a GPU.
//
// Every CUDA thread of a block is a fiber with its own stack (started with makecontext, then
// switched with _setjmp/_longjmp, which unlike swapcontext make no system call); blocks run
// one after another on the calling thread. __syncthreads and the warp exchanges of __shfl_xor_sync are
// barriers: a fiber that reaches one yields to the scheduler until every thread of its block
// (or warp) has arrived. `__shared__` variables become function statics (one block runs at a
// time, so they are shared by exactly that block's threads); dynamic shared memory is a
// per-launch buffer filled with NaN bytes, so reading it before writing it shows.
//
// Stricter than the hardware on purpose: a barrier that some threads of the block never
// reach (divergent __syncthreads, an early return) is reported as a deadlock, and shuffles
// must use the full-warp mask with all 32 lanes present.
//
// What this checks: indexing, tails, vector/scalar paths, row groups, reductions and their
// barrier pattern, the persistent loop and the deterministic partial sums. What it cannot:
// timing, occupancy, the memory model beyond barrier ordering, and the rounding of rsqrtf
// (the emulator uses 1/sqrt).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
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
  int waiting_on = -1;  // barrier index, or -1 when runnable
  uint64_t waiting_generation = 0;
  bool started = false;
  bool done = false;
};

struct Barrier {
  unsigned expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Launch {
  dim3 grid, block;
  unsigned threads = 0;
  std::vector<unsigned char> dynamic_smem;
  std::vector<Fiber> fibers;
  std::vector<Barrier> barriers;  // [0]: the block, [1 + w]: warp w
  std::vector<uint64_t> shuffle_slots;
  jmp_buf scheduler;
  unsigned running = 0;
  std::function<void()> body;
  std::string error;
};

constexpr size_t kStackBytes = 128 * 1024;

inline Launch* current = nullptr;
inline uint3 thread_idx{0, 0, 0};
inline uint3 block_idx{0, 0, 0};
inline unsigned linear_tid = 0;

inline unsigned char* dynamic_smem() { return current->dynamic_smem.data(); }

inline void fail(const std::string& what) {
  if (current->error.empty()) current->error = what;
}

// Arrive at barrier b and wait for the others (the last one to arrive releases it).
inline void wait(int b) {
  Launch& L = *current;
  Barrier& B = L.barriers[b];
  if (++B.arrived == B.expected) {
    B.arrived = 0;
    ++B.generation;
    return;
  }
  Fiber& F = L.fibers[L.running];
  F.waiting_on = b;
  F.waiting_generation = B.generation;
  if (_setjmp(F.resume) == 0) _longjmp(L.scheduler, 1);
}

inline void fiber_entry() {
  Launch& L = *current;
  L.body();
  L.fibers[L.running].done = true;
  _longjmp(L.scheduler, 1);  // never returns: the stack is reset for the next block
}

// Runs body() once per thread of every block of the grid.
template <class Body>
void launch(dim3 grid, dim3 block, size_t smem_bytes, Body&& body) {
  Launch L;
  L.grid = grid;
  L.block = block;
  L.threads = block.x * block.y * block.z;
  if (L.threads == 0 || L.threads > 1024) throw std::runtime_error("simt: bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("simt: empty grid");
  if (smem_bytes > 48 * 1024) throw std::runtime_error("simt: dynamic shared memory above 48 KiB");
  L.dynamic_smem.assign(smem_bytes, 0xff);  // NaN patterns for fp32 and 16-bit types
  L.barriers.resize(1 + (L.threads + 31) / 32);
  L.barriers[0].expected = L.threads;
  for (unsigned w = 0; w * 32 < L.threads; ++w)
    L.barriers[1 + w].expected = L.threads - w * 32 < 32 ? L.threads - w * 32 : 32;
  L.shuffle_slots.assign(L.threads, 0);
  L.fibers.resize(L.threads);
  L.body = std::function<void()>(std::forward<Body>(body));
  for (unsigned tid = 0; tid < L.threads; ++tid) {
    L.fibers[tid].stack.reset(new char[kStackBytes]);
    L.fibers[tid].index = uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
    getcontext(&L.fibers[tid].context);
  }
  Launch* previous = current;
  current = &L;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = uint3{x, y, z};
        for (Fiber& F : L.fibers) {
          F.context.uc_stack.ss_sp = F.stack.get();
          F.context.uc_stack.ss_size = kStackBytes;
          F.context.uc_link = nullptr;
          makecontext(&F.context, fiber_entry, 0);
          F.started = false;
          F.done = false;
          F.waiting_on = -1;
        }
        for (unsigned finished = 0; finished < L.threads;) {
          bool progress = false;
          finished = 0;
          for (unsigned tid = 0; tid < L.threads; ++tid) {
            Fiber& F = L.fibers[tid];
            if (F.done) {
              ++finished;
              continue;
            }
            if (F.waiting_on >= 0 && L.barriers[F.waiting_on].generation == F.waiting_generation)
              continue;
            F.waiting_on = -1;
            L.running = tid;
            linear_tid = tid;
            thread_idx = F.index;
            if (_setjmp(L.scheduler) == 0) {
              if (F.started) _longjmp(F.resume, 1);
              F.started = true;
              setcontext(&F.context);
            }
            progress = true;
          }
          if (!progress && finished < L.threads) {
            current = previous;
            throw std::runtime_error("simt: deadlock in block (" + std::to_string(x) + ", " +
                                     std::to_string(y) + "): a barrier not reached by every thread");
          }
        }
      }
  current = previous;
  if (!L.error.empty()) throw std::runtime_error(L.error);
}

}  // namespace simt

#define threadIdx (simt::thread_idx)
#define blockIdx (simt::block_idx)
#define blockDim (simt::current->block)
#define gridDim (simt::current->grid)

inline void __syncthreads() { simt::wait(0); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "simt: shuffle of a wide type");
  simt::Launch& L = *simt::current;
  const unsigned me = simt::linear_tid, warp = me / 32, lane = me % 32;
  if (mask != 0xffffffffu || L.barriers[1 + warp].expected != 32)
    simt::fail("simt: shuffles must involve all 32 lanes of a full warp");
  const unsigned other = warp * 32 + ((lane ^ static_cast<unsigned>(lane_mask)) & 31u);
  std::memcpy(&L.shuffle_slots[me], &value, sizeof(T));
  simt::wait(1 + warp);
  T out;
  std::memcpy(&out, &L.shuffle_slots[other < L.threads ? other : me], sizeof(T));
  simt::wait(1 + warp);
  return out;
}
