/* fp4fmt._native: the fast path of the fp4fmt v1 RTN quantizer (spec §5).
 *
 * It computes exactly what fp4fmt/schemes.py computes with numpy, one block at a time, in IEEE-754
 * single precision (built with -fno-fast-math -ffp-contract=off, so no FMA contraction or reassociation
 * changes a result). The tests hold the two implementations to identical bytes. Nothing here is
 * normative: the spec and the numpy reference are; this file is only faster.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { SCHEME_NVFP4 = 0, SCHEME_MXFP4 = 1 };
enum { RULE_FLOOR = 0, RULE_RCEIL = 1, RULE_EVEN = 2 };

static float E4M3_TABLE[256];

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0) {
        float f = (float)man * 5.9604644775390625e-8f; /* man * 2^-24, exact */
        return u2f(f2u(f) | sign);
    }
    if (exp == 31) return u2f(sign | 0x7F800000u | (man << 13));
    return u2f(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline float load(const void *src, int dt, Py_ssize_t i) {
    switch (dt) {
    case DT_F32: return ((const float *)src)[i];
    case DT_BF16: return u2f((uint32_t)((const uint16_t *)src)[i] << 16);
    default: return f16_to_f32(((const uint16_t *)src)[i]);
    }
}

/* E2M1 code of q: RNE, saturating at 6, sign kept (spec §4.1). */
static inline uint8_t e2m1(float q) {
    float a = fabsf(q);
    uint8_t m = (uint8_t)((a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) +
                          (a >= 3.5f) + (a > 5.0f));
    return (uint8_t)(m | ((f2u(q) >> 28) & 8u));
}

static inline int floor_log2(float a) { /* a finite, > 0; exact for subnormals */
    uint32_t b = f2u(a) & 0x7FFFFFFFu;
    if (b >= 0x00800000u) return (int)(b >> 23) - 127;
    int e;
    frexpf(a, &e);
    return e - 1;
}

/* E4M3 code of v in [2^-9, 448]: RNE on the float32 bits (spec §4.2). */
static inline uint8_t e4m3_pos(float v) {
    uint32_t b = f2u(v);
    if (b < 0x3C800000u) { /* below 2^-6: steps of 2^-9, rounded to an integer 0..8 by the FPU (RNE) */
        float t = v * 512.0f + 8388608.0f;
        return (uint8_t)(t - 8388608.0f);
    }
    uint32_t r = b + 0x7FFFFu + ((b >> 20) & 1u); /* RNE to 3 mantissa bits */
    uint32_t code = (r >> 20) - (120u << 3);
    return (uint8_t)(code > 0x7Eu ? 0x7Eu : code);
}

static inline int mx_exponent(float amax, int rule) {
    int e;
    if (!(amax > 0.0f)) return -127;
    uint32_t b = f2u(amax);
    if (rule == RULE_FLOOR) {
        e = floor_log2(amax) - 2;
    } else if (rule == RULE_EVEN) {
        int fl = floor_log2(amax);
        if (b >= 0x00800000u)
            e = fl + ((b & 0x7FFFFFu) >= 0x600000u) - 2;
        else
            e = fl + (ldexpf(amax, -fl) >= 1.75f) - 2;
    } else {
        float d = amax / 6.0f;
        if (!(d > 0.0f)) return -127;
        uint32_t db = f2u(d);
        if (db >= 0x00800000u) {
            e = (int)(db >> 23) - 127 + ((db & 0x7FFFFFu) != 0);
        } else {
            int ex;
            float m = frexpf(d, &ex);
            e = (m == 0.5f) ? ex - 1 : ex;
        }
    }
    if (e < -127) e = -127;
    if (e > 127) e = 127;
    return e;
}

/* scan(src, dtype) -> (amax, index of the first non-finite element or -1) */
static PyObject *py_scan(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int dt;
    if (!PyArg_ParseTuple(args, "y*i", &buf, &dt)) return NULL;
    Py_ssize_t bad = -1;
    double amax = 0.0;
    Py_BEGIN_ALLOW_THREADS
    if (dt == DT_F32) {
        const uint32_t *p = (const uint32_t *)buf.buf;
        Py_ssize_t n = buf.len / 4;
        uint32_t m = 0, lim = 0x7F800000u;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t a = p[i] & 0x7FFFFFFFu;
            m = a > m ? a : m;
        }
        if (m >= lim)
            for (Py_ssize_t i = 0; i < n; i++)
                if ((p[i] & 0x7FFFFFFFu) >= lim) { bad = i; break; }
        amax = u2f(m);
    } else {
        const uint16_t *p = (const uint16_t *)buf.buf;
        Py_ssize_t n = buf.len / 2;
        uint16_t m = 0, lim = dt == DT_BF16 ? 0x7F80u : 0x7C00u;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint16_t a = p[i] & 0x7FFFu;
            m = a > m ? a : m;
        }
        if (m >= lim)
            for (Py_ssize_t i = 0; i < n; i++)
                if ((p[i] & 0x7FFFu) >= lim) { bad = i; break; }
        amax = dt == DT_BF16 ? u2f((uint32_t)m << 16) : f16_to_f32(m);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return Py_BuildValue("dn", amax, bad);
}

