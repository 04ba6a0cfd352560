/* Native CPU kernels for the sparse parts of a TopK SAE step (optional: mlsae/native.py
 * compiles this file on first use and falls back to pure PyTorch when it cannot).
 *
 * Every kernel is deterministic (fixed reduction order, static OpenMP schedules) so that
 * training resumes and distributed runs reproduce single-process results.
 * Indices are trusted: the Python wrappers check their range before calling.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The TopK's order: a larger value first, and of equal values the lower index (latent), so that
 * every path, with or without AVX-512, keeps the same latents when values tie (bf16 products tie
 * often). */
static inline int ranks_above(float av, int64_t ai, float bv, int64_t bi) {
    return av > bv || (av == bv && ai < bi);
}

/* Reorder (v, ix)[0..m) so that its k first entries in the TopK's order come first (unordered);
 * ix may be NULL (then only the values matter: ties are taken in any order). */
static void select_largest(float* v, int64_t* ix, int64_t m, int64_t k) {
    int64_t lo = 0, hi = m - 1;
#define ABOVE(a, b) (ix ? ranks_above(v[a], ix[a], v[b], ix[b]) : v[a] > v[b])
    while (lo < hi) {
        int64_t a = lo, b = lo + (hi - lo) / 2, c = hi; /* the median of three, by position */
        int64_t med = ABOVE(a, b) ? (ABOVE(b, c) ? b : (ABOVE(a, c) ? c : a)) : (ABOVE(a, c) ? a : (ABOVE(b, c) ? c : b));
#undef ABOVE
        float pv = v[med];
        int64_t pi = ix ? ix[med] : 0;
        int64_t i = lo, j = hi;
        while (i <= j) {
            if (ix) {
                while (ranks_above(v[i], ix[i], pv, pi)) i++;
                while (ranks_above(pv, pi, v[j], ix[j])) j--;
            } else {
                while (v[i] > pv) i++;
                while (v[j] < pv) j--;
            }
            if (i <= j) {
                float tv = v[i]; v[i] = v[j]; v[j] = tv;
                if (ix) { int64_t ti = ix[i]; ix[i] = ix[j]; ix[j] = ti; }
                i++; j--;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* Ask for a row that will be read soon: random rows of a large matrix miss every cache level. */
static inline void prefetch_row(const float* row, int64_t d) {
    for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(row + c, 0, 1);
}

#define PAD16(m) (((m) + 15) / 16 * 16)

#ifdef __AVX512F__
/* Branch-free selection for short arrays (quickselect mispredicts about every other compare).
 * The rank of v[i] is the number of values ahead of it: larger, or equal and earlier; exactly
 * k values have rank < k. v (room for PAD16(m) floats) is padded with -inf so whole vectors
 * compare; the k winners (and their ix) go to out_v/out_ix (not overlapping v); returns the
 * smallest. */
#define RANK_MAX 128
static float select_by_rank(float* v, const int64_t* ix, int64_t m, int64_t k, float* out_v,
                            int64_t* out_ix) {
    int64_t nv = (m + 15) / 16;
    for (int64_t j = m; j < nv * 16; j++) v[j] = -INFINITY;
    /* The k-th largest value is the smallest with fewer than k values strictly above it. */
    float kth = INFINITY;
    const __m512i one = _mm512_set1_epi32(1), kk = _mm512_set1_epi32((int)k);
    for (int64_t q = 0; q < nv; q++) { /* counts for v[16q .. 16q+16), one lane each */
        __m512 mine = _mm512_loadu_ps(v + 16 * q);
        __m512i above0 = _mm512_setzero_si512(), above1 = above0;
        int64_t j = 0;
        for (; j + 2 <= m; j += 2) { /* two chains hide the latency */
            above0 = _mm512_mask_add_epi32(above0, _mm512_cmp_ps_mask(_mm512_set1_ps(v[j]), mine, _CMP_GT_OQ), above0, one);
            above1 = _mm512_mask_add_epi32(above1, _mm512_cmp_ps_mask(_mm512_set1_ps(v[j + 1]), mine, _CMP_GT_OQ), above1, one);
        }
        if (j < m) above0 = _mm512_mask_add_epi32(above0, _mm512_cmp_ps_mask(_mm512_set1_ps(v[j]), mine, _CMP_GT_OQ), above0, one);
        __mmask16 valid = (__mmask16)(m - 16 * q >= 16 ? 0xFFFF : (1u << (m - 16 * q)) - 1);
        __mmask16 in = _mm512_mask_cmplt_epi32_mask(valid, _mm512_add_epi32(above0, above1), kk);
        if (in) kth = fminf(kth, _mm512_mask_reduce_min_ps(in, mine));
    }
    if (!out_v) return kth;
    /* The values above it (fewer than k: compressed out a vector at a time), then as many equal
     * to it as needed, lowest index first (the TopK's order). */
    int64_t w = 0;
    __m512 t = _mm512_set1_ps(kth);
    for (int64_t q = 0; q < nv; q++) {
        __m512 mine = _mm512_loadu_ps(v + 16 * q);
        __mmask16 gt = _mm512_cmp_ps_mask(mine, t, _CMP_GT_OQ);
        while (gt) {
            int l = __builtin_ctz(gt);
            gt &= gt - 1;
            out_v[w] = v[16 * q + l];
            if (ix) out_ix[w] = ix[16 * q + l];
            w++;
        }
    }
    int64_t tied[RANK_MAX], n_tied = 0;
    for (int64_t q = 0; q < nv; q++) { /* not the padding, which ties with a -inf k-th value */
        __mmask16 valid = (__mmask16)(m - 16 * q >= 16 ? 0xFFFF : (1u << (m - 16 * q)) - 1);
        __mmask16 eq = _mm512_mask_cmp_ps_mask(valid, _mm512_loadu_ps(v + 16 * q), t, _CMP_EQ_OQ);
        while (eq) {
            tied[n_tied++] = 16 * q + __builtin_ctz(eq);
            eq &= eq - 1;
        }
    }
    for (int64_t e = 0; w < k; e++, w++) { /* the lowest indices of the tied (by position without ix) */
        int64_t best = e;
        for (int64_t f = e + 1; ix && f < n_tied; f++) best = ix[tied[f]] < ix[tied[best]] ? f : best;
        int64_t pos = tied[best];
        tied[best] = tied[e];
        out_v[w] = v[pos];
        if (ix) out_ix[w] = ix[pos];
    }
    return kth;
}
#else
#define RANK_MAX 0
static float select_by_rank(float* v, const int64_t* ix, int64_t m, int64_t k, float* out_v,
                            int64_t* out_ix) {
    (void)v; (void)ix; (void)m; (void)k; (void)out_v; (void)out_ix;
    return 0.0f;
}
#endif

static inline float min_of(const float* v, int64_t k) {
    float m = v[0];
    for (int64_t i = 1; i < k; i++) m = v[i] < m ? v[i] : m;
    return m;
}

/* Bit t of the result is set when x[t] >= th (strict: x[t] > th), for 16 consecutive values;
 * NaN never sets a bit. */
static inline uint32_t mask16_f32(const float* x, float th, int strict) {
#ifdef __AVX512F__
    __m512 v = _mm512_loadu_ps(x), t = _mm512_set1_ps(th);
    return (uint32_t)(strict ? _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ));
#else
    uint32_t mask = 0;
    for (int t = 0; t < 16; t++) mask |= (uint32_t)(strict ? x[t] > th : x[t] >= th) << t;
    return mask;
#endif
}

static inline uint32_t mask16_bf16(const uint16_t* x, float th, int strict) {
#ifdef __AVX512F__
    __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x)), 16);
    __m512 v = _mm512_castsi512_ps(wide), t = _mm512_set1_ps(th);
    return (uint32_t)(strict ? _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ));
