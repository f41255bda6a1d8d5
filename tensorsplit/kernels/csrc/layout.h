// The tiled weight layout: GGUF blocks of 16 rows interleaved, so that one SIMD lane holds one row.
//
// A weight of n_rows x n_cols is stored as ceil(n_rows / 16) row tiles; a tile holds 16 rows
// (rows past n_rows are zero blocks). Along the columns a tile is a run of tile-blocks, one per
// GGUF block column (32 elements for the legacy formats, IQ4_NL and MXFP4, 256 for the K-quants and
// IQ4_XS). A tile-block holds the 16 rows' copies of that block, rearranged into planes:
//
//   scale planes   one field per row: 16 x f16 (d, dmin, m), 16 x one byte per group, or MXFP4's
//                  16 x E8M0 exponent bytes
//   code planes    per group of GS elements (GS = 32, or 16 for Q2_K/Q3_K/Q6_K), in CHUNKS = GS/4
//                  chunks of 64 bytes; byte 4*i + r of chunk j is element 4*j + r of row i's group.
//                  Stored packed:
//                    Q4 plane    GS/8 loads of 64 B; load t: low nibbles = chunk 2t, high = chunk 2t+1
//                    crumb plane one load of 64 B (GS = 16): bits 2c..2c+1 = chunk c
//                    mask plane  one 64-bit word per chunk: bit 4*i + r = one extra code bit
//                    byte plane  one 64 B load per chunk (Q8_0)
//
// One chunk is then a vector of 16 lanes x 4 consecutive codes of one row, so a decode step
// multiplies it with 4 consecutive activation bytes broadcast to every lane: no horizontal sums,
// and the 16 outputs of a tile are 16 lanes. The bytes are those of the GGUF blocks, moved; only
// Q3_K, Q4_K, Q5_K and IQ4_XS widen their 6-bit scales to bytes (2-4% more).
//
// This header has no SIMD and no torch: repack.cpp (scalar) and the kernels (per instruction set)
// both include it.
#pragma once
#include <stdint.h>
#include <string.h>

