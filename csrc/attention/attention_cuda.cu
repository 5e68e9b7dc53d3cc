// CUDA kernels of bigmodel's attention ops (contract in attention.h; argument checks shared with the
// CPU kernels in attention_common.cpp).
//
// Two paths:
//
// * Tensor cores (bfloat16 / float16, d == dv in {32, 64, 128}, no attn_mask, sm_80+): flash-style.
//   Forward: a block of 4 warps owns 64 query rows of one (batch, head); each warp owns 16 rows and
//   keeps its Q fragments in registers. Per 64-key block, S = Q K^T and O += P V run as
//   mma.sync.m16n8k16 with float32 accumulators; the online softmax (in the exp2 domain) works on
//   the S accumulators in registers, and P goes from accumulator to operand layout without touching
//   shared memory. K and V arrive by cp.async: K of the next block loads while P V runs, V of this
//   block while S and the softmax run (K double-buffered). Key blocks past key_lengths[b] or wholly
//   above the causal diagonal are never loaded.
//   Backward (recompute from logsumexp): a block owns 64 keys of one (batch, kv head) and walks the
//   query blocks (of every query head of its GQA group) that can see them. Each warp owns 16 keys and
//   computes S^T = K Q^T and dP^T = V dO^T, so P^T and dS^T sit in accumulator layout and feed
//   dV += P^T dO and dK += dS^T Q straight from registers. dS^T goes through shared memory once for
//   dQ += dS K, whose partial sums are added into a float32 buffer with atomics (dQ rows are shared
//   by every key block); one elementwise op scales and rounds it at the end.
//
// * Generic (float32, float64, any head dims, attn_mask, any strides, pre-sm_80 GPUs): one warp per
//   query row (forward, dQ) or per key (dK, dV); each lane scores one key (or query) of a 32-wide
//   chunk, and the chunk's probabilities are broadcast by shuffles into coalesced row updates.
//   Correct on every input the CPU kernel takes; not tuned.
//
// Both paths compute dropout with the same hash of (seed, b, h, i, j) as the CPU kernel
// (attention.h), so a seed gives the same mask on either device and backward regenerates it.
//
// Every launch is on the current stream. The only host synchronization is the range check of
// key_lengths (one small reduction), skipped while the stream is being captured into a CUDA graph;
// the kernels clamp lengths into [0, Lk] either way, so a bad length can never read out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "attention/attention.h"
#include "common/checks.h"

