/* arcee_fusion over raw values (`methods.arcee_fusion`): each row's KL divergence of the softmaxes of
 * the model and the base (+1e-8 each), the importance scores |x - b| KL, and the merge that keeps the
 * model's change where its score reaches the threshold. exp and log are the classic single-precision
 * polynomials (Cephes' range reductions and coefficients, about 1 ulp), written as plain float
 * arithmetic so that each target clone vectorises them and every clone gives the same values
 * (built with -ffp-contract=off). The sums run in float64. */

#include <math.h>
#include <stdint.h>

#include "kernels_raw.h"

/* e^x for x <= 0 (softmax arguments, x - max); 0 below -87.3 (where e^x leaves the normal floats). */
static inline float ms_exp(float x) {
    float low = -87.3365447504f;
    float clamped = x < low ? low : x;
    float n = floorf(clamped * 1.44269504088896341f + 0.5f);
    float r = clamped - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    float scale = ms_bits_float((uint32_t)((int32_t)n + 127) << 23);
    return x < low ? 0.0f : y * scale;
}

/* log(x) for positive normal x (ratios of probabilities of at least 1e-8). */
static inline float ms_log(float x) {
    uint32_t u = ms_float_bits(x);
    float e = (float)((int32_t)((u >> 23) & 0xFF) - 126);
    float m = ms_bits_float((u & 0x807FFFFFu) | 0x3F000000u); /* x = m 2^e, m in [0.5, 1) */
    int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y = y + e * -2.12194440e-4f;
    y = y - 0.5f * z;
    return (m + y) + e * 0.693359375f;
}

/* The sum of v[0 .. n) in float64: value k into running sum k % 8, the eight sums added pairwise. */
static inline double ms_sum8(const float *v, int64_t n) {
    double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t whole = n & ~(int64_t)7;
    for (int64_t k = 0; k < whole; k += 8)
        for (int l = 0; l < 8; l++) a[l] += (double)v[k + l];
    for (int64_t k = whole; k < n; k++) a[k - whole] += (double)v[k];
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* Per row of `width` values (`rows` of them, one after another) of x and b: the KL divergence
 * sum_k p_k log(p_k / q_k) of p = softmax(x) + 1e-8 from q = softmax(b) + 1e-8, into kl[row]; NaN where
 * a row holds a NaN or +Inf (as torch's softmax gives). `scratch` holds 2 width floats. */
MS_CLONES void ms_fusion_kl(const void *x, int32_t x_kind, int32_t x_via, const void *b, int32_t b_kind,
                            int32_t b_via, int64_t rows, int64_t width, float *scratch, float *kl) {
    float *ex = scratch, *eb = scratch + width;
    for (int64_t r = 0; r < rows; r++) {
        ms_load(x, x_kind, x_via, r * width, width, ex);
        ms_load(b, b_kind, b_via, r * width, width, eb);
        float mx = -INFINITY, mb = -INFINITY;
        int nan = 0;
        for (int64_t k = 0; k < width; k++) {
            nan |= (ex[k] != ex[k]) | (eb[k] != eb[k]);
            mx = ex[k] > mx ? ex[k] : mx;
            mb = eb[k] > mb ? eb[k] : mb;
        }
        if (nan || mx == INFINITY || mb == INFINITY) {
            kl[r] = NAN;
            continue;
        }
        for (int64_t k = 0; k < width; k++) {
            ex[k] = ms_exp(ex[k] - mx);
            eb[k] = ms_exp(eb[k] - mb);
        }
        float ix = (float)(1.0 / ms_sum8(ex, width)), ib = (float)(1.0 / ms_sum8(eb, width));
        for (int64_t k = 0; k < width; k++) {
            float p = ex[k] * ix + 1e-8f, q = eb[k] * ib + 1e-8f;
            ex[k] = p * ms_log(p / q);
        }
        kl[r] = (float)ms_sum8(ex, width);
    }
}

/* The scores |x - b| kl[row] of a chunk at its flat positions `at` (`count` of them), rows of `width`. */
MS_CLONES void ms_fusion_scores(const void *x, int32_t x_kind, int32_t x_via, const void *b, int32_t b_kind,
                                int32_t b_via, const float *kl, int64_t width, const int64_t *at, int64_t count,
                                float *out) {
    for (int64_t i = 0; i < count; i++) {
        float vx, vb;
        ms_load(x, x_kind, x_via, at[i], 1, &vx);
        ms_load(b, b_kind, b_via, at[i], 1, &vb);
        out[i] = fabsf(vx - vb) * kl[at[i] / width];
    }
}

/* A chunk of `rows` rows of `width`, d = x - b: the merge out = b + d [|d| kl[row] >= threshold] (the
 * product by 1 or 0 as torch's `mul_` by the mask takes it: an infinite d times 0 is NaN), or, where
 * `scores` is given, the scores |d| kl[row] there instead (float32). */
MS_CLONES void ms_fusion(void *out, int32_t out_kind, const void *x, int32_t x_kind, int32_t x_via, const void *b,
                         int32_t b_kind, int32_t b_via, const float *kl, int64_t rows, int64_t width,
                         float threshold, float *scores) {
    float vx[MS_BLOCK], vb[MS_BLOCK];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c0 = 0; c0 < width; c0 += MS_BLOCK) {
            int64_t len = width - c0 < MS_BLOCK ? width - c0 : MS_BLOCK, i0 = r * width + c0;
            const float w = kl[r];
            ms_load(x, x_kind, x_via, i0, len, vx);
            ms_load(b, b_kind, b_via, i0, len, vb);
            if (scores) {
                for (int64_t k = 0; k < len; k++) scores[i0 + k] = fabsf(vx[k] - vb[k]) * w;
                continue;
            }
            for (int64_t k = 0; k < len; k++) {
                float d = vx[k] - vb[k];
                float keep = fabsf(d) * w >= threshold ? 1.0f : 0.0f;
                vx[k] = vb[k] + d * keep;
            }
            ms_store(out, out_kind, i0, len, vx);
        }
}
