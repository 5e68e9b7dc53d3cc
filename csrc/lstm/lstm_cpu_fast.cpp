// The LSTM time loop on the AVX-512 and AVX2 micro-kernels (design in lstm_cpu_fast.h). One loop
// skeleton per direction (forward_steps, backward_steps) runs either kernel set.
#include "lstm/lstm_cpu_fast.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/gemm/microkernel.h"
#include "common/gemm/microkernel_avx2.h"

#ifdef BIGMODEL_HAS_AVX512_KERNELS

namespace bigmodel::lstm::fast {
namespace {

namespace mk = bigmodel::gemm::avx512;
namespace m2 = bigmodel::gemm::avx2;
constexpr int64_t kUnits = mk::kNR / 4;  // hidden units per forward panel
static_assert(m2::kNR == mk::kNR, "both kernel sets read the same panels");
static_assert(kAvx2GateRows == m2::kGateMR && kAvx2BackwardRows == m2::kQuarterMR);

// Near-equal blocks for n rows: of at most `rows` rows, or of up to `tall` (> rows) where that takes
// fewer blocks than blocks of `rows` averaging under rows - 1 (n = 7, 8 as one block, 13, 14 as two,
// 19 as three): the forward's and the backward's rule for their two-pass tall tiles.
inline int64_t block_count(int64_t n, int64_t rows, int64_t tall = 0) {
  const int64_t nb = (n + rows - 1) / rows;
  if (tall > rows && n < (rows - 1) * nb) return std::min(nb, (n + tall - 1) / tall);
  return nb;
}

// The rows a worker of row group rg owns at a step with b active rows: rg, rg + R, ... < b, cut into
// near-equal blocks (block_count). Calls body(first_row, rows) per block.
template <typename F>
inline void for_each_row_block(int64_t b, int64_t rg, int64_t R, const F& body, int64_t max_rows = mk::kMR,
                               int64_t tall_rows = 0) {
  if (b <= rg) return;
  const int64_t n = (b - rg + R - 1) / R;
  const int64_t nblk = block_count(n, max_rows, tall_rows);
  for (int64_t k = 0; k < nblk; ++k) {
    const int64_t i0 = k * n / nblk, i1 = (k + 1) * n / nblk;
    body(rg + R * i0, i1 - i0);
  }
}

inline int64_t split(int64_t n, int64_t parts, int64_t i) { return i * n / parts; }

// ---- forward ----

// A vector of the forward's output or of its saved gates and cells, float32 or bf16 bits. bf16:
// vcvtneps2bf16 from the bf16 tiles; integer rounding (the same bits) from the float32 tiles, which
// also run bf16 layers on AVX-512 CPUs without AVX512-BF16.
template <bool kBf16Tiles>
BM_AVX512 BM_ALWAYS_INLINE void store_out(float* p, __m512 v, __mmask16 m) { mk::store_f32(p, v, m); }
template <bool kBf16Tiles>
BM_AVX512_BF16 BM_ALWAYS_INLINE void store_out(uint16_t* p, __m512 v, __mmask16 m) {
  if constexpr (kBf16Tiles)
    mk::store_bf16(p, v, m);
  else
    mk::store_bf16_rne(p, v, m);
}

// The cell update of rows r0, r0 + rstride, ... (mr of them) and hidden units 16p .. 16p + 15, from
// their pre-activations in tile[i] (gates i, f, g, o at columns 0, 16, 32, 48; kGS = 8: at 0, 8, 16,
// 24, for a half-width panel of at most 8 units), bias not yet added. kBf16: bf16 tiles (h kept as
// bf16, the faster nonlinearities); kOutBf16: the output and the saved gates and cells are bf16 (also
// on float32 tiles: a bf16 layer where vdpbf16ps does not pay).
template <bool kBf16, bool kTrain, int kGS = 16, bool kOutBf16 = kBf16>
BM_AVX512_BF16 BM_ALWAYS_INLINE void cell_update(const ForwardArgs& a, int64_t off, int64_t r0, int64_t mr,
                                                 int64_t rstride, int64_t p, const float (*tile)[mk::kNR], void* hn) {
  const int64_t H = a.steps.H, G = 4 * H, Kh = a.Kh;
  const int64_t u0 = p * kUnits;
  const __mmask16 m = mk::lanes(H - u0);
  __m512 bias[4];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g)
    bias[g] = a.bias != nullptr ? mk::load_f32(a.bias + g * H + u0, m) : _mm512_setzero_ps();
  for (int64_t i = 0; i < mr; ++i) {
    const int64_t r = r0 + i * rstride, row = off + r;
    const __m512 ig = mk::sigmoid_ps<kBf16>(_mm512_add_ps(mk::load_f32(tile[i], m), bias[0]));
    const __m512 fg = mk::sigmoid_ps<kBf16>(_mm512_add_ps(mk::load_f32(tile[i] + kGS, m), bias[1]));
    const __m512 gg = mk::tanh_ps<kBf16>(_mm512_add_ps(mk::load_f32(tile[i] + 2 * kGS, m), bias[2]));
    const __m512 og = mk::sigmoid_ps<kBf16>(_mm512_add_ps(mk::load_f32(tile[i] + 3 * kGS, m), bias[3]));
    const int64_t sr = state_row(a, r);
    float* cp = a.c + sr * H + u0;  // bf16: h is rounded every step, so the kFast math suffices
    const __m512 cn = _mm512_fmadd_ps(fg, mk::load_f32(cp, m), _mm512_mul_ps(ig, gg));
    const __m512 hv = _mm512_mul_ps(og, mk::tanh_ps<kBf16>(cn));
    mk::store_f32(cp, cn, m);
    if constexpr (kBf16)
      mk::store_bf16(static_cast<uint16_t*>(hn) + sr * Kh + u0, hv, m);
    else
      mk::store_f32(static_cast<float*>(hn) + sr * Kh + u0, hv, m);
    // The output, and the saved gates and cells (the saved dtype: bf16 for bf16 layers, half the
    // bytes of the largest stream), in the layer's storage type.
    using S = std::conditional_t<kOutBf16, uint16_t, float>;
    store_out<kBf16>(static_cast<S*>(a.hout) + row * H + u0, hv, m);
    if constexpr (kTrain) {
      S* gp = static_cast<S*>(a.gates) + row * G + u0;
      store_out<kBf16>(gp, ig, m);
      store_out<kBf16>(gp + H, fg, m);
      store_out<kBf16>(gp + 2 * H, gg, m);
      store_out<kBf16>(gp + 3 * H, og, m);
      store_out<kBf16>(static_cast<S*>(a.cells) + row * H + u0, cn, m);
    }
  }
}

// What a forward tile multiplies: panel p of the packed [W_hh; W_ih] and the h and x rows of its first
// row r0 (T: float, or uint16_t bf16 bits; the others follow at stride Kh and rstride * Kx).
template <typename T>
struct TileOperands {
  const T* panel;
  const T* h;
  const T* x;
};

template <typename T>
inline TileOperands<T> tile_operands(const ForwardArgs& a, int64_t off, int64_t r0, int64_t p, const void* hp) {
  return {static_cast<const T*>(a.panels) + p * (a.Kh + a.Kx) * mk::kNR,
          static_cast<const T*>(hp) + state_row(a, r0) * a.Kh, static_cast<const T*>(a.x) + (off + r0) * a.Kx};
}

// One register tile and its cell update. Compiled with the BF16 target for both paths, since one
// body serves both; the float32-tile instantiations (float32 layers, and bf16 layers kept as bf16 in
// memory) contain no BF16 instruction (those sit under `if constexpr`), so they run on any AVX-512 CPU.
template <bool kBf16, bool kTrain, int MR, bool kOutBf16 = kBf16>
BM_AVX512_BF16 void forward_tile(const ForwardArgs& a, int64_t off, int64_t r0, int64_t rstride, int64_t p,
                                 const void* hp, void* hn) {
  const int64_t Kh = a.Kh, Kx = a.Kx;
  __m512 acc[MR][4];
  mk::zero_tile<MR>(acc);
  if constexpr (kBf16) {
    const auto o = tile_operands<uint16_t>(a, off, r0, p, hp);
    mk::tile_bf16<MR>(o.h, Kh, Kh / 2, o.panel, acc);
    mk::tile_bf16<MR>(o.x, rstride * Kx, Kx / 2, o.panel + Kh * mk::kNR, acc);
  } else {
    const auto o = tile_operands<float>(a, off, r0, p, hp);
    mk::tile_f32<MR>(o.h, Kh, Kh, o.panel, acc);
    mk::tile_f32<MR>(o.x, rstride * Kx, Kx, o.panel + Kh * mk::kNR, acc);
  }
  alignas(64) float tile[MR][mk::kNR];
  mk::store_tile<MR>(acc, tile);
  cell_update<kBf16, kTrain, 16, kOutBf16>(a, off, r0, MR, rstride, p, tile, hn);
}

// The half-width last panel (float32): two zmm columns hold the i, f, g, o pre-activations of its at
// most 8 units (gemm::gate_grouped_columns with half_last), half the FMAs of a full tile.
template <bool kTrain, int MR, bool kOutBf16>
BM_AVX512_BF16 void forward_tile_half(const ForwardArgs& a, int64_t off, int64_t r0, int64_t rstride, int64_t p,
                                      const void* hp, void* hn) {
  const int64_t Kh = a.Kh, Kx = a.Kx;
  __m512 acc[MR][2];
  mk::zero_tile(acc);
  const auto o = tile_operands<float>(a, off, r0, p, hp);
  mk::tile_f32_rows<MR, 2>(o.h, Kh, Kh, o.panel, mk::kNR, acc);
  mk::tile_f32_rows<MR, 2>(o.x, rstride * Kx, Kx, o.panel + Kh * mk::kNR, mk::kNR, acc);
  alignas(64) float tile[MR][mk::kNR];
  mk::store_tile(acc, tile[0], mk::kNR);
  cell_update<false, kTrain, 8, kOutBf16>(a, off, r0, MR, rstride, p, tile, hn);
}

// 7 .. kTallRows rows (float32): the panel in two half-width passes, gates i, f (columns 0 .. 31) and
// then g, o, so that 2 x MR accumulators fit the registers. Each panel byte read from L2/L3 then feeds
// up to 8 rows rather than 6; the cell update reads the tile both passes leave in L1.
template <bool kTrain, int MR, bool kOutBf16>
BM_AVX512_BF16 void forward_tile_tall(const ForwardArgs& a, int64_t off, int64_t r0, int64_t rstride, int64_t p,
                                      const void* hp, void* hn) {
  const int64_t Kh = a.Kh, Kx = a.Kx;
  const auto o = tile_operands<float>(a, off, r0, p, hp);
  alignas(64) float tile[MR][mk::kNR];
  for (int half = 0; half < 2; ++half) {
    __m512 acc[MR][2];
    mk::zero_tile(acc);
    mk::tile_f32_rows<MR, 2>(o.h, Kh, Kh, o.panel + 32 * half, mk::kNR, acc);
    mk::tile_f32_rows<MR, 2>(o.x, rstride * Kx, Kx, o.panel + Kh * mk::kNR + 32 * half, mk::kNR, acc);
    mk::store_tile(acc, tile[0] + 32 * half, mk::kNR);
  }
  cell_update<false, kTrain, 16, kOutBf16>(a, off, r0, MR, rstride, p, tile, hn);
}

// with_rows for the tall tiles: n = mr in kMR + 1 .. kTallRows.
template <typename F>
inline void with_tall_rows(int64_t mr, const F& f) {
  static_assert(kTallRows == 8);
  if (mr == 7)
    f(std::integral_constant<int, 7>{});
  else
    f(std::integral_constant<int, 8>{});
}

// The AMX tile: always 16 rows of A (rows past the block are padding the buffers provide), of which
// the first mr are used.
template <bool kTrain>
BM_AMX void forward_tile_amx(const ForwardArgs& a, int64_t off, int64_t r0, int64_t mr, int64_t rstride,
                             int64_t p, const void* hp, void* hn) {
  const int64_t Kh = a.Kh, Kx = a.Kx;
  const auto o = tile_operands<uint16_t>(a, off, r0, p, hp);
  mk::amx_zero();
  mk::amx_panel(o.h, Kh * 2, Kh / 32, o.panel);
  mk::amx_panel(o.x, rstride * Kx * 2, Kx / 32, o.panel + Kh * mk::kNR);
  alignas(64) float tile[16][mk::kNR];
  mk::amx_store(tile);
  cell_update<true, kTrain>(a, off, r0, mr, rstride, p, tile, hn);
}

// 17..32 rows: two row blocks share every B tile, half a panel at a time.
template <bool kTrain>
BM_AMX void forward_tile_amx2(const ForwardArgs& a, int64_t off, int64_t r0, int64_t mr, int64_t rstride,
                              int64_t p, const void* hp, void* hn) {
  const int64_t Kh = a.Kh, Kx = a.Kx;
  const auto [panel, h0, x0] = tile_operands<uint16_t>(a, off, r0, p, hp);
  const int64_t h_next = 16 * Kh, x_next = 16 * rstride * Kx;  // the second block's first row
  alignas(64) float tile[2 * 16][mk::kNR];
  for (int q = 0; q < 4; q += 2) {
    mk::amx_zero();
    mk::amx_half_panel2(h0, h0 + h_next, Kh * 2, Kh / 32, panel, q);
    mk::amx_half_panel2(x0, x0 + x_next, rstride * Kx * 2, Kx / 32, panel + Kh * mk::kNR, q);
    mk::amx_store_half2(tile, q);
  }
  cell_update<true, kTrain>(a, off, r0, mr, rstride, p, tile, hn);
}

// The forward time loop, shared by the register-tile and AMX paths: per step, every worker's tiles
// tile(off, r0, mr, p, hp, hn) over its row blocks (for_each_row_block: at most max_rows rows, or up to
// tall_rows where blocks would be small) and panels, then the
// column groups' barrier. Row blocks outer keeps a block's h rows in L1 across the panels; panels
// outer reads each panel from L2/L3 once per step for all row blocks, which wins once a worker's
// panels are too big to stay near (measured: small shape 2.5 vs 3.0 ms, long 67.5 vs 61.5 ms).
template <typename Tile>
void forward_steps(const ForwardArgs& a, int64_t w0, int64_t w1, int64_t max_rows, bool panels_outer,
                   const Tile& tile, int64_t tall_rows = 0) {
  const Steps& st = a.steps;
  const int64_t R = a.grid.R, C = a.grid.C;
  const int64_t np = (st.H + kUnits - 1) / kUnits;
  for (int64_t s = 0; s < st.T; ++s) {
    const int64_t t = st.reverse ? st.T - 1 - s : s;
    const int64_t b = st.batch_sizes[t], off = st.offsets[t];
    const void* hp = a.h[s & 1];
    void* hn = a.h[(s & 1) ^ 1];
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t rg = w / C, cg = w % C;
      const int64_t p0 = split(np, C, cg), p1 = split(np, C, cg + 1);
      if (panels_outer) {
        for (int64_t p = p0; p < p1; ++p)
          for_each_row_block(
              b, rg, R, [&](int64_t r0, int64_t mr) { tile(off, r0, mr, p, hp, hn); }, max_rows, tall_rows);
      } else {
        for_each_row_block(
            b, rg, R,
            [&](int64_t r0, int64_t mr) {
              for (int64_t p = p0; p < p1; ++p) tile(off, r0, mr, p, hp, hn);
            },
            max_rows, tall_rows);
      }
    }
    if (C > 1) a.barrier->arrive_and_wait(w1 - w0);
  }
}

