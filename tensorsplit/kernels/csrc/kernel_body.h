// The matmul kernels over tiled weights, written once against a SIMD traits class S (simd_*.h) and
// compiled once per instruction set (isa_*.cpp). Everything here has internal linkage.
//
// For one tile (16 weight rows) and up to S::MAX_RN token rows at a time, per scale group:
//   integer numerics (llama.cpp's): codes are unpacked to 16 lanes x 4 bytes per chunk, and each
//     chunk is dotted with 4 activation bytes broadcast to every lane (vpdpbusd), so lane i holds
//     row i's exact integer dot of the group, sum((code - offset) * q_x). Then, in float:
//       acc += float(dot) * (s_w * d_x)   [+ o_w * s_x for formats with a min]
//   exact numerics: codes (minus offset) are converted to float and multiplied with float x:
//       acc += (sum over the group of code * x) * s_w   [+ o_w * sum(x)]
// Each output's operations depend only on its row and its token, never on how many tokens share a
// pass, how rows are split over threads, or which instruction set runs: results are bitwise the
// same for any batch composition and thread count, and across the AVX-512 / AVX2 / scalar paths.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attention_body.h"
#include "kernels.h"
#include "layout.h"

namespace {

using namespace ts;

// ---- formats: scales and codes of group g of a tile-block, for lanes [h * LANES, (h + 1) * LANES) ----
// Byte offsets of a lane range inside a plane: f16 planes 2 B per row, byte planes 1 B, chunk loads 4 B,
// mask words 4 bits per row.
template <class S> struct Off {
  static constexpr int F16 = 2 * S::LANES, BYTE = S::LANES, LOAD = 4 * S::LANES, MASK = S::LANES / 2;
};

template <class S, int LOADS>
static inline void q4_codes(const uint8_t* p, typename S::VB* w) {
  for (int t = 0; t < LOADS; ++t) {
    const typename S::VB b = S::loadb(p + 64 * t);
    w[2 * t] = S::nib_lo(b);
    w[2 * t + 1] = S::nib_hi(b);
  }
}
template <class S, int CHUNKS>
static inline void add_mask_bits(const uint8_t* p, typename S::VB* w, uint8_t v) {
  for (int j = 0; j < CHUNKS; ++j) w[j] = S::add_bits(w[j], p + 8 * j, v);
}

// Each format: GS (group size), NG (groups per block), OFFSET (integer code offset), MIN (has a float
// min term), SIGNED (codes are signed bytes, dotted with dot_s), CODE_MAX (largest |code| the dot
// sees), TB; Blk = per-block values hoisted
// out of the group loop; blk(), group() give the group's scale s and min o (16 lanes), codes() the chunks.
struct NoBlk {};

template <class S> struct FQ4_0 {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = NoBlk;
  static constexpr int GS = 32, NG = 1, OFFSET = 8, TB = Q4_0::TB; static constexpr bool MIN = false, SIGNED = false, SB = false; static constexpr int CODE_MAX = 15;
  static inline Blk blk(const uint8_t*, int) { return {}; }
  static inline void group(const Blk&, const uint8_t* tb, int h, int, VF& s, VF&) { s = S::f16(tb + Q4_0::D + Off<S>::F16 * h); }
  static inline void codes(const uint8_t* tb, int h, int, VB* w) { q4_codes<S, 4>(tb + Q4_0::QS + Off<S>::LOAD * h, w); }
};
template <class S> struct FQ4_1 {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = NoBlk;
  static constexpr int GS = 32, NG = 1, OFFSET = 0, TB = Q4_1::TB; static constexpr bool MIN = true, SIGNED = false, SB = false; static constexpr int CODE_MAX = 15;
  static inline Blk blk(const uint8_t*, int) { return {}; }
  static inline void group(const Blk&, const uint8_t* tb, int h, int, VF& s, VF& o) {
    s = S::f16(tb + Q4_1::D + Off<S>::F16 * h);
    o = S::f16(tb + Q4_1::M + Off<S>::F16 * h);
  }
  static inline void codes(const uint8_t* tb, int h, int, VB* w) { q4_codes<S, 4>(tb + Q4_1::QS + Off<S>::LOAD * h, w); }
};
template <class S> struct FQ5_0 {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = NoBlk;
  static constexpr int GS = 32, NG = 1, OFFSET = 16, TB = Q5_0::TB; static constexpr bool MIN = false, SIGNED = false, SB = false; static constexpr int CODE_MAX = 31;
  static inline Blk blk(const uint8_t*, int) { return {}; }
  static inline void group(const Blk&, const uint8_t* tb, int h, int, VF& s, VF&) { s = S::f16(tb + Q5_0::D + Off<S>::F16 * h); }
  static inline void codes(const uint8_t* tb, int h, int, VB* w) {
    q4_codes<S, 4>(tb + Q5_0::QS + Off<S>::LOAD * h, w);
    add_mask_bits<S, 8>(tb + Q5_0::QH + Off<S>::MASK * h, w, 0x10);
  }
};
template <class S> struct FQ5_1 {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = NoBlk;
  static constexpr int GS = 32, NG = 1, OFFSET = 0, TB = Q5_1::TB; static constexpr bool MIN = true, SIGNED = false, SB = false; static constexpr int CODE_MAX = 31;
  static inline Blk blk(const uint8_t*, int) { return {}; }
  static inline void group(const Blk&, const uint8_t* tb, int h, int, VF& s, VF& o) {
    s = S::f16(tb + Q5_1::D + Off<S>::F16 * h);
    o = S::f16(tb + Q5_1::M + Off<S>::F16 * h);
  }
  static inline void codes(const uint8_t* tb, int h, int, VB* w) {
    q4_codes<S, 4>(tb + Q5_1::QS + Off<S>::LOAD * h, w);
    add_mask_bits<S, 8>(tb + Q5_1::QH + Off<S>::MASK * h, w, 0x10);
  }
};
template <class S> struct FQ8_0 {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = NoBlk;
  static constexpr int GS = 32, NG = 1, OFFSET = 0, TB = Q8_0::TB; static constexpr bool MIN = false, SIGNED = true, SB = false; static constexpr int CODE_MAX = 127;
  static inline Blk blk(const uint8_t*, int) { return {}; }
  static inline void group(const Blk&, const uint8_t* tb, int h, int, VF& s, VF&) { s = S::f16(tb + Q8_0::D + Off<S>::F16 * h); }
  static inline void codes(const uint8_t* tb, int h, int, VB* w) {
    for (int j = 0; j < 8; ++j) w[j] = S::loadb(tb + Q8_0::QS + 64 * j + Off<S>::LOAD * h);
  }
};
template <class S> struct FIQ4_NL {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = NoBlk;
  static constexpr int GS = 32, NG = 1, OFFSET = 0, TB = IQ4_NL::TB; static constexpr bool MIN = false, SIGNED = true, SB = false; static constexpr int CODE_MAX = 127;
  static inline Blk blk(const uint8_t*, int) { return {}; }
  static inline void group(const Blk&, const uint8_t* tb, int h, int, VF& s, VF&) { s = S::f16(tb + IQ4_NL::D + Off<S>::F16 * h); }
  static inline void codes(const uint8_t* tb, int h, int, VB* w) {
    q4_codes<S, 4>(tb + IQ4_NL::QS + Off<S>::LOAD * h, w);
    for (int j = 0; j < 8; ++j) w[j] = S::lookup(w[j], IQ4_VALUES);
  }
};

// MXFP4: the doubled E2M1 values looked up shifted by +12 (layout.h MXFP4_VALUES), so the codes are
// unsigned bytes in [0, 24] with an integer offset of 12, which AVX2 sums in int16 pairs (group_dot)
// instead of taking the sign trick; the dot is the same exact integer, sum(kvalues[q] * q_x). The
// scale is the E8M0 byte as 2^(e - 128): llama.cpp's per block d_x * 2^(e - 128), then that times the
// integer dot added to the sum, is Narrow::add_int's fma(dot, s * d_x, acc).
template <class S> struct FMXFP4 {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = NoBlk;
  static constexpr int GS = 32, NG = 1, OFFSET = MXFP4_OFFSET, TB = MXFP4::TB; static constexpr bool MIN = false, SIGNED = false, SB = false; static constexpr int CODE_MAX = 24;
  static inline Blk blk(const uint8_t*, int) { return {}; }
  static inline void group(const Blk&, const uint8_t* tb, int h, int, VF& s, VF&) { s = S::e8m0_half(tb + MXFP4::E + Off<S>::BYTE * h); }
  static inline void codes(const uint8_t* tb, int h, int, VB* w) {
    q4_codes<S, 4>(tb + MXFP4::QS + Off<S>::LOAD * h, w);
    for (int j = 0; j < 8; ++j) w[j] = S::lookup(w[j], MXFP4_VALUES);
  }
};

template <class S> struct BlkD { typename S::VF d; };
template <class S> struct BlkDM { typename S::VF d, dm; };

template <class S> struct FQ2_K {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = BlkDM<S>;
  static constexpr int GS = 16, NG = 16, OFFSET = 0, TB = Q2_K::TB; static constexpr bool MIN = true, SIGNED = false, SB = true; static constexpr int CODE_MAX = 3;
  static inline Blk blk(const uint8_t* tb, int h) { return {S::f16(tb + Q2_K::D + Off<S>::F16 * h), S::f16(tb + Q2_K::DM + Off<S>::F16 * h)}; }
  static inline void group(const Blk& b, const uint8_t* tb, int h, int g, VF& s, VF& o) {
    const uint8_t* sc = tb + Q2_K::SC + 16 * g + Off<S>::BYTE * h;
    s = S::mul(b.d, S::u8f_lo4(sc));
    o = S::mul(S::mul(b.dm, S::setf(-1.0f)), S::u8f_hi4(sc));
  }
  static inline typename S::VI isc(const uint8_t* tb, int h, int g) { return S::lo4i(S::u8i(tb + Q2_K::SC + 16 * g + Off<S>::BYTE * h)); }
  static inline typename S::VI imn(const uint8_t* tb, int h, int g) { return S::hi4i(S::u8i(tb + Q2_K::SC + 16 * g + Off<S>::BYTE * h)); }
  static inline void codes(const uint8_t* tb, int h, int g, VB* w) {
    const VB q = S::loadb(tb + Q2_K::QS + CRUMB_PLANE(16) * g + Off<S>::LOAD * h);
    w[0] = S::template crumb<0>(q); w[1] = S::template crumb<1>(q);
    w[2] = S::template crumb<2>(q); w[3] = S::template crumb<3>(q);
  }
};
template <class S> struct FQ3_K {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = BlkD<S>;
  static constexpr int GS = 16, NG = 16, OFFSET = 4, TB = Q3_K::TB; static constexpr bool MIN = false, SIGNED = false, SB = true; static constexpr int CODE_MAX = 7;
  static inline Blk blk(const uint8_t* tb, int h) { return {S::f16(tb + Q3_K::D + Off<S>::F16 * h)}; }
  static inline void group(const Blk& b, const uint8_t* tb, int h, int g, VF& s, VF&) {
    s = S::mul(b.d, S::i8f(tb + Q3_K::SC + 16 * g + Off<S>::BYTE * h));
  }
  static inline typename S::VI isc(const uint8_t* tb, int h, int g) { return S::i8i(tb + Q3_K::SC + 16 * g + Off<S>::BYTE * h); }
  static inline typename S::VI imn(const uint8_t*, int, int) { return S::zeroi(); }
  static inline void codes(const uint8_t* tb, int h, int g, VB* w) {
    const VB q = S::loadb(tb + Q3_K::QS + CRUMB_PLANE(16) * g + Off<S>::LOAD * h);
    w[0] = S::template crumb<0>(q); w[1] = S::template crumb<1>(q);
    w[2] = S::template crumb<2>(q); w[3] = S::template crumb<3>(q);
    add_mask_bits<S, 4>(tb + Q3_K::QH + MASK_PLANE(16) * g + Off<S>::MASK * h, w, 4);
  }
};
template <class S> struct FQ4_K {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = BlkDM<S>;
  static constexpr int GS = 32, NG = 8, OFFSET = 0, TB = Q4_K::TB; static constexpr bool MIN = true, SIGNED = false, SB = true; static constexpr int CODE_MAX = 15;
  static inline Blk blk(const uint8_t* tb, int h) { return {S::f16(tb + Q4_K::D + Off<S>::F16 * h), S::f16(tb + Q4_K::DM + Off<S>::F16 * h)}; }
  static inline void group(const Blk& b, const uint8_t* tb, int h, int g, VF& s, VF& o) {
    s = S::mul(b.d, S::u8f(tb + Q4_K::SC + 16 * g + Off<S>::BYTE * h));
    o = S::mul(S::mul(b.dm, S::setf(-1.0f)), S::u8f(tb + Q4_K::MN + 16 * g + Off<S>::BYTE * h));
  }
  static inline typename S::VI isc(const uint8_t* tb, int h, int g) { return S::u8i(tb + Q4_K::SC + 16 * g + Off<S>::BYTE * h); }
  static inline typename S::VI imn(const uint8_t* tb, int h, int g) { return S::u8i(tb + Q4_K::MN + 16 * g + Off<S>::BYTE * h); }
  static inline void codes(const uint8_t* tb, int h, int g, VB* w) { q4_codes<S, 4>(tb + Q4_K::QS + Q4_PLANE(32) * g + Off<S>::LOAD * h, w); }
};
template <class S> struct FQ5_K {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = BlkDM<S>;
  static constexpr int GS = 32, NG = 8, OFFSET = 0, TB = Q5_K::TB; static constexpr bool MIN = true, SIGNED = false, SB = true; static constexpr int CODE_MAX = 31;
  static inline Blk blk(const uint8_t* tb, int h) { return {S::f16(tb + Q5_K::D + Off<S>::F16 * h), S::f16(tb + Q5_K::DM + Off<S>::F16 * h)}; }
  static inline void group(const Blk& b, const uint8_t* tb, int h, int g, VF& s, VF& o) {
    s = S::mul(b.d, S::u8f(tb + Q5_K::SC + 16 * g + Off<S>::BYTE * h));
    o = S::mul(S::mul(b.dm, S::setf(-1.0f)), S::u8f(tb + Q5_K::MN + 16 * g + Off<S>::BYTE * h));
  }
  static inline typename S::VI isc(const uint8_t* tb, int h, int g) { return S::u8i(tb + Q5_K::SC + 16 * g + Off<S>::BYTE * h); }
  static inline typename S::VI imn(const uint8_t* tb, int h, int g) { return S::u8i(tb + Q5_K::MN + 16 * g + Off<S>::BYTE * h); }
  static inline void codes(const uint8_t* tb, int h, int g, VB* w) {
    q4_codes<S, 4>(tb + Q5_K::QS + Q4_PLANE(32) * g + Off<S>::LOAD * h, w);
    add_mask_bits<S, 8>(tb + Q5_K::QH + MASK_PLANE(32) * g + Off<S>::MASK * h, w, 0x10);
  }
};
template <class S> struct FQ6_K {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = BlkD<S>;
  static constexpr int GS = 16, NG = 16, OFFSET = 32, TB = Q6_K::TB; static constexpr bool MIN = false, SIGNED = false, SB = true; static constexpr int CODE_MAX = 63;
  static inline Blk blk(const uint8_t* tb, int h) { return {S::f16(tb + Q6_K::D + Off<S>::F16 * h)}; }
  static inline void group(const Blk& b, const uint8_t* tb, int h, int g, VF& s, VF&) {
    s = S::mul(b.d, S::i8f(tb + Q6_K::SC + 16 * g + Off<S>::BYTE * h));
  }
  static inline typename S::VI isc(const uint8_t* tb, int h, int g) { return S::i8i(tb + Q6_K::SC + 16 * g + Off<S>::BYTE * h); }
  static inline typename S::VI imn(const uint8_t*, int, int) { return S::zeroi(); }
  static inline void codes(const uint8_t* tb, int h, int g, VB* w) {
    const uint8_t* ql = tb + Q6_K::QS + Q4_PLANE(16) * g + Off<S>::LOAD * h;
    const VB l0 = S::loadb(ql), l1 = S::loadb(ql + 64);
    const VB hi = S::loadb(tb + Q6_K::QH + CRUMB_PLANE(16) * g + Off<S>::LOAD * h);
    w[0] = S::or_(S::nib_lo(l0), S::template crumb_hi4<0>(hi));
    w[1] = S::or_(S::nib_hi(l0), S::template crumb_hi4<1>(hi));
    w[2] = S::or_(S::nib_lo(l1), S::template crumb_hi4<2>(hi));
    w[3] = S::or_(S::nib_hi(l1), S::template crumb_hi4<3>(hi));
  }
};
template <class S> struct FIQ4_XS {
  using VF = typename S::VF; using VB = typename S::VB; using Blk = BlkD<S>;
  static constexpr int GS = 32, NG = 8, OFFSET = 0, TB = IQ4_XS::TB; static constexpr bool MIN = false, SIGNED = true, SB = true; static constexpr int CODE_MAX = 127;
  static inline Blk blk(const uint8_t* tb, int h) { return {S::f16(tb + IQ4_XS::D + Off<S>::F16 * h)}; }
  static inline void group(const Blk& b, const uint8_t* tb, int h, int g, VF& s, VF&) {
    s = S::mul(b.d, S::i8f(tb + IQ4_XS::SC + 16 * g + Off<S>::BYTE * h));
  }
  static inline typename S::VI isc(const uint8_t* tb, int h, int g) { return S::i8i(tb + IQ4_XS::SC + 16 * g + Off<S>::BYTE * h); }
  static inline typename S::VI imn(const uint8_t*, int, int) { return S::zeroi(); }
  static inline void codes(const uint8_t* tb, int h, int g, VB* w) {
    q4_codes<S, 4>(tb + IQ4_XS::QS + Q4_PLANE(32) * g + Off<S>::LOAD * h, w);
    for (int j = 0; j < 8; ++j) w[j] = S::lookup(w[j], IQ4_VALUES);
  }
};

// The integer dot of one group's C = GS / 4 chunks with its activations, added to acc. vpdpbusd
// (AVX-512 VNNI) sums into int32 as it goes. AVX2's vpmaddubsw gives int16 sums of pairs, which K
// chunks share before one vpmaddwd widens them to int32: K = 32767 / (2 * 127 * CODE_MAX), so no int16
// sum can overflow (|q_x| <= 127). Q4 codes take one widening per 8 chunks instead of one per chunk.
template <class S, class F>
static inline typename S::VI group_dot(typename S::VI acc, const typename S::VB* w, const int8_t* xq) {
  constexpr int C = F::GS / 4;
  if constexpr (S::PAIRS16 && !F::SIGNED) {
    constexpr int K = 32767 / (254 * F::CODE_MAX);
    static_assert(K >= 1, "a code too wide for int16 pair sums");
    for (int j0 = 0; j0 < C; j0 += K) {
      typename S::VB p = S::pairs(w[j0], xq + 4 * j0);
      for (int j = j0 + 1; j < j0 + K && j < C; ++j) p = S::add16(p, S::pairs(w[j], xq + 4 * j));
      acc = S::widen(acc, p);
    }
  } else {
    for (int j = 0; j < C; ++j) acc = F::SIGNED ? S::dot_s(acc, w[j], xq + 4 * j) : S::dot_u(acc, w[j], xq + 4 * j);
  }
  return acc;
}

// ---- accumulators --------------------------------------------------------------------------------
// Narrow: float accumulators, float32 output. Wide: double accumulators and output, for the row-
// parallel matmuls: a rank's partial sum and the all-reduce's sum of the partials are then both
// rounded to float32 once, at the end, so every world size gets the same float32 result (to a
// tie at float32 rounding), and llama.cpp's 8-bit rounding of the next input cannot magnify the
// order of summation into different tokens.
template <class S> struct Narrow {
  using T = typename S::VF;
  using Scale = typename S::VF;
  using Out = float;
  static inline T zero() { return S::zerof(); }
  static inline Scale scale(typename S::VF s) { return s; }
  static inline T add_int(T acc, typename S::VI ia, Scale s, float dx) { return S::fma(S::cvt(ia), S::mul(s, S::setf(dx)), acc); }
  static inline T add_f(T acc, typename S::VF part, Scale s) { return S::fma(part, s, acc); }
  static inline T add_min(T acc, Scale o, float sx) { return S::fma(o, S::setf(sx), acc); }
  static inline void store(float* p, T v, int n) { S::store(p, v, n); }
};
template <class S> struct Wide {
  using T = typename S::VD;
  using Scale = typename S::VD;
  using Out = double;
  static inline T zero() { return S::zerod(); }
  static inline Scale scale(typename S::VF s) { return S::to_d(s); }
  static inline T add_int(T acc, typename S::VI ia, Scale s, float dx) {
    return S::fma_d(S::to_d(ia), S::mul_d(s, S::setd((double)dx)), acc);   // s * dx is exact in double
  }
  static inline T add_f(T acc, typename S::VF part, Scale s) { return S::fma_d(S::to_d(part), s, acc); }
  static inline T add_min(T acc, Scale o, float sx) { return S::fma_d(o, S::setd((double)sx), acc); }
  static inline void store(double* p, T v, int n) { S::stored(p, v, n); }
};

// ---- the tile kernels ----------------------------------------------------------------------------
// A tile is read once, block after block, in address order. Where a vector holds fewer than 16 lanes
// (AVX2: 8), each tile-block serves its H = 16 / LANES lane ranges ("halves") in turn before the next
// block is touched. Running the halves as separate passes over the tile would leave the memory bus
// idle for the passes after the first (they re-read the tile from cache): measured on a Zen 3 Q4_0
// GEMV out of DRAM, 9.3 GB/s per thread that way against 19 GB/s from L3.
//
// A tile-block's planes are also read out of order (scales, then each group's codes, here and there
// in the block), which the hardware prefetchers follow badly: measured on a Q6_K GEMV out of cache,
// 15 GB/s per thread without this and 40 with it. Each group fetches its share of a block at least
// PF_BYTES (and two blocks) ahead.
constexpr int PF_BYTES = 2048;
template <class F>
static inline void prefetch_ahead(const uint8_t* tb, int g) {
  constexpr int share = F::TB / F::NG, ahead = (PF_BYTES / F::TB > 2 ? PF_BYTES / F::TB : 2) * F::TB;
  for (int l = 0; l < share; l += 64) __builtin_prefetch(tb + ahead + g * share + l);
}

// Lane ranges of a tile holding valid rows (n_valid of its 16), and the rows valid in range h.
template <class S> static inline int halves(int n_valid) { return (n_valid + S::LANES - 1) / S::LANES; }
template <class S> static inline int valid_in(int n_valid, int h) { return n_valid - h * S::LANES; }

// One group of a tile-block, for lanes [h * LANES, (h + 1) * LANES): its scale and min (as the
// accumulator takes them) and its codes, unpacked.
template <class S, class F, class A>
struct GroupData {
  typename A::Scale s, o;
  typename S::VB w[F::GS / 4];
  inline GroupData(const typename F::Blk& bv, const uint8_t* tb, int h, int g) {
    typename S::VF sf, of;
    F::group(bv, tb, h, g, sf, of);
    s = A::scale(sf);
    if (F::MIN) o = A::scale(of);
    F::codes(tb, h, g, w);
  }
};

// One tile (16 rows, n_blocks block columns), token rows [m0, m0 + RN). Each group serves the H lane
// ranges in turn, with one range's codes unpacked at a time (16 ymm registers hold no more). All the
// ranges are computed (a tile's rows past n_rows are zero blocks), and the n_valid rows stored.
template <class S, class F, class A, int RN>
static void tile_q8(const uint8_t* tile, int64_t n_blocks, const ActQ& a, int64_t m0, typename A::Out* out, int64_t ldo,
                    int n_valid) {
  using VI = typename S::VI;
  constexpr int H = 16 / S::LANES;
  constexpr int OFF = F::SIGNED ? S::DOT_S_BIAS : F::OFFSET;   // dot = sum((code + bias) x): remove bias * sum(q)
  typename A::T acc[H][RN];
  for (int h = 0; h < H; ++h)
    for (int n = 0; n < RN; ++n) acc[h][n] = A::zero();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* tb = tile + b * F::TB;
    for (int g = 0; g < F::NG; ++g) {
      prefetch_ahead<F>(tb, g);
      const int64_t G = b * F::NG + g;                          // group index along the row
      for (int h = 0; h < H; ++h) {
        const GroupData<S, F, A> gd(F::blk(tb, h), tb, h, g);
        for (int n = 0; n < RN; ++n) {
          const int64_t m = m0 + n;
          const VI ia = group_dot<S, F>(S::seti(OFF ? -OFF * a.isum[m * a.ldg + G] : 0), gd.w, a.q + m * a.ldq + G * F::GS);
          acc[h][n] = A::add_int(acc[h][n], ia, gd.s, a.d[m * a.ldg + G]);
          if (F::MIN) acc[h][n] = A::add_min(acc[h][n], gd.o, a.s[m * a.ldg + G]);
        }
      }
    }
  }
  for (int h = 0; h < halves<S>(n_valid); ++h)
    for (int n = 0; n < RN; ++n) A::store(out + (m0 + n) * ldo + h * S::LANES, acc[h][n], valid_in<S>(n_valid, h));
}

