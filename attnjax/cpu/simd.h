// attnjax CPU flash attention: the SIMD layer (a float vector Vf of kLanes lanes:
// AVX-512, emulated AVX-512 in tests, or AVX2 with FMA) and its vector math (exp2).
// (One unit of the unity build compiled from flash_cpu.cc.)

#ifndef ATTNJAX_CPU_SIMD_H_
#define ATTNJAX_CPU_SIMD_H_

// GCC 12's AVX-512 intrinsics (vmaxps, vscalefps, vrndscaleps, ...) pass
// _mm512_undefined_ps() as the unused pass-through operand, a self-initialised variable
// that -W(maybe-)uninitialized reports wherever they are inlined (a compiler bug fixed in
// later GCC); silence it for the intrinsics headers only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#ifdef ATTNJAX_EMULATE_AVX512  // tests: the AVX-512 paths on any x86-64 CPU, emulated
#include "avx512_emulation.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kSlack = 8.0f;  // forward: probabilities stay <= 2^8 before normalising

// ---------------------------------------------------------------- SIMD layer
//
// The kernel is written once over a float vector Vf of kLanes lanes: 16 (__m512) when
// the compiler targets AVX-512F/DQ (or, in tests, with ATTNJAX_EMULATE_AVX512), else 8
// (__m256, AVX2 with FMA).  build.py compiles with -march=native, so the width is the
// running machine's.  Block sizes and head dims stay multiples of 16, which both
// widths divide.
#if (defined(__AVX512F__) && defined(__AVX512DQ__)) || defined(ATTNJAX_EMULATE_AVX512)
#define ATTNJAX_AVX512 1
constexpr int kLanes = 16;
using Vf = __m512;
inline Vf Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vf x) { _mm512_storeu_ps(p, x); }
inline Vf Set1(float x) { return _mm512_set1_ps(x); }
inline Vf Zero() { return _mm512_setzero_ps(); }
inline Vf Add(Vf a, Vf b) { return _mm512_add_ps(a, b); }
inline Vf Sub(Vf a, Vf b) { return _mm512_sub_ps(a, b); }
inline Vf Mul(Vf a, Vf b) { return _mm512_mul_ps(a, b); }
inline Vf Max(Vf a, Vf b) { return _mm512_max_ps(a, b); }
inline Vf Fmadd(Vf a, Vf b, Vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline Vf Fmsub(Vf a, Vf b, Vf c) { return _mm512_fmsub_ps(a, b, c); }  // a * b - c
inline float ReduceMax(Vf x) { return _mm512_reduce_max_ps(x); }
inline float ReduceAdd(Vf x) { return _mm512_reduce_add_ps(x); }
inline bool AnyGreater(Vf a, Vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
inline Vf RoundNearest(Vf x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// p * 2^n for integral n <= 127 (underflow gives 0 under the flush-to-zero mode).
inline Vf Scale2(Vf p, Vf n) { return _mm512_scalef_ps(p, n); }
// p * 2^n with n held in the low mantissa bits of t = kRoundMagic + n (see Exp2Shifted).
inline Vf AddExponent(Vf p, Vf t) {
  return _mm512_castsi512_ps(_mm512_add_epi32(
      _mm512_castps_si512(p), _mm512_slli_epi32(_mm512_castps_si512(t), 23)));
}
// p where x >= lo, else 0.
inline Vf KeepWhereGe(Vf p, Vf x, Vf lo) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), p);
}

