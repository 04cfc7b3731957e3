/* qbridge's CPU decode of bitsandbytes 4-bit weights (NF4 / FP4), bit for bit as torch_side's reference.
 *
 * Element i of a weight of n elements is the nibble q of packed byte i / 2 (the high nibble when i is
 * even) and decodes to code[q] * scale[i / blocksize] in float32, flushed to a zero of its sign below
 * FLT_MIN (as bitsandbytes' CUDA kernels are built to do), then rounded once to the output type. A scale
 * is absmax[j] (float32), or for a nested absmax flush(flush(nested_code[a[j]] * nested_absmax[j /
 * nested_blocksize]) + offset): two float32 roundings, no fused multiply-add (built with
 * -ffp-contract=off). Rounding to bfloat16 is to nearest even with every NaN written as 0xFFFF, as torch
 * does on the CPU; to float16 it is the IEEE conversion (round to nearest even, whatever the thread's
 * rounding mode).
 *
 * FP8 weights (qb_dequantize_fp8) decode element (r, c) as lut[byte] * scale[tile of (r, c)] in float32,
 * the table holding torch's float32 value of each of the 256 bytes, with no flush, then the same rounding
 * to the output type: torch_side's plain-torch FP8 decode, bit for bit. One exception, in both formats: a
 * NaN times a NaN (an FP8 NaN byte and a NaN scale; a NaN entry of a custom 4-bit table and a NaN scale) is
 * a NaN whose float32/float16 payload is either operand's (torch itself gives either, by the element's
 * place in its loops; vector and scalar code here may differ too); as bfloat16 every NaN is 0xFFFF.
 *
 * Every part of a call runs with the calling thread's floating-point control word (x86 MXCSR: flushing
 * denormals, torch.set_flush_denormal), so the pool's threads compute as the caller's thread would.
 *
 * Built by torch_side/_native.py with the machine's C compiler and loaded with ctypes; jax_side/_cpu_kernel.py
 * builds it again together with its XLA FFI binding (jax_side/kernels/cpu_4bit_xla.c) for jax_side's CPU decode.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* pthread_setname_np */
#endif
#include <float.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define QB_AVX512 1
#else
#define QB_AVX512 0
#endif
#if !QB_AVX512 && defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define QB_AVX2 1 /* 8 lanes: the 16-entry table as two 8-entry permutes */
#else
#define QB_AVX2 0
#endif

enum { QB_F32 = 0, QB_BF16 = 1, QB_F16 = 2 };

typedef struct qb_job qb_job;
struct qb_job {
    void (*run)(const qb_job *job); /* decodes this part */
    const uint8_t *packed;
    const float *absmax;        /* float32 scales, or NULL when nested */
    const uint8_t *absmax_code; /* uint8 codes of a nested absmax */
    const float *nested_code;   /* 256 entries */
    const float *nested_absmax;
    int64_t nested_blocksize;
    float offset;
    const float *code; /* 16 entries */
    int64_t n;
    int64_t blocksize;
    void *out;
    int kind;
    int64_t first_block, stop_block;
    /* FP8: w[r, c] as lut[byte] * scale[(r / block_rows) * scale_cols + c / block_cols], rows first_row.. */
    const uint8_t *fp8;
    const float *lut; /* 256 entries: the float32 value of every byte */
    const float *scale;
    int64_t rows, cols, block_rows, block_cols, scale_cols, first_row, stop_row;
    unsigned int csr; /* the caller's floating-point control word (x86) */
};

static inline uint32_t bits_of(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

static inline float float_of(uint32_t u) {
    float v;
    memcpy(&v, &u, 4);
    return v;
}

static inline float flush(float v) {
    uint32_t u = bits_of(v);
    return (u & 0x7fffffffu) < 0x00800000u ? float_of(u & 0x80000000u) : v;
}

static inline uint16_t bf16_of(float v) {
    uint32_t u = bits_of(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffu;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* float16 bits of v, rounded to nearest even whatever the thread's rounding mode (as the vector paths'
 * explicit rounding and torch's conversion do; a compiler's float16 cast follows the mode), in integer
 * arithmetic: a NaN keeps its sign and the top of its payload, quieted, as the hardware conversion does. */
static inline uint16_t f16_of(float v) {
    const uint32_t u = bits_of(v), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* from 65520 up: infinity */
    if (a >= 0x38800000u) { /* a normal float16: the exponent rebiased, 13 bits rounded off */
        const uint32_t m = a - 0x38000000u;
        return (uint16_t)(sign | ((m + 0x0fffu + ((m >> 13) & 1u)) >> 13));
    }
    if (a < 0x33000000u) return (uint16_t)sign; /* up to 2^-25, half the smallest subnormal: a zero */
    /* a float16 subnormal: the value in units of 2^-24, rounded */
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u, shift = 126u - (a >> 23);
    const uint32_t q = mant >> shift, rest = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    return (uint16_t)(sign | (q + (rest > half || (rest == half && (q & 1u)))));
}

static inline void store_one(void *out, int kind, int64_t i, float v) {
    if (kind == QB_F32)
        ((float *)out)[i] = v;
    else if (kind == QB_BF16)
        ((uint16_t *)out)[i] = bf16_of(v);
    else
        ((uint16_t *)out)[i] = f16_of(v);
}

static inline float scale_of(const qb_job *job, int64_t j) {
    if (job->absmax) return job->absmax[j];
    float s = flush(job->nested_code[job->absmax_code[j]] * job->nested_absmax[j / job->nested_blocksize]);
    return flush(s + job->offset);
}

#if QB_AVX512
static inline __m512 flush16(__m512 v) {
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), sign = _mm512_set1_epi32((int)0x80000000u);
    __m512i u = _mm512_castps_si512(v);
    __mmask16 tiny = _mm512_cmplt_epu32_mask(_mm512_and_si512(u, magnitude), _mm512_set1_epi32(0x00800000));
    return _mm512_castsi512_ps(_mm512_mask_and_epi32(u, tiny, u, sign));
}

static inline void store16(void *out, int kind, int64_t i, __m512 v) {
    if (kind == QB_F32) {
        _mm512_storeu_ps((float *)out + i, v);
    } else if (kind == QB_BF16) {
        __m512i u = _mm512_castps_si512(v);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xffff));
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm512_cvtepi32_epi16(r));
    } else {
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i),
                            _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

