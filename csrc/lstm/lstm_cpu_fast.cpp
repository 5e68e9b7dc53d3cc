// The LSTM time loop on the AVX-512 micro-kernels (design in lstm_cpu_fast.h).
#include "lstm/lstm_cpu_fast.h"

#include <algorithm>

#include "common/gemm/microkernel.h"

#ifdef BIGMODEL_HAS_AVX512_KERNELS

namespace bigmodel::lstm::fast {
namespace {

namespace mk = bigmodel::gemm::avx512;
constexpr int64_t kUnits = mk::kNR / 4;  // hidden units per forward panel

// The rows a worker of row group rg owns at a step with b active rows: rg, rg + R, ... < b, cut into
// near-equal blocks of at most kMR. Calls body(first_row, mr) per block.
template <typename F>
inline void for_each_row_block(int64_t b, int64_t rg, int64_t R, const F& body) {
  if (b <= rg) return;
  const int64_t n = (b - rg + R - 1) / R;
  const int64_t nblk = (n + mk::kMR - 1) / mk::kMR;
  for (int64_t k = 0; k < nblk; ++k) {
    const int64_t i0 = k * n / nblk, i1 = (k + 1) * n / nblk;
    body(rg + R * i0, i1 - i0);
  }
}

inline int64_t split(int64_t n, int64_t parts, int64_t i) { return i * n / parts; }

// ---- forward ----

// One tile and its epilogue. Compiled with the BF16 target for both paths, since one body serves
// both; the float32 instantiations contain no BF16 instruction (those sit under `if constexpr`), so
// they run on any AVX-512 CPU.
template <bool kBf16, bool kTrain, int MR>
BM_AVX512_BF16 void forward_tile(const ForwardArgs& a, int64_t off, int64_t r0, int64_t rstride, int64_t p,
                                 const void* hp, void* hn) {
  const int64_t H = a.steps.H, G = 4 * H, Kh = a.Kh, Kx = a.Kx;
  __m512 acc[MR][4];
  mk::zero_tile<MR>(acc);
  if constexpr (kBf16) {
    const uint16_t* panel = static_cast<const uint16_t*>(a.panels) + p * (Kh + Kx) * mk::kNR;
    mk::tile_bf16<MR>(static_cast<const uint16_t*>(hp) + r0 * Kh, rstride * Kh, Kh / 2, panel, acc);
    mk::tile_bf16<MR>(static_cast<const uint16_t*>(a.x) + (off + r0) * Kx, rstride * Kx, Kx / 2,
                      panel + Kh * mk::kNR, acc);
  } else {
    const float* panel = static_cast<const float*>(a.panels) + p * (Kh + Kx) * mk::kNR;
    mk::tile_f32<MR>(static_cast<const float*>(hp) + r0 * Kh, rstride * Kh, Kh, panel, acc);
    mk::tile_f32<MR>(static_cast<const float*>(a.x) + (off + r0) * Kx, rstride * Kx, Kx, panel + Kh * mk::kNR,
                     acc);
  }
  alignas(64) float tile[MR][mk::kNR];
  mk::store_tile<MR>(acc, tile);
  const int64_t u0 = p * kUnits;
  const __mmask16 m = mk::lanes(H - u0);
  __m512 bias[4];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g)
    bias[g] = a.bias != nullptr ? mk::load_f32(a.bias + g * H + u0, m) : _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) {
    const int64_t r = r0 + i * rstride, row = off + r;
    const __m512 ig = mk::sigmoid_ps(_mm512_add_ps(_mm512_load_ps(tile[i]), bias[0]));
    const __m512 fg = mk::sigmoid_ps(_mm512_add_ps(_mm512_load_ps(tile[i] + 16), bias[1]));
    const __m512 gg = mk::tanh_ps(_mm512_add_ps(_mm512_load_ps(tile[i] + 32), bias[2]));
    const __m512 og = mk::sigmoid_ps(_mm512_add_ps(_mm512_load_ps(tile[i] + 48), bias[3]));
    float* cp = a.c + r * H + u0;
    const __m512 cn = _mm512_fmadd_ps(fg, mk::load_f32(cp, m), _mm512_mul_ps(ig, gg));
    const __m512 hv = _mm512_mul_ps(og, mk::tanh_ps(cn));
    mk::store_f32(cp, cn, m);
    if constexpr (kBf16) {
      mk::store_bf16(static_cast<uint16_t*>(hn) + r * Kh + u0, hv, m);
      mk::store_bf16(static_cast<uint16_t*>(a.hout) + row * H + u0, hv, m);
    } else {
      mk::store_f32(static_cast<float*>(hn) + r * Kh + u0, hv, m);
      mk::store_f32(static_cast<float*>(a.hout) + row * H + u0, hv, m);
    }
    if constexpr (kTrain) {
      float* gp = a.gates + row * G + u0;
      mk::store_f32(gp, ig, m);
      mk::store_f32(gp + H, fg, m);
      mk::store_f32(gp + 2 * H, gg, m);
      mk::store_f32(gp + 3 * H, og, m);
      mk::store_f32(a.cells + row * H + u0, cn, m);
    }
  }
}

