// Attention of one (token, head) pair over a KV cache, written once against a SIMD traits class S
// and compiled per instruction set (isa_*.cpp). Internal linkage only.
//
// A token at position p of slot s reads the keys at positions [max(0, p - window + 1), p] of its
// slot (all of [0, p] for a global layer). A global layer's keys are all in the cache (the op
// writes the step's keys first). A sliding layer keeps a ring of `cap` entries (position % cap);
// its step reads positions older than the slot's first position in this step from the ring and
// the rest from the step's own keys, which are written to the ring only after every token read.
//
// The cache holds one of kv_cache.h's types (f32, f16, bf16, q8_0, q4_0), the keys' and the values' each
// their own; a row is converted to float as it is read, and a step's own keys are rounded as the cache
// stores them.
//
// Arithmetic: scores = (q * scale) . k in float (under llama.cpp numerics, with an f16 cache, q * scale
// rounded to f16, or with scale_scores q rounded unscaled and the score scaled, as llama.cpp's graphs
// for llama / qwen do it in the softmax), softmax with a double sum as ggml's (exp(s - max) / sum), probabilities
// rounded to f16 under llama.cpp numerics, then sum_j p_j v_j in float.
// Decode steps split the positions into chunks of a fixed length (AttnArgs::chunk), so that the threads
// share one head's positions at depth: phase 1 gives each chunk its max and its sum of exp(s - max), the
// op merges them in chunk order (the global max m; the sum l = sum_c l_c exp(m_c - m); each chunk's
// factor exp(m_c - m) / l), phase 2 weights the values, and the chunks' outputs are added in chunk order.
// The chunks do not depend on the thread count, and neither do the bits. With one chunk (positions <=
// chunk) this is the single pass exp(s - max) / sum exactly.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "kv_cache.h"
#include "layout.h"