namespace bigmodel::attention {
namespace {

using at::Tensor;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------------
// Shared pieces
// ------------------------------------------------------------------------------------------------

// Where q, k, v live: rows of a (batch, head) at element strides over (batch, head, row, col).
template <typename T>
struct Operand {
  const T* ptr;
  int64_t s0, s1, s2, s3;
  __device__ __forceinline__ const T* at(int64_t b, int64_t h, int64_t r) const { return ptr + b * s0 + h * s1 + r * s2; }
};

template <typename T>
Operand<T> operand_of(const Tensor& t) {
  return {static_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Shape {
  int64_t B, Hq, Hkv, Lq, Lk, d, dv, group;
};

Shape shape_of(const Dims& d) { return {d.B, d.Hq, d.Hkv, d.Lq, d.Lk, d.d, d.dv, d.Hq / d.Hkv}; }

// Valid keys of batch b: key_lengths[b] clamped into [0, Lk] (checked on the host when possible).
__device__ __forceinline__ int64_t valid_keys(const int64_t* lengths, int64_t b, int64_t Lk) {
  if (lengths == nullptr) return Lk;
  const int64_t n = lengths[b];
  return n < 0 ? 0 : (n > Lk ? Lk : n);
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

template <typename T, typename A>
__device__ __forceinline__ A load_as(const T* p) {
  return static_cast<A>(*p);
}
template <>
__device__ __forceinline__ float load_as<at::BFloat16, float>(const at::BFloat16* p) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
}
template <>
__device__ __forceinline__ float load_as<at::Half, float>(const at::Half* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}

template <typename T, typename A>
__device__ __forceinline__ void store_as(T* p, A x) {
  *p = static_cast<T>(x);
}
template <>
__device__ __forceinline__ void store_as<at::BFloat16, float>(at::BFloat16* p, float x) {
  *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ void store_as<at::Half, float>(at::Half* p, float x) {
  *reinterpret_cast<__half*>(p) = __float2half_rn(x);
}

__device__ __forceinline__ float exp_(float x) { return __expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return __logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

void set_smem_limit(const void* kernel, size_t bytes, const char* op) {
  if (bytes <= 48 * 1024) return;
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  BM_CHECK(bytes <= static_cast<size_t>(optin), op, "head dims too large for the CUDA kernel: it needs ", bytes,
           " bytes of shared memory per block, the GPU allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// ------------------------------------------------------------------------------------------------
// Generic path: one warp per row
// ------------------------------------------------------------------------------------------------

constexpr int kGenericWarps = 4;

template <typename T, typename A>
struct GenericProblem {
  Shape s;
  A scale;
  bool causal;
  Operand<T> q, k, v;
  const int64_t* lengths;  // [B] or nullptr
  const A* mask;           // additive, broadcast by strides; or nullptr
  int64_t ms0, ms1, ms2, ms3;
  Dropout dropout;

  __device__ __forceinline__ A mask_at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return mask == nullptr ? A(0) : mask[b * ms0 + h * ms1 + i * ms2 + j * ms3];
  }
  // Keys query row i of batch b may see are [0, key_end).
  __device__ __forceinline__ int64_t key_end(int64_t b, int64_t i) const {
    const int64_t e = valid_keys(lengths, b, s.Lk);
    return causal ? (i + 1 < e ? i + 1 : e) : e;
  }
};

// dot(x[0..n) in shared memory, row[0..n) at column stride cs) by one lane.
template <typename T, typename A>
__device__ __forceinline__ A dot_row(const A* x, const T* row, int64_t cs, int64_t n) {
  A acc = 0;
  for (int64_t c = 0; c < n; ++c) acc += x[c] * load_as<T, A>(row + c * cs);
  return acc;
}

// dot(x[0..n) at stride xs, y[0..n) at stride ys) by one lane, both in global memory.
template <typename T, typename A>
__device__ __forceinline__ A dot_rows(const T* x, int64_t xs, const T* y, int64_t ys, int64_t n) {
  A acc = 0;
  for (int64_t c = 0; c < n; ++c) acc += load_as<T, A>(x + c * xs) * load_as<T, A>(y + c * ys);
  return acc;
}

// acc[c] = acc[c] * alpha + sum_{r < n} w_r * row(r)[c * cs] for c < len, where w_r is lane r's w:
// each lane owns columns lane, lane + 32, ..., so the row reads are coalesced. All 32 lanes must
// call it (the loops are whole-warp: shuffles).
template <typename T, typename A, typename Row>
__device__ __forceinline__ void accumulate_rows(A* acc, int64_t len, A alpha, A w, int n, const Row& row, int64_t cs) {
  const int lane = threadIdx.x % 32;
  for (int64_t c0 = 0; c0 < len; c0 += 32) {
    const int64_t c = c0 + lane;
    A sum = c < len ? acc[c] * alpha : A(0);
    for (int r = 0; r < n; ++r) {
      const A wr = __shfl_sync(kFullMask, w, r);
      if (c < len) sum += wr * load_as<T, A>(row(r) + c * cs);
    }
    if (c < len) acc[c] = sum;
  }
}

// Forward: warp w of block x owns row (b, h, i) = flat row blockIdx.x * kGenericWarps + w.
// Shared memory per warp: q row * scale (d) and the output accumulator (dv), in A.
template <typename T, typename A>
__global__ void __launch_bounds__(kGenericWarps * 32)
    generic_forward_kernel(const GenericProblem<T, A> p, T* __restrict__ out, A* __restrict__ lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Shape& s = p.s;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + warp;
  if (row >= s.B * s.Hq * s.Lq) return;
  const int64_t i = row % s.Lq, bh = row / s.Lq, h = bh % s.Hq, b = bh / s.Hq, hk = h / s.group;
  A* qs = reinterpret_cast<A*>(smem_raw) + warp * (s.d + s.dv);
  A* os = qs + s.d;
  const T* qrow = p.q.at(b, h, i);
  for (int64_t c = lane; c < s.d; c += 32) qs[c] = load_as<T, A>(qrow + c * p.q.s3) * p.scale;
  for (int64_t c = lane; c < s.dv; c += 32) os[c] = A(0);
  __syncwarp();

  const int64_t kend = p.key_end(b, i);
  const uint32_t drop_row = p.dropout.active() ? p.dropout.row_key(b, h, i) : 0u;
  const A inf = static_cast<A>(INFINITY);  // (no constexpr host call: the CMake build lacks --expt-relaxed-constexpr)
  A m = -inf, l = 0;
  for (int64_t j0 = 0; j0 < kend; j0 += 32) {
    const int64_t j = j0 + lane;
    A sc = -inf;
    if (j < kend) sc = dot_row<T, A>(qs, p.k.at(b, hk, j), p.k.s3, s.d) + p.mask_at(b, h, i, j);
    const A m_new = max(m, warp_max(sc));
    // Every key so far is masked: nothing to add (uniform over the warp). Unless a score is NaN (max
    // drops NaN): then the row goes NaN below, as in PyTorch.
    if (m_new == -inf && !__any_sync(0xffffffffu, sc != sc)) continue;
    const A pr = sc == -inf ? A(0) : exp_(sc - m_new);
    const A alpha = exp_(m - m_new);  // 0 while m is -inf
    l = l * alpha + warp_sum(pr);
    m = m_new;
    const A pk = (p.dropout.active() && !p.dropout.keep(drop_row, j)) ? A(0) : pr;
    const int n = kend - j0 < 32 ? int(kend - j0) : 32;
    accumulate_rows<T, A>(os, s.dv, alpha, pk, n, [&](int r) { return p.v.at(b, hk, j0 + r); }, p.v.s3);
  }
  const A keep_scale = p.dropout.active() ? A(1) / A(1.0 - p.dropout.p) : A(1);
  const A inv = l != A(0) ? keep_scale / l : A(0);  // NaN rows stay NaN
  T* orow = out + row * s.dv;
  for (int64_t c = lane; c < s.dv; c += 32) store_as<T, A>(orow + c, os[c] * inv);
  if (lane == 0) lse[row] = l != A(0) ? m + log_(l) : -inf;
}

// delta[row] = grad_out[row] . out[row] (rows of dv, contiguous).
template <typename T, typename A>
__global__ void __launch_bounds__(kGenericWarps * 32)
    row_dot_kernel(const T* __restrict__ x, const T* __restrict__ y, A* __restrict__ delta, int64_t rows, int64_t n) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + warp;
  if (row >= rows) return;
  A acc = 0;
  for (int64_t c = lane; c < n; c += 32) acc += load_as<T, A>(x + row * n + c) * load_as<T, A>(y + row * n + c);
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc;
}

// dQ: a warp per query row. Shared memory per warp: grad_out row (dv) and the dQ accumulator (d).
template <typename T, typename A>
__global__ void __launch_bounds__(kGenericWarps * 32)
    generic_grad_q_kernel(const GenericProblem<T, A> p, const T* __restrict__ grad_out, const A* __restrict__ lse,
                          const A* __restrict__ delta, T* __restrict__ grad_q) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Shape& s = p.s;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + warp;
  if (row >= s.B * s.Hq * s.Lq) return;
  const int64_t i = row % s.Lq, bh = row / s.Lq, h = bh % s.Hq, b = bh / s.Hq, hk = h / s.group;
  A* gos = reinterpret_cast<A*>(smem_raw) + warp * (s.d + s.dv);
  A* dqs = gos + s.dv;
  for (int64_t c = lane; c < s.dv; c += 32) gos[c] = load_as<T, A>(grad_out + row * s.dv + c);
  for (int64_t c = lane; c < s.d; c += 32) dqs[c] = A(0);
  __syncwarp();
  const A inf = static_cast<A>(INFINITY);
  const A lse_i = lse[row], delta_i = delta[row];
  const int64_t kend = lse_i == -inf ? 0 : p.key_end(b, i);  // a row without keys has no gradient
  const uint32_t drop_row = p.dropout.active() ? p.dropout.row_key(b, h, i) : 0u;
  const A keep_scale = p.dropout.active() ? A(1) / A(1.0 - p.dropout.p) : A(1);
  const T* qrow = p.q.at(b, h, i);
  for (int64_t j0 = 0; j0 < kend; j0 += 32) {
    const int64_t j = j0 + lane;
    A ds = 0;
    if (j < kend) {
      const A sc = dot_rows<T, A>(qrow, p.q.s3, p.k.at(b, hk, j), p.k.s3, s.d) * p.scale + p.mask_at(b, h, i, j);
      const A pr = sc == -inf ? A(0) : exp_(sc - lse_i);
      A dp = dot_row<T, A>(gos, p.v.at(b, hk, j), p.v.s3, s.dv);
      if (p.dropout.active()) dp = p.dropout.keep(drop_row, j) ? dp * keep_scale : A(0);
      ds = pr * (dp - delta_i);
    }
    const int n = kend - j0 < 32 ? int(kend - j0) : 32;
    accumulate_rows<T, A>(dqs, s.d, A(1), ds, n, [&](int r) { return p.k.at(b, hk, j0 + r); }, p.k.s3);
  }
  for (int64_t c = lane; c < s.d; c += 32) store_as<T, A>(grad_q + row * s.d + c, dqs[c] * p.scale);
}

// dK, dV: a warp per key (b, kv head, j), summed over the query heads of its group. Shared memory per
// warp: the dK (d) and dV (dv) accumulators.
template <typename T, typename A>
__global__ void __launch_bounds__(kGenericWarps * 32)
    generic_grad_kv_kernel(const GenericProblem<T, A> p, const T* __restrict__ grad_out, const A* __restrict__ lse,
                           const A* __restrict__ delta, T* __restrict__ grad_k, T* __restrict__ grad_v) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Shape& s = p.s;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + warp;
  if (row >= s.B * s.Hkv * s.Lk) return;
  const int64_t j = row % s.Lk, bh = row / s.Lk, hk = bh % s.Hkv, b = bh / s.Hkv;
  A* dks = reinterpret_cast<A*>(smem_raw) + warp * (s.d + s.dv);
  A* dvs = dks + s.d;
  for (int64_t c = lane; c < s.d; c += 32) dks[c] = A(0);
  for (int64_t c = lane; c < s.dv; c += 32) dvs[c] = A(0);
  __syncwarp();
  const A inf = static_cast<A>(INFINITY);
  const A keep_scale = p.dropout.active() ? A(1) / A(1.0 - p.dropout.p) : A(1);
  const bool visible = j < valid_keys(p.lengths, b, s.Lk);
  const T* krow = p.k.at(b, hk, j);
  const T* vrow = p.v.at(b, hk, j);
  const int64_t i_begin = p.causal ? j : 0;
  for (int64_t h = hk * s.group; visible && h < (hk + 1) * s.group; ++h) {
    for (int64_t i0 = i_begin; i0 < s.Lq; i0 += 32) {
      const int64_t i = i0 + lane;
      A pz = 0, ds = 0;
      if (i < s.Lq) {
        const int64_t r = (b * s.Hq + h) * s.Lq + i;
        const A lse_i = lse[r];
        const T* qrow = p.q.at(b, h, i);
        if (lse_i != -inf) {
          const A sc = dot_rows<T, A>(qrow, p.q.s3, krow, p.k.s3, s.d) * p.scale + p.mask_at(b, h, i, j);
          const A pr = sc == -inf ? A(0) : exp_(sc - lse_i);
          const A dp = dot_rows<T, A>(grad_out + r * s.dv, 1, vrow, p.v.s3, s.dv);
          A z = 1;
          if (p.dropout.active()) z = p.dropout.keep(p.dropout.row_key(b, h, i), j) ? keep_scale : A(0);
          pz = pr * z;
          ds = pr * (dp * z - delta[r]);
        }
      }
      const int n = s.Lq - i0 < 32 ? int(s.Lq - i0) : 32;
      const T* go0 = grad_out + ((b * s.Hq + h) * s.Lq + i0) * s.dv;
      accumulate_rows<T, A>(dvs, s.dv, A(1), pz, n, [&](int rr) { return go0 + rr * s.dv; }, 1);
      accumulate_rows<T, A>(dks, s.d, A(1), ds, n, [&](int rr) { return p.q.at(b, h, i0 + rr); }, p.q.s3);
    }
  }
  for (int64_t c = lane; c < s.d; c += 32) store_as<T, A>(grad_k + row * s.d + c, dks[c] * p.scale);
  for (int64_t c = lane; c < s.dv; c += 32) store_as<T, A>(grad_v + row * s.dv + c, dvs[c]);
}

unsigned warp_blocks(int64_t rows, const char* op) {
  const int64_t blocks = (rows + kGenericWarps - 1) / kGenericWarps;
  BM_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, "too many rows (", rows, ") for one launch");
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

template <typename T, typename A>
GenericProblem<T, A> generic_problem(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& lengths, const Tensor& mask, bool is_causal,
                                     std::optional<double> scale, const Dropout& dropout) {
  GenericProblem<T, A> p{};
  p.s = shape_of(d);
  p.scale = static_cast<A>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.d)));
  p.causal = is_causal;
  p.q = operand_of<T>(q);
  p.k = operand_of<T>(k);
  p.v = operand_of<T>(v);
  p.lengths = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  p.mask = mask.defined() ? mask.const_data_ptr<A>() : nullptr;
  if (mask.defined()) {
    p.ms0 = mask.stride(0);
    p.ms1 = mask.stride(1);
    p.ms2 = mask.stride(2);
    p.ms3 = mask.stride(3);
  }
  p.dropout = dropout;
  return p;
}

// ------------------------------------------------------------------------------------------------
// Tensor-core path (sm_80+): PTX wrappers
// ------------------------------------------------------------------------------------------------

template <typename E>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  // c += a b for one m16n8k16 tile: a row-major 16x16, b "col" (k-major per column) 16x8, c 16x8 float.
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8 and receives, of each
// matrix m, the pair (row l / 4, columns 2 (l % 4), +1) in r[m] - or with kTrans, of the transposed
// matrix: (rows 2 (l % 4), +1 of column l / 4).
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_ptr)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_ptr)));
  }
