/* Small-M float32 products for decoding on the CPU (Linux).

   Decoding multiplies a few rows of activations (M = the streams of the batch, or the tokens
   of a short prompt) by every weight matrix of the model: y = x @ W^T, W stored (N, K)
   row-major, as mlx calls cblas_sgemm(RowMajor, NoTrans, Trans, M, N, K, ...). At small M that
   product is a read of W, bounded by memory bandwidth; on the 2-core AMD EPYC we develop on,
   Intel MKL reads W at ~15-18 GB/s for M=1 and ~8-9 GB/s for M=8, OpenBLAS and BLIS at 8-19
   GB/s for M=1, where the memory gives 32-48 GB/s to two threads (docs/PERFORMANCE.md,
   `python -m bench.small_gemm`).

   This library exports cblas_sgemm. core/blas.py loads it with RTLD_GLOBAL before the
   optimised BLAS and before mlx, so libmlx's cblas_sgemm resolves here, and hands it the BLAS's
   own cblas_sgemm (small_gemm_set_fallback). It computes that one case with min_m <= M <= max_m
   itself and forwards every other call unchanged (core/calibrate.py measures which M it wins at
   on this CPU and sets the range: SMALL_GEMM_MIN_M, SMALL_GEMM_MAX_M, small_gemm_set_range). M < 4: dot products of each W row with the M rows
   of x (inner kernels); M >= 4: x interleaved, 8 or 16 rows side by side, times 8 W rows at a
   time (outer kernels). Either way each W row is read once per 16 rows of x, and the rows of
   W are split over a small pool of threads.

   Threads: the caller and a pool of helpers claim chunks of W's rows until none is left, so a
   helper that is slow to wake only does less. Helpers sleep on a condition variable between
   products (spinning spin_us first where a CPU is to spare), so an idle worker costs nothing.
   One product at a time uses the pool; a concurrent caller computes on its own thread. fork()
   resets the pool. */

#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, MAX_THREADS = 16, VL = 16, ROW_TILE = 16, OUTER_FROM_M = 4 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

typedef struct {
  int m, n, k, lda, ldb, ldc;
  int head;  /* inner kernels: the first `head` columns are summed one by one (aligned loads) */
  int width; /* 0: x rows as given (inner kernels); 8 or 16: x interleaved by blocks of rows */
  float alpha, beta;
  const float *a, *b;
  float *c;
  int chunk, chunks; /* W rows per chunk, chunks in all: the threads claim them one by one */
} job_t;

static sgemm_fn fallback;
static int min_m = 1, max_m = 128, n_threads = 1, spin_us = 0, cpus = 1;
static atomic_long small_calls, forwarded_calls;

/* ------------------------------------------------------------------ kernels */

