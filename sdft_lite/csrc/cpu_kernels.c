/* sdft-lite's CPU kernels, built by sdft_lite/kernels.py with the machine's own compiler:
 *   sdft_int8_probs    the int8 proposal's probabilities (sdft_lite.sampling.Int8Proposal)
 *   sdft_int8_inputs   the proposal's kernel inputs and error bound
 *   sdft_int8_draw     the proposal's draws and their acceptance test
 *   sdft_decode_step   one decode step of a small Llama-family decoder (sdft_lite.decode)
 *   sdft_above         the top-k loss's candidates in a vocabulary tile (sdft_lite.tiled_loss)
 *   sdft_softmax_tile  one vocabulary tile of the distillation loss's online softmax
 *                      (sdft_lite.tiled_loss)
 *   sdft_kl_amx        the distillation loss's whole pass over a shared head on AMX bf16 tiles
 *                      (sdft_lite.tiled_loss), and sdft_kl_amx_bytes, what it allocates
 *   sdft_exp_max_error the largest relative error of their exp (checked on every build)
 *   sdft_simd          which vector path this build took
 *
 * sdft_int8_probs: the int8 proposal's probabilities in one pass over an int8 copy of the output head.
 *
 * For rows b and vocabulary ids v in [v0, v1):
 *     logit[b, v] = D[b, v] * (scale[v] * act_scale[b]) + sum_k hk[b, k] * exact[v, k]
 *     probs[b, v] = exp_approx(logit[b, v] * inv_t)
 *     mass[b, v / block] = sum of probs over the block
 * with D[b, v] = sum_i act[b, i] * q[v, i], an exact int32 sum (int16 activations, int8 weights;
 * the caller keeps |act| small enough that no sum overflows); sdft_lite.sampling.Int8Proposal
 * bounds every step's error.
 *
 * The int8 head is read in groups of 16 ids, the two weights of each id for a pair of columns
 * next to each other (`pack_int8_rows` in sdft_lite/sampling.py writes it):
 *     qp[((g * width / 2 + p) * 16 + j) * 2 + e] = q[16 g + j, 2 p + e],
 * so that one multiply-add of int16 pairs (vpmaddwd, or vpdpwssd with AVX-512 VNNI / AVX-VNNI)
 * with a row's two activations of that pair broadcast puts id j's partial sum in lane j: the
 * sums come out one id per lane, with no reduction across lanes. The vocabulary is padded with
 * zero rows to a multiple of 32 ids (two groups per step), scale and exact to the same `stride`.
 * Integer sums are exact, so every path gives the same D, and (the same fp32 operations per
 * lane) the same probabilities. The AMX path (run_range_amx) reads four weights of each id side
 * by side instead of two (`sdft_int8_layout`), the width padded to a multiple of 64.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SDFT_AVX512 1
#endif
#if defined(SDFT_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define SDFT_AMX 1
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define CHUNK 256 /* vocabulary ids per pass of exp (their logits stay in L1) */
#define GROUP 16  /* ids per group of the packed int8 head */
#define MAX_THREADS 64

/* The vector loops below are written once, over VL lanes of fp32 (vf) or int32 (vi) and their
 * comparison masks: AVX-512 (VL 16) where the build has it, else AVX2 (VL 8); without either,
 * only the scalar loops run. */
#if defined(SDFT_AVX512)
#define VL 16
typedef __m512 vf;
typedef __m512i vi;
typedef __mmask16 vmask;
#define vf_set1 _mm512_set1_ps
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_add _mm512_add_ps
#define vf_sub _mm512_sub_ps
#define vf_mul _mm512_mul_ps
#define vf_min _mm512_min_ps
#define vf_max _mm512_max_ps
#define vf_fmadd _mm512_fmadd_ps
#define vf_round(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vf_of_vi _mm512_cvtepi32_ps
#define vf_bits _mm512_castsi512_ps
#define vf_lt(a, b) _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)
#define vf_gt(a, b) _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ)
#define vf_unord(a, b) _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q)
#define vf_zero_where(m, y) _mm512_maskz_mov_ps((__mmask16)~(m), y)
#define vf_set_where(m, y, value) _mm512_mask_blend_ps(m, y, value)
#define vmask_none() ((__mmask16)0)
#define vmask_or(a, b) ((__mmask16)((a) | (b)))
#define vmask_any(m) ((m) != 0)
#define vi_zero _mm512_setzero_si512
#define vi_set1 _mm512_set1_epi32
#define vi_add _mm512_add_epi32
#define vi_shl _mm512_slli_epi32
#define vi_round_of_vf _mm512_cvtps_epi32
#define vi_load(p) _mm512_loadu_si512(p)
#define vi_store(p, x) _mm512_storeu_si512(p, x)
#define vi_widen8(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p))) /* 2 VL int8 -> int16 */
#if defined(__AVX512VNNI__)
#define vi_madd(acc, w, x) _mm512_dpwssd_epi32(acc, w, x)
#else
#define vi_madd(acc, w, x) _mm512_add_epi32(acc, _mm512_madd_epi16(w, x))
#endif
#elif defined(__AVX2__)
#define VL 8
typedef __m256 vf;
typedef __m256i vi;
typedef __m256 vmask;
#define vf_set1 _mm256_set1_ps
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_add _mm256_add_ps
#define vf_sub _mm256_sub_ps
#define vf_mul _mm256_mul_ps
#define vf_min _mm256_min_ps
#define vf_max _mm256_max_ps
#define vf_fmadd _mm256_fmadd_ps
#define vf_round(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vf_of_vi _mm256_cvtepi32_ps
#define vf_bits _mm256_castsi256_ps
#define vf_lt(a, b) _mm256_cmp_ps(a, b, _CMP_LT_OQ)
#define vf_gt(a, b) _mm256_cmp_ps(a, b, _CMP_GT_OQ)
#define vf_unord(a, b) _mm256_cmp_ps(a, b, _CMP_UNORD_Q)
#define vf_zero_where(m, y) _mm256_andnot_ps(m, y)
#define vf_set_where(m, y, value) _mm256_blendv_ps(y, value, m)
#define vmask_none() _mm256_setzero_ps()
#define vmask_or(a, b) _mm256_or_ps(a, b)
#define vmask_any(m) (_mm256_movemask_ps(m) != 0)
#define vi_zero _mm256_setzero_si256
#define vi_set1 _mm256_set1_epi32
#define vi_add _mm256_add_epi32
#define vi_shl _mm256_slli_epi32
#define vi_round_of_vf _mm256_cvtps_epi32
#define vi_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vi_store(p, x) _mm256_storeu_si256((__m256i *)(p), x)
#define vi_widen8(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p))) /* 2 VL int8 -> int16 */
#if defined(__AVXVNNI__)
#define vi_madd(acc, w, x) _mm256_dpwssd_avx_epi32(acc, w, x)
#else
#define vi_madd(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
#endif
#endif

#ifdef VL
/* The sum of a vector's lanes, in lane order. */
static inline float vf_sum(vf x) {
    float lanes[VL], total = 0.0f;
    vf_store(lanes, x);
    for (int j = 0; j < VL; j++) total += lanes[j];
    return total;
}
#endif

#ifdef SDFT_AMX
/* Whether this process may use the AMX tiles: Linux hands out their state on request only
 * (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), and a tile instruction before that
 * faults. Asked once; a kernel or VM that refuses it gets the AVX-512 path. */
static int amx_usable(void) {
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return state;
}
#endif

/* The int8 head's packing (`pack_int8_rows`): 4 where the AMX path runs (the weights of each id
 * for 4 columns side by side, width a multiple of 64), else 2 (pairs, width a multiple of 32). */
int sdft_int8_layout(void) {
#ifdef SDFT_AMX
    if (amx_usable()) return 4;
#endif
    return 2;
}

/* The vector path of this build: 4 AMX int8 (with AVX-512), 3 AVX-512 (VNNI), 2 AVX-512 (BW),
 * 1 AVX2, 0 scalar; +10 where the AVX2 path has AVX-VNNI. */
int sdft_simd(void) {
#ifdef SDFT_AMX
    if (amx_usable()) return 4;
#endif
#if defined(SDFT_AVX512) && defined(__AVX512VNNI__)
    return 3;
#elif defined(SDFT_AVX512)
    return 2;
#elif defined(__AVX2__) && defined(__AVXVNNI__)
    return 11;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* fn on each of `threads` jobs (an array of `size`-byte structs): jobs 1.. on threads of their
 * own, job 0 on the caller's, and any job whose thread did not start on the caller's too. */
static void run_parallel(void *(*fn)(void *), void *jobs, size_t size, int threads) {
    char *job = (char *)jobs;
    pthread_t tids[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[t], NULL, fn, job + t * size) != 0) break;
        started = t;
    }
    fn(job);
    for (int t = started + 1; t < threads; t++) fn(job + t * size);
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
}

/* exp(x) for fp32 x: Cody-Waite reduction by ln 2 in two parts, a degree-7 polynomial, 2^n from
 * the exponent bits. 0 below -87.3 (fp32's normal range ends there), +inf from ~88.376 (where n
 * reaches 128; exp is finite up to 88.72, so 88.376..88.72 give +inf too: the shifted exps of the
 * softmax and attention never get such arguments, SiLU's x / (1 + inf) is its limit -0, and the
 * int8 proposal samples a row whose mass is infinite from the fp32 head). Its largest
 * relative error over every fp32 input is measured by sdft_exp_max_error (tests). The vector
 * versions do the same operations per lane. */
#define EXP_LO -87.3f
#define EXP_HI 88.7f
static inline float exp_scalar(float x) {
    if (x < EXP_LO) return 0.0f;
    if (x > EXP_HI) return INFINITY;
    float n = nearbyintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r + 1.0f);
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return p * two_n;
}

