// CPU kernels of bigmodel's attention (contract in attention.h).
//
// Forward is flash-style: each task owns one (batch, query head, block of kBlockQ query rows) and
// walks the key blocks it can see with an online softmax (running max m, running sum l, output
// accumulator rescaled when m grows), so the [Lq, Lk] score matrix never exists. Key blocks past
// key_lengths[b], or wholly above the causal diagonal, are never read. It saves only logsumexp.
//
// Backward recomputes P = exp(s - logsumexp) block by block. One task owns one (batch, kv head):
// it is the only writer of that head's grad_k / grad_v rows (summed over the query heads of its GQA
// group) and of the grad_q rows of those query heads, so no two threads write the same rows.
//
// Block products go through gemm::rowmajor, which serves every d and dv. Each call has a fixed
// cost (tensor views + dispatch), so blocks are large: at (B, L, H, d) = (32, 256, 8, 32) on 2 cores,
// 128 x 256 was the fastest of 64 x 256, 128 x 128, 64 x 128 and 128 x 256 without a mask and within
// noise of the best (128 x 128) with is_causal, forward and forward+backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_cpu_fast.h"
#include "common/checks.h"
#include "common/denormals.h"
#include "common/gemm/blas.h"
#include "common/gemm/microkernel_avx2.h"
#include "common/gemm/pack.h"
#include "common/pool.h"

namespace bigmodel::attention {
namespace {

using at::Tensor;
using at::vec::Vectorized;

constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

template <typename T>
struct Problem {
  Dims d;
  T scale;
  bool causal;
  const T* q;
  const T* k;
  const T* v;
  // Element strides of q, k, v over (batch, head, row); each row's d (or dv) values are contiguous,
  // so permuted views (e.g. a projection's [B, L, H, d] seen as [B, H, L, d]) need no copy.
  int64_t qs[3], ks[3], vs[3];
  const int64_t* lengths;  // [B] or nullptr
  const T* mask;           // additive, indexed by mask_stride; or nullptr
  int64_t mask_stride[4];
  Dropout dropout;

  int64_t group() const { return d.Hq / d.Hkv; }
  int64_t valid_keys(int64_t b) const { return lengths ? lengths[b] : d.Lk; }
  // Keys that rows [.., i1) of batch b can see at all: later key blocks are skipped.
  int64_t key_end(int64_t b, int64_t i1) const {
    const int64_t e = valid_keys(b);
    return causal ? std::min(e, i1) : e;
  }
  const T* q_rows(int64_t b, int64_t h, int64_t i0) const { return q + b * qs[0] + h * qs[1] + i0 * qs[2]; }
  const T* k_rows(int64_t b, int64_t hk, int64_t j0) const { return k + b * ks[0] + hk * ks[1] + j0 * ks[2]; }
  const T* v_rows(int64_t b, int64_t hk, int64_t j0) const { return v + b * vs[0] + hk * vs[1] + j0 * vs[2]; }

  // S[r, c] holds scale * q_{i0+r} . k_{j0+c}; applies attn_mask and the causal diagonal.
  // Z[r, c] for the scores of rows i0.., keys j0..: 0 if dropped, 1 / (1 - p) if kept.
  void dropout_factors(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0, int64_t nk, T* Z, int64_t ldZ) const {
    const T kept = static_cast<T>(dropout.keep_scale());
    for (int64_t r = 0; r < nq; ++r) {
      const uint32_t row = dropout.row_key(b, h, i0 + r);
      T* z = Z + r * ldZ;
      for (int64_t c = 0; c < nk; ++c) z[c] = dropout.keep(row, j0 + c) ? kept : T(0);
    }
  }

  void mask_scores(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0, int64_t nk, T* S, int64_t ldS) const {
    if (mask) {
      for (int64_t r = 0; r < nq; ++r) {
        const T* m = mask + b * mask_stride[0] + h * mask_stride[1] + (i0 + r) * mask_stride[2] + j0 * mask_stride[3];
        T* s = S + r * ldS;
        for (int64_t c = 0; c < nk; ++c) s[c] += m[c * mask_stride[3]];
      }
    }
    if (causal && j0 + nk - 1 > i0) {
      const T ninf = -std::numeric_limits<T>::infinity();
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t first = std::max<int64_t>(0, i0 + r + 1 - j0);
        std::fill(S + r * ldS + std::min(first, nk), S + r * ldS + nk, ninf);
      }
    }
  }
};

template <typename T>
T row_max(const T* s, int64_t n) {
  using V = Vectorized<T>;
  T mx = -std::numeric_limits<T>::infinity();
  int64_t c = 0;
  if (n >= V::size()) {
    V vm(mx);
    for (; c + V::size() <= n; c += V::size()) vm = at::vec::maximum(vm, V::loadu(s + c));
    mx = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; c < n; ++c) mx = std::isnan(s[c]) || s[c] > mx ? s[c] : mx;  // NaN wins, as in maximum above
  return mx;
}

// s <- exp(s - shift) in place; returns the sum. exp(-inf) = 0 covers masked scores; a NaN shift (a
// NaN score in the row) makes the whole row NaN, as PyTorch's softmax does (exp_u20 alone would
// turn NaN into a finite value).
template <typename T>
T exp_shifted(T* s, int64_t n, T shift) {
  if (std::isnan(shift)) {
    std::fill(s, s + n, shift);
    return shift;
  }
  using V = Vectorized<T>;
  const V vs(shift);
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V e = (V::loadu(s + c) - vs).exp_u20();
    e.store(s + c);
    acc = acc + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
  for (; c < n; ++c) {
    s[c] = std::exp(s[c] - shift);
    sum += s[c];
  }
  return sum;
}

template <typename T>
void scale_row(T* x, int64_t n, T a) {
  at::vec::map([a](Vectorized<T> v) { return v * Vectorized<T>(a); }, x, x, n);
}

template <typename T>
void forward(const Problem<T>& p, T* out, T* lse) {
  const Dims& d = p.d;
  const int64_t nqb = (d.Lq + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, d.B * d.Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> S(kBlockQ * kBlockK), acc(kBlockQ * d.dv), m(kBlockQ), l(kBlockQ);
    std::vector<T> Z(p.dropout.active() ? kBlockQ * kBlockK : 0);
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (d.Hq * nqb), h = (t / nqb) % d.Hq, i0 = (t % nqb) * kBlockQ;
      const int64_t hk = h / p.group(), nq = std::min(kBlockQ, d.Lq - i0);
      const int64_t kend = p.key_end(b, i0 + nq);
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      const T* qp = p.q_rows(b, h, i0);
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, kend - j0);
        gemm::rowmajor<T>(false, true, nq, nk, d.d, p.scale, qp, p.qs[2], p.k_rows(b, hk, j0), p.ks[2], T(0), S.data(),
                          kBlockK);
        p.mask_scores(b, h, i0, nq, j0, nk, S.data(), kBlockK);
        for (int64_t r = 0; r < nq; ++r) {
          T* s = S.data() + r * kBlockK;
          const T mb = row_max(s, nk);
          const T mnew = std::isnan(mb) ? mb : std::max(m[r], mb);  // a NaN score makes the row NaN
          if (mnew == ninf) {  // nothing valid yet: contributes zero
            std::fill(s, s + nk, T(0));
            continue;
          }
          const T alpha = std::exp(m[r] - mnew);
          const T sum = exp_shifted(s, nk, mnew);
          if (alpha != T(1)) scale_row(acc.data() + r * d.dv, d.dv, alpha);
          l[r] = l[r] * alpha + sum;
          m[r] = mnew;
        }
        if (p.dropout.active()) {  // the normalizer l counts every key; only the values see dropout
          p.dropout_factors(b, h, i0, nq, j0, nk, Z.data(), kBlockK);
          at::vec::map2([](Vectorized<T> x, Vectorized<T> z) { return x * z; }, S.data(), S.data(), Z.data(),
                        kBlockQ * kBlockK);
        }
        gemm::rowmajor<T>(false, false, nq, d.dv, nk, T(1), S.data(), kBlockK, p.v_rows(b, hk, j0), p.vs[2], T(1),
                          acc.data(), d.dv);
      }
      const int64_t row0 = (b * d.Hq + h) * d.Lq + i0;
      for (int64_t r = 0; r < nq; ++r) {
        T* o = out + (row0 + r) * d.dv;
        if (l[r] != T(0)) {  // a row with keys, or a NaN one (which stays NaN, as in PyTorch)
          at::vec::map([inv = T(1) / l[r]](Vectorized<T> x) { return x * Vectorized<T>(inv); }, o,
                       acc.data() + r * d.dv, d.dv);
          lse[row0 + r] = m[r] + std::log(l[r]);
        } else {
          std::fill(o, o + d.dv, T(0));
          lse[row0 + r] = ninf;
        }
      }
    }
  });
}

// Where the backward sums an attn_mask's gradient (the scores' gradient dS): zeros [slots, mB, mH, mL,
// Lk] in the compute dtype, (mB, mH, mL) the mask's own batch, head and row sizes (1 where it
// broadcasts), so a learned [1, H, L, S] bias gets [H, L, S] sums, not a [B, H, L, S] tensor. Where
// the mask broadcasts over batch, heads or rows, different threads add into the same entries: each
// thread gets its own slot (summed after), unless those copies would outsize the full [B, Hq, Lq,
// Lk] tensor, which is then used instead. A mask broadcast over keys is summed over them after.
struct MaskGradBuffer {
  Tensor buf;
  int64_t strides[3] = {0, 0, 0};  // of batch, query head and row in buf (0 where broadcast)
  int64_t slot = 0;                // elements between threads' copies; 0: one shared copy
  bool defined() const { return buf.defined(); }
  int64_t offset(int64_t b, int64_t h, int64_t row) const {
    return b * strides[0] + h * strides[1] + row * strides[2];
  }
};

// Per-call outputs, gradients and copies come from bigmodel's buffer cache (pooled_empty,
// common/pool.h), as the LSTM's do: a freed block serves the next call, where glibc's default
// thresholds may hand it back to the kernel and fault every page in again.
Tensor zeroed(at::IntArrayRef sizes, at::ScalarType st) { return pooled_empty(sizes, st).zero_(); }

// t in dtype st and contiguous, copied into a cached buffer where it is not already.
Tensor dense(const Tensor& t, at::ScalarType st) {
  if (t.scalar_type() == st && t.is_contiguous()) return t;
  return pooled_empty(t.sizes(), st).copy_(t);
}

MaskGradBuffer mask_grad_buffer(const Dims& d, const Tensor& attn_mask, at::ScalarType st) {
  int64_t m[3] = {1, 1, 1};
  for (int64_t i = 0; i < attn_mask.dim() && i < 4; ++i) {
    const int64_t dim = 4 - attn_mask.dim() + i;
    if (dim < 3) m[dim] = attn_mask.size(i);
  }
  const int64_t full = d.B * d.Hq * d.Lq, own = m[0] * m[1] * m[2], threads = at::get_num_threads();
  MaskGradBuffer g;
  if (own != full && threads * own < full) {
    g.slot = threads > 1 ? own * d.Lk : 0;
  } else {
    m[0] = d.B, m[1] = d.Hq, m[2] = d.Lq;
  }
  g.buf = zeroed({g.slot ? threads : 1, m[0], m[1], m[2], d.Lk}, st);
  g.strides[0] = m[0] > 1 ? m[1] * m[2] * d.Lk : 0;
  g.strides[1] = m[1] > 1 ? m[2] * d.Lk : 0;
  g.strides[2] = m[2] > 1 ? d.Lk : 0;
  return g;
}

// The summed gradient in attn_mask's shape and dtype.
Tensor mask_grad_result(const MaskGradBuffer& g, const Tensor& attn_mask) {
  Tensor t = g.slot ? g.buf.sum(0) : g.buf[0];
  std::vector<int64_t> shape4(4 - attn_mask.dim(), 1);
  shape4.insert(shape4.end(), attn_mask.sizes().begin(), attn_mask.sizes().end());
  return t.sum_to_size(shape4).reshape(attn_mask.sizes()).to(attn_mask.scalar_type());
}

