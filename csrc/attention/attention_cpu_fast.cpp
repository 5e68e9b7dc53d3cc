// Attention forward on the AVX-512 micro-kernels (design in attention_cpu_fast.h).
#include "attention/attention_cpu_fast.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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

// Rows [0, n) of X (dim floats at stride ld) copied contiguously. q, k and v often come as views of a
// projection ([B, L, 3, H, d] seen as [B, H, L, d]), whose rows sit 3 E floats apart: walking 64
// such rows per key block touched a new page per row, and the TLB misses made the strided case
// 1.7x slower than the contiguous one.
void copy_rows(const float* x, int64_t ld, int64_t n, int64_t dim, float* dst) {
  for (int64_t j = 0; j < n; ++j) std::copy(x + j * ld, x + j * ld + dim, dst + j * dim);
}

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

float* aligned(std::vector<float>& storage, int64_t n) {
  storage.resize(n + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
}

// One group of MR query rows (rows i0 .. i0 + MR) against keys [0, kend): online softmax, P V.
// limit[r] = number of keys row r may see (key_lengths and the causal diagonal).
template <int MR, int NV>
BM_AVX512 void row_group(const Problem& p, const float* q, const float* kpanels, const float* v, int64_t kend,
                         const int64_t* limit, float* out, float* lse) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float m[MR], l[MR];
  alignas(64) float o[MR][NV * 16];
  alignas(64) float pt[MR][kKeys];
  for (int r = 0; r < MR; ++r) {
    m[r] = ninf;
    l[r] = 0.f;
    for (int c = 0; c < NV * 16; ++c) o[r][c] = 0.f;
  }
  int64_t min_limit = limit[0];
  for (int r = 1; r < MR; ++r) min_limit = std::min(min_limit, limit[r]);
  for (int64_t j0 = 0; j0 < kend; j0 += kKeys) {
    const int64_t nk = std::min(kKeys, kend - j0);
    __m512 s[MR][4];
    mk::zero_tile<MR>(s);
    mk::tile_f32<MR>(q, p.qs[2], p.d, kpanels + (j0 / kKeys) * p.d * kKeys, s);
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
      const float mnew = std::max(m[r], mb);
      if (mnew == ninf) {  // nothing visible yet: the row contributes zero
        alpha[r] = 1.f;
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) _mm512_store_ps(pt[r] + 16 * c, _mm512_setzero_ps());
        continue;
      }
      const __m512 shift = _mm512_set1_ps(mnew);
      __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512 x = _mm512_max_ps(_mm512_sub_ps(s[r][c], shift), _mm512_set1_ps(-87.f));
        const __m512 e = edge ? _mm512_maskz_mov_ps(mask[c], mk::exp_scaled_ps<1>(x)) : mk::exp_scaled_ps<1>(x);
        _mm512_store_ps(pt[r] + 16 * c, e);
        sum = _mm512_add_ps(sum, e);
      }
      alpha[r] = m[r] == ninf ? 0.f : std::exp(m[r] - mnew);
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
      m[r] = mnew;
    }
    __m512 acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(o[r] + 16 * c), a);
    }
    mk::tile_f32_rows<MR, NV>(pt[0], kKeys, nk, v + j0 * p.vs[2], p.vs[2], acc);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) _mm512_store_ps(o[r] + 16 * c, acc[r][c]);
  }
  for (int r = 0; r < MR; ++r) {
    float* dst = out + r * p.dv;
    if (l[r] > 0.f) {
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(_mm512_load_ps(o[r] + 16 * c), inv));
      lse[r] = m[r] + std::log(l[r]);
    } else {
      for (int c = 0; c < NV * 16; ++c) dst[c] = 0.f;
      lse[r] = ninf;
    }
  }
}

}  // namespace

