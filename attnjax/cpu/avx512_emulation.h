// Portable stand-ins for the AVX-512 and AMX intrinsics of flash_cpu.cc, so that its
// AVX-512 build, AMX paths included, can run (slowly) on any x86-64 CPU.  Testing
// only: attnjax.cpu.build compiles flash_cpu.cc with -DATTNJAX_EMULATE_AVX512 when
// ATTNJAX_CPU_EMULATE_AVX512=1, and the kernel then takes its AVX-512 code paths (16
// lanes, 6 x 4 register tiles, 16 x 16 transposes, vscalefps-style 2^n) and its AMX
// paths (bf16 tile products on eight emulated tile registers per thread), with every
// intrinsic below evaluated lane by lane.
//
// Each function follows the operation's definition in the Intel Intrinsics Guide and
// the SDM for the arguments the kernel passes (the comparison predicates, rounding
// immediates and tile shapes the kernel uses; anything else aborts, as the hardware
// would fault).  GCC's <immintrin.h> declares the real intrinsics (callable only from
// code compiled for those extensions), so the kernel's calls are redirected to these
// by macros.

#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace attnjax_emu {

using F16 = float __attribute__((vector_size(64)));
using I16 = int32_t __attribute__((vector_size(64)));

// The bits of x as a To (same size): the casts between vector types and lane views.
template <class To, class From>
inline To As(From x) {
  static_assert(sizeof(To) == sizeof(From), "As<To>(x) reinterprets same-size values");
  To r;
  std::memcpy(&r, &x, sizeof(To));
  return r;
}
inline F16 F(__m512 x) { return As<F16>(x); }
inline __m512 Ps(F16 x) { return As<__m512>(x); }
inline I16 I(__m512i x) { return As<I16>(x); }
inline __m512i Si(I16 x) { return As<__m512i>(x); }
// A float's bits with a denormal value replaced by zero of its sign (DAZ).
inline uint32_t DazBits(uint32_t u) { return (u & 0x7F800000u) == 0 ? u & 0x80000000u : u; }
// Denormal results flushed to zero of their sign (FTZ).
inline float Ftz(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
}

