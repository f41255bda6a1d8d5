// A decode step's attention over a KV cache, written once against 8-lane SIMD traits (S::F8) and compiled
// per instruction set (isa_*.cpp). Internal linkage only.
//
// A token at position p of slot s reads the keys at positions [max(0, p - window + 1), p] of its
// slot (all of [0, p] for a global layer). A global layer's keys are all in the cache (the op
// writes the step's keys first). A sliding layer keeps a ring of `cap` entries (position % cap);
// its step reads positions older than the slot's first position in this step from the ring and
// the rest from the step's own keys, which are written to the ring only after every token read.
//
// The cache holds one of kv_cache.h's types (f32, f16, bf16, q8_0, q4_0), the keys' and the values' each
// their own, read in place: a unit converts ATTN_SUB rows at a time into its scratch, and a step's own
// keys are rounded as the cache stores them.
//
// Arithmetic of a score:
// - float keys: s = (q * scale) . k in float (under llama.cpp numerics, q * scale rounded to f16, or with
//   scale_scores q rounded unscaled and the score scaled, as llama.cpp's graphs for llama / qwen do it in
//   the softmax); 8 partial sums (d mod 8, fused multiply-adds in d order) added as the tree
//   ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)).
// - q8_0 / q4_0 keys under llama.cpp numerics (int_dot): q (scaled as above, not rounded) quantized to q8_0
//   as llama.cpp's flash attention does; per block of 32 the exact integer dot, and the score
//   s = sum over blocks of fma(isum_b, d_k * d_q, s) in block order, times the softmax scale.
// Softmax with a double sum (exp(s - max) / sum), probabilities rounded to f16 under llama.cpp numerics,
// then sum_j p_j v_j in float, fused multiply-adds in position order.
//
// Decode steps split the positions into chunks of ATTN_CHUNK, so that the threads share one head's
// positions at depth: phase 1 gives each chunk its max and its sum of exp(s - max), the op merges them in
// chunk order (the global max m; the sum l = sum_c l_c exp(m_c - m); each chunk's factor
// exp(m_c - m) / l), phase 2 weights the values, and the chunks' outputs are added in chunk order. The
// chunks do not depend on the thread count, and neither do the bits; neither do they depend on the
// instruction set's vector width (every ISA runs these 8-lane kernels).
//
// Speed: one vector holds 8 dot products, (positions x heads of the KV head's group) as the group's size
// allows, so a key row converted once serves the whole group from L1, and no dot product needs a
// horizontal sum of its own.
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
template <class V>
static inline void scale_round(float* dst, const float* src, float mul, int r16, int64_t n) {
  const typename V::VF m = V::setf(mul);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    typename V::VF v = V::mul(V::loadf(src + i), m);
    V::storef(dst + i, r16 ? V::round16(v) : v);
  }
  for (; i < n; ++i) dst[i] = r16 ? round16(src[i] * mul) : src[i] * mul;
}

constexpr int64_t MAX_HEAD_DIM = 512;     // the op refuses more (a step's own row is encoded on the stack)

// One thread's scratch (kernels.h attn_scratch_floats): rows of hdp floats (hd padded with zeros to whole
// vectors) or of hd codes, nb = hd / 32 scales per row.
struct Scratch {
  float* qs;       // (H, hdp) the group's queries, scaled (and rounded) for float keys
  int8_t* qq;      // (H, hd) their q8_0 codes, for int_dot
  float* qd;       // (H, nb) and block scales
  float* kb;       // (ATTN_SUB, hdp) a sub-block of keys or values as float
  int8_t* kq;      // (ATTN_SUB, hd) a sub-block of keys' codes (q4_0 unpacked to values - 8), for int_dot
  float* kd;       // (ATTN_SUB, nb) and their block scales
  float* row;      // (hdp,) a step's own row as float
  uint8_t* enc;    // (4 * hdp bytes) a row encoded as the cache stores it
};