// grad_* are zero-filled [B, H*, L*, *] buffers; delta[row] = grad_out[row] . out[row]. mg: where
// the scores' gradient is summed (attention_backward's mask_grad), or an undefined buffer.
template <typename T>
void backward(const Problem<T>& p, const T* grad_out, const T* lse, const T* delta, T* grad_q, T* grad_k,
              T* grad_v, const MaskGradBuffer& mg) {
  const Dims& d = p.d;
  at::parallel_for(0, d.B * d.Hkv, 1, [&](int64_t t0, int64_t t1) {
    T* grad_mask = mg.defined() ? mg.buf.data_ptr<T>() + at::get_thread_num() * mg.slot : nullptr;
    std::vector<T> P(kBlockQ * kBlockK), dS(kBlockQ * kBlockK);
    // With dropout: Z holds the factors and PZ = P * Z, the probabilities the values saw.
    std::vector<T> Z(p.dropout.active() ? kBlockQ * kBlockK : 0), PZ(Z.size());
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / d.Hkv, hk = t % d.Hkv;
      const int64_t kv_valid = p.valid_keys(b);
      for (int64_t j0 = 0; j0 < kv_valid; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, kv_valid - j0);
        const T* kp = p.k_rows(b, hk, j0);
        const T* vp = p.v_rows(b, hk, j0);
        T* dk = grad_k + ((b * d.Hkv + hk) * d.Lk + j0) * d.d;
        T* dv = grad_v + ((b * d.Hkv + hk) * d.Lk + j0) * d.dv;
        for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
          // Causal: rows above j0 see none of these keys.
          const int64_t first = p.causal ? (j0 / kBlockQ) * kBlockQ : 0;
          for (int64_t i0 = first; i0 < d.Lq; i0 += kBlockQ) {
            const int64_t nq = std::min(kBlockQ, d.Lq - i0);
            const int64_t row0 = (b * d.Hq + h) * d.Lq + i0;
            const T* qp = p.q_rows(b, h, i0);
            const T* go = grad_out + row0 * d.dv;
            gemm::rowmajor<T>(false, true, nq, nk, d.d, p.scale, qp, p.qs[2], kp, p.ks[2], T(0), P.data(), kBlockK);
            p.mask_scores(b, h, i0, nq, j0, nk, P.data(), kBlockK);
            for (int64_t r = 0; r < nq; ++r) {
              T* s = P.data() + r * kBlockK;
              if (lse[row0 + r] == ninf)
                std::fill(s, s + nk, T(0));
              else
                exp_shifted(s, nk, lse[row0 + r]);
            }
            const T* seen = P.data();
            if (p.dropout.active()) {
              p.dropout_factors(b, h, i0, nq, j0, nk, Z.data(), kBlockK);
              at::vec::map2([](Vectorized<T> x, Vectorized<T> z) { return x * z; }, PZ.data(), P.data(), Z.data(),
                            kBlockQ * kBlockK);
              seen = PZ.data();
            }
            gemm::rowmajor<T>(true, false, nk, d.dv, nq, T(1), seen, kBlockK, go, d.dv, T(1), dv, d.dv);
            gemm::rowmajor<T>(false, true, nq, nk, d.dv, T(1), go, d.dv, vp, p.vs[2], T(0), dS.data(), kBlockK);
            if (p.dropout.active())
              at::vec::map2([](Vectorized<T> x, Vectorized<T> z) { return x * z; }, dS.data(), dS.data(), Z.data(),
                            kBlockQ * kBlockK);
            for (int64_t r = 0; r < nq; ++r) {
              const Vectorized<T> D(delta[row0 + r]), sc(p.scale);
              T* ds = dS.data() + r * kBlockK;
              if (grad_mask) {  // the scores' gradient before the scale (which may be 0), from dP in ds
                T* gm = grad_mask + mg.offset(b, h, i0 + r) + j0;
                at::vec::map3(
                    [&](Vectorized<T> pv, Vectorized<T> dp, Vectorized<T> acc) { return acc + pv * (dp - D); }, gm,
                    P.data() + r * kBlockK, ds, gm, nk);
              }
              at::vec::map2([&](Vectorized<T> pv, Vectorized<T> dp) { return pv * (dp - D) * sc; }, ds,
                            P.data() + r * kBlockK, ds, nk);
            }
            gemm::rowmajor<T>(false, false, nq, d.d, nk, T(1), dS.data(), kBlockK, kp, p.ks[2], T(1),
                              grad_q + row0 * d.d, d.d);
            gemm::rowmajor<T>(true, false, nk, d.d, nq, T(1), dS.data(), kBlockK, qp, p.qs[2], T(1), dk, d.d);
          }
        }
      }
    }
  });
}

// Everything of a Problem but the q, k and v pointers (nullptr): q, k, v of any dtype (their strides).
template <typename T>
Problem<T> problem_frame(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lengths,
                         const Tensor& mask, bool is_causal, std::optional<double> scale, const Dropout& dropout) {
  Problem<T> p{d,
               static_cast<T>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.d))),
               is_causal,
               nullptr,
               nullptr,
               nullptr,
               {q.stride(0), q.stride(1), q.stride(2)},
               {k.stride(0), k.stride(1), k.stride(2)},
               {v.stride(0), v.stride(1), v.stride(2)},
               lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr,
               mask.defined() ? mask.const_data_ptr<T>() : nullptr,
               {0, 0, 0, 0},
               dropout};
  if (mask.defined())
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = mask.stride(i);
  return p;
}

template <typename T>
Problem<T> make_problem(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lengths,
                        const Tensor& mask, bool is_causal, std::optional<double> scale, const Dropout& dropout) {
  Problem<T> p = problem_frame<T>(d, q, k, v, lengths, mask, is_causal, scale, dropout);
  p.q = q.const_data_ptr<T>();
  p.k = k.const_data_ptr<T>();
  p.v = v.const_data_ptr<T>();
  return p;
}

// delta = rowsum(dO ∘ O) for the backward, without the [.., Lq, dv] product tensor in between.
Tensor row_dots(const Tensor& a, const Tensor& b) {
  const int64_t n = a.size(-1), rows = n ? a.numel() / n : 0;
  std::vector<int64_t> sizes(a.sizes().begin(), a.sizes().end() - 1);
  Tensor r = at::empty(sizes, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bigmodel.row_dots", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* x = a.const_data_ptr<scalar_t>();
    const scalar_t* y = b.const_data_ptr<scalar_t>();
    scalar_t* out = r.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i)
        out[i] = n ? at::vec::map2_reduce_all<scalar_t>([](Vec u, Vec v) { return u * v; },
                                                        [](Vec u, Vec v) { return u + v; }, x + i * n, y + i * n, n)
                   : scalar_t(0);
    });
  });
  return r;
}

// q, k or v as the kernel reads it: in the compute dtype with contiguous rows; any batch, head and
// row strides are kept (no copy for permuted projections).
Tensor rows_ready(const Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct && (t.size(3) <= 1 || t.stride(3) == 1)) return t;
  return dense(t, ct);
}

// Whether the tile and lanes kernels can read this additive mask (or there is none): its keys contiguous,
// any broadcast over batch, heads and rows.
bool mask_keys_contiguous(const Dims& d, const Tensor& mask) {
  return !mask.defined() || mask.stride(3) == 1 || d.Lk == 1;
}

// The micro-kernel path: float32 compute, head dims up to 256 (any); dropout and masks are fine.
bool use_fast_path(const Dims& d, at::ScalarType ct, const Tensor& mask) {
  return ct == at::kFloat && mask_keys_contiguous(d, mask) && fast::supports_tiles(d.d, d.dv) &&
         gemm::cpu::has_avx512() && gemm::cpu::microkernels_enabled();
}

// The lanes kernel (fast::forward_lanes) for 3 .. 64 query rows per kv head (GQA groups counted): it
// packs nothing, where the blocked kernel packs K^T for every task. Measured on 2 Zen cores (d = 64,
// 512 keys): 1.3-1.8x native from 5 to 64 rows where the blocked kernel read 0.8-1.5x; with 1-2 rows
// (15 of 16 lanes idle) few_queries_forward is faster.
// bf16 inputs take it from one row: the alternatives pack (AMX / vdpbf16ps kernels) or convert the
// whole K and V to float32 (decode rows at 1024 keys: 37.4 / 79.5 ms against the packing kernel's 41.8 /
// 83.0 with and without key padding).
// bf16 calls with 16 or more rows per query head and a full 64-key block fill the bf16 tile kernels'
// blocks, and take them (d = 128, 512 keys, 16 / 32 / 64 rows: 1.46-1.56x / 1.57-1.64x / 1.69-1.89x
// native against the lanes kernel's 1.19-1.42x / 1.04-1.08x / 1.08-1.13x; d = 64, 32 rows: 2.05-2.13x
// against 1.21-1.30x; L = S = 64, d = 32-128: 1.4-2.0x faster than the lanes kernel without a mask,
// about equal causal). Fewer rows of a query head (GQA groups fill the lanes: 8 rows x 4 heads at 2048
// keys 1.77-1.83x against the tiles' 1.49-1.59x) or fewer keys (L = S = 24-48: the lanes kernel
// 1.0-1.6x faster, the tiles computing a half-empty key block) stay on the lanes kernel.
// Above 64 rows float32 takes the tile kernels (fast::forward); bf16 the bf16 tile kernels where they
// take its head dims (AMX: dv <= 64), else the lanes kernel at every row count. An additive mask
// (keys contiguous) is added per 64-key block in the lanes and tile kernels alike (not on AMX, see
// bf16_tiles).
constexpr int64_t kLanesMinRows = 3, kLanesMaxRows = 64, kLanesMinRowsBf16 = 1, kBf16TilesMinKeys = 64;

// Whether a bf16 tile forward (AMX, or vdpbf16ps where bf16_kernel() chose it) runs these head dims and
// this mask here. Masks (keys contiguous): vdpbf16ps only; the AMX form shares its softmax but has not
// run with one (no AMX host here).
bool bf16_tiles(const Dims& d, const Tensor& mask) {
  switch (gemm::cpu::bf16_kernel()) {
    case gemm::cpu::Bf16Kernel::Amx: return fast::supports_amx(d.d, d.dv) && !mask.defined();
    case gemm::cpu::Bf16Kernel::Dot: return fast::supports(d.d, d.dv) && mask_keys_contiguous(d, mask);
    default: return false;
  }
}

bool use_lanes(const Dims& d, at::ScalarType ct, const Tensor& mask, bool bf16) {
  if (ct != at::kFloat || !mask_keys_contiguous(d, mask) ||
      !(bf16 ? fast::supports(d.d, d.dv) : fast::supports_tiles(d.d, d.dv)) || !gemm::cpu::has_avx512() ||
      !gemm::cpu::microkernels_enabled())
    return false;
  const int64_t rows = d.Hq / d.Hkv * d.Lq;
  if (rows < (bf16 ? kLanesMinRowsBf16 : kLanesMinRows)) return false;
  if (!bf16) return rows <= kLanesMaxRows;
  const bool tiles = bf16_tiles(d, mask);
  if (rows <= kLanesMaxRows && (d.Lq < fast::kLanes || d.Lk < kBf16TilesMinKeys || !tiles)) return true;
  // Above 64 rows: the bf16 tiles; else the lanes kernel, or with a mask the float32 tiles (v23: the
  // lanes kernel with a mask lost at 256 rows).
  return !tiles && !mask.defined();
}

// T: float, or uint16_t for bfloat16 tensors.
template <typename T>
fast::ProblemOf<T> fast_problem(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& lengths, bool is_causal, std::optional<double> scale,
                                const Tensor& mask = Tensor(), const Dropout& dropout = Dropout()) {
  fast::ProblemOf<T> p;
  p.B = d.B;
  p.Hq = d.Hq;
  p.Hkv = d.Hkv;
  p.Lq = d.Lq;
  p.Lk = d.Lk;
  p.d = d.d;
  p.dv = d.dv;
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.d)));
  p.causal = is_causal;
  p.q = static_cast<const T*>(q.const_data_ptr());
  p.k = static_cast<const T*>(k.const_data_ptr());
  p.v = static_cast<const T*>(v.const_data_ptr());
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q.stride(i);
    p.ks[i] = k.stride(i);
    p.vs[i] = v.stride(i);
  }
  p.lengths = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  if (mask.defined()) {  // float32 [B, Hq, Lq, Lk] view with contiguous keys (mask_keys_contiguous)
    p.mask = mask.const_data_ptr<float>();
    for (int i = 0; i < 3; ++i) p.ms[i] = mask.stride(i);
  }
  p.dropout = dropout;
  return p;
}

// The float32 tile kernels' problem: fast_problem's, with dropout and the additive mask.
fast::Problem fast_tiles_problem(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& lengths, const Tensor& mask, bool is_causal, std::optional<double> scale,
                                 const Dropout& dropout) {
  return fast_problem<float>(d, q, k, v, lengths, is_causal, scale, mask, dropout);
}

// The lanes and few-rows kernels take a thread team only for at least kTeamBytes of keys and values
// read: waking one costs more than reading that.
constexpr int64_t kTeamBytes = int64_t(1) << 18;

// Tasks of a lanes kernel (`lanes` query rows of a kv head each: 16 on AVX-512, 8 on AVX2), and the key
// and value bytes they read.
int64_t lanes_tasks(const Dims& d, int64_t lanes = fast::kLanes) {
  return d.B * d.Hkv * ((d.Hq / d.Hkv * d.Lq + lanes - 1) / lanes);
}
int64_t lanes_bytes(const Dims& d, int64_t elem, int64_t lanes = fast::kLanes) {
  return lanes_tasks(d, lanes) * d.Lk * (d.d + d.dv) * elem;
}
int64_t few_bytes(const Dims& d) { return d.B * d.Hkv * d.Lk * (d.d + d.dv) * int64_t(sizeof(float)); }