void forward(const Problem& p, int64_t t0, int64_t t1, float* out, float* lse) {
  const int64_t nqb = (p.Lq + kBlockQ - 1) / kBlockQ, group = p.Hq / p.Hkv;
  const int64_t nkb = (p.Lk + kKeys - 1) / kKeys;
  std::vector<float> storage, vstorage;
  float* kpanels = aligned(storage, nkb * p.d * kKeys);
  float* vrows = aligned(vstorage, p.Lk * p.dv);
  Problem pv = p;  // V read from vrows
  pv.vs[2] = p.dv;
  int64_t packed_b = -1, packed_hk = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (p.Hq * nqb), h = (t / nqb) % p.Hq, i0 = (t % nqb) * kBlockQ;
    const int64_t hk = h / group, nq = std::min(kBlockQ, p.Lq - i0);
    const int64_t valid = p.lengths ? p.lengths[b] : p.Lk;
    if (b != packed_b || hk != packed_hk) {
      pack_transposed(p.k + b * p.ks[0] + hk * p.ks[1], p.ks[2], valid, p.d, p.scale, kpanels);
      copy_rows(p.v + b * p.vs[0] + hk * p.vs[1], p.vs[2], valid, p.dv, vrows);
      packed_b = b;
      packed_hk = hk;
    }
    const float* vb = vrows;
    const int64_t row0 = (b * p.Hq + h) * p.Lq;
    for (int64_t r0 = i0; r0 < i0 + nq; r0 += kRows) {
      const int mr = int(std::min<int64_t>(kRows, i0 + nq - r0));
      int64_t limit[kRows];
      const int64_t kend = visible_keys(p, valid, r0, mr, limit);
      const float* q = p.q + b * p.qs[0] + h * p.qs[1] + r0 * p.qs[2];
      float* o = out + (row0 + r0) * p.dv;
      float* ls = lse + row0 + r0;
      mk::with_vectors(p.dv / 16, [&](auto nv) {
        mk::with_rows(mr, [&](auto rows) {
          row_group<decltype(rows)::value, decltype(nv)::value>(pv, q, kpanels, vb, kend, limit, o, ls);
        });
      });
    }
  }
}

// ---- backward ----

namespace {

constexpr int64_t kBwdRows = 48;  // query rows whose P and dS are kept for one dK / dV update


// MR query rows against one 64-key block: P and dS (scaled) into pt / dst (rows of 64), then
// dQ[rows] += dS K_block.
template <int MR, int NVD>
BM_AVX512 void bwd_rows(const Problem& p, const float* q, const float* go, const float* lse, const float* delta,
                        const float* kpan, const float* vpan, const float* kblock, int64_t j0, int64_t nk,
                        const int64_t* limit, float (*pt)[kKeys], float (*dst)[kKeys], float* gq) {
  const float ninf = -std::numeric_limits<float>::infinity();
  __m512 s[MR][4];
  mk::zero_tile<MR>(s);
  mk::tile_f32<MR>(q, p.qs[2], p.d, kpan, s);
  int64_t min_limit = limit[0];
  for (int r = 1; r < MR; ++r) min_limit = std::min(min_limit, limit[r]);
  const bool edge = j0 + kKeys > min_limit;
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (lse[r] == ninf) {  // a row with no visible key: no gradient
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) _mm512_store_ps(pt[r] + 16 * c, _mm512_setzero_ps());
      continue;
    }
    const __m512 shift = _mm512_set1_ps(lse[r]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512 x = _mm512_max_ps(_mm512_sub_ps(s[r][c], shift), _mm512_set1_ps(-87.f));
      __m512 e = mk::exp_scaled_ps<1>(x);
      if (edge) e = _mm512_maskz_mov_ps(mk::lanes(std::max<int64_t>(0, std::min<int64_t>(16, limit[r] - j0 - 16 * c))), e);
      _mm512_store_ps(pt[r] + 16 * c, e);
    }
  }
  __m512 dp[MR][4];
  mk::zero_tile<MR>(dp);
  mk::tile_f32<MR>(go, p.dv, p.dv, vpan, dp);
  const __m512 sc = _mm512_set1_ps(p.scale);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 dl = _mm512_set1_ps(delta[r]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
      _mm512_store_ps(dst[r] + 16 * c,
                      _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(pt[r] + 16 * c), _mm512_sub_ps(dp[r][c], dl)), sc));
  }
  __m512 acc[MR][NVD];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NVD; ++c) acc[r][c] = _mm512_loadu_ps(gq + r * p.d + 16 * c);
  mk::tile_f32_rows<MR, NVD>(dst[0], kKeys, nk, kblock, p.ks[2], acc);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NVD; ++c) _mm512_storeu_ps(gq + r * p.d + 16 * c, acc[r][c]);
}

// out[keys m0 .. m0 + MR][NV * 16] += A^T B over nq query rows: A = pt or dst (rows of 64, read
// transposed), B = dO or Q rows at stride ldb.
template <int MR, int NV>
BM_AVX512 void bwd_kv_tile(const float* a, int64_t m0, int64_t nq, const float* b, int64_t ldb, float* out,
                           int64_t ldo) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(out + (m0 + r) * ldo + 16 * c);
  mk::tile_f32_rows<MR, NV>(a + m0, 1, nq, b, ldb, acc, kKeys);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(out + (m0 + r) * ldo + 16 * c, acc[r][c]);
}

