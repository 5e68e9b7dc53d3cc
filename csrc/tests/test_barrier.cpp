// Checks bigmodel::SpinBarrier (csrc/common/barrier.h), the LSTM time loop's per-step barrier:
// nobody leaves a phase before every worker has arrived, over many phases and with more threads
// than cores, and a waiter whose partner is late sleeps rather than holding its core. Exits nonzero
// on any failure.
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#include "common/barrier.h"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// `threads` invocations, invocation i bringing workers[i] workers (at::parallel_for may hand one
// invocation several), through `phases` phases: before each barrier every invocation adds its
// workers to that phase's count; after it, the count must be the total.
void phases_complete(const std::vector<int64_t>& workers, int phases) {
  int64_t total = 0;
  for (int64_t w : workers) total += w;
  bigmodel::SpinBarrier barrier(total);
  std::vector<std::atomic<int64_t>> arrived(phases);
  std::atomic<int> early{0};
  std::vector<std::thread> pool;
  for (int64_t w : workers)
    pool.emplace_back([&, w] {
      for (int p = 0; p < phases; ++p) {
        arrived[p].fetch_add(w);
        barrier.arrive_and_wait(w);
        if (arrived[p].load() != total) early.fetch_add(1);
      }
    });
  for (auto& t : pool) t.join();
  check(early.load() == 0, "a worker left a phase before every worker had arrived");
}

// A waiter whose partner arrives 30 ms late spins for at most SpinBarrier::kSpinNanos and then
// sleeps: it uses a few milliseconds of CPU at most, where a barrier that spins without end uses
// the whole 30 (and, with more runnable threads than cores, keeps the late one off its core).
void late_partner_sleeps() {
  bigmodel::SpinBarrier barrier(2);
  double waiter_cpu = 0;
  std::thread waiter([&] {
    const double start = thread_cpu_seconds();
    barrier.arrive_and_wait(1);
    waiter_cpu = thread_cpu_seconds() - start;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  barrier.arrive_and_wait(1);
  waiter.join();
  std::printf("waiter's CPU time over a 30 ms wait: %.2f ms\n", waiter_cpu * 1e3);
  check(waiter_cpu < 0.010, "a waiter kept its core for a late partner instead of sleeping");
}

}  // namespace

int main() {
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  phases_complete({1, 1}, 20000);
  phases_complete({2, 1, 3}, 5000);
  // more threads than cores: waiters must give their cores to the threads they wait for
  phases_complete(std::vector<int64_t>(4 * cores, 1), 2000);
  late_partner_sleeps();
  if (failures == 0) std::printf("test_barrier: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
