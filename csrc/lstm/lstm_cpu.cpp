// CPU kernels of the fused LSTM layer (contract in lstm.h).
//
// Forward: one GEMM projects every step's input at once (into the gate buffer); then per step one
// GEMM adds h_{t-1} W_hh^T to the b_t running rows and one vectorized pass applies the gate
// nonlinearities, the cell update and h = o * tanh(c), in place. Backward walks the steps in the
// opposite order with the pointwise derivative fused into one pass and one GEMM for dh_{t-1}; the
// input and weight gradients are time-batched GEMMs after the loop.
//
// Two implementations of the time loop share the ops' set-up and the time-batched GEMMs:
//  * fast (lstm_cpu_fast.cpp): the GEMM core's AVX-512 micro-kernels with the gate math fused into
//    each tile's epilogue, one parallel region for the whole loop; float32 and bfloat16, no
//    projection. Chosen when the CPU has AVX-512 (AVX512-BF16 for bfloat16 input) or AVX2.
//  * generic (below): per step gemm::rowmajor (ATen's BLAS) and a vectorized pointwise pass; every
//    dtype and proj_size, any CPU. BIGMODEL_CPU_KERNEL=generic forces it.
// A float32 single step of at most eight rows (nn.LSTMCell in a decoding loop) takes neither: the
// step kernels below (at::vec, any CPU) read the weights as stored, once, forward and backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unistd.h>

#include "common/checks.h"
#include "common/denormals.h"
#include "common/barrier.h"
#include "common/gemm/blas.h"
#include "common/gemm/pack.h"
#include "common/pool.h"
#include "lstm/lstm.h"
#include "lstm/lstm_cpu_fast.h"

namespace bigmodel::lstm {
namespace {

using at::Tensor;
using at::vec::Vectorized;

// exp_u20 is ATen's fast exp (about 20 ulp for float; the exact exp for double): the gate math is
// bound by these transcendentals, and 20 ulp is far inside float32's tolerance for an LSTM. It turns
// a NaN into a finite value, so NaN lanes are passed through explicitly (a diverged model must show
// NaN, as nn.LSTM does).
template <typename T>
inline Vectorized<T> vsigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return Vectorized<T>::blendv(one / (one + x.neg().exp_u20()), x, x.isnan());
}

// tanh(x) = 2 sigmoid(2x) - 1, on the same fast exp. Absolute error stays at float rounding level.
template <typename T>
inline Vectorized<T> vtanh(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1)), two(T(2));
  return Vectorized<T>::blendv(two / (one + (x * Vectorized<T>(T(-2))).exp_u20()) - one, x, x.isnan());
}

// Applies `body(k, n)` over [0, H) in vector-width chunks; the tail chunk has n < width.
template <typename T, typename F>
inline void for_each_chunk(int64_t H, const F& body) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t k = 0;
  for (; k + W <= H; k += W) body(k, W);
  if (k < H) body(k, H - k);
}

// One row of the forward gate math. `g` holds the 4H pre-activations (input and recurrent
// projections, without bias); with kTrain they are overwritten by the activated gates.
template <typename T, bool kTrain>
inline void gates_forward_row(T* g, const T* bias, T* c, T* h, T* cell_out, int64_t H) {
  using V = Vectorized<T>;
  for_each_chunk<T>(H, [&](int64_t k, int64_t n) {
    V gi = V::loadu(g + k, n), gf = V::loadu(g + H + k, n);
    V gg = V::loadu(g + 2 * H + k, n), go = V::loadu(g + 3 * H + k, n);
    if (bias != nullptr) {
      gi = gi + V::loadu(bias + k, n);
      gf = gf + V::loadu(bias + H + k, n);
      gg = gg + V::loadu(bias + 2 * H + k, n);
      go = go + V::loadu(bias + 3 * H + k, n);
    }
    const V i = vsigmoid(gi), f = vsigmoid(gf), gt = vtanh(gg), o = vsigmoid(go);
    const V cn = f * V::loadu(c + k, n) + i * gt;
    const V hn = o * vtanh(cn);
    cn.store(c + k, n);
    hn.store(h + k, n);
    if constexpr (kTrain) {
      i.store(g + k, n);
      f.store(g + H + k, n);
      gt.store(g + 2 * H + k, n);
      o.store(g + 3 * H + k, n);
      cn.store(cell_out + k, n);
    }
  });
}

// One row of the backward gate math: from dh (w.r.t. o*tanh(c)) and the running dc, writes the
// pre-activation gradients and carries dc to the previous step. With hpre != nullptr also stores
// o*tanh(c) (the projection's input, for grad_w_hr).
template <typename T>
inline void gates_backward_row(const T* g, const T* cell, const T* cprev, const T* dh, T* dc, T* dg,
                               T* hpre, int64_t H) {
  using V = Vectorized<T>;
  const V one(T(1));
  for_each_chunk<T>(H, [&](int64_t k, int64_t n) {
    const V i = V::loadu(g + k, n), f = V::loadu(g + H + k, n);
    const V gt = V::loadu(g + 2 * H + k, n), o = V::loadu(g + 3 * H + k, n);
    const V tc = vtanh(V::loadu(cell + k, n));
    const V dhv = V::loadu(dh + k, n);
    const V dcv = V::loadu(dc + k, n) + dhv * o * (one - tc * tc);
    (dhv * tc * o * (one - o)).store(dg + 3 * H + k, n);
    (dcv * gt * i * (one - i)).store(dg + k, n);
    (dcv * V::loadu(cprev + k, n) * f * (one - f)).store(dg + H + k, n);
    (dcv * i * (one - gt * gt)).store(dg + 2 * H + k, n);
    (dcv * f).store(dc + k, n);
    if (hpre != nullptr) (o * tc).store(hpre + k, n);
  });
}

// Rows per parallel chunk so that each chunk holds a few thousand elements.
inline int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, row_elems)); }

// Steps per parallel chunk for the layout copies: a thread team only for at least 64 KiB a chunk.
inline int64_t step_grain(int64_t B, size_t row_bytes) {
  return std::max<int64_t>(1, int64_t(65536 / std::max<size_t>(1, B * row_bytes)));
}

struct ForwardBuffers {
  const void* w_hh;
  const void* w_hr;
  const void* bias;
  void* gates;  // [N, 4H], holds x W_ih^T on entry
  void* cells;  // [T*B, H] (train) or nullptr
  void* h;      // [B, P] running state, sorted rows
  void* c;      // [B, H]
  void* hout;   // [N, P] packed output
  void* hpre;   // [B, H] (proj) or nullptr
};

template <typename T, bool kTrain>
void forward_loop(const PackPlan& p, const Dims& d, bool reverse, const ForwardBuffers& buf) {
  const int64_t G = 4 * d.H, H = d.H, P = d.P;
  const T* w_hh = static_cast<const T*>(buf.w_hh);
  const T* w_hr = static_cast<const T*>(buf.w_hr);
  const T* bias = static_cast<const T*>(buf.bias);
  T* gates = static_cast<T*>(buf.gates);
  T* cells = static_cast<T*>(buf.cells);
  T* h = static_cast<T*>(buf.h);
  T* c = static_cast<T*>(buf.c);
  T* hout = static_cast<T*>(buf.hout);
  T* hpre = static_cast<T*>(buf.hpre);
  for (int64_t s = 0; s < d.T; ++s) {
    const int64_t t = reverse ? d.T - 1 - s : s;
    const int64_t b = p.batch_sizes[t], off = p.offsets[t];
    T* gt = gates + off * G;
    gemm::rowmajor<T>(false, true, b, G, P, T(1), h, P, w_hh, P, T(1), gt, G);
    at::parallel_for(0, b, row_grain(G), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        T* hdst = d.proj ? hpre + j * H : hout + (off + j) * P;
        gates_forward_row<T, kTrain>(gt + j * G, bias, c + j * H, hdst,
                                     kTrain ? cells + (off + j) * H : nullptr, H);
        if (!d.proj) std::memcpy(h + j * P, hdst, P * sizeof(T));
      }
    });
    if (d.proj) {
      gemm::rowmajor<T>(false, true, b, P, H, T(1), hpre, H, w_hr, H, T(0), hout + off * P, P);
      std::memcpy(h, hout + off * P, b * P * sizeof(T));
    }
  }
}

struct BackwardBuffers {
  const void* w_hh;
  const void* w_hr;
  const void* gates;     // [N, 4H] activated
  const void* cells;     // [N, H]
  const void* c0;        // [B, H] sorted rows
  const void* grad_out;  // [N, P] packed, or nullptr
  void* dh;              // [B, P] running, starts as grad_h_n
  void* dc;              // [B, H] running, starts as grad_c_n
  void* dgates;          // [N, 4H]
  void* dh_all;          // [N, P] (proj) or nullptr
  void* hpre_all;        // [N, H] (proj) or nullptr
  void* dhp;             // [B, H] (proj) or nullptr
};

