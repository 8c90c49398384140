/* Small-batch linear layers for CPU decoding: y[M, N] = x[M, K] @ W[N, K]^T, M small.
 *
 * Decoding one token reads every weight once, so its speed is that of a matrix-vector
 * product, bound by memory bandwidth. oneDNN's bf16 matrix-vector kernel reads at about
 * two thirds of the bandwidth that a plain row-by-row dot product reaches, so this file
 * provides that dot product. codellama/native.py compiles it for the running CPU
 * (-O3 -march=native -fopenmp) on first use and falls back to oneDNN when it cannot.
 *
 * W is row-major (the checkpoint's layout); x and y have W's dtype; sums are fp32.
 * bf16 uses AVX512-BF16 dot products where the CPU has them, else portable vector code.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define AI static inline __attribute__((always_inline))
#define U 4    /* accumulators per row of W when one row of x is multiplied */
#define MB 4   /* rows of x per pass over a block of W */
#define ROWS 4 /* rows of W per block when 3 or more rows of x are multiplied */

/* Two loop orders, measured on a 2-core AVX512-BF16 EPYC against oneDNN's prepacked kernels:
 * - 1-2 rows of x ("row" kernels): the rows of W are read one after another, a single
 *   sequential stream per thread that the hardware prefetcher follows best: 23-35 GB/s,
 *   where oneDNN reads 14-25 GB/s.
 * - 3-8 rows of x ("block" kernels): four rows of W at a time, so that each load of x
 *   serves four rows: about 0.8x oneDNN's speed, against 0.5x for the row order. */

#define VL 16
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));

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
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
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

/* Returns 0 on success, -1 if the fp32 copy of x could not be allocated. */
int codellama_linear_f32(const float* x, const float* W, float* y, long M, long N, long K,
                         int threads) {
    const float* xs = x;
    LINEAR_BODY(row_f32, block_f32, float, float, f32_id)
    return 0;
}

int codellama_linear_bf16(const uint16_t* x, const uint16_t* W, uint16_t* y, long M, long N,
                          long K, int threads) {
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

/* 1 when bf16 uses the CPU's bf16 dot-product instructions (for reports). */
int codellama_bf16_dot_product(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}
