// Attention forward on the AVX-512 micro-kernels (design in attention_cpu_fast.h).
#include "attention/attention_cpu_fast.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/gemm/microkernel.h"

#ifdef BIGMODEL_HAS_AVX512_KERNELS

namespace bigmodel::attention::fast {
namespace {

namespace mk = bigmodel::gemm::avx512;
constexpr int64_t kKeys = mk::kNR;  // keys per block: one panel
constexpr int kRows = mk::kMR;      // query rows per register tile

// scale * X^T of rows [0, n) of X (rows of `dim` floats at stride ld) as panels [ceil(n / 64)][dim][64],
// zero past n: K^T (times scale) for S = Q K^T, and V^T for backward's dP = dO V^T.
void pack_transposed(const float* x, int64_t ld, int64_t n, int64_t dim, float scale, float* panels) {
  const int64_t nb = (n + kKeys - 1) / kKeys;
  std::fill(panels, panels + nb * dim * kKeys, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* xr = x + j * ld;
    float* dst = panels + (j / kKeys) * dim * kKeys + j % kKeys;
    for (int64_t c = 0; c < dim; ++c) dst[c * kKeys] = scale * xr[c];
  }
}

// Rows [0, n) of X (dim values at stride ld) copied contiguously, at stride ldd (default dim; zeros
// from dim to ldd). q, k and v often come as views of a projection ([B, L, 3, H, d] seen as [B, H, L,
// d]), whose rows sit 3 E floats apart: walking 64 such rows per key block touched a new page per
// row, and the TLB misses made the strided case 1.7x slower than the contiguous one. The zero columns
// pad a head dim that is no multiple of 16 to whole vectors (round16).
template <typename T>
void copy_rows(const T* x, int64_t ld, int64_t n, int64_t dim, T* dst, int64_t ldd = 0) {
  if (ldd == 0) ldd = dim;
  for (int64_t j = 0; j < n; ++j) {
    std::copy(x + j * ld, x + j * ld + dim, dst + j * ldd);
    std::fill(dst + j * ldd + dim, dst + (j + 1) * ldd, T(0));
  }
}

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// How many keys each of rows r0 .. r0 + mr may see (key lengths, and the causal diagonal) into
// limit[]; returns the most any of them sees.
template <typename P>
int64_t visible_keys(const P& p, int64_t valid, int64_t r0, int64_t mr, int64_t* limit) {
  int64_t kend = 0;
  for (int64_t r = 0; r < mr; ++r) {
    limit[r] = p.causal ? std::min(valid, r0 + r + 1) : valid;
    kend = std::max(kend, limit[r]);
  }
  return kend;
}

// f(c0, nv) for the 64-column chunks of `cols` output columns (up to kMaxDim), nv the chunk's zmm count
// as a compile-time constant: a register tile holds at most 4 vectors per row. With cols no multiple
// of 16 the last vector is partial: its operands are padded (round16) or read and written through
// last_lanes (mk::load_tile / store_tile with a lane mask).
template <typename F>
BM_ALWAYS_INLINE void for_each_column_chunk(int64_t cols, const F& f) {
  for (int64_t c0 = 0; c0 < cols; c0 += kKeys)
    mk::with_vectors(std::min<int64_t>(4, (cols - c0 + 15) / 16), [&](auto nv) { f(c0, nv); });
}

// The first NV vectors of each row of a register tile copied into another (of another width): a
// short key block's product runs on an NV-vector tile and its result goes back into the 4-vector one.
template <int NV, int MR, int A, int B>
BM_AVX512 BM_ALWAYS_INLINE void copy_vectors(const __m512 (&src)[MR][A], __m512 (&dst)[MR][B]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) dst[r][j] = src[r][j];
}

// acc += A B over the first nk columns of a 64-key panel (rows of 64 floats), the other vectors left as
// they are: a block of 20 keys (the tail of a short sequence) multiplies 2 vectors of 4.
template <int MR>
BM_AVX512 BM_ALWAYS_INLINE void tile_keys(const float* a, int64_t lda, int64_t K, const float* panel, int64_t nk,
                                          __m512 (&acc)[MR][4]) {
  if (nk > 48) return mk::tile_f32<MR>(a, lda, K, panel, acc);
  mk::with_vectors((nk + 15) / 16, [&](auto nv) BM_AVX512 {
    constexpr int NV = decltype(nv)::value;
    __m512 part[MR][NV];
    copy_vectors<NV>(acc, part);
    mk::tile_f32_rows<MR, NV>(a, lda, K, panel, kKeys, part);
    copy_vectors<NV>(part, acc);
  });
}

// The same for bf16 pair panels (rows of 64 key pairs, K2 pairs): tile_bf16 over the first nk keys.
template <int MR>
BM_AVX512_BF16 BM_ALWAYS_INLINE void tile_keys_bf16(const uint16_t* a, int64_t lda, int64_t K2, const uint16_t* panel,
                                                    int64_t nk, __m512 (&acc)[MR][4]) {
  if (nk > 48) return mk::tile_bf16<MR>(a, lda, K2, panel, acc);
  mk::with_vectors((nk + 15) / 16, [&](auto nv) BM_AVX512_BF16 {
    constexpr int NV = decltype(nv)::value;
    __m512 part[MR][NV];
    copy_vectors<NV>(acc, part);
    mk::tile_bf16_rows<MR, NV>(a, lda, K2, panel, 2 * kKeys, part);
    copy_vectors<NV>(part, acc);
  });
}

// The lanes of a chunk's last vector (from column c0, NV vectors) that lie below cols.
template <int NV>
BM_AVX512 BM_ALWAYS_INLINE __mmask16 last_lanes(int64_t cols, int64_t c0) {
  return mk::lanes(cols - c0 - 16 * (NV - 1));
}

// Dropout's keep decision (attention.h's mix32 and threshold) for 16 hash inputs x at once.
BM_AVX512 BM_ALWAYS_INLINE __mmask16 keep_bits(const Dropout& dropout, __m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int32_t(0x7feb352dU)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int32_t(0x846ca68bU)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  return _mm512_cmpge_epu32_mask(x, _mm512_set1_epi32(int32_t(dropout.threshold)));
}

// The keys j0 .. j0 + 15 that row `row` (its Dropout::row_key) keeps.
BM_AVX512 BM_ALWAYS_INLINE __mmask16 dropout_keep(const Dropout& dropout, uint32_t row, int64_t j0) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return keep_bits(dropout, _mm512_xor_si512(_mm512_set1_epi32(int32_t(row)),
                                             _mm512_add_epi32(_mm512_set1_epi32(int32_t(uint32_t(j0))), iota)));
}

// The same bits for 16 rows (their row keys, one per lane) at key j: the lanes kernel's layout.
BM_AVX512 BM_ALWAYS_INLINE __mmask16 dropout_keep_rows(const Dropout& dropout, __m512i rows, int64_t j) {
  return keep_bits(dropout, _mm512_xor_si512(rows, _mm512_set1_epi32(int32_t(uint32_t(j)))));
}

// s[r][c] += the additive mask of row r (mask rows at stride ld from mrow) for keys j0 + 16 c .. of
// the block, of which the first n exist (the rest add nothing: they are masked by the caller).
template <int MR>
BM_AVX512 BM_ALWAYS_INLINE void add_mask(__m512 (&s)[MR][4], const float* mrow, int64_t ld, int64_t j0, int64_t n) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __mmask16 m = mk::lanes(std::clamp<int64_t>(n - 16 * c, 0, 16));
      s[r][c] = _mm512_add_ps(s[r][c], _mm512_maskz_loadu_ps(m, mrow + r * ld + j0 + 16 * c));
    }
}

// The first mask row of query rows r0.. of (batch b, query head h), or nullptr without a mask.
template <typename P>
const float* mask_rows(const P& p, int64_t b, int64_t h, int64_t r0) {
  return p.mask ? p.mask + b * p.ms[0] + h * p.ms[1] + r0 * p.ms[2] : nullptr;
}

// The row keys of query rows r0 .. r0 + mr of (batch b, query head h), when dropout is on.
inline void dropout_rows(const Dropout& dropout, int64_t b, int64_t h, int64_t r0, int64_t mr, uint32_t* keys) {
  if (dropout.active())
    for (int64_t r = 0; r < mr; ++r) keys[r] = dropout.row_key(b, h, r0 + r);
}

// The forward's task loop, shared by the float32 and the AMX kernels. Task t is (batch b, query head
// h, query rows i0 .. i0 + block); pack(b, hk, valid) runs when a task's kv head differs from the one
// packed last (consecutive tasks share it), then rows(b, h, r0, mr, valid, limit, kend) for each
// group of at most kRowsMax query rows, limit[r] being the keys row r0 + r sees.
template <int kRowsMax, typename P, typename Pack, typename Rows>
void for_each_forward_task(const P& p, int64_t t0, int64_t t1, int64_t block, const Pack& pack, const Rows& rows) {
  const int64_t nqb = (p.Lq + block - 1) / block, group = p.Hq / p.Hkv;
  int64_t packed_b = -1, packed_hk = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (p.Hq * nqb), h = (t / nqb) % p.Hq, i0 = (t % nqb) * block;
    const int64_t hk = h / group, nq = std::min(block, p.Lq - i0);
    const int64_t valid = p.lengths ? p.lengths[b] : p.Lk;
    if (b != packed_b || hk != packed_hk) {
      pack(b, hk, valid);
      packed_b = b;
      packed_hk = hk;
    }
    for (int64_t r0 = i0; r0 < i0 + nq; r0 += kRowsMax) {
      const int64_t mr = std::min<int64_t>(kRowsMax, i0 + nq - r0);
      int64_t limit[kRowsMax];
      const int64_t kend = visible_keys(p, valid, r0, mr, limit);
      rows(b, h, r0, mr, limit, kend);
    }
  }
}

