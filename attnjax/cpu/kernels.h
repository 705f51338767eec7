// attnjax CPU flash attention: the forward (online softmax) and backward of the
// flash kernel on the SIMD engine and on AMX tiles, and the engine choice.
// (One unit of the unity build compiled from flash_cpu.cc.)

#ifndef ATTNJAX_CPU_KERNELS_H_
#define ATTNJAX_CPU_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "amx.h"
#include "gemm.h"
#include "simd.h"
#include "thread_pool.h"

namespace {

// ---------------------------------------------------------------- forward

// The output of query block qb of head n: o = acc / l, lse = (m + log2 l) ln 2, with
// l the lane sum of lv [rows, kLanes]; stats [2, B, N, T] keeps the row's statistics
// for the backward exactly as the forward used them: the integral running max m (log2
// units, -inf for empty rows) and 1 / l (0 for empty rows).  (lse itself cannot serve:
// rounded to float32 in natural units and converted back, it is off by up to an ulp of
// the logits' magnitude, a whole-row error that the backward's dQ amplifies by |k|.)
void WriteRows(const Geometry& g, int64_t b, int64_t n, int64_t t0, int64_t rows,
               const float* acc, const float* m, const float* lv, float* o, float* lse,
               float* stats) {
  const int64_t rows_total = g.B * g.N * g.T;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = MapRow(g.qmap, t0 + r);  // the row's original position
    float* dst = o + ((b * g.T + t) * g.N + n) * g.Hv;
    const float lr = ReduceAdd(Load(lv + kLanes * r));
    const float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
    const Vf vi = Set1(inv);
    for (int64_t d = 0; d < g.Hv; d += kLanes)
      Store(dst + d, Mul(Load(acc + r * g.Hv + d), vi));
    const int64_t at = (b * g.N + n) * g.T + t;
    lse[at] = lr > 0.0f ? (m[r] + std::log2(lr)) * kLn2 : kNegInf;
    stats[at] = lr > 0.0f ? m[r] : kNegInf;
    stats[rows_total + at] = inv;
  }
}

// Lane-wise maxima of a row of n floats (n a multiple of 16).
inline Vf RowMax(const float* row, int64_t n) {
  Vf mx = Set1(kNegInf);
  for (int64_t j = 0; j < n; j += kLanes) mx = Max(mx, Load(row + j));
  return mx;
}

// One row's online-softmax step over a tile: row holds the tile's logits (-inf where
// masked, kMasked), mx_v their lane-wise maxima; m is the row's running max (log2
// units, integral), lv its running sum (kLanes lanes, summed in WriteRows), acc_row its
// [Hv] output accumulator.  Calls put(j, p) with the probabilities p = 2^(c * logit - m)
// of columns j..j+kLanes-1.  c = 1 when the logits are already in log2 units (the
// forward scales q by scale * log2(e) when it packs it).
template <bool kMasked, int kExpDegree = 5, class Put>
inline void SoftmaxRow(const float* row, int64_t bk, Vf mx_v, float c, float& m,
                       float* lv, float* acc_row, int64_t Hv, Put&& put) {
  // Lazy rescaling: the running max moves only when a logit exceeds it by more than
  // kSlack (log2 units), so p <= 2^kSlack and most tiles skip the rescale (and the
  // horizontal max).  It moves to an integer (the ceiling of the row's max), which
  // Exp2Shifted needs.
  const Vf vc = Set1(c);
  const bool unit = c == 1.0f;
  float m_new = m, alpha = 1.0f;
  if (AnyGreater(unit ? mx_v : Mul(mx_v, vc), Set1(m + kSlack))) {
    m_new = std::ceil(ReduceMax(mx_v) * c);
    alpha = m == kNegInf ? 0.0f : Exp2Scalar(m - m_new);
  }
  Vf sum = Zero();
  auto step = [&](int64_t j, Vf p) {
    put(j, p);
    sum = Add(sum, p);
  };
  if (m_new == kNegInf || std::fabs(m_new) < kShiftedMaxLimit) {
    const Exp2Shifted e(m_new == kNegInf ? 0.0f : m_new);
    if (unit) {
      for (int64_t j = 0; j < bk; j += kLanes)
        step(j, e.Apply<kMasked, kExpDegree>(Load(row + j)));
    } else {
      for (int64_t j = 0; j < bk; j += kLanes)
        step(j, e.Apply<kMasked, kExpDegree>(Mul(Load(row + j), vc)));
    }
  } else {  // logits beyond 2^21 (log2 units)
    const Vf vm = Set1(m_new);
    for (int64_t j = 0; j < bk; j += kLanes)
      step(j, Exp2<kMasked, kExpDegree>(Fmsub(Load(row + j), vc, vm)));
  }
  m = m_new;
  if (alpha != 1.0f) {
    const Vf va = Set1(alpha);
    sum = Fmadd(Load(lv), va, sum);
    for (int64_t d = 0; d < Hv; d += kLanes)
      Store(acc_row + d, Mul(Load(acc_row + d), va));
  } else {
    sum = Add(Load(lv), sum);
  }
  Store(lv, sum);
}

// Calls f(kb, tile, j0) for the key blocks of a query block that are not empty.
template <class F>
inline void ForEachTile(const Geometry& g, const QBlockBand& band, F&& f) {
  if (!band.any) return;
  for (int64_t kb = band.min_lo / g.bk; kb <= band.max_hi / g.bk; ++kb) {
    const Tile tile = Classify(g, band, kb);
    if (tile != Tile::kEmpty) f(kb, tile, kb * g.bk);
  }
}