template <bool kBf16, bool kTrain>
void forward_loop(const ForwardArgs& a, int64_t w0, int64_t w1) {
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
      for_each_row_block(b, rg, R, [&](int64_t r0, int64_t mr) {
        for (int64_t p = p0; p < p1; ++p) {
          switch (mr) {
            case 1: forward_tile<kBf16, kTrain, 1>(a, off, r0, R, p, hp, hn); break;
            case 2: forward_tile<kBf16, kTrain, 2>(a, off, r0, R, p, hp, hn); break;
            case 3: forward_tile<kBf16, kTrain, 3>(a, off, r0, R, p, hp, hn); break;
            case 4: forward_tile<kBf16, kTrain, 4>(a, off, r0, R, p, hp, hn); break;
            case 5: forward_tile<kBf16, kTrain, 5>(a, off, r0, R, p, hp, hn); break;
            default: forward_tile<kBf16, kTrain, 6>(a, off, r0, R, p, hp, hn); break;
          }
        }
      });
    }
    if (C > 1) a.barrier->arrive_and_wait(w1 - w0);
  }
}

// ---- backward ----

// Pointwise derivative of rows [r0, r0 + mr * rstride) over hidden units [u_begin, u_end).
BM_AVX512 void backward_pointwise(const BackwardArgs& a, int64_t t, int64_t off, int64_t r0, int64_t mr,
                                  int64_t rstride, int64_t u_begin, int64_t u_end) {
  const Steps& st = a.steps;
  const int64_t H = st.H, G = 4 * H;
  const int64_t tp = st.reverse ? t + 1 : t - 1;
  const bool has_prev_step = tp >= 0 && tp < st.T;
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < mr; ++i) {
    const int64_t r = r0 + i * rstride, row = off + r;
    const float* cprev = (has_prev_step && r < st.batch_sizes[tp]) ? a.cells + (st.offsets[tp] + r) * H
                                                                     : a.c0 + r * H;
    const float* g = a.gates + row * G;
    float* dg = a.dgates + row * G;
    for (int64_t u = u_begin; u < u_end; u += 16) {
      const __mmask16 m = mk::lanes(u_end - u);
      const __m512 ig = mk::load_f32(g + u, m), fg = mk::load_f32(g + H + u, m);
      const __m512 gg = mk::load_f32(g + 2 * H + u, m), og = mk::load_f32(g + 3 * H + u, m);
      const __m512 tc = mk::tanh_ps(mk::load_f32(a.cells + row * H + u, m));
      __m512 dh = mk::load_f32(a.dh + r * H + u, m);
      if (a.grad_out != nullptr) dh = _mm512_add_ps(dh, mk::load_f32(a.grad_out + row * H + u, m));
      const __m512 dc = _mm512_fmadd_ps(_mm512_mul_ps(dh, og), _mm512_fnmadd_ps(tc, tc, one),
                                        mk::load_f32(a.dc + r * H + u, m));
      mk::store_f32(dg + u, _mm512_mul_ps(_mm512_mul_ps(dc, gg), _mm512_mul_ps(ig, _mm512_sub_ps(one, ig))), m);
      mk::store_f32(dg + H + u,
                    _mm512_mul_ps(_mm512_mul_ps(dc, mk::load_f32(cprev + u, m)),
                                  _mm512_mul_ps(fg, _mm512_sub_ps(one, fg))),
                    m);
      mk::store_f32(dg + 2 * H + u, _mm512_mul_ps(_mm512_mul_ps(dc, ig), _mm512_fnmadd_ps(gg, gg, one)), m);
      mk::store_f32(dg + 3 * H + u, _mm512_mul_ps(_mm512_mul_ps(dh, tc), _mm512_mul_ps(og, _mm512_sub_ps(one, og))),
                    m);
      mk::store_f32(a.dc + r * H + u, _mm512_mul_ps(dc, fg), m);
    }
  }
}

