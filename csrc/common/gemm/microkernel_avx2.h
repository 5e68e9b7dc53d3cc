// bigmodel's GEMM core on AVX2 + FMA (Haswell and later, AMD Zen): register-blocked micro-kernels
// over the same packed panels as microkernel.h (kNR = 64 float32 columns per panel row), for CPUs
// without AVX-512. The register file is 16 ymm of 8 floats, so a tile covers part of a panel:
//
//   quarter tile    MR rows x 2 ymm at panel columns 16 q .. 16 q + 15 (q = 0 .. 3): plain GEMM over
//                   contiguous-column panels whose quarters the AVX2 backward stores as contiguous
//                   [K, 16] strips (a quarter of every 256-byte panel row streamed 4-5% slower, NOTES
//                   v30) (kQuarterMR = 6: 12 accumulators + 2 B + 1 broadcast).
//   gate-pair tile  the LSTM forward's: the same column-pair tile over strips of 16 columns stored
//                   contiguously (K rows of 64 bytes; the forward's AVX2 packing splits each panel of
//                   gate_half_grouped_columns into its four quarters), strip 2 h + g2 holding gates
//                   2 g2 and 2 g2 + 1 of the 8 hidden units of half h: two of them (one K pass each)
//                   give the i, f, g, o pre-activations the cell update needs (kGateMR = 6). (Gate-pair
//                   tiles on the AVX-512 gate-grouped panels read half of two lines per k; 3 rows x
//                   all 4 gates on them was slower still.)
//
// A is read in place as in microkernel.h. Everything here is compiled for AVX2 + FMA through function
// attributes, whatever -march the build uses; call it only after cpu::has_avx2() said yes.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BIGMODEL_HAS_AVX2_KERNELS 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#define BM_AVX2 __attribute__((target("avx2,fma")))
#ifndef BM_ALWAYS_INLINE
#define BM_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace bigmodel::gemm::avx2 {

constexpr int kNR = 64;        // panel width (shared with the AVX-512 kernels' packing)
constexpr int kGateMR = 6;     // rows of a gate-pair tile
constexpr int kQuarterMR = 6;  // rows of a quarter tile

// f(std::integral_constant<int, n>{}) for n = mr in 1 .. MAX (larger counts run as MAX).
template <int MAX, typename F>
inline void with_rows(int64_t mr, const F& f) {
  static_assert(MAX >= 1 && MAX <= 8);
  switch (mr < MAX ? mr : MAX) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr (MAX >= 2) f(std::integral_constant<int, 2>{}); break;
    case 3: if constexpr (MAX >= 3) f(std::integral_constant<int, 3>{}); break;
    case 4: if constexpr (MAX >= 4) f(std::integral_constant<int, 4>{}); break;
    case 5: if constexpr (MAX >= 5) f(std::integral_constant<int, 5>{}); break;
    case 6: if constexpr (MAX >= 6) f(std::integral_constant<int, 6>{}); break;
    case 7: if constexpr (MAX >= 7) f(std::integral_constant<int, 7>{}); break;
    default: if constexpr (MAX >= 8) f(std::integral_constant<int, 8>{}); break;
  }
}

template <int MR, int NV>
BM_AVX2 BM_ALWAYS_INLINE void zero_tile(__m256 (&acc)[MR][NV]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_setzero_ps();
}

// Strips tile: acc[r][2 s + j] += sum_k A(r, k) * w[s * lds + k * ldw + 8 j .. 8 j + 7] for S strips of
// 16 columns (s = 0 .. S - 1) at stride lds, A(r, k) = a[r * lda + k * kstride] (kstride = 1: rows in
// place; larger: A read transposed, as a weight gradient reads dgates^T), one K pass for all S.
// Few rows take several strips (in_strip_groups): a 1-row tile over one strip had 2 FMA chains, a quarter
// of the 8 that Zen 3's two 4-cycle FMA pipes need to stay busy.
template <int MR, int S>
BM_AVX2 BM_ALWAYS_INLINE void strips_tile_f32(const float* a, int64_t lda, int64_t kstride, int64_t K, const float* w,
                                              int64_t ldw, int64_t lds, __m256 (&acc)[MR][2 * S]) {
  for (int64_t k = 0; k < K; ++k, w += ldw) {
    __m256 wv[2 * S];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      wv[2 * s] = _mm256_load_ps(w + s * lds);
      wv[2 * s + 1] = _mm256_load_ps(w + s * lds + 8);
    }
    // Keep B in the registers the accumulators leave (one for the broadcast), at 2 to 4 rows: GCC
    // otherwise folds the loads into every row's FMA (4 rows: 12 loads per 8 FMAs, more than two
    // load ports give; B = 4 inference 4.56 -> 3.55 ms, NOTES v32); 3 rows x 2 strips pin 3 of their
    // 4 B vectors (all 4 spilled). At 5 and 6 rows GCC keeps them anyway, and forcing it slowed the
    // weight-gradient tiles (seed training 144 -> 158 ms, one thread).
    if constexpr (MR > 1 && MR <= 4) {
      constexpr int kPinned = std::min(2 * S, 15 - 2 * S * MR);
#pragma GCC unroll 8
      for (int j = 0; j < kPinned; ++j) asm("" : "+x"(wv[j]));
    }
    const float* ak = a + k * kstride;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ak + r * lda);