// Float32 tiles take blocks of 7 and 8 rows as tall tiles where the grid allows them (grid.rows).
template <bool kBf16, bool kTrain, bool kOutBf16 = kBf16>
void forward_loop(const ForwardArgs& a, int64_t w0, int64_t w1) {
  forward_steps(
      a, w0, w1, mk::kMR, a.panels_outer,
      [&](int64_t off, int64_t r0, int64_t mr, int64_t p, const void* hp, void* hn) {
        if constexpr (!kBf16) {
          if (mr > mk::kMR) {
            with_tall_rows(mr, [&](auto rows) {
              constexpr int MR = decltype(rows)::value;
              if (p == a.half_panel)
                forward_tile_half<kTrain, MR, kOutBf16>(a, off, r0, a.grid.R, p, hp, hn);
              else
                forward_tile_tall<kTrain, MR, kOutBf16>(a, off, r0, a.grid.R, p, hp, hn);
            });
            return;
          }
        }
        mk::with_rows(mr, [&](auto rows) {
          constexpr int MR = decltype(rows)::value;
          if (!kBf16 && p == a.half_panel)
            forward_tile_half<kTrain, MR, kOutBf16>(a, off, r0, a.grid.R, p, hp, hn);
          else
            forward_tile<kBf16, kTrain, MR, kOutBf16>(a, off, r0, a.grid.R, p, hp, hn);
        });
      },
      kBf16 ? 0 : a.grid.rows);
}