// Super-block formats (K-quants, IQ4_XS) in integers, as llama.cpp sums them: per group the exact
// dot, times the group's integer scale (and its integer min times the activations' code sum), summed
// in int32 over the super-block; then one float step per super-block with d * d_x (and -dmin * d_x).
// The activation scale d_x is one per super-block (Q8_K). Bounds: |sum| < 2^28 for every format.
template <class S, class F, class A, int RN>
static void tile_q8_sb(const uint8_t* tile, int64_t n_blocks, const ActQ& a, int64_t m0, typename A::Out* out,
                       int64_t ldo, int n_valid) {
  using VB = typename S::VB; using VI = typename S::VI;
  constexpr int C = F::GS / 4, H = 16 / S::LANES;
  constexpr int OFF = F::SIGNED ? S::DOT_S_BIAS : F::OFFSET;
  typename A::T acc[H][RN];
  for (int h = 0; h < H; ++h)
    for (int n = 0; n < RN; ++n) acc[h][n] = A::zero();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* tb = tile + b * F::TB;
    VI isb[H][RN], imb[H][RN];
    for (int h = 0; h < H; ++h)
      for (int n = 0; n < RN; ++n) { isb[h][n] = S::zeroi(); if (F::MIN) imb[h][n] = S::zeroi(); }
    for (int g = 0; g < F::NG; ++g) {
      prefetch_ahead<F>(tb, g);
      const int64_t G = b * F::NG + g;
      for (int h = 0; h < H; ++h) {
        VB w[C];
        F::codes(tb, h, g, w);
        const VI sc = F::isc(tb, h, g);
        for (int n = 0; n < RN; ++n) {
          const int64_t m = m0 + n;
          const int32_t isum = a.isum[m * a.ldg + G];
          const VI ia = group_dot<S, F>(S::seti(OFF ? -OFF * isum : 0), w, a.q + m * a.ldq + G * F::GS);
          isb[h][n] = S::addi(isb[h][n], S::mullo(ia, sc));
          if (F::MIN) imb[h][n] = S::addi(imb[h][n], S::mullo(S::seti(isum), F::imn(tb, h, g)));
        }
      }
    }
    for (int h = 0; h < H; ++h) {
      const typename F::Blk bv = F::blk(tb, h);
      const typename A::Scale d = A::scale(bv.d);
      typename A::Scale ndm;
      if constexpr (F::MIN) ndm = A::scale(S::mul(bv.dm, S::setf(-1.0f)));
      for (int n = 0; n < RN; ++n) {
        const float dx = a.d[(m0 + n) * a.ldg + b * F::NG];          // Q8_K: one scale per super-block
        acc[h][n] = A::add_int(acc[h][n], isb[h][n], d, dx);
        if (F::MIN) acc[h][n] = A::add_int(acc[h][n], imb[h][n], ndm, dx);
      }
    }
  }
  for (int h = 0; h < halves<S>(n_valid); ++h)
    for (int n = 0; n < RN; ++n) A::store(out + (m0 + n) * ldo + h * S::LANES, acc[h][n], valid_in<S>(n_valid, h));
}

