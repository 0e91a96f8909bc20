/* sdft-lite's CPU kernels, built by sdft_lite/kernels.py with the machine's own compiler:
 *   sdft_int8_probs    the int8 proposal's probabilities (sdft_lite.sampling.Int8Proposal)
 *   sdft_softmax_tile  one vocabulary tile of the distillation loss's online softmax
 *                      (sdft_lite.tiled_loss)
 *   sdft_exp_max_error the largest relative error of their exp (checked on every build)
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
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define CHUNK 256 /* vocabulary ids per pass of exp (their logits stay in L1) */
#define MAX_THREADS 64

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
 * the exponent bits. 0 below -87.3 (fp32's normal range ends there), +inf above 88.7. Its largest
 * relative error over every fp32 input is measured by sdft_exp_max_error (tests). */
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

#ifdef __AVX2__
static inline __m256 exp_avx2(__m256 x) {
    __m256 lo = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_LT_OQ);
    __m256 hi = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_HI), _CMP_GT_OQ);
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    y = _mm256_andnot_ps(lo, y);
    return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), hi);
}
#endif

/* exp of n values (the same arithmetic in the vector and the scalar tail), returning their sum. */
static float exp_run(const float *in, float *out, int64_t n, float inv_t) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), scale = _mm256_set1_ps(inv_t);
    for (; i + 8 <= n; i += 8) {
        __m256 y = exp_avx2(_mm256_mul_ps(_mm256_loadu_ps(in + i), scale));
        _mm256_storeu_ps(out + i, y);
        acc = _mm256_add_ps(acc, y);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int j = 0; j < 8; j++) total += lanes[j];
#endif
    for (; i < n; i++) {
        out[i] = exp_scalar(in[i] * inv_t);
        total += out[i];
    }
    return total;
}

typedef struct {
    const int8_t *q;       /* [vocab, width] */
    const float *scale;    /* [vocab] */
    const float *exact;    /* [k, vocab] */
    const int16_t *act;    /* [rows4, width], rows padded with zeros to a multiple of 4 */
    const float *act_scale;/* [rows4] */
    const float *hk;       /* [rows4, k] */
    float *probs;          /* [rows, vocab] */
    float *mass;           /* [rows, blocks] */
    int64_t vocab, width, k, rows, block, chunk, v0, v1;
    float inv_t;
} job_t;

#ifdef __AVX2__
/* D[b, v] and D[b, v + 1] for the 4 rows b0..b0+3: [v: b0..b3 | v+1: b0..b3], int32 dot products
 * over `width` (a multiple of 16). */
static inline __m256i dots4x2(const job_t *j, int64_t v, const int16_t *a) {
    const int8_t *w = j->q + v * j->width;
    const int64_t n = j->width;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
    for (int64_t i = 0; i < n; i += 16) {
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i)));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + n + i)));
        __m256i x = _mm256_loadu_si256((const __m256i *)(a + i));
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(w0, x));
        t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(w1, x));
        x = _mm256_loadu_si256((const __m256i *)(a + n + i));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(w0, x));
        t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(w1, x));
        x = _mm256_loadu_si256((const __m256i *)(a + 2 * n + i));
        s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(w0, x));
        t2 = _mm256_add_epi32(t2, _mm256_madd_epi16(w1, x));
        x = _mm256_loadu_si256((const __m256i *)(a + 3 * n + i));
        s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(w0, x));
        t3 = _mm256_add_epi32(t3, _mm256_madd_epi16(w1, x));
    }
    __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
    __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(t0, t1), _mm256_hadd_epi32(t2, t3));
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}
#endif