static inline v16 load16(const float *p) {
  v16 v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline float hsum(v16 v) {
  v8 a, b;
  memcpy(&a, &v, sizeof a);
  memcpy(&b, (char *)&v + sizeof a, sizeof b);
  a += b;
  v4 c, d;
  memcpy(&c, &a, sizeof c);
  memcpy(&d, (char *)&a + sizeof c, sizeof d);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

static inline float rest(const float *x, const float *w, int head, int from, int k) {
  float dot = 0.0f;
  for (int i = 0; i < head; i++) dot += x[i] * w[i];
  for (int i = from; i < k; i++) dot += x[i] * w[i];
  return dot;
}

static inline void store(const job_t *j, int r, int col, float dot) {
  float *out = j->c + (size_t)r * j->ldc + col;
  *out = j->alpha * dot + (j->beta == 0.0f ? 0.0f : j->beta * *out); /* beta 0: C is not read */
}

/* M < 4 (inner kernels): rows [j0, j1) of W against the MB rows of x; each 16 floats of W are
   loaded once and multiplied into MB accumulators, summed across at the end of the row. */
#define DOT_BLOCK(MB)                                                                    \
  static void dot_block_##MB(const job_t *j, int j0, int j1) {                           \
    const int k = j->k, h = j->head, kv = h + (k - h) / VL * VL;                         \
    for (int col = j0; col < j1; col++) {                                                \
      const float *w = j->b + (size_t)col * j->ldb;                                      \
      v16 acc[MB] = {0};                                                                 \
      for (int i = h; i < kv; i += VL) {                                                 \
        const v16 wv = load16(w + i);                                                    \
        _Pragma("GCC unroll 4") for (int r = 0; r < MB; r++) acc[r] +=                 \
            load16(j->a + (size_t)r * j->lda + i) * wv;                                  \
      }                                                                                  \
      for (int r = 0; r < MB; r++)                                                       \
        store(j, r, col, hsum(acc[r]) + rest(j->a + (size_t)r * j->lda, w, h, kv, k));   \
    }                                                                                    \
  }
DOT_BLOCK(1)
DOT_BLOCK(2)
DOT_BLOCK(3)

typedef void (*block_fn)(const job_t *, int, int);
static const block_fn BLOCKS[OUTER_FROM_M] = {0, dot_block_1, dot_block_2, dot_block_3};

/* For M >= 4 the dot products above are bound by arithmetic (each product needs its own
   horizontal sum; ~60 GFLOP/s at M=8). The outer kernels read x interleaved, B rows side by
   side (x_t[i * B + r], padded with zeros), and for 8 W rows at a time add W[col][i] * x_t[i]
   into one B-wide accumulator per W row: no horizontal sums, one vector load of x per 8
   multiply-adds (M=8: 31 -> 16 ms over the bench model's weights, the memory's pace). */
#define OUTER_BLOCK(B, VT)                                                                    \
  static void outer_##B(const job_t *j, int block, int j0, int j1) {                          \
    const int k = j->k, r0 = block * B, rows = j->m - r0 < B ? j->m - r0 : B;                 \
    const float *xt = j->a + (size_t)block * k * B;                                           \
    int col = j0;                                                                             \
    for (; col + 7 < j1; col += 8) {                                                          \
      const float *w = j->b + (size_t)col * j->ldb;                                           \
      VT acc[8] = {0};                                                                        \
      for (int i = 0; i < k; i++) {                                                           \
        VT xv;                                                                                \
        memcpy(&xv, xt + (size_t)i * B, sizeof xv);                                           \
        _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++) acc[c] += xv * w[(size_t)c * j->ldb + i]; \
      }                                                                                       \
      for (int c = 0; c < 8; c++)                                                             \
        for (int r = 0; r < rows; r++) store(j, r0 + r, col + c, acc[c][r]);                  \
    }                                                                                         \
    for (; col < j1; col++) {                                                                 \
      const float *w = j->b + (size_t)col * j->ldb;                                           \
      VT acc = {0};                                                                           \
      for (int i = 0; i < k; i++) {                                                           \
        VT xv;                                                                                \
        memcpy(&xv, xt + (size_t)i * B, sizeof xv);                                           \
        acc += xv * w[i];                                                                     \
      }                                                                                       \
      for (int r = 0; r < rows; r++) store(j, r0 + r, col, acc[r]);                           \
    }                                                                                         \
  }
OUTER_BLOCK(8, v8)
OUTER_BLOCK(16, v16)

/* W rows [j0, j1) against every row of x, in tiles of ROW_TILE rows so that the second block of
   x finds the tile still in cache. */
static void run_rows(const job_t *j, int j0, int j1) {
  for (int t0 = j0; t0 < j1; t0 += ROW_TILE) {
    const int t1 = t0 + ROW_TILE < j1 ? t0 + ROW_TILE : j1;
    if (!j->width)
      BLOCKS[j->m](j, t0, t1);
    else
      for (int block = 0; block * j->width < j->m; block++) (j->width == 8 ? outer_8 : outer_16)(j, block, t0, t1);
  }
}

/* ------------------------------------------------------------------ thread pool */

static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER; /* one product uses the helpers */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static atomic_uint generation;
/* The product's chunks are claimed, not assigned: a helper that wakes late (or waits for a CPU
   the Python thread holds) leaves its share to the caller instead of stalling it. `claim` holds
   the product's generation (high 32 bits), its number of chunks (16) and the next chunk (16).
   `current` is read only after a successful claim: until that chunk is done the product is
   unfinished, so the caller cannot be rewriting `current` for the next one. */
static _Atomic uint64_t claim;
static atomic_int chunks_done;
static int sleepers, helpers_started;
static unsigned pool_generation; /* the generation when the helpers were started */
static job_t current;

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

static unsigned wait_for_work(unsigned seen) {
  const double until = now_us() + spin_us;
  for (int i = 0;; i++) {
    unsigned g = atomic_load(&generation);
    if (g != seen) return g;
    if ((i & 255) == 255 && now_us() > until) break;
  }
  pthread_mutex_lock(&wake_lock);
  sleepers++;
  while (atomic_load(&generation) == seen) pthread_cond_wait(&wake, &wake_lock);
  sleepers--;
  pthread_mutex_unlock(&wake_lock);
  return atomic_load(&generation);
}