#else
    uint32_t mask = 0;
    for (int t = 0; t < 16; t++) {
        float v = bf16_to_f32(x[t]);
        mask |= (uint32_t)(strict ? v > th : v >= th) << t;
    }
    return mask;
#endif
}

typedef struct {
    float* v;
    int64_t* ix;
    int64_t m, k, cap;
    float th;
} Buffer;

/* Keep candidate (x, j); when the buffer is full keep its k largest and raise the threshold. */
static inline void push(Buffer* b, float x, int64_t j) {
    if (!(x >= b->th)) return;
    b->v[b->m] = x;
    b->ix[b->m] = j;
    if (++b->m == b->cap) {
        select_largest(b->v, b->ix, b->m, b->k);
        b->m = b->k;
        b->th = min_of(b->v, b->k);
    }
}

/* TopK of one row (raw values; columns reported + col0). Columns are split into G strided groups (g, g+G, ...): the k-th
 * largest group maximum is a lower bound of the k-th largest value, so one vectorised pass
 * with that threshold leaves only a few candidates. Returns 0 for a row holding NaN, so that
 * the caller can fall back to PyTorch's semantics. */
/* Append the values of 16 consecutive columns j.. that are >= b->th to the buffer (no branch
 * per value: AVX-512 compresses them); the buffer has 16 slots of slack past its capacity. */
#ifdef __AVX512F__
static inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void push16(Buffer* b, __m512 v, int64_t j) {
    __mmask16 mask = _mm512_cmp_ps_mask(v, _mm512_set1_ps(b->th), _CMP_GE_OQ);
    if (!mask) return;
    const __m512i lanes_lo = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    __m512i base = _mm512_set1_epi64(j);
    _mm512_storeu_ps(b->v + b->m, _mm512_maskz_compress_ps(mask, v));
    __m512i lo = _mm512_maskz_compress_epi64((__mmask8)mask, _mm512_add_epi64(base, lanes_lo));
    __m512i hi = _mm512_maskz_compress_epi64((__mmask8)(mask >> 8),
                                             _mm512_add_epi64(base, _mm512_add_epi64(lanes_lo, _mm512_set1_epi64(8))));
    int n_lo = __builtin_popcount(mask & 0xFF);
    _mm512_storeu_si512((void*)(b->ix + b->m), lo);
    _mm512_storeu_si512((void*)(b->ix + b->m + n_lo), hi);
    b->m += __builtin_popcount(mask);
    if (b->m >= b->cap) {
        select_largest(b->v, b->ix, b->m, b->k);
        b->m = b->k;
        b->th = min_of(b->v, b->k);
    }
}
#define PUSH16(b, LOAD16, MASK16, LOAD, p, j) push16(b, LOAD16(p + j), j)
#else
#define PUSH16(b, LOAD16, MASK16, LOAD, p, j)                                                     \
    do {                                                                                          \
        uint32_t mask_ = MASK16(p + j, (b)->th, 0);                                               \
        while (mask_) {                                                                           \
            int t_ = __builtin_ctz(mask_);                                                        \
            mask_ &= mask_ - 1;                                                                   \
            push(b, LOAD(p[j + t_]), j + t_);                                                     \
        }                                                                                         \
    } while (0)
#endif

/* TopK of one row (raw values; columns reported + col0). Columns are split into G strided
 * groups (g, g+G, ...): the k-th largest group maximum is a lower bound of the k-th largest
 * value, so one vectorised pass with that threshold leaves only a few candidates. Returns 0 for
 * a row holding NaN (the maxima keep NaN), so that the caller can fall back to PyTorch's semantics. */
