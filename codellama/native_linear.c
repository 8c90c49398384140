/* CPU linear layers y[M, N] = x[M, K] @ W[N, K]^T, a whole decoding step built on them (at
 * the end of this file), and greedy decoding's argmax.
 *
 * Decoding reads every weight once per step, so it runs at the speed of a matrix-vector
 * product, bound by memory bandwidth. On a 2-core AVX512-BF16 EPYC, oneDNN's kernels read
 * its prepacked weights at 14-25 GB/s at batch 1 where a plain sequential pass reaches 25-35.
 * Two weight layouts are read here:
 * - blocks of 64 output rows (the "blocked" kernels): the layout oneDNN prepacks weights in
 *   on AVX-512, which is also codellama's own (codellama_pack_* write it in one pass from a
 *   checkpoint's tensors): every CPU model keeps its linear weights so, and these kernels
 *   serve every number of rows, decoding's few (1.1-1.5x oneDNN) and prefill's many (a GEMM
 *   tile, about oneDNN's speed);
 * - row-major (plain weights, and oneDNN's fp32 layout for batch 1), for up to 8 rows.
 * codellama/native.py compiles this file for the running CPU (-O3 -march=native -fopenmp)
 * on first use and checks the kernels against float64 (and any oneDNN layout against oneDNN)
 * before use. x and y have W's dtype (fp32 or bf16), or are fp32 on bf16 weights ("w16": fp32
 * models keep a bf16 checkpoint's weights so, exactly); sums are fp32. bf16 uses AVX512-BF16
 * dot products where the CPU has them. CPUs with AVX2 + FMA but no AVX-512 get their own
 * blocked products (8-wide tiles, see "AVX2" below; bf16 widened to fp32); elsewhere the
 * portable vector code is mostly scalar, and models keep oneDNN (native.preferred).
 */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define AI static inline __attribute__((always_inline))
#define U 4    /* accumulators per row of W when one row of x is multiplied */
#define MB 4   /* rows of x per pass over a block of W */
#define ROWS 4 /* rows of W per block when 3 or more rows of x are multiplied */

/* Row-major weights: two loop orders, measured on a 2-core AVX512-BF16 EPYC against oneDNN:
 * - 1-2 rows of x ("row" kernels): the rows of W are read one after another, a single
 *   sequential stream per thread that the hardware prefetcher follows best: 23-35 GB/s,
 *   where oneDNN reads 14-25 GB/s.
 * - 3-8 rows of x ("block" kernels): four rows of W at a time, so that each load of x
 *   serves four rows: about 0.8x oneDNN's speed, against 0.5x for the row order. */

#define VL 16
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
/* A scalar in every lane; (vf){0} + s costs an add (0.0f + s is not s for -0.0f). */
#define SPLAT(s) ((vf){(s), (s), (s), (s), (s), (s), (s), (s), (s), (s), (s), (s), (s), (s), (s), (s)})

AI float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

AI uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

AI float f32_id(float f) { return f; }

AI vf load_f32(const float* p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

AI vf load_bf16(const uint16_t* p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}

AI float hsum(vf v) {
#if defined(__AVX512F__)
    __m512 m;
    memcpy(&m, &v, sizeof m);
    return _mm512_reduce_add_ps(m);
#else
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
#endif
}

/* out[m] = sum_k w[k] * x[m * K + k] for m < M (M <= MB); x is fp32; UN accumulators
 * per row of x over consecutive vectors of k. */
#define PORTABLE_ROW(NAME, WT, LOADW, TOF)                                                    \
    AI void NAME(const WT* w, const float* x, float* out, long K, const int M, const int UN) { \
        vf acc[MB][U];                                                                        \
        for (int m = 0; m < M; m++)                                                            \
            for (int u = 0; u < UN; u++) acc[m][u] = (vf){0};                                  \
        long k = 0;                                                                            \
        for (; k + UN * VL <= K; k += UN * VL)                                                 \
            for (int u = 0; u < UN; u++) {                                                     \
                vf wv = LOADW(w + k + u * VL);                                                 \
                for (int m = 0; m < M; m++) acc[m][u] += wv * load_f32(x + m * K + k + u * VL); \
            }                                                                                  \
        for (; k + VL <= K; k += VL) {                                                         \
            vf wv = LOADW(w + k);                                                              \
            for (int m = 0; m < M; m++) acc[m][0] += wv * load_f32(x + m * K + k);             \
        }                                                                                      \
        for (int m = 0; m < M; m++) {                                                          \
            vf a = acc[m][0];                                                                  \
            for (int u = 1; u < UN; u++) a += acc[m][u];                                       \
            float s = hsum(a);                                                                 \
            for (long j = k; j < K; j++) s += TOF(w[j]) * x[m * K + j];                        \
            out[m] = s;                                                                        \
        }                                                                                      \
    }

PORTABLE_ROW(row_f32, float, load_f32, f32_id)
#if !defined(__AVX512BF16__)
PORTABLE_ROW(row_bf16, uint16_t, load_bf16, bf16_to_f32)
#endif


/* out[m * ROWS + r] = sum_k W[r * K + k] * x[m * K + k] for r < R, m < M; x is fp32. */
#define PORTABLE_BLOCK(NAME, WT, LOADW, TOF)                                                  \
    AI void NAME(const WT* W, const float* x, float* out, long K, const int R, const int M) {  \
        vf acc[MB][ROWS];                                                                     \
        for (int m = 0; m < M; m++)                                                            \
            for (int r = 0; r < R; r++) acc[m][r] = (vf){0};                                   \
        long kv = K - K % VL;                                                                  \
        for (long k = 0; k < kv; k += VL) {                                                    \
            vf w[ROWS];                                                                        \
            for (int r = 0; r < R; r++) w[r] = LOADW(W + r * K + k);                           \
            for (int m = 0; m < M; m++) {                                                      \
                vf xv = load_f32(x + m * K + k);                                               \
                for (int r = 0; r < R; r++) acc[m][r] += w[r] * xv;                            \
            }                                                                                  \
        }                                                                                      \
        for (int m = 0; m < M; m++)                                                            \
            for (int r = 0; r < R; r++) {                                                      \
                float s = hsum(acc[m][r]);                                                     \
                for (long k = kv; k < K; k++) s += TOF(W[r * K + k]) * x[m * K + k];           \
                out[m * ROWS + r] = s;                                                         \
            }                                                                                  \
    }

PORTABLE_BLOCK(block_f32, float, load_f32, f32_id)
#if !defined(__AVX512BF16__)
PORTABLE_BLOCK(block_bf16, uint16_t, load_bf16, bf16_to_f32)
#endif

#if defined(__AVX512BF16__)
/* The same with AVX512-BF16 dot products; x stays bf16 (a pair of products per lane). */
AI void row_bf16_dp(const uint16_t* w, const uint16_t* x, float* out, long K, const int M,
                    const int UN) {
    __m512 acc[MB][U];
    for (int m = 0; m < M; m++)
        for (int u = 0; u < UN; u++) acc[m][u] = _mm512_setzero_ps();
    long k = 0;
    for (; k + UN * 32 <= K; k += UN * 32)
        for (int u = 0; u < UN; u++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + u * 32);
            for (int m = 0; m < M; m++)
                acc[m][u] = _mm512_dpbf16_ps(
                    acc[m][u], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k + u * 32));
        }
    for (; k < K; k += 32) {
        __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
        __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
        for (int m = 0; m < M; m++)
            acc[m][0] = _mm512_dpbf16_ps(
                acc[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k));
    }
    for (int m = 0; m < M; m++) {
        __m512 a = acc[m][0];
        for (int u = 1; u < UN; u++) a = _mm512_add_ps(a, acc[m][u]);
        out[m] = _mm512_reduce_add_ps(a);
    }
}
AI void block_bf16_dp(const uint16_t* W, const uint16_t* x, float* out, long K, const int R,
                      const int M) {
    __m512 acc[MB][ROWS];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 32) {
        __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
        __m512bh w[ROWS];
        for (int r = 0; r < R; r++) w[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, W + r * K + k);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], w[r], xv);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) out[m * ROWS + r] = _mm512_reduce_add_ps(acc[m][r]);
}
#endif

/* Constant arguments are spelled out so that the compiler unrolls the common cases. */
#define LINEAR_BODY(ROW, BLOCK, XT, YT, STORE)                                                \
    if (M <= 2) {                                                                              \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                     \
        for (long n = 0; n < N; n++) {                                                         \
            float tmp[2];                                                                      \
            if (M == 1) ROW(W + n * K, (const XT*)xs, tmp, K, 1, U);                          \
            else ROW(W + n * K, (const XT*)xs, tmp, K, 2, 2);                                 \
            for (long m = 0; m < M; m++) ((YT*)y)[m * N + n] = STORE(tmp[m]);                 \
        }                                                                                      \
    } else {                                                                                   \
        long nblk = (N + ROWS - 1) / ROWS;                                                     \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                     \
        for (long b = 0; b < nblk; b++) {                                                      \
            long n0 = b * ROWS;                                                                \
            int R = N - n0 < ROWS ? (int)(N - n0) : ROWS;                                      \
            float tmp[MB * ROWS];                                                              \
            for (long m0 = 0; m0 < M; m0 += MB) {                                              \
                int mb = M - m0 < MB ? (int)(M - m0) : MB;                                     \
                const XT* xm = (const XT*)xs + m0 * K;                                         \
                if (R == ROWS && mb == MB) BLOCK(W + n0 * K, xm, tmp, K, ROWS, MB);            \
                else BLOCK(W + n0 * K, xm, tmp, K, R, mb);                                     \
                for (int m = 0; m < mb; m++)                                                   \
                    for (int r = 0; r < R; r++)                                                \
                        ((YT*)y)[(m0 + m) * N + n0 + r] = STORE(tmp[m * ROWS + r]);            \
            }                                                                                  \
        }                                                                                      \
    }

/* Row-major W. Kp is unused: the signature is the blocked kernels', so that one call serves
 * both. Returns 0, or -1 if the fp32 copy of x (portable bf16 only) cannot be allocated. */
int codellama_linear_f32(const float* x, const float* W, float* y, long M, long N, long K,
                         long Kp, int threads) {
    (void)Kp;
    const float* xs = x;
    LINEAR_BODY(row_f32, block_f32, float, float, f32_id)
    return 0;
}

int codellama_linear_bf16(const uint16_t* x, const uint16_t* W, uint16_t* y, long M, long N,
                          long K, long Kp, int threads) {
    (void)Kp;
#if defined(__AVX512BF16__)
    const uint16_t* xs = x;
    LINEAR_BODY(row_bf16_dp, block_bf16_dp, uint16_t, uint16_t, f32_to_bf16)
#else
    float* xs = (float*)malloc(sizeof(float) * (size_t)(M * K));
    if (!xs) return -1;
    for (long i = 0; i < M * K; i++) xs[i] = bf16_to_f32(x[i]);
    LINEAR_BODY(row_bf16, block_bf16, float, uint16_t, f32_to_bf16)
    free(xs);
#endif
    return 0;
}

/* ------------------------------------------------------------------------------------
 * oneDNN's prepacked weights. On CPUs with AVX-512, torch's _reorder_linear_weight stores
 * an (N, K) weight in blocks of 64 output rows: fp32 as [N/64][Kp][64], bf16 as
 * [N/64][Kp/2][64][2] (pairs of k for the bf16 dot product), N padded to 64 and K to Kp.
 * Reading a block front to back is one sequential stream; each x value (bf16: pair) is
 * broadcast against 64 outputs, so no horizontal sums are needed. Measured at 1-8 rows of
 * x: 1.1-1.5x oneDNN's own kernel on the same buffer, bit-identical results for bf16.
 * codellama/native.py checks the layout against oneDNN before using these on a weight.
 */
#define BN 64

/* R (<= 6) rows of x times one block over k in [k0, k1): y = (first ? 0 : y) + the products.
 * Decoding's few rows call it once over all of K. Many rows (prefill) pass 6 at a time (24
 * accumulators) over chunks of KC values of k, so that the block's chunk (256 KiB) stays in
 * L2 while every row of x passes over it; partial sums go through y. Measured against
 * oneDNN's GEMM on its own prepacked weights (2-core AVX-512 EPYC, fp32, `small` and 7B layer
 * shapes): 0.92-1.03x its time at 64 rows, 1.0-1.04x at 256, 1.03-1.07x at 1024 (with KC =
 * 256: 1.1-1.2x at 1024). */
#define GR 6
#define KC 1024

/* The tile's steps: acc[r][j] += w_j * x[r, k] for one k, and the store of its sums. */
AI void tile_fma(vf acc[GR][BN / VL], vf w0, vf w1, vf w2, vf w3, const float* x, long ldx,
                 long k, const int R) {
    for (int r = 0; r < R; r++) {
        vf xb = SPLAT(x[r * ldx + k]);
        acc[r][0] += w0 * xb;
        acc[r][1] += w1 * xb;
        acc[r][2] += w2 * xb;
        acc[r][3] += w3 * xb;
    }
}

AI void tile_store(vf acc[GR][BN / VL], float* y, long ldy, const int R, int first, int nvalid) {
    for (int r = 0; r < R; r++) {
        float* yr = y + r * ldy;
        for (int j = 0; j < BN / VL; j++)
            for (int i = 0; i < VL && VL * j + i < nvalid; i++)
                yr[VL * j + i] = first ? acc[r][j][i] : yr[VL * j + i] + acc[r][j][i];
    }
}

AI void gemm_tile_f32(const float* wb, const float* x, long ldx, float* y, long ldy, long k0,
                      long k1, const int R, int first, int nvalid) {
    vf acc[GR][BN / VL];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < BN / VL; j++) acc[r][j] = (vf){0};
    for (long k = k0; k < k1; k++) {
        const float* w = wb + k * BN;
        tile_fma(acc, load_f32(w), load_f32(w + VL), load_f32(w + 2 * VL), load_f32(w + 3 * VL),
                 x, ldx, k, R);
    }
    tile_store(acc, y, ldy, R, first, nvalid);
}

/* ------------------------------------------------------------------------------------
 * AVX2 + FMA (CPUs without AVX-512): the blocked layout's products with 8-wide vectors.
 * Sixteen vector registers hold a tile of R rows of x by 8 * NV outputs of one 64-row block
 * in R * NV accumulators: decoding's 1-3 rows on 64 or 32 outputs, over k in chunks of KC2
 * that stay in L2 while each group of rows passes over them; prefill's 6 rows on 16 (as BLAS
 * kernels for AVX2 do), on strips of the block copied into L1.
 * Every output is one fused multiply-add chain over k in order (a chunk starts from the
 * previous chunk's sum), so a row's result does not depend on the number of rows, the
 * chunking or the weight's storage (fp32 or bf16 pairs: bit-identical). */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define CL_AVX2 1
#include <immintrin.h>
#define KC2 256
#define GR2 6
#define PD2 32 /* rows of a block ahead that a tile's first pass prefetches */
#define PD1 4  /* ... and that a one-row tile prefetches (1 KiB: best of 2-16 measured) */
#define KCG 2048 /* prefill: rows of a 16-column strip per pass (128 KiB, in L2) */

