// Portable "SIMD" traits: N lanes (16; 8 for the attention's F8) as plain arrays, for CPUs without AVX2 (and any non-x86 CPU).
// Same arithmetic, in the same order per lane, as the vector paths: integer dots are exact, and
// every float operation is one fma / mul per lane (std::fma), so results match them bit for bit.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "layout.h"

namespace {

template <int N>
struct ScalarN {
  static constexpr int LANES = N;
  using F8 = ScalarN<8>;   // the attention's 8-lane float ops (attention_body.h)
  static constexpr int DOT_S_BIAS = 0;
  static constexpr bool PAIRS16 = false;   // dot_u sums into int32 directly (kernel_body's group_dot)
  static constexpr int MAX_RN = 4;
  struct VB { uint8_t b[4 * N]; };
  struct VI { int32_t v[N]; };
  struct VF { float v[N]; };

  static inline VB loadb(const uint8_t* p) { VB r; memcpy(r.b, p, 4 * N); return r; }
  static inline VB nib_lo(VB b) { for (int k = 0; k < 4 * N; ++k) b.b[k] &= 0x0F; return b; }
  static inline VB nib_hi(VB b) { for (int k = 0; k < 4 * N; ++k) b.b[k] >>= 4; return b; }
  template <int C> static inline VB crumb(VB b) { for (int k = 0; k < 4 * N; ++k) b.b[k] = (b.b[k] >> (2 * C)) & 3; return b; }
  template <int C> static inline VB crumb_hi4(VB b) { for (int k = 0; k < 4 * N; ++k) b.b[k] = (uint8_t)(((b.b[k] >> (2 * C)) & 3) << 4); return b; }
  static inline VB or_(VB a, VB b) { for (int k = 0; k < 4 * N; ++k) a.b[k] |= b.b[k]; return a; }
  static inline VB add_bits(VB u, const uint8_t* p, uint8_t v) {
    for (int k = 0; k < 4 * N; ++k) if ((p[k >> 3] >> (k & 7)) & 1) u.b[k] = (uint8_t)(u.b[k] + v);
    return u;
  }
  static inline VB lookup(VB idx, const int8_t* table16) {
    for (int k = 0; k < 4 * N; ++k) idx.b[k] = (uint8_t)table16[idx.b[k] & 15];
    return idx;
  }
  static inline VB sub8(VB u, int c) { for (int k = 0; k < 4 * N; ++k) u.b[k] = (uint8_t)(u.b[k] - c); return u; }

  static inline VI seti(int32_t x) { VI r; for (int i = 0; i < N; ++i) r.v[i] = x; return r; }
  static inline VI dot_u(VI acc, VB w, const int8_t* x) {
    for (int i = 0; i < N; ++i)
      for (int r = 0; r < 4; ++r) acc.v[i] += (int32_t)w.b[4 * i + r] * (int32_t)x[r];
    return acc;
  }
  static inline VI dot_s(VI acc, VB w, const int8_t* x) {
    for (int i = 0; i < N; ++i)
      for (int r = 0; r < 4; ++r) acc.v[i] += (int32_t)(int8_t)w.b[4 * i + r] * (int32_t)x[r];
    return acc;
  }

  static inline VF cvt(VI a) { VF r; for (int i = 0; i < N; ++i) r.v[i] = (float)a.v[i]; return r; }
  static inline VF fma(VF a, VF b, VF c) { for (int i = 0; i < N; ++i) c.v[i] = fmaf(a.v[i], b.v[i], c.v[i]); return c; }
  static inline VF mul(VF a, VF b) { for (int i = 0; i < N; ++i) a.v[i] *= b.v[i]; return a; }
  static inline VF setf(float x) { VF r; for (int i = 0; i < N; ++i) r.v[i] = x; return r; }
  static inline VF zerof() { return setf(0.0f); }
  static inline VF f16(const uint8_t* p) { VF r; for (int i = 0; i < N; ++i) r.v[i] = ts::f16_to_f32(ts::rd16(p + 2 * i)); return r; }
  static inline VF bf16(const uint8_t* p) {
    VF r;
    for (int i = 0; i < N; ++i) { uint32_t u = (uint32_t)ts::rd16(p + 2 * i) << 16; memcpy(&r.v[i], &u, 4); }
    return r;
  }
  static inline VF u8f(const uint8_t* p) { VF r; for (int i = 0; i < N; ++i) r.v[i] = (float)p[i]; return r; }
  static inline VF i8f(const uint8_t* p) { VF r; for (int i = 0; i < N; ++i) r.v[i] = (float)(int8_t)p[i]; return r; }
  static inline VF u8f_lo4(const uint8_t* p) { VF r; for (int i = 0; i < N; ++i) r.v[i] = (float)(p[i] & 15); return r; }
  static inline VF u8f_hi4(const uint8_t* p) { VF r; for (int i = 0; i < N; ++i) r.v[i] = (float)(p[i] >> 4); return r; }
  static inline VF e8m0_half(const uint8_t* p) { VF r; for (int i = 0; i < N; ++i) r.v[i] = ts::e8m0_half(p[i]); return r; }
  template <int R> static inline VF byte_sf(VB w) { VF r; for (int i = 0; i < N; ++i) r.v[i] = (float)(int8_t)w.b[4 * i + R]; return r; }
  static inline void store(float* p, VF v, int n) { for (int i = 0; i < n && i < N; ++i) p[i] = v.v[i]; }

