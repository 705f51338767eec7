// attnjax CPU flash attention: aligned buffers, the thread count, the persistent
// thread pool and ParallelFor (with denormals flushed in the workers).
// (One unit of the unity build compiled from flash_cpu.cc.)

#ifndef ATTNJAX_CPU_THREAD_POOL_H_
#define ATTNJAX_CPU_THREAD_POOL_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

// ---------------------------------------------------------------- memory, threads

// Large scratch blocks kept between calls.  The packed K/V panels of one call are tens
// of MB; allocated fresh, each comes from mmap and its every page faults on first
// touch (a quarter of a sparse call's time on a 128 x 128 map, where the tiles
// themselves are few).  Freed blocks wait here for the next call of the same shapes:
// a request takes the smallest cached block of at least its size (and at most twice
// it), and the cache frees its oldest blocks beyond ATTNJAX_CPU_SCRATCH_MB (default
// 512; 0 turns the cache off).  Blocks under kMinCached bytes go straight to malloc,
// and so does everything in a forked child (whose copy of the lock may be held).
class ScratchCache {
 public:
  static constexpr size_t kMinCached = size_t{1} << 20;
  static ScratchCache& Get() {
    static ScratchCache* cache = new ScratchCache;  // never destroyed, as the pool
    return *cache;
  }
  void* Acquire(size_t bytes) {
    if (Usable(bytes)) {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = blocks_.size();
      for (size_t i = 0; i < blocks_.size(); ++i)
        if (blocks_[i].bytes >= bytes && blocks_[i].bytes <= 2 * bytes &&
            (best == blocks_.size() || blocks_[i].bytes < blocks_[best].bytes))
          best = i;
      if (best < blocks_.size()) {
        void* p = blocks_[best].p;
        cached_ -= blocks_[best].bytes;
        blocks_.erase(blocks_.begin() + best);
        return p;
      }
    }
    return std::aligned_alloc(64, bytes);
  }
  void Release(void* p, size_t bytes) {
    if (p == nullptr) return;
    if (!Usable(bytes)) {
      std::free(p);
      return;
    }
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks_.push_back({p, bytes});
      cached_ += bytes;
      while (cached_ > cap_) {  // oldest first
        drop.push_back(blocks_.front().p);
        cached_ -= blocks_.front().bytes;
        blocks_.erase(blocks_.begin());
      }
    }
    for (void* d : drop) std::free(d);
  }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };
  bool Usable(size_t bytes) const {
    return bytes >= kMinCached && bytes <= cap_ && getpid() == pid_;
  }
  ScratchCache() : pid_(getpid()) {
    const char* env = std::getenv("ATTNJAX_CPU_SCRATCH_MB");
    const long mb = env ? std::atol(env) : 512;
    cap_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }
  std::mutex mu_;
  std::vector<Block> blocks_;
  size_t cached_ = 0, cap_ = 0;
  const pid_t pid_;
};

// n uninitialised elements, 64-byte aligned; p is null when the allocation fails.
// Large ones are recycled through the ScratchCache.
template <class T>
struct AlignedBuffer {
  T* p = nullptr;
  size_t bytes;
  explicit AlignedBuffer(size_t n)
      : bytes(((std::max<size_t>(n, 1) * sizeof(T) + 63) / 64) * 64) {
    p = static_cast<T*>(ScratchCache::Get().Acquire(bytes));
  }
  ~AlignedBuffer() { ScratchCache::Get().Release(p, bytes); }
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

}  // namespace

#endif  // ATTNJAX_CPU_THREAD_POOL_H_
