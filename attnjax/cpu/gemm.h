// attnjax CPU flash attention: the register-tiled SIMD GEMM micro-kernels, the
// problem geometry, band masks and the packing of q, k, v into GEMM panels.
// (One unit of the unity build compiled from flash_cpu.cc.)

#ifndef ATTNJAX_CPU_GEMM_H_
#define ATTNJAX_CPU_GEMM_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace {

// ---------------------------------------------------------------- GEMM micro-kernels

// C[MR, kLanes*NV] (+)= sum_p A(r, p) * B[p, 0:kLanes*NV], A(r, p) = A[r*sai + p*sak] (any
// strides: A is read as broadcast scalars), B rows contiguous with row stride ldb.
template <int MR, int NV, bool ACC>
void Micro(int64_t kd, const float* __restrict A, int64_t sai, int64_t sak,
           const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc,
           float* __restrict rowmax) {
  Vf acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[r][v] = ACC ? Load(C + r * ldc + kLanes * v) : Zero();
  for (int64_t p = 0; p < kd; ++p) {
    Vf b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = Load(B + p * ldb + kLanes * v);
    const float* a = A + p * sak;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      Vf ar = Set1(a[r * sai]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Fmadd(ar, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) Store(C + r * ldc + kLanes * v, acc[r][v]);
  if (rowmax != nullptr) {  // running per-row maxima, kLanes lanes per row
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      Vf m = Load(rowmax + kLanes * r);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) m = Max(m, acc[r][v]);
      Store(rowmax + kLanes * r, m);
    }
  }
}

using MicroFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                         float*, int64_t, float*);

template <bool ACC, int MR, int... NV>
constexpr std::array<MicroFn, sizeof...(NV)> MicroRow(std::integer_sequence<int, NV...>) {
  return {&Micro<MR, NV + 1, ACC>...};
}

template <bool ACC, int NVMAX, int... MR>
constexpr std::array<std::array<MicroFn, NVMAX>, sizeof...(MR)> MicroTable(
    std::integer_sequence<int, MR...>) {
  return {MicroRow<ACC, MR + 1>(std::make_integer_sequence<int, NVMAX>())...};
}

// C[M, Nc] (+)= A(M x Kd) @ B[Kd, Nc]; Nc a multiple of 16.  If rowmax is given
// ([M, kLanes]), it is updated with the lane-wise maxima of each row of C.  B is
// row-major (row stride ldb) or, when bpanel > 0, stored in column panels of
// kLanes * NVMAX columns, panel p at B + p * bpanel with row stride ldb.
template <bool ACC, int MRMAX, int NVMAX>
void Gemm(int64_t M, int64_t Nc, int64_t Kd, const float* A, int64_t sai, int64_t sak,
          const float* B, int64_t ldb, float* C, int64_t ldc, float* rowmax = nullptr,
          int64_t bpanel = 0) {
  static constexpr auto table =
      MicroTable<ACC, NVMAX>(std::make_integer_sequence<int, MRMAX>());
  for (int64_t j = 0; j < Nc; j += kLanes * NVMAX) {
    const int nv = static_cast<int>(std::min<int64_t>(NVMAX, (Nc - j) / kLanes));
    for (int64_t i = 0; i < M; i += MRMAX) {
      const int mr = static_cast<int>(std::min<int64_t>(MRMAX, M - i));
      const float* Bj = bpanel > 0 ? B + j / (kLanes * NVMAX) * bpanel : B + j;
      table[mr - 1][nv - 1](Kd, A + i * sai, sai, sak, Bj, ldb, C + i * ldc + j, ldc,
                            rowmax == nullptr ? nullptr : rowmax + kLanes * i);
    }
  }
}

constexpr int64_t kStrip = 12;  // forward rows per fused scores/softmax/PV strip
// Columns of a packed GEMM B panel: one register tile wide.
constexpr int64_t kPanel = kLanes * kNV;

// ---------------------------------------------------------------- geometry, masks

// qmap [T] / kmap [S] (block-sparse calls only; null: the identity): the kernel works
// in a permuted token order (e.g. 2D-tiled, attnjax.core.tiling) whose row t is row
// qmap[t] of q, do, o, dq (and entry qmap[t] of lse, stats, delta) and whose key s is
// row kmap[s] of k, v, dk, dv.  The packers read through the maps and the writers
// write through them, so the permutation costs no pass of its own.
struct Geometry {
  int64_t B, T, S, N, K, H, Hv, G, bq, bk, nq, nk;
  const int32_t* qmap = nullptr;
  const int32_t* kmap = nullptr;
};

// Row s of a permuted order: map[s] (s itself without a map).
inline int64_t MapRow(const int32_t* map, int64_t s) { return map != nullptr ? map[s] : s; }

// Per query block: bounds of the rows' allowed key ranges (only rows < T count).
struct QBlockBand {
  int64_t min_lo, max_lo, min_hi, max_hi;  // max_lo = +big if some row is empty
  bool any;                                // some row has a key
};