// One group of MR query rows (rows i0 .. i0 + MR) against keys [0, kend): online softmax, P V.
// limit[r] = number of keys row r may see (key_lengths and the causal diagonal).
// With dropout, drop_rows[r] is row r's Dropout::row_key: P V sees the kept probabilities scaled by
// 1 / (1 - p), the normalizer l all of them. mrow: the rows' additive mask (mask_rows) or nullptr.
// p.dv is the padded width of v's rows (round16); the output rows hold dv_out values.
template <int MR>
BM_AVX512 void row_group(const Problem& p, const float* q, const float* kpanels, const float* v, int64_t kend,
                         const int64_t* limit, const uint32_t* drop_rows, const float* mrow, float* out,
                         float* lse, int64_t dv_out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const bool dropout = p.dropout.active();
  const __m512 kept = _mm512_set1_ps(static_cast<float>(p.dropout.keep_scale()));
  float m[MR], l[MR];
  alignas(64) float o[MR][kMaxDim];
  alignas(64) float pt[MR][kKeys];
  for (int r = 0; r < MR; ++r) {
    m[r] = ninf;
    l[r] = 0.f;
    for (int64_t c = 0; c < p.dv; ++c) o[r][c] = 0.f;
  }
  int64_t min_limit = limit[0];
  for (int r = 1; r < MR; ++r) min_limit = std::min(min_limit, limit[r]);
  for (int64_t j0 = 0; j0 < kend; j0 += kKeys) {
    const int64_t nk = std::min(kKeys, kend - j0);
    __m512 s[MR][4];
    mk::zero_tile<MR>(s);
    tile_keys<MR>(q, p.qs[2], p.d, kpanels + (j0 / kKeys) * p.d * kKeys, nk, s);
    if (mrow) add_mask<MR>(s, mrow, p.ms[2], j0, kend - j0);
    float alpha[MR];
    // Blocks wholly inside every row's visible keys (most of them) skip the masking.
    const bool edge = j0 + kKeys > min_limit;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __mmask16 mask[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
      if (edge) {
        const int64_t lim = limit[r] - j0;  // keys of this block row r sees
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          mask[c] = mk::lanes(std::max<int64_t>(0, std::min<int64_t>(16, lim - 16 * c)));
          s[r][c] = _mm512_mask_mov_ps(_mm512_set1_ps(ninf), mask[c], s[r][c]);
        }
      }
      const float mb = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_max_ps(s[r][0], s[r][1]), _mm512_max_ps(s[r][2], s[r][3])));
      float mnew = std::isnan(mb) ? mb : std::max(m[r], mb);  // a NaN score makes the row NaN
      if (mnew == ninf) {
        // Nothing visible yet, or only NaN scores (vmaxps drops a NaN first operand against -inf):
        // a NaN makes the row NaN, as in PyTorch; otherwise the row contributes zero.
        __mmask16 nan = 0;
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) nan |= _mm512_cmp_ps_mask(s[r][c], s[r][c], _CMP_UNORD_Q);
        if (nan == 0) {
          alpha[r] = 1.f;
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) _mm512_store_ps(pt[r] + 16 * c, _mm512_setzero_ps());
          continue;
        }
        mnew = std::numeric_limits<float>::quiet_NaN();
      }
      const __m512 shift = _mm512_set1_ps(mnew);
      __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512 x = _mm512_sub_ps(s[r][c], shift);
        __m512 e = edge ? _mm512_maskz_mov_ps(mask[c], mk::exp_scaled_ps<1>(x)) : mk::exp_scaled_ps<1>(x);
        if (mrow) e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s[r][c], _mm512_set1_ps(ninf), _CMP_NEQ_UQ), e);
        _mm512_store_ps(pt[r] + 16 * c,
                        dropout ? _mm512_maskz_mul_ps(dropout_keep(p.dropout, drop_rows[r], j0 + 16 * c), e, kept) : e);
        sum = _mm512_add_ps(sum, e);
      }
      alpha[r] = m[r] == ninf ? 0.f : std::exp(m[r] - mnew);
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
      m[r] = mnew;
    }
    for_each_column_chunk(p.dv, [&](int64_t c0, auto nv) BM_AVX512 {
      constexpr int NV = decltype(nv)::value;
      __m512 acc[MR][NV];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(o[r] + c0 + 16 * c), a);
      }
      mk::tile_f32_rows<MR, NV>(pt[0], kKeys, nk, v + j0 * p.vs[2] + c0, p.vs[2], acc);
      mk::store_tile(acc, o[0] + c0, kMaxDim);
    });
  }
  for (int r = 0; r < MR; ++r) {
    float* dst = out + r * dv_out;
    if (l[r] != 0.f) {  // a row with keys, or a NaN one (which stays NaN, as in PyTorch)
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      for (int64_t c = 0; c < dv_out; c += 16)
        _mm512_mask_storeu_ps(dst + c, mk::lanes(dv_out - c), _mm512_mul_ps(_mm512_load_ps(o[r] + c), inv));
      lse[r] = m[r] + std::log(l[r]);
    } else {
      for (int64_t c = 0; c < dv_out; ++c) dst[c] = 0.f;
      lse[r] = ninf;
    }
  }
}

}  // namespace

void forward(const Problem& p, int64_t t0, int64_t t1, float* out, float* lse) {
  const int64_t nkb = (p.Lk + kKeys - 1) / kKeys;
  std::vector<float> storage, vstorage;
  const int64_t dvp = round16(p.dv);
  float* kpanels = mk::aligned(storage, nkb * p.d * kKeys);
  float* vrows = mk::aligned(vstorage, p.Lk * dvp);
  Problem pv = p;  // V read from vrows, its rows padded to whole vectors
  pv.vs[2] = dvp;
  pv.dv = dvp;
  for_each_forward_task<kRows>(
      p, t0, t1, kBlockQ,
      [&](int64_t b, int64_t hk, int64_t valid) {
        pack_transposed(p.k + b * p.ks[0] + hk * p.ks[1], p.ks[2], valid, p.d, p.scale, kpanels);
        copy_rows(p.v + b * p.vs[0] + hk * p.vs[1], p.vs[2], valid, p.dv, vrows, dvp);
      },
      [&](int64_t b, int64_t h, int64_t r0, int64_t mr, const int64_t* limit, int64_t kend) {
        const int64_t row = (b * p.Hq + h) * p.Lq + r0;
        const float* q = p.q + b * p.qs[0] + h * p.qs[1] + r0 * p.qs[2];
        uint32_t drop_rows[kRows];
        dropout_rows(p.dropout, b, h, r0, mr, drop_rows);
        mk::with_rows(mr, [&](auto rows) {
          row_group<decltype(rows)::value>(pv, q, kpanels, vrows, kend, limit, drop_rows, mask_rows(p, b, h, r0),
                                           out + row * p.dv, lse + row, p.dv);
        });
      });
}

// ---- the probabilities themselves (attention_weights, nn.MultiheadAttention's need_weights) ----

namespace {

// P = exp(scale S - lse) (the backward's, and the weights') for MR rows of the 64-key block from j0
// into pf: zero past each row's limit, and for rows that see no key (lse = -inf; they get no gradient).
// With an additive mask (mrow: the rows' mask rows at stride ldm, or nullptr) P = exp(scale S + mask -
// lse), exactly 0 where the mask is -inf.
template <int MR>
BM_AVX512 BM_ALWAYS_INLINE void probabilities(const __m512 (&s)[MR][4], float scale, const float* lse,
                                              const int64_t* limit, int64_t j0, float (*pf)[kKeys],
                                              const float* mrow = nullptr, int64_t ldm = 0) {
  int64_t min_limit = limit[0];
  for (int r = 1; r < MR; ++r) min_limit = std::min(min_limit, limit[r]);
  const bool edge = j0 + kKeys > min_limit;
  const __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (lse[r] == -std::numeric_limits<float>::infinity()) {
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) _mm512_store_ps(pf[r] + 16 * c, _mm512_setzero_ps());
      continue;
    }
    const __m512 shift = _mm512_set1_ps(lse[r]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __mmask16 seen = mk::lanes(std::clamp<int64_t>(limit[r] - j0 - 16 * c, 0, 16));
      __m512 x = _mm512_fmsub_ps(s[r][c], sc, shift);
      if (mrow) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(seen, mrow + r * ldm + j0 + 16 * c));
      __m512 e = mk::exp_scaled_ps<1>(x);
      if (mrow) e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_UQ), e);  // the mask's -inf: 0
      if (edge) e = _mm512_maskz_mov_ps(seen, e);
      _mm512_store_ps(pf[r] + 16 * c, e);
    }
  }
}

// Rows r0 .. r0 + MR of one query head against keys [0, kend) (limit, drop_rows, mrow as in row_group;
// lse the rows' logsumexp): w[r][j] (rows at stride ldw) = factor * P (probabilities(): 0 for keys the
// row does not see, for -inf mask entries and for rows without keys) times the dropout factor; added to
// w unless first (a NaN row is made wholly NaN by weights()).
template <int MR>
BM_AVX512 void weights_row_group(const Problem& p, const float* q, int64_t ldq, const float* kpanels, int64_t kend,
                                 const int64_t* limit, const float* lse, const uint32_t* drop_rows, const float* mrow,
                                 bool first, float factor, float* w, int64_t ldw) {
  const __m512 fac = _mm512_set1_ps(factor);
  const __m512 kept = _mm512_set1_ps(static_cast<float>(p.dropout.keep_scale()) * factor);
  alignas(64) float pt[MR][kKeys];
  for (int64_t j0 = 0; j0 < kend; j0 += kKeys) {
    const int64_t nk = std::min(kKeys, kend - j0);
    __m512 s[MR][4];
    mk::zero_tile<MR>(s);
    tile_keys<MR>(q, ldq, p.d, kpanels + (j0 / kKeys) * p.d * kKeys, nk, s);
    probabilities<MR>(s, 1.f, lse, limit, j0, pt, mrow, p.ms[2]);  // the panels hold scale K^T
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* dst = w + r * ldw + j0;
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        if (16 * c >= nk) break;
        const __mmask16 cols = mk::lanes(std::min<int64_t>(16, nk - 16 * c));
        const __m512 e = _mm512_load_ps(pt[r] + 16 * c);
        __m512 x = p.dropout.active()
                       ? _mm512_maskz_mul_ps(dropout_keep(p.dropout, drop_rows[r], j0 + 16 * c), e, kept)
                       : _mm512_mul_ps(e, fac);
        if (!first) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(cols, dst + 16 * c));
        _mm512_mask_storeu_ps(dst + 16 * c, cols, x);
      }
    }
  }
}

}  // namespace

void weights_pack(const Problem& p, int64_t t0, int64_t t1, float* panels) {
  const int64_t stride = (p.Lk + kKeys - 1) / kKeys * p.d * kKeys;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.Hkv, hk = t % p.Hkv;
    pack_transposed(p.k + b * p.ks[0] + hk * p.ks[1], p.ks[2], p.lengths ? p.lengths[b] : p.Lk, p.d, p.scale,
                    panels + t * stride);
  }
}

