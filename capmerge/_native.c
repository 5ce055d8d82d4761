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
        use_f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
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

MULTIVERSION
static int run_merge(void *out, int out_dt, const void *base, int base_dt, Py_ssize_t n, int k, void **vb,
                     const int *vdt, const float *vw, float alpha) {
    float acc[TILE], d[TILE], t[TILE];
    Py_ssize_t off, j;
    int flags = 0, i;
    for (off = 0; off < n; off += TILE) {
        Py_ssize_t m = n - off < TILE ? n - off : TILE;
        int f;
        for (j = 0; j < m; j++) d[j] = 0.0f;
        for (i = 0; i < k; i++) {
            float w = vw[i];
            load_tile(t, vb[i], vdt[i], off, m);
            for (j = 0; j < m; j++) d[j] = d[j] + w * t[j];
        }
        load_tile(acc, base, base_dt, off, m);
        if (k > 0) /* no vectors: a pure cast, so -0.0 stays -0.0 */
            for (j = 0; j < m; j++) acc[j] = acc[j] + alpha * d[j];
        f = store_tile(out, out_dt, off, acc, m);
        flags |= f & 5;
        if ((f & 4) && !(flags & 2)) {
            for (j = off; j < off + m; j++) {
                int fin = !out_finite_at(out, out_dt, j) && is_finite_at(base, base_dt, j);
                for (i = 0; fin && i < k; i++) fin = is_finite_at(vb[i], vdt[i], j);
                if (fin) {
                    flags |= 2;
                    break;
                }
            }
        }
    }
    return flags;
}

static int check_dt(int dt) {
    if (dt != DT_F32 && dt != DT_F16 && dt != DT_BF16) {
        PyErr_Format(PyExc_ValueError, "unsupported dtype code %d", dt);
        return 0;
    }
    return 1;
}

static Py_ssize_t dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

static int check_len(Py_buffer *b, int dt, Py_ssize_t n, const char *what) {
    if (b->len < n * dt_size(dt)) {
        PyErr_Format(PyExc_ValueError, "%s buffer too small: %zd bytes for %zd elements", what, b->len, n);
        return 0;
    }
    return 1;
}

/* diff(out, out_dt, a, a_dt, b, b_dt, n) -> flags;  out = round(a - b) */
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
    Py_BEGIN_ALLOW_THREADS
    flags = run_diff(out.buf, out_dt, a.buf, a_dt, b.buf, b_dt, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyLong_FromLong(flags);
}

/* merge(out, out_dt, base, base_dt, n, vectors, alpha) -> flags
 * vectors: sequence of (buffer, dtype_code, weight). out = round(base + alpha * sum_i(w_i * v_i)). */
static PyObject *native_merge(PyObject *self, PyObject *args) {
    Py_buffer out, base;
    Py_buffer vb[MAX_VECTORS];
    int vdt[MAX_VECTORS];
    float vw[MAX_VECTORS];
    int out_dt, base_dt, k = 0, i, flags = 0, ok = 1;
    Py_ssize_t n;
    double alpha_d;
    PyObject *vecs, *seq = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*iy*inOd", &out, &out_dt, &base, &base_dt, &n, &vecs, &alpha_d)) return NULL;
    seq = PySequence_Fast(vecs, "vectors must be a sequence");
    if (!seq) ok = 0;
    if (ok && PySequence_Fast_GET_SIZE(seq) > MAX_VECTORS) {
        PyErr_SetString(PyExc_ValueError, "too many vectors for the native kernel");
        ok = 0;
    }
    ok = ok && check_dt(out_dt) && check_dt(base_dt) && check_len(&out, out_dt, n, "output") &&
         check_len(&base, base_dt, n, "base");
    if (ok) {
        Py_ssize_t cnt = PySequence_Fast_GET_SIZE(seq);
        for (i = 0; i < cnt; i++) {
            double w;
            PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyArg_ParseTuple(item, "y*id", &vb[k], &vdt[k], &w)) {
                ok = 0;
                break;
            }
            k++;
            vw[k - 1] = (float)w;
            if (!check_dt(vdt[k - 1]) || !check_len(&vb[k - 1], vdt[k - 1], n, "vector")) {
                ok = 0;
                break;
            }
        }
    }
    if (ok) {
        float alpha = (float)alpha_d;
        void *vp[MAX_VECTORS];
        for (i = 0; i < k; i++) vp[i] = vb[i].buf;
        Py_BEGIN_ALLOW_THREADS
        flags = run_merge(out.buf, out_dt, base.buf, base_dt, n, k, vp, vdt, vw, alpha);
        Py_END_ALLOW_THREADS
    }
    for (i = 0; i < k; i++) PyBuffer_Release(&vb[i]);
    Py_XDECREF(seq);
    PyBuffer_Release(&out);
    PyBuffer_Release(&base);
    if (!ok) return NULL;
    return PyLong_FromLong(flags);
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
    {"use_hardware_f16", native_use_hardware_f16, METH_O,
     "use_hardware_f16(flag) -> previous; use the F16C instructions for float16 when the CPU has them"},
    {"diff", native_diff, METH_VARARGS, "diff(out, out_dt, a, a_dt, b, b_dt, n) -> flags; out = round(a - b)"},
    {"merge", native_merge, METH_VARARGS,
     "merge(out, out_dt, base, base_dt, n, [(vec, dt, w), ...], alpha) -> flags; out = round(base + alpha*sum(w*v))"},
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
    return m;
}
