// Packing of B matrices into the GEMM core's panels (layout in microkernel.h), and the CPU checks
// that say whether the AVX-512 or AVX2 micro-kernels may run here.
//
// A packed matrix is a plain CPU tensor (64-byte aligned by PyTorch's allocator): float32
// [npanels, K, 64], or bfloat16 bits (int16) [npanels, ceil(K/2), 64, 2]. Packing is done per call
// from the module's parameters, which are never modified.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace bigmodel::gemm {

constexpr int64_t kPanel = 64;

// Source column of every panel column, or -1 for a zero column; size = npanels * 64.
using ColumnMap = std::vector<int64_t>;

// Columns 0..N-1 in order, the last panel zero-padded.
ColumnMap contiguous_columns(int64_t N);

// The LSTM's gate-grouped order over 4H gate columns (i, f, g, o blocks of H): panel p holds
// hidden units 16p .. 16p+15 of gate i, then of f, g and o. ceil(H/16) panels.
// half_last: when the last panel holds 8 units or fewer, its gates sit 8 columns apart (i, f, g, o in
// columns 0-31, the rest zero), so that a tile of two zmm columns covers it.
ColumnMap gate_grouped_columns(int64_t H, bool half_last = false);
// The panel gate_grouped_columns(H, true) made half-width, or -1.
int64_t half_width_panel(int64_t H);
// The same units per panel in halves of 8 units for 8-lane tiles (the AVX2 forward): columns 32 h + 8 g
// + j of panel p hold gate g of unit 16 p + 8 h + j, so the two gates of a gate-pair tile (i, f or g, o of
// one half) are 16 contiguous columns, one 64-byte line of each panel row.
ColumnMap gate_half_grouped_columns(int64_t H);

// B(k, n) is src[n, k] when src_is_nk (src is [N, K], e.g. a weight used as x W^T), else src[k, n];
// src is a 2-D float32, float64 or bfloat16 tensor.

// Packs src into rows k0 .. k0 + K(src) of panels that have K_total rows (out: [npanels, K_total, 64]
// floats), writing only the columns cols maps (>= 0): B matrices made of several weights are packed
// part by part into one zeroed buffer, without concatenating the weights first.
void pack_f32_into(float* out, int64_t K_total, int64_t k0, const at::Tensor& src, bool src_is_nk,
                   const ColumnMap& cols);
// The same for bf16 k pairs: rows k0 .. k0 + K(src) of panels [npanels, K2_total, 64, 2] (int16 bf16
// bits; row k is element k % 2 of pair k / 2), from a float32 (rounded to nearest even) or bfloat16
// src, read in place.
void pack_bf16_into(int16_t* out, int64_t K2_total, int64_t k0, const at::Tensor& src, bool src_is_nk,
                    const ColumnMap& cols);

// The packed form of weights, cached across calls: `pack(buffer)` runs only when no entry has the
// same `kind` (which packing) and sources of the same shapes, dtypes and contents; it writes the
// sources into a zeroed `sizes`/`dtype` buffer, or over an entry of the same kind and shapes that
// only the cache holds (a training step's weights change on every call), whose padding is zero
// already. Contents are compared through a 64-bit digest of their bytes, not through identity or
// version counters: an update through `.data` or a fresh tensor at a reused address can never hit a
// stale entry, and reading the weights costs ~1% of packing them. At most 16 entries, least recently
// used first out.
at::Tensor cached_pack(const std::vector<at::Tensor>& sources, int64_t kind, at::IntArrayRef sizes,
                       at::ScalarType dtype, const std::function<void(at::Tensor&)>& pack);

namespace cpu {
// The CPU has AVX-512 F/BW/DQ/VL (and AVX512-BF16) and this build has the kernels.
bool has_avx512();
bool has_avx512_bf16();
// AMX-BF16 tiles, with the kernel's permission to use them granted to this process.
bool has_amx_bf16();
// The CPU has AVX2 and FMA and this build has the AVX2 kernels (microkernel_avx2.h).
bool has_avx2();

// Which CPU kernels BIGMODEL_CPU_KERNEL asks for (read on every call, so tests and benchmarks can
// switch in one process):
//   auto     (or unset) the best kernels this CPU has: AVX-512 and AMX, else AVX2, else portable
//   avx512   the AVX-512 kernels without AMX tiles, bf16 LSTM layers on vdpbf16ps (as a CPU with
//            AVX512-BF16, no AMX and a fast vdpbf16ps runs them); an error on a CPU without AVX-512
//   avx512-fp32  the same, but bf16 LSTM layers multiply on float32 FMAs (bf16 kept in memory), as a
//            CPU whose vdpbf16ps is slow runs them (bf16_dot_pays() below)
//   avx2     the AVX2 kernels even on an AVX-512 CPU, and the portable path wherever there is no
//            AVX2 kernel (as an AVX2-only CPU would run); an error on a CPU without AVX2 + FMA
//   generic  the portable ATen-BLAS path everywhere
// Any other value is an error naming the variable and these values.
enum class KernelChoice { Auto, Avx512, Avx512Fp32, Avx2, Generic };
KernelChoice kernel_choice();
const char* kernel_choice_name(KernelChoice k);
// The AVX-512 micro-kernels may run: kernel_choice() is Auto, Avx512 or Avx512Fp32 (callers still
// check the CPU).
bool microkernels_enabled();
// The AMX tiles may run: the CPU has them and kernel_choice() is Auto.
bool amx_enabled();
// vdpbf16ps multiplies bf16 at least about as fast as widening to float32 and using FMAs: its FLOP
// rate (two multiply-adds per lane) exceeds 0.8x the FMA's, i.e. it issues at more than 0.4x the
// FMA's instruction rate (at equal FLOP rates it still reads half the weight bytes). Not every CPU
// with AVX512-BF16 does (measured on an Emerald Rapids VM: one every two cycles against two FMAs per
// cycle, so bf16 dot products ran at half the float32 FMA rate). Timed once per process (~0.1 ms)
// on register-only loops of both; false without AVX512-BF16.
bool bf16_dot_pays();
// Measured throughput of those loops, GFLOP/s per thread (0 without AVX512-BF16): {fma, bf16 dot}.
std::pair<double, double> fma_and_bf16_dot_rates();
// How the bf16 kernels (LSTM and attention) multiply under kernel_choice(): on AMX tiles (auto, where
// amx_enabled()); on vdpbf16ps (avx512 on a CPU with AVX512-BF16, or auto where bf16_dot_pays());
// on float32 FMAs over bf16 storage (avx512-fp32, avx512 without AVX512-BF16, or auto where vdpbf16ps
// is slow); or on none of the AVX-512 kernels (avx2, generic, auto without AVX-512).
enum class Bf16Kernel { None, Fp32Tiles, Dot, Amx };
Bf16Kernel bf16_kernel();
}  // namespace cpu

}  // namespace bigmodel::gemm