// out[keys 0 .. nk][nv * 16] += A^T B over nq query rows, in tiles of up to kRows keys.
void bwd_kv(int64_t nv, const float* a, int64_t nk, int64_t nq, const float* b, int64_t ldb, float* out,
            int64_t ldo) {
  mk::with_vectors(nv, [&](auto vecs) {
    for (int64_t m0 = 0; m0 < nk; m0 += kRows)
      mk::with_rows(std::min<int64_t>(kRows, nk - m0), [&](auto rows) {
        bwd_kv_tile<decltype(rows)::value, decltype(vecs)::value>(a, m0, nq, b, ldb, out, ldo);
      });
  });
}

}  // namespace

void backward(const Problem& p, const Grads& g, int64_t t0, int64_t t1) {
  const int64_t group = p.Hq / p.Hkv, nkb = (p.Lk + kKeys - 1) / kKeys;
  std::vector<float> ks, vs, ps, ds, kr, qr;
  float* kpanels = aligned(ks, nkb * p.d * kKeys);
  float* krows = aligned(kr, p.Lk * p.d);  // K and each query head's Q, contiguous (see copy_rows)
  float* qrows = aligned(qr, group * p.Lq * p.d);
  Problem pc = p;
  pc.ks[2] = p.d;
  pc.qs[2] = p.d;
  float* vpanels = aligned(vs, nkb * p.dv * kKeys);
  float (*pt)[kKeys] = reinterpret_cast<float (*)[kKeys]>(aligned(ps, kBwdRows * kKeys));
  float (*dst)[kKeys] = reinterpret_cast<float (*)[kKeys]>(aligned(ds, kBwdRows * kKeys));
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.Hkv, hk = t % p.Hkv;
    const int64_t valid = p.lengths ? p.lengths[b] : p.Lk;
    const float* kb = p.k + b * p.ks[0] + hk * p.ks[1];
    const float* vb = p.v + b * p.vs[0] + hk * p.vs[1];
    pack_transposed(kb, p.ks[2], valid, p.d, p.scale, kpanels);
    pack_transposed(vb, p.vs[2], valid, p.dv, 1.f, vpanels);
    copy_rows(kb, p.ks[2], valid, p.d, krows);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
      copy_rows(p.q + b * p.qs[0] + h * p.qs[1], p.qs[2], p.Lq, p.d, qrows + (h - hk * group) * p.Lq * p.d);
    float* gk = g.gk + (b * p.Hkv + hk) * p.Lk * p.d;
    float* gv = g.gv + (b * p.Hkv + hk) * p.Lk * p.dv;
    for (int64_t j0 = 0; j0 < valid; j0 += kKeys) {
      const int64_t nk = std::min(kKeys, valid - j0);
      const float* kpan = kpanels + (j0 / kKeys) * p.d * kKeys;
      const float* vpan = vpanels + (j0 / kKeys) * p.dv * kKeys;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t row0 = (b * p.Hq + h) * p.Lq;
        const float* qh = qrows + (h - hk * group) * p.Lq * p.d;
        for (int64_t i0 = p.causal ? j0 : 0; i0 < p.Lq; i0 += kBwdRows) {  // causal: rows < j0 see none
          const int64_t nq = std::min(kBwdRows, p.Lq - i0);
          for (int64_t r0 = i0; r0 < i0 + nq; r0 += kRows) {
            const int mr = int(std::min<int64_t>(kRows, i0 + nq - r0));
            int64_t limit[kRows];
            visible_keys(p, valid, r0, mr, limit);
            const float* q = qh + r0 * p.d;
            const float* go = g.grad_out + (row0 + r0) * p.dv;
            float* gq = g.gq + (row0 + r0) * p.d;
            float (*ptr)[kKeys] = pt + (r0 - i0);
            float (*dsr)[kKeys] = dst + (r0 - i0);
            mk::with_vectors(p.d / 16, [&](auto nvd) {
              mk::with_rows(mr, [&](auto rows) {
                bwd_rows<decltype(rows)::value, decltype(nvd)::value>(pc, q, go, g.lse + row0 + r0,
                                                                       g.delta + row0 + r0, kpan, vpan,
                                                                       krows + j0 * p.d, j0, nk, limit, ptr, dsr, gq);
              });
            });
          }
          // dV[block] += P^T dO, dK[block] += dS^T Q over these rows.
          bwd_kv(p.dv / 16, pt[0], nk, nq, g.grad_out + (row0 + i0) * p.dv, p.dv, gv + j0 * p.dv, p.dv);
          bwd_kv(p.d / 16, dst[0], nk, nq, qh + i0 * p.d, p.d, gk + j0 * p.d, p.d);
        }
      }
    }
  }
}