/* bfloat16 of two vectors (lo -> elements 0..15, hi -> 16..31), NaN written as 0xFFFF */
static inline void store32_bf16(uint16_t *out, __m512 lo, __m512 hi) {
#if defined(__AVX512BF16__)
    __m512i r = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    __mmask32 nan = (__mmask32)_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) |
                    ((__mmask32)_mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q) << 16);
    _mm512_storeu_si512((void *)out, _mm512_mask_mov_epi16(r, nan, _mm512_set1_epi16(-1)));
#else
    store16(out, QB_BF16, 0, lo);
    store16(out, QB_BF16, 16, hi);
#endif
}

/* The products table[q] * s of the 32 nibbles in 16 bytes, high nibble first: elements 0..15 in *v0, 16..31
 * in *v1 (not flushed). */
static inline void decode32(const uint8_t *bytes, __m512 table, __m512 s, __m512 *v0, __m512 *v1) {
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m128i x = _mm_loadu_si128((const __m128i *)bytes);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), low), lo = _mm_and_si128(x, low);
    *v0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), table), s);
    *v1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), table), s);
}

typedef __m512 qb_table; /* the 16-entry table in one register */
static inline qb_table load_table(const float *code) { return _mm512_loadu_ps(code); }
#define QB_STEP 32 /* elements per vector step of the row-major decode */

/* count elements from element `start` (even), count a multiple of QB_STEP, one scale */
static inline void run_step(const uint8_t *packed, qb_table table, float scale, void *out, int kind,
                            int flush_products, int64_t start, int64_t count) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t i = start; i < start + count; i += 32) {
        __m512 v0, v1;
        decode32(packed + i / 2, table, s, &v0, &v1);
        if (flush_products) {
            v0 = flush16(v0);
            v1 = flush16(v1);
        }
        if (kind == QB_BF16) {
            store32_bf16((uint16_t *)out + i, v0, v1);
        } else {
            store16(out, kind, i, v0);
            store16(out, kind, i + 16, v1);
        }
    }
}

/* QB_STEP products from the bytes at `bytes` (high nibble first), flushed, as float32 at `into` */
static inline void flushed_step(const uint8_t *bytes, qb_table table, float scale, float *into) {
    __m512 v0, v1;
    decode32(bytes, table, _mm512_set1_ps(scale), &v0, &v1);
    _mm512_storeu_ps(into, flush16(v0));
    _mm512_storeu_ps(into + 16, flush16(v1));
}
#endif

#if QB_AVX2
/* As flush16, over 8 lanes: a product below FLT_MIN in magnitude becomes a zero of its sign. */
static inline __m256 flush8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i tiny = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(u, _mm256_and_si256(u, _mm256_set1_epi32((int)0x80000000u)), tiny));
}

/* bfloat16 bits of 8 floats in the low half of each lane, rounded as bf16_of rounds (NaN as 0xFFFF) */
static inline __m256i bf16_bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0xffff), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

typedef struct {
    __m256 lo, hi; /* entries 0..7 and 8..15 */
} qb_table;
static inline qb_table load_table(const float *code) {
    const qb_table table = {_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)};
    return table;
}
#define QB_STEP 16

/* table[q] of 8 nibbles q (int32 lanes): from its low or high half, chosen by q's bit 3 */
static inline __m256 lookup8(__m256i q, qb_table table) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table.lo, q), _mm256_permutevar8x32_ps(table.hi, q),
                            _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
}

/* The products table[q] * s of the 16 nibbles in 8 bytes, high nibble first: elements 0..7 in *v0, 8..15 in
 * *v1 (not flushed). */
static inline void decode16(const uint8_t *bytes, qb_table table, __m256 s, __m256 *v0, __m256 *v1) {
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m128i x = _mm_loadl_epi64((const __m128i *)bytes);
    const __m128i q = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(x, 4), low), _mm_and_si128(x, low));
    *v0 = _mm256_mul_ps(lookup8(_mm256_cvtepu8_epi32(q), table), s);
    *v1 = _mm256_mul_ps(lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)), table), s);
}

/* 16 outputs from element i: v0 -> i..i+7, v1 -> i+8..i+15, rounded as store_one rounds */
static inline void store16x2(void *out, int kind, int64_t i, __m256 v0, __m256 v1) {
    if (kind == QB_F32) {
        _mm256_storeu_ps((float *)out + i, v0);
        _mm256_storeu_ps((float *)out + i + 8, v1);
    } else if (kind == QB_BF16) { /* packus interleaves 128-bit halves: the permute puts them back in order */
        const __m256i p = _mm256_packus_epi32(bf16_bits8(v0), bf16_bits8(v1));
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm256_permute4x64_epi64(p, 0xD8));
    } else {
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i + 8),
                         _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

