// CUDA kernels of the fused LSTM layer (contract in lstm.h), step for step the same algorithm as
// lstm_cpu.cpp.
//
// Forward: one GEMM projects every step's input at once (into the gate buffer); then the recurrence
// runs on one of two paths, chosen per call (plan_persistent):
//  * persistent (small batches): one cooperative kernel runs every step. Block g owns hidden units
//    [g*U, g*U + U) with all four of their gates, keeps those 4U rows of W_hh in shared memory for the
//    whole sequence, and per step stages h_{t-1} (from the previous step's output rows, or h0 for rows
//    that start now) into shared memory, computes its gates' h_{t-1} W_hh^T with float FMAs, applies
//    the bias, nonlinearities and cell update as forward_step_kernel does, and meets the other blocks
//    at one grid-wide barrier. Chosen when the compute dtype is float32 (float32, bfloat16 and float16
//    input), there is no projection, B <= 64, the device supports cooperative launch, and U = ceil(H /
//    SMs) rows of W_hh (x4 gates) plus B rows of h fit in one block's opt-in shared memory with every
//    block resident at once (on an H200 that is roughly H <= 660 at B = 64, H <= 1320 at B = 1).
//    BIGMODEL_CUDA_LSTM=stepwise (read per call; default auto) forces the other path, for tests and
//    A/B measurements.
//  * stepwise (everything else): per step one GEMM adds h_{t-1} W_hh^T to the b_t running rows and
//    one fused kernel applies the bias, the gate nonlinearities, the cell update and h = o * tanh(c).
// Both paths write the same outputs in the same packed layout (in train mode the activated gates and
// the cells backward reads), so backward does not care which one ran. Backward walks the steps in the
// opposite order with one fused pointwise kernel and one GEMM for dh_{t-1} per step; the input and
// weight gradients are time-batched GEMMs after the loop.
//
// Every GEMM is an ATen matmul on views, so it runs through cuBLAS on the current stream; every
// kernel is launched on the current stream too. The step loops never wait on the device: the plan
// lives on the host, and each step's kernel gets its offsets as arguments. With lengths, the index
// arrays that gather between the padded [T, B, F] and the packed [N, F] layouts (and, for the
// persistent kernel, each step's b_t and first row) go to the device once per call, in one
// asynchronous copy from pinned memory. Without lengths nothing is copied from or to the host, so a
// call can be captured in a CUDA graph.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/checks.h"
#include "lstm/lstm.h"

namespace bigmodel::lstm {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements. At least one: a step that no sequence reaches (every
// length < T) has n = 0, and a launch with zero blocks is an error.
inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, int64_t(1) << 20));
}

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

template <typename T>
__device__ __forceinline__ T sigmoid_(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// ---- kernels: each thread owns element e = j * H + k of a step's [b, H] block ----

// Forward gate math of one step. `g` holds the step's b rows of 4H pre-activations (input and
// recurrent projections, without bias); with kTrain they are overwritten by the activated gates.
// The new h goes to `hdst` (the packed output rows, or the [B, H] buffer the projection reads) and,
// without projection, also to the running state `hstate`.
template <typename T, bool kTrain, bool kProj>
__global__ void forward_step_kernel(T* __restrict__ g, const T* __restrict__ bias, T* __restrict__ c,
                                    T* __restrict__ hdst, T* __restrict__ hstate, T* __restrict__ cell_out,
                                    int64_t n, int64_t H) {
  const int64_t G = 4 * H;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e / H, k = e - j * H;
    T* gr = g + j * G;
    T gi = gr[k], gf = gr[H + k], gg = gr[2 * H + k], go = gr[3 * H + k];
    if (bias != nullptr) {
      gi += bias[k];
      gf += bias[H + k];
      gg += bias[2 * H + k];
      go += bias[3 * H + k];
    }
    const T i = sigmoid_(gi), f = sigmoid_(gf), gt = tanh_(gg), o = sigmoid_(go);
    const T cn = f * c[e] + i * gt;
    const T hn = o * tanh_(cn);
    c[e] = cn;
    hdst[e] = hn;
    if constexpr (!kProj) hstate[e] = hn;
    if constexpr (kTrain) {
      gr[k] = i;
      gr[H + k] = f;
      gr[2 * H + k] = gt;
      gr[3 * H + k] = o;
      cell_out[e] = cn;
    }
  }
}