AI __m256 bc_f32(const float* x) { return _mm256_broadcast_ss(x); }

AI __m256 bc_bf16(const uint16_t* x) {
    return _mm256_castsi256_ps(_mm256_set1_epi32((int)((uint32_t)*x << 16)));
}

AI __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The running sums of `left` outputs (all 8 if left >= 8): 0 on a chunk's first pass. */
AI __m256 sums_load(const float* y, int left, int first) {
    if (first || left <= 0) return _mm256_setzero_ps();
    return left >= 8 ? _mm256_loadu_ps(y) : _mm256_maskload_ps(y, lanes_below(left));
}

AI void sums_store(float* y, int left, __m256 v) {
    if (left >= 8) _mm256_storeu_ps(y, v);
    else if (left > 0) _mm256_maskstore_ps(y, lanes_below(left), v);
}

/* y[r, c0 + i] (fp32, rows ldy apart) continued over k in [k0, k1) for r < R, i < 8 * NV:
 * fp32 weights (a block's row k at wb + k * BN) or bf16 pairs (k0 even; an odd k1 == K ends
 * on the low half of its pair); x[r, k] at x + r * K + k, fp32 or bf16. The first pass over
 * a chunk (c0 == 0) prefetches the block's other columns for the passes after it; a pass of
 * one row over all 64 columns (batch-1 decoding) prefetches its own stream 1 KiB ahead, which
 * the hardware prefetcher alone left ~10% short of the bandwidth (2-core AVX2 EPYC). */
#define AVX2_TILE(NAME, WT, XT, BC, PAIRS)                                                     \
    AI void NAME(const WT* wb, const XT* x, long K, float* y, long ldy, long k0, long k1,       \
                 const int R, const int NV, int c0, int first, int nvalid) {                   \
        __m256 acc[3][8];                                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int j = 0; j < NV; j++)                                                       \
                acc[r][j] = sums_load(y + r * ldy + c0 + 8 * j, nvalid - c0 - 8 * j, first);   \
        if (!PAIRS) {                                                                          \
            const float* w = (const float*)wb + c0;                                            \
            for (long k = k0; k < k1; k++) {                                                   \
                if (c0 == 0 && NV < 8)                                                         \
                    for (int l = 0; l < BN; l += 16)                                           \
                        _mm_prefetch((const char*)(w + (k + PD2) * BN + l), _MM_HINT_T0);      \
                if (NV == 8)                                                                   \
                    for (int l = 0; l < BN; l += 16)                                           \
                        _mm_prefetch((const char*)(w + (k + PD1) * BN + l), _MM_HINT_T0);      \
                __m256 wv[8];                                                                  \
                for (int j = 0; j < NV; j++) wv[j] = _mm256_loadu_ps(w + k * BN + 8 * j);      \
                for (int r = 0; r < R; r++) {                                                  \
                    __m256 xb = BC(x + r * K + k);                                             \
                    for (int j = 0; j < NV; j++) acc[r][j] = _mm256_fmadd_ps(wv[j], xb, acc[r][j]); \
                }                                                                              \
            }                                                                                  \
        } else {                                                                               \
            const uint32_t* w = (const uint32_t*)(const void*)wb + c0;                         \
            const __m256i high = _mm256_set1_epi32((int)0xffff0000u);                          \
            long kend = k1 - (k1 - k0) % 2; /* whole pairs; an odd k1 leaves a low half */     \
            for (long k = k0; k < kend; k += 2) {                                              \
                if (c0 == 0 && NV < 8)                                                         \
                    for (int l = 0; l < BN; l += 16)                                           \
                        _mm_prefetch((const char*)(w + (k / 2 + PD2) * BN + l), _MM_HINT_T0);  \
                if (NV == 8)                                                                   \
                    for (int l = 0; l < BN; l += 16)                                           \
                        _mm_prefetch((const char*)(w + (k / 2 + PD1) * BN + l), _MM_HINT_T0);  \
                __m256 xe[3], xo[3];                                                           \
                for (int r = 0; r < R; r++) {                                                  \
                    xe[r] = BC(x + r * K + k);                                                 \
                    xo[r] = BC(x + r * K + k + 1);                                             \
                }                                                                              \
                /* a vector of pairs at a time: both halves used at once, few registers */   \
                for (int j = 0; j < NV; j++) {                                                 \
                    const __m256i* p = (const __m256i*)(w + (k / 2) * BN + 8 * j);             \
                    __m256i raw = _mm256_loadu_si256(p);                                       \
                    __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));               \
                    __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(raw, high));              \
                    for (int r = 0; r < R; r++)                                                \
                        acc[r][j] = _mm256_fmadd_ps(hi, xo[r], _mm256_fmadd_ps(lo, xe[r], acc[r][j])); \
                }                                                                              \
            }                                                                                  \
            if (kend < k1)                                                                     \
                for (int r = 0; r < R; r++) {                                                  \
                    __m256 xb = BC(x + r * K + kend);                                          \
                    for (int j = 0; j < NV; j++) {                                             \
                        const __m256i* p = (const __m256i*)(w + (kend / 2) * BN + 8 * j);      \
                        __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(p), 16)); \
                        acc[r][j] = _mm256_fmadd_ps(lo, xb, acc[r][j]);                        \
                    }                                                                          \
                }                                                                              \
        }                                                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int j = 0; j < NV; j++)                                                       \
                sums_store(y + r * ldy + c0 + 8 * j, nvalid - c0 - 8 * j, acc[r][j]);          \
    }

/* Decoding's M (<= 8) rows of x (K apart) times one block into y (fp32, ldy apart), over K
 * in chunks of KC2: groups of 1 row on all 64 columns, or of 2-3 rows (at most FEW) on 32.
 * (16-column tiles would read one cache line of each 256-byte row of the block, a pattern
 * that fetched it from memory 2-3x slower.) */
#define AVX2_FEW_ROWS(NAME, TILE, WT, XT, FEW)                                                 \
    static void NAME(const WT* wb, const XT* x, long M, long K, float* y, long ldy, int nvalid) { \
        for (long k0 = 0; k0 < K; k0 += KC2) {                                                 \
            long k1 = K - k0 < KC2 ? K : k0 + KC2;                                             \
            int first = k0 == 0;                                                               \
            for (long m0 = 0; m0 < M;) {                                                       \
                long left = M - m0;                                                            \
                int R = left == 1 ? 1 : (left == 2 || left == 4 || FEW == 2) ? 2 : 3;          \
                const XT* xm = x + m0 * K;                                                     \
                float* ym = y + m0 * ldy;                                                      \
                if (R == 1) {                                                                  \
                    TILE(wb, xm, K, ym, ldy, k0, k1, 1, 8, 0, first, nvalid);                  \
                } else {                                                                       \
                    for (int c0 = 0; c0 < nvalid; c0 += 32) {                                  \
                        if (R == 2) TILE(wb, xm, K, ym, ldy, k0, k1, 2, 4, c0, first, nvalid); \
                        else TILE(wb, xm, K, ym, ldy, k0, k1, 3, 4, c0, first, nvalid);        \
                    }                                                                          \
                }                                                                              \
                m0 += R;                                                                       \
            }                                                                                  \
        }                                                                                      \
    }

AVX2_TILE(tile2_f32, float, float, bc_f32, 0)
AVX2_TILE(tile2_w16, uint16_t, float, bc_f32, 1)
AVX2_TILE(tile2_w16x16, uint16_t, uint16_t, bc_bf16, 1)
AVX2_FEW_ROWS(few2_f32, tile2_f32, float, float, 3)
AVX2_FEW_ROWS(few2_w16, tile2_w16, uint16_t, float, 2)
AVX2_FEW_ROWS(few2_bf16, tile2_w16x16, uint16_t, uint16_t, 2)

/* Rows [k0, k1) of a block's columns [c0, c0 + 16) as a contiguous fp32 strip (16 values a
 * row), widened from bf16 pairs or copied. */
AI void strip_chunk(const void* wb, int pairs, long k0, long k1, int c0, float* out) {
    if (!pairs) {
        const float* w = (const float*)wb + c0;
        for (long k = k0; k < k1; k++) {
            _mm256_storeu_ps(out + (k - k0) * 16, _mm256_loadu_ps(w + k * BN));
            _mm256_storeu_ps(out + (k - k0) * 16 + 8, _mm256_loadu_ps(w + k * BN + 8));
        }
        return;
    }
    const uint32_t* w = (const uint32_t*)wb + c0;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (long k = k0; k < k1; k += 2) {
        __m256i a = _mm256_loadu_si256((const __m256i*)(w + (k / 2) * BN));
        __m256i b = _mm256_loadu_si256((const __m256i*)(w + (k / 2) * BN + 8));
        float* lo = out + (k - k0) * 16;
        _mm256_storeu_si256((__m256i*)lo, _mm256_slli_epi32(a, 16));
        _mm256_storeu_si256((__m256i*)(lo + 8), _mm256_slli_epi32(b, 16));
        if (k + 1 < k1) {
            _mm256_storeu_si256((__m256i*)(lo + 16), _mm256_and_si256(a, high));
            _mm256_storeu_si256((__m256i*)(lo + 24), _mm256_and_si256(b, high));
        }
    }
}

/* Many rows (prefill) take x packed: groups of GR2 rows, k-major within a group
 * (xp[(g * K + k) * GR2 + r], zero past row M), so that a tile's broadcasts read one
 * sequential stream, not six rows K apart (4 KiB apart, they share L1 sets). */
#define PACK_ROWS(NAME, XT, TOF)                                                               \
    static void NAME(const XT* x, long M, long K, float* xp) {                                \
        long groups = (M + GR2 - 1) / GR2;                                                     \
        _Pragma("omp for schedule(static)")                                                   \
        for (long g = 0; g < groups; g++)                                                      \
            for (int r = 0; r < GR2; r++) {                                                    \
                long m = g * GR2 + r;                                                          \
                float* dst = xp + g * K * GR2 + r;                                             \
                if (m < M)                                                                     \
                    for (long k = 0; k < K; k++) dst[k * GR2] = TOF(x[m * K + k]);             \
                else                                                                           \
                    for (long k = 0; k < K; k++) dst[k * GR2] = 0.0f;                          \
            }                                                                                  \
    }
PACK_ROWS(pack_rows_f32, float, f32_id)
PACK_ROWS(pack_rows_bf16, uint16_t, bf16_to_f32)

/* R rows of packed x on one strip (kn rows of 16), continuing y's sums: one function per R,
 * with named accumulators (GCC kept an array of them on the stack here). */
#define STRIP_INIT(r)                                                                          \
    __m256 a##r##0 = _mm256_setzero_ps(), a##r##1 = _mm256_setzero_ps();                      \
    if (R > r) {                                                                               \
        a##r##0 = sums_load(y + r * ldy, nvalid, first);                                       \
        a##r##1 = sums_load(y + r * ldy + 8, nvalid - 8, first);                               \
    }
#define STRIP_STEP(r)                                                                          \
    if (R > r) {                                                                               \
        __m256 xb = _mm256_broadcast_ss(xk + r);                                               \
        a##r##0 = _mm256_fmadd_ps(w0, xb, a##r##0);                                            \
        a##r##1 = _mm256_fmadd_ps(w1, xb, a##r##1);                                            \
    }