// ---------------------------------------------------------------- tile sources
//
// The SIMD forward and backward visit tiles through a tile source: ForKeys(qb, f)
// calls f(kb, full, tag) for the non-empty key blocks of query block qb (forward),
// ForQueries(kb, f) calls f(qb, full, tag) for the non-empty query blocks of key block
// kb (backward), and Mask(s, ld, rows, t0, r0, j0, tag) sets to -inf the disallowed
// entries of rows r0 .. r0 + rows - 1 of the partial tile (query block starting at t0,
// keys from j0) whose visit passed `tag`.

// Band masks: query row t attends to lo[t] <= s <= hi[t].
struct BandTiles {
  const Geometry& g;
  const int32_t* lo;
  const int32_t* hi;
  std::vector<QBlockBand> bands;
  BandTiles(const Geometry& g_, const int32_t* lo_, const int32_t* hi_)
      : g(g_), lo(lo_), hi(hi_), bands(BlockBands(g_, lo_, hi_)) {}
  template <class F>
  void ForKeys(int64_t qb, F&& f) const {
    ForEachTile(g, bands[qb], [&](int64_t kb, Tile tile, int64_t) {
      f(kb, tile == Tile::kFull, int64_t{0});
    });
  }
  template <class F>
  void ForQueries(int64_t kb, F&& f) const {
    for (int64_t qb = 0; qb < g.nq; ++qb) {
      const Tile tile = Classify(g, bands[qb], kb);
      if (tile != Tile::kEmpty) f(qb, tile == Tile::kFull, int64_t{0});
    }
  }
  void Mask(float* s, int64_t ld, int64_t rows, int64_t t0, int64_t r0, int64_t j0,
            int64_t) const {
    MaskTile(s, ld, rows, g.bk, t0 + r0, j0, g.S, lo, hi);
  }
};

// Block-sparse masks (a block table, as splash attention's): query block qb visits the
// key blocks qlist[qb, 0 .. ] up to the first -1 (at most Lq), key block kb the query
// blocks klist[kb, 0 .. ] (the transposed lists, at most Lk).  The codes beside them
// say how: -1 a full tile (no mask), c >= 0 a partial tile whose allowed entries are
// the nonzero bytes of pattern c, pats[c] [bq, bk] (row-major; zero for keys >= S).
struct SparseTiles {
  const Geometry& g;
  const int32_t* qlist;
  const int32_t* qcode;
  int64_t Lq;
  const int32_t* klist;
  const int32_t* kcode;
  int64_t Lk;
  const uint8_t* pats;
  template <class F>
  void ForKeys(int64_t qb, F&& f) const {
    for (int64_t i = 0; i < Lq; ++i) {
      const int64_t kb = qlist[qb * Lq + i];
      if (kb < 0) break;
      f(kb, qcode[qb * Lq + i] < 0, static_cast<int64_t>(qcode[qb * Lq + i]));
    }
  }
  template <class F>
  void ForQueries(int64_t kb, F&& f) const {
    for (int64_t i = 0; i < Lk; ++i) {
      const int64_t qb = klist[kb * Lk + i];
      if (qb < 0) break;
      f(qb, kcode[kb * Lk + i] < 0, static_cast<int64_t>(kcode[kb * Lk + i]));
    }
  }
  void Mask(float* s, int64_t ld, int64_t rows, int64_t, int64_t r0, int64_t,
            int64_t tag) const {
    const uint8_t* pat = pats + (tag * g.bq + r0) * g.bk;
    const float ninf = kNegInf;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * ld;
      const uint8_t* pr = pat + r * g.bk;
      for (int64_t j = 0; j < g.bk; ++j) row[j] = pr[j] ? row[j] : ninf;
    }
  }
};

// Work item `item` of the forward: (batch, head, query block), largest blocks first
// under causal masks (later query blocks see more keys).
struct ForwardItem {
  int64_t b, n, kvh, qb, t0, rows;
  ForwardItem(const Geometry& g, int64_t item) {
    qb = g.nq - 1 - item % g.nq;
    const int64_t bn = item / g.nq;
    n = bn % g.N, b = bn / g.N, kvh = n / g.G;
    t0 = qb * g.bq, rows = std::min(g.bq, g.T - t0);
  }
};