void weights(const Problem& p, const float* panels, const float* lse, bool average, int64_t block, int64_t t0,
             int64_t t1, float* w) {
  const int64_t stride = (p.Lk + kKeys - 1) / kKeys * p.d * kKeys, nqb = (p.Lq + block - 1) / block;
  const int64_t heads = average ? 1 : p.Hq, group = p.Hq / p.Hkv;
  const float factor = average ? 1.f / static_cast<float>(p.Hq) : 1.f;
  std::vector<float> qstorage;
  float* qrows = mk::aligned(qstorage, block * p.d);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (heads * nqb), i0 = (t % nqb) * block, nq = std::min(block, p.Lq - i0);
    const int64_t h0 = average ? 0 : (t / nqb) % p.Hq, h1 = average ? p.Hq : h0 + 1;
    const int64_t valid = p.lengths ? p.lengths[b] : p.Lk;
    float* rows = w + ((b * heads + h0) * p.Lq + i0) * p.Lk;
    for (int64_t h = h0; h < h1; ++h) {
      const float* kpanels = panels + (b * p.Hkv + h / group) * stride;
      // The block's query rows copied together (a projection's rows sit 3 E floats apart; copy_rows).
      copy_rows(p.q + b * p.qs[0] + h * p.qs[1] + i0 * p.qs[2], p.qs[2], nq, p.d, qrows);
      for (int64_t r0 = i0; r0 < i0 + nq; r0 += kRows) {
        const int64_t mr = std::min<int64_t>(kRows, i0 + nq - r0);
        int64_t limit[kRows];
        const int64_t kend = visible_keys(p, valid, r0, mr, limit);
        float* wr = rows + (r0 - i0) * p.Lk;
        if (h == h0)  // keys no row of the group sees (every head sees the same keys)
          for (int64_t r = 0; r < mr; ++r) std::fill(wr + r * p.Lk + kend, wr + (r + 1) * p.Lk, 0.f);
        uint32_t drop_rows[kRows];
        dropout_rows(p.dropout, b, h, r0, mr, drop_rows);
        const float* row_lse = lse + (b * p.Hq + h) * p.Lq + r0;
        mk::with_rows(mr, [&](auto n) {
          weights_row_group<decltype(n)::value>(p, qrows + (r0 - i0) * p.d, p.d, kpanels, kend, limit, row_lse,
                                                drop_rows, mask_rows(p, b, h, r0), h == h0, factor, wr, p.Lk);
        });
      }
    }
    // A row with a NaN score (its logsumexp NaN, in any head when averaged) is NaN throughout, masked
    // keys included, as PyTorch's softmax gives.
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t r = 0; r < nq; ++r)
        if (std::isnan(lse[(b * p.Hq + h) * p.Lq + i0 + r]))
          std::fill(rows + r * p.Lk, rows + (r + 1) * p.Lk, std::numeric_limits<float>::quiet_NaN());
  }
}

// ---- float32 forward for few query rows per kv head: the rows are the lanes ----

namespace {

// In-register transpose of a 16 x 16 matrix of 32-bit elements: r[i] = row i in, column i out.
BM_AVX512 BM_ALWAYS_INLINE void transpose16x16_epi32(__m512i (&r)[16]) {
  __m512i a[16], b[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: pairs of rows interleaved
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // per lane: 4 x 4 blocks transposed; b[4 i + k] lane L = column 4 L + k
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // gather lane L of b[k], b[4 + k], b[8 + k], b[12 + k] into column 4 L + k
    const __m512i d0 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0x88), d1 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0xDD);
    const __m512i e0 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0x88);
    const __m512i e1 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0xDD);
    r[k] = _mm512_shuffle_i32x4(d0, e0, 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(d0, e0, 0xDD);
    r[4 + k] = _mm512_shuffle_i32x4(d1, e1, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(d1, e1, 0xDD);
  }
}

// The rows of one task: lane r is query row i_r of query head h_r; the kernel sees only their Q^T
// (scaled), the keys each may see, and where its output goes.
struct Lanes {
  int64_t n = 0;                       // active lanes (rows), <= kLanes
  alignas(64) int32_t limit[kLanes];   // keys lane r sees; 0 past n
  int64_t row[kLanes];                 // lane r's row in out / lse
  const float* mask[kLanes];           // lane r's additive mask row (keys contiguous); all nullptr without one
  alignas(64) uint32_t drop[kLanes];   // lane r's Dropout::row_key, with dropout
};

// mt[j][r] = the additive mask of lane r (its row at rows[r], r < n; 0 for the other lanes) at key
// j0 + j, for the block's nk keys: 16 keys of each row loaded as a vector, then transposed to one
// vector per key (the lanes kernel's and the bf16 forward's S^T layout).
BM_AVX512 void mask_block_t(const float* const* rows, int64_t n, int64_t j0, int64_t nk, float (*mt)[kLanes]) {
  for (int64_t j = 0; j < nk; j += 16) {
    const int64_t m = std::min<int64_t>(16, nk - j);
    const __mmask16 km = mk::lanes(m);
    __m512i t[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r)
      t[r] = r < n ? _mm512_castps_si512(_mm512_maskz_loadu_ps(km, rows[r] + j0 + j)) : _mm512_setzero_si512();
    transpose16x16_epi32(t);
    for (int64_t c = 0; c < m; ++c) _mm512_store_ps(mt[j + c], _mm512_castsi512_ps(t[c]));
  }
}

// st[j][r] = sum_c K[j, c] Q^T[c][r] for NK keys from k (rows at stride ldk): one FMA per key and head
// dim element serves all the lanes, and K is read in place (a broadcast per element). Narrow: only
// lanes 0-7 (at most 8 rows), in ymm registers, which Zen 4 runs at twice the zmm rate; the other
// lanes of st are left as they were.
template <int NK, bool kNarrow>
BM_AVX512 BM_ALWAYS_INLINE void scores_lanes(const float* k, int64_t ldk, int64_t d, const float (*qt)[kLanes],
                                             float (*st)[kLanes]) {
  if constexpr (kNarrow) {
    __m256 acc[NK];
#pragma GCC unroll 16
    for (int j = 0; j < NK; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; ++c) {
      const __m256 qv = _mm256_load_ps(qt[c]);
#pragma GCC unroll 16
      for (int j = 0; j < NK; ++j) acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(k[j * ldk + c]), qv, acc[j]);
    }
#pragma GCC unroll 16
    for (int j = 0; j < NK; ++j) _mm256_store_ps(st[j], acc[j]);
  } else {
    __m512 acc[NK];
#pragma GCC unroll 16
    for (int j = 0; j < NK; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; ++c) {
      const __m512 qv = _mm512_load_ps(qt[c]);
#pragma GCC unroll 16
      for (int j = 0; j < NK; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(k[j * ldk + c]), qv, acc[j]);
    }
#pragma GCC unroll 16
    for (int j = 0; j < NK; ++j) _mm512_store_ps(st[j], acc[j]);
  }
}

// S^T of keys [0, nk) of a block into st.
template <bool kNarrow>
BM_AVX512 void block_scores(const float* kb, int64_t ldk, int64_t nk, int64_t d, const float (*qt)[kLanes],
                            float (*st)[kLanes]) {
  int64_t j = 0;
  for (; j + 16 <= nk; j += 16) scores_lanes<16, kNarrow>(kb + j * ldk, ldk, d, qt, st + j);
  if (j + 8 <= nk) scores_lanes<8, kNarrow>(kb + j * ldk, ldk, d, qt, st + j), j += 8;
  if (j + 4 <= nk) scores_lanes<4, kNarrow>(kb + j * ldk, ldk, d, qt, st + j), j += 4;
  for (; j < nk; ++j) scores_lanes<1, kNarrow>(kb + j * ldk, ldk, d, qt, st + j);
}

// The online softmax of nk <= 64 keys from j0 held as S^T (st: one key per row, one lane per query
// row): masks keys lane r may not see (limit), updates the running max and sum, turns st into P^T and
// returns alpha, the factor for what was accumulated before. A NaN score never wins the max (vmaxps
// keeps its second operand), so its exp makes P, the sum and the row NaN, as in PyTorch.
BM_AVX512 __m512 softmax_lanes(float (*st)[kLanes], int64_t nk, int64_t j0, __m512i limit, bool full, __m512& m,
                               __m512& l) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mx = ninf;
  if (full) {
    for (int64_t j = 0; j < nk; ++j) mx = _mm512_max_ps(_mm512_load_ps(st[j]), mx);
  } else {
    for (int64_t j = 0; j < nk; ++j) {
      const __mmask16 seen = _mm512_cmpgt_epi32_mask(limit, _mm512_set1_epi32(int32_t(j0 + j)));
      const __m512 x = _mm512_mask_mov_ps(ninf, seen, _mm512_load_ps(st[j]));
      _mm512_store_ps(st[j], x);
      mx = _mm512_max_ps(x, mx);
    }
  }
  const __m512 m_new = _mm512_max_ps(mx, m);
  const __mmask16 live = _mm512_cmp_ps_mask(m_new, ninf, _CMP_NEQ_OQ);  // lanes with a key so far
  const __m512 shift = _mm512_maskz_mov_ps(live, m_new);
  // alpha = e^(m - m_new): 0 where m was -inf (nothing accumulated yet).
  const __m512 alpha = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, ninf, _CMP_NEQ_OQ),
                                           mk::exp_scaled_ps<1>(_mm512_sub_ps(m, shift)));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    const __m512 x = _mm512_load_ps(st[j]);
    // masked scores are -inf: exp_scaled_ps clamps them to e^-87, so they are zeroed by compare
    __m512 e = mk::exp_scaled_ps<1>(_mm512_sub_ps(x, shift));
    if (!full) e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
    _mm512_store_ps(st[j], e);
    sum = _mm512_add_ps(sum, e);
  }
  l = _mm512_fmadd_ps(l, alpha, sum);
  m = m_new;
  return alpha;
}

// o[r][..] = alpha[r] o[r][..] + sum over nk keys of P^T[j][r] V[j][..] for rows r0 .. r0 + MR and
// NV * 16 columns (o: rows at stride ldo, 64-byte aligned).
template <int MR, int NV>
BM_AVX512 void fold_lanes(float* o, int64_t ldo, const float* alpha, int r0, const float (*pt)[kLanes], int64_t nk,
                          const float* v, int64_t ldv) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r0 + r]);
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(o + (r0 + r) * ldo + 16 * c), a);
  }
  mk::tile_f32_rows<MR, NV>(pt[0] + r0, 1, nk, v, ldv, acc, kLanes);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_store_ps(o + (r0 + r) * ldo + 16 * c, acc[r][c]);
}

// Rows [0, n) of bf16 X (dim values, a multiple of 16, at stride ld) widened to float32 rows of dim.
BM_AVX512 void widen_rows(const uint16_t* x, int64_t ld, int64_t n, int64_t dim, float* dst) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < dim; c += 16) _mm512_storeu_ps(dst + j * dim + c, mk::load_bf16(x + j * ld + c, 0xFFFF));
}