#ifdef VL
static inline vf exp_vec(vf x) {
    vmask lo = vf_lt(x, vf_set1(EXP_LO)), hi = vf_gt(x, vf_set1(EXP_HI));
    vf xc = vf_min(vf_max(x, vf_set1(EXP_LO)), vf_set1(EXP_HI));
    vf n = vf_round(vf_mul(xc, vf_set1(1.44269504088896341f)));
    vf r = vf_fmadd(n, vf_set1(-0.693359375f), xc);
    r = vf_fmadd(n, vf_set1(2.12194440e-4f), r);
    vf p = vf_set1(1.9875691500e-4f);
    p = vf_fmadd(p, r, vf_set1(1.3981999507e-3f));
    p = vf_fmadd(p, r, vf_set1(8.3334519073e-3f));
    p = vf_fmadd(p, r, vf_set1(4.1665795894e-2f));
    p = vf_fmadd(p, r, vf_set1(1.6666665459e-1f));
    p = vf_fmadd(p, r, vf_set1(5.0000001201e-1f));
    p = vf_fmadd(p, vf_mul(r, r), vf_add(r, vf_set1(1.0f)));
    vi bits = vi_shl(vi_add(vi_round_of_vf(n), vi_set1(127)), 23);
    vf y = vf_zero_where(lo, vf_mul(p, vf_bits(bits)));
    return vf_set_where(hi, y, vf_set1(INFINITY));
}
#endif

/* exp of n values (the same arithmetic in the vector and the scalar tail), returning their sum. */
static float exp_run(const float *in, float *out, int64_t n, float inv_t) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef VL
    vf acc = vf_set1(0.0f), scale = vf_set1(inv_t);
    for (; i + VL <= n; i += VL) {
        vf y = exp_vec(vf_mul(vf_load(in + i), scale));
        vf_store(out + i, y);
        acc = vf_add(acc, y);
    }
    total = vf_sum(acc);
#endif
    for (; i < n; i++) {
        out[i] = exp_scalar(in[i] * inv_t);
        total += out[i];
    }
    return total;
}

typedef struct {
    const int8_t *q;       /* [stride / 16, width / 2, 16, 2], the packed head (above) */
    const float *scale;    /* [stride] */
    const float *exact;    /* [k, stride] */
    const int16_t *act;    /* [rows4, width], rows padded with zeros to a multiple of 4 */
    const float *act_scale;/* [rows4] */
    const float *hk;       /* [rows4, k] */
    float *probs;          /* [rows, vocab] */
    float *mass;           /* [rows, blocks] */
    int64_t vocab, stride, width, k, rows, block, chunk, v0, v1;
    float inv_t;
    const uint8_t *act_lo; /* AMX: [rows4, width], the low bytes of act (unsigned) */
    const int8_t *act_hi;  /* AMX: [rows4, width], the high bytes (signed): act = 256 hi + lo */
} job_t;

/* Row b's activations of column pair p as one int32 (the two int16 side by side). */
static inline int32_t act_pair(const int16_t *a, int64_t i) {
    int32_t v;
    memcpy(&v, a + 2 * i, 4);
    return v;
}

/* D[b, v] for the 4 rows b0..b0+3 (activations `a`, [4, width] int16) and the 32 ids of groups g
 * and g + 1, into d[b][0..31]. */
static void dots4x32(const job_t *j, int64_t g, const int16_t *a, int32_t d[4][32]) {
    const int64_t pairs = j->width / 2;
    const int8_t *w0 = j->q + g * pairs * 2 * GROUP, *w1 = w0 + pairs * 2 * GROUP;
#ifdef VL
    /* Each pass: two vectors of VL ids for each row (AVX-512: groups g and g + 1 in one pass;
     * AVX2: in each of two passes, a group's ids 0-7 and 8-15). */
    for (int pass = 0; pass < GROUP / VL; pass++) {
#if VL == GROUP
        const int8_t *wu = w0, *wv = w1;
#else
        const int8_t *wu = pass ? w1 : w0, *wv = wu + 2 * VL;
#endif
        vi s0 = vi_zero(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
        for (int64_t p = 0; p < pairs; p++) {
            vi u = vi_widen8(wu + p * 2 * GROUP), v = vi_widen8(wv + p * 2 * GROUP);
            vi x0 = vi_set1(act_pair(a, p)), x1 = vi_set1(act_pair(a, pairs + p));
            vi x2 = vi_set1(act_pair(a, 2 * pairs + p)), x3 = vi_set1(act_pair(a, 3 * pairs + p));
            s0 = vi_madd(s0, u, x0);
            t0 = vi_madd(t0, v, x0);
            s1 = vi_madd(s1, u, x1);
            t1 = vi_madd(t1, v, x1);
            s2 = vi_madd(s2, u, x2);
            t2 = vi_madd(t2, v, x2);
            s3 = vi_madd(s3, u, x3);
            t3 = vi_madd(t3, v, x3);
        }
        int o = pass * 2 * VL;
        vi_store(d[0] + o, s0);
        vi_store(d[0] + o + VL, t0);
        vi_store(d[1] + o, s1);
        vi_store(d[1] + o + VL, t1);
        vi_store(d[2] + o, s2);
        vi_store(d[2] + o + VL, t2);
        vi_store(d[3] + o, s3);
        vi_store(d[3] + o + VL, t3);
    }
#else
    for (int b = 0; b < 4; b++)
        for (int i = 0; i < 2 * GROUP; i++) d[b][i] = 0;
    for (int half = 0; half < 2; half++) {
        const int8_t *w = half ? w1 : w0;
        for (int64_t p = 0; p < pairs; p++)
            for (int i = 0; i < GROUP; i++)
                for (int b = 0; b < 4; b++)
                    d[b][half * GROUP + i] += (int32_t)w[(p * GROUP + i) * 2] * a[b * j->width + 2 * p] +
                                              (int32_t)w[(p * GROUP + i) * 2 + 1] * a[b * j->width + 2 * p + 1];
    }
#endif
}

/* The logits of rows b0..b0+3 for ids start..end-1 (start a multiple of 32) into
 * logits[b][v - start]; ids up to end rounded up to 32 are computed (zero rows, in the padding). */
#ifdef VL
/* The logits of row `row` for the VL ids from v, their integer sums in d: L = fl(fl(D) fl(s_v r))
 * plus the exact columns' fused multiply-adds. Every vector path (and the AMX one) takes this. */
static inline void logits_vec(const job_t *j, int64_t row, int64_t v, vi d, float *out) {
    const float *hk = j->hk + row * j->k;
    vf y = vf_mul(vf_of_vi(d), vf_mul(vf_load(j->scale + v), vf_set1(j->act_scale[row])));
    for (int64_t c = 0; c < j->k; c++) y = vf_fmadd(vf_set1(hk[c]), vf_load(j->exact + c * j->stride + v), y);
    vf_store(out, y);
}
#endif

static void logits4(const job_t *j, int64_t b0, int64_t start, int64_t end, float logits[4][CHUNK]) {
    const int16_t *a = j->act + b0 * j->width;
    int32_t d[4][32];
    for (int64_t v = start; v < end; v += 2 * GROUP) {
        dots4x32(j, v / GROUP, a, d);
        for (int b = 0; b < 4; b++) {
            const float r = j->act_scale[b0 + b];
            const float *hk = j->hk + (b0 + b) * j->k;
            float *out = &logits[b][v - start];
            int i = 0;
#ifdef VL
            for (; i < 2 * GROUP; i += VL) logits_vec(j, b0 + b, v + i, vi_load(d[b] + i), out + i);
#endif
            for (; i < 2 * GROUP; i++) {
                float y = (float)d[b][i] * (j->scale[v + i] * r);
                for (int64_t c = 0; c < j->k; c++) y = fmaf(hk[c], j->exact[c * j->stride + v + i], y);
                out[i] = y;
            }
        }
    }
}

static void *run_range(void *arg) {
    const job_t *j = (const job_t *)arg;
    float logits[4][CHUNK];
    int64_t blocks = (j->vocab + j->block - 1) / j->block;
    for (int64_t b0 = 0; b0 < j->rows; b0 += 4) {
        int live = (int)(j->rows - b0 < 4 ? j->rows - b0 : 4);
        for (int64_t start = j->v0; start < j->v1; start += j->chunk) {
            int64_t end = start + j->chunk < j->v1 ? start + j->chunk : j->v1;
            logits4(j, b0, start, end, logits);
            /* exp by block: a chunk never straddles a block (block is a multiple of chunk) */
            for (int b = 0; b < live; b++) {
                float s = exp_run(logits[b], j->probs + (b0 + b) * j->vocab + start, end - start, j->inv_t);
                j->mass[(b0 + b) * blocks + start / j->block] += s;
            }
        }
    }
    return NULL;
}

#ifdef SDFT_AMX
/* The AMX path: for up to 16 rows at a time and each group of 16 ids, D = 256 D_hi + D_lo with
 * D_lo = act_lo . q (unsigned x signed bytes, `tdpbusd`) and D_hi = act_hi . q (signed x signed,
 * `tdpbssd`), exact int32 sums over 64 columns per tile product, the weights read as one [16, 64]
 * tile per 64 columns (layout 4: qa[((g * width / 4 + c) * 16 + j) * 4 + e] = q[16 g + j, 4 c + e]).
 * 256 D_hi + D_lo is taken modulo 2^32, so it is D exactly (which fits int32) even where 256 D_hi
 * alone would not. Then the same fp32 operations per id as `logits4`: the same probabilities. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

static void *run_range_amx(void *arg) {
    const job_t *j = (const job_t *)arg;
    const int64_t chunks = j->width / 64, rows4 = (j->rows + 3) / 4 * 4;
    float logits[16][CHUNK];
    int32_t d_lo[16][GROUP], d_hi[16][GROUP];
    int64_t blocks = (j->vocab + j->block - 1) / j->block;
    for (int64_t b0 = 0; b0 < j->rows; b0 += 16) {
        int m = (int)(rows4 - b0 < 16 ? rows4 - b0 : 16), live = (int)(j->rows - b0 < m ? j->rows - b0 : m);
        tile_config_t cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int t = 0; t < 4; t++) cfg.colsb[t] = 64, cfg.rows[t] = (uint8_t)m; /* D_lo, D_hi, A_lo, A_hi */
        cfg.colsb[4] = 64, cfg.rows[4] = 16;                                        /* the weights */
        _tile_loadconfig(&cfg);
        const uint8_t *lo = j->act_lo + b0 * j->width;
        const int8_t *hi = j->act_hi + b0 * j->width;
        for (int64_t start = j->v0; start < j->v1; start += j->chunk) {
            int64_t end = start + j->chunk < j->v1 ? start + j->chunk : j->v1;
            for (int64_t v = start; v < end; v += GROUP) {
                const int8_t *w = j->q + (v / GROUP) * j->width * GROUP;
                _tile_zero(0);
                _tile_zero(1);
                for (int64_t c = 0; c < chunks; c++) {
                    _tile_loadd(2, lo + 64 * c, j->width);
                    _tile_loadd(3, hi + 64 * c, j->width);
                    _tile_loadd(4, w + c * 64 * GROUP, 64);
                    _tile_dpbusd(0, 2, 4);
                    _tile_dpbssd(1, 3, 4);
                }
                _tile_stored(0, d_lo, 4 * GROUP);
                _tile_stored(1, d_hi, 4 * GROUP);
                for (int b = 0; b < live; b++)
                    logits_vec(j, b0 + b, v, vi_add(vi_shl(vi_load(d_hi[b]), 8), vi_load(d_lo[b])),
                               &logits[b][v - start]);
            }
            for (int b = 0; b < live; b++) {
                float s = exp_run(logits[b], j->probs + (b0 + b) * j->vocab + start, end - start, j->inv_t);
                j->mass[(b0 + b) * blocks + start / j->block] += s;
            }
        }
        _tile_release();
    }
    return NULL;
}
#endif