/* Eight elements at a time with GCC vector extensions: q = x / f, E2M1 code by counting the thresholds
 * passed (a comparison yields -1 per lane, so the negated sum is the count), sign in bit 3, then pairs
 * packed low nibble first: viewing two 32-bit codes as one 64-bit lane, lane | lane >> 28 puts
 * code[2i] | code[2i+1] << 4 in the lane's low byte. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint64_t v4u __attribute__((vector_size(32)));

typedef uint16_t v8h __attribute__((vector_size(16)));

/* Eight float32 bit patterns from 8 source elements: float32 as is, bfloat16 widened (<< 16). */
static inline __attribute__((always_inline)) v8i load8_f32(const uint32_t *p) {
    v8i v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline __attribute__((always_inline)) v8i load8_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, v8i) << 16;
}

typedef uint8_t v32b __attribute__((vector_size(32)));

/* E2M1 codes of 8 elements (one per int32 lane): q = x / f, then the count of thresholds passed (a
 * comparison yields -1 per lane, so the negated sum is the count), sign in bit 3. */
static inline __attribute__((always_inline)) v8i codes8(v8i xi, float f) {
    v8i qi = (v8i)((v8f)xi / f);
    v8f a = (v8f)(qi & 0x7FFFFFFF);
    v8i m = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
    return -m | ((qi >> 28) & 8);
}

/* Pack the 16 codes of two vectors into 8 bytes, element 2i in the low nibble. Viewing two 32-bit codes
 * as one 64-bit lane, lane | lane >> 28 puts code[2i] | code[2i+1] << 4 in the lane's low byte; the
 * bytes of the second vector go one byte up, and one shuffle gathers the eight bytes in order. */
