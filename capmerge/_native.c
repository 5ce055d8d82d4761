/*
 * capmerge._native: the CPU compute kernel of the streaming engine.
 *
 * One pass over a block of elements, in L1-sized tiles: load each input (fp32 / fp16 / bf16) into a float32
 * tile, do the arithmetic in float32, round once (round-to-nearest-even) to the output dtype and store.
 * No Python, numpy or torch objects are touched while the GIL is released, so the reader and writer threads of
 * the engine run in parallel with it. Built with -ffp-contract=off: a*b+c is two roundings, exactly like the
 * numpy / torch reference (no FMA), so results are bit-for-bit reproducible across machines.
 *
 * Semantics (documented in capmerge/compute.py and the README):
 *   diff:  out = round(a - b)
 *   merge: d = sum_i (w_i * v_i)  (left to right, starting from 0);  out = round(base + alpha * d)
 * Both return flags: bit 0 = some output element is non-zero, bit 1 = some output element is NaN/Inf although
 * all of its inputs were finite (overflow), bit 2 = some output element is NaN/Inf.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_F16C_PATH 1
#else
#define HAVE_F16C_PATH 0
#endif

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

#define TILE 1024
#define MAX_VECTORS 64

#define PREFETCH_AHEAD 4096 /* bytes: how far ahead of a loop's reads prefetch_at asks for a line */

/* A prefetch of the line PREFETCH_AHEAD bytes past element i of src (bf16, f16 or float32): a hint, no fault past
 * the end. The hardware's stream prefetch stops at each 4 KB page, and a mapped file's pages lie anywhere. */
#if defined(__GNUC__)
static inline __attribute__((always_inline)) void prefetch_at(const void *src, int dt, Py_ssize_t i) {
    __builtin_prefetch((const char *)src + i * (dt == DT_F32 ? 4 : 2) + PREFETCH_AHEAD);
}
#else
static inline void prefetch_at(const void *src, int dt, Py_ssize_t i) { (void)src, (void)dt, (void)i; }
#endif

/* CAPMERGE_NATIVE_CPU caps the loops the dispatch below picks, whatever the CPU has: "avx2" (no AVX-512 loop),
 * "baseline" (the plain C loops: no AVX2, FMA or F16C one either); unset: the fastest the CPU has (the Python side
 * refuses any other value). Read once. Every form of a loop gives the same bits, so this changes the speed only:
 * the tests compare whole merges under each cap, and the benchmarks time the AVX2 loops on a CPU with AVX-512.
 * Returns 0 (no cap), 1 (AVX2 at most) or 2 (baseline). */
static int cpu_cap(void) {
    static int cap = -1;
    if (cap < 0) {
        const char *v = getenv("CAPMERGE_NATIVE_CPU");
        cap = v && !strcmp(v, "avx2") ? 1 : v && !strcmp(v, "baseline") ? 2 : 0;
    }
    return cap;
}

/* static int NAME(void): whether the CPU has what EXPR asks (__builtin_cpu_supports), found once, and the cap
 * allows loops of that LEVEL (1: AVX-512, 2: AVX2, FMA, F16C) */
#define CPU_CHECK(name, level, expr)                                                                                   \
    static int name(void) {                                                                                            \
        static int ok = -1;                                                                                            \
        if (ok < 0) {                                                                                                  \
            __builtin_cpu_init();                                                                                      \
            ok = cpu_cap() < (level) && (expr);                                                                        \
        }                                                                                                              \
        return ok;                                                                                                     \
    }

static inline uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE half -> float, exact (subnormals, inf, nan kept). Branch-free. */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t exp = o & 0x0f800000u;
    uint32_t normal = o + ((uint32_t)(127 - 15) << 23);
    uint32_t infnan = normal + ((uint32_t)(128 - 16) << 23);
    /* subnormal: renormalise through a float subtraction (exact) */
    uint32_t sub = f2u(u2f(normal + (1u << 23)) - u2f(113u << 23));
    uint32_t r = exp == 0x0f800000u ? infnan : normal;
    r = exp == 0 ? sub : r;
    return u2f(r | sign);
}

/* float -> IEEE half, round to nearest even; overflow -> inf, nan -> quiet nan (sign kept). Branch-free so
 * that the tile loops vectorise. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f2u(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t a = x & 0x7fffffffu;
    /* normal range: rebias the exponent and round the 13 dropped mantissa bits to nearest even */
    uint32_t normal = (a + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    /* subnormal or zero: adding 0.5f lets the FPU do the rounding */
    uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3f000000u;
    uint32_t special = (a > 0x7f800000u) ? 0x7e00u : 0x7c00u;
    uint32_t o = a < 0x38800000u ? sub : normal;
    o = a >= 0x47800000u ? special : o;
    return (uint16_t)(o | sign);
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t x = f2u(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u); /* quiet nan, sign kept */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

#if HAVE_F16C_PATH
/* Hardware half <-> float conversion (F16C, every x86-64 CPU since 2012), selected at run time. The hardware
 * conversions are exact and round to nearest even, like the portable versions above. */
static int use_f16c = -1;

__attribute__((target("avx,f16c"))) static void load_f16_f16c(float *dst, const uint16_t *s, Py_ssize_t m) {
    Py_ssize_t j = 0;
    for (; j + 8 <= m; j += 8) _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + j))));
    for (; j < m; j++) dst[j] = f16_to_f32(s[j]);
}

__attribute__((target("avx,f16c"))) static void store_f16_f16c(uint16_t *d, const float *src, Py_ssize_t m) {
    Py_ssize_t j = 0;
    for (; j + 8 <= m; j += 8)
        _mm_storeu_si128((__m128i *)(d + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < m; j++) d[j] = f32_to_f16(src[j]);
}

static int f16c_ok(void) {
    if (use_f16c < 0) {
        __builtin_cpu_init();
        use_f16c = cpu_cap() < 2 && __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
    }
    return use_f16c;
}
#else
static int f16c_ok(void) { return 0; }
static void load_f16_f16c(float *dst, const uint16_t *s, Py_ssize_t m) { (void)dst, (void)s, (void)m; }
static void store_f16_f16c(uint16_t *d, const float *src, Py_ssize_t m) { (void)d, (void)src, (void)m; }
#endif

static inline __attribute__((always_inline)) void load_tile(float *dst, const void *src, int dt, Py_ssize_t off, Py_ssize_t m) {
    Py_ssize_t j;
    if (dt == DT_F32) {
        memcpy(dst, (const float *)src + off, (size_t)m * 4);
    } else if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (j = 0; j < m; j++) dst[j] = u2f((uint32_t)s[j] << 16);
    } else if (f16c_ok()) {
        load_f16_f16c(dst, (const uint16_t *)src + off, m);
    } else {
        const uint16_t *s = (const uint16_t *)src + off;
        for (j = 0; j < m; j++) dst[j] = f16_to_f32(s[j]);
    }
}

/* Store a float tile rounded to dt; returns flags bit 0 (non-zero seen) and bit 2 (non-finite seen). */
static inline __attribute__((always_inline)) int store_tile(void *dst, int dt, Py_ssize_t off, const float *src, Py_ssize_t m) {
    Py_ssize_t j;
    uint32_t nz = 0, nf = 0;
    if (dt == DT_F32) {
        uint32_t *d = (uint32_t *)dst + off;
        for (j = 0; j < m; j++) {
            uint32_t u = f2u(src[j]);
            d[j] = u;
            nz |= u & 0x7fffffffu;
            nf |= ((u & 0x7f800000u) == 0x7f800000u);
        }
    } else if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (j = 0; j < m; j++) {
            uint16_t u = f32_to_bf16(src[j]);
            d[j] = u;
            nz |= u & 0x7fffu;
            nf |= ((u & 0x7f80u) == 0x7f80u);
        }
    } else {
        uint16_t *d = (uint16_t *)dst + off;
        if (f16c_ok()) {
            store_f16_f16c(d, src, m);
            for (j = 0; j < m; j++) {
                nz |= d[j] & 0x7fffu;
                nf |= ((d[j] & 0x7c00u) == 0x7c00u);
            }
        } else {
            for (j = 0; j < m; j++) {
                uint16_t u = f32_to_f16(src[j]);
                d[j] = u;
                nz |= u & 0x7fffu;
                nf |= ((u & 0x7c00u) == 0x7c00u);
            }
        }
    }
    return (nz ? 1 : 0) | (nf ? 4 : 0);
}

static inline int is_finite_at(const void *src, int dt, Py_ssize_t i) {
    if (dt == DT_F32) return (((const uint32_t *)src)[i] & 0x7f800000u) != 0x7f800000u;
    if (dt == DT_BF16) return (((const uint16_t *)src)[i] & 0x7f80u) != 0x7f80u;
    return (((const uint16_t *)src)[i] & 0x7c00u) != 0x7c00u;
}

static inline int out_finite_at(const void *dst, int dt, Py_ssize_t i) { return is_finite_at(dst, dt, i); }


#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* One build runs everywhere; machines with AVX2 get the wider vector loops (chosen once, at load time). */
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION
static int run_diff(void *out, int out_dt, const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t n) {
    float ta[TILE], tb[TILE];
    Py_ssize_t off, j;
    int flags = 0;
    for (off = 0; off < n; off += TILE) {
        Py_ssize_t m = n - off < TILE ? n - off : TILE;
        int f;
        load_tile(ta, a, a_dt, off, m);
        load_tile(tb, b, b_dt, off, m);
        for (j = 0; j < m; j++) ta[j] = ta[j] - tb[j];
        f = store_tile(out, out_dt, off, ta, m);
        flags |= f & 5;
        if ((f & 4) && !(flags & 2)) {
            for (j = off; j < off + m; j++) {
                if (!out_finite_at(out, out_dt, j) && is_finite_at(a, a_dt, j) && is_finite_at(b, b_dt, j)) {
                    flags |= 2;
                    break;
                }
            }
        }
    }
    return flags;
}

/* Philox4x32-10 exactly as Triton's randint4x(seed, offset) with an int64 offset: counter (q_lo, q_hi, 0, 0), key
 * (seed_lo, seed_hi); its four output words into w. */
static inline void philox4(uint64_t q, uint32_t k0, uint32_t k1, uint32_t w[4]) {
    uint32_t c0 = (uint32_t)q, c1 = (uint32_t)(q >> 32), c2 = 0, c3 = 0;
    int r;
    for (r = 0; r < 10; r++) {
        uint64_t pb = (uint64_t)0xCD9E8D57u * c2, pa = (uint64_t)0xD2511F53u * c0;
        uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)pb;
        c3 = (uint32_t)pa;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

/* tl.rand's float in [0, 1) of a word: as int32 x, x < 0 ? ~x : x, times 2^-31 */
/* tl.rand's integer of a word before its scaling (in [0, 2^31)): as int32 x, x < 0 ? ~x : x */
static inline uint32_t philox_fold(uint32_t w) { return w ^ (uint32_t)((int32_t)w >> 31); }

static inline float philox_float1(uint32_t w) { return (float)(int32_t)philox_fold(w) * 4.6566127342e-10f; }

/* The uniforms of elements start .. start+m-1 in plain C (ints: their integers, philox_fold's, as uint32 into dst).
 * Element i's is word i % 4 of counter i / 4 — Triton's tl.rand4x(key, i // 4)[i % 4] — so that one Philox call
 * serves four consecutive elements. Every Philox loop below writes floats or integers the same way. */
static void philox_scalar(void *dst, uint64_t start, Py_ssize_t m, uint32_t key0, uint32_t key1, int ints) {
    uint32_t w[4];
    Py_ssize_t j = 0;
    while (j < m) {
        uint64_t g = start + (uint64_t)j;
        Py_ssize_t l = (Py_ssize_t)(g & 3), end = j + 4 - l < m ? j + 4 - l : m; /* this counter's elements */
        philox4(g >> 2, key0, key1, w);
        for (; j < end; j++, l++) {
            if (ints) ((uint32_t *)dst)[j] = philox_fold(w[l]);
            else ((float *)dst)[j] = philox_float1(w[l]);
        }
    }
}

/* The elements before the first whole counter of a run: how many (at most m), their numbers written. */
static Py_ssize_t philox_head(void *dst, uint64_t start, Py_ssize_t m, uint32_t key0, uint32_t key1, int ints) {
    Py_ssize_t j = (Py_ssize_t)((4 - (start & 3)) & 3);
    j = j < m ? j : m;
    philox_scalar(dst, start, j, key0, key1, ints);
    return j;
}

#if HAVE_F16C_PATH
/* tl.rand's float of eight int32 words */
static inline __attribute__((always_inline, target("avx2"))) __m256 philox_float(__m256i w) {
    w = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(w), _mm256_set1_ps(4.6566127342e-10f));
}

/* philox_float's, or (ints) the folded integers' bits */
static inline __attribute__((always_inline, target("avx2"))) __m256 philox_out8(__m256i w, int ints) {
    return ints ? _mm256_castsi256_ps(_mm256_xor_si256(w, _mm256_srai_epi32(w, 31))) : philox_float(w);
}

/* The ten rounds for ns sets of eight counters at once with AVX2 (32x32->64-bit multiplies on even/odd lanes; ns a
 * constant after inlining: the rounds of one set are a dependency chain, so several run side by side). */
static inline __attribute__((always_inline, target("avx2"))) void philox_rounds8(__m256i *c0, __m256i *c1, __m256i *c2,
                                                                                 __m256i *c3, int ns, uint32_t k0,
                                                                                 uint32_t k1) {
    const __m256i A = _mm256_set1_epi32((int)0xD2511F53u), B = _mm256_set1_epi32((int)0xCD9E8D57u);
    int r, s;
    for (r = 0; r < 10; r++) {
        const __m256i K0 = _mm256_set1_epi32((int)k0), K1 = _mm256_set1_epi32((int)k1);
        for (s = 0; s < ns; s++) {
            __m256i pbe = _mm256_mul_epu32(B, c2[s]), pbo = _mm256_mul_epu32(B, _mm256_srli_epi64(c2[s], 32));
            __m256i pae = _mm256_mul_epu32(A, c0[s]), pao = _mm256_mul_epu32(A, _mm256_srli_epi64(c0[s], 32));
            __m256i hib = _mm256_blend_epi32(_mm256_srli_epi64(pbe, 32), pbo, 0xAA);
            __m256i hia = _mm256_blend_epi32(_mm256_srli_epi64(pae, 32), pao, 0xAA);
            c0[s] = _mm256_xor_si256(_mm256_xor_si256(hib, c1[s]), K0);
            c2[s] = _mm256_xor_si256(_mm256_xor_si256(hia, c3[s]), K1);
            c1[s] = _mm256_blend_epi32(pbe, _mm256_slli_epi64(pbo, 32), 0xAA);
            c3[s] = _mm256_blend_epi32(pae, _mm256_slli_epi64(pao, 32), 0xAA);
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

/* ns sets of eight counters from q (set s: q + 8s .. q + 8s + 7), their 32 words each stored in element order
 * (counter by counter, four words each) from dst. */
static inline __attribute__((always_inline, target("avx2"))) void philox_sets8(float *dst, uint64_t q, int ns,
                                                                               uint32_t key0, uint32_t key1, int ints) {
    const __m256i lanes = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    __m256i c0[4], c1[4], c2[4], c3[4];
    int s;
    for (s = 0; s < ns; s++) {
        uint64_t q0 = q + 8 * (uint64_t)s;
        if ((uint32_t)q0 <= 0xFFFFFFF8u) { /* the eight counters share their high word */
            c0[s] = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)q0), lanes);
            c1[s] = _mm256_set1_epi32((int)(uint32_t)(q0 >> 32));
        } else {
            uint32_t lo[8], hi[8];
            int l;
            for (l = 0; l < 8; l++) lo[l] = (uint32_t)(q0 + (uint64_t)l), hi[l] = (uint32_t)((q0 + (uint64_t)l) >> 32);
            c0[s] = _mm256_loadu_si256((const __m256i *)lo);
            c1[s] = _mm256_loadu_si256((const __m256i *)hi);
        }
        c2[s] = c3[s] = _mm256_setzero_si256();
    }
    philox_rounds8(c0, c1, c2, c3, ns, key0, key1);
    for (s = 0; s < ns; s++) { /* words w0..w3 of counters 0..7 -> element order: a 4x8 transpose */
        float *d = dst + 32 * s;
        __m256 f0 = philox_out8(c0[s], ints), f1 = philox_out8(c1[s], ints), f2 = philox_out8(c2[s], ints),
               f3 = philox_out8(c3[s], ints);
        __m256 t0 = _mm256_unpacklo_ps(f0, f1); /* w0 w1 of counters 0 1 | 4 5 */
        __m256 t1 = _mm256_unpackhi_ps(f0, f1); /* 2 3 | 6 7 */
        __m256 t2 = _mm256_unpacklo_ps(f2, f3); /* w2 w3 of 0 1 | 4 5 */
        __m256 t3 = _mm256_unpackhi_ps(f2, f3);
        __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)); /* counter 0 | 4 */
        __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)); /* 1 | 5 */
        __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)); /* 2 | 6 */
        __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)); /* 3 | 7 */
        _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u1, 0x20));
        _mm256_storeu_ps(d + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
        _mm256_storeu_ps(d + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
        _mm256_storeu_ps(d + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
    }
}

/* Philox with AVX2, three sets of eight counters (96 elements) a step, then one set (32), then plain C. Same bits as
 * the scalar code. */
__attribute__((target("avx2"))) static void philox_avx2(void *out, uint64_t start, Py_ssize_t m, uint32_t key0,
                                                         uint32_t key1, int ints) {
    float *dst = (float *)out; /* 32-bit lanes either way */
    Py_ssize_t j = philox_head(out, start, m, key0, key1, ints);
    for (; j + 96 <= m; j += 96) philox_sets8(dst + j, (start + (uint64_t)j) >> 2, 3, key0, key1, ints);
    for (; j + 32 <= m; j += 32) philox_sets8(dst + j, (start + (uint64_t)j) >> 2, 1, key0, key1, ints);
    philox_scalar(dst + j, start + (uint64_t)j, m - j, key0, key1, ints);
}

CPU_CHECK(avx2_ok, 2, __builtin_cpu_supports("avx2"))
#else
static int avx2_ok(void) { return 0; }
static void philox_avx2(void *dst, uint64_t start, Py_ssize_t m, uint32_t key0, uint32_t key1, int ints) {
    (void)dst, (void)start, (void)m, (void)key0, (void)key1, (void)ints;
}
#endif

#if HAVE_F16C_PATH && defined(__GNUC__) && !defined(__clang__)
/* HAVE_AVX512VL_PATH and avx512vl_ok(): the AVX-512F/VL loops (Philox, DARE's fused loop, DELLA's fused passes);
 * the loops that also need BW/VBMI2 check avx512_ok(). */
#define HAVE_AVX512VL_PATH 1
/* The live lanes of sixteen elements from j of a row (or run) of m: all sixteen, or the m - j left */
static inline __mmask16 live16(Py_ssize_t j, Py_ssize_t m) {
    return j + 16 <= m ? (__mmask16)0xffff : (__mmask16)((1u << (m - j)) - 1u);
}
/* Eight Philox counters per register with AVX-512, each 32-bit word kept in the low half of a 64-bit lane: one
 * vpmuludq gives a whole 32x32->64 product (no even/odd split or blend), the next multiply ignores the high half,
 * and vpternlogq makes each three-way xor. Same bits as the scalar code.
 *
 * Where the counters of a call share their high word (every tensor under 2^34 elements), rounds 0 and 1 are cheaper:
 * the counter is (lo, hi, 0, 0), so after round 0 the word c0 = hi ^ k0 is the same in every lane, and round 1's
 * A product with it is a constant (philox_keys_t.same_hi). */
typedef struct {
    __m512i k0s[10], k1s[10];
    __m512i c3r1, hk1; /* same_hi: round 1's lo(A * c0) and hi(A * c0) ^ k1[1], the same in every lane */
    int same_hi;
} philox_keys_t;

/* The round keys for counters first .. last (lanes past last may be computed, their words are not used). */
__attribute__((target("avx512f,avx512vl"))) static void philox_keys(philox_keys_t *K, uint32_t key0, uint32_t key1,
                                                                    uint64_t first, uint64_t last) {
    uint64_t pa1 = (uint64_t)0xD2511F53u * ((uint32_t)(first >> 32) ^ key0); /* round 1's A product (same_hi) */
    int r;
    for (r = 0; r < 10; r++) {
        K->k0s[r] = _mm512_set1_epi64(key0 + (uint32_t)r * 0x9E3779B9u);
        K->k1s[r] = _mm512_set1_epi64(key1 + (uint32_t)r * 0xBB67AE85u);
    }
    K->same_hi = (first >> 32) == (last >> 32);
    K->c3r1 = _mm512_set1_epi64((uint32_t)pa1);
    K->hk1 = _mm512_set1_epi64((uint32_t)(pa1 >> 32) ^ (key1 + 0xBB67AE85u));
}

/* The words of NV vectors of eight counters, q0 + 8v + l (NV a constant after inlining: the rounds of one vector are a
 * dependency chain, so several run side by side), as tl.rand's int32 in element order: out[2v] holds elements
 * 4 q0 + 32v .. +15, out[2v + 1] the next sixteen. */
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) void
philox_words(__m512i *out, int nv, uint64_t q0, const philox_keys_t *K) {
    const __m512i A = _mm512_set1_epi64(0xD2511F53u), B = _mm512_set1_epi64(0xCD9E8D57u);
    const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i first = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0); /* p0 q0 p1 q1 ..: counters 0-3 */
    const __m512i second = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4); /* counters 4-7 */
    __m512i c0[4], c1[4], c2[4], c3[4];
    int v, r, r0;
    for (v = 0; v < nv; v++) {
        __m512i idx = _mm512_add_epi64(_mm512_set1_epi64((long long)(q0 + 8 * (uint64_t)v)), lanes);
        __m512i pa = _mm512_mul_epu32(A, idx); /* round 0, c2 = c3 = 0: the B product is 0 */
        __m512i c2r0 = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), K->k1s[0]);
        if (K->same_hi) { /* round 1: c0 = hi ^ k0 in every lane, c1 = 0 */
            __m512i pb = _mm512_mul_epu32(B, c2r0);
            c0[v] = _mm512_xor_si512(_mm512_srli_epi64(pb, 32), K->k0s[1]);
            c2[v] = _mm512_xor_si512(pa, K->hk1); /* low half: lo(pa) ^ hi(A * c0) ^ k1 */
            c1[v] = pb;
            c3[v] = K->c3r1;
        } else {
            c0[v] = _mm512_xor_si512(_mm512_srli_epi64(idx, 32), K->k0s[0]);
            c2[v] = c2r0;
            c1[v] = _mm512_setzero_si512();
            c3[v] = pa;
        }
    }
    r0 = K->same_hi ? 2 : 1;
    for (r = r0; r < 10; r++)
        for (v = 0; v < nv; v++) {
            __m512i pb = _mm512_mul_epu32(B, c2[v]), pa = _mm512_mul_epu32(A, c0[v]);
            c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[v], K->k0s[r], 0x96);
            c2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[v], K->k1s[r], 0x96);
            c1[v] = pb;
            c3[v] = pa;
        }
    for (v = 0; v < nv; v++) { /* lane l: (w0, w1) in p, (w2, w3) in q; then counter by counter */
        __m512i p = _mm512_mask_blend_epi32(0xAAAA, c0[v], _mm512_slli_epi64(c1[v], 32));
        __m512i q = _mm512_mask_blend_epi32(0xAAAA, c2[v], _mm512_slli_epi64(c3[v], 32));
        out[2 * v] = _mm512_permutex2var_epi64(p, first, q);
        out[2 * v + 1] = _mm512_permutex2var_epi64(p, second, q);
    }
}

/* tl.rand's float of sixteen int32 words, or (ints) their folded integers' bits */
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) __m512 philox_out16(__m512i w, int ints) {
    w = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));
    return ints ? _mm512_castsi512_ps(w) : _mm512_mul_ps(_mm512_cvtepi32_ps(w), _mm512_set1_ps(4.6566127342e-10f));
}

__attribute__((target("avx512f,avx512vl"))) static void philox_avx512(void *out, uint64_t start, Py_ssize_t m,
                                                                     uint32_t key0, uint32_t key1, int ints) {
    philox_keys_t K;
    __m512i w[8];
    float *dst = (float *)out; /* 32-bit lanes either way */
    Py_ssize_t j = philox_head(out, start, m, key0, key1, ints);
    int v;
    if (j >= m) return;
    philox_keys(&K, key0, key1, (start + (uint64_t)j) >> 2, (start + (uint64_t)m - 1) >> 2);
    for (; j + 128 <= m; j += 128) {
        philox_words(w, 4, (start + (uint64_t)j) >> 2, &K);
        for (v = 0; v < 8; v++) _mm512_storeu_ps(dst + j + 16 * v, philox_out16(w[v], ints));
    }
    for (; j < m; j += 32) { /* the last 32 or fewer: a whole vector, the words past m not stored */
        float tmp[32];
        philox_words(w, 1, (start + (uint64_t)j) >> 2, &K);
        _mm512_storeu_ps(tmp, philox_out16(w[0], ints));
        _mm512_storeu_ps(tmp + 16, philox_out16(w[1], ints));
        memcpy(dst + j, tmp, (size_t)(m - j < 32 ? m - j : 32) * sizeof(float));
    }
}

CPU_CHECK(avx512vl_ok, 1, __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
#else
#define HAVE_AVX512VL_PATH 0
#endif

/* The numbers of elements start .. start+m-1 (ints: philox_fold's integers, else the uniforms) by the fastest loop
 * this CPU has; path (tests): 1 AVX2 at most, 2 plain C. */
static inline void philox_run(void *dst, uint64_t start, Py_ssize_t m, uint32_t key0, uint32_t key1, int ints,
                              int path) {
#if HAVE_AVX512VL_PATH
    if (path == 0 && avx512vl_ok()) {
        philox_avx512(dst, start, m, key0, key1, ints);
        return;
    }
#endif
    if (path <= 1 && avx2_ok()) {
        philox_avx2(dst, start, m, key0, key1, ints);
        return;
    }
    philox_scalar(dst, start, m, key0, key1, ints);
}

static inline void philox_tile(float *dst, uint64_t start, Py_ssize_t m, uint32_t key0, uint32_t key1) {
    philox_run(dst, start, m, key0, key1, 0, 0);
}

/* PRUNE_NEAR on a tile: t * clamp(lim / max(|t|, 1e-6), 0, 1), each step one float32 operation (x > y ? x : y is
 * what maxps computes, so the vector loop gives the scalar loop's bits, NaN cases included). */
static void near_scalar(float *tt, Py_ssize_t j, Py_ssize_t m, float lim) {
    for (; j < m; j++) {
        float a = fabsf(tt[j]);
        float d = a > 1e-6f ? a : 1e-6f;
        float w = lim / d;
        w = w > 0.0f ? w : 0.0f;
        w = w < 1.0f ? w : 1.0f;
        tt[j] = w * tt[j];
    }
}

#if HAVE_F16C_PATH
__attribute__((target("avx2"))) static void near_avx2(float *tt, Py_ssize_t m, float lim) {
    const __m256 vl = _mm256_set1_ps(lim), eps = _mm256_set1_ps(1e-6f), zero = _mm256_setzero_ps();
    const __m256 one = _mm256_set1_ps(1.0f), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    Py_ssize_t j = 0;
    for (; j + 8 <= m; j += 8) {
        __m256 v = _mm256_loadu_ps(tt + j);
        __m256 w = _mm256_div_ps(vl, _mm256_max_ps(_mm256_and_ps(v, absmask), eps));
        w = _mm256_min_ps(_mm256_max_ps(w, zero), one);
        _mm256_storeu_ps(tt + j, _mm256_mul_ps(w, v));
    }
    near_scalar(tt, j, m, lim);
}
#endif

static void near_tile(float *tt, Py_ssize_t m, float lim) {
#if HAVE_F16C_PATH
    if (avx2_ok()) {
        near_avx2(tt, m, lim);
        return;
    }
#endif
    near_scalar(tt, 0, m, lim);
}

#define PRUNE_NONE 0
#define PRUNE_MAGNITUDE 1 /* keep |t| >= p1 */
#define PRUNE_RANDOM 2    /* keep where u < p1; kept entries divided by p2 when p2 != 0 */
#define PRUNE_BAND 3      /* keep p1 <= |t| < p2 */
#define PRUNE_BITS 4      /* keep where bit (element index) of the term's bit mask is set (bits: LSB first); kept
                           * entries multiplied by p1 when p1 != 0 */
#define PRUNE_NEAR 5      /* t * clamp(p1 / max(|t|, 1e-6), 0, 1): mergekit's nearswap weight (p1 = its t) */
#define SIGN_NONE 0
#define SIGN_TOTAL 1
#define SIGN_FREQUENCY 2
#define SIGN_SUM 3 /* elected on the unweighted sum of the pruned terms (SCE), combined with the weights */
#define NORMALIZE_POSITIVE 1 /* divide by the sum of the agreeing weights where it is > 0 */
#define NORMALIZE_FLOOR 2    /* divide by max(that sum, 1e-6) (SCE) */

typedef struct {
    const void *a;
    const void *b; /* NULL, or a second input: the term is a - b */
    int a_dt, b_dt, mode;
    float w, p1, p2;
    uint32_t k0, k1;
    const uint8_t *bits; /* PRUNE_BITS: one bit per element of the whole tensor, element i at bits[i / 8] >> (i % 8) */
} term_t;

typedef struct {
    void *buf;
    int dt;
    float alpha;
} out_t;

static int use_fast = 1; /* 0: the tile loops only, 2: AVX2 at most (tests compare them) */

#if HAVE_F16C_PATH
/* Fused AVX2 path of run_merge for the common case: every term a plain vector (no b), pruned by magnitude or not
 * at all, any sign election, normalize or not, fp32 / bf16 / fp16 (F16C) inputs and outputs. One pass over the
 * data, eight elements at a time, every term kept in registers. Each element goes through exactly the same
 * float32 operations, in the same order, as the tile loops of run_merge, so the results are bit-identical. */
#define FAST_MAX_TERMS 8

static inline __attribute__((always_inline, target("avx2,f16c"))) __m256 fast_load(const void *src, int dt,
                                                                                    Py_ssize_t i) {
    if (dt == DT_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)src + i);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i)));
}

/* a + b with a as the first source operand: when both are NaN, x86 returns a's NaN. The tile loops of run_merge
 * (as GCC compiles them) take the NaN of the newly added product, so the fast path fixes the operand order here
 * (a plain vector + lets the compiler commute it) to give the same NaN bits. */
static inline __attribute__((always_inline, target("avx2,f16c"))) __m256 add_nan_first(__m256 a, __m256 b) {
    __m256 r;
    __asm__("vaddps %2, %1, %0" : "=x"(r) : "x"(a), "x"(b));
    return r;
}

/* Round eight floats to dt and store them (fp32 / fp16); ORs the stored bit patterns into *nz and a non-finite mask
 * into *nf (as store_tile does; fast_body masks nz to the magnitude bits at the end). */
static inline __attribute__((always_inline, target("avx2,f16c"))) void fast_store8(void *dst, int dt, Py_ssize_t i,
                                                                                    __m256 v, __m256i *nz,
                                                                                    __m256i *nf) {
    if (dt == DT_F32) {
        __m256i u = _mm256_castps_si256(v), e = _mm256_set1_epi32(0x7f800000);
        _mm256_storeu_ps((float *)dst + i, v);
        *nz = _mm256_or_si256(*nz, _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)));
        *nf = _mm256_or_si256(*nf, _mm256_cmpeq_epi32(_mm256_and_si256(u, e), e));
    } else {
        __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
        __m256i r = _mm256_cvtepu16_epi32(h), e = _mm256_set1_epi32(0x7c00);
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), h);
        *nz = _mm256_or_si256(*nz, _mm256_and_si256(r, _mm256_set1_epi32(0x7fff)));
        *nf = _mm256_or_si256(*nf, _mm256_cmpeq_epi32(_mm256_and_si256(r, e), e));
    }
}

/* f32_to_bf16 on eight floats, as 32-bit lanes holding the 16-bit results. */
static inline __attribute__((always_inline, target("avx2,f16c"))) __m256i fast_bf16(__m256 v) {
    __m256i x = _mm256_castps_si256(v), hi = _mm256_srli_epi32(x, 16);
    __m256i rnd = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), _mm256_and_si256(hi, _mm256_set1_epi32(1))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rnd, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}

/* Round sixteen floats (v0: elements i..i+7, v1: i+8..i+15) to dt and store them; flags as fast_store8. */
static inline __attribute__((always_inline, target("avx2,f16c"))) void fast_store16(void *dst, int dt, Py_ssize_t i,
                                                                                     __m256 v0, __m256 v1,
                                                                                     __m256i *nz, __m256i *nf) {
    if (dt == DT_BF16) {
        __m256i r = _mm256_permute4x64_epi64(_mm256_packus_epi32(fast_bf16(v0), fast_bf16(v1)), 0xD8);
        __m256i e = _mm256_set1_epi16(0x7f80);
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), r);
        *nz = _mm256_or_si256(*nz, r);
        *nf = _mm256_or_si256(*nf, _mm256_cmpeq_epi16(_mm256_and_si256(r, e), e));
    } else {
        fast_store8(dst, dt, i, v0, nz, nf);
        fast_store8(dst, dt, i + 8, v1, nz, nf);
    }
}