template <class S, class F, class A, int RN>
static void tile_f32(const uint8_t* tile, int64_t n_blocks, const ActF& a, int64_t m0, typename A::Out* out, int64_t ldo,
                     int n_valid) {
  using VF = typename S::VF; using VB = typename S::VB;
  constexpr int C = F::GS / 4, H = 16 / S::LANES;
  const int nh = halves<S>(n_valid);
  typename A::T acc[H][RN];
  for (int h = 0; h < H; ++h)
    for (int n = 0; n < RN; ++n) acc[h][n] = A::zero();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* tb = tile + b * F::TB;
    for (int g = 0; g < F::NG; ++g) prefetch_ahead<F>(tb, g);
    for (int h = 0; h < H; ++h) {
      if (H > 1 && h >= nh) break;
      const typename F::Blk bv = F::blk(tb, h);
      for (int g = 0; g < F::NG; ++g) {
        GroupData<S, F, A> gd(bv, tb, h, g);
        VB* w = gd.w;
        if (!F::SIGNED && F::OFFSET)
          for (int j = 0; j < C; ++j) w[j] = S::sub8(w[j], F::OFFSET);   // signed codes: code - offset
        const int64_t G = b * F::NG + g;
        VF part[RN];
        for (int n = 0; n < RN; ++n) part[n] = S::zerof();
        for (int j = 0; j < C; ++j) {
          const VF w0 = S::template byte_sf<0>(w[j]), w1 = S::template byte_sf<1>(w[j]);
          const VF w2 = S::template byte_sf<2>(w[j]), w3 = S::template byte_sf<3>(w[j]);
          for (int n = 0; n < RN; ++n) {
            const float* x = a.x + (m0 + n) * a.ldx + G * F::GS + 4 * j;
            part[n] = S::fma(w0, S::setf(x[0]), part[n]);
            part[n] = S::fma(w1, S::setf(x[1]), part[n]);
            part[n] = S::fma(w2, S::setf(x[2]), part[n]);
            part[n] = S::fma(w3, S::setf(x[3]), part[n]);
          }
        }
        for (int n = 0; n < RN; ++n) {
          acc[h][n] = A::add_f(acc[h][n], part[n], gd.s);
          if (F::MIN) acc[h][n] = A::add_min(acc[h][n], gd.o, a.xsum[(m0 + n) * a.ldg + G]);
        }
      }
    }
  }
  for (int h = 0; h < nh; ++h)
    for (int n = 0; n < RN; ++n) A::store(out + (m0 + n) * ldo + h * S::LANES, acc[h][n], valid_in<S>(n_valid, h));
}