// AMX keeps row blocks outer: the loop-order rule above was measured on the register-tile path.
template <bool kTrain>
BM_AMX void forward_loop_amx(const ForwardArgs& a, int64_t w0, int64_t w1) {
  mk::amx_configure();
  forward_steps(a, w0, w1, kAmxRows, false,
                [&](int64_t off, int64_t r0, int64_t mr, int64_t p, const void* hp, void* hn) {
                  if (mr > 16)
                    forward_tile_amx2<kTrain>(a, off, r0, mr, a.grid.R, p, hp, hn);
                  else
                    forward_tile_amx<kTrain>(a, off, r0, mr, a.grid.R, p, hp, hn);
                });
  _tile_release();
}

// ---- forward on AVX2 ----
//
// Half h of panel p (gate_half_grouped_columns) holds the i, f, g, o columns of units 16 p + 8 h .. + 7,
// stored as strips: the panel's four quarters one after another, each [Kh + Kx, 16]. Two gate-pair tiles
// (strips 2 h and 2 h + 1: i, f, then g, o) fill a [MR][32] buffer for the cell update.

// Gate g's pre-activation: the tile's columns plus the bias and, where the input's part was computed
// before the loop (a.gx), the row's x W_ih^T + b (gx_g: nullptr otherwise).
BM_AVX2 BM_ALWAYS_INLINE __m256 preactivation_avx2(const float* tile, __m256 bias, const float* gx_g,
                                                   const m2::Lanes& m) {
  const __m256 v = _mm256_add_ps(_mm256_load_ps(tile), bias);
  return gx_g != nullptr ? _mm256_add_ps(v, m2::load_f32(gx_g, m)) : v;
}

// Saved gates, cells and the output as float32 or bf16 bits (a bf16 layer's), 8 lanes.
BM_AVX2 BM_ALWAYS_INLINE __m256 load_avx2(const float* p, const m2::Lanes& m) { return m2::load_f32(p, m); }
BM_AVX2 BM_ALWAYS_INLINE __m256 load_avx2(const uint16_t* p, const m2::Lanes& m) { return m2::load_bf16(p, m); }
BM_AVX2 BM_ALWAYS_INLINE void store_avx2(float* p, __m256 v, const m2::Lanes& m) { m2::store_f32(p, v, m); }
BM_AVX2 BM_ALWAYS_INLINE void store_avx2(uint16_t* p, __m256 v, const m2::Lanes& m) { m2::store_bf16(p, v, m); }

// The cell update of rows r0, r0 + rstride, ... (mr of them) and hidden units u0 .. u0 + 7, from their
// pre-activations in tile[i] (gates i, f, g, o at columns 0, 8, 16, 24), bias (and gx) not yet added.
// kOutBf16 (a bf16 layer): the output and the saved gates and cells stored as bf16 bits; h and c stay
// float32.
template <bool kTrain, bool kOutBf16>
BM_AVX2 BM_ALWAYS_INLINE void cell_update_avx2(const ForwardArgs& a, int64_t off, int64_t r0, int64_t mr,
                                               int64_t rstride, int64_t u0, const float (*tile)[32], void* hn) {
  const int64_t H = a.steps.H, G = 4 * H, Kh = a.Kh;
  const m2::Lanes m = m2::lanes(H - u0);
  __m256 bias[4];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g)
    bias[g] = a.bias != nullptr ? m2::load_f32(a.bias + g * H + u0, m) : _mm256_setzero_ps();
  for (int64_t i = 0; i < mr; ++i) {
    const int64_t r = r0 + i * rstride, row = off + r;
    const float* gx = a.gx != nullptr ? a.gx + row * G + u0 : nullptr;
    const auto at_gate = [&](int g) { return gx != nullptr ? gx + g * H : nullptr; };
    const __m256 ig = m2::sigmoid_ps(preactivation_avx2(tile[i], bias[0], at_gate(0), m));
    const __m256 fg = m2::sigmoid_ps(preactivation_avx2(tile[i] + 8, bias[1], at_gate(1), m));
    const __m256 gg = m2::tanh_ps(preactivation_avx2(tile[i] + 16, bias[2], at_gate(2), m));
    const __m256 og = m2::sigmoid_ps(preactivation_avx2(tile[i] + 24, bias[3], at_gate(3), m));
    const int64_t sr = state_row(a, r);
    float* cp = a.c + sr * H + u0;
    const __m256 cn = _mm256_fmadd_ps(fg, m2::load_f32(cp, m), _mm256_mul_ps(ig, gg));
    const __m256 hv = _mm256_mul_ps(og, m2::tanh_ps(cn));
    m2::store_f32(cp, cn, m);
    m2::store_f32(static_cast<float*>(hn) + sr * Kh + u0, hv, m);
    using Out = std::conditional_t<kOutBf16, uint16_t, float>;
    store_avx2(static_cast<Out*>(a.hout) + row * H + u0, hv, m);
    if constexpr (kTrain) {
      Out* gp = static_cast<Out*>(a.gates) + row * G + u0;
      store_avx2(gp, ig, m);
      store_avx2(gp + H, fg, m);
      store_avx2(gp + 2 * H, gg, m);
      store_avx2(gp + 3 * H, og, m);
      store_avx2(static_cast<Out*>(a.cells) + row * H + u0, cn, m);
    }
  }
}

// Panel p for MR rows: both halves and their cell updates (the second half is absent when the last
// panel holds 8 units or fewer). Strip q = 2 h + g2; few rows multiply several strips per K pass
// (in_strip_groups), each column's sum in the same order whatever the grouping.
template <bool kTrain, bool kOutBf16, int MR>
BM_AVX2 void forward_tile_avx2(const ForwardArgs& a, int64_t off, int64_t r0, int64_t rstride, int64_t p,
                               const void* hp, void* hn) {
  const int64_t Kh = a.Kh, Kx = a.Kx, lds = (Kh + Kx) * 16;
  const auto [panel, h_rows, x_rows] = tile_operands<float>(a, off, r0, p, hp);  // m2::kNR == mk::kNR
  const int halves = p * kUnits + 8 < a.steps.H ? 2 : 1;
  alignas(32) float tile[2][MR][32];
  m2::in_strip_groups<MR>(2 * halves, [&](int64_t q0, auto strips) BM_AVX2 {
    constexpr int S = decltype(strips)::value;
    __m256 acc[MR][2 * S];
    m2::zero_tile<MR, 2 * S>(acc);
    const float* strip = panel + q0 * lds;
    m2::strips_tile_f32<MR, S>(h_rows, Kh, 1, Kh, strip, 16, lds, acc);
    m2::strips_tile_f32<MR, S>(x_rows, rstride * Kx, 1, Kx, strip + Kh * 16, 16, lds, acc);
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      const int64_t q = q0 + s;  // gates i, f (g2 = 0), then g, o of half q / 2
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        _mm256_store_ps(tile[q / 2][r] + 16 * (q % 2), acc[r][2 * s]);
        _mm256_store_ps(tile[q / 2][r] + 16 * (q % 2) + 8, acc[r][2 * s + 1]);
      }
    }
  });
  for (int h = 0; h < halves; ++h)
    cell_update_avx2<kTrain, kOutBf16>(a, off, r0, MR, rstride, p * kUnits + 8 * h, tile[h], hn);
}

template <bool kTrain, bool kOutBf16>
void forward_loop_avx2(const ForwardArgs& a, int64_t w0, int64_t w1) {
  forward_steps(a, w0, w1, kAvx2GateRows, a.panels_outer,
                [&](int64_t off, int64_t r0, int64_t mr, int64_t p, const void* hp, void* hn) {
                  m2::with_rows<m2::kGateMR>(mr, [&](auto rows) {
                    forward_tile_avx2<kTrain, kOutBf16, decltype(rows)::value>(a, off, r0, a.grid.R, p, hp, hn);
                  });
                });
}

// ---- backward ----

// The previous state's rows of sorted row r at step t: h_{t-1}/c_{t-1} rows of the packed forward
// output, or h0/c0 where r starts at t.
inline int64_t prev_row(const Steps& st, int64_t t, int64_t r) {
  const int64_t tp = st.reverse ? t + 1 : t - 1;
  if (tp < 0 || tp >= st.T || r >= st.batch_sizes[tp]) return -1;
  return st.offsets[tp] + r;
}