static inline __attribute__((always_inline)) void pack16(v8i lo, v8i hi, uint8_t *out) {
    v4u a = (v4u)lo, b = (v4u)hi;
    a = a | (a >> 28);
    b = b | (b >> 28);
    v32b both = (v32b)((a & 0xFF) | ((b & 0xFF) << 8));
    v32b g = __builtin_shuffle(both, (v32b){0, 8, 16, 24, 1, 9, 17, 25, 0, 0, 0, 0, 0, 0, 0, 0,
                                           0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
    memcpy(out, &g, 8);
}

/* Largest lane of a vector of non-negative int32: three halving steps. */
static inline __attribute__((always_inline)) int32_t hmax8(v8i m) {
    v8i t = __builtin_shuffle(m, (v8i){4, 5, 6, 7, 0, 1, 2, 3}), gt = t > m;
    m = (t & gt) | (m & ~gt);
    t = __builtin_shuffle(m, (v8i){2, 3, 0, 1, 6, 7, 4, 5}), gt = t > m;
    m = (t & gt) | (m & ~gt);
    t = __builtin_shuffle(m, (v8i){1, 0, 3, 2, 5, 4, 7, 6}), gt = t > m;
    m = (t & gt) | (m & ~gt);
    return m[0];
}

/* A block whose factor is 0: every element is a zero with the element's sign. */
static inline __attribute__((always_inline)) v8i zero_codes8(v8i xi) { return (xi >> 28) & 8; }

/* Running error statistics of a row, eight lanes wide: sum of e^2 and x^2 (float lanes, added into doubles
 * per row) and the largest |e| (as bits: non-negative floats order like their bit patterns), where
 * e = x - y and y = fl32(E2M1(code) * f) is exactly what dequantization gives (spec §5.3). */
typedef struct {
    v8f e2, x2;
    v8i emax;
} acc8;

static inline __attribute__((always_inline)) v8i select8(v8i m, v8i x, v8i y) { return (m & x) | (~m & y); }

static inline __attribute__((always_inline)) void stats8(v8i xi, v8i code, float f, acc8 *acc) {
    const v8f grid = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f}; /* E2M1 magnitude of codes 0..7 */
    v8f mag = __builtin_shuffle(grid, code & 7);
    v8f y = (v8f)((v8i)(mag * f) | ((code & 8) << 28));
    v8f x = (v8f)xi, e = x - y;
    acc->e2 += e * e;
    acc->x2 += x * x;
    v8i ea = (v8i)e & 0x7FFFFFFF;
    acc->emax = select8(ea > acc->emax, ea, acc->emax);
}

static void fold_stats(const acc8 *acc, double *sum_e2, double *sum_x2, uint32_t *max_err) {
    for (int i = 0; i < 8; i++) {
        *sum_e2 += acc->e2[i];
        *sum_x2 += acc->x2[i];
        uint32_t m = (uint32_t)acc->emax[i];
        *max_err = m > *max_err ? m : *max_err;
    }
}

/* NVFP4 block scales (spec §5.1): scale code and factor f of n blocks, eight at a time. The E4M3 value is
 * read off the rounded float32 bits (normal range) or the rounded step count (subnormal range), which is
 * exactly E4M3_TABLE[code]. Vector selects are written as masks: (m & x) | (~m & y). */
static inline __attribute__((always_inline)) void nvfp4_scales(const float *amax, Py_ssize_t n, float s2,
                                                             uint8_t *scales, float *fac) {
    const float six_s2 = 6.0f * s2;
    Py_ssize_t b = 0;
    for (; b + 8 <= n; b += 8) {
        v8f a, v;
        memcpy(&a, amax + b, sizeof a);
        v = a / six_s2;
        const v8f lo = (v8f){0} + 0.001953125f, hi = (v8f){0} + 448.0f; /* clamp to [2^-9, 448] */
        v = (v8f)select8(v < lo, (v8i)lo, (v8i)v);
        v = (v8f)select8(v > hi, (v8i)hi, (v8i)v);
        v8i bits = (v8i)v;
        v8i r = bits + 0x7FFFF + ((bits >> 20) & 1); /* RNE to 3 mantissa bits */
        v8f steps = (v * 512.0f + 8388608.0f) - 8388608.0f; /* RNE to a multiple of 2^-9 */
        v8i sub = bits < 0x3C800000, zero = a == 0.0f;
        v8i code = select8(sub, __builtin_convertvector(steps, v8i), (r >> 20) - (120 << 3)) & ~zero;
        v8f sd = (v8f)(select8(sub, (v8i)(steps * 0.001953125f), r & (int32_t)0xFFF00000u) & ~zero);
        v8f f = sd * s2;
        memcpy(fac + b, &f, sizeof f);
        for (int i = 0; i < 8; i++) scales[b + i] = (uint8_t)code[i];
    }
    for (; b < n; b++) {
        float a = amax[b];
        float v = a / six_s2;
        v = v < 0.001953125f ? 0.001953125f : v;
        v = v > 448.0f ? 448.0f : v;
        uint8_t sc = a == 0.0f ? 0 : e4m3_pos(v);
        scales[b] = sc;
        fac[b] = E4M3_TABLE[sc] * s2;
    }
}

/* One row of blocks: x holds the row's padded_k float32 values. Written so that gcc vectorizes the
 * per-element loops; the target_clones attribute adds an AVX2 build picked at load time. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FP4_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FP4_CLONES
#endif

/* Three passes per row, so that no block waits on the previous one's scale: block amax, then scale code
 * and factor f of every block, then the elements (q = x / f, E2M1). `work` holds 2 * nb floats. */
#define DEFINE_QUANT_ROW(B, NAME, T, LOAD8)                                                                 \
    FP4_CLONES static void NAME(const T *x, Py_ssize_t nb, int scheme, int rule, float s2, uint8_t *codes,    \
                                uint8_t *scales, float *work, acc8 *acc) {                                  \
        float *amax = work, *fac = work + nb;                                                               \
        for (Py_ssize_t b = 0; b < nb; b++) {                                                               \
            v8i m = {0, 0, 0, 0, 0, 0, 0, 0};                                                               \
            for (int j = 0; j < B; j += 8) { /* |x| bit patterns order like the values */                   \
                v8i a = LOAD8(x + b * B + j) & 0x7FFFFFFF;                                                  \
                v8i gt = a > m;                                                                             \
                m = (a & gt) | (m & ~gt);                                                                   \
            }                                                                                               \
            amax[b] = u2f((uint32_t)hmax8(m));                                                              \
        }                                                                                                   \
        if (scheme == SCHEME_NVFP4) {                                                                       \
            nvfp4_scales(amax, nb, s2, scales, fac);                                                        \
        } else {                                                                                            \
            for (Py_ssize_t b = 0; b < nb; b++) {                                                           \
                int e = mx_exponent(amax[b], rule);                                                         \
                scales[b] = (uint8_t)(e + 127);                                                             \
                fac[b] = ldexpf(1.0f, e);                                                                   \
            }                                                                                               \
        }                                                                                                   \
        for (Py_ssize_t b = 0; b < nb; b++) {                                                               \
            const float f = fac[b];                                                                         \
            uint8_t *out = codes + b * (B / 2);                                                             \
            for (int j = 0; j < B; j += 16) {                                                               \
                v8i lo = LOAD8(x + b * B + j), hi = LOAD8(x + b * B + j + 8);                               \
                v8i cl = f == 0.0f ? zero_codes8(lo) : codes8(lo, f);                                       \
                v8i ch = f == 0.0f ? zero_codes8(hi) : codes8(hi, f);                                       \
                pack16(cl, ch, out + j / 2);                                                                \
                if (acc) {                                                                                  \
                    stats8(lo, cl, f, acc);                                                                 \
                    stats8(hi, ch, f, acc);                                                                 \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    }
DEFINE_QUANT_ROW(16, quant_row_16_f32, uint32_t, load8_f32)
DEFINE_QUANT_ROW(32, quant_row_32_f32, uint32_t, load8_f32)
DEFINE_QUANT_ROW(16, quant_row_16_bf16, uint16_t, load8_bf16)
DEFINE_QUANT_ROW(32, quant_row_32_bf16, uint16_t, load8_bf16)

/* quantize(src, dtype, rows, k, block, scheme, rule, tensor_scale, codes_out, scales_out)
 * src: rows x k elements (C order); codes_out: rows x padded_k/2 bytes; scales_out: rows x n_blocks bytes.
 * Elements past k in the last block are taken as +0. The caller has checked that src is finite. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    Py_buffer src, codes, scales;
    int dt, scheme, rule;
    Py_ssize_t rows, k, block;
    double ts_d;
    int want_stats = 0;
    if (!PyArg_ParseTuple(args, "y*innniidw*w*|p", &src, &dt, &rows, &k, &block, &scheme, &rule, &ts_d, &codes,
                          &scales, &want_stats))
        return NULL;
    double sum_e2 = 0.0, sum_x2 = 0.0;
    uint32_t max_err = 0;
    Py_ssize_t nb = (k + block - 1) / block, pk = nb * block;
    Py_ssize_t isz = dt == DT_F32 ? 4 : 2;
    uint32_t *buf = NULL; /* float16 rows converted to float32 bits, or a ragged last block; then work space */
    if (block != 16 && block != 32) {
        PyErr_SetString(PyExc_ValueError, "block size must be 16 or 32");
        goto done;
    }
    if (src.len < rows * k * isz || codes.len < rows * pk / 2 || scales.len < rows * nb) {
        PyErr_SetString(PyExc_ValueError, "buffer too small for the given shape");
        goto done;
    }
    buf = (uint32_t *)PyMem_RawMalloc((size_t)(pk + 2 * nb + 1) * sizeof(uint32_t));
    if (!buf) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const float s2 = (float)ts_d;
        float *work = (float *)(buf + pk);
        uint8_t *cp = (uint8_t *)codes.buf, *sp = (uint8_t *)scales.buf;
        Py_ssize_t full = k / block; /* blocks read in place; a ragged last block is padded in buf */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            uint8_t *c = cp + r * (pk / 2), *s = sp + r * nb;
            acc8 acc = {{0}, {0}, {0}}, *accp = want_stats ? &acc : NULL;
            if (dt == DT_F16) { /* convert the row, then treat it as float32 */
                const uint16_t *p = (const uint16_t *)src.buf + r * k;
                for (Py_ssize_t i = 0; i < k; i++) buf[i] = f2u(f16_to_f32(p[i]));
                for (Py_ssize_t i = k; i < pk; i++) buf[i] = 0u;
                if (block == 16) quant_row_16_f32(buf, nb, scheme, rule, s2, c, s, work, accp);
                else quant_row_32_f32(buf, nb, scheme, rule, s2, c, s, work, accp);
                if (accp) fold_stats(&acc, &sum_e2, &sum_x2, &max_err);
                continue;
            }
            if (dt == DT_BF16) {
                const uint16_t *p = (const uint16_t *)src.buf + r * k;
                if (block == 16) quant_row_16_bf16(p, full, scheme, rule, s2, c, s, work, accp);
                else quant_row_32_bf16(p, full, scheme, rule, s2, c, s, work, accp);
                if (full < nb) {
                    for (Py_ssize_t i = 0; i < block; i++) buf[i] = full * block + i < k ? (uint32_t)p[full * block + i] << 16 : 0u;
                }
            } else {
                const uint32_t *p = (const uint32_t *)src.buf + r * k;
                if (block == 16) quant_row_16_f32(p, full, scheme, rule, s2, c, s, work, accp);
                else quant_row_32_f32(p, full, scheme, rule, s2, c, s, work, accp);
                if (full < nb) {
                    for (Py_ssize_t i = 0; i < block; i++) buf[i] = full * block + i < k ? p[full * block + i] : 0u;
                }
            }
            if (full < nb) { /* the ragged last block, zero padded */
                if (block == 16) quant_row_16_f32(buf, 1, scheme, rule, s2, c + full * 8, s + full, work, accp);
                else quant_row_32_f32(buf, 1, scheme, rule, s2, c + full * 16, s + full, work, accp);
            }
            if (accp) fold_stats(&acc, &sum_e2, &sum_x2, &max_err);
        }
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(buf);
    PyBuffer_Release(&src);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scales);
    if (want_stats) return Py_BuildValue("ddd", sum_x2, sum_e2, (double)u2f(max_err));
    Py_RETURN_NONE;
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scales);
    return NULL;
}