// F16 / BF16 weights: a tile-block is one column of 16 rows (2 bytes each); float arithmetic.
template <class S, bool BF, class A, int RN>
static void tile_half(const uint8_t* tile, int64_t n_cols, const ActF& a, int64_t m0, typename A::Out* out, int64_t ldo,
                      int n_valid) {
  using VF = typename S::VF;
  constexpr int H = 16 / S::LANES;
  const int nh = halves<S>(n_valid);
  typename A::T acc[H][RN];
  for (int h = 0; h < H; ++h)
    for (int n = 0; n < RN; ++n) acc[h][n] = A::zero();
  for (int64_t c = 0; c < n_cols; ++c) {
    for (int h = 0; h < H; ++h) {
      if (H > 1 && h >= nh) break;
      const uint8_t* p = tile + 32 * c + 2 * S::LANES * h;
      const VF w = BF ? S::bf16(p) : S::f16(p);
      for (int n = 0; n < RN; ++n) acc[h][n] = A::add_f(acc[h][n], w, A::scale(S::setf(a.x[(m0 + n) * a.ldx + c])));
    }
  }
  for (int h = 0; h < nh; ++h)
    for (int n = 0; n < RN; ++n) A::store(out + (m0 + n) * ldo + h * S::LANES, acc[h][n], valid_in<S>(n_valid, h));
}

