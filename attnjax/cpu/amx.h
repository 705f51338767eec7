// attnjax CPU flash attention: the AMX bf16 tile layer (availability, tile
// configuration, exact bf16 splits, packing into pieces, the 32-row tile GEMM).
// (One unit of the unity build compiled from flash_cpu.cc.)

#ifndef ATTNJAX_CPU_AMX_H_
#define ATTNJAX_CPU_AMX_H_

#include <cstdint>

#include "gemm.h"

namespace {

// ---------------------------------------------------------------- AMX (bf16 tiles)
//
// Sapphire Rapids and later have AMX: 8 tile registers of 16 rows x 64 bytes and a
// bf16 tile product with float32 accumulation (TDPBF16PS, 16x16 outputs, 32-deep).
// Float32 GEMMs run on it in "bf16x6" form: every float32 x is split exactly into
// three bf16 pieces x = x0 + x1 + x2 (truncating split, |x1| < 2^-7 |x|,
// |x2| < 2^-14 |x|) and A @ B = sum over the piece pairs (i, j) with i + j <= 2 of
// A_i @ B_j.  The dropped pairs weigh < 2^-20 of |a||b| per product, below the
// float32 rounding of a 64-term dot product.  Inputs that are exactly bf16 (every
// low half-word zero, e.g. bf16 arrays cast to float32) have a single piece, so
// their pairs drop to one (scores) or three (P @ V).

#if ATTNJAX_AVX512 && (defined(ATTNJAX_EMULATE_AVX512) || \
                       (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11))
#define ATTNJAX_AMX 1
#else
#define ATTNJAX_AMX 0
#endif

constexpr int kPieces = 3;
constexpr int64_t kAmxRows = 32;  // forward rows per strip: two 16-row tiles

using bf16 = uint16_t;

#if ATTNJAX_AMX
#ifdef ATTNJAX_EMULATE_AVX512  // tile registers emulated per thread (avx512_emulation.h)
#define ATTNJAX_AMX_TARGET
bool AmxAvailable() { return true; }
#else
#define ATTNJAX_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512bf16")))

bool AmxAvailable() {
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("avx512bf16"))
      return false;
    // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}
#endif

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile register: 16 rows x 64 bytes (16 float32 or 32 bf16 per row).
ATTNJAX_AMX_TARGET void ConfigureTiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
}

// Tile intrinsics are called through these functions (which carry the target
// attribute) from the ParallelFor lambdas, which do not: compilers for CPUs with
// AVX-512 but without AMX then build the file too.
ATTNJAX_AMX_TARGET void ReleaseTiles() { _tile_release(); }

// The three bf16 pieces of 16 floats, as float32 values (low half-words zero).
inline void SplitPieces(__m512 x, __m512 out[kPieces]) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  out[0] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), hi));
  const __m512 r = _mm512_sub_ps(x, out[0]);
  out[1] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), hi));
  out[2] = _mm512_sub_ps(r, out[1]);
}

// 16 bf16-valued floats as 16 bf16 (exact: the conversion has nothing to round).
ATTNJAX_AMX_TARGET inline __m256i ToBf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// Two rows of 16 bf16-valued floats as 16 VNNI words: (a[i], b[i]) in word i.
inline __m512i PairWords(__m512 a, __m512 b) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  return _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(b), hi),
                         _mm512_srli_epi32(_mm512_castps_si512(a), 16));
}

// Finite floats rounded to the nearest bf16 (ties to even), kept as float32.
inline __m512 RoundBf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_castsi512_ps(
      _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Splits 16 floats into their three pieces, stored as bf16 at out[0], out[stride],
// out[2 * stride].
ATTNJAX_AMX_TARGET inline void Split3(__m512 x, bf16* out, int64_t stride) {
  __m512 pc[kPieces];
  SplitPieces(x, pc);
  for (int p = 0; p < kPieces; ++p)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * stride), ToBf16(pc[p]));
}

#endif  // ATTNJAX_AMX

#if ATTNJAX_AMX

// True when every element of x is a bf16 value (its low half-word is zero).
// Stops at the first chunk with a float32-only value (at once for float32 data).
bool IsBf16Exact(const float* x, int64_t n) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(x);
  for (int64_t i0 = 0; i0 < n; i0 += 4096) {
    uint32_t any = 0;
    for (int64_t i = i0; i < std::min(n, i0 + 4096); ++i) any |= u[i];
    if (any & 0xFFFFu) return false;
  }
  return true;
}