#endif
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (then nothing is read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Rows [r0, r0 + R) of one (batch, head) of a [.., rows, D] operand into shared memory (row stride
// D + kPad elements); rows at or past `valid` are zero-filled. All kThreads threads take part.
template <typename E, int D, int R, int kThreads>
__device__ __forceinline__ void load_rows(E* dst, const E* src, int64_t row_stride, int64_t r0, int64_t valid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLd = D + 8;
  for (int c = threadIdx.x; c < R * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r0 + r < valid;
    cp_async_16(dst + r * kLd + col, ok ? src + (r0 + r) * row_stride + col : src, ok);
  }
}

struct TcProblem {
  int64_t B, Hq, Hkv, Lq, Lk, group;
  float scale_log2;  // scale * log2(e)
  float scale;
  bool causal;
  const void* q;
  const void* k;
  const void* v;
  int64_t qs[3], ks[3], vs[3];  // element strides over (batch, head, row); columns are contiguous
  const int64_t* lengths;
  Dropout dropout;
};

constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kFwdM = 16 * kTcWarps;  // query rows per forward block
constexpr int kFwdN = 64;             // keys per forward step

template <int D>
constexpr size_t forward_smem_bytes() {
  return static_cast<size_t>(kFwdM + 3 * kFwdN) * (D + 8) * 2;  // Q, K (two buffers), V
}

// Forward: block (m block, b * Hq + h). out [B, Hq, Lq, D] contiguous, lse [B, Hq, Lq] float32.
template <typename E, int D>
__global__ void __launch_bounds__(kTcThreads)
    tc_forward_kernel(const TcProblem p, E* __restrict__ out, float* __restrict__ lse) {
  constexpr int kLd = D + 8;
  constexpr int kNT = kFwdN / 8;  // score tiles (8 keys) per step
  constexpr int kDT = D / 8;      // output tiles (8 columns)
  constexpr int kKC = D / 16;     // k chunks of S = Q K^T
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* sQ = reinterpret_cast<E*>(smem_raw);
  E* sK = sQ + kFwdM * kLd;  // two buffers of kFwdN rows
  E* sV = sK + 2 * kFwdN * kLd;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t num_m = (p.Lq + kFwdM - 1) / kFwdM;
  const int64_t mb = blockIdx.x % num_m, bh = blockIdx.x / num_m;
  const int64_t h = bh % p.Hq, b = bh / p.Hq, hk = h / p.group;
  const int64_t m0 = mb * kFwdM;
  const E* q = static_cast<const E*>(p.q) + b * p.qs[0] + h * p.qs[1];
  const E* k = static_cast<const E*>(p.k) + b * p.ks[0] + hk * p.ks[1];
  const E* v = static_cast<const E*>(p.v) + b * p.vs[0] + hk * p.vs[1];

  const int64_t klen = valid_keys(p.lengths, b, p.Lk);
  const int64_t key_end = p.causal ? (m0 + kFwdM < klen ? m0 + kFwdM : klen) : klen;
  const int n_blocks = static_cast<int>((key_end + kFwdN - 1) / kFwdN);
  // This thread's two rows (g and g + 8 of its warp's 16).
  const int64_t row0 = m0 + warp * 16 + g, row1 = row0 + 8;

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  uint32_t drop_row[2] = {0u, 0u};
  if (p.dropout.active()) {
    drop_row[0] = p.dropout.row_key(b, h, row0);
    drop_row[1] = p.dropout.row_key(b, h, row1);
  }

  if (n_blocks > 0) {
    load_rows<E, D, kFwdM, kTcThreads>(sQ, q, p.qs[2], m0, p.Lq);
    load_rows<E, D, kFwdN, kTcThreads>(sK, k, p.ks[2], 0, klen);
    cp_async_commit();
  }
  uint32_t qa[kKC][4];
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int64_t n0 = static_cast<int64_t>(nb) * kFwdN;
    E* sKb = sK + (nb & 1) * kFwdN * kLd;
    __syncthreads();  // every warp is done with sV and with the K buffer the next load overwrites
    load_rows<E, D, kFwdN, kTcThreads>(sV, v, p.vs[2], n0, klen);
    cp_async_commit();
    if (nb + 1 < n_blocks) load_rows<E, D, kFwdN, kTcThreads>(sK + ((nb + 1) & 1) * kFwdN * kLd, k, p.ks[2], n0 + kFwdN, klen);
    cp_async_commit();  // possibly empty: keeps the group count fixed
    cp_async_wait<2>();  // Q and this block's K have landed
    __syncthreads();
    if (nb == 0) {
#pragma unroll
      for (int kc = 0; kc < kKC; ++kc)
        ldmatrix_x4<false>(qa[kc], sQ + (warp * 16 + (lane % 16)) * kLd + kc * 16 + (lane / 16) * 8);
    }

    // S = Q K^T: tile nt holds (rows g, g + 8; keys n0 + 8 nt + 2t, +1).
    float sc[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < kKC; ++kc) {
#pragma unroll
      for (int nt = 0; nt < kNT; nt += 2) {
        uint32_t kb[4];
        ldmatrix_x4<false>(kb, sKb + (nt * 8 + (lane / 16) * 8 + (lane % 8)) * kLd + kc * 16 + ((lane / 8) % 2) * 8);
        Mma<E>::mma(sc[nt], qa[kc], kb[0], kb[1]);
        Mma<E>::mma(sc[nt + 1], qa[kc], kb[2], kb[3]);
      }
    }
    // Scores in the exp2 domain (scaled before the max, so a negative scale is handled too), then
    // the keys past the valid ones and above the diagonal.
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] *= p.scale_log2;
    if (n0 + kFwdN > klen || (p.causal && n0 + kFwdN - 1 > m0)) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t j = n0 + nt * 8 + 2 * t + (e & 1);
          const int64_t i = (e < 2) ? row0 : row1;
          if (j >= klen || (p.causal && j > i)) sc[nt][e] = -INFINITY;
        }
    }
    // Online softmax per row (r = 0: row g, r = 1: row g + 8); a row's 64 scores are spread over
    // the 4 threads of a quad.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[r] - base);  // 0 while m_run is -inf
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          const float pe = exp2f(sc[nt][e] - base);  // exp2(-inf) = 0 for masked keys
          sum += pe;
          sc[nt][e] = pe;
        }
      l_run[r] = l_run[r] * alpha + sum;  // this thread's part; the quad's parts are added at the end
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }
    if (p.dropout.active()) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t j = n0 + nt * 8 + 2 * t + (e & 1);
          if (!p.dropout.keep(drop_row[e >> 1], j)) sc[nt][e] = 0.f;
        }
    }

    cp_async_wait<1>();  // this block's V has landed
    __syncthreads();
    // O += P V: P's accumulator tiles (2 kc, 2 kc + 1) are exactly the A operand of k chunk kc.
