// A spinning barrier for the workers of one at::parallel_for region.
//
// The LSTM's time loop runs as one parallel region with a barrier per step instead of one region
// per step. at::parallel_for may hand one invocation several workers (a smaller OpenMP team than
// asked for), so each invocation arrives with the number of workers it ran, and the barrier opens
// when all `total` workers are in. Only for backends that run all invocations concurrently
// (OpenMP); see lstm_cpu.cpp for the fallback.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bigmodel {

class SpinBarrier {
 public:
  explicit SpinBarrier(int64_t total) : total_(total) {}

  void arrive_and_wait(int64_t workers) {
    const int64_t phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(workers, std::memory_order_acq_rel) + workers == total_) {
      count_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      return;
    }
    while (phase_.load(std::memory_order_acquire) == phase) {
#if defined(__x86_64__)
      _mm_pause();
#endif
    }
  }

 private:
  const int64_t total_;
  std::atomic<int64_t> count_{0};
  std::atomic<int64_t> phase_{0};
};

}  // namespace bigmodel