// ---- drivers: a range of tiles, all token rows ---------------------------------------------------
// Tiles are taken in groups that fit in L2 (about 256 KiB of weights); each group is read once per
// pass of MAX_RN token rows, so a long prompt streams the activations, not the weights, from afar.
constexpr int64_t L2_BYTES = 256 * 1024;

template <class Out, class Act, class Fn>
static inline void drive(const MatArgs& m, const Act& a, int64_t t0, int64_t t1, int64_t tile_bytes, int max_rn, Fn&& run) {
  int64_t group = L2_BYTES / (tile_bytes > 0 ? tile_bytes : 1);
  if (group < 1) group = 1;
  Out* out = (Out*)m.out;
  for (int64_t g0 = t0; g0 < t1; g0 += group) {
    const int64_t g1 = g0 + group < t1 ? g0 + group : t1;
    for (int64_t m0 = 0; m0 < m.M; m0 += max_rn) {
      const int rn = (int)(m.M - m0 < max_rn ? m.M - m0 : max_rn);
      for (int64_t t = g0; t < g1; ++t) {
        const int64_t left = m.n_rows - t * TILE_ROWS;
        run(m.w + t * tile_bytes, m0, rn, out + t * TILE_ROWS, (int)(left < TILE_ROWS ? left : TILE_ROWS));
      }
    }
  }
}