template <class Tiles>
bool ForwardSimd(const Geometry& g, const float* q, const float* k, const float* v,
                 const Tiles& tiles, float scale, int nthreads, float* o, float* lse,
                 float* stats) {
  const float c = scale * kLog2e;
  const int64_t Sp = g.nk * g.bk;
  // K^T per key block and V per (b, kv head), in column panels one register tile
  // wide, so that every GEMM streams contiguous memory.
  const int64_t ktsize = g.H * RoundUp(g.bk, kPanel), vsize = Sp * RoundUp(g.Hv, kPanel);
  Buffer kt(g.B * g.K * g.nk * ktsize), vp(g.B * g.K * vsize);
  if (!kt.p || !vp.p) return false;
  PackTransposed(g, k, g.H, kt.p, nthreads, kPanel);
  ParallelFor(g.B * g.K, nthreads, [&](int64_t bh, int) {
    PackRows(v, g.S, g.K, g.Hv, bh / g.K, bh % g.K, 0, Sp, kPanel, vp.p + bh * vsize,
             g.kmap);
  });

  ParallelFor(g.B * g.N * g.nq, nthreads, [&](int64_t item, int) {
    const ForwardItem it(g, item);
    thread_local std::vector<float> scratch;
    scratch.resize(kStrip * g.bk + g.bq * g.Hv + (kLanes + 1) * g.bq + g.bq * g.H + kLanes * kStrip);
    float* s = scratch.data();
    float* acc = s + kStrip * g.bk;
    float* m = acc + g.bq * g.Hv;
    float* l = m + g.bq;  // [bq, kLanes] lane sums
    float* qrows = l + kLanes * g.bq;
    float* rmax = qrows + g.bq * g.H;
    PackRows(q, g.T, g.N, g.H, it.b, it.n, it.t0, it.rows, g.H, qrows, g.qmap);
    // Logits in log2 units straight from the GEMM (SoftmaxRow with c = 1).
    const Vf vc = Set1(c);
    for (int64_t i = 0; i < it.rows * g.H; i += kLanes)
      Store(qrows + i, Mul(Load(qrows + i), vc));
    std::fill(acc, acc + it.rows * g.Hv, 0.0f);
    std::fill(m, m + it.rows, kNegInf);
    std::fill(l, l + kLanes * it.rows, 0.0f);

    const float* vhead = vp.p + (it.b * g.K + it.kvh) * vsize;
    tiles.ForKeys(it.qb, [&](int64_t kb, bool full, int64_t tag) {
      const int64_t j0 = kb * g.bk, cols = std::min(g.bk, g.S - j0);
      const float* ktile = kt.p + ((it.b * g.K + it.kvh) * g.nk + kb) * ktsize;
      // Strips of kStrip rows: scores, softmax and P @ V while the strip is in L1.
      for (int64_t r0 = 0; r0 < it.rows; r0 += kStrip) {
        const int64_t nr = std::min(kStrip, it.rows - r0);
        std::fill(rmax, rmax + kLanes * nr, kNegInf);
        Gemm<false, kMR, kNV>(nr, g.bk, g.H, qrows + r0 * g.H, g.H, 1, ktile, kPanel, s, g.bk,
                              full ? rmax : nullptr, g.H * kPanel);
        if (!full) {
          tiles.Mask(s, g.bk, nr, it.t0, r0, j0, tag);
          for (int64_t r = 0; r < nr; ++r) Store(rmax + kLanes * r, RowMax(s + r * g.bk, g.bk));
        }
        for (int64_t r = 0; r < nr; ++r) {
          float* row = s + r * g.bk;
          auto put = [row](int64_t j, Vf p) { Store(row + j, p); };
          const Vf mx = Load(rmax + kLanes * r);
          float* lr = l + kLanes * (r0 + r);
          float* ar = acc + (r0 + r) * g.Hv;
          if (full)
            SoftmaxRow<false>(row, g.bk, mx, 1.0f, m[r0 + r], lr, ar, g.Hv, put);
          else
            SoftmaxRow<true>(row, g.bk, mx, 1.0f, m[r0 + r], lr, ar, g.Hv, put);
        }
        Gemm<true, kMR, kNV>(nr, g.Hv, cols, s, g.bk, 1, vhead + j0 * kPanel, kPanel,
                             acc + r0 * g.Hv, g.Hv, nullptr, Sp * kPanel);
      }
    });
    WriteRows(g, it.b, it.n, it.t0, it.rows, acc, m, l, o, lse, stats);
  });
  return true;
}

#if ATTNJAX_AMX