// Packs x [B, S, K, D] (K or V) per (b, kv head, key block) into `pieces` bf16
// pieces in the VNNI order of a tile-product B operand (pairs along the reduction
// dimension are adjacent).  Keys as columns (for Q K^T; D is the reduction):
// [piece][Dp / 2][bk][2], element (d, s) at [d / 2][s][d % 2].  Keys as reduction
// (for P V): [piece][bk / 2][D][2], element (s, d) at [s / 2][d][s % 2].  Zero beyond S
// and D (D % 16 == 0, Dp % 32 == 0).  Block stride: pieces * Dp * bk.
ATTNJAX_AMX_TARGET void PackPieces(const Geometry& g, const float* x, int64_t D, int64_t Dp,
                                   bool keys_as_columns, int pieces, bf16* out,
                                   int nthreads) {
  ParallelFor(g.B * g.K * g.nk, nthreads, [&](int64_t item, int) {
    const int64_t kb = item % g.nk, bh = item / g.nk, kvh = bh % g.K, b = bh / g.K;
    bf16* dst = out + item * pieces * Dp * g.bk;
    const int64_t piece = Dp * g.bk, cols = std::min(g.bk, g.S - kb * g.bk);
    std::fill(dst, dst + pieces * piece, bf16{0});
    auto row = [&](int64_t jj) { return x + ((b * g.S + kb * g.bk + jj) * g.K + kvh) * D; };
    __m512 pa[kPieces], pb[kPieces];
    if (keys_as_columns) {
      // 32 consecutive d of key jj are 16 words (d pairs), one per VNNI row.
      const __m512i rows = _mm512_mullo_epi32(
          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          _mm512_set1_epi32(static_cast<int>(g.bk)));
      for (int64_t jj = 0; jj < cols; ++jj) {
        const float* src = row(jj);
        for (int64_t d = 0; d < D; d += 32) {
          SplitPieces(_mm512_loadu_ps(src + d), pa);
          if (d + 16 < D) SplitPieces(_mm512_loadu_ps(src + d + 16), pb);
          else for (auto& z : pb) z = _mm512_setzero_ps();
          for (int p = 0; p < pieces; ++p) {
            // (ToBf16, not a two-source conversion inline: this lambda does not take
            // the target attribute, and CPUs with AVX-512 but no BF16 compile it too.)
            const __m512i words =
                _mm512_inserti64x4(_mm512_castsi256_si512(ToBf16(pa[p])), ToBf16(pb[p]), 1);
            _mm512_i32scatter_epi32(dst + p * piece + (d / 2) * 2 * g.bk + 2 * jj, rows, words,
                                    4);
          }
        }
      }
    } else {
      // Keys jj, jj + 1 interleave: word (s pair, d) = (x[jj + 1, d], x[jj, d]).
      for (int64_t jj = 0; jj < cols; jj += 2) {
        for (int64_t d = 0; d < D; d += 16) {
          SplitPieces(_mm512_loadu_ps(row(jj) + d), pa);
          if (jj + 1 < cols) SplitPieces(_mm512_loadu_ps(row(jj + 1) + d), pb);
          else for (auto& z : pb) z = _mm512_setzero_ps();
          for (int p = 0; p < pieces; ++p) {
            _mm512_storeu_si512(dst + p * piece + (jj / 2) * 2 * Dp + 2 * d,
                                PairWords(pa[p], pb[p]));
          }
        }
      }
    }
  });
}

// C[32, 16 nct] = (C if ACC else 0) + sum over piece pairs (i, j), i + j <= 2, of
// A_i[32, kdim] @ B_j[kdim, 16 nct] on the AMX tiles.  A_i = a + i * a_piece is
// row-major bf16 (row stride lda elements); B_j = b + j * b_piece is VNNI bf16
// [kdim / 2][16 nct][2]; C is float32 (row stride ldc elements); kdim % 32 == 0.
// Tiles: 0-3 C (2 x 2), 4-5 A, 6-7 B.
template <bool ACC>
ATTNJAX_AMX_TARGET void AmxGemm32(int64_t nct, int64_t kdim, const bf16* a, int64_t lda,
                                  int64_t a_piece, int na, const bf16* b, int64_t b_piece,
                                  int nb, float* c, int64_t ldc) {
  const int64_t ldb = 32 * nct;  // elements per VNNI row
  for (int64_t ct = 0; ct < nct; ct += 2) {
    const bool two = ct + 1 < nct;
    float* c0 = c + 16 * ct;
    if (ACC) {
      _tile_loadd(0, c0, ldc * 4);
      _tile_loadd(2, c0 + 16 * ldc, ldc * 4);
      if (two) {
        _tile_loadd(1, c0 + 16, ldc * 4);
        _tile_loadd(3, c0 + 16 * ldc + 16, ldc * 4);
      }
    } else {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    }
    // Per 32-deep slice: each A_i once, then the B_j it pairs with (B_j stays in L1
    // across the i's).  Smallest pairs first.
    for (int64_t kc = 0; kc < kdim; kc += 32) {
      const bf16* bk0 = b + 32 * ct + (kc / 2) * ldb;
      for (int i = na - 1; i >= 0; --i) {
        const bf16* ai = a + i * a_piece + kc;
        _tile_loadd(4, ai, lda * 2);
        _tile_loadd(5, ai + 16 * lda, lda * 2);
        for (int j = std::min(nb, kPieces - i) - 1; j >= 0; --j) {
          const bf16* bj = bk0 + j * b_piece;
          _tile_loadd(6, bj, ldb * 2);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (two) {
            _tile_loadd(7, bj + 32, ldb * 2);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
    }
    _tile_stored(0, c0, ldc * 4);
    _tile_stored(2, c0 + 16 * ldc, ldc * 4);
    if (two) {
      _tile_stored(1, c0 + 16, ldc * 4);
      _tile_stored(3, c0 + 16 * ldc + 16, ldc * 4);
    }
  }
}

#else
bool AmxAvailable() { return false; }
bool IsBf16Exact(const float*, int64_t) { return false; }
#endif  // ATTNJAX_AMX

}  // namespace

#endif  // ATTNJAX_CPU_AMX_H_
