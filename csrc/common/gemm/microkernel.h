// bigmodel's GEMM core on AVX-512: register-blocked micro-kernels over packed B panels. The
// accumulators of one MR x 64 output tile are handed back in registers, so the caller's epilogue
// (LSTM gate math, softmax, bias, ...) runs on them before anything is written to memory.
//
// Panels (built by pack.h): B (K x N) is cut into panels of kNR = 64 columns,
//   float32   panel[k][64]                    K * 64 floats
//   bfloat16  panel[k / 2][64][2]             k pairs interleaved as vdpbf16ps reads them; an odd K
//                                             is padded with a zero row
// The packer chooses which source column lands in each panel column (or zero), so a caller can put
// the columns its epilogue combines side by side; the LSTM puts the four gates of 16 hidden units
// in one panel.
//
// A is read in place: MR rows at stride lda (float32, or bfloat16 bits with an even K available
// per row: the bf16 kernel reads k pairs as one 32-bit word).
//
// Everything here is compiled for AVX-512 through function attributes, whatever -march the build
// uses; call it only after cpu::has_avx512() (cpu::has_avx512_bf16() for the bf16 kernels) said yes.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BIGMODEL_HAS_AVX512_KERNELS 1

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#define BM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define BM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))
#define BM_AMX __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")))
#define BM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace bigmodel::gemm::avx512 {

constexpr int kNR = 64;  // panel width: four zmm registers of float32
constexpr int kMR = 6;   // rows per tile: 6 x 4 accumulators + 4 B vectors + 1 broadcast of 32 zmm

// Turn a run-time tile size into a template argument: f(std::integral_constant<int, n>{}).
// with_rows: n = mr in 1 .. kMR (larger counts run as kMR); with_vectors: n = 1 .. 4 zmm columns.
template <typename F>
inline void with_rows(int64_t mr, const F& f) {
  switch (mr) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, kMR>{}); break;
  }
}

template <typename F>
inline void with_vectors(int64_t nv, const F& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// n elements of storage starting on a 64-byte line (storage grows to fit): scratch for the aligned
// loads of panels and tiles.
template <typename T>
inline T* aligned(std::vector<T>& storage, int64_t n) {
  if (int64_t(storage.size()) < n + int64_t(64 / sizeof(T))) storage.resize(n + 64 / sizeof(T));
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
}

// A tile of MR rows x NV zmm columns (NV < 4: a panel's last, narrower columns).
template <int MR, int NV = 4>
BM_AVX512 BM_ALWAYS_INLINE void zero_tile(__m512 (&acc)[MR][NV]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
}

// acc[r][j] += sum_k A[r, k] * panel[k][16 j .. 16 j + 15]. A product over a K split in parts (the
// LSTM's [h_{t-1}, x_t] against [W_hh; W_ih]) is one zero_tile and one call per part.
template <int MR>
BM_AVX512 BM_ALWAYS_INLINE void tile_f32(const float* a, int64_t lda, int64_t K, const float* panel,
                                         __m512 (&acc)[MR][4]) {
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kNR;
    const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16);
    const __m512 w2 = _mm512_load_ps(w + 32), w3 = _mm512_load_ps(w + 48);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(av, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(av, w3, acc[r][3]);
    }
  }
}

// acc[r][j] += sum over k pairs kp < K2 of A's pair (r, kp) times B's pair row kp, columns
// 16 j .. 16 j + 15: bfloat16 A and B, float32 accumulation (vdpbf16ps: two k per FMA). A's pair
// (A[r, 2 kp], A[r, 2 kp + 1]) is the 32-bit word at a + r * lda + kp * kstride (bf16 units); B's pair
// row kp holds NV * 16 columns x 2 at b + kp * ldb (bf16 units). The caller zero-pads an odd K.
template <int MR, int NV>
BM_AVX512_BF16 BM_ALWAYS_INLINE void tile_bf16_rows(const uint16_t* a, int64_t lda, int64_t K2, const uint16_t* b,
                                                    int64_t ldb, __m512 (&acc)[MR][NV], int64_t kstride = 2) {
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512bh w[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) w[j] = (__m512bh)_mm512_loadu_si512(b + kp * ldb + 32 * j);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + kp * kstride, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, w[j]);
    }
  }
}