static inline Scratch carve(const ts::AttnArgs& a, int thread) {
  const int64_t hdp = ts::attn_padded(a.hd), nb = a.hd / 32 + 1;
  float* p = a.scratch + (int64_t)thread * a.scratch_stride;
  Scratch s;
  s.qs = p; p += a.H * hdp;
  s.qq = (int8_t*)p; p += (a.H * a.hd + 3) / 4;
  s.qd = p; p += a.H * nb;
  s.kb = p; p += ts::ATTN_SUB * hdp;
  s.kq = (int8_t*)p; p += (ts::ATTN_SUB * a.hd + 3) / 4;
  s.kd = p; p += ts::ATTN_SUB * nb;
  s.row = p; p += hdp;
  s.enc = (uint8_t*)p;
  return s;
}

// The row a token reads at position pj (of [lo, p]): from the cache (a row of `type`), or, at or after the
// slot's first position in this step p0, this step's own, encoded into enc as the cache stores it.
static inline const uint8_t* stored_row(const ts::AttnArgs& a, const float* fresh, const uint8_t* base, int type,
                                        int64_t t, int64_t kh, int64_t pj, int64_t p0, int64_t row_bytes,
                                        uint8_t* enc) {
  if (pj < p0) return base + (a.window ? pj % a.cap : pj) * row_bytes;
  ts::kv_encode_row(fresh + ((a.first[t] + (pj - p0)) * a.KH + kh) * a.hd, a.hd, type, enc);
  return enc;
}

// Asks for the cache rows of positions [pj, pj + n) that are older than p0 (the next sub-block's, while
// this one is computed): a unit reads one head's row every KH rows, a stride the hardware's prefetchers
// do not follow far enough ahead at depth.
static inline void prefetch_rows(const ts::AttnArgs& a, const uint8_t* base, int64_t pj, int64_t n, int64_t p0,
                                 int64_t row_bytes, int64_t head_bytes) {
  for (int64_t i = 0; i < n && pj + i < p0; ++i) {
    const uint8_t* r = base + (a.window ? (pj + i) % a.cap : pj + i) * row_bytes;
    for (int64_t o = 0; o < head_bytes; o += 64) __builtin_prefetch(r + o);
  }
}

// A row of hd values of a cache type as float32 into dst, zeros from hd to hdp.
template <class V>
static inline void row_to_float(float* dst, const uint8_t* src, int type, int64_t hd, int64_t hdp) {
  int64_t d = 0;
  switch (type) {
    case ts::KV_F32: memcpy(dst, src, (size_t)hd * sizeof(float)); d = hd; break;
    case ts::KV_F16:
      for (; d + 8 <= hd; d += 8) V::storef(dst + d, V::f16(src + 2 * d));
      for (; d < hd; ++d) dst[d] = ts::f16_to_f32(ts::rd16(src + 2 * d));
      break;
    case ts::KV_BF16:
      for (; d + 8 <= hd; d += 8) V::storef(dst + d, V::bf16(src + 2 * d));
      for (; d < hd; ++d) dst[d] = ts::bf16_to_f32(ts::rd16(src + 2 * d));
      break;
    default: {
      // blocks of 32: code * d, each product rounded once as kv_decode_row's
      const int64_t bb = type == ts::KV_Q8_0 ? 34 : 18;
      for (int64_t b = 0; b < hd / ts::KV_QK; ++b) {
        const uint8_t* blk = src + b * bb;
        const typename V::VF dv = V::setf(ts::f16_to_f32(ts::rd16(blk)));
        int8_t codes[ts::KV_QK];
        const uint8_t* q = blk + 2;
        if (type == ts::KV_Q4_0) {
          V::unpack_q4(blk + 2, codes);
          q = (const uint8_t*)codes;
        }
        for (int j = 0; j < ts::KV_QK; j += 8) V::storef(dst + b * ts::KV_QK + j, V::mul(V::i8f(q + j), dv));
      }
      d = hd;
    }
  }
  for (; d < hdp; ++d) dst[d] = 0.0f;
}