#define DEFINE_ROW_TOPK(NAME, T, LOAD, MASK16, LOAD16)                                          \
    static int NAME(const T* p, int64_t F, int64_t G, int64_t k, int64_t col0, float* out_v,   \
                    int64_t* out_i, float* gm, Buffer* b) {                                   \
        for (int64_t g = 0; g < G; g++) gm[g] = LOAD(p[g]);                                   \
        for (int64_t a = G; a < F; a += G) {                                                  \
            const T* q = p + a;                                                               \
            int64_t len = F - a < G ? F - a : G;                                              \
            _Pragma("omp simd") for (int64_t g = 0; g < len; g++) {                           \
                float x = LOAD(q[g]), m = gm[g];                                              \
                gm[g] = (x > m) | (x != x) ? x : m; /* NaN, once in, stays */                 \
            }                                                                                 \
        }                                                                                     \
        int nan = 0;                                                                          \
        for (int64_t g = 0; g < G; g++) nan |= gm[g] != gm[g];                                \
        if (nan) return 0; /* torch.topk ranks NaN first: leave such rows to it */             \
        b->m = 0;                                                                             \
        if (G <= RANK_MAX) {                                                                  \
            b->th = select_by_rank(gm, NULL, G, k, NULL, NULL);                               \
        } else {                                                                              \
            select_largest(gm, NULL, G, k);                                                   \
            b->th = min_of(gm, k);                                                            \
        }                                                                                     \
        int64_t j = 0;                                                                        \
        for (; j + 16 <= F; j += 16) PUSH16(b, LOAD16, MASK16, LOAD, p, j);                   \
        for (; j < F; j++) push(b, LOAD(p[j]), j);                                            \
        if (b->m < k) return 0;                                                               \
        if (b->m <= RANK_MAX) {                                                               \
            select_by_rank(b->v, b->ix, b->m, k, out_v, out_i);                               \
        } else {                                                                              \
            select_largest(b->v, b->ix, b->m, k);                                             \
            memcpy(out_v, b->v, sizeof(float) * k);                                           \
            memcpy(out_i, b->ix, sizeof(int64_t) * k);                                        \
        }                                                                                     \
        for (int64_t t = 0; t < k; t++) out_i[t] += col0;                                     \
        return 1;                                                                             \
    }