// Saved gates and cells, float32 or bf16 bits, as float32.
BM_AVX512 BM_ALWAYS_INLINE __m512 load_saved(const float* p, __mmask16 m) { return mk::load_f32(p, m); }
BM_AVX512 BM_ALWAYS_INLINE __m512 load_saved(const uint16_t* p, __mmask16 m) { return mk::load_bf16(p, m); }

// Pointwise derivative of sorted row r (packed row `row`) over hidden units [u_begin, u_end):
// dgates into dg (the row's 4H values), dc carried back; dbias += dgates when given. S: the saved
// gates' and cells' storage (float, or uint16_t bf16 bits).
template <typename S>
BM_AVX512 void pointwise_row(const BackwardArgs& a, int64_t t, int64_t r, int64_t row, float* dg, float* dbias,
                             int64_t u_begin, int64_t u_end) {
  const Steps& st = a.steps;
  const int64_t H = st.H, G = 4 * H;
  const int64_t pr = prev_row(st, t, r);
  const S* cells = static_cast<const S*>(a.cells);
  const S* g = static_cast<const S*>(a.gates) + row * G;
  const int64_t sr = state_row(a, r);
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t u = u_begin; u < u_end; u += 16) {
    const __mmask16 m = mk::lanes(u_end - u);
    const __m512 ig = load_saved(g + u, m), fg = load_saved(g + H + u, m);
    const __m512 gg = load_saved(g + 2 * H + u, m), og = load_saved(g + 3 * H + u, m);
    const __m512 tc = mk::tanh_ps(load_saved(cells + row * H + u, m));
    const __m512 cprev = pr >= 0 ? load_saved(cells + pr * H + u, m) : mk::load_f32(a.c0 + r * H + u, m);
    __m512 dh = mk::load_f32(a.dh + sr * H + u, m);
    if (a.grad_out != nullptr) dh = _mm512_add_ps(dh, mk::load_f32(a.grad_out + row * H + u, m));
    const __m512 dc =
        _mm512_fmadd_ps(_mm512_mul_ps(dh, og), _mm512_fnmadd_ps(tc, tc, one), mk::load_f32(a.dc + sr * H + u, m));
    __m512 d[4];
    d[0] = _mm512_mul_ps(_mm512_mul_ps(dc, gg), _mm512_mul_ps(ig, _mm512_sub_ps(one, ig)));
    d[1] = _mm512_mul_ps(_mm512_mul_ps(dc, cprev), _mm512_mul_ps(fg, _mm512_sub_ps(one, fg)));
    d[2] = _mm512_mul_ps(_mm512_mul_ps(dc, ig), _mm512_fnmadd_ps(gg, gg, one));
    d[3] = _mm512_mul_ps(_mm512_mul_ps(dh, tc), _mm512_mul_ps(og, _mm512_sub_ps(one, og)));
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      mk::store_f32(dg + q * H + u, d[q], m);
      if (dbias != nullptr)
        mk::store_f32(dbias + q * H + u, _mm512_add_ps(mk::load_f32(dbias + q * H + u, m), d[q]), m);
    }
    mk::store_f32(a.dc + sr * H + u, _mm512_mul_ps(dc, fg), m);
  }
}

// Columns col .. col + 15 of [dh, dx] for sorted row r (packed row off + r): dh into the running
// state, dx into the packed input gradient. A 16-column group may straddle the dh | dx boundary:
// masks split it.
BM_AVX512 BM_ALWAYS_INLINE void store_grad_state(const BackwardArgs& a, int64_t off, int64_t r, int64_t col,
                                                 __m512 v) {
  const int64_t H = a.steps.H, F = H + a.I;
  const __mmask16 valid = mk::lanes(F - col);
  const __mmask16 to_dh = col >= H ? __mmask16(0) : __mmask16(mk::lanes(H - col) & valid);
  const __mmask16 to_dx = __mmask16(valid & ~to_dh);
  if (to_dh) _mm512_mask_storeu_ps(a.dh + state_row(a, r) * H + col, to_dh, v);
  if (to_dx && a.dx) _mm512_mask_storeu_ps(a.dx + (off + r) * a.I + col - H, to_dx, v);
}

// [dh, dx] for MR rows: columns 64 p .. 64 p + 16 NV - 1 of dgates [W_hh, W_ih]. A = dgates rows at
// stride lda; out row i is sorted row r0 + i * rstride (packed row off + r0 + i * rstride).
// Tall blocks (7 or 8 rows) run a panel as two such tiles of two vectors each: v0 = 0, then 2.
template <int MR, int NV>
BM_AVX512 void grad_state_tile(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off, int64_t r0,
                               int64_t rstride, int64_t p, int64_t v0 = 0) {
  const int64_t G = 4 * a.steps.H;
  __m512 acc[MR][NV];
  mk::zero_tile(acc);
  mk::tile_f32_rows<MR, NV>(dg, lda, G, a.panels + p * G * mk::kNR + 16 * v0, mk::kNR, acc);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      store_grad_state(a, off, r0 + i * rstride, p * mk::kNR + 16 * (v0 + j), acc[i][j]);
}

// Zmm vectors of column panel p that hold any of the first F columns: the last panel of a width that is
// not a multiple of 64 runs narrower (H + I = 300: 3 of 4, 5% of the backward's FMAs).
inline int64_t panel_vectors(int64_t F, int64_t p) {
  return std::min<int64_t>(4, (F - p * mk::kNR + 15) / 16);
}

void grad_state_tiles(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off, int64_t r0, int64_t mr,
                      int64_t rstride, int64_t p0, int64_t p1) {
  const int64_t F = a.steps.H + a.I;
  if (mr > mk::kMR) {
    with_tall_rows(mr, [&](auto rows) {
      constexpr int MR = decltype(rows)::value;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t nv = panel_vectors(F, p);
        for (int64_t v0 = 0; v0 < nv; v0 += 2) {
          if (nv - v0 >= 2)
            grad_state_tile<MR, 2>(a, dg, lda, off, r0, rstride, p, v0);
          else
            grad_state_tile<MR, 1>(a, dg, lda, off, r0, rstride, p, v0);
        }
      }
    });
    return;
  }
  mk::with_rows(mr, [&](auto rows) {
    for (int64_t p = p0; p < p1; ++p)
      mk::with_vectors(panel_vectors(F, p), [&](auto nv) {
        grad_state_tile<decltype(rows)::value, decltype(nv)::value>(a, dg, lda, off, r0, rstride, p);
      });
  });
}

// dw[m0 .. m0 + MR, 64 p .. 64 p + 16 NV) += dg[0 .. n, m0 ..]^T hx[p][0 .. n]: a weight-gradient tile,
// with the worker's collected rows as K. dw rows are ldw floats.
template <int MR, int NV>
BM_AVX512 void grad_weight_tile(const WorkerScratch& ws, int64_t G, int64_t ldw, int64_t rows_cap, int64_t n,
                                int64_t m0, int64_t p) {
  __m512 acc[MR][NV];
  float* c = ws.dw + m0 * ldw + p * mk::kNR;
  if (ws.fresh)
    mk::zero_tile(acc);
  else
    mk::load_tile(c, ldw, acc);
  mk::tile_f32_rows<MR, NV>(ws.dg + m0, 1, n, ws.hx + p * rows_cap * mk::kNR, mk::kNR, acc, G);
  mk::store_tile(acc, c, ldw);
}

// The columns of dw past F (the last panel's padding) are never written.
BM_AVX512 void grad_weights_update(const WorkerScratch& ws, int64_t G, int64_t F, int64_t ldw, int64_t rows_cap,
                                   int64_t n) {
  const int64_t np = (F + mk::kNR - 1) / mk::kNR;
  for (int64_t m0 = 0; m0 < G; m0 += mk::kMR) {
    const int64_t mr = std::min<int64_t>(mk::kMR, G - m0);
    mk::with_rows(mr, [&](auto rows) {
      for (int64_t p = 0; p < np; ++p)
        mk::with_vectors(panel_vectors(F, p), [&](auto nv) {
          grad_weight_tile<decltype(rows)::value, decltype(nv)::value>(ws, G, ldw, rows_cap, n, m0, p);
        });
    });
  }
}

