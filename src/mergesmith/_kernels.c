/* mergesmith's compiled kernels: the random draws of DARE/DELLA masks, fused with their use.
 *
 * Plain C functions called through ctypes (which releases the GIL around each call);
 * `mergesmith.kernels` computes the same values with NumPy when this library is missing.
 *
 * The stream of a key is counter-based: 64-bit output j is SplitMix64's finaliser of
 * key + (j + 1) * golden gamma, and 32-bit word w is the low (w even) or high (w odd) half of
 * output w / 2. Any range of words costs only its own length, whatever came before, so chunks
 * of a tensor draw what the whole tensor would. The loops vectorise (AVX-512 where the CPU
 * has it: 0.4 ns per masked value measured here, against 4.4 ns for NumPy's Philox + a mask).
 *
 * (Over 400 lines: the draws, the task-vector passes that use them and the Python module stub are
 * one library with one set of compile flags; kernels of other method families live in their own
 * files of the same extension.) */

#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_raw.h"

#define MS_GAMMA 0x9E3779B97F4A7C15ULL

static inline uint64_t ms_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint32_t ms_word(uint64_t key, uint64_t w) {
    return (uint32_t)(ms_mix(key + ((w >> 1) + 1) * MS_GAMMA) >> ((w & 1) << 5));
}

/* Words start .. start + count of the stream. */
MS_CLONES void ms_words(uint64_t key, uint64_t start, int64_t count, uint32_t *out) {
    for (int64_t i = 0; i < count; i++) out[i] = ms_word(key, start + (uint64_t)i);
}

/* Keep mask (DARE): out[i] = word < cut. */
MS_CLONES void ms_keep_mask(uint64_t key, uint64_t start, int64_t count, uint32_t cut, uint8_t *out) {
    for (int64_t i = 0; i < count; i++) out[i] = ms_word(key, start + (uint64_t)i) < cut;
}

/* x[i] *= (word < cut): the product by the 0/1 mask, without making the mask. */
MS_CLONES void ms_keep_apply(uint64_t key, uint64_t start, int64_t count, uint32_t cut, float *x) {
    for (int64_t i = 0; i < count; i++) x[i] *= (float)(ms_word(key, start + (uint64_t)i) < cut);
}

/* Float32 uniforms in [0, 1): (word >> 8) * 2**-24. */
MS_CLONES void ms_uniform(uint64_t key, uint64_t start, int64_t count, float *out) {
    for (int64_t i = 0; i < count; i++) out[i] = (float)(ms_word(key, start + (uint64_t)i) >> 8) * 0x1p-24f;
}

/* Per-row L1 norms of a rows x cols float32 matrix, in double: eight running sums per row (element
 * c goes to sum c % 8, in order), added pairwise at the end. A fixed order, so the NumPy fallback
 * reproduces it exactly; per row, so chunks of whole rows give the same norms as whole tensors. */
static inline double ms_l1(const float *row, int64_t cols) {
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8)
        for (int j = 0; j < 8; j++) s[j] += fabs((double)row[c + j]);
    for (int j = 0; c + j < cols; j++) s[j] += fabs((double)row[c + j]);
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static inline void ms_keep_row(uint64_t key, uint64_t w, int64_t cols, uint32_t cut, float *row) {
    for (int64_t c = 0; c < cols; c++) row[c] *= (float)(ms_word(key, w + (uint64_t)c) < cut);
}

MS_CLONES void ms_row_l1(const float *x, int64_t rows, int64_t cols, double *out) {
    for (int64_t r = 0; r < rows; r++) out[r] = ms_l1(x + r * cols, cols);
}

/* DARE with rescale, row by row (in cache): L1 before, x *= (word < cut), L1 after. */
MS_CLONES void ms_keep_apply_l1(uint64_t key, uint64_t start, int64_t rows, int64_t cols, uint32_t cut, float *x,
                                double *before, double *after) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * cols;
        before[r] = ms_l1(row, cols);
        ms_keep_row(key, start + (uint64_t)(r * cols), cols, cut, row);
        after[r] = ms_l1(row, cols);
    }
}