#define IDENTITY(x) (x)
#ifndef PREFETCH
#define PREFETCH 8 /* entries ahead */
#endif
DEFINE_ROW_TOPK(row_topk_f32, float, IDENTITY, mask16_f32, load16_f32)
DEFINE_ROW_TOPK(row_topk_bf16_generic, uint16_t, bf16_to_f32, mask16_bf16, load16_bf16)

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* bf16 rows, 32 values a vector: bf16 bits become int16 keys in the order of their values
 * (negatives' magnitude bits flipped), so both passes compare 16-bit integers, twice as many
 * per instruction; only candidates are widened to fp32. Same result as the generic version. */
static inline __m512i bf16_keys(__m512i h) {
    return _mm512_xor_si512(h, _mm512_and_si512(_mm512_srai_epi16(h, 15), _mm512_set1_epi16(0x7FFF)));
}
static inline int16_t bf16_key(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    int16_t h = (int16_t)(u >> 16);
    return (int16_t)(h ^ ((h >> 15) & 0x7FFF));
}
static inline float key_to_f32(int16_t key) {
    int16_t h = (int16_t)(key ^ ((key >> 15) & 0x7FFF));
    return bf16_to_f32((uint16_t)h);
}

static int row_topk_bf16(const uint16_t* p, int64_t F, int64_t G, int64_t k, int64_t col0, float* out_v,
                         int64_t* out_i, float* gm, Buffer* b) {
    if (G % 32 || F < 2 * G) return row_topk_bf16_generic(p, F, G, k, col0, out_v, out_i, gm, b);
    /* Pass 1: group maxima as keys (groups g, g+G, ...), and whether any value is NaN. */
    int16_t* km = (int16_t*)(gm + PAD16(G)); /* scratch: G keys fit in the second G floats */
    for (int64_t g = 0; g < G; g += 32)
        _mm512_storeu_si512((void*)(km + g), bf16_keys(_mm512_loadu_si512((const void*)(p + g))));
    __mmask32 nan = 0;
    const __m512i mag = _mm512_set1_epi16(0x7FFF), inf = _mm512_set1_epi16(0x7F80);
    for (int64_t g = 0; g < G; g += 32)
        nan |= _mm512_cmpgt_epi16_mask(_mm512_and_si512(_mm512_loadu_si512((const void*)(p + g)), mag), inf);
    int64_t a = G;
    for (; a + G <= F; a += G)
        for (int64_t g = 0; g < G; g += 32) {
            __m512i h = _mm512_loadu_si512((const void*)(p + a + g));
            nan |= _mm512_cmpgt_epi16_mask(_mm512_and_si512(h, mag), inf);
            __m512i* slot = (__m512i*)(km + g);
            _mm512_storeu_si512(slot, _mm512_max_epi16(_mm512_loadu_si512(slot), bf16_keys(h)));
        }
    for (int64_t j = a; j < F; j++) { /* a ragged last stripe */
        int16_t key = bf16_key(bf16_to_f32(p[j]));
        nan |= (p[j] & 0x7FFF) > 0x7F80;
        if (key > km[j - a]) km[j - a] = key;
    }
    if (nan) return 0; /* torch.topk ranks NaN first: leave such rows to it */
    for (int64_t g = 0; g < G; g++) gm[g] = key_to_f32(km[g]);
    b->m = 0;
    if (G <= RANK_MAX) {
        b->th = select_by_rank(gm, NULL, G, k, NULL, NULL);
    } else {
        select_largest(gm, NULL, G, k);
        b->th = min_of(gm, k);
    }
    /* Pass 2: the values >= the threshold, as keys; the buffer may raise it. */
    float th = b->th;
    __m512i tk = _mm512_set1_epi16(bf16_key(th));
    int64_t j = 0;
    for (; j + 32 <= F; j += 32) {
        __mmask32 mask = _mm512_cmpge_epi16_mask(bf16_keys(_mm512_loadu_si512((const void*)(p + j))), tk);
        if (!mask) continue;
        if ((__mmask16)mask) push16(b, load16_bf16(p + j), j);
        if ((__mmask16)(mask >> 16)) push16(b, load16_bf16(p + j + 16), j + 16);
        if (b->th != th) {
            th = b->th;
            tk = _mm512_set1_epi16(bf16_key(th));
        }
    }
    for (; j < F; j++) push(b, bf16_to_f32(p[j]), j);
    if (b->m < k) return 0;
    if (b->m <= RANK_MAX) {
        select_by_rank(b->v, b->ix, b->m, k, out_v, out_i);
    } else {
        select_largest(b->v, b->ix, b->m, k);
        memcpy(out_v, b->v, sizeof(float) * k);
        memcpy(out_i, b->ix, sizeof(int64_t) * k);
    }
    for (int64_t t = 0; t < k; t++) out_i[t] += col0;
    return 1;
}
#else
#define row_topk_bf16 row_topk_bf16_generic
#endif

/* A row's running TopK lives in 2k slots: the current k largest (unordered) then up to k
 * pending candidates, all above the threshold (the k-th largest when the pending ones were last
 * folded in). Folding only when the pending half is full keeps the selects rare. */

/* Fold the m pending candidates of (sv, si) into its first k slots; wv, wi are work arrays
 * with room for PAD16(k + m). Returns the new threshold. */
static float fold_pending(float* sv, int64_t* si, float* wv, int64_t* wi, int64_t k, int64_t m) {
    memcpy(wv, sv, sizeof(float) * (k + m));
    memcpy(wi, si, sizeof(int64_t) * (k + m));
    if (k + m <= RANK_MAX) return select_by_rank(wv, wi, k + m, k, sv, si);
    select_largest(wv, wi, k + m, k);
    memcpy(sv, wv, sizeof(float) * k);
    memcpy(si, wi, sizeof(int64_t) * k);
    return min_of(sv, k);
}

/* Fold one more block of a row (columns col0..col0+cols) into its running TopK (sv, si, *pending,
 * *th): only values above the threshold can enter, and after the first block they are rare.
 * Returns 0 if the block holds NaN. */
#define DEFINE_ROW_MERGE(NAME, T, LOAD, MASK16)                                                 \
    static int NAME(const T* p, int64_t cols, int64_t col0, int64_t k, float* sv, int64_t* si,  \
                    int64_t* pending, float* th, float* wv, int64_t* wi) {                     \
        int64_t m = *pending;                                                                 \
        int nan = 0;                                                                          \
        for (int64_t j = 0; j < cols; j += 16) {                                              \
            uint32_t mask;                                                                    \
            if (j + 16 <= cols) {                                                             \
                mask = MASK16(p + j, *th, 1);                                                 \
                nan |= (MASK16(p + j, -INFINITY, 0) != 0xFFFFu);                              \
            } else {                                                                          \
                mask = 0;                                                                     \
                for (int64_t t = j; t < cols; t++) {                                          \
                    float x = LOAD(p[t]);                                                     \
                    nan |= x != x;                                                            \
                    mask |= (uint32_t)(x > *th) << (t - j);                                   \
                }                                                                             \
            }                                                                                 \
            while (mask) {                                                                    \
                int t = __builtin_ctz(mask);                                                  \
                mask &= mask - 1;                                                             \
                float x = LOAD(p[j + t]);                                                     \
                if (!(x > *th)) continue; /* the threshold rose within this vector */         \
                sv[k + m] = x;                                                                \
                si[k + m] = col0 + j + t;                                                     \
                if (++m == k) {                                                               \
                    *th = fold_pending(sv, si, wv, wi, k, m);                                 \
                    m = 0;                                                                    \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        *pending = m;                                                                         \
        return !nan;                                                                          \
    }

DEFINE_ROW_MERGE(row_merge_f32, float, IDENTITY, mask16_f32)
DEFINE_ROW_MERGE(row_merge_bf16, uint16_t, bf16_to_f32, mask16_bf16)

/* One block of columns (col0 .. col0+cols) of n rows of pre-activations (row r at
 * tile + r * ld; fp32, or bf16 when is_bf16) into the running TopK of each row: values[r] and
 * indices[r] (2k slots each, see fold_pending), pending[r] and thr[r]. The first block
 * (first != 0, cols >= k) starts it with G (k <= G <= cols) groups for its threshold; the next
 * ones merge; mlsae_topk_finish reads it out. Returns the number of rows holding NaN (their
 * state is then undefined). */
int64_t mlsae_topk_block(const void* tile, int is_bf16, int64_t n, int64_t cols, int64_t ld,
                         int64_t col0, int64_t k, int64_t G, int first, float* values,
                         int64_t* indices, int64_t* pending, float* thr, int nthreads) {
    G = G < k ? k : (G > cols ? cols : G);
    int64_t cap = 4 * k;
    int64_t failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : failed)
    {
        /* gm: group maxima, padded to whole vectors for select_by_rank, then its output; then the
         * candidate buffer or the fold's work values (padded too). */
        float* gm = malloc(sizeof(float) * (2 * PAD16(G) + PAD16(2 * k + cap) + 16));
        int64_t* ix = malloc(sizeof(int64_t) * (2 * k + cap + 16));
        float* wv = gm + 2 * PAD16(G);
        Buffer b = {wv, ix, 0, k, cap, 0.0f};
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            float *sv = values + r * 2 * k, *th = thr + r;
            int64_t* si = indices + r * 2 * k;
            int ok;
            if (first) {
                ok = is_bf16 ? row_topk_bf16((const uint16_t*)tile + r * ld, cols, G, k, col0, sv, si, gm, &b)
                             : row_topk_f32((const float*)tile + r * ld, cols, G, k, col0, sv, si, gm, &b);
                if (ok) *th = min_of(sv, k);
                pending[r] = 0;
            } else {
                ok = is_bf16 ? row_merge_bf16((const uint16_t*)tile + r * ld, cols, col0, k, sv, si, pending + r, th, wv, ix)
                             : row_merge_f32((const float*)tile + r * ld, cols, col0, k, sv, si, pending + r, th, wv, ix);
            }
            failed += !ok;
        }
        free(gm);
        free(ix);
    }
    return failed;
}

/* The TopK of each row from its running state: the k largest values (ReLU'd if relu) and their
 * columns. */
void mlsae_topk_finish(float* values, int64_t* indices, const int64_t* pending, int64_t n,
                       int64_t k, int relu, float* out_v, int64_t* out_i, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float* wv = malloc(sizeof(float) * PAD16(2 * k));
        int64_t* wi = malloc(sizeof(int64_t) * 2 * k);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            float* sv = values + r * 2 * k;
            int64_t* si = indices + r * 2 * k;
            if (pending[r]) fold_pending(sv, si, wv, wi, k, pending[r]);
            for (int64_t t = 0; t < k; t++) {
                out_v[r * k + t] = relu && !(sv[t] > 0.0f) ? 0.0f : sv[t];
                out_i[r * k + t] = si[t];
            }
        }
        free(wv);
        free(wi);
    }
}