#pragma unroll
    for (int kc = 0; kc < kFwdN / 16; ++kc) {
      uint32_t pa[4];
      pa[0] = Mma<E>::pack(sc[2 * kc][0], sc[2 * kc][1]);
      pa[1] = Mma<E>::pack(sc[2 * kc][2], sc[2 * kc][3]);
      pa[2] = Mma<E>::pack(sc[2 * kc + 1][0], sc[2 * kc + 1][1]);
      pa[3] = Mma<E>::pack(sc[2 * kc + 1][2], sc[2 * kc + 1][3]);
#pragma unroll
      for (int dt = 0; dt < kDT; dt += 2) {
        uint32_t vb[4];
        ldmatrix_x4<true>(vb, sV + (kc * 16 + ((lane / 8) % 2) * 8 + (lane % 8)) * kLd + dt * 8 + (lane / 16) * 8);
        Mma<E>::mma(o[dt], pa, vb[0], vb[1]);
        Mma<E>::mma(o[dt + 1], pa, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();

  const float keep_scale = p.dropout.active() ? static_cast<float>(p.dropout.keep_scale()) : 1.f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    const int64_t i = r == 0 ? row0 : row1;
    if (i >= p.Lq) continue;
    const float inv = l != 0.f ? keep_scale / l : 0.f;  // NaN rows (a NaN score) stay NaN
    E* orow = out + ((b * p.Hq + h) * p.Lq + i) * D;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) = Mma<E>::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    if (t == 0) lse[(b * p.Hq + h) * p.Lq + i] = l != 0.f ? m_run[r] * kLn2 + logf(l) : -INFINITY;
  }
}