template <typename T>
void backward_loop(const PackPlan& p, const Dims& d, bool reverse, const BackwardBuffers& buf) {
  using V = Vectorized<T>;
  const int64_t G = 4 * d.H, H = d.H, P = d.P;
  const T* w_hh = static_cast<const T*>(buf.w_hh);
  const T* w_hr = static_cast<const T*>(buf.w_hr);
  const T* gates = static_cast<const T*>(buf.gates);
  const T* cells = static_cast<const T*>(buf.cells);
  const T* c0 = static_cast<const T*>(buf.c0);
  const T* gout = static_cast<const T*>(buf.grad_out);
  T* dh = static_cast<T*>(buf.dh);
  T* dc = static_cast<T*>(buf.dc);
  T* dgates = static_cast<T*>(buf.dgates);
  T* dh_all = static_cast<T*>(buf.dh_all);
  T* hpre_all = static_cast<T*>(buf.hpre_all);
  T* dhp = static_cast<T*>(buf.dhp);
  for (int64_t s = d.T - 1; s >= 0; --s) {
    const int64_t t = reverse ? d.T - 1 - s : s;
    const int64_t b = p.batch_sizes[t], off = p.offsets[t];
    if (gout != nullptr || d.proj) {
      at::parallel_for(0, b, row_grain(P), [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          T* dst = dh + j * P;
          if (gout != nullptr) {
            const T* src = gout + (off + j) * P;
            for_each_chunk<T>(P, [&](int64_t k, int64_t n) {
              (V::loadu(dst + k, n) + V::loadu(src + k, n)).store(dst + k, n);
            });
          }
          if (d.proj) std::memcpy(dh_all + (off + j) * P, dst, P * sizeof(T));
        }
      });
    }
    const T* dh_pre = dh;
    if (d.proj) {
      gemm::rowmajor<T>(false, false, b, H, P, T(1), dh, P, w_hr, H, T(0), dhp, H);
      dh_pre = dhp;
    }
    at::parallel_for(0, b, row_grain(G), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t pr = p.prev_row(t, j, reverse);
        const T* cprev = pr >= 0 ? cells + pr * H : c0 + j * H;
        gates_backward_row<T>(gates + (off + j) * G, cells + (off + j) * H, cprev, dh_pre + j * H, dc + j * H,
                              dgates + (off + j) * G, d.proj ? hpre_all + (off + j) * H : nullptr, H);
      }
    });
    gemm::rowmajor<T>(false, false, b, P, G, T(1), dgates + off * G, G, w_hh, P, T(0), dh, P);
  }
}

// ---- layout helpers: padded [T, B, F] <-> packed [N, F], and sorted rows ----

Tensor to_packed(const Tensor& padded, const PackPlan& p, at::ScalarType ct) {
  const int64_t F = padded.size(2);
  Tensor src = padded;
  if (src.scalar_type() != ct || !src.is_contiguous()) {  // e.g. the expanded ones of out.sum()
    src = pooled_empty(padded.sizes(), ct);
    src.copy_(padded);
  }
  if (p.identity) return src.view({p.N, F});
  Tensor dst = pooled_empty({p.N, F}, ct);
  const size_t row = F * src.element_size();
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* o = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, p.T, step_grain(p.B, row), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < p.batch_sizes[t]; ++j)
        std::memcpy(o + (p.offsets[t] + j) * row, s + (t * p.B + p.order[j]) * row, row);
  });
  return dst;
}

Tensor from_packed(const Tensor& packed, const PackPlan& p, at::ScalarType dtype) {
  const int64_t F = packed.size(1);
  if (p.identity) return packed.view({p.T, p.B, F}).to(dtype);
  Tensor dst = pooled_empty({p.T, p.B, F}, packed.scalar_type());
  const size_t row = F * packed.element_size();
  const char* s = static_cast<const char*>(packed.const_data_ptr());
  char* o = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, p.T, step_grain(p.B, row), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < p.B; ++j) {
        char* d = o + (t * p.B + p.order[j]) * row;
        if (j < p.batch_sizes[t])
          std::memcpy(d, s + (p.offsets[t] + j) * row, row);
        else
          std::memset(d, 0, row);
      }
  });
  return dst.to(dtype);
}

Tensor order_tensor(const PackPlan& p) {
  return at::from_blob(const_cast<int64_t*>(p.order.data()), {p.B}, at::kLong).clone();
}

// `t` in compute dtype with rows in sorted order, for reading only: `t` itself where it already is.
Tensor rows_sorted_readonly(const Tensor& t, const PackPlan& p, at::ScalarType ct) {
  Tensor r = t.to(ct);
  return p.identity ? r.contiguous() : r.index_select(0, order_tensor(p));
}

// A fresh [B, F] copy of `t` in compute dtype with rows in sorted order (safe to update in place).
Tensor rows_sorted(const Tensor& t, const PackPlan& p, at::ScalarType ct) {
  Tensor r = rows_sorted_readonly(t, p, ct);  // index_select already made a copy
  return p.identity ? r.clone() : r;
}

Tensor rows_original(const Tensor& t, const PackPlan& p, at::ScalarType dtype) {
  if (p.identity) return t.to(dtype);
  return at::empty_like(t).index_copy_(0, order_tensor(p), t).to(dtype);
}

// ---- the fast path's set-up ----

// Which fused micro-kernel loop runs this layer, if any: none with a projection; float32 layers on
// AVX-512, else AVX2; bf16 layers on AMX tiles, else on AVX-512: vdpbf16ps tiles (Avx512) where the
// CPU has AVX512-BF16 and that instruction pays, else float32 FMA tiles over bf16 storage
// (Avx512Fp32: CPUs whose vdpbf16ps is slow, gemm::cpu::bf16_dot_pays, and AVX-512 CPUs without
// AVX512-BF16); an AVX2 CPU runs bf16 on its float32 tiles too, the output and saved gates and cells
// stored as bf16 (the bf16 choice is gemm::cpu::bf16_kernel, shared with the attention).
// BIGMODEL_CPU_KERNEL=avx512 and avx512-fp32 pick one of the two bf16 loops (off AMX); avx2 picks the
// AVX2 loop as an AVX2-only CPU would.
enum class FastKernels { None, Amx, Avx512, Avx512Fp32, Avx2 };

FastKernels fast_kernels(const Dims& d, at::ScalarType input_dtype, at::ScalarType ct) {
  if (d.proj || ct != at::kFloat) return FastKernels::None;
  if (input_dtype == at::kBFloat16) {
    switch (gemm::cpu::bf16_kernel()) {
      case gemm::cpu::Bf16Kernel::Amx:
        return FastKernels::Amx;
      case gemm::cpu::Bf16Kernel::Dot:
        return FastKernels::Avx512;
      case gemm::cpu::Bf16Kernel::Fp32Tiles:
        return FastKernels::Avx512Fp32;
      case gemm::cpu::Bf16Kernel::None:  // no AVX-512: the AVX2 float32 tiles over bf16 storage
        return gemm::cpu::kernel_choice() != gemm::cpu::KernelChoice::Generic && gemm::cpu::has_avx2()
                   ? FastKernels::Avx2
                   : FastKernels::None;
    }
  }
  switch (gemm::cpu::kernel_choice()) {
    case gemm::cpu::KernelChoice::Generic:
      return FastKernels::None;
    case gemm::cpu::KernelChoice::Avx2:
      return FastKernels::Avx2;
    case gemm::cpu::KernelChoice::Avx512:
    case gemm::cpu::KernelChoice::Avx512Fp32:
      return FastKernels::Avx512;
    case gemm::cpu::KernelChoice::Auto:
      break;
  }
  if (gemm::cpu::has_avx512()) return FastKernels::Avx512;
  return gemm::cpu::has_avx2() ? FastKernels::Avx2 : FastKernels::None;
}

// Three quarters of a worker's L2 (the rest holds h, x and the outputs of its rows).
int64_t l2_budget() {
  static const int64_t budget = [] {
    long l2 = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return int64_t(l2 > 0 ? l2 : 1 << 20) * 3 / 4;
  }();
  return budget;
}

// Calls of this file's CPU ops running now, from any of the caller's threads (several Python
// threads serving one model, say). Each call's parallel regions get their own OpenMP
// team, so two calls of all threads each would put twice as many workers as cores on their
// per-step barriers; a call takes its share of the intra-op threads instead. Two Python threads
// each making 20 inference calls side by side on 2 cores (T = 64, B = 16, I = 100, H = 200): 213 ms
// with a team of 2 a call, 147 ms with the share (training 311 -> 241 ms; NOTES v33). A lone call
// takes every thread, as before.
std::atomic<int64_t> calls_in_flight{0};

// The calling thread's share, fixed when its call starts (0: no call on this thread), so that the
// grid, the step kernels' team and the denormal guard of one call agree.
thread_local int64_t call_threads = 0;

struct InFlight {
  InFlight() : outer_(call_threads) {
    const int64_t calls = calls_in_flight.fetch_add(1, std::memory_order_relaxed) + 1;
    call_threads = std::max<int64_t>(1, at::get_num_threads() / calls);
  }
  ~InFlight() {
    calls_in_flight.fetch_sub(1, std::memory_order_relaxed);
    call_threads = outer_;
  }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

 private:
  const int64_t outer_;
};

// The intra-op threads this call may use.
int64_t team_threads() { return call_threads > 0 ? call_threads : std::max<int64_t>(1, at::get_num_threads()); }

// Bytes of weights a worker may stream every step and still find close by: its L2 budget and, on
// AMD, three quarters of its 4 MiB share of the L3 too. Zen's L3 (4 MiB per core on Zen 2 to 4)
// feeds a step's weights nearly as fast as the L2: on a Zen 4 VM (1 MiB L2) row groups streaming
// 1-3 MiB of panels from it beat column groups (seed training 168-210 -> 135 ms, 2L-bidir 880 ->
// 742 ms; NOTES v19). On the Intel hosts a tile streaming its panel from L3 ran at 64 GFLOP/s against
// 167-174 from L2 (v13), so there the L2 alone is the limit.
int64_t stream_budget() {
  static const int64_t budget = [] {
    int64_t bytes = l2_budget();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_is("amd")) bytes += (int64_t(4) << 20) * 3 / 4;
#endif
    return bytes;
  }();
  return budget;
}