#define STRIP_STORE(r)                                                                         \
    if (R > r) {                                                                               \
        sums_store(y + r * ldy, nvalid, a##r##0);                                              \
        sums_store(y + r * ldy + 8, nvalid - 8, a##r##1);                                      \
    }
#define STRIP_FN(RR)                                                                           \
    static void strip_##RR(const float* w, const float* xg, long kn, float* y, long ldy,       \
                           int first, int nvalid) {                                            \
        const int R = RR;                                                                      \
        STRIP_INIT(0) STRIP_INIT(1) STRIP_INIT(2) STRIP_INIT(3) STRIP_INIT(4) STRIP_INIT(5)    \
        _Pragma("GCC unroll 4")                                                               \
        for (long k = 0; k < kn; k++) {                                                        \
            __m256 w0 = _mm256_loadu_ps(w + k * 16), w1 = _mm256_loadu_ps(w + k * 16 + 8);     \
            const float* xk = xg + k * GR2;                                                    \
            STRIP_STEP(0) STRIP_STEP(1) STRIP_STEP(2) STRIP_STEP(3) STRIP_STEP(4) STRIP_STEP(5) \
        }                                                                                      \
        STRIP_STORE(0) STRIP_STORE(1) STRIP_STORE(2) STRIP_STORE(3) STRIP_STORE(4)             \
        STRIP_STORE(5)                                                                         \
    }
STRIP_FN(1)
STRIP_FN(2)
STRIP_FN(3)
STRIP_FN(4)
STRIP_FN(5)
STRIP_FN(6)
typedef void (*strip_fn)(const float*, const float*, long, float*, long, int, int);
static const strip_fn strip_fns[GR2 + 1] = {NULL,    strip_1, strip_2, strip_3,
                                            strip_4, strip_5, strip_6};

/* Packed x (M > 8 rows) times one block, into y (fp32, ldy apart): per chunk of KCG rows
 * of the block, each 16-column strip is copied (or widened from bf16 pairs: the same sums
 * as on fp32 weights) into `wbuf` (KCG * 16 floats, 128 KiB: it stays in L2 while every
 * group of rows of x streams past it). */
static void gemm_block(const void* wb, int pairs, const float* xp, long M, long K, float* y,
                       long ldy, int nvalid, float* wbuf) {
    for (long k0 = 0; k0 < K; k0 += KCG) {
        long k1 = K - k0 < KCG ? K : k0 + KCG;
        for (int c0 = 0; c0 < nvalid; c0 += 16) {
            strip_chunk(wb, pairs, k0, k1, c0, wbuf);
            for (long m0 = 0; m0 < M; m0 += GR2) {
                int R = M - m0 < GR2 ? (int)(M - m0) : GR2;
                strip_fns[R](wbuf, xp + m0 * K + k0 * GR2, k1 - k0, y + m0 * ldy + c0, ldy,
                             k0 == 0, nvalid - c0);
            }
        }
    }
}

/* y = x W^T with fp32 sums over blocked W (fp32, or bf16 pairs), the threads taking whole
 * blocks. x is fp32 (x32) or bf16 (x16); y is fp32 (y32), or bf16 (y16: each block's sums
 * go through an fp32 buffer and are rounded once, to nearest even, as torch does).
 * Returns -1 out of memory. */
static int avx2_linear(const float* x32, const uint16_t* x16, const void* W, int pairs,
                       float* y32, uint16_t* y16, long M, long N, long K, long Kp, int threads) {
    long nblk = (N + BN - 1) / BN, many = M > 8;
    size_t wsize = (size_t)(pairs ? 2 : 4) * BN * Kp;
    size_t xp_size = sizeof(float) * (size_t)(((M + GR2 - 1) / GR2) * GR2 * K);
    float* xp = many ? (float*)malloc(xp_size) : NULL;
    if (many && !xp) return -1;
    int failed = 0;
    _Pragma("omp parallel num_threads(threads)") {
        if (many) {
            if (x16) pack_rows_bf16(x16, M, K, xp);
            else pack_rows_f32(x32, M, K, xp);
        }
        float* wbuf = many ? (float*)aligned_alloc(64, sizeof(float) * KCG * 16) : NULL;
        float* part = y16 ? (float*)malloc(sizeof(float) * (size_t)(M * BN)) : NULL;
        int ok = (!many || wbuf) && (!y16 || part);
        if (!ok) {
            _Pragma("omp atomic write") failed = 1;
        }
        _Pragma("omp for schedule(static)")
        for (long b = 0; b < nblk; b++) {
            if (!ok) continue;
            int nvalid = N - b * BN < BN ? (int)(N - b * BN) : BN;
            const void* wb = (const char*)W + b * wsize;
            float* yb = y16 ? part : y32 + b * BN;
            long ldy = y16 ? BN : N;
            if (many) gemm_block(wb, pairs, xp, M, K, yb, ldy, nvalid, wbuf);
            else if (!pairs) few2_f32((const float*)wb, x32, M, K, yb, ldy, nvalid);
            else if (x16) few2_bf16((const uint16_t*)wb, x16, M, K, yb, ldy, nvalid);
            else few2_w16((const uint16_t*)wb, x32, M, K, yb, ldy, nvalid);
            if (y16)
                for (long m = 0; m < M; m++)
                    for (int j = 0; j < nvalid; j++)
                        y16[m * N + b * BN + j] = f32_to_bf16(part[m * BN + j]);
        }
        free(wbuf);
        free(part);
    }
    free(xp);
    return failed ? -1 : 0;
}
#endif

/* One block of 64 outputs for M (<= MB) rows of x; y points at the block's first output. */
AI void blocked_f32(const float* wb, const float* x, float* y, long K, long N, int nvalid,
                    const int M) {
#if defined(CL_AVX2)
    few2_f32(wb, x, M, K, y, N, nvalid);
#else
    gemm_tile_f32(wb, x, K, y, N, 0, K, M, 1, nvalid);
#endif
}

#define BLOCKED_BODY(FN, T, WT)                                                               \
    long nblk = (N + BN - 1) / BN;                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                         \
    for (long b = 0; b < nblk; b++) {                                                          \
        const WT* wb = W + b * BN * Kp;                                                        \
        int nvalid = N - b * BN < BN ? (int)(N - b * BN) : BN;                                 \
        for (long m0 = 0; m0 < M; m0 += MB) {                                                  \
            int mb = M - m0 < MB ? (int)(M - m0) : MB;                                         \
            const T* xm = x + m0 * K;                                                          \
            T* ym = y + m0 * N + b * BN;                                                       \
            if (mb == 1) FN(wb, xm, ym, K, N, nvalid, 1);                                      \
            else if (mb == 2) FN(wb, xm, ym, K, N, nvalid, 2);                                 \
            else if (mb == 3) FN(wb, xm, ym, K, N, nvalid, 3);                                 \
            else FN(wb, xm, ym, K, N, nvalid, MB);                                             \
        }                                                                                      \
    }

/* Many rows of fp32 x (prefill): per block of W, K in chunks of KC, 6 rows of x at a time. */
#define GEMM_BODY(TILE, WT)                                                                    \
    long nblk = (N + BN - 1) / BN;                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                         \
    for (long b = 0; b < nblk; b++) {                                                          \
        const WT* wb = W + b * BN * Kp;                                                        \
        int nvalid = N - b * BN < BN ? (int)(N - b * BN) : BN;                                 \
        for (long k0 = 0; k0 < K; k0 += KC) {                                                  \
            long k1 = K - k0 < KC ? K : k0 + KC;                                               \
            for (long m0 = 0; m0 < M; m0 += GR) {                                              \
                const float* xm = x + m0 * K;                                                  \
                float* ym = y + m0 * N + b * BN;                                               \
                if (M - m0 >= GR) TILE(wb, xm, K, ym, N, k0, k1, GR, k0 == 0, nvalid);         \
                else TILE(wb, xm, K, ym, N, k0, k1, (int)(M - m0), k0 == 0, nvalid);           \
            }                                                                                  \
        }                                                                                      \
    }

int codellama_linear_f32_blocked(const float* x, const float* W, float* y, long M, long N,
                                 long K, long Kp, int threads) {
#if defined(CL_AVX2)
    return avx2_linear(x, NULL, W, 0, y, NULL, M, N, K, Kp, threads);
#endif
    if (M <= 2 * MB) {
        BLOCKED_BODY(blocked_f32, float, float)
        return 0;
    }
    GEMM_BODY(gemm_tile_f32, float)
    return 0;
}

/* fp32 products on weights kept as bf16 ("w16"), in the bf16 layout below ([N/64][Kp/2][64]
 * pairs): an fp32 model whose weights come from a bf16 checkpoint (as Meta's are) keeps them
 * so, since bf16 holds each of those values exactly. That is half the memory, half the bytes
 * a decoding step reads and half the pages loading writes, for the same products: each pair
 * is widened to the two fp32 values it holds and the sums run over k in the same order as
 * gemm_tile_f32's, so the results are bit-identical to those on fp32 weights. */
AI vf w16_low(const uint32_t* p) { /* the even columns of 16 pairs, as fp32 */
    vu u;
    memcpy(&u, p, sizeof u);
    u <<= 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}

AI vf w16_high(const uint32_t* p) { /* the odd columns */
    vu u;
    memcpy(&u, p, sizeof u);
    u &= 0xffff0000u;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* gemm_tile_f32 on a w16 block (k0 even); an odd K's last column is the low half of its pair. */
AI void gemm_tile_f32w16(const uint16_t* wb, const float* x, long ldx, float* y, long ldy,
                         long k0, long k1, const int R, int first, int nvalid) {
    vf acc[GR][BN / VL];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < BN / VL; j++) acc[r][j] = (vf){0};
    const uint32_t* pairs = (const uint32_t*)wb;
    for (long k = k0; k < k1; k += 2) {
        const uint32_t* w = pairs + (k / 2) * BN;
        tile_fma(acc, w16_low(w), w16_low(w + VL), w16_low(w + 2 * VL), w16_low(w + 3 * VL), x,
                 ldx, k, R);
        if (k + 1 < k1)
            tile_fma(acc, w16_high(w), w16_high(w + VL), w16_high(w + 2 * VL),
                     w16_high(w + 3 * VL), x, ldx, k + 1, R);
    }
    tile_store(acc, y, ldy, R, first, nvalid);
}

AI void blocked_f32w16(const uint16_t* wb, const float* x, float* y, long K, long N, int nvalid,
                       const int M) {
#if defined(CL_AVX2)
    few2_w16(wb, x, M, K, y, N, nvalid);
#else
    gemm_tile_f32w16(wb, x, K, y, N, 0, K, M, 1, nvalid);
#endif
}

/* x, y fp32; W w16 (Kp = K rounded up to even). */
int codellama_linear_f32w16_blocked(const float* x, const uint16_t* W, float* y, long M, long N,
                                    long K, long Kp, int threads) {
#if defined(CL_AVX2)
    return avx2_linear(x, NULL, W, 1, y, NULL, M, N, K, Kp, threads);
#endif
    if (M <= 2 * MB) {
        BLOCKED_BODY(blocked_f32w16, float, uint16_t)
        return 0;
    }
    GEMM_BODY(gemm_tile_f32w16, uint16_t)
    return 0;
}

#if defined(__AVX512BF16__)
AI void blocked_bf16(const uint16_t* wb, const uint16_t* x, uint16_t* y, long K, long N,
                     int nvalid, const int M) {
    __m512 acc[MB][4];
    for (int m = 0; m < M; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    long pairs = (K + 1) / 2;
    for (long p = 0; p < pairs; p++) {
        const uint16_t* w = wb + p * (2 * BN);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
        __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
        for (int m = 0; m < M; m++) {
            uint32_t pair = x[m * K + 2 * p];
            if (2 * p + 1 < K) pair |= (uint32_t)x[m * K + 2 * p + 1] << 16;
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xb);
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xb);
        }
    }
    for (int m = 0; m < M; m++)
        for (int j = 0; j < 4 && 16 * j < nvalid; j++) {
            int left = nvalid - 16 * j;
            __mmask16 mask = left >= 16 ? (__mmask16)0xffffu : (__mmask16)((1u << left) - 1);
            __m256bh h = _mm512_cvtneps_pbh(acc[m][j]); /* round to nearest even */
            _mm256_mask_storeu_epi16(y + m * N + 16 * j, mask, (__m256i)h);
        }
}
#endif

/* Returns 0, -1 out of memory, or -2 where this CPU build has neither the bf16 dot product
 * nor AVX2 (the caller uses oneDNN). */
int codellama_linear_bf16_blocked(const uint16_t* x, const uint16_t* W, uint16_t* y, long M,
                                  long N, long K, long Kp, int threads) {
#if defined(__AVX512BF16__)
    BLOCKED_BODY(blocked_bf16, uint16_t, uint16_t)
    return 0;
#elif defined(CL_AVX2)
    return avx2_linear(NULL, x, W, 1, NULL, y, M, N, K, Kp, threads);
#else
    (void)x, (void)W, (void)y, (void)M, (void)N, (void)K, (void)Kp, (void)threads;
    return -2;
#endif
}

/* ------------------------------------------------------------------------------------
 * Packing: a row-major (N, K) weight (rows ld elements apart; fp32 or bf16) into the
 * blocked layout above, which codellama then keeps as the weight itself (see
 * codellama/native.py): fp32 as [N/64][K][64], bf16 as [N/64][Kp/2][64][2] with Kp = K
 * rounded up to even; padding is zero. One pass, converting on the way (bf16 -> fp32 is
 * exact; fp32 -> bf16 rounds to nearest even, as torch does), the threads writing disjoint
 * blocks: loading a checkpoint then costs what one copy costs. Unpacking is the inverse.
 */
#define PT 128 /* a tile: 64 rows x 128 units (fp32 values, or bf16 pairs), 32 KiB */
#if defined(__AVX512F__)
#define DIRECT_UNITS 16 /* units per step of pack_direct */
#else
#define DIRECT_UNITS 8
#endif

/* Transpose a tile (row j, unit u at tile[j * PT + u]) into the blocked layout: unit u of
 * row j goes to out[u * BN + j], for u < nu. */
#if defined(__AVX512F__)
/* r[i] (16 units of row i) -> r[u] (unit u of the 16 rows): unpacks and lane shuffles. */
AI void transpose16(__m512* r) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* A whole block of 64 rows, units [0, nu) with nu a multiple of 16, straight from the
 * source: 16 x 16 units at a time, converted in registers. kind: 0 fp32 from fp32, 1 fp32
 * from bf16, 2 bf16 pairs from bf16 (a pair is one 32-bit unit). out: 64-byte aligned. */
AI void pack_direct(const void* src, int kind, long ld, long n0, long nu, uint32_t* out) {
    for (int j0 = 0; j0 < BN; j0 += 16) /* 16 rows read front to back: 16 streams */
        for (long u0 = 0; u0 < nu; u0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) {
                long row = n0 + j0 + i;
                if (kind == 0) {
                    r[i] = _mm512_loadu_ps((const float*)src + row * ld + u0);
                } else if (kind == 1) {
                    __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)src + row * ld + u0));
                    r[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                } else {
                    r[i] = _mm512_loadu_ps((const float*)((const uint16_t*)src + row * ld + 2 * u0));
                }
            }
            transpose16(r);
            /* Non-temporal: written once, read by later steps, so straight to memory; 3x
             * faster here than stores that first read every line in. */
            for (int i = 0; i < 16; i++) _mm512_stream_ps((float*)out + (u0 + i) * BN + j0, r[i]);
        }
    _mm_sfence();
}
#endif

#if defined(CL_AVX2)
/* r[i] (8 units of row i) -> r[u] (unit u of the 8 rows). */
AI void transpose8(__m256* r) {
    __m256 t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < 8; i++) r[i] = t[i];
}

/* Eight units of one source row as a vector of 32-bit units (see pack_direct's kinds). */
AI __m256 load_units8(const void* src, int kind, long ld, long row, long u0) {
    if (kind == 0) return _mm256_loadu_ps((const float*)src + row * ld + u0);
    const uint16_t* s = (const uint16_t*)src + row * ld;
    if (kind == 1)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(s + u0))), 16));
    return _mm256_loadu_ps((const float*)(const void*)(s + 2 * u0));
}

/* pack_direct with 8-wide vectors: 16 rows x 8 units at a time (two 8 x 8 transposes), so
 * that each 64-byte line of the output is written whole by two streaming stores in a row. */
AI void pack_direct(const void* src, int kind, long ld, long n0, long nu, uint32_t* out) {
    for (int j0 = 0; j0 < BN; j0 += 16) /* 16 rows read front to back: 16 streams */
        for (long u0 = 0; u0 < nu; u0 += 8) {
            __m256 a[8], b[8];
            for (int i = 0; i < 8; i++) {
                a[i] = load_units8(src, kind, ld, n0 + j0 + i, u0);
                b[i] = load_units8(src, kind, ld, n0 + j0 + 8 + i, u0);
            }
            transpose8(a);
            transpose8(b);
            for (int i = 0; i < 8; i++) {
                float* o = (float*)out + (u0 + i) * BN + j0;
                _mm256_stream_ps(o, a[i]);
                _mm256_stream_ps(o + 8, b[i]);
            }
        }
    _mm_sfence();
}
#endif

/* Transpose a tile (row j, unit u at tile[j * PT + u]) into the blocked layout: unit u of
 * row j goes to out[u * BN + j], for u < nu. */
AI void store_transposed(const uint32_t* tile, uint32_t* out, int nu) {
#if defined(__AVX512F__)
    for (int u0 = 0; u0 < nu; u0 += 16)
        for (int j0 = 0; j0 < BN; j0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps((const float*)tile + (j0 + i) * PT + u0);
            transpose16(r);
            for (int i = 0; i < 16 && u0 + i < nu; i++) /* r[i]: unit u0 + i of 16 rows */
                _mm512_storeu_ps((float*)out + (u0 + i) * BN + j0, r[i]);
        }
#else
    for (int u = 0; u < nu; u++)
        for (int j = 0; j < BN; j++) out[u * BN + j] = tile[j * PT + u];
#endif
}

/* One tile of rows n0.. (of N) and units u0.. (of nu_all), converted, zero beyond the
 * weight: fp32 units (dst_bf16 == 0) or pairs of bf16 (dst_bf16 == 1). */