// The forward on AMX tiles; qn, kn, vn: the number of bf16 pieces of q, k, v (1 when
// they are bf16-exact, else 3); pn: of the probabilities P (3, or 1 = P rounded to
// bf16, for bf16 outputs).
ATTNJAX_AMX_TARGET bool ForwardAmx(const Geometry& g, const float* q, const float* k,
                                   const float* v, const int32_t* lo, const int32_t* hi,
                                   float scale, int nthreads, int qn, int kn, int vn, int pn,
                                   float* o, float* lse, float* stats) {
  const float c = scale * kLog2e;
  const auto bands = BlockBands(g, lo, hi);
  const int64_t Hp = RoundUp(g.H, 32), bqp = RoundUp(g.bq, kAmxRows);
  const int64_t nblocks = g.B * g.K * g.nk;
  // PackPieces writes every element (zeros included).
  AlignedBuffer<bf16> kpk(nblocks * kn * Hp * g.bk), vpk(nblocks * vn * g.Hv * g.bk);
  if (!kpk.p || !vpk.p) return false;
  PackPieces(g, k, g.H, Hp, /*keys_as_columns=*/true, kn, kpk.data(), nthreads);
  PackPieces(g, v, g.Hv, g.Hv, /*keys_as_columns=*/false, vn, vpk.data(), nthreads);

  ParallelFor(g.B * g.N * g.nq, nthreads, [&](int64_t item, int) {
    const ForwardItem it(g, item);
    const QBlockBand& band = bands[it.qb];
    thread_local std::vector<float> scratch;
    thread_local std::vector<bf16> scratch16;
    scratch.resize(kAmxRows * g.bk + bqp * g.Hv + 17 * bqp);
    scratch16.resize(kPieces * (bqp * Hp + kAmxRows * g.bk));
    float* s = scratch.data();
    float* acc = s + kAmxRows * g.bk;
    float* m = acc + bqp * g.Hv;
    float* l = m + bqp;
    bf16* qpk = scratch16.data();              // [piece][bqp][Hp]
    bf16* ppk = qpk + kPieces * bqp * Hp;      // [piece][32][bk]
    std::fill(qpk, qpk + qn * bqp * Hp, bf16{0});
    for (int64_t r = 0; r < it.rows; ++r) {
      const float* src = q + ((it.b * g.T + it.t0 + r) * g.N + it.n) * g.H;
      for (int64_t d = 0; d < g.H; d += 16) Split3(_mm512_loadu_ps(src + d), qpk + r * Hp + d, bqp * Hp);
    }
    std::fill(acc, acc + bqp * g.Hv, 0.0f);
    std::fill(m, m + bqp, kNegInf);
    std::fill(l, l + 16 * bqp, 0.0f);
    ConfigureTiles();
    ForEachTile(g, band, [&](int64_t kb, Tile tile, int64_t j0) {
      const int64_t blk = (it.b * g.K + it.kvh) * g.nk + kb;
      const bf16* ktile = kpk.data() + blk * kn * Hp * g.bk;
      const bf16* vtile = vpk.data() + blk * vn * g.Hv * g.bk;
      for (int64_t r0 = 0; r0 < it.rows; r0 += kAmxRows) {
        const int64_t nr = std::min(kAmxRows, it.rows - r0);
        AmxGemm32<false>(g.bk / 16, Hp, qpk + r0 * Hp, Hp, bqp * Hp, qn, ktile, Hp * g.bk,
                         kn, s, g.bk);
        if (tile != Tile::kFull) MaskTile(s, g.bk, nr, g.bk, it.t0 + r0, j0, g.S, lo, hi);
        for (int64_t r = 0; r < nr; ++r) {
          const float* row = s + r * g.bk;
          bf16* prow = ppk + r * g.bk;
          const __m512 mx = RowMax(row, g.bk);
          float* lr = l + 16 * (r0 + r);
          float* ar = acc + (r0 + r) * g.Hv;
          float& mr = m[r0 + r];
          const bool full = tile == Tile::kFull;
          if (pn == 1) {  // P rounded to bf16: the degree-3 exp2 is accurate enough
            auto put = [prow](int64_t j, __m512 p) {
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + j), ToBf16(p));
            };
            if (full) SoftmaxRow<false, 3>(row, g.bk, mx, c, mr, lr, ar, g.Hv, put);
            else SoftmaxRow<true, 3>(row, g.bk, mx, c, mr, lr, ar, g.Hv, put);
          } else {
            auto put = [prow, &g](int64_t j, __m512 p) { Split3(p, prow + j, kAmxRows * g.bk); };
            if (full) SoftmaxRow<false>(row, g.bk, mx, c, mr, lr, ar, g.Hv, put);
            else SoftmaxRow<true>(row, g.bk, mx, c, mr, lr, ar, g.Hv, put);
          }
        }
        AmxGemm32<true>(g.Hv / 16, g.bk, ppk, g.bk, kAmxRows * g.bk, pn, vtile,
                        g.bk * g.Hv, vn, acc + r0 * g.Hv, g.Hv);
      }
    });
    ReleaseTiles();
    WriteRows(g, it.b, it.n, it.t0, it.rows, acc, m, l, o, lse, stats);
  });
  return true;
}

#else
bool ForwardAmx(const Geometry&, const float*, const float*, const float*, const int32_t*,
                const int32_t*, float, int, int, int, int, int, float*, float*, float*) {
  return false;
}
#endif  // ATTNJAX_AMX

// Matmul engines of the forward.  kAuto takes AMX when the CPU has it and q, k, v are
// all bf16-exact (one bf16 piece each, so the tile products cost a third of the
// float32 work); float32 data stays on the SIMD engine (AVX-512 on every AMX CPU),
// which was faster than bf16x6 on AMX where measured.
enum class Matmul : int64_t { kAuto = 0, kSimd = 1, kAmx = 2 };

bool AmxFits(const Geometry& g) { return g.bk % 32 == 0; }

bool Forward(const Geometry& g, const float* q, const float* k, const float* v,
             const int32_t* lo, const int32_t* hi, float scale, int nthreads, Matmul mm,
             bool bf16_out, float* o, float* lse, float* stats) {
  if (mm != Matmul::kSimd && AmxAvailable() && AmxFits(g)) {
    const int qn = IsBf16Exact(q, g.B * g.T * g.N * g.H) ? 1 : kPieces;
    const int kn = mm == Matmul::kAmx || qn == 1
                       ? (IsBf16Exact(k, g.B * g.S * g.K * g.H) ? 1 : kPieces) : kPieces;
    const int vn = mm == Matmul::kAmx || qn + kn == 2
                       ? (IsBf16Exact(v, g.B * g.S * g.K * g.Hv) ? 1 : kPieces) : kPieces;
    if (mm == Matmul::kAmx || qn + kn + vn == 3)
      return ForwardAmx(g, q, k, v, lo, hi, scale, nthreads, qn, kn, vn,
                        bf16_out ? 1 : kPieces, o, lse, stats);
  }
  return ForwardSimd(g, q, k, v, BandTiles(g, lo, hi), scale, nthreads, o, lse, stats);
}