template <typename T>
void lanes_forward(const Dims& d, const fast::ProblemOf<T>& fp, T* out, float* lse) {
  const int64_t tasks = lanes_tasks(d);
  at::parallel_for(0, tasks, lanes_bytes(d, sizeof(T)) < kTeamBytes ? tasks : 1,
                   [&](int64_t t0, int64_t t1) { fast::forward_lanes(fp, t0, t1, out, lse); });
}

// A few query rows per head (decoding with a KV cache: one new token against every key): the blocked
// kernels would pack K for a block of queries that is one row, reading and rewriting the keys to use
// them once (0.4-0.6x F.scaled_dot_product_attention at Lq = 1). Here each query row reads K and V
// in place, once: the scores of every visible key (dot products, reduced per key), their softmax, and
// P V as a sum of value rows. float32, no dropout; an additive mask is added per score (a decoding step's
// padding mask: Hugging Face passes [B, 1, 1, S] with finfo.min, which is no -inf pattern); one task
// per (batch, query head).
// On AVX-512 with the lanes kernel's head dims it serves only 1-2 rows per kv head (use_lanes); on AVX2
// up to 4 query rows per head, more going to lanes_avx2_forward.
constexpr int64_t kFewQueryRows = 4;

bool use_few_queries(const Dims& d, at::ScalarType ct, const Dropout& dropout) {
  return ct == at::kFloat && d.Lq <= kFewQueryRows && !dropout.active() &&
         gemm::cpu::kernel_choice() != gemm::cpu::KernelChoice::Generic;
}

// n <= V::size() elements of a key or value row as float32 (KV: float, or bf16 read in place).
template <typename KV>
inline Vectorized<float> load_kv(const KV* p, int64_t n) {
  using V = Vectorized<float>;
  if constexpr (std::is_same_v<KV, float>) {
    return n == V::size() ? V::loadu(p) : V::loadu(p, n);
  } else {
    if (n == V::size()) {
      V out;
      at::vec::load_fp32_from_bf16(p, out);
      return out;
    }
    float buf[V::size()] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return V::loadu(buf);
  }
}

// KV: the storage of K and V, read through kp and vp at p.ks and p.vs (p.k and p.v are not read): float,
// or bf16 keys and values (a bf16 KV cache) converted as they are read rather than copied whole to
// float32 on every call (decoding, B = 1, 32 heads, 2048 keys, d = 128 on Zen 3: 38 -> 1.7-2.3 ms,
// 0.30x -> 5.3-7.0x native).
template <typename KV>
void few_queries_forward(const Problem<float>& p, const KV* kp, const KV* vp, float* out, float* lse) {
  using V = Vectorized<float>;
  constexpr int64_t W = V::size();
  const Dims& d = p.d;
  const int64_t group = d.Hq / d.Hkv;
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t grain = few_bytes(d) < kTeamBytes ? d.B * d.Hq : 1;
  at::parallel_for(0, d.B * d.Hq, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(d.Lk);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / d.Hq, h = t % d.Hq, hk = h / group;
      const int64_t valid = p.lengths ? p.lengths[b] : d.Lk;
      const KV* kb = kp + b * p.ks[0] + hk * p.ks[1];
      const KV* vb = vp + b * p.vs[0] + hk * p.vs[1];
      for (int64_t i = 0; i < d.Lq; ++i) {
        const float* q = p.q + b * p.qs[0] + h * p.qs[1] + i * p.qs[2];
        float* o = out + (t * d.Lq + i) * d.dv;
        const int64_t n = p.causal ? std::min(valid, i + 1) : valid;
        if (n <= 0) {  // no key to attend to: zeros, as the blocked kernels give
          std::fill(o, o + d.dv, 0.f);
          lse[t * d.Lq + i] = ninf;
          continue;
        }
        const float* mrow = p.mask ? p.mask + b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2]
                                   : nullptr;
        float m = ninf;
        bool nan = false;
        for (int64_t j = 0; j < n; ++j) {
          const KV* kr = kb + j * p.ks[2];
          V acc(0.f);
          int64_t c = 0;
          for (; c + W <= d.d; c += W) acc = at::vec::fmadd(V::loadu(q + c), load_kv(kr + c, W), acc);
          if (c < d.d) acc = at::vec::fmadd(V::loadu(q + c, d.d - c), load_kv(kr + c, d.d - c), acc);
          float sj = p.scale * at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, acc);
          if (mrow) sj += mrow[j * p.mask_stride[3]];
          scores[j] = sj;
          m = std::max(m, sj);  // a NaN score is skipped here, and its exp below makes the row NaN
          nan |= std::isnan(sj);
        }
        if (m == ninf && !nan) {  // the mask excludes every key: zeros, as the blocked kernels give
          std::fill(o, o + d.dv, 0.f);
          lse[t * d.Lq + i] = ninf;
          continue;
        }
        // exp(s - m) in place and its sum; then o = sum_j p_j v_j / l
        at::vec::map([m](V x) { return (x - V(m)).exp(); }, scores.data(), scores.data(), n);
        const float l = at::vec::reduce_all<float>([](V x, V y) { return x + y; }, scores.data(), n);
        std::fill(o, o + d.dv, 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const KV* vr = vb + j * p.vs[2];
          const V pj(scores[j]);
          int64_t c = 0;
          for (; c + W <= d.dv; c += W) at::vec::fmadd(pj, load_kv(vr + c, W), V::loadu(o + c)).store(o + c);
          if (c < d.dv)
            at::vec::fmadd(pj, load_kv(vr + c, d.dv - c), V::loadu(o + c, d.dv - c)).store(o + c, d.dv - c);
        }
        const float inv = 1.f / l;
        at::vec::map([inv](V x) { return x * V(inv); }, o, o, d.dv);
        lse[t * d.Lq + i] = m + std::log(l);
      }
    }
  });
}

// ---- the lanes kernels on AVX2 (CPUs without the AVX-512 kernels) ----
//
// 8 query rows of one kv head (a GQA group's heads together) are the lanes of one ymm vector (a
// chunk), against K and V read in place: a key's scores for every lane are d multiply-adds of q
// transposed ([d][8], scaled) by the key's broadcast elements, several keys at a time (independent
// sums); an online softmax per lane over blocks of kAvx2BlockK keys; and P V as multiply-adds of each
// key's probabilities (a vector over the lanes) by its value row's broadcast elements, several output
// columns at a time in registers. Two chunks share each broadcast (12 sums in registers). No
// horizontal sums, nothing packed or copied but q. Every float32 call on AVX2 runs here (dropout
// and a mask's gradient too): the blocked kernel (two BLAS calls per block) measured 0.3-0.8x native
// on small calls on Zen 3 and at most parity on large ones; these 1.1-2.4x (NOTES v28).
// An additive mask is added per score; dropout's keep bits are hashed 8 lanes at a time (the
// Dropout's mix32 in vector integer ops); a NaN score makes its row NaN.
constexpr int64_t kAvx2BlockK = 64;

bool use_lanes_avx2(at::ScalarType ct) {
#ifdef BIGMODEL_HAS_AVX2_KERNELS
  using gemm::cpu::KernelChoice;
  const KernelChoice kc = gemm::cpu::kernel_choice();
  const bool avx512 = gemm::cpu::has_avx512() && gemm::cpu::microkernels_enabled();
  return ct == at::kFloat && kc != KernelChoice::Generic && !avx512 && gemm::cpu::has_avx2();
#else
  (void)ct;
  return false;
#endif
}

constexpr int64_t kAvx2Lanes = 8;

// Rows are taken in blocks of up to kAvx2BlockChunks chunks of 8 lanes: each block of keys (and of
// values) is multiplied by every chunk of the row block while it is in L1/L2 (one chunk at a time
// read all of K and V per 8 rows: past L2 at L = 512, d = 128, 0.84x the blocked kernel).
constexpr int64_t kAvx2BlockChunks = 8;

// Chunks per forward task: kAvx2BlockChunks, fewer where that leaves under 4 tasks per thread. A
// task of cb chunks holds cb * kAvx2Lanes rows: lanes_tasks(d, cb * kAvx2Lanes) tasks.
int64_t lanes_avx2_chunks(const Dims& d) {
  const int64_t want = 4 * int64_t(at::get_num_threads());
  int64_t cb = kAvx2BlockChunks;
  while (cb > 1 && lanes_tasks(d, cb * kAvx2Lanes) < want) cb /= 2;
  return cb;
}


#ifdef BIGMODEL_HAS_AVX2_KERNELS
namespace m2 = gemm::avx2;

// st[u][lane] = sum_c qt[c][lane] k_u[c] for keys u < NU at kr, kr + ldk, ..., for NP chunks of 8
// lanes at once (qt and st of chunk i at i * qs and i * ss floats): a key's broadcast elements serve
// both chunks (NP = 2: 12 sums with NU = 6). With bm (32-byte aligned [NP][8], or nullptr), each
// chunk's lanes also keep their running max of the scores there, taken from the registers.
template <int NU, int NP = 1>
BM_AVX2 BM_ALWAYS_INLINE void lanes_scores_avx2(const float* qt, int64_t qs, const float* kr, int64_t ldk, int64_t d,
                                                float* st, int64_t ss, float* bm) {
  static_assert(NP * NU <= 12 || NP == 1);
  __m256 acc[NP][NU];
#pragma GCC unroll 2
  for (int i = 0; i < NP; ++i)
#pragma GCC unroll 8
    for (int u = 0; u < NU; ++u) acc[i][u] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    __m256 qc[NP];
#pragma GCC unroll 2
    for (int i = 0; i < NP; ++i) qc[i] = _mm256_load_ps(qt + i * qs + 8 * c);
#pragma GCC unroll 8
    for (int u = 0; u < NU; ++u) {
      const __m256 kv = _mm256_broadcast_ss(kr + u * ldk + c);
#pragma GCC unroll 2
      for (int i = 0; i < NP; ++i) acc[i][u] = _mm256_fmadd_ps(qc[i], kv, acc[i][u]);
    }
  }
#pragma GCC unroll 2
  for (int i = 0; i < NP; ++i)
#pragma GCC unroll 8
    for (int u = 0; u < NU; ++u) _mm256_store_ps(st + i * ss + 8 * u, acc[i][u]);
  if (bm == nullptr) return;
#pragma GCC unroll 2
  for (int i = 0; i < NP; ++i) {
    __m256 m = _mm256_load_ps(bm + 8 * i);
#pragma GCC unroll 8
    for (int u = 0; u < NU; ++u) m = _mm256_max_ps(m, acc[i][u]);
    _mm256_store_ps(bm + 8 * i, m);
  }
}

// ot[c][lane] += sum_u st[u][lane] v_u[c] for columns c0 .. c0 + NC - 1, keys u < nk, for NP chunks
// (st and ot of chunk i at i * ss and i * os floats).
template <int NC, int NP = 1>
BM_AVX2 BM_ALWAYS_INLINE void lanes_pv_avx2(const float* st, int64_t ss, int64_t nk, const float* vb, int64_t ldv,
                                            int64_t c0, float* ot, int64_t os) {
  static_assert(NP * NC <= 12 || NP == 1);
  __m256 acc[NP][NC];
#pragma GCC unroll 2
  for (int i = 0; i < NP; ++i)
#pragma GCC unroll 8
    for (int cc = 0; cc < NC; ++cc) acc[i][cc] = _mm256_load_ps(ot + i * os + 8 * (c0 + cc));
  for (int64_t u = 0; u < nk; ++u) {
    __m256 pu[NP];
#pragma GCC unroll 2
    for (int i = 0; i < NP; ++i) pu[i] = _mm256_load_ps(st + i * ss + 8 * u);
    const float* vr = vb + u * ldv + c0;
#pragma GCC unroll 8
    for (int cc = 0; cc < NC; ++cc) {
      const __m256 vv = _mm256_broadcast_ss(vr + cc);
#pragma GCC unroll 2
      for (int i = 0; i < NP; ++i) acc[i][cc] = _mm256_fmadd_ps(pu[i], vv, acc[i][cc]);
    }
  }
#pragma GCC unroll 2
  for (int i = 0; i < NP; ++i)
#pragma GCC unroll 8
    for (int cc = 0; cc < NC; ++cc) _mm256_store_ps(ot + i * os + 8 * (c0 + cc), acc[i][cc]);
}

// The scores of keys [0, nk) of kb for NP chunks (see lanes_scores_avx2; bm their running max or
// nullptr), 8 keys (one chunk) or 6 (two) at a time.
template <int NP>
BM_AVX2 void lanes_scores_block_avx2(const float* qt, int64_t qs, const float* kb, int64_t ldk, int64_t d, int64_t nk,
                                     float* st, int64_t ss, float* bm = nullptr) {
  constexpr int64_t U = NP == 1 ? 8 : 6;
  for (int64_t u0 = 0; u0 < nk; u0 += U)
    m2::with_rows<U>(std::min<int64_t>(U, nk - u0), [&](auto nu) BM_AVX2 {
      lanes_scores_avx2<decltype(nu)::value, NP>(qt, qs, kb + u0 * ldk, ldk, d, st + 8 * u0, ss, bm);
    });
}