// Row groups where possible: batch rows need no synchronisation, but every row group streams all
// `stream_bytes` of the packed weights each step. Column groups (one barrier per step) split the
// weights instead: used when the weights do not fit a worker's L2 (the whole step would stream
// from L3), or when the batch is too small to give every thread a row block. Column groups need
// at::parallel_for to run its invocations concurrently (OpenMP); elsewhere a barrier could wait on
// a queued task, so there the grid is rows only.
// fill_blocks (the AVX-512 and AVX2 forwards, the AVX2 backward): also column groups when row groups
// would leave each worker's rows in blocks of under block_rows - 1 that one group's full-batch blocks
// fill better (B = 16 on two threads: 4 + 4 rows per worker against 6 + 5 + 5; AVX-512 inference
// 1.11-1.34x faster at B = 14-26, NOTES v20; AVX2 on Zen 3, T = 128, I = H = 128: inference B = 16
// 5.28 -> 3.81 ms, B = 26 7.86 -> 6.13, training with the backward on column groups too (its weight
// gradients by BLAS after the loop) B = 16 14.55 -> 11.77, B = 26 21.81 -> 18.92, NOTES v29). The
// AVX-512 backward keeps row groups there (fused weight gradients; not measured the other way).
// tall (the float32 AVX-512 forward): where blocks would still average under block_rows - 1 rows,
// blocks of up to kTallRows rows (forward_tile_tall, two passes per panel) when that makes them larger
// than block_rows: B = 7, 8 as one block (column groups), B = 13, 14 as one block per row group. The
// tall tile runs ~6% under the 6-row one at equal blocks (B = 24 forced: 8.2-8.5 vs 7.6-7.9 ms), so
// only where it replaces small blocks (B = 8: 1.3-1.5x faster, B = 13, 14: 1.1-1.3x; NOTES v21).
fast::Grid choose_grid(int64_t B, int64_t col_panels, int64_t stream_bytes, int64_t block_rows = 6,
                       bool fill_blocks = false, bool tall = false) {
  const int64_t nt = team_threads();
  fast::Grid g;
  g.rows = block_rows;
#if AT_PARALLEL_OPENMP
  // Row groups for blocks of up to `rows` rows, halved while each group would stream more than the budget.
  const auto row_groups = [&](int64_t rows) {
    int64_t R = std::max<int64_t>(1, std::min(nt, (B + rows - 1) / rows)), bytes = stream_bytes;
    while (R > 1 && bytes > stream_budget()) {  // trade row groups for column groups
      R = (R + 1) / 2;
      bytes /= 2;
    }
    return R;
  };
  // Rows per block when each of R groups splits its rows evenly into blocks of up to `rows`.
  const auto mean_block = [&](int64_t R, int64_t rows) {
    const int64_t n = (B + R - 1) / R;
    return double(n) / double((n + rows - 1) / rows);
  };
  g.R = row_groups(block_rows);
  if (fill_blocks && g.R > 1 && mean_block(g.R, block_rows) < double(block_rows - 1) &&
      mean_block(1, block_rows) > mean_block(g.R, block_rows))
    g.R = 1;
  if (tall && mean_block(g.R, block_rows) < double(block_rows - 1)) {
    const int64_t R = row_groups(fast::kTallRows);
    if (mean_block(R, fast::kTallRows) > double(block_rows)) {
      g.R = R;
      g.rows = fast::kTallRows;
    }
  }
  g.C = std::max<int64_t>(1, std::min(nt / g.R, col_panels));
#else
  (void)stream_bytes, (void)fill_blocks, (void)tall;
  g.R = std::max<int64_t>(1, std::min(nt, (B + block_rows - 1) / block_rows));
#endif
  return g;
}

template <typename F>
void run_grid(const fast::Grid& g, const F& worker) {
  at::parallel_for(0, g.R * g.C, 1, [&](int64_t w0, int64_t w1) { worker(w0, w1); });
}

fast::Steps steps_of(const PackPlan& p, const Dims& d, bool reverse) {
  return fast::Steps{d.T, d.B, d.H, p.batch_sizes.data(), p.offsets.data(), reverse};
}

// The running state of the fast loops is kept in row-group-major order (fast::state_row): sorted row j
// lives at row perm[j] of a [R * ceil(B / R), F] buffer. The conversions below are plain row copies,
// not index tensors and index_copy_ / index_select: a T = 1 call (nn.LSTMCell) made ~15 ATen calls of
// 3-8 us each around ~190 us of math (NOTES v30).
std::vector<int64_t> state_order(int64_t B, const fast::Grid& g, int64_t state_rows) {
  std::vector<int64_t> perm(B);
  for (int64_t j = 0; j < B; ++j) perm[j] = fast::state_row(j, g, state_rows);
  return perm;
}

// Fills `out` ([rows, F], contiguous) as a state buffer: row perm[j] holds row order[j] of src ([B, n],
// original batch order, n <= F) in its first n columns, converted to out's dtype; every other element
// is zero (no src: all zero).
void fill_state_order(const Tensor& out, const std::optional<Tensor>& src, const PackPlan& p,
                      const std::vector<int64_t>& perm) {
  const int64_t rows = out.size(0), F = out.size(1), es = out.element_size();
  char* o = static_cast<char*>(out.data_ptr());
  if (!src.has_value()) {
    std::memset(o, 0, rows * F * es);
    return;
  }
  const Tensor s = src->to(out.scalar_type()).contiguous();
  const int64_t n = s.size(1);
  std::vector<int64_t> from(rows, -1);
  for (int64_t j = 0; j < p.B; ++j) from[perm[j]] = p.order[j];
  const char* sp = static_cast<const char*>(s.const_data_ptr());
  for (int64_t r = 0; r < rows; ++r) {
    char* d = o + r * F * es;
    const int64_t copied = from[r] >= 0 ? n : 0;
    if (copied > 0) std::memcpy(d, sp + from[r] * n * es, copied * es);
    std::memset(d + copied * es, 0, (F - copied) * es);
  }
}

Tensor to_state_order(const std::optional<Tensor>& src, const PackPlan& p, const std::vector<int64_t>& perm,
                      int64_t rows, int64_t F, at::ScalarType dtype) {
  Tensor out = at::empty({rows, F}, dtype);
  fill_state_order(out, src, p, perm);
  return out;
}