AI void load_tile(const void* src, int src_bf16, int dst_bf16, long ld, long N, long K, long n0,
                  long u0, int nu, uint32_t* tile) {
    for (int j = 0; j < BN; j++) {
        uint32_t* row = tile + j * PT;
        long n = n0 + j;
        if (n >= N) {
            memset(row, 0, sizeof(uint32_t) * PT);
            continue;
        }
        if (!dst_bf16) {
            float* f = (float*)row;
            if (src_bf16) {
                const uint16_t* s = (const uint16_t*)src + n * ld + u0;
                for (int u = 0; u < nu; u++) f[u] = bf16_to_f32(s[u]);
            } else {
                memcpy(f, (const float*)src + n * ld + u0, sizeof(float) * (size_t)nu);
            }
        } else {
            long k0 = 2 * u0;
            int nk = K - k0 < 2 * nu ? (int)(K - k0) : 2 * nu; /* odd K: last pair half */
            uint16_t* h = (uint16_t*)row;
            if (src_bf16) {
                memcpy(h, (const uint16_t*)src + n * ld + k0, sizeof(uint16_t) * (size_t)nk);
            } else {
                const float* s = (const float*)src + n * ld + k0;
                for (int k = 0; k < nk; k++) h[k] = f32_to_bf16(s[k]);
            }
            if (nk < 2 * nu) h[nk] = 0;
        }
        for (int u = nu; u < PT; u++) row[u] = 0;
    }
}

#if defined(__linux__)
/* madvise(advice) on the whole pages inside [p, p + bytes). */
static void advise_pages(const void* p, size_t bytes, int advice) {
    static long page;
    if (!page) page = sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096;
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(uintptr_t)(page - 1);
    uintptr_t e = ((uintptr_t)p + bytes) & ~(uintptr_t)(page - 1);
    if (e > a) madvise((void*)a, e - a, advice);
}
#endif

/* Map [p, p + bytes) in before it is written, where Linux can (5.14+): one call per range
 * instead of a page fault per 4 KiB page, which on the 2-core VM of the README's figures
 * makes writing fresh memory 1.3-1.5x faster. Elsewhere the writes fault the pages in. */
static void populate(void* p, size_t bytes) {
#if defined(__linux__)
    advise_pages(p, bytes, MADV_POPULATE_WRITE); /* failure: the writes fault them in */
#else
    (void)p, (void)bytes;
#endif
}

/* Drop the whole pages inside [p, p + bytes) of a read-only file mapping (a checkpoint's
 * tensors, once packed) from this process; touched again, they are read again from the page
 * cache. Never for anonymous memory, which this would zero. */
static void release(const void* p, size_t bytes) {
#if defined(__linux__)
    advise_pages(p, bytes, MADV_DONTNEED);
#else
    (void)p, (void)bytes;
#endif
}

/* dst = src for n values, dst fp32 (dst_f32) or bf16, src bf16 (src_bf16) or fp32; each
 * thread maps in its share of dst first and, with release, drops its share of src (a file
 * mapping) after. Returns 0, or -2 for fp32 -> bf16 (rounding: the caller uses torch). */
int codellama_fill(void* dst, int dst_f32, const void* src, int src_bf16, long n, int release_src,
                   int threads) {
    if (!dst_f32 && !src_bf16) return -2;
    long out_size = dst_f32 ? 4 : 2, in_size = src_bf16 ? 2 : 4;
    _Pragma("omp parallel num_threads(threads)") {
        long t = omp_get_thread_num(), nt = omp_get_num_threads();
        long lo = n * t / nt, hi = n * (t + 1) / nt;
        populate((char*)dst + lo * out_size, (size_t)((hi - lo) * out_size));
        if (dst_f32 && src_bf16) {
            const uint16_t* s = (const uint16_t*)src;
            uint32_t* d = (uint32_t*)dst;
            for (long i = lo; i < hi; i++) d[i] = (uint32_t)s[i] << 16;
        } else {
            memcpy((char*)dst + lo * out_size, (const char*)src + lo * in_size,
                   (size_t)((hi - lo) * in_size));
        }
        if (release_src) release((const char*)src + lo * in_size, (size_t)((hi - lo) * in_size));
    }
    return 0;
}

/* Each thread maps in the part of [p, p + bytes) it will write (a contiguous share). */
int codellama_populate(void* p, long bytes, int threads) {
    _Pragma("omp parallel num_threads(threads)") {
        long t = omp_get_thread_num(), n = omp_get_num_threads();
        long lo = bytes * t / n, hi = bytes * (t + 1) / n;
        populate((char*)p + lo, (size_t)(hi - lo));
    }
    return 0;
}

/* Rows [0, N) and columns [0, K) of src go to columns [k_off, k_off + K) of a packed
 * weight whose rows hold dst_k columns (a checkpoint shard's piece of a wider weight; k_off is
 * even for bf16, whose pairs must not straddle pieces; dst points at the piece's first
 * block). With release_src (src is a file mapping), each thread drops the source rows it
 * packed. Returns 0, or -1 if a thread's tile cannot be allocated. */
static int pack_blocked(const void* src, int src_bf16, int dst_bf16, long ld, void* dst, long N,
                        long K, long dst_k, long k_off, int release_src, int threads) {
    long nblk = (N + BN - 1) / BN;
    long units = dst_bf16 ? (K + 1) / 2 : K; /* this piece's, per row of a block's 64 */
    long stride = dst_bf16 ? (dst_k + 1) / 2 : dst_k; /* the weight's */
    long unit_off = dst_bf16 ? k_off / 2 : k_off;
    long block_bytes = (long)sizeof(uint32_t) * BN * stride;
    int failed = 0;
    _Pragma("omp parallel num_threads(threads)") {
        long t = omp_get_thread_num(), n = omp_get_num_threads();
        long b0 = nblk * t / n, b1 = nblk * (t + 1) / n; /* this thread's blocks */
        if (units == stride) /* whole rows: one range */
            populate((char*)dst + b0 * block_bytes, (size_t)((b1 - b0) * block_bytes));
        uint32_t* tile = (uint32_t*)aligned_alloc(64, sizeof(uint32_t) * BN * PT);
        if (!tile) {
            _Pragma("omp atomic write") failed = 1;
        } else {
            long released = b0 * BN; /* source rows before this are dropped */
            for (long b = b0; b < b1; b++) {
                uint32_t* out = (uint32_t*)dst + b * BN * stride + unit_off * BN;
                if (units != stride) populate(out, sizeof(uint32_t) * BN * (size_t)units);
                long done = 0;
#if defined(__AVX512F__) || defined(CL_AVX2)
                int aligned = ((uintptr_t)out & 63) == 0; /* for the streaming stores */
                if (aligned && b * BN + BN <= N && (!dst_bf16 || src_bf16)) { /* whole block */
                    int kind = dst_bf16 ? 2 : src_bf16;
                    done = (dst_bf16 ? K / 2 : K) & ~(long)(DIRECT_UNITS - 1); /* whole groups */
                    pack_direct(src, kind, ld, b * BN, done, out);
                }
#endif
                for (long u0 = done; u0 < units; u0 += PT) {
                    int nu = units - u0 < PT ? (int)(units - u0) : PT;
                    load_tile(src, src_bf16, dst_bf16, ld, N, K, b * BN, u0, nu, tile);
                    store_transposed(tile, out + u0 * BN, nu);
                }
                /* Drop the source rows packed so far every ~8 MiB, not at the end of the
                 * thread's share: a converting pack (fp32 file, bf16 model) would otherwise
                 * hold the whole source matrix besides its packed copy. (Each call costs a
                 * TLB flush on every thread: once a block made loading 15% slower.) */
                long size = src_bf16 ? 2 : 4, r1 = b * BN + BN < N ? b * BN + BN : N;
                if (release_src && r1 > released &&
                    ((r1 - released) * ld * size >= (8L << 20) || b + 1 == b1)) {
                    release((const char*)src + released * ld * size,
                            (size_t)((r1 - released) * ld * size));
                    released = r1;
                }
            }
            free(tile);
        }
    }
    return failed ? -1 : 0;
}

int codellama_pack_f32(const void* src, int src_bf16, long ld, float* dst, long N, long K,
                       long dst_k, long k_off, int release_src, int threads) {
    return pack_blocked(src, src_bf16, 0, ld, dst, N, K, dst_k, k_off, release_src, threads);
}

int codellama_pack_bf16(const void* src, int src_bf16, long ld, uint16_t* dst, long N, long K,
                        long dst_k, long k_off, int release_src, int threads) {
    return pack_blocked(src, src_bf16, 1, ld, dst, N, K, dst_k, k_off, release_src, threads);
}

/* The inverse: blocked (fp32 if bf16 == 0) back to a row-major (N, K) array. */
int codellama_unpack(const void* src, int bf16, void* dst, long N, long K, int threads) {
    long kp = bf16 ? K + (K & 1) : K;
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long n = 0; n < N; n++) {
        long b = n / BN, j = n % BN;
        for (long k = 0; k < K; k++) {
            if (bf16)
                ((uint16_t*)dst)[n * K + k] =
                    ((const uint16_t*)src)[b * BN * kp + (k >> 1) * (2 * BN) + 2 * j + (k & 1)];
            else
                ((float*)dst)[n * K + k] = ((const float*)src)[b * BN * kp + k * BN + j];
        }
    }
    return 0;
}