/* TIES' sign consensus and disjoint merge of m weighted task vectors, in place into d[0], the same
 * float32 operations in the same order as `task_vectors.merge_task_vectors` does them with torch:
 * total = d0 + d1 + ...; s = -1 where total < 0, else +1; a_j = max(d_j * s, 0) (the part agreeing
 * with s); divisor = 0 + w_0 [a_0 > 0] + ...; with `normalize` the divisor is raised to `floor`
 * (floor > 0) or set to 1 where it is 0 (floor <= 0); result = (s a_0 + s a_1 + ...) / divisor.
 * NaN propagates as with torch; only the sign of a zero may differ. */
static inline float ms_agree(float x, float s) { /* max(x * s, 0), NaN kept */
    float a = x * s;
    return a != a ? a : (a < 0.0f ? 0.0f : a);
}

/* One block of the combine into c (len <= MS_BLOCK values): d[j] + i0 are the block's weighted deltas. */
static inline void ms_ties_block(const float *const *d, int64_t i0, int32_t m, const float *w, int32_t normalize,
                                 float floor, int64_t len, float *restrict c) {
    float t[MS_BLOCK], s[MS_BLOCK], div[MS_BLOCK];
    const float *d0 = d[0] + i0;
    for (int64_t k = 0; k < len; k++) t[k] = d0[k];
    for (int32_t j = 1; j < m; j++) {
        const float *dj = d[j] + i0;
        for (int64_t k = 0; k < len; k++) t[k] += dj[k];
    }
    for (int64_t k = 0; k < len; k++) s[k] = t[k] != t[k] ? t[k] : (t[k] < 0.0f ? -1.0f : 1.0f);
    for (int64_t k = 0; k < len; k++) {
        float a = ms_agree(d0[k], s[k]);
        div[k] = 0.0f + w[0] * (a != a ? a : (a > 0.0f ? 1.0f : 0.0f));
        c[k] = a * s[k];
    }
    for (int32_t j = 1; j < m; j++) {
        const float *dj = d[j] + i0;
        float wj = w[j];
        for (int64_t k = 0; k < len; k++) {
            float a = ms_agree(dj[k], s[k]);
            div[k] += wj * (a != a ? a : (a > 0.0f ? 1.0f : 0.0f));
            c[k] += a * s[k];
        }
    }
    if (normalize && floor > 0.0f) {
        for (int64_t k = 0; k < len; k++) c[k] = c[k] / (div[k] != div[k] ? div[k] : (div[k] < floor ? floor : div[k]));
    } else if (normalize) {
        for (int64_t k = 0; k < len; k++) c[k] = c[k] / (div[k] == 0.0f ? 1.0f : div[k]);
    }
}

MS_CLONES void ms_ties_combine(float *const *d, int32_t m, const float *w, int32_t normalize, float floor,
                               int64_t n) {
    /* block by block through a local array: d[0] is written only once its block is combined */
    float c[MS_BLOCK];
    for (int64_t i0 = 0; i0 < n; i0 += MS_BLOCK) {
        int64_t len = n - i0 < MS_BLOCK ? n - i0 : MS_BLOCK;
        ms_ties_block((const float *const *)d, i0, m, w, normalize, floor, len, c);
        float *out = d[0] + i0;
        for (int64_t k = 0; k < len; k++) out[k] = c[k];
    }
}

/* A threshold's bracket over magnitudes a (TIES' exact top-k, streamed): counts[0] += how many are
 * not >= lo (NaN counts there), counts[1] += how many equal lo, counts[2] += how many equal hi (and not
 * lo; `hi` NaN: none); the values strictly between lo and hi are copied to out in order; returns their
 * count. Model deltas are discrete: many magnitudes equal lo or hi, and are only counted. Few values
 * fall strictly inside (~3% or less): compare 16 at a time, then pick the set bits of the mask. */
