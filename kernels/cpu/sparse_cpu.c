/* CPU inference products of the sparse layers, fp32, for SparseLayer.cpu_inference.

   y = x W^T + bias with W given as
   - CSR of its elements: crow [n_rows + 1] int32, cols [nnz] uint16 (in <= 65536) or int32,
     vals [nnz] (fan-in, b = 1 diagonals, unstructured; ablated fan-in rows are empty rows);
   - BSR of b x b blocks (block diagonals, b > 1): crow over block rows, bcols [n] int32, blocks
     [n, b, b] stored transposed (blocks[n][j][i] = W[rb*b + i, cb*b + j]) so that one input
     element scales one contiguous column of the block.
   One token (csr_mv_*, bsr_mv): x [in], y [out]. Several tokens (csr_mm_*): x in tiles of TW
   tokens, token-minor, xt [n_tiles, in, TW] and yt [n_tiles, out, TW], TW in {8, 16, 24, 32}:
   each stored weight then scales one contiguous TW-wide row of xt; the CSR is split into
   panels of columns (see CSR_MM).
   Every function does the rows [r0, r1) (block rows for BSR), so callers may split the rows
   over threads. No allocation, no threads, no library: the speed comes from the bytes (2-byte
   column indices, one index per b x b block) and the loop order. Built twice by kernels/cpu:
   -march=x86-64 (any x86-64) and -mavx2 -mfma (chosen at run time when the CPU has both);
   the f8 vectors below are GCC vector extensions, lowered to whatever the target has. */
#include <stdint.h>

typedef float f8 __attribute__((vector_size(32), aligned(4)));  /* unaligned 8 x fp32 */

int sparse_cpu_abi(void) { return 2; }

/* One token, CSR: a gather-bound loop (3 loads per stored weight). With AVX2, eight gathered
   x values are packed into one vector for one FMA with eight contiguous values (in a C timing
   loop on the loaded 2-core EPYC, Linear 3072 -> 768 at 90%: 5-25% less CPU time than four
   scalar sums, which this file uses without AVX2; AVX2's vgatherdps took 10-20% more). */
#ifdef __AVX2__
#include <immintrin.h>
#define CSR_MV_BODY                                                                           \
        __m256 acc = _mm256_setzero_ps();                                                     \
        for (; j + 8 <= end; j += 8) {                                                        \
            const IDX_T *c = cols + j;                                                        \
            const __m256 xv = _mm256_set_ps(x[c[7]], x[c[6]], x[c[5]], x[c[4]],               \
                                            x[c[3]], x[c[2]], x[c[1]], x[c[0]]);              \
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j), xv, acc);                        \
        }                                                                                     \
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));    \
        h = _mm_hadd_ps(h, h);                                                                \
        h = _mm_hadd_ps(h, h);                                                                \
        float s0 = _mm_cvtss_f32(h), s1 = 0.f, s2 = 0.f, s3 = 0.f;
#else
#define CSR_MV_BODY                                                                           \
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                         \
        for (; j + 4 <= end; j += 4) {                                                        \
            s0 += vals[j] * x[cols[j]];                                                       \
            s1 += vals[j + 1] * x[cols[j + 1]];                                               \
            s2 += vals[j + 2] * x[cols[j + 2]];                                               \
            s3 += vals[j + 3] * x[cols[j + 3]];                                               \
        }
#endif
#define CSR_MV(NAME, IDX)                                                                     \
void NAME(int64_t r0, int64_t r1, const int32_t *restrict crow, const IDX *restrict cols,     \
          const float *restrict vals, const float *restrict x, const float *restrict bias,    \
          float *restrict y) {                                                                \
    typedef IDX IDX_T __attribute__((unused));                                                \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        int64_t j = crow[r];                                                                  \
        const int64_t end = crow[r + 1];                                                      \
        CSR_MV_BODY                                                                           \
        for (; j < end; ++j) s0 += vals[j] * x[cols[j]];                                      \
        y[r] = (bias ? bias[r] : 0.f) + ((s0 + s1) + (s2 + s3));                              \
    }                                                                                         \
}
CSR_MV(csr_mv_i16, uint16_t)
CSR_MV(csr_mv_i32, int32_t)