/* count elements from element `start` (even), count a multiple of QB_STEP, one scale */
static inline void run_step(const uint8_t *packed, qb_table table, float scale, void *out, int kind,
                            int flush_products, int64_t start, int64_t count) {
    const __m256 s = _mm256_set1_ps(scale);
    for (int64_t i = start; i < start + count; i += 16) {
        __m256 v0, v1;
        decode16(packed + i / 2, table, s, &v0, &v1);
        if (flush_products) {
            v0 = flush8(v0);
            v1 = flush8(v1);
        }
        store16x2(out, kind, i, v0, v1);
    }
}

/* QB_STEP products from the bytes at `bytes` (high nibble first), flushed, as float32 at `into` */
static inline void flushed_step(const uint8_t *bytes, qb_table table, float scale, float *into) {
    __m256 v0, v1;
    decode16(bytes, table, _mm256_set1_ps(scale), &v0, &v1);
    _mm256_storeu_ps(into, flush8(v0));
    _mm256_storeu_ps(into + 8, flush8(v1));
}
#endif

#if QB_AVX512 || QB_AVX2
/* Products code[q] * scale can be denormal only when 0 < |scale| < FLT_MIN / (smallest nonzero |code|);
 * blocks with a scale at least twice that (or zero, NaN or infinite: no denormal products) skip the flush. */
static float flush_limit(const float *code) {
    float smallest = 0.0f;
    for (int q = 0; q < 16; q++) {
        float c = code[q] < 0 ? -code[q] : code[q];
        if (c > 0 && (smallest == 0.0f || c < smallest)) smallest = c;
    }
    return smallest > 0 ? 2.0f * (FLT_MIN / smallest) : 0.0f;
}
#endif

/* Element i of a 4-bit weight: its nibble (the high one when i is even) from the table, times its block's
 * scale, flushed below FLT_MIN. */
static inline float decode_one(const qb_job *job, int64_t i, float scale) {
    const uint8_t b = job->packed[i / 2];
    return flush(job->code[(i & 1) ? (b & 15) : (b >> 4)] * scale);
}

/* Elements i .. stop - 1 of a 4-bit weight (one block's, scale its scale), decoded and stored as the job's
 * kind: a block's tail after whole vector steps, or whole blocks where the build has no vector path. One
 * loop per kind, the kind chosen once, as fp8_store does for FP8. */
static inline void decode_run(const qb_job *job, int64_t i, int64_t stop, float scale) {
    if (job->kind == QB_F32) {
        float *o = (float *)job->out;
        for (; i < stop; i++) o[i] = decode_one(job, i, scale);
    } else if (job->kind == QB_BF16) {
        uint16_t *o = (uint16_t *)job->out;
        for (; i < stop; i++) o[i] = bf16_of(decode_one(job, i, scale));
    } else {
        uint16_t *o = (uint16_t *)job->out;
        for (; i < stop; i++) o[i] = f16_of(decode_one(job, i, scale));
    }
}

static void run_blocks(const qb_job *job) {
    const int64_t bs = job->blocksize, n = job->n;
#if QB_AVX512 || QB_AVX2
    const float limit = flush_limit(job->code);
    const qb_table table = load_table(job->code);
#endif
    for (int64_t j = job->first_block; j < job->stop_block; j++) {
        const float scale = scale_of(job, j);
        const int64_t start = j * bs, stop = start + bs < n ? start + bs : n;
        int64_t i = start;
#if QB_AVX512 || QB_AVX2
        const float magnitude = scale < 0 ? -scale : scale;
        const int exact = magnitude >= limit || magnitude == 0.0f || magnitude > FLT_MAX; /* NaN: flush path */
        const int64_t vec = (stop - start) - (stop - start) % QB_STEP;
        if (vec) {
            if (job->kind == QB_BF16) {
                if (exact)
                    run_step(job->packed, table, scale, job->out, QB_BF16, 0, start, vec);
                else
                    run_step(job->packed, table, scale, job->out, QB_BF16, 1, start, vec);
            } else if (job->kind == QB_F32) {
                run_step(job->packed, table, scale, job->out, QB_F32, !exact, start, vec);
            } else {
                run_step(job->packed, table, scale, job->out, QB_F16, !exact, start, vec);
            }
            i += vec;
        }
#endif
        decode_run(job, i, stop, scale);
    }
}

#define QB_TILE_C 64
#if QB_AVX512
#define QB_TILE_R 16 /* rows per tile of the transposed decodes */
/* Stores a decoded tile (16 rows from row r, `width` columns from column c0, QB_TILE_C floats per row)
 * transposed: tile column c becomes outputs (c0 + c) * rows + r .. + 15, rounded as store16 rounds. */
static inline void store_tile_t(const qb_job *job, const float *tile, int64_t r, int64_t c0, int64_t width) {
    const __m512i down = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(QB_TILE_C));
    for (int64_t c = 0; c < width; c++)
        store16(job->out, job->kind, (c0 + c) * job->rows + r, _mm512_i32gather_ps(down, tile + c, 4));
}
#elif QB_AVX2
#define QB_TILE_R 8
/* As above, for a tile of 8 rows: tile column c becomes outputs (c0 + c) * rows + r .. + 7. */
static inline void store_tile_t(const qb_job *job, const float *tile, int64_t r, int64_t c0, int64_t width) {
    const __m256i down = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(QB_TILE_C));
    for (int64_t c = 0; c < width; c++) {
        const __m256 v = _mm256_i32gather_ps(tile + c, down, 4);
        const int64_t i = (c0 + c) * job->rows + r;
        if (job->kind == QB_F32) {
            _mm256_storeu_ps((float *)job->out + i, v);
        } else if (job->kind == QB_BF16) {
            const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits8(v), bf16_bits8(v)), 0xD8);
            _mm_storeu_si128((__m128i *)((uint16_t *)job->out + i), _mm256_castsi256_si128(p));
        } else {
            _mm_storeu_si128((__m128i *)((uint16_t *)job->out + i),
                             _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
    }
}
#endif