// ---------------------------------------------------------------- backward

// Per-thread dq accumulators [nthreads][B, N, Tp, H], zeroed: each backward work item
// adds into its thread's copy (of(tid)); SumTo writes their total to dq [B, T, N, H].
struct PrivateDq {
  int64_t Tp, size;
  int nthreads;
  Buffer buf;
  PrivateDq(const Geometry& g, int64_t Tp_, int nthreads_)
      : Tp(Tp_), size(g.B * g.N * Tp_ * g.H), nthreads(nthreads_), buf(nthreads_ * size) {
    if (buf.p)
      ParallelFor(nthreads, nthreads, [&](int64_t t, int) {
        std::fill(buf.p + t * size, buf.p + (t + 1) * size, 0.0f);
      });
  }
  float* of(int tid) const { return buf.p + tid * size; }
  void SumTo(const Geometry& g, float* dq) const {
    ParallelFor(g.B * g.N, nthreads, [&](int64_t bn, int) {
      const int64_t b = bn / g.N, n = bn % g.N;
      for (int64_t t = 0; t < g.T; ++t) {
        float* dst = dq + ((b * g.T + MapRow(g.qmap, t)) * g.N + n) * g.H;
        const float* src = buf.p + (bn * Tp + t) * g.H;
        std::memcpy(dst, src, g.H * sizeof(float));
        for (int th = 1; th < nthreads; ++th)
          for (int64_t d = 0; d < g.H; ++d) dst[d] += src[th * size + d];
      }
    });
  }
};

// The statistics of row bn * T + t in stats [2, B, N, T] (see WriteRows): the running
// max m to subtract (+inf for empty rows, whose logits are all -inf: P = 2^-inf = 0)
// and 1 / l.
struct RowStats {
  float m, inv;
  RowStats(const Geometry& g, const float* stats, int64_t at)
      : m(stats[at] == kNegInf ? std::numeric_limits<float>::infinity() : stats[at]),
        inv(stats[g.B * g.N * g.T + at]) {}
};