/* 1 when this build has the AVX-512 code paths (see native.preferred). */
int codellama_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* 1 when this build has the AVX2 code paths (a CPU with AVX2 and FMA but no AVX-512). */
int codellama_avx2(void) {
#if defined(CL_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* 1 when bf16 uses the CPU's bf16 dot-product instructions (for reports). */
int codellama_bf16_dot_product(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------
 * Whole decoder layers for decoding (M <= 8 rows of one new token each), one call per
 * step for every layer. Each op of a layer is small at batch 1, so run one by one from
 * Python (~25 torch ops and 7 kernel calls per layer) their dispatch costs 2.5-3.5 ms of a
 * 13 ms step on a 170M model; here all layers run in one OpenMP parallel region, with a
 * barrier between the phases of a layer. The arithmetic mirrors the model's torch code op
 * for op (fp32 sums, a rounding to the model's dtype wherever torch rounds), so the result
 * differs from it only in the order of additions. Model parallelism (which must reduce
 * across processes inside a layer) keeps the torch path.
 */
#include <math.h>

typedef int32_t vi __attribute__((vector_size(VL * 4)));

/* exp of 16 floats: Cephes' expf (range reduction by ln 2, degree-6 polynomial), within
 * 2 ulp of expf; NaN stays NaN, results under ~1e-38 are flushed towards 0. */
AI vf vsel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

AI vf vexp(vf x) {
    const vf hi = (vf){0} + 88.3762626647949f, lo = (vf){0} - 87.3365478515625f;
    x = vsel(x > hi, hi, x);
    vi small = x < lo;
    x = vsel(small, lo, x);
    vf t = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(t, vi);
    n += __builtin_convertvector(n, vf) > t; /* true is -1: rounds down */
    vf nf = __builtin_convertvector(n, vf);
    x = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf z = x * x;
    vf y = (vf){0} + 1.9875691500E-4f;
    y = y * x + 1.3981999507E-3f;
    y = y * x + 8.3334519073E-3f;
    y = y * x + 4.1665795894E-2f;
    y = y * x + 1.6666665459E-1f;
    y = y * x + 5.0000001201E-1f;
    y = y * z + x + 1.0f;
    vi bits = (n + 127) << 23;
    return vsel(small, (vf){0}, y * (vf)bits);
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && VL == 16
#define HAVE_REDUCE16 1
/* The sums of 16 vectors, as one vector: a transposing tree of shuffles and adds (46
 * operations where 16 horizontal sums take ~128). */
AI vf reduce16(const vf* v) {
    vf w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)
        w[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17,
                                       18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                       25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9,
                                       10, 11, 24, 25, 26, 27) +
               __builtin_shufflevector(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13,
                                       14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9,
                                       24, 25, 12, 13, 28, 29) +
               __builtin_shufflevector(x[2 * i], x[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                       26, 27, 14, 15, 30, 31);
    vf z = __builtin_shufflevector(y[0], y[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28,
                                   14, 30) +
           __builtin_shufflevector(y[0], y[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29,
                                   15, 31);
    return __builtin_shufflevector(z, z, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}
#endif
#endif

AI float sexp(float x) {
    vf v = (vf){0} + x;
    return vexp(v)[0];
}

/* Decoding attention's dot products on AVX2 (head_dim a multiple of 8): the portable code's
 * 16-wide vectors become pairs of registers there and 16 keys' sums spill to the stack;
 * these keep 8 keys' (scores) or 32 outputs' (p @ V) sums in registers. A step at 16K
 * positions ran 114 ms on the 2-core AVX2 EPYC, most of it here. */
#if defined(CL_AVX2)
#define HAVE_ATTEND2 1
AI __m256 ld8_f32(const float* p) { return _mm256_loadu_ps(p); }
AI __m256 ld8_bf16(const uint16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)(const void*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The 8 sums of v[0..7], as one vector. */
AI __m256 reduce8(const __m256* v) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

AI float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* o0..o7 += p_j * (values j, outputs i..i+63) over the jn keys of a block from base: eight
 * independent sums, so the FMAs are not waiting on each other's latency (four were). */
#define PV64(VT, base, LOAD)                                                                   \
    for (long j = 0; j < jn; j++) {                                                            \
        const VT* vj = (base) + j * D + i;                                                     \
        __m256 pj = _mm256_broadcast_ss(pr + j);                                               \
        for (int u = 0; u < 8; u++) o[u] = _mm256_fmadd_ps(pj, LOAD(vj + 8 * u), o[u]);        \
    }

/* o0..o3 += p_j * (values j, outputs i..i+31) over the jn keys of a block from base. */
#define PV32(VT, base, LOAD)                                                                   \
    for (long j = 0; j < jn; j++) {                                                            \
        const VT* vj = (base) + j * D + i;                                                     \
        __m256 pj = _mm256_broadcast_ss(pr + j);                                               \
        o0 = _mm256_fmadd_ps(pj, LOAD(vj), o0);                                                \
        o1 = _mm256_fmadd_ps(pj, LOAD(vj + 8), o1);                                            \
        o2 = _mm256_fmadd_ps(pj, LOAD(vj + 16), o2);                                           \
        o3 = _mm256_fmadd_ps(pj, LOAD(vj + 24), o3);                                           \
    }

/* s[r * len + j] = scale * q_r . key_j for the rep query heads q (fp32, rep x D) and keys
 * 0..len-1 (len x D); mx[r] = the largest of them. */
#define ATTEND2(SFX, T, LD8, CV)                                                               \
    static void scores2_##SFX(const float* q, const T* keys, long len, long D, long rep,      \
                              float scale, float* s, float* mx) {                              \
        for (long r = 0; r < rep; r++) mx[r] = -INFINITY;                                      \
        long j0 = 0;                                                                           \
        float kbuf[8 * 256]; /* bf16 keys widened once for the rep heads that read them */    \
        int widen = CV && rep > 1 && D <= 256;                                                 \
        for (; j0 + 8 <= len; j0 += 8) {                                                       \
            const T* kb = keys + j0 * D;                                                       \
            if (widen)                                                                         \
                for (long i = 0; i < 8 * D; i += 8) _mm256_storeu_ps(kbuf + i, LD8(kb + i));   \
            for (long r = 0; r < rep; r++) {                                                   \
                const float* qr = q + r * D;                                                   \
                __m256 acc[8];                                                                 \
                for (int jj = 0; jj < 8; jj++) acc[jj] = _mm256_setzero_ps();                  \
                for (long i = 0; i < D; i += 8) {                                              \
                    __m256 qv = _mm256_loadu_ps(qr + i);                                       \
                    if (widen)                                                                 \
                        for (int jj = 0; jj < 8; jj++)                                         \
                            acc[jj] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kbuf + jj * D + i), acc[jj]); \
                    else                                                                       \
                        for (int jj = 0; jj < 8; jj++)                                         \
                            acc[jj] = _mm256_fmadd_ps(qv, LD8(kb + jj * D + i), acc[jj]);      \
                }                                                                              \
                __m256 sc = _mm256_mul_ps(reduce8(acc), _mm256_set1_ps(scale));                \
                _mm256_storeu_ps(s + r * len + j0, sc);                                        \
                __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(sc), _mm256_extractf128_ps(sc, 1)); \
                m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));                                    \
                m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));                                      \
                float m1 = _mm_cvtss_f32(m4);                                                  \
                if (m1 > mx[r]) mx[r] = m1;                                                    \
            }                                                                                  \
        }                                                                                      \
        for (; j0 < len; j0++)                                                                 \
            for (long r = 0; r < rep; r++) {                                                   \
                __m256 acc = _mm256_setzero_ps();                                              \
                for (long i = 0; i < D; i += 8)                                                \
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + i), LD8(keys + j0 * D + i), acc); \
                float d = hsum8(acc) * scale;                                                  \
                s[r * len + j0] = d;                                                           \
                if (d > mx[r]) mx[r] = d;                                                      \
            }                                                                                  \
    }                                                                                          \
    /* acc[r * D + i] += sum_j p[r * len + j] * vals[j * D + i] over keys j < len, in blocks  \
     * of 64 keys that stay in L1 and 32 outputs summed in registers. */                      \
    static void values2_##SFX(const float* p, const T* vals, long len, long D, long rep,      \
                              float* acc) {                                                    \
        float vbuf[32 * 256]; /* bf16 values widened once for the rep heads that read them */ \
        int widen = CV && rep > 1 && D <= 256;                                                 \
        long step = widen ? 32 : 64;                                                           \
        for (long j0 = 0; j0 < len; j0 += step) {                                              \
            long jn = len - j0 < step ? len - j0 : step;                                       \
            const T* vb = vals + j0 * D;                                                       \
            if (widen)                                                                         \
                for (long i = 0; i < jn * D; i += 8) _mm256_storeu_ps(vbuf + i, LD8(vb + i));  \
            for (long r = 0; r < rep; r++) {                                                   \
                const float* pr = p + r * len + j0;                                            \
                float* ar = acc + r * D;                                                       \
                long i = 0;                                                                    \
                for (; i + 64 <= D; i += 64) {                                                 \
                    __m256 o[8];                                                               \
                    for (int u = 0; u < 8; u++) o[u] = _mm256_loadu_ps(ar + i + 8 * u);        \
                    if (widen)                                                                 \
                        PV64(float, vbuf, ld8_f32)                                             \
                    else                                                                       \
                        PV64(T, vb, LD8)                                                       \
                    for (int u = 0; u < 8; u++) _mm256_storeu_ps(ar + i + 8 * u, o[u]);        \
                }                                                                              \
                for (; i + 32 <= D; i += 32) {                                                 \
                    __m256 o0 = _mm256_loadu_ps(ar + i), o1 = _mm256_loadu_ps(ar + i + 8);     \
                    __m256 o2 = _mm256_loadu_ps(ar + i + 16), o3 = _mm256_loadu_ps(ar + i + 24); \
                    if (widen)                                                                 \
                        PV32(float, vbuf, ld8_f32)                                             \
                    else                                                                       \
                        PV32(T, vb, LD8)                                                       \
                    _mm256_storeu_ps(ar + i, o0);                                              \
                    _mm256_storeu_ps(ar + i + 8, o1);                                          \
                    _mm256_storeu_ps(ar + i + 16, o2);                                         \
                    _mm256_storeu_ps(ar + i + 24, o3);                                         \
                }                                                                              \
                for (; i < D; i += 8) {                                                        \
                    __m256 o = _mm256_loadu_ps(ar + i);                                        \
                    for (long j = 0; j < jn; j++)                                              \
                        o = _mm256_fmadd_ps(_mm256_broadcast_ss(pr + j),                       \
                                            widen ? _mm256_loadu_ps(vbuf + j * D + i)          \
                                                  : LD8(vb + j * D + i), o);                   \
                    _mm256_storeu_ps(ar + i, o);                                               \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }
ATTEND2(f32, float, ld8_f32, 0)
ATTEND2(bf16, uint16_t, ld8_bf16, 1)
#else
#define HAVE_ATTEND2 0 /* never called: stand-ins so that the decoding step compiles */
#define ATTEND2_STUB(SFX, T)                                                                   \
    static void scores2_##SFX(const float* q, const T* keys, long len, long D, long rep,      \
                              float scale, float* s, float* mx) {                              \
        (void)q, (void)keys, (void)len, (void)D, (void)rep, (void)scale, (void)s, (void)mx;    \
    }                                                                                          \
    static void values2_##SFX(const float* p, const T* vals, long len, long D, long rep,      \
                              float* acc) {                                                    \
        (void)p, (void)vals, (void)len, (void)D, (void)rep, (void)acc;                         \
    }
ATTEND2_STUB(f32, float)
#if defined(__AVX512BF16__) /* the only other build with a bf16 decoding step */
ATTEND2_STUB(bf16, uint16_t)
#endif
#endif

#include <pthread.h>

/* Grow-only scratch memory per thread and slot, freed when the thread exits: a decoding
 * step at a long context needs a few MB per thread, and fresh memory from malloc (mmap)
 * costs a page fault per 4 KiB on every call. */
enum { SCRATCH_STEP, SCRATCH_ATTENTION, SCRATCH_SLOTS };
typedef struct {
    void* p;
    size_t cap;
} scratch_slot;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

static void scratch_free(void* arg) {
    scratch_slot* slots = (scratch_slot*)arg;
    for (int i = 0; i < SCRATCH_SLOTS; i++) free(slots[i].p);
    free(slots);
}

static void scratch_init(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0; }

/* At least `bytes` for this thread's `slot` (valid until its next call), or NULL. */
static void* scratch(int slot, size_t bytes) {
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_key_ok) return NULL;
    scratch_slot* slots = (scratch_slot*)pthread_getspecific(scratch_key);
    if (!slots) {
        slots = (scratch_slot*)calloc(SCRATCH_SLOTS, sizeof *slots);
        if (!slots || pthread_setspecific(scratch_key, slots) != 0) {
            free(slots);
            return NULL;
        }
    }
    scratch_slot* sl = slots + slot;
    if (bytes > sl->cap) {
        free(sl->p);
        sl->p = malloc(bytes);
        sl->cap = sl->p ? bytes : 0;
    }
    return sl->p;
}

typedef struct {
    const void* w; /* weight: oneDNN blocked (kp > 0) or row-major (kp == 0) */
    long n, k, kp;
    long w16; /* fp32 steps: 1 where the weight is kept as bf16 pairs (blocked_f32w16) */
} cl_linear;

/* The outputs of unit u (a block of BN): BN, or fewer in the last. */
AI int unit_valid(const cl_linear* L, long u) {
    return L->n - u * BN < BN ? (int)(L->n - u * BN) : BN;
}

typedef struct {
    cl_linear wq, wk, wv, wo, w1, w2, w3;
    const void* attn_norm; /* (dim) in the model's dtype */
    const void* ffn_norm;
    void* cache_k; /* (cache_rows, n_kv_heads, max_seq, head_dim) in the model's dtype */
    void* cache_v;
    long n_heads, n_kv_heads, head_dim, dim, hidden, max_seq, cache_rows;
    float eps;
} cl_layer;

typedef struct {
    const void* embedding; /* (vocab, dim) in the model's dtype */
    const void* norm;      /* (dim) */
    cl_linear output;      /* (vocab, dim) */
    long vocab;
    float eps;
} cl_head;

AI long units_of(const cl_linear* L) { return (L->n + BN - 1) / BN; }

/* A decoding step shares each group of weights' units out as ranges of consecutive units,
 * one per thread: a thread takes units from the front of its own, and once done, from the
 * back of another's. Each reads its units in order, and a core that reads memory slower
 * (on the 2-vCPU EPYC one was ~10% slower, every step) no longer holds the other at the
 * barrier after every product: with the prefetch above, decoding ran 1.13-1.16x faster
 * there. A range [lo, hi) is packed in 64 bits and changed by CAS only. Two sets alternate:
 * a thread fills in its range of the next group (just before the barrier that precedes it)
 * while others may still take from the current one's; a barrier between any two groups
 * keeps the set before that out of use. */
typedef struct {
    uint64_t range;
    char pad[56]; /* a cache line each */
} cl_share;

typedef struct {
    cl_share* shares; /* 2 sets of nth */
    int tid, nth;
    long round; /* groups done */
} cl_team;

AI uint64_t pack_range(long lo, long hi) { return (uint64_t)lo | (uint64_t)hi << 32; }

/* This thread's range of the next group of weights: its static share of their units. */
static void team_plan(cl_team* c, const cl_linear* const* Ls, int nl) {
    long total = 0;
    for (int i = 0; i < nl; i++) total += units_of(Ls[i]);
    __atomic_store_n(&c->shares[(c->round % 2) * c->nth + c->tid].range,
                     pack_range(total * c->tid / c->nth, total * (c->tid + 1) / c->nth),
                     __ATOMIC_RELAXED);
}

/* The next unit for this thread in the current group: its own range's front, else the back
 * of another's (*victim remembers whose, so a thief reads on down one range); -1 when all
 * are taken. */