// Backward gate math of one step (the same formulas as gates_backward_row in lstm_cpu.cpp): from dh
// (w.r.t. o*tanh(c)) and the running dc, writes the pre-activation gradients and carries dc to the
// previous step. Row j's previous cell is row j of the previously processed step when j < prev_b
// (PackPlan::prev_row), else row j of c0. `gout` (nullable) is added to dh; with kProj it was already
// added by the caller, and o*tanh(c) (the projection's input) is stored to `hpre`.
template <typename T, bool kProj>
__global__ void backward_step_kernel(const T* __restrict__ g, const T* __restrict__ cell,
                                     const T* __restrict__ cell_prev, int64_t prev_b, const T* __restrict__ c0,
                                     const T* __restrict__ dh, const T* __restrict__ gout, T* __restrict__ dc,
                                     T* __restrict__ dg, T* __restrict__ hpre, int64_t n, int64_t H) {
  const int64_t G = 4 * H;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e / H, k = e - j * H;
    const T* gr = g + j * G;
    const T i = gr[k], f = gr[H + k], gt = gr[2 * H + k], o = gr[3 * H + k];
    const T tc = tanh_(cell[e]);
    T dhv = dh[e];
    if (gout != nullptr) dhv += gout[e];
    const T dcv = dc[e] + dhv * o * (T(1) - tc * tc);
    const T cp = j < prev_b ? cell_prev[e] : c0[e];
    T* dgr = dg + j * G;
    dgr[k] = dcv * gt * i * (T(1) - i);
    dgr[H + k] = dcv * cp * f * (T(1) - f);
    dgr[2 * H + k] = dcv * i * (T(1) - gt * gt);
    dgr[3 * H + k] = dhv * tc * o * (T(1) - o);
    dc[e] = dcv * f;
    if constexpr (kProj) hpre[e] = o * tc;
  }
}

// out = a + b (b nullable), n elements.
template <typename T>
__global__ void add_kernel(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = b != nullptr ? a[e] + b[e] : a[e];
}

// dst row r = src row rows[r]; a negative rows[r] = -1 - q means row q of `fallback`, or zeros when
// fallback is null.
template <typename T>
__global__ void gather_rows_kernel(T* __restrict__ dst, const T* __restrict__ src, const T* __restrict__ fallback,
                                   const int64_t* __restrict__ rows, int64_t n, int64_t F) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / F, f = e - r * F;
    const int64_t s = rows[r];
    dst[e] = s >= 0 ? src[s * F + f] : (fallback != nullptr ? fallback[(-1 - s) * F + f] : T(0));
  }
}