// A q8_0 / q4_0 row as its codes (hd int8: q4_0's values - 8) and its block scales.
template <class V>
static inline void row_to_codes(int8_t* codes, float* scales, const uint8_t* src, int type, int64_t hd) {
  const int64_t bb = type == ts::KV_Q8_0 ? 34 : 18;
  for (int64_t b = 0; b < hd / ts::KV_QK; ++b) {
    const uint8_t* blk = src + b * bb;
    scales[b] = ts::f16_to_f32(ts::rd16(blk));
    if (type == ts::KV_Q8_0) memcpy(codes + b * ts::KV_QK, blk + 2, ts::KV_QK);
    else V::unpack_q4(blk + 2, codes + b * ts::KV_QK);
  }
}

// Positions per vector of 8 dot products for GH heads (1..8): lane l is (position l / GH, head l % GH).
template <int GH> constexpr int positions_per_vector() { return GH >= 8 ? 1 : 8 / GH; }

// NP x GH float dot products of length hdp (a multiple of 8): q rows (GH, stride hdp), key rows (NP, stride
// hdp). The operand with fewer rows stays in registers; the other is read from L1.
template <class V, int NP, int GH>
static inline typename V::VF dots_float(const float* q, const float* k, int64_t hdp) {
  using VF = typename V::VF;
  VF acc[8];
  for (int l = 0; l < 8; ++l) acc[l] = V::zerof();
  for (int64_t d = 0; d < hdp; d += 8) {
    if constexpr (NP <= GH) {
      VF kv[NP];
      for (int p = 0; p < NP; ++p) kv[p] = V::loadf(k + p * hdp + d);
      for (int p = 0; p < NP; ++p)
        for (int h = 0; h < GH; ++h) acc[p * GH + h] = V::fma(V::loadf(q + h * hdp + d), kv[p], acc[p * GH + h]);
    } else {
      VF qv[GH];
      for (int h = 0; h < GH; ++h) qv[h] = V::loadf(q + h * hdp + d);
      for (int p = 0; p < NP; ++p)
        for (int h = 0; h < GH; ++h) acc[p * GH + h] = V::fma(qv[h], V::loadf(k + p * hdp + d), acc[p * GH + h]);
    }
  }
  return V::hsum8(acc);
}

// NP x GH integer dot products: codes (stride hd) and block scales (stride nb) of q and of the keys
template <class V, int NP, int GH>
static inline typename V::VF dots_int(const int8_t* q, const float* qd, const int8_t* k, const float* kd, int64_t hd,
                                      int64_t nb) {
  using VI = typename V::VI;
  typename V::VF acc = V::zerof();
  alignas(32) float s[8];
  for (int l = 0; l < 8; ++l) s[l] = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    VI part[8];
    for (int p = 0; p < NP; ++p)
      for (int h = 0; h < GH; ++h) {
        part[p * GH + h] = V::idot32(k + p * hd + b * ts::KV_QK, q + h * hd + b * ts::KV_QK);
        s[p * GH + h] = kd[p * nb + b] * qd[h * nb + b];
      }
    for (int l = NP * GH; l < 8; ++l) part[l] = V::zeroi();
    acc = V::fma(V::cvt(V::hsum8i(part)), V::loadf(s), acc);
  }
  return acc;
}