// ot += P V over keys [0, nk) and all m columns for NP chunks (see lanes_pv_avx2).
template <int NP>
BM_AVX2 void lanes_pv_block_avx2(const float* st, int64_t ss, int64_t nk, const float* vb, int64_t ldv, int64_t m,
                                 float* ot, int64_t os) {
  constexpr int64_t C = NP == 1 ? 8 : 6;
  for (int64_t c0 = 0; c0 < m; c0 += C)
    m2::with_rows<C>(std::min<int64_t>(C, m - c0), [&](auto nc) BM_AVX2 {
      lanes_pv_avx2<decltype(nc)::value, NP>(st, ss, nk, vb, ldv, c0, ot, os);
    });
}

// r[j] <- element j of r[0 .. 7] (an 8 x 8 transpose).
BM_AVX2 BM_ALWAYS_INLINE void transpose8_ps(__m256 (&r)[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// 8 elements of a float32 or bf16 (uint16_t bits) row as float32, and back: the lanes of m.
BM_AVX2 BM_ALWAYS_INLINE __m256 load_row8(const float* p, const m2::Lanes& m) { return m2::load_f32(p, m); }
BM_AVX2 BM_ALWAYS_INLINE __m256 load_row8(const uint16_t* p, const m2::Lanes& m) { return m2::load_bf16(p, m); }
BM_AVX2 BM_ALWAYS_INLINE void store_row8(float* p, __m256 v, const m2::Lanes& m) { m2::store_f32(p, v, m); }
BM_AVX2 BM_ALWAYS_INLINE void store_row8(uint16_t* p, __m256 v, const m2::Lanes& m) { m2::store_bf16(p, v, m); }

// t[c][lane] = scale * rows[lane][c] for c < m, lanes < 8 (t: [m][8], 32-byte aligned; a lane whose
// row is nullptr gets zeros): q (scaled) and dO into the lanes' layout, 8 x 8 blocks through registers.
// T: float, or bf16 bits (uint16_t).
template <typename T>
BM_AVX2 void rows_to_lanes(const T* const* rows, int64_t m, float scale, float* t) {
  const __m256 sv = _mm256_set1_ps(scale);
  for (int64_t c0 = 0; c0 < m; c0 += 8) {
    const m2::Lanes cols = m2::lanes(m - c0);
    __m256 v[8];
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l) v[l] = rows[l] ? load_row8(rows[l] + c0, cols) : _mm256_setzero_ps();
    transpose8_ps(v);
    for (int64_t j = 0; j < std::min<int64_t>(8, m - c0); ++j) _mm256_store_ps(t + (c0 + j) * 8, _mm256_mul_ps(v[j], sv));
  }
}

// rows[lane][c] = factor[lane] * t[c][lane] for c < m and the lanes whose row is not nullptr (factor
// nullptr: 1): the lanes' outputs back into rows, as rows_to_lanes in reverse (bf16 rows rounded once).
template <typename T>
BM_AVX2 void lanes_to_rows(const float* t, int64_t m, const float* factor, T* const* rows) {
  for (int64_t c0 = 0; c0 < m; c0 += 8) {
    const int64_t n = std::min<int64_t>(8, m - c0);
    const m2::Lanes cols = m2::lanes(n);
    __m256 v[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) v[j] = j < n ? _mm256_load_ps(t + (c0 + j) * 8) : _mm256_setzero_ps();
    transpose8_ps(v);
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l)
      if (rows[l]) store_row8(rows[l] + c0, factor ? _mm256_mul_ps(v[l], _mm256_set1_ps(factor[l])) : v[l], cols);
  }
}

// A 32-byte aligned start inside buf (sized 8 floats over what is used).
float* aligned32(std::vector<float>& buf) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 31) & ~uintptr_t(31));
}

// The query rows of lanes 0 .. n - 1: rows r0 .. r0 + n - 1 of kv head hk's group (query head
// hk * group + r / Lq, row r % Lq) in batch b. Lanes from n on are idle (limit 0, no rows).
struct LaneRows {
  alignas(32) float limit[8];  // keys the lane sees (causal, key lengths)
  const float* q[8];           // its query row
  const float* mask[8];        // its additive mask row, or nullptr
  int64_t row[8];              // its row of out, lse and dQ
  alignas(32) uint32_t drop_key[8];  // its dropout row key (Dropout::row_key), 0 without dropout
  int64_t kend = 0;            // the most keys any lane sees
  int64_t kmin = 0;            // the fewest keys any of lanes 0 .. n - 1 sees
};

// Fills r and qt ([d][8]: q transposed and scaled, zero in idle lanes) from q at qbase (p's strides;
// float32, or bf16 bits: then r.q stays nullptr).
template <typename T>
BM_AVX2 LaneRows lane_rows(const Problem<float>& p, const T* qbase, int64_t b, int64_t hk, int64_t r0, int64_t n,
                           float* qt) {
  const Dims& d = p.d;
  const int64_t group = d.Hq / d.Hkv, valid = p.valid_keys(b);
  LaneRows r;
  const T* qrows[8] = {};
  r.kmin = valid;
  for (int64_t l = 0; l < 8; ++l) {
    r.limit[l] = 0.f;
    r.q[l] = r.mask[l] = nullptr;
    r.row[l] = 0;
    r.drop_key[l] = 0;
    if (l >= n) continue;
    const int64_t h = hk * group + (r0 + l) / d.Lq, i = (r0 + l) % d.Lq;
    const int64_t lim = p.causal ? std::min(valid, i + 1) : valid;
    r.limit[l] = static_cast<float>(lim);
    r.kend = std::max(r.kend, lim);
    r.kmin = std::min(r.kmin, lim);
    qrows[l] = qbase + b * p.qs[0] + h * p.qs[1] + i * p.qs[2];
    if constexpr (std::is_same_v<T, float>) r.q[l] = qrows[l];
    if (p.mask) r.mask[l] = p.mask + b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2];
    r.row[l] = (b * d.Hq + h) * d.Lq + i;
    if (p.dropout.active()) r.drop_key[l] = p.dropout.row_key(b, h, i);
  }
  rows_to_lanes(qrows, d.d, p.scale, qt);
  return r;
}

// The dropout factors Z of key j for the lanes with row keys `keys`: keep_scale where Dropout::keep
// holds (mix32(key ^ j) >= threshold, unsigned), 0 where the key is dropped.
BM_AVX2 BM_ALWAYS_INLINE __m256 lanes_dropout_avx2(__m256i keys, int64_t j, __m256i threshold, __m256 kept) {
  __m256i x = _mm256_xor_si256(keys, _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(j))));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(0x846ca68bU)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(x, threshold), x);
  return _mm256_and_ps(_mm256_castsi256_ps(keep), kept);
}

// st[u][lane] += the lane's mask at key j0 + u, for u < nk (<= kAvx2BlockK) and the first n lanes
// (mask rows or nullptr). Keys contiguous in the mask: 8 lanes' rows of 8 keys loaded and transposed
// (a mask score by score cost ~3 ms of a 25 ms seed-shape forward); other strides one by one.
BM_AVX2 void add_lane_masks(const Problem<float>& p, const LaneRows& r, int64_t n, int64_t j0, int64_t nk,
                            float* st) {
  if (!p.mask) return;
  if (p.mask_stride[3] != 1) {
    for (int64_t u = 0; u < nk; ++u)
      for (int64_t ln = 0; ln < n; ++ln)
        if (r.mask[ln]) st[u * 8 + ln] += r.mask[ln][(j0 + u) * p.mask_stride[3]];
    return;
  }
  alignas(32) static const float zeros[kAvx2BlockK] = {};
  const float* rows[8];
  for (int64_t ln = 0; ln < 8; ++ln) rows[ln] = ln < n && r.mask[ln] ? r.mask[ln] + j0 : zeros;
  for (int64_t u0 = 0; u0 < nk; u0 += 8) {
    const m2::Lanes keys = m2::lanes(nk - u0);
    __m256 v[8];
    for (int ln = 0; ln < 8; ++ln) v[ln] = m2::load_f32(rows[ln] + u0, keys);
    transpose8_ps(v);
    for (int64_t u = 0; u < std::min<int64_t>(8, nk - u0); ++u)
      _mm256_store_ps(st + (u0 + u) * 8, _mm256_add_ps(_mm256_load_ps(st + (u0 + u) * 8), v[u]));
  }
}

// The chunks of a pair that have keys left in the block at j0: chunk `first` and, with n == 2, the
// next; nk keys for both (the pair's most; a lane's keys past its limit score -inf), 0 if neither.
// A chunk whose partner has no key left runs alone.
struct ChunkPair {
  int64_t first, n, nk;
};
ChunkPair chunk_pair(const std::vector<LaneRows>& lrs, int64_t c, int64_t nc, int64_t j0) {
  const int64_t nk0 = std::clamp<int64_t>(lrs[c].kend - j0, 0, kAvx2BlockK);
  const int64_t nk1 = c + 1 < nc ? std::clamp<int64_t>(lrs[c + 1].kend - j0, 0, kAvx2BlockK) : 0;
  return {nk0 > 0 ? c : c + 1, nk0 > 0 && nk1 > 0 ? 2 : 1, std::max(nk0, nk1)};
}

// The block helpers for the pair's chunk count: strides qs, ss, os apart for a second chunk.
BM_AVX2 void lanes_scores_pair_avx2(const ChunkPair& cp, const float* qt, int64_t qs, const float* kb, int64_t ldk,
                                    int64_t d, float* st, int64_t ss, float* bm = nullptr) {
  if (cp.n == 2)
    lanes_scores_block_avx2<2>(qt, qs, kb, ldk, d, cp.nk, st, ss, bm);
  else
    lanes_scores_block_avx2<1>(qt, qs, kb, ldk, d, cp.nk, st, ss, bm);
}
BM_AVX2 void lanes_pv_pair_avx2(const ChunkPair& cp, const float* st, int64_t ss, const float* vb, int64_t ldv,
                                int64_t m, float* ot, int64_t os) {
  if (cp.n == 2)
    lanes_pv_block_avx2<2>(st, ss, cp.nk, vb, ldv, m, ot, os);
  else
    lanes_pv_block_avx2<1>(st, ss, cp.nk, vb, ldv, m, ot, os);
}

// e[u] = exp(s[u] - shift) for N keys' 8 lanes at s ([N][8], 32-byte aligned), shift <= s up to rounding:
// exactly 0 for -inf (exp_softmax_ps_n).
template <int N>
BM_AVX2 BM_ALWAYS_INLINE void lanes_exps(const float* s, __m256 shift, __m256 (&e)[N]) {
#pragma GCC unroll 4
  for (int u = 0; u < N; ++u) e[u] = _mm256_sub_ps(_mm256_load_ps(s + u * 8), shift);
  m2::exp_softmax_ps_n(e);
}

// dst[u][0 .. m) = rows u < n of bf16 bits at src, stride apart, as float32 (dst rows m floats apart).
BM_AVX2 void widen_rows(const uint16_t* src, int64_t stride, int64_t n, int64_t m, float* dst) {
  for (int64_t u = 0; u < n; ++u)
    for (int64_t c = 0; c < m; c += 8) {
      const m2::Lanes cols = m2::lanes(m - c);
      m2::store_f32(dst + u * m + c, m2::load_bf16(src + u * stride + c, cols), cols);
    }
}