// [B, F] in original batch order and `dtype` from rows of `rows_of` ([*, >= F]): row order[j] is
// row src_row(j)'s first F columns.
template <typename SrcRow>
Tensor gather_original(const Tensor& rows_of, const PackPlan& p, int64_t F, at::ScalarType dtype,
                       const SrcRow& src_row) {
  Tensor out = at::empty({p.B, F}, rows_of.scalar_type());
  const int64_t es = out.element_size(), ld = rows_of.size(1);
  const char* sp = static_cast<const char*>(rows_of.const_data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  for (int64_t j = 0; j < p.B; ++j) std::memcpy(o + p.order[j] * F * es, sp + src_row(j) * ld * es, F * es);
  return out.to(dtype);
}

// A running state ([rows, >= F] at perm) back in original batch order.
Tensor from_state_order(const Tensor& state, const PackPlan& p, const std::vector<int64_t>& perm, int64_t F,
                        at::ScalarType dtype) {
  return gather_original(state, p, F, dtype, [&](int64_t j) { return perm[j]; });
}

// h_n from the packed output, in original batch order: sorted row j's state after its last processed
// step.
Tensor last_states(const Tensor& hout, const PackPlan& p, bool reverse, at::ScalarType dtype) {
  return gather_original(hout, p, hout.size(1), dtype, [&](int64_t j) {
    int64_t t = 0;  // reverse: every sequence ends at step 0
    if (!reverse) {
      int64_t len = 0;
      while (len < p.T && p.batch_sizes[len] > j) ++len;
      t = len - 1;
    }
    return p.offsets[t] + j;
  });
}

// Whether the AVX2 forward takes x W_ih^T + b from one GEMM before the loop (ForwardArgs::gx) rather
// than streaming [W_hh; W_ih] every step, given the bytes of panels a worker would stream and the batch
// rows it multiplies them by: where they are over half its L2 budget and over a quarter of it per row
// (the GEMM's [N, 4H] output, written once and read once, costs bytes per row; the stream it saves is
// shared by the worker's rows). Measured on Zen 3 (2 threads, NOTES v27, v29): H = I = 1024, B = 8 / 32
// inference 1.73x / 1.35x faster, training 1.22x / 1.05x; H = I = 512 1.12-1.27x / 1.07-1.10x; H = I =
// 256 (2 MiB a worker) B = 8 1.16x, B = 32 (16 rows a worker) 1.05x, but B = 64 (32 rows) 0.96x; the
// seed shape (1 MiB, 32 rows) inference 0.92x, training 0.98x, B = 32 0.96-0.99x: those keep the fused
// tiles. Few rows at the seed's I and H (column groups, 0.5 MiB a worker, where W_hh's 0.33 MiB alone
// fits the L2; v32): B = 1 inference 1.29x, B = 2-4 1.07-1.09x, B = 6 0.99x (off), training 1.00-1.06x;
// I = 32, H = 64 (50 KiB) 0.91x, so tiny weights keep the tiles. The AVX-512 tiles have not been
// measured this way (no AVX-512 host in those sessions).
// BIGMODEL_LSTM_INPUT_GEMM=on / off forces the choice either way (read on every call, for tests and
// benchmarks), auto (or unset) decides as above.
bool pre_x_wanted(int64_t worker_bytes, int64_t worker_rows) {
  const char* e = std::getenv("BIGMODEL_LSTM_INPUT_GEMM");
  const std::string mode = e != nullptr ? e : "auto";
  TORCH_CHECK(mode == "auto" || mode == "on" || mode == "off",
              "BIGMODEL_LSTM_INPUT_GEMM must be 'auto', 'on' or 'off', got '", mode, "'");
  if (mode != "auto") return mode == "on";
  return worker_bytes > l2_budget() / 2 && 4 * worker_bytes > worker_rows * l2_budget();
}

// The AVX2 tiles' panels: `pack` writes [np, K, 64] panels into a zeroed scratch (from the buffer
// cache: a fresh MiB would page-fault on every repack of a training step), whose four 16-column
// quarters per panel then go to `out` as contiguous [K, 16] strips ([np, 4, K, 16]), so that a
// quarter tile streams one strip rather than a quarter of every 256-byte panel row (NOTES v27, v30).
template <typename Pack>
void pack_as_strips(const Tensor& out, int64_t np, int64_t K, const Pack& pack) {
  Tensor panels = pooled_empty({np, K, gemm::kPanel}, at::kFloat).zero_();
  pack(panels.data_ptr<float>());
  out.view({np, 4, K, 16}).copy_(panels.view({np, K, 4, 16}).permute({0, 2, 1, 3}));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_fast(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const Dims& d, const PackPlan& p,
    bool reverse, bool train, FastKernels kernels) {
  const bool avx2 = kernels == FastKernels::Avx2;  // float32 tiles (a bf16 layer's output stored as bf16)
  const bool amx = kernels == FastKernels::Amx;  // bf16 only
  // A bf16 layer on float32 FMA tiles (wide, or the AVX2 tiles): x, h and the weights widened to
  // float32 (once per call), the output and the saved gates and cells stored as bf16 by the epilogue.
  // Everything below that concerns the tiles' operands follows `bf16` (bf16 tiles: vdpbf16ps or AMX).
  const bool wide = kernels == FastKernels::Avx512Fp32;
  const bool bf16 = input.scalar_type() == at::kBFloat16 && !wide && !avx2;
  const at::ScalarType st = bf16 ? at::kBFloat16 : at::kFloat;  // storage of x and h
  const at::ScalarType out_st = input.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;  // of the output
  const int64_t G = 4 * d.H;
  // bf16 reads k in pairs and AMX in blocks of 32: h and x rows are zero-padded to that length.
  const int64_t kq = amx ? 32 : bf16 ? 2 : 1;
  const int64_t Kh = (d.H + kq - 1) / kq * kq;
  const int64_t col_panels = (d.H + 15) / 16;
  // AMX: row groups of 16 rows rather than column groups where B = 32 in training (long shape, bf16:
  // forward with gates 27 -> 20-23 ms); inference keeps 32-row blocks (13.7-15.0 against 15.3-15.7 ms).
  const int64_t amx_rows = train ? 16 : fast::kAmxRows;
  const auto grid_for = [&](int64_t bytes) {
    return choose_grid(d.B, col_panels, bytes, amx ? amx_rows : avx2 ? fast::kAvx2GateRows : 6, !amx,
                       !amx && !avx2 && !bf16);
  };
  // The tiles multiply [h_{t-1}, x_t] by [W_hh; W_ih], so every step streams both weights. Where a
  // worker's share of them is too big to stay in its caches (pre_x_wanted), the AVX2 tiles take
  // x W_ih^T + b for all steps from one GEMM before the loop instead and stream W_hh alone.
  const int64_t Kx_full = (d.I + kq - 1) / kq * kq;
  const int64_t full_bytes = col_panels * gemm::kPanel * (Kh + Kx_full) * (bf16 ? 2 : 4);
  const fast::Grid full_grid = grid_for(full_bytes);
  const bool pre_x =  // (a bad setting errors everywhere)
      pre_x_wanted(full_bytes / full_grid.C, (d.B + full_grid.R - 1) / full_grid.R) && avx2;
  const int64_t Kx = pre_x ? 0 : Kx_full;
  const int64_t panel_bytes = pre_x ? col_panels * gemm::kPanel * Kh * 4 : full_bytes;
  const fast::Grid grid = pre_x ? grid_for(panel_bytes) : full_grid;
  // AMX tiles load whole 16-row blocks at a row stride of R: give x and h that many rows of slack.
  const int64_t slack = amx ? fast::kAmxRows * grid.R : 0;

  Tensor x = to_packed(input, p, st);
  if (!pre_x && (Kx != d.I || slack > 0)) x = at::constant_pad_nd(x, {0, Kx - d.I, 0, slack});
  // B = [W_hh, 0, W_ih, 0] as [4H, Kh + Kx]: one tile multiplies [h_{t-1}, x_t] by both weights.
  // float32 on AVX-512 runs a last panel of at most 8 units as a half-width tile (3.8% of the FMAs at
  // H = 200). Cache kind: kq (1 float32 on AVX2, strips; 2 bf16 pairs, 32 AMX), 4 float32 on AVX-512 (the
  // half-width panel); W_hh alone (pre_x, AVX2) 5; 0 and -32 are the backward's packings.
  const bool half = !bf16 && !avx2;
  // K rows are h's H, then x's I (each zero-padded to Kh, Kx), packed part by part into zeroed panels:
  // float32 [np, Kh + Kx, 64], bf16 k pairs [np, (Kh + Kx) / 2, 64, 2].
  const gemm::ColumnMap cols = avx2 ? gemm::gate_half_grouped_columns(d.H) : gemm::gate_grouped_columns(d.H, half);
  const int64_t np = int64_t(cols.size()) / gemm::kPanel;
  const auto pack = [&](Tensor& out) {
    if (avx2) {
      pack_as_strips(out, np, Kh + Kx, [&](float* panels) {
        gemm::pack_f32_into(panels, Kh + Kx, 0, w_hh, true, cols);
        if (!pre_x) gemm::pack_f32_into(panels, Kh + Kx, Kh, w_ih, true, cols);
      });
    } else if (bf16) {
      gemm::pack_bf16_into(out.data_ptr<int16_t>(), (Kh + Kx) / 2, 0, w_hh, true, cols);
      gemm::pack_bf16_into(out.data_ptr<int16_t>(), (Kh + Kx) / 2, Kh, w_ih, true, cols);
    } else {
      gemm::pack_f32_into(out.data_ptr<float>(), Kh + Kx, 0, w_hh, true, cols);
      gemm::pack_f32_into(out.data_ptr<float>(), Kh + Kx, Kh, w_ih, true, cols);
    }
  };
  const std::vector<int64_t> sizes = bf16 ? std::vector<int64_t>{np, (Kh + Kx) / 2, gemm::kPanel, 2}
                                          : std::vector<int64_t>{np, Kh + Kx, gemm::kPanel};
  Tensor panels = pre_x ? gemm::cached_pack({w_hh}, /*kind=*/5, sizes, at::kFloat, pack)
                        : gemm::cached_pack({w_hh, w_ih}, half ? 4 : kq, sizes, bf16 ? at::kShort : at::kFloat, pack);
  Tensor bias = d.bias ? (b_ih->to(at::kFloat) + b_hh->to(at::kFloat)).contiguous() : Tensor();
  // h and c in row-group-major order (fast::state_row); h has the AMX slack rows after them.
  const int64_t state_rows = (d.B + grid.R - 1) / grid.R;
  const std::vector<int64_t> perm = state_order(d.B, grid, state_rows);
  const int64_t hrows = grid.R * state_rows + slack;
  Tensor h = at::empty({2, hrows, Kh}, st);  // both halves start as h0
  fill_state_order(h.select(0, 0), h0, p, perm);
  std::memcpy(h.select(0, 1).data_ptr(), h.select(0, 0).const_data_ptr(), hrows * Kh * h.element_size());
  Tensor c = to_state_order(c0, p, perm, grid.R * state_rows, d.H, at::kFloat);
  // Saved for backward in the layer's saved dtype: bf16 on the bf16 path (cell_update stores them so).
  const at::ScalarType saved = cpu_saved_dtype(input.scalar_type());
  Tensor gates = train ? pooled_empty({d.T * d.B, G}, saved) : at::empty({0}, saved);
  Tensor cells = train ? pooled_empty({d.T * d.B, d.H}, saved) : at::empty({0}, saved);
  Tensor hout = pooled_empty({p.N, d.H}, out_st);
  // x W_ih^T + b: in the float32 gate buffer where there is one (each row's gates overwrite its own
  // pre-activations), else in a buffer of its own.
  Tensor gx;
  if (pre_x) {
    gx = train && saved == at::kFloat ? gates.narrow(0, 0, p.N) : pooled_empty({p.N, G}, at::kFloat);
    const Tensor w = w_ih.to(at::kFloat);
    if (d.bias)
      at::addmm_out(gx, bias, x, w.t());
    else
      at::mm_out(gx, x, w.t());
  }

  fast::ForwardArgs a;
  a.steps = steps_of(p, d, reverse);
  a.panels = panels.const_data_ptr();
  a.half_panel = half ? gemm::half_width_panel(d.H) : -1;
  a.Kh = Kh;
  a.Kx = Kx;
  a.bias = d.bias && !pre_x ? bias.const_data_ptr<float>() : nullptr;
  a.gx = pre_x ? gx.const_data_ptr<float>() : nullptr;
  a.x = x.const_data_ptr();
  a.gates = train ? gates.data_ptr() : nullptr;
  a.cells = train ? cells.data_ptr() : nullptr;
  a.c = c.data_ptr<float>();
  a.h[0] = h.select(0, 0).data_ptr();
  a.h[1] = h.select(0, 1).data_ptr();
  a.state_rows = state_rows;
  a.hout = hout.data_ptr();
  a.grid = grid;
  a.panels_outer = panel_bytes / grid.C > l2_budget() / 2;
  SpinBarrier barrier(a.grid.R * a.grid.C);
  a.barrier = &barrier;
  run_grid(a.grid, [&](int64_t w0, int64_t w1) {
    if (amx)
      fast::forward_amx(a, train, w0, w1);
    else if (bf16)
      fast::forward_bf16(a, train, w0, w1);
    else if (wide)
      fast::forward_f32_bf16_out(a, train, w0, w1);
    else if (avx2 && out_st == at::kBFloat16)
      fast::forward_f32_avx2_bf16_out(a, train, w0, w1);
    else if (avx2)
      fast::forward_f32_avx2(a, train, w0, w1);
    else
      fast::forward_f32(a, train, w0, w1);
  });

  const at::ScalarType dt = input.scalar_type();
  Tensor output = from_packed(hout, p, dt);
  Tensor h_n = last_states(hout, p, reverse, dt);
  Tensor c_n = from_state_order(c, p, perm, d.H, dt);
  if (train && p.N < d.T * d.B) {  // rows past N are capacity, not data; keep the op deterministic
    gates.narrow(0, p.N, d.T * d.B - p.N).zero_();
    cells.narrow(0, p.N, d.T * d.B - p.N).zero_();
  }
  return {output, h_n, c_n, gates, cells};
}

// The fast backward (float32; bf16/fp16 layers compute in float32 here too, except that on AMX or
// vdpbf16ps (bf16_dot) a bf16 layer's [dh, dx] tiles and fused weight-gradient updates multiply dgates
// rounded to bf16).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_fast(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_h_n,
    const std::optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& output, const Tensor& gates, const Tensor& cells,
    bool reverse, bool has_bias, bool input_grad, const Dims& d, const PackPlan& p, FastKernels kernels,
    bool bf16_dot) {
  const at::ScalarType f32 = at::kFloat;
  const bool avx2 = kernels == FastKernels::Avx2;
  const bool amx = kernels == FastKernels::Amx;  // bf16 only
  const bool bf16_tiles = amx || bf16_dot;        // the [dh, dx] tiles read bf16 panels
  const int64_t G = 4 * d.H, H = d.H, F = d.H + d.I;
  const int64_t Fp = (F + gemm::kPanel - 1) / gemm::kPanel * gemm::kPanel;
  Tensor x = to_packed(input, p, f32);
  Tensor hout = to_packed(output, p, f32);
  Tensor gout = grad_output.has_value() ? to_packed(*grad_output, p, f32) : Tensor();
  const Tensor h0s = rows_sorted_readonly(h0, p, f32), c0s = rows_sorted_readonly(c0, p, f32);
  // Without input_grad no dx is formed: the tiles skip the panels past dh (dx columns that share dh's
  // last panel are computed and dropped).
  Tensor dx = input_grad ? pooled_empty({p.N, d.I}, f32) : Tensor();
  // dgates [W_hh, W_ih] gives [dh_{t-1}, dx_t] in one tile pass.
  // (On AMX and vdpbf16ps only the bf16 panels below are read.)
  // Columns 0..H-1 from W_hh, H..H+I-1 from W_ih, packed into zeroed panels.
  const gemm::ColumnMap all = gemm::contiguous_columns(F);
  gemm::ColumnMap from_hh(all.size(), -1), from_ih(all.size(), -1);
  for (size_t c = 0; c < all.size(); ++c) {
    if (all[c] >= 0 && all[c] < H) from_hh[c] = all[c];
    if (all[c] >= H) from_ih[c] = all[c] - H;
  }
  const int64_t np = int64_t(all.size()) / gemm::kPanel;
  // AVX2: as strips, [np, 4, 4H, 16] (cache kind 6).
  const auto pack_into = [&](float* panels) {
    gemm::pack_f32_into(panels, G, 0, w_hh, false, from_hh);
    gemm::pack_f32_into(panels, G, 0, w_ih, false, from_ih);
  };
  const auto pack_panels = [&](Tensor& out) {
    if (avx2)
      pack_as_strips(out, np, G, pack_into);
    else
      pack_into(out.data_ptr<float>());
  };
  Tensor panels = bf16_tiles ? Tensor()
                             : gemm::cached_pack({w_hh, w_ih}, /*kind=*/avx2 ? 6 : 0, {np, G, gemm::kPanel}, f32,
                                                 pack_panels);

  fast::BackwardArgs a;
  Tensor panels_bf16;
  if (bf16_tiles) {  // the same B matrix, K = 4H padded to 32, as bf16 AMX panels (cache kind -32)
    a.Gp = (G + 31) / 32 * 32;
    const auto pack_bf16 = [&](Tensor& out) {  // rows G .. Gp stay zero
      gemm::pack_bf16_into(out.data_ptr<int16_t>(), a.Gp / 2, 0, w_hh, false, from_hh);
      gemm::pack_bf16_into(out.data_ptr<int16_t>(), a.Gp / 2, 0, w_ih, false, from_ih);
    };
    panels_bf16 = gemm::cached_pack({w_hh, w_ih}, -32, {np, a.Gp / 2, gemm::kPanel, 2}, at::kShort, pack_bf16);
    a.panels_bf16 = static_cast<const uint16_t*>(panels_bf16.const_data_ptr());
  }
  a.steps = steps_of(p, d, reverse);
  a.I = d.I;
  a.panels = bf16_tiles ? nullptr : panels.const_data_ptr<float>();
  // Saved gates and cells: bf16 from a bf16 layer's forward, read as such by the pointwise pass.
  a.saved_bf16 = gates.scalar_type() == at::kBFloat16;
  a.gates = gates.const_data_ptr();
  a.cells = cells.const_data_ptr();
  a.c0 = c0s.const_data_ptr<float>();
  a.h0 = h0s.const_data_ptr<float>();
  a.hout = hout.const_data_ptr<float>();
  a.x = x.const_data_ptr<float>();
  a.grad_out = gout.defined() ? gout.const_data_ptr<float>() : nullptr;
  a.dx = input_grad ? dx.data_ptr<float>() : nullptr;
  // Each step streams the [W_hh, W_ih] panels (and, fused, the worker's weight-gradient sums, the
  // same size again: at the seed shape, 2 x 1 MiB, fused on two row groups still measured faster than
  // column groups with the weight gradients left to BLAS, so only the panels count here).
  const int64_t panel_bytes = G * Fp * int64_t(bf16_tiles ? 2 : sizeof(float));
  // AMX: 16-row blocks in the grid choice, so B = 32 splits into two row groups with fused weight
  // gradients on AMX instead of column groups and float32 BLAS (long shape, bf16: 118 -> 53 ms).
  a.grid = choose_grid(d.B, (H + gemm::kPanel - 1) / gemm::kPanel, panel_bytes,
                       amx ? 16 : avx2 ? fast::kAvx2BackwardRows : 6, /*fill_blocks=*/avx2);
  a.state_rows = (d.B + a.grid.R - 1) / a.grid.R;
  const std::vector<int64_t> perm = state_order(d.B, a.grid, a.state_rows);
  const int64_t srows = a.grid.R * a.state_rows;
  Tensor dh = to_state_order(grad_h_n, p, perm, srows, H, f32);
  Tensor dc = to_state_order(grad_c_n, p, perm, srows, H, f32);
  a.dh = dh.data_ptr<float>();
  a.dc = dc.data_ptr<float>();
  // Fused weight gradients keep per-worker [4H, H + I] sums that are written, then reduced, once per
  // call: below ~512 rows that traffic costs more than the BLAS GEMMs after the loop (T = 1 at
  // B = 64: 0.60 vs 0.54 ms; equal from ~T = 8; NOTES v11).
  constexpr int64_t kFusedMinRows = 512;
  const bool fused = a.grid.C == 1 && p.N >= kFusedMinRows;
  const int64_t R = a.grid.R, rows_step = a.state_rows;  // most rows a worker has in one step
  // Updates run when the next step's rows would not fit: with 96 rows of room each update has K >= 64
  // whatever the batch (shrinking batches of short sequences included), and the scratch stays in L2.
  const int64_t rows_cap = std::max<int64_t>(rows_step, 96);
  Tensor dg_s, hx_s, dw_s, dgates;
  // grad_bias, summed by the pointwise pass per row group: fused, into each row group's scratch;
  // otherwise a row group's column groups own disjoint units.
  const Tensor dbias_s = at::zeros({R, G}, f32);
  std::vector<fast::WorkerScratch> scratch;
  if (fused) {
    // From bigmodel's buffer cache: fresh multi-MiB allocations would page-fault on every call.
    dg_s = pooled_empty({R, rows_cap, G}, f32);
    hx_s = pooled_empty({R, Fp / gemm::kPanel, rows_cap, gemm::kPanel}, f32);
    // each worker's first update stores; on AMX the sums are transposed, [Fp, 4H rounded up to 32]
    dw_s = amx ? pooled_empty({R, Fp, a.Gp}, f32) : pooled_empty({R, G, Fp}, f32);
    for (int64_t r = 0; r < R; ++r)
      scratch.push_back({dg_s[r].data_ptr<float>(), hx_s[r].data_ptr<float>(), dw_s[r].data_ptr<float>(),
                         dbias_s[r].data_ptr<float>()});
    a.scratch = scratch.data();
    a.rows_step = rows_step;
    a.rows_cap = rows_cap;
  } else {
    dgates = pooled_empty({p.N, G}, f32);
    a.dgates = dgates.data_ptr<float>();
    a.dbias = dbias_s.data_ptr<float>();
    // Column groups: dgates is kept whole, so dx is one GEMM after the loop rather than panels every
    // step streams beside W_hh's (2L-bidir: a worker's 1-1.5 MiB of [dh, dx] panels; training 35 ms
    // faster per step). Short calls keep their dx tiles (an extra GEMM call costs more at T = 1), and
    // AMX its bf16 ones.
    a.dx_after = !amx && a.grid.C > 1;
  }
  SpinBarrier barrier(a.grid.R * a.grid.C);
  a.barrier = &barrier;
  run_grid(a.grid, [&](int64_t w0, int64_t w1) {
    if (avx2)
      fast::backward_f32_avx2(a, w0, w1);
    else if (amx)
      fast::backward_amx(a, w0, w1);
    else if (bf16_dot)
      fast::backward_bf16(a, w0, w1);
    else
      fast::backward_f32(a, w0, w1);
  });

  if (a.dx_after && input_grad) at::mm_out(dx, dgates, w_ih.to(f32));
  Tensor dw_hh, dw_ih;
  const Tensor dbias = R == 1 ? dbias_s[0] : dbias_s.sum(0);
  if (fused) {  // sum the row groups' partial sums straight into the two contiguous gradients
    for (int64_t r = 0; r < R; ++r)
      if (scratch[r].fresh) dw_s[r].zero_();  // a row group that never had a row
    auto part = [&](int64_t r, int64_t begin, int64_t len) {
      return amx ? dw_s[r].narrow(0, begin, len).narrow(1, 0, G).t() : dw_s[r].narrow(1, begin, len);
    };
    auto reduce = [&](int64_t begin, int64_t len) {
      Tensor out = part(0, begin, len).clone(at::MemoryFormat::Contiguous);
      for (int64_t r = 1; r < R; ++r) out.add_(part(r, begin, len));
      return out;
    };
    dw_hh = reduce(0, H);
    dw_ih = reduce(H, d.I);
  } else {
    // grad_w = dgates^T [h_{t-1}, x_t] over all rows; h_{t-1} is the previous step's output row or h0.
    Tensor dg = dgates.narrow(0, 0, p.N);
    if (p.N == d.T * d.B) {
      // Every step has all B rows: the h_{t-1} rows are the output shifted by one step, and h0 for
      // the first step (the last, in reverse): two GEMMs, no gather.
      const int64_t B = d.B, N = p.N;
      const Tensor hs = hout.narrow(0, reverse ? B : 0, N - B), dgs = dg.narrow(0, reverse ? 0 : B, N - B);
      const Tensor dg0 = dg.narrow(0, reverse ? N - B : 0, B);
      dw_hh = at::mm(dg0.t(), h0s);
      if (N > B) dw_hh.addmm_(dgs.t(), hs);
    } else {
      Tensor hprev = pooled_empty({p.N, H}, f32);
      float* hp = hprev.data_ptr<float>();
      const float* ho = hout.const_data_ptr<float>();
      const float* h0p = h0s.const_data_ptr<float>();
      at::parallel_for(0, d.T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t j = 0; j < p.batch_sizes[t]; ++j) {
            const int64_t pr = p.prev_row(t, j, reverse);
            std::memcpy(hp + (p.offsets[t] + j) * H, pr >= 0 ? ho + pr * H : h0p + j * H, H * sizeof(float));
          }
      });
      dw_hh = at::mm(dg.t(), hprev);
    }
    dw_ih = at::mm(dg.t(), x);
  }
  const auto wt = w_ih.scalar_type();
  const at::ScalarType dt = input.scalar_type();
  return {input_grad ? from_packed(dx, p, dt) : at::empty({0}, input.options()),
          from_state_order(dh, p, perm, H, dt),
          from_state_order(dc, p, perm, H, dt),
          dw_ih.to(wt).contiguous(),
          dw_hh.to(wt).contiguous(),
          has_bias ? dbias.to(wt) : at::empty({0}, w_ih.options()),
          at::empty({0}, w_ih.options())};
}