// [h_{t-1}, x_t] of the worker's rows (k = 0 .. n) as B panels from scratch row k0: hx[p][k0 + k][c]
// = feature 64 p + c.
BM_AVX512 void gather_hx(const BackwardArgs& a, const WorkerScratch& ws, int64_t t, int64_t off, int64_t rg,
                         int64_t R, int64_t n, int64_t F, int64_t k0) {
  const int64_t H = a.steps.H, I = a.I;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t r = rg + R * k;
    const int64_t pr = prev_row(a.steps, t, r);
    const float* hp = pr >= 0 ? a.hout + pr * H : a.h0 + r * H;
    const float* xr = a.x + (off + r) * I;
    for (int64_t f = 0; f < F; f += 16) {
      __m512 v = _mm512_setzero_ps();
      if (f < H) {
        v = mk::load_f32(hp + f, mk::lanes(H - f));
        if (f + 16 > H) {  // the group straddles h | x
          const int64_t nh = H - f;
          const __mmask16 mx = __mmask16(mk::lanes(std::min<int64_t>(16, nh + I)) & ~mk::lanes(nh));
          v = _mm512_mask_loadu_ps(v, mx, xr - nh);
        }
      } else if (f < H + I) {
        v = mk::load_f32(xr + f - H, mk::lanes(H + I - f));
      }
      _mm512_store_ps(ws.hx + ((f / mk::kNR) * a.rows_cap + k0 + k) * mk::kNR + f % mk::kNR, v);
    }
  }
}

// ---- backward on AVX2: the same steps as above, 8 lanes wide ----

// S: the saved gates' and cells' storage, float or uint16_t (a bf16 layer's bf16 bits).
template <typename S>
BM_AVX2 void pointwise_row_avx2(const BackwardArgs& a, int64_t t, int64_t r, int64_t row, float* dg, float* dbias,
                                int64_t u_begin, int64_t u_end) {
  const Steps& st = a.steps;
  const int64_t H = st.H, G = 4 * H;
  const int64_t pr = prev_row(st, t, r);
  const S* cells = static_cast<const S*>(a.cells);
  const S* g = static_cast<const S*>(a.gates) + row * G;
  const int64_t sr = state_row(a, r);
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t u = u_begin; u < u_end; u += 8) {
    const m2::Lanes m = m2::lanes(u_end - u);
    const __m256 ig = load_avx2(g + u, m), fg = load_avx2(g + H + u, m);
    const __m256 gg = load_avx2(g + 2 * H + u, m), og = load_avx2(g + 3 * H + u, m);
    const __m256 tc = m2::tanh_ps(load_avx2(cells + row * H + u, m));
    // c_{t-1}: a saved cell, or c0 (float32) where the row starts at this step
    const __m256 cp = pr >= 0 ? load_avx2(cells + pr * H + u, m) : m2::load_f32(a.c0 + r * H + u, m);
    __m256 dh = m2::load_f32(a.dh + sr * H + u, m);
    if (a.grad_out != nullptr) dh = _mm256_add_ps(dh, m2::load_f32(a.grad_out + row * H + u, m));
    const __m256 dc =
        _mm256_fmadd_ps(_mm256_mul_ps(dh, og), _mm256_fnmadd_ps(tc, tc, one), m2::load_f32(a.dc + sr * H + u, m));
    __m256 d[4];
    d[0] = _mm256_mul_ps(_mm256_mul_ps(dc, gg), _mm256_mul_ps(ig, _mm256_sub_ps(one, ig)));
    d[1] = _mm256_mul_ps(_mm256_mul_ps(dc, cp), _mm256_mul_ps(fg, _mm256_sub_ps(one, fg)));
    d[2] = _mm256_mul_ps(_mm256_mul_ps(dc, ig), _mm256_fnmadd_ps(gg, gg, one));
    d[3] = _mm256_mul_ps(_mm256_mul_ps(dh, tc), _mm256_mul_ps(og, _mm256_sub_ps(one, og)));
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      m2::store_f32(dg + q * H + u, d[q], m);
      if (dbias != nullptr)
        m2::store_f32(dbias + q * H + u, _mm256_add_ps(m2::load_f32(dbias + q * H + u, m), d[q]), m);
    }
    m2::store_f32(a.dc + sr * H + u, _mm256_mul_ps(dc, fg), m);
  }
}

// [dh, dx] for MR rows and panel p, by quarters (16 columns; in_strip_groups of them per K pass); the
// AVX2 backward's panels are strips, [np, 4, 4H, 16].
template <int MR>
BM_AVX2 void grad_state_tile_avx2(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off, int64_t r0,
                                  int64_t rstride, int64_t p) {
  const int64_t H = a.steps.H, G = 4 * H, F = H + a.I;
  const float* panel = a.panels + p * G * m2::kNR;
  const int nq = int(std::min<int64_t>(4, (F - p * m2::kNR + 15) / 16));  // quarters with columns < F
  m2::in_strip_groups<MR>(nq, [&](int64_t q0, auto strips) BM_AVX2 {
    constexpr int S = decltype(strips)::value;
    __m256 acc[MR][2 * S];
    m2::zero_tile<MR, 2 * S>(acc);
    m2::strips_tile_f32<MR, S>(dg, lda, 1, G, panel + q0 * G * 16, 16, G * 16, acc);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const int64_t r = r0 + i * rstride, sr = state_row(a, r);
#pragma GCC unroll 8
      for (int j = 0; j < 2 * S; ++j) {
        const int64_t col = p * m2::kNR + 16 * q0 + 8 * j;
        if (col >= F) break;
        if (col + 8 <= H) {
          _mm256_storeu_ps(a.dh + sr * H + col, acc[i][j]);
        } else if (col >= H && col + 8 <= F) {
          if (a.dx) _mm256_storeu_ps(a.dx + (off + r) * a.I + col - H, acc[i][j]);
        } else {  // a group straddling the dh | dx boundary or past F: split it with masks
          const __m256i valid = m2::lanes(F - col).mask, to_dh = m2::lanes(H - col).mask;
          if (col < H) m2::store_f32(a.dh + sr * H + col, acc[i][j], to_dh);
          if (a.dx) m2::store_f32(a.dx + (off + r) * a.I + col - H, acc[i][j], _mm256_andnot_si256(to_dh, valid));
        }
      }
    }
  });
}

void grad_state_tiles_avx2(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off, int64_t r0,
                           int64_t mr, int64_t rstride, int64_t p0, int64_t p1) {
  m2::with_rows<m2::kQuarterMR>(mr, [&](auto rows) {
    for (int64_t p = p0; p < p1; ++p)
      grad_state_tile_avx2<decltype(rows)::value>(a, dg, lda, off, r0, rstride, p);
  });
}

// at: dgates^T rows m0 .. m0 + MR - 1 over the n collected rows, k-major ([n][kQuarterMR]). The AVX2
// scratch hx holds each panel's quarters as strips: [F / 64, 4, rows_cap, 16] (gather_hx_avx2).
template <int MR>
BM_AVX2 void grad_weight_tile_avx2(const WorkerScratch& ws, const float* at, int64_t F, int64_t ldw, int64_t rows_cap,
                                   int64_t n, int64_t m0, int64_t p) {
  const float* panel = ws.hx + p * rows_cap * m2::kNR;
  for (int q = 0; q < 4; ++q) {
    if (p * m2::kNR + 16 * q >= F) break;
    __m256 acc[MR][2];
    float* c = ws.dw + m0 * ldw + p * m2::kNR + 16 * q;
    if (ws.fresh)
      m2::zero_tile<MR, 2>(acc);
    else
      m2::load_quarter<MR>(c, ldw, acc);
    m2::pair_tile_f32<MR>(at, 1, m2::kQuarterMR, n, panel + q * rows_cap * 16, 16, acc);
    m2::store_quarter<MR>(acc, c, ldw);
  }
}

// Each block of kQuarterMR dgates columns is copied k-major first: its 4 x np tiles (a quarter panel
// each) then broadcast from one contiguous L1 block rather than from rows 4H floats apart (MR-shaped
// training calls, T = 20, B = 64: this update was 20% of the profile).
void grad_weights_update_avx2(const WorkerScratch& ws, int64_t G, int64_t F, int64_t ldw, int64_t rows_cap,
                              int64_t n) {
  const int64_t np = (F + m2::kNR - 1) / m2::kNR;
  thread_local std::vector<float> at_buf;
  if (int64_t(at_buf.size()) < n * m2::kQuarterMR) at_buf.resize(n * m2::kQuarterMR);
  float* at = at_buf.data();
  for (int64_t m0 = 0; m0 < G; m0 += m2::kQuarterMR) {
    const int64_t mr = std::min<int64_t>(m2::kQuarterMR, G - m0);
    for (int64_t k = 0; k < n; ++k) std::memcpy(at + k * m2::kQuarterMR, ws.dg + k * G + m0, mr * sizeof(float));
    m2::with_rows<m2::kQuarterMR>(mr, [&](auto rows) {
      for (int64_t p = 0; p < np; ++p)
        grad_weight_tile_avx2<decltype(rows)::value>(ws, at, F, ldw, rows_cap, n, m0, p);
    });
  }
}