inline float bf16_value(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Scratch of one worker: the output accumulator (kLanes rows of dv, padded to whole vectors), and for
// bf16 inputs the widened K and V rows of a 64-key block (for float32 V rows that are no whole vectors,
// V's rows padded with zeros).
struct LanesScratch {
  float* o;   // [kLanes][round16(dv)]
  float* kw;  // [kKeys][d]
  float* vw;  // [kKeys][round16(dv)]
};

// The lanes' rows against their kv head's keys and values (k, v at the problem's row strides). float32
// rows are read in place (V copied per block, padded, when dv is no multiple of 16); bf16 ones are
// widened a 64-key block at a time into L1 (the products and the softmax run in float32, P is not
// rounded, the output is rounded to bf16 once).
template <typename T>
BM_AVX512 void lanes_forward(const ProblemOf<T>& p, const Lanes& ln, const float (*qt)[kLanes], const T* k,
                             const T* v, const LanesScratch& w, T* out, float* lse) {
  constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
  alignas(64) float st[kKeys][kLanes] = {};  // zero: lanes 8-15 stay finite when only 0-7 are computed
  alignas(64) float mt[kKeys][kLanes];       // a block of the mask, transposed
  alignas(64) float alpha[kLanes];
  float* o = w.o;
  const int64_t ldo = round16(p.dv);
  const bool pad_v = ldo != p.dv;
  int64_t kend = 0, lim_min = std::numeric_limits<int64_t>::max();
  for (int64_t r = 0; r < ln.n; ++r) {
    kend = std::max<int64_t>(kend, ln.limit[r]);
    lim_min = std::min<int64_t>(lim_min, ln.limit[r]);
    std::fill(o + r * ldo, o + (r + 1) * ldo, 0.f);
  }
  const __m512i limv = _mm512_load_si512(ln.limit);
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), l = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < kend; j0 += kKeys) {
    const int64_t nk = std::min(kKeys, kend - j0);
    const float *kb, *vb;
    int64_t ldk, ldv;
    if constexpr (kBf16) {
      widen_rows(k + j0 * p.ks[2], p.ks[2], nk, p.d, w.kw);
      widen_rows(v + j0 * p.vs[2], p.vs[2], nk, p.dv, w.vw);
      kb = w.kw, ldk = p.d, vb = w.vw, ldv = p.dv;
    } else {
      kb = k + j0 * p.ks[2], ldk = p.ks[2], vb = v + j0 * p.vs[2], ldv = p.vs[2];
      if (pad_v) {
        copy_rows(vb, ldv, nk, p.dv, w.vw, ldo);
        vb = w.vw, ldv = ldo;
      }
    }
    if (ln.n <= 8)
      block_scores<true>(kb, ldk, nk, p.d, qt, st);
    else
      block_scores<false>(kb, ldk, nk, p.d, qt, st);
    if (p.mask) {
      mask_block_t(ln.mask, ln.n, j0, nk, mt);
      for (int64_t j = 0; j < nk; ++j)
        _mm512_store_ps(st[j], _mm512_add_ps(_mm512_load_ps(st[j]), _mm512_load_ps(mt[j])));
    }
    // A mask's -inf scores need the masked softmax, which zeroes them.
    const __m512 a = softmax_lanes(st, nk, j0, limv, j0 + nk <= lim_min && !p.mask, m, l);
    _mm512_store_ps(alpha, a);
    if (p.dropout.active()) {  // P V sees the kept probabilities scaled by 1 / (1 - p); l counted all
      const __m512i rows = _mm512_load_si512(ln.drop);
      const __m512 kept = _mm512_set1_ps(static_cast<float>(p.dropout.keep_scale()));
      for (int64_t j = 0; j < nk; ++j)
        _mm512_store_ps(st[j], _mm512_maskz_mul_ps(dropout_keep_rows(p.dropout, rows, j0 + j),
                                                   _mm512_load_ps(st[j]), kept));
    }
    for_each_column_chunk(ldo, [&](int64_t c0, auto nv) {  // 6 rows x 4 zmm accumulators at a time
      for (int r0 = 0; r0 < ln.n; r0 += kRows)
        mk::with_rows(ln.n - r0, [&](auto rows) {
          fold_lanes<decltype(rows)::value, decltype(nv)::value>(o + c0, ldo, alpha, r0, st, nk, vb + c0, ldv);
        });
    });
  }
  alignas(64) float ls[kLanes], ms[kLanes];
  _mm512_store_ps(ls, l);
  _mm512_store_ps(ms, m);
  for (int64_t r = 0; r < ln.n; ++r) {
    // 0 for a row without keys; a NaN row (unordered l) stays NaN
    const float inv = ls[r] != 0.f ? 1.f / ls[r] : 0.f;
    lse[ln.row[r]] = ls[r] != 0.f ? ms[r] + std::log(ls[r]) : -std::numeric_limits<float>::infinity();
    T* dst = out + ln.row[r] * p.dv;
    for (int64_t c = 0; c < p.dv; c += 16) {
      const __m512 x = _mm512_mul_ps(_mm512_load_ps(o + r * ldo + c), _mm512_set1_ps(inv));
      if constexpr (kBf16)
        mk::store_bf16_rne(dst + c, x, 0xFFFF);  // bf16: dv a multiple of 16
      else
        _mm512_mask_storeu_ps(dst + c, mk::lanes(p.dv - c), x);
    }
  }
}

template <typename T>
void lanes_tasks(const ProblemOf<T>& p, int64_t t0, int64_t t1, T* out, float* lse) {
  const int64_t group = p.Hq / p.Hkv, rows = group * p.Lq, chunks = (rows + kLanes - 1) / kLanes;
  alignas(64) float qt[kMaxDim][kLanes];
  std::vector<float> storage;
  constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
  const int64_t dvp = round16(p.dv), kw = kBf16 ? kKeys * p.d : 0, vw = kBf16 || dvp != p.dv ? kKeys * dvp : 0;
  float* base = mk::aligned(storage, kLanes * dvp + kw + vw);
  const LanesScratch w{base, base + kLanes * dvp, base + kLanes * dvp + kw};
  Lanes ln;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (p.Hkv * chunks), hk = (t / chunks) % p.Hkv, first = (t % chunks) * kLanes;
    const int64_t valid = p.lengths ? p.lengths[b] : p.Lk;
    ln.n = std::min<int64_t>(kLanes, rows - first);
    for (int64_t r = 0; r < kLanes; ++r) {
      if (r >= ln.n) {
        ln.limit[r] = 0;
        ln.mask[r] = nullptr;
        for (int64_t c = 0; c < p.d; ++c) qt[c][r] = 0.f;
        continue;
      }
      const int64_t h = hk * group + (first + r) / p.Lq, i = (first + r) % p.Lq;
      ln.limit[r] = int32_t(p.causal ? std::min(valid, i + 1) : valid);
      ln.row[r] = (b * p.Hq + h) * p.Lq + i;
      ln.mask[r] = mask_rows(p, b, h, i);
      ln.drop[r] = p.dropout.active() ? p.dropout.row_key(b, h, i) : 0;
      const T* q = p.q + b * p.qs[0] + h * p.qs[1] + i * p.qs[2];
      for (int64_t c = 0; c < p.d; ++c) {
        if constexpr (std::is_same_v<T, float>)
          qt[c][r] = p.scale * q[c];
        else
          qt[c][r] = p.scale * bf16_value(q[c]);
      }
    }
    lanes_forward<T>(p, ln, qt, p.k + b * p.ks[0] + hk * p.ks[1], p.v + b * p.vs[0] + hk * p.vs[1], w, out, lse);
  }
}

}  // namespace

void forward_lanes(const Problem& p, int64_t t0, int64_t t1, float* out, float* lse) {
  lanes_tasks<float>(p, t0, t1, out, lse);
}

void forward_lanes(const ProblemBf16& p, int64_t t0, int64_t t1, uint16_t* out, float* lse) {
  lanes_tasks<uint16_t>(p, t0, t1, out, lse);
}

// ---- backward ----

namespace {

constexpr int64_t kBwdRows = 48;  // query rows whose P and dS are kept for one dK / dV update

// The backward's query-row loop against the 64-key block from j0 (keys below valid), shared by the
// float32 and bf16 kernels: per block of at most kBwdRows rows i0 .. i0 + nq (causal: rows below j0 see
// none of these keys and are skipped), rows(i0, r0, mr, limit) for each group of at most kRows rows,
// limit[r] being the keys row r0 + r sees, then block(i0, nq) for the dK / dV update over them.
template <typename P, typename Rows, typename Block>
void for_each_backward_block(const P& p, int64_t valid, int64_t j0, const Rows& rows, const Block& block) {
  for (int64_t i0 = p.causal ? j0 : 0; i0 < p.Lq; i0 += kBwdRows) {
    const int64_t nq = std::min(kBwdRows, p.Lq - i0);
    for (int64_t r0 = i0; r0 < i0 + nq; r0 += kRows) {
      const int64_t mr = std::min<int64_t>(kRows, i0 + nq - r0);
      int64_t limit[kRows];
      visible_keys(p, valid, r0, mr, limit);
      rows(i0, r0, mr, limit);
    }
    block(i0, nq);
  }
}


// MR query rows against one 64-key block: P and dS (scaled) into pt / dst (rows of 64), then
// dQ[rows] += dS K_block. With dropout (drop_rows: the rows' Dropout::row_key), dS = P (Z dP - delta)
// and pt holds P Z, what the values saw (Z: 0 if dropped, 1 / (1 - p) if kept). mrow: the rows'
// additive mask (mask_rows) or nullptr.
template <int MR>
BM_AVX512 void bwd_rows(const Problem& p, const float* q, const float* go, int64_t ldgo, const float* lse,
                        const float* delta,
                        const float* kpan, const float* vpan, const float* kblock, int64_t j0, int64_t nk,
                        const int64_t* limit, const uint32_t* drop_rows, const float* mrow, float (*pt)[kKeys],
                        float (*dst)[kKeys], float* gq) {
  __m512 s[MR][4];
  mk::zero_tile<MR>(s);
  tile_keys<MR>(q, p.qs[2], p.d, kpan, nk, s);
  probabilities<MR>(s, 1.f, lse, limit, j0, pt, mrow, p.ms[2]);  // the panels hold scale K^T
  __m512 dp[MR][4];
  mk::zero_tile<MR>(dp);
  tile_keys<MR>(go, ldgo, p.dv, vpan, nk, dp);
  const __m512 sc = _mm512_set1_ps(p.scale);
  if (p.dropout.active()) {
    const __m512 kept = _mm512_set1_ps(static_cast<float>(p.dropout.keep_scale()));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 dl = _mm512_set1_ps(delta[r]);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __mmask16 keep = dropout_keep(p.dropout, drop_rows[r], j0 + 16 * c);
        const __m512 pv = _mm512_load_ps(pt[r] + 16 * c);
        const __m512 dpz = _mm512_maskz_mul_ps(keep, dp[r][c], kept);
        _mm512_store_ps(dst[r] + 16 * c, _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_sub_ps(dpz, dl)), sc));
        _mm512_store_ps(pt[r] + 16 * c, _mm512_maskz_mul_ps(keep, pv, kept));
      }
    }
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 dl = _mm512_set1_ps(delta[r]);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c)
        _mm512_store_ps(dst[r] + 16 * c,
                        _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(pt[r] + 16 * c), _mm512_sub_ps(dp[r][c], dl)), sc));
    }
  }
  for_each_column_chunk(p.d, [&](int64_t c0, auto nv) BM_AVX512 {
    constexpr int NV = decltype(nv)::value;
    __m512 acc[MR][NV];
    const __mmask16 last = last_lanes<NV>(p.d, c0);
    mk::load_tile(gq + c0, p.d, acc, last);
    mk::tile_f32_rows(dst[0], kKeys, nk, kblock + c0, p.ks[2], acc);  // K rows padded to whole vectors
    mk::store_tile(acc, gq + c0, p.d, last);
  });
}