#define TS_RN_SWITCH(CALL)                                                                          \
  switch (rn) {                                                                                     \
    case 1: CALL(1); break;                                                                         \
    case 2: CALL(2); break;                                                                         \
    case 3: CALL(3); break;                                                                         \
    case 4: CALL(4); break;                                                                         \
    case 5: if constexpr (S::MAX_RN >= 5) CALL((S::MAX_RN >= 5 ? 5 : 1)); break;                  \
    case 6: if constexpr (S::MAX_RN >= 6) CALL((S::MAX_RN >= 6 ? 6 : 1)); break;                  \
    case 7: if constexpr (S::MAX_RN >= 7) CALL((S::MAX_RN >= 7 ? 7 : 1)); break;                  \
    case 8: if constexpr (S::MAX_RN >= 8) CALL((S::MAX_RN >= 8 ? 8 : 1)); break;                  \
  }

template <class S, class F, class A>
static void mat_q8(const MatArgs& m, const ActQ& a, int64_t t0, int64_t t1) {
  if constexpr (F::SB) {
    // two integer sums per token row and lane range live across a super-block: at most 8 per pass
    constexpr int RN_SB = S::MAX_RN < 4 * S::LANES / 16 ? S::MAX_RN : 4 * S::LANES / 16;
    drive<typename A::Out>(m, a, t0, t1, m.n_blocks * F::TB, RN_SB,
                           [&](const uint8_t* tile, int64_t m0, int rn, typename A::Out* out, int valid) {
#define TS_CALL(k) tile_q8_sb<S, F, A, k>(tile, m.n_blocks, a, m0, out, m.ldo, valid)
      TS_RN_SWITCH(TS_CALL)
#undef TS_CALL
    });
  } else {
    drive<typename A::Out>(m, a, t0, t1, m.n_blocks * F::TB, S::MAX_RN,
                           [&](const uint8_t* tile, int64_t m0, int rn, typename A::Out* out, int valid) {
#define TS_CALL(k) tile_q8<S, F, A, k>(tile, m.n_blocks, a, m0, out, m.ldo, valid)
      TS_RN_SWITCH(TS_CALL)
#undef TS_CALL
    });
  }
}