// The scores of ns positions (the sub-block's rows 0..ns) for the group's heads i0 .. i0 + GH, into
// sc[i][jj] (sc: per head of the group, its scores from the sub-block's first position)
template <class V, int GH>
static void score_heads(const Scratch& w, bool int_dot, int64_t i0, int64_t ns, int64_t hd, float score_scale,
                        float* const* sc) {
  constexpr int NP = positions_per_vector<GH>();
  const int64_t hdp = ts::attn_padded(hd), nb = hd / ts::KV_QK;
  alignas(32) float lanes[8];
  // a last vector may read rows past ns (the sub-block's buffer holds ATTN_SUB, a multiple of NP); their
  // lanes are not stored
  for (int64_t jj = 0; jj < ns; jj += NP) {
    typename V::VF r = int_dot ? dots_int<V, NP, GH>(w.qq + i0 * hd, w.qd + i0 * nb, w.kq + jj * hd, w.kd + jj * nb, hd, nb)
                               : dots_float<V, NP, GH>(w.qs + i0 * hdp, w.kb + jj * hdp, hdp);
    V::storef(lanes, V::mul(r, V::setf(score_scale)));
    for (int p = 0; p < NP && jj + p < ns; ++p)
      for (int h = 0; h < GH; ++h) sc[i0 + h][jj + p] = lanes[p * GH + h];
  }
}

