/* CPU products of the sparse layers, fp32 and bf16: inference (SparseLayer.cpu_inference) and the
   training step's forward, input gradient and weight gradient (kernels.cpu.csr_matmul, sddmm).

   y = x W^T + bias with W given as
   - CSR of its elements: crow [n_rows + 1] int32, cols [nnz] uint16 (in <= 65536) or int32,
     vals [nnz] (fan-in, b = 1 diagonals, unstructured; ablated fan-in rows are empty rows);
   - BSR of b x b blocks (block diagonals, b > 1): crow over block rows, bcols [n] int32, blocks
     [n, b, b] stored transposed (blocks[n][j][i] = W[rb*b + i, cb*b + j]) so that one input
     element scales one contiguous column of the block.
   One token (csr_mv_*, bsr_mv): x [in], y [out]. Several tokens (csr_mm_*): x in tiles of TW
   tokens, token-minor, xt [n_tiles, in, TW] and yt [n_tiles, out, TW], TW in {8, 16, 24, 32}:
   each stored weight then scales one contiguous TW-wide row of xt; the CSR is split into
   panels of columns (see CSR_MM); pack_tokens / unpack_tokens make and undo that layout.
   Weight gradient (sddmm_tiles): g[i] = dy[:, rows[i]] . x[:, cols[i]] over the same tiles.
   bf16 (the *_bf16 functions): the weights stored as bf16 bits (2 bytes, half of fp32's), widened
   to fp32 where they are used; x widened into the fp32 token tiles (pack_tokens_bf16), fp32 sums,
   y rounded to nearest even (unpack_tokens_bf16) - what torch's nn.Linear computes under CPU
   autocast; the SDDMM's tiles are fp32 (bf16 dy and x widened), except in the AVX-512-BF16 builds,
   whose sddmm_tiles_dpbf16 reads bf16 tiles of both.
   Every function does the rows [r0, r1) (block rows for BSR; stored weights for the SDDMM), so
   callers may split them over threads (parallel_rows at the end does, on OpenMP's threads). No
   allocation, no threads of its own, no library: the speed comes from the bytes (2-byte
   column indices, one index per b x b block) and the loop order. Built by kernels/cpu in the
   variant the CPU runs (kernels.cpu.VARIANTS): -march=x86-64 (any x86-64), -mavx2 -mfma, and
   on top of those the AVX-512-BF16 and AMX kernels near the end (avx512-bf16, amx; emu: the
   AVX2 flags with those kernels on emulated instructions, for tests); the f8 vectors
   below are GCC vector extensions, lowered to whatever the target has. */
#define _GNU_SOURCE  /* syscall (the AMX build's arch_prctl) */
#include <stdint.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float f8 __attribute__((vector_size(32), aligned(4)));  /* unaligned 8 x fp32 */
typedef uint16_t h8 __attribute__((vector_size(16), aligned(2)));  /* unaligned 8 x bf16 bits */
typedef uint32_t u8v __attribute__((vector_size(32), aligned(4)));
typedef int32_t i8v __attribute__((vector_size(32), aligned(4)));
typedef uint16_t bf16;  /* the bits of a bfloat16: the upper half of an fp32 */

int sparse_cpu_abi(void) { return 13; }

/* The packs' outer loops (token tiles or rows, each writing its own part of the output) over
   `threads` OpenMP threads, their last argument: torch's intra-op threads, as parallel_rows'
   (a build without OpenMP ignores the pragma and runs them on the calling thread). */
#define PACK_PARALLEL _Pragma("omp parallel for num_threads((int)threads) schedule(static) if (threads > 1)")

/* bf16 <-> fp32. Up is exact (a shift); down rounds to nearest even as torch does, NaN kept
   NaN (quiet). Eight at a time as GCC vectors: with AVX2 vpmovzxwd + vpslld up; the weights
   are widened where they are used and the products accumulate in fp32. */
static inline float bf16_f32(bf16 h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
static inline bf16 f32_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#ifdef __AVX2__
/* (GCC lowers the generic forms below to two 4-wide vpmovzxwd + vinserti128 per 8 weights:
   DiagLinear b = 16 3072 -> 768 at 90%, batch 1, EPYC, 8 layers in turn: 61.8 us against 53.2
   with one vpmovzxwd ymm + vpslld, in the same bench run as fp32's 38-45) */
static inline f8 load_bf16x8(const bf16 *p) {
    return (f8)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline void store_bf16x8(bf16 *p, f8 v) {
    const __m256i u = _mm256_castps_si256((__m256)v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}
#else
static inline f8 load_bf16x8(const bf16 *p) {
    h8 h;
    __builtin_memcpy(&h, p, 16);
    return (f8)(__builtin_convertvector(h, u8v) << 16);
}
static inline void store_bf16x8(bf16 *p, f8 v) {
    const u8v u = (u8v)v;
    const i8v nan = (i8v)((u & 0x7fffffffu) > 0x7f800000u);
    const u8v r = ((u8v)nan & (u | 0x400000u)) | (~(u8v)nan & (u + 0x7fffu + ((u >> 16) & 1u)));
    const h8 h = __builtin_convertvector(r >> 16, h8);
    __builtin_memcpy(p, &h, 16);
}
#endif
#define LD_F32(p, j) ((p)[j])
#define LD_BF16(p, j) bf16_f32((p)[j])
#define LD8_F32(p) (*(const f8 *)(p))
#define LD8_BF16(p) load_bf16x8(p)

/* out[c] = sum_t x[t, c] for the columns [c0, c1) of x [T, *] (row stride st elements, columns
   contiguous), bf16 widened, fp32 sums: the bias gradient of a layer, dy summed over
   its tokens. Chunks of COL_SUM_COLS columns, every row's run of them read in turn (sequential
   within a row), partial sums over COL_SUM_ROWS rows added to the chunk's total (two levels, so
   the rounding grows with COL_SUM_ROWS + T / COL_SUM_ROWS terms, not T). torch's
   dy.sum(0, dtype=torch.float32) of a bf16 [6304, 3072] took 46-47 ms on the EPYC Zen 4, one
   thread (1.8-1.9 ms for [6304, 768]), this 6.4 (0.26); in fp32 torch's is as fast (8.9 against
   8.2 ms) and its cascade rounds less, so fp32 keeps torch's. */
#define COL_SUM_COLS 1024
#define COL_SUM_ROWS 64
#define COL_SUMS(NAME, VT, LD, LD8)                                                           \
void NAME(int64_t c0, int64_t c1, int64_t T, const VT *restrict x, int64_t st, float *restrict out) { \
    for (int64_t c = c0; c < c1; c += COL_SUM_COLS) {                                         \
        const int64_t w = c1 - c < COL_SUM_COLS ? c1 - c : COL_SUM_COLS;                      \
        float tot[COL_SUM_COLS], part[COL_SUM_COLS];                                          \
        for (int64_t j = 0; j < w; ++j) tot[j] = 0.f;                                         \
        for (int64_t t0 = 0; t0 < T; t0 += COL_SUM_ROWS) {                                    \
            const int64_t t1 = T - t0 < COL_SUM_ROWS ? T : t0 + COL_SUM_ROWS;                 \
            for (int64_t j = 0; j < w; ++j) part[j] = 0.f;                                    \
            for (int64_t t = t0; t < t1; ++t) {                                               \
                const VT *row = x + t * st + c;                                               \
                int64_t j = 0;                                                                \
                for (; j + 8 <= w; j += 8) *(f8 *)(part + j) += LD8(row + j);                 \
                for (; j < w; ++j) part[j] += LD(row, j);                                     \
            }                                                                                 \
            for (int64_t j = 0; j < w; ++j) tot[j] += part[j];                                \
        }                                                                                     \
        for (int64_t j = 0; j < w; ++j) out[c + j] = tot[j];                                  \
    }                                                                                         \
}
COL_SUMS(col_sums_bf16, bf16, LD_BF16, LD8_BF16)

void bf16_to_f32(int64_t n, const bf16 *restrict src, float *restrict dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) *(f8 *)(dst + i) = load_bf16x8(src + i);
    for (; i < n; ++i) dst[i] = bf16_f32(src[i]);
}
void f32_to_bf16(int64_t n, const float *restrict src, bf16 *restrict dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store_bf16x8(dst + i, *(const f8 *)(src + i));
    for (; i < n; ++i) dst[i] = f32_bf16(src[i]);
}

/* One token, CSR: a gather-bound loop (3 loads per stored weight). With AVX2, eight gathered
   x values are packed into one vector for one FMA with eight contiguous values, two such sums
   in flight, the 2-byte column indices read four at a time (one 8-byte load, split by shifts on
   the integer ports), and the value / index streams prefetched 2 KB / 1 KB ahead. In a C timing
   loop on the loaded 2-core EPYC (Linear 3072 -> 768 at 90%, 8 layers in turn): 109 us against
   141 us for one sum with one load per index, 146 us without the prefetch; the same when the
   layer stays in cache. AVX2's vgatherdps took 10-20% more; without AVX2, four scalar sums.
   bf16 (csr_mv_*_bf16): bf16 values, bf16 x widened first into the caller's fp32 scratch xf
   (n_widen elements; 0: xf holds x already, as when rows are split over threads), bf16 y. (A
   gathered bf16 x widened on the way - movzx, shl, vmovd, vpinsrd - took 108 us against fp32's
   74, fan-in 3072 -> 768 at 90% in L2, EPYC; two torch casts around the product ~3.8 us each.)
   Sixteen values are one 32-byte load of eight 32-bit pairs: a shift gives the even ones as
   fp32, a mask the odd ones, and the gathers take the x of the even / odd columns (P = 0 / 1). */
#ifdef __AVX2__
#define PREFETCH_BYTES 2048
static inline __m256 gather8_i16(const float *restrict x, const uint16_t *restrict c) {
    uint64_t a, b;
    __builtin_memcpy(&a, c, 8);
    __builtin_memcpy(&b, c + 4, 8);
    const __m128 lo = _mm_set_ps(x[a >> 48], x[(a >> 32) & 0xffff], x[(a >> 16) & 0xffff], x[a & 0xffff]);
    const __m128 hi = _mm_set_ps(x[b >> 48], x[(b >> 32) & 0xffff], x[(b >> 16) & 0xffff], x[b & 0xffff]);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
static inline __m256 gather8_i32(const float *restrict x, const int32_t *restrict c) {
    return _mm256_set_ps(x[c[7]], x[c[6]], x[c[5]], x[c[4]], x[c[3]], x[c[2]], x[c[1]], x[c[0]]);
}
static inline __m256 gather8_i16_eo(const float *restrict x, const uint16_t *restrict c, const int P) {
    uint64_t a, b, d, e;
    __builtin_memcpy(&a, c, 8);
    __builtin_memcpy(&b, c + 4, 8);
    __builtin_memcpy(&d, c + 8, 8);
    __builtin_memcpy(&e, c + 12, 8);
    const int s0 = 16 * P, s1 = 32 + 16 * P;
    const __m128 lo = _mm_set_ps(x[(b >> s1) & 0xffff], x[(b >> s0) & 0xffff], x[(a >> s1) & 0xffff], x[(a >> s0) & 0xffff]);
    const __m128 hi = _mm_set_ps(x[(e >> s1) & 0xffff], x[(e >> s0) & 0xffff], x[(d >> s1) & 0xffff], x[(d >> s0) & 0xffff]);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
static inline __m256 gather8_i32_eo(const float *restrict x, const int32_t *restrict c, const int P) {
    return _mm256_set_ps(x[c[14 + P]], x[c[12 + P]], x[c[10 + P]], x[c[8 + P]], x[c[6 + P]], x[c[4 + P]],
                         x[c[2 + P]], x[c[P]]);
}
#define STEP16_F32(GATHER)                                                                    \
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j), GATHER(x, cols + j), acc);       \
            acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j + 8), GATHER(x, cols + j + 8), acc2);
#define STEP16_BF16(GATHER)                                                                   \
            {                                                                                 \
                const __m256i v = _mm256_loadu_si256((const __m256i *)(vals + j));            \
                const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));            \
                const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u))); \
                acc = _mm256_fmadd_ps(even, GATHER##_eo(x, cols + j, 0), acc);                \
                acc2 = _mm256_fmadd_ps(odd, GATHER##_eo(x, cols + j, 1), acc2);               \
            }
#define CSR_MV_BODY(GATHER, LD, LD8, XLD, STEP16)                                             \
        __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();                         \
        for (; j + 16 <= end; j += 16) {                                                      \
            _mm_prefetch((const char *)(vals + j) + PREFETCH_BYTES, _MM_HINT_T0);             \
            _mm_prefetch((const char *)(vals + j) + PREFETCH_BYTES + 32, _MM_HINT_T0);        \
            _mm_prefetch((const char *)(cols + j) + PREFETCH_BYTES / 2, _MM_HINT_T0);         \
            STEP16(GATHER)                                                                    \
        }                                                                                     \
        if (j + 8 <= end) {                                                                   \
            acc = _mm256_fmadd_ps((__m256)LD8(vals + j), GATHER(x, cols + j), acc);           \
            j += 8;                                                                           \
        }                                                                                     \
        acc = _mm256_add_ps(acc, acc2);                                                       \
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));    \
        h = _mm_hadd_ps(h, h);                                                                \
        h = _mm_hadd_ps(h, h);                                                                \
        float s0 = _mm_cvtss_f32(h), s1 = 0.f, s2 = 0.f, s3 = 0.f;
#else
#define CSR_MV_BODY(GATHER, LD, LD8, XLD, STEP16)                                             \
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                         \
        for (; j + 4 <= end; j += 4) {                                                        \
            s0 += LD(vals, j) * XLD(x, cols[j]);                                              \
            s1 += LD(vals, j + 1) * XLD(x, cols[j + 1]);                                      \
            s2 += LD(vals, j + 2) * XLD(x, cols[j + 2]);                                      \
            s3 += LD(vals, j + 3) * XLD(x, cols[j + 3]);                                      \
        }
#endif
#define CSR_MV_ROWS(IDX, VT, LD, LD8, STEP16, GATHER)                                         \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        int64_t j = crow[r];                                                                  \
        const int64_t end = crow[r + 1];                                                      \
        CSR_MV_BODY(GATHER, LD, LD8, LD_F32, STEP16)                                          \
        for (; j < end; ++j) s0 += LD(vals, j) * x[cols[j]];                                  \
        const float sum = (bias ? bias[r] : 0.f) + ((s0 + s1) + (s2 + s3));                   \
        y[r] = ST_##VT(sum);                                                                  \
    }
#define CSR_MV(NAME, IDX, VT, LD, LD8, STEP16, GATHER)                                        \
void NAME(int64_t r0, int64_t r1, const int32_t *restrict crow, const IDX *restrict cols,     \
          const VT *restrict vals, const float *restrict x, const float *restrict bias,       \
          VT *restrict y) {                                                                   \
    CSR_MV_ROWS(IDX, VT, LD, LD8, STEP16, GATHER)                                             \
}
#define CSR_MV_BF16(NAME, IDX, GATHER)                                                        \
void NAME(int64_t r0, int64_t r1, const int32_t *restrict crow, const IDX *restrict cols,     \
          const bf16 *restrict vals, const bf16 *restrict xb, float *restrict x,              \
          int64_t n_widen, const float *restrict bias, bf16 *restrict y) {                    \
    bf16_to_f32(n_widen, xb, x);                                                              \
    CSR_MV_ROWS(IDX, bf16, LD_BF16, LD8_BF16, STEP16_BF16, GATHER)                            \
}
#define ST_float(v) (v)
#define ST_bf16(v) f32_bf16(v)
CSR_MV(csr_mv_i16, uint16_t, float, LD_F32, LD8_F32, STEP16_F32, gather8_i16)
CSR_MV(csr_mv_i32, int32_t, float, LD_F32, LD8_F32, STEP16_F32, gather8_i32)
CSR_MV_BF16(csr_mv_i16_bf16, uint16_t, gather8_i16)
CSR_MV_BF16(csr_mv_i32_bf16, int32_t, gather8_i32)