/* Fills probs [rows, vocab] and mass [rows, ceil(vocab / block)] (zeroed here) using `threads`
 * threads, each a run of whole blocks. q: the packed head (above), `stride` ids (vocab rounded up
 * to 32) of width / 2 column pairs; scale [stride] and exact [k, stride] padded alike. block: a
 * multiple of 32, at most CHUNK or a multiple of it. act, act_scale and hk have their rows padded
 * (with zeros) to a multiple of 4. Returns 0, or -1 on bad input. */
int sdft_int8_probs(const int8_t *q, const float *scale, const float *exact, const int16_t *act,
                    const float *act_scale, const float *hk, float *probs, float *mass, int64_t vocab,
                    int64_t stride, int64_t width, int64_t k, int64_t rows, int64_t block, float inv_t,
                    int threads) {
    int64_t chunk = block < CHUNK ? block : CHUNK;
    const int layout = sdft_int8_layout();
    if (width % (16 * layout) || block < 1 || block % chunk || chunk % (2 * GROUP) || rows < 1 || threads < 1 ||
        stride % (2 * GROUP) || stride < vocab || vocab < 1 || k < 0)
        return -1;
    int64_t blocks = (vocab + block - 1) / block;
    memset(mass, 0, sizeof(float) * rows * blocks);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = (int)blocks;
#ifdef SDFT_AMX
    uint8_t *split = NULL;
    int64_t n = (rows + 3) / 4 * 4 * width;
    if (layout == 4) {
        split = (uint8_t *)malloc(2 * n);
        if (split == NULL) return -1;
        for (int64_t i = 0; i < n; i++) {
            split[i] = (uint8_t)(act[i] & 0xFF);
            split[n + i] = (uint8_t)(int8_t)(act[i] >> 8); /* arithmetic shift: -32768..32767 -> -128..127 */
        }
    }
#endif
    job_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        job_t j = {q, scale, exact, act, act_scale, hk, probs, mass, vocab, stride, width, k, rows, block, chunk, 0, 0, inv_t,
                   NULL, NULL};
        j.v0 = (blocks * t / threads) * block;
        j.v1 = (blocks * (t + 1) / threads) * block;
        if (j.v1 > vocab) j.v1 = vocab;
#ifdef SDFT_AMX
        if (split != NULL) j.act_lo = split, j.act_hi = (const int8_t *)(split + n);
#endif
        jobs[t] = j;
    }
#ifdef SDFT_AMX
    if (split != NULL) {
        run_parallel(run_range_amx, jobs, sizeof(job_t), threads);
        free(split);
        return 0;
    }
#endif
    run_parallel(run_range, jobs, sizeof(job_t), threads);
    return 0;
}

/* The int8 proposal's kernel inputs and error bound for `rows` hidden states h [rows, hidden]
 * (fp32), in double as sdft_lite.sampling.Int8Proposal.kernel_inputs_reference computes them
 * (which documents the bound; `c` holds its constants: rest_max, error_max, copy_max, gamma_3,
 * gamma_exact, exact_max, row_max, u): with h_R the row's int8 columns (keep[i] nonzero),
 *     r = fl32(max |h_R| / act_max) (1 where not > 0),  a = clip(rint(h_R / r), +-act_max),
 *     e = (e0 + 2.5 u (size + e0) + (hidden + 2) 2^-53 size) / temperature,
 * e0 and size as there. Writes act [rows4, width] int16 (zeros past the row's hidden columns and
 * in the padding rows), scale [rows4] (1 in the padding), hk [rows4, k] (h's exact columns, 0 in
 * the padding), e [rows]. A row with a value that is not finite gets e = NaN (the caller samples
 * it from the fp32 head) and a = 0. Returns 0, or -1 on bad input. */
int sdft_int8_inputs(const float *h, const uint8_t *keep, const int64_t *exact, const double *c, int64_t rows,
                     int64_t hidden, int64_t k, int64_t width, int64_t act_max, double temperature, int16_t *act,
                     float *scale, float *hk, double *e) {
    if (rows < 1 || hidden < 1 || width < hidden || k < 0 || act_max < 1 || act_max > 32767 || !(temperature > 0.0))
        return -1;
    const int64_t rows4 = (rows + 3) / 4 * 4;
    const double rest_max = c[0], error_max = c[1], copy_max = c[2], g3 = c[3], g_exact = c[4];
    const double exact_max = c[5], row_max = c[6], u = c[7], lim = (double)act_max;
    memset(act, 0, sizeof(int16_t) * rows4 * width);
    for (int64_t b = 0; b < rows4; b++) scale[b] = 1.0f;
    if (k > 0) memset(hk, 0, sizeof(float) * rows4 * k);
    for (int64_t b = 0; b < rows; b++) {
        const float *x = h + b * hidden;
        double top = 0.0, hh = 0.0;
        int finite = 1;
        for (int64_t i = 0; i < hidden; i++) {
            const double v = (double)x[i];
            if (!isfinite(v)) finite = 0;
            hh += v * v;
            if (keep[i] && fabs(v) > top) top = fabs(v);
        }
        for (int64_t j = 0; j < k; j++) hk[b * k + j] = x[exact[j]];
        if (!finite) {
            e[b] = NAN;
            continue;
        }
        float r = (float)(top / lim);
        if (!(r > 0.0f)) r = 1.0f;
        const double rd = (double)r;
        double dd = 0.0, ff = 0.0, kk = 0.0;
        for (int64_t i = 0; i < hidden; i++) {
            const double v = (double)x[i];
            if (!keep[i]) continue;
            double a = nearbyint(v / rd); /* round half to even, as NumPy's rint */
            a = a < -lim ? -lim : (a > lim ? lim : a);
            act[b * width + i] = (int16_t)a;
            const double xi = a * rd;
            dd += (v - xi) * (v - xi);
            ff += xi * xi;
        }
        for (int64_t j = 0; j < k; j++) kk += (double)x[exact[j]] * (double)x[exact[j]];
        const double d_rest = sqrt(dd), f_rest = sqrt(ff);
        double e0 = d_rest * rest_max + f_rest * (error_max + copy_max * g3);
        if (k > 0) e0 += g_exact * (f_rest * copy_max * (1.0 + g3) + sqrt(kk) * exact_max);
        e0 *= 1.0 + 1e-3; /* a margin for the rounding of the norms themselves */
        const double size = sqrt(hh) * row_max;
        e[b] = (e0 + 2.5 * u * (size + e0) + (double)(hidden + 2) * ldexp(1.0, -53) * size) / temperature;
        scale[b] = r;
    }
    return 0;
}

/* The index of the first of n values (non-decreasing running sums of x) above `target`, or n:
 * NumPy's searchsorted(cumsum(x), target, side="right") with the float32 sums taken in order. */
static int64_t first_sum_above(const float *x, int64_t n, float target) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        sum += x[i];
        if (sum > target) return i;
    }
    return n;
}

/* The last index of x[0..n) whose value is > 0 (the caller knows there is one). */
static int64_t last_positive(const float *x, int64_t n) {
    int64_t i = n - 1;
    while (i > 0 && !(x[i] > 0.0f)) i--;
    return i;
}

/* The int8 proposal's draws and their acceptance test (sdft_lite.sampling.Int8Proposal.
 * _sample_kernel), from the probabilities and block masses of sdft_int8_probs. Each round, every
 * row b still without a token draws id v by the two-level inverse CDF with the uniform number
 * u[round][0][b], in float32 as NumPy's cumsum and searchsorted take it (cumulative block masses,
 * a cumulative sum inside the chosen block; an empty block or token is never drawn: a draw that
 * rounding pushes onto one moves back to the last one with mass; tests/test_sampling.py has the
 * NumPy reference), and accepts it when
 *     u[round][1][b] < exp(h_b . W_v / T - ln p_v - e[b]),
 * the dot product and the rest in double. tokens[b]: the id accepted, or -1 after `rounds`
 * rounds. Returns the number of draws; -1 where some row's total mass is not finite or is below
 * min_mass (nothing drawn: the caller samples the batch from the fp32 head); -2 on bad input. */
