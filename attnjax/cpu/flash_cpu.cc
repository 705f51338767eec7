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

#include <immintrin.h>
#ifdef ATTNJAX_EMULATE_AVX512  // tests: the AVX-512 paths on any x86-64 CPU, emulated
#include "avx512_emulation.h"
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kSlack = 8.0f;  // forward: probabilities stay <= 2^8 before normalising

// ---------------------------------------------------------------- memory, threads

// n uninitialised elements, 64-byte aligned; p is null when the allocation fails.
template <class T>
struct AlignedBuffer {
  T* p = nullptr;
  explicit AlignedBuffer(size_t n) {
    size_t bytes = ((std::max<size_t>(n, 1) * sizeof(T) + 63) / 64) * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
  }
  ~AlignedBuffer() { std::free(p); }
  T* data() const { return p; }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};
using Buffer = AlignedBuffer<float>;

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int NumThreads(int64_t requested) {
  if (requested > 0) return static_cast<int>(requested);
  if (const char* env = std::getenv("ATTNJAX_CPU_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Worker threads kept for the life of the process, so that a call does not pay for
// creating threads (tens of microseconds each, several times per call, which is most
// of the time of a small attention call) and their thread_local scratch survives
// between calls.  Run() lends the pool to one caller at a time; a second concurrent
// caller (XLA may run two custom calls at once, or a forked child may inherit the
// pool without its threads) gets false and starts threads of its own.  Workers and
// the caller spin for a short while (kSpin) before they sleep, so the several
// ParallelFor phases of one kernel call do not each pay a futex wake-up.
class ThreadPool {
 public:
  static ThreadPool& Get() {
    static ThreadPool* pool = new ThreadPool;  // never destroyed: workers block at exit
    return *pool;
  }

  // Runs fn(tid) for tid in [0, n): tid 0 on the calling thread, the others on pool
  // workers.  Returns false (running nothing) when the pool is busy.
  bool Run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || getpid() != pid_) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(workers_.size()) < n - 1) {
        const int id = static_cast<int>(workers_.size()) + 1;
        workers_.emplace_back([this, id] { Loop(id); });
        workers_.back().detach();
      }
      fn_ = &fn;
      active_ = n;
      pending_.store(n - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    work_.notify_all();
    fn(0);
    auto finished = [this] { return pending_.load(std::memory_order_acquire) == 0; };
    if (!SpinUntil(finished)) {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, finished);
    }
    return true;
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(50);

  template <class Pred>
  static bool SpinUntil(Pred&& ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (!ready()) {
      if (std::chrono::steady_clock::now() > until) return false;
      _mm_pause();
    }
    return true;
  }

  void Loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      auto moved = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!SpinUntil(moved)) {
        std::unique_lock<std::mutex> lock(mu_);
        work_.wait(lock, moved);
      }
      // A consistent snapshot: Run() sets the three under mu_.  A generation that
      // needs this worker cannot be followed by another before it is done.
      const std::function<void(int)>* fn;
      int active;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = generation_.load(std::memory_order_relaxed);
        fn = fn_, active = active_;
      }
      if (id >= active) continue;
      (*fn)(id);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        done_.notify_one();
      }
    }
  }

  const pid_t pid_ = getpid();
  std::mutex busy_, mu_;
  std::condition_variable work_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* fn_ = nullptr;
  int active_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
};

// Flushes denormal results and inputs to zero (MXCSR FTZ and DAZ) on this thread while
// in scope, as XLA's own CPU code runs.  Without it, every logit of a masked tile
// (2^-inf = 0 computed as an underflowing scalef) and every underflowing product takes
// a microcode assist: a causal forward of short sequences ran 2.5x slower.
class ScopedFlushDenormals {
 public:
  ScopedFlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~ScopedFlushDenormals() { _mm_setcsr(saved_); }
  ScopedFlushDenormals(const ScopedFlushDenormals&) = delete;
  ScopedFlushDenormals& operator=(const ScopedFlushDenormals&) = delete;

 private:
  const unsigned saved_;
};