/* Claims and runs chunks of product `gen` until none is left. */
static void run_chunks(unsigned gen) {
  const job_t *j = &current;
  uint64_t v = atomic_load(&claim);
  while ((unsigned)(v >> 32) == gen && (v & 0xffff) < (v >> 16 & 0xffff)) {
    if (!atomic_compare_exchange_weak(&claim, &v, v + 1)) continue; /* v reloaded */
    const int j0 = (int)(v & 0xffff) * j->chunk;
    run_rows(j, j0, j0 + j->chunk < j->n ? j0 + j->chunk : j->n);
    atomic_fetch_add(&chunks_done, 1);
    v = atomic_load(&claim);
  }
}

static void *helper(void *arg) {
  (void)arg;
#ifdef __linux__
  pthread_setname_np(pthread_self(), "small_gemm"); /* what top -H and the reproducers show */
#endif
  unsigned seen = pool_generation; /* not the current value: a job may be posted before we run */
  for (;;) {
    seen = wait_for_work(seen);
    run_chunks(seen);
  }
  return NULL;
}

static void start_helpers(void) {
  pool_generation = atomic_load(&generation);
  for (int p = 1; p < n_threads; p++) {
    pthread_t t;
    if (pthread_create(&t, NULL, helper, NULL) != 0) break;
    pthread_detach(t);
    helpers_started++;
  }
}

static void run_parallel(job_t *j) {
  pthread_once(&pool_once, start_helpers);
  /* ~8 chunks per thread, whole tiles: small enough to even out a late helper */
  const int threads = helpers_started + 1, per = (j->n + 8 * threads - 1) / (8 * threads);
  j->chunk = (per + ROW_TILE - 1) / ROW_TILE * ROW_TILE;
  j->chunks = (j->n + j->chunk - 1) / j->chunk;
  const unsigned gen = atomic_load(&generation) + 1;
  current = *j;
  atomic_store(&chunks_done, 0);
  atomic_store(&claim, (uint64_t)gen << 32 | (uint64_t)j->chunks << 16);
  atomic_store(&generation, gen);
  pthread_mutex_lock(&wake_lock);
  if (sleepers) pthread_cond_broadcast(&wake);
  pthread_mutex_unlock(&wake_lock);
  run_chunks(gen);
  for (int i = 0; atomic_load(&chunks_done) < j->chunks; i++)
    if ((i & 1023) == 1023) sched_yield(); /* a helper may be descheduled mid-chunk */
}

static void reset_after_fork(void) { /* the child has no helper threads */
  pthread_mutex_init(&pool_busy, NULL);
  pthread_mutex_init(&wake_lock, NULL);
  pthread_cond_init(&wake, NULL);
  pool_once = (pthread_once_t)PTHREAD_ONCE_INIT;
  helpers_started = sleepers = 0;
}

/* ------------------------------------------------------------------ copies of x */

static __thread float *x_copy; /* the calling thread's copy of x, read by the helpers too */
static __thread size_t x_copy_floats;

static float *x_buffer(size_t floats) { /* 64-byte aligned, grown as needed; NULL if no memory */
  if (floats > x_copy_floats) {
    free(x_copy);
    x_copy = aligned_alloc(64, (floats + 15) / 16 * 16 * sizeof(float));
    x_copy_floats = x_copy ? floats : 0;
  }
  return x_copy;
}

/* mlx maps weights straight from safetensors, so W rows usually start off a 64-byte line (24
   bytes off for the bench model): every 64-byte load would straddle two lines. When all rows
   share one misalignment (ldb a multiple of 16 floats), x is copied so that its columns sit at
   the same offset, and the first `head` columns are done one by one: every vector load of W and
   x is then aligned (measured: 1 thread 32 -> 21 ms over the bench model's weights). */
static void align_to_weights(job_t *j) {
  const uintptr_t addr = (uintptr_t)j->b;
  if (addr % sizeof(float) != 0 || j->ldb % VL != 0) return;
  const int offset = (int)(addr % 64 / sizeof(float)); /* floats past the line start */
  const int ld = (j->k + 2 * VL - 1) / VL * VL;           /* room for the offset, 16-float rows */
  float *copy = x_buffer((size_t)j->m * ld);
  if (!copy) return;
  for (int r = 0; r < j->m; r++)
    memcpy(copy + (size_t)r * ld + offset, j->a + (size_t)r * j->lda, j->k * sizeof(float));
  j->a = copy + offset;
  j->lda = ld;
  j->head = (VL - offset) % VL < j->k ? (VL - offset) % VL : j->k;
}

/* x interleaved for the outer kernels: blocks of `width` rows, x_t[(block * k + i) * width + r],
   rows past M zero. Returns 0 if there is no memory for it. */
