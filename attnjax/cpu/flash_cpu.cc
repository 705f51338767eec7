// attnjax CPU flash attention: an XLA FFI custom call for the CPU backend.
//
// Blockwise online-softmax attention ("FlashAttention", Dao et al.; the backward of
// "FlashAttention-2") in float32 with register-tiled SIMD GEMMs (AVX-512, or AVX2 with
// FMA on CPUs without it: see "SIMD layer"), or AMX bf16 tile products where the CPU
// has them (see "AMX" below), and its own thread split.  XLA:CPU runs a blockwise
// while-loop on one core; this kernel splits (batch, head, query-block) work items over
// all cores in the forward and (batch, kv-head, key-block) items in the backward.
//
// Layouts (BTNH, as attnjax.attention):
//   q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], N = K * G (GQA; K/V are never
//   repeated), o [B, T, N, Hv], lse [B, N, T] (natural log; -inf for empty rows).
// Masking: query row t attends to keys lo[t] <= s <= hi[t] (inclusive; lo > hi is an
//   empty row, which gives o = 0, lse = -inf and zero gradients).  Tiles entirely
//   outside every row's band are skipped; tiles entirely inside are not masked.
//   The forward also writes stats [2, B, N, T]: each row's integral running max m
//   (log2 units) and 1 / l, which the backward uses instead of lse (see WriteRows).
// Backward inputs: do [B, T, N, Hv], stats, and delta [B, N, T] = rowsum(do * o) - dlse.
//
// Compiled at first use by attnjax/cpu/build.py with -O3 -march=native.
//
// Units (one translation unit: this file includes them, so the compiler sees the
// whole kernel at once, as before the split):
//   thread_pool.h  buffers, thread count, thread pool, ParallelFor
//   simd.h         the SIMD layer (AVX-512 / emulated AVX-512 / AVX2) and exp2
//   gemm.h         GEMM micro-kernels, geometry, band masks, packing
//   amx.h          AMX bf16 tiles: configuration, splits, packing, tile GEMM
//   kernels.h      forward and backward (SIMD and AMX) and the engine choice
//   flash_cpu.cc   (this file) the XLA FFI handlers

#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "kernels.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------- FFI bindings

ffi::Error MakeGeometry(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd,
                        ffi::Span<const int64_t> vd, int64_t block_q, int64_t block_k,
                        Geometry* g) {
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("q, k, v must have rank 4");
  g->B = qd[0], g->T = qd[1], g->N = qd[2], g->H = qd[3];
  g->S = kd[1], g->K = kd[2], g->Hv = vd[3];
  if (kd[0] != g->B || vd[0] != g->B || vd[1] != g->S || vd[2] != g->K || kd[3] != g->H)
    return ffi::Error::InvalidArgument("q, k, v shapes do not match");
  if (g->K <= 0 || g->N % g->K != 0)
    return ffi::Error::InvalidArgument("num heads must be a multiple of num kv heads");
  if (g->H % 16 != 0 || g->Hv % 16 != 0)
    return ffi::Error::InvalidArgument("head dims must be multiples of 16");
  if (block_q <= 0 || block_k <= 0 || block_k % 16 != 0)
    return ffi::Error::InvalidArgument("block_k must be a positive multiple of 16");
  g->G = g->N / g->K;
  // Blocks longer than the sequence shrink to it (rounded up to keep the multiples
  // the engines need: 16 for block_k, 32 for the AMX paths), so short sequences do
  // not compute padding.
  const int64_t mq = block_q % 32 == 0 ? 32 : 1, mk = block_k % 32 == 0 ? 32 : 16;
  g->bq = std::min(block_q, std::max(RoundUp(g->T, mq), mq));
  g->bk = std::min(block_k, std::max(RoundUp(g->S, mk), mk));
  g->nq = (g->T + g->bq - 1) / g->bq;
  g->nk = (g->S + g->bk - 1) / g->bk;
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, float scale,
                   int64_t block_q, int64_t block_k, int64_t num_threads, int64_t matmul,
                   bool bf16_out, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> stats) {
  Geometry g;
  if (auto e = MakeGeometry(q.dimensions(), k.dimensions(), v.dimensions(), block_q, block_k, &g);
      e.failure())
    return e;
  if (static_cast<int64_t>(lo.element_count()) != g.T ||
      static_cast<int64_t>(hi.element_count()) != g.T)
    return ffi::Error::InvalidArgument("lo and hi must have T entries");
  if (matmul < 0 || matmul > 2)
    return ffi::Error::InvalidArgument("matmul must be 0 (auto), 1 (simd) or 2 (amx)");
  const Matmul mm = static_cast<Matmul>(matmul);
  if (mm == Matmul::kAmx && !(AmxAvailable() && AmxFits(g)))
    return ffi::Error::InvalidArgument(
        "matmul='amx' needs a CPU with AMX-BF16 and block_k a multiple of 32");
  if (!Forward(g, q.typed_data(), k.typed_data(), v.typed_data(), lo.typed_data(),
               hi.typed_data(), scale, NumThreads(num_threads), mm, bf16_out != 0,
               o->typed_data(), lse->typed_data(), stats->typed_data()))
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "attnjax cpu_flash forward: out of memory for packed K/V");
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::F32> stats,
                   ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> lo,
                   ffi::Buffer<ffi::S32> hi, float scale, int64_t block_q, int64_t block_k,
                   int64_t num_threads, int64_t matmul, bool bf16_out,
                   ffi::ResultBuffer<ffi::F32> dq,
                   ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Geometry g;
  if (auto e = MakeGeometry(q.dimensions(), k.dimensions(), v.dimensions(), block_q, block_k, &g);
      e.failure())
    return e;
  if (static_cast<int64_t>(lo.element_count()) != g.T ||
      static_cast<int64_t>(hi.element_count()) != g.T)
    return ffi::Error::InvalidArgument("lo and hi must have T entries");
  if (static_cast<int64_t>(dout.element_count()) != g.B * g.T * g.N * g.Hv ||
      static_cast<int64_t>(stats.element_count()) != 2 * g.B * g.N * g.T ||
      static_cast<int64_t>(delta.element_count()) != g.B * g.N * g.T)
    return ffi::Error::InvalidArgument(
        "do must be [B, T, N, Hv]; stats [2, B, N, T]; delta [B, N, T]");
  if (matmul < 0 || matmul > 2)
    return ffi::Error::InvalidArgument("matmul must be 0 (auto), 1 (simd) or 2 (amx)");
  if (!Backward(g, q.typed_data(), k.typed_data(), v.typed_data(), dout.typed_data(),
                stats.typed_data(), delta.typed_data(), lo.typed_data(), hi.typed_data(), scale,
                NumThreads(num_threads), static_cast<Matmul>(matmul), bf16_out,
                dq->typed_data(), dk->typed_data(), dv->typed_data()))
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "attnjax cpu_flash backward: out of memory for packed tiles");
  return ffi::Error::Success();
}