// Runs f(item, thread_id) for item in [0, n), items handed out dynamically, with
// denormals flushed on every thread.
template <class F>
void ParallelFor(int64_t n, int nthreads, F&& f) {
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, n));
  if (nthreads <= 1) {
    ScopedFlushDenormals ftz;
    for (int64_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  const std::function<void(int)> worker = [&](int tid) {
    ScopedFlushDenormals ftz;
    for (;;) {
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      f(i, tid);
    }
  };
  if (ThreadPool::Get().Run(nthreads, worker)) return;
  std::vector<std::thread> threads;
  threads.reserve(nthreads - 1);
  for (int t = 1; t < nthreads; ++t) threads.emplace_back(worker, t);
  worker(0);
  for (auto& t : threads) t.join();
}

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

struct Geometry {
  int64_t B, T, S, N, K, H, Hv, G, bq, bk, nq, nk;
};

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
// beyond S.  H % 16 == 0, bk % 16 == 0, panel % 16 == 0.
void PackTransposed(const Geometry& g, const float* x, int64_t H, float* out, int nthreads,
                    int64_t panel) {
  ParallelFor(g.B * g.K * g.nk, nthreads, [&](int64_t item, int) {
    const int64_t kb = item % g.nk, bh = item / g.nk, kvh = bh % g.K, b = bh / g.K;
    float* dst = out + item * H * RoundUp(g.bk, panel);
    auto at = [&](int64_t h, int64_t j) { return dst + (j / panel) * H * panel + h * panel + j % panel; };
    for (int64_t j0 = 0; j0 < g.bk; j0 += kLanes) {
      const int64_t s0 = kb * g.bk + j0;
      const float* src = x + ((b * g.S + s0) * g.K + kvh) * H;
      if (s0 + kLanes <= g.S) {
        for (int64_t h = 0; h < H; h += kLanes)
          TransposeBlock(src + h, g.K * H, at(h, j0), panel);
        continue;
      }
      for (int64_t jj = j0; jj < j0 + kLanes; ++jj) {  // the ragged end of the keys
        const bool in = kb * g.bk + jj < g.S;
        for (int64_t h = 0; h < H; ++h)
          *at(h, jj) = in ? src[(jj - j0) * g.K * H + h] : 0.0f;
      }
    }
  });
}

// Copies rows [s0, s0 + n) of head `head` of x [B, L, heads, D] (batch b) into out in
// column panels of `panel` columns, [ceil(D / panel)][n][panel] (a narrower last panel
// keeps the row stride panel; panel = D gives one contiguous [n, D] block), zero rows
// beyond L.  Rows at a stride of heads * D floats alias in the L1 cache when the
// stride is a multiple of 4 KiB / a few rows, so tiles are always packed before the
// GEMMs read them repeatedly.
void PackRows(const float* x, int64_t L, int64_t heads, int64_t D, int64_t b, int64_t head,
              int64_t s0, int64_t n, int64_t panel, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t s = s0 + r;
    for (int64_t c = 0; c < D; c += panel) {
      float* dst = out + (c / panel) * n * panel + r * panel;
      const int64_t w = std::min(panel, D - c);
      if (s < L)
        std::memcpy(dst, x + ((b * L + s) * heads + head) * D + c, w * sizeof(float));
      else
        std::fill(dst, dst + w, 0.0f);
    }
  }
}

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
    const int64_t t = t0 + r;
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

