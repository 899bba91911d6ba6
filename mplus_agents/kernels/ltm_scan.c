/* Bounds on every long-term token's retrieval score from an int8 copy of the keys, one pass, no temporaries.
 *
 * Why: exact `max_z` / `max_logit` retrieval (mplus_agents/retrieval.py) over a million tokens per layer is a
 * [T, 192] x [192, 1M] float GEMM plus a [T, 1M] temporary that is read several times: ~0.4-0.7 s on two cores.
 * Here each key is an int8 row with one scale per token, packed in panels of 16 tokens so that one 512-bit
 * VNNI instruction forms 16 tokens x 4 dims of products for one query, and each query token's logit is turned
 * into a lower and an upper bound of the exact (float) score right away. Only the max over query tokens of
 * each bound leaves the kernel: [n] floats twice. The caller (mplus_agents/index/scan.py) lists the tokens whose
 * upper bound reaches the budget-th best lower bound, rescores just those exactly, and proves the selection.
 *
 * Bound: with q the exact query, k the exact key, q~ = sq * iq and k~ = sk * ik their int8 copies,
 *   |q.k - q~.k~| <= |q| |k - k~| + |q - q~| |k~|   (Cauchy-Schwarz twice),
 * so the caller passes per token (sk, ek = |k - k~| inflated for float rounding, nk = |k~|) and per query
 * (sq, |q|, eq = |q - q~|, the standardisation mean and 1/std). Integer sums are exact, the query's offset
 * comes off in integers, and the float products carry relative errors of ~1e-7, far inside the inflation.
 *
 * Layout: panel p holds tokens 16p..16p+15 as [D/4][16][4] bytes, key bytes stored as k + 128 (unsigned, what
 * VNNI's u8 x s8 product wants); the query's byte sum times 128 is subtracted back. Queries come as int32 words
 * (4 int8 each) in groups (sc_group_size).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define SC_VNNI 1
#endif

#define SC_P 16 /* tokens per panel */

typedef struct {
    float sq, corr, qn, eq, mean, inv;  /* corr = 128 * sum of the query's int8 values */
} sc_query;

int mp_scan_vnni(void) {
#ifdef SC_VNNI
    return 1;
#else
    return 0;
#endif
}

/* Query tokens come in groups of 16, then 8, 4, 2 and 1 (at most one of each after the 16s, so no query is
 * padded); group g of size G starting at token r stores its words transposed, [D/4][G] at q + r * d4, so one
 * pointer walks them all. */
static inline long sc_group_size(long left) {
    return left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

#ifdef SC_VNNI
/* acc += kv (u8) . broadcast(*word) (s8), in place. GCC 12 compiles the intrinsic with a register copy per
 * call (the accumulator changes register every time), which halves the kernel's speed; the one-instruction
 * asm keeps each accumulator where it is and folds the broadcast into the memory operand. */
#define SC_DPBUSD(acc, kv, word) __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(kv), "m"(*(word)))

/* One group of G query tokens against one panel: G accumulators in registers, one key load per 4 dims, each
 * query word a broadcast operand of its multiply-add. */
#define SC_GROUP(G)                                                                                          \
    static inline void sc_group_##G(const uint8_t *kp, long d4, const int32_t *q, const sc_query *qa,      \
                                    __m512 sk, __m512 ek, __m512 nk, __m512 *hi, __m512 *lo) {              \
        __m512i acc[G];                                                                                      \
        _Pragma("GCC unroll 16") for (int i = 0; i < G; i++) acc[i] = _mm512_setzero_si512();                \
        for (long d = 0; d < d4; d++) {                                                                      \
            const __m512i kv = _mm512_load_si512((const void *)(kp + d * 64));                               \
            const int32_t *qd = q + d * G;                                                                   \
            _Pragma("GCC unroll 16") for (int i = 0; i < G; i++) SC_DPBUSD(acc[i], kv, qd + i);             \
        }                                                                                                    \
        _Pragma("GCC unroll 16") for (int i = 0; i < G; i++) {                                               \
            __m512i exact = _mm512_sub_epi32(acc[i], _mm512_set1_epi32((int32_t)qa[i].corr));                \
            __m512 l = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(sk, _mm512_set1_ps(qa[i].sq)));\
            __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(qa[i].qn), ek, _mm512_mul_ps(_mm512_set1_ps(qa[i].eq), nk)); \
            __m512 c = _mm512_sub_ps(l, _mm512_set1_ps(qa[i].mean));                                        \
            __m512 inv = _mm512_set1_ps(qa[i].inv);                                                          \
            *hi = _mm512_max_ps(*hi, _mm512_mul_ps(_mm512_add_ps(c, e), inv));                               \
            *lo = _mm512_max_ps(*lo, _mm512_mul_ps(_mm512_sub_ps(c, e), inv));                               \
        }                                                                                                    \
    }