// The same product against a bf16 panel ([K2][64][2]): K2 = number of k pairs; kstride = 2 for rows
// of A in place (which must then hold 2 * K2 readable values, zero past the true K), 2 * M for A
// transposed with its row pairs interleaved ([K / 2][M][2], the LSTM backward's weight gradients).
template <int MR>
BM_AVX512_BF16 BM_ALWAYS_INLINE void tile_bf16(const uint16_t* a, int64_t lda, int64_t K2, const uint16_t* panel,
                                               __m512 (&acc)[MR][4], int64_t kstride = 2) {
  tile_bf16_rows<MR, 4>(a, lda, K2, panel, 2 * kNR, acc, kstride);
}

// acc[r][j] += sum_k A[r, k] * B[k, 16 j .. 16 j + 15] for B rows at stride ldb, NV * 16 columns each,
// and A(r, k) = a[r * lda + k * kstride]: attention's P V with V read in place (NV = dv / 16), its
// backward's P^T dO and dS^T Q (A read transposed, kstride = row length), and the LSTM backward's
// narrow last panels (ldb = 64) and weight gradients (dgates read transposed).
template <int MR, int NV>
BM_AVX512 BM_ALWAYS_INLINE void tile_f32_rows(const float* a, int64_t lda, int64_t K, const float* b, int64_t ldb,
                                              __m512 (&acc)[MR][NV], int64_t kstride = 1) {
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) w[j] = _mm512_loadu_ps(b + k * ldb + 16 * j);
    const float* ak = a + k * kstride;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(ak[r * lda]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(av, w[j], acc[r][j]);
    }
  }
}

// Loads / stores a tile from / to rows at stride ldc (an accumulating C kept in memory).
template <int MR, int NV>
BM_AVX512 BM_ALWAYS_INLINE void load_tile(const float* c, int64_t ldc, __m512 (&acc)[MR][NV]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_loadu_ps(c + r * ldc + 16 * j);
}

template <int MR, int NV>
BM_AVX512 BM_ALWAYS_INLINE void store_tile(const __m512 (&acc)[MR][NV], float* c, int64_t ldc) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
}

// The same with each row's last vector limited to the lanes `last`: C whose width is no multiple of 16
// (an attention head dim of 40 or 50) ends inside it, and the lanes past it are neither read nor written.
template <int MR, int NV>
BM_AVX512 BM_ALWAYS_INLINE void load_tile(const float* c, int64_t ldc, __m512 (&acc)[MR][NV], __mmask16 last) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      acc[r][j] = _mm512_maskz_loadu_ps(j == NV - 1 ? last : __mmask16(0xFFFF), c + r * ldc + 16 * j);
}

template <int MR, int NV>
BM_AVX512 BM_ALWAYS_INLINE void store_tile(const __m512 (&acc)[MR][NV], float* c, int64_t ldc, __mmask16 last) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      _mm512_mask_storeu_ps(c + r * ldc + 16 * j, j == NV - 1 ? last : __mmask16(0xFFFF), acc[r][j]);
}

// Spills a tile to an L1 buffer [MR][64]: epilogues that need many temporaries per row run from
// there instead of holding 24 accumulators in registers.
template <int MR>
BM_AVX512 BM_ALWAYS_INLINE void store_tile(const __m512 (&acc)[MR][4], float (*out)[kNR]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_store_ps(out[r] + 16 * j, acc[r][j]);
}

// ---- AMX (Sapphire Rapids and later): bf16 tiles of 16 rows x 32 k, 1024 FMAs per instruction ----
//
// The same bf16 panels serve AMX: a B tile (16 k pairs x 16 columns) is 16 rows of 64 bytes at a
// stride of 256 bytes inside a panel, so K must be a multiple of 32 per part (callers zero-pad).
// Tile registers are per thread: each worker loads the configuration before its first tile and
// releases it after its last (amx_configure / _tile_release).

struct alignas(64) AmxConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: float32 accumulators of 16 rows x 16 columns (one per 16-column quarter of a panel, or
// 2 row blocks x 2 quarters); tmm4, tmm7: A (16 rows x 32 bf16); tmm5, tmm6: B (16 k pairs x 16
// columns x 2).
BM_AMX inline void amx_configure() {
  AmxConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// acc tiles += A[16 rows at byte stride a_stride, 32 * kc32 k] x panel (K = 32 * kc32 of it).
BM_AMX BM_ALWAYS_INLINE void amx_panel(const uint16_t* a, int64_t a_stride, int64_t kc32, const uint16_t* panel) {
  for (int64_t kc = 0; kc < kc32; ++kc) {
    _tile_loadd(4, a + 32 * kc, a_stride);
    const uint16_t* b = panel + kc * 16 * (2 * kNR);
    _tile_loadd(5, b, 4 * kNR);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b + 32, 4 * kNR);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, b + 64, 4 * kNR);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, b + 96, 4 * kNR);
    _tile_dpbf16ps(3, 4, 6);
  }
}