// The block lists of a block-sparse call (see SparseTiles), in the kernel's (mapped)
// token order: qlist, qcode [nq, Lq];
// klist, kcode [nk, Lk]; pats [U, bq, bk] with the geometry's (shrunk) block sizes.
// Entries must be valid block / pattern indices; Lq = 0 (Lk = 0) when unused.
ffi::Error CheckSparse(const Geometry& g, ffi::Buffer<ffi::S32> qlist,
                       ffi::Buffer<ffi::S32> qcode, ffi::Buffer<ffi::S32> klist,
                       ffi::Buffer<ffi::S32> kcode, ffi::Buffer<ffi::U8> pats) {
  const auto qd = qlist.dimensions(), kd = klist.dimensions(), pd = pats.dimensions();
  if (qd.size() != 2 || kd.size() != 2 || pd.size() != 3 || qd[0] != g.nq || kd[0] != g.nk ||
      qcode.element_count() != qlist.element_count() ||
      kcode.element_count() != klist.element_count() || pd[1] != g.bq || pd[2] != g.bk)
    return ffi::Error::InvalidArgument(
        "block lists must be qlist, qcode [nq, Lq]; klist, kcode [nk, Lk]; patterns "
        "[U, block_q, block_k] at the kernel's block sizes");
  const int64_t U = pd[0];
  const int32_t* ql = qlist.typed_data();
  const int32_t* qc = qcode.typed_data();
  const int32_t* kl = klist.typed_data();
  const int32_t* kc = kcode.typed_data();
  for (int64_t i = 0; i < static_cast<int64_t>(qlist.element_count()); ++i)
    if (ql[i] >= g.nk || (ql[i] >= 0 && qc[i] >= U))
      return ffi::Error::InvalidArgument("qlist / qcode entry out of range");
  for (int64_t i = 0; i < static_cast<int64_t>(klist.element_count()); ++i)
    if (kl[i] >= g.nq || (kl[i] >= 0 && kc[i] >= U))
      return ffi::Error::InvalidArgument("klist / kcode entry out of range");
  return ffi::Error::Success();
}

// The row maps of a block-sparse call (see Geometry): qmap [T] and kmap [S], each a
// permutation, or empty for the identity.
ffi::Error SetMaps(ffi::Buffer<ffi::S32> qmap, ffi::Buffer<ffi::S32> kmap, Geometry* g) {
  const auto check = [](ffi::Buffer<ffi::S32> map, int64_t n, const int32_t** out) {
    const int64_t size = static_cast<int64_t>(map.element_count());
    if (size == 0) return true;
    if (size != n) return false;
    std::vector<char> seen(n, 0);
    const int32_t* m = map.typed_data();
    for (int64_t i = 0; i < n; ++i) {
      if (m[i] < 0 || m[i] >= n || seen[m[i]]) return false;
      seen[m[i]] = 1;
    }
    *out = m;
    return true;
  };
  if (!check(qmap, g->T, &g->qmap) || !check(kmap, g->S, &g->kmap))
    return ffi::Error::InvalidArgument(
        "row maps must be empty or permutations of 0 .. T-1 (query map) and 0 .. S-1 "
        "(key map)");
  return ffi::Error::Success();
}