bool ForwardSimd(const Geometry& g, const float* q, const float* k, const float* v,
                   const int32_t* lo, const int32_t* hi, float scale, int nthreads, float* o,
                   float* lse, float* stats) {
  const float c = scale * kLog2e;
  const auto bands = BlockBands(g, lo, hi);
  const int64_t Sp = g.nk * g.bk;
  // K^T per key block and V per (b, kv head), in column panels one register tile
  // wide, so that every GEMM streams contiguous memory.
  const int64_t ktsize = g.H * RoundUp(g.bk, kPanel), vsize = Sp * RoundUp(g.Hv, kPanel);
  Buffer kt(g.B * g.K * g.nk * ktsize), vp(g.B * g.K * vsize);
  if (!kt.p || !vp.p) return false;
  PackTransposed(g, k, g.H, kt.p, nthreads, kPanel);
  ParallelFor(g.B * g.K, nthreads, [&](int64_t bh, int) {
    PackRows(v, g.S, g.K, g.Hv, bh / g.K, bh % g.K, 0, Sp, kPanel, vp.p + bh * vsize);
  });

  ParallelFor(g.B * g.N * g.nq, nthreads, [&](int64_t item, int) {
    const ForwardItem it(g, item);
    const QBlockBand& band = bands[it.qb];
    thread_local std::vector<float> scratch;
    scratch.resize(kStrip * g.bk + g.bq * g.Hv + (kLanes + 1) * g.bq + g.bq * g.H + kLanes * kStrip);
    float* s = scratch.data();
    float* acc = s + kStrip * g.bk;
    float* m = acc + g.bq * g.Hv;
    float* l = m + g.bq;  // [bq, kLanes] lane sums
    float* qrows = l + kLanes * g.bq;
    float* rmax = qrows + g.bq * g.H;
    PackRows(q, g.T, g.N, g.H, it.b, it.n, it.t0, it.rows, g.H, qrows);
    // Logits in log2 units straight from the GEMM (SoftmaxRow with c = 1).
    const Vf vc = Set1(c);
    for (int64_t i = 0; i < it.rows * g.H; i += kLanes)
      Store(qrows + i, Mul(Load(qrows + i), vc));
    std::fill(acc, acc + it.rows * g.Hv, 0.0f);
    std::fill(m, m + it.rows, kNegInf);
    std::fill(l, l + kLanes * it.rows, 0.0f);

    const float* vhead = vp.p + (it.b * g.K + it.kvh) * vsize;
    ForEachTile(g, band, [&](int64_t kb, Tile tile, int64_t j0) {
      const int64_t cols = std::min(g.bk, g.S - j0);
      const float* ktile = kt.p + ((it.b * g.K + it.kvh) * g.nk + kb) * ktsize;
      // Strips of kStrip rows: scores, softmax and P @ V while the strip is in L1.
      for (int64_t r0 = 0; r0 < it.rows; r0 += kStrip) {
        const int64_t nr = std::min(kStrip, it.rows - r0);
        std::fill(rmax, rmax + kLanes * nr, kNegInf);
        const bool full = tile == Tile::kFull;
        Gemm<false, kMR, kNV>(nr, g.bk, g.H, qrows + r0 * g.H, g.H, 1, ktile, kPanel, s, g.bk,
                              full ? rmax : nullptr, g.H * kPanel);
        if (!full) {
          MaskTile(s, g.bk, nr, g.bk, it.t0 + r0, j0, g.S, lo, hi);
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
bool AmxAvailable() { return false; }
bool IsBf16Exact(const float*, int64_t) { return false; }
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
  return ForwardSimd(g, q, k, v, lo, hi, scale, nthreads, o, lse, stats);
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
        float* dst = dq + ((b * g.T + t) * g.N + n) * g.H;
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
bool BackwardSimd(const Geometry& g, const float* q, const float* k, const float* v,
              const float* dout, const float* stats, const float* delta, const int32_t* lo,
              const int32_t* hi, float scale, int nthreads, float* dq, float* dk, float* dv) {
  const float c = scale * kLog2e;
  const float inv_c = c != 0.0f ? 1.0f / c : 0.0f;
  const auto bands = BlockBands(g, lo, hi);
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
    PackRows(q, g.T, g.N, g.H, bn / g.N, bn % g.N, 0, Tp, g.H, qh);
    const Vf vc = Set1(c);  // as the forward scales its packed q
    for (int64_t i = 0; i < Tp * g.H; i += kLanes) Store(qh + i, Mul(Load(qh + i), vc));
    PackRows(dout, g.T, g.N, g.Hv, bn / g.N, bn % g.N, 0, Tp, g.Hv, dop.p + bn * Tp * g.Hv);
  });
  ParallelFor(g.B * g.K, nthreads, [&](int64_t bh, int) {
    PackRows(k, g.S, g.K, g.H, bh / g.K, bh % g.K, 0, Sp, g.H, kp.p + bh * Sp * g.H);
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
      for (int64_t qb = 0; qb < g.nq; ++qb) {
        const Tile tile = Classify(g, bands[qb], kb);
        if (tile == Tile::kEmpty) continue;
        const int64_t t0 = qb * g.bq, rows = std::min(g.bq, g.T - t0);
        const float* qrows = qp.p + (bn * Tp + t0) * g.H;
        const float* dorows = dop.p + (bn * Tp + t0) * g.Hv;
        const float* drow = delta + bn * g.T + t0;
        // P = 2^(s - m) / l, s = (c q) . k in log2 units, as the forward computed it.
        Gemm<false, kMR, kNV>(rows, g.bk, g.H, qrows, g.H, 1, ktile, g.bk, p, g.bk);
        if (tile == Tile::kPartial) MaskTile(p, g.bk, rows, g.bk, t0, j0, g.S, lo, hi);
        for (int64_t r = 0; r < rows; ++r) {
          const RowStats st(g, stats, bn * g.T + t0 + r);
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
          const Vf vd = Set1(drow[r]);
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
      }
    }
    const Vf vinv_c = Set1(inv_c);
    for (int64_t jj = 0; jj < cols; ++jj) {
      float* dkr = dk + ((b * g.S + j0 + jj) * g.K + kvh) * g.H;
      for (int64_t d = 0; d < g.H; d += kLanes)
        Store(dkr + d, Mul(Load(dk_acc + jj * g.H + d), vinv_c));
      std::memcpy(dv + ((b * g.S + j0 + jj) * g.K + kvh) * g.Hv, dv_acc + jj * g.Hv,
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
  return BackwardSimd(g, q, k, v, dout, stats, delta, lo, hi, scale, nthreads, dq, dk, dv);
}

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

}  // namespace

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
