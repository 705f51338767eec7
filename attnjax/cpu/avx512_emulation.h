// Portable stand-ins for the AVX-512 intrinsics of flash_cpu.cc's 16-lane SIMD layer,
// so that its AVX-512 build can run (slowly) on a CPU without AVX-512.  Testing only:
// attnjax.cpu.build compiles flash_cpu.cc with -DATTNJAX_EMULATE_AVX512 when
// ATTNJAX_CPU_EMULATE_AVX512=1, and the kernel then takes its AVX-512 code paths
// (16 lanes, 6 x 4 register tiles, 16 x 16 transposes, vscalefps-style 2^n) with every
// intrinsic below evaluated lane by lane.  The AMX paths are not emulated.
//
// Each function follows the operation's definition in the Intel Intrinsics Guide for
// the arguments the kernel passes (the comparison predicates and rounding immediates
// the kernel uses; anything else aborts).  GCC's <immintrin.h> declares the real
// intrinsics (callable only from AVX-512 code), so the kernel's calls are redirected
// to these by macros.

#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace attnjax_emu {

using F16 = float __attribute__((vector_size(64)));
using I16 = int32_t __attribute__((vector_size(64)));

inline F16 F(__m512 x) { F16 r; std::memcpy(&r, &x, 64); return r; }
inline __m512 Ps(F16 x) { __m512 r; std::memcpy(&r, &x, 64); return r; }
inline I16 I(__m512i x) { I16 r; std::memcpy(&r, &x, 64); return r; }
inline __m512i Si(I16 x) { __m512i r; std::memcpy(&r, &x, 64); return r; }

inline __m512 loadu_ps(const void* p) { F16 r; std::memcpy(&r, p, 64); return Ps(r); }
inline void storeu_ps(void* p, __m512 x) { std::memcpy(p, &x, 64); }
inline __m512 set1_ps(float x) { F16 r; for (int i = 0; i < 16; ++i) r[i] = x; return Ps(r); }
inline __m512 setzero_ps() { return set1_ps(0.0f); }
inline __m512 add_ps(__m512 a, __m512 b) { return Ps(F(a) + F(b)); }
inline __m512 sub_ps(__m512 a, __m512 b) { return Ps(F(a) - F(b)); }
inline __m512 mul_ps(__m512 a, __m512 b) { return Ps(F(a) * F(b)); }
// MAXPS: a where a > b, else b (b also when either is NaN).
inline __m512 max_ps(__m512 a, __m512 b) {
  F16 x = F(a), y = F(b), r;
  for (int i = 0; i < 16; ++i) r[i] = x[i] > y[i] ? x[i] : y[i];
  return Ps(r);
}
inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {
  F16 x = F(a), y = F(b), z = F(c), r;
  for (int i = 0; i < 16; ++i) r[i] = std::fma(x[i], y[i], z[i]);
  return Ps(r);
}
inline __m512 fmsub_ps(__m512 a, __m512 b, __m512 c) {
  F16 x = F(a), y = F(b), z = F(c), r;
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
  F16 x = F(a), r;
  for (int i = 0; i < 16; ++i) r[i] = (k >> i) & 1 ? x[i] : 0.0f;
  return Ps(r);
}
// VRNDSCALEPS with zero fraction bits and round-to-nearest-even (the kernel's use).
inline __m512 roundscale_ps(__m512 a, int imm) {
  if (imm != (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)) std::abort();
  F16 x = F(a), r;
  for (int i = 0; i < 16; ++i) r[i] = std::nearbyint(x[i]);
  return Ps(r);
}
// VSCALEFPS: a * 2^floor(b) (b = -inf gives 0 for finite a); results below the normal
// range are flushed to 0 when MXCSR.FTZ is set, as the instruction does.
inline __m512 scalef_ps(__m512 a, __m512 b) {
  F16 x = F(a), y = F(b), r;
  const bool ftz = (_mm_getcsr() & 0x8000) != 0;
  for (int i = 0; i < 16; ++i) {
    const float e = std::floor(std::fmax(std::fmin(y[i], 400.0f), -400.0f));
    float v = std::ldexp(x[i], static_cast<int>(e));
    if (ftz && std::fpclassify(v) == FP_SUBNORMAL) v = std::copysign(0.0f, v);
    r[i] = v;
  }
  return Ps(r);
}
inline __m512 castsi512_ps(__m512i a) { __m512 r; std::memcpy(&r, &a, 64); return r; }
inline __m512i castps_si512(__m512 a) { __m512i r; std::memcpy(&r, &a, 64); return r; }
inline __m512i add_epi32(__m512i a, __m512i b) {
  // Wrapping lane adds (as unsigned, which has no overflow).
  I16 x = I(a), y = I(b), r;
  for (int i = 0; i < 16; ++i)
    r[i] = static_cast<int32_t>(static_cast<uint32_t>(x[i]) + static_cast<uint32_t>(y[i]));
  return Si(r);
}
inline __m512i slli_epi32(__m512i a, unsigned n) {
  I16 x = I(a), r;
  for (int i = 0; i < 16; ++i)
    r[i] = n > 31 ? 0 : static_cast<int32_t>(static_cast<uint32_t>(x[i]) << n);
  return Si(r);
}
// Within each 128-bit lane j: (a0, b0, a1, b1) and (a2, b2, a3, b3).
inline __m512 unpacklo_ps(__m512 a, __m512 b) {
  F16 x = F(a), y = F(b), r;
  for (int j = 0; j < 16; j += 4)
    r[j] = x[j], r[j + 1] = y[j], r[j + 2] = x[j + 1], r[j + 3] = y[j + 1];
  return Ps(r);
}
inline __m512 unpackhi_ps(__m512 a, __m512 b) {
  F16 x = F(a), y = F(b), r;
  for (int j = 0; j < 16; j += 4)
    r[j] = x[j + 2], r[j + 1] = y[j + 2], r[j + 2] = x[j + 3], r[j + 3] = y[j + 3];
  return Ps(r);
}
// Within each 128-bit lane: two elements of a, then two of b, chosen by 2-bit fields.
inline __m512 shuffle_ps(__m512 a, __m512 b, int imm) {
  F16 x = F(a), y = F(b), r;
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
  F16 x = F(a), y = F(b), r;
  for (int l = 0; l < 4; ++l) {
    const F16& src = l < 2 ? x : y;
    const int from = (imm >> (2 * l)) & 3;
    for (int e = 0; e < 4; ++e) r[4 * l + e] = src[4 * from + e];
  }
  return Ps(r);
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
