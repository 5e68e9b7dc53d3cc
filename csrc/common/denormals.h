// Flush-to-zero for the duration of a CPU op.
//
// Recurrent backward passes shrink gradients step after step; once they reach the denormal range
// every arithmetic instruction on them takes a microcode assist (~100x slower), and a T=256 backward
// with a loss on the last step only ran 15x slower than with a dense loss. Values below 1.2e-38
// (float) carry no information for training, so the ops run with FTZ and DAZ set on the calling
// thread and on every OpenMP worker (which also runs the BLAS), and restore the caller's mode after.
// Setting the workers' mode wakes the team twice (set, restore: ~10 us on 2 cores, a third of a
// batch-1 LSTMCell step); an op that will run on the calling thread alone passes team = false.
#pragma once

#include <ATen/Parallel.h>

#if defined(__SSE2__) || defined(__x86_64__)
#include <xmmintrin.h>
#define BIGMODEL_HAS_MXCSR 1
#endif

namespace bigmodel {

class FlushDenormalsGuard {
 public:
  explicit FlushDenormalsGuard(bool team = true) {
#ifdef BIGMODEL_HAS_MXCSR
    saved_ = _mm_getcsr();
    team_ = team;
    const unsigned int mode = saved_ | kFtzDaz;
    if (mode != saved_) {
      set(mode);
      active_ = true;
    }
#else
    (void)team;
#endif
  }
  ~FlushDenormalsGuard() {
#ifdef BIGMODEL_HAS_MXCSR
    if (active_) set(saved_);
#endif
  }
  FlushDenormalsGuard(const FlushDenormalsGuard&) = delete;
  FlushDenormalsGuard& operator=(const FlushDenormalsGuard&) = delete;

 private:
#ifdef BIGMODEL_HAS_MXCSR
  static constexpr unsigned int kFtzDaz = 0x8040;  // MXCSR bit 15 (flush to zero), bit 6 (DAZ)

  void set(unsigned int mode) const {
    _mm_setcsr(mode);
#ifdef _OPENMP
    if (team_ && !at::in_parallel_region()) {
#pragma omp parallel num_threads(at::get_num_threads())
      _mm_setcsr(mode);
    }
#endif
  }
  unsigned int saved_ = 0;
  bool team_ = true;
  bool active_ = false;
#endif
};

}  // namespace bigmodel