/* δ of eight elements starting at j: the same float32 operations, in the same order, as run_merge_tiles. */
static inline __attribute__((always_inline, target("avx2,f16c"))) __m256 fast_delta(const term_t *terms, int k,
                                                                                     int sign, int normalize, int dt,
                                                                                     int mag,
                                                                                     const __m256 *w,
                                                                                     const __m256 *thr,
                                                                                     const __m256 *hi,
                                                                                     uint64_t g, Py_ssize_t j,
                                                                                     const int *same, __m256 bv) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 tt[FAST_MAX_TERMS];
    __m256 d = zero, den = zero;
    int i;
    for (i = 0; i < k; i++) {
        __m256 v = fast_load(terms[i].a, dt >= 0 ? dt : terms[i].a_dt, j), keep;
        if (terms[i].b) /* same[i]: b is the base, loaded once for every term that subtracts it (bv) */
            v = _mm256_sub_ps(v, same[i] ? bv : fast_load(terms[i].b, dt >= 0 ? dt : terms[i].b_dt, j));
        if (mag || terms[i].mode == PRUNE_MAGNITUDE)
            keep = _mm256_cmp_ps(_mm256_and_ps(v, absmask), thr[i], _CMP_GE_OQ);
        else if (terms[i].mode == PRUNE_BAND) {
            __m256 a = _mm256_and_ps(v, absmask);
            keep = _mm256_and_ps(_mm256_cmp_ps(a, thr[i], _CMP_GE_OQ), _mm256_cmp_ps(a, hi[i], _CMP_LT_OQ));
        } else if (terms[i].mode == PRUNE_BITS) { /* the byte of elements g+j .. g+j+7 (g + j a multiple of 8) */
            const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            __m256i b = _mm256_and_si256(_mm256_set1_epi32(terms[i].bits[(g + (uint64_t)j) >> 3]), sel);
            keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, sel));
            if (terms[i].p1 != 0.0f) v = _mm256_mul_ps(v, thr[i]); /* the kept entries' scale */
        } else {
            tt[i] = v;
            continue;
        }
        tt[i] = _mm256_and_ps(v, keep);
    }
    if (sign == SIGN_NONE) {
        for (i = 0; i < k; i++) {
            d = add_nan_first(_mm256_mul_ps(w[i], tt[i]), d);
            den = _mm256_add_ps(den, w[i]);
        }
    } else {
        __m256 tmp = zero, neg;
        if (sign == SIGN_TOTAL)
            for (i = 0; i < k; i++) tmp = _mm256_add_ps(tmp, _mm256_mul_ps(w[i], tt[i]));
        else if (sign == SIGN_SUM)
            for (i = 0; i < k; i++) tmp = _mm256_add_ps(tmp, tt[i]);
        else
            for (i = 0; i < k; i++) {
                __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(tt[i], zero, _CMP_GT_OQ));
                __m256i lt = _mm256_castps_si256(_mm256_cmp_ps(tt[i], zero, _CMP_LT_OQ));
                tmp = _mm256_add_ps(tmp, _mm256_cvtepi32_ps(_mm256_sub_epi32(lt, gt)));
            }
        /* agree: tt has the elected sign (+ when tmp >= 0), i.e. (tt with its sign flipped where - is elected) > 0;
         * zeros and NaNs never agree */
        neg = _mm256_andnot_ps(_mm256_cmp_ps(tmp, zero, _CMP_GE_OQ), _mm256_set1_ps(-0.0f));
        for (i = 0; i < k; i++) {
            __m256 agree = _mm256_cmp_ps(_mm256_xor_ps(tt[i], neg), zero, _CMP_GT_OQ);
            d = add_nan_first(_mm256_and_ps(_mm256_mul_ps(w[i], tt[i]), agree), d);
            den = _mm256_add_ps(den, _mm256_and_ps(w[i], agree));
        }
    }
    if (normalize == NORMALIZE_FLOOR) /* max(den, 1e-6): den is never NaN (finite weights) */
        d = _mm256_div_ps(d, _mm256_max_ps(den, _mm256_set1_ps(1e-6f)));
    else if (normalize) /* divide by 1 (exact) where den <= 0 */
        d = _mm256_div_ps(d, _mm256_blendv_ps(one, den, _mm256_cmp_ps(den, zero, _CMP_GT_OQ)));
    return d;
}

/* 2 (OVERFLOW) where some output element in [off, end) is NaN/Inf although the base and every term's inputs are
 * finite there, else 0: the fast paths' check of a tile whose outputs hold a NaN/Inf (the tile loops' rule). */
static int overflow_in(const out_t *outs, int n_out, const void *base, int base_dt, const term_t *terms, int k,
                       Py_ssize_t off, Py_ssize_t end) {
    Py_ssize_t j;
    int o, i;
    for (o = 0; o < n_out; o++)
        for (j = off; j < end; j++) {
            int fin = !out_finite_at(outs[o].buf, outs[o].dt, j) && is_finite_at(base, base_dt, j);
            for (i = 0; fin && i < k; i++) {
                fin = is_finite_at(terms[i].a, terms[i].a_dt, j);
                if (fin && terms[i].b) fin = is_finite_at(terms[i].b, terms[i].b_dt, j);
            }
            if (fin) return 2;
        }
    return 0;
}

/* Elements 0 .. n16-1 (n16 a multiple of 16) of run_merge; returns its flags. Inlined with constant k / dt (dt >= 0:
 * every input and output has that dtype) by fast_merge below, so that the term loops unroll. */
static inline __attribute__((always_inline, target("avx2,f16c"))) int fast_body(const out_t *outs, int n_out,
                                                                                const void *base, int base_dt,
                                                                                Py_ssize_t n16, const term_t *terms,
                                                                                int k, int sign, int normalize, int dt, int mag,
                                                                                uint64_t g) {
    __m256 w[FAST_MAX_TERMS], thr[FAST_MAX_TERMS], hi[FAST_MAX_TERMS], alpha[MAX_VECTORS];
    Py_ssize_t off, j;
    int flags = 0, i, o, same[FAST_MAX_TERMS];
    for (i = 0; i < k; i++) {
        same[i] = terms[i].b == base && (dt >= 0 || terms[i].b_dt == base_dt);
        w[i] = _mm256_set1_ps(terms[i].w);
        thr[i] = _mm256_set1_ps(terms[i].p1);
        hi[i] = _mm256_set1_ps(terms[i].p2);
    }
    for (o = 0; o < n_out; o++) alpha[o] = _mm256_set1_ps(outs[o].alpha);
    for (off = 0; off < n16; off += TILE) {
        Py_ssize_t end = n16 - off < TILE ? n16 : off + TILE;
        __m256i nz = _mm256_setzero_si256(), nf = _mm256_setzero_si256();
        for (j = off; j < end; j += 16) {
            __m256 b0 = fast_load(base, dt >= 0 ? dt : base_dt, j);
            __m256 b1 = fast_load(base, dt >= 0 ? dt : base_dt, j + 8);
            __m256 d0 = fast_delta(terms, k, sign, normalize, dt, mag, w, thr, hi, g, j, same, b0);
            __m256 d1 = fast_delta(terms, k, sign, normalize, dt, mag, w, thr, hi, g, j + 8, same, b1);
            for (o = 0; o < n_out; o++) {
                __m256 acc0 = b0, acc1 = b1;
                if (k > 0) { /* no terms: a pure cast, so -0.0 stays -0.0 */
                    acc0 = add_nan_first(_mm256_mul_ps(alpha[o], d0), b0);
                    acc1 = add_nan_first(_mm256_mul_ps(alpha[o], d1), b1);
                }
                fast_store16(outs[o].buf, dt >= 0 ? dt : outs[o].dt, j, acc0, acc1, &nz, &nf);
            }
        }
        if (!_mm256_testz_si256(nz, _mm256_set1_epi32(0x7fff7fff))) flags |= 1;
        if (!_mm256_testz_si256(nf, nf)) flags |= 4 | (flags & 2 ? 0 : overflow_in(outs, n_out, base, base_dt, terms, k,
                                                                                  off, end));
    }
    return flags;
}

#if HAVE_AVX512VL_PATH
/* The same in AVX-512 for bf16 inputs and outputs: sixteen elements a register, keep masks in mask registers (keep
 * bits read as they are stored, two bytes at a time), the same float32 operations on the same values in the same
 * order as fast_delta / fast_body, the same bytes and flags (tests compare them with the tile loops). */
CPU_CHECK(avx512vlbw_ok, 1, __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bw"))
/* the AVX-512F/VL/BW loops: this vector merge and SCE's fused tile (avx512vlbw_ok) */
#define AVX512_VLBW __attribute__((target("avx512f,avx512vl,avx512bw,avx2,f16c")))

static inline __attribute__((always_inline)) AVX512_VLBW __m512 add_nan_first16(__m512 a, __m512 b) {
    __m512 r;
    __asm__("vaddps %2, %1, %0" : "=v"(r) : "v"(a), "v"(b));
    return r;
}

static inline __attribute__((always_inline)) AVX512_VLBW __m512 load_bf16x16(const void *src, Py_ssize_t i) {
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) AVX512_VLBW __m512 xor16(__m512 a, __m512 b) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

/* δ of sixteen elements starting at j (fast_delta's steps) */
static inline __attribute__((always_inline)) AVX512_VLBW __m512 fast_delta16(const term_t *terms, int k, int sign,
                                                                              int normalize, int mag, const __m512 *w,
                                                                              const __m512 *thr, const __m512 *hi,
                                                                              uint64_t g, Py_ssize_t j,
                                                                              const int *same, __m512 bv) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    __m512 tt[FAST_MAX_TERMS], d = zero, den = zero;
    int i;
    for (i = 0; i < k; i++) {
        __m512 v = load_bf16x16(terms[i].a, j);
        __mmask16 keep;
        if (terms[i].b) v = _mm512_sub_ps(v, same[i] ? bv : load_bf16x16(terms[i].b, j));
        if (mag || terms[i].mode == PRUNE_MAGNITUDE)
            keep = _mm512_cmp_ps_mask(_mm512_abs_ps(v), thr[i], _CMP_GE_OQ);
        else if (terms[i].mode == PRUNE_BAND) {
            __m512 a = _mm512_abs_ps(v);
            keep = _mm512_cmp_ps_mask(a, thr[i], _CMP_GE_OQ) & _mm512_cmp_ps_mask(a, hi[i], _CMP_LT_OQ);
        } else if (terms[i].mode == PRUNE_BITS) { /* elements g+j .. g+j+15 (g + j a multiple of 8) */
            const uint8_t *b = terms[i].bits + ((g + (uint64_t)j) >> 3);
            keep = (__mmask16)(b[0] | (unsigned)b[1] << 8);
            if (terms[i].p1 != 0.0f) v = _mm512_mul_ps(v, thr[i]);
        } else {
            tt[i] = v;
            continue;
        }
        tt[i] = _mm512_maskz_mov_ps(keep, v);
    }
    if (sign == SIGN_NONE) {
        for (i = 0; i < k; i++) {
            d = add_nan_first16(_mm512_mul_ps(w[i], tt[i]), d);
            den = _mm512_add_ps(den, w[i]);
        }
    } else {
        __m512 tmp = zero, neg;
        if (sign == SIGN_TOTAL)
            for (i = 0; i < k; i++) tmp = _mm512_add_ps(tmp, _mm512_mul_ps(w[i], tt[i]));
        else if (sign == SIGN_SUM)
            for (i = 0; i < k; i++) tmp = _mm512_add_ps(tmp, tt[i]);
        else /* +1 / -1 / 0 per term: sums of small integers, exact in any order */
            for (i = 0; i < k; i++)
                tmp = _mm512_add_ps(tmp, _mm512_sub_ps(
                                             _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(tt[i], zero, _CMP_GT_OQ), one),
                                             _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(tt[i], zero, _CMP_LT_OQ), one)));
        neg = _mm512_maskz_mov_ps((__mmask16)~_mm512_cmp_ps_mask(tmp, zero, _CMP_GE_OQ), _mm512_set1_ps(-0.0f));
        for (i = 0; i < k; i++) {
            __mmask16 agree = _mm512_cmp_ps_mask(xor16(tt[i], neg), zero, _CMP_GT_OQ);
            d = add_nan_first16(_mm512_maskz_mov_ps(agree, _mm512_mul_ps(w[i], tt[i])), d);
            den = _mm512_add_ps(den, _mm512_maskz_mov_ps(agree, w[i]));
        }
    }
    if (normalize == NORMALIZE_FLOOR)
        d = _mm512_div_ps(d, _mm512_max_ps(den, _mm512_set1_ps(1e-6f)));
    else if (normalize)
        d = _mm512_div_ps(d, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(den, zero, _CMP_GT_OQ), one, den));
    return d;
}

/* prefetch_at element j of the base and of each term's bf16 inputs */
static inline __attribute__((always_inline)) void prefetch_bf16(const term_t *terms, int k, const void *base,
                                                               Py_ssize_t j) {
    int i;
    prefetch_at(base, DT_BF16, j);
    for (i = 0; i < k; i++) {
        prefetch_at(terms[i].a, DT_BF16, j);
        if (terms[i].b && terms[i].b != base) prefetch_at(terms[i].b, DT_BF16, j);
    }
}

/* fast_body for bf16 everywhere, sixteen elements a step */
static inline __attribute__((always_inline)) AVX512_VLBW int fast_body16(const out_t *outs, int n_out,
                                                                          const void *base, Py_ssize_t n16,
                                                                          const term_t *terms, int k, int sign,
                                                                          int normalize, int mag, uint64_t g) {
    __m512 w[FAST_MAX_TERMS], thr[FAST_MAX_TERMS], hi[FAST_MAX_TERMS], alpha[MAX_VECTORS];
    const __m512i half = _mm512_set1_epi32(0x7fff), lsb = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
    Py_ssize_t off, j;
    int flags = 0, i, o, same[FAST_MAX_TERMS];
    for (i = 0; i < k; i++) {
        same[i] = terms[i].b == base;
        w[i] = _mm512_set1_ps(terms[i].w);
        thr[i] = _mm512_set1_ps(terms[i].p1);
        hi[i] = _mm512_set1_ps(terms[i].p2);
    }
    for (o = 0; o < n_out; o++) alpha[o] = _mm512_set1_ps(outs[o].alpha);
    for (off = 0; off < n16; off += TILE) {
        Py_ssize_t end = n16 - off < TILE ? n16 : off + TILE;
        __m256i nz = _mm256_setzero_si256(), nf = _mm256_setzero_si256();
        for (j = off; j < end; j += 16) {
            __m512 b, d;
            if ((j & 31) == 0) prefetch_bf16(terms, k, base, j);
            b = load_bf16x16(base, j);
            d = fast_delta16(terms, k, sign, normalize, mag, w, thr, hi, g, j, same, b);
            for (o = 0; o < n_out; o++) { /* fast_bf16's rounding; no terms: a pure cast (-0.0 stays -0.0) */
                const __m512 acc = k > 0 ? add_nan_first16(_mm512_mul_ps(alpha[o], d), b) : b;
                const __m512i x = _mm512_castps_si512(acc), top = _mm512_srli_epi32(x, 16);
                __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, half), _mm512_and_si512(top, lsb)),
                                              16);
                __m256i h;
                r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(acc, acc, _CMP_UNORD_Q), _mm512_or_si512(top, quiet));
                h = _mm512_cvtepi32_epi16(r);
                _mm256_storeu_si256((__m256i *)((uint16_t *)outs[o].buf + j), h);
                nz = _mm256_or_si256(nz, h);
                nf = _mm256_or_si256(nf, _mm256_cmpeq_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7f80)),
                                                            _mm256_set1_epi16(0x7f80)));
            }
        }
        if (!_mm256_testz_si256(nz, _mm256_set1_epi32(0x7fff7fff))) flags |= 1;
        if (!_mm256_testz_si256(nf, nf)) flags |= 4 | (flags & 2 ? 0 : overflow_in(outs, n_out, base, DT_BF16, terms, k,
                                                                                  off, end));
    }
    return flags;
}

static AVX512_VLBW int fast_merge16(const out_t *outs, int n_out, const void *base, Py_ssize_t n16,
                                     const term_t *terms, int k, int sign, int normalize, int mag, uint64_t g) {
    if (k == 1) return fast_body16(outs, n_out, base, n16, terms, 1, sign, normalize, mag, g);
    if (k == 2) return fast_body16(outs, n_out, base, n16, terms, 2, sign, normalize, mag, g);
    if (k == 3) return fast_body16(outs, n_out, base, n16, terms, 3, sign, normalize, mag, g);
    if (k == 4) return fast_body16(outs, n_out, base, n16, terms, 4, sign, normalize, mag, g);
    return fast_body16(outs, n_out, base, n16, terms, k, sign, normalize, mag, g);
}
#endif

__attribute__((target("avx2,f16c"))) static int fast_merge(const out_t *outs, int n_out, const void *base, int base_dt,
                                                          Py_ssize_t n16, const term_t *terms, int k, int sign,
                                                          int normalize, uint64_t g) {
    int i, mag = 1, bf16 = base_dt == DT_BF16;
    for (i = 0; i < k; i++) bf16 &= terms[i].a_dt == DT_BF16 && (!terms[i].b || terms[i].b_dt == DT_BF16);
    for (i = 0; i < n_out; i++) bf16 &= outs[i].dt == DT_BF16;
    for (i = 0; i < k; i++) mag &= terms[i].mode == PRUNE_MAGNITUDE;
#if HAVE_AVX512VL_PATH
    if (bf16 && use_fast == 1 && avx512vlbw_ok())
        return fast_merge16(outs, n_out, base, n16, terms, k, sign, normalize, mag, g);
#endif
    if (bf16 && n_out == 1 && mag && sign == SIGN_TOTAL) { /* TIES */
        if (k == 2) return fast_body(outs, 1, base, base_dt, n16, terms, 2, SIGN_TOTAL, normalize, DT_BF16, 1, g);
        if (k == 3) return fast_body(outs, 1, base, base_dt, n16, terms, 3, SIGN_TOTAL, normalize, DT_BF16, 1, g);
        if (k == 4) return fast_body(outs, 1, base, base_dt, n16, terms, 4, SIGN_TOTAL, normalize, DT_BF16, 1, g);
    }
    if (bf16 && n_out == 1) {
        if (k == 1) return fast_body(outs, 1, base, base_dt, n16, terms, 1, sign, normalize, DT_BF16, 0, g);
        if (k == 2) return fast_body(outs, 1, base, base_dt, n16, terms, 2, sign, normalize, DT_BF16, 0, g);
        if (k == 3) return fast_body(outs, 1, base, base_dt, n16, terms, 3, sign, normalize, DT_BF16, 0, g);
        if (k == 4) return fast_body(outs, 1, base, base_dt, n16, terms, 4, sign, normalize, DT_BF16, 0, g);
    }
    return fast_body(outs, n_out, base, base_dt, n16, terms, k, sign, normalize, -1, 0, g);
}

static int fast_merge_ok(const out_t *outs, int n_out, int base_dt, const term_t *terms, int k, uint64_t g) {
    int i, f16 = base_dt == DT_F16;
    if (!avx2_ok() || k > FAST_MAX_TERMS) return 0;
    /* non-finite weights or alphas: NaN payload/sign selection in vector multiplies may differ from the tile loops */
    for (i = 0; i < n_out; i++)
        if (!isfinite(outs[i].alpha)) return 0;
    for (i = 0; i < k; i++) {
        if (!isfinite(terms[i].w)) return 0;
        if (terms[i].mode != PRUNE_NONE && terms[i].mode != PRUNE_MAGNITUDE && terms[i].mode != PRUNE_BAND &&
            (terms[i].mode != PRUNE_BITS || (g & 7)))
            return 0;
        f16 |= terms[i].a_dt == DT_F16 || (terms[i].b && terms[i].b_dt == DT_F16);
    }
    for (i = 0; i < n_out; i++) f16 |= outs[i].dt == DT_F16;
    return !f16 || f16c_ok();
}
#else
static int fast_merge_ok(const out_t *outs, int n_out, int base_dt, const term_t *terms, int k, uint64_t g) {
    (void)outs, (void)n_out, (void)base_dt, (void)terms, (void)k, (void)g;
    return 0;
}
static int fast_merge(const out_t *outs, int n_out, const void *base, int base_dt, Py_ssize_t n16, const term_t *terms,
                      int k, int sign, int normalize, uint64_t g) {
    (void)outs, (void)n_out, (void)base, (void)base_dt, (void)n16, (void)terms, (void)k, (void)sign, (void)normalize;
    (void)g;
    return 0;
}
#endif

static Py_ssize_t dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

/* The whole merge of one block: prune each term, elect signs, combine, normalize, then θ + α·δ for each output. */
MULTIVERSION
static int run_merge_tiles(const out_t *outs, int n_out, const void *base, int base_dt, Py_ssize_t n,
                           const term_t *terms, int k, int sign, int normalize, uint64_t elem_offset, float *tiles) {
    float acc[TILE], d[TILE], den[TILE], tmp[TILE];
    Py_ssize_t off, j;
    int flags = 0, i, o;
    for (off = 0; off < n; off += TILE) {
        Py_ssize_t m = n - off < TILE ? n - off : TILE;
        for (i = 0; i < k; i++) {
            const term_t *t = &terms[i];
            float *tt = tiles + (size_t)i * TILE;
            load_tile(tt, t->a, t->a_dt, off, m);
            if (t->b) {
                load_tile(tmp, t->b, t->b_dt, off, m);
                for (j = 0; j < m; j++) tt[j] = tt[j] - tmp[j];
            }
            if (t->mode == PRUNE_MAGNITUDE) {
                float thr = t->p1;
                for (j = 0; j < m; j++) tt[j] = fabsf(tt[j]) >= thr ? tt[j] : 0.0f;
            } else if (t->mode == PRUNE_BAND) {
                float lo = t->p1, hi = t->p2;
                for (j = 0; j < m; j++) {
                    float a = fabsf(tt[j]);
                    tt[j] = (a >= lo && a < hi) ? tt[j] : 0.0f;
                }
            } else if (t->mode == PRUNE_RANDOM) {
                float dens = t->p1, div = t->p2;
                uint64_t base_idx = elem_offset + (uint64_t)off;
                philox_tile(tmp, base_idx, m, t->k0, t->k1);
                if (div != 0.0f)
                    for (j = 0; j < m; j++) tt[j] = tt[j] / div;
                /* branch-free select (random masks would defeat the branch predictor) */
                for (j = 0; j < m; j++) tt[j] = u2f(f2u(tt[j]) & ((uint32_t)0 - (uint32_t)(tmp[j] < dens)));
            } else if (t->mode == PRUNE_BITS) {
                uint64_t g0 = elem_offset + (uint64_t)off;
                if (t->p1 != 0.0f)
                    for (j = 0; j < m; j++) tt[j] = tt[j] * t->p1;
                for (j = 0; j < m; j++) {
                    uint64_t g = g0 + (uint64_t)j;
                    uint32_t keep = (uint32_t)(t->bits[g >> 3] >> (g & 7)) & 1u;
                    tt[j] = u2f(f2u(tt[j]) & ((uint32_t)0 - keep));
                }
            } else if (t->mode == PRUNE_NEAR) {
                near_tile(tt, m, t->p1);
            }
        }
        for (j = 0; j < m; j++) {
            d[j] = 0.0f;
            den[j] = 0.0f;
        }
        if (sign == SIGN_NONE) {
            for (i = 0; i < k; i++) {
                const float *tt = tiles + (size_t)i * TILE;
                float w = terms[i].w;
                for (j = 0; j < m; j++) d[j] = d[j] + w * tt[j];
                for (j = 0; j < m; j++) den[j] = den[j] + w;
            }
        } else {
            /* elected sign: + when the (weighted sum | count of signs) is >= 0, else - (a tie elects +) */
            for (j = 0; j < m; j++) tmp[j] = 0.0f;
            for (i = 0; i < k; i++) {
                const float *tt = tiles + (size_t)i * TILE;
                float w = terms[i].w;
                if (sign == SIGN_TOTAL)
                    for (j = 0; j < m; j++) tmp[j] = tmp[j] + w * tt[j];
                else if (sign == SIGN_SUM)
                    for (j = 0; j < m; j++) tmp[j] = tmp[j] + tt[j];
                else
                    for (j = 0; j < m; j++) tmp[j] = tmp[j] + (float)((tt[j] > 0.0f) - (tt[j] < 0.0f));
            }
            for (i = 0; i < k; i++) {
                const float *tt = tiles + (size_t)i * TILE;
                float w = terms[i].w;
                uint32_t wb = f2u(w);
                for (j = 0; j < m; j++) {
                    /* branch-free: agree = sign(tt) equals the elected sign (+ when tmp >= 0); zeros never agree */
                    uint32_t pos = tmp[j] >= 0.0f;
                    uint32_t agree = (pos & (tt[j] > 0.0f)) | ((pos ^ 1u) & (tt[j] < 0.0f));
                    uint32_t mask = (uint32_t)0 - agree;
                    d[j] = d[j] + u2f(f2u(w * tt[j]) & mask);
                    den[j] = den[j] + u2f(wb & mask);
                }
            }
        }
        if (normalize == NORMALIZE_FLOOR)
            for (j = 0; j < m; j++) d[j] = d[j] / (den[j] > 1e-6f ? den[j] : 1e-6f);
        else if (normalize)
            for (j = 0; j < m; j++) { /* branch-free: divide by 1 (exact) where den <= 0 */
                uint32_t keep = (uint32_t)0 - (uint32_t)(den[j] > 0.0f);
                d[j] = d[j] / u2f((f2u(den[j]) & keep) | (0x3f800000u & ~keep));
            }
        for (o = 0; o < n_out; o++) {
            float alpha = outs[o].alpha;
            int f;
            load_tile(acc, base, base_dt, off, m);
            if (k > 0) /* no terms: a pure cast, so -0.0 stays -0.0 */
                for (j = 0; j < m; j++) acc[j] = acc[j] + alpha * d[j];
            f = store_tile(outs[o].buf, outs[o].dt, off, acc, m);
            flags |= f & 5;
            if ((f & 4) && !(flags & 2)) {
                for (j = off; j < off + m; j++) {
                    int fin = !out_finite_at(outs[o].buf, outs[o].dt, j) && is_finite_at(base, base_dt, j);
                    for (i = 0; fin && i < k; i++) {
                        fin = is_finite_at(terms[i].a, terms[i].a_dt, j);
                        if (fin && terms[i].b) fin = is_finite_at(terms[i].b, terms[i].b_dt, j);
                    }
                    if (fin) {
                        flags |= 2;
                        break;
                    }
                }
            }
        }
    }
    return flags;
}

/* run_merge: the fused AVX2 path where it applies (all but the last n % 16 elements), the tile loops otherwise. */

static int run_merge(const out_t *outs, int n_out, const void *base, int base_dt, Py_ssize_t n, const term_t *terms,
                     int k, int sign, int normalize, uint64_t elem_offset, float *tiles) {
    out_t touts[MAX_VECTORS];
    term_t tterms[MAX_VECTORS];
    Py_ssize_t n16 = n & ~(Py_ssize_t)15;
    int flags, i;
    if (n16 == 0 || !use_fast || !fast_merge_ok(outs, n_out, base_dt, terms, k, elem_offset))
        return run_merge_tiles(outs, n_out, base, base_dt, n, terms, k, sign, normalize, elem_offset, tiles);
    flags = fast_merge(outs, n_out, base, base_dt, n16, terms, k, sign, normalize, elem_offset);
    if (n16 == n) return flags;
    for (i = 0; i < n_out; i++) {
        touts[i] = outs[i];
        touts[i].buf = (char *)outs[i].buf + n16 * dt_size(outs[i].dt);
    }
    for (i = 0; i < k; i++) {
        tterms[i] = terms[i];
        tterms[i].a = (const char *)terms[i].a + n16 * dt_size(terms[i].a_dt);
        if (terms[i].b) tterms[i].b = (const char *)terms[i].b + n16 * dt_size(terms[i].b_dt);
    }
    return flags | run_merge_tiles(touts, n_out, (const char *)base + n16 * dt_size(base_dt), base_dt, n - n16, tterms,
                                   k, sign, normalize, elem_offset + (uint64_t)n16, tiles);
}

/* |x| bit patterns of 16-bit values counted into four interleaved 32-bit sub-histograms of 32768 bins (the sign bit
 * masked off), so that runs of equal bins do not serialise on one counter. The caller sums the four and empties them
 * before any counter can overflow (at most 2^32 - 1 elements in all). */
MULTIVERSION
static void run_hist16(const uint16_t *s, Py_ssize_t n, uint32_t *sub) {
    Py_ssize_t j;
    for (j = 0; j + 4 <= n; j += 4) {
        uint64_t x;
        memcpy(&x, s + j, 8); /* little-endian: element j in the low 16 bits */
        sub[x & 0x7fffu]++;
        sub[32768 + ((x >> 16) & 0x7fffu)]++;
        sub[2 * 32768 + ((x >> 32) & 0x7fffu)]++;
        sub[3 * 32768 + ((x >> 48) & 0x7fffu)]++;
    }
    for (; j < n; j++) sub[s[j] & 0x7fffu]++;
}

/* Level 0 of the threshold pass (exact k-th largest |x|, linear time, no sort): bins = the top 15 bits of |x| (the
 * whole pattern of a 16-bit value), counted into four interleaved sub-histograms as in run_hist16. */
MULTIVERSION
static void run_hist0(const void *src, int dt, Py_ssize_t n, uint32_t *sub) {
    Py_ssize_t j;
    const uint32_t *s = (const uint32_t *)src;
    if (dt != DT_F32) {
        run_hist16((const uint16_t *)src, n, sub);
        return;
    }
    for (j = 0; j + 4 <= n; j += 4) {
        sub[(s[j] & 0x7fffffffu) >> 16]++;
        sub[32768 + ((s[j + 1] & 0x7fffffffu) >> 16)]++;
        sub[2 * 32768 + ((s[j + 2] & 0x7fffffffu) >> 16)]++;
        sub[3 * 32768 + ((s[j + 3] & 0x7fffffffu) >> 16)]++;
    }
    for (; j < n; j++) sub[(s[j] & 0x7fffffffu) >> 16]++;
}

/* Where a bracketed float32 pass also keeps the |x| patterns of the elements inside the bracket whose low 16 bits are
 * not all zero (those of a float32 difference of two 16-bit values are, unless it is inexact in 16 bits): with them
 * the k-th largest inside a level-0 bin is known without a level-1 pass. n = -1 once more than cap were met. */
typedef struct {
    uint32_t *buf;
    Py_ssize_t cap, n;
} collect_t;

/* The threshold pass once a sample has bracketed the threshold's bin in [lo, hi]: returns how many elements have a
 * level-0 bin above hi and counts only the bins inside the bracket (into sub, as run_hist0). The portable loop: */
static uint64_t bracket_loop(const void *src, int dt, Py_ssize_t n, int lo, int hi, uint32_t *sub, collect_t *col) {
    uint64_t above = 0;
    Py_ssize_t j;
    for (j = 0; j < n; j++) {
        int b = dt == DT_F32 ? (int)((((const uint32_t *)src)[j] & 0x7fffffffu) >> 16)
                             : (int)(((const uint16_t *)src)[j] & 0x7fffu);
        if (b > hi)
            above++;
        else if (b >= lo) {
            sub[b]++;
            if (col && col->n >= 0 && (((const uint32_t *)src)[j] & 0xffffu)) {
                if (col->n < col->cap)
                    col->buf[col->n++] = ((const uint32_t *)src)[j] & 0x7fffffffu;
                else
                    col->n = -1;
            }
        }
    }
    return above;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HAVE_BRACKET_AVX512 1
#define BRACKET_TMP 4096
/* AVX-512: compare 32 (16-bit) or 16 (32-bit) bins at once, count those above with a popcount, and compress the bins
 * inside the bracket (a few percent of them) into a small buffer that run_hist16 then counts. No branch per element. */
/* Sixteen float32 |x| patterns (sign cleared) of a bracketed pass: counts those whose bin is above hi, compresses the
 * bins inside [lo, hi] into tmp (run_hist16 counts them once BRACKET_TMP have gathered), and appends the inexact
 * patterns inside (low 16 bits not zero) to col (see collect_t; col may be NULL). */
static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vbmi2,popcnt"))) void
bracket16(__m512i x, __m512i vlo, __m512i vhi, __m512i low, uint64_t *above, uint16_t *tmp, Py_ssize_t *c,
          uint32_t *sub, collect_t *col) {
    __m512i v = _mm512_srli_epi32(x, 16);
    __mmask16 gt = _mm512_cmpgt_epu32_mask(v, vhi);
    __mmask16 in = _mm512_mask_cmpge_epu32_mask((__mmask16)~gt, v, vlo);
    __mmask16 inexact = col ? _mm512_mask_test_epi32_mask(in, x, low) : 0;
    *above += (uint64_t)__builtin_popcount(gt);
    if (__builtin_expect(inexact != 0, 0) && col->n >= 0) {
        if (col->n + 16 <= col->cap) {
            _mm512_storeu_si512((void *)(col->buf + col->n), _mm512_maskz_compress_epi32(inexact, x));
            col->n += __builtin_popcount(inexact);
        } else
            col->n = -1;
    }
    _mm256_storeu_si256((__m256i *)(tmp + *c), _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(in, v)));
    *c += __builtin_popcount(in);
    if (*c >= BRACKET_TMP) {
        run_hist16(tmp, *c, sub);
        *c = 0;
    }
}

__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt"))) static uint64_t
bracket_avx512(const void *src, int dt, Py_ssize_t n, int lo, int hi, uint32_t *sub, collect_t *col) {
    uint16_t tmp[BRACKET_TMP + 32];
    uint64_t above = 0;
    Py_ssize_t j = 0, c = 0;
    if (dt == DT_F32) {
        const uint32_t *s = (const uint32_t *)src;
        const __m512i mask = _mm512_set1_epi32(0x7fffffff), vhi = _mm512_set1_epi32(hi), vlo = _mm512_set1_epi32(lo),
                      low = _mm512_set1_epi32(0xffff);
        for (; j + 16 <= n; j += 16) {
            __m512i a = _mm512_and_si512(_mm512_loadu_si512((const void *)(s + j)), mask);
            bracket16(a, vlo, vhi, low, &above, tmp, &c, sub, col);
        }
    } else {
        const uint16_t *s = (const uint16_t *)src;
        const __m512i mask = _mm512_set1_epi16(0x7fff), vhi = _mm512_set1_epi16((short)hi),
                      vlo = _mm512_set1_epi16((short)lo);
        for (; j + 32 <= n; j += 32) {
            __m512i v = _mm512_and_si512(_mm512_loadu_si512((const void *)(s + j)), mask);
            __mmask32 gt = _mm512_cmpgt_epu16_mask(v, vhi);
            __mmask32 in = _mm512_mask_cmpge_epu16_mask((__mmask32)~gt, v, vlo);
            above += (uint64_t)__builtin_popcount(gt);
            _mm512_storeu_si512((void *)(tmp + c), _mm512_maskz_compress_epi16(in, v));
            c += __builtin_popcount(in);
            if (c >= BRACKET_TMP) {
                run_hist16(tmp, c, sub);
                c = 0;
            }
        }
    }
    if (c) run_hist16(tmp, c, sub);
    return above + bracket_loop((const char *)src + j * dt_size(dt), dt, n - j, lo, hi, sub, col);
}