#pragma GCC unroll 8
      for (int j = 0; j < 2 * S; ++j) acc[r][j] = _mm256_fmadd_ps(av, wv[j], acc[r][j]);
    }
  }
}

// Column-pair tile: strips_tile_f32 over one strip of 16 columns at row stride ldw.
template <int MR>
BM_AVX2 BM_ALWAYS_INLINE void pair_tile_f32(const float* a, int64_t lda, int64_t kstride, int64_t K, const float* w,
                                            int64_t ldw, __m256 (&acc)[MR][2]) {
  strips_tile_f32<MR, 1>(a, lda, kstride, K, w, ldw, 0, acc);
}

// f(first, std::integral_constant<int, G>{}) over [0, n) in groups of G items, for each size G in Gs
// (largest first, the last 1): as many groups of the first size as fit, then of the next, ...
template <int G, typename F>
BM_AVX2 BM_ALWAYS_INLINE void groups_of(int64_t n, int64_t& first, const F& f) {
  for (; first + G <= n; first += G) f(first, std::integral_constant<int, G>{});
}

template <int... Gs, typename F>
BM_AVX2 BM_ALWAYS_INLINE void in_groups(int64_t n, const F& f) {
  int64_t first = 0;
  (groups_of<Gs>(n, first, f), ...);
}

// in_groups over the strips an MR-row tile multiplies per K pass: at least 8 accumulators where the
// registers allow (1 row: 4 strips, 8 accumulators; 2 and 3 rows: 2 strips, 8 and 12), fewer where
// a panel has fewer strips left.
template <int MR, typename F>
BM_AVX2 BM_ALWAYS_INLINE void in_strip_groups(int64_t n, const F& f) {
  if constexpr (MR == 1)
    in_groups<4, 2, 1>(n, f);
  else if constexpr (MR <= 3)
    in_groups<2, 1>(n, f);
  else
    in_groups<1>(n, f);
}

// Loads / stores a quarter tile from / to rows of 16 floats at stride ldc.
template <int MR>
BM_AVX2 BM_ALWAYS_INLINE void load_quarter(const float* c, int64_t ldc, __m256 (&acc)[MR][2]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm256_loadu_ps(c + r * ldc);
    acc[r][1] = _mm256_loadu_ps(c + r * ldc + 8);
  }
}

template <int MR>
BM_AVX2 BM_ALWAYS_INLINE void store_quarter(const __m256 (&acc)[MR][2], float* c, int64_t ldc) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

// ---- vector math for epilogues (the accuracy of microkernel.h's full-precision versions) ----

// e^(s x) for s = 1, -1 or -2, as avx512::exp_scaled_ps: s x = n ln2 + r with n = round(s x / ln2),
// e^r a degree-6 Taylor polynomial written in t = r / s. AVX2 has no vscalefps: 2^n is built by
// adding n to the exponent field, which needs a normal 2^n, so s x is clamped to [-87, 87] first
// (e^-87 = 1.6e-38 is already below what sigmoid's 1 + e^-x or tanh's 1 + e^-2x can see).
template <int S>
BM_AVX2 BM_ALWAYS_INLINE __m256 exp_scaled_ps(__m256 x) {
  static_assert(S == 1 || S == -1 || S == -2);
  constexpr float s = S;
  constexpr float lim = 87.f / (S < 0 ? -s : s);
  // constants first: vmaxps/vminps return the second operand when either is NaN, so NaN stays NaN
  x = _mm256_min_ps(_mm256_set1_ps(lim), _mm256_max_ps(_mm256_set1_ps(-lim), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(s * 1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 t = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945309f / s), x);
  __m256 p = _mm256_set1_ps(s * s * s * s * s * s / 720);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(s * s * s * s * s / 120));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(s * s * s * s / 24));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(s * s * s / 6));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(s * s / 2));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(s));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f));
  // |n| <= 126: n + 127 is a valid biased exponent.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// e^x for softmax arguments, x <= 0 (a score minus its row's max or logsumexp; up to rounding), -inf
