// The gated activations of an FFN row, shared by the glu op (elementwise.cpp) and the experts op
// (experts.cpp), so that a mixture of experts' fused decode and its per-expert eager path agree bit for bit.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <cstring>

#include "layout.h"

namespace ts {

enum GluKind : int {
  GLU_SILU = 0,        // silu(g) * u, e^x by exp_poly
  GLU_GELU_TABLE = 1,  // gelu(tanh)(g) * u by `table` (65536 float32 values indexed by the f16 bits of g,
                       // ggml's GGML_GELU_FP16) within (-10, 10), else 0 below and g above
  GLU_SWIGLU_OAI = 2,  // gpt-oss: x = min(g, 7), x * sigmoid(1.702 x) * (clamp(u, -7, 7) + 1) (ggml_swiglu_oai)
};

// e^x for SiLU: Cody-Waite reduction by ln 2 and Cephes' degree-6 polynomial (within 2 ulp over the clamped
// range), in plain float arithmetic with no library call and no branch, so the compiler vectorizes the loop
// that calls it, and every machine gets the same bits (no FMA contraction: -ffp-contract=off).
// v where `keep`, else w: a select in bits, which the vectorizer takes where it will not take a branch
static inline float select(bool keep, float v, float w) {
  uint32_t a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, &w, sizeof b);
  const uint32_t m = 0u - (uint32_t)keep, r = (a & m) | (b & ~m);
  float out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}

static inline float exp_poly(float x) {
  x = select(x < -87.0f, -87.0f, x);
  x = select(x > 88.0f, 88.0f, x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;    // round(x / ln 2), ties even
  const float r = (x - n * 0.693145751953125f) - n * 1.428606820309417232e-6f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;                              // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// o[i] = act(g[i]) * u[i] for i < ff (see GluKind)
static inline void glu_row(int kind, const float* g, const float* u, float* o, int64_t ff, const float* table) {
  if (kind == GLU_SILU) {
    for (int64_t i = 0; i < ff; ++i) o[i] = g[i] / (1.0f + exp_poly(-g[i])) * u[i];
  } else if (kind == GLU_GELU_TABLE) {
    for (int64_t i = 0; i < ff; ++i) {
      const float x = g[i];
      const float a = x <= -10.0f ? 0.0f : x >= 10.0f ? x : table[f32_to_f16(x)];
      o[i] = a * u[i];
    }
  } else {
    for (int64_t i = 0; i < ff; ++i) {
      const float x = std::min(g[i], 7.0f), y = std::min(std::max(u[i], -7.0f), 7.0f);
      o[i] = x / (1.0f + exp_poly(-1.702f * x)) * (y + 1.0f);
    }
  }
}

}  // namespace ts