int64_t sdft_int8_draw(const float *probs, const float *mass, const float *weight, const float *h,
                       const double *e, const float *u, int64_t rows, int64_t vocab, int64_t hidden,
                       int64_t block, int64_t rounds, double temperature, float min_mass, int64_t *tokens) {
    if (rows < 1 || vocab < 1 || hidden < 1 || block < 1 || rounds < 1 || !(temperature > 0.0)) return -2;
    const int64_t blocks = (vocab + block - 1) / block;
    for (int64_t b = 0; b < rows; b++) {
        float total = 0.0f;
        for (int64_t k = 0; k < blocks; k++) total += mass[b * blocks + k];
        if (!isfinite(total) || !(total >= min_mass)) return -1;
        tokens[b] = -1;
    }
    int64_t draws = 0;
    for (int64_t round = 0; round < rounds; round++) {
        int64_t todo = 0;
        for (int64_t b = 0; b < rows; b++) {
            if (tokens[b] >= 0) continue;
            todo++;
            const float *m = mass + b * blocks, *p = probs + b * vocab;
            float cdf = 0.0f;
            for (int64_t k = 0; k < blocks; k++) cdf += m[k];
            const float x = u[(round * 2) * rows + b] * cdf;
            int64_t k = first_sum_above(m, blocks, x);
            if (k > blocks - 1) k = blocks - 1;
            if (!(m[k] > 0.0f)) k = last_positive(m, blocks);
            float before = 0.0f; /* the cumulative mass up to block k, as NumPy's cumsum takes it */
            for (int64_t i = 0; i <= k; i++) before += m[i];
            before -= m[k];
            float target = x - before;
            if (!(target > 0.0f)) target = 0.0f;
            const int64_t lo = k * block, len = (lo + block < vocab ? lo + block : vocab) - lo;
            int64_t jj = first_sum_above(p + lo, len, target);
            if (jj > len - 1) jj = len - 1;
            if (!(p[lo + jj] > 0.0f)) jj = last_positive(p + lo, len);
            const int64_t v = lo + jj;
            const float *w = weight + v * hidden, *hb = h + b * hidden;
            double dot = 0.0;
            for (int64_t i = 0; i < hidden; i++) dot += (double)w[i] * (double)hb[i];
            double log_accept = dot / temperature - log((double)p[v]) - e[b];
            if ((double)u[(round * 2 + 1) * rows + b] < exp(log_accept)) tokens[b] = v;
        }
        draws += todo;
        if (todo == 0) break;
    }
    return draws;
}

typedef struct {
    const float *x;
    float *probs, *m, *z, *rescale;
    int64_t r0, r1, cols, grew;
} tile_job_t;

/* The largest of n values, and whether any is NaN (*nan set): a NaN pair of the vector steps
 * is found by one unordered comparison of the two halves. */
static float row_max(const float *x, int64_t n, int *nan) {
    int64_t i = 0;
    float best = -INFINITY;
    int bad = 0;
#ifdef VL
    vf a0 = vf_set1(-INFINITY), a1 = a0;
    vmask u = vmask_none();
    for (; i + 2 * VL <= n; i += 2 * VL) {
        vf x0 = vf_load(x + i), x1 = vf_load(x + i + VL);
        a0 = vf_max(a0, x0);
        a1 = vf_max(a1, x1);
        u = vmask_or(u, vf_unord(x0, x1));
    }
    float lanes[VL];
    vf_store(lanes, vf_max(a0, a1));
    for (int j = 0; j < VL; j++) best = lanes[j] > best ? lanes[j] : best;
    bad = vmask_any(u);
#endif
    for (; i < n; i++) {
        if (x[i] != x[i]) bad = 1;
        best = x[i] > best ? x[i] : best;
    }
    *nan = bad;
    return best;
}

/* out = exp(in - shift), returning the sum (two accumulators in the vector part). */
static float exp_shifted(const float *in, float *out, int64_t n, float shift) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef VL
    vf s0 = vf_set1(0.0f), s1 = s0, c = vf_set1(shift);
    for (; i + 2 * VL <= n; i += 2 * VL) {
        vf y0 = exp_vec(vf_sub(vf_load(in + i), c));
        vf y1 = exp_vec(vf_sub(vf_load(in + i + VL), c));
        vf_store(out + i, y0);
        vf_store(out + i + VL, y1);
        s0 = vf_add(s0, y0);
        s1 = vf_add(s1, y1);
    }
    total = vf_sum(vf_add(s0, s1));
#endif
    for (; i < n; i++) {
        out[i] = exp_scalar(in[i] - shift);
        total += out[i];
    }
    return total;
}

static void *tile_range(void *arg) {
    tile_job_t *j = (tile_job_t *)arg;
    for (int64_t r = j->r0; r < j->r1; r++) {
        const float *x = j->x + r * j->cols;
        float *p = j->probs + r * j->cols;
        int nan;
        float top = row_max(x, j->cols, &nan), old = j->m[r];
        float m = top > old ? top : old;
        if (nan || !isfinite(m)) { /* the sums turn NaN, as in the unfused arithmetic */
            for (int64_t c = 0; c < j->cols; c++) p[c] = NAN;
            j->m[r] = nan ? NAN : m;
            j->z[r] = j->rescale[r] = NAN;
            j->grew++;
            continue;
        }
        float rescale = exp_scalar(old - m); /* 0 for the first tile (old = -inf), 1 if m did not grow */
        j->grew += m > old;
        j->z[r] = j->z[r] * rescale + exp_shifted(x, p, j->cols, m);
        j->m[r] = m;
        j->rescale[r] = rescale;
    }
    return NULL;
}

/* One vocabulary tile of an online softmax over rows r < rows of x [rows, cols] (contiguous):
 *     m_new = max(m[r], max_c x[r, c]),  rescale[r] = exp(m[r] - m_new),
 *     probs[r, c] = exp(x[r, c] - m_new),  z[r] = z[r] * rescale[r] + sum_c probs[r, c],
 *     m[r] = m_new.
 * A row with a NaN, or whose maximum is not finite, gets NaN in probs, z and rescale (and m, for
 * a NaN). Rows are split over `threads` threads (one for small tiles). Returns the number of rows whose maximum
 * grew (0: every rescale is exactly 1), or -1 on bad input. */
int64_t sdft_softmax_tile(const float *x, float *probs, float *m, float *z, float *rescale, int64_t rows,
                          int64_t cols, int threads) {
    if (rows < 0 || cols < 1 || threads < 1) return -1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (rows * cols < 65536) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    tile_job_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        tile_job_t j = {x, probs, m, z, rescale, rows * t / threads, rows * (t + 1) / threads, cols, 0};
        jobs[t] = j;
    }
    run_parallel(tile_range, jobs, sizeof(tile_job_t), threads);
    int64_t grew = 0;
    for (int t = 0; t < threads; t++) grew += jobs[t].grew;
    return grew;
}

/* ------------------------------------------------------------------------------------------------
 * sdft_kl_amx: the distillation loss's pass over one head W [V, H] for teacher and student rows
 * (sdft_lite.tiled_loss: forward KL, the self-teacher), on AMX bf16 tiles. For the rows r of x
 * (n_t teacher rows, then n_s student rows, [n_t + n_s, H]) and l[r, v] = x[r] . W[v]:
 *     m[r] a reference within KL_LAG below max_v l[r, v],  z[r] = sum_v exp(l[r, v] - m[r]),
 * and with k = 0 (the full vocabulary), for every row,
 *     g[r, :] = sum_v exp(l[r, v] - m[r]) W[v, :];
 * with k > 0 (a top-k support of the student's logits), for the student rows only: top_ids[r] the
 * k ids of the largest l[r, v] (in no order), top_s[r] and top_t[r] the student's and the
 * teacher's fp32 logits on them (x[n_t + r] . W[id] and x[r] . W[id]; n_t = n_s) and, if g is not
 * NULL, g[r] the same sum over the ids outside them (the tail's gradient, kept apart from the
 * support).
 * These are the sums of `sdft_softmax_tile`'s vocabulary tiles and two fp32 matmuls, in one pass
 * whose logits and probabilities never leave the core's caches.
 *
 * Every product runs as three bf16 products with fp32 sums ("bf16x3"): a = a_hi + a_lo with
 * a_hi = bf16(a) and a_lo = bf16(a - a_hi), a . b ~ a_hi . b_hi + a_hi . b_lo + a_lo . b_hi;
 * what it leaves out (a_lo . b_lo and the rounding of the lo parts) is ~2^-16 of |a| |b| per
 * term, against fp32's 2^-24 (tests/test_losses.py bounds it against float64).
 * Each thread takes a run of KL_TV-id tiles: it repacks the tile's weights into the two tile
 * layouts of its two products (bf16 pairs along H for the logits, along the vocabulary for g),
 * then for each block of KL_RB rows: the [KL_RB, KL_TV] logits, their online-softmax step in one
 * pass (the same exp as `sdft_softmax_tile`, shifted by a reference that moves only where a
 * tile's maximum rises more than KL_LAG above it: the first tile's maximum, mostly), the top-k's
 * candidates (the logits above the row's k-th largest at the last merge, kept in a list of at
 * most KL_ROOM(k), their probabilities left out of g until a merge drops them), the
 * probabilities split into bf16 hi / lo, and g's update. The threads' sums and lists are merged
 * at the end. H must be a multiple of 32.
 * Returns 0; the number of rows (or weights) that were not finite (NaN or inf, or a top-k row with
 * fewer than k logits above -inf: the caller then takes its fp32 path, whose arithmetic says what
 * such rows give); -1 on bad arguments; -2 where this build or this process has no AMX bf16
 * tiles; -3 where an allocation failed.
 */
#if defined(SDFT_AMX) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define SDFT_AMX_BF16 1
#define KL_TV 512 /* vocabulary ids per tile */
#define KL_RB 32  /* rows per block */
#define KL_ROOM(k) ((k) + 2 * KL_TV) /* a row's list of top-k candidates */
/* How far a tile's maximum may rise above a row's reference before the sums move to it: exp of
 * at most e^30 per id keeps every sum finite (e^30 x 2^31 ids < fp32's 3.4e38). */
#define KL_LAG 30.0f

