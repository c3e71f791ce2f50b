/* ram and ramplus_tl over raw values (`methods.ram`): the deltas d_i = x_i - b, masked where
 * |d_i| <= epsilon, are formed block by block from the files' values and never stored. The float32
 * operations are torch's for the same method, in the same order, so the results are bit for bit. */

#include <math.h>
#include <stdint.h>

#include "kernels_raw.h"

/* The m masked deltas of block i0 .. i0 + len into d[j], and the count of active models per value. */
static inline void ms_ram_deltas(const void *const *x, const int32_t *kinds, const int32_t *via, int32_t m,
                                 const float *base, float eps, int64_t i0, int64_t len,
                                 float d[][MS_BLOCK], float *count) {
    for (int64_t k = 0; k < len; k++) count[k] = 0.0f;
    for (int32_t j = 0; j < m; j++) {
        ms_load(x[j], kinds[j], via[j], i0, len, d[j]);
        for (int64_t k = 0; k < len; k++) {
            float v = d[j][k] - base[k];
            float a = fabsf(v) > eps ? 1.0f : 0.0f;
            d[j][k] = v * a;
            count[k] = count[k] + a;
        }
    }
}

/* Overlap's counts over n values: per model, its active values (masked delta != 0) that other
 * models change too (count > 1) into shared[j], that only it changes (count == 1) into unique[j]. */
MS_CLONES void ms_ram_overlap(const void *const *x, const int32_t *kinds, const int32_t *via, int32_t m, const void *b,
                              int32_t b_kind, int32_t b_via, float eps, int64_t n, int64_t *shared, int64_t *unique) {
    float base[MS_BLOCK], count[MS_BLOCK], d[MS_MAX_INPUTS][MS_BLOCK];
    for (int32_t j = 0; j < m; j++) shared[j] = unique[j] = 0;
    for (int64_t i0 = 0; i0 < n; i0 += MS_BLOCK) {
        int64_t len = n - i0 < MS_BLOCK ? n - i0 : MS_BLOCK;
        ms_load(b, b_kind, b_via, i0, len, base);
        ms_ram_deltas(x, kinds, via, m, base, eps, i0, len, d, count);
        for (int32_t j = 0; j < m; j++) {
            int64_t s = 0, u = 0;
            for (int64_t k = 0; k < len; k++) {
                int active = d[j][k] != 0.0f;
                s += active & (count[k] > 1.0f);
                u += active & (count[k] == 1.0f);
            }
            shared[j] += s;
            unique[j] += u;
        }
    }
}

/* ramplus_tl's merge: out = b + sum_j d_j w_j, w_j = boost_j where only model j is active, 1/c where
 * c > 1 models are, added in torch's order (w = unique boost + shared / max(c, 1); addcmul's FMA). */
MS_CLONES void ms_ramplus(void *out, int32_t out_kind, const void *const *x, const int32_t *kinds, const int32_t *via,
                          int32_t m, const void *b, int32_t b_kind, int32_t b_via, float eps, const float *boost,
                          int64_t n) {
    float base[MS_BLOCK], count[MS_BLOCK], acc[MS_BLOCK], d[MS_MAX_INPUTS][MS_BLOCK];
    for (int64_t i0 = 0; i0 < n; i0 += MS_BLOCK) {
        int64_t len = n - i0 < MS_BLOCK ? n - i0 : MS_BLOCK;
        ms_load(b, b_kind, b_via, i0, len, base);
        ms_ram_deltas(x, kinds, via, m, base, eps, i0, len, d, count);
        for (int64_t k = 0; k < len; k++) acc[k] = 0.0f;
        for (int32_t j = 0; j < m; j++) {
            float bj = boost[j];
            for (int64_t k = 0; k < len; k++) {
                float c = count[k];
                float share = (c > 1.0f ? 1.0f : 0.0f) / (c < 1.0f ? 1.0f : c);
                float w = (c == 1.0f ? 1.0f : 0.0f) * bj + share;
                acc[k] = fmaf(d[j][k], w, acc[k]);
            }
        }
        for (int64_t k = 0; k < len; k++) acc[k] = base[k] + acc[k];
        ms_store(out, out_kind, i0, len, acc);
    }
}