// T: float32, or bf16 bits (uint16_t): q, k and v read at p's strides from the pointers given (p.q, p.k
// and p.v are not read), each 64-key block of K and V widened to float32 once per task (L1) and shared by
// its chunks, q widened as it is transposed, the output rounded to bf16 once; the softmax and both
// products run in float32 (P is not rounded), as forward_lanes' bf16 form on AVX-512.
template <typename T>
BM_AVX2 void lanes_avx2_forward(const Problem<float>& p, const T* q, const T* k, const T* v, int64_t cb, int64_t t0,
                                int64_t t1, T* out, float* lse) {
  constexpr int64_t W = kAvx2Lanes;
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const Dims& d = p.d;
  const int64_t group = d.Hq / d.Hkv, rows = group * d.Lq, chunks = (rows + W - 1) / W;
  const int64_t blocks = (chunks + cb - 1) / cb;
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 vninf = _mm256_set1_ps(ninf);
  const bool drop = p.dropout.active();
  const __m256i thr = _mm256_set1_epi32(static_cast<int32_t>(p.dropout.threshold));
  const __m256 kept = _mm256_set1_ps(static_cast<float>(p.dropout.keep_scale()));
  const int64_t per_chunk = (d.d + d.dv + 2) * W;  // qt [d][8], ot [dv][8], m, l
  constexpr int64_t kStride = kAvx2BlockK * W;
  std::vector<float> buf(cb * per_chunk + 2 * kStride + 8);
  float* const st = aligned32(buf);  // [kAvx2BlockK][8] for each chunk of a pair
  const auto qt = [&](int64_t c) { return st + 2 * kStride + c * per_chunk; };
  const auto ot = [&](int64_t c) { return qt(c) + d.d * W; };
  const auto ml = [&](int64_t c) { return ot(c) + d.dv * W; };  // m, then l
  std::vector<LaneRows> lrs(cb);
  std::vector<int64_t> ns(cb);
  std::vector<float> widened(bf16 ? kAvx2BlockK * (d.d + d.dv) : 0);  // a block's K rows, then V rows
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (d.Hkv * blocks), hk = t / blocks % d.Hkv, c0 = t % blocks * cb;
    const int64_t nc = std::min(cb, chunks - c0);
    int64_t kend = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t r0 = (c0 + c) * W;
      ns[c] = std::min(W, rows - r0);
      lrs[c] = lane_rows(p, q, b, hk, r0, ns[c], qt(c));
      kend = std::max(kend, lrs[c].kend);
      std::fill(ot(c), ot(c) + d.dv * W, 0.f);
      _mm256_store_ps(ml(c), vninf);
      _mm256_store_ps(ml(c) + W, _mm256_setzero_ps());
    }
    for (int64_t j0 = 0; j0 < kend; j0 += kAvx2BlockK) {
      const T* const kr = k + b * p.ks[0] + hk * p.ks[1] + j0 * p.ks[2];
      const T* const vr = v + b * p.vs[0] + hk * p.vs[1] + j0 * p.vs[2];
      const float* kb;
      const float* vb;
      int64_t ldk, ldv;
      if constexpr (bf16) {
        const int64_t nkb = std::min(kAvx2BlockK, kend - j0);
        kb = widened.data();
        vb = kb + kAvx2BlockK * d.d;
        widen_rows(kr, p.ks[2], nkb, d.d, widened.data());
        widen_rows(vr, p.vs[2], nkb, d.dv, widened.data() + kAvx2BlockK * d.d);
        ldk = d.d;
        ldv = d.dv;
      } else {
        kb = kr;
        vb = vr;
        ldk = p.ks[2];
        ldv = p.vs[2];
      }
      // chunks in pairs (chunk_pair); keys past a lane's limit up to the pair's count score -inf below
      for (int64_t c = 0; c < nc; c += 2) {
        const ChunkPair cp = chunk_pair(lrs, c, nc, j0);
        const int64_t nk = cp.nk, ca = cp.first, np = cp.n;
        if (nk == 0) continue;
        // Where every lane of the pair sees all nk keys and no mask is added, the scores kernel keeps
        // the block's max from its registers; else a pass below sets keys past a lane's limit to -inf
        // and takes it. No NaN is tracked: a NaN score makes its lane's l NaN (exp keeps NaN).
        const bool whole = !p.mask && lrs[ca].kmin >= j0 + nk && (np == 1 || lrs[ca + 1].kmin >= j0 + nk);
        alignas(32) float bms[2][W];
        _mm256_store_ps(bms[0], vninf);
        _mm256_store_ps(bms[1], vninf);
        lanes_scores_pair_avx2(cp, qt(ca), per_chunk, kb, ldk, d.d, st, kStride, whole ? bms[0] : nullptr);
        for (int64_t i = 0; i < np; ++i) {
          const LaneRows& lr = lrs[ca + i];
          float* const si = st + i * kStride;
          float* const o = ot(ca + i);
          __m256 bm = _mm256_load_ps(bms[i]);
          if (!whole) {
            add_lane_masks(p, lr, ns[ca + i], j0, nk, si);
            const __m256 limv = _mm256_load_ps(lr.limit);
            for (int64_t u = 0; u < nk; ++u) {
              const __m256 past = _mm256_cmp_ps(_mm256_set1_ps(static_cast<float>(j0 + u)), limv, _CMP_GE_OQ);
              const __m256 s = _mm256_blendv_ps(_mm256_load_ps(si + u * W), vninf, past);
              _mm256_store_ps(si + u * W, s);
              bm = _mm256_max_ps(bm, s);
            }
          }
          // the rescale, and exp in place (exactly 0 for -inf: exp_softmax_ps_n)
          const __m256 m = _mm256_load_ps(ml(ca + i)), mnew = _mm256_max_ps(bm, m);
          const __m256 shift = _mm256_blendv_ps(mnew, _mm256_setzero_ps(), _mm256_cmp_ps(mnew, vninf, _CMP_EQ_OQ));
          __m256 alpha[1] = {_mm256_sub_ps(m, shift)};
          m2::exp_softmax_ps_n(alpha);
          __m256 l = _mm256_mul_ps(_mm256_load_ps(ml(ca + i) + W), alpha[0]);
          for (int64_t cc = 0; cc < d.dv; ++cc)
            _mm256_store_ps(o + cc * W, _mm256_mul_ps(_mm256_load_ps(o + cc * W), alpha[0]));
          // the normalizer l counts every key; only the values see dropout (P Z)
          const __m256i dkeys = _mm256_load_si256(reinterpret_cast<const __m256i*>(lr.drop_key));
          const auto exps = [&](int64_t u0, auto n) BM_AVX2 {
            constexpr int N = decltype(n)::value;
            __m256 e[N];
            lanes_exps(si + u0 * W, shift, e);
#pragma GCC unroll 4
            for (int u = 0; u < N; ++u) {
              _mm256_store_ps(si + (u0 + u) * W,
                              drop ? _mm256_mul_ps(e[u], lanes_dropout_avx2(dkeys, j0 + u0 + u, thr, kept)) : e[u]);
              l = _mm256_add_ps(l, e[u]);
            }
          };
          m2::in_groups<4, 1>(nk, exps);  // four keys' exps interleaved, then single keys
          _mm256_store_ps(ml(ca + i), mnew);
          _mm256_store_ps(ml(ca + i) + W, l);
        }
        lanes_pv_pair_avx2(cp, st, kStride, vb, ldv, d.dv, ot(ca), per_chunk);
      }
    }
    for (int64_t c = 0; c < nc; ++c) {
      const float* ms = ml(c);
      const float* ls = ms + W;
      T* rows[W] = {};  // the lanes whose output is ot / l
      float inv[W];
      for (int64_t ln = 0; ln < ns[c]; ++ln) {
        const int64_t row = lrs[c].row[ln];
        T* o = out + row * d.dv;
        if (std::isnan(ms[ln]) || std::isnan(ls[ln])) {  // a NaN score: the row is NaN, as PyTorch's softmax gives
          const float nan = std::numeric_limits<float>::quiet_NaN();
          if constexpr (bf16)
            std::fill(o, o + d.dv, T(0x7FC0));  // bf16 quiet NaN
          else
            std::fill(o, o + d.dv, nan);
          lse[row] = nan;
        } else if (ms[ln] == ninf) {  // no key to attend to: zeros, as the blocked kernels give
          std::fill(o, o + d.dv, T(0));
          lse[row] = ninf;
        } else {
          rows[ln] = o;
          inv[ln] = 1.f / ls[ln];
          lse[row] = ms[ln] + std::log(ls[ln]);
        }
      }
      lanes_to_rows(ot(c), d.dv, inv, rows);
    }
  }
}