/* The logits of rows b0..b0+3 for ids start..end-1 into logits[b][v - start]. */
static void logits4(const job_t *j, int64_t b0, int64_t start, int64_t end, float logits[4][CHUNK]) {
    const int16_t *a = j->act + b0 * j->width;
    int64_t v = start;
#ifdef __AVX2__
    for (; v + 8 <= end; v += 8) {
        /* four [v, v+1 | ...] pairs -> per row b, the 8 ids' sums in order */
        __m256i p0 = dots4x2(j, v, a), p1 = dots4x2(j, v + 2, a), p2 = dots4x2(j, v + 4, a), p3 = dots4x2(j, v + 6, a);
        /* p0 = [v0 b0..b3 | v1 b0..b3], ...: regroup as X_k = [v_k | v_(k+4)] */
        __m256i x0 = _mm256_permute2x128_si256(p0, p2, 0x20); /* v0 | v4 */
        __m256i x1 = _mm256_permute2x128_si256(p0, p2, 0x31); /* v1 | v5 */
        __m256i x2 = _mm256_permute2x128_si256(p1, p3, 0x20); /* v2 | v6 */
        __m256i x3 = _mm256_permute2x128_si256(p1, p3, 0x31); /* v3 | v7 */
        __m256i u0 = _mm256_unpacklo_epi32(x0, x1), u1 = _mm256_unpackhi_epi32(x0, x1);
        __m256i u2 = _mm256_unpacklo_epi32(x2, x3), u3 = _mm256_unpackhi_epi32(x2, x3);
        __m256i rows[4] = {_mm256_unpacklo_epi64(u0, u2), _mm256_unpackhi_epi64(u0, u2),
                           _mm256_unpacklo_epi64(u1, u3), _mm256_unpackhi_epi64(u1, u3)};
        __m256 scale = _mm256_loadu_ps(j->scale + v);
        for (int b = 0; b < 4; b++) {
            __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(rows[b]), _mm256_mul_ps(scale, _mm256_set1_ps(j->act_scale[b0 + b])));
            for (int64_t c = 0; c < j->k; c++)
                x = _mm256_fmadd_ps(_mm256_set1_ps(j->hk[(b0 + b) * j->k + c]), _mm256_loadu_ps(j->exact + c * j->vocab + v), x);
            _mm256_storeu_ps(&logits[b][v - start], x);
        }
    }
#endif
    for (; v < end; v++) {
        const int8_t *w = j->q + v * j->width;
        for (int b = 0; b < 4; b++) {
            int32_t s = 0;
            for (int64_t i = 0; i < j->width; i++) s += (int32_t)w[i] * (int32_t)a[b * j->width + i];
            float x = (float)s * (j->scale[v] * j->act_scale[b0 + b]);
            for (int64_t c = 0; c < j->k; c++) x = fmaf(j->hk[(b0 + b) * j->k + c], j->exact[c * j->vocab + v], x);
            logits[b][v - start] = x;
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

/* Fills probs [rows, vocab] and mass [rows, ceil(vocab / block)] (zeroed here) using `threads`
 * threads, each a run of whole blocks. block: at most CHUNK or a multiple of it. act, act_scale
 * and hk have their rows padded (with zeros) to a multiple of 4. Returns 0, or -1 on bad input. */
int sdft_int8_probs(const int8_t *q, const float *scale, const float *exact, const int16_t *act,
                    const float *act_scale, const float *hk, float *probs, float *mass, int64_t vocab,
                    int64_t width, int64_t k, int64_t rows, int64_t block, float inv_t, int threads) {
    int64_t chunk = block < CHUNK ? block : CHUNK;
    if (width % 16 || block < 1 || block % chunk || rows < 1 || threads < 1) return -1;
    int64_t blocks = (vocab + block - 1) / block;
    memset(mass, 0, sizeof(float) * rows * blocks);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = (int)blocks;
    job_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        job_t j = {q, scale, exact, act, act_scale, hk, probs, mass, vocab, width, k, rows, block, chunk, 0, 0, inv_t};
        j.v0 = (blocks * t / threads) * block;
        j.v1 = (blocks * (t + 1) / threads) * block;
        if (j.v1 > vocab) j.v1 = vocab;
        jobs[t] = j;
    }
    run_parallel(run_range, jobs, sizeof(job_t), threads);
    return 0;
}

typedef struct {
    const float *x;
    float *probs, *m, *z, *rescale;
    int64_t r0, r1, cols, grew;
} tile_job_t;

/* The largest of n values, and whether any is NaN (*nan set). */
static float row_max(const float *x, int64_t n, int *nan) {
    int64_t i = 0;
    float best = -INFINITY;
    int bad = 0;
#ifdef __AVX2__
    __m256 a0 = _mm256_set1_ps(-INFINITY), a1 = a0, u = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_max_ps(a0, x0);
        a1 = _mm256_max_ps(a1, x1);
        u = _mm256_or_ps(u, _mm256_cmp_ps(x0, x1, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_max_ps(a0, a1));
    for (int j = 0; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
    bad = _mm256_movemask_ps(u) != 0;
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
#ifdef __AVX2__
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, c = _mm256_set1_ps(shift);
    for (; i + 16 <= n; i += 16) {
        __m256 y0 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(in + i), c));
        __m256 y1 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(in + i + 8), c));
        _mm256_storeu_ps(out + i, y0);
        _mm256_storeu_ps(out + i + 8, y1);
        s0 = _mm256_add_ps(s0, y0);
        s1 = _mm256_add_ps(s1, y1);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(s0, s1));
    for (int j = 0; j < 8; j++) total += lanes[j];
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