inline __m512 loadu_ps(const void* p) { F16 r; std::memcpy(&r, p, 64); return Ps(r); }
inline void storeu_ps(void* p, __m512 x) { std::memcpy(p, &x, 64); }
inline __m512 set1_ps(float x) { F16 r; for (int i = 0; i < 16; ++i) r[i] = x; return Ps(r); }
inline __m512 setzero_ps() { return set1_ps(0.0f); }
inline __m512 add_ps(__m512 a, __m512 b) { return Ps(F(a) + F(b)); }
inline __m512 sub_ps(__m512 a, __m512 b) { return Ps(F(a) - F(b)); }
inline __m512 mul_ps(__m512 a, __m512 b) { return Ps(F(a) * F(b)); }
// MAXPS: a where a > b, else b (b also when either is NaN).
inline __m512 max_ps(__m512 a, __m512 b) {
  F16 x = F(a), y = F(b), r{};
  for (int i = 0; i < 16; ++i) r[i] = x[i] > y[i] ? x[i] : y[i];
  return Ps(r);
}
inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {
  F16 x = F(a), y = F(b), z = F(c), r{};
  for (int i = 0; i < 16; ++i) r[i] = std::fma(x[i], y[i], z[i]);
  return Ps(r);
}
inline __m512 fmsub_ps(__m512 a, __m512 b, __m512 c) {
  F16 x = F(a), y = F(b), z = F(c), r{};
  for (int i = 0; i < 16; ++i) r[i] = std::fma(x[i], y[i], -z[i]);
  return Ps(r);
}
// Halves, then quarters, ... (the order of GCC's reduction sequence).
template <class Op>
inline float Reduce(__m512 a, Op op) {
  F16 x = F(a);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) x[i] = op(x[i], x[i + w]);
  return x[0];
}
inline float reduce_add_ps(__m512 a) {
  return Reduce(a, [](float u, float v) { return u + v; });
}
inline float reduce_max_ps(__m512 a) {
  return Reduce(a, [](float u, float v) { return u > v ? u : v; });
}
// The ordered, quiet predicates the kernel uses (false for NaN operands).
inline __mmask16 cmp_ps_mask(__m512 a, __m512 b, int predicate) {
  F16 x = F(a), y = F(b);
  unsigned m = 0;
  for (int i = 0; i < 16; ++i) {
    bool bit;
    if (predicate == _CMP_GT_OQ) bit = x[i] > y[i];
    else if (predicate == _CMP_GE_OQ) bit = x[i] >= y[i];
    else std::abort();
    m |= static_cast<unsigned>(bit) << i;
  }
  return static_cast<__mmask16>(m);
}
inline __m512 maskz_mov_ps(__mmask16 k, __m512 a) {
  F16 x = F(a), r{};
  for (int i = 0; i < 16; ++i) r[i] = (k >> i) & 1 ? x[i] : 0.0f;
  return Ps(r);
}
// VRNDSCALEPS with zero fraction bits and round-to-nearest-even (the kernel's use).
inline __m512 roundscale_ps(__m512 a, int imm) {
  if (imm != (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)) std::abort();
  F16 x = F(a), r{};
  for (int i = 0; i < 16; ++i) r[i] = std::nearbyint(x[i]);
  return Ps(r);
}
// VSCALEFPS: a * 2^floor(b) (b = -inf gives 0 for finite a); results below the normal
// range are flushed to 0 when MXCSR.FTZ is set, as the instruction does.
inline __m512 scalef_ps(__m512 a, __m512 b) {
  F16 x = F(a), y = F(b), r{};
  const bool ftz = (_mm_getcsr() & 0x8000) != 0;
  for (int i = 0; i < 16; ++i) {
    const float e = std::floor(std::fmax(std::fmin(y[i], 400.0f), -400.0f));
    const float v = std::ldexp(x[i], static_cast<int>(e));
    r[i] = ftz ? Ftz(v) : v;
  }
  return Ps(r);
}
inline __m512 castsi512_ps(__m512i a) { return As<__m512>(a); }
inline __m512i castps_si512(__m512 a) { return As<__m512i>(a); }
inline __m512i add_epi32(__m512i a, __m512i b) {
  // Wrapping lane adds (as unsigned, which has no overflow).
  I16 x = I(a), y = I(b), r{};
  for (int i = 0; i < 16; ++i)
    r[i] = static_cast<int32_t>(static_cast<uint32_t>(x[i]) + static_cast<uint32_t>(y[i]));
  return Si(r);
}
inline __m512i slli_epi32(__m512i a, unsigned n) {
  I16 x = I(a), r{};
  for (int i = 0; i < 16; ++i)
    r[i] = n > 31 ? 0 : static_cast<int32_t>(static_cast<uint32_t>(x[i]) << n);
  return Si(r);
}
// Within each 128-bit lane j: (a0, b0, a1, b1) and (a2, b2, a3, b3).
inline __m512 unpacklo_ps(__m512 a, __m512 b) {
  F16 x = F(a), y = F(b), r{};
  for (int j = 0; j < 16; j += 4)
    r[j] = x[j], r[j + 1] = y[j], r[j + 2] = x[j + 1], r[j + 3] = y[j + 1];
  return Ps(r);
}
inline __m512 unpackhi_ps(__m512 a, __m512 b) {
  F16 x = F(a), y = F(b), r{};
  for (int j = 0; j < 16; j += 4)
    r[j] = x[j + 2], r[j + 1] = y[j + 2], r[j + 2] = x[j + 3], r[j + 3] = y[j + 3];
  return Ps(r);
}
// Within each 128-bit lane: two elements of a, then two of b, chosen by 2-bit fields.
inline __m512 shuffle_ps(__m512 a, __m512 b, int imm) {
  F16 x = F(a), y = F(b), r{};
  for (int j = 0; j < 16; j += 4) {
    r[j] = x[j + (imm & 3)];
    r[j + 1] = x[j + ((imm >> 2) & 3)];
    r[j + 2] = y[j + ((imm >> 4) & 3)];
    r[j + 3] = y[j + ((imm >> 6) & 3)];
  }
  return Ps(r);
}
// Whole 128-bit lanes: two of a, then two of b, chosen by 2-bit fields.
inline __m512 shuffle_f32x4(__m512 a, __m512 b, int imm) {
  F16 x = F(a), y = F(b), r{};
  for (int l = 0; l < 4; ++l) {
    const F16& src = l < 2 ? x : y;
    const int from = (imm >> (2 * l)) & 3;
    for (int e = 0; e < 4; ++e) r[4 * l + e] = src[4 * from + e];
  }
  return Ps(r);
}