// dst[u][0 .. m) += sum_{R < nr} coef(R, u) src[R][0 .. m) for u < NU, coef(R, u) = coef[R / 8 * cs +
// u * 8 + R % 8] (a row block's chunks of [keys][8] lanes, cs floats apart): the backward's dV rows
// (coef P, src dO) and dK rows (coef dS, src Q), NU keys by 16 columns in registers over all nr rows.
template <int NU>
BM_AVX2 BM_ALWAYS_INLINE void lanes_rows_tile_avx2(const float* coef, int64_t cs, int64_t nr, const float* const* src,
                                                   int64_t c, int64_t m, float* dst, int64_t ldd) {
  const m2::Lanes l0 = m2::lanes(m - c), l1 = m2::lanes(m - c - 8);
  const bool two = m - c > 8;
  __m256 acc[NU][2];
#pragma GCC unroll 4
  for (int u = 0; u < NU; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
  for (int64_t r = 0; r < nr; ++r) {
    const float* cr = coef + (r >> 3) * cs + (r & 7);
    const __m256 s0 = m2::load_f32(src[r] + c, l0);
    if (two) {
      const __m256 s1 = m2::load_f32(src[r] + c + 8, l1);
#pragma GCC unroll 4
      for (int u = 0; u < NU; ++u) {
        const __m256 w = _mm256_broadcast_ss(cr + 8 * u);
        acc[u][0] = _mm256_fmadd_ps(w, s0, acc[u][0]);
        acc[u][1] = _mm256_fmadd_ps(w, s1, acc[u][1]);
      }
    } else {
#pragma GCC unroll 4
      for (int u = 0; u < NU; ++u) acc[u][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(cr + 8 * u), s0, acc[u][0]);
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < NU; ++u) {
    float* du = dst + u * ldd + c;
    m2::store_f32(du, _mm256_add_ps(m2::load_f32(du, l0), acc[u][0]), l0);
    if (two) m2::store_f32(du + 8, _mm256_add_ps(m2::load_f32(du + 8, l1), acc[u][1]), l1);
  }
}

BM_AVX2 void lanes_rows_update_avx2(const float* coef, int64_t cs, int64_t nk, int64_t nr, const float* const* src,
                                    int64_t m, float* dst, int64_t ldd) {
  for (int64_t u0 = 0; u0 < nk; u0 += 4)
    for (int64_t c = 0; c < m; c += 16)
      m2::with_rows<4>(std::min<int64_t>(4, nk - u0), [&](auto nu) BM_AVX2 {
        lanes_rows_tile_avx2<decltype(nu)::value>(coef + 8 * u0, cs, nr, src, c, m, dst + u0 * ldd, ldd);
      });
}

// The backward of lanes_avx2_forward's rows: one task per (batch, kv head, key split), which owns the
// 64-key blocks fast::KeySplit deals it and so is the only writer of their dK and dV rows
// (zero-filled by the caller); it writes its query heads' dQ rows, split c > 0 into its own copy
// (gq_parts + (c - 1) * B Hq Lq d, summed by the caller): B = 1 with one kv head (MQA, unbatched
// calls) would otherwise run on one thread. Rows go in blocks of up to kAvx2BlockChunks chunks of 8
// lanes. Per block of keys and per chunk: the scores and dP = dO V^T (the forward's score kernel, on
// q and on dO transposed), P = exp(S - lse), dS = P (dP - delta) scale, and dQ^T += dS K in registers
// (the forward's P V kernel); then, over the row block's rows at once, dV += P^T dO and dK += dS^T Q
// (4 keys by 16 columns in registers). A mask's gradient (mg) is added per lane row from the same P
// and dP.
BM_AVX2 void lanes_avx2_backward(const Problem<float>& p, const float* grad_out, const float* lse,
                                 const float* delta, float* grad_q, float* grad_k, float* grad_v, int64_t splits,
                                 float* gq_parts, const MaskGradBuffer* mg, int64_t t0, int64_t t1) {
  constexpr int64_t W = kAvx2Lanes, CB = kAvx2BlockChunks;
  const Dims& d = p.d;
  const int64_t group = d.Hq / d.Hkv, rows = group * d.Lq;
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 zero = _mm256_setzero_ps();
  const bool drop = p.dropout.active();
  const __m256i thr = _mm256_set1_epi32(static_cast<int32_t>(p.dropout.threshold));
  const __m256 kept = _mm256_set1_ps(static_cast<float>(p.dropout.keep_scale()));
  const std::vector<float> zeros(std::max(d.d, d.dv), 0.f);  // the source row of a lane that saw no key
  // per chunk: qt, dqt [d][8], got [dv][8], lse, delta [8]; P and dS of a key block [kAvx2BlockK][8]
  const int64_t per_chunk = (2 * d.d + d.dv + 2) * W, cs = kAvx2BlockK * W;
  std::vector<float> buf(CB * (per_chunk + 2 * cs) + 2 * cs + 8);
  float* const dpt = aligned32(buf);  // dP of a pair of chunks, the second at cs
  float* const pts = dpt + 2 * cs;    // P, chunk c at c * cs
  float* const dsts = pts + CB * cs;  // dS, chunk c at c * cs
  float* const chunk0 = dsts + CB * cs;
  const auto qt = [&](int64_t c) { return chunk0 + c * per_chunk; };
  const auto dqt = [&](int64_t c) { return qt(c) + d.d * W; };
  const auto got = [&](int64_t c) { return dqt(c) + d.d * W; };
  const auto lsedelta = [&](int64_t c) { return got(c) + d.dv * W; };
  std::vector<LaneRows> lrs(CB);
  const float* qsrc[CB * W];  // the block's rows of Q and dO (zeros for rows without gradient)
  const float* gsrc[CB * W];
  // A mask's gradient: the scores' gradient before the scale, P (Z dP - delta), added into this
  // thread's slot of the buffer at each lane's row offset (-1: a lane with no gradient).
  float* const gmask = mg != nullptr ? mg->buf.data_ptr<float>() + at::get_thread_num() * mg->slot : nullptr;
  int64_t goff[CB * W];
  const __m256 scalev = _mm256_set1_ps(p.scale);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (d.Hkv * splits), hk = t / splits % d.Hkv;
    const fast::KeySplit split{splits, t % splits};
    float* const gq = split.c == 0 ? grad_q : gq_parts + (split.c - 1) * d.B * d.Hq * d.Lq * d.d;
    float* gk = grad_k + (b * d.Hkv + hk) * d.Lk * d.d;
    float* gv = grad_v + (b * d.Hkv + hk) * d.Lk * d.dv;
    for (int64_t rb0 = 0; rb0 < rows; rb0 += CB * W) {
      const int64_t nr = std::min(CB * W, rows - rb0), nc = (nr + W - 1) / W;
      int64_t kend = 0;
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t n = std::min(W, nr - c * W);
        LaneRows& lr = lrs[c];
        lr = lane_rows(p, p.q, b, hk, rb0 + c * W, n, qt(c));
        float* const ld = lsedelta(c);
        std::fill(dqt(c), dqt(c) + d.d * W, 0.f);
        lr.kend = 0;
        for (int64_t l = 0; l < W; ++l) {
          ld[l] = l < n ? lse[lr.row[l]] : ninf;
          ld[W + l] = l < n ? delta[lr.row[l]] : 0.f;
          const float* g = l < n ? grad_out + lr.row[l] * d.dv : nullptr;
          // a row that saw no key (lse -inf, or an idle lane) gets no gradient and adds nothing: limit 0,
          // zero source rows (P = dS = 0)
          if (ld[l] == ninf) {
            lr.limit[l] = 0.f;
            lr.q[l] = g = zeros.data();
            lr.mask[l] = nullptr;
          } else {
            lr.kend = std::max(lr.kend, static_cast<int64_t>(lr.limit[l]));
          }
          qsrc[c * W + l] = lr.q[l];
          gsrc[c * W + l] = g;
          const int64_t row = lr.row[l];
          const bool has_grad = gmask != nullptr && l < n && ld[l] != ninf;
          goff[c * W + l] = has_grad ? mg->offset(b, row / d.Lq % d.Hq, row % d.Lq) : -1;
        }
        lr.kmin = static_cast<int64_t>(*std::min_element(lr.limit, lr.limit + W));
        rows_to_lanes(gsrc + c * W, d.dv, 1.f, got(c));
        kend = std::max(kend, lr.kend);
      }
      // Rows whose keys all lie in one block (kend <= kAvx2BlockK) take delta as sum(P Z dP) over it (two
      // passes in L1: P to dS's buffer, Z dP to dP's, then dS) rather than rowsum(dO O): the same sum, but
      // free of the output's rounding. A bf16 output's rounding, ~2^-9 of |dO| |O|, was ~3x PyTorch's
      // math-path error in dQ and dK on rows of a few keys (NOTES v31); longer rows average it out over
      // many keys' P.
      const bool single = kend <= kAvx2BlockK;
      for (int64_t j0 = 0; j0 < kend; j0 += kAvx2BlockK) {
        if (!split.owns(j0 / kAvx2BlockK)) continue;
        const int64_t nkb = std::min(kAvx2BlockK, kend - j0);
        const float* kb = p.k_rows(b, hk, j0);
        const float* vb = p.v_rows(b, hk, j0);
        // chunks in pairs, as in the forward; P and dS stay 0 for keys no lane of a chunk sees
        for (int64_t c = 0; c < nc; c += 2) {
          const ChunkPair cp = chunk_pair(lrs, c, nc, j0);  // cp.nk <= nkb: each chunk's kend <= kend
          const int64_t nk = cp.nk, ca = cp.first, np = cp.n;
          for (int64_t i = c; i < std::min(c + 2, nc); ++i) {
            const int64_t from = nk > 0 && i >= ca && i < ca + np ? nk : 0;
            std::fill(pts + i * cs + from * W, pts + (i * cs + nkb * W), 0.f);
            std::fill(dsts + i * cs + from * W, dsts + (i * cs + nkb * W), 0.f);
          }
          if (nk == 0) continue;
          lanes_scores_pair_avx2(cp, qt(ca), per_chunk, kb, p.ks[2], d.d, pts + ca * cs, cs);
          lanes_scores_pair_avx2(cp, got(ca), per_chunk, vb, p.vs[2], d.dv, dpt, cs);
          for (int64_t i = 0; i < np; ++i) {
            const LaneRows& lr = lrs[ca + i];
            float* const pt = pts + (ca + i) * cs;
            float* const dst = dsts + (ca + i) * cs;
            float* const dp = dpt + i * cs;
            add_lane_masks(p, lr, W, j0, nk, pt);
            const __m256 limv = _mm256_load_ps(lr.limit), lsev = _mm256_load_ps(lsedelta(ca + i));
            const __m256 deltav = _mm256_load_ps(lsedelta(ca + i) + W);
            const __m256i dkeys = _mm256_load_si256(reinterpret_cast<const __m256i*>(lr.drop_key));
            // P = exp(s - lse), exactly 0 for excluded keys (exp_softmax_ps_n) and, unless every lane
            // sees all nk keys (lanes without a key have limit 0), past a lane's limit
            const bool whole = !p.mask && lr.kmin >= j0 + nk;
            __m256 dsum = zero;  // delta of a single block's rows (below)
            const auto rows = [&](int64_t u0, auto n) BM_AVX2 {
              constexpr int N = decltype(n)::value;
              __m256 pv[N];
              lanes_exps(pt + u0 * W, lsev, pv);
#pragma GCC unroll 4
              for (int u = 0; u < N; ++u) {
                const int64_t j = u0 + u;
                if (!whole) {
                  const __m256 past = _mm256_cmp_ps(_mm256_set1_ps(static_cast<float>(j0 + j)), limv, _CMP_GE_OQ);
                  pv[u] = _mm256_blendv_ps(pv[u], zero, past);
                }
                __m256 dpu = _mm256_load_ps(dp + j * W);
                if (drop) {  // dV takes P Z; dS = P (Z dP - delta)
                  const __m256 z = lanes_dropout_avx2(dkeys, j0 + j, thr, kept);
                  _mm256_store_ps(pt + j * W, _mm256_mul_ps(pv[u], z));
                  dpu = _mm256_mul_ps(dpu, z);
                } else {
                  _mm256_store_ps(pt + j * W, pv[u]);
                }
                if (single) {
                  _mm256_store_ps(dst + j * W, pv[u]);
                  _mm256_store_ps(dp + j * W, dpu);
                  dsum = _mm256_fmadd_ps(pv[u], dpu, dsum);
                  continue;
                }
                const __m256 gs = _mm256_mul_ps(pv[u], _mm256_sub_ps(dpu, deltav));
                _mm256_store_ps(dst + j * W, _mm256_mul_ps(gs, scalev));
                if (gmask != nullptr) _mm256_store_ps(dp + j * W, gs);  // dP of key j is used up
              }
            };
            m2::in_groups<4, 1>(nk, rows);
            if (single)
              for (int64_t j = 0; j < nk; ++j) {
                const __m256 gs = _mm256_mul_ps(_mm256_load_ps(dst + j * W), _mm256_sub_ps(_mm256_load_ps(dp + j * W), dsum));
                _mm256_store_ps(dst + j * W, _mm256_mul_ps(gs, scalev));
                if (gmask != nullptr) _mm256_store_ps(dp + j * W, gs);
              }
            if (gmask != nullptr)
              for (int64_t l = 0; l < W; ++l) {
                const int64_t off = goff[(ca + i) * W + l];
                if (off < 0) continue;
                float* const gr = gmask + off + j0;
                for (int64_t u = 0; u < nk; ++u) gr[u] += dp[u * W + l];
              }
          }
          lanes_pv_pair_avx2(cp, dsts + ca * cs, cs, kb, p.ks[2], d.d, dqt(ca), per_chunk);
        }
        lanes_rows_update_avx2(pts, cs, nkb, nr, gsrc, d.dv, gv + j0 * d.dv, d.dv);
        lanes_rows_update_avx2(dsts, cs, nkb, nr, qsrc, d.d, gk + j0 * d.d, d.d);
      }
      for (int64_t c = 0; c < nc; ++c) {
        float* rows[W] = {};
        for (int64_t ln = 0; ln < std::min(W, nr - c * W); ++ln) rows[ln] = gq + lrs[c].row[ln] * d.d;
        lanes_to_rows(dqt(c), d.d, nullptr, rows);
      }
    }
  }
}
#else
template <typename T>
void lanes_avx2_forward(const Problem<float>&, const T*, const T*, const T*, int64_t, int64_t, int64_t, T*, float*) {
  TORCH_INTERNAL_ASSERT(false);
}
void lanes_avx2_backward(const Problem<float>&, const float*, const float*, const float*, float*, float*, float*,
                         int64_t, float*, const MaskGradBuffer*, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false);
}
#endif

// ---- attn_mask that says no more than (is_causal, key_lengths) ----

// Whether every row of the mask attends to a prefix of the keys, of length len_b (key padding) or
// min(i + 1, len_b) (top-left causal, with or without key padding), the same for every head: then it
// is that (is_causal, key_lengths) pair, and the call runs the kernels that skip masked key blocks
// instead of adding the mask to every block of scores. Such masks are common: a
// causal float mask as nn.Transformer builds it, a tokenizer's key-padding mask, their 4-D
// combination. Reads the mask's own elements once (not its broadcast), stopping at the first that
// breaks the pattern; a float mask must hold only 0 and -inf.
struct MaskPattern {
  bool causal = false;
  Tensor lengths;  // int64 [B], or undefined: no padding
};

// Length of the allowed prefix of one mask row (n elements at stride st), or -1 if the row is not an
// allowed prefix followed by excluded keys.
template <typename T>
int64_t allowed_prefix(const T* row, int64_t n, int64_t st) {
  const auto allowed = [](T x) {
    if constexpr (std::is_same_v<T, bool>)
      return x ? 1 : 0;
    else
      return x == T(0) ? 1 : (x == -std::numeric_limits<T>::infinity() ? 0 : -1);
  };
  int64_t c = 0;
  while (c < n && allowed(row[c * st]) == 1) ++c;
  for (int64_t j = c; j < n; ++j)
    if (allowed(row[j * st]) != 0) return -1;
  return c;
}

std::optional<MaskPattern> mask_pattern(const Tensor& attn_mask, const Dims& d) {
  if (d.B == 0 || d.Hq == 0 || d.Lq == 0 || d.Lk == 0) return std::nullopt;
  Tensor m = attn_mask;
  while (m.dim() < 4) m = m.unsqueeze(0);
  m = m.expand({m.size(0), m.size(1), d.Lq, d.Lk});  // batch and head dims stay as given (1 or full)
  if (m.scalar_type() != at::kBool && m.scalar_type() != at::kFloat) m = m.to(at::kFloat);
  const int64_t nb = m.size(0), nh = m.size(1);
  const int64_t s0 = m.stride(0), s1 = m.stride(1), s2 = m.stride(2), s3 = m.stride(3);
  const bool* const mb = m.scalar_type() == at::kBool ? m.const_data_ptr<bool>() : nullptr;
  const float* const mf = mb == nullptr ? m.const_data_ptr<float>() : nullptr;
  std::vector<int64_t> cnt(nb * nh * d.Lq);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t i = 0; i < d.Lq; ++i) {
        const int64_t at = b * s0 + h * s1 + i * s2;
        const int64_t c = mb != nullptr ? allowed_prefix(mb + at, d.Lk, s3) : allowed_prefix(mf + at, d.Lk, s3);
        if (c < 0) return std::nullopt;
        cnt[(b * nh + h) * d.Lq + i] = c;
      }
  // Key padding: every row of batch b sees its last row's count. Causal: row i sees min(i + 1, len_b),
  // len_b = the last row's count when that is below Lq (past it, every len_b >= Lq looks the same).
  std::vector<int64_t> pad_len(nb), causal_len(nb);
  bool pad = true, causal = true;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t* cb = cnt.data() + b * nh * d.Lq;
    pad_len[b] = cb[d.Lq - 1];
    causal_len[b] = pad_len[b] < d.Lq ? pad_len[b] : d.Lk;
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t i = 0; i < d.Lq; ++i) {
        const int64_t c = cb[h * d.Lq + i];
        pad = pad && c == pad_len[b];
        causal = causal && c == std::min(i + 1, causal_len[b]);
      }
    if (!pad && !causal) return std::nullopt;
  }
  MaskPattern p;
  p.causal = !pad;
  const std::vector<int64_t>& len = pad ? pad_len : causal_len;
  if (std::any_of(len.begin(), len.end(), [&](int64_t x) { return x != d.Lk; })) {
    p.lengths = at::empty({d.B}, at::kLong);
    int64_t* const pl = p.lengths.data_ptr<int64_t>();
    for (int64_t b = 0; b < d.B; ++b) pl[b] = len[nb == 1 ? 0 : b];
  }
  return p;
}

