// SIMD traits for AVX-512 (F, BW, VL, VNNI): one zmm = the 16 rows of a tile.
// Included only by isa_avx512.cpp, after its `#pragma GCC target`.
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "simd_avx2.h"   // its 8-lane float ops serve the attention here too (F8)

namespace {

struct Avx512 {
  static constexpr int LANES = 16;
  static constexpr int DOT_S_BIAS = 128;   // dot_s computes sum((w + 128) * x): vpdpbusd wants unsigned w
  static constexpr bool PAIRS16 = false;   // dot_u sums into int32 directly (kernel_body's group_dot)
  static constexpr int MAX_RN = 8;         // token rows per pass (8 float accumulators)
  using VB = __m512i;                      // 16 lanes x 4 bytes
  using VI = __m512i;
  using VF = __m512;
  using F8 = Avx2;                         // the attention's 8-lane float ops (attention_body.h)

  static inline VB loadb(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
  static inline VB nib_lo(VB b) { return _mm512_and_si512(b, _mm512_set1_epi8(0x0F)); }
  static inline VB nib_hi(VB b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(0x0F)); }
  template <int C> static inline VB crumb(VB b) {
    return _mm512_and_si512(C ? _mm512_srli_epi16(b, 2 * C) : b, _mm512_set1_epi8(3));
  }
  // ((b >> 2C) & 3) << 4, for Q6_K's top two bits
  template <int C> static inline VB crumb_hi4(VB b) {
    const VB s = C < 2 ? _mm512_slli_epi16(b, 4 - 2 * C) : (C == 2 ? b : _mm512_srli_epi16(b, 2));
    return _mm512_and_si512(s, _mm512_set1_epi8(0x30));
  }
  static inline VB or_(VB a, VB b) { return _mm512_or_si512(a, b); }
  // u + v in the bytes whose bit is set in the 64-bit little-endian mask at p
  static inline VB add_bits(VB u, const uint8_t* p, uint8_t v) {
    uint64_t m;
    memcpy(&m, p, 8);
    return _mm512_mask_add_epi8(u, (__mmask64)m, u, _mm512_set1_epi8((char)v));
  }
  static inline VB lookup(VB idx, const int8_t* table16) {
    const __m512i t = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)table16));
    return _mm512_shuffle_epi8(t, idx);
  }
  static inline VB sub8(VB u, int c) { return _mm512_sub_epi8(u, _mm512_set1_epi8((char)c)); }

  static inline VI seti(int32_t v) { return _mm512_set1_epi32(v); }
  static inline int32_t ld32(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }
  // acc + sum over each lane's 4 bytes of w (unsigned, < 128) times the 4 bytes at x (signed), broadcast
  static inline VI dot_u(VI acc, VB w, const int8_t* x) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(ld32(x))); }
  static inline VI dot_s(VI acc, VB w, const int8_t* x) {
    return _mm512_dpbusd_epi32(acc, _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)), _mm512_set1_epi32(ld32(x)));
  }

  static inline VF cvt(VI v) { return _mm512_cvtepi32_ps(v); }
  static inline VF fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
  static inline VF mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
  static inline VF setf(float v) { return _mm512_set1_ps(v); }
  static inline VF zerof() { return _mm512_setzero_ps(); }
  static inline VF f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static inline VF bf16(const uint8_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static inline VF u8f(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))); }
  static inline VF i8f(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
  static inline VF u8f_lo4(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)), _mm512_set1_epi32(15)));
  }
  static inline VF u8f_hi4(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)), 4));
  }
  // E8M0 exponent bytes -> 2^(e - 128) (layout.h e8m0_half): exponent field e - 1, or the subnormals for e < 2
  static inline VF e8m0_half(const uint8_t* p) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
    const __m512i sub = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
    return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(e, _mm512_set1_epi32(1)), sub, normal));
  }
  // byte R of each lane, sign-extended, as float
  template <int R> static inline VF byte_sf(VB w) {
    const VI v = R == 3 ? w : _mm512_slli_epi32(w, 24 - 8 * R);
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
  }
  static inline void store(float* p, VF v, int n) {
    if (n >= 16) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v);
  }

  // for attention
  static inline VF round16(VF v) { return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
  static inline VF loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storef(float* p, VF v) { _mm512_storeu_ps(p, v); }
  static inline VF add(VF a, VF b) { return _mm512_add_ps(a, b); }
  static inline float hsum(VF v) { return _mm512_reduce_add_ps(v); }
  // e^x for x <= 0 (softmax arguments); 2^n * p(r), r = x - n ln 2, |r| <= ln2 / 2, about 2 ulp
  static inline VF exp_neg(VF x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const VF n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    VF r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    VF p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
  }

  // double accumulators for the row-parallel matmuls (16 lanes as 2 x 8 doubles)
  struct VD { __m512d lo, hi; };
  static inline VD zerod() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static inline VD setd(double v) { return {_mm512_set1_pd(v), _mm512_set1_pd(v)}; }
  static inline VD to_d(VF v) {
    return {_mm512_cvtps_pd(_mm512_castps512_ps256(v)), _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))};
  }
  static inline VD to_d(VI v) { return {_mm512_cvtepi32_pd(_mm512_castsi512_si256(v)), _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(v, 1))}; }
  static inline VD mul_d(VD a, VD b) { return {_mm512_mul_pd(a.lo, b.lo), _mm512_mul_pd(a.hi, b.hi)}; }
  static inline VD fma_d(VD a, VD b, VD c) { return {_mm512_fmadd_pd(a.lo, b.lo, c.lo), _mm512_fmadd_pd(a.hi, b.hi, c.hi)}; }
  static inline void stored(double* p, VD v, int n) {
    if (n >= 16) { _mm512_storeu_pd(p, v.lo); _mm512_storeu_pd(p + 8, v.hi); return; }
    if (n <= 8) { _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1), v.lo); return; }
    _mm512_storeu_pd(p, v.lo);
    _mm512_mask_storeu_pd(p + 8, (__mmask8)((1u << (n - 8)) - 1), v.hi);
  }

  // integer scales of the K-quants, one per lane (super-block sums in integers)
  static inline VI u8i(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static inline VI i8i(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static inline VI lo4i(VI v) { return _mm512_and_si512(v, _mm512_set1_epi32(15)); }
  static inline VI hi4i(VI v) { return _mm512_srli_epi32(v, 4); }
  static inline VI mullo(VI a, VI b) { return _mm512_mullo_epi32(a, b); }
  static inline VI addi(VI a, VI b) { return _mm512_add_epi32(a, b); }
  static inline VI zeroi() { return _mm512_setzero_si512(); }
};

}  // namespace
