// Attention of one (token, head) pair over a KV cache, written once against a SIMD traits class S
// and compiled per instruction set (isa_*.cpp). Internal linkage only.
//
// A token at position p of slot s reads the keys at positions [max(0, p - window + 1), p] of its
// slot (all of [0, p] for a global layer). A global layer's keys are all in the cache (the op
// writes the step's keys first). A sliding layer keeps a ring of `cap` entries (position % cap);
// its step reads positions older than the slot's first position in this step from the ring and
// the rest from the step's own keys, which are written to the ring only after every token read.
//
// Arithmetic: scores = (q * scale) . k in float (under llama.cpp numerics, with an f16 cache, q * scale
// rounded to f16, or with scale_scores q rounded unscaled and the score scaled, as llama.cpp's graphs
// for llama / qwen do it in the softmax), softmax with a double sum as ggml's (exp(s - max) / sum), probabilities
// rounded to f16 under llama.cpp numerics, then sum_j p_j v_j in float.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "layout.h"

namespace {

template <class S>
static inline float dot_row(const float* q, const uint8_t* krow, int f16, int64_t hd) {
  using VF = typename S::VF;
  constexpr int L = S::LANES;
  VF acc = S::zerof();
  int64_t d = 0;
  for (; d + L <= hd; d += L) {
    const VF k = f16 ? S::f16(krow + 2 * d) : S::loadf((const float*)krow + d);
    acc = S::fma(S::loadf(q + d), k, acc);
  }
  float s = S::hsum(acc);
  for (; d < hd; ++d) s += q[d] * (f16 ? ts::f16_to_f32(ts::rd16(krow + 2 * d)) : ((const float*)krow)[d]);
  return s;
}

template <class S>
static inline void axpy_row(float* acc, float p, const uint8_t* vrow, int f16, int64_t hd) {
  using VF = typename S::VF;
  constexpr int L = S::LANES;
  const VF pv = S::setf(p);
  int64_t d = 0;
  for (; d + L <= hd; d += L) {
    const VF v = f16 ? S::f16(vrow + 2 * d) : S::loadf((const float*)vrow + d);
    S::storef(acc + d, S::fma(pv, v, S::loadf(acc + d)));
  }
  for (; d < hd; ++d) acc[d] += p * (f16 ? ts::f16_to_f32(ts::rd16(vrow + 2 * d)) : ((const float*)vrow)[d]);
}

static inline float round16(float x) { return ts::f16_to_f32(ts::f32_to_f16(x)); }

// dst[i] = src[i] * mul, rounded to f16 when r16 (vectorized; a scalar tail)
template <class S>
static inline void scale_round(float* dst, const float* src, float mul, int r16, int64_t n) {
  constexpr int L = S::LANES;
  const typename S::VF m = S::setf(mul);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    typename S::VF v = S::mul(S::loadf(src + i), m);
    S::storef(dst + i, r16 ? S::round16(v) : v);
  }
  for (; i < n; ++i) dst[i] = r16 ? round16(src[i] * mul) : src[i] * mul;
}

template <class S>
static void attend_items(const ts::AttnArgs& a, int64_t i0, int64_t i1, int thread) {
  using VF = typename S::VF;
  constexpr int L = S::LANES;
  const int64_t hd = a.hd, esz = a.cache_f16 ? 2 : 4;
  const int64_t row_bytes = a.KH * hd * esz;                 // one position of the cache, all KV heads
  float* scores = a.scratch + (int64_t)thread * a.scratch_stride;
  float* qs = scores + (a.scratch_stride - 2 * hd);          // the scaled query
  float* tmp = qs + hd;                                      // a new key / value rounded like the cache
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t t = a.tokens[it / a.H], h = it % a.H, kh = a.kv_of_q[h];
    const int64_t p = a.pos[t], sl = a.slot[t];
    const float* qrow = a.q + (t * a.H + h) * hd;
    scale_round<S>(qs, qrow, a.scale_scores ? 1.0f : a.scale, a.round16, hd);
    const float score_scale = a.scale_scores ? a.scale : 1.0f;
    const int64_t lo = a.window ? (p - a.window + 1 > 0 ? p - a.window + 1 : 0) : 0;
    const int64_t p0 = a.window ? a.pos[a.first[t]] : p + 1;  // positions >= p0 come from the step (rings)
    const uint8_t* kbase = (const uint8_t*)a.k_cache + sl * a.cap * row_bytes + kh * hd * esz;
    const uint8_t* vbase = (const uint8_t*)a.v_cache + sl * a.cap * row_bytes + kh * hd * esz;
    const int64_t nk = p - lo + 1;
    // scores
    float mx = -INFINITY;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t pj = lo + j;
      float s;
      if (pj < p0) {
        const int64_t idx = a.window ? pj % a.cap : pj;
        s = dot_row<S>(qs, kbase + idx * row_bytes, a.cache_f16, hd);
      } else {                                                // this step's key, rounded as the cache stores it
        const float* kn = a.k_new + ((a.first[t] + (pj - p0)) * a.KH + kh) * hd;
        scale_round<S>(tmp, kn, 1.0f, a.cache_f16, hd);
        s = dot_row<S>(qs, (const uint8_t*)tmp, 0, hd);
      }
      s *= score_scale;
      scores[j] = s;
      mx = s > mx ? s : mx;
    }
    // softmax: exp(s - max), summed in double as ggml does; a sink counts in the max and the sum only
    const float sink = a.sinks ? a.sinks[h] : -INFINITY;
    if (a.sinks) mx = sink > mx ? sink : mx;
    double sum = 0.0;
    int64_t j = 0;
    for (; j + L <= nk; j += L) {
      const VF e = S::exp_neg(S::add(S::loadf(scores + j), S::setf(-mx)));
      S::storef(scores + j, e);
    }
    for (; j < nk; ++j) scores[j] = expf(scores[j] - mx);
    for (j = 0; j < nk; ++j) sum += scores[j];
    if (a.sinks) sum += (double)expf(sink - mx);
    scale_round<S>(scores, scores, (float)(1.0 / sum), a.round16, nk);   // the probabilities
    // output
    float* o = a.out + (t * a.H + h) * hd;
    for (int64_t d = 0; d < hd; ++d) o[d] = 0.0f;
    for (j = 0; j < nk; ++j) {
      const float pr = scores[j];
      const int64_t pj = lo + j;
      if (pj < p0) {
        const int64_t idx = a.window ? pj % a.cap : pj;
        axpy_row<S>(o, pr, vbase + idx * row_bytes, a.cache_f16, hd);
      } else {
        const float* vn = a.v_new + ((a.first[t] + (pj - p0)) * a.KH + kh) * hd;
        scale_round<S>(tmp, vn, 1.0f, a.cache_f16, hd);
        axpy_row<S>(o, pr, (const uint8_t*)tmp, 0, hd);
      }
    }
  }
}

}  // namespace