/* x0 and x1 as 32 bf16 hi parts (x0's first) and 32 lo parts: hi = bf16(x), lo = bf16(x - hi),
 * both rounded to nearest even (vcvtneps2bf16, which reads fp32 denormals as 0: below 2^-126
 * the parts' error is below 2^-126 too). The caller checks that x0 and x1 are finite. */
static inline void bf16_split(__m512 x0, __m512 x1, __m512i *hi, __m512i *lo) {
    __m256bh h0 = _mm512_cvtneps_pbh(x0), h1 = _mm512_cvtneps_pbh(x1);
    __m256bh l0 = _mm512_cvtneps_pbh(_mm512_sub_ps(x0, _mm512_cvtpbh_ps(h0)));
    __m256bh l1 = _mm512_cvtneps_pbh(_mm512_sub_ps(x1, _mm512_cvtpbh_ps(h1)));
    *hi = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)h0), (__m256i)h1, 1);
    *lo = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)l0), (__m256i)l1, 1);
}

static inline int not_finite(__m512 x) {
    __m512 d = _mm512_sub_ps(x, x); /* NaN for inf and NaN */
    return _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q) != 0;
}

/* 32 fp32 values at src (zeros where src is NULL) as 32 bf16 hi parts at hi and 32 lo parts at lo
 * (both 64-byte aligned); returns whether a value was not finite. */
static inline int split32(const float *src, void *hi, void *lo) {
    __m512 x0 = _mm512_setzero_ps(), x1 = x0;
    int bad = 0;
    if (src != NULL) {
        x0 = _mm512_loadu_ps(src), x1 = _mm512_loadu_ps(src + 16);
        bad = not_finite(x0) | not_finite(x1);
    }
    __m512i h, l;
    bf16_split(x0, x1, &h, &l);
    _mm512_store_si512(hi, h);
    _mm512_store_si512(lo, l);
    return bad;
}

/* The smallest of n > 0 values. */
static inline float min_of(const float *v, int64_t n) {
    float t = v[0];
    for (int64_t e = 1; e < n; e++) t = v[e] < t ? v[e] : t;
    return t;
}

/* r[i][j] -> r[j][i] for 16 vectors of 16 32-bit lanes. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* Reorders v (and id alongside) so that its first k entries are its k largest (quickselect). */
static void select_largest(float *v, int32_t *id, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                float tv = v[i];
                int32_t ti = id[i];
                v[i] = v[j], id[i] = id[j], v[j] = tv, id[j] = ti;
                i++, j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
}

/* Keeps the k largest of a row's n listed logits; each one dropped goes back into g (if any) as
 * exp(l - m) W[id]. Returns the new count. */
static int64_t keep_largest(float *v, int32_t *id, int64_t n, int64_t k, float *g, const float *w, int64_t H,
                            float m) {
    if (n <= k) return n;
    select_largest(v, id, n, k);
    if (g != NULL)
        for (int64_t i = k; i < n; i++) {
            if (i + 8 < n) /* the head rows are far apart: fetch ahead */
                for (int64_t c = 0; c < H; c += 16) _mm_prefetch((const char *)(w + (int64_t)id[i + 8] * H + c), _MM_HINT_T0);
            __m512 e = _mm512_set1_ps(exp_scalar(v[i] - m));
            const float *wr = w + (int64_t)id[i] * H;
            for (int64_t c = 0; c < H; c += 16)
                _mm512_storeu_ps(g + c, _mm512_fmadd_ps(e, _mm512_loadu_ps(wr + c), _mm512_loadu_ps(g + c)));
        }
    return k;
}

typedef struct {
    const float *w;
    const uint16_t *a; /* [rows_p][H / 32][2 (hi, lo)][32] */
    int64_t rows_p, first_s, H, v0, v1, k, want_g;
    float *m, *z, *g; /* this thread's sums: [rows_p], [rows_p], [rows_p, H] */
    float *lv;        /* top-k: per student row a list of KL_ROOM(k) logits, their ids, count, threshold */
    int32_t *li;
    int64_t *lc;
    float *thr;
    int64_t bad;
} kl_job_t;

/* The 12 tile products of one 32-wide step: C (tiles 0-3, 2 x 2 of [16, 16]) += A . B in bf16x3,
 * A rows of 16 from a0 and a1 (hi at +0, lo at +64 bytes), B [16 pairs, 16] from b0 and b1 (hi),
 * b0 + blo and b1 + blo (lo). */
#define KL_STEP(a0, a1, lda, b0, b1, blo)                                                           \
    do {                                                                                            \
        _tile_loadd(4, (a0), (lda));                                                                \
        _tile_loadd(5, (a1), (lda));                                                                \
        _tile_loadd(6, (b0), 64);                                                                   \
        _tile_loadd(7, (b1), 64);                                                                   \
        _tile_dpbf16ps(0, 4, 6);                                                                    \
        _tile_dpbf16ps(1, 4, 7);                                                                    \
        _tile_dpbf16ps(2, 5, 6);                                                                    \
        _tile_dpbf16ps(3, 5, 7);                                                                    \
        _tile_loadd(6, (const char *)(b0) + (blo), 64);                                             \
        _tile_loadd(7, (const char *)(b1) + (blo), 64);                                             \
        _tile_dpbf16ps(0, 4, 6);                                                                    \
        _tile_dpbf16ps(1, 4, 7);                                                                    \
        _tile_dpbf16ps(2, 5, 6);                                                                    \
        _tile_dpbf16ps(3, 5, 7);                                                                    \
        _tile_loadd(4, (const char *)(a0) + 64, (lda));                                             \
        _tile_loadd(5, (const char *)(a1) + 64, (lda));                                             \
        _tile_loadd(6, (b0), 64);                                                                   \
        _tile_loadd(7, (b1), 64);                                                                   \
        _tile_dpbf16ps(0, 4, 6);                                                                    \
        _tile_dpbf16ps(1, 4, 7);                                                                    \
        _tile_dpbf16ps(2, 5, 6);                                                                    \
        _tile_dpbf16ps(3, 5, 7);                                                                    \
    } while (0)

/* Repacks W[v0, v0 + nv) (zero rows after nv) into bl ([KL_TV / 16 panels][2][H / 2][16][2]:
 * pairs along H, transposed from the ids' rows) and bg ([H / 16 panels][2][KL_TV / 2][16][2]:
 * pairs of ids side by side). Returns whether a weight was not finite. */
static int kl_repack(const float *w, int64_t v0, int64_t nv, int64_t H, uint16_t *bl, uint16_t *bg, uint32_t *tmp) {
    const __m512 zero = _mm512_setzero_ps();
    static const uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i pairs = _mm512_loadu_si512(order);
    int bad = 0;
    for (int64_t p = 0; p < KL_TV / 16; p++) {
        for (int n = 0; n < 16; n++) {
            int64_t v = 16 * p + n;
            for (int64_t c = 0; c < H / 32; c++)
                bad |= split32(v < nv ? w + (v0 + v) * H + 32 * c : NULL, tmp + (0 * 16 + n) * (H / 2) + 16 * c,
                               tmp + (1 * 16 + n) * (H / 2) + 16 * c);
        }
        uint32_t *out = (uint32_t *)(bl + p * 2 * (H / 2) * 32);
        for (int s = 0; s < 2; s++)
            for (int64_t kb = 0; kb < H / 2; kb += 16) {
                __m512i r[16];
                for (int n = 0; n < 16; n++) r[n] = _mm512_load_si512(tmp + (s * 16 + n) * (H / 2) + kb);
                transpose16(r);
                for (int e = 0; e < 16; e++) _mm512_store_si512(out + (s * (H / 2) + kb + e) * 16, r[e]);
            }
    }
    for (int64_t kp = 0; kp < KL_TV / 2; kp++)
        for (int64_t q = 0; q < H / 16; q++) {
            __m512 xa = 2 * kp < nv ? _mm512_loadu_ps(w + (v0 + 2 * kp) * H + 16 * q) : zero;
            __m512 xb = 2 * kp + 1 < nv ? _mm512_loadu_ps(w + (v0 + 2 * kp + 1) * H + 16 * q) : zero;
            __m512i hi, lo; /* [a0..a15, b0..b15]: interleaved to a0 b0 a1 b1 ... */
            bf16_split(xa, xb, &hi, &lo);
            uint16_t *out = bg + ((q * 2) * (KL_TV / 2) + kp) * 32;
            _mm512_store_si512(out, _mm512_permutexvar_epi16(pairs, hi));
            _mm512_store_si512(out + (KL_TV / 2) * 32, _mm512_permutexvar_epi16(pairs, lo));
        }
    return bad;
}

