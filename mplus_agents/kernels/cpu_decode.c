/* One decode step of a Llama-family decoder on the CPU, fp32, bandwidth-bound by design.
 *
 * Why C: a decode step of a small model reads every weight once and does little else, so it should run at
 * the machine's memory bandwidth. Through torch it does not: MKL's [1, d] x [d, n] products stream at about
 * half the bandwidth a plain sum reaches, and the ~25 small torch calls per layer add milliseconds of
 * dispatch. Here the weights are packed into row panels ([N/R][K/16][R][16]: R output rows interleaved in
 * 16-float slices), so each thread reads its part of a matrix as one sequential stream with R independent
 * accumulators in flight, and the whole step is one call.
 *
 * The math is FastDecoder.step's (mplus_agents/fast.py), which is pinned to the stock transformers forward:
 * RMSNorm in fp32, optional per-head q/k RMSNorm (Qwen3), RoPE as x * cos + roll(x, hd/2) * signed sin,
 * grouped-query attention over the static cache, SiLU MLP. tests/test_cpu_decode.py compares every piece with
 * torch on random inputs. Portable C11 with GCC/Clang vector extensions: the compiler maps the 16-float
 * vectors to AVX-512, AVX2, SSE or NEON as -march allows. Threads are OpenMP's, i.e. torch's own pool when
 * torch is loaded first (same libgomp soname), so torch.set_num_threads governs both.
 */
#include <math.h>
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

static inline float mp_hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < MP_V; i++) s += v[i];
    return s;
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
 * constant at both call sites, so each entry point's loop is specialised, with no branch in it. */
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
    for (int r = 0; r < MP_R; r++) {
        const long row = b * MP_R + r;
        y[row] = mp_hsum(acc[r]) + (bias != NULL && row < n ? bias[row] : 0.0f);
    }
}

/* y[0 : ceil(N/R) R] = panel . x (+ bias[0:N]); x has mp_pad(K, 16) floats, zero beyond K. */
void mp_gemv(const float *panel, const float *x, const float *bias, float *y, long n, long k) {
    const long slices = mp_pad(k, MP_V) / MP_V;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < mp_pad(n, MP_R) / MP_R; b++) mp_panel_rows(panel, 0, x, bias, y, n, slices, b);
}

/* mp_gemv over a bf16 panel: the fp32 product with bf16-rounded weights, reading half the bytes. */
void mp_gemv_bf16(const unsigned short *panel, const float *x, const float *bias, float *y, long n, long k) {
    const long slices = mp_pad(k, MP_V) / MP_V;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < mp_pad(n, MP_R) / MP_R; b++) mp_panel_rows(panel, 1, x, bias, y, n, slices, b);
}