// Backward. Block: (key block, b * Hkv + kv head); warp w owns keys n0 + 16 w .. + 15.
constexpr int kBwdN = 16 * kTcWarps;  // keys per block
template <int D>
__host__ __device__ constexpr int bwd_rows() {
  return D <= 64 ? 64 : 32;  // query rows per step (register budget at D = 128)
}

template <int D>
constexpr size_t backward_smem_bytes() {
  constexpr int M = bwd_rows<D>();
  return static_cast<size_t>(2 * kBwdN + 2 * M) * (D + 8) * 2  // K, V, Q, dO
         + static_cast<size_t>(kBwdN) * (M + 8) * 2            // dS^T
         + static_cast<size_t>(2 * M) * 4;                     // logsumexp, delta
}

// grad_out, out: [B, Hq, Lq, D] contiguous; lse, delta [B, Hq, Lq] float; dq_acc [B, Hq, Lq, D] float,
// zero on entry (dQ / scale, summed by atomics); grad_k / grad_v [B, Hkv, Lk, D] contiguous.
template <typename E, int D>
__global__ void __launch_bounds__(kTcThreads)
    tc_backward_kernel(const TcProblem p, const E* __restrict__ grad_out, const float* __restrict__ lse,
                       const float* __restrict__ delta, float* __restrict__ dq_acc, E* __restrict__ grad_k,
                       E* __restrict__ grad_v) {
  constexpr int M = bwd_rows<D>();
  constexpr int kLd = D + 8;
  constexpr int kLdS = M + 8;
  constexpr int kMT = M / 8;   // score tiles (8 queries) per step
  constexpr int kDT = D / 8;   // dK / dV tiles (8 columns)
  constexpr int kKC = D / 16;  // k chunks over the head dim
  // dQ = dS K: warps split the M query rows into 16-row tiles and, when M < 64, D into column groups.
  constexpr int kQTiles = M / 16;
  constexpr int kColGroups = kTcWarps / kQTiles;
  constexpr int kQCols = D / kColGroups;
  static_assert(kQTiles * kColGroups == kTcWarps, "warps must tile dQ exactly");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* sK = reinterpret_cast<E*>(smem_raw);
  E* sV = sK + kBwdN * kLd;
  E* sQ = sV + kBwdN * kLd;
  E* sdO = sQ + M * kLd;
  E* sdS = sdO + M * kLd;  // [kBwdN keys][M queries]
  float* sLse = reinterpret_cast<float*>(sdS + kBwdN * kLdS);
  float* sDelta = sLse + M;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t num_n = (p.Lk + kBwdN - 1) / kBwdN;
  const int64_t nb = blockIdx.x % num_n, bh = blockIdx.x / num_n;
  const int64_t hk = bh % p.Hkv, b = bh / p.Hkv;
  const int64_t n0 = nb * kBwdN;
  const E* k = static_cast<const E*>(p.k) + b * p.ks[0] + hk * p.ks[1];
  const E* v = static_cast<const E*>(p.v) + b * p.vs[0] + hk * p.vs[1];
  const int64_t klen = valid_keys(p.lengths, b, p.Lk);
  // This thread's two keys (rows g and g + 8 of its warp's 16).
  const int64_t key0 = n0 + warp * 16 + g, key1 = key0 + 8;

  float dk[kDT][4], dv[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  const bool any_key = n0 < klen;
  if (any_key) {
    load_rows<E, D, kBwdN, kTcThreads>(sK, k, p.ks[2], n0, klen);
    load_rows<E, D, kBwdN, kTcThreads>(sV, v, p.vs[2], n0, klen);
    cp_async_commit();
  }
  const float keep_scale = p.dropout.active() ? static_cast<float>(p.dropout.keep_scale()) : 1.f;
  // Causal: the first query that sees key n0 is n0 itself.
  const int64_t m_begin = p.causal ? (n0 / M) * M : 0;
  const int64_t steps_per_head = any_key && m_begin < p.Lq ? (p.Lq - m_begin + M - 1) / M : 0;
  for (int64_t step = 0; step < steps_per_head * p.group; ++step) {
    const int64_t h = hk * p.group + step / steps_per_head;
    const int64_t m0 = m_begin + (step % steps_per_head) * M;
    const E* q = static_cast<const E*>(p.q) + b * p.qs[0] + h * p.qs[1];
    const int64_t row_base = (b * p.Hq + h) * p.Lq;
    __syncthreads();  // the previous step is done with sQ, sdO, sdS, sLse, sDelta
    load_rows<E, D, M, kTcThreads>(sQ, q, p.qs[2], m0, p.Lq);
    load_rows<E, D, M, kTcThreads>(sdO, grad_out + row_base * D, D, m0, p.Lq);
    cp_async_commit();
    for (int r = threadIdx.x; r < M; r += kTcThreads) {
      const int64_t i = m0 + r;
      const float l = i < p.Lq ? lse[row_base + i] : -INFINITY;
      // A row past Lq, or one without keys (lse = -inf), gets P = exp2(s - inf) = 0.
      sLse[r] = l == -INFINITY ? INFINITY : l * kLog2e;
      sDelta[r] = i < p.Lq ? delta[row_base + i] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T: tile mt holds (keys g, g + 8; queries m0 + 8 mt + 2t, +1).
    float st[kMT][4], dpt[kMT][4];
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < kKC; ++kc) {
      uint32_t ka[4], va[4];
      ldmatrix_x4<false>(ka, sK + (warp * 16 + (lane % 16)) * kLd + kc * 16 + (lane / 16) * 8);
      ldmatrix_x4<false>(va, sV + (warp * 16 + (lane % 16)) * kLd + kc * 16 + (lane / 16) * 8);
#pragma unroll
      for (int mt = 0; mt < kMT; mt += 2) {
        uint32_t qb[4], ob[4];
        const int off = (mt * 8 + (lane / 16) * 8 + (lane % 8)) * kLd + kc * 16 + ((lane / 8) % 2) * 8;
        ldmatrix_x4<false>(qb, sQ + off);
        ldmatrix_x4<false>(ob, sdO + off);
        Mma<E>::mma(st[mt], ka, qb[0], qb[1]);
        Mma<E>::mma(st[mt + 1], ka, qb[2], qb[3]);
        Mma<E>::mma(dpt[mt], va, ob[0], ob[1]);
        Mma<E>::mma(dpt[mt + 1], va, ob[2], ob[3]);
      }
    }
    // P^T (into st, with dropout's factor: the probabilities dV sees) and dS^T (into dpt).
    const bool edge = n0 + kBwdN > klen || (p.causal && n0 + kBwdN - 1 > m0);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = mt * 8 + 2 * t + (e & 1);
        const int64_t i = m0 + c, j = (e < 2) ? key0 : key1;
        float pe = exp2f(st[mt][e] * p.scale_log2 - sLse[c]);
        if (edge && (j >= klen || (p.causal && j > i))) pe = 0.f;
        float z = 1.f;
        if (p.dropout.active()) z = (i < p.Lq && p.dropout.keep(p.dropout.row_key(b, h, i), j)) ? keep_scale : 0.f;
        dpt[mt][e] = pe * (dpt[mt][e] * z - sDelta[c]);
        st[mt][e] = pe * z;
      }
    // dS^T to shared memory for dQ (rows: this warp's keys; columns: queries).
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * kLdS + mt * 8 + 2 * t) = Mma<E>::pack(dpt[mt][0], dpt[mt][1]);
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * kLdS + mt * 8 + 2 * t) =
          Mma<E>::pack(dpt[mt][2], dpt[mt][3]);
    }
    // dV += P^T dO and dK += dS^T Q: the accumulator tiles (2 kc, 2 kc + 1) are the A operand of
    // query chunk kc; dO and Q are read transposed (k = query, n = column).