static void *kl_range(void *arg) {
    kl_job_t *j = (kl_job_t *)arg;
    const int64_t H = j->H, hc = H / 32, lda = 4 * H, room = KL_ROOM(j->k); /* A: bytes per row */
    uint16_t *bl = aligned_alloc(64, (size_t)KL_TV * H * 4), *bg = aligned_alloc(64, (size_t)KL_TV * H * 4);
    uint32_t *tmp = aligned_alloc(64, (size_t)2 * 16 * (H / 2) * 4);
    float *lg = aligned_alloc(64, (size_t)KL_RB * KL_TV * 4), first[KL_TV];
    int32_t first_ids[KL_TV] = {0}; /* swapped along with `first`, never read */
    uint16_t *pb = aligned_alloc(64, (size_t)KL_RB * KL_TV * 4); /* [KL_RB][KL_TV / 32][2][32] */
    if (!bl || !bg || !tmp || !lg || !pb) {
        free(bl), free(bg), free(tmp), free(lg), free(pb);
        j->bad = -1;
        return NULL;
    }
    tile_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    const int64_t bl_lo = (H / 2) * 64, bg_lo = (KL_TV / 2) * 64; /* bytes from a hi block to its lo */
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t bad = 0;
    for (int64_t v0 = j->v0; v0 < j->v1 && !bad; v0 += KL_TV) {
        int64_t nv = j->v1 - v0 < KL_TV ? j->v1 - v0 : KL_TV, chunks = (nv + 31) / 32;
        if (kl_repack(j->w, v0, nv, H, bl, bg, tmp)) {
            bad = 1;
            break;
        }
        for (int64_t rb = 0; rb < j->rows_p && !bad; rb += KL_RB) {
            const int student = rb >= j->first_s, topk = student && j->k > 0;
            const int grad = j->want_g && (j->k == 0 || student); /* this block's g */
            const char *a0 = (const char *)(j->a + rb * hc * 64), *a1 = a0 + 16 * lda;
            /* the block's logits [KL_RB, KL_TV] */
            for (int64_t nb = 0; nb < chunks * 32; nb += 32) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                const char *b0 = (const char *)(bl + (nb / 16) * 2 * (H / 2) * 32), *b1 = b0 + 2 * bl_lo;
                for (int64_t c = 0; c < hc; c++)
                    KL_STEP(a0 + 128 * c, a1 + 128 * c, lda, b0 + 1024 * c, b1 + 1024 * c, bl_lo);
                _tile_stored(0, lg + nb, KL_TV * 4);
                _tile_stored(1, lg + nb + 16, KL_TV * 4);
                _tile_stored(2, lg + 16 * KL_TV + nb, KL_TV * 4);
                _tile_stored(3, lg + 16 * KL_TV + nb + 16, KL_TV * 4);
            }
            /* the online-softmax step per row; the top-k's candidates; probabilities into pb */
            for (int i = 0; i < KL_RB; i++) {
                int64_t r = rb + i, s = r - j->first_s;
                float *x = lg + i * KL_TV, *g = j->g + r * H;
                for (int64_t c = nv; c < chunks * 32; c++) x[c] = -INFINITY;
                float ref = j->m[r];
                if (ref == -INFINITY) { /* the row's first tile: its maximum is the reference */
                    int nan;
                    ref = row_max(x, nv, &nan);
                    if (nan || !isfinite(ref)) {
                        bad++;
                        continue;
                    }
                }
                float *lv = NULL;
                int32_t *li = NULL;
                int64_t start = 0;
                __m512 thr = _mm512_set1_ps(INFINITY);
                if (topk) {
                    lv = j->lv + s * room, li = j->li + s * room, start = j->lc[s];
                    if (start == 0 && nv >= j->k) { /* the first tile: its k largest are the candidates */
                        memcpy(first, x, (size_t)nv * 4);
                        select_largest(first, first_ids, nv, j->k);
                        j->thr[s] = nextafterf(min_of(first, j->k), -INFINITY); /* x > thr: x >= the k-th largest */
                    }
                    if (start > 2 * j->k || start + nv > room) { /* keep the k largest, raise the threshold */
                        start = keep_largest(lv, li, start, j->k, grad ? g : NULL, j->w, H, ref);
                        j->thr[s] = min_of(lv, start);
                    }
                    thr = _mm512_set1_ps(j->thr[s]);
                }
                uint16_t *out = pb + (size_t)i * (KL_TV / 32) * 64;
                for (;;) { /* once, or twice where the tile's maximum is more than KL_LAG above ref */
                    int64_t count = start;
                    __m512 shift = _mm512_set1_ps(ref), s0 = _mm512_setzero_ps(), s1 = s0;
                    __m512 top = _mm512_set1_ps(-INFINITY);
                    __mmask16 unord = 0;
                    for (int64_t c = 0; c < chunks; c++) {
                        __m512 x0 = _mm512_loadu_ps(x + 32 * c), x1 = _mm512_loadu_ps(x + 32 * c + 16);
                        top = _mm512_max_ps(top, _mm512_max_ps(x0, x1));
                        unord |= _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q);
                        __m512 y0 = exp_vec(_mm512_sub_ps(x0, shift)), y1 = exp_vec(_mm512_sub_ps(x1, shift));
                        s0 = _mm512_add_ps(s0, y0);
                        s1 = _mm512_add_ps(s1, y1);
                        if (topk) {
                            __mmask16 k0 = _mm512_cmp_ps_mask(x0, thr, _CMP_GT_OQ), k1 = _mm512_cmp_ps_mask(x1, thr, _CMP_GT_OQ);
                            if (k0 | k1) {
                                __m512i id0 = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(v0 + 32 * c)));
                                _mm512_mask_compressstoreu_ps(lv + count, k0, x0);
                                _mm512_mask_compressstoreu_epi32(li + count, k0, id0);
                                count += __builtin_popcount(k0);
                                _mm512_mask_compressstoreu_ps(lv + count, k1, x1);
                                _mm512_mask_compressstoreu_epi32(li + count, k1, _mm512_add_epi32(id0, _mm512_set1_epi32(16)));
                                count += __builtin_popcount(k1);
                                y0 = _mm512_maskz_mov_ps((__mmask16)~k0, y0);
                                y1 = _mm512_maskz_mov_ps((__mmask16)~k1, y1);
                            }
                        }
                        if (grad) {
                            __m512i hi, lo;
                            bf16_split(y0, y1, &hi, &lo);
                            _mm512_store_si512(out + 64 * c, hi);
                            _mm512_store_si512(out + 64 * c + 32, lo);
                        }
                    }
                    float tmax = _mm512_reduce_max_ps(top);
                    if (unord || !isfinite(tmax)) {
                        bad++;
                        break;
                    }
                    if (tmax > ref + KL_LAG) { /* earlier sums to the new reference, and this tile again */
                        float rescale = exp_scalar(ref - tmax);
                        j->z[r] *= rescale;
                        if (grad) {
                            __m512 sc = _mm512_set1_ps(rescale);
                            for (int64_t c = 0; c < H; c += 16) _mm512_storeu_ps(g + c, _mm512_mul_ps(sc, _mm512_loadu_ps(g + c)));
                        }
                        ref = tmax;
                        continue;
                    }
                    if (topk) j->lc[s] = count;
                    j->z[r] += vf_sum(_mm512_add_ps(s0, s1));
                    j->m[r] = ref;
                    break;
                }
            }
            if (bad || !grad) continue;
            /* g[block] += probs [KL_RB, tile] . W[tile] */
            const int64_t ldp = (KL_TV / 32) * 128;
            const char *p0 = (const char *)pb, *p1 = p0 + 16 * ldp;
            for (int64_t q = 0; q < H / 16; q += 2) {
                float *g0 = j->g + rb * H + 16 * q;
                _tile_loadd(0, g0, H * 4);
                _tile_loadd(1, g0 + 16, H * 4);
                _tile_loadd(2, g0 + 16 * H, H * 4);
                _tile_loadd(3, g0 + 16 * H + 16, H * 4);
                const char *b0 = (const char *)(bg + q * 2 * (KL_TV / 2) * 32), *b1 = b0 + 2 * bg_lo;
                for (int64_t c = 0; c < chunks; c++)
                    KL_STEP(p0 + 128 * c, p1 + 128 * c, ldp, b0 + 1024 * c, b1 + 1024 * c, bg_lo);
                _tile_stored(0, g0, H * 4);
                _tile_stored(1, g0 + 16, H * 4);
                _tile_stored(2, g0 + 16 * H, H * 4);
                _tile_stored(3, g0 + 16 * H + 16, H * 4);
            }
        }
    }
    _tile_release();
    free(bl), free(bg), free(tmp), free(lg), free(pb);
    j->bad = bad;
    return NULL;
}
/* The threads' sums for rows [p0, p1) (padded indices): m, z and g to the largest reference;
 * with a top-k, the k largest of the threads' lists (the others go into g) and both sides' fp32
 * logits on them. */
typedef struct {
    const kl_job_t *jobs;
    int threads;
    const float *x, *w;
    float *m, *z, *g, *top_s, *top_t;
    int64_t *top_ids;
    int64_t p0, p1, nt_p, n_t, n_s, H, k, room;
    float *mv; /* scratch: threads * room */
    int32_t *mi;
    int64_t bad;
} kl_merge_t;

static inline float dot_h(const float *a, const float *b, int64_t H) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < H; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
    return _mm512_reduce_add_ps(acc);
}

static void *kl_merge_rows(void *arg) {
    kl_merge_t *j = (kl_merge_t *)arg;
    const int64_t H = j->H, k = j->k;
    for (int64_t pr = j->p0; pr < j->p1; pr++) {
        int student = pr >= j->nt_p;
        int64_t r = student ? pr - j->nt_p : pr;
        if (r >= (student ? j->n_s : j->n_t)) continue;
        float mx = -INFINITY, zs = 0.0f;
        for (int t = 0; t < j->threads; t++) mx = j->jobs[t].m[pr] > mx ? j->jobs[t].m[pr] : mx;
        int grad = j->g != NULL && (k == 0 || student);
        float *gr = grad ? j->g + (k == 0 ? (student ? j->n_t + r : r) : r) * H : NULL;
        if (grad) memset(gr, 0, (size_t)H * 4);
        int64_t count = 0;
        for (int t = 0; t < j->threads; t++) {
            float f = exp_scalar(j->jobs[t].m[pr] - mx);
            zs += j->jobs[t].z[pr] * f;
            if (grad) {
                const float *gt = j->jobs[t].g + pr * H;
                for (int64_t c = 0; c < H; c++) gr[c] += f * gt[c];
            }
            if (k > 0 && student) {
                int64_t n = j->jobs[t].lc[r];
                memcpy(j->mv + count, j->jobs[t].lv + r * j->room, (size_t)n * 4);
                memcpy(j->mi + count, j->jobs[t].li + r * j->room, (size_t)n * 4);
                count += n;
            }
        }
        if (k > 0 && student) {
            if (count < k) { /* fewer than k ids above -inf (logits that overflowed): the fp32 path */
                j->bad++;
                continue;
            }
            keep_largest(j->mv, j->mi, count, k, gr, j->w, H, mx);
            const float *xs = j->x + (j->n_t + r) * H, *xt = j->x + r * H;
            for (int64_t e = 0; e < k; e++) {
                if (e + 8 < k)
                    for (int64_t c = 0; c < H; c += 16) _mm_prefetch((const char *)(j->w + (int64_t)j->mi[e + 8] * H + c), _MM_HINT_T0);
                const float *wr = j->w + (int64_t)j->mi[e] * H;
                j->top_ids[r * k + e] = j->mi[e];
                j->top_s[r * k + e] = dot_h(xs, wr, H);
                j->top_t[r * k + e] = dot_h(xt, wr, H);
            }
        }
        int64_t out = student ? j->n_t + r : r;
        j->m[out] = mx, j->z[out] = zs;
    }
    return NULL;
}
#endif