template <class S, class F, class A>
static void mat_f32(const MatArgs& m, const ActF& a, int64_t t0, int64_t t1) {
  drive<typename A::Out>(m, a, t0, t1, m.n_blocks * F::TB, S::MAX_RN,
                         [&](const uint8_t* tile, int64_t m0, int rn, typename A::Out* out, int valid) {
#define TS_CALL(k) tile_f32<S, F, A, k>(tile, m.n_blocks, a, m0, out, m.ldo, valid)
    TS_RN_SWITCH(TS_CALL)
#undef TS_CALL
  });
}

template <class S, bool BF, class A>
static void mat_half(const MatArgs& m, const ActF& a, int64_t t0, int64_t t1) {
  // n_blocks = n_cols for the float formats (a "block" is one column)
  drive<typename A::Out>(m, a, t0, t1, m.n_blocks * 32, S::MAX_RN,
                         [&](const uint8_t* tile, int64_t m0, int rn, typename A::Out* out, int valid) {
#define TS_CALL(k) tile_half<S, BF, A, k>(tile, m.n_blocks, a, m0, out, m.ldo, valid)
    TS_RN_SWITCH(TS_CALL)
#undef TS_CALL
  });
}

// ---- activation quantization (llama.cpp's quantize_row_q8_0 / q8_1 / q8_K) ------------------------
// (rounding half to even: layout.h round_even)
using ts::round_even;