static void mp_product(const mp_model *m, const void *panel, const float *x, const float *bias, float *y, long n,
                       long k) {
    if (m->wtype == 1)
        mp_gemv_bf16((const unsigned short *)panel, x, bias, y, n, k);
    else
        mp_gemv((const float *)panel, x, bias, y, n, k);
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

/* out[h] = softmax(scale q_h . K[g][0:len]) . V[g][0:len] for each query head h (g = h / groups).
 * k, v: [KV][cap][hd] of one layer; scores: [heads][len] scratch. */
void mp_attend(const float *q, const float *k, const float *v, float *out, float *scores, long heads,
               long kv_heads, long head_dim, long cap, long len, float scale) {
    const long groups = heads / kv_heads;
#pragma omp parallel for schedule(static)
    for (long h = 0; h < heads; h++) {
        const float *qh = q + h * head_dim;
        const float *kh = k + (h / groups) * cap * head_dim;
        const float *vh = v + (h / groups) * cap * head_dim;
        float *s = scores + h * len, *oh = out + h * head_dim;
        float mx = -INFINITY;
        for (long j = 0; j < len; j++) {
            s[j] = mp_dot(qh, kh + j * head_dim, head_dim) * scale;
            if (s[j] > mx) mx = s[j];
        }
        float total = 0.0f;
        for (long j = 0; j < len; j++) {
            s[j] = expf(s[j] - mx);
            total += s[j];
        }
        for (long d = 0; d < head_dim; d++) oh[d] = 0.0f;
        for (long j = 0; j < len; j++) {
            const float p = s[j] / total, *vj = vh + j * head_dim;
            for (long d = 0; d < head_dim; d++) oh[d] += p * vj[d];
        }
    }
}

/* Floats of scratch mp_step needs for a cache of `cap` positions. */
long mp_scratch_floats(const mp_model *m, long cap) {
    const long hd = m->head_dim;
    return 2 * mp_pad(m->hidden, MP_V) + mp_pad((m->heads + 2 * m->kv_heads) * hd, MP_R) +
           mp_pad(m->heads * hd, MP_V) + mp_pad(2 * m->inter, MP_R) + mp_pad(m->inter, MP_V) +
           mp_pad(m->hidden, MP_R) + hd + m->heads * cap;
}

/* Feed `token` at rotary row (cos, sin) after `len` cached positions; writes post-RoPE k and v at index
 * `len` of every layer's cache ([L][KV][cap][hd]) and the next-token logits (mp_pad(vocab, R) floats).
 * `scratch` holds mp_scratch_floats(m, cap) floats, zeroed once by the caller (pad lanes must stay zero). */
void mp_step(const mp_model *m, float *cache_k, float *cache_v, long cap, long len, long token, const float *cos,
             const float *sin, float *logits, float *scratch) {
    const long D = m->hidden, H = m->heads, KV = m->kv_heads, hd = m->head_dim, F = m->inter;
    const long nqkv = (H + 2 * KV) * hd;
    /* Layout as counted by mp_scratch_floats; inputs of mp_gemv (xn, att, act) keep zero pad lanes. */
    float *h = scratch, *xn = h + mp_pad(D, MP_V);
    float *qkv = xn + mp_pad(D, MP_V);
    float *att = qkv + mp_pad(nqkv, MP_R);
    float *gu = att + mp_pad(H * hd, MP_V);
    float *act = gu + mp_pad(2 * F, MP_R);
    float *out = act + mp_pad(F, MP_V);
    float *tmp = out + mp_pad(D, MP_R);
    float *scores = tmp + hd;
    const long layer_stride = KV * cap * hd;

    memcpy(h, m->embed + token * D, (size_t)D * sizeof(float));
    for (long l = 0; l < m->layers; l++) {
        const mp_layer *ly = &m->layer[l];
        mp_rms(h, ly->ln1, xn, D, m->eps);
        mp_product(m, ly->qkv, xn, ly->qkv_bias, qkv, nqkv, D);
        for (long j = 0; j < H + KV; j++) {
            float *x = qkv + j * hd;
            if (ly->qk_norm != NULL) mp_rms(x, ly->qk_norm + j * hd, x, hd, m->eps);
            mp_rope(x, cos, sin, hd, tmp);
        }
        float *kc = cache_k + l * layer_stride, *vc = cache_v + l * layer_stride;
        for (long g = 0; g < KV; g++) {
            memcpy(kc + (g * cap + len) * hd, qkv + (H + g) * hd, (size_t)hd * sizeof(float));
            memcpy(vc + (g * cap + len) * hd, qkv + (H + KV + g) * hd, (size_t)hd * sizeof(float));
        }
        mp_attend(qkv, kc, vc, att, scores, H, KV, hd, cap, len + 1, m->scale);
        mp_product(m, ly->o, att, NULL, out, D, H * hd);
        for (long i = 0; i < D; i++) h[i] += out[i];
        mp_rms(h, ly->ln2, xn, D, m->eps);
        mp_product(m, ly->gate_up, xn, NULL, gu, 2 * F, D);
        for (long i = 0; i < F; i++) {
            const float g = gu[i];
            act[i] = g / (1.0f + expf(-g)) * gu[F + i];
        }
        mp_product(m, ly->down, act, NULL, out, D, F);
        for (long i = 0; i < D; i++) h[i] += out[i];
    }
    mp_rms(h, m->norm, xn, D, m->eps);
    mp_product(m, m->lm_head, xn, NULL, logits, m->vocab, D);
}
