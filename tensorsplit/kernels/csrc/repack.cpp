// GGUF blocks <-> the tiled layout (layout.h), one block of one row at a time. Scalar code:
// it runs once per weight at load (repack) and for the few rows an embedding lookup reads (unpack).
// The two directions are inverses; tests check unpack(repack(rows)) == rows for every format.
#include "repack.h"

namespace ts {
namespace {

// K-quant 6-bit scales ------------------------------------------------------------------------
// Q4_K / Q5_K: 8 scales and 8 mins of 6 bits in 12 bytes (ggml's get_scale_min_k4)
void k4_scales_get(const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = q[j] & 63;
    mn[j] = q[j + 4] & 63;
    sc[j + 4] = (uint8_t)((q[j + 8] & 0x0F) | ((q[j] >> 6) << 4));
    mn[j + 4] = (uint8_t)((q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4));
  }
}
void k4_scales_put(uint8_t* q, const uint8_t* sc, const uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    q[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    q[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    q[j + 8] = (uint8_t)((sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4));
  }
}
// Q3_K: 16 scales of 6 bits in 12 bytes: low nibbles in bytes 0-7 (index g and g + 8), the top two
// bits of scale 4k + j at bits 2k of byte 8 + j
uint8_t q3_scale_get(const uint8_t* s, int g) {
  const uint8_t lo = g < 8 ? (s[g] & 0x0F) : (s[g - 8] >> 4);
  const uint8_t hi = (s[8 + (g & 3)] >> (2 * (g >> 2))) & 3;
  return (uint8_t)(lo | (hi << 4));
}
void q3_scales_put(uint8_t* s, const uint8_t* v) {
  memset(s, 0, 12);
  for (int g = 0; g < 16; ++g) {
    if (g < 8) s[g] = (uint8_t)((s[g] & 0xF0) | (v[g] & 0x0F));
    else s[g - 8] = (uint8_t)((s[g - 8] & 0x0F) | ((v[g] & 0x0F) << 4));
    s[8 + (g & 3)] |= (uint8_t)(((v[g] >> 4) & 3) << (2 * (g >> 2)));
  }
}
// IQ4_XS: 8 scales of 6 bits: low nibbles in scales_l[4] (index 2b + nibble), top bits in the u16 scales_h
uint8_t iq4xs_scale_get(const uint8_t* blk, int g) {
  const uint16_t sh = rd16(blk + 2);
  const uint8_t lo = (blk[4 + g / 2] >> (4 * (g & 1))) & 0x0F;
  return (uint8_t)(lo | (((sh >> (2 * g)) & 3) << 4));
}

// nibble pair layout of Q4_0/Q4_1/Q5_x/IQ4/MXFP4: element j < 16 is the low nibble of qs[j], j >= 16 the high one
inline uint8_t legacy_nib(const uint8_t* qs, int e) { return e < 16 ? (qs[e] & 0x0F) : (qs[e - 16] >> 4); }
inline void legacy_nib_put(uint8_t* qs, int e, uint8_t v) {
  if (e < 16) qs[e] = (uint8_t)((qs[e] & 0xF0) | (v & 0x0F));
  else qs[e - 16] = (uint8_t)((qs[e - 16] & 0x0F) | (v << 4));
}

void pack_legacy4(const uint8_t* qs, uint8_t* plane, int i) {
  for (int e = 0; e < 32; ++e) q4_set(plane, i, e, legacy_nib(qs, e));
}
void unpack_legacy4(const uint8_t* plane, int i, uint8_t* qs) {
  for (int e = 0; e < 32; ++e) legacy_nib_put(qs, e, q4_get(plane, i, e));
}

// Q2_K / Q3_K / Q6_K elements: e = 128 n + 32 k + l (n = half, k = shift index, l < 32)
}  // namespace

void pack_block(int type, const uint8_t* blk, uint8_t* tb, int i) {
  switch (type) {
    case T_Q4_0: case T_IQ4_NL:
      wr16(tb + Q4_0::D + 2 * i, rd16(blk));
      pack_legacy4(blk + 2, tb + Q4_0::QS, i);
      break;
    case T_MXFP4:
      tb[MXFP4::E + i] = blk[0];
      pack_legacy4(blk + 1, tb + MXFP4::QS, i);
      break;
    case T_Q4_1:
      wr16(tb + Q4_1::D + 2 * i, rd16(blk));
      wr16(tb + Q4_1::M + 2 * i, rd16(blk + 2));
      pack_legacy4(blk + 4, tb + Q4_1::QS, i);
      break;
    case T_Q5_0: case T_Q5_1: {
      const bool m = type == T_Q5_1;
      const int qh_off = m ? 4 : 2, qs_off = m ? 8 : 6;
      wr16(tb + Q5_0::D + 2 * i, rd16(blk));
      if (m) wr16(tb + Q5_1::M + 2 * i, rd16(blk + 2));
      uint32_t qh;
      memcpy(&qh, blk + qh_off, 4);
      uint8_t* qhp = tb + (m ? Q5_1::QH : Q5_0::QH);
      for (int e = 0; e < 32; ++e) bit_set(qhp, i, e, (qh >> e) & 1);
      pack_legacy4(blk + qs_off, tb + (m ? Q5_1::QS : Q5_0::QS), i);
      break;
    }
    case T_Q8_0:
      wr16(tb + Q8_0::D + 2 * i, rd16(blk));
      for (int e = 0; e < 32; ++e) *byte_at(tb + Q8_0::QS, i, e) = blk[2 + e];
      break;
    case T_Q2_K:
      wr16(tb + Q2_K::D + 2 * i, rd16(blk + 80));
      wr16(tb + Q2_K::DM + 2 * i, rd16(blk + 82));
      for (int g = 0; g < 16; ++g) tb[Q2_K::SC + 16 * g + i] = blk[g];
      for (int e = 0; e < 256; ++e) {
        const int n = e >> 7, k = (e >> 5) & 3, l = e & 31;
        crumb_set(tb + Q2_K::QS + CRUMB_PLANE(16) * (e >> 4), i, e & 15, (blk[16 + 32 * n + l] >> (2 * k)) & 3);
      }
      break;
    case T_Q3_K:
      wr16(tb + Q3_K::D + 2 * i, rd16(blk + 108));
      for (int g = 0; g < 16; ++g) tb[Q3_K::SC + 16 * g + i] = (uint8_t)(int8_t)(q3_scale_get(blk + 96, g) - 32);
      for (int e = 0; e < 256; ++e) {
        const int n = e >> 7, k = (e >> 5) & 3, l = e & 31, g = e >> 4;
        crumb_set(tb + Q3_K::QS + CRUMB_PLANE(16) * g, i, e & 15, (blk[32 + 32 * n + l] >> (2 * k)) & 3);
        bit_set(tb + Q3_K::QH + MASK_PLANE(16) * g, i, e & 15, (blk[l] >> (4 * n + k)) & 1);
      }
      break;
    case T_Q4_K: case T_Q5_K: {
      const bool five = type == T_Q5_K;
      uint8_t sc[8], mn[8];
      k4_scales_get(blk + 4, sc, mn);
      wr16(tb + Q4_K::D + 2 * i, rd16(blk));
      wr16(tb + Q4_K::DM + 2 * i, rd16(blk + 2));
      const uint8_t* qs = blk + (five ? 48 : 16);
      uint8_t* qs_plane = tb + (five ? Q5_K::QS : Q4_K::QS);
      for (int g = 0; g < 8; ++g) {
        tb[Q4_K::SC + 16 * g + i] = sc[g];
        tb[Q4_K::MN + 16 * g + i] = mn[g];
        for (int l = 0; l < 32; ++l) {
          const uint8_t b = qs[32 * (g >> 1) + l];
          q4_set(qs_plane + Q4_PLANE(32) * g, i, l, (g & 1) ? (b >> 4) : (b & 0x0F));
          if (five) bit_set(tb + Q5_K::QH + MASK_PLANE(32) * g, i, l, (blk[16 + l] >> g) & 1);
        }
      }
      break;
    }
    case T_Q6_K:
      wr16(tb + Q6_K::D + 2 * i, rd16(blk + 208));
      for (int g = 0; g < 16; ++g) tb[Q6_K::SC + 16 * g + i] = blk[192 + g];
      for (int e = 0; e < 256; ++e) {
        const int n = e >> 7, k = (e >> 5) & 3, l = e & 31, g = e >> 4;
        const uint8_t lb = blk[64 * n + l + 32 * (k & 1)];
        const uint8_t lo = (k >> 1) ? (lb >> 4) : (lb & 0x0F);
        const uint8_t hi = (blk[128 + 32 * n + l] >> (2 * k)) & 3;
        q4_set(tb + Q6_K::QS + Q4_PLANE(16) * g, i, e & 15, lo);
        crumb_set(tb + Q6_K::QH + CRUMB_PLANE(16) * g, i, e & 15, hi);
      }
      break;
    case T_IQ4_XS:
      wr16(tb + IQ4_XS::D + 2 * i, rd16(blk));
      for (int g = 0; g < 8; ++g) {
        tb[IQ4_XS::SC + 16 * g + i] = (uint8_t)(int8_t)(iq4xs_scale_get(blk, g) - 32);
        for (int j = 0; j < 32; ++j)
          q4_set(tb + IQ4_XS::QS + Q4_PLANE(32) * g, i, j, legacy_nib(blk + 8 + 16 * g, j));
      }
      break;
    case T_F16: case T_BF16:
      wr16(tb + 2 * i, rd16(blk));
      break;
  }
}

void unpack_block(int type, const uint8_t* tb, int i, uint8_t* blk) {
  memset(blk, 0, (size_t)format_info(type).block_bytes);
  switch (type) {
    case T_Q4_0: case T_IQ4_NL:
      wr16(blk, rd16(tb + Q4_0::D + 2 * i));
      unpack_legacy4(tb + Q4_0::QS, i, blk + 2);
      break;
    case T_MXFP4:
      blk[0] = tb[MXFP4::E + i];
      unpack_legacy4(tb + MXFP4::QS, i, blk + 1);
      break;
    case T_Q4_1:
      wr16(blk, rd16(tb + Q4_1::D + 2 * i));
      wr16(blk + 2, rd16(tb + Q4_1::M + 2 * i));
      unpack_legacy4(tb + Q4_1::QS, i, blk + 4);
      break;
    case T_Q5_0: case T_Q5_1: {
      const bool m = type == T_Q5_1;
      wr16(blk, rd16(tb + Q5_0::D + 2 * i));
      if (m) wr16(blk + 2, rd16(tb + Q5_1::M + 2 * i));
      const uint8_t* qhp = tb + (m ? Q5_1::QH : Q5_0::QH);
      uint32_t qh = 0;
      for (int e = 0; e < 32; ++e) qh |= (uint32_t)bit_get(qhp, i, e) << e;
      memcpy(blk + (m ? 4 : 2), &qh, 4);
      unpack_legacy4(tb + (m ? Q5_1::QS : Q5_0::QS), i, blk + (m ? 8 : 6));
      break;
    }
    case T_Q8_0:
      wr16(blk, rd16(tb + Q8_0::D + 2 * i));
      for (int e = 0; e < 32; ++e) blk[2 + e] = byte_get(tb + Q8_0::QS, i, e);
      break;
    case T_Q2_K:
      wr16(blk + 80, rd16(tb + Q2_K::D + 2 * i));
      wr16(blk + 82, rd16(tb + Q2_K::DM + 2 * i));
      for (int g = 0; g < 16; ++g) blk[g] = tb[Q2_K::SC + 16 * g + i];
      for (int e = 0; e < 256; ++e) {
        const int n = e >> 7, k = (e >> 5) & 3, l = e & 31;
        blk[16 + 32 * n + l] |= (uint8_t)(crumb_get(tb + Q2_K::QS + CRUMB_PLANE(16) * (e >> 4), i, e & 15) << (2 * k));
      }
      break;
    case T_Q3_K: {
      wr16(blk + 108, rd16(tb + Q3_K::D + 2 * i));
      uint8_t v[16];
      for (int g = 0; g < 16; ++g) v[g] = (uint8_t)((int8_t)tb[Q3_K::SC + 16 * g + i] + 32);
      q3_scales_put(blk + 96, v);
      for (int e = 0; e < 256; ++e) {
        const int n = e >> 7, k = (e >> 5) & 3, l = e & 31, g = e >> 4;
        blk[32 + 32 * n + l] |= (uint8_t)(crumb_get(tb + Q3_K::QS + CRUMB_PLANE(16) * g, i, e & 15) << (2 * k));
        blk[l] |= (uint8_t)(bit_get(tb + Q3_K::QH + MASK_PLANE(16) * g, i, e & 15) << (4 * n + k));
      }
      break;
    }
    case T_Q4_K: case T_Q5_K: {
      const bool five = type == T_Q5_K;
      uint8_t sc[8], mn[8];
      wr16(blk, rd16(tb + Q4_K::D + 2 * i));
      wr16(blk + 2, rd16(tb + Q4_K::DM + 2 * i));
      uint8_t* qs = blk + (five ? 48 : 16);
      const uint8_t* qs_plane = tb + (five ? Q5_K::QS : Q4_K::QS);
      for (int g = 0; g < 8; ++g) {
        sc[g] = tb[Q4_K::SC + 16 * g + i];
        mn[g] = tb[Q4_K::MN + 16 * g + i];
        for (int l = 0; l < 32; ++l) {
          const uint8_t v = q4_get(qs_plane + Q4_PLANE(32) * g, i, l);
          qs[32 * (g >> 1) + l] |= (g & 1) ? (uint8_t)(v << 4) : v;
          if (five) blk[16 + l] |= (uint8_t)(bit_get(tb + Q5_K::QH + MASK_PLANE(32) * g, i, l) << g);
        }
      }
      k4_scales_put(blk + 4, sc, mn);
      break;
    }
    case T_Q6_K:
      wr16(blk + 208, rd16(tb + Q6_K::D + 2 * i));
      for (int g = 0; g < 16; ++g) blk[192 + g] = tb[Q6_K::SC + 16 * g + i];
      for (int e = 0; e < 256; ++e) {
        const int n = e >> 7, k = (e >> 5) & 3, l = e & 31, g = e >> 4;
        const uint8_t lo = q4_get(tb + Q6_K::QS + Q4_PLANE(16) * g, i, e & 15);
        const uint8_t hi = crumb_get(tb + Q6_K::QH + CRUMB_PLANE(16) * g, i, e & 15);
        blk[64 * n + l + 32 * (k & 1)] |= (k >> 1) ? (uint8_t)(lo << 4) : lo;
        blk[128 + 32 * n + l] |= (uint8_t)(hi << (2 * k));
      }
      break;
    case T_IQ4_XS: {
      wr16(blk, rd16(tb + IQ4_XS::D + 2 * i));
      uint16_t sh = 0;
      for (int g = 0; g < 8; ++g) {
        const uint8_t v = (uint8_t)((int8_t)tb[IQ4_XS::SC + 16 * g + i] + 32);
        blk[4 + g / 2] |= (uint8_t)((v & 0x0F) << (4 * (g & 1)));
        sh |= (uint16_t)(((v >> 4) & 3) << (2 * g));
        for (int j = 0; j < 32; ++j)
          legacy_nib_put(blk + 8 + 16 * g, j, q4_get(tb + IQ4_XS::QS + Q4_PLANE(32) * g, i, j));
      }
      wr16(blk + 2, sh);
      break;
    }
    case T_F16: case T_BF16:
      wr16(blk, rd16(tb + 2 * i));
      break;
  }
}

void repack_tiles(int type, const uint8_t* rows, int64_t n_rows, int64_t n_blocks, uint8_t* tiles,
                  int64_t tile_begin, int64_t tile_end) {
  const FormatInfo f = format_info(type);
  const int64_t row_bytes = n_blocks * f.block_bytes, tile_bytes = n_blocks * f.tile_block;
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    uint8_t* tile = tiles + t * tile_bytes;
    memset(tile, 0, (size_t)tile_bytes);
    for (int i = 0; i < TILE_ROWS; ++i) {
      const int64_t r = t * TILE_ROWS + i;
      if (r >= n_rows) break;                       // rows past the end stay zero blocks
      const uint8_t* row = rows + r * row_bytes;
      for (int64_t b = 0; b < n_blocks; ++b) pack_block(type, row + b * f.block_bytes, tile + b * f.tile_block, i);
    }
  }
}

void unpack_row(int type, const uint8_t* tiles, int64_t n_blocks, int64_t row, uint8_t* out) {
  const FormatInfo f = format_info(type);
  const uint8_t* tile = tiles + (row / TILE_ROWS) * n_blocks * f.tile_block;
  for (int64_t b = 0; b < n_blocks; ++b)
    unpack_block(type, tile + b * f.tile_block, (int)(row % TILE_ROWS), out + b * f.block_bytes);
}

}  // namespace ts