/* bracket_avx512 of the float32 difference a - b of two 16-bit inputs, converted and subtracted in registers. */
__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt"))) static uint64_t
bracket_diff_avx512(const uint16_t *a, int a_dt, const uint16_t *b, int b_dt, Py_ssize_t n, int lo, int hi,
                    uint32_t *sub, collect_t *col) {
    uint16_t tmp[BRACKET_TMP + 32];
    uint64_t above = 0;
    Py_ssize_t j = 0, c = 0;
    const __m512i mask = _mm512_set1_epi32(0x7fffffff), vhi = _mm512_set1_epi32(hi), vlo = _mm512_set1_epi32(lo),
                  low = _mm512_set1_epi32(0xffff);
    for (; j + 16 <= n; j += 16) {
        __m256i ra = _mm256_loadu_si256((const __m256i *)(a + j)), rb = _mm256_loadu_si256((const __m256i *)(b + j));
        __m512 fa = a_dt == DT_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(ra), 16))
                                    : _mm512_cvtph_ps(ra);
        __m512 fb = b_dt == DT_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rb), 16))
                                    : _mm512_cvtph_ps(rb);
        bracket16(_mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(fa, fb)), mask), vlo, vhi, low, &above, tmp, &c,
                  sub, col);
    }
    if (c) run_hist16(tmp, c, sub);
    if (j < n) {
        float ta[16], tb[16];
        load_tile(ta, a, a_dt, j, n - j);
        load_tile(tb, b, b_dt, j, n - j);
        for (c = 0; c < n - j; c++) ta[c] = ta[c] - tb[c];
        above += bracket_loop(ta, DT_F32, n - j, lo, hi, sub, col);
    }
    return above;
}

CPU_CHECK(avx512_ok, 1, __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("popcnt"))
#else
#define HAVE_BRACKET_AVX512 0
static int avx512_ok(void) { return 0; }
#endif

#if HAVE_F16C_PATH
/* AVX2 has no compress: compact_lut[mask] holds the lanes set in an 8-bit mask, in order, as bytes, for a
 * permutevar8x32 (filled at module load). */
static uint64_t compact_lut[256];
/* ... and the way back: rank_lut[mask] holds each lane's rank among the lanes set (bytes; 255 for a lane not set) */
static uint64_t rank_lut[256];
static void compact_lut_init(void) {
    int mask, l, c;
    for (mask = 0; mask < 256; mask++) {
        uint64_t v = 0, r = 0;
        for (l = 0, c = 0; l < 8; l++)
            if (mask >> l & 1) v |= (uint64_t)l << (8 * c), r |= (uint64_t)c++ << (8 * l);
            else r |= (uint64_t)255 << (8 * l);
        compact_lut[mask] = v, rank_lut[mask] = r;
    }
}

/* The lanes of x that mask (a movemask) sets, stored in order from dst (eight lanes written); how many. */
static inline __attribute__((always_inline, target("avx2,popcnt"))) int compact8(uint32_t *dst, __m256i x, int mask) {
    __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)compact_lut[mask]));
    _mm256_storeu_si256((__m256i *)dst, _mm256_permutevar8x32_epi32(x, idx));
    return __builtin_popcount((unsigned)mask);
}

/* run_hist16 of bins held in 32-bit words (each < 32768) */
static void run_hist_bins32(const uint32_t *s, Py_ssize_t n, uint32_t *sub) {
    Py_ssize_t j;
    for (j = 0; j + 4 <= n; j += 4) {
        sub[s[j]]++;
        sub[32768 + s[j + 1]]++;
        sub[2 * 32768 + s[j + 2]]++;
        sub[3 * 32768 + s[j + 3]]++;
    }
    for (; j < n; j++) sub[s[j]]++;
}

#define COMPACT_TMP 4096 /* the AVX2 loops' buffers of compacted elements (and 8 words of room) */
/* bracket16 with eight float32 |x| patterns (AVX2; bins are below 2^15, so signed compares serve): the count above
 * hi, the bins inside [lo, hi] compacted into tmp (counted once COMPACT_TMP have gathered), the inexact patterns
 * inside appended to col (col may be NULL; -1 once fewer than eight places are left, as bracket16 with sixteen). */
static inline __attribute__((always_inline, target("avx2,popcnt"))) void
bracket8(__m256i x, __m256i vlo1, __m256i vhi, uint64_t *above, uint32_t *tmp, Py_ssize_t *c, uint32_t *sub,
         collect_t *col) {
    __m256i v = _mm256_srli_epi32(x, 16), gt = _mm256_cmpgt_epi32(v, vhi);
    int in = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(gt, _mm256_cmpgt_epi32(v, vlo1))));
    *above += (uint64_t)__builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(gt)));
    if (col) {
        __m256i exact = _mm256_cmpeq_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0xffff)), _mm256_setzero_si256());
        int inexact = in & ~_mm256_movemask_ps(_mm256_castsi256_ps(exact));
        if (__builtin_expect(inexact != 0, 0) && col->n >= 0) {
            if (col->n + 8 <= col->cap)
                col->n += compact8(col->buf + col->n, x, inexact);
            else
                col->n = -1;
        }
    }
    *c += compact8(tmp + *c, v, in);
    if (*c >= COMPACT_TMP) {
        run_hist_bins32(tmp, *c, sub);
        *c = 0;
    }
}

/* bracket_avx512's pass with AVX2, eight elements a step (a 16-bit value's pattern shifted to a float32's place) */
__attribute__((target("avx2,popcnt"))) static uint64_t bracket_avx2(const void *src, int dt, Py_ssize_t n, int lo,
                                                                     int hi, uint32_t *sub, collect_t *col) {
    uint32_t tmp[COMPACT_TMP + 8];
    const __m256i mask = _mm256_set1_epi32(0x7fffffff), vhi = _mm256_set1_epi32(hi), vlo1 = _mm256_set1_epi32(lo - 1);
    uint64_t above = 0;
    Py_ssize_t j = 0, c = 0;
    if (dt == DT_F32) {
        for (; j + 8 <= n; j += 8) {
            __m256i x = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)((const uint32_t *)src + j)), mask);
            bracket8(x, vlo1, vhi, &above, tmp, &c, sub, col);
        }
    } else {
        for (; j + 8 <= n; j += 8) {
            __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + j));
            __m256i x = _mm256_and_si256(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16), mask);
            bracket8(x, vlo1, vhi, &above, tmp, &c, sub, NULL);
        }
    }
    if (c) run_hist_bins32(tmp, c, sub);
    return above + bracket_loop((const char *)src + j * dt_size(dt), dt, n - j, lo, hi, sub, col);
}

/* bracket_diff_avx512 with AVX2: the float32 difference a - b of two 16-bit inputs made in registers */
__attribute__((target("avx2,f16c,popcnt"))) static uint64_t bracket_diff_avx2(const uint16_t *a, int a_dt,
                                                                               const uint16_t *b, int b_dt,
                                                                               Py_ssize_t n, int lo, int hi,
                                                                               uint32_t *sub, collect_t *col) {
    uint32_t tmp[COMPACT_TMP + 8];
    const __m256i mask = _mm256_set1_epi32(0x7fffffff), vhi = _mm256_set1_epi32(hi), vlo1 = _mm256_set1_epi32(lo - 1);
    uint64_t above = 0;
    Py_ssize_t j = 0, c = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 d = _mm256_sub_ps(fast_load(a, a_dt, j), fast_load(b, b_dt, j));
        bracket8(_mm256_and_si256(_mm256_castps_si256(d), mask), vlo1, vhi, &above, tmp, &c, sub, col);
    }
    if (c) run_hist_bins32(tmp, c, sub);
    if (j < n) {
        float ta[8], tb[8];
        load_tile(ta, a, a_dt, j, n - j);
        load_tile(tb, b, b_dt, j, n - j);
        for (c = 0; c < n - j; c++) ta[c] = ta[c] - tb[c];
        above += bracket_loop(ta, DT_F32, n - j, lo, hi, sub, col);
    }
    return above;
}
#endif

/* Level 1 of the float32 threshold pass: for the elements whose level-0 bin (bits 16..30 of |x|) is one of the
 * `nb` bins `prefix` (distinct, at most HIST1_BINS), counts the low 16 bits into that bin's row of `hist` (uint64,
 * nb rows of 65536 bins), in one pass for all of them. The portable loop: */
#define HIST1_BINS 16
static void hist1_loop(const uint32_t *s, Py_ssize_t n, const uint32_t *prefix, int nb, uint64_t *hist) {
    uint32_t lo = 0xffffffffu, hi = 0;
    Py_ssize_t j;
    int r;
    for (r = 0; r < nb; r++) {
        lo = prefix[r] < lo ? prefix[r] : lo;
        hi = prefix[r] > hi ? prefix[r] : hi;
    }
    for (j = 0; j < n; j++) {
        uint32_t b = (s[j] & 0x7fffffffu) >> 16;
        if (b < lo || b > hi) continue;
        for (r = 0; r < nb; r++)
            if (b == prefix[r]) {
                hist[(size_t)r * 65536 + (s[j] & 0xffffu)]++;
                break;
            }
    }
}

#if HAVE_BRACKET_AVX512
/* AVX-512: sixteen bins compared with every wanted bin at once; the few elements inside one (a level-0 bin holds a
 * small share of a tensor) go to the portable loop. */
__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt"))) static void
hist1_avx512(const uint32_t *s, Py_ssize_t n, const uint32_t *prefix, int nb, uint64_t *hist) {
    uint32_t tmp[BRACKET_TMP + 16];
    __m512i want[HIST1_BINS];
    const __m512i mask = _mm512_set1_epi32(0x7fffffff);
    Py_ssize_t j = 0, c = 0;
    int r;
    for (r = 0; r < nb; r++) want[r] = _mm512_set1_epi32((int)prefix[r]);
    for (; j + 16 <= n; j += 16) {
        __m512i x = _mm512_loadu_si512((const void *)(s + j)), v = _mm512_srli_epi32(_mm512_and_si512(x, mask), 16);
        __mmask16 in = 0;
        for (r = 0; r < nb; r++) in |= _mm512_cmpeq_epi32_mask(v, want[r]);
        if (in) {
            _mm512_storeu_si512((void *)(tmp + c), _mm512_maskz_compress_epi32(in, x));
            c += __builtin_popcount(in);
            if (c >= BRACKET_TMP) {
                hist1_loop(tmp, c, prefix, nb, hist);
                c = 0;
            }
        }
    }
    hist1_loop(tmp, c, prefix, nb, hist);
    hist1_loop(s + j, n - j, prefix, nb, hist);
}
#endif

#if HAVE_F16C_PATH
/* AVX2: eight bins compared with every wanted bin at once; the few elements inside one go to a buffer (compact8)
 * that the portable loop counts. */
__attribute__((target("avx2,popcnt"))) static void hist1_avx2(const uint32_t *s, Py_ssize_t n, const uint32_t *prefix,
                                                              int nb, uint64_t *hist) {
    uint32_t tmp[COMPACT_TMP + 8];
    __m256i want[HIST1_BINS];
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    Py_ssize_t j = 0, c = 0;
    int r;
    for (r = 0; r < nb; r++) want[r] = _mm256_set1_epi32((int)prefix[r]);
    for (; j + 8 <= n; j += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(s + j)), v = _mm256_srli_epi32(_mm256_and_si256(x, mask), 16);
        __m256i in = _mm256_cmpeq_epi32(v, want[0]);
        for (r = 1; r < nb; r++) in = _mm256_or_si256(in, _mm256_cmpeq_epi32(v, want[r]));
        if (!_mm256_testz_si256(in, in)) {
            c += compact8(tmp + c, x, _mm256_movemask_ps(_mm256_castsi256_ps(in)));
            if (c >= COMPACT_TMP) {
                hist1_loop(tmp, c, prefix, nb, hist);
                c = 0;
            }
        }
    }
    hist1_loop(tmp, c, prefix, nb, hist);
    hist1_loop(s + j, n - j, prefix, nb, hist);
}
#endif

static void run_hist1(const uint32_t *s, Py_ssize_t n, const uint32_t *prefix, int nb, uint64_t *hist,
                      int portable) {
#if HAVE_BRACKET_AVX512
    if (!portable && avx512_ok()) {
        hist1_avx512(s, n, prefix, nb, hist);
        return;
    }
#endif
#if HAVE_F16C_PATH
    if (portable != 1 && avx2_ok()) {
        hist1_avx2(s, n, prefix, nb, hist);
        return;
    }
#endif
    hist1_loop(s, n, prefix, nb, hist);
}

static int check_dt(int dt) {
    if (dt != DT_F32 && dt != DT_F16 && dt != DT_BF16) {
        PyErr_Format(PyExc_ValueError, "unsupported dtype code %d", dt);
        return 0;
    }
    return 1;
}

static int check_len(Py_buffer *b, int dt, Py_ssize_t n, const char *what) {
    if (b->len < n * dt_size(dt)) {
        PyErr_Format(PyExc_ValueError, "%s buffer too small: %zd bytes for %zd elements", what, b->len, n);
        return 0;
    }
    return 1;
}

/* diff(out, out_dt, a, a_dt, b, b_dt, n) -> flags;  out = round(a - b) */

/* Float64 sums for run_moments, in one fixed order on every CPU: eight partial sums (element j into sum j % 8),
 * combined as ((s0+s4) + (s1+s5)) + ((s2+s6) + (s3+s7)). sum_abs: Σ|x|; random_kept: Σ|x| where u < p1 (DARE's keep
 * test), with the keep bits written a byte per eight elements when bits is not NULL (m a multiple of 8 then). */
static double sum8_combine(const double *s) { return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])); }

#if HAVE_F16C_PATH
/* The eight float64 lanes of those sums in two AVX registers (lanes 0-3, 4-7): v's element j added into lane j */
static inline __attribute__((always_inline, target("avx2"))) void add8_pd(__m256d *lo, __m256d *hi, __m256 v) {
    *lo = _mm256_add_pd(*lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    *hi = _mm256_add_pd(*hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

/* ... and their sum8_combine */
static inline __attribute__((always_inline, target("avx2"))) double sum8_pd(__m256d lo, __m256d hi) {
    double l[8];
    _mm256_storeu_pd(l, lo), _mm256_storeu_pd(l + 4, hi);
    return sum8_combine(l);
}
#endif

/* The _acc forms add elements 0 .. m-1 into the caller's partial sums s (element j into s[j % 8]), so a range split
 * at multiples of 8 gives the same sums as one call. */
static void sum_abs_acc_plain(const float *x, Py_ssize_t m, double *s) {
    Py_ssize_t j;
    for (j = 0; j < m; j++) s[j & 7] += (double)fabsf(x[j]);
}

static void random_kept_from(const float *u, const float *x, Py_ssize_t j0, Py_ssize_t m, float p1, uint8_t *bits,
                             double *s) {
    Py_ssize_t j;
    for (j = j0; j < m; j++) {
        int keep = u[j] < p1;
        if (bits) {
            if ((j & 7) == 0) bits[j >> 3] = 0;
            bits[j >> 3] |= (uint8_t)(keep << (j & 7));
        }
        s[j & 7] += keep ? (double)fabsf(x[j]) : 0.0;
    }
}

#if HAVE_F16C_PATH
__attribute__((target("avx2"))) static void sum_abs_acc_avx2(const float *x, Py_ssize_t m, double *s) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256d lo = _mm256_loadu_pd(s), hi = _mm256_loadu_pd(s + 4);
    Py_ssize_t j;
    for (j = 0; j + 8 <= m; j += 8) {
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + j), absmask);
        add8_pd(&lo, &hi, v);
    }
    _mm256_storeu_pd(s, lo);
    _mm256_storeu_pd(s + 4, hi);
    for (; j < m; j++) s[j & 7] += (double)fabsf(x[j]);
}

__attribute__((target("avx2"))) static void random_kept_acc_avx2(const float *u, const float *x, Py_ssize_t m,
                                                                 float p1, uint8_t *bits, double *s) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), vp = _mm256_set1_ps(p1);
    __m256d lo = _mm256_loadu_pd(s), hi = _mm256_loadu_pd(s + 4);
    Py_ssize_t j;
    for (j = 0; j + 8 <= m; j += 8) {
        __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(u + j), vp, _CMP_LT_OQ);
        __m256 v = _mm256_and_ps(_mm256_and_ps(_mm256_loadu_ps(x + j), absmask), keep);
        if (bits) bits[j >> 3] = (uint8_t)_mm256_movemask_ps(keep);
        add8_pd(&lo, &hi, v);
    }
    _mm256_storeu_pd(s, lo);
    _mm256_storeu_pd(s + 4, hi);
    random_kept_from(u, x, j, m, p1, bits, s);
}
#endif

static void sum_abs_acc(const float *x, Py_ssize_t m, double *s) {
#if HAVE_F16C_PATH
    if (avx2_ok()) {
        sum_abs_acc_avx2(x, m, s);
        return;
    }
#endif
    sum_abs_acc_plain(x, m, s);
}

static void random_kept_acc(const float *u, const float *x, Py_ssize_t m, float p1, uint8_t *bits, double *s) {
#if HAVE_F16C_PATH
    if (avx2_ok()) {
        random_kept_acc_avx2(u, x, m, p1, bits, s);
        return;
    }
#endif
    random_kept_from(u, x, 0, m, p1, bits, s);
}

static double sum_abs(const float *x, Py_ssize_t m) {
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    sum_abs_acc(x, m, s);
    return sum8_combine(s);
}

static double random_kept(const float *u, const float *x, Py_ssize_t m, float p1, uint8_t *bits) {
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    random_kept_acc(u, x, m, p1, bits, s);
    return sum8_combine(s);
}

#if HAVE_AVX512VL_PATH
/* Eight elements of a bf16 or float32 input as float32 (exact). */
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) __m256 load8_exact(const void *src, int dt,
                                                                                            Py_ssize_t i) {
    if (dt == DT_BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i))), 16));
    return _mm256_loadu_ps((const float *)src + i);
}

/* load8_exact's sixteen */
static inline __attribute__((always_inline, target("avx512f"))) __m512 load16_exact(const void *src, int dt,
                                                                                    Py_ssize_t i) {
    if (dt == DT_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i))), 16));
    return _mm512_loadu_ps((const float *)src + i);
}

/* DARE's statistics of one tile in one pass (run_moments, PRUNE_RANDOM with keep bits): v = a - bt (bt NULL: v = a)
 * for elements off .. off+m-1 of a (bf16 or float32), the sums of |v| and of |v| where philox(key, g0 + j) < p1 into
 * *l1 and *kept, and the keep bits (one byte per eight elements, from bits[0]); m a multiple of 8. The values, the
 * eight double lanes and their order are those of sum_abs and random_kept (which read v from a tile): the same bits. */
__attribute__((target("avx512f,avx512vl"))) static void dare_tile_avx512(const void *a, int a_dt, Py_ssize_t off,
                                                                        const float *bt, Py_ssize_t m, uint64_t g0,
                                                                        uint32_t k0, uint32_t k1, float p1,
                                                                        uint8_t *bits, double *l1, double *kept) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), vp = _mm256_set1_ps(p1);
    __m512d s1 = _mm512_setzero_pd(), s2 = _mm512_setzero_pd();
    double s[8];
    philox_keys_t K;
    __m512i w[8];
    Py_ssize_t j = 0;
    int v, nv;
    philox_keys(&K, k0, k1, g0 >> 2, (g0 + (uint64_t)m - 1) >> 2);
    for (; j < m; j += 8 * nv) { /* nv vectors of eight elements: 16 from four Philox vectors, else up to 4 from one */
        if (j + 128 <= m) {
            nv = 16;
            philox_words(w, 4, (g0 + (uint64_t)j) >> 2, &K);
        } else {
            nv = m - j >= 32 ? 4 : (int)((m - j) >> 3);
            philox_words(w, 1, (g0 + (uint64_t)j) >> 2, &K);
        }
        for (v = 0; v < nv; v++) {
            Py_ssize_t q = j + 8 * v;
            __m256i wv = v & 1 ? _mm512_extracti64x4_epi64(w[v >> 1], 1) : _mm512_castsi512_si256(w[v >> 1]);
            __m256 x = load8_exact(a, a_dt, off + q);
            __m512d d;
            __mmask8 keep = _mm256_cmp_ps_mask(philox_float(wv), vp, _CMP_LT_OQ);
            if (bt) x = _mm256_sub_ps(x, _mm256_loadu_ps(bt + q));
            d = _mm512_cvtps_pd(_mm256_and_ps(x, absmask));
            s1 = _mm512_add_pd(s1, d);
            s2 = _mm512_mask_add_pd(s2, keep, s2, d); /* random_kept adds +0.0 where not kept: the same sum */
            bits[q >> 3] = (uint8_t)keep;
        }
    }
    _mm512_storeu_pd(s, s1);
    *l1 = sum8_combine(s);
    _mm512_storeu_pd(s, s2);
    *kept = sum8_combine(s);
}

/* Whether run_moments can take dare_tile_avx512 for term t over a tile at element g0 of m elements. */
static int dare_fused(const term_t *t, int want_gram, uint8_t *const *masks, int i, uint64_t g0, Py_ssize_t m) {
    return t->mode == PRUNE_RANDOM && !want_gram && masks && masks[i] && (g0 & 7) == 0 && (m & 7) == 0 && m > 0 &&
           (t->a_dt == DT_BF16 || t->a_dt == DT_F32) && avx512vl_ok();
}
#endif

#if HAVE_F16C_PATH
/* dare_tile_avx512 with AVX2: the tile's Philox numbers made first (philox_avx2), then one loop over eight elements
 * at a time for v, the two sums (the same lanes and order) and the keep bits. */
__attribute__((target("avx2,f16c"))) static void dare_tile_avx2(const void *a, int a_dt, Py_ssize_t off,
                                                                const float *bt, Py_ssize_t m, uint64_t g0,
                                                                uint32_t k0, uint32_t k1, float p1, uint8_t *bits,
                                                                double *l1, double *kept) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), vp = _mm256_set1_ps(p1);
    __m256d s1lo = _mm256_setzero_pd(), s1hi = s1lo, s2lo = s1lo, s2hi = s1lo;
    float u[TILE];
    Py_ssize_t j;
    philox_avx2(u, g0, m, k0, k1, 0);
    for (j = 0; j < m; j += 8) {
        __m256 x = fast_load(a, a_dt, off + j); /* bf16 or float32 (dare_fused8) */
        __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(u + j), vp, _CMP_LT_OQ), d;
        if (bt) x = _mm256_sub_ps(x, _mm256_loadu_ps(bt + j));
        x = _mm256_and_ps(x, absmask);
        d = _mm256_and_ps(x, keep); /* random_kept's +0 where not kept */
        add8_pd(&s1lo, &s1hi, x), add8_pd(&s2lo, &s2hi, d);
        bits[j >> 3] = (uint8_t)_mm256_movemask_ps(keep);
    }
    *l1 = sum8_pd(s1lo, s1hi);
    *kept = sum8_pd(s2lo, s2hi);
}

/* Whether run_moments can take dare_tile_avx2 (as dare_fused) */
static int dare_fused8(const term_t *t, int want_gram, uint8_t *const *masks, int i, uint64_t g0, Py_ssize_t m) {
    return t->mode == PRUNE_RANDOM && !want_gram && masks && masks[i] && (g0 & 7) == 0 && (m & 7) == 0 && m > 0 &&
           m <= TILE && (t->a_dt == DT_BF16 || t->a_dt == DT_F32) && avx2_ok();
}
#endif

#if HAVE_F16C_PATH
/* run_moments' Gram sums of one tile for K models (K a constant after inlining): every pair's four lanes in registers,
 * each model's floats widened once per step instead of once per pair; the same products, lanes and order as the pair
 * loops (element j into lane j % 4, then (s0 + s1) + (s2 + s3) added to out). From the tiles (terms NULL), or, with
 * terms, straight from the inputs (v_i = a_i - base where the term has a base, the tile loop's float32 difference;
 * m a multiple of 8): no tile written and read back. */
static inline __attribute__((always_inline, target("avx2,f16c"))) void
gram_k(const float *tiles, const term_t *terms, const void *base, int base_dt, Py_ssize_t off, const int k,
       Py_ssize_t m, double *out) {
    __m256d acc[10], x[4];
    double s[4];
    Py_ssize_t j = 0;
    int i, l, p, h;
    for (p = 0; p < k * (k + 1) / 2; p++) acc[p] = _mm256_setzero_pd();
    if (terms)
        for (; j < m; j += 8) {
            const __m256 bv = base ? fast_load(base, base_dt, off + j) : _mm256_setzero_ps();
            __m256 v[4];
            for (i = 0; i < k; i++) {
                v[i] = fast_load(terms[i].a, terms[i].a_dt, off + j);
                if (terms[i].b) v[i] = _mm256_sub_ps(v[i], bv);
            }
            for (h = 0; h < 2; h++) { /* elements j .. j + 3, then j + 4 .. j + 7: the same lanes, in order */
                for (i = 0; i < k; i++)
                    x[i] = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(v[i], 1) : _mm256_castps256_ps128(v[i]));
                for (i = 0, p = 0; i < k; i++)
                    for (l = i; l < k; l++, p++) acc[p] = _mm256_add_pd(acc[p], _mm256_mul_pd(x[i], x[l]));
            }
        }
    else
        for (; j + 4 <= m; j += 4) {
            for (i = 0; i < k; i++) x[i] = _mm256_cvtps_pd(_mm_loadu_ps(tiles + (size_t)i * TILE + j));
            for (i = 0, p = 0; i < k; i++)
                for (l = i; l < k; l++, p++) acc[p] = _mm256_add_pd(acc[p], _mm256_mul_pd(x[i], x[l]));
        }
    for (i = 0, p = 0; i < k; i++)
        for (l = i; l < k; l++, p++) {
            const float *a = tiles + (size_t)i * TILE, *b = tiles + (size_t)l * TILE; /* the tail (from the tiles) */
            Py_ssize_t q;
            _mm256_storeu_pd(s, acc[p]);
            for (q = j; q < m; q++) s[q & 3] += (double)a[q] * (double)b[q];
            out[(size_t)i * k + l] += (s[0] + s[1]) + (s[2] + s[3]);
        }
}

__attribute__((target("avx2,f16c"))) static void gram_avx2(const float *tiles, const term_t *terms, const void *base,
                                                          int base_dt, Py_ssize_t off, int k, Py_ssize_t m,
                                                          double *out) {
    if (k == 2) gram_k(tiles, terms, base, base_dt, off, 2, m, out);
    else if (k == 3) gram_k(tiles, terms, base, base_dt, off, 3, m, out);
    else gram_k(tiles, terms, base, base_dt, off, 4, m, out);
}

/* Whether run_moments can make a tile's Gram sums straight from the inputs (gram_avx2 with terms): the Gram matrix
 * alone of two to four unpruned vectors, each with the base or none, inputs the vector loads read exactly */
static int gram_direct(const term_t *terms, int k, const void *base, int base_dt, int want_gram, int want_l1,
                       Py_ssize_t m) {
    int i, f16 = base && base_dt == DT_F16;
    if (!want_gram || want_l1 || k < 2 || k > 4 || (m & 7) || !avx2_ok()) return 0;
    for (i = 0; i < k; i++) {
        if (terms[i].mode != PRUNE_NONE || (terms[i].b != NULL) != (base != NULL)) return 0;
        f16 |= terms[i].a_dt == DT_F16;
    }
    return !f16 || f16c_ok();
}
#endif

/* moments: the statistics pass of the model-centric methods (capmerge/merge/methods/blockform.py).
 * For K vectors v_i = a_i - base (float32, rounded as the merge kernel rounds it) or a_i, over elements [0, n):
 *   gram (K*K, row-major, symmetric): sum v_i * v_j      (when want_gram)
 *   l1   (K):                         sum |v_i|
 *   kept (K):                         sum |p_i|, p_i = v_i pruned by the term's mode (as run_merge_tiles prunes it)
 * Products of two floats are exact in double; the sums are double, in a fixed order (tile by tile, four lanes), so
 * the same blocks give the same bits. Results are added into out (float64, K*K + 2K). */
MULTIVERSION
static void run_moments(const term_t *terms, int k, const void *base, int base_dt, Py_ssize_t n, uint64_t elem_offset,
                        int want_gram, int want_l1, double *out, float *tiles, uint8_t *const *masks) {
    float tmp[TILE];
    Py_ssize_t off, j;
    int i, l;
    for (off = 0; off < n; off += TILE) {
        Py_ssize_t m = n - off < TILE ? n - off : TILE;
        float *bt = tiles + (size_t)k * TILE;
#if HAVE_F16C_PATH
        if (gram_direct(terms, k, base, base_dt, want_gram, want_l1, m)) {
            gram_avx2(tiles, terms, base, base_dt, off, k, m, out);
            continue;
        }
#endif
        if (base) load_tile(bt, base, base_dt, off, m);
        for (i = 0; i < k; i++) {
            float *tt = tiles + (size_t)i * TILE;
            const term_t *t = &terms[i];
            double l1 = 0.0;
#if HAVE_AVX512VL_PATH
            if (dare_fused(t, want_gram, masks, i, elem_offset + (uint64_t)off, m)) {
                uint64_t g0 = elem_offset + (uint64_t)off;
                double kept;
                dare_tile_avx512(t->a, t->a_dt, off, t->b ? bt : NULL, m, g0, t->k0, t->k1, t->p1, masks[i] + (g0 >> 3),
                                 &l1, &kept);
                if (want_l1) out[(size_t)k * k + i] += l1;
                out[(size_t)k * k + k + i] += kept;
                continue;
            }
#endif
#if HAVE_F16C_PATH
            if (dare_fused8(t, want_gram, masks, i, elem_offset + (uint64_t)off, m)) {
                uint64_t g0 = elem_offset + (uint64_t)off;
                double kept;
                dare_tile_avx2(t->a, t->a_dt, off, t->b ? bt : NULL, m, g0, t->k0, t->k1, t->p1, masks[i] + (g0 >> 3),
                               &l1, &kept);
                if (want_l1) out[(size_t)k * k + i] += l1;
                out[(size_t)k * k + k + i] += kept;
                continue;
            }
#endif
            load_tile(tt, t->a, t->a_dt, off, m);
            if (t->b)
                for (j = 0; j < m; j++) tt[j] = tt[j] - bt[j];
            if (want_l1) {
                l1 = sum_abs(tt, m);
                out[(size_t)k * k + i] += l1;
            }
            if (t->mode == PRUNE_NONE) {
                if (want_l1) out[(size_t)k * k + k + i] += l1;
                continue;
            }
            /* |v| where kept, else 0, into tmp (the same keep tests as run_merge_tiles), then summed as above */
            if (t->mode == PRUNE_RANDOM) {
                uint64_t g0 = elem_offset + (uint64_t)off;
                philox_tile(tmp, g0, m, t->k0, t->k1);
                if (masks && masks[i] && (g0 & 7) == 0 && (m & 7) == 0) { /* whole bytes (block, tile starts: x8) */
                    out[(size_t)k * k + k + i] += random_kept(tmp, tt, m, t->p1, masks[i] + (g0 >> 3));
                    continue;
                }
                if (masks && masks[i]) /* the keep bits, for a merge pass that reuses them (PRUNE_BITS) */
                    for (j = 0; j < m; j++)
                        masks[i][(g0 + (uint64_t)j) >> 3] |= (uint8_t)((uint32_t)(tmp[j] < t->p1) << ((g0 + j) & 7));
                out[(size_t)k * k + k + i] += random_kept(tmp, tt, m, t->p1, NULL);
                continue;
            } else if (t->mode == PRUNE_MAGNITUDE) {
                float p1 = t->p1;
                for (j = 0; j < m; j++) tmp[j] = fabsf(tt[j]) >= p1 ? fabsf(tt[j]) : 0.0f;
            } else {
                float p1 = t->p1, p2 = t->p2;
                for (j = 0; j < m; j++) tmp[j] = (fabsf(tt[j]) >= p1 && fabsf(tt[j]) < p2) ? fabsf(tt[j]) : 0.0f;
            }
            out[(size_t)k * k + k + i] += sum_abs(tmp, m);
        }
        if (!want_gram) continue;
#if HAVE_F16C_PATH
        if (k >= 2 && k <= 4 && avx2_ok()) {
            gram_avx2(tiles, NULL, NULL, 0, off, k, m, out);
            continue;
        }
#endif
        for (i = 0; i < k; i++)
            for (l = i; l < k; l++) {
                const float *x = tiles + (size_t)i * TILE, *y = tiles + (size_t)l * TILE;
                double s[4] = {0, 0, 0, 0};
                for (j = 0; j + 4 <= m; j += 4) {
                    s[0] += (double)x[j] * (double)y[j];
                    s[1] += (double)x[j + 1] * (double)y[j + 1];
                    s[2] += (double)x[j + 2] * (double)y[j + 2];
                    s[3] += (double)x[j + 3] * (double)y[j + 3];
                }
                for (; j < m; j++) s[j & 3] += (double)x[j] * (double)y[j];
                out[(size_t)i * k + l] += (s[0] + s[1]) + (s[2] + s[3]);
            }
    }
    for (i = 0; want_gram && i < k; i++)
        for (l = 0; l < i; l++) out[(size_t)i * k + l] = out[(size_t)l * k + i];
}

/* DELLA's keep test without ranks. Entry j of a row of m is kept with probability d - e + 2e r_j / (m - 1), r_j the
 * 0-based rank of |v_j| in its row (ties in index order, NaN above everything), as in mergekit; the draw is x_j,
 * tl.rand's integer of Philox(key, j) before its scaling (in [0, 2^31)): kept where x < xl = ceil((d - e) 2^31); where
 * xl <= x < xh = ceil((d + e) 2^31), kept where |v_j| outranks entry o of the row, o = t + (t >= j) with
 * t = ((x - xl) * rmul) >> 32 and rmul = floor((m - 1) 2^32 / (xh - xl)): an entry drawn uniformly from the m - 1
 * others (to 2^-31), which v_j outranks with probability r_j / (m - 1). A row of one entry: kept where
 * x - xl < (xh - xl) / 2 (probability d). No sort, no histogram: one comparison per entry in the band. */
static inline uint32_t della_key(float v) {
    uint32_t k = f2u(v) & 0x7fffffffu;
    return k > 0x7f800000u ? 0x7fc00000u : k; /* every NaN ranks as one value, above +inf */
}

/* della_row_plain: the keep tests of one row (vr: its v, xr: its folded words) into ur, entries j0 .. m - 1: -1 kept,
 * 1 dropped. */