// The backward on the SIMD engine.  It recomputes the forward's probabilities bit for
// bit: the logits in log2 units from the same q * scale * log2(e) (packed and rounded
// as the forward packs it) and the same GEMM, then P = 2^(s - m) / l with the forward's
// m and 1 / l (stats), so each row of P sums to 1 to float32 rounding whatever the
// logits' size.  dK = sum dS^T (c Q) is divided by c = scale * log2(e) at the end.
template <class Tiles>
bool BackwardSimd(const Geometry& g, const float* q, const float* k, const float* v,
                  const float* dout, const float* stats, const float* delta,
                  const Tiles& tiles, float scale, int nthreads, float* dq, float* dk,
                  float* dv) {
  const float c = scale * kLog2e;
  const float inv_c = c != 0.0f ? 1.0f / c : 0.0f;
  Buffer kt(g.B * g.K * g.nk * g.H * g.bk), vt(g.B * g.K * g.nk * g.Hv * g.bk);
  if (!kt.p || !vt.p) return false;
  PackTransposed(g, k, g.H, kt.p, nthreads, g.bk);
  PackTransposed(g, v, g.Hv, vt.p, nthreads, g.bk);
  const int64_t nitems = g.B * g.K * g.nk;
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, nitems));
  // Contiguous per-head copies: Q, dO [B, N, Tp, D]; K [B, K, Sp, H].
  const int64_t Tp = g.nq * g.bq, Sp = g.nk * g.bk;
  Buffer qp(g.B * g.N * Tp * g.H), dop(g.B * g.N * Tp * g.Hv), kp(g.B * g.K * Sp * g.H);
  if (!qp.p || !dop.p || !kp.p) return false;
  ParallelFor(g.B * g.N, nthreads, [&](int64_t bn, int) {
    float* qh = qp.p + bn * Tp * g.H;
    PackRows(q, g.T, g.N, g.H, bn / g.N, bn % g.N, 0, Tp, g.H, qh, g.qmap);
    const Vf vc = Set1(c);  // as the forward scales its packed q
    for (int64_t i = 0; i < Tp * g.H; i += kLanes) Store(qh + i, Mul(Load(qh + i), vc));
    PackRows(dout, g.T, g.N, g.Hv, bn / g.N, bn % g.N, 0, Tp, g.Hv, dop.p + bn * Tp * g.Hv,
             g.qmap);
  });
  ParallelFor(g.B * g.K, nthreads, [&](int64_t bh, int) {
    PackRows(k, g.S, g.K, g.H, bh / g.K, bh % g.K, 0, Sp, g.H, kp.p + bh * Sp * g.H, g.kmap);
  });
  // Each thread accumulates dq into its own packed copy; they are summed at the end.
  const PrivateDq dq_private(g, Tp, nthreads);
  if (!dq_private.buf.p) return false;

  ParallelFor(nitems, nthreads, [&](int64_t item, int tid) {
    const int64_t kb = item % g.nk, bh = item / g.nk, kvh = bh % g.K, b = bh / g.K;
    const int64_t j0 = kb * g.bk, cols = std::min(g.bk, g.S - j0);
    float* dqt = dq_private.of(tid);
    thread_local std::vector<float> scratch;
    scratch.resize(2 * g.bq * g.bk + g.bk * (g.H + g.Hv));
    float* p = scratch.data();
    float* ds = p + g.bq * g.bk;
    float* dk_acc = ds + g.bq * g.bk;
    float* dv_acc = dk_acc + g.bk * g.H;
    std::fill(dk_acc, dk_acc + g.bk * (g.H + g.Hv), 0.0f);
    const float* ktile = kt.p + item * g.H * g.bk;
    const float* vtile = vt.p + item * g.Hv * g.bk;
    const float* krows = kp.p + (bh * Sp + j0) * g.H;
    const Vf vscale = Set1(scale);
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const int64_t n = kvh * g.G + gi, bn = b * g.N + n;
      tiles.ForQueries(kb, [&](int64_t qb, bool full, int64_t tag) {
        const int64_t t0 = qb * g.bq, rows = std::min(g.bq, g.T - t0);
        const float* qrows = qp.p + (bn * Tp + t0) * g.H;
        const float* dorows = dop.p + (bn * Tp + t0) * g.Hv;
        // P = 2^(s - m) / l, s = (c q) . k in log2 units, as the forward computed it.
        Gemm<false, kMR, kNV>(rows, g.bk, g.H, qrows, g.H, 1, ktile, g.bk, p, g.bk);
        if (!full) tiles.Mask(p, g.bk, rows, t0, 0, j0, tag);
        for (int64_t r = 0; r < rows; ++r) {
          const RowStats st(g, stats, bn * g.T + MapRow(g.qmap, t0 + r));
          const Vf vm = Set1(st.m), vi = Set1(st.inv);
          float* row = p + r * g.bk;
          for (int64_t j = 0; j < g.bk; j += kLanes)
            Store(row + j, Mul(Exp2(Sub(Load(row + j), vm)), vi));
        }
        // dV += P^T dO
        Gemm<true, kMR, kNV>(cols, g.Hv, rows, p, 1, g.bk, dorows, g.Hv, dv_acc, g.Hv);
        // dP = dO V^T ; dS = scale * P * (dP - delta)
        Gemm<false, kMR, kNV>(rows, g.bk, g.Hv, dorows, g.Hv, 1, vtile, g.bk, ds, g.bk);
        for (int64_t r = 0; r < rows; ++r) {
          const Vf vd = Set1(delta[bn * g.T + MapRow(g.qmap, t0 + r)]);
          float* dsr = ds + r * g.bk;
          const float* pr = p + r * g.bk;
          for (int64_t j = 0; j < g.bk; j += kLanes) {
            Vf x = Sub(Load(dsr + j), vd);
            Store(dsr + j,
                             Mul(Mul(x, Load(pr + j)), vscale));
          }
        }
        // dK += dS^T (c Q) ; dQ += dS K
        Gemm<true, kMR, kNV>(cols, g.H, rows, ds, 1, g.bk, qrows, g.H, dk_acc, g.H);
        Gemm<true, kMR, kNV>(rows, g.H, cols, ds, g.bk, 1, krows, g.H,
                                     dqt + (bn * Tp + t0) * g.H, g.H);
      });
    }
    const Vf vinv_c = Set1(inv_c);
    for (int64_t jj = 0; jj < cols; ++jj) {
      const int64_t s = MapRow(g.kmap, j0 + jj);  // the key's original position
      float* dkr = dk + ((b * g.S + s) * g.K + kvh) * g.H;
      for (int64_t d = 0; d < g.H; d += kLanes)
        Store(dkr + d, Mul(Load(dk_acc + jj * g.H + d), vinv_c));
      std::memcpy(dv + ((b * g.S + s) * g.K + kvh) * g.Hv, dv_acc + jj * g.Hv,
                  g.Hv * sizeof(float));
    }
  });
  dq_private.SumTo(g, dq);
  return true;
}

#if ATTNJAX_AMX

// Head `head` of x [B, L, heads, D] (bf16 values, batch b) as bf16, row-major [Lp, Dp]
// and transposed [Dp, Lp], zero-padded.
ATTNJAX_AMX_TARGET void PackHeadBf16(const float* x, int64_t L, int64_t heads, int64_t D,
                                     int64_t b, int64_t head, int64_t Lp, int64_t Dp, bf16* rm,
                                     bf16* tr) {
  std::fill(rm, rm + Lp * Dp, bf16{0});
  std::fill(tr, tr + Lp * Dp, bf16{0});
  for (int64_t t = 0; t < L; ++t) {
    const float* src = x + ((b * L + t) * heads + head) * D;
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rm + t * Dp + d),
                          ToBf16(_mm512_loadu_ps(src + d)));
    for (int64_t d = 0; d < D; ++d) tr[d * Lp + t] = rm[t * Dp + d];
  }
}