namespace ts {

constexpr int TILE_ROWS = 16;

// GGML type ids (ggml.h)
enum Type : int {
  T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
  T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20, T_IQ4_XS = 23,
  T_BF16 = 30, T_MXFP4 = 39, T_COUNT = 40,
};

// IQ4_NL / IQ4_XS non-linear code values (ggml's kvalues_iq4nl)
static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// MXFP4: the E2M1 code values doubled (ggml's kvalues_mxfp4: 0, 1, 2, 3, 4, 6, 8, 12 and their negatives),
// plus 12, so that every code is a byte in [0, 24]: the kernels dot them as unsigned codes with
// offset 12 (kernel_body.h FMXFP4), which AVX2 sums in int16 pairs without the sign trick.
constexpr int MXFP4_OFFSET = 12;
static const int8_t MXFP4_VALUES[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

// An E8M0 exponent byte e as the float 2^(e - 128): MXFP4's scale 2^(e - 127) halved for the doubled
// codes (ggml's GGML_E8M0_TO_FP32_HALF). e = 0 and 1 give the subnormals 2^-128 and 2^-127; e = 255
// (E8M0's NaN) gives 2^127, as ggml's does.
static inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// Round half to even, as the x86 paths of ggml do (_mm256_round_ps, and nearest_int's magic number), for
// |v| < 2^22: the activation quantizer (kernel_body.h) and the q8_0 KV cache (kv_cache.h).
static inline int round_even(float v) {
  float r = v + 12582912.0f;   // 1.5 * 2^23: the float addition rounds to an integer, ties to even
  r -= 12582912.0f;
  return (int)r;
}

// Round to nearest even f16, as F16C's vcvtps2ph (and ggml's GGML_FP32_TO_FP16) do.
static inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  uint32_t absx = x & 0x7FFFFFFF;
  if (absx >= 0x7F800000) return (uint16_t)(sign | 0x7C00 | (absx > 0x7F800000 ? 0x200 : 0));
  if (absx >= 0x477FF000) return (uint16_t)(sign | 0x7C00);           // rounds to inf
  if (absx < 0x38800000) {                                              // f16 subnormal or zero
    if (absx < 0x33000000) return (uint16_t)sign;                       // below half the smallest subnormal
    const uint32_t e = absx >> 23, m = (absx & 0x7FFFFF) | 0x800000;
    const uint32_t shift = 126 - e;                                     // 14 + (113 - e) - ... : m >> shift
    uint32_t half = m >> shift, rem = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return (uint16_t)(sign | half);
  }
  uint32_t h = ((absx >> 13) - ((127 - 15) << 10));
  const uint32_t rem = absx & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return (uint16_t)(sign | h);
}

static inline uint16_t rd16(const uint8_t* p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void wr16(uint8_t* p, uint16_t v) { memcpy(p, &v, 2); }

// ---- plane addressing (lane i = row within the tile, e = element within the group) ----------
// Q4 plane: element e -> chunk j = e/4, load j/2, nibble j%2, byte 4i + e%4
static inline void q4_set(uint8_t* plane, int i, int e, uint8_t v) {
  const int j = e >> 2, r = e & 3;
  uint8_t* b = plane + 64 * (j >> 1) + 4 * i + r;
  *b = (j & 1) ? (uint8_t)((*b & 0x0F) | (v << 4)) : (uint8_t)((*b & 0xF0) | (v & 0x0F));
}
static inline uint8_t q4_get(const uint8_t* plane, int i, int e) {
  const int j = e >> 2, r = e & 3;
  const uint8_t b = plane[64 * (j >> 1) + 4 * i + r];
  return (j & 1) ? (uint8_t)(b >> 4) : (uint8_t)(b & 0x0F);
}
// crumb plane (GS = 16): element e -> bits 2*(e/4) of byte 4i + e%4
static inline void crumb_set(uint8_t* plane, int i, int e, uint8_t v) {
  const int c = e >> 2, r = e & 3;
  uint8_t* b = plane + 4 * i + r;
  *b = (uint8_t)((*b & ~(3 << (2 * c))) | ((v & 3) << (2 * c)));
}
static inline uint8_t crumb_get(const uint8_t* plane, int i, int e) {
  return (plane[4 * (i) + (e & 3)] >> (2 * (e >> 2))) & 3;
}
// mask plane: element e -> bit 4i + e%4 of the 64-bit word of chunk e/4
static inline void bit_set(uint8_t* plane, int i, int e, int v) {
  const int j = e >> 2, k = 4 * i + (e & 3);
  uint8_t* b = plane + 8 * j + (k >> 3);
  *b = (uint8_t)((*b & ~(1 << (k & 7))) | ((v & 1) << (k & 7)));
}
static inline int bit_get(const uint8_t* plane, int i, int e) {
  const int j = e >> 2, k = 4 * i + (e & 3);
  return (plane[8 * j + (k >> 3)] >> (k & 7)) & 1;
}
// byte plane (Q8_0): element e -> byte 64*(e/4) + 4i + e%4
static inline uint8_t* byte_at(uint8_t* plane, int i, int e) { return plane + 64 * (e >> 2) + 4 * i + (e & 3); }
static inline uint8_t byte_get(const uint8_t* plane, int i, int e) { return plane[64 * (e >> 2) + 4 * i + (e & 3)]; }

// ---- per-format geometry -----------------------------------------------------------------------
// BLOCK elements and BB bytes of a GGUF block; GS elements per scale group; TB bytes of a tile-block
// (16 rows of one block column). Offsets are byte offsets inside a tile-block.
struct Q4_0 { static constexpr int BLOCK = 32, BB = 18, GS = 32, TB = 288, D = 0, QS = 32; };
struct Q4_1 { static constexpr int BLOCK = 32, BB = 20, GS = 32, TB = 320, D = 0, M = 32, QS = 64; };
struct Q5_0 { static constexpr int BLOCK = 32, BB = 22, GS = 32, TB = 352, D = 0, QH = 32, QS = 96; };
struct Q5_1 { static constexpr int BLOCK = 32, BB = 24, GS = 32, TB = 384, D = 0, M = 32, QH = 64, QS = 128; };
struct Q8_0 { static constexpr int BLOCK = 32, BB = 34, GS = 32, TB = 544, D = 0, QS = 32; };
struct IQ4_NL { static constexpr int BLOCK = 32, BB = 18, GS = 32, TB = 288, D = 0, QS = 32; };
// MXFP4: the scale plane keeps each row's E8M0 exponent byte as it is (E). Its value, 2^(e - 128), can
// be as small as 2^-128 or as large as 2^127: no f16 holds that range, and a float32 per row would make
// a tile-block 320 bytes instead of 272 (18% more to stream in a memory-bound GEMV). The kernels turn the
// 16 bytes into floats in registers (S::e8m0_half).
struct MXFP4 { static constexpr int BLOCK = 32, BB = 17, GS = 32, TB = 272, E = 0, QS = 16; };
// K-quants: per group g, SC + 16g (and MN + 16g) hold one byte per row; code planes per group follow
struct Q2_K { static constexpr int BLOCK = 256, BB = 84, GS = 16, TB = 1344, D = 0, DM = 32, SC = 64, QS = 320; };
struct Q3_K { static constexpr int BLOCK = 256, BB = 110, GS = 16, TB = 1824, D = 0, SC = 32, QS = 288, QH = 1312; };
struct Q4_K { static constexpr int BLOCK = 256, BB = 144, GS = 32, TB = 2368, D = 0, DM = 32, SC = 64, MN = 192, QS = 320; };
struct Q5_K { static constexpr int BLOCK = 256, BB = 176, GS = 32, TB = 2880, D = 0, DM = 32, SC = 64, MN = 192, QH = 320, QS = 832; };
struct Q6_K { static constexpr int BLOCK = 256, BB = 210, GS = 16, TB = 3360, D = 0, SC = 32, QS = 288, QH = 2336; };
struct IQ4_XS { static constexpr int BLOCK = 256, BB = 136, GS = 32, TB = 2208, D = 0, SC = 32, QS = 160; };

// Bytes per group of the code planes: Q4 plane GS/2, crumb plane GS/4 ... (per 16 rows)
constexpr int Q4_PLANE(int gs) { return 8 * gs; }        // 16 rows x gs/2 bytes
constexpr int CRUMB_PLANE(int gs) { return 4 * gs; }     // 16 rows x gs/4 bytes
constexpr int MASK_PLANE(int gs) { return 2 * gs; }      // 16 rows x gs/8 bytes
constexpr int BYTE_PLANE(int gs) { return 16 * gs; }

struct FormatInfo {
  int block, block_bytes, group, tile_block;   // 0 for unsupported types
};

static inline FormatInfo format_info(int type) {
  switch (type) {
    case T_Q4_0: return {Q4_0::BLOCK, Q4_0::BB, Q4_0::GS, Q4_0::TB};
    case T_Q4_1: return {Q4_1::BLOCK, Q4_1::BB, Q4_1::GS, Q4_1::TB};
    case T_Q5_0: return {Q5_0::BLOCK, Q5_0::BB, Q5_0::GS, Q5_0::TB};
    case T_Q5_1: return {Q5_1::BLOCK, Q5_1::BB, Q5_1::GS, Q5_1::TB};
    case T_Q8_0: return {Q8_0::BLOCK, Q8_0::BB, Q8_0::GS, Q8_0::TB};
    case T_IQ4_NL: return {IQ4_NL::BLOCK, IQ4_NL::BB, IQ4_NL::GS, IQ4_NL::TB};
    case T_MXFP4: return {MXFP4::BLOCK, MXFP4::BB, MXFP4::GS, MXFP4::TB};
    case T_Q2_K: return {Q2_K::BLOCK, Q2_K::BB, Q2_K::GS, Q2_K::TB};
    case T_Q3_K: return {Q3_K::BLOCK, Q3_K::BB, Q3_K::GS, Q3_K::TB};
    case T_Q4_K: return {Q4_K::BLOCK, Q4_K::BB, Q4_K::GS, Q4_K::TB};
    case T_Q5_K: return {Q5_K::BLOCK, Q5_K::BB, Q5_K::GS, Q5_K::TB};
    case T_Q6_K: return {Q6_K::BLOCK, Q6_K::BB, Q6_K::GS, Q6_K::TB};
    case T_IQ4_XS: return {IQ4_XS::BLOCK, IQ4_XS::BB, IQ4_XS::GS, IQ4_XS::TB};
    case T_F16: return {1, 2, 1, 32};
    case T_BF16: return {1, 2, 1, 32};
    default: return {0, 0, 0, 0};
  }
}

// Which activation quantization an integer matmul against `type` takes (llama.cpp's vec_dot_type):
// 0 = Q8_0 (blocks of 32, f16 scale), 1 = Q8_1 (the same, plus an f16 scaled sum), 2 = Q8_K
// (blocks of 256, f32 scale), -1 = none (float weights: activations stay float)
enum ActKind : int { A_Q8_0 = 0, A_Q8_1 = 1, A_Q8_K = 2, A_NONE = -1 };

static inline int act_kind(int type) {
  switch (type) {
    case T_Q4_0: case T_Q5_0: case T_Q8_0: case T_IQ4_NL: case T_MXFP4: return A_Q8_0;
    case T_Q4_1: case T_Q5_1: return A_Q8_1;
    case T_Q2_K: case T_Q3_K: case T_Q4_K: case T_Q5_K: case T_Q6_K: case T_IQ4_XS: return A_Q8_K;
    default: return A_NONE;
  }
}

}  // namespace ts