static void della_row_plain(const float *vr, const uint32_t *xr, float *ur, Py_ssize_t j0, Py_ssize_t m, uint32_t xl,
                            uint32_t xh, uint64_t rmul) {
    Py_ssize_t j;
    for (j = j0; j < m; j++) {
        uint32_t x = xr[j];
        int keep = x < xl;
        if (!keep && x < xh) {
            if (m == 1) {
                keep = x - xl < (xh - xl) / 2;
            } else {
                Py_ssize_t t = (Py_ssize_t)(((uint64_t)(x - xl) * rmul) >> 32), o = t + (t >= j);
                uint32_t kj = della_key(vr[j]), ko = della_key(vr[o]);
                keep = kj > ko || (kj == ko && j > o);
            }
        }
        ur[j] = keep ? -1.0f : 1.0f;
    }
}

#if HAVE_F16C_PATH
/* della_key of eight floats' bits (AVX2). Keys are below 2^31, so signed compares order them. */
static inline __attribute__((always_inline, target("avx2"))) __m256i della_key8(__m256i bits) {
    __m256i k = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
    return _mm256_blendv_epi8(k, _mm256_set1_epi32(0x7fc00000), _mm256_cmpgt_epi32(k, _mm256_set1_epi32(0x7f800000)));
}

/* x < bound, for draws x in [0, 2^31) and a bound in [0, 2^31] given as bound - 1 (a signed compare: all ones where
 * true) */
static inline __attribute__((always_inline, target("avx2"))) __m256i della_below8(__m256i x, __m256i bound1) {
    return _mm256_xor_si256(_mm256_cmpgt_epi32(x, bound1), _mm256_set1_epi32(-1));
}

/* della_partner16 with eight lanes (AVX2): the index o and the index j of each lane are below 2^31, so signed
 * compares serve. */
static inline __attribute__((always_inline, target("avx2"))) __m256i della_partner8(__m256i x, __m256i jv, uint32_t xl,
                                                                                   uint32_t rmul) {
    const __m256i r64 = _mm256_set1_epi64x((long long)rmul);
    __m256i dx = _mm256_sub_epi32(x, _mm256_set1_epi32((int)xl));
    __m256i even = _mm256_mul_epu32(dx, r64), odd = _mm256_mul_epu32(_mm256_srli_epi64(dx, 32), r64);
    __m256i t = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    return _mm256_add_epi32(_mm256_add_epi32(t, _mm256_set1_epi32(1)), _mm256_cmpgt_epi32(jv, t)); /* t + [t >= j] */
}

/* della_outranks16 with eight lanes (AVX2; live and the result all ones where true) */
static inline __attribute__((always_inline, target("avx2"))) __m256i della_outranks8(__m256i live, __m256i kj,
                                                                                    __m256i ko, __m256i jv,
                                                                                    __m256i o) {
    __m256i tie = _mm256_and_si256(_mm256_cmpeq_epi32(kj, ko), _mm256_cmpgt_epi32(jv, o)); /* the later index */
    return _mm256_and_si256(live, _mm256_or_si256(_mm256_cmpgt_epi32(kj, ko), tie));
}

/* della_band16 with eight lanes (AVX2): band and the result are all ones where true. */
static inline __attribute__((always_inline, target("avx2"))) __m256i della_band8(__m256i x, __m256i band, Py_ssize_t j,
                                                                                __m256i kj, const void *src, int keyed,
                                                                                uint32_t xl, uint32_t rmul) {
    const __m256i lanes = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i jv = _mm256_add_epi32(_mm256_set1_epi32((int)j), lanes);
    __m256i o = della_partner8(x, jv, xl, rmul);
    __m256i ko = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)src, o, band, 4);
    if (!keyed) ko = della_key8(ko);
    return della_outranks8(band, kj, ko, jv, o);
}

/* della_row_plain eight entries at a time (m >= 2, rmul < 2^32) by della_band8, the last m % 8 entries by the plain
 * loop */
__attribute__((target("avx2"))) static void della_row_avx2(const float *vr, const uint32_t *xr, float *ur,
                                                           Py_ssize_t m, uint32_t xl, uint32_t xh, uint32_t rmul) {
    const __m256i xl1 = _mm256_set1_epi32((int)(xl - 1)), xh1 = _mm256_set1_epi32((int)(xh - 1));
    const __m256 plus = _mm256_set1_ps(1.0f), minus = _mm256_set1_ps(-1.0f);
    Py_ssize_t j;
    for (j = 0; j + 8 <= m; j += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xr + j)), keep = della_below8(x, xl1);
        __m256i band = _mm256_andnot_si256(keep, della_below8(x, xh1));
        if (!_mm256_testz_si256(band, band)) {
            __m256i kj = della_key8(_mm256_loadu_si256((const __m256i *)(vr + j)));
            keep = _mm256_or_si256(keep, della_band8(x, band, j, kj, vr, 0, xl, rmul));
        }
        _mm256_storeu_ps(ur + j, _mm256_blendv_ps(plus, minus, _mm256_castsi256_ps(keep)));
    }
    della_row_plain(vr, xr, ur, j, m, xl, xh, rmul);
}

/* Room for the fused loops' lists of a row of m: the indices and draws of the band's entries (m + 16 each), their
 * tests' bits in list order and each vector's band and keep masks (m / 16 + 8 each: sixteen-bit masks of the AVX-512
 * loop, or bytes of the AVX2 loop's eight lanes). */
typedef struct {
    uint32_t *j, *x;
    uint16_t *res, *band, *keep;
} della_lists_t;

/* della_fused's passes with AVX2 (bf16, f16 or float32 inputs; m a multiple of 8, g0 too): v = a - b, sum |v| and
 * the keys of |v| into k; the group's Philox integers into x (philox_avx2); then row by row della_fused's listed
 * test on the keys (compact8 lists, eight listed entries a gather, the bits back by rank_lut), sum |v| over the
 * kept ones and the keep bits. The same bits and sums as the generic loops. */
__attribute__((target("avx2,f16c,popcnt"))) static void
della_fused_avx2(const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t b_off, Py_ssize_t start,
                 Py_ssize_t nrows, Py_ssize_t m, uint64_t g0, uint32_t k0, uint32_t k1, uint32_t xl, uint32_t xh,
                 uint32_t rmul, uint32_t *k, uint32_t *x, const della_lists_t *L, uint8_t *bits, double *s1,
                 double *s2) {
    const __m256i xl1 = _mm256_set1_epi32((int)(xl - 1)), xh1 = _mm256_set1_epi32((int)(xh - 1));
    const __m256i lanes = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), one = _mm256_set1_epi32(1);
    const __m256i lanebits = _mm256_set_epi32(128, 64, 32, 16, 8, 4, 2, 1);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256d l1lo = _mm256_loadu_pd(s1), l1hi = _mm256_loadu_pd(s1 + 4);
    __m256d kplo = _mm256_loadu_pd(s2), kphi = _mm256_loadu_pd(s2 + 4);
    uint32_t *lj = L->j, *lx = L->x;
    uint8_t *lres = (uint8_t *)L->res, *lb = (uint8_t *)L->band, *lkeep = (uint8_t *)L->keep;
    Py_ssize_t len = nrows * m, j, r;
    for (j = 0; j < len; j += 8) {
        __m256 v = fast_load(a, a_dt, start + j);
        if (b) v = _mm256_sub_ps(v, fast_load(b, b_dt, b_off + j));
        v = _mm256_and_ps(v, absmask);
        add8_pd(&l1lo, &l1hi, v);
        _mm256_storeu_si256((__m256i *)(k + j), della_key8(_mm256_castps_si256(v)));
    }
    philox_avx2(x, g0, len, k0, k1, 1);
    for (r = 0; r < nrows; r++) {
        const uint32_t *kr = k + r * m, *xr = x + r * m;
        uint8_t *bp = bits + ((g0 + (uint64_t)(r * m)) >> 3);
        Py_ssize_t n = 0, v, p;
        for (j = 0, v = 0; j < m; j += 8, v++) { /* kept, dropped, or in the band (listed) */
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + j)), keep = della_below8(xv, xl1);
            int band = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(keep, della_below8(xv, xh1))));
            compact8(lj + n, _mm256_add_epi32(_mm256_set1_epi32((int)j), lanes), band);
            n += compact8(lx + n, xv, band);
            lb[v] = (uint8_t)band, lkeep[v] = (uint8_t)_mm256_movemask_ps(_mm256_castsi256_ps(keep));
        }
        for (p = 0; p < n; p += 8) { /* the band's tests, eight listed entries a gather */
            __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - p)), lanes);
            __m256i jv = _mm256_loadu_si256((const __m256i *)(lj + p));
            __m256i o = della_partner8(_mm256_loadu_si256((const __m256i *)(lx + p)), jv, xl, rmul);
            __m256i ko = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)kr, o, live, 4);
            __m256i kj = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)kr, jv, live, 4);
            lres[p >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_castsi256_ps(della_outranks8(live, kj, ko, jv, o)));
        }
        memset(lres + ((n + 7) >> 3), 0, 2); /* read below past the list's last bits */
        for (j = 0, v = 0, p = 0; j < m; j += 8, v++) { /* each vector's keep lanes: the band's bits back in place */
            int b = lb[v];
            uint32_t got = ((uint32_t)lres[p >> 3] | (uint32_t)lres[(p >> 3) + 1] << 8) >> (p & 7);
            __m256i kj = _mm256_loadu_si256((const __m256i *)(kr + j));
            __m256i ranks = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)rank_lut[b]));
            __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)got), ranks),
                                                               one), one);
            __m256i k0v = _mm256_and_si256(_mm256_set1_epi32(lkeep[v]), lanebits);
            keep = _mm256_or_si256(keep, _mm256_cmpeq_epi32(k0v, lanebits));
            p += __builtin_popcount((unsigned)b);
            add8_pd(&kplo, &kphi, _mm256_and_ps(_mm256_castsi256_ps(kj), _mm256_castsi256_ps(keep)));
            bp[j >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_castsi256_ps(keep));
        }
    }
    _mm256_storeu_pd(s1, l1lo), _mm256_storeu_pd(s1 + 4, l1hi);
    _mm256_storeu_pd(s2, kplo), _mm256_storeu_pd(s2 + 4, kphi);
}
#endif

#if HAVE_AVX512VL_PATH
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) __m512i della_key16(__m512i bits) {
    __m512i k = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
    return _mm512_mask_mov_epi32(k, _mm512_cmpgt_epu32_mask(k, _mm512_set1_epi32(0x7f800000)),
                                 _mm512_set1_epi32(0x7fc00000));
}

/* The other entry o = t + (t >= j) of lanes j .. j + 15 of a row (x their draws, jv their indices):
 * t = ((x - xl) * rmul) >> 32 from two 32x32->64 products. */
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) __m512i della_partner16(__m512i x, __m512i jv,
                                                                                                 uint32_t xl,
                                                                                                 uint32_t rmul) {
    const __m512i r64 = _mm512_set1_epi64(rmul);
    __m512i dx = _mm512_sub_epi32(x, _mm512_set1_epi32((int)xl));
    __m512i even = _mm512_mul_epu32(dx, r64), odd = _mm512_mul_epu32(_mm512_srli_epi64(dx, 32), r64);
    __m512i t = _mm512_mask_blend_epi32((__mmask16)0xAAAA, _mm512_srli_epi64(even, 32), odd);
    return _mm512_mask_add_epi32(t, _mm512_cmpge_epu32_mask(t, jv), t, _mm512_set1_epi32(1));
}

/* The lanes (of mask live) whose key kj outranks the key ko of their other entry o: greater, or equal with j > o */
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) __mmask16
della_outranks16(__mmask16 live, __m512i kj, __m512i ko, __m512i jv, __m512i o) {
    return live &
           (_mm512_cmpgt_epu32_mask(kj, ko) | (_mm512_cmpeq_epi32_mask(kj, ko) & _mm512_cmpgt_epu32_mask(jv, o)));
}

/* The test of the band's entries among sixteen of a row (lanes j .. j + 15; x their draws, kj their keys): the mask
 * of those that outrank their other entry (della_partner16). src: the row's keys (keyed), else its values
 * (della_key16 taken of the gathered ones). */
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) __mmask16
della_band16(__m512i x, __mmask16 band, Py_ssize_t j, __m512i kj, const void *src, int keyed, uint32_t xl,
             uint32_t rmul) {
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i jv = _mm512_add_epi32(_mm512_set1_epi32((int)j), lanes);
    __m512i o = della_partner16(x, jv, xl, rmul);
    __m512i ko = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), band, o, src, 4);
    if (!keyed) ko = della_key16(ko);
    return della_outranks16(band, kj, ko, jv, o);
}

/* della_row_plain sixteen entries at a time (m >= 2, rmul < 2^32) by della_band16, one gather per vector with an entry
 * in the band: the rows della_fused does not take (f16 inputs, rows not a multiple of 8) */
__attribute__((target("avx512f,avx512vl"))) static void della_row_avx512(const float *vr, const uint32_t *xr,
                                                                        float *ur, Py_ssize_t m, uint32_t xl,
                                                                        uint32_t xh, uint32_t rmul) {
    const __m512i vxl = _mm512_set1_epi32((int)xl), vxh = _mm512_set1_epi32((int)xh);
    const __m512 plus = _mm512_set1_ps(1.0f), minus = _mm512_set1_ps(-1.0f);
    Py_ssize_t j;
    for (j = 0; j < m; j += 16) {
        __mmask16 live = live16(j, m);
        __m512i x = _mm512_maskz_loadu_epi32(live, xr + j);
        __mmask16 keep = _mm512_mask_cmplt_epu32_mask(live, x, vxl);
        __mmask16 band = _mm512_mask_cmplt_epu32_mask((__mmask16)(live & ~keep), x, vxh);
        if (band) {
            keep |= della_band16(x, band, j, della_key16(_mm512_maskz_loadu_epi32(live, vr + j)), vr, 0, xl, rmul);
        }
        _mm512_mask_storeu_ps(ur + j, live, _mm512_mask_blend_ps(keep, plus, minus));
    }
}

/* sum |v| over the kept lanes of sixteen keys (float64 lanes, the low eight before the high eight) and their keep
 * bits, two bytes at bp (one where live is the row's last eight) */
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) void
della_kept16(__m512d *kept, __mmask16 keep, __m512i kj, __mmask16 live, uint8_t *bp) {
    __m256 lo8 = _mm256_castsi256_ps(_mm512_castsi512_si256(kj));
    *kept = _mm512_mask_add_pd(*kept, (__mmask8)keep, *kept, _mm512_cvtps_pd(lo8));
    bp[0] = (uint8_t)keep;
    if (live == 0xffff) {
        __m256 hi8 = _mm256_castsi256_ps(_mm512_extracti64x4_epi64(kj, 1));
        *kept = _mm512_mask_add_pd(*kept, (__mmask8)(keep >> 8), *kept, _mm512_cvtps_pd(hi8));
        bp[1] = (uint8_t)(keep >> 8);
    }
}

/* della_fused: run_della's group (rows r0 .. r0 + nrows of m, m a multiple of 8, elements from start, g0 = elem_offset
 * + start a multiple of 8; b: the base, element b_off + j under element start + j of a (bf16 or float32: the base
 * itself, or its group made float32), or NULL) in two passes with AVX-512, the same bits and sums as the generic
 * loops (NaN sums may differ in payload): v = a - b, sum |v| (eight double lanes, element j into lane j % 8) and
 * the keys of |v| into k (the group's words); then row by row the Philox words made in place and della_row_avx512's
 * test on the keys, sum |v| over the kept ones and the keep bits, a byte per eight elements.
 * The test lists the band's entries of the row first (L) and gathers their other entries' keys sixteen at a time:
 * about a fifth of the gathers of one per vector (AMD's are slow, and nearly every vector has an entry in the band). */
__attribute__((target("avx512f,avx512vl,bmi2,popcnt"))) static void
della_fused(const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t b_off, Py_ssize_t start, Py_ssize_t nrows,
            Py_ssize_t m, uint64_t g0, uint32_t k0, uint32_t k1, uint32_t xl, uint32_t xh, uint32_t rmul, uint32_t *k,
            const della_lists_t *L, uint8_t *bits, double *s1, double *s2) {
    const __m512i vxl = _mm512_set1_epi32((int)xl), vxh = _mm512_set1_epi32((int)xh);
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m512d l1 = _mm512_loadu_pd(s1), kept = _mm512_loadu_pd(s2);
    uint32_t *lj = L->j, *lx = L->x;
    uint16_t *lres = L->res, *lb = L->band, *lkeep = L->keep;
    Py_ssize_t len = nrows * m, j, r;
    philox_keys_t K;
    for (j = 0; j + 16 <= len; j += 16) { /* sixteen at a time: the loop below's values, sums and keys */
        __m512 x;
        if ((j & 31) == 0) prefetch_at(a, a_dt, start + j);
        x = load16_exact(a, a_dt, start + j);
        if (b) x = _mm512_sub_ps(x, load16_exact(b, b_dt, b_off + j));
        x = _mm512_abs_ps(x);
        l1 = _mm512_add_pd(_mm512_add_pd(l1, _mm512_cvtps_pd(_mm512_castps512_ps256(x))),
                           _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
        _mm512_storeu_si512(k + j, della_key16(_mm512_castps_si512(x)));
    }
    for (; j < len; j += 8) {
        __m256 x;
        if ((j & 31) == 0) prefetch_at(a, a_dt, start + j);
        x = load8_exact(a, a_dt, start + j);
        if (b) x = _mm256_sub_ps(x, load8_exact(b, b_dt, b_off + j));
        x = _mm256_and_ps(x, absmask);
        l1 = _mm512_add_pd(l1, _mm512_cvtps_pd(x));
        /* the key of |v| (every NaN one value): its bits as they rank; as a float |v|, or a NaN where v is one */
        _mm256_storeu_si256((__m256i *)(k + j),
                            _mm512_castsi512_si256(della_key16(_mm512_castsi256_si512(_mm256_castps_si256(x)))));
    }
    philox_keys(&K, k0, k1, g0 >> 2, (g0 + (uint64_t)len - 1) >> 2);
    for (r = 0; r < nrows; r++) {
        const uint32_t *kr = k + r * m;
        uint8_t *br = bits + ((g0 + (uint64_t)(r * m)) >> 3);
        uint64_t e0 = g0 + (uint64_t)(r * m);
        Py_ssize_t n = 0, v, p;
        __m512i w[8];
        int nw = 0, at = 0;
        for (j = 0, v = 0; j < m; j += 16, v++) { /* the draws: kept, dropped, or in the band (listed) */
            __mmask16 live = j + 16 <= m ? (__mmask16)0xffff : (__mmask16)0x00ff, keep, band;
            __m512i x, jv = _mm512_add_epi32(_mm512_set1_epi32((int)j), lanes);
            if (at == nw) { /* the next words: 128 elements from four vectors of counters, else 32 (two call sites:
                             * philox_words wants its count a constant) */
                if (m - j >= 128) {
                    nw = 8;
                    philox_words(w, 4, (e0 + (uint64_t)j) >> 2, &K);
                } else {
                    nw = 2;
                    philox_words(w, 1, (e0 + (uint64_t)j) >> 2, &K);
                }
                at = 0;
            }
            x = _mm512_xor_si512(w[at], _mm512_srai_epi32(w[at], 31));
            at++;
            keep = _mm512_mask_cmplt_epu32_mask(live, x, vxl);
            band = _mm512_mask_cmplt_epu32_mask((__mmask16)(live & ~keep), x, vxh);
            _mm512_storeu_si512(lj + n, _mm512_maskz_compress_epi32(band, jv));
            _mm512_storeu_si512(lx + n, _mm512_maskz_compress_epi32(band, x));
            n += __builtin_popcount(band);
            lb[v] = band, lkeep[v] = keep;
        }
        for (p = 0; p < n; p += 16) { /* the band's tests, sixteen listed entries a gather */
            __mmask16 live = live16(p, n);
            __m512i jv = _mm512_loadu_si512(lj + p), o = della_partner16(_mm512_loadu_si512(lx + p), jv, xl, rmul);
            __m512i ko = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, o, kr, 4);
            __m512i kj = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, jv, kr, 4);
            lres[p >> 4] = della_outranks16(live, kj, ko, jv, o);
        }
        memset(lres + ((n + 15) >> 4), 0, 8); /* read below past the list's last bits */
        for (j = 0, v = 0, p = 0; j < m; j += 16, v++) { /* each vector's keep mask: the band's bits back in place */
            __mmask16 live = j + 16 <= m ? (__mmask16)0xffff : (__mmask16)0x00ff;
            uint32_t b = lb[v], c = (uint32_t)__builtin_popcount(b);
            uint64_t got;
            memcpy(&got, (const uint8_t *)lres + (p >> 3), 8);
            p += c;
            della_kept16(&kept, (__mmask16)(lkeep[v] | _pdep_u32((uint32_t)_bzhi_u64(got >> ((p - c) & 7), c), b)),
                         _mm512_maskz_loadu_epi32(live, kr + j), live, br + (j >> 3));
        }
    }
    _mm512_storeu_pd(s1, l1);
    _mm512_storeu_pd(s2, kept);
}

CPU_CHECK(della_lists_ok, 1, __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                              __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt"))
#endif

/* path: 0 the fastest loops this CPU has, 1 AVX2 at most, 2 plain C (native della()'s argument) */
static void della_row(const float *vr, const uint32_t *xr, float *ur, Py_ssize_t m, uint32_t xl, uint32_t xh,
                      uint64_t rmul, int path) {
#if HAVE_AVX512VL_PATH
    if (path == 0 && m >= 2 && rmul <= 0xffffffffu && avx512vl_ok()) {
        della_row_avx512(vr, xr, ur, m, xl, xh, (uint32_t)rmul);
        return;
    }
#endif
#if HAVE_F16C_PATH
    if (path <= 1 && m >= 2 && rmul <= 0xffffffffu && avx2_ok()) {
        della_row_avx2(vr, xr, ur, m, xl, xh, (uint32_t)rmul);
        return;
    }
#endif
    della_row_plain(vr, xr, ur, 0, m, xl, xh, rmul);
}

/* elements start .. start + len - 1 of src (bf16, f16 or float32) into dst as float32, a tile at a time */
static void load_group(float *dst, const void *src, int dt, Py_ssize_t start, Py_ssize_t len) {
    Py_ssize_t off;
    for (off = 0; off < len; off += TILE) load_tile(dst + off, src, dt, start + off, len - off < TILE ? len - off : TILE);
}

/* The group's base made float32 in bt by load_group, once per group (*tiled) */
static void tile_base(float *bt, const void *b, int b_dt, Py_ssize_t start, Py_ssize_t len, int *tiled) {
    if (!*tiled) load_group(bt, b, b_dt, start, len), *tiled = 1;
}

#define DELLA_GROUP 16384 /* entries of v and x made at a time, then decided */

/* One model of a della() call: its vector (bf16, f16 or float32), Philox key, band [xl, xh), keep bits (the
 * tensor's, bit elem_offset + i for element i) and float64 lanes of sum |v| and sum |v| kept. */
typedef struct {
    const void *a;
    int a_dt;
    uint32_t k0, k1, xl, xh;
    uint8_t *bits;
    double s1[8], s2[8];
} della_term_t;

/* della: DELLA's keep bits for rows [0, rows) of m elements of v_i = a_i - b (float32; b may be NULL) for each of the
 * k terms, elements elem_offset .. elem_offset + rows*m of their tensor (elem_offset a multiple of 8), by the test
 * above with each term's bounds xl <= xh (m < 2^31). The base is read once per group of rows for all the terms. Kept
 * bits go to bits[elem_offset / 8 ...]; each term's sum |v| and sum |v| over kept entries go to its eight lanes
 * (float64, element j into lane j % 8, as moments() sums them). */
MULTIVERSION
static int run_della(della_term_t *terms, int k, const void *b, int b_dt, Py_ssize_t rows, Py_ssize_t m,
                     uint64_t elem_offset, int path) {
    /* rows in groups of about DELLA_GROUP entries, decided while v and x are in cache; a group's rows are a multiple
     * of q = 8 / gcd(m, 8), so every group starts at a multiple of 8 (the sums' lanes and the bits' bytes go on) */
    Py_ssize_t low = m & -m, q = 8 / (low < 8 ? low : 8), g = DELLA_GROUP / m, r, r0, r1, j;
    float *v, *u, *bt = NULL;
    uint32_t *x;
    int i;
#if HAVE_F16C_PATH
    della_lists_t L;
    void *room = NULL;
#endif
    g = g > q ? (g + q - 1) / q * q : q;
    g = g < rows ? g : rows;
    v = (float *)malloc((size_t)(g * m) * sizeof(float)), u = (float *)malloc((size_t)(g * m) * sizeof(float));
    x = (uint32_t *)malloc((size_t)(g * m) * sizeof(uint32_t));
    if (b) bt = (float *)malloc((size_t)(g * m) * sizeof(float));
#if HAVE_F16C_PATH
    if (path <= 1 && m % 8 == 0 && avx2_ok()) { /* the fused loops' lists */
        size_t words = (size_t)m + 16, masks = (size_t)m / 16 + 8;
        room = malloc(2 * words * sizeof(uint32_t) + 3 * masks * sizeof(uint16_t));
        if (room) {
            L.j = (uint32_t *)room, L.x = L.j + words;
            L.res = (uint16_t *)(L.x + words), L.band = L.res + masks, L.keep = L.band + masks;
        }
    }
#endif
    if (!v || !u || !x || (b && !bt)) {
        free(v), free(u), free(x), free(bt);
#if HAVE_F16C_PATH
        free(room);
#endif
        return -1;
    }
    for (r0 = 0; r0 < rows; r0 = r1) {
        Py_ssize_t start = r0 * m, len;
        int tiled = 0; /* the group's base in bt */
        r1 = r0 + g < rows ? r0 + g : rows;
        len = r1 * m - start;
        for (i = 0; i < k; i++) {
            della_term_t *t = &terms[i];
            uint64_t rmul = t->xh > t->xl && m > 1 ? ((uint64_t)(m - 1) << 32) / (uint64_t)(t->xh - t->xl) : 0;
#if HAVE_AVX512VL_PATH
            /* the fused AVX-512 passes: whole bytes of bits per row, inputs it loads (the base too, or its tile),
             * the products it makes */
            if (room && path == 0 && rmul <= 0xffffffffu && t->a_dt != DT_F16 && della_lists_ok()) {
                if (b && b_dt == DT_F16) tile_base(bt, b, b_dt, start, len, &tiled); /* the loop reads bf16, f32 */
                della_fused(t->a, t->a_dt, tiled ? (const void *)bt : b, tiled ? DT_F32 : b_dt, tiled ? 0 : start,
                            start, r1 - r0, m, elem_offset + (uint64_t)start, t->k0, t->k1, t->xl, t->xh,
                            (uint32_t)rmul, (uint32_t *)v, &L, t->bits, t->s1, t->s2);
                continue;
            }
#endif
#if HAVE_F16C_PATH
            if (room && rmul <= 0xffffffffu && (t->a_dt != DT_F16 || f16c_ok())) {
                if (b && b_dt == DT_F16 && !f16c_ok()) tile_base(bt, b, b_dt, start, len, &tiled);
                della_fused_avx2(t->a, t->a_dt, tiled ? (const void *)bt : b, tiled ? DT_F32 : b_dt, tiled ? 0 : start,
                                 start, r1 - r0, m, elem_offset + (uint64_t)start, t->k0, t->k1, t->xl, t->xh,
                                 (uint32_t)rmul, (uint32_t *)v, x, &L, t->bits, t->s1, t->s2);
                continue;
            }
#endif
            if (b) tile_base(bt, b, b_dt, start, len, &tiled);
            load_group(v, t->a, t->a_dt, start, len);
            if (bt)
                for (j = 0; j < len; j++) v[j] = v[j] - bt[j];
            philox_run(x, elem_offset + (uint64_t)start, len, t->k0, t->k1, 1, path);
            for (r = 0; r < r1 - r0; r++) della_row(v + r * m, x + r * m, u + r * m, m, t->xl, t->xh, rmul, path);
            sum_abs_acc(v, len, t->s1);
            random_kept_acc(u, v, len, 0.0f, t->bits + ((elem_offset + (uint64_t)start) >> 3), t->s2);
        }
    }
    free(v), free(u), free(x), free(bt);
#if HAVE_F16C_PATH
    free(room);
#endif
    return 0;
}

/* RN(1 / c) where it is within 2^-54 of 1 / c relatively (every c <= 64 but 49), for div_recip4/8; else 0 (divide) */
static double recip_for(double c) {
    double y = 1.0 / c;
    return fabs(fma(y, c, -1.0)) <= 0x1p-54 ? y : 0.0;
}

/* run_sce's divisions, decided once a call: model i's Welford step (count i + 1) takes mean += d * mul[i] where
 * 1 / (i + 1) is exact (a power of two), else d / (i + 1) (by div_recip4/8 with rc[i] where recip_for gives one);
 * var = m2 / k by div_recip with *rk where that is not 0. */
static void sce_steps(int k, double *mul, double *rc, double *rk) {
    int i;
    for (i = 0; i < k; i++) {
        mul[i] = (i & (i + 1)) == 0 ? 1.0 / (double)(i + 1) : 0.0;
        rc[i] = mul[i] != 0.0 ? 0.0 : recip_for((double)(i + 1));
    }
    *rk = recip_for((double)k);
}

/* run_sce's sums of squares: per tile and model, element j of the tile into lane j % SCE_LANES (sixteen independent
 * sums: the fused tile's two registers of eight, no chain of adds in a row), then the lanes added in this order. */
#define SCE_LANES 16
static double sum_lanes16(const double *a) {
    double b[8];
    int l;
    for (l = 0; l < 8; l++) b[l] = a[l] + a[l + 8];
    return sum8_combine(b); /* ((a0 + a8) + (a4 + a12)) + ((a1 + a9) + (a5 + a13)) + ... */
}

#if HAVE_F16C_PATH
CPU_CHECK(fma_ok, 2, __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))

/* d / c rounded to nearest, without a division, where y = RN(1 / c) is within 2^-54 of 1 / c relatively (see
 * recip_for): q = RN(d y) is then within an ulp of d / c, r = d - c q is exact (one FMA), and RN(q + r y) is RN(d / c)
 * (Markstein's theorem), for |q| from 2^-960 (no underflow in r) to the largest finite double. Lanes outside that
 * (0, inf, NaN, tiny: none in a run of finite weights) take the division. */
__attribute__((target("avx2,fma"))) static inline __m256d div_recip4(__m256d d, __m256d c, __m256d y) {
    const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(INT64_MAX));
    __m256d q = _mm256_mul_pd(d, y), q1 = _mm256_fmadd_pd(_mm256_fnmadd_pd(q, c, d), y, q);
    __m256d a = _mm256_and_pd(q, abs_mask);
    __m256d ok = _mm256_and_pd(_mm256_cmp_pd(a, _mm256_set1_pd(INFINITY), _CMP_LT_OQ),
                               _mm256_cmp_pd(a, _mm256_set1_pd(0x1p-960), _CMP_GE_OQ));
    return _mm256_movemask_pd(ok) == 0xF ? q1 : _mm256_blendv_pd(_mm256_div_pd(d, c), q1, ok);
}

/* welford's first 4*floor(m/4) elements in AVX2 (the same IEEE operations, four lanes; the division by cnt as
 * div_recip4 with rcp when that is not 0, see sce_steps); returns where it stopped */
__attribute__((target("avx2,fma"))) static Py_ssize_t welford_avx2(float *t, const float *b, double *mean, double *m2,
                                                                   Py_ssize_t m, double cnt, double mul, double rcp,
                                                                   int first) {
    const __m256d vc = _mm256_set1_pd(cnt), vm = _mm256_set1_pd(mul), vr = _mm256_set1_pd(rcp), z = _mm256_setzero_pd();
    Py_ssize_t j;
    for (j = 0; j + 4 <= m; j += 4) {
        __m128 tf = _mm_sub_ps(_mm_loadu_ps(t + j), _mm_loadu_ps(b + j));
        __m256d x = _mm256_cvtps_pd(tf), mu = first ? z : _mm256_loadu_pd(mean + j), d = _mm256_sub_pd(x, mu);
        _mm_storeu_ps(t + j, tf);
        mu = _mm256_add_pd(mu, mul != 0.0 ? _mm256_mul_pd(d, vm) : rcp != 0.0 ? div_recip4(d, vc, vr)
                                                                               : _mm256_div_pd(d, vc));
        _mm256_storeu_pd(mean + j, mu);
        x = _mm256_mul_pd(d, _mm256_sub_pd(x, mu));
        _mm256_storeu_pd(m2 + j, _mm256_add_pd(first ? z : _mm256_loadu_pd(m2 + j), x));
    }
    return j;
}

/* d[0 .. n) /= c by div_recip4 (n a multiple of 4; recip_for(c) not 0): divide_by's loop */
__attribute__((target("avx2,fma"))) static void divide4(double *d, Py_ssize_t n, double c) {
    const __m256d vc = _mm256_set1_pd(c), vy = _mm256_set1_pd(recip_for(c));
    Py_ssize_t i;
    for (i = 0; i < n; i += 4) _mm256_storeu_pd(d + i, div_recip4(_mm256_loadu_pd(d + i), vc, vy));
}

/* var = (float)(m2 / k) for the first 4*floor(m/4) elements in AVX2 (by div_recip4 with rk when that is not 0, see
 * sce_steps); returns where it stopped */
__attribute__((target("avx2,fma"))) static Py_ssize_t variance_avx2(const double *m2, float *var, Py_ssize_t m,
                                                                    double k, double rk) {
    const __m256d vk = _mm256_set1_pd(k), vr = _mm256_set1_pd(rk);
    Py_ssize_t j;
    for (j = 0; j + 4 <= m; j += 4) {
        __m256d x = _mm256_loadu_pd(m2 + j);
        _mm_storeu_ps(var + j, _mm256_cvtpd_ps(rk != 0.0 ? div_recip4(x, vk, vr) : _mm256_div_pd(x, vk)));
    }
    return j;
}
#endif

/* The rest of run_sce's tile in AVX2 (elements 0 .. 8*floor(m/8)): the count of var != 0, the keep bytes and the
 * masked sums of squares in the scalar loops' order (lane j % SCE_LANES); returns where it stopped. */
