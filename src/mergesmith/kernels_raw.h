/* What the kernels of this extension's C files share: the target clones of their loops, the block
 * they work in, and raw values of model files as float32 and back (static inline: each kernel's
 * clone inlines the conversions it calls, vectorised for its own target). */

#ifndef MS_KERNELS_RAW_H
#define MS_KERNELS_RAW_H

#include <stdint.h>
#include <string.h>

/* x86-64-v3 is AVX2 with FMA and F16C: a clone for plain "avx2" has no FMA, so each fmaf there was a
 * call into libm, one value at a time (ms_span 10x slower on an AVX2-only machine than with FMA). The
 * kernels ask for fused products only by fmaf (built with -ffp-contract=off), so the results are the
 * same on every clone. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MS_CLONES
#endif

#define MS_BLOCK 512     /* values per block of the block-by-block kernels */
#define MS_MAX_INPUTS 16 /* models a kernel merges at most (`kernels.MAX_INPUTS`) */

/* Raw values of the three float formats of model files, as float32 and back. `kind`: 0 float32,
 * 1 bfloat16, 2 float16. Conversions to the narrow formats round to nearest even, as torch's do
 * (NaN becomes the quiet NaN 0x7FC0 in bfloat16). */
#define MS_F32 0
#define MS_BF16 1
#define MS_F16 2

static inline float ms_bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t ms_float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float ms_from_bf16(uint16_t h) { return ms_bits_float((uint32_t)h << 16); }

static inline uint16_t ms_to_bf16(float f) {
    uint32_t u = ms_float_bits(f);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef __FLT16_MAX__
#define MS_HAVE_F16 1
#else
#define MS_HAVE_F16 0
#endif

/* Values i0 .. i0 + len of x (of `kind`) as float32, rounded through `via` (-1: not at all). */
static inline void ms_load(const void *x, int32_t kind, int32_t via, int64_t i0, int64_t len, float *out) {
    if (kind == MS_BF16) {
        const uint16_t *p = (const uint16_t *)x + i0;
        for (int64_t k = 0; k < len; k++) out[k] = ms_from_bf16(p[k]);
#if MS_HAVE_F16
    } else if (kind == MS_F16) {
        const _Float16 *p = (const _Float16 *)x + i0;
        for (int64_t k = 0; k < len; k++) out[k] = (float)p[k];
#endif
    } else {
        const float *p = (const float *)x + i0;
        for (int64_t k = 0; k < len; k++) out[k] = p[k];
    }
    if (via == MS_BF16) {
        for (int64_t k = 0; k < len; k++) out[k] = ms_from_bf16(ms_to_bf16(out[k]));
#if MS_HAVE_F16
    } else if (via == MS_F16) {
        for (int64_t k = 0; k < len; k++) out[k] = (float)(_Float16)out[k];
#endif
    }
}

static inline void ms_store(void *out, int32_t kind, int64_t i0, int64_t len, const float *v) {
    if (kind == MS_BF16) {
        uint16_t *p = (uint16_t *)out + i0;
        for (int64_t k = 0; k < len; k++) p[k] = ms_to_bf16(v[k]);
#if MS_HAVE_F16
    } else if (kind == MS_F16) {
        _Float16 *p = (_Float16 *)out + i0;
        for (int64_t k = 0; k < len; k++) p[k] = (_Float16)v[k];
#endif
    } else {
        float *p = (float *)out + i0;
        for (int64_t k = 0; k < len; k++) p[k] = v[k];
    }
}

#endif