/* The bytes sdft_kl_amx allocates for these arguments (tiled_loss counts them in its budget). */
int64_t sdft_kl_amx_bytes(int64_t n_t, int64_t n_s, int64_t H, int64_t k, int threads) {
#ifdef SDFT_AMX_BF16
    int64_t nt_p = (n_t + KL_RB - 1) / KL_RB * KL_RB, ns_p = (n_s + KL_RB - 1) / KL_RB * KL_RB, rows_p = nt_p + ns_p;
    int64_t per_thread = 2 * KL_TV * H * 4 + 2 * 16 * (H / 2) * 4 + 2 * KL_RB * KL_TV * 4;
    int64_t state = rows_p * (H + 2) * 4 + (k > 0 ? ns_p * (KL_ROOM(k) * 8 + 12) : 0);
    return rows_p * H * 4 + threads * (per_thread + state) + (k > 0 ? threads * threads * KL_ROOM(k) * 8 : 0);
#else
    (void)n_t, (void)n_s, (void)H, (void)k, (void)threads;
    return 0;
#endif
}

int64_t sdft_kl_amx(const float *x, const float *w, float *m, float *z, float *g, float *top_s, float *top_t,
                    int64_t *top_ids, int64_t n_t, int64_t n_s, int64_t H, int64_t vocab, int64_t k, int threads) {
#ifdef SDFT_AMX_BF16
    if (!amx_usable()) return -2;
    if (n_t < 0 || n_s < 0 || n_t + n_s < 1 || H < 32 || H % 32 || vocab < 1 || threads < 1 || k < 0 || k > vocab)
        return -1;
    if (k > 0 && (top_ids == NULL || top_s == NULL || top_t == NULL || n_t != n_s || vocab > INT32_MAX)) return -1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int64_t tiles = (vocab + KL_TV - 1) / KL_TV, room = KL_ROOM(k);
    const int64_t nt_p = (n_t + KL_RB - 1) / KL_RB * KL_RB, ns_p = (n_s + KL_RB - 1) / KL_RB * KL_RB;
    const int64_t rows_p = nt_p + ns_p, lists = k > 0 ? ns_p : 0;
    if (threads > tiles) threads = (int)tiles;
    uint16_t *a = aligned_alloc(64, (size_t)rows_p * H * 4);
    char *state = malloc((size_t)threads * (rows_p * (H + 2) * 4 + lists * (room * 8 + 12)) + 1);
    float *mv = k > 0 ? malloc((size_t)threads * threads * room * 4) : NULL; /* each merge thread's scratch */
    int32_t *mi = k > 0 ? malloc((size_t)threads * threads * room * 4) : NULL;
    if (!a || !state || (k > 0 && (!mv || !mi))) {
        free(a), free(state), free(mv), free(mi);
        return -3;
    }
    int64_t bad = 0;
    for (int64_t pr = 0; pr < rows_p; pr++) { /* padded row pr: teacher row pr, or student row pr - nt_p */
        int64_t r = pr < nt_p ? (pr < n_t ? pr : -1) : (pr - nt_p < n_s ? n_t + pr - nt_p : -1);
        for (int64_t c = 0; c < H / 32; c++)
            bad += split32(r >= 0 ? x + r * H + 32 * c : NULL, a + (pr * (H / 32) + c) * 64,
                           a + (pr * (H / 32) + c) * 64 + 32);
    }
    const int want_g = g != NULL;
    kl_job_t jobs[MAX_THREADS];
    for (int t = 0; t < threads && !bad; t++) {
        char *s = state + (size_t)t * (rows_p * (H + 2) * 4 + lists * (room * 8 + 12));
        kl_job_t job;
        memset(&job, 0, sizeof job);
        job.w = w, job.a = a, job.rows_p = rows_p, job.first_s = nt_p, job.H = H, job.k = k, job.want_g = want_g;
        job.v0 = tiles * t / threads * KL_TV;
        job.v1 = tiles * (t + 1) / threads * KL_TV;
        if (job.v1 > vocab) job.v1 = vocab;
        job.m = (float *)s, job.z = job.m + rows_p, job.g = job.z + rows_p;
        job.lv = job.g + rows_p * H, job.li = (int32_t *)(job.lv + lists * room);
        job.lc = (int64_t *)(job.li + lists * room), job.thr = (float *)(job.lc + lists);
        for (int64_t r = 0; r < rows_p; r++) job.m[r] = -INFINITY, job.z[r] = 0.0f;
        memset(job.g, 0, (size_t)rows_p * H * 4);
        for (int64_t r = 0; r < lists; r++) job.lc[r] = 0, job.thr[r] = -INFINITY;
        jobs[t] = job;
    }
    if (!bad) run_parallel(kl_range, jobs, sizeof(kl_job_t), threads);
    for (int t = 0; t < threads && !bad; t++) {
        if (jobs[t].bad < 0) bad = -3;
        else bad += jobs[t].bad;
    }
    kl_merge_t merges[MAX_THREADS];
    for (int t = 0; t < threads && bad == 0; t++) {
        kl_merge_t mj = {jobs, threads, x, w, m, z, g, top_s, top_t, top_ids,
                         rows_p * t / threads, rows_p * (t + 1) / threads, nt_p, n_t, n_s, H, k, room,
                         k > 0 ? mv + t * threads * room : NULL, k > 0 ? mi + t * threads * room : NULL, 0};
        merges[t] = mj;
    }
    if (bad == 0) {
        run_parallel(kl_merge_rows, merges, sizeof(kl_merge_t), threads);
        for (int t = 0; t < threads; t++) bad += merges[t].bad;
    }
    free(a), free(state), free(mv), free(mi);
    return bad;
#else
    (void)x, (void)w, (void)m, (void)z, (void)g, (void)top_s, (void)top_t, (void)top_ids, (void)n_t, (void)n_s, (void)H;
    (void)vocab, (void)k, (void)threads;
    return -2;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * sdft_decode_step: one decode step of a small Llama-family decoder whose linears are plain fp32
 * weights (sdft_lite.decode.CStep builds its arguments): for each layer
 *     h = rms_norm(x) * norm_in,  [q k | rot q rot k | v] = h W_qkv + b_qkv,
 *     q, k = [q k] * cos + [rot q rot k] * sin  (rotary, rotate_half folded into the weights),
 *     k, v written to the cache at column `at`, attention over the columns <= at that `attend`
 *     allows, x += attn W_o + b_o,  h = rms_norm(x) * norm_post,
 *     x += (silu(h W_gate + b_gate) * (h W_up + b_up)) W_down + b_down,
 * then out = rms_norm(x) * norm_final. Weights are stored transposed ([in, out], row-major); the
 * keys transposed per head ([rows, kv heads, head_dim, total]) so that a query's scores over the
 * positions are vector products without reductions; values [rows, kv heads, total, head_dim]. The
 * same arithmetic as PyTorch's ops up to fp32 rounding (tests/test_decode.py). One thread.
 */
typedef struct {
    const float *norm_in, *w_qkv, *b_qkv, *w_o, *b_o, *norm_post, *w_gate_up, *b_gate_up, *w_down, *b_down;
    float *keys_t, *values;
    float eps_in, eps_post;
} decode_layer_t;

/* y[r, :N] (+)= x[r, :K] wt + bias for rows r < rows4 (a multiple of 4); x rows `ldx` apart, wt
 * [K, N] row-major, bias [N] or NULL; with `residual` the products are added to y's values. */
static void small_matmul(const float *x, int64_t ldx, int64_t rows4, int64_t K, const float *wt, int64_t N,
                         const float *bias, int residual, float *y) {
    for (int64_t r0 = 0; r0 < rows4; r0 += 4) {
        const float *x0 = x + r0 * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        float *y0 = y + r0 * N, *y1 = y0 + N, *y2 = y1 + N, *y3 = y2 + N;
        int64_t n = 0;
#ifdef VL
        for (; n + 2 * VL <= N; n += 2 * VL) {
            vf a00 = vf_set1(0.0f), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
            for (int64_t k = 0; k < K; k++) {
                vf w0 = vf_load(wt + k * N + n), w1 = vf_load(wt + k * N + n + VL);
                vf s0 = vf_set1(x0[k]), s1 = vf_set1(x1[k]), s2 = vf_set1(x2[k]), s3 = vf_set1(x3[k]);
                a00 = vf_fmadd(s0, w0, a00);
                a01 = vf_fmadd(s0, w1, a01);
                a10 = vf_fmadd(s1, w0, a10);
                a11 = vf_fmadd(s1, w1, a11);
                a20 = vf_fmadd(s2, w0, a20);
                a21 = vf_fmadd(s2, w1, a21);
                a30 = vf_fmadd(s3, w0, a30);
                a31 = vf_fmadd(s3, w1, a31);
            }
            if (bias != NULL) {
                vf b0 = vf_load(bias + n), b1 = vf_load(bias + n + VL);
                a00 = vf_add(a00, b0), a01 = vf_add(a01, b1), a10 = vf_add(a10, b0), a11 = vf_add(a11, b1);
                a20 = vf_add(a20, b0), a21 = vf_add(a21, b1), a30 = vf_add(a30, b0), a31 = vf_add(a31, b1);
            }
            if (residual) {
                a00 = vf_add(vf_load(y0 + n), a00), a01 = vf_add(vf_load(y0 + n + VL), a01);
                a10 = vf_add(vf_load(y1 + n), a10), a11 = vf_add(vf_load(y1 + n + VL), a11);
                a20 = vf_add(vf_load(y2 + n), a20), a21 = vf_add(vf_load(y2 + n + VL), a21);
                a30 = vf_add(vf_load(y3 + n), a30), a31 = vf_add(vf_load(y3 + n + VL), a31);
            }
            vf_store(y0 + n, a00), vf_store(y0 + n + VL, a01), vf_store(y1 + n, a10), vf_store(y1 + n + VL, a11);
            vf_store(y2 + n, a20), vf_store(y2 + n + VL, a21), vf_store(y3 + n, a30), vf_store(y3 + n + VL, a31);
        }
#endif
        for (; n < N; n++) {
            const float *xs[4] = {x0, x1, x2, x3};
            float *ys[4] = {y0, y1, y2, y3};
            for (int r = 0; r < 4; r++) {
                float acc = 0.0f;
                for (int64_t k = 0; k < K; k++) acc = fmaf(xs[r][k], wt[k * N + n], acc);
                if (bias != NULL) acc += bias[n];
                ys[r][n] = residual ? ys[r][n] + acc : acc;
            }
        }
    }
}

/* y = x / sqrt(mean(x^2) + eps) * w over n values. */
static void rms_norm_row(const float *x, const float *w, float eps, int64_t n, float *y) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss = fmaf(x[i], x[i], ss);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

/* Scratch floats sdft_decode_step needs for these shapes. */
int64_t sdft_decode_scratch(int64_t rows, int64_t hidden, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                            int64_t intermediate, int64_t total) {
    const int64_t rows4 = (rows + 3) / 4 * 4, qkv = (2 * (q_heads + kv_heads) + kv_heads) * head_dim;
    return rows4 * (2 * hidden + qkv + 2 * intermediate + q_heads * head_dim) + total + 64;
}

/* One step for `rows` rows (above): tokens [rows]; cos, sin [rows, head_dim] of this step's
 * positions; attend [rows, total] (bytes, nonzero: may attend); writes out [rows, hidden]. Returns
 * 0, or -1 on bad input (a scratch smaller than sdft_decode_scratch, at >= total, a token id out of
 * range). */
int sdft_decode_step(const decode_layer_t *layers, int64_t n_layers, const float *embed, int64_t vocab,
                     const int64_t *tokens, int64_t rows, int64_t hidden, int64_t q_heads, int64_t kv_heads,
                     int64_t head_dim, int64_t intermediate, float scaling, const float *cos, const float *sin,
                     const uint8_t *attend, int64_t total, int64_t at, const float *norm_final, float eps_final,
                     float *scratch, int64_t scratch_len, float *out) {
    const int64_t d = head_dim, heads = q_heads + kv_heads, rows4 = (rows + 3) / 4 * 4;
    const int64_t n_qkv = (2 * heads + kv_heads) * d, group = kv_heads > 0 ? q_heads / kv_heads : 0;
    if (rows < 1 || n_layers < 1 || d < 1 || kv_heads < 1 || group < 1 || q_heads % kv_heads || at < 0 ||
        at >= total || scratch_len < sdft_decode_scratch(rows, hidden, q_heads, kv_heads, d, intermediate, total))
        return -1;
    for (int64_t r = 0; r < rows; r++)
        if (tokens[r] < 0 || tokens[r] >= vocab) return -1;
    float *x = scratch, *h = x + rows4 * hidden, *qkv = h + rows4 * hidden, *gu = qkv + rows4 * n_qkv;
    float *att = gu + rows4 * 2 * intermediate, *scores = att + rows4 * q_heads * d;
    memset(x, 0, sizeof(float) * rows4 * hidden);
    memset(att, 0, sizeof(float) * rows4 * q_heads * d);
    for (int64_t r = 0; r < rows; r++) memcpy(x + r * hidden, embed + tokens[r] * hidden, sizeof(float) * hidden);
    const int64_t n = at + 1;
    for (int64_t l = 0; l < n_layers; l++) {
        const decode_layer_t *L = layers + l;
        for (int64_t r = 0; r < rows4; r++) rms_norm_row(x + r * hidden, L->norm_in, L->eps_in, hidden, h + r * hidden);
        small_matmul(h, hidden, rows4, hidden, L->w_qkv, n_qkv, L->b_qkv, 0, qkv);
        for (int64_t r = 0; r < rows; r++) {
            float *row = qkv + r * n_qkv;
            const float *c = cos + r * d, *sn = sin + r * d;
            for (int64_t hh = 0; hh < heads; hh++) /* rotary, in place over the plain q, k */
                for (int64_t i = 0; i < d; i++) row[hh * d + i] = row[hh * d + i] * c[i] + row[(heads + hh) * d + i] * sn[i];
            for (int64_t g = 0; g < kv_heads; g++) {
                float *kt = L->keys_t + (r * kv_heads + g) * d * total, *v = L->values + ((r * kv_heads + g) * total + at) * d;
                for (int64_t i = 0; i < d; i++) {
                    kt[i * total + at] = row[(q_heads + g) * d + i];
                    v[i] = row[2 * heads * d + g * d + i];
                }
            }
            const uint8_t *allow = attend + r * total;
            for (int64_t hq = 0; hq < q_heads; hq++) {
                const int64_t g = hq / group;
                const float *q = row + hq * d, *kt = L->keys_t + (r * kv_heads + g) * d * total;
                const float *vv = L->values + (r * kv_heads + g) * total * d;
                for (int64_t j = 0; j < n; j++) scores[j] = 0.0f;
                for (int64_t i = 0; i < d; i++) { /* vectorized over positions j */
                    const float qi = q[i], *ki = kt + i * total;
                    for (int64_t j = 0; j < n; j++) scores[j] = fmaf(qi, ki[j], scores[j]);
                }
                float top = -INFINITY;
                for (int64_t j = 0; j < n; j++) {
                    scores[j] = allow[j] ? scores[j] * scaling : -INFINITY;
                    top = scores[j] > top ? scores[j] : top;
                }
                const float total_p = exp_shifted(scores, scores, n, top), inv = 1.0f / total_p;
                float *o = att + r * q_heads * d + hq * d;
                for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
                for (int64_t j = 0; j < n; j++) {
                    const float pj = scores[j];
                    if (pj == 0.0f) continue;
                    const float *vj = vv + j * d;
                    for (int64_t i = 0; i < d; i++) o[i] = fmaf(pj, vj[i], o[i]);
                }
                for (int64_t i = 0; i < d; i++) o[i] *= inv;
            }
        }
        small_matmul(att, q_heads * d, rows4, q_heads * d, L->w_o, hidden, L->b_o, 1, x);
        for (int64_t r = 0; r < rows4; r++) rms_norm_row(x + r * hidden, L->norm_post, L->eps_post, hidden, h + r * hidden);
        small_matmul(h, hidden, rows4, hidden, L->w_gate_up, 2 * intermediate, L->b_gate_up, 0, gu);
        for (int64_t r = 0; r < rows4; r++) {
            float *row = gu + r * 2 * intermediate;
            for (int64_t i = 0; i < intermediate; i++) {
                const float a = row[i];
                row[i] = a / (1.0f + exp_scalar(-a)) * row[intermediate + i];
            }
        }
        small_matmul(gu, 2 * intermediate, rows4, intermediate, L->w_down, hidden, L->b_down, 1, x);
    }
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * hidden, norm_final, eps_final, hidden, out + r * hidden);
    return 0;
}