// The call's masking with a pattern mask replaced by what it says (the forward and the backward decide
// alike, from the same arguments).
struct Masking {
  std::optional<Tensor> attn_mask, key_lengths;
  bool is_causal;
};

Masking simplify_masking(const Dims& d, const std::optional<Tensor>& attn_mask,
                         const std::optional<Tensor>& key_lengths, bool is_causal) {
  if (attn_mask.has_value() && !key_lengths.has_value() && !is_causal)
    if (std::optional<MaskPattern> p = mask_pattern(*attn_mask, d))
      return {std::nullopt, p->lengths.defined() ? std::optional<Tensor>(p->lengths) : std::nullopt, p->causal};
  return {attn_mask, key_lengths, is_causal};
}

// lanes_avx2_forward over all of a call's tasks; `solo` (a small call): on this thread alone.
template <typename T>
void run_lanes_avx2_forward(const Dims& d, const Problem<float>& fp, const T* q, const T* k, const T* v, T* out,
                            float* lse, bool solo) {
  const int64_t cb = lanes_avx2_chunks(d), tasks = lanes_tasks(d, cb * kAvx2Lanes);
  at::parallel_for(0, tasks, solo ? tasks : 1,
                   [&](int64_t t0, int64_t t1) { lanes_avx2_forward(fp, q, k, v, cb, t0, t1, out, lse); });
}

std::tuple<Tensor, Tensor> attention_cpu(const Tensor& query, const Tensor& key, const Tensor& value,
                                         const std::optional<Tensor>& attn_mask_arg,
                                         const std::optional<Tensor>& key_lengths_arg, bool is_causal_arg,
                                         std::optional<double> scale, double dropout_p, int64_t seed) {
  const char* op = "attention";
  const Dims d = check_inputs(op, query, key, value, attn_mask_arg, key_lengths_arg);
  const auto [attn_mask, key_lengths, is_causal] = simplify_masking(d, attn_mask_arg, key_lengths_arg, is_causal_arg);
  const Dropout dropout = make_dropout(op, dropout_p, seed);
  const at::ScalarType ct = compute_dtype(query.scalar_type());
  const Tensor lengths = lengths_int64(key_lengths), mask = additive_mask(attn_mask, d, ct);
  const bool bf16_lanes = query.scalar_type() == at::kBFloat16 && use_lanes(d, ct, mask, /*bf16=*/true);
  const bool f32_lanes = !bf16_lanes && use_lanes(d, ct, mask, /*bf16=*/false);
  const bool few = !bf16_lanes && !f32_lanes && use_few_queries(d, ct, dropout) &&
                   (query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16);
  // Small calls of those kernels run on this thread alone: no team to set the float mode on.
  // float32 rows of a kv head: the few-rows kernel for 1-3 (a decoding step without GQA), the lanes
  // kernel from 4 (a GQA group's decoding rows share each K and V read there).
  const bool vec_lanes = !bf16_lanes && !f32_lanes && use_lanes_avx2(ct) &&
                         (!use_few_queries(d, ct, dropout) || (query.scalar_type() == at::kFloat && d.Hq / d.Hkv * d.Lq >= 4));
  const int64_t vec_lanes_bytes = lanes_bytes(d, sizeof(float), kAvx2Lanes);
  const bool solo = ((bf16_lanes || f32_lanes) && lanes_bytes(d, query.element_size()) < kTeamBytes) ||
                    (few && few_bytes(d) < kTeamBytes) || (vec_lanes && vec_lanes_bytes < kTeamBytes);
  FlushDenormalsGuard ftz(!solo);
  // A bf16 forward multiplies in bf16 where the LSTM's would (AMX or vdpbf16ps); elsewhere it runs the
  // float32 kernels on float32 copies.
  if (bf16_lanes) {
    const Tensor q = rows_ready(query, at::kBFloat16), k = rows_ready(key, at::kBFloat16);
    const Tensor v = rows_ready(value, at::kBFloat16);
    Tensor out = pooled_empty({d.B, d.Hq, d.Lq, d.dv}, q.scalar_type());
    Tensor lse = pooled_empty({d.B, d.Hq, d.Lq}, at::kFloat);
    lanes_forward(d, fast_problem<uint16_t>(d, q, k, v, lengths, is_causal, scale, mask, dropout),
                  reinterpret_cast<uint16_t*>(out.data_ptr()), lse.data_ptr<float>());
    return {out, lse};
  }
  using gemm::cpu::Bf16Kernel;
  const Bf16Kernel bf16_kernel = gemm::cpu::bf16_kernel();
  // Dropout on the vdpbf16ps tiles (the AMX form takes none: untested there, no AMX host here).
  if (query.scalar_type() == at::kBFloat16 && bf16_tiles(d, mask) &&
      (!dropout.active() || bf16_kernel == Bf16Kernel::Dot)) {
    const Tensor q = rows_ready(query, at::kBFloat16), k = rows_ready(key, at::kBFloat16);
    const Tensor v = rows_ready(value, at::kBFloat16);
    Tensor out = pooled_empty({d.B, d.Hq, d.Lq, d.dv}, q.scalar_type());
    Tensor lse = pooled_empty({d.B, d.Hq, d.Lq}, at::kFloat);
    const fast::ProblemBf16 fp = fast_problem<uint16_t>(d, q, k, v, lengths, is_causal, scale, mask, dropout);
    const int64_t tasks = d.B * d.Hq * ((d.Lq + fast::kBlockQAmx - 1) / fast::kBlockQAmx);
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
    float* ls = lse.data_ptr<float>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      if (bf16_kernel == Bf16Kernel::Amx)
        fast::forward_amx(fp, t0, t1, o, ls);
      else
        fast::forward_bf16_dot(fp, t0, t1, o, ls);
    });
    return {out, lse};
  }
  const bool all_bf16 = query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
                        value.scalar_type() == at::kBFloat16;
  if (vec_lanes && all_bf16) {
    // the AVX2 lanes kernel reading bf16 q, k, v in place (no float32 copies), writing bf16
    const Tensor q = rows_ready(query, at::kBFloat16), k = rows_ready(key, at::kBFloat16);
    const Tensor v = rows_ready(value, at::kBFloat16);
    Tensor out = pooled_empty({d.B, d.Hq, d.Lq, d.dv}, at::kBFloat16);
    Tensor lse = pooled_empty({d.B, d.Hq, d.Lq}, at::kFloat);
    const auto bits = [](const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); };
    run_lanes_avx2_forward(d, problem_frame<float>(d, q, k, v, lengths, mask, is_causal, scale, dropout), bits(q),
                           bits(k), bits(v), reinterpret_cast<uint16_t*>(out.data_ptr()), lse.data_ptr<float>(),
                           vec_lanes_bytes < kTeamBytes);
    return {out, lse};
  }
  if (few && all_bf16) {
    // bf16 decoding without a bf16 kernel for it: K and V read in place (rows contiguous), q in float32.
    const Tensor q = rows_ready(query, ct), k = rows_ready(key, at::kBFloat16), v = rows_ready(value, at::kBFloat16);
    Tensor out = pooled_empty({d.B, d.Hq, d.Lq, d.dv}, q.scalar_type());
    Tensor lse = pooled_empty({d.B, d.Hq, d.Lq}, q.scalar_type());
    // k and v read through the bf16 pointers below (fp.k, fp.v stay nullptr), at their own strides
    Problem<float> fp = problem_frame<float>(d, q, k, v, lengths, mask, is_causal, scale, dropout);
    fp.q = q.const_data_ptr<float>();
    few_queries_forward(fp, k.const_data_ptr<at::BFloat16>(), v.const_data_ptr<at::BFloat16>(),
                        out.data_ptr<float>(), lse.data_ptr<float>());
    return {out.to(query.scalar_type()), lse};
  }
  const Tensor q = rows_ready(query, ct), k = rows_ready(key, ct), v = rows_ready(value, ct);
  Tensor out = pooled_empty({d.B, d.Hq, d.Lq, d.dv}, q.scalar_type());
  Tensor lse = pooled_empty({d.B, d.Hq, d.Lq}, q.scalar_type());
  if (f32_lanes) {
    lanes_forward(d, fast_problem<float>(d, q, k, v, lengths, is_causal, scale, mask, dropout),
                  out.data_ptr<float>(), lse.data_ptr<float>());
    return {out.to(query.scalar_type()), lse};
  }
  if (vec_lanes) {
    const Problem<float> fp = make_problem<float>(d, q, k, v, lengths, mask, is_causal, scale, dropout);
    run_lanes_avx2_forward(d, fp, fp.q, fp.k, fp.v, out.data_ptr<float>(), lse.data_ptr<float>(),
                           vec_lanes_bytes < kTeamBytes);
    return {out.to(query.scalar_type()), lse};
  }
  if (use_few_queries(d, ct, dropout)) {  // also bf16 inputs that took no bf16 kernel above
    const Problem<float> fp = make_problem<float>(d, q, k, v, lengths, mask, is_causal, scale, dropout);
    few_queries_forward(fp, fp.k, fp.v, out.data_ptr<float>(), lse.data_ptr<float>());
    return {out.to(query.scalar_type()), lse};
  }
  if (use_fast_path(d, ct, mask)) {
    const fast::Problem fp = fast_tiles_problem(d, q, k, v, lengths, mask, is_causal, scale, dropout);
    const int64_t tasks = d.B * d.Hq * ((d.Lq + fast::kBlockQ - 1) / fast::kBlockQ);
    float* o = out.data_ptr<float>();
    float* ls = lse.data_ptr<float>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) { fast::forward(fp, t0, t1, o, ls); });
    return {out.to(query.scalar_type()), lse};
  }
  AT_DISPATCH_FLOATING_TYPES(ct, "bigmodel.attention", [&] {
    forward<scalar_t>(make_problem<scalar_t>(d, q, k, v, lengths, mask, is_causal, scale, dropout), out.data_ptr<scalar_t>(),
                      lse.data_ptr<scalar_t>());
  });
  return {out.to(query.scalar_type()), lse};
}