#pragma unroll
    for (int kc = 0; kc < M / 16; ++kc) {
      uint32_t pa[4], sa[4];
      pa[0] = Mma<E>::pack(st[2 * kc][0], st[2 * kc][1]);
      pa[1] = Mma<E>::pack(st[2 * kc][2], st[2 * kc][3]);
      pa[2] = Mma<E>::pack(st[2 * kc + 1][0], st[2 * kc + 1][1]);
      pa[3] = Mma<E>::pack(st[2 * kc + 1][2], st[2 * kc + 1][3]);
      sa[0] = Mma<E>::pack(dpt[2 * kc][0], dpt[2 * kc][1]);
      sa[1] = Mma<E>::pack(dpt[2 * kc][2], dpt[2 * kc][3]);
      sa[2] = Mma<E>::pack(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]);
      sa[3] = Mma<E>::pack(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3]);
#pragma unroll
      for (int dt = 0; dt < kDT; dt += 2) {
        uint32_t ob[4], qb[4];
        const int off = (kc * 16 + ((lane / 8) % 2) * 8 + (lane % 8)) * kLd + dt * 8 + (lane / 16) * 8;
        ldmatrix_x4<true>(ob, sdO + off);
        ldmatrix_x4<true>(qb, sQ + off);
        Mma<E>::mma(dv[dt], pa, ob[0], ob[1]);
        Mma<E>::mma(dv[dt + 1], pa, ob[2], ob[3]);
        Mma<E>::mma(dk[dt], sa, qb[0], qb[1]);
        Mma<E>::mma(dk[dt + 1], sa, qb[2], qb[3]);
      }
    }
    __syncthreads();  // dS^T complete
    // dQ (rows m0 + 16 qt .., columns cg * kQCols ..) += dS K; dS is read transposed from dS^T.
    {
      const int qt = warp % kQTiles, cg = warp / kQTiles;
      float dq[kQCols / 8][4];
#pragma unroll
      for (int i = 0; i < kQCols / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < kBwdN / 16; ++kc) {
        uint32_t sa[4];
        // matrices: (keys +0, queries +0), (keys +0, queries +8), (keys +8, queries +0), (keys +8, queries +8)
        ldmatrix_x4<true>(sa, sdS + (kc * 16 + (lane / 16) * 8 + (lane % 8)) * kLdS + qt * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int ct = 0; ct < kQCols / 8; ct += 2) {
          uint32_t kb[4];
          ldmatrix_x4<true>(kb, sK + (kc * 16 + ((lane / 8) % 2) * 8 + (lane % 8)) * kLd + cg * kQCols + ct * 8 +
                                    (lane / 16) * 8);
          Mma<E>::mma(dq[ct], sa, kb[0], kb[1]);
          Mma<E>::mma(dq[ct + 1], sa, kb[2], kb[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = m0 + qt * 16 + g + 8 * r;
        if (i >= p.Lq) continue;
        float* dst = dq_acc + (row_base + i) * D + cg * kQCols;
#pragma unroll
        for (int ct = 0; ct < kQCols / 8; ++ct) {
          atomicAdd(dst + ct * 8 + 2 * t, dq[ct][2 * r]);
          atomicAdd(dst + ct * 8 + 2 * t + 1, dq[ct][2 * r + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // dK = scale dS^T Q, dV = P^T dO for this thread's keys.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = r == 0 ? key0 : key1;
    if (j >= p.Lk) continue;
    E* krow = grad_k + ((b * p.Hkv + hk) * p.Lk + j) * D;
    E* vrow = grad_v + ((b * p.Hkv + hk) * p.Lk + j) * D;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      *reinterpret_cast<uint32_t*>(krow + dt * 8 + 2 * t) =
          Mma<E>::pack(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(vrow + dt * 8 + 2 * t) = Mma<E>::pack(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Dispatch
// ------------------------------------------------------------------------------------------------

bool tc_device() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major >= 8;
}

bool tc_head_dim(int64_t d) { return d == 32 || d == 64 || d == 128; }

// An operand as the tensor-core kernels read it: contiguous columns, rows 16-byte aligned.
Tensor tc_ready(const Tensor& t) {
  const int64_t es = t.element_size();
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int i = 0; ok && i < 3; ++i) ok = (t.stride(i) * es) % 16 == 0 || t.size(i) == 1;
  return ok ? t : t.contiguous();
}

bool use_tc(const Dims& d, const Tensor& q, const Tensor& mask) {
  const auto st = q.scalar_type();
  return (st == at::kBFloat16 || st == at::kHalf) && d.d == d.dv && tc_head_dim(d.d) && !mask.defined() && tc_device();
}

TcProblem tc_problem(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lengths,
                     bool is_causal, std::optional<double> scale, const Dropout& dropout) {
  TcProblem p{};
  p.B = d.B;
  p.Hq = d.Hq;
  p.Hkv = d.Hkv;
  p.Lq = d.Lq;
  p.Lk = d.Lk;
  p.group = d.Hq / d.Hkv;
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.d));
  p.scale = static_cast<float>(sc);
  p.scale_log2 = static_cast<float>(sc * 1.4426950408889634);
  p.causal = is_causal;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q.stride(i);
    p.ks[i] = k.stride(i);
    p.vs[i] = v.stride(i);
  }
  p.lengths = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  p.dropout = dropout;
  return p;
}

unsigned tc_blocks(int64_t n, const char* op) {
  BM_CHECK(n <= std::numeric_limits<int32_t>::max(), op, "too many blocks (", n, ") for one launch");
  return static_cast<unsigned>(n);
}

template <typename E, int D>
void tc_forward(const TcProblem& p, Tensor& out, Tensor& lse, const char* op) {
  const size_t smem = forward_smem_bytes<D>();
  auto kernel = tc_forward_kernel<E, D>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem, op);
  const int64_t blocks = ((p.Lq + kFwdM - 1) / kFwdM) * p.B * p.Hq;
  kernel<<<tc_blocks(blocks, op), kTcThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      p, reinterpret_cast<E*>(out.data_ptr()), lse.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename E, int D>
void tc_backward(const TcProblem& p, const Tensor& grad_out, const Tensor& lse, const Tensor& delta, Tensor& dq_acc,
                 Tensor& grad_k, Tensor& grad_v, const char* op) {
  const size_t smem = backward_smem_bytes<D>();
  auto kernel = tc_backward_kernel<E, D>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem, op);
  const int64_t blocks = ((p.Lk + kBwdN - 1) / kBwdN) * p.B * p.Hkv;
  kernel<<<tc_blocks(blocks, op), kTcThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      p, reinterpret_cast<const E*>(grad_out.const_data_ptr()), lse.const_data_ptr<float>(),
      delta.const_data_ptr<float>(), dq_acc.data_ptr<float>(), reinterpret_cast<E*>(grad_k.data_ptr()),
      reinterpret_cast<E*>(grad_v.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f.template operator()<E, D>() for the element type and head dim of a tensor-core problem.
template <typename F>
void tc_dispatch(at::ScalarType st, int64_t d, F&& f) {
  auto by_dim = [&](auto tag) {
    using E = decltype(tag);
    if (d == 32) f.template operator()<E, 32>();
    else if (d == 64) f.template operator()<E, 64>();
    else f.template operator()<E, 128>();
  };
  if (st == at::kBFloat16) by_dim(__nv_bfloat16{});
  else by_dim(__half{});
}

void check_lengths_on_device(const char* op, const std::optional<Tensor>& key_lengths, int64_t Lk) {
  if (!key_lengths.has_value()) return;
  // The range check synchronizes; a stream being captured into a graph cannot, and there the kernels'
  // clamping keeps every read in bounds.
  if (at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None)
    check_key_lengths_range(op, *key_lengths, Lk);
}

std::tuple<Tensor, Tensor> attention_cuda(const Tensor& query, const Tensor& key, const Tensor& value,
                                          const std::optional<Tensor>& attn_mask,
                                          const std::optional<Tensor>& key_lengths, bool is_causal,
                                          std::optional<double> scale, double dropout_p, int64_t seed) {
  const char* op = "attention";
  const Dims d = check_inputs(op, query, key, value, attn_mask, key_lengths);
  const Dropout dropout = make_dropout(op, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(query.device());
  check_lengths_on_device(op, key_lengths, d.Lk);
  const at::ScalarType ct = compute_dtype(query.scalar_type());
  const Tensor lengths = lengths_int64(key_lengths), mask = additive_mask(attn_mask, d, ct);
  Tensor out = at::empty({d.B, d.Hq, d.Lq, d.dv}, query.options());
  Tensor lse = at::empty({d.B, d.Hq, d.Lq}, query.options().dtype(ct));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (use_tc(d, query, mask)) {
    const Tensor q = tc_ready(query), k = tc_ready(key), v = tc_ready(value);
    const TcProblem p = tc_problem(d, q, k, v, lengths, is_causal, scale, dropout);
    tc_dispatch(query.scalar_type(), d.d, [&]<typename E, int D>() { tc_forward<E, D>(p, out, lse, op); });
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "bigmodel.attention", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const auto p = generic_problem<T, A>(d, query, key, value, lengths, mask, is_causal, scale, dropout);
    const size_t smem = static_cast<size_t>(kGenericWarps) * (d.d + d.dv) * sizeof(A);
    auto kernel = generic_forward_kernel<T, A>;
    set_smem_limit(reinterpret_cast<const void*>(kernel), smem, op);
    kernel<<<warp_blocks(d.B * d.Hq * d.Lq, op), kGenericWarps * 32, smem, at::cuda::getCurrentCUDAStream()>>>(
        p, out.data_ptr<T>(), lse.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_backward_cuda(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& out,
    const Tensor& logsumexp, const std::optional<Tensor>& attn_mask, const std::optional<Tensor>& key_lengths,
    bool is_causal, std::optional<double> scale, double dropout_p, int64_t seed, bool mask_grad) {
  const char* op = "attention_backward";
  const Dims d = check_inputs(op, query, key, value, attn_mask, key_lengths);
  check_mask_grad(op, attn_mask, mask_grad);
  BM_CHECK(!mask_grad, op, "the gradient of attn_mask is computed on the CPU only (no CUDA kernel for it yet)");
  const Dropout dropout = make_dropout(op, dropout_p, seed);
  const at::ScalarType ct = compute_dtype(query.scalar_type());
  check_backward_inputs(op, d, grad_out, out, logsumexp, ct, query.device());
  // The kernels read both in query's type.
  check_same_dtype_device(grad_out, query, op, "grad_out", "query");
  check_same_dtype_device(out, query, op, "out", "query");
  const c10::cuda::CUDAGuard guard(query.device());
  check_lengths_on_device(op, key_lengths, d.Lk);
  const Tensor lengths = lengths_int64(key_lengths), mask = additive_mask(attn_mask, d, ct);
  const Tensor go = grad_out.contiguous(), o = out.contiguous(), lse = logsumexp.contiguous();
  const Tensor no_mask_grad = at::empty({0}, query.options());
  Tensor grad_q = at::empty({d.B, d.Hq, d.Lq, d.d}, query.options());
  Tensor grad_k = at::empty({d.B, d.Hkv, d.Lk, d.d}, query.options());
  Tensor grad_v = at::empty({d.B, d.Hkv, d.Lk, d.dv}, query.options());
  if (grad_q.numel() == 0 && grad_k.numel() == 0 && grad_v.numel() == 0)
    return {grad_q, grad_k, grad_v, no_mask_grad};
  if (d.B * d.Hq * d.Lq == 0 || d.Lk == 0) {
    // No query rows, or no keys: every gradient is zero.
    return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_(), no_mask_grad};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Tensor delta = at::empty({d.B, d.Hq, d.Lq}, query.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "bigmodel.attention_backward", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    row_dot_kernel<T, A><<<warp_blocks(d.B * d.Hq * d.Lq, op), kGenericWarps * 32, 0, stream>>>(
        go.const_data_ptr<T>(), o.const_data_ptr<T>(), delta.data_ptr<A>(), d.B * d.Hq * d.Lq, d.dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (use_tc(d, query, mask)) {
    const Tensor q = tc_ready(query), k = tc_ready(key), v = tc_ready(value);
    const TcProblem p = tc_problem(d, q, k, v, lengths, is_causal, scale, dropout);
    Tensor dq_acc = at::zeros({d.B, d.Hq, d.Lq, d.d}, query.options().dtype(at::kFloat));
    tc_dispatch(query.scalar_type(), d.d, [&]<typename E, int D>() {
      tc_backward<E, D>(p, go, lse, delta, dq_acc, grad_k, grad_v, op);
    });
    grad_q.copy_(dq_acc.mul_(p.scale));
    return {grad_q, grad_k, grad_v, no_mask_grad};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "bigmodel.attention_backward", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const auto p = generic_problem<T, A>(d, query, key, value, lengths, mask, is_causal, scale, dropout);
    const size_t smem = static_cast<size_t>(kGenericWarps) * (d.d + d.dv) * sizeof(A);
    auto dq_kernel = generic_grad_q_kernel<T, A>;
    auto dkv_kernel = generic_grad_kv_kernel<T, A>;
    set_smem_limit(reinterpret_cast<const void*>(dq_kernel), smem, op);
    set_smem_limit(reinterpret_cast<const void*>(dkv_kernel), smem, op);
    dq_kernel<<<warp_blocks(d.B * d.Hq * d.Lq, op), kGenericWarps * 32, smem, stream>>>(
        p, go.const_data_ptr<T>(), lse.const_data_ptr<A>(), delta.const_data_ptr<A>(), grad_q.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dkv_kernel<<<warp_blocks(d.B * d.Hkv * d.Lk, op), kGenericWarps * 32, smem, stream>>>(
        p, go.const_data_ptr<T>(), lse.const_data_ptr<A>(), delta.const_data_ptr<A>(), grad_k.data_ptr<T>(),
        grad_v.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_q, grad_k, grad_v, no_mask_grad};
}

}  // namespace
}  // namespace bigmodel::attention

TORCH_LIBRARY_IMPL(bigmodel, CUDA, m) {
  m.impl("attention", &bigmodel::attention::attention_cuda);
  m.impl("attention_backward", &bigmodel::attention::attention_backward_cuda);
}