#if QB_AVX512 || QB_AVX2
/* `width` elements of one row from flat element i into `into`, segment by segment of one absmax block: the
 * products, flushed (rounded later, as the tile is stored). */
static inline void decode_row(const qb_job *job, float *into, int64_t i, int64_t width) {
    const int64_t bs = job->blocksize;
    int64_t c = 0;
    while (c < width) {
        const int64_t j = i / bs;
        const int64_t seg = (j + 1) * bs - i < width - c ? (j + 1) * bs - i : width - c;
        const float scale = scale_of(job, j);
        int64_t e = 0;
        if ((i & 1) == 0) { /* whole bytes, high nibble first */
            const qb_table table = load_table(job->code);
            for (; e + QB_STEP <= seg; e += QB_STEP) flushed_step(job->packed + (i + e) / 2, table, scale, into + c + e);
        }
        for (; e < seg; e++) into[c + e] = decode_one(job, i + e, scale);
        i += seg;
        c += seg;
    }
}
#endif

/* The 4-bit decode written transposed, for a weight of shape [rows, cols] (element i = r * cols + c of the
 * flat order): element (r, c) to out[c * rows + r], the [cols, rows] layout (a Linear's kernel in Flax).
 * QB_TILE_R rows at a time (16 with AVX-512, 8 with AVX2) are decoded into a float32 tile 64 columns wide
 * (segment by segment of one absmax block), and each of its columns is stored as QB_TILE_R consecutive
 * outputs: the same products, flushes and rounding as the row-major decode. Rows first_row .. stop_row - 1. */
static void run_blocks_t(const qb_job *job) {
    const int64_t cols = job->cols, rows = job->rows, bs = job->blocksize;
    int64_t r = job->first_row;
#if QB_AVX512 || QB_AVX2
    float tile[QB_TILE_R * QB_TILE_C];
    for (; r + QB_TILE_R <= job->stop_row; r += QB_TILE_R) {
        for (int64_t c0 = 0; c0 < cols; c0 += QB_TILE_C) {
            const int64_t width = cols - c0 < QB_TILE_C ? cols - c0 : QB_TILE_C;
            for (int k = 0; k < QB_TILE_R; k++) decode_row(job, tile + k * QB_TILE_C, (r + k) * cols + c0, width);
            store_tile_t(job, tile, r, c0, width);
        }
    }
#endif
    for (; r < job->stop_row; r++)
        for (int64_t c = 0, i = r * cols; c < cols; c++, i++)
            store_one(job->out, job->kind, c * rows + r, decode_one(job, i, scale_of(job, i / bs)));
}

/* Elements c .. c1 - 1 of an FP8 row (its bytes w, element c at out[base + c]): lut[w[c]] * scale, stored
 * as `kind`: a row's tail after whole vectors, or a whole row where the build has no vector path. One loop
 * per kind, the kind chosen once (with store_one's choice inside one loop, beside float16's branching
 * conversion, the compiler vectorized none of them). */
static inline void fp8_store(void *out, int kind, int64_t base, const float *lut, const uint8_t *w, float scale,
                             int64_t c, int64_t c1) {
    if (kind == QB_F32) {
        float *o = (float *)out + base;
        for (; c < c1; c++) o[c] = lut[w[c]] * scale;
    } else if (kind == QB_BF16) {
        uint16_t *o = (uint16_t *)out + base;
        for (; c < c1; c++) o[c] = bf16_of(lut[w[c]] * scale);
    } else {
        uint16_t *o = (uint16_t *)out + base;
        for (; c < c1; c++) o[c] = f16_of(lut[w[c]] * scale);
    }
}

/* FP8 rows first_row .. stop_row - 1: each byte's float32 value from the table, times its tile's scale in
 * float32 (one rounding), rounded once more while storing: the plain-torch decode's order of operations. */
static void run_fp8_rows(const qb_job *job) {
    const int64_t cols = job->cols, bc = job->block_cols;
    for (int64_t r = job->first_row; r < job->stop_row; r++) {
        const float *scales = job->scale + (r / job->block_rows) * job->scale_cols;
        const uint8_t *w = job->fp8 + r * cols;
        const int64_t base = r * cols;
        for (int64_t c0 = 0; c0 < cols; c0 += bc) {
            const int64_t c1 = cols - c0 > bc ? c0 + bc : cols;
            const float scale = scales[c0 / bc];
            int64_t c = c0;
#if QB_AVX512
            const __m512 s = _mm512_set1_ps(scale);
            for (; c + 16 <= c1; c += 16) {
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + c)));
                store16(job->out, job->kind, base + c, _mm512_mul_ps(s, _mm512_i32gather_ps(bytes, job->lut, 4)));
            }
#elif QB_AVX2
            /* float32 and float16 (rounded to nearest even by the instruction, whatever the thread's mode): 16
             * bytes a step, two gathers of 8 table entries. bfloat16 goes to fp8_store, whose loop the
             * compiler vectorizes (on the AVX2 machine 6.3 ms at 2048x7168 on 2 threads, this path 8.9 ms);
             * it vectorizes neither of the other two (13 and 35 ms, this path 7 ms each) */
            const __m256 s = _mm256_set1_ps(scale);
            for (; job->kind != QB_BF16 && c + 16 <= c1; c += 16) {
                const __m128i bytes = _mm_loadu_si128((const __m128i *)(w + c));
                const __m256 v0 = _mm256_i32gather_ps(job->lut, _mm256_cvtepu8_epi32(bytes), 4);
                const __m256 v1 = _mm256_i32gather_ps(job->lut, _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), 4);
                store16x2(job->out, job->kind, base + c, _mm256_mul_ps(s, v0), _mm256_mul_ps(s, v1));
            }