// ---- one step of a few rows (nn.LSTMCell at small batch) ----
//
// A float32 step of at most kStepMaxRows rows, straight from the weights as stored: the dot products
// of each gate row with x and h, the four gate rows of a unit (two units at batch 1) at a time, then
// the gate math on a vector of units. The weights are read once: BLAS runs two GEMVs and a separate
// pointwise pass, and the tiles would digest the weights to validate their packed copy and then read
// that copy (NOTES v22). Hidden units are split across threads.
constexpr int64_t kStepMaxRows = 8;

// acc[u * 4 + g][b] += W[g * H + unit + u, :K] . v[b, :K] for the UN units from `unit` and the NB rows
// of v ([NB, ldv], zero-padded past K to a multiple of the vector width).
template <int NB, int UN>
inline void gate_dots(const float* w, int64_t K, int64_t gate_stride, const float* v, int64_t ldv,
                      Vectorized<float> (&acc)[UN * 4][NB]) {
  using V = Vectorized<float>;
  constexpr int64_t W = V::size();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V vb[NB];
    for (int b = 0; b < NB; ++b) vb[b] = V::loadu(v + b * ldv + k);
    for (int r = 0; r < UN * 4; ++r) {
      const V wr = V::loadu(w + (r / 4) * K + (r % 4) * gate_stride + k);
      for (int b = 0; b < NB; ++b) acc[r][b] = at::vec::fmadd(wr, vb[b], acc[r][b]);
    }
  }
  if (k < K) {  // the rows' tails: v is zero past K, and so are the loaded weights' missing lanes
    V vb[NB];
    for (int b = 0; b < NB; ++b) vb[b] = V::loadu(v + b * ldv + k);
    for (int r = 0; r < UN * 4; ++r) {
      const V wr = V::loadu(w + (r / 4) * K + (r % 4) * gate_stride + k, K - k);
      for (int b = 0; b < NB; ++b) acc[r][b] = at::vec::fmadd(wr, vb[b], acc[r][b]);
    }
  }
}