// out[c * ldo + r] = in[r * ldi + c] for a 16 x 16 block (four rounds of shuffles).
inline void TransposeBlock(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_ps(in + i * ldi);
  for (int i = 0; i < 16; i += 2) {  // interleave row pairs
    b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks within each 128-bit lane
    a[i] = _mm512_shuffle_ps(b[i], b[i + 2], 0x44);
    a[i + 1] = _mm512_shuffle_ps(b[i], b[i + 2], 0xEE);
    a[i + 2] = _mm512_shuffle_ps(b[i + 1], b[i + 3], 0x44);
    a[i + 3] = _mm512_shuffle_ps(b[i + 1], b[i + 3], 0xEE);
  }
  for (int i = 0; i < 16; i += 8)  // then the 128-bit lanes
    for (int j = 0; j < 4; ++j) {
      b[i + j] = _mm512_shuffle_f32x4(a[i + j], a[i + 4 + j], 0x88);
      b[i + 4 + j] = _mm512_shuffle_f32x4(a[i + j], a[i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    a[j] = _mm512_shuffle_f32x4(b[j], b[8 + j], 0x88);
    a[8 + j] = _mm512_shuffle_f32x4(b[j], b[8 + j], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + i * ldo, a[i]);
}

// Register tile of every GEMM: 6 rows x 4 vectors (24 accumulators of 32 registers).
constexpr int kMR = 6, kNV = 4;
#elif defined(__AVX2__) && defined(__FMA__)
#define ATTNJAX_AVX512 0
constexpr int kLanes = 8;
using Vf = __m256;
inline Vf Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vf x) { _mm256_storeu_ps(p, x); }
inline Vf Set1(float x) { return _mm256_set1_ps(x); }
inline Vf Zero() { return _mm256_setzero_ps(); }
inline Vf Add(Vf a, Vf b) { return _mm256_add_ps(a, b); }
inline Vf Sub(Vf a, Vf b) { return _mm256_sub_ps(a, b); }
inline Vf Mul(Vf a, Vf b) { return _mm256_mul_ps(a, b); }
inline Vf Max(Vf a, Vf b) { return _mm256_max_ps(a, b); }
inline Vf Fmadd(Vf a, Vf b, Vf c) { return _mm256_fmadd_ps(a, b, c); }
inline Vf Fmsub(Vf a, Vf b, Vf c) { return _mm256_fmsub_ps(a, b, c); }
inline float ReduceMax(Vf x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float ReduceAdd(Vf x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline bool AnyGreater(Vf a, Vf b) {
  return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0;
}
inline Vf RoundNearest(Vf x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// p * 2^n for integral n <= 127: n is clamped to -127, whose biased exponent 0 makes
// the factor exactly 0 (smaller n would wrap around in the exponent field).
inline Vf Scale2(Vf p, Vf n) {
  const __m256i e = _mm256_cvtps_epi32(_mm256_max_ps(n, _mm256_set1_ps(-127.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
// p * 2^n with n held in the low mantissa bits of t = kRoundMagic + n (see Exp2Shifted).
inline Vf AddExponent(Vf p, Vf t) {
  return _mm256_castsi256_ps(_mm256_add_epi32(
      _mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(t), 23)));
}
// p where x >= lo, else 0.
inline Vf KeepWhereGe(Vf p, Vf x, Vf lo) {
  return _mm256_and_ps(p, _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
}

// out[c * ldo + r] = in[r * ldi + c] for an 8 x 8 block (three rounds of shuffles).
inline void TransposeBlock(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m256 a[8], b[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(in + i * ldi);
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs
    b[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // 4 x 4 blocks within each 128-bit lane
    a[i] = _mm256_shuffle_ps(b[i], b[i + 2], 0x44);
    a[i + 1] = _mm256_shuffle_ps(b[i], b[i + 2], 0xEE);
    a[i + 2] = _mm256_shuffle_ps(b[i + 1], b[i + 3], 0x44);
    a[i + 3] = _mm256_shuffle_ps(b[i + 1], b[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {  // then the 128-bit lanes
    b[j] = _mm256_permute2f128_ps(a[j], a[4 + j], 0x20);
    b[4 + j] = _mm256_permute2f128_ps(a[j], a[4 + j], 0x31);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + i * ldo, b[i]);
}

// Register tile of every GEMM: 6 rows x 2 vectors (12 accumulators of 16 registers).
constexpr int kMR = 6, kNV = 2;
#else
#error "attnjax cpu_flash needs AVX-512F/DQ or AVX2 with FMA (build with -march=native)"
#endif

// ---------------------------------------------------------------- vector math

// 2^f on [-0.5, 0.5], fitted for relative error (bounds as evaluated in float32):
// kDegree 5: <= 2.2e-7 (float32 accuracy); kDegree 3: <= 7.5e-5, for probabilities that
// are rounded to bf16 (relative error up to 2^-9) before they are used.
template <int kDegree>
inline Vf Exp2Poly(Vf f) {
  static_assert(kDegree == 3 || kDegree == 5, "Exp2 has degree 3 or 5");
  Vf p;
  if (kDegree == 3) {
    p = Set1(5.517166e-02f);
    p = Fmadd(p, f, Set1(2.4261112e-01f));
    p = Fmadd(p, f, Set1(6.9326099e-01f));
    p = Fmadd(p, f, Set1(9.9992807e-01f));
  } else {
    p = Set1(1.3277444522827864e-03f);
    p = Fmadd(p, f, Set1(9.675883688032627e-03f));
    p = Fmadd(p, f, Set1(5.550713092088699e-02f));
    p = Fmadd(p, f, Set1(2.4022112786769867e-01f));
    p = Fmadd(p, f, Set1(6.931469440460205e-01f));
    p = Fmadd(p, f, Set1(1.0000001192092896f));
  }
  return p;
}

// 2^x for x <= ~0.  With kClamp, x = -inf (or anything below -200) gives exactly 0;
// without it x must be finite (unmasked logits).
template <bool kClamp = true, int kDegree = 5>
inline Vf Exp2(Vf x) {
  if (kClamp) x = Max(x, Set1(-200.0f));
  Vf n = RoundNearest(x);
  return Scale2(Exp2Poly<kDegree>(Sub(x, n)), n);
}

// 1.5 * 2^23: for |y| < 2^22, y + kRoundMagic rounds y to an integer n and holds n in
// the low mantissa bits.
constexpr float kRoundMagic = 12582912.0f;
// Integral running maxima below this magnitude take the Exp2Shifted path (exact for
// |m| < 2^22: kRoundMagic - m, t and t - (kRoundMagic - m) are then exact integers).
constexpr float kShiftedMaxLimit = 2097152.0f;  // 2^21

// 2^(x - m) for an integral m (|m| < kShiftedMaxLimit) and x <= m + 2^7, the forward's
// softmax exponential with the subtraction of the running max folded into the
// rounding: t = x + (kRoundMagic - m) = kRoundMagic + n with n = round(x - m), exactly,
// so f = x - (t - (kRoundMagic - m)) = x - m - n needs no separate round, and 2^n is
// added to the exponent field of 2^f straight from t's bits.  Everything on the
// floating-point add and FMA pipes: three adds and the polynomial's FMAs, against an
// FMA, a round, a convert and a multiply for Exp2.  x is first raised to m - 126
// (keeping 2^n normal); with kMasked such x (-inf included) give exactly 0, otherwise
// at most 2^-126.
struct Exp2Shifted {
  Vf lo, cm;
  explicit Exp2Shifted(float m) : lo(Set1(m - 126.0f)), cm(Set1(kRoundMagic - m)) {}
  template <bool kMasked, int kDegree>
  Vf Apply(Vf x) const {
    const Vf xc = Max(x, lo);
    const Vf t = Add(xc, cm);
    const Vf p = AddExponent(Exp2Poly<kDegree>(Sub(xc, Sub(t, cm))), t);
    return kMasked ? KeepWhereGe(p, x, lo) : p;
  }
};

inline float Exp2Scalar(float x) { return x == kNegInf ? 0.0f : std::exp2(x); }

}  // namespace

#endif  // ATTNJAX_CPU_SIMD_H_