/* Decoding (spec §5.3): y = fl32(E2M1(code) * f), f = fl32(E4M3(scale) * tensor_scale) (NVFP4) or 2^(e-127)
 * (MXFP4), written as float32 or rounded once to bfloat16 (round to nearest even; no NaN can occur: the
 * caller has refused NaN scale codes). Padding elements (past k) are not written. */
static const float E2M1_LUT[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static inline uint16_t bf16_rne(float y) {
    uint32_t u = f2u(y);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* E2M1_PAIRS[b] = the values of byte b's two codes, element 2i (low nibble) first: one load per byte. */
static float E2M1_PAIRS[256][2];

#define DEFINE_DEQUANT_ROW(NAME, T, STORE)                                                                  \
    FP4_CLONES static void NAME(const uint8_t *c, const uint8_t *s, Py_ssize_t nb, Py_ssize_t block,          \
                                Py_ssize_t k, int scheme, float ts, T *out) {                                \
        for (Py_ssize_t b = 0; b < nb; b++) {                                                                \
            const float f = scheme == SCHEME_NVFP4 ? E4M3_TABLE[s[b]] * ts : ldexpf(1.0f, (int)s[b] - 127);  \
            const uint8_t *cb = c + b * (block / 2);                                                         \
            T *o = out + b * block;                                                                          \
            if ((b + 1) * block <= k) {                                                                      \
                for (Py_ssize_t j = 0; j < block / 2; j++) {                                                 \
                    const float *v = E2M1_PAIRS[cb[j]];                                                      \
                    o[2 * j] = STORE(v[0] * f);                                                              \
                    o[2 * j + 1] = STORE(v[1] * f);                                                          \
                }                                                                                            \
            } else {                                                                                         \
                for (Py_ssize_t i = 0; b * block + i < k; i++)                                               \
                    o[i] = STORE(E2M1_LUT[(cb[i / 2] >> (4 * (i & 1))) & 15] * f);                          \
            }                                                                                                \
        }                                                                                                    \
    }
#define STORE_F32(y) (y)
DEFINE_DEQUANT_ROW(dequant_row_f32, float, STORE_F32)
/* bfloat16 output: the block's 16 possible values are rounded once into a table, then each element is a lookup
 * (the same bits as rounding every product: the product depends only on the code). */
FP4_CLONES static void dequant_row_bf16(const uint8_t *c, const uint8_t *s, Py_ssize_t nb, Py_ssize_t block,
                                        Py_ssize_t k, int scheme, float ts, uint16_t *out) {
    uint16_t t[16];
    for (Py_ssize_t b = 0; b < nb; b++) {
        const float f = scheme == SCHEME_NVFP4 ? E4M3_TABLE[s[b]] * ts : ldexpf(1.0f, (int)s[b] - 127);
        for (int i = 0; i < 16; i++) t[i] = bf16_rne(E2M1_LUT[i] * f);
        const uint8_t *cb = c + b * (block / 2);
        uint16_t *o = out + b * block;
        Py_ssize_t n = (b + 1) * block <= k ? block : k - b * block;
        if (n == block) {
            for (Py_ssize_t j = 0; j < block / 2; j++) {
                o[2 * j] = t[cb[j] & 15];
                o[2 * j + 1] = t[cb[j] >> 4];
            }
        } else {
            for (Py_ssize_t i = 0; i < n; i++) o[i] = t[(cb[i / 2] >> (4 * (i & 1))) & 15];
        }
    }
}

/* A range of rows to decode; several run on their own threads (rows are independent). */
typedef struct {
    const uint8_t *cp, *sp;
    void *out;
    Py_ssize_t r0, r1, pk, nb, block, k;
    int scheme, bf16;
    float ts;
} dequant_job;

static void *dequant_rows(void *arg) {
    const dequant_job *j = (const dequant_job *)arg;
    for (Py_ssize_t r = j->r0; r < j->r1; r++) {
        const uint8_t *c = j->cp + r * (j->pk / 2), *s = j->sp + r * j->nb;
        if (j->bf16)
            dequant_row_bf16(c, s, j->nb, j->block, j->k, j->scheme, j->ts, (uint16_t *)j->out + r * j->k);
        else
            dequant_row_f32(c, s, j->nb, j->block, j->k, j->scheme, j->ts, (float *)j->out + r * j->k);
    }
    return NULL;
}

#define DEQUANT_MAX_THREADS 64
#define DEQUANT_MIN_PER_THREAD (1 << 18) /* elements: below this a thread costs more than it saves */

/* dequantize(codes, scales, rows, padded_k, k, block, scheme, tensor_scale, out, bf16=False, threads=1)
 * codes: rows x padded_k/2 bytes; scales: rows x padded_k/block scale codes (linear layout); out: rows x k
 * float32 (bf16 false) or bfloat16 bit patterns (bf16 true). Rows are split over up to `threads` threads;
 * the result does not depend on the split. */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    Py_buffer codes, scales, out;
    Py_ssize_t rows, pk, k, block;
    int scheme, bf16 = 0, threads = 1;
    double ts_d;
    if (!PyArg_ParseTuple(args, "y*y*nnnnidw*|pi", &codes, &scales, &rows, &pk, &k, &block, &scheme, &ts_d, &out,
                          &bf16, &threads))
        return NULL;
    Py_ssize_t nb = block > 0 ? pk / block : 0;
    const char *err = NULL;
    if ((block != 16 && block != 32) || pk % block || k > pk || k < 0 || rows < 0)
        err = "bad geometry";
    else if (codes.len < rows * (pk / 2) || scales.len < rows * nb || out.len < rows * k * (bf16 ? 2 : 4))
        err = "buffer too small for the given shape";
    if (!err) {
        Py_ssize_t n = threads < 1 ? 1 : threads > DEQUANT_MAX_THREADS ? DEQUANT_MAX_THREADS : threads;
        Py_ssize_t by_size = (rows * k) / DEQUANT_MIN_PER_THREAD;
        if (n > by_size) n = by_size < 1 ? 1 : by_size;
        if (n > rows) n = rows < 1 ? 1 : rows;
        dequant_job jobs[DEQUANT_MAX_THREADS];
        pthread_t tids[DEQUANT_MAX_THREADS];
        int started[DEQUANT_MAX_THREADS] = {0};
        for (Py_ssize_t t = 0; t < n; t++) {
            dequant_job j = {(const uint8_t *)codes.buf, (const uint8_t *)scales.buf, out.buf, rows * t / n,
                             rows * (t + 1) / n, pk, nb, block, k, scheme, bf16, (float)ts_d};
            jobs[t] = j;
        }
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t t = 1; t < n; t++) started[t] = pthread_create(&tids[t], NULL, dequant_rows, &jobs[t]) == 0;
        dequant_rows(&jobs[0]);
        for (Py_ssize_t t = 1; t < n; t++) {
            if (started[t])
                pthread_join(tids[t], NULL);
            else
                dequant_rows(&jobs[t]); /* no thread: do its rows here */
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&out);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* encode_e2m1(src_f32, out_u8) and encode_e4m3(src_f32 in [0, 448], out_u8): the element primitives,
 * exposed so the tests can hold them against ml_dtypes over large sweeps of float32. */
static PyObject *py_encode(PyObject *args, int which) {
    Py_buffer src, out;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &out)) return NULL;
    Py_ssize_t n = src.len / 4;
    if (out.len < n) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "output buffer too small");
        return NULL;
    }
    const float *p = (const float *)src.buf;
    uint8_t *o = (uint8_t *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    if (which == 0)
        for (Py_ssize_t i = 0; i < n; i++) o[i] = e2m1(p[i]);
    else
        for (Py_ssize_t i = 0; i < n; i++) o[i] = e4m3_pos(p[i]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}
static PyObject *py_encode_e2m1(PyObject *self, PyObject *args) { return py_encode(args, 0); }
static PyObject *py_encode_e4m3(PyObject *self, PyObject *args) { return py_encode(args, 1); }

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_VARARGS, "scan(src, dtype) -> (amax, first non-finite index or -1)"},
    {"quantize", py_quantize, METH_VARARGS, "RTN-quantize rows of blocks into packed codes and scale codes"},
    {"dequantize", py_dequantize, METH_VARARGS, "decode rows of packed codes and linear scale codes (spec 5.3)"},
    {"encode_e2m1", py_encode_e2m1, METH_VARARGS, "float32 -> E2M1 codes"},
    {"encode_e4m3", py_encode_e4m3, METH_VARARGS, "float32 in [0, 448] -> E4M3 codes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_native", "fp4fmt C accelerator", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    for (int b = 0; b < 256; b++) {
        E2M1_PAIRS[b][0] = E2M1_LUT[b & 15];
        E2M1_PAIRS[b][1] = E2M1_LUT[b >> 4];
    }
    for (int c = 0; c < 256; c++) {
        int exp = (c >> 3) & 0x0F, man = c & 0x07;
        float mag = exp == 0 ? ldexpf((float)man, -9) : ldexpf(1.0f + man / 8.0f, exp - 7);
        if ((c & 0x7F) == 0x7F) mag = NAN;
        E4M3_TABLE[c] = (c & 0x80) ? -mag : mag;
    }
    return PyModule_Create(&moduledef);
}
