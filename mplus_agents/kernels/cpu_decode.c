/* One decode step of a Llama-family decoder on the CPU, fp32, bandwidth-bound by design.
 *
 * Why C: a decode step of a small model reads every weight once and does little else, so it should run at
 * the machine's memory bandwidth. Through torch it does not: MKL's [1, d] x [d, n] products stream at about
 * half the bandwidth a plain sum reaches, and the ~25 small torch calls per layer add milliseconds of
 * dispatch. Here the weights are packed into row panels ([N/R][K/16][R][16]: R output rows interleaved in
 * 16-float slices), so each thread reads its part of a matrix as one sequential stream with R independent
 * accumulators in flight, and the whole step is one call and one parallel region (mp_step says why).
 *
 * The math is FastDecoder.step's (mplus_agents/fast.py), which is pinned to the stock transformers forward:
 * RMSNorm in fp32, optional per-head q/k RMSNorm (Qwen3), RoPE as x * cos + roll(x, hd/2) * signed sin,
 * grouped-query attention over the static cache, SiLU MLP. tests/test_cpu_decode.py compares every piece with
 * torch on random inputs. Portable C11 with GCC/Clang vector extensions: the compiler maps the 16-float
 * vectors to AVX-512, AVX2, SSE or NEON as -march allows. Threads are OpenMP's, i.e. torch's own pool when
 * torch is loaded first (same libgomp soname), so torch.set_num_threads governs both.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <string.h>

#define MP_R 8   /* output rows per panel */
#define MP_V 16  /* floats per slice */

typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef unsigned short vh __attribute__((vector_size(32), aligned(2)));  /* 16 bfloat16 */
typedef unsigned int vu __attribute__((vector_size(64)));

typedef struct {
    const float *ln1, *ln2;   /* [D] */
    const void *qkv;          /* panel: N = (H + 2 KV) hd, K = D (fp32, or bf16 when wtype = 1) */
    const float *qkv_bias;    /* [(H + 2 KV) hd] or NULL */
    const float *qk_norm;     /* [(H + KV), hd] or NULL */
    const void *o;            /* panel: N = D, K = H hd */
    const void *gate_up;      /* panel: N = 2 F, K = D (gate rows, then up rows) */
    const void *down;         /* panel: N = D, K = F */
} mp_layer;

typedef struct {
    long layers, hidden, heads, kv_heads, head_dim, inter, vocab;
    long wtype;               /* panels hold 0: fp32, 1: bf16 (activations and sums stay fp32) */
    float eps, scale;
    const float *embed;       /* [vocab, D] row-major */
    const float *norm;        /* [D] */
    const void *lm_head;      /* panel: N = vocab, K = D */
    const mp_layer *layer;    /* [layers] */
} mp_model;

static inline long mp_pad(long n, long m) { return (n + m - 1) / m * m; }

typedef float v8f __attribute__((vector_size(32)));
typedef int vi __attribute__((vector_size(64)));