// The 2 x 2 accumulator block (tmm0/1: rows 0-15, tmm2/3: rows 16-31; 16 columns each) += A rows
// (a0: block 0, a1: block 1, a_stride bytes apart, 32 k per tile) times B tiles b + kc * b_kstep and
// 32 elements after it (16 k pairs x 16 columns x 2, rows b_stride bytes apart), over kc32 k blocks.
BM_AMX BM_ALWAYS_INLINE void amx_2x2(const uint16_t* a0, const uint16_t* a1, int64_t a_stride, int64_t kc32,
                                     const uint16_t* b, int64_t b_kstep, int64_t b_stride) {
  for (int64_t kc = 0; kc < kc32; ++kc) {
    _tile_loadd(4, a0 + 32 * kc, a_stride);
    _tile_loadd(7, a1 + 32 * kc, a_stride);
    _tile_loadd(5, b + kc * b_kstep, b_stride);
    _tile_loadd(6, b + kc * b_kstep + 32, b_stride);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(2, 7, 5);
    _tile_dpbf16ps(3, 7, 6);
  }
}

// Two 16-row blocks (A rows from a0 and a1) against half a panel (quarters q, q + 1) with amx_2x2:
// each B tile feeds two products, halving the weight traffic of amx_panel.
BM_AMX BM_ALWAYS_INLINE void amx_half_panel2(const uint16_t* a0, const uint16_t* a1, int64_t a_stride, int64_t kc32,
                                             const uint16_t* panel, int q) {
  amx_2x2(a0, a1, a_stride, kc32, panel + 32 * q, 16 * (2 * kNR), 4 * kNR);
}

// The 2 x 2 accumulator block from / to 32 rows x 32 floats at c, rows ldc bytes apart.
BM_AMX BM_ALWAYS_INLINE void amx_load_2x2(const float* c, int64_t ldc) {
  const int64_t down = 16 * ldc / int64_t(sizeof(float));
  _tile_loadd(0, c, ldc);
  _tile_loadd(1, c + 16, ldc);
  _tile_loadd(2, c + down, ldc);
  _tile_loadd(3, c + down + 16, ldc);
}

BM_AMX BM_ALWAYS_INLINE void amx_store_2x2(float* c, int64_t ldc) {
  const int64_t down = 16 * ldc / int64_t(sizeof(float));
  _tile_stored(0, c, ldc);
  _tile_stored(1, c + 16, ldc);
  _tile_stored(2, c + down, ldc);
  _tile_stored(3, c + down + 16, ldc);
}

// The accumulators of amx_half_panel2 to an L1 buffer [32][64] at columns 16 q ...
BM_AMX BM_ALWAYS_INLINE void amx_store_half2(float (*out)[kNR], int q) { amx_store_2x2(out[0] + 16 * q, 4 * kNR); }

BM_AMX BM_ALWAYS_INLINE void amx_zero() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// The four accumulators to an L1 buffer [16][64].
BM_AMX BM_ALWAYS_INLINE void amx_store(float (*out)[kNR]) {
  _tile_stored(0, out[0], 4 * kNR);
  _tile_stored(1, out[0] + 16, 4 * kNR);
  _tile_stored(2, out[0] + 32, 4 * kNR);
  _tile_stored(3, out[0] + 48, 4 * kNR);
}

// ---- vector math for epilogues ----