/* Values i0 .. n, one at a time: branch-free (about half the values are below lo, at random). */
static inline int64_t ms_bracket_tail(const float *a, int64_t i0, int64_t n, float lo, float hi, float *out,
                                      int64_t k, int64_t *counts) {
    int64_t b = 0, at_lo = 0, at_hi = 0;
    float top = hi != hi ? INFINITY : hi;
    for (int64_t i = i0; i < n; i++) {
        float v = a[i];
        int in_lo = v >= lo, eq_lo = v == lo, eq_hi = (v == hi) & !eq_lo;
        b += !in_lo;
        at_lo += eq_lo;
        at_hi += eq_hi;
        out[k] = v;
        k += in_lo & (v <= top) & !eq_lo & !eq_hi;
    }
    counts[0] += b;
    counts[1] += at_lo;
    counts[2] += at_hi;
    return k;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MS_HAVE_AVX512 1
__attribute__((target("avx512f"))) static int64_t ms_bracket_avx512(const float *a, int64_t n, float lo, float hi,
                                                                    float *out, int64_t *counts) {
    int64_t b = 0, at_lo = 0, at_hi = 0, k = 0, i = 0;
    __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), vtop = _mm512_set1_ps(hi != hi ? INFINITY : hi);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(a + i);
        unsigned ge = _mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ);
        unsigned eq_lo = _mm512_cmp_ps_mask(v, vlo, _CMP_EQ_OQ);
        unsigned eq_hi = _mm512_cmp_ps_mask(v, vhi, _CMP_EQ_OQ) & ~eq_lo;
        unsigned in = ge & _mm512_cmp_ps_mask(v, vtop, _CMP_LE_OQ) & ~eq_lo & ~eq_hi;
        b += 16 - __builtin_popcount(ge);
        at_lo += __builtin_popcount(eq_lo);
        at_hi += __builtin_popcount(eq_hi);
        while (in) {
            out[k++] = a[i + __builtin_ctz(in)];
            in &= in - 1;
        }
    }
    counts[0] += b;
    counts[1] += at_lo;
    counts[2] += at_hi;
    return ms_bracket_tail(a, i, n, lo, hi, out, k, counts);
}
#endif

int64_t ms_bracket(const float *a, int64_t n, float lo, float hi, float *out, int64_t *counts) {
#ifdef MS_HAVE_AVX512
    if (__builtin_cpu_supports("avx512f")) return ms_bracket_avx512(a, n, lo, hi, out, counts);
#endif
    return ms_bracket_tail(a, 0, n, lo, hi, out, 0, counts);
}

int32_t ms_has_f16(void) { return MS_HAVE_F16; }

/* The linear merge fused over raw values: out = (x_0 w_0 + x_1 w_1 + ...) / divisor, in float32 with
 * the operations torch does for `methods.linear` (x_0 * w_0, then an FMA per further input, as torch's
 * `add_(x, alpha=w)` computes it, then a true division when `normalize`), so the result is the same
 * bit for bit; one pass over the inputs instead of one per operation. */
MS_CLONES void ms_linear(void *out, int32_t out_kind, const void *const *x, const int32_t *kinds, const int32_t *via,
                         int32_t m, const float *w, int32_t normalize, float divisor, int64_t n) {
    float acc[MS_BLOCK], v[MS_BLOCK];
    for (int64_t i0 = 0; i0 < n; i0 += MS_BLOCK) {
        int64_t len = n - i0 < MS_BLOCK ? n - i0 : MS_BLOCK;
        ms_load(x[0], kinds[0], via[0], i0, len, acc);
        for (int64_t k = 0; k < len; k++) acc[k] = acc[k] * w[0];
        for (int32_t j = 1; j < m; j++) {
            ms_load(x[j], kinds[j], via[j], i0, len, v);
            float wj = w[j];
            for (int64_t k = 0; k < len; k++) acc[k] = fmaf(v[k], wj, acc[k]);
        }
        if (normalize)
            for (int64_t k = 0; k < len; k++) acc[k] = acc[k] / divisor;
        ms_store(out, out_kind, i0, len, acc);
    }
}

/* nearswap fused over raw values: d = x - b, omega = clamp(t / max(|d|, 1e-6), 0, 1), out = b + d omega,
 * in float32 with torch's operations for `methods.nearswap` (a true reciprocal, then the product by t,
 * then addcmul's FMA), so the result is the same bit for bit; NaN stays NaN as in torch's clamps. */