  static inline VF round16(VF v) { for (int i = 0; i < N; ++i) v.v[i] = ts::f16_to_f32(ts::f32_to_f16(v.v[i])); return v; }
  static inline VF loadf(const float* p) { VF r; memcpy(r.v, p, 4 * N); return r; }
  static inline void storef(float* p, VF v) { memcpy(p, v.v, 4 * N); }
  static inline VF add(VF a, VF b) { for (int i = 0; i < N; ++i) a.v[i] += b.v[i]; return a; }
  static inline float hsum(VF v) { float s = 0.0f; for (int i = 0; i < N; ++i) s += v.v[i]; return s; }
  static inline VF exp_neg(VF x) { for (int i = 0; i < N; ++i) x.v[i] = expf(x.v[i]); return x; }

  struct VD { double v[N]; };
  static inline VD zerod() { return setd(0.0); }
  static inline VD setd(double x) { VD r; for (int i = 0; i < N; ++i) r.v[i] = x; return r; }
  static inline VD to_d(VF a) { VD r; for (int i = 0; i < N; ++i) r.v[i] = (double)a.v[i]; return r; }
  static inline VD to_d(VI a) { VD r; for (int i = 0; i < N; ++i) r.v[i] = (double)a.v[i]; return r; }
  static inline VD mul_d(VD a, VD b) { for (int i = 0; i < N; ++i) a.v[i] *= b.v[i]; return a; }
  static inline VD fma_d(VD a, VD b, VD c) { for (int i = 0; i < N; ++i) c.v[i] = ::fma(a.v[i], b.v[i], c.v[i]); return c; }
  static inline void stored(double* p, VD v, int n) { for (int i = 0; i < n && i < N; ++i) p[i] = v.v[i]; }

  static inline VI u8i(const uint8_t* p) { VI r; for (int i = 0; i < N; ++i) r.v[i] = p[i]; return r; }
  static inline VI i8i(const uint8_t* p) { VI r; for (int i = 0; i < N; ++i) r.v[i] = (int8_t)p[i]; return r; }
  static inline VI lo4i(VI a) { for (int i = 0; i < N; ++i) a.v[i] &= 15; return a; }
  static inline VI hi4i(VI a) { for (int i = 0; i < N; ++i) a.v[i] = (int32_t)((uint32_t)a.v[i] >> 4); return a; }
  static inline VI mullo(VI a, VI b) { for (int i = 0; i < N; ++i) a.v[i] *= b.v[i]; return a; }
  static inline VI addi(VI a, VI b) { for (int i = 0; i < N; ++i) a.v[i] += b.v[i]; return a; }
  static inline VI zeroi() { return seti(0); }
  // for the attention's 8-lane kernels (attention_body.h); the same arithmetic as Avx2's
  static inline VF maxf(VF a, VF b) { for (int i = 0; i < N; ++i) a.v[i] = b.v[i] > a.v[i] ? b.v[i] : a.v[i]; return a; }
  static inline VF hsum8(const VF* x) {
    static_assert(N == 8, "hsum8 is the 8-lane traits'");
    VF r;
    for (int i = 0; i < N; ++i) {
      const float* v = x[i].v;
      r.v[i] = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    }
    return r;
  }
  static inline VI hsum8i(const VI* x) {
    static_assert(N == 8, "hsum8i is the 8-lane traits'");
    VI r;
    for (int i = 0; i < N; ++i) { int32_t s = 0; for (int l = 0; l < 8; ++l) s += x[i].v[l]; r.v[i] = s; }
    return r;
  }
  static inline VI idot32(const int8_t* a, const int8_t* b) {
    VI r;
    for (int i = 0; i < N; ++i) {
      int32_t s = 0;
      for (int k = 0; k < 4; ++k) s += (int32_t)a[4 * i + k] * (int32_t)b[4 * i + k];
      r.v[i] = s;
    }
    return r;
  }
  static inline void unpack_q4(const uint8_t* p, int8_t* out) {
    for (int j = 0; j < 16; ++j) { out[j] = (int8_t)((p[j] & 15) - 8); out[j + 16] = (int8_t)((p[j] >> 4) - 8); }
  }
  static inline VD addd(VD a, VD b) { for (int i = 0; i < N; ++i) a.v[i] += b.v[i]; return a; }
  static inline double hsumd(VD v) {
    const double* d = v.v;
    return ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]));
  }
};

using Scalar = ScalarN<16>;

}  // namespace