static void quantize_rows(const float* x, int64_t ldx, int64_t K, int kind, int group, int8_t* q, float* d, float* s,
                          int32_t* isum, int64_t ldq, int64_t ldg, int64_t r0, int64_t r1) {
  const int64_t ng = K / group;
  for (int64_t m = r0; m < r1; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = q + m * ldq;
    float* dr = d + m * ldg;
    float* sr = s + m * ldg;
    int32_t* ir = isum + m * ldg;
    const int block = kind == A_Q8_K ? 256 : 32;
    for (int64_t b0 = 0; b0 < K; b0 += block) {
      float dq, dstore;                  // the quantization step, and the scale the dot uses
      if (kind == A_Q8_K) {
        float amax = 0.0f, mx = 0.0f;
        for (int j = 0; j < block; ++j) {
          const float ax = fabsf(xr[b0 + j]);
          if (ax > amax) { amax = ax; mx = xr[b0 + j]; }
        }
        if (amax == 0.0f) {
          for (int j = 0; j < block; ++j) qr[b0 + j] = 0;
          dq = dstore = 0.0f;
        } else {
          const float iscale = -127.0f / mx;
          for (int j = 0; j < block; ++j) {
            const int v = round_even(iscale * xr[b0 + j]);
            qr[b0 + j] = (int8_t)(v < 127 ? v : 127);
          }
          dq = dstore = 1.0f / iscale;
        }
      } else {
        float amax = 0.0f;
        for (int j = 0; j < block; ++j) {
          const float ax = fabsf(xr[b0 + j]);
          amax = ax > amax ? ax : amax;
        }
        dq = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < block; ++j) qr[b0 + j] = (int8_t)round_even(xr[b0 + j] * id);
        dstore = f16_to_f32(f32_to_f16(dq));
      }
      for (int64_t g0 = b0; g0 < b0 + block; g0 += group) {
        int32_t sum = 0;
        for (int j = 0; j < group; ++j) sum += qr[g0 + j];
        const int64_t gi = g0 / group;
        ir[gi] = sum;
        dr[gi] = dstore;
        sr[gi] = kind == A_Q8_1 ? f16_to_f32(f32_to_f16(dq * (float)sum)) : dstore * (float)sum;
      }
    }
  }
}

}  // namespace

// The table of one instruction set's kernels: ISA_TABLE(fn_name, "name", Traits)
#define TS_FORMAT(S, T, F) \
  t.q8[T] = mat_q8<S, F<S>, Narrow<S>>;  t.q8_wide[T] = mat_q8<S, F<S>, Wide<S>>; \
  t.f32[T] = mat_f32<S, F<S>, Narrow<S>>; t.f32_wide[T] = mat_f32<S, F<S>, Wide<S>>;

// The table of one instruction set's kernels: TS_KERNEL_TABLE(fn_name, "name", Traits)
#define TS_KERNEL_TABLE(FN, NAME, S)                                                              \
  namespace ts {                                                                                  \
  static KernelTable make_table_##S() {                                                           \
    KernelTable t{};                                                                              \
    t.name = NAME;                                                                                \
    TS_FORMAT(S, T_Q4_0, FQ4_0) TS_FORMAT(S, T_Q4_1, FQ4_1) TS_FORMAT(S, T_Q5_0, FQ5_0)                    \
    TS_FORMAT(S, T_Q5_1, FQ5_1) TS_FORMAT(S, T_Q8_0, FQ8_0) TS_FORMAT(S, T_IQ4_NL, FIQ4_NL)                \
    TS_FORMAT(S, T_Q2_K, FQ2_K) TS_FORMAT(S, T_Q3_K, FQ3_K) TS_FORMAT(S, T_Q4_K, FQ4_K)                    \
    TS_FORMAT(S, T_Q5_K, FQ5_K) TS_FORMAT(S, T_Q6_K, FQ6_K) TS_FORMAT(S, T_IQ4_XS, FIQ4_XS)                \
    TS_FORMAT(S, T_MXFP4, FMXFP4)                                                                 \
    t.f32[T_F16] = mat_half<S, false, Narrow<S>>; t.f32_wide[T_F16] = mat_half<S, false, Wide<S>>;  \
    t.f32[T_BF16] = mat_half<S, true, Narrow<S>>; t.f32_wide[T_BF16] = mat_half<S, true, Wide<S>>;  \
    t.quantize = quantize_rows;                                                                   \
    t.attend_scores = attend_scores<S>; t.attend_values = attend_values<S>;                       \
    return t;                                                                                     \
  }                                                                                               \
  const KernelTable* FN() {                                                                       \
    static const KernelTable table = make_table_##S();                                            \
    return &table;                                                                                \
  }                                                                                               \
  }