// The backward on AMX tiles, for bf16 data (q, k, v, do all bf16-exact) and a bf16
// result: every GEMM is one tile product, with P and dS rounded to bf16 for their
// products (as GPU flash kernels do; the softmax and dS arithmetic stay float32).  dV
// and dK are accumulated transposed, dV^T += dO^T P and dK^T += Q^T dS, so P and dS are
// written as row pairs (VNNI) instead of transposed.  Needs bq, bk multiples of 32.
ATTNJAX_AMX_TARGET bool BackwardAmx(const Geometry& g, const float* q, const float* k,
                                    const float* v, const float* dout, const float* stats,
                                    const float* delta, const int32_t* lo, const int32_t* hi,
                                    float scale, int nthreads, float* dq, float* dk,
                                    float* dv) {
  const float c = scale * kLog2e;
  const auto bands = BlockBands(g, lo, hi);
  const int64_t Hp = RoundUp(g.H, 32), Hvp = RoundUp(g.Hv, 32), Tp = g.nq * g.bq;
  const int64_t nitems = g.B * g.K * g.nk;
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, nitems));
  // The packers write every element (zeros included).
  AlignedBuffer<bf16> kc(nitems * Hp * g.bk), kr(nitems * g.H * g.bk), vc(nitems * Hvp * g.bk),
      qrm(g.B * g.N * Tp * Hp), qtr(g.B * g.N * Tp * Hp), dorm(g.B * g.N * Tp * Hvp),
      dotr(g.B * g.N * Tp * Hvp);
  for (const auto* buf : {&kc, &kr, &vc, &qrm, &qtr, &dorm, &dotr})
    if (!buf->p) return false;
  PackPieces(g, k, g.H, Hp, /*keys_as_columns=*/true, 1, kc.data(), nthreads);
  PackPieces(g, k, g.H, g.H, /*keys_as_columns=*/false, 1, kr.data(), nthreads);
  PackPieces(g, v, g.Hv, Hvp, /*keys_as_columns=*/true, 1, vc.data(), nthreads);
  ParallelFor(g.B * g.N, nthreads, [&](int64_t bn, int) {
    PackHeadBf16(q, g.T, g.N, g.H, bn / g.N, bn % g.N, Tp, Hp, qrm.data() + bn * Tp * Hp,
                 qtr.data() + bn * Tp * Hp);
    PackHeadBf16(dout, g.T, g.N, g.Hv, bn / g.N, bn % g.N, Tp, Hvp,
                 dorm.data() + bn * Tp * Hvp, dotr.data() + bn * Tp * Hvp);
  });
  const PrivateDq dq_private(g, Tp, nthreads);
  if (!dq_private.buf.p) return false;

  ParallelFor(nitems, nthreads, [&](int64_t item, int tid) {
    const int64_t kb = item % g.nk, bh = item / g.nk, kvh = bh % g.K, b = bh / g.K;
    const int64_t j0 = kb * g.bk, cols = std::min(g.bk, g.S - j0), nct = g.bk / 16;
    float* dqt = dq_private.of(tid);
    thread_local std::vector<float> scratch;
    thread_local std::vector<bf16> scratch16;
    scratch.resize(2 * g.bq * g.bk + g.bk * (Hp + Hvp));
    scratch16.resize(3 * g.bq * g.bk);
    float* p = scratch.data();     // P [bq, bk]
    float* ds = p + g.bq * g.bk;   // dP, then dS [bq, bk]
    float* dkT = ds + g.bq * g.bk; // [Hp, bk]
    float* dvT = dkT + Hp * g.bk;  // [Hvp, bk]
    bf16* pv = scratch16.data();   // P row pairs [bq / 2, bk, 2]
    bf16* dsv = pv + g.bq * g.bk;  // dS row pairs
    bf16* dsr = dsv + g.bq * g.bk; // dS [bq, bk]
    std::fill(dkT, dkT + g.bk * (Hp + Hvp), 0.0f);
    const bf16* kct = kc.data() + item * Hp * g.bk;
    const bf16* krt = kr.data() + item * g.H * g.bk;
    const bf16* vct = vc.data() + item * Hvp * g.bk;
    const __m512 vc_ = _mm512_set1_ps(c), vscale = _mm512_set1_ps(scale);
    ConfigureTiles();
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const int64_t n = kvh * g.G + gi, bn = b * g.N + n;
      for (int64_t qb = 0; qb < g.nq; ++qb) {
        const Tile tile = Classify(g, bands[qb], kb);
        if (tile == Tile::kEmpty) continue;
        const int64_t t0 = qb * g.bq, rows = std::min(g.bq, g.T - t0);
        // S = Q K^T and dP = dO V^T.
        for (int64_t r0 = 0; r0 < g.bq; r0 += 32) {
          AmxGemm32<false>(nct, Hp, qrm.data() + (bn * Tp + t0 + r0) * Hp, Hp, 0, 1, kct, 0,
                           1, p + r0 * g.bk, g.bk);
          AmxGemm32<false>(nct, Hvp, dorm.data() + (bn * Tp + t0 + r0) * Hvp, Hvp, 0, 1, vct,
                           0, 1, ds + r0 * g.bk, g.bk);
        }
        if (tile == Tile::kPartial) MaskTile(p, g.bk, rows, g.bk, t0, j0, g.S, lo, hi);
        const float* drow = delta + bn * g.T + t0;
        // P = 2^(c s - m) / l with the forward's m and 1 / l (its logits were c s too),
        // dS = scale P (dP - delta); zero beyond the last row.
        for (int64_t r = 0; r < g.bq; ++r) {
          float* pr = p + r * g.bk;
          float* dsr_f = ds + r * g.bk;
          if (r >= rows) {
            std::fill(pr, pr + g.bk, 0.0f);
            std::fill(dsr_f, dsr_f + g.bk, 0.0f);
            continue;
          }
          const RowStats st(g, stats, bn * g.T + t0 + r);
          const __m512 vm = _mm512_set1_ps(st.m), vi = _mm512_set1_ps(st.inv),
                       vd = _mm512_set1_ps(drow[r]);
          for (int64_t j = 0; j < g.bk; j += 16) {
            const __m512 pj = _mm512_mul_ps(
                Exp2(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(pr + j), vc_), vm)), vi);
            _mm512_storeu_ps(pr + j, pj);
            const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(dsr_f + j), vd);
            _mm512_storeu_ps(dsr_f + j, _mm512_mul_ps(_mm512_mul_ps(x, pj), vscale));
          }
        }
        for (int64_t r = 0; r < g.bq; r += 2) {
          for (int64_t j = 0; j < g.bk; j += 16) {
            const __m512 p0 = RoundBf16(_mm512_loadu_ps(p + r * g.bk + j));
            const __m512 p1 = RoundBf16(_mm512_loadu_ps(p + (r + 1) * g.bk + j));
            const __m512 d0 = RoundBf16(_mm512_loadu_ps(ds + r * g.bk + j));
            const __m512 d1 = RoundBf16(_mm512_loadu_ps(ds + (r + 1) * g.bk + j));
            _mm512_storeu_si512(pv + ((r / 2) * g.bk + j) * 2, PairWords(p0, p1));
            _mm512_storeu_si512(dsv + ((r / 2) * g.bk + j) * 2, PairWords(d0, d1));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsr + r * g.bk + j), ToBf16(d0));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsr + (r + 1) * g.bk + j),
                                ToBf16(d1));
          }
        }
        // dV^T += dO^T P ; dK^T += Q^T dS ; dQ += dS K
        for (int64_t r0 = 0; r0 < Hvp; r0 += 32)
          AmxGemm32<true>(nct, g.bq, dotr.data() + (bn * Hvp + r0) * Tp + t0, Tp, 0, 1, pv, 0,
                          1, dvT + r0 * g.bk, g.bk);
        for (int64_t r0 = 0; r0 < Hp; r0 += 32)
          AmxGemm32<true>(nct, g.bq, qtr.data() + (bn * Hp + r0) * Tp + t0, Tp, 0, 1, dsv, 0,
                          1, dkT + r0 * g.bk, g.bk);
        for (int64_t r0 = 0; r0 < g.bq; r0 += 32)
          AmxGemm32<true>(g.H / 16, g.bk, dsr + r0 * g.bk, g.bk, 0, 1, krt, 0, 1,
                          dqt + (bn * Tp + t0 + r0) * g.H, g.H);
      }
    }
    ReleaseTiles();
    for (int64_t jj = 0; jj < cols; ++jj) {
      float* dkr = dk + ((b * g.S + j0 + jj) * g.K + kvh) * g.H;
      float* dvr = dv + ((b * g.S + j0 + jj) * g.K + kvh) * g.Hv;
      for (int64_t h = 0; h < g.H; ++h) dkr[h] = dkT[h * g.bk + jj];
      for (int64_t h = 0; h < g.Hv; ++h) dvr[h] = dvT[h * g.bk + jj];
    }
  });
  dq_private.SumTo(g, dq);
  return true;
}