/* Several tokens, CSR, one tile of TW tokens: acc[TW] += v * xt[col, 0:TW] per stored
   weight, the TW sums kept in registers (TW / 8 vectors), in S sets taking the stored weights
   in turn: with one set every weight waits for the previous weight's FMAs (4 cycles of
   latency on Zen 3 and Skylake); S sets overlap S weights. */
#define CSR_MM_TILE(NAME, IDX, VT, LD, TW, S)                                                 \
static void NAME(int64_t r0, int64_t r1, const int32_t *restrict crow,                        \
                 const IDX *restrict cols, const VT *restrict vals,                           \
                 const float *restrict xt, const float *restrict bias, float *restrict out,   \
                 int first) {  /* rows [r0, r1): sums to out [r1 - r0][TW] */                 \
    enum { U = (TW) / 8 };                                                                    \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        f8 acc[S][U];                                                                         \
        f8 *q = (f8 *)(out + (r - r0) * (TW));                                                \
        const float b0 = bias ? bias[r] : 0.f;                                                \
        for (int u = 0; u < U; ++u) {                                                         \
            acc[0][u] = first ? (f8){b0, b0, b0, b0, b0, b0, b0, b0} : q[u];                  \
            for (int k = 1; k < (S); ++k) acc[k][u] = (f8){0};                                \
        }                                                                                     \
        int64_t j = crow[r];                                                                  \
        const int64_t end = crow[r + 1];                                                      \
        for (; j + (S) <= end; j += (S)) {                                                    \
            for (int k = 0; k < (S); ++k) {                                                   \
                const float v = LD(vals, j + k);                                              \
                const f8 *p = (const f8 *)(xt + (int64_t)cols[j + k] * (TW));                 \
                for (int u = 0; u < U; ++u) acc[k][u] += v * p[u];                            \
            }                                                                                 \
        }                                                                                     \
        for (; j < end; ++j) {                                                                \
            const float v = LD(vals, j);                                                      \
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
CSR_MM_TILE(csr_mm_i16_8, uint16_t, float, LD_F32, 8, 4)
CSR_MM_TILE(csr_mm_i16_16, uint16_t, float, LD_F32, 16, 4)
CSR_MM_TILE(csr_mm_i16_24, uint16_t, float, LD_F32, 24, 3)
CSR_MM_TILE(csr_mm_i16_32, uint16_t, float, LD_F32, 32, 3)
CSR_MM_TILE(csr_mm_i32_8, int32_t, float, LD_F32, 8, 4)
CSR_MM_TILE(csr_mm_i32_16, int32_t, float, LD_F32, 16, 4)
CSR_MM_TILE(csr_mm_i32_24, int32_t, float, LD_F32, 24, 3)
CSR_MM_TILE(csr_mm_i32_32, int32_t, float, LD_F32, 32, 3)
CSR_MM_TILE(csr_mm_i16_bf16_8, uint16_t, bf16, LD_BF16, 8, 4)
CSR_MM_TILE(csr_mm_i16_bf16_16, uint16_t, bf16, LD_BF16, 16, 4)
CSR_MM_TILE(csr_mm_i16_bf16_24, uint16_t, bf16, LD_BF16, 24, 3)
CSR_MM_TILE(csr_mm_i16_bf16_32, uint16_t, bf16, LD_BF16, 32, 3)
CSR_MM_TILE(csr_mm_i32_bf16_8, int32_t, bf16, LD_BF16, 8, 4)
CSR_MM_TILE(csr_mm_i32_bf16_16, int32_t, bf16, LD_BF16, 16, 4)
CSR_MM_TILE(csr_mm_i32_bf16_24, int32_t, bf16, LD_BF16, 24, 3)
CSR_MM_TILE(csr_mm_i32_bf16_32, int32_t, bf16, LD_BF16, 32, 3)

/* One token, BSR with B = b a multiple of 8: the b outputs of a block row in B / 8 vector
   sums, two sets (even and odd j) so that consecutive FMAs do not wait on each other. The
   blocks in fp32 or bf16 (widened eight at a time where they are used). */
#define BSR_MV_VEC(NAME, VT, LD, LD8, STORE8)                                                 \
static inline __attribute__((always_inline)) void                                             \
NAME(int64_t rb0, int64_t rb1, const int B, const int32_t *restrict crow,                     \
     const int32_t *restrict bcols, const VT *restrict blocks, const VT *restrict x,          \
     const float *restrict bias, VT *restrict y) {                                            \
    const int U = B / 8;                                                                      \
    for (int64_t rb = rb0; rb < rb1; ++rb) {                                                  \
        f8 a0[8], a1[8];  /* U <= 8 (b <= 64) */                                              \
        for (int u = 0; u < U; ++u) {                                                         \
            a0[u] = bias ? *(const f8 *)(bias + rb * B + 8 * u) : (f8){0};                    \
            a1[u] = (f8){0};                                                                  \
        }                                                                                     \
        for (int64_t n = crow[rb]; n < crow[rb + 1]; ++n) {                                   \
            const VT *xs = x + (int64_t)bcols[n] * B;                                         \
            const VT *col = blocks + n * B * B;  /* [j][i] */                                 \
            for (int j = 0; j < B; j += 2) {                                                  \
                const float x0 = LD(xs, j), x1 = LD(xs, j + 1);                               \
                for (int u = 0; u < U; ++u) {                                                 \
                    a0[u] += x0 * LD8(col + (j * U + u) * 8);                                 \
                    a1[u] += x1 * LD8(col + ((j + 1) * U + u) * 8);                           \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        for (int u = 0; u < U; ++u) STORE8(y + rb * B + 8 * u, a0[u] + a1[u]);                \
    }                                                                                         \
}
#define STORE8_F32(p, v) (*(f8 *)(p) = (v))
#define STORE8_BF16(p, v) store_bf16x8(p, v)
BSR_MV_VEC(bsr_mv_vec, float, LD_F32, LD8_F32, STORE8_F32)
BSR_MV_VEC(bsr_mv_vec_bf16, bf16, LD_BF16, LD8_BF16, STORE8_BF16)

/* One token, BSR, any b: y's b outputs summed in place (they stay in L1). */
#define BSR_MV_ANY(NAME, VT, LD)                                                              \
static void NAME(int64_t rb0, int64_t rb1, int64_t b, const int32_t *restrict crow,           \
                 const int32_t *restrict bcols, const VT *restrict blocks,                    \
                 const VT *restrict x, const float *restrict bias, VT *restrict y) {          \
    for (int64_t rb = rb0; rb < rb1; ++rb) {                                                  \
        for (int64_t i0 = 0; i0 < b; i0 += 64) {  /* 64 sums of y at a time, in registers */  \
            const int64_t m = b - i0 < 64 ? b - i0 : 64;                                      \
            float yr[64];                                                                     \
            for (int64_t i = 0; i < m; ++i) yr[i] = bias ? bias[rb * b + i0 + i] : 0.f;       \
            for (int64_t n = crow[rb]; n < crow[rb + 1]; ++n) {                               \
                const VT *xs = x + (int64_t)bcols[n] * b;                                     \
                const VT *col = blocks + n * b * b + i0;                                      \
                for (int64_t j = 0; j < b; ++j) {                                             \
                    const float xj = LD(xs, j);                                               \
                    for (int64_t i = 0; i < m; ++i) yr[i] += xj * LD(col, j * b + i);         \
                }                                                                             \
            }                                                                                 \
            for (int64_t i = 0; i < m; ++i) y[rb * b + i0 + i] = ST_##VT(yr[i]);              \
        }                                                                                     \
    }                                                                                         \
}
BSR_MV_ANY(bsr_mv_any, float, LD_F32)
BSR_MV_ANY(bsr_mv_any_bf16, bf16, LD_BF16)

#define BSR_MV(NAME, VT, VEC, ANY)                                                            \
void NAME(int64_t rb0, int64_t rb1, int64_t b, const int32_t *restrict crow,                  \
          const int32_t *restrict bcols, const VT *restrict blocks, const VT *restrict x,     \
          const float *restrict bias, VT *restrict y) {                                       \
    switch (b) {                                                                              \
    case 8: VEC(rb0, rb1, 8, crow, bcols, blocks, x, bias, y); break;                         \
    case 16: VEC(rb0, rb1, 16, crow, bcols, blocks, x, bias, y); break;                       \
    case 32: VEC(rb0, rb1, 32, crow, bcols, blocks, x, bias, y); break;                       \
    case 64: VEC(rb0, rb1, 64, crow, bcols, blocks, x, bias, y); break;                       \
    default: ANY(rb0, rb1, b, crow, bcols, blocks, x, bias, y);                               \
    }                                                                                         \
}
BSR_MV(bsr_mv, float, bsr_mv_vec, bsr_mv_any)
BSR_MV(bsr_mv_bf16, bf16, bsr_mv_vec_bf16, bsr_mv_any_bf16)

/* Token tiles (the layout of csr_mm_*): x [T, n] at element strides (st, sc) -> xt [n_tiles, n,
   TW], tokens past T zero; unpack_tokens writes the columns [r0, r1) of y [T, n] (row stride
   ld) back from yt [n_tiles, n, TW]. With AVX in 8 x 8 transposes in registers (torch's permute
   copies of these layouts took as long as the product at T = 197; plain loops ~1.5 ns per
   element), else element by element. */
#ifdef __AVX__
static inline void transpose8(__m256 *r) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

/* x [T, n] as fp32 (X_F32) or bf16 (X_BF16, widened on the way: the tiles are fp32) */
#define X_F32(p) _mm256_loadu_ps(p)
#define X_BF16(p) ((__m256)load_bf16x8(p))
#define PACK_TOKENS(NAME, VT, LD, LOADX)                                                      \
void NAME(int64_t T, int64_t n, const VT *restrict x, int64_t st, int64_t sc, int64_t tw,     \
          float *restrict xt, int64_t threads) {                                              \
    const int64_t n_tiles = (T + tw - 1) / tw;                                                \
    PACK_PARALLEL                                                                             \
    for (int64_t t = 0; t < n_tiles; ++t) {                                                   \
        float *d = xt + t * n * tw;                                                           \
        int64_t c0 = 0;                                                                       \
        PACK_AVX(LOADX)                                                                       \
        for (int64_t c = c0; c < n; ++c)                                                      \
            for (int64_t j = 0; j < tw; ++j) {                                                \
                const int64_t tok = t * tw + j;                                               \
                d[c * tw + j] = tok < T ? LD(x, tok * st + c * sc) : 0.f;                     \
            }                                                                                 \
    }                                                                                         \
}
#ifdef __AVX__
#define PACK_AVX(LOADX)                                                                       \
        if (sc == 1 && tw % 8 == 0) {                                                         \
            for (; c0 + 8 <= n; c0 += 8)                                                      \
                for (int64_t j0 = 0; j0 < tw; j0 += 8) {                                      \
                    __m256 r[8];                                                              \
                    for (int m = 0; m < 8; ++m) {                                             \
                        const int64_t tok = t * tw + j0 + m;                                  \
                        r[m] = tok < T ? LOADX(x + tok * st + c0) : _mm256_setzero_ps();      \
                    }                                                                         \
                    transpose8(r);                                                            \
                    for (int m = 0; m < 8; ++m) _mm256_storeu_ps(d + (c0 + m) * tw + j0, r[m]); \
                }                                                                             \
        }
#else
#define PACK_AVX(LOADX)
#endif
PACK_TOKENS(pack_tokens, float, LD_F32, X_F32)
PACK_TOKENS(pack_tokens_bf16, bf16, LD_BF16, X_BF16)

/* y as fp32 (Y_F32) or bf16 rounded to nearest even (Y_BF16). unpack_tile_*: one tile's sums
   s [n_cols][tw] -> y[j * ld + c] for its valid tokens j; in blocks of 64 columns, and within a
   block token rows outermost (8 at a time, in 8 x 8 transposes with AVX), so that the rows
   written at once are only eight: y's rows for 3072 bf16 outputs lie 6 KB apart, and 32 of them
   in flight (the columns outermost) shared two of L1D's sets - unpack_tokens_bf16 of [1576,
   3072] took 3.7 ms that way, 2.4 ms with the token rows outermost over all columns (Zen 4); the
   blocks keep a block's sums in L1 for its token rows. */
#define Y_F32(p, v) _mm256_storeu_ps(p, v)
#define Y_BF16(p, v) store_bf16x8(p, (f8)(v))
#define ST_F32(v) (v)
#define ST_BF16(v) f32_bf16(v)
#define UNPACK_TILE(NAME, VT, ST, STOREY)                                                     \
static inline void NAME(const float *restrict s, int64_t n_cols, int64_t valid, int64_t tw,   \
                        VT *restrict y, int64_t ld) {                                         \
    int64_t c0 = 0;                                                                           \
    UNPACK_AVX(STOREY)                                                                        \
    for (int64_t c = c0; c < n_cols; ++c)                                                     \
        for (int64_t j = 0; j < valid; ++j) y[j * ld + c] = ST(s[c * tw + j]);                \
}
#ifdef __AVX__
#define UNPACK_AVX(STOREY)                                                                    \
    if (tw % 8 == 0) {                                                                        \
        c0 = n_cols / 8 * 8;                                                                  \
        for (int64_t cb = 0; cb < c0; cb += 64) {                                             \
            const int64_t ce = cb + 64 < c0 ? cb + 64 : c0;                                   \
            for (int64_t j0 = 0; j0 < valid; j0 += 8)                                         \
                for (int64_t c = cb; c < ce; c += 8) {                                        \
                    __m256 r[8];                                                              \
                    for (int m = 0; m < 8; ++m) r[m] = _mm256_loadu_ps(s + (c + m) * tw + j0); \
                    transpose8(r);                                                            \
                    for (int m = 0; m < 8 && j0 + m < valid; ++m) STOREY(y + (j0 + m) * ld + c, r[m]); \
                }                                                                             \
        }                                                                                     \
    }
#else
#define UNPACK_AVX(STOREY)
#endif
UNPACK_TILE(unpack_tile_f32, float, ST_F32, Y_F32)
UNPACK_TILE(unpack_tile_bf16, bf16, ST_BF16, Y_BF16)
#define UNPACK_TOKENS(NAME, VT, TILE)                                                         \
void NAME(int64_t r0, int64_t r1, int64_t T, int64_t n, int64_t tw, const float *restrict yt, \
          VT *restrict y, int64_t ld) {                                                       \
    for (int64_t t = 0; t * tw < T; ++t)                                                      \
        TILE(yt + (t * n + r0) * tw, r1 - r0, T - t * tw < tw ? T - t * tw : tw, tw,          \
             y + t * tw * ld + r0, ld);                                                       \
}
UNPACK_TOKENS(unpack_tokens, float, unpack_tile_f32)
UNPACK_TOKENS(unpack_tokens_bf16, bf16, unpack_tile_bf16)

/* Several tokens: rows [r0, r1) of y [T, n_out] (row stride ld; bf16 for y_bf16, else fp32).
   Every tile of TW tokens in turn, within a tile CSR_MM_ROWS rows at a time, and for those
   every panel of columns in turn: the CSR is stored panel by panel (crow [n_panels * n_out +
   1], row r of panel p at crow[p * n_out + r]), so the xt rows a panel reads (PANEL = 512
   columns x TW x 4 B = 64 KB at TW = 32) stay in L2 while the weights stream past (one panel,
   a 3072-wide tile, 384 KB, took ~1.2x longer at T = 32 on the EPYC); the rows' sums stay in a
   buffer until they are written to y (unpack_tile_*), as csr_mm_*_dpbf16 does: 64 rows' on the
   stack (8 KB), or with rows_acc ([n_out, tw], for a weight in several panels) all of [r0, r1)
   at once, so that each panel is read by every row before the next - 64 rows at a time through
   every panel was 8-14% slower at 256 tokens (fp32 fan-in inference, 3072 -> 768, Zen 4).
   Returns 0, or -1 for a TW without a kernel. */
#define CSR_MM_ROWS 64
#define CSR_MM(NAME, IDX, VT, T8, T16, T24, T32)                                              \
int NAME(int64_t r0, int64_t r1, int64_t n_in, int64_t n_out, int64_t T, int64_t tw,          \
         int64_t n_panels, const int32_t *restrict crow, const IDX *restrict cols,            \
         const VT *restrict vals, const float *restrict xt, const float *restrict bias,       \
         void *restrict y, int64_t ld, int y_bf16, float *restrict rows_acc) {                \
    float stack_acc[CSR_MM_ROWS * 32] __attribute__((aligned(64)));                           \
    float *acc = rows_acc ? rows_acc + r0 * tw : stack_acc;                                   \
    const int64_t chunk = rows_acc ? r1 - r0 : CSR_MM_ROWS;                                   \
    if (tw != 8 && tw != 16 && tw != 24 && tw != 32) return -1;                               \
    for (int64_t t = 0; t * tw < T; ++t) {                                                    \
        const float *xs = xt + t * n_in * tw;                                                 \
        const int64_t valid = T - t * tw < tw ? T - t * tw : tw;                              \
        for (int64_t c = r0; c < r1; c += chunk) {                                            \
            const int64_t c1 = c + chunk < r1 ? c + chunk : r1;                               \
            for (int64_t p = 0; p < n_panels; ++p) {                                          \
                const int32_t *cp = crow + p * n_out;                                         \
                switch (tw) {                                                                 \
                case 8: T8(c, c1, cp, cols, vals, xs, bias, acc, p == 0); break;              \
                case 16: T16(c, c1, cp, cols, vals, xs, bias, acc, p == 0); break;            \
                case 24: T24(c, c1, cp, cols, vals, xs, bias, acc, p == 0); break;            \
                default: T32(c, c1, cp, cols, vals, xs, bias, acc, p == 0); break;            \
                }                                                                             \
            }                                                                                 \
            if (y_bf16)                                                                       \
                unpack_tile_bf16(acc, c1 - c, valid, tw, (bf16 *)y + t * tw * ld + c, ld);    \
            else                                                                              \
                unpack_tile_f32(acc, c1 - c, valid, tw, (float *)y + t * tw * ld + c, ld);    \
        }                                                                                     \
    }                                                                                         \
    return 0;                                                                                 \
}
CSR_MM(csr_mm_i16, uint16_t, float, csr_mm_i16_8, csr_mm_i16_16, csr_mm_i16_24, csr_mm_i16_32)
CSR_MM(csr_mm_i32, int32_t, float, csr_mm_i32_8, csr_mm_i32_16, csr_mm_i32_24, csr_mm_i32_32)
CSR_MM(csr_mm_i16_bf16, uint16_t, bf16, csr_mm_i16_bf16_8, csr_mm_i16_bf16_16, csr_mm_i16_bf16_24,
       csr_mm_i16_bf16_32)
CSR_MM(csr_mm_i32_bf16, int32_t, bf16, csr_mm_i32_bf16_8, csr_mm_i32_bf16_16, csr_mm_i32_bf16_24,
       csr_mm_i32_bf16_32)

/* g[0:8] += the eight sums of the eight vectors v[0:8]. */
static inline void add_hsum8(const f8 *v, float *restrict g) {
#ifdef __AVX__
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps((__m256)v[0], (__m256)v[1]), _mm256_hadd_ps((__m256)v[2], (__m256)v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps((__m256)v[4], (__m256)v[5]), _mm256_hadd_ps((__m256)v[6], (__m256)v[7]));
    const __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    _mm256_storeu_ps(g, _mm256_add_ps(_mm256_loadu_ps(g), s));
#else
    for (int k = 0; k < 8; ++k)
        g[k] += ((v[k][0] + v[k][1]) + (v[k][2] + v[k][3])) + ((v[k][4] + v[k][5]) + (v[k][6] + v[k][7]));
#endif
}

/* Weight gradient at the stored elements (an SDDMM): g[i] = sum_t dy[t, rows[i]] x[t, cols[i]]
   for i in [i0, i1), dy and x in token tiles (pack_tokens: dyt [n_tiles, M, TW], xt [n_tiles,
   N, TW]), TW = 16 or 32. Tile by tile (one tile of x, N x TW x 4 B, stays in L2 while every
   weight reads its row), eight weights at a time: eight independent chains of TW / 8 FMAs,
   whose eight sums are reduced together (add_hsum8) and added to g. Returns -1 for another TW. */
/* g[j] += the dots, over a tile of TW tokens, of the dy values A(j, u) (u < TW / 8 vectors)
   and the x row cols[j] of xs, for j from J to END: eight weights at a time (eight independent
   chains of TW / 8 FMAs, their sums reduced together by add_hsum8), then one by one. */
#define SDDMM_DOTS(J, END, A, TW)                                                             \
    for (; (J) + 8 <= (END); (J) += 8) {                                                      \
        f8 s[8];                                                                              \
        for (int k = 0; k < 8; ++k) {                                                         \
            const f8 *b = (const f8 *)(xs + (int64_t)cols[(J) + k] * (TW));                   \
            s[k] = A((J) + k, 0) * b[0];                                                      \
            for (int u = 1; u < (TW) / 8; ++u) s[k] += A((J) + k, u) * b[u];                  \
        }                                                                                     \
        add_hsum8(s, g + (J));                                                                \
    }                                                                                         \
    for (; (J) < (END); ++(J)) {                                                              \
        const f8 *b = (const f8 *)(xs + (int64_t)cols[J] * (TW));                             \
        f8 v = A(J, 0) * b[0];                                                                \
        for (int u = 1; u < (TW) / 8; ++u) v += A(J, u) * b[u];                               \
        g[J] += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));            \
    }
#define DY_OF_ROW(i, u) (((const f8 *)(dys + (int64_t)rows[i] * TILE_W))[u])  /* TILE_W: the tile's TW */
#define SDDMM_TILES(NAME, TW)                                                                 \
static void NAME(int64_t i0, int64_t i1, int64_t n_tiles, int64_t M, int64_t N,               \
                 const int32_t *restrict rows, const int32_t *restrict cols,                  \
                 const float *restrict dyt, const float *restrict xt, float *restrict g) {    \
    enum { TILE_W = (TW) };                                                                   \
    for (int64_t i = i0; i < i1; ++i) g[i] = 0.f;                                             \
    for (int64_t t = 0; t < n_tiles; ++t) {                                                   \
        const float *dys = dyt + t * M * (TW), *xs = xt + t * N * (TW);                       \
        int64_t i = i0;                                                                       \
        SDDMM_DOTS(i, i1, DY_OF_ROW, TW)                                                      \
    }                                                                                         \
}
SDDMM_TILES(sddmm_tiles_16, 16)
SDDMM_TILES(sddmm_tiles_32, 32)

int sddmm_tiles(int64_t i0, int64_t i1, int64_t n_tiles, int64_t tw, int64_t M, int64_t N,
                const int32_t *restrict rows, const int32_t *restrict cols, const float *restrict dyt,
                const float *restrict xt, float *restrict g) {
    switch (tw) {
    case 16: sddmm_tiles_16(i0, i1, n_tiles, M, N, rows, cols, dyt, xt, g); return 0;
    case 32: sddmm_tiles_32(i0, i1, n_tiles, M, N, rows, cols, dyt, xt, g); return 0;
    default: return -1;
    }
}

/* The same weight gradient at elements stored row by row (a CSR: fan-in's rows, the sorted
   coordinates of an unstructured layer or of element diagonals): g[j] = sum_t dy[t, r] x[t,
   cols[j]] for j in [crow[r], crow[r + 1]), rows [r0, r1), dy and x in token tiles as above.
   A row's TW dy values are loaded into registers once a tile, so a weight costs its column
   index and TW / 8 x loads and FMAs (sddmm_tiles: a row index and TW / 8 dy loads more), the
   sums of eight weights reduced together. Returns -1 for another TW. */
#define DY_IN_REGISTERS(i, u) (a[u])
/* The weight gradient of coordinates stored row by row, each dy row's TW tokens held in registers
   for its row's weights (RT registers of PER elements ET; LOADR(p) loads one): the fp32 sddmm_rows
   here, the bf16 sddmm_rows_dpbf16 below, each with its dots (DOTS). */
#define SDDMM_ROW_LOOP(NAME, TW, ET, RT, PER, LOADR, DOTS, A)                                 \
static void NAME(int64_t r0, int64_t r1, int64_t n_tiles, int64_t M, int64_t N,               \
                 const int32_t *restrict crow, const int32_t *restrict cols,                  \
                 const ET *restrict dyt, const ET *restrict xt, float *restrict g) {          \
    for (int64_t j = crow[r0]; j < crow[r1]; ++j) g[j] = 0.f;                                 \
    for (int64_t t = 0; t < n_tiles; ++t) {                                                   \
        const ET *dys = dyt + t * M * (TW), *xs = xt + t * N * (TW);                          \
        for (int64_t r = r0; r < r1; ++r) {                                                   \
            RT a[(TW) / (PER)];                                                               \
            for (int u = 0; u < (TW) / (PER); ++u) a[u] = LOADR(dys + r * (TW) + (PER) * u);  \
            int64_t j = crow[r];                                                              \
            const int64_t end = crow[r + 1];                                                  \
            DOTS(j, end, A, TW)                                                               \
        }                                                                                     \
    }                                                                                         \
}
#define LOAD_F8(p) (*(const f8 *)(p))
#define SDDMM_ROWS(NAME, TW) SDDMM_ROW_LOOP(NAME, TW, float, f8, 8, LOAD_F8, SDDMM_DOTS, DY_IN_REGISTERS)
SDDMM_ROWS(sddmm_rows_16, 16)
SDDMM_ROWS(sddmm_rows_32, 32)

int sddmm_rows(int64_t r0, int64_t r1, int64_t n_tiles, int64_t tw, int64_t M, int64_t N,
               const int32_t *restrict crow, const int32_t *restrict cols, const float *restrict dyt,
               const float *restrict xt, float *restrict g) {
    switch (tw) {
    case 16: sddmm_rows_16(r0, r1, n_tiles, M, N, crow, cols, dyt, xt, g); return 0;
    case 32: sddmm_rows_32(r0, r1, n_tiles, M, N, crow, cols, dyt, xt, g); return 0;
    default: return -1;
    }
}

/* Block products of b x b blocks, b a multiple of 8 (block diagonals b = 8 / 16 / 32 / 64, and any
   BSR): the training step's forward and input gradient (bsr_mm) and weight gradient
   (sddmm_blocks), and inference of several tokens. In fp32 (bf16 operands widened by the caller:
   the packs widen x, bf16 blocks are kept as their fp32 values), on the GCC vectors, so every
   build runs them. What a block buys over its elements as a CSR (csr_mm, sddmm_tiles): a loaded
   x row serves RO outputs from registers instead of one, so the loop does about one load per
   FMA-pair instead of one per FMA, and the dW dots need no horizontal sums.

   bsr_mm: y = x W^T + bias over token tiles (the layout of csr_mm_*: xt [n_tiles, n_in, TW], yt
   [n_tiles, n_out, TW], TW = 8 or 16) for block rows [rb0, rb1). The block at CSR position n is
   blocks[bidx ? bidx[n] : n] (so a caller passes its value order, no copy), W[o, i] of it at
   o * so + i * si: (so, si) = (b, 1) for blocks stored [o][i], (1, b) for [i][o], so the same
   blocks serve the forward (the CSR of W) and the input gradient (the CSR of W^T, (so, si)
   swapped). Tile by tile, block row by block row, block by block: the block row's b x TW sums
   live in yt (in L1), and for each block RO of its outputs x TW tokens at a time are RO * TW / 8
   vector sums in registers (eight chains in flight, FMA latency 4 on Zen 3 and Skylake): per
   input of the block one x row (TW / 8 loads) and RO weight broadcasts for RO * TW / 8 FMAs,
   the block's x rows (b x TW x 4 B) read from L1 by its b / RO register tiles. (DiagLinear b =
   16 3072 -> 768 at 90%, 256 tokens, EPYC, kernel alone: 1.50 ms, 1.31 with every block reading
   the same x and weights; the sums of a register tile kept over a whole block row, so that a
   block row's x rows and weights - 40 KB, past L1 - were re-read by each register tile, took
   1.98 ms, and 1.72 with block rows outer and tiles inner.) Returns -1 for another TW or b. */
#define BSR_MM_TILE(NAME, TW, RO)                                                            \
static void NAME(int64_t rb0, int64_t rb1, int64_t b, const int32_t *restrict crow,           \
                 const int32_t *restrict bcols, const int32_t *restrict bidx,                 \
                 const float *restrict blocks, int64_t so, int64_t si,                        \
                 const float *restrict xs, const float *restrict bias, float *restrict ys) {  \
    enum { U = (TW) / 8 };                                                                    \
    for (int64_t rb = rb0; rb < rb1; ++rb) {                                                  \
        f8 *yr = (f8 *)(ys + rb * b * (TW));  /* the block row's b x TW sums, in L1 */        \
        for (int64_t o = 0; o < b; ++o) {                                                     \
            const float b0 = bias ? bias[rb * b + o] : 0.f;                                   \
            for (int u = 0; u < U; ++u) yr[o * U + u] = (f8){b0, b0, b0, b0, b0, b0, b0, b0};  \
        }                                                                                     \
        for (int64_t n = crow[rb]; n < crow[rb + 1]; ++n) {                                   \
            const float *wn = blocks + (int64_t)(bidx ? bidx[n] : n) * b * b;                 \
            const float *xb = xs + (int64_t)bcols[n] * b * (TW);                              \
            for (int64_t o0 = 0; o0 < b; o0 += (RO)) {                                        \
                const float *w = wn + o0 * so;                                                \
                f8 acc[RO][U];                                                                \
                for (int r = 0; r < (RO); ++r)                                                \
                    for (int u = 0; u < U; ++u) acc[r][u] = yr[(o0 + r) * U + u];             \
                for (int64_t i = 0; i < b; ++i) {                                             \
                    const f8 *p = (const f8 *)(xb + i * (TW));                                \
                    for (int r = 0; r < (RO); ++r) {                                          \
                        const float v = w[r * so + i * si];                                   \
                        for (int u = 0; u < U; ++u) acc[r][u] += v * p[u];                    \
                    }                                                                         \
                }                                                                             \
                for (int r = 0; r < (RO); ++r)                                                \
                    for (int u = 0; u < U; ++u) yr[(o0 + r) * U + u] = acc[r][u];             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}
BSR_MM_TILE(bsr_mm_8, 8, 8)
BSR_MM_TILE(bsr_mm_16, 16, 4)

int bsr_mm(int64_t rb0, int64_t rb1, int64_t b, int64_t n_in, int64_t n_out, int64_t n_tiles, int64_t tw,
           const int32_t *restrict crow, const int32_t *restrict bcols, const int32_t *restrict bidx,
           const float *restrict blocks, int64_t so, int64_t si, const float *restrict xt,
           const float *restrict bias, float *restrict yt) {
    if (b % 8 || (tw != 8 && tw != 16)) return -1;
    for (int64_t t = 0; t < n_tiles; ++t) {
        const float *xs = xt + t * n_in * tw;
        float *ys = yt + t * n_out * tw;
        if (tw == 8) bsr_mm_8(rb0, rb1, b, crow, bcols, bidx, blocks, so, si, xs, bias, ys);
        else bsr_mm_16(rb0, rb1, b, crow, bcols, bidx, blocks, so, si, xs, bias, ys);
    }
    return 0;
}

/* sddmm_blocks: the weight gradient at stored b x b blocks, g[n][o][i] = sum_t dy_t[rows[n]][o]
   x_t[cols[n]][i] for blocks [n0, n1), dy and x fp32 in blocks of columns: element (t, block
   q, k) at q * bs + t * ld + k (bs = b, ld = the row length for [T, M] as it is; bs = T b, ld =
   b for the packed [M / b, T, b] of pack_blocks, which the callers use: in place, the rows of a
   block column lie a row of x apart, 12 KB for 3072 columns, a multiple of 4 KB, so all of them
   fall in one set of the 8-way L1 and every register tile re-read them from L2; the dW of
   DiagLinear b = 16 3072 -> 768 at 90%, 256 tokens, took 2.7 ms in place against 1.5 packed on
   the EPYC, and a copy of each block's chunk into a buffer cost more than it saved at b = 16).
   For each token an outer product, RO outputs broadcast against 8 * IV inputs (RO * IV vector
   sums, eight chains), no reduction across lanes; tokens in chunks of SDDMM_BLOCK_TOKENS * 16 /
   b (128 at b = 16, 32 at b = 64), so that the chunk's 2 x 8 KB stay in L1 while the b / RO x
   b / (8 IV) register tiles read it, the sums going through g between chunks. Returns -1 for a
   b not a multiple of 8. */
#define SDDMM_BLOCK_TOKENS 128
#define SDDMM_BLOCK(NAME, RO, IV)                                                             \
static void NAME(int64_t n0, int64_t n1, int64_t b, int64_t T, const int32_t *restrict rows,  \
                 const int32_t *restrict cols, const float *restrict dy, int64_t bsy,         \
                 int64_t ldy, const float *restrict x, int64_t bsx, int64_t ldx,              \
                 float *restrict g) {                                                         \
    const int64_t tc = SDDMM_BLOCK_TOKENS * 16 / b > 0 ? SDDMM_BLOCK_TOKENS * 16 / b : 1;      \
    for (int64_t n = n0; n < n1; ++n) {                                                       \
        const float *a = dy + (int64_t)rows[n] * bsy, *c = x + (int64_t)cols[n] * bsx;        \
        float *gn = g + n * b * b;                                                            \
        for (int64_t t0 = 0; t0 < T; t0 += tc) {                                              \
            const int64_t t1 = T - t0 < tc ? T : t0 + tc;                                     \
            for (int64_t o0 = 0; o0 < b; o0 += (RO))                                          \
                for (int64_t i0 = 0; i0 < b; i0 += 8 * (IV)) {                                \
                    f8 acc[RO][IV];                                                           \
                    for (int r = 0; r < (RO); ++r)                                            \
                        for (int u = 0; u < (IV); ++u)                                        \
                            acc[r][u] = t0 ? *(const f8 *)(gn + (o0 + r) * b + i0 + 8 * u) : (f8){0}; \
                    for (int64_t t = t0; t < t1; ++t) {                                       \
                        const f8 *xv = (const f8 *)(c + t * ldx + i0);                        \
                        const float *av = a + t * ldy + o0;                                   \
                        for (int r = 0; r < (RO); ++r) {                                      \
                            const float v = av[r];                                            \
                            for (int u = 0; u < (IV); ++u) acc[r][u] += v * xv[u];            \
                        }                                                                     \
                    }                                                                         \
                    for (int r = 0; r < (RO); ++r)                                            \
                        for (int u = 0; u < (IV); ++u) *(f8 *)(gn + (o0 + r) * b + i0 + 8 * u) = acc[r][u]; \
                }                                                                             \
        }                                                                                     \
    }                                                                                         \
}
SDDMM_BLOCK(sddmm_blocks_16, 4, 2)
SDDMM_BLOCK(sddmm_blocks_8, 8, 1)

int sddmm_blocks(int64_t n0, int64_t n1, int64_t b, int64_t T, const int32_t *restrict rows,
                 const int32_t *restrict cols, const float *restrict dy, int64_t bsy, int64_t ldy,
                 const float *restrict x, int64_t bsx, int64_t ldx, float *restrict g) {
    if (b % 8) return -1;
    if (T == 0) {
        for (int64_t k = n0 * b * b; k < n1 * b * b; ++k) g[k] = 0.f;
        return 0;
    }
    if (b % 16 == 0) sddmm_blocks_16(n0, n1, b, T, rows, cols, dy, bsy, ldy, x, bsx, ldx, g);
    else sddmm_blocks_8(n0, n1, b, T, rows, cols, dy, bsy, ldy, x, bsx, ldx, g);
    return 0;
}

/* x [T, n] (element strides st, sc; fp32 or bf16, widened) -> xp [n / b, T, b] fp32: the block
   columns of sddmm_blocks, each T x b contiguous. */
#define PACK_BLOCKS(NAME, VT, LD, LD8)                                                        \
void NAME(int64_t T, int64_t n, const VT *restrict x, int64_t st, int64_t sc, int64_t b,      \
          float *restrict xp, int64_t threads) {                                              \
    PACK_PARALLEL                                                                             \
    for (int64_t t = 0; t < T; ++t) {                                                         \
        const VT *row = x + t * st;                                                           \
        for (int64_t q = 0; q < n / b; ++q) {                                                 \
            float *d = xp + (q * T + t) * b;                                                  \
            int64_t k = 0;                                                                    \
            if (sc == 1)                                                                      \
                for (; k + 8 <= b; k += 8) *(f8 *)(d + k) = LD8(row + q * b + k);             \
            for (; k < b; ++k) d[k] = LD(row, (q * b + k) * sc);                              \
        }                                                                                     \
    }                                                                                         \
}
PACK_BLOCKS(pack_blocks, float, LD_F32, LD8_F32)
PACK_BLOCKS(pack_blocks_bf16, bf16, LD_BF16, LD8_BF16)

/* The instructions of the optional kernels below (bsr16_mm_amx: AMX tiles; bsr16_mv_dpbf16 and
   csr_mm_*_dpbf16: AVX-512-BF16) behind wrappers, so that each kernel is written once: the amx /
   avx512-bf16 builds map every wrapper to its intrinsic one to one; the emu build
   (-DSPARSE_CPU_EMU with the AVX2 flags: kernels.cpu's "emu" variant, for any AVX2 CPU, chosen
   only by KERNELS_CPU_VARIANT=emu) maps them to the portable C below, which follows the
   operation the Intel SDM (vol. 2) gives for VDPBF16PS, VCVTNEPS2BF16, VPUNPCKLWD, VPUNPCKHWD,
   VBROADCASTSS, LDTILECFG, TILEZERO, TILELOADD, TDPBF16PS, TILESTORED and TILERELEASE. The kernels' own source then runs, and is tested, on
   CPUs without the instructions. (GCC's immintrin.h declares the _mm512_* / _tile_* names with
   target attributes: the emu build cannot define or call them, hence the names of our own.)
   What is modelled: bf16 pairs into fp32 lanes; each multiply-add is one FMA rounded to
   nearest even, denormal inputs read as signed zero (DAZ) and denormal results, judged after
   rounding, written as signed zero (FTZ); MXCSR neither read nor written. VDPBF16PS adds the
   odd element's product first, then the even one's. TDPBF16PS keeps two fp32 sums per output
   over k (the even elements' products, the odd ones'), adds them, then adds that to C (two
   more roundings, DAZ / FTZ); rows of C past its configured rows and bytes past its colsb are
   zeroed. The tile registers: 8 tiles of 16 rows x 64 bytes and the loaded configuration, per
   thread as on hardware. Where the hardware raises #GP (an invalid LDTILECFG) or #UD (a tile
   instruction without a configuration, on an unconfigured tile, or with shapes the
   configuration does not allow), or Linux sends SIGILL (tiles before arch_prctl's grant), the
   emulation ends the process (abort) with the instruction and the reason on stderr. Not
   modelled: NaN payload priorities (a NaN in gives some NaN out), LDTILECFG's start_row
   restarts (start_row != 0 is refused), TSX aborts. */
struct tile_config {  /* LDTILECFG's 64 bytes: palette 1 has tiles 0-7 */
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#ifdef SPARSE_CPU_EMU
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#define HAVE_AMX 1
#define HAVE_DPBF16 1

static void emu_fault(const char *insn, const char *why, ...) {
    va_list args;
    va_start(args, why);
    fprintf(stderr, "sparse_cpu emu: %s: ", insn);
    vfprintf(stderr, why, args);
    fputc('\n', stderr);
    va_end(args);
    fflush(stderr);
    abort();
}

/* a denormal (or zero) as a zero of its sign: DAZ on inputs, FTZ on results */
static inline float emu_flush(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
/* a * b + c in one rounding (to nearest even), DAZ in, FTZ out */
static inline float emu_fma(float a, float b, float c) {
    return emu_flush(__builtin_fmaf(emu_flush(a), emu_flush(b), emu_flush(c)));
}
static inline float emu_add(float a, float b) { return emu_flush(emu_flush(a) + emu_flush(b)); }

typedef struct { float f[16]; } emu_zmm_ps;   /* __m512 */
typedef struct { bf16 h[32]; } emu_zmm_bh;    /* __m512bh: 16 pairs of bf16 */

static inline emu_zmm_ps emu_loadu_ps(const float *p) {
    emu_zmm_ps v;
    __builtin_memcpy(v.f, p, 64);
    return v;
}
static inline emu_zmm_ps emu_setzero_ps(void) { return (emu_zmm_ps){{0}}; }
static inline emu_zmm_ps emu_add_ps(emu_zmm_ps a, emu_zmm_ps b) {  /* VADDPS (MXCSR's defaults) */
    for (int i = 0; i < 16; ++i) a.f[i] += b.f[i];
    return a;
}
static inline emu_zmm_bh emu_loadu_bh(const bf16 *p) {
    emu_zmm_bh v;
    __builtin_memcpy(v.h, p, 64);
    return v;
}
static inline emu_zmm_bh emu_set1_pair(int32_t pair) {  /* _mm512_set1_epi32 of a bf16 pair */
    emu_zmm_bh v;
    for (int i = 0; i < 16; ++i) __builtin_memcpy(v.h + 2 * i, &pair, 4);
    return v;
}
static inline emu_zmm_ps emu_set1_ps(float f) {  /* VBROADCASTSS: a copy of the bits */
    emu_zmm_ps v;
    for (int i = 0; i < 16; ++i) v.f[i] = f;
    return v;
}
static inline void emu_storeu_ps(float *p, emu_zmm_ps v) { __builtin_memcpy(p, v.f, 64); }
/* VPUNPCKLWD / VPUNPCKHWD zmm: in each 128-bit lane l (words 8l..8l+7) the low (high) four words
   of a and b interleaved, a's first: out[8l + 2k] = a[8l + h + k], out[8l + 2k + 1] = b[8l + h + k],
   k = 0..3, h = 0 (low) or 4 (high) */
static inline emu_zmm_bh emu_unpack_epi16(emu_zmm_bh a, emu_zmm_bh b, int h) {
    emu_zmm_bh v;
    for (int l = 0; l < 4; ++l)
        for (int k = 0; k < 4; ++k) {
            v.h[8 * l + 2 * k] = a.h[8 * l + h + k];
            v.h[8 * l + 2 * k + 1] = b.h[8 * l + h + k];
        }
    return v;
}
/* VDPBF16PS: lane i += a[2i+1] b[2i+1], then += a[2i] b[2i] */
static inline emu_zmm_ps emu_dpbf16_ps(emu_zmm_ps acc, emu_zmm_bh a, emu_zmm_bh b) {
    for (int i = 0; i < 16; ++i) {
        acc.f[i] = emu_fma(bf16_f32(a.h[2 * i + 1]), bf16_f32(b.h[2 * i + 1]), acc.f[i]);
        acc.f[i] = emu_fma(bf16_f32(a.h[2 * i]), bf16_f32(b.h[2 * i]), acc.f[i]);
    }
    return acc;
}
/* VCVTNEPS2BF16 of one lane: zero and denormals to a zero of their sign, NaN quieted, else to
   nearest even (infinities and overflow give infinities) */
static inline bf16 emu_cvtne_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0) return (bf16)((u >> 16) & 0x8000u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline void emu_storeu_cvtne_bf16(bf16 *p, emu_zmm_ps v) {
    for (int i = 0; i < 16; ++i) p[i] = emu_cvtne_bf16(v.f[i]);
}

/* (tests) n / 16 VDPBF16PS, acc[16 j:] = dpbf16(acc[16 j:], a[32 j:], b[32 j:]); n VCVTNEPS2BF16 */
void emu_vdpbf16ps(int64_t n, float *acc, const bf16 *a, const bf16 *b) {
    for (int64_t j = 0; j + 16 <= n; j += 16) {
        const emu_zmm_ps r = emu_dpbf16_ps(emu_loadu_ps(acc + j), emu_loadu_bh(a + 2 * j), emu_loadu_bh(b + 2 * j));
        __builtin_memcpy(acc + j, r.f, 64);
    }
}
void emu_vcvtneps2bf16(int64_t n, const float *src, bf16 *dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = emu_cvtne_bf16(src[i]);
}
/* (tests) n / 32 VPUNPCKLWD (high = 0) or VPUNPCKHWD (high = 1): out[32 j:] of a[32 j:], b[32 j:];
   n / 16 VBROADCASTSS of src[j] stored (VMOVUPS) to out[16 j:] */
void emu_vpunpckwd(int64_t n, int high, const bf16 *a, const bf16 *b, bf16 *out) {
    for (int64_t j = 0; j + 32 <= n; j += 32) {
        const emu_zmm_bh r = emu_unpack_epi16(emu_loadu_bh(a + j), emu_loadu_bh(b + j), high ? 4 : 0);
        __builtin_memcpy(out + j, r.h, 64);
    }
}
void emu_vbroadcastss(int64_t n, const float *src, float *out) {
    for (int64_t j = 0; j + 16 <= n; j += 16) emu_storeu_ps(out + j, emu_set1_ps(src[j / 16]));
}

static _Thread_local struct {
    int configured;                 /* a palette-1 configuration is loaded */
    struct tile_config cfg;
    uint8_t tmm[8][16][64];         /* tmm0-7, 1 KB each */
} emu_amx;
static int emu_xtiledata;           /* arch_prctl granted the tile state (the process's, as Linux) */

static long emu_arch_prctl(int code, unsigned long feature) {
    if (code != ARCH_REQ_XCOMP_PERM || feature != XFEATURE_XTILEDATA) return -1;
    __atomic_store_n(&emu_xtiledata, 1, __ATOMIC_RELEASE);
    return 0;
}
static void emu_granted(const char *insn) {
    if (!__atomic_load_n(&emu_xtiledata, __ATOMIC_ACQUIRE))
        emu_fault(insn, "the process has no tile state: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) "
                        "first (Linux sends SIGILL)");
}
/* tile t usable: a configuration loaded, t in 0-7 and configured */
static void emu_tile(const char *insn, int t) {
    emu_granted(insn);
    if (!emu_amx.configured) emu_fault(insn, "#UD: no tile configuration (LDTILECFG first)");
    if (t < 0 || t > 7) emu_fault(insn, "#UD: tmm%d does not exist (tmm0-7)", t);
    if (!emu_amx.cfg.rows[t]) emu_fault(insn, "#UD: tmm%d is not configured (0 rows, 0 colsb)", t);
}
void emu_tilerelease(void) {
    __builtin_memset(&emu_amx, 0, sizeof emu_amx);
}
void emu_ldtilecfg(const void *mem) {
    struct tile_config c;
    __builtin_memcpy(&c, mem, 64);
    emu_granted("LDTILECFG");
    if (c.palette_id == 0) {  /* the init state, as TILERELEASE */
        emu_tilerelease();
        return;
    }
    if (c.palette_id != 1) emu_fault("LDTILECFG", "#GP: palette %d (palette 1 only)", c.palette_id);
    for (int i = 0; i < 14; ++i)
        if (c.reserved[i]) emu_fault("LDTILECFG", "#GP: reserved byte %d is %d, must be 0", 2 + i, c.reserved[i]);
    if (c.start_row) emu_fault("LDTILECFG", "start_row %d: restarts are not emulated", c.start_row);
    for (int t = 0; t < 16; ++t) {
        if (t >= 8 && (c.rows[t] || c.colsb[t]))
            emu_fault("LDTILECFG", "#GP: tile %d configured, palette 1 has tiles 0-7", t);
        if (c.rows[t] > 16) emu_fault("LDTILECFG", "#GP: tmm%d rows %d > 16", t, c.rows[t]);
        if (c.colsb[t] > 64) emu_fault("LDTILECFG", "#GP: tmm%d colsb %d > 64", t, c.colsb[t]);
        if (!c.rows[t] != !c.colsb[t])
            emu_fault("LDTILECFG", "#GP: tmm%d rows %d, colsb %d: both 0 or neither", t, c.rows[t], c.colsb[t]);
    }
    emu_tilerelease();
    emu_amx.cfg = c;
    emu_amx.configured = 1;
}
void emu_tilezero(int t) {
    emu_tile("TILEZERO", t);
    __builtin_memset(emu_amx.tmm[t], 0, 1024);
}
/* rows x colsb bytes from base + m * stride; the rest of the tile zeroed */
void emu_tileloadd(int t, const void *base, int64_t stride) {
    emu_tile("TILELOADD", t);
    const int rows = emu_amx.cfg.rows[t], colsb = emu_amx.cfg.colsb[t];
    __builtin_memset(emu_amx.tmm[t], 0, 1024);
    for (int m = 0; m < rows; ++m) __builtin_memcpy(emu_amx.tmm[t][m], (const uint8_t *)base + m * stride, colsb);
}
void emu_tilestored(int t, void *base, int64_t stride) {
    emu_tile("TILESTORED", t);
    const int rows = emu_amx.cfg.rows[t], colsb = emu_amx.cfg.colsb[t];
    for (int m = 0; m < rows; ++m) __builtin_memcpy((uint8_t *)base + m * stride, emu_amx.tmm[t][m], colsb);
}
static inline bf16 emu_tile_bf16(int t, int m, int e) {
    bf16 h;
    __builtin_memcpy(&h, emu_amx.tmm[t][m] + 2 * e, 2);
    return h;
}
/* TDPBF16PS: C [M, N] fp32 += A [M, K pairs] B [K, N pairs] */
void emu_tdpbf16ps(int c, int a, int b) {
    emu_tile("TDPBF16PS", c);
    emu_tile("TDPBF16PS", a);
    emu_tile("TDPBF16PS", b);
    if (c == a || c == b || a == b) emu_fault("TDPBF16PS", "#UD: tmm%d, tmm%d, tmm%d are not three tiles", c, a, b);
    const struct tile_config *g = &emu_amx.cfg;
    if (g->colsb[c] % 4 || g->colsb[a] % 4 || g->colsb[b] % 4)
        emu_fault("TDPBF16PS", "#UD: colsb %d, %d, %d not all multiples of 4", g->colsb[c], g->colsb[a], g->colsb[b]);
    if (g->colsb[c] != g->colsb[b]) emu_fault("TDPBF16PS", "#UD: C colsb %d != B colsb %d", g->colsb[c], g->colsb[b]);
    if (g->colsb[a] / 4 != g->rows[b]) emu_fault("TDPBF16PS", "#UD: A colsb / 4 = %d != B rows %d", g->colsb[a] / 4, g->rows[b]);
    if (g->rows[c] != g->rows[a]) emu_fault("TDPBF16PS", "#UD: C rows %d != A rows %d", g->rows[c], g->rows[a]);
    const int M = g->rows[c], K = g->colsb[a] / 4, N = g->colsb[c] / 4;
    for (int m = 0; m < M; ++m) {
        float even[16] = {0}, odd[16] = {0};
        for (int k = 0; k < K; ++k) {
            const float a0 = bf16_f32(emu_tile_bf16(a, m, 2 * k)), a1 = bf16_f32(emu_tile_bf16(a, m, 2 * k + 1));
            for (int n = 0; n < N; ++n) {
                even[n] = emu_fma(a0, bf16_f32(emu_tile_bf16(b, k, 2 * n)), even[n]);
                odd[n] = emu_fma(a1, bf16_f32(emu_tile_bf16(b, k, 2 * n + 1)), odd[n]);
            }
        }
        float row[16];
        __builtin_memcpy(row, emu_amx.tmm[c][m], 4 * N);
        for (int n = 0; n < N; ++n) row[n] = emu_add(row[n], emu_add(even[n], odd[n]));
        __builtin_memset(emu_amx.tmm[c][m], 0, 64);
        __builtin_memcpy(emu_amx.tmm[c][m], row, 4 * N);
    }
    for (int m = M; m < 16; ++m) __builtin_memset(emu_amx.tmm[c][m], 0, 64);
}

#define ZMM_PS emu_zmm_ps
#define ZMM_BH emu_zmm_bh
#define ZMM_LOADU_PS(p) emu_loadu_ps(p)
#define ZMM_SETZERO_PS() emu_setzero_ps()
#define ZMM_ADD_PS(a, b) emu_add_ps(a, b)
#define ZMM_LOADU_BH(p) emu_loadu_bh(p)
#define ZMM_SET1_PAIR(pair) emu_set1_pair(pair)
#define ZMM_DPBF16_PS(acc, a, b) emu_dpbf16_ps(acc, a, b)
#define ZMM_STOREU_CVTNE_BF16(p, v) emu_storeu_cvtne_bf16(p, v)
#define ZMM_SET1_PS(f) emu_set1_ps(f)
#define ZMM_STOREU_PS(p, v) emu_storeu_ps(p, v)
#define ZMM_UNPACKLO_EPI16(a, b) emu_unpack_epi16(a, b, 0)
#define ZMM_UNPACKHI_EPI16(a, b) emu_unpack_epi16(a, b, 4)
#define ARCH_PRCTL(code, feature) emu_arch_prctl(code, feature)
#define TILE_LOADCONFIG(cfg) emu_ldtilecfg(cfg)
#define TILE_ZERO(t) emu_tilezero(t)
#define TILE_LOADD(t, base, stride) emu_tileloadd(t, base, stride)
#define TILE_DPBF16PS(c, a, b) emu_tdpbf16ps(c, a, b)
#define TILE_STORED(t, base, stride) emu_tilestored(t, base, stride)
#define TILE_RELEASE() emu_tilerelease()
#else
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_DPBF16 1
#define ZMM_PS __m512
#define ZMM_BH __m512bh
#define ZMM_LOADU_PS(p) _mm512_loadu_ps(p)
#define ZMM_SETZERO_PS() _mm512_setzero_ps()
#define ZMM_ADD_PS(a, b) _mm512_add_ps(a, b)
#define ZMM_LOADU_BH(p) ((__m512bh)_mm512_loadu_si512(p))
#define ZMM_SET1_PAIR(pair) ((__m512bh)_mm512_set1_epi32(pair))
#define ZMM_DPBF16_PS(acc, a, b) _mm512_dpbf16_ps(acc, a, b)
#define ZMM_STOREU_CVTNE_BF16(p, v) _mm256_storeu_si256((__m256i *)(p), (__m256i)_mm512_cvtneps_pbh(v))
#define ZMM_SET1_PS(f) _mm512_set1_ps(f)
#define ZMM_STOREU_PS(p, v) _mm512_storeu_ps(p, v)
#define ZMM_UNPACKLO_EPI16(a, b) ((__m512bh)_mm512_unpacklo_epi16((__m512i)(a), (__m512i)(b)))
#define ZMM_UNPACKHI_EPI16(a, b) ((__m512bh)_mm512_unpackhi_epi16((__m512i)(a), (__m512i)(b)))
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#define ARCH_PRCTL(code, feature) syscall(SYS_arch_prctl, code, feature)
#define TILE_LOADCONFIG(cfg) _tile_loadconfig(cfg)
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOADD(t, base, stride) _tile_loadd(t, base, stride)
#define TILE_DPBF16PS(c, a, b) _tile_dpbf16ps(c, a, b)
#define TILE_STORED(t, base, stride) _tile_stored(t, base, stride)
#define TILE_RELEASE() _tile_release()
#endif
#endif

/* AMX (the amx_tile + amx_bf16 build, -mamx-tile -mamx-bf16; Sapphire Rapids and later Xeons):
   y [T, out] = x [T, in] W^T + bias for a BSR of 16 x 16 bf16 blocks (block diagonals b = 16;
   b = 32 / 64 are split into 16 x 16 blocks by the caller), x bf16 read in place at row stride
   ldx (elements), y fp32 or bf16 (y_bf16) at row stride ldy. A block is one tile B in the VNNI
   layout the tile product wants, blocks [n][k / 2][i][k % 2] = W[rb * 16 + i, cb * 16 + k]
   (8 rows of 64 bytes); a 16-token slice of x's 16 block columns is a tile A loaded straight
   from x (16 rows of 32 bytes at stride ldx); C += A B (_tile_dpbf16ps: 16 x 16 x 16, fp32 sums)
   for two token slices at once (C0, C1 share each B load), over the blocks of block row rb.
   Tiles: 0, 1 C; 2, 3 A; 4 B. Linux lends a process the tile registers only after
   arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): sparse_cpu_amx_init, called once by
   kernels.cpu after loading; the function refuses (-1) until it succeeded. Written against the
   TILE_* wrappers above: the tests run it where the CPU has amx_bf16, and through the emulated
   instructions (the emu build) on any AVX2 CPU. */
#ifdef HAVE_AMX
#include <sys/syscall.h>  /* (amx_xcomp_supported: arch_prctl, in the emu build too) */
#include <unistd.h>
static int amx_ready = 0;

int sparse_cpu_amx_init(void) {
    if (!amx_ready && ARCH_PRCTL(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0) amx_ready = 1;
    return amx_ready ? 0 : -1;
}

/* The AMX instructions one step at a time, for a diagnosis where the first-run check failed
   (kernels.cpu.amx_steps runs each step in a child process of its own, so the first to fault is
   named): 1 the arch_prctl grant of the tile data (skipped for grant = 0: the tests' fault), 2 +
   LDTILECFG (palette 1, tiles 0-2 of 16 rows x 64 bytes) and TILERELEASE, 3 + TILEZERO and
   TILESTORED (zeros back), 4 + TILELOADD (a pattern back as it was), 5 + TDPBF16PS (C = A B of
   small integers, 16 x 16 x 32: exact in fp32). Returns 0 where every step up to `step` did what
   it should, else the number of the first step whose result was wrong (a fault ends the process
   instead: SIGILL, SIGSEGV, the emulation's abort). */
#define AMX_STEP_END(k) do { TILE_RELEASE(); return (k); } while (0)  /* the tiles released, k returned */
int amx_selftest(int step, int grant) {
    if (grant && sparse_cpu_amx_init() != 0) return 1;
    if (step < 2) return 0;
    struct tile_config c;
    __builtin_memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 3; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }  /* C fp32 16 x 16; A 16 x 32 bf16; B 16 x (16 x 2) */
    TILE_LOADCONFIG(&c);
    if (step < 3) AMX_STEP_END(0);
    float out[256];
    for (int i = 0; i < 256; ++i) out[i] = 1.f;
    TILE_ZERO(0);
    TILE_STORED(0, out, 64);
    for (int i = 0; i < 256; ++i) if (out[i] != 0.f) AMX_STEP_END(3);
    if (step < 4) AMX_STEP_END(0);
    float pattern[256];
    for (int i = 0; i < 256; ++i) { pattern[i] = (float)i - 100.5f; out[i] = 0.f; }
    TILE_LOADD(0, pattern, 64);
    TILE_STORED(0, out, 64);
    for (int i = 0; i < 256; ++i) if (out[i] != pattern[i]) AMX_STEP_END(4);
    if (step < 5) AMX_STEP_END(0);
    bf16 a[16][32], b[16][32];  /* A[m][k]; B[k][n] at b[k / 2][2 n + k % 2] (VNNI) */
    for (int m = 0; m < 16; ++m)
        for (int k = 0; k < 32; ++k) a[m][k] = f32_bf16((float)((m + 2 * k) % 5 - 2));
    for (int k = 0; k < 32; ++k)
        for (int n = 0; n < 16; ++n) b[k / 2][2 * n + k % 2] = f32_bf16((float)((3 * k + n) % 7 - 3));
    TILE_ZERO(0);
    TILE_LOADD(1, a, 64);
    TILE_LOADD(2, b, 64);
    TILE_DPBF16PS(0, 1, 2);
    TILE_STORED(0, out, 64);
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 16; ++n) {
            float want = 0.f;
            for (int k = 0; k < 32; ++k) want += (float)((m + 2 * k) % 5 - 2) * (float)((3 * k + n) % 7 - 3);
            if (out[m * 16 + n] != want) AMX_STEP_END(5);
        }
    AMX_STEP_END(0);
}

/* arch_prctl(ARCH_GET_XCOMP_SUPP): the xstate features this kernel supports (bit 18: XTILEDATA),
   -1 where refused. */
int64_t amx_xcomp_supported(void) {
    uint64_t mask = 0;
    return syscall(SYS_arch_prctl, 0x1021, &mask) == 0 ? (int64_t)mask : -1;
}

/* rows of tokens (1..16) for the C and A tiles */
static void amx_configure(int rows) {
    struct tile_config c;
    __builtin_memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 2; ++t) { c.rows[t] = (uint8_t)rows; c.colsb[t] = 64; }      /* C: rows x 16 fp32 */
    for (int t = 2; t < 4; ++t) { c.rows[t] = (uint8_t)rows; c.colsb[t] = 32; }      /* A: rows x 16 bf16 */
    c.rows[4] = 8; c.colsb[4] = 64;                                                  /* B: 8 x (16 x 2) bf16 */
    TILE_LOADCONFIG(&c);
}

static void amx_store(const float *restrict acc, int rows, int64_t t0, int64_t rb, const float *restrict bias,
                      void *restrict y, int64_t ldy, int y_bf16) {
    for (int m = 0; m < rows; ++m) {
        float v[16];
        for (int i = 0; i < 16; ++i) v[i] = acc[m * 16 + i] + (bias ? bias[rb * 16 + i] : 0.f);
        if (y_bf16) {
            bf16 *q = (bf16 *)y + (t0 + m) * ldy + rb * 16;
            store_bf16x8(q, *(const f8 *)v);
            store_bf16x8(q + 8, *(const f8 *)(v + 8));
        } else {
            float *q = (float *)y + (t0 + m) * ldy + rb * 16;
            for (int i = 0; i < 16; ++i) q[i] = v[i];
        }
    }
}

int bsr16_mm_amx(int64_t rb0, int64_t rb1, int64_t T, const int32_t *restrict crow,
                 const int32_t *restrict bcols, const bf16 *restrict blocks, const bf16 *restrict x,
                 int64_t ldx, const float *restrict bias, void *restrict y, int64_t ldy, int y_bf16) {
    if (!amx_ready) return -1;
    float acc[2][16 * 16];
    const int64_t sx = ldx * 2;  /* bytes between tokens */
    int64_t t0 = 0;
    amx_configure(16);
    for (; t0 + 32 <= T; t0 += 32)
        for (int64_t rb = rb0; rb < rb1; ++rb) {
            TILE_ZERO(0);
            TILE_ZERO(1);
            for (int64_t n = crow[rb]; n < crow[rb + 1]; ++n) {
                const bf16 *xs = x + t0 * ldx + (int64_t)bcols[n] * 16;
                TILE_LOADD(4, blocks + n * 256, 64);
                TILE_LOADD(2, xs, sx);
                TILE_LOADD(3, xs + 16 * ldx, sx);
                TILE_DPBF16PS(0, 2, 4);
                TILE_DPBF16PS(1, 3, 4);
            }
            TILE_STORED(0, acc[0], 64);
            TILE_STORED(1, acc[1], 64);
            amx_store(acc[0], 16, t0, rb, bias, y, ldy, y_bf16);
            amx_store(acc[1], 16, t0 + 16, rb, bias, y, ldy, y_bf16);
        }
    while (t0 < T) {  /* the last 1..31 tokens, a slice of up to 16 at a time */
        const int rows = T - t0 < 16 ? (int)(T - t0) : 16;
        amx_configure(rows);
        for (int64_t rb = rb0; rb < rb1; ++rb) {
            TILE_ZERO(0);
            for (int64_t n = crow[rb]; n < crow[rb + 1]; ++n) {
                TILE_LOADD(4, blocks + n * 256, 64);
                TILE_LOADD(2, x + t0 * ldx + (int64_t)bcols[n] * 16, sx);
                TILE_DPBF16PS(0, 2, 4);
            }
            TILE_STORED(0, acc[0], 64);
            amx_store(acc[0], rows, t0, rb, bias, y, ldy, y_bf16);
        }
        t0 += rows;
    }
    TILE_RELEASE();
    return 0;
}

/* AMX weight gradient at stored b x b blocks (16 | b) for bf16 dy and x: g[n][o][i] = sum_t
   dy[t, rows[n] b + o] x[t, cols[n] b + i] (fp32, [n][o][i] as sddmm_blocks) for blocks [n0, n1),
   each cut into (b / 16)^2 16 x 16 outputs, one C tile each: per 32 tokens one TDPBF16PS of A =
   16 dy columns x 32 tokens (the bf16 token tiles of pack_tokens_bf16_tiles, dyt [n_chunks, M,
   32]: a row of A is one column of dy over the chunk's 32 tokens, 64 B) and B = 16 token pairs x
   16 x columns (pack_token_pairs, xv [16 n_chunks, N, 2]: x[2p, i], x[2p + 1, i] adjacent, the
   VNNI layout; rows N x 4 B apart), tokens past T zero in both. One C tile of 256 sums, 8192
   multiply-adds per TDPBF16PS. A model, not a measurement (Sapphire Rapids figures assumed:
   TDPBF16PS ~16 cycles of throughput, tile loads ~64 B a cycle, ~2 GHz): DiagLinear b = 16 3072 ->
   768 at 90%, 256 tokens, one core: 960 C tiles x 8 chunks = 7680 TDPBF16PS (~61 us) and 15 MB
   of tile loads (~120 us), so ~0.1-0.2 ms and the two packs (~1M bf16 elements), against ~1.8
   ms of the fp32 register tiles (sddmm_blocks) on the EPYC. Returns -1 without the tile
   permission, -2 for a b not a multiple of 16. */
int sddmm_blocks_amx(int64_t n0, int64_t n1, int64_t b, int64_t n_chunks, int64_t M, int64_t N,
                     const int32_t *restrict rows, const int32_t *restrict cols, const bf16 *restrict dyt,
                     const bf16 *restrict xv, float *restrict g) {
    if (!amx_ready) return -1;
    if (b % 16) return -2;
    struct tile_config c;
    __builtin_memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 3; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }  /* C fp32, A and B bf16 pairs */
    TILE_LOADCONFIG(&c);
    const int64_t q = b / 16;
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t p = 0; p < q; ++p)
            for (int64_t s = 0; s < q; ++s) {
                const int64_t o0 = (int64_t)rows[n] * b + 16 * p, i0 = (int64_t)cols[n] * b + 16 * s;
                TILE_ZERO(0);
                for (int64_t ch = 0; ch < n_chunks; ++ch) {
                    TILE_LOADD(1, dyt + (ch * M + o0) * 32, 64);
                    TILE_LOADD(2, xv + (ch * 16 * N + i0) * 2, N * 4);
                    TILE_DPBF16PS(0, 1, 2);
                }
                TILE_STORED(0, g + n * b * b + 16 * p * b + 16 * s, b * 4);
            }
    TILE_RELEASE();
    return 0;
}

/* x [T, n] bf16 (element strides st, sc) -> xv [n_pairs, n, 2]: xv[p][i] = (x[2p, i], x[2p + 1,
   i]), tokens past T zero (the B operand of sddmm_blocks_amx). */
void pack_token_pairs(int64_t T, int64_t n, const bf16 *restrict x, int64_t st, int64_t sc, int64_t n_pairs,
                      bf16 *restrict xv, int64_t threads) {
    PACK_PARALLEL
    for (int64_t p = 0; p < n_pairs; ++p) {
        bf16 *d = xv + p * n * 2;
        const bf16 *r0 = 2 * p < T ? x + 2 * p * st : 0, *r1 = 2 * p + 1 < T ? x + (2 * p + 1) * st : 0;
        for (int64_t i = 0; i < n; ++i) {
            d[2 * i] = r0 ? r0[i * sc] : 0;
            d[2 * i + 1] = r1 ? r1[i * sc] : 0;
        }
    }
}
#endif

/* AVX-512-BF16 (the avx512_bf16 build, -mavx512f -mavx512bf16; Cooper Lake, Sapphire Rapids
   and later Xeons, Zen 4): one token, the BSR of 16 x 16 bf16 blocks in the VNNI layout of
   bsr16_mm_amx, x bf16 [in] -> y bf16 [out] (_mm512_cvtneps_pbh: to nearest even). Per block, 8
   _mm512_dpbf16_ps: the 16 outputs' weights of two adjacent columns (one 64-byte row of the
   block) times those two x values broadcast as one bf16 pair: 2 multiply-adds per fp32 lane and
   instruction, no widening of the weights (the AVX2 build spends a vpmovzxwd + vpslld on each
   8). Two sums in flight. Written against the ZMM_* wrappers above: the tests run it where the
   CPU has avx512_bf16, and through the emulated instructions (the emu build) on any AVX2 CPU. */
#ifdef HAVE_DPBF16
void bsr16_mv_dpbf16(int64_t rb0, int64_t rb1, const int32_t *restrict crow, const int32_t *restrict bcols,
                     const bf16 *restrict blocks, const bf16 *restrict x, const float *restrict bias,
                     bf16 *restrict y) {
    for (int64_t rb = rb0; rb < rb1; ++rb) {
        ZMM_PS a0 = bias ? ZMM_LOADU_PS(bias + rb * 16) : ZMM_SETZERO_PS(), a1 = ZMM_SETZERO_PS();
        for (int64_t n = crow[rb]; n < crow[rb + 1]; ++n) {
            const bf16 *xs = x + (int64_t)bcols[n] * 16;
            const bf16 *blk = blocks + n * 256;
            for (int r = 0; r < 8; r += 2) {
                int32_t p0, p1;
                __builtin_memcpy(&p0, xs + 2 * r, 4);
                __builtin_memcpy(&p1, xs + 2 * r + 2, 4);
                a0 = ZMM_DPBF16_PS(a0, ZMM_LOADU_BH(blk + r * 32), ZMM_SET1_PAIR(p0));
                a1 = ZMM_DPBF16_PS(a1, ZMM_LOADU_BH(blk + r * 32 + 32), ZMM_SET1_PAIR(p1));
            }
        }
        ZMM_STOREU_CVTNE_BF16(y + rb * 16, ZMM_ADD_PS(a0, a1));
    }
}
#endif

/* AVX-512-BF16, several tokens, CSR of bf16 elements (fan-in, b = 1 diagonals, unstructured): the
   bf16 product of csr_mm_* in tiles of 32 tokens, two stored weights of a row at a time. x in bf16
   token tiles xt [n_tiles, in, 32] (pack_tokens_dpbf16; 64 bytes a column), the weights bf16
   [nnz] in CSR order (by panels as csr_mm_*). The fp32 sums of CSR_DPBF16_ROWS rows at a time
   (every panel in turn) stay in an 8 KB buffer on the stack, which is then written to y [T,
   out] (row stride ld) in fp32 or rounded to bf16 (unpack_tile_*): no sums of the whole product
   go through memory (yt [n_tiles, out, 32] of 3072 outputs and 6304 tokens was 77 MB, written
   and read back, and fresh pages every call). For the weights j, j + 1 of a row (columns c0, c1):
   the rows xt[c0] and xt[c1] interleaved word by word (VPUNPCKLWD / VPUNPCKHWD, one lane pair
   (x[c0, t], x[c1, t]) per token) times the pair (v_j, v_j+1) broadcast (VPBROADCASTD), by
   VDPBF16PS: acc[t] += x[c1, t] v_j+1, then += x[c0, t] v_j (each one fp32 rounding; bf16
   denormals read as zero). The unpacks interleave within 128-bit lanes, so pack_tokens_dpbf16
   stores the tokens of a column in the order that puts tokens 0-15 in the low unpack and 16-31
   in the high one: slot 8 l + 4 h + k holds token 16 h + 4 l + k (l < 4, h < 2, k < 4). A row's
   odd last weight is paired with a zero weight and a zero x row. S sets of accumulators take the
   pairs in turn (VDPBF16PS's latency). Written against the ZMM_* wrappers: the tests run it where
   the CPU has avx512_bf16, and through the emulated instructions (the emu build) on any AVX2 CPU.

   A model, not a measurement (Sapphire Rapids, one core; the port and latency figures assumed
   from Intel's optimization manual / uops.info-style tables, never timed here):
     per weight pair, in a tile of 32 tokens: 2 index loads (2 or 4 B), 1 VPBROADCASTD of the
     value pair from memory (a load), 2 x rows of 64 B (2 loads), 2 VPUNPCK*WD zmm (port 5),
     2 VDPBF16PS zmm (assumed port 0, latency ~5: S = 4 sets, 8 chains, cover it);
     so per weight: 1 shuffle + 1 VDPBF16PS (~1 cycle on the two ports), ~2.5 loads, 64 B of x
     (the fp32 loop it replaces: 128 B per weight and 4 FMA ymm, or 2 zmm). As GCC 12 compiles
     it (objdump of the avx512-bf16 build): 44 instructions per 4 pairs + 3 of loop, ~5.9 a
     weight (index movzwl + shl, broadcast, load, unpack, dpbf16), within a 6-wide front end's
     ~1 cycle.
     The x panel: PANEL = 512 columns x 32 tokens x 2 B = 32 KB, inside the 48 KB L1D (fp32:
     64 KB, from L2 - the previous model's ~2 cycles per weight). So ~1 cycle per weight,
     port-bound, from L1; the weights (2 B value + 2 B index per weight per tile) and yt (per row
     and panel: 2 zmm in, 2 out) are small beside it.
   Against (a), 16-wide fp32 FMAs: also ~1 cycle per weight (2 FMA ports), but 128 B per weight,
   so it needs 256-column panels to stay in L1 - twice the rows' per-panel overhead (acc in and
   out, the set reduction, ~10 cycles a row; ~25 weights a row per panel for Linear 3072 -> 768
   at 90%) - and twice the pack's bytes. Expected: Linear 3072 -> 768 at 90% (236k weights),
   32 tokens: ~0.24 M cycles (~80 us at 3 GHz) + the bf16 pack (~0.3 cycle an element, ~15%);
   256 tokens: 8 tiles, ~1.9 M cycles. Dense bf16 (oneDNN with AMX) is to be measured on the
   Xeon beside it (issue 23); nothing here was timed on one. */
#ifdef HAVE_DPBF16
#define DPBF16_PAIR(LO, HI, J)                                                                \
            {                                                                                 \
                int32_t pair;                                                                 \
                __builtin_memcpy(&pair, vals + (J), 4);                                       \
                const ZMM_BH w = ZMM_SET1_PAIR(pair);                                         \
                const ZMM_BH a = ZMM_LOADU_BH(xt + (int64_t)cols[J] * 32);                    \
                const ZMM_BH b = ZMM_LOADU_BH(xt + (int64_t)cols[(J) + 1] * 32);              \
                LO = ZMM_DPBF16_PS(LO, ZMM_UNPACKLO_EPI16(a, b), w);                          \
                HI = ZMM_DPBF16_PS(HI, ZMM_UNPACKHI_EPI16(a, b), w);                          \
            }
static const bf16 dpbf16_zero_row[32];
#define CSR_MM_DPBF16_TILE(NAME, IDX, S)                                                      \
static void NAME(int64_t r0, int64_t r1, const int32_t *restrict crow,                        \
                 const IDX *restrict cols, const bf16 *restrict vals,                         \
                 const bf16 *restrict xt, const float *restrict bias, float *restrict acc,    \
                 int first) {  /* rows [r0, r1): sums to acc [r1 - r0][32] */                 \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
        float *q = acc + (r - r0) * 32;                                                       \
        ZMM_PS lo[S], hi[S];  /* tokens 0-15, 16-31 */                                        \
        if (first) {                                                                          \
            lo[0] = hi[0] = ZMM_SET1_PS(bias ? bias[r] : 0.f);                                \
        } else {                                                                              \
            lo[0] = ZMM_LOADU_PS(q);                                                          \
            hi[0] = ZMM_LOADU_PS(q + 16);                                                     \
        }                                                                                     \
        for (int k = 1; k < (S); ++k) lo[k] = hi[k] = ZMM_SETZERO_PS();                       \
        int64_t j = crow[r];                                                                  \
        const int64_t end = crow[r + 1];                                                      \
        for (; j + 2 * (S) <= end; j += 2 * (S))                                              \
            for (int k = 0; k < (S); ++k) DPBF16_PAIR(lo[k], hi[k], j + 2 * k)                \
        for (; j + 2 <= end; j += 2) DPBF16_PAIR(lo[0], hi[0], j)                             \
        if (j < end) {  /* (v_j, 0) against (x[c], 0): nothing read past the row */           \
            const ZMM_BH w = ZMM_SET1_PAIR((int32_t)vals[j]);                                 \
            const ZMM_BH a = ZMM_LOADU_BH(xt + (int64_t)cols[j] * 32);                        \
            const ZMM_BH z = ZMM_LOADU_BH(dpbf16_zero_row);                                   \
            lo[0] = ZMM_DPBF16_PS(lo[0], ZMM_UNPACKLO_EPI16(a, z), w);                        \
            hi[0] = ZMM_DPBF16_PS(hi[0], ZMM_UNPACKHI_EPI16(a, z), w);                        \
        }                                                                                     \
        for (int k = 1; k < (S); ++k) {                                                       \
            lo[0] = ZMM_ADD_PS(lo[0], lo[k]);                                                 \
            hi[0] = ZMM_ADD_PS(hi[0], hi[k]);                                                 \
        }                                                                                     \
        ZMM_STOREU_PS(q, lo[0]);                                                              \
        ZMM_STOREU_PS(q + 16, hi[0]);                                                         \
    }                                                                                         \
}
CSR_MM_DPBF16_TILE(csr_mm_i16_dpbf16_32, uint16_t, 4)
CSR_MM_DPBF16_TILE(csr_mm_i32_dpbf16_32, int32_t, 4)

/* Rows [r0, r1) of y [T, n_out] (row stride ld; bf16 for y_bf16, else fp32): every tile of 32
   tokens, then CSR_DPBF16_ROWS rows at a time - or with rows_acc ([n_out, 32], for a weight in
   several panels) all of them, as CSR_MM - every panel (n_panels of PANEL columns, crow by
   panel) into the buffer, then those rows' columns of y. */
#define CSR_DPBF16_ROWS 64
#define CSR_MM_DPBF16(NAME, IDX, TILE)                                                        \
void NAME(int64_t r0, int64_t r1, int64_t n_in, int64_t n_out, int64_t T, int64_t n_panels,   \
          const int32_t *restrict crow, const IDX *restrict cols, const bf16 *restrict vals,  \
          const bf16 *restrict xt, const float *restrict bias, void *restrict y, int64_t ld,  \
          int y_bf16, float *restrict rows_acc) {                                             \
    float stack_acc[CSR_DPBF16_ROWS * 32] __attribute__((aligned(64)));                       \
    float *acc = rows_acc ? rows_acc + r0 * 32 : stack_acc;                                   \
    const int64_t chunk = rows_acc ? r1 - r0 : CSR_DPBF16_ROWS;                               \
    for (int64_t t = 0; t * 32 < T; ++t) {                                                    \
        const int64_t valid = T - t * 32 < 32 ? T - t * 32 : 32;                              \
        for (int64_t c = r0; c < r1; c += chunk) {                                            \
            const int64_t c1 = c + chunk < r1 ? c + chunk : r1;                               \
            for (int64_t p = 0; p < n_panels; ++p)                                            \
                TILE(c, c1, crow + p * n_out, cols, vals, xt + t * n_in * 32, bias, acc, p == 0); \
            if (y_bf16)                                                                       \
                unpack_tile_bf16(acc, c1 - c, valid, 32, (bf16 *)y + t * 32 * ld + c, ld);    \
            else                                                                              \
                unpack_tile_f32(acc, c1 - c, valid, 32, (float *)y + t * 32 * ld + c, ld);    \
        }                                                                                     \
    }                                                                                         \
}
CSR_MM_DPBF16(csr_mm_i16_dpbf16, uint16_t, csr_mm_i16_dpbf16_32)
CSR_MM_DPBF16(csr_mm_i32_dpbf16, int32_t, csr_mm_i32_dpbf16_32)

/* x [T, n] bf16 at element strides (st, sc) -> xt [n_tiles, n, tw] bf16 (tw a multiple of 8),
   tokens past T zero, each column's tw tokens in the order slot(j): csr_mm_*_dpbf16's for tw = 32
   (dpbf16_slot: slot 8 l + 4 h + k of a column holds token 16 h + 4 l + k), token order for
   sddmm_tiles_dpbf16 (slot j holds token j). With sc = 1, 16 columns at a time in 16 x 16 word
   transposes (transpose16_epi16; the dpbf16 order then interleaves a column's tokens 0-15 and
   16-31 in runs of 4), the last 8-15 columns in 8 x 8 transposes of the bits widened to 32
   (transpose8: moves only, so the bits come back as they were; each column's 8 tokens stored as
   two runs of 4, at slot(j0) and slot(j0 + 4)); else element by element. The word transposes
   run 1.4-2.0x the widened 8 x 8 ones (Zen 4, one thread, the two builds alternating: x [32,
   3072] 26.9 -> 16.5 us, [256, 3072] 202 -> 104, [1576, 768] 265 -> 149, [1576, 3072] 1190 ->
   870; a copy of x [256, 3072] ~35 us); tokens 32 at a time (both halves of a column's 64 bytes
   stored together, 32 registers) were 3-25% slower. */
static inline int64_t dpbf16_slot(int64_t j) { return 8 * ((j % 16) / 4) + 4 * (j / 16) + j % 4; }
static inline int64_t token_slot(int64_t j) { return j; }
/* 16 x 16 words in place: r[m] = row m (16 bf16) -> r[c] = column c (its 16 rows). Per group of
   8 rows, three rounds of unpacks (words, dwords, qwords) transpose the 8 x 8 blocks within each
   128-bit lane, leaving column j in lane 0 and column 8 + j in lane 1 of w[j]; a lane exchange
   then joins the two groups' halves of a column. */
static inline __attribute__((always_inline)) void transpose16_epi16(__m256i *r) {
    __m256i w[2][8];
    for (int g = 0; g < 2; ++g) {
        const __m256i *x = r + 8 * g;
        __m256i u[8], v[8];
        for (int p = 0; p < 4; ++p) {  /* u[2p], u[2p + 1]: rows 2p, 2p + 1 word by word, columns 0-3 / 4-7 of a lane */
            u[2 * p] = _mm256_unpacklo_epi16(x[2 * p], x[2 * p + 1]);
            u[2 * p + 1] = _mm256_unpackhi_epi16(x[2 * p], x[2 * p + 1]);
        }
        for (int h = 0; h < 2; ++h)      /* rows 4h .. 4h + 3: v[4h + 2q + e] holds columns 4q + 2e, 4q + 2e + 1 */
            for (int q = 0; q < 2; ++q) {
                v[4 * h + 2 * q] = _mm256_unpacklo_epi32(u[4 * h + q], u[4 * h + q + 2]);
                v[4 * h + 2 * q + 1] = _mm256_unpackhi_epi32(u[4 * h + q], u[4 * h + q + 2]);
            }
        for (int k = 0; k < 4; ++k) {    /* columns 2k, 2k + 1: rows 0-3 beside rows 4-7 */
            w[g][2 * k] = _mm256_unpacklo_epi64(v[k], v[k + 4]);
            w[g][2 * k + 1] = _mm256_unpackhi_epi64(v[k], v[k + 4]);
        }
    }
    for (int j = 0; j < 8; ++j) {
        r[j] = _mm256_permute2x128_si256(w[0][j], w[1][j], 0x20);
        r[8 + j] = _mm256_permute2x128_si256(w[0][j], w[1][j], 0x31);
    }
}
static inline __attribute__((always_inline)) void
pack_bf16_tile(int64_t t, int64_t T, int64_t n, const bf16 *restrict x, int64_t st, int64_t sc, int64_t tw,
               int64_t (*slot)(int64_t), bf16 *restrict xt) {  /* tile t (each entry point's loop inlines slot) */
    bf16 *d = xt + t * n * tw;
    int64_t c0 = 0;
    if (sc == 1 && tw % 16 == 0) {
        const int interleave = slot == dpbf16_slot;  /* (tw = 32) */
        for (; c0 + 16 <= n; c0 += 16) {
            __m256i first[16];  /* interleave: tokens 0-15 of each column */
            for (int64_t j0 = 0; j0 < tw; j0 += 16) {
                __m256i r[16];
                for (int m = 0; m < 16; ++m) {
                    const int64_t tok = t * tw + j0 + m;
                    r[m] = tok < T ? _mm256_loadu_si256((const __m256i *)(x + tok * st + c0)) : _mm256_setzero_si256();
                }
                transpose16_epi16(r);
                if (!interleave) {
                    for (int c = 0; c < 16; ++c) _mm256_storeu_si256((__m256i *)(d + (c0 + c) * tw + j0), r[c]);
                } else if (j0 == 0) {
                    for (int c = 0; c < 16; ++c) first[c] = r[c];
                } else {  /* runs of 4 tokens (qwords) g0 g4 g1 g5 | g2 g6 g3 g7, g: tokens 4g .. 4g + 3 */
                    for (int c = 0; c < 16; ++c) {
                        const __m256i lo = _mm256_unpacklo_epi64(first[c], r[c]);  /* g0 g4 | g2 g6 */
                        const __m256i hi = _mm256_unpackhi_epi64(first[c], r[c]);  /* g1 g5 | g3 g7 */
                        _mm256_storeu_si256((__m256i *)(d + (c0 + c) * 32), _mm256_permute2x128_si256(lo, hi, 0x20));
                        _mm256_storeu_si256((__m256i *)(d + (c0 + c) * 32 + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
                    }
                }
            }
        }
    }
    if (sc == 1) {
        for (; c0 + 8 <= n; c0 += 8)
            for (int64_t j0 = 0; j0 < tw; j0 += 8) {
                __m256 r[8];
                for (int m = 0; m < 8; ++m) {
                    const int64_t tok = t * tw + j0 + m;
                    r[m] = tok < T ? (__m256)load_bf16x8(x + tok * st + c0) : _mm256_setzero_ps();
                }
                transpose8(r);
                const int64_t s0 = slot(j0), s4 = slot(j0 + 4);  /* tokens j0..j0+3, j0+4..j0+7 */
                for (int m = 0; m < 8; ++m) {
                    const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(r[m]), 16);
                    const __m256i h = _mm256_packus_epi32(u, u);  /* per 128-bit half: 4 words, twice */
                    _mm_storel_epi64((__m128i *)(d + (c0 + m) * tw + s0), _mm256_castsi256_si128(h));
                    _mm_storel_epi64((__m128i *)(d + (c0 + m) * tw + s4), _mm256_extracti128_si256(h, 1));
                }
            }
    }
    for (int64_t c = c0; c < n; ++c)
        for (int64_t j = 0; j < tw; ++j) {
            const int64_t tok = t * tw + j;
            d[c * tw + slot(j)] = tok < T ? x[tok * st + c * sc] : 0;
        }
}
void pack_tokens_dpbf16(int64_t T, int64_t n, const bf16 *restrict x, int64_t st, int64_t sc,
                        bf16 *restrict xt, int64_t threads) {
    PACK_PARALLEL
    for (int64_t t = 0; t < (T + 31) / 32; ++t) pack_bf16_tile(t, T, n, x, st, sc, 32, dpbf16_slot, xt);
}
void pack_tokens_bf16_tiles(int64_t T, int64_t n, const bf16 *restrict x, int64_t st, int64_t sc, int64_t tw,
                            bf16 *restrict xt, int64_t threads) {
    PACK_PARALLEL
    for (int64_t t = 0; t < (T + tw - 1) / tw; ++t) pack_bf16_tile(t, T, n, x, st, sc, tw, token_slot, xt);
}

/* AVX-512-BF16 weight gradient at the stored elements (the SDDMM of sddmm_tiles) for bf16 dy and
   x: g[i] = sum_t dy[t, rows[i]] x[t, cols[i]] for i in [i0, i1), fp32 g. dy and x in bf16
   token tiles in token order (pack_tokens_bf16_tiles: dyt [n_tiles, M, TW], xt [n_tiles, N,
   TW]), TW = 32, 64 or 128, so two adjacent tokens of a row are one bf16 pair of a 64-byte zmm:
   per weight and 32 tokens one VDPBF16PS of the dy row against the x row (lane l: += dy[2l + 1]
   x[2l + 1], then += dy[2l] x[2l]; each one fp32 rounding, bf16 denormals read as zero), TW / 32
   of them in one chain; sixteen weights at a time, their sixteen sums each folded to 256 bits
   (ZMM_ADD_HALVES: lanes l + l + 8) and reduced together by add_hsum8 (two sets of eight), then
   added to g. Tile by tile as sddmm_tiles (one tile of x, N x TW x 2 B, stays in L2 while every
   weight reads its row). Written against the ZMM_* wrappers: the tests run it where the CPU has
   avx512_bf16, and through the emulated instructions (the emu build) on any AVX2 CPU.

   A model, not a measurement (Sapphire Rapids figures assumed, as for csr_mm_*_dpbf16; nothing
   timed on a Xeon): per weight and 64 tokens, 2 index loads, 4 zmm row loads (128 B of dy and
   x) and 2 VDPBF16PS, plus the reduction, ~3 instructions a weight (an extract and an add of
   the halves, 1/8 of add_hsum8's 9); ~11 instructions and ~2 cycles (the loads, 2 a cycle). The
   fp32 tiles it replaces on that CPU (sddmm_tiles as the avx512-bf16 build compiles it, 8-wide):
   16 ymm loads (256 B), 8 FMAs and 2 reductions per weight and 64 tokens, ~30 instructions and
   ~5 cycles: ~2.5x from halved bytes and a dot of two tokens per lane. Returns -1 for another
   TW. */
#ifndef SPARSE_CPU_EMU
#define ZMM_ADD_HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), \
                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
#else
#define ZMM_ADD_HALVES(v) _mm256_add_ps(_mm256_loadu_ps((v).f), _mm256_loadu_ps((v).f + 8))
#endif
/* The dots of sixteen weights at a time, the last 1-15 of them as one more group of 16 whose
   missing sums are zero, the dy rows as A(i, u) gives them: read per weight (sddmm_tiles_dpbf16)
   or held in registers for a row of the CSR (sddmm_rows_dpbf16). DPBF16_DOT: weight i's dot,
   folded to 8 lanes. */
#define DPBF16_DOT(H, i, A, TW)                                                               \
    {                                                                                         \
        const bf16 *b = xs + (int64_t)cols[i] * (TW);                                         \
        ZMM_PS s = ZMM_DPBF16_PS(ZMM_SETZERO_PS(), A(i, 0), ZMM_LOADU_BH(b));                 \
        for (int u = 1; u < (TW) / 32; ++u) s = ZMM_DPBF16_PS(s, A(i, u), ZMM_LOADU_BH(b + 32 * u)); \
        H = (f8)ZMM_ADD_HALVES(s);                                                            \
    }
#define SDDMM_DPBF16_DOTS(I, END, A, TW)                                                      \
    for (; (I) + 16 <= (END); (I) += 16) {                                                    \
        f8 h[16];                                                                             \
        for (int k = 0; k < 16; ++k) DPBF16_DOT(h[k], (I) + k, A, TW)                         \
        add_hsum8(h, g + (I));                                                                \
        add_hsum8(h + 8, g + (I) + 8);                                                        \
    }                                                                                         \
    if ((I) < (END)) {                                                                        \
        const int rem = (int)((END) - (I));                                                   \
        f8 h[16];                                                                             \
        float sums[16] = {0};                                                                 \
        for (int k = 0; k < 16; ++k) {                                                        \
            h[k] = (f8){0};                                                                   \
            if (k < rem) DPBF16_DOT(h[k], (I) + k, A, TW)                                     \
        }                                                                                     \
        add_hsum8(h, sums);                                                                   \
        add_hsum8(h + 8, sums + 8);                                                           \
        for (int k = 0; k < rem; ++k) g[(I) + k] += sums[k];                                  \
        (I) = (END);                                                                          \
    }
#define DPBF16_DY_OF_ROW(i, u) ZMM_LOADU_BH(dys + (int64_t)rows[i] * TILE_W + 32 * (u))
#define SDDMM_DPBF16_TILES(NAME, TW)                                                          \
static void NAME(int64_t i0, int64_t i1, int64_t n_tiles, int64_t M, int64_t N,               \
                 const int32_t *restrict rows, const int32_t *restrict cols,                  \
                 const bf16 *restrict dyt, const bf16 *restrict xt, float *restrict g) {      \
    enum { TILE_W = (TW) };                                                                   \
    for (int64_t i = i0; i < i1; ++i) g[i] = 0.f;                                             \
    for (int64_t t = 0; t < n_tiles; ++t) {                                                   \
        const bf16 *dys = dyt + t * M * (TW), *xs = xt + t * N * (TW);                        \
        int64_t i = i0;                                                                       \
        SDDMM_DPBF16_DOTS(i, i1, DPBF16_DY_OF_ROW, TW)                                        \
    }                                                                                         \
}
/* sddmm_rows_dpbf16: the same for coordinates stored row by row (crow over the rows [r0, r1), the
   weights crow[r0] .. crow[r1] - fan-in layers, sorted coordinates), each dy row's TW tokens held
   in TW / 32 registers for its row's weights (no row index, no dy load a weight), as sddmm_rows
   does in fp32 (the same loop, SDDMM_ROW_LOOP). */
#define SDDMM_ROWS_DPBF16(NAME, TW) \
    SDDMM_ROW_LOOP(NAME, TW, bf16, ZMM_BH, 32, ZMM_LOADU_BH, SDDMM_DPBF16_DOTS, DY_IN_REGISTERS)
SDDMM_ROWS_DPBF16(sddmm_rows_dpbf16_32, 32)
SDDMM_ROWS_DPBF16(sddmm_rows_dpbf16_64, 64)
SDDMM_ROWS_DPBF16(sddmm_rows_dpbf16_128, 128)

/* The entry points: the kernel of the tile width tw (32, 64 or 128), -1 for another. */
#define SDDMM_DPBF16_ENTRY(NAME, FIRST)                                                       \
int NAME(int64_t a0, int64_t a1, int64_t n_tiles, int64_t tw, int64_t M, int64_t N,           \
         const int32_t *restrict FIRST, const int32_t *restrict cols, const bf16 *restrict dyt, \
         const bf16 *restrict xt, float *restrict g) {                                        \
    switch (tw) {                                                                             \
    case 32: NAME##_32(a0, a1, n_tiles, M, N, FIRST, cols, dyt, xt, g); return 0;             \
    case 64: NAME##_64(a0, a1, n_tiles, M, N, FIRST, cols, dyt, xt, g); return 0;             \
    case 128: NAME##_128(a0, a1, n_tiles, M, N, FIRST, cols, dyt, xt, g); return 0;           \
    default: return -1;                                                                       \
    }                                                                                         \
}
SDDMM_DPBF16_ENTRY(sddmm_rows_dpbf16, crow)
SDDMM_DPBF16_TILES(sddmm_tiles_dpbf16_32, 32)
SDDMM_DPBF16_TILES(sddmm_tiles_dpbf16_64, 64)
SDDMM_DPBF16_TILES(sddmm_tiles_dpbf16_128, 128)

SDDMM_DPBF16_ENTRY(sddmm_tiles_dpbf16, rows)

/* AVX-512-BF16 block products of several tokens (b = 16 q: DiagLinear b = 16 / 32 / 64) - what
   AMX's tiles do on the Xeon, for the CPUs with avx512_bf16 and no AMX (Zen 4, Cooper Lake):
   outputs in the 16 fp32 lanes, the reduction over pairs of inputs, one VDPBF16PS per 16
   outputs, 2 inputs and a token (32 multiply-adds; the fp32 register tiles of bsr_mm do 8 per
   FMA ymm). 16 x 16 sub-blocks in the VNNI layout of bsr16_mm_amx, [k / 2][l][k % 2] = W'[l, k]
   (l the output lane, k the input), 8 rows of 64 bytes.

   bsr16_mm_dpbf16: y [T, out] = x W'^T + bias for the BSR (crow, bcols) of b x b blocks, each cut
   into q x q sub-blocks stored vnni[((n q + p) q + s) 256] (n the CSR position; p, s the
   sub-block's row and column: pack_vnni16 makes it per call from the layer's blocks, and for
   inference bsr16_weight once, with q = 1), for sub-rows [r0, r1) of 16 outputs (rb = r / q, p =
   r % q). x in token tiles of input pairs, xp [n_tiles][in / 2][16][2] (pack_token_pairs16:
   the pair (x[t, 2 k], x[t, 2 k + 1]) of the tile's 16 tokens side by side, tokens past T
   zero), so the broadcast of token t's pair is one dword at a constant offset from the block's
   base. Per tile and sub-row 16 sums in registers (a zmm per token); per sub-block its 8 VNNI
   rows, each against the 16 tokens' pairs broadcast: 128 VDPBF16PS, 8 row loads and 128
   broadcasts (a load each). The tile of x (in x 64 B: 192 KB at 3072 inputs) is read from L2 by
   every sub-row, the weights (512 B a sub-block) once a tile. y rounded to bf16 (y_bf16, to
   nearest even) or fp32, only tokens < T written. */
void bsr16_mm_dpbf16(int64_t r0, int64_t r1, int64_t q, int64_t T, int64_t n_in, const int32_t *restrict crow,
                     const int32_t *restrict bcols, const bf16 *restrict vnni, const bf16 *restrict xp,
                     const float *restrict bias, void *restrict y, int64_t ldy, int y_bf16) {
    const int64_t n_tiles = (T + 15) / 16;
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
        const bf16 *xs = xp + tile * n_in * 16;
        const int64_t live = T - tile * 16 < 16 ? T - tile * 16 : 16;
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t rb = r / q, p = r % q;
            ZMM_PS acc[16];
            const ZMM_PS init = bias ? ZMM_LOADU_PS(bias + r * 16) : ZMM_SETZERO_PS();
            for (int t = 0; t < 16; ++t) acc[t] = init;
            for (int64_t n = crow[rb]; n < crow[rb + 1]; ++n)
                for (int64_t s = 0; s < q; ++s) {
                    const bf16 *w = vnni + ((n * q + p) * q + s) * 256;
                    const bf16 *xb = xs + ((int64_t)bcols[n] * q + s) * 8 * 32;  /* 8 input pairs x 16 tokens */
                    for (int j = 0; j < 8; ++j) {
                        const ZMM_BH wj = ZMM_LOADU_BH(w + 32 * j);
                        for (int t = 0; t < 16; ++t) {
                            int32_t pair;
                            __builtin_memcpy(&pair, xb + 32 * j + 2 * t, 4);
                            acc[t] = ZMM_DPBF16_PS(acc[t], wj, ZMM_SET1_PAIR(pair));
                        }
                    }
                }
            for (int t = 0; t < live; ++t) {
                const int64_t at = (tile * 16 + t) * ldy + r * 16;
                if (y_bf16) ZMM_STOREU_CVTNE_BF16((bf16 *)y + at, acc[t]);
                else ZMM_STOREU_PS((float *)y + at, acc[t]);
            }
        }
    }
}

/* x [T, n] bf16 (element strides st, sc; n a multiple of 16) -> xp [n_tiles][n / 2][16][2]: for
   each tile of 16 tokens and input pair k, the 16 tokens' (x[t, 2 k], x[t, 2 k + 1]) as dwords,
   tokens past T zero (bsr16_mm_dpbf16's x). With sc = 1 by 8 x 8 transposes of the dwords
   (transpose8: moves only, the bits as they were), else element by element. */
void pack_token_pairs16(int64_t T, int64_t n, const bf16 *restrict x, int64_t st, int64_t sc, bf16 *restrict xp,
                        int64_t threads) {
    const int64_t n_tiles = (T + 15) / 16, kp = n / 2;
    PACK_PARALLEL
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
        bf16 *d = xp + tile * n * 16;
        if (sc == 1) {
            for (int64_t k0 = 0; k0 + 8 <= kp; k0 += 8)
                for (int h = 0; h < 2; ++h) {  /* tokens 8 h .. 8 h + 7 of the tile */
                    __m256 r[8];
                    for (int m = 0; m < 8; ++m) {
                        const int64_t tok = tile * 16 + 8 * h + m;
                        r[m] = tok < T ? _mm256_loadu_ps((const float *)(x + tok * st + 2 * k0)) : _mm256_setzero_ps();
                    }
                    transpose8(r);  /* r[m]: pair k0 + m of the 8 tokens */
                    for (int m = 0; m < 8; ++m) _mm256_storeu_ps((float *)(d + ((k0 + m) * 16 + 8 * h) * 2), r[m]);
                }
            continue;
        }
        for (int64_t k = 0; k < kp; ++k)
            for (int t = 0; t < 16; ++t) {
                const int64_t tok = tile * 16 + t;
                d[(k * 16 + t) * 2] = tok < T ? x[tok * st + 2 * k * sc] : 0;
                d[(k * 16 + t) * 2 + 1] = tok < T ? x[tok * st + (2 * k + 1) * sc] : 0;
            }
    }
}

/* The VNNI sub-blocks of bsr16_mm_dpbf16 from a layer's bf16 blocks, per call (the values change
   every step): for CSR positions [p0, p1), block blocks[bidx ? bidx[p] : p] of b = 16 q, whose
   element W'[l, k] (l the product's output, k its input) is at l * so + k * si - (b, 1) for
   blocks [o][i] of W (the forward), (1, b) for the same blocks as W^T (the input gradient).
   si = 1: each lane's 16 inputs are a row, whose 8 dwords go to the 8 VNNI rows; so = 1: two
   adjacent inputs' rows of 16 lanes interleaved word by word. Moves only. */
typedef uint16_t h16 __attribute__((vector_size(32), aligned(2)));
static const h16 interleave_lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
static const h16 interleave_hi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
void pack_vnni16(int64_t p0, int64_t p1, int64_t q, const int32_t *restrict bidx, const bf16 *restrict blocks,
                 int64_t so, int64_t si, bf16 *restrict vnni) {
    const int64_t b = 16 * q;
    for (int64_t p = p0; p < p1; ++p) {
        const bf16 *blk = blocks + (int64_t)(bidx ? bidx[p] : p) * b * b;
        for (int64_t P = 0; P < q; ++P)
            for (int64_t S = 0; S < q; ++S) {
                const bf16 *s0 = blk + 16 * P * so + 16 * S * si;
                bf16 *d = vnni + ((p * q + P) * q + S) * 256;
                if (si == 1) {
                    /* VNNI row j = dword j of the 16 lanes' rows: two 8 x 8 transposes of dwords
                       (DiagLinear b = 16 3072 -> 768 at 90%, the EPYC Zen 4: 56 us for the layer's
                       921 sub-blocks with dword copies, 64 with a gather per row) */
                    for (int h = 0; h < 2; ++h) {
                        __m256 r[8];
                        for (int m = 0; m < 8; ++m) r[m] = _mm256_loadu_ps((const float *)(s0 + (8 * h + m) * so));
                        transpose8(r);
                        for (int m = 0; m < 8; ++m) _mm256_storeu_ps((float *)(d + 32 * m + 16 * h), r[m]);
                    }
                } else if (so == 1) {
                    for (int j = 0; j < 8; ++j) {
                        const h16 a = *(const h16 *)(s0 + 2 * j * si), c = *(const h16 *)(s0 + (2 * j + 1) * si);
                        *(h16 *)(d + 32 * j) = __builtin_shuffle(a, c, interleave_lo);
                        *(h16 *)(d + 32 * j + 16) = __builtin_shuffle(a, c, interleave_hi);
                    }
                } else {
                    for (int j = 0; j < 8; ++j)
                        for (int l = 0; l < 16; ++l)
                            for (int e = 0; e < 2; ++e) d[32 * j + 2 * l + e] = s0[l * so + (2 * j + e) * si];
                }
            }
    }
}

/* AVX-512-BF16 weight gradient at stored b x b blocks (16 | b) for bf16 dy and x: g[n][o][i] =
   sum_t dy[t, rows[n] b + o] x[t, cols[n] b + i] (fp32, [n][o][i] as sddmm_blocks) for blocks
   [n0, n1), q x q sub-blocks of 16 x 16 each. Both in groups of 16 columns over token pairs,
   [n / 16][n_pairs][16][2] (pack_pair_groups: (v[2 u, c], v[2 u + 1, c]) side by side, tokens
   past T zero), so a sub-block streams two contiguous runs of 64 B a pair: per token pair one
   row of x's 16 columns (the lanes) against each of dy's 16 pairs broadcast, 16 VDPBF16PS into
   16 sums (a zmm per output row o, 32 multiply-adds each). */
void sddmm_blocks_dpbf16(int64_t n0, int64_t n1, int64_t b, int64_t n_pairs, const int32_t *restrict rows,
                         const int32_t *restrict cols, const bf16 *restrict dyg, const bf16 *restrict xg,
                         float *restrict g) {
    const int64_t q = b / 16;
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t P = 0; P < q; ++P)
            for (int64_t S = 0; S < q; ++S) {
                const bf16 *a = dyg + ((int64_t)rows[n] * q + P) * n_pairs * 32;
                const bf16 *c = xg + ((int64_t)cols[n] * q + S) * n_pairs * 32;
                ZMM_PS acc[16];
                for (int o = 0; o < 16; ++o) acc[o] = ZMM_SETZERO_PS();
                for (int64_t u = 0; u < n_pairs; ++u) {
                    const ZMM_BH xv = ZMM_LOADU_BH(c + u * 32);
                    for (int o = 0; o < 16; ++o) {
                        int32_t pair;
                        __builtin_memcpy(&pair, a + u * 32 + 2 * o, 4);
                        acc[o] = ZMM_DPBF16_PS(acc[o], xv, ZMM_SET1_PAIR(pair));
                    }
                }
                float *gn = g + n * b * b + 16 * P * b + 16 * S;
                for (int o = 0; o < 16; ++o) ZMM_STOREU_PS(gn + o * b, acc[o]);
            }
}