static long team_take(const cl_team* c, int* victim) {
    cl_share* set = c->shares + (c->round % 2) * c->nth;
    for (int tries = 0; tries < c->nth;) {
        uint64_t* r = &set[*victim].range;
        uint64_t v = __atomic_load_n(r, __ATOMIC_RELAXED);
        long lo = (long)(v & 0xffffffffu), hi = (long)(v >> 32);
        if (lo >= hi) {
            *victim = (*victim + 1) % c->nth;
            tries++;
            continue;
        }
        int own = *victim == c->tid;
        uint64_t want = own ? pack_range(lo + 1, hi) : pack_range(lo, hi - 1);
        if (__atomic_compare_exchange_n(r, &v, want, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return own ? lo : hi - 1;
    }
    return -1;
}

/* Greedy decoding's pick on a row of fp32 logits: the index of the first maximum (of the
 * first NaN if there is one, as torch.argmax) and whether every value is finite. */
static void argmax_row(const float* row, long V, long* index, int* finite) {
    vf mx = (vf){0} - INFINITY, bad = (vf){0};
    long j = 0;
    for (; j + VL <= V; j += VL) { /* max, and x * 0 (NaN for inf or NaN) summed */
        vf v = load_f32(row + j);
        mx = vsel(v > mx, v, mx);
        bad += v * 0.0f;
    }
    float best = -INFINITY, check = hsum(bad);
    for (int l = 0; l < VL; l++)
        if (mx[l] > best) best = mx[l];
    for (; j < V; j++) {
        if (row[j] > best) best = row[j];
        check += row[j] * 0.0f;
    }
    long at = 0;
    if (check == 0.0f) { /* all finite: the first maximum */
        while (at < V - 1 && row[at] != best) at++;
    } else { /* torch.argmax's choice: the first NaN, else the first maximum */
        long nan_at = -1;
        for (long i = 0; i < V && nan_at < 0; i++)
            if (row[i] != row[i]) nan_at = i;
        for (long i = 0; i < V; i++)
            if (row[i] > row[at]) at = i;
        if (nan_at >= 0) at = nan_at;
    }
    *index = at;
    *finite = check == 0.0f;
}

/* A running greedy pick over parts of a row of logits (argmax_row's choice over them all,
 * whatever the order of the parts): the value and index of the best so far, whether it is
 * a NaN, and whether every value seen is finite. */
typedef struct {
    float v;
    long at;
    int nan, finite;
} cl_best;

static const cl_best best_none = {-INFINITY, LONG_MAX, 0, 1};

/* Take value v at index at (a part's argmax_row pick; finite: the part's flag) into *b. */
AI void best_merge(cl_best* b, float v, long at, int finite) {
    int nan = v != v;
    b->finite &= finite;
    if (nan ? !b->nan || at < b->at : !b->nan && (v > b->v || (v == b->v && at < b->at))) {
        b->v = v;
        b->at = at;
        b->nan = nan;
    }
}

/* out[m * BN + j] = sum_k W[n0 + j, k] x[m, k] for the 64 output rows of unit u, m < M. */
#define UNIT_FN(NAME, T, OT, BLOCKED, ROW, BLOCK, TOF_OUT)                                    \
    static void NAME(const cl_linear* L, const T* x, long M, long u, OT* out) {               \
        const T* W = (const T*)L->w;                                                           \
        long K = L->k, n0 = u * BN;                                                            \
        int nvalid = unit_valid(L, u);                                                         \
        if (L->kp) {                                                                           \
            const T* wb = W + n0 * L->kp;                                                      \
            for (long m0 = 0; m0 < M; m0 += MB) {                                              \
                int mb = M - m0 < MB ? (int)(M - m0) : MB;                                     \
                const T* xm = x + m0 * K;                                                      \
                OT* om = out + m0 * BN;                                                        \
                if (mb == 1) BLOCKED(wb, xm, om, K, BN, nvalid, 1);                            \
                else if (mb == 2) BLOCKED(wb, xm, om, K, BN, nvalid, 2);                       \
                else if (mb == 3) BLOCKED(wb, xm, om, K, BN, nvalid, 3);                       \
                else BLOCKED(wb, xm, om, K, BN, nvalid, MB);                                   \
            }                                                                                  \
        } else if (M <= 2) {                                                                   \
            for (int r = 0; r < nvalid; r++) {                                                 \
                float t[2];                                                                    \
                if (M == 1) ROW(W + (n0 + r) * K, x, t, K, 1, U);                              \
                else ROW(W + (n0 + r) * K, x, t, K, 2, 2);                                     \
                for (long m = 0; m < M; m++) out[m * BN + r] = TOF_OUT(t[m]);                  \
            }                                                                                  \
        } else {                                                                               \
            for (int r0 = 0; r0 < nvalid; r0 += ROWS) {                                        \
                int R = nvalid - r0 < ROWS ? nvalid - r0 : ROWS;                               \
                for (long m0 = 0; m0 < M; m0 += MB) {                                          \
                    int mb = M - m0 < MB ? (int)(M - m0) : MB;                                 \
                    float t[MB * ROWS];                                                        \
                    const T* wr = W + (n0 + r0) * K;                                           \
                    if (R == ROWS && mb == MB) BLOCK(wr, x + m0 * K, t, K, ROWS, MB);          \
                    else BLOCK(wr, x + m0 * K, t, K, R, mb);                                   \
                    for (int m = 0; m < mb; m++)                                               \
                        for (int r = 0; r < R; r++)                                            \
                            out[(m0 + m) * BN + r0 + r] = TOF_OUT(t[m * ROWS + r]);            \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

UNIT_FN(unit_f32, float, float, blocked_f32, row_f32, block_f32, f32_id)

/* unit_f32 for a weight kept as bf16 pairs (always blocked). */
static void unit_f32w16(const cl_linear* L, const float* x, long M, long u, float* out) {
    const uint16_t* wb = (const uint16_t*)L->w + u * BN * L->kp;
    long K = L->k;
    int nvalid = unit_valid(L, u);
    for (long m0 = 0; m0 < M; m0 += MB) {
        int mb = M - m0 < MB ? (int)(M - m0) : MB;
        const float* xm = x + m0 * K;
        float* om = out + m0 * BN;
        if (mb == 1) blocked_f32w16(wb, xm, om, K, BN, nvalid, 1);
        else if (mb == 2) blocked_f32w16(wb, xm, om, K, BN, nvalid, 2);
        else if (mb == 3) blocked_f32w16(wb, xm, om, K, BN, nvalid, 3);
        else blocked_f32w16(wb, xm, om, K, BN, nvalid, MB);
    }
}

static void unit_f32_any(const cl_linear* L, const float* x, long M, long u, float* out) {
    if (L->w16) unit_f32w16(L, x, M, u, out);
    else unit_f32(L, x, M, u, out);
}
#if defined(__AVX512BF16__)
UNIT_FN(unit_bf16, uint16_t, uint16_t, blocked_bf16, row_bf16_dp, block_bf16_dp, f32_to_bf16)
#elif defined(CL_AVX2)
/* The AVX2 tile on bf16 x and pairs (blocked weights only: see NativeLinear.decoder). */
static void unit_bf16(const cl_linear* L, const uint16_t* x, long M, long u, uint16_t* out) {
    float part[8 * BN];
    long n0 = u * BN;
    int nvalid = unit_valid(L, u);
    few2_bf16((const uint16_t*)L->w + n0 * L->kp, x, M, L->k, part, BN, nvalid);
    for (long m = 0; m < M; m++)
        for (int j = 0; j < nvalid; j++) out[m * BN + j] = f32_to_bf16(part[m * BN + j]);
}
#endif

/* Two units of one row of x, of linears with that one input (the next two a thread takes,
 * or w1's and w3's of one). On AVX2 their blocks are read together, KCH rows of k from each
 * in turn: a thread reading two streams at once got ~15% more memory bandwidth than reading
 * them one after the other (2-core AVX2 EPYC, C microbenchmark), and decoding one row ran
 * 13% faster (bf16 `small`; 3 units at a time ran alike, 4 slower). Each unit's sums are its
 * own, in the same order over k (partial sums kept in fp32), so the results are those of one
 * unit at a time, as other CPUs and several rows run. */
#define MAX_UNITS 2
#if defined(CL_AVX2)
#define KCH 8 /* rows of k from each block in turn (1-2 KiB; 16 ran alike, 4 slower) */
#define AVX2_UNITS(NAME, TILE, WT, XT)                                                         \
    static void NAME(const WT* const* ws, const XT* x, long K, float* const* ys,               \
                     const int* nvalid, int S) {                                               \
        for (long k0 = 0; k0 < K; k0 += KCH) {                                                 \
            long k1 = K - k0 < KCH ? K : k0 + KCH;                                             \
            for (int s = 0; s < S; s++)                                                        \
                TILE(ws[s], x, K, ys[s], BN, k0, k1, 1, 8, 0, k0 == 0, nvalid[s]);             \
        }                                                                                      \
    }
AVX2_UNITS(streams2_f32, tile2_f32, float, float)
AVX2_UNITS(streams2_w16, tile2_w16, uint16_t, float)
AVX2_UNITS(streams2_bf16, tile2_w16x16, uint16_t, uint16_t)
#endif

/* outs[s][m * BN + j] = unit us[s] of Ls[s] for S (<= MAX_UNITS) units, as unit_f32_any. */
static void units_f32(const cl_linear* const* Ls, const long* us, int S, const float* x, long M,
                      float* const* outs) {
#if defined(CL_AVX2)
    int together = M == 1;
    for (int s = 0; s < S; s++) together = together && Ls[s]->kp && Ls[s]->w16 == Ls[0]->w16;
    if (together) {
        const uint16_t* w16[MAX_UNITS];
        const float* w32[MAX_UNITS];
        int nvalid[MAX_UNITS];
        for (int s = 0; s < S; s++) {
            w16[s] = (const uint16_t*)Ls[s]->w + us[s] * BN * Ls[s]->kp;
            w32[s] = (const float*)Ls[s]->w + us[s] * BN * Ls[s]->kp;
            nvalid[s] = unit_valid(Ls[s], us[s]);
        }
        if (Ls[0]->w16) streams2_w16(w16, x, Ls[0]->k, outs, nvalid, S);
        else streams2_f32(w32, x, Ls[0]->k, outs, nvalid, S);
        return;
    }
#endif
    for (int s = 0; s < S; s++) unit_f32_any(Ls[s], x, M, us[s], outs[s]);
}
#if defined(__AVX512BF16__) || defined(CL_AVX2)
static void units_bf16(const cl_linear* const* Ls, const long* us, int S, const uint16_t* x,
                       long M, uint16_t* const* outs) {
#if defined(CL_AVX2) && !defined(__AVX512BF16__)
    if (M == 1) { /* (bf16 decoders keep every weight blocked) */
        float part[MAX_UNITS][BN];
        float* ys[MAX_UNITS];
        const uint16_t* ws[MAX_UNITS];
        int nvalid[MAX_UNITS];
        for (int s = 0; s < S; s++) {
            ws[s] = (const uint16_t*)Ls[s]->w + us[s] * BN * Ls[s]->kp;
            ys[s] = part[s];
            nvalid[s] = unit_valid(Ls[s], us[s]);
        }
        streams2_bf16(ws, x, Ls[0]->k, ys, nvalid, S);
        for (int s = 0; s < S; s++)
            for (int j = 0; j < nvalid[s]; j++) outs[s][j] = f32_to_bf16(part[s][j]);
        return;
    }
#endif
    for (int s = 0; s < S; s++) unit_bf16(Ls[s], x, M, us[s], outs[s]);
}
#endif

/* Scores of whole blocks of 16 keys (head_dim a multiple of 16), reduced together;
 * sets j_vec to the first key left for the one-by-one loop. */
#if defined(HAVE_REDUCE16)
#define SCORES16(T, LOADV)                                                                    \
    if (D % VL == 0) {                                                                         \
        for (long r = 0; r < rep; r++) {                                                       \
            const float* qr = qf + r * D;                                                      \
            vf mxv = (vf){0} - INFINITY;                                                       \
            long j0 = 0;                                                                       \
            for (; j0 + VL <= len; j0 += VL) {                                                 \
                vf part[VL];                                                                   \
                for (int jj = 0; jj < VL; jj++) {                                              \
                    const T* kj = keys + (j0 + jj) * D;                                        \
                    vf dv = load_f32(qr) * LOADV(kj);                                          \
                    for (long i = VL; i < D; i += VL) dv += load_f32(qr + i) * LOADV(kj + i);  \
                    part[jj] = dv;                                                             \
                }                                                                              \
                vf sc = reduce16(part) * scale;                                                \
                memcpy(s + r * len + j0, &sc, sizeof sc);                                      \
                mxv = vsel(sc > mxv, sc, mxv);                                                 \
            }                                                                                  \
            for (int l = 0; l < VL; l++)                                                       \
                if (mxv[l] > mx[r]) mx[r] = mxv[l];                                            \
            j_vec = j0;                                                                        \
        }                                                                                      \
    }
#else
#define SCORES16(T, LOADV)
#endif

/* The phases of a layer, for T = float (TOF/FROMF identity) or bf16 (RNE rounding). */
#define DECODE_FNS(SFX, T, TOF, FROMF, LOADV, UNITS)                                           \
    /* dst[m, :] = round(round(x[m, :] * rsqrt(mean(x[m, :]^2) + eps)) * w), torch's op. */    \
    AI void rmsnorm_##SFX(const T* x, const T* w, T* dst, long dim, float eps) {              \
        vf acc = (vf){0};                                                                      \
        long i = 0;                                                                            \
        for (; i + VL <= dim; i += VL) {                                                       \
            vf v = LOADV(x + i);                                                               \
            acc += v * v;                                                                      \
        }                                                                                      \
        float ss = hsum(acc);                                                                  \
        for (; i < dim; i++) ss += TOF(x[i]) * TOF(x[i]);                                      \
        float r = 1.0f / sqrtf(ss / (float)dim + eps);                                         \
        for (i = 0; i < dim; i++) dst[i] = FROMF(TOF(FROMF(TOF(x[i]) * r)) * TOF(w[i]));       \
    }                                                                                          \
    /* Units of several linears with one input, as team_take hands them out. mode 0:           \
     * store to outs[i] (M, n); 1: outs[i] += product (the residual add, rounded once       \
     * more as torch's add is); 2 (w1, w3 pairs): outs[0] = silu(w1 x) * (w3 x); 3: fout       \
     * (M, n) = the product rounded to T, in fp32 (logits, as torch's .float()), each row's    \
     * greedy pick so far kept in best (M). */                                                 \
    static void linears_##SFX(cl_team* team, const cl_linear* const* Ls, const T* x, long M,   \
                              T* const* outs, int mode, T* tmp, float* fout, cl_best* best) {  \
        int victim = team->tid;                                                                \
        for (long g; (g = team_take(team, &victim)) >= 0;) {                                   \
            /* one row of x: two blocks read together (two units, or w1 and w3) */             \
            int want = M == 1 && mode != 2 ? MAX_UNITS : 1, taken = 1, S = 0;                  \
            long us[MAX_UNITS] = {g}, su[MAX_UNITS], stride = M == 1 ? BN : MAX_M * BN;        \
            int is[MAX_UNITS] = {0};                                                           \
            while (taken < want && (us[taken] = team_take(team, &victim)) >= 0) taken++;       \
            const cl_linear* sL[MAX_UNITS];                                                    \
            T* buf[MAX_UNITS];                                                                 \
            for (int t = 0; t < taken; t++) {                                                  \
                while (us[t] >= units_of(Ls[is[t]])) us[t] -= units_of(Ls[is[t]++]);           \
                for (int h = 0; h < (mode == 2 ? 2 : 1); h++, S++) {                           \
                    sL[S] = Ls[is[t] + h];                                                     \
                    su[S] = us[t];                                                             \
                    buf[S] = tmp + S * stride;                                                 \
                }                                                                              \
            }                                                                                  \
            UNITS(sL, su, S, x, M, buf);                                                       \
            for (int t = 0; t < taken; t++) {                                                  \
                int i = is[t];                                                                 \
                long n = Ls[i]->n, n0 = us[t] * BN;                                            \
                int nvalid = unit_valid(Ls[i], us[t]);                                         \
                const T* res = buf[mode == 2 ? 2 * t : t];                                     \
                if (mode == 2) {                                                               \
                    const T* up = buf[2 * t + 1];                                              \
                    for (long m = 0; m < M; m++)                                               \
                        for (int j0 = 0; j0 < nvalid; j0 += VL) {                              \
                            float sl[VL];                                                      \
                            int c = nvalid - j0 < VL ? nvalid - j0 : VL;                       \
                            for (int l = 0; l < VL; l++)                                       \
                                sl[l] = l < c ? TOF(res[m * BN + j0 + l]) : 0.0f;              \
                            vf a = load_f32(sl);                                               \
                            a = a / (1.0f + vexp(-a));                                         \
                            memcpy(sl, &a, sizeof sl);                                         \
                            for (int l = 0; l < c; l++)                                        \
                                outs[0][m * n + n0 + j0 + l] =                                 \
                                    FROMF(TOF(FROMF(sl[l])) * TOF(up[m * BN + j0 + l]));       \
                        }                                                                      \
                } else if (mode == 3) {                                                        \
                    for (long m = 0; m < M; m++) {                                             \
                        float* row = fout + m * n + n0;                                        \
                        for (int j = 0; j < nvalid; j++) row[j] = TOF(res[m * BN + j]);        \
                        long at;                                                               \
                        int finite;                                                            \
                        argmax_row(row, nvalid, &at, &finite); /* while the unit is in L1 */   \
                        best_merge(best + m, row[at], n0 + at, finite);                        \
                    }                                                                          \
                } else {                                                                       \
                    T* o = outs[i];                                                            \
                    for (long m = 0; m < M; m++)                                               \
                        for (int j = 0; j < nvalid; j++)                                       \
                            o[m * n + n0 + j] = mode == 1                                      \
                                ? FROMF(TOF(o[m * n + n0 + j]) + TOF(res[m * BN + j]))         \
                                : res[m * BN + j];                                             \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        team->round++; /* no barrier: the caller plans the next group, then waits */           \
    }                                                                                          \
    /* Rotary embedding of q (in place) and k (into the cache), v into the cache. */           \
    static void rope_store_##SFX(const cl_layer* L, T* q, const T* k, const T* v, long M,      \
                                 long row0, const long* pos, const float* rope) {              \
        long D = L->head_dim, hq = L->n_heads, hk = L->n_kv_heads;                             \
        _Pragma("omp for schedule(static)")                                                    \
        for (long t = 0; t < M * (hq + hk); t++) {                                             \
            long m = t / (hq + hk), h = t % (hq + hk), p = pos[m];                             \
            const float* rot = rope + p * D;                                                   \
            const T* src = h < hq ? q + (m * hq + h) * D : k + (m * hk + h - hq) * D;          \
            T* dst = h < hq ? q + (m * hq + h) * D                                             \
                            : (T*)L->cache_k + (((row0 + m) * hk + h - hq) * L->max_seq + p) * D; \
            for (long i = 0; i < D / 2; i++) {                                                 \
                float x0 = TOF(src[2 * i]), x1 = TOF(src[2 * i + 1]);                          \
                float c = rot[2 * i], s = rot[2 * i + 1];                                      \
                dst[2 * i] = FROMF(x0 * c - x1 * s);                                           \
                dst[2 * i + 1] = FROMF(x0 * s + x1 * c);                                       \
            }                                                                                  \
            if (h >= hq)                                                                       \
                memcpy((T*)L->cache_v + (((row0 + m) * hk + h - hq) * L->max_seq + p) * D,    \
                       v + (m * hk + h - hq) * D, sizeof(T) * D);                              \
        }                                                                                      \
    }                                                                                          \
    /* Attention of each row's query to cache positions 0..min(pos, kv_len - 1); the        \
     * n_heads / n_kv_heads query heads of a group read its keys and values once. */         \
    static int attention_##SFX(const cl_layer* L, const T* q, T* out, long M, long row0,      \
                               const long* pos, long kv_len) {                                 \
        long D = L->head_dim, hq = L->n_heads, hk = L->n_kv_heads, rep = hq / hk;              \
        float scale = 1.0f / sqrtf((float)D);                                                  \
        int failed = 0;                                                                        \
        _Pragma("omp for schedule(dynamic, 1) nowait") /* the caller's barrier follows */      \
        for (long t = 0; t < M * hk; t++) {                                                    \
            long m = t / hk, g = t % hk;                                                       \
            long len = pos[m] + 1 < kv_len ? pos[m] + 1 : kv_len;                              \
            const T* keys = (const T*)L->cache_k + ((row0 + m) * hk + g) * L->max_seq * D;     \
            const T* vals = (const T*)L->cache_v + ((row0 + m) * hk + g) * L->max_seq * D;     \
            float* s = (float*)scratch(SCRATCH_ATTENTION, sizeof(float) * (size_t)(rep * (len + 2 * D))); \
            if (!s) {                                                                          \
                failed = 1;                                                                    \
                continue;                                                                      \
            }                                                                                  \
            float* qf = s + rep * len;                                                         \
            float* acc = qf + rep * D;                                                         \
            for (long r = 0; r < rep; r++)                                                     \
                for (long i = 0; i < D; i++) qf[r * D + i] = TOF(q[(m * hq + g * rep + r) * D + i]); \
            float mx[64], sum[64];                                                             \
            int fast = HAVE_ATTEND2 && D % 8 == 0;                                             \
            if (fast) {                                                                        \
                scores2_##SFX(qf, keys, len, D, rep, scale, s, mx);                            \
            } else {                                                                           \
                for (long r = 0; r < rep; r++) mx[r] = -INFINITY;                              \
                long j_vec = 0;                                                                \
                SCORES16(T, LOADV)                                                             \
                for (long j = j_vec; j < len; j++) {                                           \
                    const T* kj = keys + j * D;                                                \
                    for (long r = 0; r < rep; r++) {                                           \
                        const float* qr = qf + r * D;                                          \
                        vf dv = (vf){0};                                                       \
                        long i = 0;                                                            \
                        for (; i + VL <= D; i += VL) dv += load_f32(qr + i) * LOADV(kj + i);   \
                        float d = hsum(dv);                                                    \
                        for (; i < D; i++) d += qr[i] * TOF(kj[i]);                            \
                        d *= scale;                                                            \
                        s[r * len + j] = d;                                                    \
                        if (d > mx[r]) mx[r] = d;                                              \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            for (long r = 0; r < rep; r++) {                                                   \
                float* sr = s + r * len;                                                       \
                vf sv = (vf){0};                                                               \
                long j = 0;                                                                    \
                for (; j + VL <= len; j += VL) {                                               \
                    vf e = vexp(load_f32(sr + j) - mx[r]);                                     \
                    memcpy(sr + j, &e, sizeof e);                                              \
                    sv += e;                                                                   \
                }                                                                              \
                sum[r] = hsum(sv);                                                             \
                for (; j < len; j++) {                                                         \
                    sr[j] = sexp(sr[j] - mx[r]);                                               \
                    sum[r] += sr[j];                                                           \
                }                                                                              \
            }                                                                                  \
            for (long i = 0; i < rep * D; i++) acc[i] = 0.0f;                                  \
            /* p @ V in blocks of keys that stay in L1, four vectors of a head's output        \
             * accumulated in registers (four independent sums) over each block. */            \
            if (fast)                                                                          \
                values2_##SFX(s, vals, len, D, rep, acc);                                      \
            else {                                                                             \
                for (long j0 = 0; j0 < len; j0 += 64) {                                        \
                    long jn = len - j0 < 64 ? len - j0 : 64;                                   \
                    const T* vb = vals + j0 * D;                                               \
                    for (long r = 0; r < rep; r++) {                                           \
                        const float* pr = s + r * len + j0;                                    \
                        float* ar = acc + r * D;                                               \
                        long i = 0;                                                            \
                        for (; i + 4 * VL <= D; i += 4 * VL) {                                 \
                            vf o0 = load_f32(ar + i), o1 = load_f32(ar + i + VL);              \
                            vf o2 = load_f32(ar + i + 2 * VL), o3 = load_f32(ar + i + 3 * VL); \
                            for (long j = 0; j < jn; j++) {                                    \
                                const T* vj = vb + j * D + i;                                  \
                                float p = pr[j];                                               \
                                o0 += p * LOADV(vj);                                           \
                                o1 += p * LOADV(vj + VL);                                      \
                                o2 += p * LOADV(vj + 2 * VL);                                  \
                                o3 += p * LOADV(vj + 3 * VL);                                  \
                            }                                                                  \
                            memcpy(ar + i, &o0, sizeof o0);                                    \
                            memcpy(ar + i + VL, &o1, sizeof o1);                               \
                            memcpy(ar + i + 2 * VL, &o2, sizeof o2);                           \
                            memcpy(ar + i + 3 * VL, &o3, sizeof o3);                           \
                        }                                                                      \
                        for (; i + VL <= D; i += VL) {                                         \
                            vf o = load_f32(ar + i);                                           \
                            for (long j = 0; j < jn; j++) o += pr[j] * LOADV(vb + j * D + i);  \
                            memcpy(ar + i, &o, sizeof o);                                      \
                        }                                                                      \
                        for (; i < D; i++)                                                     \
                            for (long j = 0; j < jn; j++) ar[i] += pr[j] * TOF(vb[j * D + i]); \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            for (long r = 0; r < rep; r++)                                                     \
                for (long i = 0; i < D; i++)                                                   \
                    out[(m * hq + g * rep + r) * D + i] = FROMF(acc[r * D + i] / sum[r]);      \
        }                                                                                      \
        return failed;                                                                         \
    }                                                                                          \
    /* One decoding step: logits (M, vocab) in fp32 of tokens (M) at positions pos (M)         \
     * through the embedding, n_layers layers, the final norm and the output layer, and        \
     * greedy decoding's pick of each row (argmax_row's) into picks and finite (M each), taken \
     * by each thread over the output units it computed, while they are in L1, then merged.    \
     * Norms are computed by every thread for itself: no barrier waits on one thread's norm.   \
     * Returns 0, -1 out of memory, -3 a position outside the cache, -4 an unsupported shape,  \
     * -5 a token outside the vocabulary. */                                                   \
    int codellama_decode_step_##SFX(const cl_layer* layers, int n_layers, const cl_head* head, \
                                    const long* tokens, long M, long row0, const long* pos,    \
                                    long kv_len, const float* rope, float* logits,             \
                                    long* picks, int* finite, int threads) {                   \
        if (n_layers < 1 || M < 1 || M > MAX_M) return -4;                                    \
        const cl_layer* L0 = layers;                                                           \
        long dim = L0->dim, D = L0->head_dim, hq = L0->n_heads, hk = L0->n_kv_heads;           \
        if (hk < 1 || hq % hk || hq / hk > 64 || D % 2 || row0 < 0 || row0 + M > L0->cache_rows) \
            return -4;                                                                         \
        for (long m = 0; m < M; m++) {                                                         \
            if (pos[m] < 0 || pos[m] >= L0->max_seq) return -3;                                \
            if (tokens[m] < 0 || tokens[m] >= head->vocab) return -5;                          \
        }                                                                                      \
        long widest = L0->hidden > hq * D ? L0->hidden : hq * D;                               \
        /* h, then each thread's normed copy of it (no barrier waits for one thread's norm) */ \
        size_t n_t = (size_t)(M * (dim + 3 * hq * D + 2 * hk * D + widest + threads * dim));   \
        T* buf = (T*)scratch(SCRATCH_STEP, sizeof(T) * n_t);                                   \
        if (!buf) return -1;                                                                   \
        T *h = buf, *q = h + M * dim, *k = q + M * hq * D;                                     \
        T *v = k + M * hk * D, *att = v + M * hk * D, *a = att + M * hq * D, *xns = a + M * widest; \
        for (long m = 0; m < M; m++)                                                           \
            memcpy(h + m * dim, (const T*)head->embedding + tokens[m] * dim, sizeof(T) * dim); \
        int failed = 0;                                                                        \
        size_t n_share = sizeof(cl_share) * 2 * (size_t)threads;                               \
        cl_share* shares = (cl_share*)aligned_alloc(64, n_share + sizeof(cl_best) * MAX_M * threads); \
        if (!shares) return -1;                                                                \
        cl_best* bests = (cl_best*)(void*)((char*)shares + n_share); /* MAX_M a thread */      \
        _Pragma("omp parallel num_threads(threads)")                                           \
        {                                                                                      \
            T tmp[2 * MAX_M * BN];                                                             \
            T* h_out[1] = {h};                                                                 \
            /* Each group's ranges are set up just before the barrier that precedes it. */     \
            cl_team team = {shares, omp_get_thread_num(), omp_get_num_threads(), 0};           \
            T* xn = xns + team.tid * M * dim;                                                  \
            const cl_linear* first[3] = {&layers->wq, &layers->wk, &layers->wv};               \
            const cl_linear* out[1] = {&head->output};                                         \
            team_plan(&team, first, 3);                                                        \
            _Pragma("omp barrier")                                                             \
            for (int l = 0; l < n_layers; l++) {                                               \
                const cl_layer* L = layers + l;                                                \
                const cl_linear* qkv[3] = {&L->wq, &L->wk, &L->wv};                            \
                const cl_linear* wo[1] = {&L->wo};                                             \
                const cl_linear* w13[2] = {&L->w1, &L->w3}; /* a group of w1's units */        \
                const cl_linear* w2[1] = {&L->w2};                                             \
                for (long m = 0; m < M; m++)                                                   \
                    rmsnorm_##SFX(h + m * dim, (const T*)L->attn_norm, xn + m * dim, dim, L->eps); \
                T* qkv_out[3] = {q, k, v};                                                     \
                linears_##SFX(&team, qkv, xn, M, qkv_out, 0, tmp, NULL, NULL);                 \
                _Pragma("omp barrier")                                                         \
                rope_store_##SFX(L, q, k, v, M, row0, pos, rope);                              \
                if (attention_##SFX(L, q, att, M, row0, pos, kv_len)) {                        \
                    _Pragma("omp atomic write")                                                \
                    failed = 1;                                                                \
                }                                                                              \
                team_plan(&team, wo, 1);                                                       \
                _Pragma("omp barrier")                                                         \
                linears_##SFX(&team, wo, att, M, h_out, 1, tmp, NULL, NULL);                   \
                team_plan(&team, w13, 1);                                                      \
                _Pragma("omp barrier")                                                         \
                for (long m = 0; m < M; m++)                                                   \
                    rmsnorm_##SFX(h + m * dim, (const T*)L->ffn_norm, xn + m * dim, dim, L->eps); \
                T* g_out[1] = {a};                                                             \
                linears_##SFX(&team, w13, xn, M, g_out, 2, tmp, NULL, NULL);                   \
                team_plan(&team, w2, 1);                                                       \
                _Pragma("omp barrier")                                                         \
                linears_##SFX(&team, w2, a, M, h_out, 1, tmp, NULL, NULL);                     \
                if (l + 1 < n_layers) {                                                        \
                    const cl_linear* next[3] = {&L[1].wq, &L[1].wk, &L[1].wv};                 \
                    team_plan(&team, next, 3);                                                 \
                } else {                                                                       \
                    team_plan(&team, out, 1);                                                  \
                }                                                                              \
                _Pragma("omp barrier")                                                         \
            }                                                                                  \
            for (long m = 0; m < M; m++)                                                       \
                rmsnorm_##SFX(h + m * dim, (const T*)head->norm, xn + m * dim, dim, head->eps); \
            cl_best* best = bests + team.tid * MAX_M;                                          \
            for (long m = 0; m < M; m++) best[m] = best_none;                                  \
            linears_##SFX(&team, out, xn, M, NULL, 3, tmp, logits, best);                      \
            _Pragma("omp barrier")                                                             \
            _Pragma("omp master")                                                              \
            for (long m = 0; m < M; m++) { /* each thread's pick over the units it took */     \
                cl_best b = best_none;                                                         \
                for (int t = 0; t < team.nth; t++) { /* one that took none adds nothing */     \
                    const cl_best* c = bests + t * MAX_M + m;                                  \
                    best_merge(&b, c->v, c->at, c->finite);                                    \
                }                                                                              \
                picks[m] = b.at == LONG_MAX ? 0 : b.at;                                        \
                finite[m] = b.finite;                                                          \
            }                                                                                  \
        }                                                                                      \
        free(shares);                                                                          \
        return failed ? -1 : 0;                                                                \
    }

#define MAX_M 8

DECODE_FNS(f32, float, f32_id, f32_id, load_f32, units_f32)
#if defined(__AVX512BF16__) || defined(CL_AVX2)
DECODE_FNS(bf16, uint16_t, bf16_to_f32, f32_to_bf16, load_bf16, units_bf16)
#else
int codellama_decode_step_bf16(const cl_layer* layers, int n_layers, const cl_head* head,
                               const long* tokens, long M, long row0, const long* pos,
                               long kv_len, const float* rope, float* logits, long* picks,
                               int* finite, int threads) {
    (void)layers, (void)n_layers, (void)head, (void)tokens, (void)M, (void)row0, (void)pos;
    (void)kv_len, (void)rope, (void)logits, (void)picks, (void)finite, (void)threads;
    return -2; /* bf16 steps need the bf16 dot product; the model keeps the torch path */
}
#endif

/* ------------------------------------------------------------------------------------
 * Prefill attention (AVX2): causal, every row of the batch at positions start .. start+T-1,
 * over the KV cache (keys 0 .. start+T-1, already stored). Flash attention's order: a work
 * item is one (batch row, KV head, block of positions) with the query heads that share the
 * KV head stacked as rows (no repeated K/V); it passes over blocks of AK keys with a running
 * max and sum per row. Scores and p @ V are 6-row x 16-column register tiles over fp32
 * copies of the block (keys transposed). A row's result depends only on its own query and
 * keys -- blocks start at multiples of AK, and a block a row does not reach leaves it
 * exactly as it was -- so chunked prefill gives the same results as one pass, and a batch
 * the same as each row alone. */
#if defined(CL_AVX2)
/* vexp on 8 lanes with AVX2 intrinsics (GCC splits the 16-lane generic vectors into
 * 128-bit pieces here): the same range reduction and polynomial. */
AI __m256 exp8(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3365478515625f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365478515625f));
    __m256 nf = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                                _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fmadd_ps(nf, _mm256_set1_ps(2.12194440e-4f), x);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(small, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

#define AQ 192 /* rows (positions x heads of a KV head) of a work item */
#define AK 64  /* keys per block */

#define AS_INIT(r) __m256 a##r##0 = _mm256_setzero_ps(), a##r##1 = _mm256_setzero_ps();
#define AS_STEP(r)                                                                             \
    if (R > r) {                                                                               \
        __m256 qb = _mm256_broadcast_ss(q + r * D + d);                                        \
        a##r##0 = _mm256_fmadd_ps(k0, qb, a##r##0);                                            \
        a##r##1 = _mm256_fmadd_ps(k1, qb, a##r##1);                                            \
    }
#define AS_STORE(r)                                                                            \
    if (R > r) {                                                                               \
        _mm256_storeu_ps(s + r * AK, a##r##0);                                                 \
        _mm256_storeu_ps(s + r * AK + 8, a##r##1);                                             \
    }
/* Scores of R rows of q (fp32, D apart) against 16 keys (kt: D rows of 16) into s (AK apart). */
#define ATT_S_FN(RR)                                                                           \
    static void att_s_##RR(const float* q, const float* kt, long D, float* s) {                \
        const int R = RR;                                                                      \
        AS_INIT(0) AS_INIT(1) AS_INIT(2) AS_INIT(3) AS_INIT(4) AS_INIT(5)                      \
        for (long d = 0; d < D; d++) {                                                         \
            __m256 k0 = _mm256_loadu_ps(kt + d * 16), k1 = _mm256_loadu_ps(kt + d * 16 + 8);   \
            AS_STEP(0) AS_STEP(1) AS_STEP(2) AS_STEP(3) AS_STEP(4) AS_STEP(5)                  \
        }                                                                                      \
        AS_STORE(0) AS_STORE(1) AS_STORE(2) AS_STORE(3) AS_STORE(4) AS_STORE(5)                \
    }
#define AP_INIT(r)                                                                             \
    __m256 a##r##0 = _mm256_setzero_ps(), a##r##1 = _mm256_setzero_ps();                      \
    if (R > r) {                                                                               \
        a##r##0 = _mm256_loadu_ps(o + r * D);                                                  \
        if (W > 8) a##r##1 = _mm256_loadu_ps(o + r * D + 8);                                   \
    }
#define AP_STEP(r)                                                                             \
    if (R > r) {                                                                               \
        __m256 pb = _mm256_broadcast_ss(p + r * AK + j);                                       \
        a##r##0 = _mm256_fmadd_ps(v0, pb, a##r##0);                                            \
        if (W > 8) a##r##1 = _mm256_fmadd_ps(v1, pb, a##r##1);                                 \
    }
#define AP_STORE(r)                                                                            \
    if (R > r) {                                                                               \
        _mm256_storeu_ps(o + r * D, a##r##0);                                                  \
        if (W > 8) _mm256_storeu_ps(o + r * D + 8, a##r##1);                                   \
    }
/* o[r, 0:W] (D apart) += sum over j < n of p[r, j] (AK apart) * v[j, 0:W] (D apart); W is 16,
 * or 8 for the last columns of a head size that is an odd multiple of 8. */
#define ATT_PV_FN(NAME, RR, WW)                                                                \
    static void NAME(const float* p, const float* v, long n, long D, float* o) {               \
        const int R = RR, W = WW;                                                              \
        AP_INIT(0) AP_INIT(1) AP_INIT(2) AP_INIT(3) AP_INIT(4) AP_INIT(5)                      \
        for (long j = 0; j < n; j++) {                                                         \
            __m256 v0 = _mm256_loadu_ps(v + j * D);                                            \
            __m256 v1 = W > 8 ? _mm256_loadu_ps(v + j * D + 8) : v0;                           \
            AP_STEP(0) AP_STEP(1) AP_STEP(2) AP_STEP(3) AP_STEP(4) AP_STEP(5)                  \
        }                                                                                      \
        AP_STORE(0) AP_STORE(1) AP_STORE(2) AP_STORE(3) AP_STORE(4) AP_STORE(5)                \
    }
ATT_S_FN(1) ATT_S_FN(2) ATT_S_FN(3) ATT_S_FN(4) ATT_S_FN(5) ATT_S_FN(6)
ATT_PV_FN(att_pv_1, 1, 16) ATT_PV_FN(att_pv_2, 2, 16) ATT_PV_FN(att_pv_3, 3, 16)
ATT_PV_FN(att_pv_4, 4, 16) ATT_PV_FN(att_pv_5, 5, 16) ATT_PV_FN(att_pv_6, 6, 16)
ATT_PV_FN(att_pv8_1, 1, 8) ATT_PV_FN(att_pv8_2, 2, 8) ATT_PV_FN(att_pv8_3, 3, 8)
ATT_PV_FN(att_pv8_4, 4, 8) ATT_PV_FN(att_pv8_5, 5, 8) ATT_PV_FN(att_pv8_6, 6, 8)
typedef void (*att_s_fn)(const float*, const float*, long, float*);
typedef void (*att_pv_fn)(const float*, const float*, long, long, float*);
static const att_s_fn att_s_fns[7] = {NULL, att_s_1, att_s_2, att_s_3, att_s_4, att_s_5, att_s_6};
static const att_pv_fn att_pv_fns[7] = {NULL,     att_pv_1, att_pv_2, att_pv_3,
                                        att_pv_4, att_pv_5, att_pv_6};
static const att_pv_fn att_pv8_fns[7] = {NULL,      att_pv8_1, att_pv8_2, att_pv8_3,
                                         att_pv8_4, att_pv8_5, att_pv8_6};

/* One work item's pass over its key blocks. qf: its R rows (fp32, scaled by 1/sqrt(D));
 * pos[r]: each row's position; kt, vb, s: buffers (D x AK, AK x D, R x AK); o (R x D) and
 * l (R): the unnormalised output and sums. */
#define ATT_ITEM(SFX, T, TOF, FROMF)                                                           \
    static void att_item_##SFX(const T* keys, const T* vals, const float* qf, const long* pos, \
                               long R, long D, long n_keys, float* kt, float* vb, float* s,    \
                               float* o, float* m, float* l) {                                 \
        for (long r = 0; r < R; r++) m[r] = -INFINITY, l[r] = 0.0f;                            \
        memset(o, 0, sizeof(float) * (size_t)(R * D));                                         \
        long last = pos[R - 1] + 1 < n_keys ? pos[R - 1] + 1 : n_keys; /* keys any row sees */ \
        for (long j0 = 0; j0 < last; j0 += AK) {                                               \
            long kn = last - j0 < AK ? last - j0 : AK;                                         \
            for (long c = 0; c < AK / 16; c++) /* keys transposed in strips of 16 */         \
                for (long jj = 0; jj < 16; jj++) {                                             \
                    long j = c * 16 + jj;                                                      \
                    float* dst = kt + c * D * 16 + jj;                                         \
                    const T* src = keys + (j0 + j) * D;                                        \
                    if (j < kn)                                                                \
                        for (long d = 0; d < D; d++) dst[d * 16] = TOF(src[d]);                \
                    else                                                                       \
                        for (long d = 0; d < D; d++) dst[d * 16] = 0.0f;                       \
                }                                                                              \
            const float* vv = vb; /* the block's values in fp32: the cache's own, or a copy */ \
            if (sizeof(T) == sizeof(float)) vv = (const float*)(const void*)(vals + j0 * D);    \
            else                                                                               \
                for (long j = 0; j < kn; j++)                                                  \
                    for (long d = 0; d < D; d++) vb[j * D + d] = TOF(vals[(j0 + j) * D + d]);  \
            long r_first = 0; /* rows that reach this block: pos >= j0 (rows by position) */  \
            while (pos[r_first] < j0) r_first++;                                               \
            long kv16 = (kn + 15) & ~15L;                                                      \
            for (long r0 = r_first; r0 < R; r0 += 6) {                                         \
                int rr = R - r0 < 6 ? (int)(R - r0) : 6;                                       \
                for (long c = 0; c < kv16 / 16; c++)                                           \
                    att_s_fns[rr](qf + r0 * D, kt + c * D * 16, D, s + r0 * AK + c * 16);      \
            }                                                                                  \
            for (long r = r_first; r < R; r++) {                                               \
                float* sr = s + r * AK;                                                        \
                long nv = pos[r] + 1 - j0 < kn ? pos[r] + 1 - j0 : kn; /* keys <= pos */      \
                long nv16 = (nv + 15) & ~15L;                                                  \
                if (nv < nv16) /* keys past the row's position: -inf, so exp gives 0 */       \
                    for (long j = nv; j < nv16; j++) sr[j] = -INFINITY;                        \
                __m256 mxv = _mm256_set1_ps(m[r]);                                             \
                for (long j = 0; j < nv16; j += 8) mxv = _mm256_max_ps(mxv, _mm256_loadu_ps(sr + j)); \
                __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mxv), _mm256_extractf128_ps(mxv, 1)); \
                m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));                                    \
                m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));                                      \
                float mx = _mm_cvtss_f32(m4);                                                  \
                float factor = m[r] == -INFINITY ? 0.0f : sexp(m[r] - mx);                     \
                __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(mx);                     \
                for (long j = 0; j < nv16; j += 8) {                                           \
                    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));               \
                    _mm256_storeu_ps(sr + j, e);                                               \
                    sum = _mm256_add_ps(sum, e);                                               \
                }                                                                              \
                for (long j = nv16; j < kv16; j++) sr[j] = 0.0f; /* keys no row of it sees */ \
                __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1)); \
                s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                    \
                s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));                                      \
                l[r] = l[r] * factor + _mm_cvtss_f32(s4);                                      \
                m[r] = mx;                                                                     \
                if (factor != 1.0f) {                                                          \
                    __m256 fv = _mm256_set1_ps(factor);                                        \
                    for (long d = 0; d < D; d += 8)                                            \
                        _mm256_storeu_ps(o + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + d), fv)); \
                }                                                                              \
            }                                                                                  \
            for (long r0 = r_first; r0 < R; r0 += 6) {                                         \
                int rr = R - r0 < 6 ? (int)(R - r0) : 6;                                       \
                for (long d0 = 0; d0 < D; d0 += 16)                                            \
                    if (d0 + 16 <= D) att_pv_fns[rr](s + r0 * AK, vv + d0, kn, D, o + r0 * D + d0); \
                    else att_pv8_fns[rr](s + r0 * AK, vv + d0, kn, D, o + r0 * D + d0);        \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    /* q: (B, T, H, D) with batch and position strides q_sb, q_st (heads D apart); caches:   \
     * (B, Hkv, >= start + T, D) with strides c_sb, c_sh; out: (B, T, H, D) contiguous.      \
     * Returns 0, -1 out of memory, -4 an unsupported shape. */                              \
    int codellama_prefill_attention_##SFX(const T* q, long q_sb, long q_st, const T* cache_k,  \
                                          const T* cache_v, long c_sb, long c_sh, T* out,      \
                                          long B, long Tn, long H, long Hkv, long D,           \
                                          long start, int threads) {                           \
        if (B < 1 || Tn < 1 || Hkv < 1 || H % Hkv || D % 8 || D > 256 || start < 0)          \
            return -4;                                                                         \
        long rep = H / Hkv;                                                                    \
        if (rep > AQ) return -4;                                                               \
        long per = AQ / rep; /* positions per work item */                                    \
        long blocks = (Tn + per - 1) / per, items = B * Hkv * blocks;                          \
        float scale = 1.0f / sqrtf((float)D);                                                  \
        int failed = 0;                                                                        \
        _Pragma("omp parallel num_threads(threads)") {                                        \
            size_t nf = (size_t)(AQ * D * 2 + AQ * AK + 2 * AK * D + 2 * AQ);                  \
            float* buf = (float*)aligned_alloc(64, (sizeof(float) * nf + 63) & ~(size_t)63);   \
            long* pos = (long*)malloc(sizeof(long) * AQ);                                      \
            if (!buf || !pos) {                                                                \
                _Pragma("omp atomic write") failed = 1;                                        \
            }                                                                                  \
            _Pragma("omp for schedule(dynamic, 1)")                                            \
            for (long it = 0; it < items; it++) {                                              \
                if (!buf || !pos) continue;                                                    \
                long blk = blocks - 1 - it % blocks; /* the longest first */                   \
                long g = (it / blocks) % Hkv, b = it / blocks / Hkv;                           \
                long t0 = blk * per, t1 = t0 + per < Tn ? t0 + per : Tn, R = (t1 - t0) * rep;  \
                float *qf = buf, *o = qf + AQ * D, *s = o + AQ * D, *kt = s + AQ * AK;         \
                float *vb = kt + AK * D, *m = vb + AK * D, *l = m + AQ;                        \
                for (long t = t0; t < t1; t++)                                                 \
                    for (long i = 0; i < rep; i++) {                                           \
                        long r = (t - t0) * rep + i;                                           \
                        const T* qr = q + b * q_sb + t * q_st + (g * rep + i) * D;             \
                        for (long d = 0; d < D; d++) qf[r * D + d] = TOF(qr[d]) * scale;       \
                        pos[r] = start + t;                                                    \
                    }                                                                          \
                const T* keys = cache_k + b * c_sb + g * c_sh;                                 \
                const T* vals = cache_v + b * c_sb + g * c_sh;                                 \
                att_item_##SFX(keys, vals, qf, pos, R, D, start + Tn, kt, vb, s, o, m, l);     \
                for (long t = t0; t < t1; t++)                                                 \
                    for (long i = 0; i < rep; i++) {                                           \
                        long r = (t - t0) * rep + i;                                           \
                        T* dst = out + ((b * Tn + t) * H + g * rep + i) * D;                   \
                        float inv = 1.0f / l[r];                                               \
                        for (long d = 0; d < D; d++) dst[d] = FROMF(o[r * D + d] * inv);      \
                    }                                                                          \
            }                                                                                  \
            free(buf);                                                                         \
            free(pos);                                                                         \
        }                                                                                      \
        return failed ? -1 : 0;                                                                \
    }
