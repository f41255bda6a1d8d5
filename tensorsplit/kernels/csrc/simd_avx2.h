// SIMD traits for AVX2 + FMA + F16C: one ymm = 8 rows, so a 16-row tile is done in two halves.
// Integer dots use vpmaddubsw + vpmaddwd (no VNNI): unsigned codes stay below 128, so the pair sums
// of vpmaddubsw cannot saturate; signed codes use the sign trick (|w| and x carrying w's sign).
// Included only by isa_avx2.cpp, after its `#pragma GCC target`.
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

namespace {

struct Avx2 {
  static constexpr int LANES = 8;
  static constexpr int DOT_S_BIAS = 0;
  static constexpr int MAX_RN = 4;
  using VB = __m256i;
  using VI = __m256i;
  using VF = __m256;

  static inline VB loadb(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static inline VB nib_lo(VB b) { return _mm256_and_si256(b, _mm256_set1_epi8(0x0F)); }
  static inline VB nib_hi(VB b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0F)); }
  template <int C> static inline VB crumb(VB b) {
    return _mm256_and_si256(C ? _mm256_srli_epi16(b, 2 * C) : b, _mm256_set1_epi8(3));
  }
  template <int C> static inline VB crumb_hi4(VB b) {
    const VB s = C < 2 ? _mm256_slli_epi16(b, 4 - 2 * C) : (C == 2 ? b : _mm256_srli_epi16(b, 2));
    return _mm256_and_si256(s, _mm256_set1_epi8(0x30));
  }
  static inline VB or_(VB a, VB b) { return _mm256_or_si256(a, b); }
  // 32 mask bits at p -> v in the bytes whose bit is set
  static inline VB add_bits(VB u, const uint8_t* p, uint8_t v) {
    uint32_t m;
    memcpy(&m, p, 4);
    const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000LL, 0x0101010101010101LL,
                                            0x0202020202020202LL, 0x0303030303030303LL);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m), shuf);      // byte k = mask byte k/8
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    bytes = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);               // 0xFF where bit k is set
    return _mm256_add_epi8(u, _mm256_and_si256(bytes, _mm256_set1_epi8((char)v)));
  }
  static inline VB lookup(VB idx, const int8_t* table16) {
    const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)table16));
    return _mm256_shuffle_epi8(t, idx);
  }
  static inline VB sub8(VB u, int c) { return _mm256_sub_epi8(u, _mm256_set1_epi8((char)c)); }

  static inline VI seti(int32_t v) { return _mm256_set1_epi32(v); }
  static inline int32_t ld32(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }
  static inline VI dot_u(VI acc, VB w, const int8_t* x) {
    const __m256i p16 = _mm256_maddubs_epi16(w, _mm256_set1_epi32(ld32(x)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }
  // int16 pair sums of w (unsigned) times 4 bytes of x broadcast, and their widening (kernel_body's group_dot)
  static constexpr bool PAIRS16 = true;
  static inline VB pairs(VB w, const int8_t* x) { return _mm256_maddubs_epi16(w, _mm256_set1_epi32(ld32(x))); }
  static inline VB add16(VB a, VB b) { return _mm256_add_epi16(a, b); }
  static inline VI widen(VI acc, VB p) { return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1))); }
  static inline VI dot_s(VI acc, VB w, const int8_t* x) {
    const __m256i xv = _mm256_set1_epi32(ld32(x));
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }

  static inline VF cvt(VI v) { return _mm256_cvtepi32_ps(v); }
  static inline VF fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
  static inline VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
  static inline VF setf(float v) { return _mm256_set1_ps(v); }
  static inline VF zerof() { return _mm256_setzero_ps(); }
  static inline VF f16(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static inline VF bf16(const uint8_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static inline __m128i ld8(const uint8_t* p) { return _mm_loadl_epi64((const __m128i*)p); }
  static inline VF u8f(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(ld8(p))); }
  static inline VF i8f(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ld8(p))); }
  static inline VF u8f_lo4(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_cvtepu8_epi32(ld8(p)), _mm256_set1_epi32(15)));
  }
  static inline VF u8f_hi4(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_cvtepu8_epi32(ld8(p)), 4)); }
  // E8M0 exponent bytes -> 2^(e - 128) (layout.h e8m0_half): exponent field e - 1, or the subnormals for e < 2
  static inline VF e8m0_half(const uint8_t* p) {
    const __m256i e = _mm256_cvtepu8_epi32(ld8(p));
    const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    const __m256i sub = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
    return _mm256_castsi256_ps(_mm256_blendv_epi8(sub, normal, _mm256_cmpgt_epi32(e, _mm256_set1_epi32(1))));
  }
  template <int R> static inline VF byte_sf(VB w) {
    const VI v = R == 3 ? w : _mm256_slli_epi32(w, 24 - 8 * R);
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
  }
  static inline void store(float* p, VF v, int n) {
    if (n >= 8) { _mm256_storeu_ps(p, v); return; }
    float tmp[8];
    _mm256_storeu_ps(tmp, v);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }

  static inline VF round16(VF v) { return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
  static inline VF loadf(const float* p) { return _mm256_loadu_ps(p); }
  static inline void storef(float* p, VF v) { _mm256_storeu_ps(p, v); }
  static inline VF add(VF a, VF b) { return _mm256_add_ps(a, b); }
  static inline float hsum(VF v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline VF exp_neg(VF x) {   // see Avx512::exp_neg; 2^n built in the exponent field
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const VF n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    VF r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    VF p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }

  // double accumulators for the row-parallel matmuls (8 lanes as 2 x 4 doubles)
  struct VD { __m256d lo, hi; };
  static inline VD zerod() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static inline VD setd(double v) { return {_mm256_set1_pd(v), _mm256_set1_pd(v)}; }
  static inline VD to_d(VF v) { return {_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))}; }
  static inline VD to_d(VI v) { return {_mm256_cvtepi32_pd(_mm256_castsi256_si128(v)), _mm256_cvtepi32_pd(_mm256_extracti128_si256(v, 1))}; }
  static inline VD mul_d(VD a, VD b) { return {_mm256_mul_pd(a.lo, b.lo), _mm256_mul_pd(a.hi, b.hi)}; }
  static inline VD fma_d(VD a, VD b, VD c) { return {_mm256_fmadd_pd(a.lo, b.lo, c.lo), _mm256_fmadd_pd(a.hi, b.hi, c.hi)}; }
  static inline void stored(double* p, VD v, int n) {
    double tmp[8];
    _mm256_storeu_pd(tmp, v.lo);
    _mm256_storeu_pd(tmp + 4, v.hi);
    for (int i = 0; i < n && i < 8; ++i) p[i] = tmp[i];
  }

  static inline VI u8i(const uint8_t* p) { return _mm256_cvtepu8_epi32(ld8(p)); }
  static inline VI i8i(const uint8_t* p) { return _mm256_cvtepi8_epi32(ld8(p)); }
  static inline VI lo4i(VI v) { return _mm256_and_si256(v, _mm256_set1_epi32(15)); }
  static inline VI hi4i(VI v) { return _mm256_srli_epi32(v, 4); }
  static inline VI mullo(VI a, VI b) { return _mm256_mullo_epi32(a, b); }
  static inline VI addi(VI a, VI b) { return _mm256_add_epi32(a, b); }
  static inline VI zeroi() { return _mm256_setzero_si256(); }
  // for the attention's 8-lane kernels (attention_body.h: F8)
  using F8 = Avx2;
  static inline VF maxf(VF a, VF b) { return _mm256_max_ps(a, b); }
  // lane r: the sum of v[r]'s lanes as ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)): two rounds of hadd, then the
  // 128-bit halves added
  static inline VF hsum8(const VF* v) {
    const __m256 ab = _mm256_hadd_ps(v[0], v[1]), cd = _mm256_hadd_ps(v[2], v[3]);
    const __m256 ef = _mm256_hadd_ps(v[4], v[5]), gh = _mm256_hadd_ps(v[6], v[7]);
    const __m256 abcd = _mm256_hadd_ps(ab, cd), efgh = _mm256_hadd_ps(ef, gh);
    return _mm256_add_ps(_mm256_permute2f128_ps(abcd, efgh, 0x20), _mm256_permute2f128_ps(abcd, efgh, 0x31));
  }
  static inline VI hsum8i(const VI* v) {
    const __m256i ab = _mm256_hadd_epi32(v[0], v[1]), cd = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i ef = _mm256_hadd_epi32(v[4], v[5]), gh = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i abcd = _mm256_hadd_epi32(ab, cd), efgh = _mm256_hadd_epi32(ef, gh);
    return _mm256_add_epi32(_mm256_permute2x128_si256(abcd, efgh, 0x20), _mm256_permute2x128_si256(abcd, efgh, 0x31));
  }
  // lane l: sum over r < 4 of a[4l + r] * b[4l + r], int8 with |a|, |b| <= 127 (no int16 saturation)
  static inline VI idot32(const int8_t* a, const int8_t* b) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)a), y = _mm256_loadu_si256((const __m256i*)b);
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
  }
  // 16 bytes of q4_0 codes -> their 32 values minus 8 (low nibbles first)
  static inline void unpack_q4(const uint8_t* p, int8_t* out) {
    const __m128i b = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(15);
    const __m256i v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
    _mm256_storeu_si256((__m256i*)out, _mm256_sub_epi8(v, _mm256_set1_epi8(8)));
  }
  static inline VD addd(VD a, VD b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
  static inline double hsumd(VD v) {
    double d[8];
    _mm256_storeu_pd(d, v.lo);
    _mm256_storeu_pd(d + 4, v.hi);
    return ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]));
  }
};

}  // namespace