/* v [T, n] bf16 (element strides st, sc; n a multiple of 16) -> [n / 16][n_pairs][16][2]:
   (v[2 u, 16 c + l], v[2 u + 1, 16 c + l]) at [c][u][l], tokens past T zero (the operands of
   sddmm_blocks_dpbf16). With sc = 1 two token rows' 16 columns interleaved word by word. */
void pack_pair_groups(int64_t T, int64_t n, const bf16 *restrict v, int64_t st, int64_t sc, int64_t n_pairs,
                      bf16 *restrict out, int64_t threads) {
    const h16 zero = {0};
    PACK_PARALLEL
    for (int64_t u = 0; u < n_pairs; ++u) {
        const bf16 *r0 = 2 * u < T ? v + 2 * u * st : 0, *r1 = 2 * u + 1 < T ? v + (2 * u + 1) * st : 0;
        for (int64_t c = 0; c < n / 16; ++c) {
            bf16 *d = out + (c * n_pairs + u) * 32;
            if (sc == 1) {
                const h16 a = r0 ? *(const h16 *)(r0 + 16 * c) : zero, e = r1 ? *(const h16 *)(r1 + 16 * c) : zero;
                *(h16 *)d = __builtin_shuffle(a, e, interleave_lo);
                *(h16 *)(d + 16) = __builtin_shuffle(a, e, interleave_hi);
                continue;
            }
            for (int l = 0; l < 16; ++l) {
                d[2 * l] = r0 ? r0[(16 * c + l) * sc] : 0;
                d[2 * l + 1] = r1 ? r1[(16 * c + l) * sc] : 0;
            }
        }
    }
}
#endif