#endif
            fp8_store(job->out, job->kind, base, job->lut, w, scale, c, c1);
        }
    }
}

/* The FP8 decode written transposed (as run_blocks_t writes the 4-bit one): element (r, c) of the [rows, cols]
 * weight to out[c * rows + r], QB_TILE_R rows at a time through a float32 tile 64 columns wide; the same
 * products and rounding while storing. */
static inline float fp8_value(const qb_job *job, int64_t r, int64_t c) {
    return job->lut[job->fp8[r * job->cols + c]] * job->scale[(r / job->block_rows) * job->scale_cols + c / job->block_cols];
}

#if QB_AVX512 || QB_AVX2
/* Columns c0 .. c0 + width - 1 of FP8 row rr into `into`: each byte's float32 value times its tile's scale. */
static inline void fp8_row(const qb_job *job, float *into, int64_t rr, int64_t c0, int64_t width) {
    const int64_t bc = job->block_cols;
    const float *scales = job->scale + (rr / job->block_rows) * job->scale_cols;
    const uint8_t *w = job->fp8 + rr * job->cols + c0;
    int64_t c = 0;
#if QB_AVX512
    for (; c + 16 <= width; c += 16) {
        const int64_t first = (c0 + c) / bc, last = (c0 + c + 15) / bc;
        if (first != last) break; /* 16 columns across two scale blocks: element by element */
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + c)));
        _mm512_storeu_ps(into + c, _mm512_mul_ps(_mm512_set1_ps(scales[first]), _mm512_i32gather_ps(bytes, job->lut, 4)));
    }
#else
    for (; c + 8 <= width; c += 8) {
        const int64_t first = (c0 + c) / bc, last = (c0 + c + 7) / bc;
        if (first != last) break; /* 8 columns across two scale blocks: element by element */
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + c)));
        _mm256_storeu_ps(into + c, _mm256_mul_ps(_mm256_set1_ps(scales[first]), _mm256_i32gather_ps(job->lut, bytes, 4)));
    }
#endif
    for (; c < width; c++) into[c] = job->lut[w[c]] * scales[(c0 + c) / bc];
}
#endif

static void run_fp8_rows_t(const qb_job *job) {
    const int64_t cols = job->cols, rows = job->rows;
    int64_t r = job->first_row;
#if QB_AVX512 || QB_AVX2
    float tile[QB_TILE_R * QB_TILE_C];
    for (; r + QB_TILE_R <= job->stop_row; r += QB_TILE_R) {
        for (int64_t c0 = 0; c0 < cols; c0 += QB_TILE_C) {
            const int64_t width = cols - c0 < QB_TILE_C ? cols - c0 : QB_TILE_C;
            for (int k = 0; k < QB_TILE_R; k++) fp8_row(job, tile + k * QB_TILE_C, r + k, c0, width);
            store_tile_t(job, tile, r, c0, width);
        }
    }
#endif
    for (; r < job->stop_row; r++)
        for (int64_t c = 0; c < cols; c++) store_one(job->out, job->kind, c * rows + r, fp8_value(job, r, c));
}


#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define QB_CSR 1
#else
#define QB_CSR 0
#endif

/* One part, under the caller's floating-point control word, restoring this thread's afterwards. */
static void run_part(const qb_job *job) {
#if QB_CSR
    const unsigned int own = _mm_getcsr();
    _mm_setcsr(job->csr);
    job->run(job);
    _mm_setcsr(own);
#else
    job->run(job);
#endif
}

/* A pool of worker threads, started on first use and kept: starting a thread per call costs more than
 * decoding a megabyte. A call splits its work into parts, several per thread (QB_PARTS_PER_THREAD), and
 * publishes them in one 64-bit word (generation, seats, number of parts, next part to claim); the caller
 * and the workers claim parts from that word with compare-and-swap, so each part runs exactly once, by
 * whichever thread claims it. A worker takes one of the call's `threads - 1` seats with its first claim
 * (in the same compare-and-swap), so no more threads than asked decode, whatever the pool's size; a worker
 * that wakes late can only claim parts of the call being served (their jobs stay valid until the call has
 * counted all of them done). Several parts per thread let the threads that run take over the parts of one
 * that starts late or is preempted (with one part per thread the caller waited for that thread's whole
 * share); torch's OpenMP team below claims the same parts. A worker that found nothing to claim spins for
 * up to SPIN_NS before it sleeps, so that calls in a loop do not pay a wake-up each. One call uses the pool
 * at a time; a call that finds it busy decodes alone. */
#define QB_MAX_THREADS 64
#define QB_PARTS_PER_THREAD 8
#define QB_MAX_PARTS 64
#define SPIN_NS 200000L
#define WORD(gen, seats, parts, next)                                                                         \
    (((uint64_t)(gen) << 24) | ((uint64_t)(seats) << 16) | ((uint64_t)(parts) << 8) | (uint64_t)(next))