namespace {

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

constexpr int64_t MAX_HEAD_DIM = 512;     // the op refuses more (a step's own row is encoded on the stack)

// The keys a token reads, position pj of [lo, p]: from the cache (a row of `type`), or this step's own
// (rounded as the cache stores them, into tmp as float32). Returns the row and sets *as to its type.
static inline const uint8_t* key_or_value(const ts::AttnArgs& a, const float* fresh, const uint8_t* base, int type,
                                          int64_t t, int64_t kh, int64_t pj, int64_t p0, int64_t row_bytes,
                                          float* tmp, int* as) {
  if (pj < p0) {
    *as = type;
    return base + (a.window ? pj % a.cap : pj) * row_bytes;
  }
  const float* src = fresh + ((a.first[t] + (pj - p0)) * a.KH + kh) * a.hd;
  uint8_t enc[4 * MAX_HEAD_DIM];
  ts::kv_round_trip(src, a.hd, type, enc, tmp);
  *as = ts::KV_F32;
  return (const uint8_t*)tmp;
}

// A row of hd values of a cache type as float32 into dst.
template <class S>
static inline void row_to_float(float* dst, const uint8_t* src, int type, int64_t hd) {
  constexpr int L = S::LANES;
  int64_t d = 0;
  switch (type) {
    case ts::KV_F32: memcpy(dst, src, (size_t)hd * sizeof(float)); return;
    case ts::KV_F16:
      for (; d + L <= hd; d += L) S::storef(dst + d, S::f16(src + 2 * d));
      for (; d < hd; ++d) dst[d] = ts::f16_to_f32(ts::rd16(src + 2 * d));
      return;
    case ts::KV_BF16:
      for (; d + L <= hd; d += L) S::storef(dst + d, S::bf16(src + 2 * d));
      for (; d < hd; ++d) dst[d] = ts::bf16_to_f32(ts::rd16(src + 2 * d));
      return;
    default: break;
  }
  // blocks of 32: code * d, each product rounded once as kv_decode_row's
  const int64_t bb = type == ts::KV_Q8_0 ? 34 : 18;
  for (int64_t b = 0; b < hd / ts::KV_QK; ++b) {
    const uint8_t* blk = src + b * bb;
    const typename S::VF dv = S::setf(ts::f16_to_f32(ts::rd16(blk)));
    int8_t codes[ts::KV_QK];
    const uint8_t* q = blk + 2;
    if (type == ts::KV_Q4_0) {
      for (int j = 0; j < ts::KV_QK / 2; ++j) {
        codes[j] = (int8_t)((blk[2 + j] & 15) - 8);
        codes[j + 16] = (int8_t)((blk[2 + j] >> 4) - 8);
      }
      q = (const uint8_t*)codes;
    }
    for (int j = 0; j < ts::KV_QK; j += L) S::storef(dst + b * ts::KV_QK + j, S::mul(S::i8f(q + j), dv));
  }
}

// What a unit covers: its token t (of slot sl, at position p), KV head kh, the positions [lo, p] the token
// reads and of them the chunk's [lo + j0, lo + j1); positions >= p0 come from the step itself; the q heads
// group_heads[h0 .. h0 + g) of the KV head's group.
struct UnitSpan {
  int64_t ti, t, kh, p, sl, lo, p0, j0, j1, h0, g;
};

static inline UnitSpan unit_span(const ts::AttnArgs& a, int64_t u) {
  const ts::AttnUnit& un = a.units[u];
  UnitSpan s;
  s.ti = un.ti; s.t = a.tokens[un.ti]; s.kh = un.kh;
  s.p = a.pos[s.t]; s.sl = a.slot[s.t];
  s.lo = a.window ? (s.p - a.window + 1 > 0 ? s.p - a.window + 1 : 0) : 0;
  s.p0 = a.window ? a.pos[a.first[s.t]] : s.p + 1;
  const int64_t nk = s.p - s.lo + 1;
  s.j0 = un.c * a.chunk;
  s.j1 = s.j0 + a.chunk < nk ? s.j0 + a.chunk : nk;
  s.h0 = a.group_start[un.kh];
  s.g = a.group_start[un.kh + 1] - s.h0;
  return s;
}

// Phase 1 of a decode step's attention, per unit (token, KV head, chunk of positions): for each q head of
// the KV head's group, the scores of the chunk's positions, their max, e_j = exp(s_j - max) and their sum
// in double. The chunk's keys are converted once for the whole group into a transposed float block
// kt[d][j], so that one vector holds the scores of L positions: s_j = sum of q_d k_jd in 8 partial sums
// (d mod 8, fused multiply-adds) added as a tree, with no horizontal sum.
template <class S>
static void attend_scores(const ts::AttnArgs& a, int64_t u0, int64_t u1, int thread) {
  using VF = typename S::VF;
  constexpr int L = S::LANES;
  const int64_t hd = a.hd, head_bytes = ts::kv_row_bytes(a.k_type, hd), row_bytes = a.KH * head_bytes;
  // positions per row of kt: whole vectors, and one more so that the rows are not a power of two apart
  // (a 1 KiB stride maps every row to the same few L1 sets)
  const int64_t stride = (a.chunk + L - 1) / L * L + L;
  float* qs = a.scratch + (int64_t)thread * a.scratch_stride;      // the group's scaled queries (g, hd)
  float* krow = qs + a.H * hd;                                      // one key, as float
  float* tmp = krow + hd;
  float* kt = tmp + hd;                                             // (hd, stride)
  float lanes[64];                                                 // one vector of scores (L <= 64)
  for (int64_t u = u0; u < u1; ++u) {
    const UnitSpan us = unit_span(a, u);
    const int64_t ti = us.ti, t = us.t, kh = us.kh, sl = us.sl, lo = us.lo, p0 = us.p0, j0 = us.j0, j1 = us.j1;
    const int64_t h0 = us.h0, g = us.g, c = a.units[u].c;
    const int64_t n = j1 - j0, nv = (n + L - 1) / L * L;
    for (int64_t i = 0; i < g; ++i) {
      const int64_t h = a.group_heads[h0 + i];
      scale_round<S>(qs + i * hd, a.q + (t * a.H + h) * hd, a.scale_scores ? 1.0f : a.scale, a.round16, hd);
    }
    const float score_scale = a.scale_scores ? a.scale : 1.0f;
    const uint8_t* kbase = (const uint8_t*)a.k_cache + sl * a.cap * row_bytes + kh * head_bytes;
    for (int64_t jj = 0; jj < nv; ++jj) {
      if (jj < n) {
        int as;
        const uint8_t* k = key_or_value(a, a.k_new, kbase, a.k_type, t, kh, lo + j0 + jj, p0, row_bytes, tmp, &as);
        row_to_float<S>(krow, k, as, hd);
        for (int64_t d = 0; d < hd; ++d) kt[d * stride + jj] = krow[d];
      } else {
        for (int64_t d = 0; d < hd; ++d) kt[d * stride + jj] = 0.0f;   // lanes past the chunk: read, unused
      }
    }
    for (int64_t i = 0; i < g; ++i) {
      const int64_t h = a.group_heads[h0 + i];
      float* sc = a.sbuf + a.soff[ti * a.H + h];
      const float* qh = qs + i * hd;
      for (int64_t jb = 0; jb < nv; jb += L) {
        // 8 partial sums (d mod 8), added as a tree: the rounding of an 8-lane dot and its horizontal sum
        VF part[8];
        for (int r = 0; r < 8; ++r) part[r] = S::zerof();
        for (int64_t d = 0; d < hd; ++d) part[d & 7] = S::fma(S::setf(qh[d]), S::loadf(kt + d * stride + jb), part[d & 7]);
        VF acc = S::add(S::add(S::add(part[0], part[1]), S::add(part[2], part[3])),
                        S::add(S::add(part[4], part[5]), S::add(part[6], part[7])));
        acc = S::mul(acc, S::setf(score_scale));
        if (jb + L <= n) {
          S::storef(sc + j0 + jb, acc);
        } else {                                                    // the chunk's last, partial vector
          S::storef(lanes, acc);
          for (int64_t e = 0; e < n - jb; ++e) sc[j0 + jb + e] = lanes[e];
        }
      }
      float mx = -INFINITY;
      for (int64_t j = j0; j < j1; ++j) mx = sc[j] > mx ? sc[j] : mx;
      // exp(s - max) in vectors from the chunk's start, the tail in expf; summed in double as ggml does
      int64_t j = j0;
      for (; j + L <= j1; j += L) S::storef(sc + j, S::exp_neg(S::add(S::loadf(sc + j), S::setf(-mx))));
      for (; j < j1; ++j) sc[j] = expf(sc[j] - mx);
      double sum = 0.0;
      for (j = j0; j < j1; ++j) sum += sc[j];
      const int64_t ci = a.coff[ti] + h * a.n_chunks[ti] + c;
      a.cmax[ci] = mx;
      a.csum[ci] = sum;
    }
  }
}

// Phase 2, per unit: the probabilities p_j = e_j * factor (the chunk's share of the softmax, merged over
// chunks between the phases), rounded to f16 under llama.cpp numerics, and the chunk's sum_j p_j v_j per q
// head of the group, in position order (fused multiply-adds). The chunk's values are
// converted once for the group; each head's sum stays in registers, a few vectors of it at a time.
template <class S>
static void attend_values(const ts::AttnArgs& a, int64_t u0, int64_t u1, int thread) {
  using VF = typename S::VF;
  constexpr int L = S::LANES, ACC = 4;                              // vectors of a head's sum held at once
  const int64_t hd = a.hd, head_bytes = ts::kv_row_bytes(a.v_type, hd), row_bytes = a.KH * head_bytes;
  float* tmp = a.scratch + (int64_t)thread * a.scratch_stride + a.H * hd + hd;
  float* vb = tmp + hd;                                             // (chunk, hd): the chunk's values
  for (int64_t u = u0; u < u1; ++u) {
    const UnitSpan us = unit_span(a, u);
    const int64_t ti = us.ti, t = us.t, kh = us.kh, sl = us.sl, lo = us.lo, p0 = us.p0, j0 = us.j0, j1 = us.j1;
    const int64_t h0 = us.h0, g = us.g, c = a.units[u].c;
    const int64_t n = j1 - j0;
    const uint8_t* vbase = (const uint8_t*)a.v_cache + sl * a.cap * row_bytes + kh * head_bytes;
    for (int64_t jj = 0; jj < n; ++jj) {
      int as;
      const uint8_t* v = key_or_value(a, a.v_new, vbase, a.v_type, t, kh, lo + j0 + jj, p0, row_bytes, tmp, &as);
      row_to_float<S>(vb + jj * hd, v, as, hd);
    }
    for (int64_t i = 0; i < g; ++i) {
      const int64_t h = a.group_heads[h0 + i];
      const int64_t ci = a.coff[ti] + h * a.n_chunks[ti] + c;
      float* pr = a.sbuf + a.soff[ti * a.H + h] + j0;
      scale_round<S>(pr, pr, a.factor[ci], a.round16, n);
      float* o = a.opart + ci * hd;
      int64_t d = 0;
      for (; d + ACC * L <= hd; d += ACC * L) {
        VF acc[ACC];
        for (int r = 0; r < ACC; ++r) acc[r] = S::zerof();
        for (int64_t jj = 0; jj < n; ++jj) {
          const VF pv = S::setf(pr[jj]);
          const float* vr = vb + jj * hd + d;
          for (int r = 0; r < ACC; ++r) acc[r] = S::fma(pv, S::loadf(vr + r * L), acc[r]);
        }
        for (int r = 0; r < ACC; ++r) S::storef(o + d + r * L, acc[r]);
      }
      for (; d + L <= hd; d += L) {
        VF acc = S::zerof();
        for (int64_t jj = 0; jj < n; ++jj) acc = S::fma(S::setf(pr[jj]), S::loadf(vb + jj * hd + d), acc);
        S::storef(o + d, acc);
      }
      for (; d < hd; ++d) {
        float acc = 0.0f;
        for (int64_t jj = 0; jj < n; ++jj) acc += pr[jj] * vb[jj * hd + d];
        o[d] = acc;
      }
    }
  }
}

}  // namespace