// The scores' gradient (an additive mask's) of mr rows: dS, which dst holds times the scale, added to
// rows of nk keys at stride ld (0: all into one row, for a mask broadcast over rows).
BM_AVX512 void add_scores_grad(const float (*dst)[kKeys], int64_t mr, int64_t nk, float inv_scale, float* out,
                               int64_t ld) {
  const __m512 f = _mm512_set1_ps(inv_scale);
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t c = 0; c < nk; c += 16) {
      const __mmask16 m = mk::lanes(std::min<int64_t>(16, nk - c));
      float* o = out + r * ld + c;
      _mm512_mask_storeu_ps(o, m, _mm512_fmadd_ps(_mm512_load_ps(dst[r] + c), f, _mm512_maskz_loadu_ps(m, o)));
    }
}

// out[keys m0 .. m0 + MR][NV * 16] += A^T B over nq query rows: A = pt or dst (rows of 64, read
// transposed), B = dO or Q rows at stride ldb (padded to whole vectors); out's last vector holds the
// lanes `last`.
template <int MR, int NV>
BM_AVX512 void bwd_kv_tile(const float* a, int64_t m0, int64_t nq, const float* b, int64_t ldb, float* out,
                           int64_t ldo, __mmask16 last) {
  __m512 acc[MR][NV];
  mk::load_tile(out + m0 * ldo, ldo, acc, last);
  mk::tile_f32_rows<MR, NV>(a + m0, 1, nq, b, ldb, acc, kKeys);
  mk::store_tile(acc, out + m0 * ldo, ldo, last);
}

// out[keys 0 .. nk][cols] += A^T B over nq query rows, in tiles of up to kRows keys and 64 columns.
void bwd_kv(int64_t cols, const float* a, int64_t nk, int64_t nq, const float* b, int64_t ldb, float* out,
            int64_t ldo) {
  for_each_column_chunk(cols, [&](int64_t c0, auto vecs) BM_AVX512 {
    constexpr int NV = decltype(vecs)::value;
    const __mmask16 last = last_lanes<NV>(cols, c0);
    for (int64_t m0 = 0; m0 < nk; m0 += kRows)
      mk::with_rows(std::min<int64_t>(kRows, nk - m0), [&](auto rows) {
        bwd_kv_tile<decltype(rows)::value, NV>(a, m0, nq, b + c0, ldb, out + c0, ldo, last);
      });
  });
}

}  // namespace

void backward(const Problem& p, const Grads& g, int64_t t0, int64_t t1) {
  const int64_t group = p.Hq / p.Hkv, nkb = (p.Lk + kKeys - 1) / kKeys;
  // K, each query head's Q and (for dv no multiple of 16) dO, contiguous, rows padded to whole vectors:
  // they are the B operands of dQ, dK and dV (see copy_rows).
  const int64_t dp = round16(p.d), dvp = round16(p.dv);
  const bool pad_go = dvp != p.dv;
  std::vector<float> ks, vs, ps, ds, kr, qr, gr;
  float* kpanels = mk::aligned(ks, nkb * p.d * kKeys);
  float* krows = mk::aligned(kr, p.Lk * dp);
  float* qrows = mk::aligned(qr, group * p.Lq * dp);
  float* gorows = pad_go ? mk::aligned(gr, group * p.Lq * dvp) : nullptr;
  Problem pc = p;
  pc.ks[2] = dp;
  pc.qs[2] = dp;
  float* vpanels = mk::aligned(vs, nkb * p.dv * kKeys);
  float (*pt)[kKeys] = reinterpret_cast<float (*)[kKeys]>(mk::aligned(ps, kBwdRows * kKeys));
  float (*dst)[kKeys] = reinterpret_cast<float (*)[kKeys]>(mk::aligned(ds, kBwdRows * kKeys));
  for (int64_t t = t0; t < t1; ++t) {
    const KeySplit split{g.splits, t % g.splits};
    const int64_t b = t / g.splits / p.Hkv, hk = t / g.splits % p.Hkv;
    const int64_t valid = p.lengths ? p.lengths[b] : p.Lk;
    const float* kb = p.k + b * p.ks[0] + hk * p.ks[1];
    const float* vb = p.v + b * p.vs[0] + hk * p.vs[1];
    float* gqs = split.c == 0 ? g.gq : g.gq_parts + (split.c - 1) * p.B * p.Hq * p.Lq * p.d;
    for (int64_t j0 = 0; j0 < valid; j0 += kKeys) {  // the task's key blocks of K^T, V^T and K
      if (!split.owns(j0 / kKeys)) continue;
      const int64_t nk = std::min(kKeys, valid - j0);
      pack_transposed(kb + j0 * p.ks[2], p.ks[2], nk, p.d, p.scale, kpanels + (j0 / kKeys) * p.d * kKeys);
      pack_transposed(vb + j0 * p.vs[2], p.vs[2], nk, p.dv, 1.f, vpanels + (j0 / kKeys) * p.dv * kKeys);
      copy_rows(kb + j0 * p.ks[2], p.ks[2], nk, p.d, krows + j0 * dp, dp);
    }
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      copy_rows(p.q + b * p.qs[0] + h * p.qs[1], p.qs[2], p.Lq, p.d, qrows + (h - hk * group) * p.Lq * dp, dp);
      if (pad_go)
        copy_rows(g.grad_out + (b * p.Hq + h) * p.Lq * p.dv, p.dv, p.Lq, p.dv, gorows + (h - hk * group) * p.Lq * dvp,
                  dvp);
    }
    const int64_t ldgo = pad_go ? dvp : p.dv;
    float* gk = g.gk + (b * p.Hkv + hk) * p.Lk * p.d;
    float* gv = g.gv + (b * p.Hkv + hk) * p.Lk * p.dv;
    for (int64_t j0 = 0; j0 < valid; j0 += kKeys) {
      if (!split.owns(j0 / kKeys)) continue;
      const int64_t nk = std::min(kKeys, valid - j0);
      const float* kpan = kpanels + (j0 / kKeys) * p.d * kKeys;
      const float* vpan = vpanels + (j0 / kKeys) * p.dv * kKeys;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t row0 = (b * p.Hq + h) * p.Lq;
        const float* qh = qrows + (h - hk * group) * p.Lq * dp;
        const float* goh = pad_go ? gorows + (h - hk * group) * p.Lq * dvp : g.grad_out + row0 * p.dv;
        for_each_backward_block(
            p, valid, j0,
            [&](int64_t i0, int64_t r0, int64_t mr, const int64_t* limit) {
              const float* q = qh + r0 * dp;
              const float* go = goh + r0 * ldgo;
              float* gq = gqs + (row0 + r0) * p.d;
              float (*ptr)[kKeys] = pt + (r0 - i0);
              float (*dsr)[kKeys] = dst + (r0 - i0);
              uint32_t drop_rows[kRows];
              dropout_rows(p.dropout, b, h, r0, mr, drop_rows);
              mk::with_rows(mr, [&](auto rows) {
                bwd_rows<decltype(rows)::value>(pc, q, go, ldgo, g.lse + row0 + r0, g.delta + row0 + r0, kpan,
                                                vpan, krows + j0 * dp, j0, nk, limit, drop_rows,
                                                mask_rows(p, b, h, r0), ptr, dsr, gq);
              });
              if (g.gmask) {
                const int64_t* gs = g.gmask_strides;
                add_scores_grad(dsr, mr, nk, 1.f / p.scale, g.gmask + b * gs[0] + h * gs[1] + r0 * gs[2] + j0, gs[2]);
              }
            },
            [&](int64_t i0, int64_t nq) {  // dV[block] += P^T dO, dK[block] += dS^T Q over these rows
              bwd_kv(p.dv, pt[0], nk, nq, goh + i0 * ldgo, ldgo, gv + j0 * p.dv, p.dv);
              bwd_kv(p.d, dst[0], nk, nq, qh + i0 * dp, dp, gk + j0 * p.d, p.d);
            });
      }
    }
  }
}


// ---- bfloat16 forward on AMX (or, without AMX, on vdpbf16ps in the same layouts) ----

namespace {

// The bf16 forward works transposed: S^T = K Q^T and O^T = V^T P^T. A tile of S^T holds 16 keys x 16
// query rows, so a zmm register is one key's scores for the 16 rows of a block, and the whole online
// softmax - row max, exp, row sum, rescale - is vertical (no horizontal reduction, no scalar exp per
// row). K is read as the A operand row by row as it is; Q^T (16 rows, once per block) and P^T go
// into B tiles in the VNNI layout ([k pairs][16 columns][2]), and V^T (once per kv head) is the A
// operand of O^T. O^T is folded in vector registers: one FMA per dv row rescales all 16 query rows.

// K rows [0, n) of one head into kbuf ([ceil(n/64) * 64][d], zero past n): A tiles read 16 rows at a
// time, so the padding keeps them inside the buffer.
void copy_keys(const uint16_t* k, int64_t ld, int64_t n, int64_t d, uint16_t* kbuf) {
  const int64_t rows = (n + kKeys - 1) / kKeys * kKeys;
  for (int64_t j = 0; j < n; ++j) std::memcpy(kbuf + j * d, k + j * ld, d * sizeof(uint16_t));
  std::fill(kbuf + n * d, kbuf + rows * d, uint16_t(0));
}

// V rows [0, n) of one head as V^T: vt[c][j] = v[j][c], rows of ldv = ceil(n/64) * 64 keys, zero past n.
// Blocks of 16 keys x 32 columns go through a 32-bit transpose (a word holds columns 2w, 2w + 1);
// each transposed word vector then splits into its even and odd columns.
BM_AVX512 void transpose_values(const uint16_t* v, int64_t ld, int64_t n, int64_t dv, int64_t ldv, uint16_t* vt) {
  const int64_t n16 = (n + 15) / 16 * 16;
  for (int64_t c = 0; c < dv; ++c) std::fill(vt + c * ldv + n16, vt + (c + 1) * ldv, uint16_t(0));
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    for (int64_t c0 = 0; c0 < dv; c0 += 32) {
      const int64_t words = std::min<int64_t>(16, (dv - c0) / 2);
      const __mmask16 wm = mk::lanes(words);
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < n ? _mm512_maskz_loadu_epi32(wm, v + (j0 + i) * ld + c0) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      for (int64_t w = 0; w < words; ++w) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vt + (c0 + 2 * w) * ldv + j0), _mm512_cvtepi32_epi16(r[w]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vt + (c0 + 2 * w + 1) * ldv + j0),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(r[w], 16)));
      }
    }
  }
}

// Q rows (mr of them, the rest zero) as the B operand of S^T = K Q^T: qt[c / 2][r][c % 2] = q[r][c],
// i.e. word (pair w, row r) = the 32-bit word w of row r.
void transpose_queries(const uint16_t* q, int64_t ld, int64_t mr, int64_t d, uint32_t* qt) {
  const int64_t words = d / 2;
  std::fill(qt, qt + words * 16, 0u);
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t w = 0; w < words; ++w) std::memcpy(qt + w * 16 + r, q + r * ld + 2 * w, sizeof(uint32_t));
}