SC_GROUP(16)
SC_GROUP(8)
SC_GROUP(4)
SC_GROUP(2)
SC_GROUP(1)

static void sc_panel_vnni(const uint8_t *kp, long d4, const int32_t *q, const sc_query *qa, long t,
                          const float *sk, const float *ek, const float *nk, float *hi, float *lo, long real,
                          float *phi, float *plo) {
    __m512 vs = _mm512_loadu_ps(sk), ve = _mm512_loadu_ps(ek), vn = _mm512_loadu_ps(nk);
    __m512 h = _mm512_set1_ps(-INFINITY), l = _mm512_set1_ps(-INFINITY);
    for (long r = 0; r < t; r += sc_group_size(t - r)) {
        const int32_t *qg = q + r * d4;
        switch (sc_group_size(t - r)) {
        case 16: sc_group_16(kp, d4, qg, qa + r, vs, ve, vn, &h, &l); break;
        case 8: sc_group_8(kp, d4, qg, qa + r, vs, ve, vn, &h, &l); break;
        case 4: sc_group_4(kp, d4, qg, qa + r, vs, ve, vn, &h, &l); break;
        case 2: sc_group_2(kp, d4, qg, qa + r, vs, ve, vn, &h, &l); break;
        default: sc_group_1(kp, d4, qg, qa + r, vs, ve, vn, &h, &l); break;
        }
    }
    _mm512_storeu_ps(hi, h);
    _mm512_storeu_ps(lo, l);
    const __mmask16 live = real >= SC_P ? (__mmask16)0xFFFF : (__mmask16)((1u << real) - 1u);
    *phi = _mm512_mask_reduce_max_ps(live, h);
    *plo = _mm512_mask_reduce_max_ps(live, l);
}
#endif

/* Portable path: the same arithmetic one token at a time (what the VNNI path must equal). */
static void sc_panel_plain(const uint8_t *kp, long d4, const int32_t *q, const sc_query *qa, long t,
                           const float *sk, const float *ek, const float *nk, float *hi, float *lo, long real,
                           float *phi, float *plo) {
    *phi = *plo = -INFINITY;
    for (int j = 0; j < SC_P; j++) {
        float h = -INFINITY, l = -INFINITY;
        for (long r = 0, g = sc_group_size(t); r < t; r += g, g = sc_group_size(t - r)) {
            for (long i = 0; i < g; i++) {
                int32_t acc = 0;
                for (long d = 0; d < d4; d++) {
                    const int8_t *qw = (const int8_t *)(q + r * d4 + d * g + i);
                    for (int b = 0; b < 4; b++) acc += (int32_t)kp[(d * SC_P + j) * 4 + b] * (int32_t)qw[b];
                }
                const sc_query *a = qa + r + i;
                float v = (float)(acc - (int32_t)a->corr) * (sk[j] * a->sq);
                float e = a->qn * ek[j] + a->eq * nk[j];
                float c = v - a->mean;
                float up = (c + e) * a->inv, dn = (c - e) * a->inv;
                h = up > h ? up : h;
                l = dn > l ? dn : l;
            }
        }
        hi[j] = h;
        lo[j] = l;
        if (j < real) {
            *phi = h > *phi ? h : *phi;
            *plo = l > *plo ? l : *plo;
        }
    }
}

/* hi[j] >= exact score of token j >= lo[j] for the n tokens (ceil(n / 16) panels; hi and lo have room for
 * whole panels), and per panel the max of each over its real tokens (phi, plo), which lets the caller pick a
 * cut and skip whole panels without reading every token again.
 * kaux: [3][kstride] floats (sk, ek, nk per token); q: grouped words (above); qa: [t].
 * plain = 1 takes the portable path even where VNNI is compiled in (the tests compare the two). */
void mp_scan_bounds(const uint8_t *keys, const float *kaux, long kstride, long n, long d4, const int32_t *q,
                    const sc_query *qa, long t, float *hi, float *lo, float *phi, float *plo, int plain) {
    const float *sk = kaux, *ek = kaux + kstride, *nk = kaux + 2 * kstride;
    const long panels = (n + SC_P - 1) / SC_P;
#pragma omp parallel for schedule(static)
    for (long p = 0; p < panels; p++) {
        const uint8_t *kp = keys + p * d4 * SC_P * 4;
        const long o = p * SC_P;
#ifdef SC_VNNI
        if (!plain) {
            sc_panel_vnni(kp, d4, q, qa, t, sk + o, ek + o, nk + o, hi + o, lo + o, n - o, phi + p, plo + p);
            continue;
        }
#endif
        sc_panel_plain(kp, d4, q, qa, t, sk + o, ek + o, nk + o, hi + o, lo + o, n - o, phi + p, plo + p);
    }
}