template <typename T>
void gather_rows(T* dst, const T* src, const T* fallback, const int64_t* rows, int64_t R, int64_t F) {
  const int64_t n = R * F;
  if (n == 0) return;
  gather_rows_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(dst, src, fallback,
                                                                                          rows, n, F);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- layout helpers: padded [T, B, F] <-> packed [N, F], and sorted rows ----

// The plan's index arrays on the device; all null when the plan is the identity (no lengths).
struct DeviceIndex {
  Tensor storage;
  const int64_t* packed_src = nullptr;  // [N]: padded row t*B + order[j] of packed row offsets[t] + j
  const int64_t* padded_src = nullptr;  // [T*B]: packed row of each padded row, -1 past its sequence's end
  const int64_t* order = nullptr;       // [B]: original batch index of sorted row j
  const int64_t* inverse = nullptr;     // [B]: sorted row of original batch index b
  const int64_t* prev_src = nullptr;    // [N] (backward only): packed row holding the previous state,
                                        // or -1 - j for row j of h0
  const int64_t* steps = nullptr;       // [2T] (persistent forward only): b_t for each t, then offsets[t]
};

DeviceIndex upload_index(const PackPlan& p, bool reverse, bool with_prev, bool with_steps,
                         const at::Device& device) {
  DeviceIndex ix;
  if (p.identity) return ix;
  const int64_t N = p.N, TB = p.T * p.B, B = p.B, T = p.T;
  const int64_t n_prev = with_prev ? N : 0, n_steps = with_steps ? 2 * T : 0;
  Tensor host = at::empty({N + TB + 2 * B + n_prev + n_steps},
                          at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* packed = host.mutable_data_ptr<int64_t>();
  int64_t* padded = packed + N;
  int64_t* order = padded + TB;
  int64_t* inverse = order + B;
  int64_t* prev = inverse + B;
  int64_t* steps = prev + n_prev;
  std::fill(padded, padded + TB, int64_t(-1));
  for (int64_t j = 0; j < B; ++j) {
    order[j] = p.order[j];
    inverse[p.order[j]] = j;
  }
  for (int64_t t = 0; t < p.T; ++t) {
    for (int64_t j = 0; j < p.batch_sizes[t]; ++j) {
      const int64_t r = p.offsets[t] + j, pad = t * B + p.order[j];
      packed[r] = pad;
      padded[pad] = r;
      if (with_prev) {
        const int64_t pr = p.prev_row(t, j, reverse);
        prev[r] = pr >= 0 ? pr : -1 - j;
      }
    }
    if (with_steps) {
      steps[t] = p.batch_sizes[t];
      steps[T + t] = p.offsets[t];
    }
  }
  // Pinned + non_blocking: no host sync, and the caching host allocator keeps the block alive until
  // the copy has run.
  ix.storage = host.to(at::TensorOptions().device(device).dtype(at::kLong), /*non_blocking=*/true);
  const int64_t* d = ix.storage.const_data_ptr<int64_t>();
  ix.packed_src = d;
  ix.padded_src = d + N;
  ix.order = d + N + TB;
  ix.inverse = d + N + TB + B;
  if (with_prev) ix.prev_src = d + N + TB + 2 * B;
  if (with_steps) ix.steps = d + N + TB + 2 * B + n_prev;
  return ix;
}

template <typename T>
constexpr at::ScalarType scalar_type_of() {
  return c10::CppTypeToScalarType<T>::value;
}

template <typename T>
Tensor contiguous_as(const Tensor& t) {
  return t.to(scalar_type_of<T>(), /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

template <typename T>
Tensor to_packed(const Tensor& padded, const PackPlan& p, const DeviceIndex& ix) {
  const int64_t F = padded.size(2);
  Tensor src = contiguous_as<T>(padded);
  if (p.identity) return src.view({p.N, F});
  Tensor dst = at::empty({p.N, F}, src.options());
  gather_rows<T>(dst.mutable_data_ptr<T>(), src.const_data_ptr<T>(), nullptr, ix.packed_src, p.N, F);
  return dst;
}

template <typename T>
Tensor from_packed(const Tensor& packed, const PackPlan& p, const DeviceIndex& ix, at::ScalarType dtype) {
  const int64_t F = packed.size(1);
  if (p.identity) return packed.view({p.T, p.B, F}).to(dtype);
  Tensor dst = at::empty({p.T, p.B, F}, packed.options());
  gather_rows<T>(dst.mutable_data_ptr<T>(), packed.const_data_ptr<T>(), nullptr, ix.padded_src, p.T * p.B, F);
  return dst.to(dtype);
}

// A fresh [B, F] copy of `t` in compute dtype with rows in sorted order (safe to update in place).
template <typename T>
Tensor rows_sorted(const Tensor& t, const PackPlan& p, const DeviceIndex& ix) {
  Tensor dst = at::empty(t.sizes(), t.options().dtype(scalar_type_of<T>()));
  if (p.identity) return dst.copy_(t);
  Tensor src = contiguous_as<T>(t);
  gather_rows<T>(dst.mutable_data_ptr<T>(), src.const_data_ptr<T>(), nullptr, ix.order, p.B, t.size(1));
  return dst;
}

template <typename T>
Tensor rows_original(const Tensor& t, const PackPlan& p, const DeviceIndex& ix, at::ScalarType dtype) {
  if (p.identity) return t.to(dtype);
  Tensor dst = at::empty(t.sizes(), t.options());
  gather_rows<T>(dst.mutable_data_ptr<T>(), t.const_data_ptr<T>(), nullptr, ix.inverse, p.B, t.size(1));
  return dst.to(dtype);
}

// ---- step loops ----

struct ForwardState {
  Tensor gates;  // [>= N, 4H], holds x W_ih^T on entry
  Tensor cells;  // [T*B, H] (train)
  Tensor bias;   // [4H] or undefined
  Tensor w_hh;   // [4H, P]
  Tensor w_hr;   // [P, H] or undefined
  Tensor h;      // [B, P] running state, sorted rows
  Tensor c;      // [B, H]
  Tensor hout;   // [N, P] packed output
  Tensor hpre;   // [B, H] (proj)
};

template <typename T, bool kTrain, bool kProj>
void forward_loop(const PackPlan& p, const Dims& d, bool reverse, ForwardState& s) {
  const int64_t G = 4 * d.H, H = d.H, P = d.P;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor w_hh_t = s.w_hh.t();
  const Tensor w_hr_t = kProj ? s.w_hr.t() : Tensor();
  T* gates = s.gates.mutable_data_ptr<T>();
  T* cells = kTrain ? s.cells.mutable_data_ptr<T>() : nullptr;
  const T* bias = s.bias.defined() ? s.bias.const_data_ptr<T>() : nullptr;
  T* h = s.h.mutable_data_ptr<T>();
  T* c = s.c.mutable_data_ptr<T>();
  T* hout = s.hout.mutable_data_ptr<T>();
  T* hpre = kProj ? s.hpre.mutable_data_ptr<T>() : nullptr;
  for (int64_t step = 0; step < d.T; ++step) {
    const int64_t t = reverse ? d.T - 1 - step : step;
    const int64_t b = p.batch_sizes[t], off = p.offsets[t];
    s.gates.narrow(0, off, b).addmm_(s.h.narrow(0, 0, b), w_hh_t);
    const int64_t n = b * H;
    forward_step_kernel<T, kTrain, kProj><<<blocks_for(n), kThreads, 0, stream>>>(
        gates + off * G, bias, c, kProj ? hpre : hout + off * P, h, kTrain ? cells + off * H : nullptr, n, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if constexpr (kProj) {
      Tensor out_t = s.hout.narrow(0, off, b);
      at::mm_out(out_t, s.hpre.narrow(0, 0, b), w_hr_t);
      s.h.narrow(0, 0, b).copy_(out_t);
    }
  }
}

// ---- persistent forward (small batches, no projection, float): every step in one launch ----

constexpr int kPersistentThreads = 256;
constexpr int64_t kPersistentMaxBatch = 64;

struct PersistentArgs {
  const float* w_hh;     // [4H, H]
  const float* bias;     // [4H] (b_ih + b_hh) or null
  const float* h0;       // [B, H] sorted rows; not written while the kernel runs
  const int64_t* steps;  // [2T]: b_t for each t, then offsets[t]; null without lengths
  float* gates;          // [>= N, 4H]: x W_ih^T on entry, the activated gates on exit with kTrain
  float* hout;           // [N, H] packed output; step t reads h_{t-1} from the rows of the step before
  float* h;              // [B, H] h after each row's last step
  float* c;              // [B, H] running c, c0 on entry
  float* cells;          // [>= N, H] (kTrain)
  int64_t T, B, H;
  int units;    // U: hidden units per block (block g owns units g*U .. g*U + U - 1, clipped to H)
  int split;    // lanes that share one (row, unit) dot product: a power of two <= 32
  int hstride;  // row stride of the staged h in shared memory, == split (mod 32)
  bool reverse;
};

// Dynamic shared memory: ws [4U, H] (row q*U + u is W_hh row q*H + g*U + u; zeros for units past H),
// then hs [B, hstride] (h_{t-1} of the step's rows). In-block indices are ints: the host checked that
// both arrays fit in shared memory.
//
// Per step, the b_t * U pairs (row j, unit u), p -> u = p / b_t, j = p % b_t, go to groups of `split`
// adjacent lanes; lane r of a group sums k = r, r + split, ... of the four dot products
// h_{t-1}[j] . W_hh[q*H + g*U + u] (q = i, f, g, o), a butterfly of shuffles completes them, and lane 0
// does the cell update. Adjacent groups in a warp mostly share u (broadcast reads of ws) and take
// consecutive j, whose hs rows start `split` banks apart: no bank conflicts.
//
// Races: step t writes only its own packed rows (gates, cells, hout), h and c; it reads the previous
// step's hout rows and h0, which nothing writes while the kernel runs; each (j, unit) of a step is
// one thread's. A row's c is touched only by the block that owns the unit, and consecutive steps are
// separated by grid.sync(), which also orders the hout writes of one step before the reads of the
// next; those reads go through L2 (__ldcg), never a possibly stale L1 line.
template <bool kTrain>
__global__ void __launch_bounds__(kPersistentThreads) persistent_forward_kernel(const PersistentArgs a) {
  namespace cg = cooperative_groups;
  extern __shared__ float smem[];
  const int U = a.units, S = a.split, HS = a.hstride;
  const int H = static_cast<int>(a.H);
  const int64_t G = 4 * a.H;
  float* ws = smem;
  float* hs = smem + 4 * U * H;
  const int64_t unit0 = int64_t(blockIdx.x) * U;

  for (int e = threadIdx.x; e < 4 * U * H; e += blockDim.x) {
    const int row = e / H, col = e - row * H;
    const int q = row / U, u = row - q * U;
    ws[e] = unit0 + u < a.H ? a.w_hh[(q * a.H + unit0 + u) * a.H + col] : 0.f;
  }
  // ws is first read after the __syncthreads that follows the first step's staging.

  const int lane = threadIdx.x % S, group = threadIdx.x / S, groups = blockDim.x / S;
  const cg::grid_group grid = cg::this_grid();
  for (int64_t step = 0; step < a.T; ++step) {
    const int64_t t = a.reverse ? a.T - 1 - step : step;
    const int64_t tp = a.reverse ? t + 1 : t - 1;  // the step processed just before (valid when step > 0)
    const int b = static_cast<int>(a.steps != nullptr ? a.steps[t] : a.B);
    const int64_t off = a.steps != nullptr ? a.steps[a.T + t] : t * a.B;
    int prev_b = 0;  // rows j < prev_b ran in the previous step; the others start here from h0
    int64_t prev_off = 0;
    if (step > 0) {
      prev_b = static_cast<int>(a.steps != nullptr ? a.steps[tp] : a.B);
      prev_off = a.steps != nullptr ? a.steps[a.T + tp] : tp * a.B;
    }

    for (int e = threadIdx.x; e < b * H; e += blockDim.x) {
      const int j = e / H, k = e - j * H;
      hs[j * HS + k] = j < prev_b ? __ldcg(a.hout + (prev_off + j) * a.H + k) : a.h0[int64_t(j) * a.H + k];
    }
    __syncthreads();

    // The trip count is the same in every thread of the block: the shuffles need whole warps.
    const int pairs = b * U;
    for (int p0 = 0; p0 < pairs; p0 += groups) {
      const int p = p0 + group;
      const bool valid = p < pairs;
      const int u = valid ? p / b : 0;
      const int j = valid ? p - u * b : 0;
      const float* hr = hs + j * HS;
      const float* w = ws + u * H;  // gate q's row is w + q * U * H
      float acc_i = 0.f, acc_f = 0.f, acc_g = 0.f, acc_o = 0.f;
      for (int k = lane; k < H; k += S) {
        const float hv = hr[k];
        acc_i = fmaf(hv, w[k], acc_i);
        acc_f = fmaf(hv, w[U * H + k], acc_f);
        acc_g = fmaf(hv, w[2 * U * H + k], acc_g);
        acc_o = fmaf(hv, w[3 * U * H + k], acc_o);
      }
      for (int m = S / 2; m > 0; m /= 2) {
        acc_i += __shfl_xor_sync(0xffffffffu, acc_i, m);
        acc_f += __shfl_xor_sync(0xffffffffu, acc_f, m);
        acc_g += __shfl_xor_sync(0xffffffffu, acc_g, m);
        acc_o += __shfl_xor_sync(0xffffffffu, acc_o, m);
      }
      const int64_t k = unit0 + u;
      if (valid && lane == 0 && k < a.H) {
        const int64_t row = off + j;
        float* gr = a.gates + row * G;
        float gi = gr[k] + acc_i, gf = gr[a.H + k] + acc_f, gg = gr[2 * a.H + k] + acc_g,
              go = gr[3 * a.H + k] + acc_o;
        if (a.bias != nullptr) {
          gi += a.bias[k];
          gf += a.bias[a.H + k];
          gg += a.bias[2 * a.H + k];
          go += a.bias[3 * a.H + k];
        }
        const float i = sigmoid_(gi), f = sigmoid_(gf), gt = tanh_(gg), o = sigmoid_(go);
        const int64_t e = int64_t(j) * a.H + k;
        const float cn = f * a.c[e] + i * gt;
        const float hn = o * tanh_(cn);
        a.c[e] = cn;
        a.h[e] = hn;
        a.hout[row * a.H + k] = hn;
        if constexpr (kTrain) {
          gr[k] = i;
          gr[a.H + k] = f;
          gr[2 * a.H + k] = gt;
          gr[3 * a.H + k] = o;
          a.cells[row * a.H + k] = cn;
        }
      }
    }
    if (step + 1 < a.T) grid.sync();
  }
}

// BIGMODEL_CUDA_LSTM=stepwise forces the per-step path. Read per call (a getenv is nothing next to a
// launch) so that tests can switch paths within one process.
bool stepwise_forced() {
  const char* env = std::getenv("BIGMODEL_CUDA_LSTM");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return false;
  TORCH_CHECK(std::strcmp(env, "stepwise") == 0, "bigmodel: BIGMODEL_CUDA_LSTM must be 'auto' or 'stepwise', got '",
              env, "'");
  return true;
}

struct PersistentLaunch {
  int blocks = 0;  // 0: the persistent kernel does not fit this layer
  int units = 0, split = 0, hstride = 0;
  size_t smem = 0;
};

// Whether (and how) the persistent kernel runs this layer on the current device. Every block must be
// resident at once for the grid barrier; cudaLaunchCooperativeKernel refuses a grid that is not, and
// the occupancy check here keeps that from happening.
template <bool kTrain>
PersistentLaunch plan_persistent(const Dims& d) {
  PersistentLaunch L;
  if (d.proj || d.B > kPersistentMaxBatch) return L;
  const int dev = c10::cuda::current_device();
  int cooperative = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, dev));
  if (cooperative == 0) return L;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(dev);
  const int64_t sms = prop->multiProcessorCount, H = d.H, B = d.B;
  // One block per SM with as few units each as that allows: the smallest W_hh slice per block.
  const int64_t units = (H + sms - 1) / sms;
  const int64_t blocks = (H + units - 1) / units;
  // Split each dot product over as many lanes as leave every (row, unit) pair of a full batch a group
  // (no more lanes than H needs).
  int64_t split = 32;
  while (split > 1 && (B * units * split > kPersistentThreads || split / 2 >= H)) split /= 2;
  const int64_t hstride = H + (split % 32 - H % 32 + 32) % 32;
  const int64_t bytes = (4 * units * H + B * hstride) * int64_t(sizeof(float));
  if (bytes > int64_t(prop->sharedMemPerBlockOptin)) return L;
  // Always the device's maximum, so that concurrent calls with different sizes never lower the limit
  // under each other's launch.
  const auto kernel = &persistent_forward_kernel<kTrain>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(prop->sharedMemPerBlockOptin)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads,
                                                               static_cast<size_t>(bytes)));
  if (int64_t(per_sm) * sms < blocks) return L;
  L.blocks = static_cast<int>(blocks);
  L.units = static_cast<int>(units);
  L.split = static_cast<int>(split);
  L.hstride = static_cast<int>(hstride);
  L.smem = static_cast<size_t>(bytes);
  return L;
}

template <bool kTrain>
void persistent_forward(const PersistentLaunch& L, const Dims& d, const DeviceIndex& ix, bool reverse,
                        ForwardState& s) {
  // The kernel reads h0 while it writes the final h: separate tensors. Every row runs at t = 0
  // (lengths >= 1), so every row of the new h gets written.
  const Tensor h0 = s.h;
  s.h = at::empty(h0.sizes(), h0.options());
  PersistentArgs a;
  a.w_hh = s.w_hh.const_data_ptr<float>();
  a.bias = s.bias.defined() ? s.bias.const_data_ptr<float>() : nullptr;
  a.h0 = h0.const_data_ptr<float>();
  a.steps = ix.steps;
  a.gates = s.gates.mutable_data_ptr<float>();
  a.hout = s.hout.mutable_data_ptr<float>();
  a.h = s.h.mutable_data_ptr<float>();
  a.c = s.c.mutable_data_ptr<float>();
  a.cells = kTrain ? s.cells.mutable_data_ptr<float>() : nullptr;
  a.T = d.T;
  a.B = d.B;
  a.H = d.H;
  a.units = L.units;
  a.split = L.split;
  a.hstride = L.hstride;
  a.reverse = reverse;
  void* args[] = {&a};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(&persistent_forward_kernel<kTrain>, dim3(L.blocks),
                                             dim3(kPersistentThreads), args, L.smem,
                                             at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct BackwardState {
  Tensor gates;     // [>= N, 4H] activated
  Tensor cells;     // [>= N, H]
  Tensor c0;        // [B, H] sorted rows
  Tensor gout;      // [N, P] packed, or undefined
  Tensor w_hh;      // [4H, P]
  Tensor w_hr;      // [P, H] or undefined
  Tensor dh;        // [B, P] running, starts as grad_h_n
  Tensor dc;        // [B, H] running, starts as grad_c_n
  Tensor dgates;    // [N, 4H]
  Tensor dh_all;    // [N, P] (proj)
  Tensor hpre_all;  // [N, H] (proj)
  Tensor dhp;       // [B, H] (proj)
};

template <typename T, bool kProj>
void backward_loop(const PackPlan& p, const Dims& d, bool reverse, BackwardState& s) {
  const int64_t G = 4 * d.H, H = d.H, P = d.P;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* gates = s.gates.const_data_ptr<T>();
  const T* cells = s.cells.const_data_ptr<T>();
  const T* c0 = s.c0.const_data_ptr<T>();
  const T* gout = s.gout.defined() ? s.gout.const_data_ptr<T>() : nullptr;
  T* dh = s.dh.mutable_data_ptr<T>();
  T* dc = s.dc.mutable_data_ptr<T>();
  T* dgates = s.dgates.mutable_data_ptr<T>();
  T* dh_all = kProj ? s.dh_all.mutable_data_ptr<T>() : nullptr;
  T* hpre_all = kProj ? s.hpre_all.mutable_data_ptr<T>() : nullptr;
  T* dhp = kProj ? s.dhp.mutable_data_ptr<T>() : nullptr;
  for (int64_t step = d.T - 1; step >= 0; --step) {
    const int64_t t = reverse ? d.T - 1 - step : step;
    const int64_t b = p.batch_sizes[t], off = p.offsets[t];
    const T* dh_pre = dh;
    if constexpr (kProj) {
      // dh of this step's output rows (kept for grad_w_hr), then back through the projection.
      const int64_t n = b * P;
      add_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(dh_all + off * P, dh,
                                                            gout != nullptr ? gout + off * P : nullptr, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      Tensor dhp_t = s.dhp.narrow(0, 0, b);
      at::mm_out(dhp_t, s.dh_all.narrow(0, off, b), s.w_hr);
      dh_pre = dhp;
    }
    const int64_t tp = reverse ? t + 1 : t - 1;
    const bool has_prev = tp >= 0 && tp < d.T;
    const int64_t prev_b = has_prev ? p.batch_sizes[tp] : 0;
    const int64_t prev_off = has_prev ? p.offsets[tp] : 0;
    const int64_t n = b * H;
    backward_step_kernel<T, kProj><<<blocks_for(n), kThreads, 0, stream>>>(
        gates + off * G, cells + off * H, cells + prev_off * H, prev_b, c0, dh_pre,
        (!kProj && gout != nullptr) ? gout + off * P : nullptr, dc, dgates + off * G,
        kProj ? hpre_all + off * H : nullptr, n, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor dh_t = s.dh.narrow(0, 0, b);
    at::mm_out(dh_t, s.dgates.narrow(0, off, b), s.w_hh);
  }
}

// ---- ops ----

void check_same_device(const Tensor& t, const Tensor& input, const char* op) {
  BM_CHECK(t.device() == input.device(), op, "every tensor must be on input's device ", input.device(),
           ", got one on ", t.device());
}

constexpr const char* kOp = "lstm";
constexpr const char* kBackwardOp = "lstm_backward";

using LayerResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename T>
LayerResult layer_forward(const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                          const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                          const std::optional<Tensor>& w_hr, const Dims& d, const PackPlan& p, bool reverse,
                          bool train) {
  const int64_t G = 4 * d.H, TB = d.T * d.B;
  const auto opts = input.options().dtype(scalar_type_of<T>());
  const bool stepwise = stepwise_forced();  // read (and checked) whatever the dtype
  PersistentLaunch persistent;
  if constexpr (std::is_same_v<T, float>) {
    if (!stepwise) persistent = train ? plan_persistent<true>(d) : plan_persistent<false>(d);
  }
  const DeviceIndex ix = upload_index(p, reverse, /*with_prev=*/false, /*with_steps=*/persistent.blocks > 0,
                                      input.device());

  Tensor x = to_packed<T>(input, p, ix);
  Tensor w_ih_c = contiguous_as<T>(w_ih);
  ForwardState s;
  s.w_hh = contiguous_as<T>(w_hh);
  if (d.proj) s.w_hr = contiguous_as<T>(*w_hr);
  if (d.bias) s.bias = contiguous_as<T>(*b_ih).add(contiguous_as<T>(*b_hh));
  s.h = rows_sorted<T>(h0, p, ix);
  s.c = rows_sorted<T>(c0, p, ix);
  s.gates = at::empty({train ? TB : p.N, G}, opts);
  s.cells = train ? at::empty({TB, d.H}, opts) : at::empty({0}, opts);
  if (train && p.N < TB) {
    // Rows past N carry no meaning; zero them so that the op's outputs are deterministic.
    s.gates.narrow(0, p.N, TB - p.N).zero_();
    s.cells.narrow(0, p.N, TB - p.N).zero_();
  }
  s.hout = at::empty({p.N, d.P}, opts);
  if (d.proj) s.hpre = at::empty({d.B, d.H}, opts);

  Tensor xw = s.gates.narrow(0, 0, p.N);
  at::mm_out(xw, x, w_ih_c.t());
  if (persistent.blocks > 0) {
    if constexpr (std::is_same_v<T, float>) {  // (never chosen for double)
      if (train) persistent_forward<true>(persistent, d, ix, reverse, s);
      else persistent_forward<false>(persistent, d, ix, reverse, s);
    }
  } else if (train) {
    if (d.proj) forward_loop<T, true, true>(p, d, reverse, s);
    else forward_loop<T, true, false>(p, d, reverse, s);
  } else {
    if (d.proj) forward_loop<T, false, true>(p, d, reverse, s);
    else forward_loop<T, false, false>(p, d, reverse, s);
  }

  const auto dtype = input.scalar_type();
  Tensor output = from_packed<T>(s.hout, p, ix, dtype);
  Tensor h_n = rows_original<T>(s.h, p, ix, dtype);
  Tensor c_n = rows_original<T>(s.c, p, ix, dtype);
  Tensor gates = train ? s.gates : at::empty({0}, opts);
  return {output, h_n, c_n, gates, s.cells};
}

LayerResult lstm_layer_cuda(const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                            const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                            const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
                            const std::optional<Tensor>& lengths, bool reverse, bool train) {
  const Dims d = check_layer_args(kOp, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  BM_CHECK(input.is_cuda() || (lengths.has_value() && lengths->is_cuda()), kOp,
           "the CUDA kernel got input on ", input.device());
  if (!input.is_cuda()) {
    // Only `lengths` is on a GPU (that is why the dispatcher chose this kernel): run where the data is.
    static const auto redispatch = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bigmodel::lstm_layer", "")
                               .typed<decltype(lstm_layer_cuda)>();
    return redispatch.call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths->to(at::kCPU), reverse, train);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const PackPlan p = make_plan(d.T, d.B, lengths, kOp);
  LayerResult out;
  AT_DISPATCH_FLOATING_TYPES(compute_dtype(input.scalar_type()), "bigmodel.lstm", [&] {
    out = layer_forward<scalar_t>(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, d, p, reverse, train);
  });
  return out;
}

template <typename T>
BackwardResult layer_backward(const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_h_n,
                              const std::optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0,
                              const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                              const std::optional<Tensor>& w_hr, const Tensor& output, const Tensor& gates,
                              const Tensor& cells, const Dims& d, const PackPlan& p, bool reverse, bool has_bias) {
  const int64_t G = 4 * d.H, H = d.H, P = d.P, N = p.N, B = d.B;
  const auto opts = input.options().dtype(scalar_type_of<T>());
  const DeviceIndex ix = upload_index(p, reverse, /*with_prev=*/true, /*with_steps=*/false, input.device());

  Tensor x = to_packed<T>(input, p, ix);
  Tensor hout = to_packed<T>(output, p, ix);
  Tensor w_ih_c = contiguous_as<T>(w_ih);
  Tensor h0s = rows_sorted<T>(h0, p, ix);
  BackwardState s;
  s.gates = gates.contiguous();
  s.cells = cells.contiguous();
  s.c0 = rows_sorted<T>(c0, p, ix);
  if (grad_output.has_value()) s.gout = to_packed<T>(*grad_output, p, ix);
  s.w_hh = contiguous_as<T>(w_hh);
  if (d.proj) s.w_hr = contiguous_as<T>(*w_hr);
  s.dh = grad_h_n.has_value() ? rows_sorted<T>(*grad_h_n, p, ix) : at::zeros({B, P}, opts);
  s.dc = grad_c_n.has_value() ? rows_sorted<T>(*grad_c_n, p, ix) : at::zeros({B, H}, opts);
  s.dgates = at::empty({N, G}, opts);
  if (d.proj) {
    s.dh_all = at::empty({N, P}, opts);
    s.hpre_all = at::empty({N, H}, opts);
    s.dhp = at::empty({B, H}, opts);
    backward_loop<T, true>(p, d, reverse, s);
  } else {
    backward_loop<T, false>(p, d, reverse, s);
  }

  const Tensor& dg = s.dgates;
  Tensor dx = at::empty({N, d.I}, opts);
  at::mm_out(dx, dg, w_ih_c);
  Tensor dw_ih = at::empty({G, d.I}, opts);
  at::mm_out(dw_ih, dg.t(), x);
  // grad_w_hh = sum_t dgates_t^T h_{t-1}: each row's previous state is h0 where it starts a
  // sequence, else the output row of the previously processed step.
  Tensor dw_hh = at::empty({G, P}, opts);
  if (p.identity) {
    const Tensor dg_first = reverse ? dg.narrow(0, N - B, B) : dg.narrow(0, 0, B);  // rows whose previous state is h0
    at::mm_out(dw_hh, dg_first.t(), h0s);
    if (N > B) {
      const Tensor dg_rest = reverse ? dg.narrow(0, 0, N - B) : dg.narrow(0, B, N - B);
      const Tensor h_rest = reverse ? hout.narrow(0, B, N - B) : hout.narrow(0, 0, N - B);
      dw_hh.addmm_(dg_rest.t(), h_rest);
    }
  } else {
    Tensor hprev = at::empty({N, P}, opts);
    gather_rows<T>(hprev.mutable_data_ptr<T>(), hout.const_data_ptr<T>(), h0s.const_data_ptr<T>(), ix.prev_src, N,
                   P);
    at::mm_out(dw_hh, dg.t(), hprev);
  }

  const auto dtype = input.scalar_type();
  const auto wt = w_ih.scalar_type();
  Tensor dbias = has_bias ? dg.sum(0).to(wt) : at::empty({0}, w_ih.options());
  Tensor dw_hr = d.proj ? at::mm(s.dh_all.t(), s.hpre_all).to(wt) : at::empty({0}, w_ih.options());
  return {from_packed<T>(dx, p, ix, dtype),
          rows_original<T>(s.dh, p, ix, dtype),
          rows_original<T>(s.dc, p, ix, dtype),
          dw_ih.to(wt),
          dw_hh.to(wt),
          dbias,
          dw_hr};
}

BackwardResult lstm_layer_backward_cuda(const std::optional<Tensor>& grad_output,
                                        const std::optional<Tensor>& grad_h_n,
                                        const std::optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0,
                                        const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                                        const std::optional<Tensor>& w_hr, const std::optional<Tensor>& lengths,
                                        const Tensor& output, const Tensor& gates, const Tensor& cells, bool reverse,
                                        bool has_bias, bool input_grad) {
  const char* op = kBackwardOp;
  const Dims d = check_layer_args(op, input, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr);
  for (const Tensor* t : {&output, &gates, &cells}) check_same_device(*t, input, op);
  for (const std::optional<Tensor>* g : {&grad_output, &grad_h_n, &grad_c_n})
    if (g->has_value()) check_same_device(**g, input, op);
  BM_CHECK(input.is_cuda() || (lengths.has_value() && lengths->is_cuda()), op,
           "the CUDA kernel got input on ", input.device());
  if (!input.is_cuda()) {
    // Only `lengths` is on a GPU (that is why the dispatcher chose this kernel): run where the data is.
    static const auto redispatch = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("bigmodel::lstm_layer_backward", "")
                                       .typed<decltype(lstm_layer_backward_cuda)>();
    return redispatch.call(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, lengths->to(at::kCPU),
                           output, gates, cells, reverse, has_bias, input_grad);
  }
  const at::ScalarType ct = compute_dtype(input.scalar_type());
  BM_CHECK(gates.numel() > 0 && cells.numel() > 0, op,
           "gates/cells are empty: the forward ran with train=False, so there is nothing to differentiate");
  BM_CHECK(gates.scalar_type() == ct && cells.scalar_type() == ct, op, "gates/cells must have dtype ", ct);
  check_shape(gates, {d.T * d.B, 4 * d.H}, op, "gates", "(T*B, 4*hidden_size)");
  check_shape(cells, {d.T * d.B, d.H}, op, "cells", "(T*B, hidden_size)");
  check_shape(output, {d.T, d.B, d.P}, op, "output", "(T, B, proj_size or hidden_size)");
  if (grad_output.has_value()) check_shape(*grad_output, {d.T, d.B, d.P}, op, "grad_output", "(T, B, P)");
  if (grad_h_n.has_value()) check_shape(*grad_h_n, {d.B, d.P}, op, "grad_h_n", "(B, P)");
  if (grad_c_n.has_value()) check_shape(*grad_c_n, {d.B, d.H}, op, "grad_c_n", "(B, hidden_size)");

  const c10::cuda::CUDAGuard guard(input.device());
  const PackPlan p = make_plan(d.T, d.B, lengths, op);
  BackwardResult out;
  AT_DISPATCH_FLOATING_TYPES(ct, "bigmodel.lstm_backward", [&] {
    out = layer_backward<scalar_t>(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, output, gates,
                                   cells, d, p, reverse, has_bias);
  });
  if (!input_grad) std::get<0>(out) = at::empty({0}, input.options());  // computed all the same
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bigmodel, CUDA, m) {
  m.impl("lstm_layer", &lstm_layer_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
}

}  // namespace bigmodel::lstm
