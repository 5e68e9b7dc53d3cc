// The LSTM's time loop on the GEMM core's micro-kernels (lstm_cpu_fast.cpp), used by lstm_cpu.cpp
// when the CPU has AVX-512 (microkernel.h) or AVX2 + FMA (microkernel_avx2.h, float32 only) and the
// layer has no projection. Both kernel sets read the same packed panels and run the same loops.
//
// Each step is a set of tiles: MR batch rows x one 64-column panel. In forward a panel holds the
// i, f, g, o columns of 16 hidden units of [W_hh; W_ih]^T, and a tile multiplies [h_{t-1}, x_t] by
// it, so its accumulators carry everything the cell update needs: the epilogue adds the bias,
// applies the nonlinearities, updates c and writes h straight from the tile (in inference no gate
// tensor is ever written, not even x W_ih^T). In backward the pointwise derivative writes dgates
// and a tile of dgates W_hh gives 64 columns of dh_{t-1}.
//
// Work split. Batch rows are independent through the whole recurrence, so workers are a grid of
// R row groups x C column groups: row group g owns sorted rows g, g + R, g + 2R, ... (interleaved,
// so the load stays even as sequences end) and needs no synchronisation at all when C = 1. Column
// groups (C > 1, for batches too small to split) share one barrier per step. The whole loop is one
// at::parallel_for region; workers are numbered rg * C + cg.
#pragma once

#include <cstdint>

#include "common/barrier.h"