ATT_ITEM(f32, float, f32_id, f32_id)
ATT_ITEM(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
#else
int codellama_prefill_attention_f32(const float* q, long q_sb, long q_st, const float* cache_k,
                                    const float* cache_v, long c_sb, long c_sh, float* out,
                                    long B, long Tn, long H, long Hkv, long D, long start,
                                    int threads) {
    (void)q, (void)q_sb, (void)q_st, (void)cache_k, (void)cache_v, (void)c_sb, (void)c_sh;
    (void)out, (void)B, (void)Tn, (void)H, (void)Hkv, (void)D, (void)start, (void)threads;
    return -2; /* AVX2 builds only: elsewhere the model keeps SDPA */
}
int codellama_prefill_attention_bf16(const uint16_t* q, long q_sb, long q_st,
                                     const uint16_t* cache_k, const uint16_t* cache_v,
                                     long c_sb, long c_sh, uint16_t* out, long B, long Tn, long H,
                                     long Hkv, long D, long start, int threads) {
    (void)q, (void)q_sb, (void)q_st, (void)cache_k, (void)cache_v, (void)c_sb, (void)c_sh;
    (void)out, (void)B, (void)Tn, (void)H, (void)Hkv, (void)D, (void)start, (void)threads;
    return -2;
}
#endif

/* Greedy decoding's pick (see argmax_row) for each row of fp32 logits (M, V): in one call
 * instead of three torch ops that run slowly right after a pass over weights. */
void codellama_argmax_f32(const float* x, long M, long V, long* index, int* finite) {
    for (long m = 0; m < M; m++) argmax_row(x + m * V, V, index + m, finite + m);
}