__attribute__((target("avx2"))) static Py_ssize_t sce_tile_avx2(const float *var, Py_ssize_t m, float thr,
                                                                uint8_t *bits, const float *tiles, int k,
                                                                double *acc, Py_ssize_t *nnz) {
    const __m256 zero = _mm256_setzero_ps(), vt = _mm256_set1_ps(thr);
    Py_ssize_t j, c = 0;
    int i;
    for (j = 0; j + 8 <= m; j += 8) {
        __m256 v = _mm256_loadu_ps(var + j);
        c += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_UQ)));
        if (bits) bits[j >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(v, vt, _CMP_GE_OQ));
    }
    *nnz += c;
    if (!acc) return j;
    for (i = 0; i < k; i++) { /* element q in lane q % SCE_LANES: four registers of four lanes */
        const float *tt = tiles + (size_t)i * TILE;
        __m256d s[4];
        Py_ssize_t q;
        int g;
        for (g = 0; g < 4; g++) s[g] = _mm256_loadu_pd(acc + SCE_LANES * i + 4 * g);
        for (q = 0; q < j; q += 4) {
            __m256d x = _mm256_cvtps_pd(_mm_loadu_ps(tt + q)), sq = _mm256_mul_pd(x, x);
            if (bits) /* a dropped entry adds 0, even an inf or NaN one */
                sq = _mm256_and_pd(_mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm_castps_si128(
                                       _mm_cmpge_ps(_mm_loadu_ps(var + q), _mm256_castps256_ps128(vt))))),
                                   sq);
            s[(q >> 2) & 3] = _mm256_add_pd(s[(q >> 2) & 3], sq);
        }
        for (g = 0; g < 4; g++) _mm256_storeu_pd(acc + SCE_LANES * i + 4 * g, s[g]);
    }
    return j;
}

/* The keep bits of x[j] >= thr for j in [j0, m) (j0 a multiple of 8; element j at bits[j / 8], bit j % 8): whole
 * bytes written, the last partial one too (its bits past m are 0). NaN is never kept. The portable loop: */
static void set_bits_ge_plain(const float *x, Py_ssize_t j0, Py_ssize_t m, float thr, uint8_t *bits) {
    Py_ssize_t j;
    for (j = j0; j < m; j += 8) {
        uint32_t byte = 0, q;
        for (q = 0; q < 8 && j + (Py_ssize_t)q < m; q++) byte |= (uint32_t)(x[j + q] >= thr) << q;
        bits[j >> 3] = (uint8_t)byte;
    }
}

#if HAVE_F16C_PATH
/* ... and with AVX2: eight compares and a movemask per byte */
__attribute__((target("avx2"))) static void set_bits_ge_avx2(const float *x, Py_ssize_t j0, Py_ssize_t m, float thr,
                                                             uint8_t *bits) {
    const __m256 vt = _mm256_set1_ps(thr);
    Py_ssize_t j;
    for (j = j0; j + 8 <= m; j += 8)
        bits[j >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), vt, _CMP_GE_OQ));
    set_bits_ge_plain(x, j, m, thr, bits);
}
#endif

static void set_bits_ge(const float *x, Py_ssize_t j0, Py_ssize_t m, float thr, uint8_t *bits) {
#if HAVE_F16C_PATH
    if (avx2_ok()) {
        set_bits_ge_avx2(x, j0, m, thr, bits);
        return;
    }
#endif
    set_bits_ge_plain(x, j0, m, thr, bits);
}

/* Scratch of `count` tiles for a kernel call, or NULL with MemoryError set. */
static float *alloc_tiles(size_t count) {
    float *t = (float *)malloc(count * TILE * sizeof(float));
    if (!t) PyErr_NoMemory();
    return t;
}

/* run_sce's list of the entries with lo <= var < thr (the bracket of SCE's threshold, below the bits' own bound):
 * their element index (from the call's first), var and v_i (model i's at tau[i * stride + j]); room for `cap`, and
 * 16 more words each for the vector stores. Once full, `overflow` is set and nothing more is listed. `above` counts
 * the entries whose |var| bit pattern is at least `top` (thr's): var >= thr and every NaN, the level-0 bins above a
 * bracket that ends at thr (see bracket()); with the list, the pass's histogram needs no variance written out. */
typedef struct {
    uint32_t *idx;
    float *var, *tau;
    float lo;
    uint32_t top;
    Py_ssize_t cap, stride, cnt, above;
    int overflow;
} sce_list_t;

#if HAVE_AVX512VL_PATH
/* div_recip4's quotient on eight lanes without its check: run_sce's dividends are NaN, +0 or finite with |d| >= 2^-298
 * (differences of float32 values and their products; see sce_tile_avx512), where q + r y is d / c rounded (+0 for +0),
 * and NaN stays NaN */
static inline __attribute__((always_inline)) AVX512_VLBW __m512d div_recip8(__m512d d, __m512d c, __m512d y) {
    __m512d q = _mm512_mul_pd(d, y);
    return _mm512_fmadd_pd(_mm512_fnmadd_pd(q, c, d), y, q);
}

/* d[0 .. n) /= c by div_recip8 (n a multiple of 8; recip_for(c) not 0): divide_by's loop */
static AVX512_VLBW void divide8(double *d, Py_ssize_t n, double c) {
    const __m512d vc = _mm512_set1_pd(c), vy = _mm512_set1_pd(recip_for(c));
    Py_ssize_t i;
    for (i = 0; i < n; i += 8) _mm512_storeu_pd(d + i, div_recip8(_mm512_loadu_pd(d + i), vc, vy));
}

/* The first `lanes` of sixteen elements (from element i) of a bf16, fp16 or float32 input as float32, zeros after */
static inline __attribute__((always_inline)) AVX512_VLBW __m512 load16_z(const void *src, int dt, Py_ssize_t i,
                                                                        __mmask16 lanes) {
    if (dt == DT_F32) return _mm512_maskz_loadu_ps(lanes, (const float *)src + i);
    __m256i h = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)src + i);
    if (dt == DT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* Lane half (0: elements 0-7, 1: 8-15) of sixteen floats as doubles */
static inline __attribute__((always_inline)) AVX512_VLBW __m512d half_pd(__m512 v, int half) {
    return _mm512_cvtps_pd(half ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))
                                : _mm512_castps512_ps256(v));
}

/* One tile of run_sce (elements off .. off+m-1; not the sums-alone form) fused in AVX-512: sixteen elements at a time,
 * each model's v = a - base and its float64 Welford step in registers (mul, rc, rk: sce_steps), then the variance, the
 * count, var_out, the keep bits and the sums of squares. The same operations on the same values as the tile loops
 * (welford, variance, sce_tile_avx2 and the scalar tails), and the sums in their order (element j in lane
 * j % SCE_LANES): the same bits, but for NaN payloads. The divisions by a non-power of two are div_recip8's: the
 * Welford step's d = x - mean is finite or NaN but where x or mean is inf, and there m2 turns NaN in the same step
 * either way (inf * (inf - inf)); mean and m2 start at +0 and are sums with +0, never -0; m2 of float32 values cannot
 * overflow. */
static inline __attribute__((always_inline)) AVX512_VLBW Py_ssize_t
sce_tile_k(const term_t *terms, const int k, const void *base, int base_dt, Py_ssize_t off, Py_ssize_t m,
           float *var_out, float thr, uint8_t *bits, double *sums, const double *rc, double rk, sce_list_t *list) {
    __m512 tv[MAX_VECTORS];
    __m512d acc[MAX_VECTORS][2]; /* lanes 0-7 and 8-15 of SCE_LANES */
    const __m512d z = _mm512_setzero_pd(), vk = _mm512_set1_pd((double)k);
    const __m512 vt = _mm512_set1_ps(thr);
    Py_ssize_t j, nnz = 0;
    int i, h;
    for (i = 0; sums && i < k; i++) acc[i][0] = acc[i][1] = z;
    for (j = 0; j < m; j += 16) {
        const __mmask16 lanes = live16(j, m);
        const __m512 bv = load16_z(base, base_dt, off + j, lanes);
        __m512d mean[2] = {z, z}, m2[2] = {z, z};
        __m512 var;
        __mmask16 keep;
        for (i = 0; i < k; i++) {
            const __m512 t = _mm512_sub_ps(load16_z(terms[i].a, terms[i].a_dt, off + j, lanes), bv);
            const __m512d cnt = _mm512_set1_pd((double)(i + 1));
            tv[i] = t;
            for (h = 0; h < 2; h++) {
                __m512d x = half_pd(t, h), mu = i == 0 ? z : mean[h], d = _mm512_sub_pd(x, mu);
                /* sce_steps' choice: times 1 / (i + 1) where that is exact, else the division */
                mu = _mm512_add_pd(mu, (i & (i + 1)) == 0 ? _mm512_mul_pd(d, _mm512_set1_pd(1.0 / (double)(i + 1)))
                                   : rc[i] != 0.0          ? div_recip8(d, cnt, _mm512_set1_pd(rc[i]))
                                                           : _mm512_div_pd(d, cnt));
                mean[h] = mu;
                m2[h] = _mm512_add_pd(i == 0 ? z : m2[h], _mm512_mul_pd(d, _mm512_sub_pd(x, mu)));
            }
        }
        for (h = 0; h < 2; h++)
            m2[h] = rk != 0.0 ? div_recip8(m2[h], vk, _mm512_set1_pd(rk)) : _mm512_div_pd(m2[h], vk);
        var = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm512_cvtpd_ps(m2[0]))),
                                                  _mm256_castps_pd(_mm512_cvtpd_ps(m2[1])), 1));
        nnz += __builtin_popcount(_mm512_mask_cmp_ps_mask(lanes, var, _mm512_setzero_ps(), _CMP_NEQ_UQ));
        if (var_out) _mm512_mask_storeu_ps(var_out + off + j, lanes, var);
        keep = _mm512_mask_cmp_ps_mask(lanes, var, vt, _CMP_GE_OQ);
        if (bits) {
            uint8_t *o = bits + ((off + j) >> 3);
            o[0] = (uint8_t)keep;
            if (m - j > 8) o[1] = (uint8_t)(keep >> 8);
        }
        if (list) {
            const __m512i pat = _mm512_and_si512(_mm512_castps_si512(var), _mm512_set1_epi32(0x7FFFFFFF)),
                          top = _mm512_set1_epi32((int)list->top);
            list->above += __builtin_popcount(_mm512_mask_cmpge_epu32_mask(lanes, pat, top));
        }
        if (list && !list->overflow) { /* lo <= var < thr (not NaN), packed to the front and stored whole */
            const __mmask16 mid = _mm512_mask_cmp_ps_mask(lanes, var, _mm512_set1_ps(list->lo), _CMP_GE_OQ) & ~keep;
            const int c = __builtin_popcount(mid);
            if (c && list->cnt + c > list->cap) list->overflow = 1;
            else if (c) {
                const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                const __m512i ix = _mm512_add_epi32(_mm512_set1_epi32((int)(off + j)), lane);
                _mm512_storeu_si512(list->idx + list->cnt, _mm512_maskz_compress_epi32(mid, ix));
                _mm512_storeu_ps(list->var + list->cnt, _mm512_maskz_compress_ps(mid, var));
                for (i = 0; i < k; i++)
                    _mm512_storeu_ps(list->tau + (size_t)i * list->stride + list->cnt,
                                     _mm512_maskz_compress_ps(mid, tv[i]));
                list->cnt += c;
            }
        }
        if (!sums) continue;
        for (i = 0; i < k; i++) {
            const __m512 t = tv[i];
            /* acc += x * x, the FMA rounding as the product and the sum would (x * x is exact in float64); a dropped
             * entry adds nothing, even an inf or NaN one, nor does a lane past m (its v is 0) */
            for (h = 0; h < 2; h++) {
                const __m512d x = half_pd(t, h);
                acc[i][h] = bits ? _mm512_mask3_fmadd_pd(x, x, acc[i][h], (__mmask8)(keep >> (8 * h)))
                                 : _mm512_fmadd_pd(x, x, acc[i][h]);
            }
        }
    }
    for (i = 0; sums && i < k; i++) {
        double a[SCE_LANES];
        _mm512_storeu_pd(a, acc[i][0]), _mm512_storeu_pd(a + 8, acc[i][1]);
        sums[i] += sum_lanes16(a);
    }
    return nnz;
}

/* sce_tile_k with the model count a constant (two to four models: each model's step unrolled, the sums and task
 * vectors in registers), else as a variable */
#define SCE_TILE_ARGS                                                                                                  \
    const term_t *terms, int k, const void *base, int base_dt, Py_ssize_t off, Py_ssize_t m, float *var_out,          \
        float thr, uint8_t *bits, double *sums, const double *rc, double rk, sce_list_t *list
#define SCE_TILE_CALL(K) sce_tile_k(terms, K, base, base_dt, off, m, var_out, thr, bits, sums, rc, rk, list)
static AVX512_VLBW Py_ssize_t sce_tile_avx512_2(SCE_TILE_ARGS) { return (void)k, SCE_TILE_CALL(2); }
static AVX512_VLBW Py_ssize_t sce_tile_avx512_3(SCE_TILE_ARGS) { return (void)k, SCE_TILE_CALL(3); }
static AVX512_VLBW Py_ssize_t sce_tile_avx512_4(SCE_TILE_ARGS) { return (void)k, SCE_TILE_CALL(4); }
static AVX512_VLBW Py_ssize_t sce_tile_avx512_n(SCE_TILE_ARGS) { return SCE_TILE_CALL(k); }
#endif

#if HAVE_F16C_PATH
/* sce_tile_k with AVX2 (tiles of a multiple of 8 elements): eight elements at a time, each model's v = a - base and
 * its float64 Welford step in registers (welford_avx2's operations), the variance (variance_avx2's), the count,
 * var_out, the keep bits, the list (compacted through compact_lut) and the sums of squares (sce_tile_avx2's: element
 * j in lane j % SCE_LANES, a dropped entry adding +0): the same bits as the tile loops. */
static inline __attribute__((always_inline, target("avx2,fma,f16c,popcnt"))) Py_ssize_t
sce_tile8_k(const term_t *terms, const int k, const void *base, int base_dt, Py_ssize_t off, Py_ssize_t m,
            float *var_out, float thr, uint8_t *bits, double *sums, const double *mul, const double *rc, double rk,
            sce_list_t *list) {
    __m256 tv[MAX_VECTORS];
    __m256d acc[MAX_VECTORS][4]; /* lanes 0-3, 4-7, 8-11, 12-15 of SCE_LANES */
    const __m256d z = _mm256_setzero_pd(), vk = _mm256_set1_pd((double)k), vrk = _mm256_set1_pd(rk);
    const __m256 vt = _mm256_set1_ps(thr), zero = _mm256_setzero_ps();
    Py_ssize_t j, nnz = 0;
    int i, h;
    for (i = 0; sums && i < k; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = z;
    for (j = 0; j < m; j += 8) {
        const __m256 bv = fast_load(base, base_dt, off + j);
        const int g = (int)((j >> 2) & 3); /* the lane group of elements j .. j + 3 */
        __m256d mean[2] = {z, z}, m2[2] = {z, z};
        __m256 var, keep;
        for (i = 0; i < k; i++) {
            const __m256 t = _mm256_sub_ps(fast_load(terms[i].a, terms[i].a_dt, off + j), bv);
            const __m256d cnt = _mm256_set1_pd((double)(i + 1));
            tv[i] = t;
            for (h = 0; h < 2; h++) {
                __m256d x = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(t, 1) : _mm256_castps256_ps128(t));
                __m256d mu = i == 0 ? z : mean[h], d = _mm256_sub_pd(x, mu);
                mu = _mm256_add_pd(mu, mul[i] != 0.0  ? _mm256_mul_pd(d, _mm256_set1_pd(mul[i]))
                                       : rc[i] != 0.0 ? div_recip4(d, cnt, _mm256_set1_pd(rc[i]))
                                                      : _mm256_div_pd(d, cnt));
                mean[h] = mu;
                m2[h] = _mm256_add_pd(i == 0 ? z : m2[h], _mm256_mul_pd(d, _mm256_sub_pd(x, mu)));
            }
        }
        for (h = 0; h < 2; h++) m2[h] = rk != 0.0 ? div_recip4(m2[h], vk, vrk) : _mm256_div_pd(m2[h], vk);
        var = _mm256_set_m128(_mm256_cvtpd_ps(m2[1]), _mm256_cvtpd_ps(m2[0]));
        nnz += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(var, zero, _CMP_NEQ_UQ)));
        if (var_out) _mm256_storeu_ps(var_out + off + j, var);
        keep = _mm256_cmp_ps(var, vt, _CMP_GE_OQ);
        if (bits) bits[(off + j) >> 3] = (uint8_t)_mm256_movemask_ps(keep);
        if (list) {
            const __m256i pat = _mm256_and_si256(_mm256_castps_si256(var), _mm256_set1_epi32(0x7FFFFFFF));
            const __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)list->top), pat); /* both < 2^31 */
            list->above += 8 - __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(below)));
        }
        if (list && !list->overflow) { /* lo <= var < thr (not NaN), compacted to the front and stored whole */
            const int mid = _mm256_movemask_ps(_mm256_andnot_ps(keep, _mm256_cmp_ps(var, _mm256_set1_ps(list->lo),
                                                                                    _CMP_GE_OQ)));
            const int c = __builtin_popcount((unsigned)mid);
            if (c && list->cnt + c > list->cap) list->overflow = 1;
            else if (c) {
                const __m256i ix = _mm256_add_epi32(_mm256_set1_epi32((int)(off + j)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                compact8(list->idx + list->cnt, ix, mid);
                compact8((uint32_t *)list->var + list->cnt, _mm256_castps_si256(var), mid);
                for (i = 0; i < k; i++)
                    compact8((uint32_t *)list->tau + (size_t)i * list->stride + list->cnt, _mm256_castps_si256(tv[i]),
                             mid);
                list->cnt += c;
            }
        }
        if (!sums) continue;
        for (i = 0; i < k; i++)
            for (h = 0; h < 2; h++) {
                const __m128 t4 = h ? _mm256_extractf128_ps(tv[i], 1) : _mm256_castps256_ps128(tv[i]);
                const __m256d x = _mm256_cvtps_pd(t4);
                __m256d sq = _mm256_mul_pd(x, x);
                if (bits) {
                    const __m128 k4 = h ? _mm256_extractf128_ps(keep, 1) : _mm256_castps256_ps128(keep);
                    sq = _mm256_and_pd(_mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm_castps_si128(k4))), sq);
                }
                acc[i][g + h] = _mm256_add_pd(acc[i][g + h], sq);
            }
    }
    for (i = 0; sums && i < k; i++) {
        double a[SCE_LANES];
        for (h = 0; h < 4; h++) _mm256_storeu_pd(a + 4 * h, acc[i][h]);
        sums[i] += sum_lanes16(a);
    }
    return nnz;
}

#define SCE_TILE8_ARGS                                                                                                 \
    const term_t *terms, int k, const void *base, int base_dt, Py_ssize_t off, Py_ssize_t m, float *var_out,          \
        float thr, uint8_t *bits, double *sums, const double *mul, const double *rc, double rk, sce_list_t *list
#define SCE_TILE8_CALL(K) sce_tile8_k(terms, K, base, base_dt, off, m, var_out, thr, bits, sums, mul, rc, rk, list)
__attribute__((target("avx2,fma,f16c,popcnt"))) static Py_ssize_t sce_tile_avx2_2(SCE_TILE8_ARGS) {
    return (void)k, SCE_TILE8_CALL(2);
}
__attribute__((target("avx2,fma,f16c,popcnt"))) static Py_ssize_t sce_tile_avx2_3(SCE_TILE8_ARGS) {
    return (void)k, SCE_TILE8_CALL(3);
}
__attribute__((target("avx2,fma,f16c,popcnt"))) static Py_ssize_t sce_tile_avx2_n(SCE_TILE8_ARGS) {
    return SCE_TILE8_CALL(k);
}
#endif

/* One Welford step of run_sce over a tile: t -= b, then the float64 update with x = t (mul: 1 / cnt when that is
 * exact, a power of two; else 0 and a division, rc: see sce_steps). The first step (first != 0) takes mean and m2 as
 * 0.0 without reading them: the same operations on the same values, no zeroing pass. */
static inline __attribute__((always_inline)) void welford(float *restrict t, const float *restrict b,
                                                          double *restrict mean, double *restrict m2, Py_ssize_t m,
                                                          double cnt, double mul, double rc, int first) {
    Py_ssize_t j = 0, j0;
#if HAVE_F16C_PATH
    if (fma_ok()) {
        j = welford_avx2(t, b, mean, m2, m, cnt, mul, rc, first);
        if (j == m) return;
    }
#endif
    j0 = j;
    for (j = j0; j < m; j++) t[j] = t[j] - b[j];
    if (first)
        for (j = j0; j < m; j++) mean[j] = m2[j] = 0.0;
    if (mul != 0.0)
        for (j = j0; j < m; j++) {
            double x = (double)t[j], d = x - mean[j];
            mean[j] = mean[j] + d * mul;
            m2[j] = m2[j] + d * (x - mean[j]);
        }
    else
        for (j = j0; j < m; j++) {
            double x = (double)t[j], d = x - mean[j];
            mean[j] = mean[j] + d / cnt;
            m2[j] = m2[j] + d * (x - mean[j]);
        }
}

/* sce: SCE's statistics over elements [0, n) of the K task vectors v_i = a_i - base (float32):
 * var = the population variance over i of v_i, Welford's update in float64 (mean += d / i; m2 += d * (x - mean);
 * var = m2 / K) rounded to float32 — torch.var(unbiased=False)'s steps on the CPU, the same bits — written to
 * var_out when not NULL; returns the count of var != 0 (NaN included). With sums (K float64): sums[i] += sum v_i^2
 * (float64, exact products) over every element, or, with bits, over the elements where var >= thr, whose bits are
 * set (bits[(elem_offset + j) / 8], elem_offset a multiple of 8). */
MULTIVERSION
static Py_ssize_t run_sce(const term_t *terms, int k, const void *base, int base_dt, Py_ssize_t n, float *var_out,
                          float thr, uint8_t *bits, double *sums, float *tiles, int want_count, sce_list_t *list) {
    double mean[TILE], m2[TILE], acc[SCE_LANES * MAX_VECTORS], mul[MAX_VECTORS], rc[MAX_VECTORS], rk;
    float *bt = tiles + (size_t)k * TILE, var[TILE];
    Py_ssize_t off, j, q, nnz = 0;
    int i;
    sce_steps(k, mul, rc, &rk);
#if HAVE_AVX512VL_PATH
    const int fused = use_fast == 1 && avx512vlbw_ok() && (want_count || var_out || bits);
    Py_ssize_t (*tile)(SCE_TILE_ARGS) = k == 2   ? sce_tile_avx512_2
                                        : k == 3 ? sce_tile_avx512_3
                                        : k == 4 ? sce_tile_avx512_4
                                                 : sce_tile_avx512_n;
#else
    const int fused = 0;
#endif
#if HAVE_F16C_PATH
    /* the AVX2 tile where AVX-512 has none (f16 inputs need F16C), tiles of a multiple of 8 elements */
    const int fused8 = use_fast && !fused && avx2_ok() && fma_ok() && f16c_ok() && (want_count || var_out || bits);
    Py_ssize_t (*tile8)(SCE_TILE8_ARGS) = k == 2 ? sce_tile_avx2_2 : k == 3 ? sce_tile_avx2_3 : sce_tile_avx2_n;
#endif
    for (off = 0; off < n; off += TILE) {
        Py_ssize_t m = n - off < TILE ? n - off : TILE;
#if HAVE_AVX512VL_PATH
        if (fused) {
            nnz += tile(terms, k, base, base_dt, off, m, var_out, thr, bits, sums, rc, rk, list);
            continue;
        }
#endif
#if HAVE_F16C_PATH
        if (fused8 && (m & 7) == 0) {
            nnz += tile8(terms, k, base, base_dt, off, m, var_out, thr, bits, sums, mul, rc, rk, list);
            continue;
        }
#endif
        load_tile(bt, base, base_dt, off, m);
        if (!want_count && !var_out && !bits) { /* the sums alone (no selection): no variance, in the same order */
            for (i = 0; sums && i < k; i++) {
                float *tt = tiles + (size_t)i * TILE;
                double s[SCE_LANES] = {0.0};
                load_tile(tt, terms[i].a, terms[i].a_dt, off, m);
                for (j = 0; j < m; j++) {
                    double x = (double)(tt[j] - bt[j]);
                    s[j & (SCE_LANES - 1)] += x * x;
                }
                sums[i] += sum_lanes16(s);
            }
            continue;
        }
        for (i = 0; i < k; i++) {
            float *tt = tiles + (size_t)i * TILE;
            load_tile(tt, terms[i].a, terms[i].a_dt, off, m);
            welford(tt, bt, mean, m2, m, (double)(i + 1), mul[i], rc[i], i == 0);
        }
        j = 0;
#if HAVE_F16C_PATH
        if (fma_ok()) j = variance_avx2(m2, var, m, (double)k, rk);
#endif
        for (; j < m; j++) var[j] = (float)(m2[j] / (double)k);
        if (var_out) memcpy(var_out + off, var, (size_t)m * sizeof(float));
        /* the count, the keep bits (off and the block's offset are multiples of 8) and the sums of squares over the
         * kept entries (a dropped one adds 0, even where v is inf or NaN), four lanes per model */
        for (i = 0; sums && i < SCE_LANES * k; i++) acc[i] = 0.0;
        j = 0;
#if HAVE_F16C_PATH
        if (avx2_ok()) j = sce_tile_avx2(var, m, thr, bits ? bits + (off >> 3) : NULL, tiles, k, sums ? acc : NULL, &nnz);
#endif
        for (q = j; q < m; q++) nnz += var[q] != 0.0f;
        if (bits) set_bits_ge(var, j, m, thr, bits + (off >> 3)); /* the tail the vector loop left */
        for (q = 0; list && q < m; q++) list->above += (f2u(var[q]) & 0x7FFFFFFFu) >= list->top;
        for (q = 0; list && q < m; q++)
            if (var[q] >= list->lo && !(var[q] >= thr) && !list->overflow) {
                if (list->cnt == list->cap) {
                    list->overflow = 1;
                    break;
                }
                list->idx[list->cnt] = (uint32_t)(off + q), list->var[list->cnt] = var[q];
                for (i = 0; i < k; i++) list->tau[(size_t)i * list->stride + list->cnt] = tiles[(size_t)i * TILE + q];
                list->cnt++;
            }
        if (!sums) continue;
        for (i = 0; i < k; i++) {
            const float *tt = tiles + (size_t)i * TILE;
            double *s = acc + SCE_LANES * i;
            for (q = j; q < m; q++) {
                double x = (double)tt[q];
                s[q & (SCE_LANES - 1)] += bits && !(var[q] >= thr) ? 0.0 : x * x;
            }
            sums[i] += sum_lanes16(s);
        }
    }
    return nnz;
}

/* Run stmt with the GIL released where the call covers at least NOGIL_MIN elements; a shorter one keeps it: giving
 * the GIL up for a microsecond's work costs more than the work, and taking it back can wait out another thread's
 * switch interval (the bracket's sample pieces, small tensors). */
#define NOGIL_MIN ((Py_ssize_t)1 << 15)
#define NOGIL_IF(n, stmt)                                                                                              \
    do {                                                                                                               \
        if ((n) >= NOGIL_MIN) {                                                                                        \
            Py_BEGIN_ALLOW_THREADS stmt;                                                                               \
            Py_END_ALLOW_THREADS                                                                                       \
        } else {                                                                                                       \
            stmt;                                                                                                      \
        }                                                                                                              \
    } while (0)

/* sce(models, base, base_dt, n, elem_offset, var_out, thr, bits, sums[, count[, lo, idx, var, tau]]) -> count of
 * var != 0; see run_sce. models: a sequence of (buffer, dtype); var_out, bits and sums may be None. count false, with
 * neither var_out nor bits: the sums alone (no variance is computed; returns 0). With lo and the three list buffers
 * (uint32 idx and float32 var of cap + 16 words, float32 tau of k rows of stride = its length / k words, with sums):
 * the entries with lo <= var < thr are listed too (sce_list_t), and the result is (count, listed, above), listed = -1
 * when they did not fit, above: the entries with |var|'s bit pattern at least thr's (var >= thr, and NaN). */
static PyObject *native_sce(PyObject *self, PyObject *args) {
    PyObject *models_o, *var_o, *bits_o, *sums_o, *sv = NULL, *li_o = NULL, *lv_o = NULL, *lt_o = NULL;
    Py_buffer base, ab[MAX_VECTORS], vb, bb, sb, lb[3];
    sce_list_t list = {0}, *lp = NULL;
    double lo = 0.0;
    int nl = 0;
    term_t terms[MAX_VECTORS];
    int base_dt, k = 0, i, ok = 1, has_v = 0, has_bits = 0, has_s = 0, want_count = 1;
    Py_ssize_t n, nnz = 0;
    unsigned long long offset;
    double thr;
    float *tiles = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oy*inKOdOO|pdOOO", &models_o, &base, &base_dt, &n, &offset, &var_o, &thr, &bits_o,
                          &sums_o, &want_count, &lo, &li_o, &lv_o, &lt_o))
        return NULL;
    sv = PySequence_Fast(models_o, "models must be a sequence");
    if (!sv) ok = 0;
    if (ok && (PySequence_Fast_GET_SIZE(sv) < 1 || PySequence_Fast_GET_SIZE(sv) > MAX_VECTORS)) {
        PyErr_SetString(PyExc_ValueError, "sce: 1 to 64 models");
        ok = 0;
    }
    if (ok && (n < 0 || (offset & 7))) {
        PyErr_SetString(PyExc_ValueError, "sce: n >= 0 and an offset that is a multiple of 8");
        ok = 0;
    }
    ok = ok && check_dt(base_dt) && check_len(&base, base_dt, n, "base");
    for (i = 0; ok && i < PySequence_Fast_GET_SIZE(sv); i++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sv, i), "y*i", &ab[i], &terms[i].a_dt)) {
            ok = 0;
            break;
        }
        k++;
        terms[i].a = ab[i].buf;
        ok = check_dt(terms[i].a_dt) && check_len(&ab[i], terms[i].a_dt, n, "model");
    }
    if (ok && var_o != Py_None) {
        if (PyObject_GetBuffer(var_o, &vb, PyBUF_WRITABLE) < 0) ok = 0;
        else {
            has_v = 1;
            ok = check_len(&vb, DT_F32, n, "variance");
        }
    }
    if (ok && bits_o != Py_None) {
        if (PyObject_GetBuffer(bits_o, &bb, PyBUF_WRITABLE) < 0) ok = 0;
        else if ((has_bits = 1) && bb.len < (Py_ssize_t)((offset + (uint64_t)n + 7) >> 3)) {
            PyErr_SetString(PyExc_ValueError, "a mask buffer is shorter than the tensor's bits");
            ok = 0;
        }
    }
    if (ok && sums_o != Py_None) {
        if (PyObject_GetBuffer(sums_o, &sb, PyBUF_WRITABLE) < 0) ok = 0;
        else if ((has_s = 1) && sb.len < (Py_ssize_t)(k * sizeof(double))) {
            PyErr_SetString(PyExc_ValueError, "sce: one float64 sum per model");
            ok = 0;
        }
    }
    if (ok && has_bits && !has_s) {
        PyErr_SetString(PyExc_ValueError, "sce: keep bits come with the sums");
        ok = 0;
    }
    if (ok && lt_o) {
        PyObject *lo_bufs[3] = {li_o, lv_o, lt_o};
        for (; ok && nl < 3; nl++)
            if (PyObject_GetBuffer(lo_bufs[nl], &lb[nl], PyBUF_WRITABLE) < 0) ok = 0;
        if (ok) {
            list.idx = (uint32_t *)lb[0].buf, list.var = (float *)lb[1].buf, list.tau = (float *)lb[2].buf;
            list.lo = (float)lo, list.top = f2u((float)thr) & 0x7FFFFFFFu;
            list.cap = lb[0].len / 4 - 16, list.stride = lb[2].len / 4 / k, lp = &list;
        }
        if (ok && (list.cap < 0 || lb[1].len / 4 - 16 < list.cap || list.stride < list.cap + 16 || !has_s)) {
            PyErr_SetString(PyExc_ValueError, "sce: list buffers of cap + 16 words (tau: k rows), with the sums");
            ok = 0;
        }
    }
    if (ok && !(tiles = alloc_tiles((size_t)k + 1))) ok = 0;
    if (ok) {
        NOGIL_IF(n, nnz = run_sce(terms, k, base.buf, base_dt, n, has_v ? (float *)vb.buf : NULL, (float)thr,
                                  has_bits ? (uint8_t *)bb.buf + (offset >> 3) : NULL,
                                  has_s ? (double *)sb.buf : NULL, tiles, want_count, lp));
    }
    free(tiles);
    for (i = 0; i < k; i++) PyBuffer_Release(&ab[i]);
    PyBuffer_Release(&base);
    if (has_v) PyBuffer_Release(&vb);
    if (has_bits) PyBuffer_Release(&bb);
    if (has_s) PyBuffer_Release(&sb);
    while (nl > 0) PyBuffer_Release(&lb[--nl]);
    Py_XDECREF(sv);
    if (!ok) return NULL;
    if (lp) return Py_BuildValue("nnn", nnz, list.overflow ? (Py_ssize_t)-1 : list.cnt, list.above);
    return PyLong_FromSsize_t(nnz);
}

typedef struct { /* importance()'s band: the entries with lo <= I < thr, their indices and values */
    float lo;
    uint64_t *idx;
    float *val;
    Py_ssize_t cap, n; /* n counts past cap: the caller sees that the buffers were too small */
} band_t;

/* The loop of importance() below (see there): returns how many I < 0. */
MULTIVERSION
static Py_ssize_t run_importance(const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t n, uint64_t offset,
                                 Py_ssize_t m, const float *sc, float th, float *o, int part, uint8_t *bt,
                                 band_t *band) {
    float ta[TILE], tb[TILE];
    Py_ssize_t off, j, neg = 0;
    for (off = 0; off < n; off += TILE) {
        Py_ssize_t t = n - off < TILE ? n - off : TILE, j0 = 0;
        uint64_t g = offset + (uint64_t)off, row = g / (uint64_t)m;
        load_tile(ta, a, a_dt, off, t);
        load_tile(tb, b, b_dt, off, t);
        while (j0 < t) { /* one row's run of the tile at a time: a constant scale (the loop vectorizes) */
            Py_ssize_t j1 = j0 + (Py_ssize_t)((uint64_t)m - (g + (uint64_t)j0) % (uint64_t)m);
            float f = sc[row++];
            if (j1 > t) j1 = t;
            for (j = j0; j < j1; j++) ta[j] = fabsf(ta[j] - tb[j]) * f;
            j0 = j1;
        }
        for (j = 0; j < t; j++) neg += ta[j] < 0.0f;
        if (o && part == 0)
            memcpy(o + off, ta, (size_t)t * sizeof(float));
        else if (o && part == 1)
            for (j = 0; j < t; j++) o[off + j] = ta[j] < 0.0f ? 0.0f : ta[j];
        else if (o)
            for (j = 0; j < t; j++) o[off + j] = ta[j] < 0.0f ? -ta[j] : 0.0f;
        if (bt) set_bits_ge(ta, 0, t, th, bt + (off >> 3)); /* off is a multiple of 8 (TILE is) */
        if (band) {
            int any = 0; /* most tiles hold no band entry: a vector test first */
            for (j = 0; j < t; j++) any |= (ta[j] >= band->lo) & (ta[j] < th);
            for (j = 0; any && j < t; j++)
                if (ta[j] >= band->lo && ta[j] < th) {
                    if (band->n < band->cap) {
                        band->idx[band->n] = offset + (uint64_t)(off + j);
                        band->val[band->n] = ta[j];
                    }
                    band->n++;
                }
        }
    }
    return neg;
}