SparseTiles Sparse(const Geometry& g, ffi::Buffer<ffi::S32> qlist, ffi::Buffer<ffi::S32> qcode,
                   ffi::Buffer<ffi::S32> klist, ffi::Buffer<ffi::S32> kcode,
                   ffi::Buffer<ffi::U8> pats) {
  return SparseTiles{g, qlist.typed_data(), qcode.typed_data(), qlist.dimensions()[1],
                     klist.typed_data(), kcode.typed_data(), klist.dimensions()[1],
                     pats.typed_data()};
}

ffi::Error SparseFwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qlist,
                         ffi::Buffer<ffi::S32> qcode, ffi::Buffer<ffi::S32> klist,
                         ffi::Buffer<ffi::S32> kcode, ffi::Buffer<ffi::U8> pats,
                         ffi::Buffer<ffi::S32> qmap, ffi::Buffer<ffi::S32> kmap, float scale,
                         int64_t block_q, int64_t block_k, int64_t num_threads,
                         ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse,
                         ffi::ResultBuffer<ffi::F32> stats) {
  Geometry g;
  if (auto e = MakeGeometry(q.dimensions(), k.dimensions(), v.dimensions(), block_q, block_k, &g);
      e.failure())
    return e;
  if (auto e = CheckSparse(g, qlist, qcode, klist, kcode, pats); e.failure()) return e;
  if (auto e = SetMaps(qmap, kmap, &g); e.failure()) return e;
  const SparseTiles t = Sparse(g, qlist, qcode, klist, kcode, pats);
  if (!ForwardSparse(g, q.typed_data(), k.typed_data(), v.typed_data(), t, scale,
                     NumThreads(num_threads), o->typed_data(), lse->typed_data(),
                     stats->typed_data()))
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "attnjax cpu_flash block-sparse forward: out of memory for packed K/V");
  return ffi::Error::Success();
}

ffi::Error SparseBwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> dout,
                         ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> delta,
                         ffi::Buffer<ffi::S32> qlist, ffi::Buffer<ffi::S32> qcode,
                         ffi::Buffer<ffi::S32> klist, ffi::Buffer<ffi::S32> kcode,
                         ffi::Buffer<ffi::U8> pats, ffi::Buffer<ffi::S32> qmap,
                         ffi::Buffer<ffi::S32> kmap, float scale, int64_t block_q,
                         int64_t block_k, int64_t num_threads, ffi::ResultBuffer<ffi::F32> dq,
                         ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Geometry g;
  if (auto e = MakeGeometry(q.dimensions(), k.dimensions(), v.dimensions(), block_q, block_k, &g);
      e.failure())
    return e;
  if (auto e = CheckSparse(g, qlist, qcode, klist, kcode, pats); e.failure()) return e;
  if (auto e = SetMaps(qmap, kmap, &g); e.failure()) return e;
  const SparseTiles t = Sparse(g, qlist, qcode, klist, kcode, pats);
  if (static_cast<int64_t>(dout.element_count()) != g.B * g.T * g.N * g.Hv ||
      static_cast<int64_t>(stats.element_count()) != 2 * g.B * g.N * g.T ||
      static_cast<int64_t>(delta.element_count()) != g.B * g.N * g.T)
    return ffi::Error::InvalidArgument(
        "do must be [B, T, N, Hv]; stats [2, B, N, T]; delta [B, N, T]");
  if (!BackwardSparse(g, q.typed_data(), k.typed_data(), v.typed_data(), dout.typed_data(),
                      stats.typed_data(), delta.typed_data(), t, scale, NumThreads(num_threads),
                      dq->typed_data(), dk->typed_data(), dv->typed_data()))
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "attnjax cpu_flash block-sparse backward: out of memory for packed tiles");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnjaxSparseFwd, SparseFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("num_threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnjaxSparseBwd, SparseBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("num_threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnjaxFlashFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("num_threads")
                                  .Attr<int64_t>("matmul")
                                  .Attr<bool>("bf16_out")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnjaxFlashBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("num_threads")
                                  .Attr<int64_t>("matmul")
                                  .Attr<bool>("bf16_out")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 when the forward can use AMX tiles on this machine (read by attnjax.cpu.build).
extern "C" int AttnjaxCpuHasAmx() { return AmxAvailable() ? 1 : 0; }

// Float32 lanes per vector the kernels were compiled for: 16 (AVX-512) or 8 (AVX2).
extern "C" int AttnjaxCpuLanes() { return kLanes; }