// dh[rows, 64 p .. 64 p + 63] = dgates[rows, :] W_hh[:, same columns].
template <int MR>
BM_AVX512 void backward_tile(const BackwardArgs& a, int64_t off, int64_t r0, int64_t rstride, int64_t p) {
  const int64_t H = a.steps.H, G = 4 * H;
  __m512 acc[MR][4];
  mk::zero_tile<MR>(acc);
  mk::tile_f32<MR>(a.dgates + (off + r0) * G, rstride * G, G, a.panels + p * G * mk::kNR, acc);
  const int64_t c0 = p * mk::kNR;
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* d = a.dh + (r0 + i * rstride) * H + c0;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (c0 + 16 * j >= H) break;
      mk::store_f32(d + 16 * j, acc[i][j], mk::lanes(H - c0 - 16 * j));
    }
  }
}

void backward_tiles(const BackwardArgs& a, int64_t off, int64_t r0, int64_t mr, int64_t rstride, int64_t p0,
                    int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    switch (mr) {
      case 1: backward_tile<1>(a, off, r0, rstride, p); break;
      case 2: backward_tile<2>(a, off, r0, rstride, p); break;
      case 3: backward_tile<3>(a, off, r0, rstride, p); break;
      case 4: backward_tile<4>(a, off, r0, rstride, p); break;
      case 5: backward_tile<5>(a, off, r0, rstride, p); break;
      default: backward_tile<6>(a, off, r0, rstride, p); break;
    }
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

void backward_f32(const BackwardArgs& a, int64_t w0, int64_t w1) {
  const Steps& st = a.steps;
  const int64_t R = a.grid.R, C = a.grid.C, H = st.H;
  const int64_t np = (H + mk::kNR - 1) / mk::kNR;  // dh column panels; pointwise units follow them
  for (int64_t s = st.T - 1; s >= 0; --s) {
    const int64_t t = st.reverse ? st.T - 1 - s : s;
    const int64_t b = st.batch_sizes[t], off = st.offsets[t];
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t rg = w / C, cg = w % C;
      const int64_t p0 = split(np, C, cg), p1 = split(np, C, cg + 1);
      const int64_t u0 = p0 * mk::kNR, u1 = std::min(H, p1 * mk::kNR);
      for_each_row_block(b, rg, R, [&](int64_t r0, int64_t mr) {
        backward_pointwise(a, t, off, r0, mr, R, u0, u1);
        // With one column group this worker wrote every unit of these rows: multiply right away,
        // while the rows are in L1.
        if (C == 1) backward_tiles(a, off, r0, mr, R, p0, p1);
      });
    }
    if (C == 1) continue;
    a.barrier->arrive_and_wait(w1 - w0);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t rg = w / C, cg = w % C;
      const int64_t p0 = split(np, C, cg), p1 = split(np, C, cg + 1);
      for_each_row_block(b, rg, R, [&](int64_t r0, int64_t mr) { backward_tiles(a, off, r0, mr, R, p0, p1); });
    }
  }
}

}  // namespace bigmodel::lstm::fast

#else  // no AVX-512 kernels in this build: lstm_cpu.cpp never calls these

#include <c10/util/Exception.h>

namespace bigmodel::lstm::fast {
void forward_f32(const ForwardArgs&, bool, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void forward_bf16(const ForwardArgs&, bool, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
void backward_f32(const BackwardArgs&, int64_t, int64_t) { TORCH_INTERNAL_ASSERT(false); }
}  // namespace bigmodel::lstm::fast

#endif