/* o[0..d) = sum over q < m of a[q] * X[rows[q]] (rows of length d, fp32 or bf16: bf16 is read as
 * it is, half the bytes), in q order. With AVX-512 the sums of 64 columns at a time stay in
 * registers while the m rows stream by. */
#ifdef __AVX512F__
#define ACCUMULATE64(T, LOAD16)                                                                   \
    for (; c0 + 64 <= d; c0 += 64) {                                                              \
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;                               \
        for (int64_t q = 0; q < m; q++) {                                                         \
            const T* x = X + rows[q] * d + c0;                                                    \
            if (c0 == 0 && q + PREFETCH < m)                                                      \
                prefetch_row((const float*)(X + rows[q + PREFETCH] * d), d * sizeof(T) / sizeof(float)); \
            __m512 aq = _mm512_set1_ps(a[q]);                                                     \
            s0 = _mm512_fmadd_ps(aq, LOAD16(x), s0);                                              \
            s1 = _mm512_fmadd_ps(aq, LOAD16(x + 16), s1);                                         \
            s2 = _mm512_fmadd_ps(aq, LOAD16(x + 32), s2);                                         \
            s3 = _mm512_fmadd_ps(aq, LOAD16(x + 48), s3);                                         \
        }                                                                                         \
        _mm512_storeu_ps(o + c0, s0);                                                             \
        _mm512_storeu_ps(o + c0 + 16, s1);                                                        \
        _mm512_storeu_ps(o + c0 + 32, s2);                                                        \
        _mm512_storeu_ps(o + c0 + 48, s3);                                                        \
    }
#else
#define ACCUMULATE64(T, LOAD16)
#endif
#define DEFINE_ACCUMULATE_ROWS(NAME, T, LOAD, LOAD16)                                             \
    static inline void NAME(float* o, const float* a, const int64_t* rows, const T* X, int64_t d, \
                            int64_t m) {                                                          \
        int64_t c0 = 0;                                                                           \
        ACCUMULATE64(T, LOAD16)                                                                   \
        if (c0 < d) {                                                                             \
            memset(o + c0, 0, sizeof(float) * (d - c0));                                          \
            for (int64_t q = 0; q < m; q++) {                                                     \
                const T* x = X + rows[q] * d;                                                     \
                float aq = a[q];                                                                  \
                _Pragma("omp simd") for (int64_t c = c0; c < d; c++) o[c] += aq * LOAD(x[c]);     \
            }                                                                                     \
        }                                                                                         \
    }
DEFINE_ACCUMULATE_ROWS(accumulate_rows, float, IDENTITY, load16_f32)
DEFINE_ACCUMULATE_ROWS(accumulate_rows_bf16, uint16_t, bf16_to_f32, load16_bf16)

/* Counting sort of the n*k entries by latent: entries of latent f are q in [start[f], start[f+1]),
 * each with its vector rows[q] = e / k, weight weights[q] = w[e] and (when not NULL) entry[q] = e,
 * in their original order. start[] has F+1 slots. In parallel: each thread counts, then places,
 * its own contiguous range of entries, after the ranges of the threads before it. */
static void bucket_by_latent(const float* w, const int64_t* idx, int64_t n, int64_t k, int64_t F,
                             int64_t* rows, float* weights, int64_t* entry, int64_t* start, int nthreads) {
    int64_t nnz = n * k;
    int T = nthreads < 1 ? 1 : nthreads;
    int64_t* next = calloc((size_t)T * F, sizeof(int64_t)); /* per thread: counts, then positions */
#pragma omp parallel num_threads(T)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t e0 = nnz * t / nt, e1 = nnz * (t + 1) / nt;
        int64_t* mine = next + (int64_t)t * F;
        for (int64_t e = e0; e < e1; e++) mine[idx[e]]++;
#pragma omp barrier
#pragma omp single
        {
            int64_t q = 0;
            for (int64_t f = 0; f < F; f++) {
                start[f] = q;
                for (int u = 0; u < nt; u++) {
                    int64_t c = next[(int64_t)u * F + f];
                    next[(int64_t)u * F + f] = q;
                    q += c;
                }
            }
            start[F] = q;
        }
        for (int64_t e = e0; e < e1; e++) {
            int64_t q = mine[idx[e]]++;
            rows[q] = e / k;
            weights[q] = w[e];
            if (entry) entry[q] = e;
        }
    }
    free(next);
}

/* Prefetch the first rows of latent f's entries (the hardware cannot guess random rows). */
static inline void prefetch_entries(const float* X, const int64_t* rows, const int64_t* start,
                                    int64_t f, int64_t F, int64_t d) {
    if (f >= F) return;
    for (int64_t q = start[f]; q < start[f + 1] && q < start[f] + PREFETCH; q++) prefetch_row(X + rows[q] * d, d);
}