BM_AVX2 void gather_hx_avx2(const BackwardArgs& a, const WorkerScratch& ws, int64_t t, int64_t off, int64_t rg,
                            int64_t R, int64_t n, int64_t F, int64_t k0) {
  const int64_t H = a.steps.H, I = a.I;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t r = rg + R * k;
    const int64_t pr = prev_row(a.steps, t, r);
    const float* hp = pr >= 0 ? a.hout + pr * H : a.h0 + r * H;
    const float* xr = a.x + (off + r) * I;
    for (int64_t f = 0; f < F; f += 8) {
      __m256 v = _mm256_setzero_ps();
      if (f < H) {
        v = m2::load_f32(hp + f, m2::lanes(H - f));
        if (f + 8 > H) {  // the group straddles h | x
          const int64_t nh = H - f;
          const __m256i mx = _mm256_andnot_si256(m2::lanes(nh).mask, m2::lanes(nh + I).mask);
          v = _mm256_blendv_ps(v, _mm256_maskload_ps(xr - nh, mx), _mm256_castsi256_ps(mx));
        }
      } else if (f < H + I) {
        v = m2::load_f32(xr + f - H, m2::lanes(H + I - f));
      }
      // strip f % 64 / 16 of panel f / 64, row k0 + k
      _mm256_store_ps(ws.hx + ((f / m2::kNR * 4 + f % m2::kNR / 16) * a.rows_cap + k0 + k) * 16 + f % 16, v);
    }
  }
}

// [dh, dx] on AMX for mr <= kAmxRows rows: the rows of dgates are rounded to bf16 into an L2 buffer
// of whole 16-row blocks (zero past mr and past 4H), then each column panel is one or two row blocks
// against the bf16 panels, as in the forward; the tile goes out through an L1 buffer.
BM_AMX void grad_state_tiles_amx(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off, int64_t r0,
                                 int64_t mr, int64_t rstride, int64_t p0, int64_t p1) {
  const int64_t H = a.steps.H, G = 4 * H, F = H + a.I, Gp = a.Gp;
  const int64_t blocks = mr > 16 ? 2 : 1;
  thread_local std::vector<uint16_t> rows;
  if (int64_t(rows.size()) < kAmxRows * Gp) rows.assign(kAmxRows * Gp, 0);
  uint16_t* A = rows.data();
  for (int64_t i = 0; i < 16 * blocks; ++i) {
    uint16_t* o = A + i * Gp;
    if (i >= mr) {
      std::memset(o, 0, Gp * sizeof(uint16_t));
      continue;
    }
    for (int64_t k = 0; k < Gp; k += 16)
      mk::store_bf16(o + k, mk::load_f32(dg + i * lda + k, k < G ? mk::lanes(G - k) : __mmask16(0)), 0xFFFF);
  }
  alignas(64) float tile[2 * 16][mk::kNR];
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* panel = a.panels_bf16 + p * Gp * mk::kNR;
    if (blocks == 2) {
      for (int q = 0; q < 4; q += 2) {
        mk::amx_zero();
        mk::amx_half_panel2(A, A + 16 * Gp, Gp * 2, Gp / 32, panel, q);
        mk::amx_store_half2(tile, q);
      }
    } else {
      mk::amx_zero();
      mk::amx_panel(A, Gp * 2, Gp / 32, panel);
      mk::amx_store(tile);
    }
    for (int64_t i = 0; i < mr; ++i)
      for (int j = 0; j < 4 && p * mk::kNR + 16 * j < F; ++j)
        store_grad_state(a, off, r0 + i * rstride, p * mk::kNR + 16 * j, _mm512_load_ps(tile[i] + 16 * j));
  }
}

// Rows [0, n) of src (G floats each; rows past n read as zero) rounded to bf16 with row pairs
// interleaved, the k-pair layout of AMX / vdpbf16ps operands: out word (j, g) = (src[2j][g],
// src[2j + 1][g]) for j < pairs and g < ldo, zero past G.
BM_AVX512_BF16 void interleave_row_pairs(const float* src, int64_t n, int64_t G, int64_t pairs, int64_t ldo,
                                         uint16_t* out) {
  for (int64_t j = 0; j < pairs; ++j) {
    const int64_t k0 = 2 * j, k1 = 2 * j + 1;
    for (int64_t g = 0; g < ldo; g += 16) {
      const __mmask16 m = g < G ? mk::lanes(G - g) : __mmask16(0);
      const __m512 v0 = mk::load_f32(src + k0 * G + g, k0 < n ? m : __mmask16(0));
      const __m512 v1 = mk::load_f32(src + k1 * G + g, k1 < n ? m : __mmask16(0));
      _mm512_mask_storeu_epi32(out + (j * ldo + g) * 2, mk::lanes(ldo - g), mk::bf16_pairs(v0, v1));
    }
  }
}

// [dh, dx] for MR rows on vdpbf16ps: A = their dgates rounded to bf16 (rows of 4H), against panel p of
// the bf16 panels over K = 4H (the panels' zero columns past H + I give zeros that store_grad_state
// drops).
template <int MR>
BM_AVX512_BF16 void grad_state_tile_bf16(const BackwardArgs& a, const uint16_t* A, int64_t off, int64_t r0,
                                         int64_t rstride, int64_t p) {
  const int64_t H = a.steps.H, G = 4 * H, F = H + a.I;
  __m512 acc[MR][4];
  mk::zero_tile(acc);
  mk::tile_bf16<MR>(A, G, G / 2, a.panels_bf16 + p * a.Gp * mk::kNR, acc);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      if (p * mk::kNR + 16 * j < F) store_grad_state(a, off, r0 + i * rstride, p * mk::kNR + 16 * j, acc[i][j]);
}

// [dh, dx] on vdpbf16ps (bf16 layers where it pays, no AMX): the mr rows of dgates rounded to bf16 into
// an L1 buffer, then grad_state_tile_bf16 per panel.
BM_AVX512_BF16 void grad_state_tiles_bf16(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off,
                                          int64_t r0, int64_t mr, int64_t rstride, int64_t p0, int64_t p1) {
  const int64_t G = 4 * a.steps.H;
  thread_local std::vector<uint16_t> rows;
  uint16_t* A = mk::aligned(rows, mk::kMR * G);
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t k = 0; k < G; k += 16) {
      const __mmask16 m = mk::lanes(G - k);
      mk::store_bf16(A + i * G + k, mk::load_f32(dg + i * lda + k, m), m);
    }
  mk::with_rows(mr, [&](auto n) {
    for (int64_t p = p0; p < p1; ++p) grad_state_tile_bf16<decltype(n)::value>(a, A, off, r0, rstride, p);
  });
}

// dw[m0 .. m0 + MR, panel p] += over the n2 k pairs: dgp [n2][4H][2] (dgates, row pairs interleaved)
// transposed, times hxp's panel p ([n2][64][2]).
template <int MR>
BM_AVX512_BF16 void grad_weight_tile_bf16(const WorkerScratch& ws, const uint16_t* dgp, const uint16_t* hxp,
                                          int64_t G, int64_t ldw, int64_t n2, int64_t m0, int64_t p) {
  __m512 acc[MR][4];
  float* c = ws.dw + m0 * ldw + p * mk::kNR;
  if (ws.fresh)
    mk::zero_tile(acc);
  else
    mk::load_tile(c, ldw, acc);
  mk::tile_bf16<MR>(dgp + m0 * 2, 2, n2, hxp + p * n2 * mk::kNR * 2, acc, 2 * G);
  mk::store_tile(acc, c, ldw);
}