MS_CLONES void ms_nearswap(void *out, int32_t out_kind, const void *x, int32_t x_kind, int32_t x_via, const void *b,
                           int32_t b_kind, int32_t b_via, float t, float floor, int64_t n) {
    float base[MS_BLOCK], v[MS_BLOCK];
    for (int64_t i0 = 0; i0 < n; i0 += MS_BLOCK) {
        int64_t len = n - i0 < MS_BLOCK ? n - i0 : MS_BLOCK;
        ms_load(b, b_kind, b_via, i0, len, base);
        ms_load(x, x_kind, x_via, i0, len, v);
        for (int64_t k = 0; k < len; k++) {
            float d = v[k] - base[k];
            float a = fabsf(d);
            a = a < floor ? floor : a;
            float w = (1.0f / a) * t;
            w = w < 0.0f ? 0.0f : w;
            w = w > 1.0f ? 1.0f : w;
            v[k] = fmaf(d, w, base[k]);
        }
        ms_store(out, out_kind, i0, len, v);
    }
}

/* The task-vector family over raw values (`methods.task_vectors`): the deltas d = x - b of each input
 * are formed block by block from the files' values (rounded through the recipe dtype, as float32) and
 * never stored. Observing passes feed the pruners (the magnitudes' bracket of TIES' top-k threshold;
 * DARE's L1 norms before and after the drop); the merging pass prunes, weighs, elects signs, combines,
 * adds to the base and rounds to the output dtype in one pass. Each step is the float32 operation the
 * torch path does, in the same order, so the results are the same bit for bit. */

/* d = x - b for values i0 .. i0 + len, given b's block */
static inline void ms_delta(const void *x, int32_t kind, int32_t via, const float *b, int64_t i0, int64_t len,
                            float *restrict d) {
    ms_load(x, kind, via, i0, len, d);
    for (int64_t k = 0; k < len; k++) d[k] = d[k] - b[k];
}

/* The magnitudes' bracket (`ms_bracket`, `counts` as there, set here) of d = x - b, without storing
 * them. Without lo (`has_lo` 0) nothing is below or at lo, the |d| equal to hi are counted and those
 * under hi gathered (every |d|, NaN included, without hi either). `hi` NaN: no upper bound. */
MS_CLONES int64_t ms_delta_bracket(const void *x, int32_t xk, int32_t xv, const void *b, int32_t bk, int32_t bv,
                                   int64_t n, int32_t has_lo, float lo, float hi, float *out, int64_t *counts) {
    float bb[MS_BLOCK], a[MS_BLOCK];
    int64_t k = 0;
    counts[0] = counts[1] = counts[2] = 0;
    for (int64_t i0 = 0; i0 < n; i0 += MS_BLOCK) {
        int64_t len = n - i0 < MS_BLOCK ? n - i0 : MS_BLOCK;
        ms_load(b, bk, bv, i0, len, bb);
        ms_delta(x, xk, xv, bb, i0, len, a);
        for (int64_t j = 0; j < len; j++) a[j] = fabsf(a[j]);
        if (has_lo) {
            k += ms_bracket(a, len, lo, hi, out + k, counts);
        } else if (hi != hi) {
            memcpy(out + k, a, (size_t)len * sizeof(float));
            k += len;
        } else {
            for (int64_t j = 0; j < len; j++) {
                counts[2] += a[j] == hi;
                out[k] = a[j];
                k += a[j] < hi;
            }
        }
    }
    return k;
}

/* Eight running sums of |v| (value c of a row into sum c % 8): a row given block by block, every block
 * but its last a multiple of 8 long, sums as `ms_l1` does. */
static inline void ms_l1_add(double *s, const float *v, int64_t len) {
    int64_t c = 0;
    for (; c + 8 <= len; c += 8)
        for (int j = 0; j < 8; j++) s[j] += fabs((double)v[c + j]);
    for (int j = 0; c + j < len; j++) s[j] += fabs((double)v[c + j]);
}

static inline double ms_l1_sum(const double *s) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }

/* DARE's observe pass: per row of d = x - b (rows x cols values), the L1 norm before and after
 * d *= (word < cut) (word: the stream of `key` at start + the value's index). */