// ---- integer lanes, bf16 conversion and scatter (the AMX paths' packing)

inline __m512i set1_epi32(int x) { I16 r; for (int i = 0; i < 16; ++i) r[i] = x; return Si(r); }
inline __m512i setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7,
                          int e8, int e9, int e10, int e11, int e12, int e13, int e14,
                          int e15) {
  I16 r = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
  return Si(r);
}
inline __m512i and_si512(__m512i a, __m512i b) { return Si(I(a) & I(b)); }
inline __m512i or_si512(__m512i a, __m512i b) { return Si(I(a) | I(b)); }
inline __m512i srli_epi32(__m512i a, unsigned n) {
  I16 x = I(a), r{};
  for (int i = 0; i < 16; ++i)
    r[i] = n > 31 ? 0 : static_cast<int32_t>(static_cast<uint32_t>(x[i]) >> n);
  return Si(r);
}
inline __m512i mullo_epi32(__m512i a, __m512i b) {
  I16 x = I(a), y = I(b), r{};
  for (int i = 0; i < 16; ++i)
    r[i] = static_cast<int32_t>(static_cast<uint32_t>(x[i]) * static_cast<uint32_t>(y[i]));
  return Si(r);
}
inline void storeu_si512(void* p, __m512i x) { std::memcpy(p, &x, 64); }
// The upper half is undefined on hardware; zero here.
inline __m512i castsi256_si512(__m256i a) {
  I16 r = {};
  std::memcpy(&r, &a, 32);
  return Si(r);
}
inline __m512i inserti64x4(__m512i a, __m256i b, int imm) {
  I16 r = I(a);
  std::memcpy(reinterpret_cast<char*>(&r) + 32 * (imm & 1), &b, 32);
  return Si(r);
}
inline void i32scatter_epi32(void* base, __m512i vindex, __m512i a, int scale) {
  I16 idx = I(vindex), x = I(a);
  for (int i = 0; i < 16; ++i)
    std::memcpy(static_cast<char*>(base) + static_cast<int64_t>(idx[i]) * scale, &x[i], 4);
}
// VCVTNEPS2BF16: round to nearest even; denormal inputs count as zero; NaN stays NaN.
inline uint16_t ToBf16Bits(float f) {
  uint32_t u = DazBits(As<uint32_t>(f));
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline __m256i cvtneps_pbh(__m512 a) {
  F16 x = F(a);
  uint16_t r[16];
  for (int i = 0; i < 16; ++i) r[i] = ToBf16Bits(x[i]);
  __m256i out;
  std::memcpy(&out, r, 32);
  return out;
}

// ---- AMX: eight tile registers per thread (palette 1: up to 16 rows of 64 bytes)

struct TileState {
  bool configured = false;
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) uint8_t data[8][16][64] = {};
};
inline TileState& Tiles() {
  thread_local TileState state;
  return state;
}
inline TileState& Configured(int t) {
  TileState& s = Tiles();
  if (!s.configured || t < 0 || t > 7 || s.rows[t] == 0) std::abort();
  return s;
}
// LDTILECFG: palette byte 0, colsb (uint16) at byte 16 + 2 t, rows at byte 48 + t.
inline void tile_loadconfig(const void* config) {
  const uint8_t* c = static_cast<const uint8_t*>(config);
  TileState& s = Tiles();
  s = TileState{};
  if (c[0] == 0) return;  // palette 0: tiles released
  if (c[0] != 1) std::abort();
  for (int t = 0; t < 8; ++t) {
    std::memcpy(&s.colsb[t], c + 16 + 2 * t, 2);
    s.rows[t] = c[48 + t];
    if (s.rows[t] > 16 || s.colsb[t] > 64 || s.colsb[t] % 4 != 0) std::abort();
  }
  s.configured = true;
}
inline void tile_release() { Tiles() = TileState{}; }
inline void tile_zero(int t) { std::memset(Configured(t).data[t], 0, sizeof(TileState::data[0])); }
// TILELOADD / TILESTORED: rows[t] rows of colsb[t] bytes at base + row * stride bytes
// (the rest of the register zero).
inline void tile_loadd(int t, const void* base, int64_t stride) {
  TileState& s = Configured(t);
  std::memset(s.data[t], 0, sizeof(TileState::data[0]));
  for (int r = 0; r < s.rows[t]; ++r)
    std::memcpy(s.data[t][r], static_cast<const char*>(base) + r * stride, s.colsb[t]);
}
inline void tile_stored(int t, void* base, int64_t stride) {
  TileState& s = Configured(t);
  for (int r = 0; r < s.rows[t]; ++r)
    std::memcpy(static_cast<char*>(base) + r * stride, s.data[t][r], s.colsb[t]);
}
inline float Bf16Daz(const uint8_t* p) {  // a bf16 as float32; denormals are zero
  uint16_t h;
  std::memcpy(&h, p, 2);
  return As<float>(DazBits(static_cast<uint32_t>(h) << 16));
}
// TDPBF16PS c += a @ b: c [M, N] float32, a [M, K] bf16 pairs, b the VNNI [K, N, 2]
// bf16.  As the SDM's pseudocode: per output, the even and the odd products of the
// pairs are summed apart from zero (FMAs, round to nearest even, denormals flushed),
// and their sum is then added to c.
inline void tile_dpbf16ps(int c, int a, int b) {
  TileState& s = Configured(c);
  Configured(a), Configured(b);
  const int M = s.rows[c], N = s.colsb[c] / 4, K = s.colsb[a] / 4;
  if (s.rows[a] != M || s.rows[b] != K || s.colsb[b] != s.colsb[c]) std::abort();
  for (int m = 0; m < M; ++m) {
    float part[16][2] = {};
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n)
        for (int e = 0; e < 2; ++e)
          part[n][e] = Ftz(std::fma(Bf16Daz(s.data[a][m] + 4 * k + 2 * e),
                                    Bf16Daz(s.data[b][k] + 4 * n + 2 * e), part[n][e]));
    float row[16];
    std::memcpy(row, s.data[c][m], 4 * N);
    for (int n = 0; n < N; ++n) row[n] = Ftz(row[n] + Ftz(part[n][0] + part[n][1]));
    std::memcpy(s.data[c][m], row, 4 * N);
  }
}

}  // namespace attnjax_emu

