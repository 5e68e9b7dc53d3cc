// Attention forward on the AVX-512 micro-kernels (design in attention_cpu_fast.h).
#include "attention/attention_cpu_fast.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/gemm/microkernel.h"

#ifdef BIGMODEL_HAS_AVX512_KERNELS

namespace bigmodel::attention::fast {
namespace {

namespace mk = bigmodel::gemm::avx512;
constexpr int64_t kKeys = mk::kNR;  // keys per block: one panel
constexpr int kRows = mk::kMR;      // query rows per register tile

// scale * K^T of keys [0, n) as panels [ceil(n / 64)][d][64], zero past n.
void pack_keys(const Problem& p, const float* k, int64_t n, float* panels) {
  const int64_t nb = (n + kKeys - 1) / kKeys;
  std::fill(panels, panels + nb * p.d * kKeys, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = k + j * p.ks[2];
    float* dst = panels + (j / kKeys) * p.d * kKeys + j % kKeys;
    for (int64_t c = 0; c < p.d; ++c) dst[c * kKeys] = p.scale * kr[c];
  }
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

template <int NV>
void row_group_any(int mr, const Problem& p, const float* q, const float* kp, const float* v, int64_t kend,
                   const int64_t* limit, float* out, float* lse) {
  switch (mr) {
    case 1: row_group<1, NV>(p, q, kp, v, kend, limit, out, lse); break;
    case 2: row_group<2, NV>(p, q, kp, v, kend, limit, out, lse); break;
    case 3: row_group<3, NV>(p, q, kp, v, kend, limit, out, lse); break;
    case 4: row_group<4, NV>(p, q, kp, v, kend, limit, out, lse); break;
    case 5: row_group<5, NV>(p, q, kp, v, kend, limit, out, lse); break;
    default: row_group<6, NV>(p, q, kp, v, kend, limit, out, lse); break;
  }
}

}  // namespace

void forward(const Problem& p, int64_t t0, int64_t t1, float* out, float* lse) {
  const int64_t nqb = (p.Lq + kBlockQ - 1) / kBlockQ, group = p.Hq / p.Hkv;
  const int64_t nkb = (p.Lk + kKeys - 1) / kKeys;
  std::vector<float> storage(nkb * p.d * kKeys + 16);
  float* kpanels = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
  int64_t packed_b = -1, packed_hk = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (p.Hq * nqb), h = (t / nqb) % p.Hq, i0 = (t % nqb) * kBlockQ;
    const int64_t hk = h / group, nq = std::min(kBlockQ, p.Lq - i0);
    const int64_t valid = p.lengths ? p.lengths[b] : p.Lk;
    if (b != packed_b || hk != packed_hk) {
      pack_keys(p, p.k + b * p.ks[0] + hk * p.ks[1], valid, kpanels);
      packed_b = b;
      packed_hk = hk;
    }
    const float* vb = p.v + b * p.vs[0] + hk * p.vs[1];
    const int64_t row0 = (b * p.Hq + h) * p.Lq;
    for (int64_t r0 = i0; r0 < i0 + nq; r0 += kRows) {
      const int mr = int(std::min<int64_t>(kRows, i0 + nq - r0));
      int64_t limit[kRows];
      int64_t kend = 0;
      for (int r = 0; r < mr; ++r) {
        limit[r] = p.causal ? std::min(valid, r0 + r + 1) : valid;
        kend = std::max(kend, limit[r]);
      }
      const float* q = p.q + b * p.qs[0] + h * p.qs[1] + r0 * p.qs[2];
      float* o = out + (row0 + r0) * p.dv;
      float* ls = lse + row0 + r0;
      switch (p.dv / 16) {
        case 1: row_group_any<1>(mr, p, q, kpanels, vb, kend, limit, o, ls); break;
        case 2: row_group_any<2>(mr, p, q, kpanels, vb, kend, limit, o, ls); break;
        case 3: row_group_any<3>(mr, p, q, kpanels, vb, kend, limit, o, ls); break;
        default: row_group_any<4>(mr, p, q, kpanels, vb, kend, limit, o, ls); break;
      }
    }
  }
}

}  // namespace bigmodel::attention::fast

#else

#include <c10/util/Exception.h>

namespace bigmodel::attention::fast {
void forward(const Problem&, int64_t, int64_t, float*, float*) { TORCH_INTERNAL_ASSERT(false); }
}  // namespace bigmodel::attention::fast

#endif