// How many key splits per kv head the backward's tasks take (fast::KeySplit): the fewest that make
// the B * Hkv * splits tasks fill whole rounds of the team (9 in 10 thread slots busy), at most one per
// 64-key block. Each split past the first costs a dQ copy to zero and add, so a call too small to
// repay that (under kSplitWork multiply-adds per extra split) keeps one.
constexpr int64_t kSplitWork = int64_t(1) << 22;
int64_t key_splits(const Dims& d) {
  const int64_t threads = at::get_num_threads(), heads = d.B * d.Hkv;
  const int64_t blocks = (d.Lk + 63) / 64, work = d.B * d.Hq * d.Lq * d.Lk * (d.d + d.dv);
  int64_t best = 1;
  for (int64_t s = 1; s <= blocks && s <= 4 * threads; ++s) {
    const int64_t tasks = heads * s, rounds = (tasks + threads - 1) / threads;
    if (s > 1 && work / s < kSplitWork) break;
    best = s;
    if (10 * tasks >= 9 * rounds * threads) break;
  }
  return best;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& out,
    const Tensor& logsumexp, const std::optional<Tensor>& attn_mask_arg,
    const std::optional<Tensor>& key_lengths_arg, bool is_causal_arg, std::optional<double> scale,
    double dropout_p, int64_t seed, bool mask_grad) {
  const char* op = "attention_backward";
  const Dims d = check_inputs(op, query, key, value, attn_mask_arg, key_lengths_arg);
  check_mask_grad(op, attn_mask_arg, mask_grad);
  const auto [attn_mask, key_lengths, is_causal] = simplify_masking(d, attn_mask_arg, key_lengths_arg, is_causal_arg);
  const Dropout dropout = make_dropout(op, dropout_p, seed);
  const at::ScalarType ct = compute_dtype(query.scalar_type());
  check_backward_inputs(op, d, grad_out, out, logsumexp, ct, query.device());
  FlushDenormalsGuard ftz;
  const Tensor lengths = lengths_int64(key_lengths);
  const Tensor mask = additive_mask(attn_mask, d, ct);
  // A bf16 backward multiplies in bf16 where vdpbf16ps pays (no AMX kernel for it: AMX hosts, whose
  // vdpbf16ps runs at half the float32 rate, take the float32 kernels on float32 copies).
  // (A mask's gradient comes from the float32 kernels.)
  const Tensor no_mask_grad = at::empty({0}, query.options());
  if (query.scalar_type() == at::kBFloat16 && mask_keys_contiguous(d, mask) && !mask_grad &&
      fast::supports(d.d, d.dv) && gemm::cpu::bf16_kernel() == gemm::cpu::Bf16Kernel::Dot) {
    const Tensor q = rows_ready(query, at::kBFloat16), k = rows_ready(key, at::kBFloat16);
    const Tensor v = rows_ready(value, at::kBFloat16);
    const Tensor go = dense(grad_out, at::kBFloat16), o = dense(out, at::kBFloat16);
    const Tensor lse = dense(logsumexp, at::kFloat);
    Tensor gq = pooled_empty(q.sizes(), q.scalar_type()), gk = pooled_empty(k.sizes(), k.scalar_type());
    Tensor gv = pooled_empty(v.sizes(), v.scalar_type());
    const fast::ProblemBf16 fp = fast_problem<uint16_t>(d, q, k, v, lengths, is_causal, scale, mask, dropout);
    const auto bits = [](const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); };
    fast::GradsBf16 g;
    g.grad_out = bits(go);
    g.out = bits(o);
    g.lse = lse.const_data_ptr<float>();
    g.gq = reinterpret_cast<uint16_t*>(gq.data_ptr());
    g.gk = reinterpret_cast<uint16_t*>(gk.data_ptr());
    g.gv = reinterpret_cast<uint16_t*>(gv.data_ptr());
    g.splits = key_splits(d);
    Tensor parts;
    if (g.splits > 1) {
      parts = pooled_empty({g.splits, d.B, d.Hq, d.Lq, d.d}, at::kFloat);
      g.gq_parts = parts.data_ptr<float>();
    }
    at::parallel_for(0, d.B * d.Hkv * g.splits, 1,
                     [&](int64_t t0, int64_t t1) { fast::backward_bf16_dot(fp, g, t0, t1); });
    if (g.splits > 1) gq.copy_(parts.sum(0));
    return {gq, gk, gv, no_mask_grad};
  }
  const Tensor q = rows_ready(query, ct), k = rows_ready(key, ct), v = rows_ready(value, ct);
  const Tensor go = dense(grad_out, ct), lse = logsumexp.contiguous();
  const Tensor delta = row_dots(go, dense(out, ct));
  Tensor gq = zeroed(q.sizes(), ct), gk = zeroed(k.sizes(), ct), gv = zeroed(v.sizes(), ct);
  const MaskGradBuffer mg = mask_grad ? mask_grad_buffer(d, *attn_mask_arg, ct) : MaskGradBuffer();
  const auto mask_out = [&] { return mask_grad ? mask_grad_result(mg, *attn_mask_arg) : no_mask_grad; };
  if (use_lanes_avx2(ct)) {
    const Problem<float> fp = make_problem<float>(d, q, k, v, lengths, mask, is_causal, scale, dropout);
    const int64_t splits = key_splits(d);
    Tensor parts;
    if (splits > 1) parts = zeroed({splits - 1, d.B, d.Hq, d.Lq, d.d}, ct);
    float* const pp = splits > 1 ? parts.data_ptr<float>() : nullptr;
    at::parallel_for(0, d.B * d.Hkv * splits, 1, [&](int64_t t0, int64_t t1) {
      lanes_avx2_backward(fp, go.const_data_ptr<float>(), lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
                          gq.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(), splits, pp,
                          mask_grad ? &mg : nullptr, t0, t1);
    });
    if (splits > 1) gq.add_(splits == 2 ? parts[0] : parts.sum(0));
    const auto st = query.scalar_type();
    return {gq.to(st), gk.to(st), gv.to(st), mask_out()};
  }
  // The tiles keep dS times the scale; a mask's gradient at scale 0 comes from the loop below.
  if (use_fast_path(d, ct, mask) && !(mask_grad && scale.has_value() && *scale == 0.0)) {
    const fast::Problem fp = fast_tiles_problem(d, q, k, v, lengths, mask, is_causal, scale, dropout);
    fast::Grads g;
    g.grad_out = go.const_data_ptr<float>();
    g.lse = lse.const_data_ptr<float>();
    g.delta = delta.const_data_ptr<float>();
    g.gq = gq.data_ptr<float>();
    g.gk = gk.data_ptr<float>();
    g.gv = gv.data_ptr<float>();
    if (mask_grad) std::copy(mg.strides, mg.strides + 3, g.gmask_strides);
    g.splits = key_splits(d);
    Tensor parts;
    if (g.splits > 1) {
      parts = zeroed({g.splits - 1, d.B, d.Hq, d.Lq, d.d}, ct);
      g.gq_parts = parts.data_ptr<float>();
    }
    at::parallel_for(0, d.B * d.Hkv * g.splits, 1, [&](int64_t t0, int64_t t1) {
      fast::Grads gt = g;
      if (mask_grad) gt.gmask = mg.buf.data_ptr<float>() + at::get_thread_num() * mg.slot;
      fast::backward(fp, gt, t0, t1);
    });
    if (g.splits > 1) gq.add_(g.splits == 2 ? parts[0] : parts.sum(0));
    const auto st = query.scalar_type();
    return {gq.to(st), gk.to(st), gv.to(st), mask_out()};
  }
  AT_DISPATCH_FLOATING_TYPES(ct, "bigmodel.attention_backward", [&] {
    using T = scalar_t;
    backward<T>(make_problem<T>(d, q, k, v, lengths, mask, is_causal, scale, dropout), go.const_data_ptr<T>(),
                lse.const_data_ptr<T>(), delta.const_data_ptr<T>(), gq.data_ptr<T>(), gk.data_ptr<T>(),
                gv.data_ptr<T>(), mg);
  });
  const auto st = query.scalar_type();
  return {gq.to(st), gk.to(st), gv.to(st), mask_out()};
}

// ---- attention_weights: the probabilities themselves (nn.MultiheadAttention's need_weights) ----

// With average a task owns (batch, kWeightRows query rows) of the [B, Lq, Lk] output and sums every
// query head into them (no [B, Hq, Lq, Lk] buffer); without, one (batch, query head, row block).
// Each key block recomputes S = scale Q K^T (as the backward does) and writes exp(s - logsumexp).
constexpr int64_t kWeightRows = 64;
// Below this many multiply-adds in S = Q K^T (B Hq Lq Lk d) the weights run on the calling thread.
constexpr int64_t kWeightsTeamWork = int64_t(1) << 20;

template <typename T>
void weights_forward(const Problem<T>& p, const T* lse, bool average, T* w) {
  using V = Vectorized<T>;
  const Dims& d = p.d;
  const int64_t nqb = (d.Lq + kWeightRows - 1) / kWeightRows, heads = average ? 1 : d.Hq;
  const T ninf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, d.B * heads * nqb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> S(kWeightRows * kBlockK), Z(p.dropout.active() ? kWeightRows * kBlockK : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (heads * nqb), i0 = (t % nqb) * kWeightRows, nq = std::min(kWeightRows, d.Lq - i0);
      const int64_t h0 = average ? 0 : (t / nqb) % d.Hq, h1 = average ? d.Hq : h0 + 1;
      T* rows = w + ((b * heads + (average ? 0 : h0)) * d.Lq + i0) * d.Lk;
      const int64_t kend = p.key_end(b, i0 + nq);  // later keys: 0 for every row of the block
      for (int64_t r = 0; r < nq; ++r) std::fill(rows + r * d.Lk + kend, rows + (r + 1) * d.Lk, T(0));
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t hk = h / p.group();
        const T* row_lse = lse + (b * d.Hq + h) * d.Lq + i0;
        for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
          const int64_t nk = std::min(kBlockK, kend - j0);
          gemm::rowmajor<T>(false, true, nq, nk, d.d, p.scale, p.q_rows(b, h, i0), p.qs[2], p.k_rows(b, hk, j0),
                            p.ks[2], T(0), S.data(), kBlockK);
          p.mask_scores(b, h, i0, nq, j0, nk, S.data(), kBlockK);
          if (p.dropout.active()) p.dropout_factors(b, h, i0, nq, j0, nk, Z.data(), kBlockK);
          for (int64_t r = 0; r < nq; ++r) {
            T* s = S.data() + r * kBlockK;
            const T m = row_lse[r];
            if (m == ninf)  // no valid key: zeros (a NaN row is made wholly NaN below)
              std::fill(s, s + nk, T(0));
            else  // P, as the backward recomputes it
              exp_shifted(s, nk, m);
            if (p.dropout.active())
              at::vec::map2([](V x, V z) { return x * z; }, s, s, Z.data() + r * kBlockK, nk);
            T* o = rows + r * d.Lk + j0;
            if (h == h0)
              std::copy(s, s + nk, o);
            else
              at::vec::map2([](V x, V y) { return x + y; }, o, o, s, nk);
          }
        }
      }
      if (average && d.Hq > 1)
        for (int64_t r = 0; r < nq; ++r) scale_row(rows + r * d.Lk, kend, T(1) / T(d.Hq));
      // A row with a NaN score (its logsumexp NaN, in any head when averaged) is NaN throughout, masked
      // keys included, as PyTorch's softmax gives.
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t r = 0; r < nq; ++r)
          if (std::isnan(lse[(b * d.Hq + h) * d.Lq + i0 + r]))
            std::fill(rows + r * d.Lk, rows + (r + 1) * d.Lk, std::numeric_limits<T>::quiet_NaN());
    }
  });
}

Tensor attention_weights_cpu(const Tensor& query, const Tensor& key, const Tensor& logsumexp,
                             const std::optional<Tensor>& attn_mask_arg, const std::optional<Tensor>& key_lengths_arg,
                             bool is_causal_arg, std::optional<double> scale, double dropout_p, int64_t seed,
                             bool average) {
  const char* op = "attention_weights";
  const Dims d = check_inputs(op, query, key, key, attn_mask_arg, key_lengths_arg);  // no value: key stands in
  const at::ScalarType ct = compute_dtype(query.scalar_type());
  check_shape(logsumexp, {d.B, d.Hq, d.Lq}, op, "logsumexp", "[B, Hq, Lq]");
  BM_CHECK(logsumexp.scalar_type() == ct, op, "logsumexp must be ", ct, ", got ", logsumexp.scalar_type());
  BM_CHECK(logsumexp.device() == query.device(), op, "logsumexp is on ", logsumexp.device(), " but query is on ",
           query.device());
  const auto [attn_mask, key_lengths, is_causal] = simplify_masking(d, attn_mask_arg, key_lengths_arg, is_causal_arg);
  const Dropout dropout = make_dropout(op, dropout_p, seed);
  // A small call runs on this thread alone (waking the team cost more than the work at L = 16-32).
  const bool solo = d.B * d.Hq * d.Lq * d.Lk * d.d < kWeightsTeamWork;
  FlushDenormalsGuard ftz(!solo);
  const Tensor lengths = lengths_int64(key_lengths), mask = additive_mask(attn_mask, d, ct);
  const Tensor q = rows_ready(query, ct), k = rows_ready(key, ct), lse = logsumexp.contiguous();
  Tensor w = average ? pooled_empty({d.B, d.Lq, d.Lk}, ct) : pooled_empty({d.B, d.Hq, d.Lq, d.Lk}, ct);
  if (average && d.Hq == 0) return w.fill_(std::numeric_limits<double>::quiet_NaN()).to(query.scalar_type());
  if (use_fast_path(d, ct, mask)) {  // d.dv is key's d here
    const fast::Problem fp = fast_tiles_problem(d, q, k, k, lengths, mask, is_causal, scale, dropout);
    // kBlockQ rows per task, fewer (a multiple of 6) where that leaves under 4 tasks per thread (an
    // unbatched call, B = 1, averaged over heads: 256 rows were 3 tasks for 2 threads).
    const int64_t groups = d.B * (average ? 1 : d.Hq), want = 4 * at::get_num_threads();
    int64_t block = fast::kBlockQ;
    if (groups * ((d.Lq + block - 1) / block) < want)
      block = std::clamp<int64_t>(d.Lq * groups / want / 6 * 6, 6, block);
    const int64_t tasks = groups * ((d.Lq + block - 1) / block);
    // Every kv head's K^T packed once, before the tasks that share it (each used to pack its own).
    Tensor panels = pooled_empty({d.B * d.Hkv, (d.Lk + 63) / 64 * d.d * 64}, ct);
    float* pp = panels.data_ptr<float>();
    at::parallel_for(0, d.B * d.Hkv, solo ? d.B * d.Hkv : 1,
                     [&](int64_t t0, int64_t t1) { fast::weights_pack(fp, t0, t1, pp); });
    float* wp = w.data_ptr<float>();
    const float* lp = lse.const_data_ptr<float>();
    at::parallel_for(0, tasks, solo ? tasks : 1,
                     [&](int64_t t0, int64_t t1) { fast::weights(fp, pp, lp, average, block, t0, t1, wp); });
  } else {
    AT_DISPATCH_FLOATING_TYPES(ct, "bigmodel.attention_weights", [&] {
      weights_forward<scalar_t>(make_problem<scalar_t>(d, q, k, k, lengths, mask, is_causal, scale, dropout),
                                lse.const_data_ptr<scalar_t>(), average, w.data_ptr<scalar_t>());
    });
  }
  return w.to(query.scalar_type());
}

}  // namespace
}  // namespace bigmodel::attention

TORCH_LIBRARY_IMPL(bigmodel, CPU, m) {
  m.impl("attention", &bigmodel::attention::attention_cpu);
  m.impl("attention_backward", &bigmodel::attention::attention_backward_cpu);
  m.impl("attention_weights", &bigmodel::attention::attention_weights_cpu);
}