/* out[f] = sum of w[e] * (X[e / k] - shift) over the entries e (of n*k) with idx[e] == f
 * (X: fp32, or bf16 when x_bf16; shift: NULL or d values); wsum[f] = sum of those w[e] (when
 * not NULL). With entry (not NULL), rows/start/entry come filled by mlsae_decode_backward for the
 * same indices and the counting sort is skipped. Each output row is written once, in parallel over latents,
 * summing its entries in their original order. rows, weights: n*k; start: F+1 (workspaces). */
void mlsae_scatter_rows(const float* w, const int64_t* idx, const void* X, int x_bf16, const float* shift,
                        int64_t n, int64_t k, int64_t d, int64_t F, float* out, float* wsum,
                        int64_t* rows, float* weights, int64_t* start, const int64_t* entry,
                        int nthreads) {
    if (entry) { /* rows, start and entry already bucket these indices (from the decode's backward) */
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t q = 0; q < n * k; q++) weights[q] = w[entry[q]];
    } else {
        bucket_by_latent(w, idx, n, k, F, rows, weights, NULL, start, nthreads);
    }
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 64)
    for (int64_t f = 0; f < F; f++) {
        int64_t q0 = start[f], m = start[f + 1] - q0;
        float* o = out + f * d;
        if (x_bf16) {
            accumulate_rows_bf16(o, weights + q0, rows + q0, (const uint16_t*)X, d, m);
        } else {
            prefetch_entries((const float*)X, rows, start, f + 1, F, d);
            accumulate_rows(o, weights + q0, rows + q0, (const float*)X, d, m);
        }
        float total = 0.0f;
        for (int64_t q = q0; q < q0 + m; q++) total += weights[q];
        if (wsum) wsum[f] = total;
        if (shift && total != 0.0f) /* the rows were X - shift */
            for (int64_t c = 0; c < d; c++) o[c] -= total * shift[c];
    }
}

/* Returns <w, x> and does o += a * x, over d floats (four independent sums hide FMA latency). */
static inline float dot_and_axpy(float* o, const float* w, const float* x, float a, int64_t d) {
    int64_t c = 0;
    float dot = 0.0f;
#ifdef __AVX512F__
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, av = _mm512_set1_ps(a);
    for (; c + 64 <= d; c += 64) {
        __m512 x0 = _mm512_loadu_ps(x + c), x1 = _mm512_loadu_ps(x + c + 16);
        __m512 x2 = _mm512_loadu_ps(x + c + 32), x3 = _mm512_loadu_ps(x + c + 48);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), x0, s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 16), x1, s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 32), x2, s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 48), x3, s3);
        _mm512_storeu_ps(o + c, _mm512_fmadd_ps(av, x0, _mm512_loadu_ps(o + c)));
        _mm512_storeu_ps(o + c + 16, _mm512_fmadd_ps(av, x1, _mm512_loadu_ps(o + c + 16)));
        _mm512_storeu_ps(o + c + 32, _mm512_fmadd_ps(av, x2, _mm512_loadu_ps(o + c + 32)));
        _mm512_storeu_ps(o + c + 48, _mm512_fmadd_ps(av, x3, _mm512_loadu_ps(o + c + 48)));
    }
    dot = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#endif
#pragma omp simd reduction(+ : dot)
    for (int64_t j = c; j < d; j++) {
        dot += w[j] * x[j];
        o[j] += a * x[j];
    }
    return dot;
}

/* Backward of the sparse decode out[i] = sum_j v[i, j] * W[idx[i, j]] given G = dL/dout:
 * grad_W[f] = sum of v[e] * G[e / k] over entries with idx[e] == f, and
 * grad_v[e] = <W[idx[e]], G[e / k]>, both from one read of each G row (bucketed by latent,
 * so W[f] stays in cache). rows, weights, entry: n*k; start: F+1 (workspaces). */
void mlsae_decode_backward(const float* v, const int64_t* idx, const float* G, const float* W,
                           int64_t n, int64_t k, int64_t d, int64_t F, float* grad_W,
                           float* grad_v, int64_t* rows, float* weights, int64_t* entry,
                           int64_t* start, int nthreads) {
    bucket_by_latent(v, idx, n, k, F, rows, weights, entry, start, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 64)
    for (int64_t f = 0; f < F; f++) {
        int64_t q0 = start[f], q1 = start[f + 1];
        const float* wf = W + f * d;
        float* o = grad_W + f * d;
        prefetch_entries(G, rows, start, f + 1, F, d);
        memset(o, 0, sizeof(float) * d);
        for (int64_t q = q0; q < q1; q++) {
            const float* x = G + rows[q] * d;
            if (q + PREFETCH < q1) prefetch_row(G + rows[q + PREFETCH] * d, d);
            float dot = dot_and_axpy(o, wf, x, weights[q], d);
            grad_v[entry[q]] = dot;
        }
    }
}

/* Bytes of one core's L2 cache: the C library's answer where it has one, else 1 MiB. */
static int64_t l2_bytes(void) {
#ifdef _SC_LEVEL2_CACHE_SIZE
    long s = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (s > 0) return s;
#endif
    return 1 << 20;
}