struct StepArgs {
  const float *w_ih, *w_hh, *bias;  // [4H, I], [4H, H] contiguous; bias [4H] (b_ih + b_hh) or nullptr
  const float *x, *h;               // B rows each, `ld` apart, zero-padded to whole vectors
  int64_t B, I, H, ld;
  float *hout, *c;                  // [B, H]; c holds c_{t-1} on entry, c_t on exit
  float *gates, *cells;             // [B, 4H], [B, H] with train, else nullptr
};

// Units [u0, u0 + n) of the NB rows from b0, n <= the vector width.
template <int NB, bool kTrain>
void step_units(const StepArgs& a, int64_t u0, int64_t n, int64_t b0) {
  using V = Vectorized<float>;
  constexpr int64_t W = V::size();
  constexpr int UN = NB == 1 ? 2 : 1;  // eight dot products in flight at batch 1
  const int64_t H = a.H;
  alignas(64) float z[NB][4 * W];      // per row: the n pre-activations of gates i, f, g, o
  for (int64_t j = 0; j < n; j += UN) {
    const int un = j + 1 < n ? UN : 1;
    V acc[UN * 4][NB];
    for (auto& r : acc)
      for (auto& v : r) v = V(0.f);
    if (un == UN) {
      gate_dots<NB, UN>(a.w_ih + (u0 + j) * a.I, a.I, H * a.I, a.x + b0 * a.ld, a.ld, acc);
      gate_dots<NB, UN>(a.w_hh + (u0 + j) * H, H, H * H, a.h + b0 * a.ld, a.ld, acc);
    } else {
      V one[4][NB];
      for (auto& r : one)
        for (auto& v : r) v = V(0.f);
      gate_dots<NB, 1>(a.w_ih + (u0 + j) * a.I, a.I, H * a.I, a.x + b0 * a.ld, a.ld, one);
      gate_dots<NB, 1>(a.w_hh + (u0 + j) * H, H, H * H, a.h + b0 * a.ld, a.ld, one);
      for (int r = 0; r < 4; ++r)
        for (int b = 0; b < NB; ++b) acc[r][b] = one[r][b];
    }
    for (int u = 0; u < un; ++u)
      for (int g = 0; g < 4; ++g)
        for (int b = 0; b < NB; ++b) {
          const float sum = at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, acc[u * 4 + g][b]);
          z[b][g * n + j + u] = sum + (a.bias != nullptr ? a.bias[g * H + u0 + j + u] : 0.f);
        }
  }
  for (int i = 0; i < NB; ++i) {
    const int64_t b = b0 + i;
    gates_forward_row<float, kTrain>(z[i], nullptr, a.c + b * H + u0, a.hout + b * H + u0,
                                     kTrain ? a.cells + b * H + u0 : nullptr, n);
    if constexpr (kTrain)
      for (int g = 0; g < 4; ++g) std::memcpy(a.gates + b * 4 * H + g * H + u0, z[i] + g * n, n * sizeof(float));
  }
}

// Units [u0, u0 + n) of every row, in groups of at most four rows (the chunk's weight rows, ~77 KiB
// at H = 200, come from L2 again for each further group).
template <bool kTrain>
void step_units_all(const StepArgs& a, int64_t u0, int64_t n) {
  int64_t b0 = 0;
  for (; a.B - b0 >= 4; b0 += 4) step_units<4, kTrain>(a, u0, n, b0);
  switch (a.B - b0) {
    case 1: step_units<1, kTrain>(a, u0, n, b0); break;
    case 2: step_units<2, kTrain>(a, u0, n, b0); break;
    case 3: step_units<3, kTrain>(a, u0, n, b0); break;
    default: break;
  }
}

// Threads for a step: a team only where the weights are worth splitting (128 KiB, ~2 us of reading
// on one core).
int64_t step_workers(int64_t I, int64_t H) {
  const int64_t bytes = 16 * H * (I + H);
  return bytes < (int64_t(1) << 17) ? 1 : team_threads();
}

// The B rows of x ([1, B, I]) and h ([B, H]) side by side, each zero-padded to whole vectors: row b's
// x at b * ld, its h at b * ld + x_width.
struct PaddedRows {
  std::vector<float> data;
  int64_t x_width, ld;
};

PaddedRows padded_rows(const Tensor& input, const Tensor& h0, const Dims& d) {
  constexpr int64_t W = Vectorized<float>::size();
  const Tensor x = input.contiguous(), h = h0.contiguous();
  PaddedRows r{{}, (d.I + W - 1) / W * W, 0};
  r.ld = r.x_width + (d.H + W - 1) / W * W;
  r.data.assign(d.B * r.ld, 0.f);
  const float* const px = x.const_data_ptr<float>();
  const float* const ph = h.const_data_ptr<float>();
  for (int64_t b = 0; b < d.B; ++b) {
    std::memcpy(r.data.data() + b * r.ld, px + b * d.I, d.I * sizeof(float));
    std::memcpy(r.data.data() + b * r.ld + r.x_width, ph + b * d.H, d.H * sizeof(float));
  }
  return r;
}

template <bool kTrain>
void step_rows(const StepArgs& a) {
  constexpr int64_t W = Vectorized<float>::size();
  const int64_t chunks = (a.H + W - 1) / W;
  const int64_t workers = step_workers(a.I, a.H);
  at::parallel_for(0, chunks, (chunks + workers - 1) / workers, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) step_units_all<kTrain>(a, ch * W, std::min(W, a.H - ch * W));
  });
}