static int interleave_x(job_t *j) {
  const int width = j->m <= 8 ? 8 : 16, blocks = (j->m + width - 1) / width;
  float *xt = x_buffer((size_t)blocks * j->k * width);
  if (!xt) return 0;
  for (int block = 0; block < blocks; block++)
    for (int i = 0; i < j->k; i++)
      for (int r = 0; r < width; r++) {
        const int row = block * width + r;
        xt[((size_t)block * j->k + i) * width + r] = row < j->m ? j->a[(size_t)row * j->lda + i] : 0.0f;
      }
  j->a = xt;
  j->width = width;
  return 1;
}

/* ------------------------------------------------------------------ entry points */

static int env_int(const char *name, int fallback_value, int lo, int hi) {
  const char *s = getenv(name);
  if (!s || !*s) return fallback_value;
  int v = atoi(s);
  return v < lo ? lo : v > hi ? hi : v;
}

/* The CPUs this process may really use: its affinity mask and, in a container, its cgroup v2
   quota ("200000 100000" = 2 CPUs), not every CPU of the host: a helper waiting for a CPU the
   quota does not give would stall every product. */
static long usable_cpus(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) n = CPU_COUNT(&set);
  const char *cpu_max = getenv("SMALL_GEMM_CPU_MAX"); /* tests: another cpu.max file */
  FILE *f = fopen(cpu_max && *cpu_max ? cpu_max : "/sys/fs/cgroup/cpu.max", "r");
  if (f) {
    long quota, period;
    if (fscanf(f, "%ld %ld", &quota, &period) == 2 && quota > 0 && period > 0)
      n = (quota + period - 1) / period < n ? (quota + period - 1) / period : n;
    fclose(f); /* "max 100000": no quota */
  }
#endif
  return n < 1 ? 1 : n;
}

__attribute__((constructor)) static void configure(void) {
  cpus = (int)usable_cpus();
  n_threads = env_int("SMALL_GEMM_THREADS", cpus > 8 ? 8 : cpus, 1, MAX_THREADS);
  min_m = env_int("SMALL_GEMM_MIN_M", 1, 1, 1024);
  max_m = env_int("SMALL_GEMM_MAX_M", 128, 0, 1024); /* MKL is as fast from ~M=200 (AMD EPYC) */
  /* Spinning pays only with a CPU to spare: where the helpers take every CPU, a spinning helper
     takes the one the Python thread needs to build the next step (2 cores, pipelined decode,
     `python -m bench.decode_env`: no spin 40.2 tok/s, 40 us 39.3, 100 us 38.4, medians of 6). */
  spin_us = env_int("SMALL_GEMM_SPIN_US", n_threads > 1 && cpus > n_threads ? 100 : 0, 0, 100000);
  pthread_atfork(NULL, NULL, reset_after_fork);
}

void small_gemm_set_fallback(sgemm_fn f) { fallback = f; }
int small_gemm_threads(void) { return n_threads; }
int small_gemm_spin_us(void) { return spin_us; }
int small_gemm_cpus(void) { return cpus; }
int small_gemm_min_m(void) { return min_m; }
int small_gemm_max_m(void) { return max_m; }
/* The rows it computes from now on (max_m < min_m: none); for calibration within one process. */
void small_gemm_set_range(int lo, int hi) {
  min_m = lo < 1 ? 1 : lo;
  max_m = hi < 0 ? 0 : hi > 1024 ? 1024 : hi;
}
void small_gemm_counts(long *small, long *forwarded) {
  *small = atomic_load(&small_calls);
  *forwarded = atomic_load(&forwarded_calls);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  job_t j = {m, n, k, lda, ldb, ldc, 0, 0, alpha, beta, a, b, c, 0, 0};
  const int ours = order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS && m >= min_m &&
                   m <= max_m && n >= 1 && k >= 1;
  if (!ours || (m >= OUTER_FROM_M && !interleave_x(&j))) { /* (no memory for x: the BLAS) */
    atomic_fetch_add(&forwarded_calls, 1);
    if (!fallback) {
      fputs("small_gemm: no BLAS to forward to (core/blas.py calls small_gemm_set_fallback)\n", stderr);
      abort();
    }
    fallback(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  atomic_fetch_add(&small_calls, 1);
  if (m < OUTER_FROM_M) align_to_weights(&j); /* best effort: unaligned loads without it */
  /* below ~256 KB of W, waking a helper costs more than it saves */
  if (n_threads > 1 && (size_t)n * k >= 65536 && pthread_mutex_trylock(&pool_busy) == 0) {
    run_parallel(&j);
    pthread_mutex_unlock(&pool_busy);
  } else {
    run_rows(&j, 0, n);
  }
}