std::vector<QBlockBand> BlockBands(const Geometry& g, const int32_t* lo, const int32_t* hi) {
  std::vector<QBlockBand> out(g.nq);
  constexpr int64_t kBig = int64_t{1} << 40;
  for (int64_t qb = 0; qb < g.nq; ++qb) {
    QBlockBand b{kBig, -kBig, kBig, -kBig, false};
    for (int64_t t = qb * g.bq; t < std::min(g.T, (qb + 1) * g.bq); ++t) {
      int64_t l = std::max<int64_t>(lo[t], 0), h = std::min<int64_t>(hi[t], g.S - 1);
      if (l > h) {
        b.max_lo = kBig;  // an empty row: no tile of this block is "full"
        continue;
      }
      b.any = true;
      b.min_lo = std::min(b.min_lo, l);
      b.max_lo = std::max(b.max_lo, l);
      b.min_hi = std::min(b.min_hi, h);
      b.max_hi = std::max(b.max_hi, h);
    }
    out[qb] = b;
  }
  return out;
}

enum class Tile { kEmpty, kPartial, kFull };

inline Tile Classify(const Geometry& g, const QBlockBand& b, int64_t kb) {
  const int64_t j0 = kb * g.bk, j1 = j0 + g.bk - 1;
  if (!b.any || b.max_hi < j0 || b.min_lo > j1) return Tile::kEmpty;
  if (j1 <= g.S - 1 && b.max_lo <= j0 && b.min_hi >= j1) return Tile::kFull;
  return Tile::kPartial;
}

// Sets s[r, j] = -inf outside row r's allowed range, for the rows < rows of a tile at
// query t0 / key j0 (row stride ld; the tile is bk wide).
void MaskTile(float* s, int64_t ld, int64_t rows, int64_t bk, int64_t t0, int64_t j0,
              int64_t S, const int32_t* lo, const int32_t* hi) {
  for (int64_t r = 0; r < rows; ++r) {
    int64_t l = std::max<int64_t>(lo[t0 + r], 0) - j0;
    int64_t h = std::min<int64_t>(hi[t0 + r], S - 1) - j0;
    float* row = s + r * ld;
    if (l > h) {
      std::fill(row, row + bk, kNegInf);
      continue;
    }
    for (int64_t j = 0; j < std::min<int64_t>(l, bk); ++j) row[j] = kNegInf;
    for (int64_t j = std::max<int64_t>(h + 1, 0); j < bk; ++j) row[j] = kNegInf;
  }
}

// Writes x [B, S, K, H] (K or V) transposed per (b, kv head, key block) into out:
// blocks [B, K, nk] of RoundUp(bk, panel) * H floats, each [bk / panel][H][panel]
// (column panels of the [H, bk] transposed block; panel = bk gives [H, bk]), zero
// beyond S; key s is row g.kmap[s] of x when the geometry has a key map.  H % 16 == 0,
// bk % 16 == 0, panel % 16 == 0.
void PackTransposed(const Geometry& g, const float* x, int64_t H, float* out, int nthreads,
                    int64_t panel) {
  ParallelFor(g.B * g.K * g.nk, nthreads, [&](int64_t item, int) {
    const int64_t kb = item % g.nk, bh = item / g.nk, kvh = bh % g.K, b = bh / g.K;
    float* dst = out + item * H * RoundUp(g.bk, panel);
    auto at = [&](int64_t h, int64_t j) { return dst + (j / panel) * H * panel + h * panel + j % panel; };
    auto row = [&](int64_t s) { return x + ((b * g.S + MapRow(g.kmap, s)) * g.K + kvh) * H; };
    thread_local std::vector<float> gathered;  // kLanes mapped rows, contiguous
    for (int64_t j0 = 0; j0 < g.bk; j0 += kLanes) {
      const int64_t s0 = kb * g.bk + j0;
      if (s0 + kLanes <= g.S) {
        const float* src = row(s0);
        int64_t ld = g.K * H;
        if (g.kmap != nullptr) {
          gathered.resize(kLanes * H);
          for (int64_t r = 0; r < kLanes; ++r)
            std::memcpy(gathered.data() + r * H, row(s0 + r), H * sizeof(float));
          src = gathered.data(), ld = H;
        }
        for (int64_t h = 0; h < H; h += kLanes) TransposeBlock(src + h, ld, at(h, j0), panel);
        continue;
      }
      for (int64_t jj = j0; jj < j0 + kLanes; ++jj) {  // the ragged end of the keys
        const int64_t s = kb * g.bk + jj;
        const float* src = s < g.S ? row(s) : nullptr;
        for (int64_t h = 0; h < H; ++h) *at(h, jj) = src != nullptr ? src[h] : 0.0f;
      }
    }
  });
}

// Copies rows [s0, s0 + n) of head `head` of x [B, L, heads, D] (batch b) into out in
// column panels of `panel` columns, [ceil(D / panel)][n][panel] (a narrower last panel
// keeps the row stride panel; panel = D gives one contiguous [n, D] block), zero rows
// beyond L; row s0 + r is row map[s0 + r] of x when a map is given.  Rows at a stride of heads * D floats alias in the L1 cache when the
// stride is a multiple of 4 KiB / a few rows, so tiles are always packed before the
// GEMMs read them repeatedly.
void PackRows(const float* x, int64_t L, int64_t heads, int64_t D, int64_t b, int64_t head,
              int64_t s0, int64_t n, int64_t panel, float* out,
              const int32_t* map = nullptr) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t s = s0 + r;
    for (int64_t c = 0; c < D; c += panel) {
      float* dst = out + (c / panel) * n * panel + r * panel;
      const int64_t w = std::min(panel, D - c);
      if (s < L)
        std::memcpy(dst, x + ((b * L + MapRow(map, s)) * heads + head) * D + c,
                    w * sizeof(float));
      else
        std::fill(dst, dst + w, 0.0f);
    }
  }
}

}  // namespace

#endif  // ATTNJAX_CPU_GEMM_H_