// ---- bfloat16 forward on AMX ----

namespace {

// Rows [0, n) of X (bf16, dim values at stride ld) as AMX B panels of X^T: [ceil(n/64)][dim/2][64][2]
// (k = dim in pairs, columns = rows of X), zero past n.
void pack_bf16_transposed(const uint16_t* x, int64_t ld, int64_t n, int64_t dim, uint16_t* panels) {
  const int64_t nb = (n + kKeys - 1) / kKeys;
  std::fill(panels, panels + nb * dim * kKeys, uint16_t(0));
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* xr = x + j * ld;
    uint16_t* dst = panels + (j / kKeys) * dim * kKeys + (j % kKeys) * 2;
    for (int64_t c = 0; c < dim; ++c) dst[(c / 2) * 2 * kKeys + (c % 2)] = xr[c];
  }
}

// Rows [0, n) of V (bf16, dv values at stride ld) as AMX B panels of V itself: [ceil(n/64)][32 key
// pairs][64 columns (dv, zero past it)][2], zero past n.
void pack_bf16_rows(const uint16_t* x, int64_t ld, int64_t n, int64_t dv, uint16_t* panels) {
  const int64_t nb = (n + kKeys - 1) / kKeys;
  std::fill(panels, panels + nb * kKeys * kKeys, uint16_t(0));
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* xr = x + j * ld;
    uint16_t* dst = panels + (j / kKeys) * kKeys * kKeys + ((j % kKeys) / 2) * 2 * kKeys + (j % 2);
    for (int64_t c = 0; c < dv; ++c) dst[c * 2] = xr[c];
  }
}