// S^T for keys [j0, j0 + 64) against the block's rows: four 16 x 16 tiles into st[64][16].
BM_AMX void amx_scores_t(const uint16_t* kbuf, int64_t d, const uint32_t* qt, int64_t j0, float (*st)[16]) {
  mk::amx_zero();
  for (int64_t c = 0; c < d; c += 32) {
    _tile_loadd(5, qt + (c / 2) * 16, 64);
    _tile_loadd(4, kbuf + j0 * d + c, 2 * d);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(4, kbuf + (j0 + 16) * d + c, 2 * d);
    _tile_dpbf16ps(1, 4, 5);
    _tile_loadd(4, kbuf + (j0 + 32) * d + c, 2 * d);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(4, kbuf + (j0 + 48) * d + c, 2 * d);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, st[0], 64);  // tile numbers are immediates: no loop
  _tile_stored(1, st[16], 64);
  _tile_stored(2, st[32], 64);
  _tile_stored(3, st[48], 64);
}

// (P V)^T of keys [j0, j0 + 64): pt holds P^T in VNNI pairs ([32 key pairs][16 rows]); tiles of 16 dv
// rows x 16 query rows into ot[dv][16].
BM_AMX void amx_values_t(const uint16_t* vt, int64_t ldv, int nvt, const uint32_t* pt, int64_t j0, float (*ot)[16]) {
  mk::amx_zero();
  for (int64_t kc = 0; kc < 2; ++kc) {  // 64 keys: two chunks of 32
    _tile_loadd(5, pt + kc * 16 * 16, 64);
    const uint16_t* a = vt + j0 + 32 * kc;
    _tile_loadd(4, a, 2 * ldv);
    _tile_dpbf16ps(0, 4, 5);
    if (nvt > 1) {
      _tile_loadd(4, a + 16 * ldv, 2 * ldv);
      _tile_dpbf16ps(1, 4, 5);
    }
    if (nvt > 2) {
      _tile_loadd(4, a + 32 * ldv, 2 * ldv);
      _tile_dpbf16ps(2, 4, 5);
    }
    if (nvt > 3) {
      _tile_loadd(4, a + 48 * ldv, 2 * ldv);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, ot[0], 64);
  if (nvt > 1) _tile_stored(1, ot[16], 64);
  if (nvt > 2) _tile_stored(2, ot[32], 64);
  if (nvt > 3) _tile_stored(3, ot[48], 64);
}

// The same two products on vdpbf16ps (AVX512-BF16 without AMX, where it pays), into the same
// buffers: a zmm accumulates one key's scores (S^T) or one dv row (O^T) for the block's 16 query rows,
// the other operand broadcast one 32-bit bf16 pair at a time.
BM_AVX512_BF16 BM_ALWAYS_INLINE __m512bh pair_at(const uint16_t* p) {
  int32_t w;
  std::memcpy(&w, p, sizeof(w));
  return (__m512bh)_mm512_set1_epi32(w);
}

// out[i][r] = sum over kp < K2 of the pair A[i, 2 kp .. 2 kp + 1] (rows of A at stride lda) times the
// pair b[kp][r], for i < rows (a multiple of 8): Sᵀ = K Qᵀ with A = the block's keys and b = Qᵀ, and
// Oᵀ = Vᵀ Pᵀ with A = Vᵀ from the block's first key and b = Pᵀ.
BM_AVX512_BF16 void dot_t(const uint16_t* a, int64_t lda, int64_t rows, const uint32_t* b, int64_t K2,
                          float (*out)[16]) {
  for (int64_t i0 = 0; i0 < rows; i0 += 8) {
    const uint16_t* ai = a + i0 * lda;
    __m512 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t kp = 0; kp < K2; ++kp) {
      const __m512bh bv = (__m512bh)_mm512_load_si512(b + kp * 16);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], pair_at(ai + i * lda + 2 * kp), bv);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) _mm512_store_ps(out[i0 + i], acc[i]);
  }
}

struct SoftmaxState {
  __m512 m, l;  // running max (scaled scores) and sum, one lane per query row
};

// The online softmax of one S^T block (64 keys from j0; lanes = query rows, lane r sees keys below
// limit[r]): updates the state, writes P^T as bf16 VNNI pairs into pt and returns alpha, the factor
// that rescales what was accumulated before this block.
// mt: the block's additive mask, transposed like st (mask_block_t), or nullptr. drop: dropout (the
// lanes' Dropout::row_key in rows), or nullptr: P^T's kept entries times 1 / (1 - p), the others 0,
// after the sum (the normalizer counts every probability).
BM_AMX __m512 softmax_block_t(const float (*st)[16], const float (*mt)[16], int64_t j0, __m512 scale, __m512i limit,
                              bool full, SoftmaxState& s, uint32_t* pt, const Dropout* drop = nullptr,
                              __m512i rows = _mm512_setzero_si512()) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) float sv[kKeys][16];
  __mmask16 valid[kKeys];
  __m512 mx = ninf;
  for (int j = 0; j < kKeys; ++j) {
    valid[j] = full ? __mmask16(0xFFFF) : _mm512_cmpgt_epi32_mask(limit, _mm512_set1_epi32(int32_t(j0 + j)));
    const __m512 sc = mt ? _mm512_fmadd_ps(_mm512_load_ps(st[j]), scale, _mm512_load_ps(mt[j]))
                         : _mm512_mul_ps(_mm512_load_ps(st[j]), scale);
    if (mt) valid[j] &= _mm512_cmp_ps_mask(sc, ninf, _CMP_NEQ_UQ);  // the mask's -inf: a key not seen
    const __m512 x = _mm512_mask_mov_ps(ninf, valid[j], sc);
    _mm512_store_ps(sv[j], x);
    mx = _mm512_max_ps(mx, x);
  }
  const __m512 m_new = _mm512_max_ps(s.m, mx);
  const __mmask16 live = _mm512_cmp_ps_mask(m_new, ninf, _CMP_NEQ_OQ);  // rows with a key so far
  const __m512 shift = _mm512_mask_mov_ps(_mm512_setzero_ps(), live, m_new);
  // alpha = e^(m - m_new): 0 where m was -inf (nothing accumulated), 1 where the row has no key yet.
  const __m512 alpha =
      _mm512_mask_mov_ps(_mm512_set1_ps(1.f), live, mk::exp_scaled_ps<1>(_mm512_sub_ps(s.m, shift)));
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < kKeys; j += 2) {
    __m512 e0 = _mm512_maskz_mov_ps(valid[j], mk::exp_scaled_ps<1>(_mm512_sub_ps(_mm512_load_ps(sv[j]), shift)));
    __m512 e1 =
        _mm512_maskz_mov_ps(valid[j + 1], mk::exp_scaled_ps<1>(_mm512_sub_ps(_mm512_load_ps(sv[j + 1]), shift)));
    sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
    if (drop) {
      const __m512 kept = _mm512_set1_ps(static_cast<float>(drop->keep_scale()));
      e0 = _mm512_maskz_mul_ps(dropout_keep_rows(*drop, rows, j0 + j), e0, kept);
      e1 = _mm512_maskz_mul_ps(dropout_keep_rows(*drop, rows, j0 + j + 1), e1, kept);
    }
    _mm512_store_si512(pt + (j / 2) * 16, mk::bf16_pairs(e0, e1));
  }
  s.l = _mm512_fmadd_ps(s.l, alpha, sum);
  s.m = m_new;
  return alpha;
}

// ot_acc = ot_acc * alpha + ot for dv rows.
BM_AVX512 void fold_t(float (*acc)[16], const float (*ot)[16], __m512 alpha, int64_t dv) {
  for (int64_t c = 0; c < dv; ++c)
    _mm512_store_ps(acc[c], _mm512_fmadd_ps(_mm512_load_ps(acc[c]), alpha, _mm512_load_ps(ot[c])));
}

// One block of mr <= 16 query rows against keys [0, kend). Software-pipelined: S^T of the next key
// block is computed between the softmax that writes P^T and the tile load that reads it (a tile load
// of just-stored data waits for the stores to drain), and each block's (P V)^T is folded one step
// later, after the next softmax, for the same reason.
// kAmx: the products on AMX tiles, else on vdpbf16ps (the pipelining then only orders the work).
// mrows: the rows' additive mask rows (r < mr), or nullptr without a mask. drop_rows: with dropout (on
// vdpbf16ps only; the AMX callers pass none), the rows' Dropout::row_key (16 lanes).
template <bool kAmx>
BM_AMX void amx_row_block(const ProblemBf16& p, const uint32_t* qt, int64_t mr, const int64_t* limit, int64_t kend,
                          const uint16_t* kbuf, const uint16_t* vt, int64_t ldv, const float* const* mrows,
                          uint16_t* out, float* lse, const uint32_t* drop_rows = nullptr) {
  const auto scores = [&](int64_t j0, float (*st)[16]) {
    if constexpr (kAmx)
      amx_scores_t(kbuf, p.d, qt, j0, st);
    else
      dot_t(kbuf + j0 * p.d, p.d, kKeys, qt, p.d / 2, st);
  };
  alignas(64) float st[2][kKeys][16];
  alignas(64) float mt[kKeys][16];
  alignas(64) float ot[kMaxDim][16];
  alignas(64) float acc[kMaxDim][16];
  alignas(64) uint32_t pt[kKeys / 2][16];
  alignas(64) int32_t lim[16];
  int64_t lim_min = kend;
  for (int r = 0; r < 16; ++r) {
    lim[r] = r < mr ? int32_t(limit[r]) : 0;
    if (r < mr) lim_min = std::min(lim_min, limit[r]);
  }
  const __m512i limv = _mm512_load_si512(lim);
  const int nvt = int(p.dv / 16);
  for (int64_t c = 0; c < p.dv; ++c) _mm512_store_ps(acc[c], _mm512_setzero_ps());
  SoftmaxState s{_mm512_set1_ps(-std::numeric_limits<float>::infinity()), _mm512_setzero_ps()};
  const __m512 scale = _mm512_set1_ps(p.scale);
  __m512 alpha_pending = _mm512_setzero_ps();
  if (kend > 0) scores(0, st[0]);
  for (int64_t j0 = 0, it = 0; j0 < kend; j0 += kKeys, ++it) {
    const bool full = j0 + kKeys <= lim_min;
    if (mrows) mask_block_t(mrows, mr, j0, std::min(kKeys, kend - j0), mt);
    const __m512 alpha =
        drop_rows ? softmax_block_t(st[it & 1], mrows ? mt : nullptr, j0, scale, limv, full, s, pt[0], &p.dropout,
                                    _mm512_loadu_si512(drop_rows))
                  : softmax_block_t(st[it & 1], mrows ? mt : nullptr, j0, scale, limv, full, s, pt[0]);
    if (j0 + kKeys < kend) scores(j0 + kKeys, st[(it + 1) & 1]);
    if (it > 0) fold_t(acc, ot, alpha_pending, p.dv);
    if constexpr (kAmx)
      amx_values_t(vt, ldv, nvt, pt[0], j0, ot);
    else
      dot_t(vt + j0, ldv, p.dv, pt[0], kKeys / 2, ot);
    alpha_pending = alpha;
  }
  if (kend > 0) fold_t(acc, ot, alpha_pending, p.dv);
  alignas(64) float l[16], m[16];
  _mm512_store_ps(l, s.l);
  _mm512_store_ps(m, s.m);
  // out[r][c] = acc[c][r] / l[r]: the accumulator is O^T, transposed back 16 columns at a time.
  // 0 for rows without keys; NaN rows (unordered) stay NaN
  const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(s.l, _mm512_setzero_ps(), _CMP_NEQ_UQ),
                                         _mm512_set1_ps(1.f), s.l);
  for (int64_t c0 = 0; c0 < p.dv; c0 += 16) {
    __m512i t[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) t[i] = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(acc[c0 + i]), inv));
    transpose16x16_epi32(t);
    for (int64_t r = 0; r < mr; ++r) mk::store_bf16(out + r * p.dv + c0, _mm512_castsi512_ps(t[r]), 0xFFFF);
  }
  for (int64_t r = 0; r < mr; ++r)
    lse[r] = l[r] != 0.f ? m[r] + std::log(l[r]) : -std::numeric_limits<float>::infinity();
}