/* Lane sum as a tree of halvings: four shuffle-adds instead of fifteen dependent scalar adds. */
static inline float mp_hsum(vf v) {
    const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    float s[8];
    memcpy(s, &a, sizeof s);
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* out[r] = lane sum of acc[r], r < 8: each halving level adds pairs of vectors after interleaving their
 * halves, so eight rows cost 16 shuffles and 8 adds rather than 8 serial scalar chains (which took ~5% of a
 * bandwidth-bound panel product at 60 GB/s). */
static inline __attribute__((always_inline)) void mp_reduce8(const vf acc[8], float out[8]) {
    vf x[4], y[2];
    for (int i = 0; i < 4; i++) { /* lanes 0-7: acc[2i], 8-15: acc[2i+1] */
        const vf a = acc[2 * i], b = acc[2 * i + 1];
        x[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    for (int i = 0; i < 2; i++) { /* lanes 4r..4r+3: acc[4i+r] */
        const vf a = x[2 * i], b = x[2 * i + 1];
        y[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    }
    /* lanes 2r, 2r+1: acc[r] */
    const vf z = __builtin_shufflevector(y[0], y[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                 __builtin_shufflevector(y[0], y[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    const v8f w = __builtin_shufflevector(z, z, 0, 2, 4, 6, 8, 10, 12, 14) +
                  __builtin_shufflevector(z, z, 1, 3, 5, 7, 9, 11, 13, 15);
    memcpy(out, &w, sizeof w);
}

/* mask ? a : b per lane (mask lanes are all ones or all zeros, as vector comparisons give). */
static inline vf mp_select(vi mask, vf a, vf b) {
    vi ai, bi;
    memcpy(&ai, &a, sizeof a);
    memcpy(&bi, &b, sizeof b);
    const vi r = (ai & mask) | (bi & ~mask);
    vf out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* e^x per lane within 2 ulp: x = n ln2 + r (|r| <= ln2/2, ln2 split in two so n ln2 is exact), a degree-7
 * Taylor polynomial for e^r, and 2^n put into the exponent bits. Below -87.33 the result is 0 (expf gives
 * subnormals there) and above 88 it is +inf (expf overflows at 88.72); softmax only takes x <= 0 and SiLU's
 * e^-g only matters near 0. Vectorised because softmax and SiLU take ~160k exponentials per step of the
 * embedded model, which libm's scalar expf made a few percent of the step. */
static inline vf mp_exp(vf x) {
    const vf lo = (vf){0} - 87.33f, hi = (vf){0} + 88.0f;
    const vi under = x < lo, over = x > hi;
    x = mp_select(under, lo, mp_select(over, hi, x));
    const vf big = (vf){0} + 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const vf n = (x * 1.44269504088896341f + big) - big;
    const vf r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    vf p = (vf){0} + (1.0f / 5040.0f);
    p = p * r + (1.0f / 720.0f);
    p = p * r + (1.0f / 120.0f);
    p = p * r + (1.0f / 24.0f);
    p = p * r + (1.0f / 6.0f);
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    const vf inf = (vf){0} + __builtin_inff();
    return mp_select(under, (vf){0}, mp_select(over, inf, p * two_n));
}

/* y = mp_exp(x) elementwise (scalar expf for a ragged tail): the test hook that pins mp_exp to torch.exp. */
void mp_exp_floats(const float *x, float *y, long n) {
    long i = 0;
    for (; i + MP_V <= n; i += MP_V) {
        const vf e = mp_exp(*(const vf *)(x + i));
        memcpy(y + i, &e, sizeof e);
    }
    for (; i < n; i++) y[i] = expf(x[i]);
}

/* a . b in 16-lane partial sums (the compiler may not reorder a scalar float sum into vectors itself). */
static inline float mp_dot(const float *a, const float *b, long n) {
    vf acc = {0};
    long i = 0;
    for (; i + MP_V <= n; i += MP_V) acc += *(const vf *)(a + i) * *(const vf *)(b + i);
    float s = mp_hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Slice i (16 weights) of a panel as fp32; a bf16 slice widens exactly (bf16 is fp32's upper half). */
static inline __attribute__((always_inline)) vf mp_slice(const void *panel, long i, int bf16) {
    if (!bf16) return *((const vf *)panel + i);
    const vu wide = __builtin_convertvector(*((const vh *)panel + i), vu) << 16;
    vf out;
    memcpy(&out, &wide, sizeof out);
    return out;
}

/* Rows b*R .. b*R+R-1 of y = panel . x (+ bias[0:n]); x has `slices` * 16 floats, zero beyond K. `bf16` is a
 * constant wherever it is inlined (mp_panel_part), so each loop is specialised, with no branch in it. */
static inline __attribute__((always_inline)) void mp_panel_rows(const void *panel, int bf16, const float *x,
                                                                const float *bias, float *y, long n, long slices,
                                                                long b) {
    const long first = b * MP_R * slices;  /* index of the block's first slice */
    vf acc[MP_R];
    for (int r = 0; r < MP_R; r++) acc[r] = (vf){0};
    for (long c = 0; c < slices; c++) {
        const vf xv = *(const vf *)(x + c * MP_V);
        for (int r = 0; r < MP_R; r++) acc[r] += mp_slice(panel, first + c * MP_R + r, bf16) * xv;
    }
    float sum[MP_R];
    mp_reduce8(acc, sum);
    for (int r = 0; r < MP_R; r++) {
        const long row = b * MP_R + r;
        y[row] = sum[r] + (bias != NULL && row < n ? bias[row] : 0.0f);
    }
}

/* Blocks [lo, hi) of n for thread t of T: equal shares, the first n % T threads one more (OpenMP's static
 * schedule). */
static inline void mp_range(long n, int t, int T, long *lo, long *hi) {
    const long q = n / T, r = n % T;
    *lo = t * q + (t < r ? t : r);
    *hi = *lo + q + (t < r ? 1 : 0);
}

/* Thread t's share of y = panel . x (+ bias), inside a parallel region; `bf16` is a constant at each call. */
static inline __attribute__((always_inline)) void mp_panel_part(const void *panel, int bf16, const float *x,
                                                                const float *bias, float *y, long n, long k, int t,
                                                                int T) {
    const long slices = mp_pad(k, MP_V) / MP_V;
    long lo, hi;
    mp_range(mp_pad(n, MP_R) / MP_R, t, T, &lo, &hi);
    for (long b = lo; b < hi; b++) mp_panel_rows(panel, bf16, x, bias, y, n, slices, b);
}

/* y[0 : ceil(N/R) R] = panel . x (+ bias[0:N]); x has mp_pad(K, 16) floats, zero beyond K. */
void mp_gemv(const float *panel, const float *x, const float *bias, float *y, long n, long k) {
#pragma omp parallel
    mp_panel_part(panel, 0, x, bias, y, n, k, omp_get_thread_num(), omp_get_num_threads());
}

/* mp_gemv over a bf16 panel: the fp32 product with bf16-rounded weights, reading half the bytes. */
void mp_gemv_bf16(const unsigned short *panel, const float *x, const float *bias, float *y, long n, long k) {
#pragma omp parallel
    mp_panel_part(panel, 1, x, bias, y, n, k, omp_get_thread_num(), omp_get_num_threads());
}

/* Thread t's share of one of the step's products, in the model's weight type. */
static void mp_product_part(const mp_model *m, const void *panel, const float *x, const float *bias, float *y,
                            long n, long k, int t, int T) {
    if (m->wtype == 1)
        mp_panel_part(panel, 1, x, bias, y, n, k, t, T);
    else
        mp_panel_part(panel, 0, x, bias, y, n, k, t, T);
}

/* out = w * x / sqrt(mean(x^2) + eps), LlamaRMSNorm in fp32. */
void mp_rms(const float *x, const float *w, float *out, long n, float eps) {
    const float ss = mp_dot(x, x, n);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (long i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* x[0:hd] rotated in place: x * cos + roll(x, hd/2) * sin, with sin's first half negated (fast.py's table). */
static void mp_rope(float *x, const float *cos, const float *sin, long hd, float *tmp) {
    const long half = hd / 2;
    for (long d = 0; d < hd; d++) tmp[d] = x[d] * cos[d] + x[(d + half) % hd] * sin[d];
    memcpy(x, tmp, (size_t)hd * sizeof(float));
}

#define MP_CHUNK 64 /* positions per attention work item */

/* Floats of work space mp_attend needs for a cache of `cap` positions: scores, and each chunk's partial
 * softmax (max, sum, weighted values) per head. */
long mp_attend_floats(long heads, long head_dim, long cap) {
    return heads * cap + heads * (head_dim + 2) * ((cap + MP_CHUNK - 1) / MP_CHUNK);
}

/* Query heads of a KV group served by one pass over a chunk's keys and values. Smaller groups ride in a pass
 * of four as repeats of their last head (wasted arithmetic, no extra memory traffic): passes specialised to
 * 1 and 2 heads made the embedded model's groups of 3 run 10-14% slower (accumulators spilled). */
#define MP_GH 4

/* Slice c of a row of `n` floats as a vector, zero past n: a plain load except for a ragged last slice (read
 * through a copy, so nothing past the row or the cache is touched) or a slice wholly past the row. */
static inline vf mp_row_slice(const float *row, long c, long n) {
    if ((c + 1) * MP_V <= n) return *(const vf *)(row + c * MP_V);
    vf out = {0};
    if (c * MP_V < n) memcpy(&out, row + c * MP_V, (size_t)(n - c * MP_V) * sizeof(float));
    return out;
}

/* s[h][j] = scale q_h . k_j for MP_GH query heads (q: [MP_GH][slices * 16], zero-padded) and `count` key rows,
 * four rows at a time: each key slice is loaded once and used by every head, with the 16 products in
 * registers. Rows past `count` repeat the last one and are dropped; s[h] may alias s[h'] for padding heads. */
static void mp_scores(const float *q, const float *k, long head_dim, long count, float scale, float *const *s) {
    const long slices = mp_pad(head_dim, MP_V) / MP_V;
    for (long j0 = 0; j0 < count; j0 += 4) {
        const float *row[4];
        vf acc[MP_GH * 4];
        for (int r = 0; r < 4; r++) row[r] = k + (j0 + r < count ? j0 + r : count - 1) * head_dim;
        for (int i = 0; i < MP_GH * 4; i++) acc[i] = (vf){0};
        for (long c = 0; c < slices; c++) {
            vf kr[4];
            for (int r = 0; r < 4; r++) kr[r] = mp_row_slice(row[r], c, head_dim);
            for (int h = 0; h < MP_GH; h++) {
                const vf qv = *(const vf *)(q + (h * slices + c) * MP_V);
                for (int r = 0; r < 4; r++) acc[h * 4 + r] += kr[r] * qv;
            }
        }
        for (int half = 0; half < MP_GH / 2; half++) { /* heads 2 half, 2 half + 1: eight lane sums */
            float sum[8];
            mp_reduce8(acc + half * 8, sum);
            for (int i = 0; i < 8; i++)
                if (j0 + i % 4 < count) s[half * 2 + i / 4][j0 + i % 4] = sum[i] * scale;
        }
    }
}

/* o[h][0:head_dim] = sum_j p[h][j] v_j over `count` value rows for MP_GH heads, four slices at a time: each
 * row's slices are loaded once and used by every head (16 accumulators). o[h] may alias for padding heads,
 * which hold the same values. */
static void mp_weighted_rows(const float *const *p, const float *v, long head_dim, long count, float *const *o) {
    for (long c0 = 0; c0 < mp_pad(head_dim, MP_V) / MP_V; c0 += 4) {
        vf acc[MP_GH * 4];
        for (int i = 0; i < MP_GH * 4; i++) acc[i] = (vf){0};
        for (long j = 0; j < count; j++) {
            vf vr[4];
            for (int u = 0; u < 4; u++) vr[u] = mp_row_slice(v + j * head_dim, c0 + u, head_dim);
            for (int h = 0; h < MP_GH; h++) {
                const float w = p[h][j];
                for (int u = 0; u < 4; u++) acc[h * 4 + u] += w * vr[u];
            }
        }
        for (int h = 0; h < MP_GH; h++)
            for (int u = 0; u < 4 && (c0 + u) * MP_V < head_dim; u++) {
                const long n = head_dim - (c0 + u) * MP_V < MP_V ? head_dim - (c0 + u) * MP_V : MP_V;
                memcpy(o[h] + (c0 + u) * MP_V, &acc[h * 4 + u], (size_t)n * sizeof(float));
            }
    }
}

/* Work items [lo, hi) of attention over len positions: item (g, c) is chunk c of KV head g, g-major. For each
 * query head of the group it leaves the chunk's partial softmax (max m, sum l, weighted values o) in `part`
 * ([chunks][heads][m, l, o[hd]]) and its exponentials in `scores` ([heads][cap]). */
static void mp_attend_items(const float *q, const float *k, const float *v, float *scores, float *part, long heads,
                            long kv_heads, long head_dim, long cap, long len, float scale, long lo, long hi) {
    const long groups = heads / kv_heads, chunks = (len + MP_CHUNK - 1) / MP_CHUNK, stride = head_dim + 2;
    const long qslices = mp_pad(head_dim, MP_V) / MP_V;
    float qpad[MP_GH * qslices * MP_V];
    for (long item = lo; item < hi; item++) {
        const long g = item / chunks, c = item % chunks, j0 = c * MP_CHUNK;
        const long count = len - j0 < MP_CHUNK ? len - j0 : MP_CHUNK;
        const float *kg = k + (g * cap + j0) * head_dim, *vg = v + (g * cap + j0) * head_dim;
        for (long h0 = g * groups; h0 < (g + 1) * groups; h0 += MP_GH) {
            float *s[MP_GH], *o[MP_GH];
            memset(qpad, 0, sizeof qpad);
            for (long i = 0; i < MP_GH; i++) { /* heads past the group repeat its last one */
                const long h = h0 + i < (g + 1) * groups ? h0 + i : (g + 1) * groups - 1;
                memcpy(qpad + i * qslices * MP_V, q + h * head_dim, (size_t)head_dim * sizeof(float));
                s[i] = scores + h * cap + j0;
                o[i] = part + (c * heads + h) * stride + 2;
            }
            mp_scores(qpad, kg, head_dim, count, scale, s);
            for (long h = h0; h < h0 + MP_GH && h < (g + 1) * groups; h++) {
                float *sh = scores + h * cap + j0, mx = -INFINITY, total = 0.0f;
                for (long j = 0; j < count; j++) mx = sh[j] > mx ? sh[j] : mx;
                long j = 0;
                for (; j + MP_V <= count; j += MP_V) {
                    const vf e = mp_exp(*(const vf *)(sh + j) - mx);
                    memcpy(sh + j, &e, sizeof e);
                    total += mp_hsum(e);
                }
                for (; j < count; j++) total += (sh[j] = expf(sh[j] - mx));
                part[(c * heads + h) * stride] = mx;
                part[(c * heads + h) * stride + 1] = total;
            }
            mp_weighted_rows((const float *const *)s, vg, head_dim, count, o);
        }
    }
}

/* out[h] for heads [h0, h1): the chunks' partial softmaxes rescaled to their common max and summed. */
static void mp_attend_combine(const float *part, float *out, long heads, long head_dim, long chunks, long h0,
                              long h1) {
    const long stride = head_dim + 2;
    for (long h = h0; h < h1; h++) {
        float mx = -INFINITY, total = 0.0f, *oh = out + h * head_dim;
        for (long c = 0; c < chunks; c++) mx = part[(c * heads + h) * stride] > mx ? part[(c * heads + h) * stride] : mx;
        for (long d = 0; d < head_dim; d++) oh[d] = 0.0f;
        for (long c = 0; c < chunks; c++) {
            const float *ph = part + (c * heads + h) * stride, w = expf(ph[0] - mx);
            total += w * ph[1];
            for (long d = 0; d < head_dim; d++) oh[d] += w * ph[2 + d];
        }
        for (long d = 0; d < head_dim; d++) oh[d] /= total;
    }
}

/* out[h] = softmax(scale q_h . K[g][0:len]) . V[g][0:len] for each query head h (g = h / groups).
 * k, v: [KV][cap][hd] of one layer; work: mp_attend_floats(heads, hd, cap) floats.
 *
 * Split into chunks of positions (flash-decoding), each chunk and KV head one work item that keeps a partial
 * softmax per query head, merged at the end: the work divides evenly over threads whatever the head count
 * (nine query heads on two threads left one thread idle a ninth of the time), and each key and value row is
 * read once per KV head, not once per query head. */
void mp_attend(const float *q, const float *k, const float *v, float *out, float *work, long heads,
               long kv_heads, long head_dim, long cap, long len, float scale) {
    const long chunks = (len + MP_CHUNK - 1) / MP_CHUNK;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        long lo, hi;
        mp_range(chunks * kv_heads, t, T, &lo, &hi);
        mp_attend_items(q, k, v, work, work + heads * cap, heads, kv_heads, head_dim, cap, len, scale, lo, hi);
#pragma omp barrier
        mp_range(heads, t, T, &lo, &hi);
        mp_attend_combine(work + heads * cap, out, heads, head_dim, chunks, lo, hi);
    }
}

/* Floats of scratch mp_step needs for a cache of `cap` positions: the products' outputs, shared by the threads,
 * and attention's work space. */
long mp_scratch_floats(const mp_model *m, long cap) {
    return mp_pad((m->heads + 2 * m->kv_heads) * m->head_dim, MP_R) + mp_pad(2 * m->inter, MP_R) +
           mp_pad(m->hidden, MP_R) + mp_attend_floats(m->heads, m->head_dim, cap);
}

/* Feed `token` at rotary row (cos, sin) after `len` cached positions; writes post-RoPE k and v at index
 * `len` of every layer's cache ([L][KV][cap][hd]) and the next-token logits (mp_pad(vocab, R) floats).
 * `scratch` holds mp_scratch_floats(m, cap) floats.
 *
 * One parallel region for the whole step. Each thread keeps its own copy of the small vectors (residual,
 * normed input, attention output, MLP activation: ~4k floats for the embedded model, on its stack) and
 * computes the elementwise parts redundantly, so the only synchronisation is a barrier after each product
 * (its output is shared) and two around attention: six per layer, against ~ten fork/join points when every
 * product was its own parallel loop. */
void mp_step(const mp_model *m, float *cache_k, float *cache_v, long cap, long len, long token, const float *cos,
             const float *sin, float *logits, float *scratch) {
    const long D = m->hidden, H = m->heads, KV = m->kv_heads, hd = m->head_dim, F = m->inter, L = m->layers;
    const long nqkv = (H + 2 * KV) * hd, chunks = (len + 1 + MP_CHUNK - 1) / MP_CHUNK;
    float *qkv = scratch, *gu = qkv + mp_pad(nqkv, MP_R), *out = gu + mp_pad(2 * F, MP_R);
    float *scores = out + mp_pad(D, MP_R), *part = scores + H * cap;
    const long layer_stride = KV * cap * hd;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        /* Inputs of products (xn, att, act) keep zero pad lanes: the panels read whole 16-float slices. */
        float h[mp_pad(D, MP_V)], xn[mp_pad(D, MP_V)], rq[nqkv], att[mp_pad(H * hd, MP_V)], act[mp_pad(F, MP_V)];
        float tmp[hd];
        memset(xn, 0, sizeof xn);
        memset(att, 0, sizeof att);
        memset(act, 0, sizeof act);
        memcpy(h, m->embed + token * D, (size_t)D * sizeof(float));
        mp_rms(h, m->layer[0].ln1, xn, D, m->eps);
        for (long l = 0; l < L; l++) {
            const mp_layer *ly = &m->layer[l];
            float *kc = cache_k + l * layer_stride, *vc = cache_v + l * layer_stride;
            mp_product_part(m, ly->qkv, xn, ly->qkv_bias, qkv, nqkv, D, t, T);
#pragma omp barrier
            memcpy(rq, qkv, (size_t)nqkv * sizeof(float));
            for (long j = 0; j < H + KV; j++) {
                float *x = rq + j * hd;
                if (ly->qk_norm != NULL) mp_rms(x, ly->qk_norm + j * hd, x, hd, m->eps);
                mp_rope(x, cos, sin, hd, tmp);
            }
            for (long g = t; g < KV; g += T) {
                memcpy(kc + (g * cap + len) * hd, rq + (H + g) * hd, (size_t)hd * sizeof(float));
                memcpy(vc + (g * cap + len) * hd, rq + (H + KV + g) * hd, (size_t)hd * sizeof(float));
            }
#pragma omp barrier
            long lo, hi;
            mp_range(chunks * KV, t, T, &lo, &hi);
            mp_attend_items(rq, kc, vc, scores, part, H, KV, hd, cap, len + 1, m->scale, lo, hi);
#pragma omp barrier
            mp_attend_combine(part, att, H, hd, chunks, 0, H);
            mp_product_part(m, ly->o, att, NULL, out, D, H * hd, t, T);
#pragma omp barrier
            for (long i = 0; i < D; i++) h[i] += out[i];
            mp_rms(h, ly->ln2, xn, D, m->eps);
            mp_product_part(m, ly->gate_up, xn, NULL, gu, 2 * F, D, t, T);
#pragma omp barrier
            long i = 0;
            for (; i + MP_V <= F; i += MP_V) {
                const vf g = *(const vf *)(gu + i), a = g / (mp_exp((vf){0} - g) + 1.0f) * *(const vf *)(gu + F + i);
                memcpy(act + i, &a, sizeof a);
            }
            for (; i < F; i++) act[i] = gu[i] / (1.0f + expf(-gu[i])) * gu[F + i];
            mp_product_part(m, ly->down, act, NULL, out, D, F, t, T);
#pragma omp barrier
            for (long i = 0; i < D; i++) h[i] += out[i];
            mp_rms(h, l + 1 < L ? m->layer[l + 1].ln1 : m->norm, xn, D, m->eps);
        }
        mp_product_part(m, m->lm_head, xn, NULL, logits, m->vocab, D, t, T);
    }
}