// One block of 16 query rows (their bf16 values copied, zero-padded, into qb [16][d]) against keys
// [0, kend): online softmax with S and P V on AMX tiles, the softmax in AVX-512 on float32.
BM_AMX void amx_row_block(const ProblemBf16& p, const uint16_t* qb, int64_t mr, const int64_t* limit,
                          int64_t kend, const uint16_t* kpanels, const uint16_t* vpanels, uint16_t* out,
                          float* lse) {
  const float ninf = -std::numeric_limits<float>::infinity();
  alignas(64) float sbuf[16][kKeys];
  alignas(64) float pv[16][kKeys];
  alignas(64) float o[16][kKeys];
  alignas(64) uint16_t pb[16][kKeys];
  float m[16], l[16], alpha[16];
  for (int r = 0; r < 16; ++r) {
    m[r] = ninf;
    l[r] = 0.f;
    for (int c = 0; c < kKeys; ++c) o[r][c] = 0.f;
  }
  const int nvt = int(p.dv / 16);
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t j0 = 0; j0 < kend; j0 += kKeys) {
    const uint16_t* kp = kpanels + (j0 / kKeys) * p.d * kKeys;
    mk::amx_zero();
    mk::amx_panel(qb, p.d * 2, p.d / 32, kp);
    mk::amx_store(sbuf);
    for (int r = 0; r < 16; ++r) {
      const int64_t lim = r < mr ? limit[r] - j0 : 0;
      __m512 sv[4];
      __mmask16 mask[4];
      for (int c = 0; c < 4; ++c) {
        mask[c] = mk::lanes(std::max<int64_t>(0, std::min<int64_t>(16, lim - 16 * c)));
        sv[c] = _mm512_mask_mov_ps(_mm512_set1_ps(ninf), mask[c], _mm512_mul_ps(_mm512_load_ps(sbuf[r] + 16 * c), scale));
      }
      const float mb = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(sv[0], sv[1]), _mm512_max_ps(sv[2], sv[3])));
      const float mnew = std::max(m[r], mb);
      if (mnew == ninf) {
        alpha[r] = 1.f;
        std::memset(pb[r], 0, sizeof(pb[r]));
        continue;
      }
      const __m512 shift = _mm512_set1_ps(mnew);
      __m512 sum = _mm512_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        const __m512 x = _mm512_max_ps(_mm512_sub_ps(sv[c], shift), _mm512_set1_ps(-87.f));
        const __m512 e = _mm512_maskz_mov_ps(mask[c], mk::exp_scaled_ps<1>(x));
        sum = _mm512_add_ps(sum, e);
        mk::store_bf16(pb[r] + 16 * c, e, 0xFFFF);
      }
      alpha[r] = m[r] == ninf ? 0.f : std::exp(m[r] - mnew);
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
      m[r] = mnew;
    }
    const uint16_t* vp = vpanels + (j0 / kKeys) * kKeys * kKeys;
    mk::amx_zero();
    for (int64_t kc = 0; kc < 2; ++kc) {  // 64 keys = two k chunks of 32
      _tile_loadd(4, pb[0] + 32 * kc, 2 * kKeys);
      const uint16_t* b = vp + kc * 16 * 2 * kKeys;
      _tile_loadd(5, b, 4 * kKeys);
      _tile_dpbf16ps(0, 4, 5);
      if (nvt > 1) {
        _tile_loadd(6, b + 32, 4 * kKeys);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (nvt > 2) {
        _tile_loadd(5, b + 64, 4 * kKeys);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (nvt > 3) {
        _tile_loadd(6, b + 96, 4 * kKeys);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
    mk::amx_store(pv);
    for (int r = 0; r < mr; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
      for (int c = 0; c < nvt; ++c)
        _mm512_store_ps(o[r] + 16 * c, _mm512_fmadd_ps(_mm512_load_ps(o[r] + 16 * c), a, _mm512_load_ps(pv[r] + 16 * c)));
    }
  }
  for (int r = 0; r < mr; ++r) {
    uint16_t* dst = out + r * p.dv;
    if (l[r] > 0.f) {
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      for (int c = 0; c < nvt; ++c) mk::store_bf16(dst + 16 * c, _mm512_mul_ps(_mm512_load_ps(o[r] + 16 * c), inv), 0xFFFF);
      lse[r] = m[r] + std::log(l[r]);
    } else {
      std::memset(dst, 0, p.dv * sizeof(uint16_t));
      lse[r] = ninf;
    }
  }
}

BM_AMX void forward_amx_tasks(const ProblemBf16& p, int64_t t0, int64_t t1, uint16_t* out, float* lse) {
  const int64_t nqb = (p.Lq + kBlockQAmx - 1) / kBlockQAmx, group = p.Hq / p.Hkv;
  const int64_t nkb = (p.Lk + kKeys - 1) / kKeys;
  std::vector<uint16_t> ks(nkb * p.d * kKeys + 64), vs(nkb * kKeys * kKeys + 64);
  auto align = [](uint16_t* x) {
    return reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(x) + 63) & ~uintptr_t(63));
  };
  uint16_t* kpanels = align(ks.data());
  uint16_t* vpanels = align(vs.data());
  alignas(64) uint16_t qb[16 * 128];
  mk::amx_configure();
  int64_t packed_b = -1, packed_hk = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (p.Hq * nqb), h = (t / nqb) % p.Hq, i0 = (t % nqb) * kBlockQAmx;
    const int64_t hk = h / group, nq = std::min(kBlockQAmx, p.Lq - i0);
    const int64_t valid = p.lengths ? p.lengths[b] : p.Lk;
    if (b != packed_b || hk != packed_hk) {
      pack_bf16_transposed(p.k + b * p.ks[0] + hk * p.ks[1], p.ks[2], valid, p.d, kpanels);
      pack_bf16_rows(p.v + b * p.vs[0] + hk * p.vs[1], p.vs[2], valid, p.dv, vpanels);
      packed_b = b;
      packed_hk = hk;
    }
    const int64_t row0 = (b * p.Hq + h) * p.Lq;
    for (int64_t r0 = i0; r0 < i0 + nq; r0 += 16) {
      const int64_t mr = std::min<int64_t>(16, i0 + nq - r0);
      int64_t limit[16];
      const int64_t kend = visible_keys(p, valid, r0, mr, limit);
      for (int64_t r = 0; r < mr; ++r)
        std::memcpy(qb + r * p.d, p.q + b * p.qs[0] + h * p.qs[1] + (r0 + r) * p.qs[2], p.d * sizeof(uint16_t));
      std::memset(qb + mr * p.d, 0, (16 - mr) * p.d * sizeof(uint16_t));
      amx_row_block(p, qb, mr, limit, kend, kpanels, vpanels, out + (row0 + r0) * p.dv, lse + row0 + r0);
    }
  }
  _tile_release();
}

}  // namespace

void forward_amx(const ProblemBf16& p, int64_t t0, int64_t t1, uint16_t* out, float* lse) {
  forward_amx_tasks(p, t0, t1, out, lse);
}

}  // namespace bigmodel::attention::fast

#else


#include <c10/util/Exception.h>

namespace bigmodel::attention::fast {
void forward(const Problem&, int64_t, int64_t, float*, float*) { TORCH_INTERNAL_ASSERT(false); }
void backward(const Problem&, const Grads&, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void forward_amx(const ProblemBf16&, int64_t, int64_t, uint16_t*, float*) { TORCH_INTERNAL_ASSERT(false); }
}  // namespace bigmodel::attention::fast

#endif