// The step kernels take float32 single steps of up to kStepMaxRows rows without projection (every
// kernel choice but generic, which keeps the BLAS path).
bool uses_step_rows(const Tensor& input, const Dims& d, const PackPlan& p) {
  return input.scalar_type() == at::kFloat && d.T == 1 && d.B <= kStepMaxRows && !d.proj && p.identity &&
         gemm::cpu::kernel_choice() != gemm::cpu::KernelChoice::Generic;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_step_rows(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const Dims& d, bool train) {
  const int64_t B = d.B, H = d.H, I = d.I;
  // Few ATen calls: at batch 1 each costs about as much as reading a tenth of the weights.
  const PaddedRows xh = padded_rows(input, h0, d);
  const Tensor c = c0.contiguous();
  const Tensor wih = w_ih.contiguous(), whh = w_hh.contiguous();
  std::vector<float> bias;
  if (d.bias) {
    const Tensor bi = b_ih->contiguous(), bh = b_hh->contiguous();
    bias.resize(4 * H);
    const float* const pi = bi.const_data_ptr<float>();  // once: each call checks the tensor (~6 ns)
    const float* const ph = bh.const_data_ptr<float>();
    for (int64_t k = 0; k < 4 * H; ++k) bias[k] = pi[k] + ph[k];
  }
  Tensor output = at::empty({1, B, H}, at::kFloat), h_n = at::empty({B, H}, at::kFloat);
  Tensor c_n = at::empty({B, H}, at::kFloat);
  std::memcpy(c_n.data_ptr<float>(), c.const_data_ptr<float>(), B * H * sizeof(float));
  Tensor gates = train ? at::empty({B, 4 * H}, at::kFloat) : at::empty({0}, at::kFloat);
  Tensor cells = train ? at::empty({B, H}, at::kFloat) : at::empty({0}, at::kFloat);
  StepArgs a{wih.const_data_ptr<float>(), whh.const_data_ptr<float>(), d.bias ? bias.data() : nullptr,
             xh.data.data(), xh.data.data() + xh.x_width, B, I, H, xh.ld, output.data_ptr<float>(),
             c_n.data_ptr<float>(), train ? gates.data_ptr<float>() : nullptr,
             train ? cells.data_ptr<float>() : nullptr};
  if (train)
    step_rows<true>(a);
  else
    step_rows<false>(a);
  std::memcpy(h_n.data_ptr<float>(), output.const_data_ptr<float>(), B * H * sizeof(float));
  return {output, h_n, c_n, gates, cells};
}

// The backward of such a step. With dg = dL/d(pre-activations) [B, 4H] from the pointwise pass, one
// pass over the weight rows forms dx = dg W_ih and dh0 = dg W_hh (per-worker partial sums, added
// after) and the rank-B weight gradients dW = dg^T [x, h0], each weight row read and each gradient row
// written once (BLAS would run four GEMMs of K = B, the outer products at a small fraction of peak).
struct StepBackArgs {
  const float *w_ih, *w_hh;  // [4H, I], [4H, H]
  const float* dg;           // [B, 4H]
  const float *x, *h;        // B rows each, `ld` apart, zero-padded to whole vectors
  int64_t B, I, H, ld;
  float *dw_ih, *dw_hh;      // [4H, I], [4H, H]
};

// Rows [r0, r1) of one weight [G, K] for the NB rows: partial[b, :K] += dg[b, r] W[r, :K] and
// dW[r, :K] = sum_b dg[b, r] v[b, :K].
template <int NB>
void step_back_rows(const float* w, float* dw, int64_t K, const float* dg, int64_t G, const float* v, int64_t ld,
                    float* partial, int64_t r0, int64_t r1) {
  using V = Vectorized<float>;
  constexpr int64_t W = V::size();
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * K;
    float* dwr = dw + r * K;
    V coef[NB];
    for (int b = 0; b < NB; ++b) coef[b] = V(dg[b * G + r]);
    for (int64_t k = 0; k < K; k += W) {
      const int64_t n = std::min(W, K - k);
      const V wv = n == W ? V::loadu(wr + k) : V::loadu(wr + k, n);
      V acc(0.f);
      for (int b = 0; b < NB; ++b) {
        acc = at::vec::fmadd(coef[b], V::loadu(v + b * ld + k), acc);
        at::vec::fmadd(coef[b], wv, V::loadu(partial + b * ld + k)).store(partial + b * ld + k);
      }
      if (n == W)
        acc.store(dwr + k);
      else
        acc.store(dwr + k, n);
    }
  }
}

template <int NB>
void step_backward_rows(const StepBackArgs& a, std::vector<float>& partials, int64_t workers) {
  const int64_t G = 4 * a.H;
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t r0 = G * w / workers, r1 = G * (w + 1) / workers;
      float* part = partials.data() + w * a.B * a.ld;
      step_back_rows<NB>(a.w_ih, a.dw_ih, a.I, a.dg, G, a.x, a.ld, part, r0, r1);
      step_back_rows<NB>(a.w_hh, a.dw_hh, a.H, a.dg, G, a.h, a.ld, part + (a.h - a.x), r0, r1);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_step_rows_backward(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_h_n,
    const std::optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates, const Tensor& cells, bool has_bias,
    const Dims& d) {
  const int64_t B = d.B, H = d.H, I = d.I, G = 4 * H;
  const PaddedRows xh = padded_rows(input, h0, d);
  const int64_t Ip = xh.x_width, ld = xh.ld;
  const Tensor c = c0.contiguous(), g = gates.contiguous(), cl = cells.contiguous();
  // dh = grad_output + grad_h_n; dc starts as grad_c_n and leaves as dc0
  std::vector<float> dh(B * H, 0.f);
  Tensor dc0 = grad_c_n.has_value() ? grad_c_n->to(at::kFloat).contiguous().clone() : at::zeros({B, H}, at::kFloat);
  for (const auto* src : {&grad_output, &grad_h_n})
    if (src->has_value()) {
      const Tensor t = (*src)->contiguous();
      const float* tp = t.const_data_ptr<float>();
      for (int64_t k = 0; k < B * H; ++k) dh[k] += tp[k];
    }
  std::vector<float> dg(B * G);
  for (int64_t b = 0; b < B; ++b)
    gates_backward_row<float>(g.const_data_ptr<float>() + b * G, cl.const_data_ptr<float>() + b * H,
                              c.const_data_ptr<float>() + b * H, dh.data() + b * H, dc0.data_ptr<float>() + b * H,
                              dg.data() + b * G, nullptr, H);
  const Tensor wih = w_ih.contiguous(), whh = w_hh.contiguous();
  Tensor dw_ih = at::empty({G, I}, at::kFloat), dw_hh = at::empty({G, H}, at::kFloat);
  const int64_t workers = step_workers(I, H);
  std::vector<float> partials(workers * B * ld, 0.f);
  StepBackArgs a{wih.const_data_ptr<float>(), whh.const_data_ptr<float>(), dg.data(), xh.data.data(),
                 xh.data.data() + Ip, B, I, H, ld, dw_ih.data_ptr<float>(), dw_hh.data_ptr<float>()};
  static_assert(kStepMaxRows == 8, "one instance per row count");
  switch (B) {
    case 1: step_backward_rows<1>(a, partials, workers); break;
    case 2: step_backward_rows<2>(a, partials, workers); break;
    case 3: step_backward_rows<3>(a, partials, workers); break;
    case 4: step_backward_rows<4>(a, partials, workers); break;
    case 5: step_backward_rows<5>(a, partials, workers); break;
    case 6: step_backward_rows<6>(a, partials, workers); break;
    case 7: step_backward_rows<7>(a, partials, workers); break;
    default: step_backward_rows<8>(a, partials, workers); break;
  }
  Tensor dx = at::empty({1, B, I}, at::kFloat), dh0 = at::empty({B, H}, at::kFloat);
  float* dxp = dx.data_ptr<float>();
  float* dhp = dh0.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < I; ++k) {
      float s = 0.f;
      for (int64_t w = 0; w < workers; ++w) s += partials[(w * B + b) * ld + k];
      dxp[b * I + k] = s;
    }
    for (int64_t k = 0; k < H; ++k) {
      float s = 0.f;
      for (int64_t w = 0; w < workers; ++w) s += partials[(w * B + b) * ld + Ip + k];
      dhp[b * H + k] = s;
    }
  }
  Tensor dbias = has_bias ? at::empty({G}, at::kFloat) : at::empty({0}, at::kFloat);
  if (has_bias) {
    float* db = dbias.data_ptr<float>();
    for (int64_t r = 0; r < G; ++r) {
      float s = 0.f;
      for (int64_t b = 0; b < B; ++b) s += dg[b * G + r];
      db[r] = s;
    }
  }
  return {dx, dh0, dc0, dw_ih, dw_hh, dbias, at::empty({0}, at::kFloat)};
}

// ---- ops ----