#else
bool BackwardAmx(const Geometry&, const float*, const float*, const float*, const float*,
                 const float*, const float*, const int32_t*, const int32_t*, float, int, float*,
                 float*, float*) {
  return false;
}
#endif  // ATTNJAX_AMX

// The backward takes AMX (unless mm says simd) for bf16 data with a bf16 result, when
// the tiles fit; everything else runs on the SIMD engine.
bool Backward(const Geometry& g, const float* q, const float* k, const float* v,
              const float* dout, const float* stats, const float* delta, const int32_t* lo,
              const int32_t* hi, float scale, int nthreads, Matmul mm, bool bf16_out, float* dq,
              float* dk, float* dv) {
  if (mm != Matmul::kSimd && bf16_out && AmxAvailable() && AmxFits(g) && g.bq % 32 == 0 &&
      IsBf16Exact(q, g.B * g.T * g.N * g.H) && IsBf16Exact(k, g.B * g.S * g.K * g.H) &&
      IsBf16Exact(v, g.B * g.S * g.K * g.Hv) && IsBf16Exact(dout, g.B * g.T * g.N * g.Hv))
    return BackwardAmx(g, q, k, v, dout, stats, delta, lo, hi, scale, nthreads, dq, dk, dv);
  return BackwardSimd(g, q, k, v, dout, stats, delta, BandTiles(g, lo, hi), scale, nthreads,
                      dq, dk, dv);
}

// Block-sparse masks (SparseTiles) run on the SIMD engine, forward and backward.
bool ForwardSparse(const Geometry& g, const float* q, const float* k, const float* v,
                   const SparseTiles& tiles, float scale, int nthreads, float* o, float* lse,
                   float* stats) {
  return ForwardSimd(g, q, k, v, tiles, scale, nthreads, o, lse, stats);
}

bool BackwardSparse(const Geometry& g, const float* q, const float* k, const float* v,
                    const float* dout, const float* stats, const float* delta,
                    const SparseTiles& tiles, float scale, int nthreads, float* dq, float* dk,
                    float* dv) {
  return BackwardSimd(g, q, k, v, dout, stats, delta, tiles, scale, nthreads, dq, dk, dv);
}

}  // namespace

#endif  // ATTNJAX_CPU_KERNELS_H_