template <bool kAmx>
BM_AMX void forward_bf16_tasks(const ProblemBf16& p, int64_t t0, int64_t t1, uint16_t* out, float* lse) {
  const int64_t ldv = (p.Lk + kKeys - 1) / kKeys * kKeys;
  std::vector<uint16_t> ks, vs;
  uint16_t* kbuf = mk::aligned(ks, ldv * p.d);
  uint16_t* vt = mk::aligned(vs, p.dv * ldv);
  alignas(64) uint32_t qt[kMaxDim / 2 * 16];
  if constexpr (kAmx) mk::amx_configure();
  for_each_forward_task<16>(
      p, t0, t1, kBlockQAmx,
      [&](int64_t b, int64_t hk, int64_t valid) {
        copy_keys(p.k + b * p.ks[0] + hk * p.ks[1], p.ks[2], valid, p.d, kbuf);
        transpose_values(p.v + b * p.vs[0] + hk * p.vs[1], p.vs[2], valid, p.dv, ldv, vt);
      },
      [&](int64_t b, int64_t h, int64_t r0, int64_t mr, const int64_t* limit, int64_t kend) {
        const int64_t row = (b * p.Hq + h) * p.Lq + r0;
        transpose_queries(p.q + b * p.qs[0] + h * p.qs[1] + r0 * p.qs[2], p.qs[2], mr, p.d, qt);
        const float* mrows[16];
        if (p.mask)
          for (int64_t r = 0; r < mr; ++r) mrows[r] = mask_rows(p, b, h, r0 + r);
        alignas(64) uint32_t drop[16] = {};
        if (p.dropout.active())
          for (int64_t r = 0; r < mr; ++r) drop[r] = p.dropout.row_key(b, h, r0 + r);
        amx_row_block<kAmx>(p, qt, mr, limit, kend, kbuf, vt, ldv, p.mask ? mrows : nullptr, out + row * p.dv,
                            lse + row, p.dropout.active() ? drop : nullptr);
      });
  if constexpr (kAmx) _tile_release();
}


// ---- bfloat16 backward on vdpbf16ps ----
//
// The float32 backward's loop (per kv head, 64-key block, 48 query rows, 6-row groups) with every
// product on bf16 pairs. Operand layouts, all zero-padded past the valid rows:
//   S = Q K^T     A: Q rows as they are (pairs along d)      B: K^T panel [d/2][64 keys] words
//   dP = dO V^T   A: dO rows                                 B: V^T panel [dv/2][64 keys] words
//   dQ += dS K    A: dS rows in bf16 (pairs of keys)          B: K rows in key pairs [32][d] words
//   dV += P^T dO  A: P^T, query-row pairs per key [24][64]   B: dO rows in row pairs [Lq/2][dv] words
//   dK += dS^T Q  A: dS^T likewise                           B: Q rows in row pairs [Lq/2][d] words
// P and dS are computed in float32 from float32 S and dP. P (>= 0) is rounded to bf16 where it
// multiplies. dS is not: its rows sum to zero, so dQ and dK are sums that cancel, and rounding each
// term to bf16 gave up to 3.6x PyTorch's error on them; dS runs as two bf16 terms, hi = bf16(dS) and
// lo = bf16(dS - hi) (16 significant bits), each product twice.

// x rounded to bf16 and back (the part of x a bf16 holds).
BM_AVX512_BF16 BM_ALWAYS_INLINE __m512 bf16_hi(__m512 x) {
  const __m256bh b = _mm512_cvtneps_pbh(x);
  __m256i bits;
  std::memcpy(&bits, &b, sizeof(bits));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Word w of row j (2 bf16 at row j, columns 2w, 2w + 1) of rows [0, n) into panels [ceil(n/64)][dim/2][64]:
// K^T and V^T as B operands over the head dim, keys as columns.
void pair_panels(const uint16_t* x, int64_t ld, int64_t n, int64_t dim, uint32_t* panels) {
  const int64_t words = dim / 2, nb = (n + kKeys - 1) / kKeys;
  std::fill(panels, panels + nb * words * kKeys, 0u);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t w = 0; w < words; ++w)
      std::memcpy(panels + ((j / kKeys) * words + w) * kKeys + j % kKeys, x + j * ld + 2 * w, sizeof(uint32_t));
}

// Rows [0, n) of X (dim bf16 at stride ld) with consecutive rows paired: out word (j, c) = (X[2j][c],
// X[2j + 1][c]) for j < pairs, zero past n. The B operand with rows as k.
BM_AVX512 void pair_rows(const uint16_t* x, int64_t ld, int64_t n, int64_t pairs, int64_t dim, uint32_t* out) {
  for (int64_t j = 0; j < pairs; ++j)
    for (int64_t c = 0; c < dim; c += 16) {
      const __mmask16 m = mk::lanes(dim - c);
      const __m256i lo = _mm256_maskz_loadu_epi16(2 * j < n ? m : __mmask16(0), x + 2 * j * ld + c);
      const __m256i hi = _mm256_maskz_loadu_epi16(2 * j + 1 < n ? m : __mmask16(0), x + (2 * j + 1) * ld + c);
      const __m512i wv = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      _mm512_mask_storeu_epi32(out + j * dim + c, m, wv);
    }
}

// MR query rows (r0 - i0 even) against one 64-key block: P and dS in float32 from bf16 products; P^T
// and dS^T (hi and lo) as query-row pairs into ptp / dstp / dstp_lo (the 48-row block's, word (pair,
// key)); dQ += dS K. mrow: the rows' additive mask rows (mask_rows) or nullptr.
template <int MR>
BM_AVX512_BF16 void bwd_rows_bf16(const ProblemBf16& p, const uint16_t* q, const uint16_t* go, const float* lse,
                                  const float* delta, const uint16_t* kpan, const uint16_t* vpan,
                                  const uint16_t* kpairs, int64_t j0, int64_t nk, const int64_t* limit,
                                  const float* mrow, const uint32_t* drop_rows, uint32_t* ptp, uint32_t* dstp,
                                  uint32_t* dstp_lo, float* gq) {
  alignas(64) float pf[MR + 1][kKeys];   // P, float32; row MR: zero, an odd last row's partner
  alignas(64) float dsf[MR + 1][kKeys];  // dS, float32 (then its hi part)
  alignas(64) float dsl[MR + 1][kKeys];  // dS - hi
  alignas(64) uint16_t dsb[2][MR][kKeys];  // hi and lo in bf16, the A operands of dQ
  __m512 s[MR][4];
  mk::zero_tile<MR>(s);
  tile_keys_bf16<MR>(q, p.d, p.d / 2, kpan, nk, s);
  probabilities<MR>(s, p.scale, lse, limit, j0, pf, mrow, p.ms[2]);
  const __m512 sc = _mm512_set1_ps(p.scale);
  __m512 dp[MR][4];
  mk::zero_tile<MR>(dp);
  tile_keys_bf16<MR>(go, p.dv, p.dv / 2, vpan, nk, dp);
  const __m512 kept = _mm512_set1_ps(static_cast<float>(p.dropout.keep_scale()));
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 dl = _mm512_set1_ps(delta[r]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512 pv = _mm512_load_ps(pf[r] + 16 * c);
      __m512 dpz = dp[r][c];
      if (drop_rows) {  // dS = P (Z dP - delta); pf keeps P Z, what the values saw
        const __mmask16 keep = dropout_keep(p.dropout, drop_rows[r], j0 + 16 * c);
        dpz = _mm512_maskz_mul_ps(keep, dpz, kept);
        _mm512_store_ps(pf[r] + 16 * c, _mm512_maskz_mul_ps(keep, pv, kept));
      }
      const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_sub_ps(dpz, dl)), sc);
      const __m512 hi = bf16_hi(ds), lo = _mm512_sub_ps(ds, hi);
      _mm512_store_ps(dsf[r] + 16 * c, hi);
      _mm512_store_ps(dsl[r] + 16 * c, lo);
      mk::store_bf16(dsb[0][r] + 16 * c, hi, 0xFFFF);
      mk::store_bf16(dsb[1][r] + 16 * c, lo, 0xFFFF);
    }
  }
  if constexpr (MR % 2 == 1) {  // the last row's partner in the row pairs below
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      _mm512_store_ps(pf[MR] + 16 * c, _mm512_setzero_ps());
      _mm512_store_ps(dsf[MR] + 16 * c, _mm512_setzero_ps());
      _mm512_store_ps(dsl[MR] + 16 * c, _mm512_setzero_ps());
    }
  }
  for (int r = 0; r < MR; r += 2)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      _mm512_store_si512(ptp + (r / 2) * kKeys + 16 * c,
                         mk::bf16_pairs(_mm512_load_ps(pf[r] + 16 * c), _mm512_load_ps(pf[r + 1] + 16 * c)));
      _mm512_store_si512(dstp + (r / 2) * kKeys + 16 * c,
                         mk::bf16_pairs(_mm512_load_ps(dsf[r] + 16 * c), _mm512_load_ps(dsf[r + 1] + 16 * c)));
      _mm512_store_si512(dstp_lo + (r / 2) * kKeys + 16 * c,
                         mk::bf16_pairs(_mm512_load_ps(dsl[r] + 16 * c), _mm512_load_ps(dsl[r + 1] + 16 * c)));
    }
  for_each_column_chunk(p.d, [&](int64_t c0, auto nv) BM_AVX512_BF16 {
    __m512 acc[MR][decltype(nv)::value];
    mk::load_tile(gq + c0, p.d, acc);
    for (int part = 0; part < 2; ++part)
      mk::tile_bf16_rows(dsb[part][0], kKeys, (nk + 1) / 2, kpairs + 2 * c0, 2 * p.d, acc);
    mk::store_tile(acc, gq + c0, p.d);
  });
}