#define WORD_GEN(w) ((w) >> 24)
#define WORD_SEATS(w) ((int)(((w) >> 16) & 0xff))
#define WORD_PARTS(w) ((int)(((w) >> 8) & 0xff))
#define WORD_NEXT(w) ((int)((w) & 0xff))
#define ONE_SEAT ((uint64_t)1 << 16)
static pthread_mutex_t pool_call = PTHREAD_MUTEX_INITIALIZER; /* held by the call using the pool */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_start = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static qb_job pool_jobs[QB_MAX_PARTS];
static int pool_workers = 0;
static int pool_pending = 0; /* atomic: parts of the current call not finished yet */
static uint64_t pool_word = 0; /* atomic: WORD(generation, seats left, parts, next part to claim) */
typedef void (*qb_gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static qb_gomp_parallel_fn gomp_parallel = NULL; /* torch's OpenMP, where set (see qb_use_gomp_parallel) */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Claims the next part of generation `gen`: its index, or -1 when none is left (or the word has moved on
 * to another call). With `seat`, the claim also takes one of the call's seats, and gives -2 when parts
 * are left but no seat is. */
static int claim(uint64_t gen, int seat) {
    uint64_t w = __atomic_load_n(&pool_word, __ATOMIC_ACQUIRE);
    while (WORD_GEN(w) == gen && WORD_NEXT(w) < WORD_PARTS(w)) {
        if (seat && WORD_SEATS(w) == 0) return -2;
        const uint64_t next = w + 1 - (seat ? ONE_SEAT : 0);
        if (__atomic_compare_exchange_n(&pool_word, &w, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return WORD_NEXT(w);
    }
    return -1;
}

static void finish_part(void) {
    if (__atomic_sub_fetch(&pool_pending, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_lock(&pool_lock);
        pthread_cond_signal(&pool_done);
        pthread_mutex_unlock(&pool_lock);
    }
}

static void *pool_worker(void *arg) {
    (void)arg;
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "qbridge-decode"); /* as its creator names it, should that fail */
#endif
    uint64_t served = WORD_GEN(__atomic_load_n(&pool_word, __ATOMIC_ACQUIRE)); /* the last call looked at */
    for (;;) {
        const uint64_t gen = WORD_GEN(__atomic_load_n(&pool_word, __ATOMIC_ACQUIRE));
        int seated = 1;
        if (gen != served) { /* a call to serve: a seat with the first part, then parts while any are left */
            served = gen;
            int part = claim(gen, 1);
            seated = part != -2;
            for (; part >= 0; part = claim(gen, 0)) {
                run_part(&pool_jobs[part]);
                finish_part();
            }
            if (seated) continue;
        }
        /* wait for the next call (a new generation), spinning first, unless the last call had no seat for
         * this worker (calls of fewer threads than the pool holds: it would take CPU from those that decode) */
        const long until = seated ? now_ns() + SPIN_NS : 0;
        int changed = 0;
        while (!changed && now_ns() < until) {
            for (int k = 0; k < 64 && !changed; k++) {
                changed = WORD_GEN(__atomic_load_n(&pool_word, __ATOMIC_ACQUIRE)) != served;
                cpu_relax();
            }
        }
        if (!changed) {
            pthread_mutex_lock(&pool_lock);
            while (WORD_GEN(__atomic_load_n(&pool_word, __ATOMIC_ACQUIRE)) == served)
                pthread_cond_wait(&pool_start, &pool_lock);
            pthread_mutex_unlock(&pool_lock);
        }
    }
    return NULL;
}

static void pool_after_fork(void) { /* the child has no workers: start again (locks as at startup) */
    pthread_mutex_t unlocked = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh = PTHREAD_COND_INITIALIZER;
    pool_call = unlocked;
    pool_lock = unlocked;
    pool_start = fresh;
    pool_done = fresh;
    pool_workers = 0;
    pool_pending = 0;
    pool_word = WORD(WORD_GEN(pool_word) + 1, 0, 0, 0);
    gomp_parallel = NULL;
}

/* torch's own threads, where torch runs on GNU OpenMP (its Linux builds): GOMP_parallel of the libgomp torch
 * loaded, set by torch_side (qb_use_gomp_parallel) when it loads this library. A call from the process's
 * main thread then runs its parts on torch's OpenMP team instead of the pool above: the threads torch has
 * just used spin for a while after each of torch's parallel operations (bitsandbytes' CPU kernel is one),
 * and a pool of our own beside them was seen to get no CPU for milliseconds on a 2-core machine (calls at a
 * single thread's time, 1.8x the usual, in 10-30 % of the blocks of calls timed). Other threads keep the
 * pool: libgomp gives every thread that starts a parallel region a team of its own. A forked child keeps
 * the pool too (libgomp's threads do not survive a fork). */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_register_fork(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

void qb_use_gomp_parallel(void *fn) {
    pthread_once(&pool_once, pool_register_fork);
    __atomic_store_n(&gomp_parallel, (qb_gomp_parallel_fn)fn, __ATOMIC_RELEASE);
}

static int on_main_thread(void) {
#if defined(__linux__)
    static __thread int main_thread = -1;
    if (main_thread < 0) main_thread = (pid_t)syscall(SYS_gettid) == getpid();
    return main_thread;
#else
    return 0;
#endif
}

typedef struct {
    qb_job *jobs;
    int parts;
    int next; /* atomic: the next part to claim */
} qb_team_call;

static void team_body(void *data) { /* run by each thread of the team, the caller included */
    qb_team_call *call = (qb_team_call *)data;
    for (int part; (part = __atomic_fetch_add(&call->next, 1, __ATOMIC_ACQ_REL)) < call->parts;)
        run_part(&call->jobs[part]);
}

/* Runs parts 0 .. parts-1 of jobs on this thread and on up to threads - 1 of the pool's; returns the number
 * of threads offered. */
static int run_parallel(qb_job *jobs, int parts, int threads) {
    pthread_once(&pool_once, pool_register_fork);
#if QB_CSR
    for (int t = 0; t < parts; t++) jobs[t].csr = _mm_getcsr();
#endif
    const qb_gomp_parallel_fn team = __atomic_load_n(&gomp_parallel, __ATOMIC_ACQUIRE);
    if (team && threads > 1 && parts > 1 && on_main_thread()) {
        qb_team_call call = {jobs, parts, 0};
        team(team_body, &call, (unsigned)threads, 0); /* returns when every part is done */
        return threads;
    }
    if (threads > 1 && parts > 1 && pthread_mutex_trylock(&pool_call) == 0) {
        while (pool_workers < threads - 1 && pool_workers + 1 < QB_MAX_THREADS) {
            pthread_t id;
            if (pthread_create(&id, NULL, pool_worker, NULL) != 0) break;
#if defined(__linux__)
            pthread_setname_np(id, "qbridge-decode"); /* as tools (top -H, py-spy) show it */
#endif
            pthread_detach(id);
            pool_workers++;
        }
        const int seats = pool_workers < threads - 1 ? pool_workers : threads - 1;
        for (int t = 0; t < parts; t++) pool_jobs[t] = jobs[t];
        __atomic_store_n(&pool_pending, parts, __ATOMIC_RELEASE);
        pthread_mutex_lock(&pool_lock);
        const uint64_t gen = WORD_GEN(__atomic_load_n(&pool_word, __ATOMIC_ACQUIRE)) + 1;
        __atomic_store_n(&pool_word, WORD(gen, seats, parts, 0), __ATOMIC_RELEASE);
        for (int k = 0; k < seats; k++) pthread_cond_signal(&pool_start); /* sleepers enough for the seats */
        pthread_mutex_unlock(&pool_lock);
        for (int part; (part = claim(gen, 0)) >= 0;) { /* every part nobody else took */
            run_part(&pool_jobs[part]);
            __atomic_sub_fetch(&pool_pending, 1, __ATOMIC_ACQ_REL);
        }
        const long until = now_ns() + SPIN_NS;
        while (__atomic_load_n(&pool_pending, __ATOMIC_ACQUIRE) > 0 && now_ns() < until) cpu_relax();
        pthread_mutex_lock(&pool_lock);
        while (__atomic_load_n(&pool_pending, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&pool_done, &pool_lock);
        pthread_mutex_unlock(&pool_lock);
        pthread_mutex_unlock(&pool_call);
        return seats + 1;
    }
    for (int t = 0; t < parts; t++) jobs[t].run(&jobs[t]); /* on the caller's thread: its own word */
    return 1;
}

/* The threads a call uses: at most `threads`, one per 2**18 elements (less is decoded faster on one thread),
 * at least one, and at most one per unit of work (`units`: blocks or rows). */
static int thread_count(int threads, int64_t elements, int64_t units) {
    const int64_t per_thread = (int64_t)1 << 18;
    if ((int64_t)threads > elements / per_thread) threads = (int)(elements / per_thread);
    if (threads < 1) threads = 1;
    if (threads > QB_MAX_THREADS) threads = QB_MAX_THREADS;
    if (threads > units) threads = (int)units;
    return threads;
}

/* The parts a call of `threads` threads is split into: one on one thread, else QB_PARTS_PER_THREAD per
 * thread, at most QB_MAX_PARTS and at most one per unit of work. */
static int part_count(int threads, int64_t units) {
    if (threads <= 1) return 1;
    int64_t parts = (int64_t)threads * QB_PARTS_PER_THREAD;
    if (parts > QB_MAX_PARTS) parts = QB_MAX_PARTS;
    if (parts > units) parts = units;
    return (int)parts;
}

/* Where part t of `parts` starts among `units` units, at a multiple of `align` (the last part ends at
 * `units`): a part of rows then holds whole tiles of the transposed decodes. */
static int64_t part_start(int64_t units, int t, int parts, int64_t align) {
    if (t >= parts) return units;
    const int64_t start = units * t / parts;
    return start - start % align;
}

/* The parts of a transposed decode of `rows` rows (and in *align, where they may start): at whole 4 KiB
 * pages of each output row where there are rows enough for a part per thread (1024 or 2048 rows: whole
 * tiles too), so that each part writes pages of its own; parts that shared the pages of a new result made
 * the threads fault the same pages in (4096x4096 NF4 -> bf16 written transposed: 19-21 ms against
 * 14.6-14.9 with one part per thread, each on half of every row's pages). Fewer rows: one part per
 * thread, at whole tiles. */
#ifdef QB_TILE_R
#define QB_TILE_ROWS QB_TILE_R
#else
#define QB_TILE_ROWS 1
#endif
static int transposed_parts(int threads, int64_t rows, int kind, int64_t *align) {
    const int64_t page_rows = 4096 / (kind == QB_F32 ? 4 : 2);
    if (rows / page_rows >= threads) {
        *align = page_rows;
        return part_count(threads, rows / page_rows);
    }
    *align = QB_TILE_ROWS;
    const int64_t tiles = rows / QB_TILE_ROWS > 0 ? rows / QB_TILE_ROWS : 1;
    return threads < tiles ? threads : (int)tiles;
}

/* Decodes n elements into out (kind: 0 float32, 1 bfloat16, 2 float16) on up to `threads` threads.
 * absmax: float32 scales, or NULL with absmax_code/nested_code/nested_absmax/offset for a nested absmax.
 * Returns the number of threads that decoded. */
int qb_dequantize_4bit(const uint8_t *packed, const float *absmax, const uint8_t *absmax_code,
                       const float *nested_code, const float *nested_absmax, int64_t nested_blocksize,
                       float offset, const float *code, int64_t n, int64_t blocksize, void *out, int kind,
                       int threads) {
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    threads = thread_count(threads, n, blocks);
    const int parts = part_count(threads, blocks);
    qb_job jobs[QB_MAX_PARTS];
    for (int t = 0; t < parts; t++) {
        qb_job job = {.run = run_blocks, .packed = packed, .absmax = absmax, .absmax_code = absmax_code,
                      .nested_code = nested_code, .nested_absmax = nested_absmax,
                      .nested_blocksize = nested_blocksize, .offset = offset, .code = code, .n = n,
                      .blocksize = blocksize, .out = out, .kind = kind,
                      .first_block = part_start(blocks, t, parts, 1),
                      .stop_block = part_start(blocks, t + 1, parts, 1)};
        jobs[t] = job;
    }
    return run_parallel(jobs, parts, threads);
}

/* qb_dequantize_4bit of a [rows, cols] weight (n = rows * cols), written transposed: element (r, c) at
 * out[c * rows + r]. Rows are split over up to `threads` threads. Returns the number of threads that decoded. */
int qb_dequantize_4bit_t(const uint8_t *packed, const float *absmax, const uint8_t *absmax_code,
                         const float *nested_code, const float *nested_absmax, int64_t nested_blocksize,
                         float offset, const float *code, int64_t rows, int64_t cols, int64_t blocksize, void *out,
                         int kind, int threads) {
    threads = thread_count(threads, rows * cols, rows);
    int64_t align = 1;
    const int parts = transposed_parts(threads, rows, kind, &align);
    qb_job jobs[QB_MAX_PARTS];
    for (int t = 0; t < parts; t++) {
        qb_job job = {.run = run_blocks_t, .packed = packed, .absmax = absmax, .absmax_code = absmax_code,
                      .nested_code = nested_code, .nested_absmax = nested_absmax,
                      .nested_blocksize = nested_blocksize, .offset = offset, .code = code, .n = rows * cols,
                      .blocksize = blocksize, .out = out, .kind = kind, .rows = rows, .cols = cols,
                      .first_row = part_start(rows, t, parts, align),
                      .stop_row = part_start(rows, t + 1, parts, align)};
        jobs[t] = job;
    }
    return run_parallel(jobs, parts, threads);
}

/* A planned 4-bit call (torch_side._nf4.NF4CpuPlan): what the plan fixed, as int64 values in `plan`
 * (QB_PLAN_*), and the pointers each call brings, so that a call from Python converts eight arguments where
 * qb_dequantize_4bit takes thirteen (about 0.4 us of a 64x64 call's 8). `scales` is the float32 absmax, or
 * with nested_code and nested_absmax the uint8 absmax codes. Returns the number of threads that decoded. */
enum { QB_PLAN_CODE, QB_PLAN_N, QB_PLAN_ROWS, QB_PLAN_COLS, QB_PLAN_BLOCKSIZE, QB_PLAN_NESTED_BLOCKSIZE,
       QB_PLAN_KIND, QB_PLAN_TRANSPOSED };

int qb_dequantize_4bit_planned(const int64_t *plan, const uint8_t *packed, const void *scales,
                               const float *nested_code, const float *nested_absmax, float offset, void *out,
                               int threads) {
    const float *code = (const float *)(intptr_t)plan[QB_PLAN_CODE];
    const float *absmax = nested_code ? NULL : (const float *)scales;
    const uint8_t *absmax_code = nested_code ? (const uint8_t *)scales : NULL;
    const int64_t nested_blocksize = nested_code ? plan[QB_PLAN_NESTED_BLOCKSIZE] : 1;
    if (plan[QB_PLAN_TRANSPOSED])
        return qb_dequantize_4bit_t(packed, absmax, absmax_code, nested_code, nested_absmax, nested_blocksize,
                                    offset, code, plan[QB_PLAN_ROWS], plan[QB_PLAN_COLS],
                                    plan[QB_PLAN_BLOCKSIZE], out, (int)plan[QB_PLAN_KIND], threads);
    return qb_dequantize_4bit(packed, absmax, absmax_code, nested_code, nested_absmax, nested_blocksize, offset,
                              code, plan[QB_PLAN_N], plan[QB_PLAN_BLOCKSIZE], out, (int)plan[QB_PLAN_KIND],
                              threads);
}

/* Decodes an FP8 matrix [rows, cols] (its bytes) into out (kind as above) on up to `threads` threads: element
 * (r, c) is lut[byte] * scale[(r / block_rows) * scale_cols + c / block_cols] in float32, rounded to the kind,
 * written at out[r * cols + c], or with `transpose` at out[c * rows + r]. Returns the number of threads that
 * decoded. */
int qb_dequantize_fp8(const uint8_t *w, const float *lut, const float *scale, int64_t rows, int64_t cols,
                      int64_t block_rows, int64_t block_cols, int64_t scale_cols, void *out, int kind,
                      int threads, int transpose) {
    threads = thread_count(threads, rows * cols, rows);
    int64_t align = 1;
    const int parts = transpose ? transposed_parts(threads, rows, kind, &align) : part_count(threads, rows);
    qb_job jobs[QB_MAX_PARTS];
    for (int t = 0; t < parts; t++) {
        qb_job job = {.run = transpose ? run_fp8_rows_t : run_fp8_rows, .out = out, .kind = kind, .fp8 = w,
                      .lut = lut, .scale = scale, .rows = rows, .cols = cols, .block_rows = block_rows,
                      .block_cols = block_cols, .scale_cols = scale_cols,
                      .first_row = part_start(rows, t, parts, align),
                      .stop_row = part_start(rows, t + 1, parts, align)};
        jobs[t] = job;
    }
    return run_parallel(jobs, parts, threads);
}
