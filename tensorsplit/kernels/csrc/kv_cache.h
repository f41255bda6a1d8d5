// What a KV cache stores per value, and one head's row of it to and from float32: the C++ side of
// kernels/kv_types.py, with the same layout and the same bits (llama.cpp's: f16 and bf16 rounded to
// nearest even; q8_0 as ggml-cpu's x86 quantize_row_q8_0, q4_0 as quantize_row_q4_0_ref).
// No SIMD and no torch: ops.cpp and the attention bodies (per instruction set) both include it.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "layout.h"

namespace ts {

enum KvType : int { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_Q8_0 = 3, KV_Q4_0 = 4 };

constexpr int KV_QK = 32;     // values per block of q8_0 / q4_0

static inline int64_t kv_row_bytes(int type, int64_t hd) {
  switch (type) {
    case KV_F32: return 4 * hd;
    case KV_F16: case KV_BF16: return 2 * hd;
    case KV_Q8_0: return hd / KV_QK * 34;
    default: return hd / KV_QK * 18;
  }
}

static inline uint16_t f32_to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);       // NaN stays NaN (quiet)
  return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);                    // nearest, ties to even
}

static inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// x (hd,) -> one row of the cache's type at dst
static inline void kv_encode_row(const float* x, int64_t hd, int type, uint8_t* dst) {
  if (type == KV_F32) {
    memcpy(dst, x, (size_t)hd * 4);
  } else if (type == KV_F16 || type == KV_BF16) {
    for (int64_t i = 0; i < hd; ++i) {
      const uint16_t h = type == KV_F16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
      memcpy(dst + 2 * i, &h, 2);
    }
  } else if (type == KV_Q8_0) {
    for (int64_t b = 0; b < hd / KV_QK; ++b, dst += 34) {
      const float* xb = x + b * KV_QK;
      float amax = 0.0f;
      for (int j = 0; j < KV_QK; ++j) amax = fabsf(xb[j]) > amax ? fabsf(xb[j]) : amax;
      const uint16_t d = f32_to_f16(amax / 127.0f);
      const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
      memcpy(dst, &d, 2);
      for (int j = 0; j < KV_QK; ++j) dst[2 + j] = (uint8_t)(int8_t)round_even(xb[j] * inv);
    }
  } else {                                                        // q4_0
    for (int64_t b = 0; b < hd / KV_QK; ++b, dst += 18) {
      const float* xb = x + b * KV_QK;
      float amax = 0.0f, m = 0.0f;
      for (int j = 0; j < KV_QK; ++j)
        if (amax < fabsf(xb[j])) { amax = fabsf(xb[j]); m = xb[j]; }
      const float d = m / -8.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
      const uint16_t dh = f32_to_f16(d);
      memcpy(dst, &dh, 2);
      for (int j = 0; j < KV_QK / 2; ++j) {
        int lo = (int)(int8_t)(xb[j] * inv + 8.5f), hi = (int)(int8_t)(xb[j + 16] * inv + 8.5f);
        lo = lo < 15 ? lo : 15;
        hi = hi < 15 ? hi : 15;
        dst[2 + j] = (uint8_t)(lo | (hi << 4));
      }
    }
  }
}

// one row of the cache's type -> x (hd,) float32 (scalar; the attention bodies vectorize the float types)
static inline void kv_decode_row(const uint8_t* src, int64_t hd, int type, float* x) {
  if (type == KV_F32) {
    memcpy(x, src, (size_t)hd * 4);
  } else if (type == KV_F16 || type == KV_BF16) {
    for (int64_t i = 0; i < hd; ++i) {
      uint16_t h;
      memcpy(&h, src + 2 * i, 2);
      x[i] = type == KV_F16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
  } else if (type == KV_Q8_0) {
    for (int64_t b = 0; b < hd / KV_QK; ++b, src += 34) {
      const float d = f16_to_f32(rd16(src));
      for (int j = 0; j < KV_QK; ++j) x[b * KV_QK + j] = (float)(int8_t)src[2 + j] * d;
    }
  } else {
    for (int64_t b = 0; b < hd / KV_QK; ++b, src += 18) {
      const float d = f16_to_f32(rd16(src));
      for (int j = 0; j < KV_QK / 2; ++j) {
        x[b * KV_QK + j] = (float)((int)(src[2 + j] & 15) - 8) * d;
        x[b * KV_QK + j + 16] = (float)((int)(src[2 + j] >> 4) - 8) * d;
      }
    }
  }
}

// The Walsh-Hadamard rotation of a quantized cache (kernels/kv_types.py k_rotation, v_rotation, rotate): the
// chunk size for keys (and q) and for values (and the attention's output), 0 for none
static inline int64_t kv_k_rotation(int type, int64_t hd) {
  if (type < KV_Q8_0 || hd % 64) return 0;
  int64_t n = 64;
  while (hd % (2 * n) == 0) n *= 2;
  return n;
}
static inline int64_t kv_v_rotation(int type, int64_t hd) { return type >= KV_Q8_0 && hd % 64 == 0 ? 64 : 0; }

// x (hd,) in place: each chunk of n values through the butterflies (a + b, a - b) over pairs h apart, h = 1,
// 2, .., n / 2, then times 1 / sqrt(n) (float32)
static inline void kv_rotate(float* x, int64_t hd, int64_t n) {
  if (!n) return;
  const float scale = 1.0f / sqrtf((float)n);
  for (int64_t c = 0; c < hd; c += n) {
    float* y = x + c;
    for (int64_t h = 1; h < n; h *= 2)
      for (int64_t i = 0; i < n; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = y[j], b = y[j + h];
          y[j] = a + b;
          y[j + h] = a - b;
        }
    for (int64_t j = 0; j < n; ++j) y[j] *= scale;
  }
}

// x as the cache gives it back (a step's own keys, read before or without the cache)
static inline void kv_round_trip(const float* x, int64_t hd, int type, uint8_t* buf, float* out) {
  if (type == KV_F32) {
    memcpy(out, x, (size_t)hd * 4);
    return;
  }
  kv_encode_row(x, hd, type, buf);
  kv_decode_row(buf, hd, type, out);
}

}  // namespace ts