/* arcee_fusion's rows' KL divergence: KL = sum p log(p/q), p = softmax(a) + 1e-8, q = softmax(b) + 1e-8 over a row
 * of m (float32 values, the sums in double). Two passes: the row's maxima, minima and max|d|, then its moments: one
 * exp per entry where max|d| <= KL_SERIES_D (kl_by_series), else two (kl_by_moments); no log or division per entry.
 * A row whose moments do not settle its KL to within 2^-10 (mergekit's 1e-8 not small next to every p and q), or that
 * holds a NaN or an inf, takes a third pass of p, q and p log(p/q). exp and log are
 * Cephes' float polynomials, evaluated with the same fused multiply-adds in every form (fmaf in plain C: one rounding,
 * as the FMA instruction; a CPU without FMA takes libm's slower exact one), so the plain C loops below, the AVX2 and
 * the AVX-512 ones give the same bits: element j of a row goes into lane j % 8 of each float64 sum, the lanes added in
 * one fixed order (sum8_combine), a row's entries past m read as -inf (exp 0; a term p log(p/q) = 1e-8 log 1 = 0). A
 * NaN anywhere in a row makes its KL a NaN (one value: 0x7fc00000), as an inf does (inf - inf). */
#define KL_EXP_LO (-87.0f) /* exp of anything below: 0 (the true value is below 2^-125, nothing next to 1e-8) */
#define KL_EPS 1e-8f       /* mergekit's epsilon, added to the float32 softmaxes */
#define KL_MOMENTS_TOL (1.0 / 1024) /* the moments settle a KL whose left-out terms are at most this part of it */
static const float KL_EXP_P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, /* Cephes expf */
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
static const float KL_LOG_P[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f, /* Cephes logf */
                                  -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                                  2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};

static inline float kl_exp1(float x) { /* x <= 0 or NaN (x - the row's max) */
    float n, r, y;
    int i;
    if (!(x >= KL_EXP_LO)) return x != x ? x : 0.0f;
    n = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
    r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    y = KL_EXP_P[0];
    for (i = 1; i < 6; i++) y = fmaf(y, r, KL_EXP_P[i]);
    y = fmaf(y, r * r, r) + 1.0f;
    return y * u2f((uint32_t)((int32_t)n + 127) << 23);
}

static inline float kl_log1(float t) { /* t > 0 normal, or NaN */
    uint32_t u = f2u(t);
    float m = u2f((u & 0x007fffffu) | 0x3f000000u), x, z, y, e;
    int32_t ei = (int32_t)((u >> 23) & 0xffu) - 126;
    int i;
    if (m < 0.707106781186547524f) {
        ei -= 1;
        x = m + m - 1.0f;
    } else {
        x = m - 1.0f;
    }
    z = x * x;
    y = KL_LOG_P[0];
    for (i = 1; i < 9; i++) y = fmaf(y, x, KL_LOG_P[i]);
    y = y * x * z;
    e = (float)ei;
    y = fmaf(e, -2.12194440e-4f, y);
    y = fmaf(-0.5f, z, y);
    x = x + y;
    x = fmaf(e, 0.693359375f, x);
    return t != t ? t : x;
}

static inline float kl_load1(const void *src, int dt, Py_ssize_t i) {
    if (dt == DT_F32) return ((const float *)src)[i];
    if (dt == DT_BF16) return u2f((uint32_t)((const uint16_t *)src)[i] << 16);
    return f16_to_f32(((const uint16_t *)src)[i]);
}

static inline float kl_e1(const void *src, int dt, Py_ssize_t i, float mx) {
    return kl_exp1(kl_load1(src, dt, i) - mx);
}

static inline float kl_nan(float kl) { return kl != kl ? u2f(0x7fc00000u) : kl; }

/* The largest of n lanes of a row's maxima, taken in lane order (every form of the KL reduces its lanes so) */
static inline float kl_lanes_max(const float *l, int n) {
    float mx = l[0];
    int i;
    for (i = 1; i < n; i++) mx = mx > l[i] ? mx : l[i];
    return mx;
}

static inline float kl_lanes_min(const float *l, int n) {
    float mn = l[0];
    int i;
    for (i = 1; i < n; i++) mn = mn < l[i] ? mn : l[i];
    return mn;
}

/* A row's KL from its moments. With d_j = a_j - b_j and the softmaxes without 1e-8, log(p_j / q_j) = d_j - D exactly,
 * D = LSE(a) - LSE(b) = (ma - mb) + log(sa / sb) (ma, mb the maxima, sa, sb the sums of exp(x - max)), so
 * sum p log(p/q) = t / sa - D, t = sum exp(a_j - ma) d_j. The 1e-8 (e) added to p and q adds -e/2 sum (d_j - D)^2
 * = -e/2 (v - 2 D u + m D^2) (u = sum d, v = sum d^2) to first order in e/p. What is left, next to the KL
 * = sum p (L - 1 + exp(-L)) (L = d - D), is at most about e/p (|L| exp|L| / 3 + e/p) in each term, so below
 * A (R exp(R) + A) of it, with A = e/p_min = e sa exp(ma - min a) (or q's) and R = 2 max|d| >= |L| (D lies between
 * the least and the greatest d). Where that is at most KL_MOMENTS_TOL, *kl is set and 1 returned; else 0 (also for a
 * row with a NaN or an inf: a sum is NaN or a bound inf). d is exact in float64 (a row shifted by a constant has KL
 * 0). No cancellation of two rounded sums: the float32 exps' rounding leaves ~1e-9 absolute in D, where the three
 * passes' 1/sum, rounded to float32, leaves 6e-8 relative in every p: a few percent of a KL of ~1e-6. */
static int kl_settle(double sa, double sb, double mu, double d, double u, double v, Py_ssize_t m, float ma, float mb,
                     float mina, float minb, float dmax, float *kl) { /* mu = t / sa, d = D: the rest as above */
    const double e = (double)KL_EPS, r = 2.0 * (double)dmax, w = r * exp(r);
    double ba = e * sa * exp((double)ma - (double)mina), bb = e * sb * exp((double)mb - (double)minb);
    if (!(ba * (w + ba) <= KL_MOMENTS_TOL && bb * (w + bb) <= KL_MOMENTS_TOL)) return 0;
    *kl = (float)(mu - d - 0.5 * e * (v - 2.0 * d * u + (double)m * d * d));
    return 1;
}

static int kl_by_moments(double sa, double sb, double t, double u, double v, Py_ssize_t m, float ma, float mb,
                         float mina, float minb, float dmax, float *kl) {
    return kl_settle(sa, sb, t / sa, ((double)ma - (double)mb) + log(sa / sb), u, v, m, ma, mb, mina, minb, dmax, kl);
}

/* Rows whose changes are small (max|d| <= KL_SERIES_D, checked in the first pass) take the moments from one exp per
 * entry. With p = softmax(a) and d = a - b, q_j = p_j exp(-d_j) / E, E = E_p[exp(-d)], so the KL without the 1e-8 is
 * E_p[d] + log E = mu + log1p(gamma - mu): mu = t / sa (t = sum exp(a_j - ma) d_j) and gamma = G / sa with
 * G = sum exp(a_j - ma) g_j, g = exp(-d) - 1 + d = d^2 (1/2 - d/6 + ... + d^6/8!), a float polynomial (left out: at
 * most 2 max|d|^7 / 9! of g, 4e-8). No exp of b and no cancellation of two rounded sums: the error in mu moves the KL
 * by it times mu, the float32 roundings of exp(a - ma) cancel to first order, and g's own is a few ulps of a term of
 * the KL's size, so rows like a finetune's come within 1e-7 of a float64 evaluation (the two-exp moments: a few
 * 1e-3). For the same reason the five sums (sa, t, G, u, v) take float32 lanes over blocks of KL_SERIES_BLOCK entries
 * (element j into lane j % 16; products by fused multiply-adds), each block's lanes then added into the float64 lanes
 * (lanes k and k + 8 into lane k, as add16_pd): a block's relative rounding, ~1e-6, moves the KL by as much of itself
 * at most (measured: nothing next to g's), and the conversions to float64 were most of the loop's time. A row shifted
 * by a constant c within rounding is the exception: g's rounding, ~1e-7 c^2, can outweigh its KL and round it below
 * 0, as the two-exp moments' ~1e-9 did for more rows. sb, D, the 1e-8's first-order term and the bound on what is
 * left out as kl_by_moments has them, with sb = sa E exp(ma - mb), D = -log E. */
#define KL_SERIES_D 0.5f
#define KL_SERIES_BLOCK 256 /* entries of a row summed in float32 lanes (element j into lane j % 16), then float64 */
static const float KL_G_P[7] = {1.0f / 40320, -1.0f / 5040, 1.0f / 720, -1.0f / 120, 1.0f / 24, -1.0f / 6, 0.5f};

static inline float kl_g1(float d) { /* exp(-d) - 1 + d, |d| <= KL_SERIES_D */
    float y = KL_G_P[0];
    int i;
    for (i = 1; i < 7; i++) y = fmaf(y, d, KL_G_P[i]);
    return (d * d) * y;
}

/* kl_settle from the series' sums (sa, t, G, u, v); *sb set to the base's sum of exp(b - mb) either way */
static int kl_by_series(double sa, double t, double g, double u, double v, Py_ssize_t m, float ma, float mb, float mina,
                        float minb, float dmax, float *kl, double *sb) {
    double mu = t / sa, l = log1p(g / sa - mu); /* l = log E = -D */
    *sb = sa * exp(l + ((double)ma - (double)mb));
    return kl_settle(sa, *sb, mu, -l, u, v, m, ma, mb, mina, minb, dmax, kl);
}

/* The KL of the row of m at a + off, b + off in plain C */
static float kl_row_plain(const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t off, Py_ssize_t m) {
    float mxa[8], mxb[8], ma, mb, mina = INFINITY, minb = INFINITY, dmax = 0.0f, ra, rb, got;
    double sa[8] = {0}, sb[8] = {0}, t[8] = {0}, u[8] = {0}, v[8] = {0}, kl[8] = {0}, gs[8] = {0};
    Py_ssize_t j;
    int l;
    for (l = 0; l < 8; l++) mxa[l] = mxb[l] = -INFINITY;
    for (j = 0; j < m; j++) { /* maxps(lane, x): the lane where it is greater, else x */
        float x = kl_load1(a, a_dt, off + j), y = kl_load1(b, b_dt, off + j);
        mxa[j & 7] = mxa[j & 7] > x ? mxa[j & 7] : x;
        mxb[j & 7] = mxb[j & 7] > y ? mxb[j & 7] : y;
        mina = x < mina ? x : mina, minb = y < minb ? y : minb;
        dmax = fabsf(x - y) > dmax ? fabsf(x - y) : dmax;
    }
    ma = kl_lanes_max(mxa, 8), mb = kl_lanes_max(mxb, 8);
    if (dmax <= KL_SERIES_D) { /* the series' moments: one exp per entry */
        double sb1;
        double *to[5] = {sa, t, gs, u, v};
        for (j = 0; j < m;) { /* blocks of KL_SERIES_BLOCK: float32 lanes of sum x, x d, x g, d, d^2 */
            float f[5][16] = {{0}};
            Py_ssize_t e = j + KL_SERIES_BLOCK < m ? j + KL_SERIES_BLOCK : m;
            int q;
            for (; j < e; j++) {
                float xa = kl_load1(a, a_dt, off + j), x = kl_exp1(xa - ma), d = xa - kl_load1(b, b_dt, off + j);
                int k = (int)(j & 15);
                f[0][k] += x, f[1][k] = fmaf(x, d, f[1][k]), f[2][k] = fmaf(x, kl_g1(d), f[2][k]);
                f[3][k] += d, f[4][k] = fmaf(d, d, f[4][k]);
            }
            for (q = 0; q < 5; q++) /* the lanes into float64: low eight, then high eight */
                for (l = 0; l < 8; l++) to[q][l] = (to[q][l] + (double)f[q][l]) + (double)f[q][l + 8];
        }
        if (kl_by_series(sum8_combine(sa), sum8_combine(t), sum8_combine(gs), sum8_combine(u), sum8_combine(v), m, ma,
                         mb, mina, minb, dmax, &got, &sb1))
            return got;
        ra = (float)(1.0 / sum8_combine(sa)), rb = (float)(1.0 / sb1);
        goto third;
    }
    for (j = 0; j < m; j++) { /* the moments */
        float xa = kl_load1(a, a_dt, off + j), xb = kl_load1(b, b_dt, off + j), x = kl_exp1(xa - ma);
        float y = kl_exp1(xb - mb);
        double d = (double)xa - (double)xb;
        l = (int)(j & 7);
        sa[l] += (double)x, sb[l] += (double)y;
        t[l] += (double)x * d, u[l] += d, v[l] += d * d;
    }
    if (kl_by_moments(sum8_combine(sa), sum8_combine(sb), sum8_combine(t), sum8_combine(u), sum8_combine(v), m, ma, mb,
                      mina, minb, dmax, &got))
        return got;
    ra = (float)(1.0 / sum8_combine(sa)), rb = (float)(1.0 / sum8_combine(sb));
third:
    for (j = 0; j < m; j++) { /* (the other forms' padding adds +0: a lane's sum, from +0, is never -0) */
        float x = kl_e1(a, a_dt, off + j, ma), y = kl_e1(b, b_dt, off + j, mb);
        float p = x * ra + KL_EPS, q = y * rb + KL_EPS;
        kl[j & 7] += (double)(p * kl_log1(p / q));
    }
    return kl_nan((float)sum8_combine(kl));
}

#if HAVE_F16C_PATH
/* exp(x) for lanes at or above KL_EXP_LO, or NaN (a NaN stays one): Cephes' polynomial y times 2^n */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256 kl_exp8_in(__m256 x) {
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r, y;
    __m256i e;
    int i;
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    y = _mm256_set1_ps(KL_EXP_P[0]);
    for (i = 1; i < 6; i++) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(KL_EXP_P[i]));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* exp(x) of any lanes: below KL_EXP_LO 0, a NaN itself */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256 kl_exp8(__m256 x) {
    __m256 s = _mm256_and_ps(kl_exp8_in(x), _mm256_cmp_ps(x, _mm256_set1_ps(KL_EXP_LO), _CMP_GE_OQ)); /* below: 0 */
    return _mm256_blendv_ps(s, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));                                  /* NaN: x */
}

static inline __attribute__((always_inline, target("avx2,fma"))) __m256 kl_log8(__m256 t) {
    __m256i u = _mm256_castps_si256(t);
    __m256 m = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
    __m256i ei = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 23), _mm256_set1_epi32(0xff)),
                                  _mm256_set1_epi32(126));
    __m256 lt = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ), x, z, y, e;
    int i;
    ei = _mm256_add_epi32(ei, _mm256_castps_si256(lt)); /* -1 where m < sqrt(1/2) */
    x = _mm256_sub_ps(_mm256_blendv_ps(m, _mm256_add_ps(m, m), lt), _mm256_set1_ps(1.0f));
    z = _mm256_mul_ps(x, x);
    y = _mm256_set1_ps(KL_LOG_P[0]);
    for (i = 1; i < 9; i++) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(KL_LOG_P[i]));
    y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
    e = _mm256_cvtepi32_ps(ei);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fmadd_ps(_mm256_set1_ps(-0.5f), z, y);
    x = _mm256_add_ps(x, y);
    x = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), x);
    return _mm256_blendv_ps(x, t, _mm256_cmp_ps(t, t, _CMP_UNORD_Q));
}

static inline __attribute__((always_inline, target("avx2,fma"))) __m256 kl_g8(__m256 d) { /* kl_g1 */
    __m256 y = _mm256_set1_ps(KL_G_P[0]);
    int i;
    for (i = 1; i < 7; i++) y = _mm256_fmadd_ps(y, d, _mm256_set1_ps(KL_G_P[i]));
    return _mm256_mul_ps(_mm256_mul_ps(d, d), y);
}

/* kl_sums16's eight */
static inline __attribute__((always_inline, target("avx2,fma"))) void kl_sums8(__m256 *f, __m256 x, __m256 d) {
    f[0] = _mm256_add_ps(f[0], x), f[1] = _mm256_fmadd_ps(x, d, f[1]), f[2] = _mm256_fmadd_ps(x, kl_g8(d), f[2]);
    f[3] = _mm256_add_ps(f[3], d), f[4] = _mm256_fmadd_ps(d, d, f[4]);
}

/* eight entries of a row from j (the last m % 8 padded with -inf) */
static inline __attribute__((always_inline, target("avx2,f16c"))) __m256 kl_load8(const void *src, int dt,
                                                                                   Py_ssize_t off, Py_ssize_t j,
                                                                                   Py_ssize_t m) {
    float t[8];
    int l;
    if (j + 8 <= m) return fast_load(src, dt, off + j);
    for (l = 0; l < 8; l++) t[l] = j + l < m ? kl_load1(src, dt, off + j + l) : -INFINITY;
    return _mm256_loadu_ps(t);
}

/* exp(x - mx) of eight entries of a row from j (padding: 0) */
static inline __attribute__((always_inline, target("avx2,fma,f16c"))) __m256 kl_e8(const void *src, int dt,
                                                                                   Py_ssize_t off, Py_ssize_t j,
                                                                                   Py_ssize_t m, float mx) {
    return kl_exp8(_mm256_sub_ps(kl_load8(src, dt, off, j, m), _mm256_set1_ps(mx)));
}

/* lanes k .. 7 of eight: the padding of a row's last eight entries from j (k = m - j < 8) */
static inline __attribute__((always_inline, target("avx2"))) __m256 kl_pad8(Py_ssize_t k) {
    return _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)k), _CMP_GE_OQ);
}

/* kl_row_plain with AVX2: the same bits */
__attribute__((target("avx2,fma,f16c"))) static float kl_row_avx2(const void *a, int a_dt, const void *b, int b_dt,
                                                              Py_ssize_t off, Py_ssize_t m) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY), pinf = _mm256_set1_ps(INFINITY), tiny = _mm256_set1_ps(KL_EPS);
    __m256 mxa = ninf, mxb = ninf, mna = pinf, mnb = pinf, zero = _mm256_setzero_ps(), dm = zero, va, vb, ra, rb;
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256d sal = _mm256_setzero_pd(), sah = sal, sbl = sal, sbh = sal, tl = sal, th = sal, ul = sal, uh = sal;
    __m256d vl = sal, vh = sal, kl = sal, kh = sal, gl = sal, gh = sal;
    float la[8], lb[8], ma, mb, mina, minb, dmax, got;
    Py_ssize_t j;
    for (j = 0; j < m; j += 8) {
        __m256 x = kl_load8(a, a_dt, off, j, m), y = kl_load8(b, b_dt, off, j, m);
        mxa = _mm256_max_ps(mxa, x), mxb = _mm256_max_ps(mxb, y);
        dm = _mm256_max_ps(_mm256_and_ps(_mm256_sub_ps(x, y), nosign), dm); /* the padding's NaN: dm */
        if (j + 8 > m) { /* the padding out of the minima */
            __m256 pad = kl_pad8(m - j);
            x = _mm256_blendv_ps(x, pinf, pad), y = _mm256_blendv_ps(y, pinf, pad);
        }
        mna = _mm256_min_ps(x, mna), mnb = _mm256_min_ps(y, mnb);
    }
    _mm256_storeu_ps(la, mxa), _mm256_storeu_ps(lb, mxb);
    ma = kl_lanes_max(la, 8), mb = kl_lanes_max(lb, 8);
    va = _mm256_set1_ps(ma), vb = _mm256_set1_ps(mb);
    {
        float ln[8], lm[8], ld[8];
        _mm256_storeu_ps(ln, mna), _mm256_storeu_ps(lm, mnb), _mm256_storeu_ps(ld, dm);
        mina = kl_lanes_min(ln, 8), minb = kl_lanes_min(lm, 8), dmax = kl_lanes_max(ld, 8);
    }
    if (dmax <= KL_SERIES_D) { /* the series' moments (kl_by_series) */
        double sb1;
        Py_ssize_t in = mina - ma >= KL_EXP_LO ? m & ~(Py_ssize_t)15 : 0; /* entries taken sixteen at a time */
        for (j = 0; j < m;) { /* blocks of KL_SERIES_BLOCK: float32 lanes f[h] of elements j % 16 in 8h .. 8h+7 */
            __m256 f[2][5];
            Py_ssize_t e = j + KL_SERIES_BLOCK < m ? j + KL_SERIES_BLOCK : m;
            int q, h;
            for (q = 0; q < 5; q++) f[0][q] = f[1][q] = zero;
            if (j + 16 <= e && j + 16 <= in) { /* the loop below sixteen at a time, without padding nor exp's bounds */
                __m256 f0[5] = {zero, zero, zero, zero, zero}, f1[5] = {zero, zero, zero, zero, zero};
                for (; j + 16 <= e && j + 16 <= in; j += 16) {
                    __m256 xa = fast_load(a, a_dt, off + j), xa1 = fast_load(a, a_dt, off + j + 8);
                    kl_sums8(f0, kl_exp8_in(_mm256_sub_ps(xa, va)), _mm256_sub_ps(xa, fast_load(b, b_dt, off + j)));
                    kl_sums8(f1, kl_exp8_in(_mm256_sub_ps(xa1, va)),
                             _mm256_sub_ps(xa1, fast_load(b, b_dt, off + j + 8)));
                }
                for (q = 0; q < 5; q++) f[0][q] = f0[q], f[1][q] = f1[q];
            }
            for (; j < e; j += 8) {
                __m256 xa = kl_load8(a, a_dt, off, j, m), x = kl_exp8(_mm256_sub_ps(xa, va));
                __m256 d = _mm256_sub_ps(xa, kl_load8(b, b_dt, off, j, m));
                if (j + 8 > m) d = _mm256_blendv_ps(d, zero, kl_pad8(m - j)); /* the padding's d (NaN): 0 */
                kl_sums8(f[(j >> 3) & 1], x, d);
            }
            for (h = 0; h < 2; h++) { /* low eight, then high eight */
                add8_pd(&sal, &sah, f[h][0]), add8_pd(&tl, &th, f[h][1]), add8_pd(&gl, &gh, f[h][2]);
                add8_pd(&ul, &uh, f[h][3]), add8_pd(&vl, &vh, f[h][4]);
            }
        }
        if (kl_by_series(sum8_pd(sal, sah), sum8_pd(tl, th), sum8_pd(gl, gh), sum8_pd(ul, uh), sum8_pd(vl, vh), m,
                         ma, mb, mina, minb, dmax, &got, &sb1))
            return got;
        ra = _mm256_set1_ps((float)(1.0 / sum8_pd(sal, sah))), rb = _mm256_set1_ps((float)(1.0 / sb1));
        goto third;
    }
    for (j = 0; j < m; j += 8) {
        __m256 xa = kl_load8(a, a_dt, off, j, m), xb = kl_load8(b, b_dt, off, j, m);
        __m256 x = kl_exp8(_mm256_sub_ps(xa, va)), y = kl_exp8(_mm256_sub_ps(xb, vb));
        __m256d xl = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), xh = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
        __m256d dl, dh;
        if (j + 8 > m) { /* the padding's d: 0 */
            __m256 pad = kl_pad8(m - j);
            xa = _mm256_blendv_ps(xa, zero, pad), xb = _mm256_blendv_ps(xb, zero, pad);
        }
        dl = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xa)), _mm256_cvtps_pd(_mm256_castps256_ps128(xb)));
        dh = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xa, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(xb, 1)));
        sal = _mm256_add_pd(sal, xl), sah = _mm256_add_pd(sah, xh);
        add8_pd(&sbl, &sbh, y);
        tl = _mm256_add_pd(tl, _mm256_mul_pd(xl, dl)), th = _mm256_add_pd(th, _mm256_mul_pd(xh, dh));
        ul = _mm256_add_pd(ul, dl), uh = _mm256_add_pd(uh, dh);
        vl = _mm256_add_pd(vl, _mm256_mul_pd(dl, dl)), vh = _mm256_add_pd(vh, _mm256_mul_pd(dh, dh));
    }
    if (kl_by_moments(sum8_pd(sal, sah), sum8_pd(sbl, sbh), sum8_pd(tl, th), sum8_pd(ul, uh), sum8_pd(vl, vh), m, ma,
                      mb, mina, minb, dmax, &got))
        return got;
    ra = _mm256_set1_ps((float)(1.0 / sum8_pd(sal, sah)));
    rb = _mm256_set1_ps((float)(1.0 / sum8_pd(sbl, sbh)));
third:
    for (j = 0; j < m; j += 8) {
        __m256 x = kl_e8(a, a_dt, off, j, m, ma), y = kl_e8(b, b_dt, off, j, m, mb);
        __m256 p = _mm256_add_ps(_mm256_mul_ps(x, ra), tiny), q = _mm256_add_ps(_mm256_mul_ps(y, rb), tiny);
        add8_pd(&kl, &kh, _mm256_mul_ps(p, kl_log8(_mm256_div_ps(p, q))));
    }
    return kl_nan((float)sum8_pd(kl, kh));
}
#endif

#if HAVE_AVX512VL_PATH
/* The same with sixteen lanes (AVX-512F/VL/BW): the same operations on each element, masks for the blends, and the
 * same float64 lanes (the low eight of sixteen added before the high eight, element j into lane j % 8): the same
 * bits. A row's entries past m read as -inf, and add 0 to every sum, as the AVX2 form's padding does. */
#define AVX512_KL __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma,f16c")))
/* kl_exp8_in's sixteen: 2^n by scalef (exact for such x, as the product with 2^n's bits) */
static inline __attribute__((always_inline)) AVX512_KL __m512 kl_exp16_in(__m512 x) {
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r, y;
    int i;
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    y = _mm512_set1_ps(KL_EXP_P[0]);
    for (i = 1; i < 6; i++) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(KL_EXP_P[i]));
    y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* kl_exp8's sixteen */
static inline __attribute__((always_inline)) AVX512_KL __m512 kl_exp16(__m512 x) {
    __m512 s = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(KL_EXP_LO), _CMP_GE_OQ), kl_exp16_in(x));
    return _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x); /* below: 0; NaN: x */
}

/* sixteen entries of a row from j, all inside it */
static inline __attribute__((always_inline)) AVX512_KL __m512 kl_load16_in(const void *src, int dt, Py_ssize_t off,
                                                                            Py_ssize_t j) {
    return load16_z(src, dt, off + j, (__mmask16)0xffff);
}

/* kl_row_avx512's first pass over the sixteen entries at a + i and b + i (live: those in the row, the rest read as
 * -inf): r = the lanes' maxima of a and of b, their minima, and max |a - b| */
static inline __attribute__((always_inline)) AVX512_KL void kl_first16(const void *a, int a_dt, const void *b,
                                                                      int b_dt, Py_ssize_t i, __mmask16 live,
                                                                      __m512 *r) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 x = _mm512_mask_mov_ps(ninf, live, load16_z(a, a_dt, i, live));
    __m512 y = _mm512_mask_mov_ps(ninf, live, load16_z(b, b_dt, i, live));
    prefetch_at(a, a_dt, i), prefetch_at(b, b_dt, i);
    r[0] = _mm512_max_ps(r[0], x), r[1] = _mm512_max_ps(r[1], y);
    r[2] = _mm512_mask_min_ps(r[2], live, x, r[2]), r[3] = _mm512_mask_min_ps(r[3], live, y, r[3]);
    r[4] = _mm512_mask_max_ps(r[4], live, _mm512_abs_ps(_mm512_sub_ps(x, y)), r[4]);
}

static inline __attribute__((always_inline)) AVX512_KL __m512 kl_log16(__m512 t) {
    __m512i u = _mm512_castps_si512(t);
    __m512 m = _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_and_si512(u, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f000000)));
    __m512i ei = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 23), _mm512_set1_epi32(0xff)),
                                  _mm512_set1_epi32(126));
    __mmask16 lt = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    __m512 x, z, y, e;
    int i;
    ei = _mm512_mask_sub_epi32(ei, lt, ei, _mm512_set1_epi32(1));
    x = _mm512_sub_ps(_mm512_mask_add_ps(m, lt, m, m), _mm512_set1_ps(1.0f));
    z = _mm512_mul_ps(x, x);
    y = _mm512_set1_ps(KL_LOG_P[0]);
    for (i = 1; i < 9; i++) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(KL_LOG_P[i]));
    y = _mm512_mul_ps(_mm512_mul_ps(y, x), z);
    e = _mm512_cvtepi32_ps(ei);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fmadd_ps(_mm512_set1_ps(-0.5f), z, y);
    x = _mm512_add_ps(x, y);
    x = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), x);
    return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q), t);
}

static inline __attribute__((always_inline)) AVX512_KL __m512 kl_g16(__m512 d) { /* kl_g1 */
    __m512 y = _mm512_set1_ps(KL_G_P[0]);
    int i;
    for (i = 1; i < 7; i++) y = _mm512_fmadd_ps(y, d, _mm512_set1_ps(KL_G_P[i]));
    return _mm512_mul_ps(_mm512_mul_ps(d, d), y);
}

/* the series' five float32 lanes (sums of x, x d, x g, d, d^2) take sixteen entries' x = exp(a - max a), d = a - b */
static inline __attribute__((always_inline)) AVX512_KL void kl_sums16(__m512 *f, __m512 x, __m512 d) {
    f[0] = _mm512_add_ps(f[0], x), f[1] = _mm512_fmadd_ps(x, d, f[1]), f[2] = _mm512_fmadd_ps(x, kl_g16(d), f[2]);
    f[3] = _mm512_add_ps(f[3], d), f[4] = _mm512_fmadd_ps(d, d, f[4]);
}

/* sixteen entries of a row from j (those past m: -inf) */
static inline __attribute__((always_inline)) AVX512_KL __m512 kl_load16(const void *src, int dt, Py_ssize_t off,
                                                                         Py_ssize_t j, Py_ssize_t m) {
    __mmask16 live = live16(j, m);
    return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, load16_z(src, dt, off + j, live));
}

/* exp(x - mx) of sixteen entries of a row from j (past m: 0) */
static inline __attribute__((always_inline)) AVX512_KL __m512 kl_e16(const void *src, int dt, Py_ssize_t off,
                                                                      Py_ssize_t j, Py_ssize_t m, float mx) {
    return kl_exp16(_mm512_sub_ps(kl_load16(src, dt, off, j, m), _mm512_set1_ps(mx)));
}

/* v's sixteen elements into the eight float64 lanes of s: the low eight, then the high eight */
static inline __attribute__((always_inline)) AVX512_KL __m512d add16_pd(__m512d s, __m512 v) {
    return _mm512_add_pd(_mm512_add_pd(s, half_pd(v, 0)), half_pd(v, 1));
}

static inline __attribute__((always_inline)) AVX512_KL double sum16_pd(__m512d s) {
    double l[8];
    _mm512_storeu_pd(l, s);
    return sum8_combine(l);
}

/* kl_row_plain with AVX-512: the same bits */
AVX512_KL static float kl_row_avx512(const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t off, Py_ssize_t m) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY), pinf = _mm512_set1_ps(INFINITY), tiny = _mm512_set1_ps(KL_EPS);
    __m512 r[5] = {ninf, ninf, pinf, pinf, _mm512_setzero_ps()}, va, vb, ra, rb; /* the first pass's lanes */
    __m512d sa = _mm512_setzero_pd(), sb = sa, t = sa, u = sa, v = sa, kl = sa, gs = sa;
    float la[16], lb[16], ma, mb, mina, minb, dmax, got;
    Py_ssize_t j, whole = m & ~(Py_ssize_t)15; /* entries in whole vectors */
    for (j = 0; j < whole; j += 16) kl_first16(a, a_dt, b, b_dt, off + j, (__mmask16)0xffff, r);
    for (; j < m; j += 16) kl_first16(a, a_dt, b, b_dt, off + j, live16(j, m), r);
    _mm512_storeu_ps(la, r[0]), _mm512_storeu_ps(lb, r[1]);
    ma = kl_lanes_max(la, 16), mb = kl_lanes_max(lb, 16);
    va = _mm512_set1_ps(ma), vb = _mm512_set1_ps(mb);
    {
        float ln[16], lm[16], ld[16];
        _mm512_storeu_ps(ln, r[2]), _mm512_storeu_ps(lm, r[3]), _mm512_storeu_ps(ld, r[4]);
        mina = kl_lanes_min(ln, 16), minb = kl_lanes_min(lm, 16), dmax = kl_lanes_max(ld, 16);
    }
    if (dmax <= KL_SERIES_D) { /* the series' moments (kl_by_series) */
        double sb1;
        Py_ssize_t in = mina - ma >= KL_EXP_LO ? whole : 0; /* entries whose exp needs no bounds (kl_exp16_in) */
        for (j = 0; j < m;) { /* blocks of KL_SERIES_BLOCK in float32 lanes, then float64 (add16_pd) */
            __m512 f[5] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                           _mm512_setzero_ps()};
            Py_ssize_t e = j + KL_SERIES_BLOCK < m ? j + KL_SERIES_BLOCK : m;
            for (; j < e && j < in; j += 16) { /* the loop below, without masks nor bounds */
                __m512 xa = kl_load16_in(a, a_dt, off, j);
                kl_sums16(f, kl_exp16_in(_mm512_sub_ps(xa, va)), _mm512_sub_ps(xa, kl_load16_in(b, b_dt, off, j)));
            }
            for (; j < e; j += 16) {
                __m512 xa = kl_load16(a, a_dt, off, j, m), xb = kl_load16(b, b_dt, off, j, m);
                kl_sums16(f, kl_exp16(_mm512_sub_ps(xa, va)), _mm512_maskz_sub_ps(live16(j, m), xa, xb)); /* past m: d 0 */
            }
            sa = add16_pd(sa, f[0]), t = add16_pd(t, f[1]), gs = add16_pd(gs, f[2]), u = add16_pd(u, f[3]);
            v = add16_pd(v, f[4]);
        }
        if (kl_by_series(sum16_pd(sa), sum16_pd(t), sum16_pd(gs), sum16_pd(u), sum16_pd(v), m, ma, mb, mina, minb,
                         dmax, &got, &sb1))
            return got;
        ra = _mm512_set1_ps((float)(1.0 / sum16_pd(sa))), rb = _mm512_set1_ps((float)(1.0 / sb1));
        goto third;
    }
    for (j = 0; j < m; j += 16) {
        __mmask16 live = live16(j, m);
        __m512 xa = kl_load16(a, a_dt, off, j, m), xb = kl_load16(b, b_dt, off, j, m);
        __m512 x = kl_exp16(_mm512_sub_ps(xa, va)), y = kl_exp16(_mm512_sub_ps(xb, vb));
        __m512d x0 = half_pd(x, 0), x1 = half_pd(x, 1); /* d: 0 past m */
        __m512d d0 = _mm512_maskz_sub_pd((__mmask8)live, half_pd(xa, 0), half_pd(xb, 0));
        __m512d d1 = _mm512_maskz_sub_pd((__mmask8)(live >> 8), half_pd(xa, 1), half_pd(xb, 1));
        sa = _mm512_add_pd(_mm512_add_pd(sa, x0), x1), sb = add16_pd(sb, y);
        t = _mm512_add_pd(_mm512_add_pd(t, _mm512_mul_pd(x0, d0)), _mm512_mul_pd(x1, d1));
        u = _mm512_add_pd(_mm512_add_pd(u, d0), d1);
        v = _mm512_add_pd(_mm512_add_pd(v, _mm512_mul_pd(d0, d0)), _mm512_mul_pd(d1, d1));
    }
    if (kl_by_moments(sum16_pd(sa), sum16_pd(sb), sum16_pd(t), sum16_pd(u), sum16_pd(v), m, ma, mb, mina, minb, dmax,
                      &got))
        return got;
    ra = _mm512_set1_ps((float)(1.0 / sum16_pd(sa)));
    rb = _mm512_set1_ps((float)(1.0 / sum16_pd(sb)));