namespace bigmodel::lstm::fast {

// The float32 AVX-512 forward's two-pass tile (forward_tile_tall) takes blocks of up to kTallRows rows.
constexpr int64_t kTallRows = 8;

// Workers as R row groups x C column groups; rows: the forward's most rows per tile block (more than
// the tile's kMR only for the float32 AVX-512 forward, which then runs tall tiles).
struct Grid {
  int64_t R = 1, C = 1;
  int64_t rows = 6;
};

struct Steps {
  int64_t T = 0, B = 0, H = 0;
  const int64_t* batch_sizes = nullptr;  // [T]
  const int64_t* offsets = nullptr;      // [T + 1]
  bool reverse = false;
};

struct ForwardArgs {
  Steps steps;
  // [W_hh; W_ih]^T packed gate-grouped, K = Kh + Kx rows: float32, or bf16 bits on the bf16 path
  const void* panels = nullptr;
  int64_t half_panel = -1;       // float32 AVX-512: the half-width last panel (gemm::half_width_panel)
  int64_t Kh = 0;                // h's row length (H; rounded up to even on the bf16 path)
  int64_t Kx = 0;                // x's row length (I; rounded up to even on the bf16 path)
  const float* bias = nullptr;   // [4H] b_ih + b_hh, or nullptr
  // [N, 4H] x W_ih^T + b_ih + b_hh in the layer's gate order (the AVX2 loop only), computed by one GEMM
  // before the loop where streaming W_ih every step would cost more (lstm_cpu.cpp); then the panels
  // hold W_hh alone, Kx = 0 and bias is nullptr. May alias `gates` (float32 training): the cell update
  // reads a row's four pre-activations before it writes that row's gates.
  const float* gx = nullptr;
  const void* x = nullptr;       // [N, Kx] packed input (float32, or bf16 bits on the bf16 path)
  // train: the activated gates [N, 4H] and c_t [N, H] that backward reads, float32, or bf16 bits on
  // the bf16 path (the layer's saved dtype, lstm.h)
  void* gates = nullptr;
  void* cells = nullptr;
  // Running state in row-group-major order (state_row below): each row group's rows are contiguous, so
  // a worker's h and c never share a line or a prefetch stream with another's (measured at the seed
  // shape on two threads: inference 4%, training forward 9%, bf16 12% faster; NOTES v12).
  float* c = nullptr;            // [R * state_rows, H] running cell state
  void* h[2] = {nullptr, nullptr};  // [R * state_rows, Kh] running h, double-buffered, both start as h0
  int64_t state_rows = 0;        // rows per row group in h and c: ceil(B / R)
  void* hout = nullptr;          // [N, H] packed output (float32, or bf16 bits for a bf16 layer)
  Grid grid;
  SpinBarrier* barrier = nullptr;  // needed when grid.C > 1
  bool panels_outer = false;       // loop order of a step's tiles (see forward_loop)
};

// Where sorted row r (of row group r % R) keeps its running state: h and c in forward, dh and dc in
// backward.
inline int64_t state_row(int64_t r, const Grid& g, int64_t state_rows) { return (r % g.R) * state_rows + r / g.R; }
inline int64_t state_row(const ForwardArgs& a, int64_t r) { return state_row(r, a.grid, a.state_rows); }

// Per-worker scratch of the backward pass with fused weight gradients (grid.C == 1).
// The dgates and [h_{t-1}, x_t] rows of several steps are collected before each weight-gradient
// update, so that its K (rows) is large even for small or shrinking batches: the update reads and
// writes the whole [4H, F] sum, which must be paid for by enough FMAs.
struct WorkerScratch {
  float* dg = nullptr;     // [rows_cap, 4H] dgates of the worker's rows of the collected steps
  float* hx = nullptr;     // [F / 64, rows_cap, 64] their [h_{t-1}, x_t] as B panels, F = H + I padded
                           // (AVX2: each panel as four [rows_cap, 16] strips)
  float* dw = nullptr;     // [4H, F] running sum of dgates^T [h_{t-1}, x_t]: grad [W_hh, W_ih]
                           // (backward_amx: its transpose, [F, 4H rounded up to 32])
  float* dbias = nullptr;  // [4H] running sum of dgates
  int64_t pending = 0;     // rows collected since the last update
  bool fresh = true;       // dw and dbias not written yet (the first update stores instead of adding)
};

struct BackwardArgs {
  Steps steps;
  int64_t I = 0;
  const float* panels = nullptr;  // [W_hh, W_ih] as a [4H, H + I] B matrix, contiguous columns (AVX2: strips)
  // bf16 layers on AMX or vdpbf16ps: the same B matrix as bf16 panels with K = 4H zero-padded to Gp (a
  // multiple of 32); the [dh, dx] tiles then multiply dgates rounded to bf16 (backward_amx, _bf16).
  const uint16_t* panels_bf16 = nullptr;
  int64_t Gp = 0;
  const void* gates = nullptr;    // [N, 4H] activated, float32 or (saved_bf16) bf16 bits
  const void* cells = nullptr;    // [N, H], the same dtype
  bool saved_bf16 = false;        // a bf16 layer's forward saved gates and cells as bf16
  const float* c0 = nullptr;      // [B, H] sorted rows
  const float* h0 = nullptr;      // [B, H] sorted rows
  const float* hout = nullptr;    // [N, H] forward output, packed
  const float* x = nullptr;       // [N, I] input, packed
  const float* grad_out = nullptr;  // [N, H] packed, or nullptr
  // Running state in row-group-major order (state_row), as the forward's h and c.
  float* dh = nullptr;            // [R * state_rows, H] running, starts as grad_h_n, ends as grad_h0
  float* dc = nullptr;            // [R * state_rows, H] running, starts as grad_c_n, ends as grad_c0
  int64_t state_rows = 0;         // rows per row group in dh and dc: ceil(B / R)
  float* dx = nullptr;            // [N, I] grad_input, packed; nullptr: not wanted (its panels skipped)
  // Weight gradients: fused (scratch != nullptr, grid.C == 1), or left to time-batched GEMMs over
  // dgates [N, 4H] after the loop (grid.C > 1: a worker does not own whole rows of dgates; or too
  // few rows for the fused sums to pay off).
  WorkerScratch* scratch = nullptr;  // [R]
  int64_t rows_step = 0;  // most rows a worker has in one step
  int64_t rows_cap = 0;   // scratch rows (>= rows_step)
  float* dgates = nullptr;
  float* dbias = nullptr;  // without scratch: [R, 4H] per row group, summed by the pointwise pass
  // Without scratch: the loop computes dh only, and dx = dgates W_ih is left to one GEMM after it.
  bool dx_after = false;
  Grid grid;
  SpinBarrier* barrier = nullptr;
};

inline int64_t state_row(const BackwardArgs& a, int64_t r) { return state_row(r, a.grid, a.state_rows); }

// Worker bodies for at::parallel_for(0, R * C, 1, ...): run workers [w0, w1) over all steps.
void forward_f32(const ForwardArgs& a, bool train, int64_t w0, int64_t w1);
void forward_bf16(const ForwardArgs& a, bool train, int64_t w0, int64_t w1);
// A bf16 layer on the float32 tiles (CPUs whose vdpbf16ps is slow, or without AVX512-BF16): panels,
// x and h float32, the output (hout) and the saved gates and cells bf16 bits.
void forward_f32_bf16_out(const ForwardArgs& a, bool train, int64_t w0, int64_t w1);
void backward_f32(const BackwardArgs& a, int64_t w0, int64_t w1);
// bf16 layers on AMX: backward_f32 with the [dh, dx] tiles and the fused weight-gradient updates on
// AMX (dgates rounded to bf16, and [h, x] for the weight gradients, as the layer's own bf16 GEMMs
// would; float32 accumulation, float32 dh and dc across steps). Row blocks of up to kAmxRows.
void backward_amx(const BackwardArgs& a, int64_t w0, int64_t w1);
// bf16 layers on vdpbf16ps (AVX512-BF16 without AMX): backward_f32 with the [dh, dx] tiles and the
// fused weight-gradient updates multiplying bf16 (dgates and [h, x] rounded to bf16, the panels the
// AMX ones), float32 accumulation and state.
void backward_bf16(const BackwardArgs& a, int64_t w0, int64_t w1);

// The float32 loops on AVX2 + FMA. Forward tiles are kAvx2GateRows rows x two gates of 8 hidden
// units (a panel is four of them); backward tiles kAvx2BackwardRows rows x a quarter panel.
constexpr int64_t kAvx2GateRows = 6;
constexpr int64_t kAvx2BackwardRows = 6;
void forward_f32_avx2(const ForwardArgs& a, bool train, int64_t w0, int64_t w1);
// A bf16 layer on the AVX2 tiles (no bf16 arithmetic there): as forward_f32_bf16_out, panels, x and h
// float32, the output and the saved gates and cells bf16 bits.
void forward_f32_avx2_bf16_out(const ForwardArgs& a, bool train, int64_t w0, int64_t w1);
void backward_f32_avx2(const BackwardArgs& a, int64_t w0, int64_t w1);

// bf16 on AMX tiles: blocks of up to kAmxRows rows (two 16-row tile blocks sharing each weight
// tile). Kh and Kx must be multiples of 32, and x and both h buffers must hold kAmxRows * R readable
// rows past their last (the tiles load whole 16-row blocks).
constexpr int64_t kAmxRows = 32;
void forward_amx(const ForwardArgs& a, bool train, int64_t w0, int64_t w1);

}  // namespace bigmodel::lstm::fast