/* Several tokens, CSR, one tile of TW tokens: acc[TW] += v * xt[col, 0:TW] per stored
   weight, the TW sums kept in registers (TW / 8 vectors), in S sets taking the stored weights
   in turn: with one set every weight waits for the previous weight's FMAs (4 cycles of
   latency on Zen 3 and Skylake); S sets overlap S weights. */
#define CSR_MM_TILE(NAME, IDX, TW, S)                                                         \
static void NAME(int64_t r0, int64_t r1, const int32_t *restrict crow,                        \
                 const IDX *restrict cols, const float *restrict vals,                        \
                 const float *restrict xt, const float *restrict bias, float *restrict yt,    \
                 int first) {                                                                 \
    enum { U = (TW) / 8 };                                                                    \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        f8 acc[S][U];                                                                         \
        f8 *q = (f8 *)(yt + r * (TW));                                                        \
        const float b0 = bias ? bias[r] : 0.f;                                                \
        for (int u = 0; u < U; ++u) {                                                         \
            acc[0][u] = first ? (f8){b0, b0, b0, b0, b0, b0, b0, b0} : q[u];                  \
            for (int k = 1; k < (S); ++k) acc[k][u] = (f8){0};                                \
        }                                                                                     \
        int64_t j = crow[r];                                                                  \
        const int64_t end = crow[r + 1];                                                      \
        for (; j + (S) <= end; j += (S)) {                                                    \
            for (int k = 0; k < (S); ++k) {                                                   \
                const float v = vals[j + k];                                                  \
                const f8 *p = (const f8 *)(xt + (int64_t)cols[j + k] * (TW));                 \
                for (int u = 0; u < U; ++u) acc[k][u] += v * p[u];                            \
            }                                                                                 \
        }                                                                                     \
        for (; j < end; ++j) {                                                                \
            const float v = vals[j];                                                          \
            const f8 *p = (const f8 *)(xt + (int64_t)cols[j] * (TW));                         \
            for (int u = 0; u < U; ++u) acc[0][u] += v * p[u];                                \
        }                                                                                     \
        for (int u = 0; u < U; ++u) {                                                         \
            f8 t = acc[0][u];                                                                 \
            for (int k = 1; k < (S); ++k) t += acc[k][u];                                     \
            q[u] = t;                                                                         \
        }                                                                                     \
    }                                                                                         \
}
CSR_MM_TILE(csr_mm_i16_8, uint16_t, 8, 4)
CSR_MM_TILE(csr_mm_i16_16, uint16_t, 16, 4)
CSR_MM_TILE(csr_mm_i16_24, uint16_t, 24, 3)
CSR_MM_TILE(csr_mm_i16_32, uint16_t, 32, 3)
CSR_MM_TILE(csr_mm_i32_8, int32_t, 8, 4)
CSR_MM_TILE(csr_mm_i32_16, int32_t, 16, 4)
CSR_MM_TILE(csr_mm_i32_24, int32_t, 24, 3)
CSR_MM_TILE(csr_mm_i32_32, int32_t, 32, 3)

/* Several tokens: every tile of TW tokens in turn, and within a tile every panel of columns
   in turn: the CSR is stored panel by panel (crow [n_panels * n_out + 1], row r of panel p at
   crow[p * n_out + r]), so the xt rows a panel reads (PANEL = 512 columns x TW x 4 B = 64 KB at
   TW = 32) stay in L2 while the weights stream past; one panel (a 3072-wide tile, 384 KB)
   took ~1.2x longer at T = 32 on the EPYC. Returns 0, or -1 for a TW without a kernel. */
