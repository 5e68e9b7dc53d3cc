// A barrier for the workers of one at::parallel_for region: spins, then sleeps.
//
// The LSTM's time loop runs as one parallel region with a barrier per step instead of one region
// per step. at::parallel_for may hand one invocation several workers (a smaller OpenMP team than
// asked for), so each invocation arrives with the number of workers it ran, and the barrier opens
// when all `total` workers are in. Only for backends that run all invocations concurrently
// (OpenMP); see lstm_cpu.cpp for the fallback.
//
// A waiter spins for up to kSpinNanos and then sleeps on the phase word (a futex on Linux, through
// C++20 atomic wait). A step's wait is normally a few microseconds, spent spinning. When more
// threads are runnable than there are cores — several Python threads calling bigmodel at once,
// each with its own OpenMP team, or another busy process — the worker a waiter waits for may be
// off its core; a waiter that spun without end then held its core for the scheduler's whole time
// slice, every step: two Python threads running LSTM forwards side by side took 21x as long as the
// same calls one after the other (NOTES v33). Sleeping gives the core back.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bigmodel {

class SpinBarrier {
 public:
  // How long a waiter spins before it sleeps: above a step's usual wait (a few microseconds; tens
  // at the end of a busy step), below a scheduler time slice (milliseconds).
  static constexpr int64_t kSpinNanos = 50'000;

  explicit SpinBarrier(int64_t total) : total_(total) {}

  void arrive_and_wait(int64_t workers) {
    const uint32_t phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(workers, std::memory_order_acq_rel) + workers == total_) {
      count_.store(0, std::memory_order_relaxed);
      // seq_cst store and load, against the sleeper's seq_cst increment and load: either the sleeper
      // sees the new phase, or this sees the sleeper and wakes it
      phase_.store(phase + 1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) phase_.notify_all();
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    for (uint32_t i = 1;; ++i) {
      if (phase_.load(std::memory_order_acquire) != phase) return;
#if defined(__x86_64__)
      _mm_pause();
#endif
      if (i % 64 == 0 && std::chrono::steady_clock::now() - start > std::chrono::nanoseconds(kSpinNanos)) break;
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (phase_.load(std::memory_order_seq_cst) == phase) phase_.wait(phase, std::memory_order_acquire);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  const int64_t total_;
  std::atomic<int64_t> count_{0};
  std::atomic<uint32_t> phase_{0};
  std::atomic<int32_t> sleepers_{0};
};

}  // namespace bigmodel