// The fused weight-gradient update on vdpbf16ps: dw [4H, Fp] += dg^T hx over the n collected rows,
// both rounded to bf16 with row pairs interleaved (an odd n padded with a zero row), as the layer's
// own bf16 GEMMs would; then MR x 64 tiles of dw over the n / 2 pairs. The columns of dw past F get
// zeros added (hx is zero there).
BM_AVX512_BF16 void grad_weights_update_bf16(const WorkerScratch& ws, int64_t G, int64_t F, int64_t ldw,
                                             int64_t rows_cap, int64_t n) {
  const int64_t n2 = (n + 1) / 2, np = (F + mk::kNR - 1) / mk::kNR;
  thread_local std::vector<uint16_t> dg_buf, hx_buf;
  // dgp [n2][G][2] = (dg[2j][g], dg[2j + 1][g]); hxp [np][n2][64][2] the same of each of hx's panels
  uint16_t* dgp = mk::aligned(dg_buf, n2 * G * 2);
  uint16_t* hxp = mk::aligned(hx_buf, np * n2 * mk::kNR * 2);
  interleave_row_pairs(ws.dg, n, G, n2, G, dgp);
  for (int64_t p = 0; p < np; ++p)
    for (int64_t j = 0; j < n2; ++j) {
      const float* lo = ws.hx + (p * rows_cap + 2 * j) * mk::kNR;
      uint16_t* out = hxp + (p * n2 + j) * mk::kNR * 2;
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const __m512 hi = 2 * j + 1 >= n ? _mm512_setzero_ps() : _mm512_load_ps(lo + mk::kNR + 16 * v);
        _mm512_store_si512(out + 32 * v, mk::bf16_pairs(_mm512_load_ps(lo + 16 * v), hi));
      }
    }
  for (int64_t m0 = 0; m0 < G; m0 += mk::kMR)
    mk::with_rows(std::min<int64_t>(mk::kMR, G - m0), [&](auto rows) {
      for (int64_t p = 0; p < np; ++p)
        grad_weight_tile_bf16<decltype(rows)::value>(ws, dgp, hxp, G, ldw, n2, m0, p);
    });
}

// The backward's kernel sets: what backward_steps calls per step.
struct Avx512Backward {
  static constexpr int64_t kRows = mk::kMR;
  static constexpr int64_t kTall = kTallRows;  // grad_state_tiles runs 7- and 8-row blocks as two-pass tiles
  static constexpr bool kPanelsOuter = false;
  static void pointwise(const BackwardArgs& a, int64_t t, int64_t r, int64_t row, float* dg, float* dbias,
                        int64_t u_begin, int64_t u_end) {
    if (a.saved_bf16)
      pointwise_row<uint16_t>(a, t, r, row, dg, dbias, u_begin, u_end);
    else
      pointwise_row<float>(a, t, r, row, dg, dbias, u_begin, u_end);
  }
  static void state_tiles(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off, int64_t r0, int64_t mr,
                          int64_t rstride, int64_t p0, int64_t p1) {
    grad_state_tiles(a, dg, lda, off, r0, mr, rstride, p0, p1);
  }
  static void weights_update(const WorkerScratch& ws, int64_t G, int64_t F, int64_t ldw, int64_t rows_cap,
                             int64_t n) {
    grad_weights_update(ws, G, F, ldw, rows_cap, n);
  }
  static void gather(const BackwardArgs& a, const WorkerScratch& ws, int64_t t, int64_t off, int64_t rg, int64_t R,
                     int64_t n, int64_t F, int64_t k0) {
    gather_hx(a, ws, t, off, rg, R, n, F, k0);
  }
};

// The weight-gradient update on AMX (bf16 layers), transposed: dw^T [Fp, Gp] += hx^T dg over the n
// collected rows, K padded to 32 with zeros. hx^T (a transpose of the B panels, rounded to bf16) makes
// the A tiles; dg rounded to bf16 with row pairs interleaved makes the B tiles; Gp = 4H rounded up
// to 32. Each 32 x 32 block of dw^T is four accumulator tiles loaded (or zeroed, the first time),
// run over K and stored back.
BM_AMX void grad_weights_update_amx(const WorkerScratch& ws, int64_t G, int64_t Fp, int64_t rows_cap, int64_t n) {
  const int64_t Kp = (n + 31) / 32 * 32, Gp = (G + 31) / 32 * 32;
  thread_local std::vector<uint16_t> at_buf, b_buf;
  if (int64_t(at_buf.size()) < Fp * Kp) at_buf.resize(Fp * Kp);
  if (int64_t(b_buf.size()) < Kp * Gp) b_buf.resize(Kp * Gp);
  uint16_t* At = at_buf.data();  // [Fp, Kp]
  uint16_t* Bv = b_buf.data();   // [Kp / 2, Gp, 2]
  // hx^T: column f of panel f / 64 is 64 floats apart from row to row.
  const __m512i rows16 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(int(mk::kNR)));
  for (int64_t f = 0; f < Fp; ++f) {
    const float* col = ws.hx + (f / mk::kNR) * rows_cap * mk::kNR + f % mk::kNR;
    for (int64_t k = 0; k < Kp; k += 16) {
      const __mmask16 m = k < n ? mk::lanes(n - k) : __mmask16(0);
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, rows16, col + k * mk::kNR, 4);
      mk::store_bf16(At + f * Kp + k, v, 0xFFFF);
    }
  }
  // dg with row pairs interleaved: Bv[j][g] = (dg[2j][g], dg[2j + 1][g]) as one 32-bit word.
  interleave_row_pairs(ws.dg, n, G, Kp / 2, Gp, Bv);
  const int64_t ldc = Gp * int64_t(sizeof(float));
  for (int64_t f0 = 0; f0 < Fp; f0 += 32)
    for (int64_t g0 = 0; g0 < Gp; g0 += 32) {
      float* c = ws.dw + f0 * Gp + g0;
      if (ws.fresh)
        mk::amx_zero();
      else
        mk::amx_load_2x2(c, ldc);
      mk::amx_2x2(At + f0 * Kp, At + (f0 + 16) * Kp, Kp * 2, Kp / 32, Bv + g0 * 2, 16 * Gp * 2, Gp * 4);
      mk::amx_store_2x2(c, ldc);
    }
}

// Avx512Backward with the [dh, dx] tiles and the weight-gradient updates on AMX (bf16 layers). The
// weight-gradient sums are kept transposed (WorkerScratch::dw is [Fp, Gp]).
struct AmxBackward : Avx512Backward {
  static constexpr int64_t kRows = kAmxRows;
  static constexpr int64_t kTall = 0;
  static void state_tiles(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off, int64_t r0, int64_t mr,
                          int64_t rstride, int64_t p0, int64_t p1) {
    grad_state_tiles_amx(a, dg, lda, off, r0, mr, rstride, p0, p1);
  }
  static void weights_update(const WorkerScratch& ws, int64_t G, int64_t, int64_t Fp, int64_t rows_cap, int64_t n) {
    grad_weights_update_amx(ws, G, Fp, rows_cap, n);
  }
};

// Avx512Backward with the [dh, dx] tiles and the fused weight-gradient updates on vdpbf16ps (bf16
// layers on CPUs without AMX whose vdpbf16ps pays).
struct Bf16DotBackward : Avx512Backward {
  static constexpr int64_t kTall = 0;  // the bf16 [dh, dx] tiles take blocks of up to kRows
  static void state_tiles(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off, int64_t r0, int64_t mr,
                          int64_t rstride, int64_t p0, int64_t p1) {
    grad_state_tiles_bf16(a, dg, lda, off, r0, mr, rstride, p0, p1);
  }
  static void weights_update(const WorkerScratch& ws, int64_t G, int64_t F, int64_t ldw, int64_t rows_cap,
                             int64_t n) {
    grad_weights_update_bf16(ws, G, F, ldw, rows_cap, n);
  }
};

// The [dh, dx] tiles of a worker's fused step: panels outer (each panel against all the worker's row
// blocks). On Zen 3 (512 KiB L2, the seed shape's 1 MiB of backward panels) against row blocks outer,
// alternating processes, six rounds, median: seed training 179.7 -> 160.0 ms, T = 100, B = 32,
// I = H = 256 73.4 -> 69.3, I = 64, H = 128 ~2% (NOTES v29). The AVX-512 kernel sets keep row blocks
// outer: not measured that way (no AVX-512 host in that session).
struct Avx2Backward {
  static constexpr int64_t kRows = m2::kQuarterMR;
  static constexpr int64_t kTall = 0;
  static constexpr bool kPanelsOuter = true;
  static void pointwise(const BackwardArgs& a, int64_t t, int64_t r, int64_t row, float* dg, float* dbias,
                        int64_t u_begin, int64_t u_end) {
    if (a.saved_bf16)
      pointwise_row_avx2<uint16_t>(a, t, r, row, dg, dbias, u_begin, u_end);
    else
      pointwise_row_avx2<float>(a, t, r, row, dg, dbias, u_begin, u_end);
  }
  static void state_tiles(const BackwardArgs& a, const float* dg, int64_t lda, int64_t off, int64_t r0, int64_t mr,
                          int64_t rstride, int64_t p0, int64_t p1) {
    grad_state_tiles_avx2(a, dg, lda, off, r0, mr, rstride, p0, p1);
  }
  static void weights_update(const WorkerScratch& ws, int64_t G, int64_t F, int64_t ldw, int64_t rows_cap,
                             int64_t n) {
    grad_weights_update_avx2(ws, G, F, ldw, rows_cap, n);
  }
  static void gather(const BackwardArgs& a, const WorkerScratch& ws, int64_t t, int64_t off, int64_t rg, int64_t R,
                     int64_t n, int64_t F, int64_t k0) {
    gather_hx_avx2(a, ws, t, off, rg, R, n, F, k0);
  }
};