template <class V>
static void score_group(const Scratch& w, bool int_dot, int64_t g, int64_t ns, int64_t hd, float score_scale,
                        float* const* sc) {
  for (int64_t i0 = 0; i0 < g; i0 += 8) {
    switch (g - i0 < 8 ? g - i0 : 8) {
      case 1: score_heads<V, 1>(w, int_dot, i0, ns, hd, score_scale, sc); break;
      case 2: score_heads<V, 2>(w, int_dot, i0, ns, hd, score_scale, sc); break;
      case 3: score_heads<V, 3>(w, int_dot, i0, ns, hd, score_scale, sc); break;
      case 4: score_heads<V, 4>(w, int_dot, i0, ns, hd, score_scale, sc); break;
      case 5: score_heads<V, 5>(w, int_dot, i0, ns, hd, score_scale, sc); break;
      case 6: score_heads<V, 6>(w, int_dot, i0, ns, hd, score_scale, sc); break;
      case 7: score_heads<V, 7>(w, int_dot, i0, ns, hd, score_scale, sc); break;
      default: score_heads<V, 8>(w, int_dot, i0, ns, hd, score_scale, sc); break;
    }
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

// The stored rows of a unit's sub-block, positions lo + j0 + [s0, s0 + ns) of its KV head, each through
// row(jj, bytes); the next sub-block's cache rows are asked for first.
template <class F>
static inline void sub_block_rows(const ts::AttnArgs& a, const float* fresh, const uint8_t* base, int type,
                                  const UnitSpan& us, int64_t s0, int64_t ns, int64_t row_bytes, int64_t head_bytes,
                                  uint8_t* enc, F&& row) {
  const int64_t pj = us.lo + us.j0 + s0, left = us.j1 - us.j0 - s0 - ns;
  prefetch_rows(a, base, pj + ns, left < ts::ATTN_SUB ? left : ts::ATTN_SUB, us.p0, row_bytes, head_bytes);
  for (int64_t jj = 0; jj < ns; ++jj)
    row(jj, stored_row(a, fresh, base, type, us.t, us.kh, pj + jj, us.p0, row_bytes, enc));
}

// Phase 1 of a decode step's attention, per unit (token, KV head, chunk of positions): for each q head of
// the KV head's group, the scores of the chunk's positions, their max, e_j = exp(s_j - max) and their sum
// in double (8 lanes of partial sums, added as a tree).
template <class S>
static void attend_scores(const ts::AttnArgs& a, int64_t u0, int64_t u1, int thread) {
  using V = typename S::F8;
  using VF = typename V::VF;
  const int64_t hd = a.hd, hdp = ts::attn_padded(hd), nb = hd / ts::KV_QK;
  const int64_t head_bytes = ts::kv_row_bytes(a.k_type, hd), row_bytes = a.KH * head_bytes;
  const Scratch w = carve(a, thread);
  const bool int_dot = a.int_dot;
  float* sc[ts::ATTN_MAX_GROUP];
  alignas(32) float lanes[8];
  for (int64_t u = u0; u < u1; ++u) {
    const UnitSpan us = unit_span(a, u);
    const int64_t ti = us.ti, t = us.t, kh = us.kh, j0 = us.j0, j1 = us.j1;
    const int64_t h0 = us.h0, g = us.g, c = a.units[u].c, n = j1 - j0;
    const float q_mul = a.scale_scores ? 1.0f : a.scale, score_scale = a.scale_scores ? a.scale : 1.0f;
    for (int64_t i = 0; i < g; ++i) {
      const int64_t h = a.group_heads[h0 + i];
      const float* qh = a.q + (t * a.H + h) * hd;
      if (int_dot) {
        scale_round<V>(w.row, qh, q_mul, 0, hd);
        ts::kv_encode_row(w.row, hd, ts::KV_Q8_0, w.enc);
        row_to_codes<V>(w.qq + i * hd, w.qd + i * nb, w.enc, ts::KV_Q8_0, hd);
      } else {
        scale_round<V>(w.qs + i * hdp, qh, q_mul, a.round16, hd);
        for (int64_t d = hd; d < hdp; ++d) w.qs[i * hdp + d] = 0.0f;
      }
    }
    const uint8_t* kbase = (const uint8_t*)a.k_cache + us.sl * a.cap * row_bytes + kh * head_bytes;
    for (int64_t s0 = 0; s0 < n; s0 += ts::ATTN_SUB) {
      const int64_t ns = n - s0 < ts::ATTN_SUB ? n - s0 : ts::ATTN_SUB;
      sub_block_rows(a, a.k_new, kbase, a.k_type, us, s0, ns, row_bytes, head_bytes, w.enc,
                     [&](int64_t jj, const uint8_t* k) {
                       if (int_dot) row_to_codes<V>(w.kq + jj * hd, w.kd + jj * nb, k, a.k_type, hd);
                       else row_to_float<V>(w.kb + jj * hdp, k, a.k_type, hd, hdp);
                     });
      for (int64_t i = 0; i < g; ++i) sc[i] = a.sbuf + a.soff[ti * a.H + a.group_heads[h0 + i]] + j0 + s0;
      score_group<V>(w, int_dot, g, ns, hd, score_scale, sc);
    }
    for (int64_t i = 0; i < g; ++i) {
      const int64_t h = a.group_heads[h0 + i];
      float* s = a.sbuf + a.soff[ti * a.H + h];
      int64_t j = j0;
      VF vm = V::setf(-INFINITY);
      for (; j + 8 <= j1; j += 8) vm = V::maxf(vm, V::loadf(s + j));
      V::storef(lanes, vm);
      float mx = -INFINITY;
      for (int l = 0; l < 8; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
      for (; j < j1; ++j) mx = s[j] > mx ? s[j] : mx;
      // exp(s - max) in vectors from the chunk's start, the tail in expf; summed in double in 8 lanes
      typename V::VD sum = V::zerod();
      const VF neg = V::setf(-mx);
      for (j = j0; j + 8 <= j1; j += 8) {
        const VF e = V::exp_neg(V::add(V::loadf(s + j), neg));
        V::storef(s + j, e);
        sum = V::addd(sum, V::to_d(e));
      }
      for (int l = 0; l < 8; ++l) lanes[l] = 0.0f;
      for (int l = 0; j < j1; ++j, ++l) lanes[l] = s[j] = expf(s[j] - mx);
      sum = V::addd(sum, V::to_d(V::loadf(lanes)));
      const int64_t ci = a.coff[ti] + h * a.n_chunks[ti] + c;
      a.cmax[ci] = mx;
      a.csum[ci] = V::hsumd(sum);
    }
  }
}

// o[0 .. 8R) (+)= sum over the sub-block's ns positions of p_j v_j (rows of vb, stride hdp), in position order
template <class V, int R>
static inline void weigh(float* o, const float* p, const float* vb, int64_t hdp, int64_t ns, bool first) {
  typename V::VF acc[R];
  for (int r = 0; r < R; ++r) acc[r] = first ? V::zerof() : V::loadf(o + 8 * r);
  for (int64_t jj = 0; jj < ns; ++jj) {
    const typename V::VF pv = V::setf(p[jj]);
    for (int r = 0; r < R; ++r) acc[r] = V::fma(pv, V::loadf(vb + jj * hdp + 8 * r), acc[r]);
  }
  for (int r = 0; r < R; ++r) V::storef(o + 8 * r, acc[r]);
}

// Phase 2, per unit: the probabilities p_j = e_j * factor (the chunk's share of the softmax, merged over
// chunks between the phases), rounded to f16 under llama.cpp numerics, and the chunk's sum_j p_j v_j per q
// head of the group. The values are converted a sub-block at a time for the group; a head's sum stays in
// registers, up to 64 floats of it at a time.
template <class S>
static void attend_values(const ts::AttnArgs& a, int64_t u0, int64_t u1, int thread) {
  using V = typename S::F8;
  const int64_t hd = a.hd, hdp = ts::attn_padded(hd), hd8 = hd / 8 * 8;
  const int64_t head_bytes = ts::kv_row_bytes(a.v_type, hd), row_bytes = a.KH * head_bytes;
  const Scratch w = carve(a, thread);
  for (int64_t u = u0; u < u1; ++u) {
    const UnitSpan us = unit_span(a, u);
    const int64_t ti = us.ti, kh = us.kh, j0 = us.j0, j1 = us.j1;
    const int64_t h0 = us.h0, g = us.g, c = a.units[u].c, n = j1 - j0;
    for (int64_t i = 0; i < g; ++i) {
      const int64_t h = a.group_heads[h0 + i];
      float* pr = a.sbuf + a.soff[ti * a.H + h] + j0;
      scale_round<V>(pr, pr, a.factor[a.coff[ti] + h * a.n_chunks[ti] + c], a.round16, n);
    }
    const uint8_t* vbase = (const uint8_t*)a.v_cache + us.sl * a.cap * row_bytes + kh * head_bytes;
    for (int64_t s0 = 0; s0 < n; s0 += ts::ATTN_SUB) {
      const int64_t ns = n - s0 < ts::ATTN_SUB ? n - s0 : ts::ATTN_SUB;
      sub_block_rows(a, a.v_new, vbase, a.v_type, us, s0, ns, row_bytes, head_bytes, w.enc,
                     [&](int64_t jj, const uint8_t* v) { row_to_float<V>(w.kb + jj * hdp, v, a.v_type, hd, hdp); });
      for (int64_t i = 0; i < g; ++i) {
        const int64_t h = a.group_heads[h0 + i];
        const float* pr = a.sbuf + a.soff[ti * a.H + h] + j0 + s0;
        float* o = a.opart + (a.coff[ti] + h * a.n_chunks[ti] + c) * hd;
        const bool first = s0 == 0;
        int64_t d = 0;
        for (; d + 64 <= hd8; d += 64) weigh<V, 8>(o + d, pr, w.kb + d, hdp, ns, first);
        switch ((hd8 - d) / 8) {
          case 1: weigh<V, 1>(o + d, pr, w.kb + d, hdp, ns, first); break;
          case 2: weigh<V, 2>(o + d, pr, w.kb + d, hdp, ns, first); break;
          case 3: weigh<V, 3>(o + d, pr, w.kb + d, hdp, ns, first); break;
          case 4: weigh<V, 4>(o + d, pr, w.kb + d, hdp, ns, first); break;
          case 5: weigh<V, 5>(o + d, pr, w.kb + d, hdp, ns, first); break;
          case 6: weigh<V, 6>(o + d, pr, w.kb + d, hdp, ns, first); break;
          case 7: weigh<V, 7>(o + d, pr, w.kb + d, hdp, ns, first); break;
          default: break;
        }
        for (d = hd8; d < hd; ++d) {
          float acc = first ? 0.0f : o[d];
          for (int64_t jj = 0; jj < ns; ++jj) acc = fmaf(pr[jj], w.kb[jj * hdp + d], acc);
          o[d] = acc;
        }
      }
    }
  }
}

}  // namespace