#define CSR_MM(NAME, IDX, T8, T16, T24, T32)                                                  \
int NAME(int64_t r0, int64_t r1, int64_t n_in, int64_t n_out, int64_t n_tiles, int64_t tw,    \
         int64_t n_panels, const int32_t *restrict crow, const IDX *restrict cols,            \
         const float *restrict vals, const float *restrict xt, const float *restrict bias,    \
         float *restrict yt) {                                                                \
    for (int64_t t = 0; t < n_tiles; ++t) {                                                   \
        const float *xs = xt + t * n_in * tw;                                                 \
        float *ys = yt + t * n_out * tw;                                                      \
        for (int64_t p = 0; p < n_panels; ++p) {                                              \
            const int32_t *cp = crow + p * n_out;                                             \
            switch (tw) {                                                                     \
            case 8: T8(r0, r1, cp, cols, vals, xs, bias, ys, p == 0); break;                  \
            case 16: T16(r0, r1, cp, cols, vals, xs, bias, ys, p == 0); break;                \
            case 24: T24(r0, r1, cp, cols, vals, xs, bias, ys, p == 0); break;                \
            case 32: T32(r0, r1, cp, cols, vals, xs, bias, ys, p == 0); break;                \
            default: return -1;                                                               \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    return 0;                                                                                 \
}
CSR_MM(csr_mm_i16, uint16_t, csr_mm_i16_8, csr_mm_i16_16, csr_mm_i16_24, csr_mm_i16_32)
CSR_MM(csr_mm_i32, int32_t, csr_mm_i32_8, csr_mm_i32_16, csr_mm_i32_24, csr_mm_i32_32)

/* One token, BSR with B = b a multiple of 8: the b outputs of a block row in B / 8 vector
   sums, two sets (even and odd j) so that consecutive FMAs do not wait on each other. */
static inline __attribute__((always_inline)) void
bsr_mv_vec(int64_t rb0, int64_t rb1, const int B, const int32_t *restrict crow,
           const int32_t *restrict bcols, const float *restrict blocks, const float *restrict x,
           const float *restrict bias, float *restrict y) {
    const int U = B / 8;
    for (int64_t rb = rb0; rb < rb1; ++rb) {
        f8 a0[8], a1[8];  /* U <= 8 (b <= 64) */
        for (int u = 0; u < U; ++u) {
            a0[u] = bias ? *(const f8 *)(bias + rb * B + 8 * u) : (f8){0};
            a1[u] = (f8){0};
        }
        for (int64_t n = crow[rb]; n < crow[rb + 1]; ++n) {
            const float *xs = x + (int64_t)bcols[n] * B;
            const f8 *col = (const f8 *)(blocks + n * B * B);  /* [j][i] */
            for (int j = 0; j < B; j += 2) {
                const float x0 = xs[j], x1 = xs[j + 1];
                for (int u = 0; u < U; ++u) {
                    a0[u] += x0 * col[j * U + u];
                    a1[u] += x1 * col[(j + 1) * U + u];
                }
            }
        }
        f8 *q = (f8 *)(y + rb * B);
        for (int u = 0; u < U; ++u) q[u] = a0[u] + a1[u];
    }
}

/* One token, BSR, any b: y's b outputs summed in place (they stay in L1). */
static void bsr_mv_any(int64_t rb0, int64_t rb1, int64_t b, const int32_t *restrict crow,
                       const int32_t *restrict bcols, const float *restrict blocks,
                       const float *restrict x, const float *restrict bias, float *restrict y) {
    for (int64_t rb = rb0; rb < rb1; ++rb) {
        float *yr = y + rb * b;
        for (int64_t i = 0; i < b; ++i) yr[i] = bias ? bias[rb * b + i] : 0.f;
        for (int64_t n = crow[rb]; n < crow[rb + 1]; ++n) {
            const float *xs = x + (int64_t)bcols[n] * b;
            const float *col = blocks + n * b * b;
            for (int64_t j = 0; j < b; ++j) {
                const float xj = xs[j];
                for (int64_t i = 0; i < b; ++i) yr[i] += xj * col[j * b + i];
            }
        }
    }
}

void bsr_mv(int64_t rb0, int64_t rb1, int64_t b, const int32_t *restrict crow,
            const int32_t *restrict bcols, const float *restrict blocks, const float *restrict x,
            const float *restrict bias, float *restrict y) {
    switch (b) {
    case 8: bsr_mv_vec(rb0, rb1, 8, crow, bcols, blocks, x, bias, y); break;
    case 16: bsr_mv_vec(rb0, rb1, 16, crow, bcols, blocks, x, bias, y); break;
    case 32: bsr_mv_vec(rb0, rb1, 32, crow, bcols, blocks, x, bias, y); break;
    case 64: bsr_mv_vec(rb0, rb1, 64, crow, bcols, blocks, x, bias, y); break;
    default: bsr_mv_any(rb0, rb1, b, crow, bcols, blocks, x, bias, y);
    }
}