/* The (row, column) indices, in row-major order, of the entries of x [rows, cols] (rows `ld`
 * apart) above their row's threshold (threshold[r * tstride]), the first `room` of them into
 * row_out and col_out: the top-k loss's candidates for its support (sdft_lite.tiled_loss,
 * `_RunningTopK.offer`), with their values into value_out and, where `other` [rows, cols] (rows
 * ld_other apart) is given, its values at the same places into other_out. Returns how many there
 * are, or room + 1 where there are more (the scan stops there); -1 on bad input. A NaN is above
 * no threshold, as in PyTorch's comparison. */
int64_t sdft_above(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *threshold, int64_t tstride,
                   int64_t room, int64_t *row_out, int64_t *col_out, const float *other, int64_t ld_other,
                   float *value_out, float *other_out) {
    if (rows < 0 || cols < 0 || ld < cols || room < 0 || (other != NULL && ld_other < cols)) return -1;
    int64_t found = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld, t = threshold[r * tstride];
        int64_t c = 0;
#ifdef SDFT_AVX512
        const __m512 tv = _mm512_set1_ps(t);
        for (; c + 16 <= cols; c += 16) {
            __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(xr + c), tv, _CMP_GT_OQ);
            while (m) {
                if (found == room) return room + 1;
                const int64_t cc = c + __builtin_ctz(m);
                row_out[found] = r, col_out[found] = cc, value_out[found] = xr[cc];
                if (other != NULL) other_out[found] = other[r * ld_other + cc];
                found++;
                m &= (__mmask16)(m - 1);
            }
        }
#endif
        for (; c < cols; c++)
            if (xr[c] > t) {
                if (found == room) return room + 1;
                row_out[found] = r, col_out[found] = c, value_out[found] = xr[c];
                if (other != NULL) other_out[found] = other[r * ld_other + c];
                found++;
            }
    }
    return found;
}

/* The largest relative error of the kernel's exp against double-precision exp over every fp32 x
 * in [lo, hi] (inputs whose exact result is below FLT_MIN are skipped: they flush to 0). */
double sdft_exp_max_error(float lo, float hi) {
    double worst = 0.0;
    float buf_in[1024], buf_out[1024];
    int n = 0;
    float x = lo;
    for (;;) {
        buf_in[n++] = x;
        int last = !(x < hi);
        if (n == 1024 || last) {
            exp_run(buf_in, buf_out, n, 1.0f);
            for (int i = 0; i < n; i++) {
                double ref = exp((double)buf_in[i]);
                if (ref < 1.1754943508222875e-38 || isinf(buf_out[i])) continue;
                double err = fabs((double)buf_out[i] - ref) / ref;
                if (err > worst) worst = err;
            }
            n = 0;
        }
        if (last) break;
        x = nextafterf(x, INFINITY);
    }
    return worst;
}