third:
    for (j = 0; j < m; j += 16) {
        __m512 x = kl_e16(a, a_dt, off, j, m, ma), y = kl_e16(b, b_dt, off, j, m, mb);
        __m512 p = _mm512_add_ps(_mm512_mul_ps(x, ra), tiny), q = _mm512_add_ps(_mm512_mul_ps(y, rb), tiny);
        kl = add16_pd(kl, _mm512_mul_ps(p, kl_log16(_mm512_div_ps(p, q))));
    }
    return kl_nan((float)sum16_pd(kl));
}
#endif

/* One row's KL by the loop form (2 AVX-512, 1 AVX2, 0 plain C) */
static float kl_row(int form, const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t off, Py_ssize_t m) {
#if HAVE_AVX512VL_PATH
    if (form == 2) return kl_row_avx512(a, a_dt, b, b_dt, off, m);
#endif
#if HAVE_F16C_PATH
    if (form == 1) return kl_row_avx2(a, a_dt, b, b_dt, off, m);
#endif
    (void)form;
    return kl_row_plain(a, a_dt, b, b_dt, off, m);
}

/* row_kl_scan's account of I = |a - b| * KL over the rows it reads (arcee_fusion's importance, in float32 as
 * importance() makes it), for the quartiles and the keep bits in the same pass as the KL: how many I lie below each
 * quartile's bracket lo[q], the values inside any bracket, lo[q] <= I < hi[q] (listed in col, in element order),
 * the NaN count, and with bits the bits of I >= bhi and the entries with blo <= I < bhi listed (index, I). The
 * counts go on past a list's room (the later entries not written): over for the brackets', nb > bcap for the
 * band's. */
typedef struct {
    float lo[3], hi[3], blo, bhi;
    uint8_t *bits; /* the tensor's keep bits (element g at bits[g / 8]), or NULL: no bits, no band */
    float *col;
    uint64_t *bidx;
    float *bval;
    Py_ssize_t ccap, nc, bcap, nb, below[3], nan;
    int over;
} kl_scan_t;

/* The band's entries among n lanes (val: their I; lane l is element g + l) listed one at a time, counted past the
 * room; returns the count */
static inline Py_ssize_t band_add(kl_scan_t *s, Py_ssize_t nb, const float *val, int n, uint32_t band, uint64_t g) {
    int l;
    for (l = 0; l < n; l++)
        if ((band >> l) & 1) {
            if (nb < s->bcap) s->bidx[nb] = g + (uint64_t)l, s->bval[nb] = val[l];
            nb++;
        }
    return nb;
}

/* One tile's part of the scan: x the I of elements g .. g + t (g and t multiples of 8); the portable loops (the
 * counts vectorize; the collection writes every value and moves on only past those inside, no branch per entry) */
MULTIVERSION
static void scan_tile_plain(const float *x, Py_ssize_t t, uint64_t g, kl_scan_t *s) {
    const float l0 = s->lo[0], l1 = s->lo[1], l2 = s->lo[2], h0 = s->hi[0], h1 = s->hi[1], h2 = s->hi[2];
    const float blo = s->blo, bhi = s->bhi;
    Py_ssize_t j, nn = 0, n0 = 0, n1 = 0, n2 = 0, in = 0, nb = 0;
    for (j = 0; j < t; j++) {
        float v = x[j];
        nn += v != v, n0 += v < l0, n1 += v < l1, n2 += v < l2;
        in += ((v >= l0) & (v < h0)) | ((v >= l1) & (v < h1)) | ((v >= l2) & (v < h2));
    }
    s->nan += nn, s->below[0] += n0, s->below[1] += n1, s->below[2] += n2;
    if (in && s->nc + t > s->ccap) s->over = 1;
    if (in && !s->over) {
        float *c = s->col + s->nc;
        Py_ssize_t k = 0;
        for (j = 0; j < t; j++) {
            float v = x[j];
            c[k] = v, k += ((v >= l0) & (v < h0)) | ((v >= l1) & (v < h1)) | ((v >= l2) & (v < h2));
        }
    }
    s->nc += in;
    if (!s->bits) return;
    set_bits_ge(x, 0, t, bhi, s->bits + (g >> 3));
    for (j = 0; j < t; j++) nb += (x[j] >= blo) & (x[j] < bhi);
    for (j = 0; nb && j < t; j++)
        if (x[j] >= blo && x[j] < bhi) {
            if (s->nb < s->bcap) s->bidx[s->nb] = g + (uint64_t)j, s->bval[s->nb] = x[j];
            s->nb++;
        }
}

/* One row's scan (elements off .. off + m of a and b, tensor elements g .. g + m; m and g multiples of 8) in tiles,
 * the portable way */
MULTIVERSION
static void scan_row_plain(const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t off, Py_ssize_t m, uint64_t g,
                           float f, kl_scan_t *s) {
    float ta[TILE], tb[TILE];
    Py_ssize_t o, j;
    for (o = 0; o < m; o += TILE) {
        Py_ssize_t t = m - o < TILE ? m - o : TILE;
        load_tile(ta, a, a_dt, off + o, t);
        load_tile(tb, b, b_dt, off + o, t);
        for (j = 0; j < t; j++) ta[j] = fabsf(ta[j] - tb[j]) * f;
        scan_tile_plain(ta, t, g + (uint64_t)o, s);
    }
}

#if HAVE_F16C_PATH
/* The same with AVX2: eight entries at a time, the values inside the brackets compacted through compact_lut (in
 * element order), a byte of bits at a time, the band's entries (few) one by one: the same bits, counts and lists.
 * I >= lo[q] is counted in vector lanes; below lo[q] are the rest but the NaN ones, counted only where I can be NaN
 * (a row with a NaN or an inf has a NaN KL; |a - b| = inf times a KL of 0). */
__attribute__((target("avx2,f16c,popcnt"))) static void scan_row_avx2(const void *a, int a_dt, const void *b, int b_dt,
                                                                     Py_ssize_t off, Py_ssize_t m, uint64_t g, float f,
                                                                     kl_scan_t *s) {
    const __m256 vf = _mm256_set1_ps(f), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 blo = _mm256_set1_ps(s->blo), bhi = _mm256_set1_ps(s->bhi);
    const int nans = !(isfinite(f) && f != 0.0f);
    __m256 lo[3], hi[3];
    __m256i ge_n[3];
    uint32_t sink[8], *dst = s->over ? sink : (uint32_t *)(s->col + s->nc); /* no room left: sink, counted on */
    Py_ssize_t j, nn = 0, nc = s->nc, nb = s->nb;
    int q, step = !s->over;
    for (q = 0; q < 3; q++)
        lo[q] = _mm256_set1_ps(s->lo[q]), hi[q] = _mm256_set1_ps(s->hi[q]), ge_n[q] = _mm256_setzero_si256();
    for (j = 0; j < m; j += 8) {
        __m256 v = _mm256_sub_ps(fast_load(a, a_dt, off + j), fast_load(b, b_dt, off + j)), inv, keep;
        int in, band, c;
        v = _mm256_mul_ps(_mm256_and_ps(v, absmask), vf);
        if (nans) nn += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        inv = _mm256_setzero_ps();
        for (q = 0; q < 3; q++) { /* at or above lo (not NaN), and below hi */
            __m256 ge = _mm256_cmp_ps(v, lo[q], _CMP_GE_OQ);
            ge_n[q] = _mm256_sub_epi32(ge_n[q], _mm256_castps_si256(ge)); /* a lane's -1: one more */
            inv = _mm256_or_ps(inv, _mm256_and_ps(ge, _mm256_cmp_ps(v, hi[q], _CMP_LT_OQ)));
        }
        in = _mm256_movemask_ps(inv);
        if (step && nc + 8 > s->ccap) /* a compacted store writes eight lanes: no room left */
            s->over = 1, dst = sink, step = 0;
        c = compact8(dst, _mm256_castps_si256(v), in);
        nc += c, dst += c * step;
        if (!s->bits) continue;
        keep = _mm256_cmp_ps(v, bhi, _CMP_GE_OQ);
        s->bits[(g + (uint64_t)j) >> 3] = (uint8_t)_mm256_movemask_ps(keep);
        band = _mm256_movemask_ps(_mm256_andnot_ps(keep, _mm256_cmp_ps(v, blo, _CMP_GE_OQ)));
        if (band) {
            float val[8];
            _mm256_storeu_ps(val, v);
            nb = band_add(s, nb, val, 8, (uint32_t)band, g + (uint64_t)j);
        }
    }
    s->nan += nn, s->nb = nb, s->nc = nc;
    for (q = 0; q < 3; q++) { /* below lo[q]: neither at or above it nor NaN */
        int32_t l[8];
        int i;
        _mm256_storeu_si256((__m256i *)l, ge_n[q]);
        s->below[q] += m - nn;
        for (i = 0; i < 8; i++) s->below[q] -= l[i];
    }
}
#endif

#if HAVE_AVX512VL_PATH
/* scan_row_avx512's running state: where the next listed values go, the counts so far (lanes) */
typedef struct {
    float *dst, *sink;
    Py_ssize_t nc, nb;
    int step;
    __m512i nv, bv[3];
} scan16_t;

/* scan_row_avx512's step over the sixteen entries from j (live: those in the row; nans: I may be NaN there) */
static inline __attribute__((always_inline)) AVX512_KL void scan16(const void *a, int a_dt, const void *b, int b_dt,
                                                                  Py_ssize_t off, Py_ssize_t j, __mmask16 live,
                                                                  int nans, uint64_t g, __m512 vf, kl_scan_t *s,
                                                                  scan16_t *t) {
    const __m512 blo = _mm512_set1_ps(s->blo), bhi = _mm512_set1_ps(s->bhi);
    const __m512i ones = _mm512_set1_epi32(1);
    __mmask16 band, keep, in = 0;
    __m512 v = _mm512_sub_ps(load16_z(a, a_dt, off + j, live), load16_z(b, b_dt, off + j, live));
    int q;
    v = _mm512_mul_ps(_mm512_abs_ps(v), vf);
    if (nans) t->nv = _mm512_mask_add_epi32(t->nv, _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q), t->nv, ones);
    for (q = 0; q < 3; q++) { /* at or above lo (not NaN), and below hi */
        __mmask16 ge = _mm512_mask_cmp_ps_mask(live, v, _mm512_set1_ps(s->lo[q]), _CMP_GE_OQ);
        t->bv[q] = _mm512_mask_add_epi32(t->bv[q], ge, t->bv[q], ones);
        in |= _mm512_mask_cmp_ps_mask(ge, v, _mm512_set1_ps(s->hi[q]), _CMP_LT_OQ);
    }
    if (t->step && t->nc + 16 > s->ccap) /* a compressed store writes sixteen lanes: no room left */
        s->over = 1, t->dst = t->sink, t->step = 0;
    _mm512_storeu_ps(t->dst, _mm512_maskz_compress_ps(in, v)); /* no branch: often some, unpredictably */
    t->nc += _mm_popcnt_u32(in), t->dst += _mm_popcnt_u32(in) * t->step;
    if (!s->bits) return;
    keep = _mm512_mask_cmp_ps_mask(live, v, bhi, _CMP_GE_OQ);
    {
        uint8_t *bp = s->bits + ((g + (uint64_t)j) >> 3);
        bp[0] = (uint8_t)keep;
        if (live == 0xffff) bp[1] = (uint8_t)(keep >> 8);
    }
    band = _mm512_mask_cmp_ps_mask((__mmask16)(live & ~keep), v, blo, _CMP_GE_OQ);
    if (band && t->nb + 16 <= s->bcap) {
        __m512i i0 = _mm512_add_epi64(_mm512_set1_epi64((long long)(g + (uint64_t)j)),
                                      _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
        __m512i i1 = _mm512_add_epi64(i0, _mm512_set1_epi64(8));
        int c0 = _mm_popcnt_u32(band & 0xffu);
        _mm512_storeu_ps(s->bval + t->nb, _mm512_maskz_compress_ps(band, v));
        _mm512_storeu_si512(s->bidx + t->nb, _mm512_maskz_compress_epi64((__mmask8)band, i0));
        _mm512_storeu_si512(s->bidx + t->nb + c0, _mm512_maskz_compress_epi64((__mmask8)(band >> 8), i1));
        t->nb += _mm_popcnt_u32(band);
    } else if (band) { /* near the end of the room: one at a time, counted past it */
        float val[16];
        _mm512_storeu_ps(val, v);
        t->nb = band_add(s, t->nb, val, 16, band, g + (uint64_t)j);
    }
}

/* The same with AVX-512: sixteen entries at a time, the collected values and the band's entries compressed into
 * their lists (in element order, as the portable loop writes them), the bits two bytes at a time: the same bits,
 * counts and lists. I >= lo[q] counted as scan_row_avx2 does; a row's whole vectors without masks where no I can be
 * NaN. */
AVX512_KL static void scan_row_avx512(const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t off, Py_ssize_t m,
                                      uint64_t g, float f, kl_scan_t *s) {
    const __m512 vf = _mm512_set1_ps(f);
    float sink[16];
    scan16_t t;
    Py_ssize_t j = 0, nn;
    int q;
    t.sink = sink, t.dst = s->over ? sink : s->col + s->nc; /* no room left: written into sink, counted on */
    t.nc = s->nc, t.nb = s->nb, t.step = !s->over, t.nv = _mm512_setzero_si512();
    for (q = 0; q < 3; q++) t.bv[q] = t.nv;
    if (isfinite(f) && f != 0.0f) /* no NaN I (kl_row's NaN for a NaN or an inf; |a - b| = inf times 0) */
        for (; j + 16 <= m; j += 16) scan16(a, a_dt, b, b_dt, off, j, (__mmask16)0xffff, 0, g, vf, s, &t);
    for (; j < m; j += 16)
        scan16(a, a_dt, b, b_dt, off, j, j + 16 <= m ? (__mmask16)0xffff : (__mmask16)0x00ff, 1, g, vf, s, &t);
    nn = _mm512_reduce_add_epi32(t.nv);
    s->nan += nn, s->nb = t.nb, s->nc = t.nc;
    for (q = 0; q < 3; q++) s->below[q] += m - nn - _mm512_reduce_add_epi32(t.bv[q]); /* neither >= lo nor NaN */
}
#endif

/* The loop of row_kl() below: the KL of rows 0 .. rows-1 into out; returns how many I = |a - b| * KL are below 0
 * (in the rows whose KL is). With scan (row_kl_scan(): the rows are tensor elements g0 .. g0 + rows*m), each row's
 * I scanned right after its KL, while the row is in cache. */
static Py_ssize_t run_row_kl(const void *a, int a_dt, const void *b, int b_dt, Py_ssize_t rows, Py_ssize_t m,
                             float *out, int path, kl_scan_t *scan, uint64_t g0) {
    Py_ssize_t r, j, below = 0;
    int form = 0; /* 2 AVX-512, 1 AVX2, 0 plain C */
#if HAVE_F16C_PATH
    form = path <= 1 && fma_ok() && f16c_ok();
#endif
#if HAVE_AVX512VL_PATH
    if (path == 0 && form && avx512vlbw_ok()) form = 2;
#endif
    (void)path;
    for (r = 0; r < rows; r++) {
        Py_ssize_t off = r * m;
        out[r] = kl_row(form, a, a_dt, b, b_dt, off, m);
        for (j = 0; out[r] < 0.0f && j < m; j++)
            below += fabsf(kl_load1(a, a_dt, off + j) - kl_load1(b, b_dt, off + j)) * out[r] < 0.0f;
#if HAVE_AVX512VL_PATH
        if (scan && form == 2) {
            scan_row_avx512(a, a_dt, b, b_dt, off, m, g0 + (uint64_t)off, out[r], scan);
            continue;
        }
#endif
#if HAVE_F16C_PATH
        if (scan && form == 1) {
            scan_row_avx2(a, a_dt, b, b_dt, off, m, g0 + (uint64_t)off, out[r], scan);
            continue;
        }
#endif
        if (scan) scan_row_plain(a, a_dt, b, b_dt, off, m, g0 + (uint64_t)off, out[r], scan);
    }
    return below;
}

/* row_kl(a, a_dt, b, b_dt, rows, m, out[, path]) -> count of I < 0: arcee_fusion's KL divergence of each of rows
 * rows of m (a: the model, b: the base; see kl_row_plain) into out (float32, rows), and how many entries of
 * I = |a - b| * KL round below 0. path (tests): 0 the fastest loop this CPU has (AVX-512 or AVX2), 1 AVX2 at most,
 * 2 plain C. */
static PyObject *native_row_kl(PyObject *self, PyObject *args) {
    Py_buffer a, b, out;
    int a_dt, b_dt, path = 0, ok = 1;
    Py_ssize_t rows, m, below = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iy*innw*|i", &a, &a_dt, &b, &b_dt, &rows, &m, &out, &path)) return NULL;
    if (rows < 0 || m < 1 || (rows > 0 && m > PY_SSIZE_T_MAX / rows)) {
        PyErr_SetString(PyExc_ValueError, "row_kl: rows >= 0 and m >= 1");
        ok = 0;
    }
    ok = ok && check_dt(a_dt) && check_len(&a, a_dt, rows * m, "model") && check_dt(b_dt) &&
         check_len(&b, b_dt, rows * m, "base") && check_len(&out, DT_F32, rows, "output");
    if (ok) NOGIL_IF(rows * m, below = run_row_kl(a.buf, a_dt, b.buf, b_dt, rows, m, (float *)out.buf, path, NULL, 0));
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&out);
    if (!ok) return NULL;
    return PyLong_FromSsize_t(below);
}

/* row_kl_scan(a, a_dt, b, b_dt, rows, m, out, offset, brackets, col, bits, band, idx, val[, path]) -> (count of
 * I < 0, NaN count, (below lo[q] for each q), listed (-1: more than col holds), band entries): row_kl() of rows of m
 * (m a multiple of 8; tensor elements offset .. offset + rows*m, offset a multiple of 8), and each row's
 * I = |a - b| * KL scanned right after its KL (kl_scan_t): brackets the three pairs (lo[q], hi[q]) of the
 * quartiles' brackets, col a float32 buffer for the values inside any of them; with bits (else None), the bits
 * of I >= band[1] and the entries with band[0] <= I < band[1] listed in idx (uint64) and val (float32), counted
 * past their room. path (tests): 0 the fastest loops this CPU has, 1 AVX2 at most, 2 plain C. */
static PyObject *native_row_kl_scan(PyObject *self, PyObject *args) {
    PyObject *bits_o;
    Py_buffer a, b, out, col, bits, bidx, bval;
    int a_dt, b_dt, path = 0, ok = 1, has_bits = 0, q;
    Py_ssize_t rows, m, below = 0;
    unsigned long long offset;
    float br[6], blo, bhi;
    kl_scan_t sc = {{0}};
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iy*innw*K((ff)(ff)(ff))w*O(ff)w*w*|i", &a, &a_dt, &b, &b_dt, &rows, &m, &out,
                          &offset, &br[0], &br[1], &br[2], &br[3], &br[4], &br[5], &col, &bits_o, &blo, &bhi, &bidx,
                          &bval, &path))
        return NULL;
    if (rows < 0 || m < 1 || m % 8 || (offset & 7) || (rows > 0 && m > PY_SSIZE_T_MAX / rows)) {
        PyErr_SetString(PyExc_ValueError, "row_kl_scan: rows >= 0, m >= 1 a multiple of 8 and so the offset");
        ok = 0;
    }
    ok = ok && check_dt(a_dt) && check_len(&a, a_dt, rows * m, "model") && check_dt(b_dt) &&
         check_len(&b, b_dt, rows * m, "base") && check_len(&out, DT_F32, rows, "output");
    if (ok && bits_o != Py_None) {
        if (PyObject_GetBuffer(bits_o, &bits, PyBUF_WRITABLE) < 0) ok = 0;
        else if ((has_bits = 1) && bits.len < (Py_ssize_t)((offset + (uint64_t)(rows * m) + 7) >> 3)) {
            PyErr_SetString(PyExc_ValueError, "row_kl_scan: a bits buffer as long as the tensor's bits");
            ok = 0;
        }
    }
    if (ok) {
        for (q = 0; q < 3; q++) sc.lo[q] = br[2 * q], sc.hi[q] = br[2 * q + 1];
        sc.col = (float *)col.buf, sc.ccap = col.len / 4;
        sc.blo = blo, sc.bhi = bhi;
        sc.bits = has_bits ? (uint8_t *)bits.buf : NULL;
        sc.bidx = (uint64_t *)bidx.buf, sc.bval = (float *)bval.buf;
        sc.bcap = bidx.len / 8 < bval.len / 4 ? bidx.len / 8 : bval.len / 4;
        NOGIL_IF(rows * m, below = run_row_kl(a.buf, a_dt, b.buf, b_dt, rows, m, (float *)out.buf, path, &sc,
                                              (uint64_t)offset));
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&out);
    PyBuffer_Release(&col);
    PyBuffer_Release(&bidx);
    PyBuffer_Release(&bval);
    if (has_bits) PyBuffer_Release(&bits);
    if (!ok) return NULL;
    return Py_BuildValue("nn(nnn)nn", below, sc.nan, sc.below[0], sc.below[1], sc.below[2],
                         sc.over || sc.nc > sc.ccap ? (Py_ssize_t)-1 : sc.nc, sc.nb);
}

/* importance(a, a_dt, b, b_dt, n, offset, m, scale, thr, out, bits[, part]) -> count of I < 0: arcee_fusion's
 * importance of elements offset .. offset+n of a tensor of rows of m: I_j = |a_j - b_j| * scale[(offset + j) / m]
 * (float32: the difference rounded, then the product; a scale, a KL divergence, can round below 0). Written to out
 * (float32, n) when not None: I itself (part 0), max(I, 0) (part 1: what lies at or above 0, NaN kept) or -min(I, 0)
 * (part 2: the magnitudes of what lies below 0); with bits, the bits of I >= thr (element j at bits[(offset + j) /
 * 8], offset a multiple of 8). With band_lo and two buffers (uint64 indices, float32 values), the entries with
 * band_lo <= I < thr are listed there too (element index offset + j, and I) and the call returns (count of I < 0,
 * entries in the band); a count above the buffers' room means that the later ones were not written. */
static PyObject *native_importance(PyObject *self, PyObject *args) {
    PyObject *out_o, *bits_o;
    Py_buffer a, b, scale, out, bits, bidx = {0}, bval = {0};
    int a_dt, b_dt, ok = 1, has_out = 0, has_bits = 0, part = 0;
    Py_ssize_t n, m, neg = 0;
    unsigned long long offset;
    double thr, band_lo = 0.0;
    band_t band = {0}, *bp = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iy*inKny*dOO|idw*w*", &a, &a_dt, &b, &b_dt, &n, &offset, &m, &scale, &thr, &out_o,
                          &bits_o, &part, &band_lo, &bidx, &bval))
        return NULL;
    if (bidx.obj && !bval.obj) {
        PyErr_SetString(PyExc_ValueError, "importance: a band needs index and value buffers");
        ok = 0;
    } else if (bidx.obj) {
        band.lo = (float)band_lo;
        band.idx = (uint64_t *)bidx.buf;
        band.val = (float *)bval.buf;
        band.cap = bidx.len / 8 < bval.len / 4 ? bidx.len / 8 : bval.len / 4;
        bp = &band;
    }
    if (n < 0 || m < 1 || part < 0 || part > 2) {
        PyErr_SetString(PyExc_ValueError, "importance: n >= 0, m >= 1 and part 0, 1 or 2");
        ok = 0;
    }
    ok = ok && check_dt(a_dt) && check_len(&a, a_dt, n, "model") && check_dt(b_dt) && check_len(&b, b_dt, n, "base");
    if (ok && n > 0 && scale.len < (Py_ssize_t)(((offset + (uint64_t)n - 1) / (uint64_t)m + 1) * sizeof(float))) {
        PyErr_SetString(PyExc_ValueError, "importance: one float32 scale per row");
        ok = 0;
    }
    if (ok && out_o != Py_None) {
        if (PyObject_GetBuffer(out_o, &out, PyBUF_WRITABLE) < 0) ok = 0;
        else if ((has_out = 1)) ok = check_len(&out, DT_F32, n, "output");
    }
    if (ok && bits_o != Py_None) {
        if (PyObject_GetBuffer(bits_o, &bits, PyBUF_WRITABLE) < 0) ok = 0;
        else if ((has_bits = 1) && ((offset & 7) || bits.len < (Py_ssize_t)((offset + (uint64_t)n + 7) >> 3))) {
            PyErr_SetString(PyExc_ValueError, "importance: bits need an offset that is a multiple of 8 and a mask "
                                              "buffer as long as the tensor's bits");
            ok = 0;
        }
    }
    if (ok) {
        const float *sc = (const float *)scale.buf, th = (float)thr;
        uint8_t *bt = has_bits ? (uint8_t *)bits.buf + (offset >> 3) : NULL;
        float *o = has_out ? (float *)out.buf : NULL;
        NOGIL_IF(n, neg = run_importance(a.buf, a_dt, b.buf, b_dt, n, offset, m, sc, th, o, part, bt, bp));
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&scale);
    if (has_out) PyBuffer_Release(&out);
    if (has_bits) PyBuffer_Release(&bits);
    if (bidx.obj) PyBuffer_Release(&bidx);
    if (bval.obj) PyBuffer_Release(&bval);
    if (!ok) return NULL;
    if (bp) return Py_BuildValue("nn", neg, band.n);
    return PyLong_FromSsize_t(neg);
}

/* della(terms, b | None, b_dt, rows, m, elem_offset[, path]) -> [(sum |v|, sum |v| kept), ...]: terms a sequence of
 * (a, a_dt, key, xl, xh, bits), one per model; see run_della. path (tests): 0 the fastest loops this CPU has, 1
 * AVX2 Philox and plain C, 2 plain C. */
static PyObject *native_della(PyObject *self, PyObject *args) {
    PyObject *seq, *fast = NULL, *b_o, *res = NULL;
    Py_buffer b, *bufs = NULL, *bitbufs = NULL;
    della_term_t *terms = NULL;
    int b_dt, has_b = 0, ok = 1, rc = 0, path = 0, k = 0, got = 0, i;
    Py_ssize_t rows, m;
    unsigned long long offset;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOinnK|i", &seq, &b_o, &b_dt, &rows, &m, &offset, &path)) return NULL;
    fast = PySequence_Fast(seq, "della: terms must be a sequence of (a, a_dt, key, xl, xh, bits)");
    if (!fast) return NULL;
    k = (int)PySequence_Fast_GET_SIZE(fast);
    terms = (della_term_t *)calloc((size_t)(k ? k : 1), sizeof(della_term_t));
    bufs = (Py_buffer *)calloc((size_t)(k ? k : 1), sizeof(Py_buffer));
    bitbufs = (Py_buffer *)calloc((size_t)(k ? k : 1), sizeof(Py_buffer));
    if (!terms || !bufs || !bitbufs) {
        PyErr_NoMemory();
        ok = 0;
    }
    if (ok && b_o != Py_None) {
        if (PyObject_GetBuffer(b_o, &b, PyBUF_SIMPLE) < 0) ok = 0;
        else has_b = 1;
    }
    if (ok && (rows < 0 || m < 1 || m >= ((Py_ssize_t)1 << 31) || (offset & 7))) {
        PyErr_SetString(PyExc_ValueError, "della: rows >= 0, 1 <= m < 2^31 and an offset that is a multiple of 8");
        ok = 0;
    }
    if (ok && has_b) ok = check_dt(b_dt) && check_len(&b, b_dt, rows * m, "base");
    for (i = 0; ok && i < k; i++) {
        unsigned long long key;
        unsigned long xl, xh;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "y*iKkkw*", &bufs[i], &terms[i].a_dt, &key, &xl, &xh,
                              &bitbufs[i])) {
            ok = 0;
            break;
        }
        got = i + 1;
        terms[i].a = bufs[i].buf, terms[i].bits = (uint8_t *)bitbufs[i].buf;
        terms[i].k0 = (uint32_t)key, terms[i].k1 = (uint32_t)(key >> 32);
        terms[i].xl = (uint32_t)xl, terms[i].xh = (uint32_t)xh;
        if (xl > xh || xh > 0x80000000ul) {
            PyErr_SetString(PyExc_ValueError, "della: bounds xl <= xh <= 2^31");
            ok = 0;
        }
        if (ok) ok = check_dt(terms[i].a_dt) && check_len(&bufs[i], terms[i].a_dt, rows * m, "vector");
        if (ok && bitbufs[i].len < (Py_ssize_t)((offset + (uint64_t)(rows * m) + 7) >> 3)) {
            PyErr_SetString(PyExc_ValueError, "a mask buffer is shorter than the tensor's bits");
            ok = 0;
        }
    }
    if (ok && rows > 0 && k > 0) {
        NOGIL_IF(rows * m, rc = run_della(terms, k, has_b ? b.buf : NULL, b_dt, rows, m, (uint64_t)offset, path));
        if (rc < 0) {
            PyErr_NoMemory();
            ok = 0;
        }
    }
    if (ok) res = PyList_New(k);
    for (i = 0; res && i < k; i++) {
        PyObject *pair = Py_BuildValue("(dd)", sum8_combine(terms[i].s1), sum8_combine(terms[i].s2));
        if (!pair) {
            Py_CLEAR(res);
            break;
        }
        PyList_SET_ITEM(res, i, pair);
    }
    for (i = 0; i < got; i++) PyBuffer_Release(&bufs[i]), PyBuffer_Release(&bitbufs[i]);
    if (has_b) PyBuffer_Release(&b);
    free(terms), free(bufs), free(bitbufs);
    Py_DECREF(fast);
    return res;
}

/* philox_ints(key, start, n, out[, path]): the folded words (tl.rand's integers before the scaling) into out; path as
 * philox()'s (0 the fastest loop, 1 AVX2 at most, 2 plain C) */
static PyObject *native_philox_ints(PyObject *self, PyObject *args) {
    unsigned long long key, start;
    Py_ssize_t n;
    Py_buffer out;
    int path = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnw*|i", &key, &start, &n, &out, &path)) return NULL;
    if (n < 0 || out.len < n * 4) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "output buffer too small");
        return NULL;
    }
    NOGIL_IF(n, philox_run(out.buf, (uint64_t)start, n, (uint32_t)key, (uint32_t)(key >> 32), 1, path));
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyObject *native_diff(PyObject *self, PyObject *args) {
    Py_buffer out, a, b;
    int out_dt, a_dt, b_dt;
    Py_ssize_t n;
    int flags = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*iy*iy*in", &out, &out_dt, &a, &a_dt, &b, &b_dt, &n)) return NULL;
    if (!check_dt(out_dt) || !check_dt(a_dt) || !check_dt(b_dt) || !check_len(&out, out_dt, n, "output") ||
        !check_len(&a, a_dt, n, "input") || !check_len(&b, b_dt, n, "input")) {
        PyBuffer_Release(&out);
        PyBuffer_Release(&a);
        PyBuffer_Release(&b);
        return NULL;
    }
    NOGIL_IF(n, flags = run_diff(out.buf, out_dt, a.buf, a_dt, b.buf, b_dt, n));
    PyBuffer_Release(&out);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyLong_FromLong(flags);
}

/* merge(outs, base, base_dt, n, terms, sign, normalize, elem_offset) -> flags
 *   outs:  sequence of (buffer, dtype_code, alpha)
 *   terms: sequence of (a, a_dt, b_or_None, b_dt, weight, mode, p1, p2, key) — the term is a (or a - b), pruned by
 *          mode (0 none, 1 magnitude |t| >= p1, 2 random u < p1 then / p2, 3 band p1 <= |t| < p2); key: uint64 seed. */