/* Which of the optional kernels this build has: bit 0 AMX (bsr16_mm_amx, sddmm_blocks_amx,
   pack_token_pairs), bit 1 AVX-512-BF16
   (bsr16_mv_dpbf16), bit 2 AVX-512-BF16 (csr_mm_*_dpbf16, pack_tokens_dpbf16), bit 3
   AVX-512-BF16 (sddmm_tiles_dpbf16, pack_tokens_bf16_tiles), bit 4 AVX-512-BF16 (bsr16_mm_dpbf16,
   sddmm_blocks_dpbf16 and their packs). */
int sparse_cpu_features(void) {
    int f = 0;
#ifdef HAVE_AMX
    f |= 1;
#endif
#ifdef HAVE_DPBF16
    f |= 2 | 4 | 8 | 16;
#endif
    return f;
}

/* fn(r0, r1, a[0], ..., a[PARALLEL_ARGS - 1]) for the rows [r0, r1) of each thread of an OpenMP team
   of `threads` (its share of [0, n) as kernels.cpu._split cuts it), returning the OR of their
   results (0 for `returns` = 0: fn returns nothing). fn is any function of this library: every
   argument after r0, r1 is an integer or a pointer, so each is passed as an int64 in the integer
   registers / stack slots of the x86-64 and AArch64 C conventions, and one that fn does not take
   is ignored by it (the caller owns the stack). Built with -fopenmp, the library's libgomp is the
   one torch has loaded (same soname, so the process maps one), and these threads are torch's
   intra-op threads: a Python thread pool instead competed with them while they spun after
   torch's own parallel regions (OpenMP's default wait policy), and two threads ran a layer's
   training step no faster than one on the 2-core Zen 4. A build without OpenMP has no
   parallel_rows (sparse_cpu_openmp() returns 0), and the caller keeps its own pool. */
#define PARALLEL_ARGS 16
typedef int (*rows_int_fn)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
typedef void (*rows_void_fn)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
#define ROWS_ARGS(a) a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], \
                     a[14], a[15]
#ifdef _OPENMP
#include <omp.h>
int sparse_cpu_openmp(void) { return 1; }
int parallel_rows(int64_t threads, int64_t n, const void *fn, int returns, const int64_t *a) {
    int err = 0;
#pragma omp parallel num_threads((int)threads) reduction(| : err)
    {
        const int64_t t = omp_get_thread_num(), m = omp_get_num_threads();
        const int64_t r0 = n * t / m, r1 = n * (t + 1) / m;
        if (r0 < r1) {
            if (returns)
                err |= ((rows_int_fn)fn)(r0, r1, ROWS_ARGS(a));
            else
                ((rows_void_fn)fn)(r0, r1, ROWS_ARGS(a));
        }
    }
    return err;
}
#else
int sparse_cpu_openmp(void) { return 0; }
#endif