// e^(s x) for s = 1, -1 or -2 (the LSTM's gates need e^-x and e^-2x, softmax e^x), with x clamped
// here to |s x| <= 87, as the AVX2 version does: e^87 is finite and e^-87 (1.6e-38) is below what
// sigmoid's 1 + e^-x, tanh's 1 + e^-2x or a softmax sum can see; a huge x (|x| > ~1e15, a diverging
// model) would otherwise give NaN, because n = round(s x / ln2) loses the integer, t grows and the
// polynomial overflows to inf - inf. The clamp puts the constants first: vmaxps/vminps return their
// second operand when either is NaN, so a NaN stays NaN (as in PyTorch) rather than turning into a
// finite clamp value. s x = n ln2 + r with n = round(s x / ln2); then r = s (x - n ln2 / s) = s t, and
// e^r is a Taylor polynomial in r (|r| <= ln2/2) written as a polynomial in t with the powers of s
// folded into its coefficients, so neither s x nor r is ever formed. A single float ln2 in the FMA
// leaves |r| error below n * 2e-9; vscalefps puts the exponent back and underflows to 0 for very
// negative s x.
// kFast: for epilogues whose results are rounded to bfloat16 (relative step 2^-8): degree 4
// (truncation < 5e-5 relative) instead of 6 (< 1e-7).
template <int S, bool kFast = false>
BM_AVX512 BM_ALWAYS_INLINE __m512 exp_scaled_ps(__m512 x) {
  static_assert(S == 1 || S == -1 || S == -2);
  constexpr float s = S;
  constexpr float lim = 87.f / (S < 0 ? -s : s);
  x = _mm512_min_ps(_mm512_set1_ps(lim), _mm512_max_ps(_mm512_set1_ps(-lim), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(s * 1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 t = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f / s), x);
  __m512 p;
  if constexpr (kFast) {
    p = _mm512_set1_ps(s * s * s * s / 24);
  } else {
    p = _mm512_set1_ps(s * s * s * s * s * s / 720);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(s * s * s * s * s / 120));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(s * s * s * s / 24));
  }
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(s * s * s / 6));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(s * s / 2));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(s));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 1 / d for d >= 1: vrcp14ps (relative error < 6.1e-5), refined by one Newton step (~1e-8) unless
// kFast.
template <bool kFast = false>
BM_AVX512 BM_ALWAYS_INLINE __m512 recip_ps(__m512 d) {
  const __m512 y = _mm512_rcp14_ps(d);
  if constexpr (kFast) return y;
  return _mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.f)));
}

// 1 / (1 + e^-x): exactly 1 for large x (e^-x underflows), NaN for NaN (exp_scaled_ps clamps).
template <bool kFast = false>
BM_AVX512 BM_ALWAYS_INLINE __m512 sigmoid_ps(__m512 x) {
  return recip_ps<kFast>(_mm512_add_ps(_mm512_set1_ps(1.f), exp_scaled_ps<-1, kFast>(x)));
}

// tanh(x) = 2 / (1 + e^-2x) - 1: absolute error at float32 rounding level (kFast: ~1e-4); exactly
// +-1 for large |x|, NaN for NaN (exp_scaled_ps clamps).
template <bool kFast = false>
BM_AVX512 BM_ALWAYS_INLINE __m512 tanh_ps(__m512 x) {
  const __m512 sig2 = recip_ps<kFast>(_mm512_add_ps(_mm512_set1_ps(1.f), exp_scaled_ps<-2, kFast>(x)));
  return _mm512_fmsub_ps(_mm512_set1_ps(2.f), sig2, _mm512_set1_ps(1.f));
}

// ---- masked loads and stores of 16 lanes (n < 16 touches only the first n) ----

BM_AVX512 BM_ALWAYS_INLINE __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

BM_AVX512 BM_ALWAYS_INLINE __m512 load_f32(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

BM_AVX512 BM_ALWAYS_INLINE void store_f32(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

// bfloat16 bits -> float32: the bits are the float's upper half.
BM_AVX512 BM_ALWAYS_INLINE __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// float32 -> bfloat16 bits, rounded to nearest even (vcvtneps2bf16).
BM_AVX512_BF16 BM_ALWAYS_INLINE void store_bf16(uint16_t* p, __m512 v, __mmask16 m) {
  const __m256bh b = _mm512_cvtneps_pbh(v);
  __m256i bits;
  std::memcpy(&bits, &b, sizeof(bits));
  _mm256_mask_storeu_epi16(p, m, bits);
}

// float32 -> bfloat16 bits with integer operations (AVX-512 F/BW only, for CPUs without AVX512-BF16):
// round to nearest even as c10::BFloat16 and Tensor.to(torch.bfloat16) do, NaNs kept NaN (quieted).
BM_AVX512 BM_ALWAYS_INLINE void store_bf16_rne(uint16_t* p, __m512 v, __mmask16 m) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(x, _mm512_set1_epi32(0x00400000)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

// Two float32 vectors rounded to bf16 and interleaved lane by lane as 32-bit pairs (lo in the low
// half): the k-pair layout of AMX / vdpbf16ps B operands, for rows k and k + 1.
BM_AVX512_BF16 BM_ALWAYS_INLINE __m512i bf16_pairs(__m512 lo, __m512 hi) {
  const __m256bh l = _mm512_cvtneps_pbh(lo), h = _mm512_cvtneps_pbh(hi);
  __m256i lb, hb;
  std::memcpy(&lb, &l, sizeof(lb));
  std::memcpy(&hb, &h, sizeof(hb));
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lb), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hb), 16));
}

}  // namespace bigmodel::gemm::avx512

#endif  // x86-64 with GCC or Clang