// delta[r] = sum over c < dv of dO[r][c] O[r][c] for rows [0, n) (bf16 rows of dv, float32 sums).
BM_AVX512 void row_dots(const uint16_t* go, const uint16_t* o, int64_t n, int64_t dv, float* delta) {
  for (int64_t r = 0; r < n; ++r) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < dv; c += 16) {
      const __mmask16 m = mk::lanes(dv - c);
      acc = _mm512_fmadd_ps(mk::load_bf16(go + r * dv + c, m), mk::load_bf16(o + r * dv + c, m), acc);
    }
    delta[r] = _mm512_reduce_add_ps(acc);
  }
}

// n float32 values rounded to bf16 (n a multiple of 16).
BM_AVX512_BF16 void round_to_bf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; i += 16) mk::store_bf16(dst + i, _mm512_load_ps(src + i), 0xFFFF);
}

// out[keys m0 .. m0 + MR][NV * 16] += A^T B over the block's query-row pairs: A = ptp or dstp (word
// (pair, key)), B = dO or Q rows in row pairs (rows of ldb words).
template <int MR, int NV>
BM_AVX512_BF16 void bwd_kv_tile_bf16(const uint32_t* a, int64_t m0, int64_t pairs, const uint32_t* b, int64_t ldb,
                                     float* out, int64_t ldo) {
  __m512 acc[MR][NV];
  float* o = out + m0 * ldo;
  mk::load_tile(o, ldo, acc);
  mk::tile_bf16_rows<MR, NV>(reinterpret_cast<const uint16_t*>(a + m0), 2, pairs,
                             reinterpret_cast<const uint16_t*>(b), 2 * ldb, acc, 2 * kKeys);
  mk::store_tile(acc, o, ldo);
}

void bwd_kv_bf16(int64_t cols, const uint32_t* a, int64_t nk, int64_t pairs, const uint32_t* b, int64_t ldb,
                 float* out, int64_t ldo) {
  for_each_column_chunk(cols, [&](int64_t c0, auto vecs) {
    for (int64_t m0 = 0; m0 < nk; m0 += kRows)
      mk::with_rows(std::min<int64_t>(kRows, nk - m0), [&](auto rows) {
        bwd_kv_tile_bf16<decltype(rows)::value, decltype(vecs)::value>(a, m0, pairs, b + c0, ldb, out + c0, ldo);
      });
  });
}

}  // namespace

void forward_amx(const ProblemBf16& p, int64_t t0, int64_t t1, uint16_t* out, float* lse) {
  forward_bf16_tasks<true>(p, t0, t1, out, lse);
}

void forward_bf16_dot(const ProblemBf16& p, int64_t t0, int64_t t1, uint16_t* out, float* lse) {
  forward_bf16_tasks<false>(p, t0, t1, out, lse);
}

void backward_bf16_dot(const ProblemBf16& p, const GradsBf16& g, int64_t t0, int64_t t1) {
  const int64_t group = p.Hq / p.Hkv, nkb = (p.Lk + kKeys - 1) / kKeys;
  const int64_t qpairs = (p.Lq + 1) / 2, kpairs_n = nkb * kKeys / 2;
  std::vector<uint32_t> kp_s, vp_s, kr_s, qp_s, dop_s, pt_s, ds_s, dl_s;
  std::vector<uint16_t> qr_s;
  uint32_t* kpanels = mk::aligned(kp_s, nkb * (p.d / 2) * kKeys);
  uint32_t* vpanels = mk::aligned(vp_s, nkb * (p.dv / 2) * kKeys);
  uint32_t* kpairs = mk::aligned(kr_s, kpairs_n * p.d);
  uint16_t* qrows = mk::aligned(qr_s, group * p.Lq * p.d);  // each query head's Q, contiguous
  uint32_t* qp = mk::aligned(qp_s, group * qpairs * p.d);
  uint32_t* dop = mk::aligned(dop_s, group * qpairs * p.dv);
  uint32_t* ptp = mk::aligned(pt_s, (kBwdRows / 2) * kKeys);
  uint32_t* dstp = mk::aligned(ds_s, (kBwdRows / 2) * kKeys);
  uint32_t* dstp_lo = mk::aligned(dl_s, (kBwdRows / 2) * kKeys);
  // The task's gradients in float32 (its query heads' dQ, its dK and dV), rounded once at the end.
  std::vector<float> gq_s, gk_s, gv_s, dl_f;
  float* gq_task = g.splits > 1 ? nullptr : mk::aligned(gq_s, group * p.Lq * p.d);
  float* gka = mk::aligned(gk_s, p.Lk * p.d);
  float* gva = mk::aligned(gv_s, p.Lk * p.dv);
  float* delta = mk::aligned(dl_f, group * p.Lq);
  for (int64_t t = t0; t < t1; ++t) {
    const KeySplit split{g.splits, t % g.splits};
    const int64_t b = t / g.splits / p.Hkv, hk = t / g.splits % p.Hkv;
    const int64_t valid = p.lengths ? p.lengths[b] : p.Lk;
    // dQ of the task's query heads: its own (rounded at the end), or its split's float32 part
    float* gqa = gq_task ? gq_task
                         : g.gq_parts + ((split.c * p.B + b) * p.Hq + hk * group) * p.Lq * p.d;
    const uint16_t* kb = p.k + b * p.ks[0] + hk * p.ks[1];
    pair_panels(kb, p.ks[2], valid, p.d, kpanels);
    pair_panels(p.v + b * p.vs[0] + hk * p.vs[1], p.vs[2], valid, p.dv, vpanels);
    pair_rows(kb, p.ks[2], valid, kpairs_n, p.d, kpairs);
    for (int64_t i = 0; i < group; ++i) {
      const int64_t h = hk * group + i;
      const uint16_t* qh = p.q + b * p.qs[0] + h * p.qs[1];
      uint16_t* qr = qrows + i * p.Lq * p.d;
      copy_rows(qh, p.qs[2], p.Lq, p.d, qr);
      pair_rows(qr, p.d, p.Lq, qpairs, p.d, qp + i * qpairs * p.d);
      const uint16_t* goh = g.grad_out + (b * p.Hq + h) * p.Lq * p.dv;
      pair_rows(goh, p.dv, p.Lq, qpairs, p.dv, dop + i * qpairs * p.dv);
      row_dots(goh, g.out + (b * p.Hq + h) * p.Lq * p.dv, p.Lq, p.dv, delta + i * p.Lq);
    }
    std::fill(gqa, gqa + group * p.Lq * p.d, 0.f);
    std::fill(gka, gka + p.Lk * p.d, 0.f);
    std::fill(gva, gva + p.Lk * p.dv, 0.f);
    for (int64_t j0 = 0; j0 < valid; j0 += kKeys) {
      if (!split.owns(j0 / kKeys)) continue;
      const int64_t nk = std::min(kKeys, valid - j0);
      const uint16_t* kpan = reinterpret_cast<const uint16_t*>(kpanels + (j0 / kKeys) * (p.d / 2) * kKeys);
      const uint16_t* vpan = reinterpret_cast<const uint16_t*>(vpanels + (j0 / kKeys) * (p.dv / 2) * kKeys);
      const uint16_t* kblock = reinterpret_cast<const uint16_t*>(kpairs + (j0 / 2) * p.d);
      for (int64_t i = 0; i < group; ++i) {
        const int64_t h = hk * group + i, row0 = (b * p.Hq + h) * p.Lq;
        const uint16_t* qh = qrows + i * p.Lq * p.d;
        for_each_backward_block(
            p, valid, j0,
            [&](int64_t i0, int64_t r0, int64_t mr, const int64_t* limit) {
              const int64_t pair0 = (r0 - i0) / 2;  // groups start at even rows of the block
              uint32_t drop_rows[kRows];
              dropout_rows(p.dropout, b, h, r0, mr, drop_rows);
              mk::with_rows(mr, [&](auto rows) {
                bwd_rows_bf16<decltype(rows)::value>(
                    p, qh + r0 * p.d, g.grad_out + (row0 + r0) * p.dv, g.lse + row0 + r0, delta + i * p.Lq + r0,
                    kpan, vpan, kblock, j0, nk, limit, mask_rows(p, b, h, r0),
                    p.dropout.active() ? drop_rows : nullptr, ptp + pair0 * kKeys, dstp + pair0 * kKeys,
                    dstp_lo + pair0 * kKeys, gqa + (i * p.Lq + r0) * p.d);
              });
            },
            [&](int64_t i0, int64_t nq) {  // dV[block] += P^T dO, dK[block] += dS^T Q over the row pairs
              const int64_t pairs = (nq + 1) / 2;
              bwd_kv_bf16(p.dv, ptp, nk, pairs, dop + (i * qpairs + i0 / 2) * p.dv, p.dv, gva + j0 * p.dv,
                          p.dv);
              for (const uint32_t* ds : {dstp, dstp_lo})
                bwd_kv_bf16(p.d, ds, nk, pairs, qp + (i * qpairs + i0 / 2) * p.d, p.d, gka + j0 * p.d, p.d);
            });
      }
    }
    if (gq_task) round_to_bf16(gqa, group * p.Lq * p.d, g.gq + (b * p.Hq + hk * group) * p.Lq * p.d);
    uint16_t* gk = g.gk + (b * p.Hkv + hk) * p.Lk * p.d;
    uint16_t* gv = g.gv + (b * p.Hkv + hk) * p.Lk * p.dv;
    for (int64_t j0 = 0; j0 < p.Lk; j0 += kKeys) {  // the split's blocks; the first split's also past valid
      if (!(j0 >= valid ? split.c == 0 : split.owns(j0 / kKeys))) continue;
      const int64_t nk = std::min(kKeys, p.Lk - j0);
      round_to_bf16(gka + j0 * p.d, nk * p.d, gk + j0 * p.d);
      round_to_bf16(gva + j0 * p.dv, nk * p.dv, gv + j0 * p.dv);
    }
  }
}

}  // namespace bigmodel::attention::fast

#else


#include <c10/util/Exception.h>

namespace bigmodel::attention::fast {
void forward(const Problem&, int64_t, int64_t, float*, float*) { TORCH_INTERNAL_ASSERT(false); }
void forward_lanes(const Problem&, int64_t, int64_t, float*, float*) { TORCH_INTERNAL_ASSERT(false); }
void forward_lanes(const ProblemBf16&, int64_t, int64_t, uint16_t*, float*) { TORCH_INTERNAL_ASSERT(false); }
void backward(const Problem&, const Grads&, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void weights_pack(const Problem&, int64_t, int64_t, float*) { TORCH_INTERNAL_ASSERT(false); }
void weights(const Problem&, const float*, const float*, bool, int64_t, int64_t, int64_t, float*) {
  TORCH_INTERNAL_ASSERT(false);
}
void forward_amx(const ProblemBf16&, int64_t, int64_t, uint16_t*, float*) { TORCH_INTERNAL_ASSERT(false); }
void forward_bf16_dot(const ProblemBf16&, int64_t, int64_t, uint16_t*, float*) { TORCH_INTERNAL_ASSERT(false); }
void backward_bf16_dot(const ProblemBf16&, const GradsBf16&, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
}  // namespace bigmodel::attention::fast

#endif