/* The tokens (< n) whose upper bound reaches `cut`, ascending, and the largest upper bound below it (a bound for
 * every unlisted token). Panels whose max (phi) is below the cut are skipped whole. Returns how many were
 * listed; writes at most `cap` indices (the caller retries with a larger buffer when the count exceeds it).
 * NaN counts as reaching the cut, so the exact rescoring sees it. */
long mp_scan_list(const float *hi, const float *phi, long n, float cut, int64_t *out, long cap, float *below) {
    const long panels = (n + SC_P - 1) / SC_P;
    long m = 0;
    float b = -INFINITY;
    for (long p = 0; p < panels; p++) {
        if (phi[p] < cut) {
            b = phi[p] > b ? phi[p] : b;
            continue;
        }
        const long end = (p + 1) * SC_P < n ? (p + 1) * SC_P : n;
        for (long j = p * SC_P; j < end; j++) {
            float h = hi[j];
            if (!(h < cut)) {
                if (m < cap) out[m] = j;
                m++;
            } else if (h > b) {
                b = h;
            }
        }
    }
    *below = b;
    return m;
}

/* Quantise float rows x [m][d] (global rows start..start+m-1), each divided by `channel` [d] first, into the
 * panels and their per-token fields: scale = amax / 127, int8 = round-half-even(y / scale) (quant.quantize's
 * arithmetic, byte for byte), error |y - scale * int8| + slack |y| and norm |scale * int8|, summed in double
 * and rounded up to float (y = the divided row). Rows past the last one in its panel are left alone (the
 * caller fills fresh panels with 128, i.e. int8 zeros). */
void mp_scan_pack(const float *x, const float *channel, long m, long d, long start, long d4, float slack,
                  uint8_t *keys, float *kaux, long kstride) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < m; r++) {
        float row[d];
        for (long i = 0; i < d; i++) row[i] = x[r * d + i] / channel[i];
        const long g = start + r, p = g / SC_P, lane = g % SC_P;
        uint8_t *panel = keys + p * d4 * SC_P * 4;
        float amax = 0.0f;
        for (long i = 0; i < d; i++) amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
        const float scale = amax / 127.0f, safe = scale > 0.0f ? scale : 1.0f;
        double err = 0.0, norm = 0.0, exact = 0.0;
        for (long i = 0; i < d4 * 4; i++) {
            float v = 0.0f;
            if (i < d) {
                v = nearbyintf(row[i] / safe);
                v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
                double deq = (double)v * (double)scale, diff = (double)row[i] - deq;
                err += diff * diff;
                norm += deq * deq;
                exact += (double)row[i] * (double)row[i];
            }
            panel[((i / 4) * SC_P + lane) * 4 + i % 4] = (uint8_t)((int)v + 128);
        }
        kaux[g] = scale;
        kaux[kstride + g] = nextafterf((float)(sqrt(err) + (double)slack * sqrt(exact)), INFINITY);
        kaux[2 * kstride + g] = nextafterf((float)sqrt(norm), INFINITY);
    }
}

/* The exact scores of m gathered float rows [m][d]: out[j] = max_t (q_t . row_j - mean[t]) / std[t] (max_z;
 * max_logit passes mean 0 and std 1). The same float32 arithmetic as retrieval.head_mean_logits followed by
 * the standardisation, in another summation order (the float rounding of any two BLAS calls differs alike).
 * Rows are few (the tokens the bounds could not rule out), so this is a plain loop, parallel over rows. */
void mp_scan_rescore(const float *rows, long m, long d, const float *q, long t, const float *mean,
                     const float *std, float *out) {
#pragma omp parallel for schedule(static)
    for (long j = 0; j < m; j++) {
        const float *row = rows + j * d;
        float best = -INFINITY;
        for (long i = 0; i < t; i++) {
            const float *qi = q + i * d;
            float acc[16] = {0};
            long k = 0;
            for (; k + 16 <= d; k += 16)
                for (int l = 0; l < 16; l++) acc[l] += qi[k + l] * row[k + l];
            float dot = 0.0f;
            for (int l = 0; l < 16; l++) dot += acc[l];
            for (; k < d; k++) dot += qi[k] * row[k];
            const float z = (dot - mean[i]) / std[i];
            best = (z > best || z != z) ? z : best; /* NaN wins, as torch's amax propagates it */
        }
        out[j] = best;
    }
}
