/* How many 256-bit vector operations of each kind an x86-64 core issues per cycle next
 * to FMAs (docs/benchmarks.md, "CPU attention": "Why the softmax costs 10%").  Each row times a loop of 10
 * independent FMA chains plus 4 independent chains of another operation; if that
 * operation has its own execution port the row costs what the FMAs alone cost.
 *
 *   cc -O2 -mavx2 -mfma benchmarks/cpu_issue_probe.c -o /tmp/probe && /tmp/probe [GHz]
 *
 * Cycles assume the given clock (default 2.5 GHz; no performance counters needed). */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float buf[64] __attribute__((aligned(64)));
static double ghz = 2.5;
#define ITERS 20000000L

#define ROW(name, body)                                                                  \
  do {                                                                                   \
    __m256 a0 = _mm256_set1_ps(1.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,       \
           a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0, a12 = a0, a13 = a0;   \
    __m256 b = _mm256_set1_ps(1.0f);                                                     \
    double best = 1e9;                                                                   \
    for (int rep = 0; rep < 3; ++rep) {                                                  \
      double t = now();                                                                  \
      for (long i = 0; i < ITERS; ++i)                                                   \
        __asm__ volatile(body                                                            \
                         : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5),   \
                           "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11), \
                           "+x"(a12), "+x"(a13)                                          \
                         : "x"(b), "r"(buf));                                            \
      t = now() - t;                                                                     \
      if (t < best) best = t;                                                            \
    }                                                                                    \
    printf("%-26s %6.2f cycles per loop\n", name, best / ITERS * ghz * 1e9);             \
  } while (0)

#define FMA10                                                                           \
  "vfmadd231ps %14,%14,%0\n\tvfmadd231ps %14,%14,%1\n\tvfmadd231ps %14,%14,%2\n\t"      \
  "vfmadd231ps %14,%14,%3\n\tvfmadd231ps %14,%14,%4\n\tvfmadd231ps %14,%14,%5\n\t"      \
  "vfmadd231ps %14,%14,%6\n\tvfmadd231ps %14,%14,%7\n\tvfmadd231ps %14,%14,%8\n\t"      \
  "vfmadd231ps %14,%14,%9\n\t"
#define FOUR(op) op " %14,%10,%10\n\t" op " %14,%11,%11\n\t" op " %14,%12,%12\n\t" op " %14,%13,%13\n\t"

int main(int argc, char** argv) {
  if (argc > 1) ghz = atof(argv[1]);
  ROW("10 FMA", FMA10);
  ROW("10 FMA + 4 vaddps", FMA10 FOUR("vaddps"));
  ROW("10 FMA + 4 vmaxps", FMA10 FOUR("vmaxps"));
  ROW("10 FMA + 4 vpaddd", FMA10 FOUR("vpaddd"));
  ROW("10 FMA + 4 vpslld", FMA10 "vpslld $1,%10,%10\n\tvpslld $1,%11,%11\n\t"
                           "vpslld $1,%12,%12\n\tvpslld $1,%13,%13\n\t");
  ROW("10 FMA + 4 vbroadcastss", FMA10 "vbroadcastss (%15),%10\n\tvbroadcastss 4(%15),%11\n\t"
                                 "vbroadcastss 8(%15),%12\n\tvbroadcastss 12(%15),%13\n\t");
  ROW("10 FMA + 4 loads", FMA10 "vmovups (%15),%10\n\tvmovups 32(%15),%11\n\t"
                          "vmovups 64(%15),%12\n\tvmovups 96(%15),%13\n\t");
  return 0;
}