/* out[c0 .. c0 + w) (w <= 64) = sum over j < k of a[j] * W[ix[j]][c0 ..], j in order. */
static inline void weighted_rows64(float* out, const float* a, const int64_t* ix, const float* W, int64_t d,
                                   int64_t c0, int64_t w, int64_t k) {
#ifdef __AVX512F__
    __mmask16 m[4];
    for (int v = 0; v < 4; v++) {
        int64_t left = w - 16 * v;
        m[v] = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    }
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t j = 0; j < k; j++) {
        const float* x = W + ix[j] * d + c0;
        __m512 aj = _mm512_set1_ps(a[j]);
        s0 = _mm512_fmadd_ps(aj, _mm512_maskz_loadu_ps(m[0], x), s0);
        s1 = _mm512_fmadd_ps(aj, _mm512_maskz_loadu_ps(m[1], x + 16), s1);
        s2 = _mm512_fmadd_ps(aj, _mm512_maskz_loadu_ps(m[2], x + 32), s2);
        s3 = _mm512_fmadd_ps(aj, _mm512_maskz_loadu_ps(m[3], x + 48), s3);
    }
    _mm512_mask_storeu_ps(out + c0, m[0], s0);
    _mm512_mask_storeu_ps(out + c0 + 16, m[1], s1);
    _mm512_mask_storeu_ps(out + c0 + 32, m[2], s2);
    _mm512_mask_storeu_ps(out + c0 + 48, m[3], s3);
#else
    float* o = out + c0;
    for (int64_t c = 0; c < w; c++) o[c] = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        const float* x = W + ix[j] * d + c0;
        float aj = a[j];
#pragma omp simd
        for (int64_t c = 0; c < w; c++) o[c] += aj * x[c];
    }
#endif
}

/* The sparse decode out[i] = sum_j v[i, j] * W[idx[i, j]] (n x k entries, W [F, d]), j in order.
 * Its gathers read random rows of W. Where a block of at least DECODE_MIN_BLOCK of W's columns fits
 * in half of L2, it goes block by block, so that the gathers hit L2 (measured 1.5-1.8x faster than
 * whole rows from L3 at 2-5k latents on a 2-core Xeon); else whole rows, the next vector's prefetched.
 * l2: the L2 size to plan for in bytes (0: this machine's). */
#define DECODE_MIN_BLOCK 48
void mlsae_decode(const float* v, const int64_t* idx, const float* W, int64_t n, int64_t k, int64_t d, int64_t F,
                  float* out, int64_t l2, int nthreads) {
    int64_t block = (l2 > 0 ? l2 : l2_bytes()) / 2 / (F * (int64_t)sizeof(float)) / 16 * 16;
    int blocked = block >= DECODE_MIN_BLOCK && block < d;
    if (!blocked) block = d;
    for (int64_t b0 = 0; b0 < d; b0 += block) {
        int64_t b1 = b0 + block < d ? b0 + block : d;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const int64_t* ix = idx + i * k;
            if (!blocked && i + 1 < n)
                for (int64_t j = 0; j < k; j++) prefetch_row(W + ix[k + j] * d, d);
            for (int64_t c0 = b0; c0 < b1; c0 += 64)
                weighted_rows64(out + i * d, v + i * k, ix, W, d, c0, b1 - c0 < 64 ? b1 - c0 : 64, k);
        }
    }
}

/* out[i, j] = <W[idx[i, j]], G[i]>: the gradient of a sparse decode with respect to its values. */
void mlsae_gather_dot(const int64_t* idx, const float* W, const float* G, int64_t n, int64_t k,
                      int64_t d, float* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float* g = G + i * d;
        for (int64_t j = 0; j < k; j++) {
            const float* row = W + idx[i * k + j] * d;
            if (i * k + j + PREFETCH < n * k) prefetch_row(W + idx[i * k + j + PREFETCH] * d, d);
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t c = 0; c < d; c++) s += row[c] * g[c];
            out[i * k + j] = s;
        }
    }
}

/* g[f] -= <g[f], w[f]> * w[f] for each of F rows of length d: removes from a decoder gradient
 * its component along each (unit) decoder row, in one pass instead of PyTorch's three. */
void mlsae_project_rows(float* g, const float* w, int64_t F, int64_t d, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t f = 0; f < F; f++) {
        float* gf = g + f * d;
        const float* wf = w + f * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < d; c++) dot += gf[c] * wf[c];
#pragma omp simd
        for (int64_t c = 0; c < d; c++) gf[c] -= dot * wf[c];
    }
}

/* Per-row standardization of x [n, d]: mean[i], sq_norm[i] = |x[i] - mean|^2,
 * scale[i] = sqrt(sq_norm / (d - 1)) + eps, z[i] = (x[i] - mean) / scale (two-pass, like
 * PyTorch's std, with the row in L1 between the passes); with low (not NULL), also
 * low[i] = bf16(z[i] - shift). */
static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

void mlsae_standardize(const float* x, int64_t n, int64_t d, float eps, float* z, float* mean,
                       float* scale, float* sq_norm, const float* shift, uint16_t* low, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float* xi = x + i * d;
        float* zi = z + i * d;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < d; c++) s += xi[c];
        float m = s / (float)d, ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t c = 0; c < d; c++) {
            float t = xi[c] - m;
            zi[c] = t;
            ss += t * t;
        }
        float sc = sqrtf(ss / (float)(d > 1 ? d - 1 : 1)) + eps, inv = 1.0f / sc;
#pragma omp simd
        for (int64_t c = 0; c < d; c++) zi[c] *= inv;
        if (low) { /* the encoder's bf16 input, z - shift, in the same pass */
            uint16_t* li = low + i * d;
#pragma omp simd
            for (int64_t c = 0; c < d; c++) li[c] = f32_to_bf16(zi[c] - shift[c]);
        }
        mean[i] = m;
        scale[i] = sc;
        sq_norm[i] = ss;
    }
}

/* err[i] = (dec[i] + b - z[i]) * scale[i], recon[i] = x[i] + err[i] and sq[i] = |err[i]|^2: the
 * raw-space reconstruction and its error, from standardized vectors, in one pass. */
void mlsae_scaled_error(const float* dec, const float* b, const float* z, const float* scale,
                        const float* x, int64_t n, int64_t d, float* err, float* recon, float* sq,
                        int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *di = dec + i * d, *zi = z + i * d, *xi = x + i * d;
        float *ei = err + i * d, *ri = recon + i * d;
        float s = scale[i], acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; c++) {
            float e = (di[c] + b[c] - zi[c]) * s;
            ei[c] = e;
            ri[c] = xi[c] + e;
            acc += e * e;
        }
        sq[i] = acc;
    }
}