MS_CLONES void ms_delta_keep_l1(const void *x, int32_t xk, int32_t xv, const void *b, int32_t bk, int32_t bv,
                                int64_t rows, int64_t cols, uint64_t key, uint64_t start, uint64_t cut,
                                double *before, double *after) {
    float bb[MS_BLOCK], d[MS_BLOCK];
    for (int64_t r = 0; r < rows; r++) {
        double s0[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s1[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t c0 = 0; c0 < cols; c0 += MS_BLOCK) {
            int64_t i0 = r * cols + c0, len = cols - c0 < MS_BLOCK ? cols - c0 : MS_BLOCK;
            ms_load(b, bk, bv, i0, len, bb);
            ms_delta(x, xk, xv, bb, i0, len, d);
            ms_l1_add(s0, d, len);
            for (int64_t k = 0; k < len; k++) d[k] *= (float)((uint64_t)ms_word(key, start + (uint64_t)(i0 + k)) < cut);
            ms_l1_add(s1, d, len);
        }
        before[r] = ms_l1_sum(s0);
        after[r] = ms_l1_sum(s1);
    }
}

/* How one input's delta is pruned and weighed in the merging pass (`kernels.Rule`). */
typedef struct {
    int32_t mode;     /* MS_KEEP, MS_ZERO (d * 0), MS_SHRINK (0 where -t <= d <= t), MS_BUDGET, MS_DROP */
    float t;          /* MS_SHRINK, MS_BUDGET: the magnitude threshold */
    int64_t budget;   /* MS_BUDGET: |d| > t kept, and the first `budget` values with |d| == t */
    uint64_t key;     /* MS_DROP: d * (word < cut), word the stream of key at start + index */
    uint64_t start;
    uint64_t cut;
    int32_t rescale;  /* MS_DROP: then d * ratio */
    float ratio;
    float weight;     /* last: d * weight */
} ms_rule;

#define MS_KEEP 0
#define MS_ZERO 1
#define MS_SHRINK 2
#define MS_BUDGET 3
#define MS_DROP 4

static inline void ms_prune(ms_rule *p, int64_t i0, int64_t len, float *restrict d) {
    switch (p->mode) {
    case MS_ZERO:
        for (int64_t k = 0; k < len; k++) d[k] = d[k] * 0.0f;
        break;
    case MS_SHRINK: {
        float t = p->t;
        for (int64_t k = 0; k < len; k++) d[k] = (d[k] >= -t && d[k] <= t) ? 0.0f : d[k];
        break;
    }
    case MS_BUDGET: /* in order: the values equal to t are kept first come, first kept */
        for (int64_t k = 0; k < len; k++) {
            float a = fabsf(d[k]);
            int keep = a > p->t;
            if (!keep && a == p->t && p->budget > 0) {
                keep = 1;
                p->budget--;
            }
            d[k] = d[k] * (float)keep;
        }
        break;
    case MS_DROP:
        for (int64_t k = 0; k < len; k++)
            d[k] *= (float)((uint64_t)ms_word(p->key, p->start + (uint64_t)(i0 + k)) < p->cut);
        if (p->rescale)
            for (int64_t k = 0; k < len; k++) d[k] = d[k] * p->ratio;
        break;
    default:
        break;
    }
    float w = p->weight;
    for (int64_t k = 0; k < len; k++) d[k] = d[k] * w;
}

/* The merging pass: out = b + lambda * combine(prune_j(x_j - b) * w_j), rounded to out_kind.
 * combine: TIES' sign consensus and disjoint sum (`ms_ties_block`, `floor` as there) when `consensus`,
 * else the plain sum, divided by `divisor` when `normalize`. The rules' budgets are used up in place. */
MS_CLONES void ms_task_merge(void *out, int32_t out_kind, const void *const *x, const int32_t *kinds,
                             const int32_t *vias, int32_t m, const void *b, int32_t bk, int32_t bv, ms_rule *rules,
                             int32_t consensus, int32_t normalize, float floor, float divisor, float lambda,
                             int64_t n) {
    float bb[MS_BLOCK], c[MS_BLOCK], d[MS_MAX_INPUTS][MS_BLOCK];
    const float *rows[MS_MAX_INPUTS];
    float w[MS_MAX_INPUTS];
    for (int32_t j = 0; j < m; j++) {
        rows[j] = d[j];
        w[j] = rules[j].weight;
    }
    for (int64_t i0 = 0; i0 < n; i0 += MS_BLOCK) {
        int64_t len = n - i0 < MS_BLOCK ? n - i0 : MS_BLOCK;
        ms_load(b, bk, bv, i0, len, bb);
        for (int32_t j = 0; j < m; j++) {
            ms_delta(x[j], kinds[j], vias[j], bb, i0, len, d[j]);
            ms_prune(&rules[j], i0, len, d[j]);
        }
        if (consensus) {
            ms_ties_block(rows, 0, m, w, normalize, floor, len, c);
        } else {
            for (int64_t k = 0; k < len; k++) c[k] = d[0][k];
            for (int32_t j = 1; j < m; j++)
                for (int64_t k = 0; k < len; k++) c[k] += d[j][k];
            if (normalize)
                for (int64_t k = 0; k < len; k++) c[k] = c[k] / divisor;
        }
        for (int64_t k = 0; k < len; k++) c[k] = fmaf(c[k], lambda, bb[k]);
        ms_store(out, out_kind, i0, len, c);
    }
}

/* How many of n raw values of `kind` are NaN or infinite (all exponent bits set). */
MS_CLONES int64_t ms_nonfinite(const void *x, int32_t kind, int64_t n) {
    int64_t bad = 0;
    if (kind == MS_F32) {
        const uint32_t *p = (const uint32_t *)x;
        for (int64_t i = 0; i < n; i++) bad += (p[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t *p = (const uint16_t *)x;
        uint16_t e = kind == MS_BF16 ? 0x7F80u : 0x7C00u;
        for (int64_t i = 0; i < n; i++) bad += (p[i] & e) == e;
    }
    return bad;
}

static struct PyModuleDef kernels_module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }

/* DELLA's ranks: per row of `cols` float32 values, each element's place (as a float) in the order
 * of |value| (its bit pattern with the sign cleared: non-negative floats order as their bits), ties
 * by position. An LSD radix sort of the 32-bit keys with their positions, 8 bits a pass: stable, so
 * equal keys keep their positions' order; one read counts all four bytes, and a pass whose byte is
 * the same for every key is skipped. The same places as NumPy's sort of (bits << 32 | position).
 * Returns -1 if the scratch memory cannot be had (the caller then uses NumPy). */
int32_t ms_row_ranks(const float *x, int64_t rows, int64_t cols, float *out) {
    if (cols <= 0 || rows <= 0) return 0;
    uint32_t *buf = (uint32_t *)malloc((size_t)cols * 4 * sizeof(uint32_t));
    if (buf == NULL) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const uint32_t *bits = (const uint32_t *)(x + r * cols);
        uint32_t *ka = buf, *ia = buf + cols, *kb = buf + 2 * cols, *ib = buf + 3 * cols;
        int64_t counts[4][256];
        memset(counts, 0, sizeof(counts));
        for (int64_t i = 0; i < cols; i++) {
            uint32_t k = bits[i] & 0x7FFFFFFFu;
            ka[i] = k;
            ia[i] = (uint32_t)i;
            counts[0][k & 255]++;
            counts[1][(k >> 8) & 255]++;
            counts[2][(k >> 16) & 255]++;
            counts[3][k >> 24]++;
        }
        for (int pass = 0; pass < 4; pass++) {
            int64_t *c = counts[pass];
            int shift = 8 * pass;
            if (c[(ka[0] >> shift) & 255] == cols) continue; /* every key has this byte */
            int64_t sum = 0;
            for (int b = 0; b < 256; b++) {
                int64_t n = c[b];
                c[b] = sum;
                sum += n;
            }
            for (int64_t i = 0; i < cols; i++) {
                int64_t at = c[(ka[i] >> shift) & 255]++;
                kb[at] = ka[i];
                ib[at] = ia[i];
            }
            uint32_t *t = ka;
            ka = kb;
            kb = t;
            t = ia;
            ia = ib;
            ib = t;
        }
        float *o = out + r * cols;
        for (int64_t j = 0; j < cols; j++) o[ia[j]] = (float)j;
    }
    free(buf);
    return 0;
}