constexpr const char* kOp = "lstm";

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_cpu(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool reverse, bool train) {
  const InFlight in_flight;
  const Dims d = check_layer_args(kOp, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  const PackPlan p = make_plan(d.T, d.B, lengths, kOp);
  const bool step = uses_step_rows(input, d, p);
  FlushDenormalsGuard ftz(!step || step_workers(d.I, d.H) > 1);  // a one-thread step sets this thread only
  const at::ScalarType ct = compute_dtype(input.scalar_type());
  // A float32 step of up to eight rows (nn.LSTMCell at small batch, decoding) runs the step kernels;
  // from two steps, or nine rows, on the tiles win (T = 1, B = 12-16: 1.3x native against the step
  // kernels' 1.1x; NOTES v22).
  if (step)
    return lstm_step_rows(input, h0, c0, w_ih, w_hh, b_ih, b_hh, d, train);
  if (const FastKernels k = fast_kernels(d, input.scalar_type(), ct); k != FastKernels::None)
    return lstm_forward_fast(input, h0, c0, w_ih, w_hh, b_ih, b_hh, d, p, reverse, train, k);
  const int64_t G = 4 * d.H;

  Tensor x = to_packed(input, p, ct);
  Tensor wih = w_ih.to(ct).contiguous(), whh = w_hh.to(ct).contiguous();
  Tensor whr = d.proj ? w_hr->to(ct).contiguous() : Tensor();
  Tensor bias = d.bias ? (b_ih->to(ct) + b_hh->to(ct)).contiguous() : Tensor();
  Tensor h = rows_sorted(h0, p, ct), c = rows_sorted(c0, p, ct);
  Tensor gates = pooled_empty({train ? d.T * d.B : p.N, G}, ct);
  Tensor cells = train ? pooled_empty({d.T * d.B, d.H}, ct) : at::empty({0}, ct);
  Tensor hout = pooled_empty({p.N, d.P}, ct);
  Tensor hpre = d.proj ? at::empty({d.B, d.H}, ct) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(ct, "bigmodel.lstm", [&] {
    using T = scalar_t;
    gemm::rowmajor<T>(false, true, p.N, G, d.I, T(1), x.const_data_ptr<T>(), d.I, wih.const_data_ptr<T>(), d.I,
                      T(0), gates.data_ptr<T>(), G);
    ForwardBuffers buf{whh.const_data_ptr(), d.proj ? whr.const_data_ptr() : nullptr,
                       d.bias ? bias.const_data_ptr() : nullptr, gates.data_ptr(),
                       train ? cells.data_ptr() : nullptr, h.data_ptr(), c.data_ptr(), hout.data_ptr(),
                       d.proj ? hpre.data_ptr() : nullptr};
    if (train)
      forward_loop<T, true>(p, d, reverse, buf);
    else
      forward_loop<T, false>(p, d, reverse, buf);
  });

  Tensor output = from_packed(hout, p, input.scalar_type());
  Tensor h_n = rows_original(h, p, input.scalar_type());
  Tensor c_n = rows_original(c, p, input.scalar_type());
  const at::ScalarType saved = cpu_saved_dtype(input.scalar_type());
  if (!train) {
    gates = at::empty({0}, saved);
    cells = at::empty({0}, saved);
  } else if (p.N < d.T * d.B) {
    // Rows past N are capacity, not data; define them so that the op is deterministic.
    gates.narrow(0, p.N, d.T * d.B - p.N).zero_();
    cells.narrow(0, p.N, d.T * d.B - p.N).zero_();
  }
  return {output, h_n, c_n, gates.to(saved), cells.to(saved)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_h_n,
    const std::optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, const Tensor& output, const Tensor& gates, const Tensor& cells,
    bool reverse, bool has_bias, bool input_grad) {
  const InFlight in_flight;
  const char* op = "lstm_backward";
  const Dims d = check_layer_args(op, input, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr);
  const PackPlan p = make_plan(d.T, d.B, lengths, op);
  const bool step =
      uses_step_rows(input, d, p) && gates.scalar_type() == at::kFloat && cells.scalar_type() == at::kFloat;
  FlushDenormalsGuard ftz(!step || step_workers(d.I, d.H) > 1);
  const at::ScalarType ct = compute_dtype(input.scalar_type());
  const int64_t G = 4 * d.H, H = d.H, P = d.P;
  BM_CHECK(gates.numel() > 0 && cells.numel() > 0, op,
           "gates/cells are empty: the forward ran with train=False, so there is nothing to differentiate");
  const at::ScalarType saved = cpu_saved_dtype(input.scalar_type());
  BM_CHECK(gates.scalar_type() == saved && cells.scalar_type() == saved, op, "gates/cells must have dtype ",
           saved, ", got ", gates.scalar_type(), " and ", cells.scalar_type());
  check_shape(gates, {d.T * d.B, G}, op, "gates", "(T*B, 4*hidden_size)");
  check_shape(cells, {d.T * d.B, H}, op, "cells", "(T*B, hidden_size)");
  check_shape(output, {d.T, d.B, P}, op, "output", "(T, B, proj_size or hidden_size)");
  if (grad_output.has_value()) check_shape(*grad_output, {d.T, d.B, P}, op, "grad_output", "(T, B, P)");
  if (grad_h_n.has_value()) check_shape(*grad_h_n, {d.B, P}, op, "grad_h_n", "(B, P)");
  if (grad_c_n.has_value()) check_shape(*grad_c_n, {d.B, H}, op, "grad_c_n", "(B, hidden_size)");
  if (step) {  // one step: dx costs little beside the rest, computed all the same
    auto out = lstm_step_rows_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, gates, cells,
                                       has_bias, d);
    if (!input_grad) std::get<0>(out) = at::empty({0}, input.options());
    return out;
  }
  // The backward's pointwise part and state are float32, and any AVX-512 or AVX2 CPU runs it (bf16
  // layers included, on float32 tiles); a bf16 layer multiplies in bf16 where its forward does: on AMX
  // tiles, or on vdpbf16ps tiles (kernels Avx512 for bf16, as the forward).
  FastKernels k = fast_kernels(d, at::kFloat, ct);
  bool bf16_dot = false;
  if (k == FastKernels::Avx512 && input.scalar_type() == at::kBFloat16) {
    const gemm::cpu::Bf16Kernel bk = gemm::cpu::bf16_kernel();
    if (bk == gemm::cpu::Bf16Kernel::Amx) k = FastKernels::Amx;
    bf16_dot = bk == gemm::cpu::Bf16Kernel::Dot;
  }
  if (k != FastKernels::None)
    return lstm_backward_fast(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, output, gates, cells,
                              reverse, has_bias, input_grad, d, p, k, bf16_dot);

  Tensor x = to_packed(input, p, ct);
  Tensor hout = to_packed(output, p, ct);
  Tensor gout = grad_output.has_value() ? to_packed(*grad_output, p, ct) : Tensor();
  Tensor wih = w_ih.to(ct).contiguous(), whh = w_hh.to(ct).contiguous();
  Tensor whr = d.proj ? w_hr->to(ct).contiguous() : Tensor();
  Tensor h0s = rows_sorted(h0, p, ct), c0s = rows_sorted(c0, p, ct);
  Tensor dh = grad_h_n.has_value() ? rows_sorted(*grad_h_n, p, ct) : at::zeros({d.B, P}, ct);
  Tensor dc = grad_c_n.has_value() ? rows_sorted(*grad_c_n, p, ct) : at::zeros({d.B, H}, ct);
  Tensor dgates = pooled_empty({p.N, G}, ct);
  Tensor dh_all = d.proj ? pooled_empty({p.N, P}, ct) : Tensor();
  Tensor hpre_all = d.proj ? pooled_empty({p.N, H}, ct) : Tensor();
  Tensor dhp = d.proj ? at::empty({d.B, H}, ct) : Tensor();
  Tensor dx = input_grad ? pooled_empty({p.N, d.I}, ct) : Tensor();
  Tensor dwih_t = at::empty({d.I, G}, ct), dwhh_t = at::empty({P, G}, ct);
  Tensor dwhr_t = d.proj ? at::empty({H, P}, ct) : Tensor();

  const Tensor gates_c = gates.to(ct), cells_c = cells.to(ct);  // bf16 layers saved bf16
  AT_DISPATCH_FLOATING_TYPES(ct, "bigmodel.lstm_backward", [&] {
    using T = scalar_t;
    BackwardBuffers buf{whh.const_data_ptr(), d.proj ? whr.const_data_ptr() : nullptr, gates_c.const_data_ptr(),
                        cells_c.const_data_ptr(), c0s.const_data_ptr(),
                        gout.defined() ? gout.const_data_ptr() : nullptr, dh.data_ptr(), dc.data_ptr(),
                        dgates.data_ptr(), d.proj ? dh_all.data_ptr() : nullptr,
                        d.proj ? hpre_all.data_ptr() : nullptr, d.proj ? dhp.data_ptr() : nullptr};
    backward_loop<T>(p, d, reverse, buf);

    // Weight gradients are formed transposed (W^T = X^T dgates): with the long N dimension as K
    // and the gate dimension contiguous in the output, the BLAS runs ~30% faster here.
    const T* dg = dgates.const_data_ptr<T>();
    if (input_grad)
      gemm::rowmajor<T>(false, false, p.N, d.I, G, T(1), dg, G, wih.const_data_ptr<T>(), d.I, T(0),
                        dx.data_ptr<T>(), d.I);
    gemm::rowmajor<T>(true, false, d.I, G, p.N, T(1), x.const_data_ptr<T>(), d.I, dg, G, T(0),
                      dwih_t.data_ptr<T>(), G);
    // grad_w_hh = sum_t dgates_t^T h_{t-1}: each row's previous state is h0 where it starts a
    // sequence, else the output row of the previously processed step.
    const T* ho = hout.const_data_ptr<T>();
    if (p.identity) {
      const int64_t B = d.B, N = p.N;
      const T* dg_first = reverse ? dg + (N - B) * G : dg;  // rows whose previous state is h0
      const T* dg_rest = reverse ? dg : dg + B * G;
      const T* h_rest = reverse ? ho + B * P : ho;
      gemm::rowmajor<T>(true, false, P, G, B, T(1), h0s.const_data_ptr<T>(), P, dg_first, G, T(0),
                        dwhh_t.data_ptr<T>(), G);
      if (N > B)
        gemm::rowmajor<T>(true, false, P, G, N - B, T(1), h_rest, P, dg_rest, G, T(1), dwhh_t.data_ptr<T>(), G);
    } else {
      Tensor hprev = pooled_empty({p.N, P}, ct);
      T* hp = hprev.data_ptr<T>();
      const T* h0p = h0s.const_data_ptr<T>();
      at::parallel_for(0, d.T, step_grain(d.B, P * sizeof(T)), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t j = 0; j < p.batch_sizes[t]; ++j) {
            const int64_t pr = p.prev_row(t, j, reverse);
            std::memcpy(hp + (p.offsets[t] + j) * P, pr >= 0 ? ho + pr * P : h0p + j * P, P * sizeof(T));
          }
      });
      gemm::rowmajor<T>(true, false, P, G, p.N, T(1), hp, P, dg, G, T(0), dwhh_t.data_ptr<T>(), G);
    }
    if (d.proj)
      gemm::rowmajor<T>(true, false, H, P, p.N, T(1), hpre_all.const_data_ptr<T>(), H,
                        dh_all.const_data_ptr<T>(), P, T(0), dwhr_t.data_ptr<T>(), P);
  });

  const auto wt = w_ih.scalar_type();
  Tensor dbias = has_bias ? dgates.sum(0).to(wt) : at::empty({0}, w_ih.options());
  return {input_grad ? from_packed(dx, p, input.scalar_type()) : at::empty({0}, input.options()),
          rows_original(dh, p, input.scalar_type()),
          rows_original(dc, p, input.scalar_type()),
          dwih_t.t().to(wt).contiguous(),
          dwhh_t.t().to(wt).contiguous(),
          dbias,
          d.proj ? dwhr_t.t().to(wt).contiguous() : at::empty({0}, w_ih.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigmodel, CPU, m) {
  m.impl("lstm_layer", &lstm_layer_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace bigmodel::lstm