/* grad[i] = err[i] * w[i], and grad_b = sum_i grad[i] (per-thread partial sums in partial[],
 * nthreads * d floats, added in thread order: deterministic for a given thread count). */
void mlsae_scaled_error_backward(const float* err, const float* w, int64_t n, int64_t d,
                                 float* grad, float* grad_b, float* partial, int nthreads) {
    memset(partial, 0, sizeof(float) * nthreads * d);
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num();
        float* pb = partial + t * d;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const float* ei = err + i * d;
            float* gi = grad + i * d;
            float wi = w[i];
#pragma omp simd
            for (int64_t c = 0; c < d; c++) {
                float g = ei[c] * wi;
                gi[c] = g;
                pb[c] += g;
            }
        }
    }
    memset(grad_b, 0, sizeof(float) * d);
    for (int t = 0; t < nthreads; t++)
        for (int64_t c = 0; c < d; c++) grad_b[c] += partial[t * d + c];
}

/* A tile of an int8 ranking product as upper bounds of fp32 scores (mlsae.kernels._encode_mixed):
 * out[i, j] = a + err + (|a| + err) 2^-20, where a = P[i, j] su[i] sw[j] (the int32 sums of the
 * int8 product, dequantized) and err = ea[i] wn[j] + eb[i] dn[j] bounds a's distance from the fp32
 * score; the last term covers the rounding of this sum, so that out never lies below a + err. */
void mlsae_int8_bounds(const int32_t* P, int64_t n, int64_t cols, const float* su, const float* sw,
                       const float* ea, const float* eb, const float* wn, const float* dn, float* out,
                       int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const int32_t* p = P + i * cols;
        float* o = out + i * cols;
        float s = su[i], a_err = ea[i], b_err = eb[i];
#pragma omp simd
        for (int64_t j = 0; j < cols; j++) {
            float a = (float)p[j] * (s * sw[j]);
            float err = a_err * wn[j] + b_err * dn[j];
            o[j] = a + err + (fabsf(a) + err) * 0x1p-20f;
        }
    }
}

/* Exact fp32 TopK from the candidates of a bf16 or int8 product. Row r: cv/ci[r] hold the K
 * largest values of that product and their latents, where each value is an upper bound: the
 * low-precision score plus err = ea[r] wn[f] + eb[r] dn[f], a bound on its distance from the
 * fp32 score <u[r], W[f]> (added by two appended columns of the bf16 operands, or by
 * mlsae_int8_bounds; mlsae.kernels._encode_mixed), and a bf16 output is rounded (2^-7 of its
 * size). So a bound value c of latent f has the fp32 value within [c - 2^-7 |c| - 2 err,
 * c + 2^-7 |c|]. The candidates that may be in the fp32 TopK
 * (upper bound >= the k-th largest lower bound) get their fp32 values <u[r], W[f]>, and the k
 * largest are kept (ReLU'd) in out_v/out_i. A latent outside the candidates has a bound value
 * <= the smallest candidate's, so if that one's upper bound is below the k-th fp32 value (or
 * K == F) the row is exact; otherwise flag[r] = 1 and the row is left to the caller. Returns the
 * number of flagged rows. */
static inline float upper(float c) { return c + fabsf(c) * 0x1p-7f; }

int64_t mlsae_rescore(const float* cv, const int64_t* ci, int64_t n, int64_t K, int64_t k, int64_t F,
                      const float* ea, const float* eb, const float* wn, const float* dn, const float* u,
                      const float* W, int64_t d, float* out_v, int64_t* out_i, uint8_t* flag, int nthreads) {
    int64_t flagged = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : flagged)
    {
        float* wv = malloc(sizeof(float) * 2 * PAD16(K));
        int64_t* wi = malloc(sizeof(int64_t) * K);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            const float* v = cv + r * K;
            const int64_t* c = ci + r * K;
            for (int64_t j = 0; j < K; j++) { /* lower bounds; (1 + 2^-20): the rounding of err */
                int64_t f = c[j]; /* no candidate (a NaN row): no bound, the row is flagged */
                float err = f >= 0 && f < F ? (ea[r] * wn[f] + eb[r] * dn[f]) * (1.0f + 0x1p-20f) : NAN;
                wv[j] = v[j] - fabsf(v[j]) * 0x1p-7f - 2.0f * err;
            }
            float floor_k = K <= RANK_MAX ? select_by_rank(wv, NULL, K, k, NULL, NULL) /* the fp32 */
                                          : (select_largest(wv, NULL, K, k), min_of(wv, k)); /* k-th >= */
            const float* ur = u + r * d;
            int64_t m = 0;
            for (int64_t j = 0; j < K; j++) {
                if (!(upper(v[j]) >= floor_k)) continue;
                const float* w = W + c[j] * d;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t q = 0; q < d; q++) dot += ur[q] * w[q];
                wv[m] = dot;
                wi[m] = c[j];
                m++;
            }
            float kth;
            if (m < k || !(floor_k == floor_k)) {
                kth = NAN;
            } else if (m <= RANK_MAX) {
                kth = select_by_rank(wv, wi, m, k, out_v + r * k, out_i + r * k);
            } else {
                select_largest(wv, wi, m, k);
                memcpy(out_v + r * k, wv, sizeof(float) * k);
                memcpy(out_i + r * k, wi, sizeof(int64_t) * k);
                kth = min_of(wv, k);
            }
            flag[r] = !(kth == kth) || !(K == F || upper(min_of(v, K)) < kth);
            flagged += flag[r];
            for (int64_t t = 0; t < k; t++) out_v[r * k + t] = out_v[r * k + t] > 0.0f ? out_v[r * k + t] : 0.0f;
        }
        free(wv);
        free(wi);
    }
    return flagged;
}