// or NaN, on N vectors at once (each step over all N before the next, so that the N chains interleave
// in program order): exp_scaled_ps's polynomial, with cheaper edges than it needs for any x.
// round(x / ln2) + 127 comes out of the low mantissa bits of x / ln2 + (1.5 * 2^23 + 127) (no
// vroundps, vcvtps2dq, vpaddd), and x is clamped below at -127 ln2, where that biased exponent is 0:
// 2^n is then +0.0, so -inf and every x under about -87.7 give exactly 0 (no compare and blend for
// excluded keys, whose values may hold anything). NaN stays NaN (constant first in vmaxps).
template <int N>
BM_AVX2 BM_ALWAYS_INLINE void exp_softmax_ps_n(__m256 (&x)[N]) {
  constexpr float magic = 12582912.f + 127.f;  // 1.5 * 2^23: its ulp is 1, and the bias
  __m256 nm[N], t[N], p[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    x[i] = _mm256_max_ps(_mm256_set1_ps(-88.0296919311f), x[i]);
    nm[i] = _mm256_fmadd_ps(x[i], _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(magic));
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i)
    t[i] = _mm256_fnmadd_ps(_mm256_sub_ps(nm[i], _mm256_set1_ps(magic)), _mm256_set1_ps(0.693147180559945309f), x[i]);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 720), t[i], _mm256_set1_ps(1.f / 120));
  constexpr float c[5] = {1.f / 24, 1.f / 6, 1.f / 2, 1.f, 1.f};
#pragma GCC unroll 8
  for (int k = 0; k < 5; ++k)
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], t[i], _mm256_set1_ps(c[k]));
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i)
    x[i] = _mm256_mul_ps(p[i], _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(nm[i]), 23)));
}

// 1 / d for d >= 1: vrcpps (relative error < 3.7e-4) and two Newton steps (one leaves 1.4e-7, two
// the float32 rounding of microkernel.h's vrcp14ps + one step).
BM_AVX2 BM_ALWAYS_INLINE __m256 recip_ps(__m256 d) {
  const __m256 two = _mm256_set1_ps(2.f);
  __m256 y = _mm256_rcp_ps(d);
  y = _mm256_mul_ps(y, _mm256_fnmadd_ps(d, y, two));
  return _mm256_mul_ps(y, _mm256_fnmadd_ps(d, y, two));
}

// 1 / (1 + e^-x).
BM_AVX2 BM_ALWAYS_INLINE __m256 sigmoid_ps(__m256 x) {
  return recip_ps(_mm256_add_ps(_mm256_set1_ps(1.f), exp_scaled_ps<-1>(x)));
}

// tanh(x) = 2 / (1 + e^-2x) - 1: absolute error at float32 rounding level.
BM_AVX2 BM_ALWAYS_INLINE __m256 tanh_ps(__m256 x) {
  const __m256 sig2 = recip_ps(_mm256_add_ps(_mm256_set1_ps(1.f), exp_scaled_ps<-2>(x)));
  return _mm256_fmsub_ps(_mm256_set1_ps(2.f), sig2, _mm256_set1_ps(1.f));
}

// ---- loads and stores of 8 lanes, masked only for a tail ----
// vmaskmovps is slow on some AVX2 CPUs (a store is microcoded on AMD Zen 2), so whole groups of 8
// take plain loads and stores and only a tail group the masked ones.

struct Lanes {
  __m256i mask;  // lane l active iff l < n
  bool full;     // n >= 8
};

// The first n lanes (n >= 8: all; n <= 0: none).
BM_AVX2 BM_ALWAYS_INLINE Lanes lanes(int64_t n) {
  const int32_t k = n >= 8 ? 8 : n <= 0 ? 0 : int32_t(n);
  return {_mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), k == 8};
}

BM_AVX2 BM_ALWAYS_INLINE __m256 load_f32(const float* p, const Lanes& m) {
  return m.full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m.mask);
}

BM_AVX2 BM_ALWAYS_INLINE void store_f32(float* p, __m256 v, const Lanes& m) {
  if (m.full)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, m.mask, v);
}

// Stores the lanes of `mask` (any subset; masked-off lanes are never touched, so p may point before
// an array as long as the active lanes are inside it).
BM_AVX2 BM_ALWAYS_INLINE void store_f32(float* p, __m256 v, __m256i mask) { _mm256_maskstore_ps(p, mask, v); }

// bfloat16 bits -> float32, the lanes of m (0 elsewhere).
BM_AVX2 BM_ALWAYS_INLINE __m256 load_bf16(const uint16_t* p, const Lanes& m) {
  __m128i bits;
  if (m.full) {
    bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int n = __builtin_popcount(unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(m.mask))));
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    bits = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// float32 -> bfloat16 bits with integer operations, rounded to nearest even as c10::BFloat16 and
// Tensor.to(torch.bfloat16) do, NaNs kept NaN (quieted); the lanes of m only.
BM_AVX2 BM_ALWAYS_INLINE void store_bf16(uint16_t* p, __m256 v, const Lanes& m) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(x, _mm256_set1_epi32(0x00400000)), nan);
  r = _mm256_srli_epi32(r, 16);
  // 8 x 32-bit -> 8 x 16-bit: packus works per 128-bit half, so gather the halves first.
  const __m128i bits = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  if (m.full) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), bits);
    const int n = __builtin_popcount(unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(m.mask))));
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
}

}  // namespace bigmodel::gemm::avx2

#endif  // x86-64 with GCC or Clang