static PyObject *native_merge(PyObject *self, PyObject *args) {
    PyObject *outs_o, *terms_o, *so = NULL, *st = NULL;
    Py_buffer base, ob[MAX_VECTORS], ab[MAX_VECTORS], bb[MAX_VECTORS], kb[MAX_VECTORS];
    int has_b[MAX_VECTORS], has_k[MAX_VECTORS];
    out_t outs[MAX_VECTORS];
    term_t terms[MAX_VECTORS];
    int base_dt, sign, normalize, n_out = 0, k = 0, i, ok = 1, flags = 0;
    Py_ssize_t n;
    unsigned long long elem_offset;
    float *tiles = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oy*inOiiK", &outs_o, &base, &base_dt, &n, &terms_o, &sign, &normalize, &elem_offset))
        return NULL;
    memset(has_b, 0, sizeof(has_b));
    memset(has_k, 0, sizeof(has_k));
    so = PySequence_Fast(outs_o, "outs must be a sequence");
    st = so ? PySequence_Fast(terms_o, "terms must be a sequence") : NULL;
    if (!so || !st) ok = 0;
    if (ok && (PySequence_Fast_GET_SIZE(so) > MAX_VECTORS || PySequence_Fast_GET_SIZE(st) > MAX_VECTORS)) {
        PyErr_SetString(PyExc_ValueError, "too many outputs or terms for the native kernel");
        ok = 0;
    }
    if (ok && (sign < SIGN_NONE || sign > SIGN_SUM || normalize < 0 || normalize > NORMALIZE_FLOOR)) {
        PyErr_Format(PyExc_ValueError, "unknown sign (%d) or normalize (%d) mode", sign, normalize);
        ok = 0;
    }
    ok = ok && check_dt(base_dt) && check_len(&base, base_dt, n, "base");
    for (i = 0; ok && i < PySequence_Fast_GET_SIZE(so); i++) {
        double alpha;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(so, i), "w*id", &ob[i], &outs[i].dt, &alpha)) {
            ok = 0;
            break;
        }
        n_out++;
        outs[i].buf = ob[i].buf;
        outs[i].alpha = (float)alpha;
        ok = check_dt(outs[i].dt) && check_len(&ob[i], outs[i].dt, n, "output");
    }
    for (i = 0; ok && i < PySequence_Fast_GET_SIZE(st); i++) {
        PyObject *b_o, *bits_o = Py_None;
        double w, p1, p2;
        unsigned long long key;
        term_t *t = &terms[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(st, i), "y*iOididdK|O", &ab[i], &t->a_dt, &b_o, &t->b_dt, &w,
                              &t->mode, &p1, &p2, &key, &bits_o)) {
            ok = 0;
            break;
        }
        k++;
        t->a = ab[i].buf;
        t->b = NULL;
        t->bits = NULL;
        t->w = (float)w;
        t->p1 = (float)p1;
        t->p2 = (float)p2;
        t->k0 = (uint32_t)key;
        t->k1 = (uint32_t)(key >> 32);
        ok = check_dt(t->a_dt) && check_len(&ab[i], t->a_dt, n, "vector");
        if (ok && b_o != Py_None) {
            if (PyObject_GetBuffer(b_o, &bb[i], PyBUF_SIMPLE) < 0) {
                ok = 0;
                break;
            }
            has_b[i] = 1;
            t->b = bb[i].buf;
            ok = check_dt(t->b_dt) && check_len(&bb[i], t->b_dt, n, "vector");
        }
        if (ok && bits_o != Py_None) {
            if (PyObject_GetBuffer(bits_o, &kb[i], PyBUF_SIMPLE) < 0) {
                ok = 0;
                break;
            }
            has_k[i] = 1;
            t->bits = (const uint8_t *)kb[i].buf;
            if (kb[i].len < (Py_ssize_t)((elem_offset + (uint64_t)n + 7) >> 3)) {
                PyErr_SetString(PyExc_ValueError, "a term's bit mask is shorter than its elements");
                ok = 0;
            }
        }
        if (ok && (t->mode < 0 || t->mode > 5 || (t->mode == PRUNE_BITS && !t->bits))) {
            PyErr_Format(PyExc_ValueError, "unknown prune mode %d (or mode 4 without a bit mask)", t->mode);
            ok = 0;
        }
    }
    if (ok && k > 0 && !(tiles = alloc_tiles((size_t)k))) ok = 0;
    if (ok) {
        NOGIL_IF(n, flags = run_merge(outs, n_out, base.buf, base_dt, n, terms, k, sign, normalize,
                                      (uint64_t)elem_offset, tiles));
    }
    free(tiles);
    for (i = 0; i < n_out; i++) PyBuffer_Release(&ob[i]);
    for (i = 0; i < k; i++) {
        PyBuffer_Release(&ab[i]);
        if (has_b[i]) PyBuffer_Release(&bb[i]);
        if (has_k[i]) PyBuffer_Release(&kb[i]);
    }
    Py_XDECREF(so);
    Py_XDECREF(st);
    PyBuffer_Release(&base);
    if (!ok) return NULL;
    return PyLong_FromLong(flags);
}


/* moments(vectors, base_or_None, base_dt, n, elem_offset, want_gram, out) -> None
 *   vectors: sequence of (a, a_dt, mode, p1, p2, key): v_i = a_i - base when base is given, else a_i;
 *   want_gram: bit 0 = compute the Gram matrix, bit 1 = skip the L1 sums of vectors not pruned;
 *   out: writable float64 buffer of K*K + 2K values, added to (see run_moments). */
static PyObject *native_moments(PyObject *self, PyObject *args) {
    PyObject *vec_o, *base_o, *sv = NULL, *masks_o = Py_None, *sm = NULL;
    Py_buffer base, out, ab[MAX_VECTORS], mb[MAX_VECTORS];
    uint8_t *masks[MAX_VECTORS];
    int has_mask[MAX_VECTORS];
    term_t terms[MAX_VECTORS];
    int base_dt, want_gram, k = 0, i, ok = 1, has_base = 0;
    Py_ssize_t n;
    unsigned long long elem_offset;
    float *tiles = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOinKiw*|O", &vec_o, &base_o, &base_dt, &n, &elem_offset, &want_gram, &out, &masks_o))
        return NULL;
    memset(has_mask, 0, sizeof(has_mask));
    memset(masks, 0, sizeof(masks));
    sv = PySequence_Fast(vec_o, "vectors must be a sequence");
    if (!sv) ok = 0;
    if (ok && PySequence_Fast_GET_SIZE(sv) > MAX_VECTORS) {
        PyErr_SetString(PyExc_ValueError, "too many vectors for the native kernel");
        ok = 0;
    }
    if (ok && base_o != Py_None) {
        if (PyObject_GetBuffer(base_o, &base, PyBUF_SIMPLE) < 0) ok = 0;
        else {
            has_base = 1;
            ok = check_dt(base_dt) && check_len(&base, base_dt, n, "base");
        }
    }
    for (i = 0; ok && i < PySequence_Fast_GET_SIZE(sv); i++) {
        double p1, p2;
        unsigned long long key;
        term_t *t = &terms[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sv, i), "y*iiddK", &ab[i], &t->a_dt, &t->mode, &p1, &p2,
                              &key)) {
            ok = 0;
            break;
        }
        k++;
        t->a = ab[i].buf;
        t->b = has_base ? base.buf : NULL;
        t->bits = NULL;
        t->b_dt = base_dt;
        t->w = 1.0f;
        t->p1 = (float)p1;
        t->p2 = (float)p2;
        t->k0 = (uint32_t)key;
        t->k1 = (uint32_t)(key >> 32);
        ok = check_dt(t->a_dt) && check_len(&ab[i], t->a_dt, n, "vector");
        if (ok && (t->mode < 0 || t->mode > 3)) {
            PyErr_Format(PyExc_ValueError, "unknown prune mode %d", t->mode);
            ok = 0;
        }
    }
    if (ok && masks_o != Py_None) {
        sm = PySequence_Fast(masks_o, "masks must be a sequence");
        if (!sm) ok = 0;
        else if (PySequence_Fast_GET_SIZE(sm) != k) {
            PyErr_SetString(PyExc_ValueError, "masks: one entry (a buffer or None) per vector");
            ok = 0;
        }
        for (i = 0; ok && i < k; i++) {
            PyObject *o = PySequence_Fast_GET_ITEM(sm, i);
            if (o == Py_None) continue;
            if (PyObject_GetBuffer(o, &mb[i], PyBUF_WRITABLE) < 0) {
                ok = 0;
                break;
            }
            has_mask[i] = 1;
            masks[i] = (uint8_t *)mb[i].buf;
            if (mb[i].len < (Py_ssize_t)((elem_offset + (uint64_t)n + 7) >> 3)) {
                PyErr_SetString(PyExc_ValueError, "a mask buffer is shorter than the tensor's bits");
                ok = 0;
            }
        }
    }
    if (ok && out.len < (Py_ssize_t)(((size_t)k * k + 2 * (size_t)k) * sizeof(double))) {
        PyErr_SetString(PyExc_ValueError, "the output buffer is too short");
        ok = 0;
    }
    if (ok && !(tiles = alloc_tiles((size_t)k + 1))) ok = 0;
    if (ok) {
        NOGIL_IF(n, run_moments(terms, k, has_base ? base.buf : NULL, base_dt, n, (uint64_t)elem_offset,
                                want_gram & 1, (want_gram & 2) == 0, (double *)out.buf, tiles, sm ? masks : NULL));
    }
    free(tiles);
    for (i = 0; i < k; i++) PyBuffer_Release(&ab[i]);
    for (i = 0; i < MAX_VECTORS; i++)
        if (has_mask[i]) PyBuffer_Release(&mb[i]);
    if (has_base) PyBuffer_Release(&base);
    PyBuffer_Release(&out);
    Py_XDECREF(sv);
    Py_XDECREF(sm);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* hist1(buf, n, bins, hist[, portable]) — float32: level-1 counts of up to HIST1_BINS level-0 bins (uint32), added
 * into hist, 65536 uint64 per bin; see run_hist1. portable: 0 the fastest loop, 1 plain C, 2 AVX2 at most (tests). */
/* The k-th smallest (0-based) of a[0 .. n - 1] (n >= 1), reordering a: a quickselect with three-way partitions
 * (many equal keys cost no more than distinct ones). */
static uint32_t select_u32(uint32_t *a, Py_ssize_t n, Py_ssize_t k) {
    Py_ssize_t lo = 0, hi = n;
    while (hi - lo > 1) {
        uint32_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1], t, p;
        Py_ssize_t lt = lo, i = lo, gt = hi;
        p = x < y ? (y < z ? y : x < z ? z : x) : (x < z ? x : y < z ? z : y); /* the median of three */
        while (i < gt) {
            if (a[i] < p) t = a[lt], a[lt++] = a[i], a[i++] = t;
            else if (a[i] > p) t = a[--gt], a[gt] = a[i], a[i] = t;
            else i++;
        }
        if (k < lt) hi = lt;
        else if (k >= gt) lo = gt;
        else return p;
    }
    return a[lo];
}

/* run_select: the values of 0-based ranks r[0 .. nr - 1] of x[0 .. n - 1] sorted ascending (n < 2^32; every x >= 0
 * and none NaN, so their bit patterns without the sign, -0 as +0, order as they do) into out. The keys' range
 * [lo, hi] first, then SELECT_BINS bins of (key - lo) >> shift (the least shift that fits the range: the bins follow
 * the values, however narrow their range, e.g. a list of those inside quantile brackets), counted into four tables
 * (elements i into table i % 4: runs of equal keys do not wait on one counter); the bins that hold a rank found,
 * their elements gathered and each rank selected among its bin's. Linear in n whatever the ties. -1: no memory;
 * 1: a value below 0 (its sign set, not -0), nothing selected. */
#define SELECT_BINS 16384
MULTIVERSION
static int run_select(const uint32_t *x, Py_ssize_t n, const Py_ssize_t *r, int nr, uint32_t *out) {
    uint32_t *count = (uint32_t *)calloc(4 * SELECT_BINS, sizeof(uint32_t)), *got = NULL, lo = 0xffffffffu, hi = 0,
             neg = 0; /* the greatest bit pattern: above 0x80000000, a value below 0 */
    uint8_t *slot = (uint8_t *)calloc(SELECT_BINS, 1); /* a bin's place among those gathered + 1, or 0 */
    Py_ssize_t at[255], fill[255], below[255], i, total = 0;
    int in[255], q, nb = 0, b, shift = 0;
    if (!count || !slot) {
        free(count), free(slot);
        return -1;
    }
    for (i = 0; i < n; i++) {
        uint32_t k = x[i] & 0x7fffffffu;
        lo = k < lo ? k : lo, hi = k > hi ? k : hi, neg = x[i] > neg ? x[i] : neg;
    }
    if (neg > 0x80000000u) {
        free(count), free(slot);
        return 1;
    }
    while (n && ((hi - lo) >> shift) >= SELECT_BINS) shift++;
    for (i = 0; i + 4 <= n; i += 4) {
        count[(((x[i] & 0x7fffffffu) - lo) >> shift) * 4]++;
        count[(((x[i + 1] & 0x7fffffffu) - lo) >> shift) * 4 + 1]++;
        count[(((x[i + 2] & 0x7fffffffu) - lo) >> shift) * 4 + 2]++;
        count[(((x[i + 3] & 0x7fffffffu) - lo) >> shift) * 4 + 3]++;
    }
    for (; i < n; i++) count[(((x[i] & 0x7fffffffu) - lo) >> shift) * 4]++;
    for (b = 0; b < SELECT_BINS; b++) /* the four tables' counts into the first */
        count[b] = count[4 * b] + count[4 * b + 1] + count[4 * b + 2] + count[4 * b + 3];
    for (q = 0; q < nr; q++) { /* the bin of rank r[q] and the elements below it */
        Py_ssize_t c = 0;
        for (b = 0; c + (Py_ssize_t)count[b] <= r[q]; b++) c += count[b];
        if (!slot[b]) slot[b] = (uint8_t)++nb, below[nb - 1] = c, at[nb - 1] = total, total += count[b];
        in[q] = slot[b] - 1;
    }
    got = (uint32_t *)malloc((size_t)(total ? total : 1) * sizeof(uint32_t));
    if (!got) {
        free(count), free(slot);
        return -1;
    }
    for (q = 0; q < nb; q++) fill[q] = at[q];
    for (i = 0; i < n; i++) {
        uint32_t k = x[i] & 0x7fffffffu;
        int s = slot[(k - lo) >> shift];
        if (s) got[fill[s - 1]++] = k;
    }
    for (q = 0; q < nr; q++) { /* each rank among its bin's elements (count: fill - at) */
        int s = in[q];
        out[q] = select_u32(got + at[s], fill[s] - at[s], r[q] - below[s]);
    }
    free(count), free(slot), free(got);
    return 0;
}

/* select(values, ranks) -> list of float: the values of 0-based ranks (at most 255) of float32 values, none NaN,
 * sorted ascending (run_select); None where a value is below 0 */
static PyObject *native_select(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *ranks_o, *fast = NULL, *res = NULL;
    Py_ssize_t r[255], n;
    uint32_t out[255];
    int nr = 0, q, rc = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*O", &buf, &ranks_o)) return NULL;
    n = buf.len / 4;
    fast = PySequence_Fast(ranks_o, "select: ranks must be a sequence of ints");
    if (fast) {
        nr = (int)(PySequence_Fast_GET_SIZE(fast) < 256 ? PySequence_Fast_GET_SIZE(fast) : 256);
        if (buf.len % 4 || n >= ((Py_ssize_t)1 << 32) || nr > 255)
            PyErr_SetString(PyExc_ValueError, "select: float32 values (fewer than 2^32) and at most 255 ranks");
        for (q = 0; !PyErr_Occurred() && q < nr; q++) {
            r[q] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(fast, q));
            if (!PyErr_Occurred() && (r[q] < 0 || r[q] >= n))
                PyErr_SetString(PyExc_ValueError, "select: a rank outside the values");
        }
    }
    if (fast && !PyErr_Occurred() && nr) {
        NOGIL_IF(n, rc = run_select((const uint32_t *)buf.buf, n, r, nr, out));
        if (rc < 0) PyErr_NoMemory();
    }
    if (fast && !PyErr_Occurred() && rc == 1) {
        Py_INCREF(Py_None);
        res = Py_None;
        nr = 0;
    } else if (fast && !PyErr_Occurred())
        res = PyList_New(nr);
    for (q = 0; res && q < nr; q++) {
        PyObject *v = PyFloat_FromDouble((double)u2f(out[q]));
        if (!v) {
            Py_CLEAR(res);
            break;
        }
        PyList_SET_ITEM(res, q, v);
    }
    Py_XDECREF(fast);
    PyBuffer_Release(&buf);
    return res;
}

static PyObject *native_hist1(PyObject *self, PyObject *args) {
    Py_buffer src, bins, hist;
    Py_ssize_t n, nb;
    int portable = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*ny*w*|i", &src, &n, &bins, &hist, &portable)) return NULL;
    nb = bins.len / 4;
    if (!check_len(&src, DT_F32, n, "input") || nb < 1 || nb > HIST1_BINS || bins.len % 4 ||
        hist.len < nb * 65536 * 8) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "hist1 takes 1 to 16 uint32 bins and 65536 uint64 counts per bin");
        PyBuffer_Release(&src);
        PyBuffer_Release(&bins);
        PyBuffer_Release(&hist);
        return NULL;
    }
    NOGIL_IF(n, run_hist1((const uint32_t *)src.buf, n, (const uint32_t *)bins.buf, (int)nb, (uint64_t *)hist.buf,
                          portable));
    PyBuffer_Release(&src);
    PyBuffer_Release(&bins);
    PyBuffer_Release(&hist);
    Py_RETURN_NONE;
}

static int sub_args(Py_buffer *src, int dt, Py_ssize_t n, Py_buffer *sub) {
    if (!check_dt(dt) || !check_len(src, dt, n, "input") || sub->len < 4 * 32768 * 4) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "sub-histograms need 4 x 32768 uint32 bins");
        PyBuffer_Release(src);
        PyBuffer_Release(sub);
        return 0;
    }
    return 1;
}

/* hist0(buf, dt, n, sub) — level-0 bins counted into the caller's 4 x 32768 uint32 sub-histograms, kept across calls
 * (the caller sums the four, and empties them before 2^32 elements). */
static PyObject *native_hist0(PyObject *self, PyObject *args) {
    Py_buffer src, sub;
    int dt;
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*inw*", &src, &dt, &n, &sub) || !sub_args(&src, dt, n, &sub)) return NULL;
    NOGIL_IF(n, run_hist0(src.buf, dt, n, (uint32_t *)sub.buf));
    PyBuffer_Release(&src);
    PyBuffer_Release(&sub);
    Py_RETURN_NONE;
}

/* bracket(buf, dt, n, lo, hi, sub, portable[, col, ncol]) -> elements with a level-0 bin above hi; bins lo..hi
 * counted into sub (as hist0). portable: 0 the fastest loop, 1 plain C, 2 AVX2 at most (tests compare them). With a
 * uint32 buffer col (float32 only) and the count ncol already in it, the inexact |x| patterns inside the bracket are
 * appended (see collect_t) and the result is (above, ncol), ncol = -1 once col overflowed (or was -1 already). */
static PyObject *native_bracket(PyObject *self, PyObject *args) {
    Py_buffer src, sub, colbuf = {0};
    int dt, lo, hi, portable;
    Py_ssize_t n, ncol = 0;
    uint64_t above;
    collect_t col, *cp = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iniiw*i|w*n", &src, &dt, &n, &lo, &hi, &sub, &portable, &colbuf, &ncol) ||
        !sub_args(&src, dt, n, &sub)) {
        if (colbuf.obj) PyBuffer_Release(&colbuf);
        return NULL;
    }
    if (lo < 0 || hi < lo || hi > 32767 || (colbuf.obj && (dt != DT_F32 || ncol < -1 || ncol > colbuf.len / 4))) {
        PyErr_SetString(PyExc_ValueError, colbuf.obj && (dt != DT_F32 || ncol < -1 || ncol > colbuf.len / 4)
                                              ? "bracket collects float32 only, 0 <= ncol <= len(col) or -1"
                                              : "bracket needs 0 <= lo <= hi <= 32767");
        PyBuffer_Release(&src);
        PyBuffer_Release(&sub);
        if (colbuf.obj) PyBuffer_Release(&colbuf);
        return NULL;
    }
    if (colbuf.obj) {
        col.buf = (uint32_t *)colbuf.buf;
        col.cap = colbuf.len / 4;
        col.n = ncol;
        cp = &col;
    }
    Py_BEGIN_ALLOW_THREADS
#if HAVE_BRACKET_AVX512
    if (!portable && avx512_ok())
        above = bracket_avx512(src.buf, dt, n, lo, hi, (uint32_t *)sub.buf, cp);
    else
#endif
#if HAVE_F16C_PATH
        if (portable != 1 && avx2_ok())
        above = bracket_avx2(src.buf, dt, n, lo, hi, (uint32_t *)sub.buf, cp);
    else
#endif
        above = bracket_loop(src.buf, dt, n, lo, hi, (uint32_t *)sub.buf, cp);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&sub);
    if (!cp) return PyLong_FromUnsignedLongLong(above);
    PyBuffer_Release(&colbuf);
    return Py_BuildValue("Kn", (unsigned long long)above, col.n);
}

/* bracket_diff(a, a_dt, b, b_dt, n, lo, hi, sub, portable, col, ncol) -> (above, ncol): bracket() of the float32
 * difference a - b (diff()'s values), made a few thousand elements at a time in a buffer that stays in L1 instead
 * of a whole block written out and read back; collects into col as bracket() does (ncol = -1: no collecting). */
#define DIFF_CHUNK 2048
static PyObject *native_bracket_diff(PyObject *self, PyObject *args) {
    Py_buffer a, b, sub, colbuf;
    int a_dt, b_dt, lo, hi, portable;
    Py_ssize_t n, ncol, off;
    uint64_t above = 0;
    collect_t col;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iy*iniiw*iw*n", &a, &a_dt, &b, &b_dt, &n, &lo, &hi, &sub, &portable, &colbuf,
                          &ncol))
        return NULL;
    if (!check_dt(a_dt) || !check_dt(b_dt) || !check_len(&a, a_dt, n, "a") || !check_len(&b, b_dt, n, "b") ||
        sub.len < 4 * 32768 * 4 || lo < 0 || hi < lo || hi > 32767 || ncol < -1 || ncol > colbuf.len / 4) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bracket_diff needs 4 x 32768 uint32 bins, 0 <= lo <= hi <= 32767 and "
                                              "0 <= ncol <= len(col) or -1");
        PyBuffer_Release(&a);
        PyBuffer_Release(&b);
        PyBuffer_Release(&sub);
        PyBuffer_Release(&colbuf);
        return NULL;
    }
    col.buf = (uint32_t *)colbuf.buf;
    col.cap = colbuf.len / 4;
    col.n = ncol;
    Py_BEGIN_ALLOW_THREADS
    float tmp[DIFF_CHUNK] __attribute__((aligned(64)));
    off = -1; /* the vector loops of two 16-bit inputs; else chunks of differences */
#if HAVE_BRACKET_AVX512
    if (!portable && avx512_ok() && a_dt != DT_F32 && b_dt != DT_F32 && ((a_dt != DT_F16 && b_dt != DT_F16) || f16c_ok())) {
        above = bracket_diff_avx512((const uint16_t *)a.buf, a_dt, (const uint16_t *)b.buf, b_dt, n, lo, hi,
                                    (uint32_t *)sub.buf, &col);
        off = n;
    }
#endif
#if HAVE_F16C_PATH
    if (off < 0 && portable != 1 && avx2_ok() && f16c_ok() && a_dt != DT_F32 && b_dt != DT_F32) {
        above = bracket_diff_avx2((const uint16_t *)a.buf, a_dt, (const uint16_t *)b.buf, b_dt, n, lo, hi,
                                  (uint32_t *)sub.buf, &col);
        off = n;
    }
#endif
    for (off = off < 0 ? 0 : off; off < n; off += DIFF_CHUNK) {
        Py_ssize_t m = n - off < DIFF_CHUNK ? n - off : DIFF_CHUNK;
        run_diff(tmp, DT_F32, (const char *)a.buf + off * dt_size(a_dt), a_dt,
                 (const char *)b.buf + off * dt_size(b_dt), b_dt, m);
#if HAVE_BRACKET_AVX512
        if (!portable && avx512_ok())
            above += bracket_avx512(tmp, DT_F32, m, lo, hi, (uint32_t *)sub.buf, &col);
        else
#endif
#if HAVE_F16C_PATH
            if (portable != 1 && avx2_ok())
            above += bracket_avx2(tmp, DT_F32, m, lo, hi, (uint32_t *)sub.buf, &col);
        else
#endif
            above += bracket_loop(tmp, DT_F32, m, lo, hi, (uint32_t *)sub.buf, &col);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&sub);
    PyBuffer_Release(&colbuf);
    return Py_BuildValue("Kn", (unsigned long long)above, col.n);
}

/* fast_bracket() -> whether bracket() has its vector loop on this CPU (else a plain histogram pass is faster). */
static PyObject *native_fast_bracket(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(avx512_ok() || avx2_ok());
}

/* philox(key, start, n, out_float32_buffer[, path]): the uniforms of elements start .. start+n-1 (tl.rand4x(key,
 * i // 4)[i % 4]) on the CPU (tests, reference). path 0: the fastest loop this CPU has; 1: AVX2 (where the CPU has
 * it); 2: plain C — the tests compare them. */
static PyObject *native_philox(PyObject *self, PyObject *args) {
    unsigned long long key, start;
    Py_ssize_t n, j;
    Py_buffer out;
    int path = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnw*|i", &key, &start, &n, &out, &path)) return NULL;
    if (out.len < n * 4) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "output buffer too small");
        return NULL;
    }
    for (j = 0; j < n; j += TILE) {
        Py_ssize_t m = n - j < TILE ? n - j : TILE;
        float *dst = (float *)out.buf + j;
        uint64_t g = (uint64_t)start + (uint64_t)j;
        philox_run(dst, g, m, (uint32_t)key, (uint32_t)(key >> 32), 0, path);
    }
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* sce_finish(idx, var, tau, count, thr, bits, sums): the listed entries j < count (sce's list) with var >= thr: their
 * bit set (bits[idx / 8], bit idx % 8; bits from the list's first element) and sums[i] += (double)tau_i^2, in list
 * order. tau: k = len(sums) / 8 rows of len(tau) / k words. */
static PyObject *native_sce_finish(PyObject *self, PyObject *args) {
    Py_buffer ib, vb, tb, bb, sb;
    Py_ssize_t cnt, j, stride;
    double thr;
    int i, k;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*ndw*w*", &ib, &vb, &tb, &cnt, &thr, &bb, &sb)) return NULL;
    k = (int)(sb.len / 8);
    stride = k ? tb.len / 4 / k : 0;
    if (k < 1 || cnt < 0 || ib.len / 4 < cnt || vb.len / 4 < cnt || stride < cnt) {
        PyErr_SetString(PyExc_ValueError, "sce_finish: count within the lists, one float64 sum per model");
        k = -1;
    }
    for (j = 0; k > 0 && j < cnt; j++)
        if ((Py_ssize_t)(((const uint32_t *)ib.buf)[j] >> 3) >= bb.len) {
            PyErr_SetString(PyExc_ValueError, "sce_finish: an index past the bits");
            k = -1;
        }
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < k; i++) { /* one model at a time, its sum in a register; a dropped entry adds +0.0 (the sums are
                                * never -0.0), its square masked off: a branch here was taken at random */
        const float *t = (const float *)tb.buf + (size_t)i * stride, *v = (const float *)vb.buf, f = (float)thr;
        double acc = ((double *)sb.buf)[i];
        for (j = 0; j < cnt; j++) {
            double sq = (double)t[j] * (double)t[j];
            uint64_t u;
            memcpy(&u, &sq, sizeof u);
            u &= (uint64_t)0 - (uint64_t)(v[j] >= f);
            memcpy(&sq, &u, sizeof sq);
            acc += sq;
        }
        ((double *)sb.buf)[i] = acc;
    }
    for (j = 0; k > 0 && j < cnt; j++) {
        const uint32_t x = ((const uint32_t *)ib.buf)[j];
        ((uint8_t *)bb.buf)[x >> 3] |= (uint8_t)((((const float *)vb.buf)[j] >= (float)thr) << (x & 7));
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ib), PyBuffer_Release(&vb), PyBuffer_Release(&tb), PyBuffer_Release(&bb), PyBuffer_Release(&sb);
    if (k < 0) return NULL;
    Py_RETURN_NONE;
}

/* divide_by(buf, c, lanes) -> whether it ran: buf (float64, a multiple of `lanes` long) /= c in place by div_recip4
 * (lanes 4; any dividend) or div_recip8 (8: finite dividends, no -0), where recip_for(c) is not 0 and the CPU has
 * the path; tests check them against a division. */
static PyObject *native_divide_by(PyObject *self, PyObject *args) {
    Py_buffer b;
    double c;
    int lanes, ran = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*di", &b, &c, &lanes)) return NULL;
    if ((lanes != 4 && lanes != 8) || b.len % (lanes * 8)) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "divide_by: lanes 4 or 8, a buffer of whole vectors");
        return NULL;
    }
#if HAVE_F16C_PATH
    if (recip_for(c) != 0.0 && lanes == 4 && fma_ok()) ran = (divide4((double *)b.buf, b.len / 8, c), 1);
#endif
#if HAVE_AVX512VL_PATH
    if (recip_for(c) != 0.0 && lanes == 8 && avx512vlbw_ok()) ran = (divide8((double *)b.buf, b.len / 8, c), 1);
#endif
    PyBuffer_Release(&b);
    return PyBool_FromLong(ran);
}

/* use_fast_merge(flag) -> previous flag: whether merge() and sce() may take their fused vector paths (fast_merge,
 * sce_tile_avx512, sce_tile_avx2; tests compare them with the tile loops): 0 none, 1 all, 2 the AVX2 ones only. */
static PyObject *native_use_fast_merge(PyObject *self, PyObject *arg) {
    int prev = use_fast;
    long want = PyLong_AsLong(arg);
    (void)self;
    if (want == -1 && PyErr_Occurred()) return NULL;
    if (want < 0 || want > 2) {
        PyErr_SetString(PyExc_ValueError, "use_fast_merge takes 0, 1 or 2");
        return NULL;
    }
    use_fast = (int)want;
    return PyLong_FromLong(prev);
}

/* use_hardware_f16(flag) -> previous: switch the F16C path off/on (tests run both conversion paths). */
static PyObject *native_use_hardware_f16(PyObject *self, PyObject *arg) {
    int prev = f16c_ok();
    int want = PyObject_IsTrue(arg);
    (void)self;
    if (want < 0) return NULL;
#if HAVE_F16C_PATH
    use_f16c = -1;
    if (!want || !f16c_ok()) use_f16c = 0;
#endif
    return PyBool_FromLong(prev);
}

static PyMethodDef methods[] = {
    {"sce_finish", native_sce_finish, METH_VARARGS, "sce_finish(idx, var, tau, count, thr, bits, sums); see sce()"},
    {"divide_by", native_divide_by, METH_VARARGS, "divide_by(buf, c, lanes) -> ran; run_sce's division (tests)"},
    {"use_fast_merge", native_use_fast_merge, METH_O,
     "use_fast_merge(flag) -> previous; merge()'s and sce()'s fused vector paths (0: none, 1: all, 2: AVX2 at most)"},
    {"use_hardware_f16", native_use_hardware_f16, METH_O,
     "use_hardware_f16(flag) -> previous; use the F16C instructions for float16 when the CPU has them"},
    {"diff", native_diff, METH_VARARGS, "diff(out, out_dt, a, a_dt, b, b_dt, n) -> flags; out = round(a - b)"},
    {"merge", native_merge, METH_VARARGS,
     "merge(outs, base, base_dt, n, terms, sign, normalize, elem_offset) -> flags (see capmerge/compute.py)"},
    {"select", native_select, METH_VARARGS,
     "select(values, ranks) -> list; the float32 values (none NaN) of 0-based ranks, ascending; None if one is < 0"},
    {"hist1", native_hist1, METH_VARARGS,
     "hist1(buf, n, bins, hist[, portable]) -> None; float32 level-1 |x| histograms of up to 16 level-0 bins (uint32) "
     "in one pass"},
    {"hist0", native_hist0, METH_VARARGS,
     "hist0(buf, dt, n, sub) -> None; level-0 |x| bins counted into 4 x 32768 uint32 sub-histograms"},
    {"bracket", native_bracket, METH_VARARGS,
     "bracket(buf, dt, n, lo, hi, sub, portable) -> count of bins above hi; bins lo..hi counted into sub"},
    {"bracket_diff", native_bracket_diff, METH_VARARGS,
     "bracket_diff(a, a_dt, b, b_dt, n, lo, hi, sub, portable, col, ncol) -> (above, ncol); bracket() of a - b"},
    {"fast_bracket", native_fast_bracket, METH_NOARGS, "fast_bracket() -> bool; bracket() has a vector loop here"},
    {"moments", native_moments, METH_VARARGS,
     "moments(vectors, base, base_dt, n, elem_offset, want_gram, out) -> None; Gram matrix and L1 norms, added to out"},
    {"sce", native_sce, METH_VARARGS,
     "sce(models, base, base_dt, n, elem_offset, var_out, thr, bits, sums) -> nnz; SCE's variance, mask and energies"},
    {"importance", native_importance, METH_VARARGS,
     "importance(a, a_dt, b, b_dt, n, offset, m, scale, thr, out, bits[, part[, band_lo, band_idx, band_val]]) -> "
     "count of I < 0 (and the band's count); I = |a - b| * scale[row] (arcee_fusion)"},
    {"row_kl", native_row_kl, METH_VARARGS,
     "row_kl(a, a_dt, b, b_dt, rows, m, out[, path]) -> count of I < 0; the rows' KL(softmax(a) + 1e-8 || "
     "softmax(b) + 1e-8) into out (arcee_fusion)"},
    {"row_kl_scan", native_row_kl_scan, METH_VARARGS,
     "row_kl_scan(a, a_dt, b, b_dt, rows, m, out, offset, brackets, col, bits, band, idx, val[, path]) -> (count of "
     "I < 0, NaN count, below each bracket, listed inside them, band entries): row_kl with each row's I scanned "
     "(arcee_fusion)"},
    {"della", native_della, METH_VARARGS,
     "della(terms, b, b_dt, rows, m, elem_offset[, path]) -> [(l1, kept), ...]; DELLA's keep bits of each term "
     "(a, a_dt, key, xl, xh, bits) (path 0: the fastest loops, 1: AVX2 at most, 2: plain C)"},
    {"philox_ints", native_philox_ints, METH_VARARGS,
     "philox_ints(key, start, n, out[, path]) -> None; tl.rand's integers (before the scaling) for start .. start+n-1"},
    {"philox", native_philox, METH_VARARGS,
     "philox(key, start, n, out[, path]) -> None; tl.rand4x(key, i // 4)[i % 4] for i in start .. start+n-1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "capmerge._native", "capmerge CPU compute kernel", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "F32", DT_F32);
    PyModule_AddIntConstant(m, "F16", DT_F16);
    PyModule_AddIntConstant(m, "BF16", DT_BF16);
#if HAVE_F16C_PATH
    compact_lut_init();
#endif
    return m;
}