// The backward time loop over a kernel set K (Avx512Backward, Avx2Backward).
template <typename K>
void backward_steps(const BackwardArgs& a, int64_t w0, int64_t w1) {
  const Steps& st = a.steps;
  const int64_t R = a.grid.R, C = a.grid.C, H = st.H, G = 4 * H;
  const int64_t F = H + a.I, Fp = (F + mk::kNR - 1) / mk::kNR * mk::kNR;
  const int64_t np = Fp / mk::kNR;                   // [dh, dx] column panels
  const int64_t nh = (H + mk::kNR - 1) / mk::kNR;    // of which hold dh; pointwise units follow them
  const int64_t nout = a.dx ? np : nh;               // the panels to multiply (no dx: dh's only)
  for (int64_t s = st.T - 1; s >= 0; --s) {
    const int64_t t = st.reverse ? st.T - 1 - s : s;
    const int64_t b = st.batch_sizes[t], off = st.offsets[t];
    if (a.scratch != nullptr) {  // C == 1: whole rows per worker, weight gradients fused
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t rg = w;
        WorkerScratch& ws = a.scratch[rg];
        if (b <= rg) continue;
        const int64_t n = (b - rg + R - 1) / R;
        if (ws.pending + n > a.rows_cap) {
          K::weights_update(ws, G, F, Fp, a.rows_cap, ws.pending);
          ws.pending = 0;
          ws.fresh = false;
        }
        const int64_t kb = ws.pending;  // this step's first scratch row
        K::gather(a, ws, t, off, rg, R, n, Fp, kb);
        // Near-equal blocks (32 rows: 6, 6, 5, 5, 5, 5, not 6 x 5 + 2): every block streams all the
        // panels, so a 2-row block costs nearly what a full one does.
        const int64_t nblk = block_count(n, K::kRows, K::kTall);
        if constexpr (K::kPanelsOuter) {
          // Every row's dgates first, then each panel against all of the worker's blocks while it is
          // in L2 (row blocks outer stream every panel once per block).
          for (int64_t k = 0; k < n; ++k) {
            const int64_t r = rg + R * k;
            K::pointwise(a, t, r, off + r, ws.dg + (kb + k) * G, ws.dbias, 0, H);
          }
          for (int64_t p = 0; p < nout; ++p)
            for (int64_t i = 0; i < nblk; ++i) {
              const int64_t k0 = i * n / nblk, mr = (i + 1) * n / nblk - k0;
              K::state_tiles(a, ws.dg + (kb + k0) * G, G, off, rg + R * k0, mr, R, p, p + 1);
            }
        } else {
          for (int64_t i = 0; i < nblk; ++i) {
            const int64_t k0 = i * n / nblk, mr = (i + 1) * n / nblk - k0;
            for (int64_t k = k0; k < k0 + mr; ++k) {
              const int64_t r = rg + R * k;
              K::pointwise(a, t, r, off + r, ws.dg + (kb + k) * G, ws.dbias, 0, H);
            }
            K::state_tiles(a, ws.dg + (kb + k0) * G, G, off, rg + R * k0, mr, R, 0, nout);
          }
        }
        ws.pending += n;
      }
      continue;
    }
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t rg = w / C, cg = w % C;
      const int64_t q0 = split(nh, C, cg), q1 = split(nh, C, cg + 1);
      const int64_t u0 = q0 * mk::kNR, u1 = std::min(H, q1 * mk::kNR);
      for_each_row_block(
          b, rg, R,
          [&](int64_t r0, int64_t mr) {
            for (int64_t i = 0; i < mr; ++i) {
              const int64_t r = r0 + i * R;
              K::pointwise(a, t, r, off + r, a.dgates + (off + r) * G, a.dbias + rg * G, u0, u1);
            }
          },
          K::kRows, K::kTall);
    }
    // Column groups read back dgates columns other workers wrote; row groups alone own whole rows.
    if (C > 1) a.barrier->arrive_and_wait(w1 - w0);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t rg = w / C, cg = w % C;
      // dh panels follow the pointwise split (a worker reads back only the dh it wrote); the dx
      // panels after them are split the same way.
      const int64_t p0 = split(nh, C, cg), p1 = split(nh, C, cg + 1);
      const int64_t x0 = nh + split(np - nh, C, cg), x1 = nh + split(np - nh, C, cg + 1);
      for_each_row_block(
          b, rg, R,
          [&](int64_t r0, int64_t mr) {
            const float* dg = a.dgates + (off + r0) * G;
            K::state_tiles(a, dg, R * G, off, r0, mr, R, p0, p1);
            if (!a.dx_after && a.dx) K::state_tiles(a, dg, R * G, off, r0, mr, R, x0, x1);
          },
          K::kRows, K::kTall);
    }
  }
  if (a.scratch != nullptr)
    for (int64_t w = w0; w < w1; ++w) {
      WorkerScratch& ws = a.scratch[w];
      if (ws.pending > 0) {
        K::weights_update(ws, G, F, Fp, a.rows_cap, ws.pending);
        ws.fresh = false;
      }
      ws.pending = 0;
    }
}

}  // namespace

void forward_f32(const ForwardArgs& a, bool train, int64_t w0, int64_t w1) {
  if (train)
    forward_loop<false, true>(a, w0, w1);
  else
    forward_loop<false, false>(a, w0, w1);
}

void forward_bf16(const ForwardArgs& a, bool train, int64_t w0, int64_t w1) {
  if (train)
    forward_loop<true, true>(a, w0, w1);
  else
    forward_loop<true, false>(a, w0, w1);
}

void forward_f32_bf16_out(const ForwardArgs& a, bool train, int64_t w0, int64_t w1) {
  if (train)
    forward_loop<false, true, true>(a, w0, w1);
  else
    forward_loop<false, false, true>(a, w0, w1);
}

void forward_f32_avx2(const ForwardArgs& a, bool train, int64_t w0, int64_t w1) {
  if (train)
    forward_loop_avx2<true, false>(a, w0, w1);
  else
    forward_loop_avx2<false, false>(a, w0, w1);
}

void forward_f32_avx2_bf16_out(const ForwardArgs& a, bool train, int64_t w0, int64_t w1) {
  if (train)
    forward_loop_avx2<true, true>(a, w0, w1);
  else
    forward_loop_avx2<false, true>(a, w0, w1);
}

void forward_amx(const ForwardArgs& a, bool train, int64_t w0, int64_t w1) {
  if (train)
    forward_loop_amx<true>(a, w0, w1);
  else
    forward_loop_amx<false>(a, w0, w1);
}

void backward_f32(const BackwardArgs& a, int64_t w0, int64_t w1) { backward_steps<Avx512Backward>(a, w0, w1); }

void backward_bf16(const BackwardArgs& a, int64_t w0, int64_t w1) { backward_steps<Bf16DotBackward>(a, w0, w1); }

BM_AMX void backward_amx(const BackwardArgs& a, int64_t w0, int64_t w1) {
  mk::amx_configure();
  backward_steps<AmxBackward>(a, w0, w1);
  _tile_release();
}

void backward_f32_avx2(const BackwardArgs& a, int64_t w0, int64_t w1) { backward_steps<Avx2Backward>(a, w0, w1); }

}  // namespace bigmodel::lstm::fast

#else  // no AVX-512 / AVX2 kernels in this build: lstm_cpu.cpp never calls these

#include <c10/util/Exception.h>

namespace bigmodel::lstm::fast {
void forward_f32(const ForwardArgs&, bool, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void forward_bf16(const ForwardArgs&, bool, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void forward_f32_bf16_out(const ForwardArgs&, bool, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void forward_amx(const ForwardArgs&, bool, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void backward_f32(const BackwardArgs&, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void backward_bf16(const BackwardArgs&, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void backward_amx(const BackwardArgs&, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void forward_f32_avx2(const ForwardArgs&, bool, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void forward_f32_avx2_bf16_out(const ForwardArgs&, bool, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void backward_f32_avx2(const BackwardArgs&, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
}  // namespace bigmodel::lstm::fast

#endif
