// The interface between ops.cpp (torch, threads, dispatch) and the per-instruction-set kernel files.
// Plain structs and function pointers: the ISA files include no torch header, so nothing they
// compile with AVX-512 can leak into code that runs on a CPU without it.
#pragma once
#include <stdint.h>

#include "layout.h"

namespace ts {

// Activations quantized to 8 bits (llama.cpp's Q8_0 / Q8_1 / Q8_K), one row per token.
// Per group of `group` elements (the weight's scale group): d = the activation scale that applies,
// s = the scaled sum the format's min term needs (d * sum q; Q8_1: rounded to f16 as ggml does),
// isum = sum of the codes (for formats with an integer offset).
struct ActQ {
  const int8_t* q;       // (M, K)
  const float* d;        // (M, K / group)
  const float* s;        // (M, K / group)
  const int32_t* isum;   // (M, K / group)
  int64_t ldq, ldg;      // row strides of q and of the per-group arrays
};

// The four arrays packed into one buffer, row by row (one allocation per quantized input, and rows
// that index_select keeps whole): row m is q[K] int8, then d[ng], s[ng] float32, isum[ng] int32, with
// ng = K / group. Rows are K + 12 ng bytes, a multiple of 4 since K is a multiple of 32.
inline int64_t q8_row_bytes(int64_t K, int64_t group) { return K + 12 * (K / group); }

inline ActQ q8_rows(uint8_t* base, int64_t K, int64_t group) {
  const int64_t ng = K / group, row = q8_row_bytes(K, group);
  return ActQ{(const int8_t*)base, (const float*)(base + K), (const float*)(base + K + 4 * ng),
              (const int32_t*)(base + K + 8 * ng), row, row / 4};
}

// Float activations (exact numerics): x and, per group, the sum of x (for the min term).
struct ActF {
  const float* x;        // (M, K)
  const float* xsum;     // (M, K / group); may be null for formats without a min
  int64_t ldx, ldg;
};

struct MatArgs {
  const uint8_t* w;      // tiles (ceil(n_rows / 16), n_blocks * tile_block)
  int64_t n_rows, n_blocks;
  void* out;             // (M, ldo): out[m * ldo + row], float32, or float64 for the wide kernels
  int64_t ldo, M;
};

using MatQ8Fn = void (*)(const MatArgs&, const ActQ&, int64_t tile_begin, int64_t tile_end);
using MatF32Fn = void (*)(const MatArgs&, const ActF&, int64_t tile_begin, int64_t tile_end);
// rows [r0, r1) of x (M, K) -> q, d, s, isum (see ActQ; row strides ldq and ldg) for activation kind
// `kind` (layout.h ActKind)
using QuantFn = void (*)(const float* x, int64_t ldx, int64_t K, int kind, int group, int8_t* q, float* d,
                         float* s, int32_t* isum, int64_t ldq, int64_t ldg, int64_t r0, int64_t r1);

// Attention of a decode step's tokens over one layer's KV cache (see attention_body.h), in units of
// (token, KV head, chunk of positions); each unit serves the q heads of its KV head's group.
struct AttnUnit { int64_t ti, kh, c; };

constexpr int64_t ATTN_CHUNK = 256;       // positions per unit: fixed, so the bits do not depend on the threads
constexpr int64_t ATTN_SUB = 32;          // positions a unit converts at a time (a block that stays in L1)
constexpr int64_t ATTN_MAX_GROUP = 256;   // q heads per KV head

// One thread's scratch for the decode attention, in floats, as attention_body.h carves it: the group's
// queries (float, rows padded to whole vectors of 8; and as q8_0 codes and scales), a sub-block of keys or
// values (float; and as codes and scales), a row and an encoded row.
inline int64_t attn_padded(int64_t hd) { return (hd + 7) / 8 * 8; }
inline int64_t attn_scratch_floats(int64_t H, int64_t hd) {
  const int64_t hdp = attn_padded(hd), nb = hd / 32 + 1;
  return H * hdp + (H * hd + 3) / 4 + H * nb + ATTN_SUB * hdp + (ATTN_SUB * hd + 3) / 4 + ATTN_SUB * nb + 2 * hdp + 16;
}

struct AttnArgs {
  const float* q;          // (n, H, hd) queries, already roped
  const float* k_new;      // (n, KH, hd) this step's keys and values (already in the cache of a global layer)
  const float* v_new;
  const void* k_cache;     // (n_slots, cap, KH, row): rows of kv_cache.h's types k_type / v_type
  const void* v_cache;
  int k_type, v_type;
  int64_t H, KH, hd, cap;
  const int64_t* pos;      // (n,) token positions
  const int64_t* slot;     // (n,) KV-cache slots
  const int64_t* first;    // (n,) index of the first token of the same slot in this step
  const int64_t* tokens;   // the tokens attended here, by index ti
  int64_t window;          // 0: global layer, keys read from the cache; w: a ring of cap == w entries
  float scale;
  int round16;             // llama.cpp numerics: q and the probabilities rounded to f16
  int scale_scores;        // round q unscaled and scale the scores (llama.cpp's softmax scale), else q * scale
  int int_dot;             // K . q in integers: q quantized to q8_0, keys of q8_0 / q4_0 (as llama.cpp's flash attention)
  const AttnUnit* units;
  int64_t chunk;           // positions per chunk (fixed: the bits do not depend on the thread count)
  const int64_t* group_start;  // (KH + 1,) the q heads of KV head kh: group_heads[group_start[kh] ..]
  const int64_t* group_heads;  // (H,)
  float* sbuf;             // per (ti, h) at soff[ti * H + h]: the scores, then exp(s - chunk max), then p
  const int64_t* soff;
  const int64_t* coff;     // per ti: the first (h, c) entry of its chunks; entry coff[ti] + h * n_chunks[ti] + c
  const int64_t* n_chunks; // per ti
  float* cmax;             // per entry: the chunk's max score
  double* csum;            // per entry: its sum of exp(s - max)
  const float* factor;     // per entry: exp(max_c - max) / sum, merged by the op between the phases
  float* opart;            // per entry: hd floats, the chunk's sum_j p_j v_j
  float* scratch;          // per thread: scratch_stride floats
  int64_t scratch_stride;
};
using AttnFn = void (*)(const AttnArgs&, int64_t unit_begin, int64_t unit_end, int thread);

struct KernelTable {
  const char* name;
  MatQ8Fn q8[T_COUNT];     // null where a type has no integer kernel (F16, BF16, F32)
  MatF32Fn f32[T_COUNT];
  MatQ8Fn q8_wide[T_COUNT];   // the same, accumulating and writing float64 (row-parallel matmuls)
  MatF32Fn f32_wide[T_COUNT];
  QuantFn quantize;
  AttnFn attend_scores, attend_values;   // a decode step's attention, phase 1 and 2 (attention_body.h)
};

const KernelTable& kernel_table();   // the chosen instruction set's (ops.cpp; TENSORSPLIT_ISA, use_isa)

const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_scalar();

}  // namespace ts