// Some intrinsics are macros in GCC's headers (at -O0): drop those before redirecting.
#undef _mm512_loadu_ps
#undef _mm512_storeu_ps
#undef _mm512_set1_ps
#undef _mm512_setzero_ps
#undef _mm512_add_ps
#undef _mm512_sub_ps
#undef _mm512_mul_ps
#undef _mm512_max_ps
#undef _mm512_fmadd_ps
#undef _mm512_fmsub_ps
#undef _mm512_reduce_add_ps
#undef _mm512_reduce_max_ps
#undef _mm512_cmp_ps_mask
#undef _mm512_maskz_mov_ps
#undef _mm512_roundscale_ps
#undef _mm512_scalef_ps
#undef _mm512_castsi512_ps
#undef _mm512_castps_si512
#undef _mm512_add_epi32
#undef _mm512_slli_epi32
#undef _mm512_unpacklo_ps
#undef _mm512_unpackhi_ps
#undef _mm512_shuffle_ps
#undef _mm512_shuffle_f32x4
#undef _mm512_set1_epi32
#undef _mm512_setr_epi32
#undef _mm512_and_si512
#undef _mm512_or_si512
#undef _mm512_srli_epi32
#undef _mm512_mullo_epi32
#undef _mm512_storeu_si512
#undef _mm512_castsi256_si512
#undef _mm512_inserti64x4
#undef _mm512_i32scatter_epi32
#undef _mm512_cvtneps_pbh
#undef _tile_loadconfig
#undef _tile_release
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbf16ps
#define _mm512_loadu_ps attnjax_emu::loadu_ps
#define _mm512_storeu_ps attnjax_emu::storeu_ps
#define _mm512_set1_ps attnjax_emu::set1_ps
#define _mm512_setzero_ps attnjax_emu::setzero_ps
#define _mm512_add_ps attnjax_emu::add_ps
#define _mm512_sub_ps attnjax_emu::sub_ps
#define _mm512_mul_ps attnjax_emu::mul_ps
#define _mm512_max_ps attnjax_emu::max_ps
#define _mm512_fmadd_ps attnjax_emu::fmadd_ps
#define _mm512_fmsub_ps attnjax_emu::fmsub_ps
#define _mm512_reduce_add_ps attnjax_emu::reduce_add_ps
#define _mm512_reduce_max_ps attnjax_emu::reduce_max_ps
#define _mm512_cmp_ps_mask attnjax_emu::cmp_ps_mask
#define _mm512_maskz_mov_ps attnjax_emu::maskz_mov_ps
#define _mm512_roundscale_ps attnjax_emu::roundscale_ps
#define _mm512_scalef_ps attnjax_emu::scalef_ps
#define _mm512_castsi512_ps attnjax_emu::castsi512_ps
#define _mm512_castps_si512 attnjax_emu::castps_si512
#define _mm512_add_epi32 attnjax_emu::add_epi32
#define _mm512_slli_epi32 attnjax_emu::slli_epi32
#define _mm512_unpacklo_ps attnjax_emu::unpacklo_ps
#define _mm512_unpackhi_ps attnjax_emu::unpackhi_ps
#define _mm512_shuffle_ps attnjax_emu::shuffle_ps
#define _mm512_shuffle_f32x4 attnjax_emu::shuffle_f32x4
#define _mm512_set1_epi32 attnjax_emu::set1_epi32
#define _mm512_setr_epi32 attnjax_emu::setr_epi32
#define _mm512_and_si512 attnjax_emu::and_si512
#define _mm512_or_si512 attnjax_emu::or_si512
#define _mm512_srli_epi32 attnjax_emu::srli_epi32
#define _mm512_mullo_epi32 attnjax_emu::mullo_epi32
#define _mm512_storeu_si512 attnjax_emu::storeu_si512
#define _mm512_castsi256_si512 attnjax_emu::castsi256_si512
#define _mm512_inserti64x4 attnjax_emu::inserti64x4
#define _mm512_i32scatter_epi32 attnjax_emu::i32scatter_epi32
#define _mm512_cvtneps_pbh attnjax_emu::cvtneps_pbh
#define _tile_loadconfig attnjax_emu::tile_loadconfig
#define _tile_release attnjax_emu::tile_release
#define _tile_zero attnjax_emu::tile_zero
#define _tile_loadd attnjax_emu::tile_loadd
#define _tile_stored attnjax_emu::tile_stored
#define _tile_dpbf16ps attnjax_emu::tile_dpbf16ps
