/* The Gram family over raw values (`methods.gram`: slerp, nuslerp, karcher, multislerp, model_stock):
 * the observing pass takes the inner products of the vectors (the inputs, or their task vectors) row by
 * row; the merging pass combines the inputs with the coefficients found from them. Each step is the
 * float32 operation the torch path does, in the same order, so the results are the same bit for bit. */

#include <math.h>
#include <stdint.h>

#include "kernels_raw.h"

#define MS_GRAM_MAX (MS_MAX_INPUTS + 1) /* vectors: slerp's are the base and one other model */
#define MS_GRAM_PAIRS (MS_GRAM_MAX * (MS_GRAM_MAX + 1) / 2)

/* Per row of `cols` values, the inner products v_i . v_j of the m vectors v_i = x_i, or x_i - b where
 * `b` is given (the float32 difference), into out[row][i][j] and out[row][j][i]: products exact in
 * float64, column c added into running sum c % 8 in order, the eight sums added pairwise as `ms_row_l1`
 * adds them (so `kernels.numpy_gram_rows` gives the same values, bit for bit). */
MS_CLONES void ms_gram(const void *const *x, const int32_t *kinds, const int32_t *via, int32_t m, const void *b,
                       int32_t b_kind, int32_t b_via, int64_t rows, int64_t cols, double *out) {
    float v[MS_GRAM_MAX][MS_BLOCK], bb[MS_BLOCK];
    double acc[MS_GRAM_PAIRS][8];
    int32_t pairs = m * (m + 1) / 2;
    for (int64_t r = 0; r < rows; r++) {
        for (int32_t p = 0; p < pairs; p++)
            for (int l = 0; l < 8; l++) acc[p][l] = 0.0;
        for (int64_t c0 = 0; c0 < cols; c0 += MS_BLOCK) { /* MS_BLOCK is a multiple of 8: c % 8 == k % 8 */
            int64_t len = cols - c0 < MS_BLOCK ? cols - c0 : MS_BLOCK, i0 = r * cols + c0;
            if (b) ms_load(b, b_kind, b_via, i0, len, bb);
            for (int32_t i = 0; i < m; i++) {
                ms_load(x[i], kinds[i], via[i], i0, len, v[i]);
                if (b)
                    for (int64_t k = 0; k < len; k++) v[i][k] = v[i][k] - bb[k];
            }
            int64_t whole = len & ~(int64_t)7;
            int32_t p = 0;
            for (int32_t i = 0; i < m; i++)
                for (int32_t j = i; j < m; j++, p++) {
                    const float *vi = v[i], *vj = v[j];
                    double *a = acc[p];
                    for (int64_t k = 0; k < whole; k += 8)
                        for (int l = 0; l < 8; l++) a[l] += (double)vi[k + l] * (double)vj[k + l];
                    for (int64_t k = whole; k < len; k++) a[k - whole] += (double)vi[k] * (double)vj[k];
                }
        }
        double *o = out + r * m * m;
        int32_t p = 0;
        for (int32_t i = 0; i < m; i++)
            for (int32_t j = i; j < m; j++, p++) {
                const double *s = acc[p];
                double sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
                o[i * m + j] = sum;
                o[j * m + i] = sum;
            }
    }
}

/* out = b + s ((sum_i c_i (x_i - b)) / divisor), with torch's operations for `gram.combine` on the task
 * vectors and then the base added: acc = d_0 c_0, acc = fma(d_i, c_i, acc) (torch's `add_(alpha=)`),
 * acc / divisor when `normalize`, then fma(acc, s, b) (`addcmul_` by the scalar s; s = 1 is `add_`). */
MS_CLONES void ms_span(void *out, int32_t out_kind, const void *const *x, const int32_t *kinds, const int32_t *via,
                       int32_t m, const void *b, int32_t b_kind, int32_t b_via, const float *c, int32_t normalize,
                       float divisor, float s, int64_t n) {
    float acc[MS_BLOCK], v[MS_BLOCK], bb[MS_BLOCK];
    for (int64_t i0 = 0; i0 < n; i0 += MS_BLOCK) {
        int64_t len = n - i0 < MS_BLOCK ? n - i0 : MS_BLOCK;
        ms_load(b, b_kind, b_via, i0, len, bb);
        ms_load(x[0], kinds[0], via[0], i0, len, acc);
        for (int64_t k = 0; k < len; k++) acc[k] = (acc[k] - bb[k]) * c[0];
        for (int32_t j = 1; j < m; j++) {
            ms_load(x[j], kinds[j], via[j], i0, len, v);
            float cj = c[j];
            for (int64_t k = 0; k < len; k++) acc[k] = fmaf(v[k] - bb[k], cj, acc[k]);
        }
        if (normalize)
            for (int64_t k = 0; k < len; k++) acc[k] = acc[k] / divisor;
        for (int64_t k = 0; k < len; k++) acc[k] = fmaf(acc[k], s, bb[k]);
        ms_store(out, out_kind, i0, len, acc);
    }
}

/* sce's merge (`methods.sce`, select_topk 1), whose observation is the Gram matrix's diagonal (the
 * energies, turned into the weights w): with d_i = x_i - b, the elected sign of d_0 + d_1 + ... (+1 at
 * 0 and NaN, as torch's sign(sign(t) + 0.5)), a_i = 1 where sign d_i is the elected one (0 where d_i is
 * 0 or NaN), merged = sum_i (w_i d_i) a_i and divisor = sum_i w_i a_i in order from zero (`addcmul_`
 * and `add_(alpha=)`: separate roundings, as torch rounds them), out = b + merged / max(divisor, 1e-6). */
MS_CLONES void ms_sce(void *out, int32_t out_kind, const void *const *x, const int32_t *kinds, const int32_t *via,
                      int32_t m, const void *b, int32_t b_kind, int32_t b_via, const float *w, int64_t n) {
    float d[MS_MAX_INPUTS][MS_BLOCK], bb[MS_BLOCK], total[MS_BLOCK], merged[MS_BLOCK], divisor[MS_BLOCK];
    const float floor = 1e-6f;
    for (int64_t i0 = 0; i0 < n; i0 += MS_BLOCK) {
        int64_t len = n - i0 < MS_BLOCK ? n - i0 : MS_BLOCK;
        ms_load(b, b_kind, b_via, i0, len, bb);
        for (int32_t i = 0; i < m; i++) {
            ms_load(x[i], kinds[i], via[i], i0, len, d[i]);
            for (int64_t k = 0; k < len; k++) d[i][k] = d[i][k] - bb[k];
        }
        for (int64_t k = 0; k < len; k++) total[k] = d[0][k];
        for (int32_t i = 1; i < m; i++)
            for (int64_t k = 0; k < len; k++) total[k] = total[k] + d[i][k];
        for (int64_t k = 0; k < len; k++) merged[k] = divisor[k] = 0.0f;
        for (int32_t i = 0; i < m; i++) {
            const float wi = w[i];
            for (int64_t k = 0; k < len; k++) {
                float e = total[k] < 0.0f ? -1.0f : 1.0f;
                float s = d[i][k] > 0.0f ? 1.0f : (d[i][k] < 0.0f ? -1.0f : 0.0f);
                float a = s == e ? 1.0f : 0.0f;
                merged[k] = merged[k] + (wi * d[i][k]) * a;
                divisor[k] = divisor[k] + wi * a;
            }
        }
        for (int64_t k = 0; k < len; k++) {
            float c = divisor[k] < floor ? floor : divisor[k];
            total[k] = bb[k] + merged[k] / c;
        }
        ms_store(out, out_kind, i0, len, total);
    }
}
