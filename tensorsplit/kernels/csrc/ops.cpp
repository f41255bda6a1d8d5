// torch custom ops over the native kernels (namespace `tensorsplit`), the instruction-set choice at
// run time, and the threading (at::parallel_for: torch's own OpenMP pool and its --threads count).
//
//   isa() -> str                                      the kernels in use: avx512-vnni, avx2 or scalar
//   use_isa(name) -> str                              switch to scalar / avx2 / avx512 / auto (tests)
//   matmul_threads() -> int                           threads that ran the last matmul_q8 / matmul_f32 (tests)
//   pin_threads(cores) -> cpus                        pin torch's pool thread i to cores[i] (worker/pinning.py);
//                                                     the CPU each thread then runs on
//   repack(rows, type, n_cols) -> tiles               GGUF rows (n_rows, row_bytes) uint8 -> tiles
//   unpack_rows(tiles, type, n_rows, n_cols, ids)     tiles -> the GGUF bytes of rows `ids`
//   quantize_act(x, kind, group) -> xq               float activations -> llama.cpp's Q8_0/Q8_1/Q8_K, one
//                                                     uint8 row each (kernels.h q8_rows: codes and scales)
//   group_sums(x, group) -> sums                      per-group sums of x (the exact path's min term)
//   matmul_q8(tiles, type, n_rows, n_cols, xq, wide) -> (M, n_rows)    integer numerics
//   quantize_matmul_q8(tiles, type, n_rows, n_cols, x, kind, group, wide) -> (y, xq)   the two above in one call
//   matmul_f32(tiles, type, n_rows, n_cols, x, xsum?, wide) -> (M, n_rows)       float activations
//     (wide: accumulated in and returned as float64, for row-parallel partial sums)
//   attention(q, k, v, k_cache!, v_cache!, positions, slots, kv_of_q, window, scale, round16, scale_scores, sinks?)
//     -> (n, H * hd)
// (norms, rope and the gated activation: elementwise.cpp; the all-reduce: shm.cpp; step replay: replay.cpp)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sched.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include "kernels.h"
#include "kv_cache.h"
#include "repack.h"

namespace ts {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((uint64_t)edx << 32) | eax;
}

// What this CPU and OS can run: 2 = AVX-512 F/BW/VL/DQ/VNNI, 1 = AVX2+FMA+F16C+BMI2, 0 = neither
int detect_level() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return 0;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6, zmm_os = (xcr0 & 0xE6) == 0xE6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  const bool avx2 = b & (1u << 5), bmi2 = b & (1u << 8);
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool vnni = c & (1u << 11);
  if (zmm_os && f && dq && bw && vl && vnni && fma && f16c && avx2 && bmi2) return 2;
  if (ymm_os && avx2 && fma && f16c && bmi2) return 1;
  return 0;
}
#else
int detect_level() { return 0; }
#endif

// The table for "scalar", "avx2", "avx512" or "auto" (the best this CPU has); more than the CPU has is refused.
// A table's own name (isa(): "avx512-vnni") is accepted too, so that use_isa(previous) restores a switch.
const KernelTable* table_for(const std::string& s) {
  const int have = detect_level();
  int want = have;
  if (s == "scalar") want = 0;
  else if (s == "avx2") want = 1;
  else if (s == "avx512" || s == "avx512-vnni") want = 2;
  else TORCH_CHECK(s.empty() || s == "auto", "instruction set ", s, ": expected scalar, avx2, avx512 or auto");
  TORCH_CHECK(want <= have, "instruction set ", s, ": this CPU does not have those instructions");
  if (want == 2) return kernels_avx512();
  if (want == 1) return kernels_avx2();
  return kernels_scalar();
}

// TENSORSPLIT_ISA picks a lower level than the CPU allows (for tests and benchmarks), as use_isa() does.
std::atomic<const KernelTable*> current{nullptr};

const KernelTable& table() {
  const KernelTable* t = current.load(std::memory_order_acquire);
  if (!t) {
    const char* env = std::getenv("TENSORSPLIT_ISA");
    t = table_for(env ? env : "auto");
    current.store(t, std::memory_order_release);
  }
  return *t;
}

// Switch the kernels' instruction set in this process (tests compare the paths); returns the previous one.
std::string use_isa(const std::string& s) {
  const std::string before = table().name;
  current.store(table_for(s), std::memory_order_release);
  return before;
}

int64_t n_tiles_of(int64_t n_rows) { return (n_rows + TILE_ROWS - 1) / TILE_ROWS; }

FormatInfo checked_format(int64_t type, int64_t n_cols) {
  const FormatInfo f = format_info((int)type);
  TORCH_CHECK(f.block > 0, "tensorsplit kernels: quant type ", type, " has no tiled layout");
  TORCH_CHECK(n_cols > 0 && n_cols % f.block == 0, "tensorsplit kernels: ", n_cols,
              " columns is not a multiple of the block size ", f.block);
  return f;
}

// Threads take whole tiles; a task gets at least ~64 KiB of weights, so small matrices stay on one thread.
int64_t grain_for(int64_t tile_bytes) { return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, tile_bytes)); }

std::string isa() { return table().name; }

// Which of torch's threads ran a part of the last matmul (bit i: thread i), so that a test comparing
// thread counts can show that every count it asks for really ran. One relaxed atomic per task.
std::atomic<uint64_t> last_matmul_threads{0};

template <typename Body>
void parallel_tiles(int64_t n_tiles, int64_t grain, const Body& body) {
  std::atomic<uint64_t> ran{0};
  at::parallel_for(0, n_tiles, grain, [&](int64_t b, int64_t e) {
    ran.fetch_or(uint64_t{1} << (at::get_thread_num() & 63), std::memory_order_relaxed);
    body(b, e);
  });
  last_matmul_threads.store(ran.load(), std::memory_order_relaxed);
}

int64_t matmul_threads() { return __builtin_popcountll(last_matmul_threads.load(std::memory_order_relaxed)); }

// One index per thread of torch's pool (at::parallel_for gives thread t the t-th of n == threads
// indices; the pool keeps its threads from one region to the next), each pinned to its core.
std::vector<int64_t> pin_threads(at::IntArrayRef cores) {
  const int64_t n = std::min<int64_t>((int64_t)cores.size(), at::get_num_threads());
  TORCH_CHECK(n >= 1, "pin_threads: no cores");
  std::vector<int64_t> got(n, -1);
  std::atomic<int> failed{0};
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    const int t = at::get_thread_num();
    if (t >= n) return;
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET((int)cores[t], &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) failed.fetch_add(1);
    got[t] = sched_getcpu();
#endif
    (void)b; (void)e;
  });
  TORCH_CHECK(failed.load() == 0, "pin_threads: sched_setaffinity failed on ", failed.load(), " thread(s)");
  return got;
}

at::Tensor repack(const at::Tensor& rows, int64_t type, int64_t n_cols) {
  const FormatInfo f = checked_format(type, n_cols);
  TORCH_CHECK(rows.dtype() == at::kByte && rows.dim() == 2 && rows.is_contiguous() && rows.device().is_cpu(),
              "repack: rows must be a contiguous 2-D uint8 CPU tensor");
  const int64_t n_blocks = n_cols / f.block, n_rows = rows.size(0);
  TORCH_CHECK(rows.size(1) == n_blocks * f.block_bytes, "repack: rows of ", rows.size(1), " bytes, expected ",
              n_blocks * f.block_bytes);
  const int64_t n_tiles = n_tiles_of(n_rows), tile_bytes = n_blocks * f.tile_block;
  at::Tensor out = at::empty({n_tiles, tile_bytes}, rows.options());
  const uint8_t* src = rows.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n_tiles, 1, [&](int64_t b, int64_t e) { repack_tiles((int)type, src, n_rows, n_blocks, dst, b, e); });
  return out;
}

at::Tensor unpack_rows(const at::Tensor& tiles, int64_t type, int64_t n_rows, int64_t n_cols, const at::Tensor& ids) {
  const FormatInfo f = checked_format(type, n_cols);
  const int64_t n_blocks = n_cols / f.block;
  TORCH_CHECK(tiles.dtype() == at::kByte && tiles.is_contiguous() && tiles.numel() == n_tiles_of(n_rows) * n_blocks * f.tile_block,
              "unpack_rows: tiles do not match ", n_rows, " x ", n_cols);
  const at::Tensor idx = ids.to(at::kLong).contiguous();
  const int64_t k = idx.numel();
  at::Tensor out = at::empty({k, n_blocks * f.block_bytes}, tiles.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(ip[j] >= 0 && ip[j] < n_rows, "unpack_rows: row ", ip[j], " outside 0..", n_rows - 1);
    unpack_row((int)type, tiles.data_ptr<uint8_t>(), n_blocks, ip[j], out.data_ptr<uint8_t>() + j * n_blocks * f.block_bytes);
  }
  return out;
}

void check_x(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(), what,
              ": x must be a 2-D float32 CPU tensor with unit column stride");
}

at::Tensor quantize_act(const at::Tensor& x, int64_t kind, int64_t group) {
  check_x(x, "quantize_act");
  const int64_t M = x.size(0), K = x.size(1), block = kind == A_Q8_K ? 256 : 32;
  TORCH_CHECK(kind == A_Q8_0 || kind == A_Q8_1 || kind == A_Q8_K, "quantize_act: kind ", kind);
  TORCH_CHECK((group == 16 || group == 32) && K % block == 0 && block % group == 0, "quantize_act: K ", K,
              " and group ", group, " do not fit blocks of ", block);
  at::Tensor out = at::empty({M, q8_row_bytes(K, group)}, x.options().dtype(at::kByte));     // kernels.h q8_rows
  const ActQ a = q8_rows(out.data_ptr<uint8_t>(), K, group);
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t b, int64_t e) {
    table().quantize(xp, ldx, K, (int)kind, (int)group, (int8_t*)a.q, (float*)a.d, (float*)a.s, (int32_t*)a.isum,
                     a.ldq, a.ldg, b, e);
  });
  return out;
}

at::Tensor group_sums(const at::Tensor& x, int64_t group) {
  check_x(x, "group_sums");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group > 0 && K % group == 0, "group_sums: K ", K, " is not a multiple of ", group);
  at::Tensor out = at::empty({M, K / group}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K / group; ++g) {
      float acc = 0.0f;                       // in element order: the kernels' float order is fixed too
      for (int64_t j = 0; j < group; ++j) acc += xp[m * x.stride(0) + g * group + j];
      op[m * (K / group) + g] = acc;
    }
  return out;
}

MatArgs mat_args(const at::Tensor& w, const FormatInfo& f, int64_t n_rows, int64_t n_cols, int64_t M, at::Tensor& out) {
  const int64_t n_blocks = n_cols / f.block;
  TORCH_CHECK(w.dtype() == at::kByte && w.is_contiguous() && w.device().is_cpu() &&
                  w.numel() == n_tiles_of(n_rows) * n_blocks * f.tile_block,
              "matmul: weight tiles do not match ", n_rows, " x ", n_cols);
  MatArgs a{};
  a.w = w.data_ptr<uint8_t>();
  a.n_rows = n_rows;
  a.n_blocks = n_blocks;
  a.out = out.data_ptr();
  a.ldo = n_rows;
  a.M = M;
  return a;
}

at::Tensor matmul_q8(const at::Tensor& w, int64_t type, int64_t n_rows, int64_t n_cols, const at::Tensor& xq,
                     bool wide) {
  const FormatInfo f = checked_format(type, n_cols);
  const MatQ8Fn fn = wide ? table().q8_wide[type] : table().q8[type];
  TORCH_CHECK(fn != nullptr, "matmul_q8: no integer kernel for type ", type);
  TORCH_CHECK(xq.dtype() == at::kByte && xq.dim() == 2 && xq.is_contiguous() && xq.size(1) == q8_row_bytes(n_cols, f.group),
              "matmul_q8: xq must be quantize_act's contiguous uint8 (M, ", q8_row_bytes(n_cols, f.group), ") for groups of ",
              f.group);
  const int64_t M = xq.size(0);
  at::Tensor out = at::empty({M, n_rows}, xq.options().dtype(wide ? at::kDouble : at::kFloat));
  const MatArgs a = mat_args(w, f, n_rows, n_cols, M, out);
  const ActQ act = q8_rows(xq.data_ptr<uint8_t>(), n_cols, f.group);
  parallel_tiles(n_tiles_of(n_rows), grain_for(a.n_blocks * f.tile_block), [&](int64_t b, int64_t e) { fn(a, act, b, e); });
  return out;
}

// quantize_act then matmul_q8, in one call: -> (y, xq), xq kept by the caller for other weights of x
std::tuple<at::Tensor, at::Tensor> quantize_matmul_q8(const at::Tensor& w, int64_t type, int64_t n_rows, int64_t n_cols,
                                                      const at::Tensor& x, int64_t kind, int64_t group, bool wide) {
  at::Tensor xq = quantize_act(x, kind, group);
  return {matmul_q8(w, type, n_rows, n_cols, xq, wide), xq};
}

at::Tensor matmul_f32(const at::Tensor& w, int64_t type, int64_t n_rows, int64_t n_cols, const at::Tensor& x,
                      const c10::optional<at::Tensor>& xsum, bool wide) {
  const FormatInfo f = checked_format(type, n_cols);
  const MatF32Fn fn = wide ? table().f32_wide[type] : table().f32[type];
  TORCH_CHECK(fn != nullptr, "matmul_f32: no kernel for type ", type);
  check_x(x, "matmul_f32");
  TORCH_CHECK(x.size(1) == n_cols && x.is_contiguous(), "matmul_f32: x must be contiguous (M, ", n_cols, ")");
  const int64_t M = x.size(0), ng = n_cols / f.group;
  const float* sums = nullptr;
  if (xsum.has_value() && xsum->defined()) {
    TORCH_CHECK(xsum->is_contiguous() && xsum->dtype() == at::kFloat && xsum->numel() == M * ng,
                "matmul_f32: xsum must be contiguous float (", M, ", ", ng, ")");
    sums = xsum->data_ptr<float>();
  }
  at::Tensor out = at::empty({M, n_rows}, x.options().dtype(wide ? at::kDouble : at::kFloat));
  const MatArgs a = mat_args(w, f, n_rows, n_cols, M, out);
  const ActF act{x.data_ptr<float>(), sums, n_cols, ng};
  parallel_tiles(n_tiles_of(n_rows), grain_for(a.n_blocks * f.tile_block), [&](int64_t b, int64_t e) { fn(a, act, b, e); });
  return out;
}

// Write this step's keys and values of a layer into its cache, in the cache's type (kv_cache.h).
void write_cache(const at::Tensor& kv, at::Tensor& cache, int type, const int64_t* pos, const int64_t* slot, int64_t cap,
                 int64_t window) {
  const int64_t n = kv.size(0), KH = kv.size(1), hd = kv.size(2), head_bytes = kv_row_bytes(type, hd);
  const float* src = kv.data_ptr<float>();
  uint8_t* base = (uint8_t*)cache.data_ptr();
  for (int64_t t = 0; t < n; ++t) {          // token order: a ring keeps the newest of a position class
    const int64_t idx = window ? pos[t] % cap : pos[t];
    uint8_t* dst = base + (slot[t] * cap + idx) * KH * head_bytes;
    for (int64_t kh = 0; kh < KH; ++kh) kv_encode_row(src + (t * KH + kh) * hd, hd, type, dst + kh * head_bytes);
  }
}

// Cache rows (L, KH, row) of a type -> (L, KH, hd) float32
at::Tensor rows_to_float(const at::Tensor& rows, int type, int64_t hd) {
  if (type == KV_F32 || type == KV_F16 || type == KV_BF16) return rows.to(at::kFloat);
  const at::Tensor r = rows.contiguous();
  const int64_t n = r.size(0) * r.size(1), head_bytes = kv_row_bytes(type, hd);
  at::Tensor out = at::empty({r.size(0), r.size(1), hd}, r.options().dtype(at::kFloat));
  const uint8_t* src = r.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) kv_decode_row(src + i * head_bytes, hd, type, dst + i * hd);
  });
  return out;
}

// x (t, KH, hd) float32 as the cache of `type` gives it back
at::Tensor as_stored(const at::Tensor& x, int type) {
  switch (type) {
    case KV_F32: return x;
    case KV_F16: return x.to(at::kHalf).to(at::kFloat);
    case KV_BF16: return x.to(at::kBFloat16).to(at::kFloat);
    default: break;
  }
  const at::Tensor xc = x.contiguous();
  const int64_t hd = xc.size(2), n = xc.numel() / hd;
  at::Tensor out = at::empty_like(xc);
  std::vector<uint8_t> buf(kv_row_bytes(type, hd));
  for (int64_t i = 0; i < n; ++i) kv_round_trip(xc.data_ptr<float>() + i * hd, hd, type, buf.data(), out.data_ptr<float>() + i * hd);
  return out;
}

// Where K . q runs on integers: keys of q8_0 / q4_0 under llama.cpp numerics, with q quantized to q8_0 as
// llama.cpp's flash attention quantizes it for such keys (the decode kernel's int_dot; a prompt chunk
// multiplies the same q8_0 values in float).
static bool int_dot_scores(int k_type, bool round16) { return round16 && (k_type == KV_Q8_0 || k_type == KV_Q4_0); }

// A slot with at least this many tokens in a step (a prompt chunk) attends through matrix products
// (ATen's BLAS); fewer (decode steps) go token by token through the native kernel.
constexpr int64_t GEMM_MIN_TOKENS = 8;

// One slot's prompt chunk: scores = (q * scale) K^T per KV head for the q heads that read it, masked
// (causal, window), softmax, (P) V. Rounded as attend_items rounds under llama.cpp numerics.
void attend_chunk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& pos, int64_t slot, const std::vector<int64_t>& tokens,
                  const at::Tensor& kv_of_q, int64_t window, double scale, bool round16, bool scale_scores,
                  const float* sinks, int k_type, int v_type, at::Tensor& out) {
  const int64_t H = q.size(1), hd = q.size(2), KH = k.size(1), cap = k_cache.size(1);
  const at::Tensor idx = at::tensor(tokens, pos.options());
  const at::Tensor qpos = pos.index_select(0, idx);                                 // (t,)
  const int64_t p0 = tokens.empty() ? 0 : pos.data_ptr<int64_t>()[tokens.front()];
  const int64_t p_last = pos.data_ptr<int64_t>()[tokens.back()];
  at::Tensor keys, vals, kpos;                                                     // (L, KH, hd) float32, (L,)
  if (!window) {
    keys = rows_to_float(k_cache[slot].narrow(0, 0, p_last + 1), k_type, hd);
    vals = rows_to_float(v_cache[slot].narrow(0, 0, p_last + 1), v_type, hd);
    kpos = at::arange(p_last + 1, pos.options());
  } else {
    const int64_t lo = std::max<int64_t>(0, p0 - window + 1);
    const at::Tensor past = at::arange(lo, p0, pos.options());
    const at::Tensor ring = at::remainder(past, cap);
    keys = at::cat({rows_to_float(k_cache[slot].index_select(0, ring), k_type, hd), as_stored(k.index_select(0, idx), k_type)});
    vals = at::cat({rows_to_float(v_cache[slot].index_select(0, ring), v_type, hd), as_stored(v.index_select(0, idx), v_type)});
    kpos = at::cat({past, qpos});
  }
  at::Tensor allowed = kpos.unsqueeze(0) <= qpos.unsqueeze(1);                      // (t, L)
  if (window) allowed = allowed & (kpos.unsqueeze(0) > (qpos - window).unsqueeze(1));
  at::Tensor qs = q.index_select(0, idx);                                          // (t, H, hd)
  if (!scale_scores) qs = qs * scale;
  if (int_dot_scores(k_type, round16)) qs = as_stored(qs, KV_Q8_0);                 // as the decode step's q8_0
  else if (round16) qs = qs.to(at::kHalf).to(at::kFloat);
  const int64_t* kvq = kv_of_q.data_ptr<int64_t>();
  at::Tensor out3 = out.view({out.size(0), H, hd});
  const int64_t t = (int64_t)tokens.size();
  for (int64_t kh = 0; kh < KH; ++kh) {
    std::vector<int64_t> hs;
    for (int64_t h = 0; h < H; ++h) if (kvq[h] == kh) hs.push_back(h);
    if (hs.empty()) continue;
    const int64_t g = (int64_t)hs.size();
    const at::Tensor heads = at::tensor(hs, pos.options());
    const at::Tensor qg = qs.index_select(1, heads).permute({1, 0, 2}).reshape({g * t, hd});
    at::Tensor sc = at::mm(qg, keys.select(1, kh).t()).view({g, t, -1});          // (g, t, L)
    if (scale_scores) sc.mul_(scale);
    sc.masked_fill_(allowed.logical_not().unsqueeze(0), -INFINITY);
    at::Tensor p;
    if (sinks) {              // the sink's logit joins each row's softmax as one more column, then leaves
      std::vector<float> sk;
      for (int64_t h : hs) sk.push_back(sinks[h]);
      const at::Tensor col = at::tensor(sk, sc.options()).view({g, 1, 1}).expand({g, t, 1});
      p = at::softmax(at::cat({sc, col}, -1), -1).narrow(-1, 0, sc.size(-1));
    } else {
      p = at::softmax(sc, -1);
    }
    if (round16) p = p.to(at::kHalf).to(at::kFloat);
    const at::Tensor o = at::mm(p.view({g * t, -1}), vals.select(1, kh)).view({g, t, hd}).permute({1, 0, 2});
    out3.index_put_({idx.unsqueeze(1), heads.unsqueeze(0)}, o);
  }
}

// Tokens attended one by one (decode steps): phase 1 per (token, KV head, chunk), the chunks' softmax
// merged here in chunk order (with the sink where the layer has one), phase 2, then the chunks' outputs
// added in chunk order.
void attend_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const int64_t* pp, const int64_t* sp, const std::vector<int64_t>& first,
                   const std::vector<int64_t>& tokens, const at::Tensor& kvq, int64_t window, double scale,
                   bool round16, bool scale_scores, const float* sinks, int k_type, int v_type, at::Tensor& out) {
  const int64_t H = q.size(1), hd = q.size(2), KH = k.size(1), cap = k_cache.size(1);
  const int64_t nt = (int64_t)tokens.size();
  const int64_t* kv_of_q = kvq.data_ptr<int64_t>();
  std::vector<int64_t> group_start(KH + 1, 0), group_heads;
  for (int64_t kh = 0; kh < KH; ++kh) {
    group_start[kh] = (int64_t)group_heads.size();
    for (int64_t h = 0; h < H; ++h) if (kv_of_q[h] == kh) group_heads.push_back(h);
  }
  group_start[KH] = (int64_t)group_heads.size();
  std::vector<int64_t> soff(nt * H), coff(nt), n_chunks(nt);
  std::vector<AttnUnit> units;
  int64_t n_scores = 0, n_entries = 0;
  for (int64_t ti = 0; ti < nt; ++ti) {
    const int64_t p = pp[tokens[ti]], lo = window ? std::max<int64_t>(0, p - window + 1) : 0, nk = p - lo + 1;
    n_chunks[ti] = (nk + ATTN_CHUNK - 1) / ATTN_CHUNK;
    for (int64_t h = 0; h < H; ++h) soff[ti * H + h] = n_scores + h * nk;
    n_scores += H * nk;
    coff[ti] = n_entries;
    n_entries += H * n_chunks[ti];
    for (int64_t kh = 0; kh < KH; ++kh)
      if (group_start[kh + 1] > group_start[kh])
        for (int64_t c = 0; c < n_chunks[ti]; ++c) units.push_back({ti, kh, c});
  }
  for (int64_t kh = 0; kh < KH; ++kh)
    TORCH_CHECK(group_start[kh + 1] - group_start[kh] <= ATTN_MAX_GROUP, "attention: more than ", ATTN_MAX_GROUP,
                " q heads read one KV head");
  const int threads = at::get_num_threads();
  const int64_t stride = attn_scratch_floats(H, hd);
  at::Tensor scratch = at::empty({threads, stride}, q.options());
  at::Tensor sbuf = at::empty({n_scores}, q.options()), cmax = at::empty({n_entries}, q.options());
  at::Tensor csum = at::empty({n_entries}, q.options().dtype(at::kDouble)), factor = at::empty({n_entries}, q.options());
  at::Tensor opart = at::empty({n_entries, hd}, q.options());
  AttnArgs a{};
  a.q = q.data_ptr<float>(); a.k_new = k.data_ptr<float>(); a.v_new = v.data_ptr<float>();
  a.k_cache = k_cache.data_ptr(); a.v_cache = v_cache.data_ptr(); a.k_type = k_type; a.v_type = v_type;
  a.H = H; a.KH = KH; a.hd = hd; a.cap = cap;
  a.pos = pp; a.slot = sp; a.first = first.data(); a.tokens = tokens.data();
  a.window = window; a.scale = (float)scale; a.round16 = round16; a.scale_scores = scale_scores;
  a.int_dot = int_dot_scores(k_type, round16);
  a.units = units.data(); a.chunk = ATTN_CHUNK; a.group_start = group_start.data(); a.group_heads = group_heads.data();
  a.sbuf = sbuf.data_ptr<float>(); a.soff = soff.data(); a.coff = coff.data(); a.n_chunks = n_chunks.data();
  a.cmax = cmax.data_ptr<float>(); a.csum = csum.data_ptr<double>(); a.factor = factor.data_ptr<float>();
  a.opart = opart.data_ptr<float>(); a.scratch = scratch.data_ptr<float>(); a.scratch_stride = stride;
  const int64_t n_units = (int64_t)units.size();
  at::parallel_for(0, n_units, 1, [&](int64_t b, int64_t e) { table().attend_scores(a, b, e, at::get_thread_num()); });
  // the softmax over all chunks: m = max(chunk maxima, sink), l = sum_c l_c exp(m_c - m) (+ exp(sink - m)),
  // chunk c's factor exp(m_c - m) / l; in chunk order
  float* fp = factor.data_ptr<float>();
  const float* mp = cmax.data_ptr<float>();
  const double* lp = csum.data_ptr<double>();
  for (int64_t ti = 0; ti < nt; ++ti)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t e0 = coff[ti] + h * n_chunks[ti], nc = n_chunks[ti];
      float m = sinks ? sinks[h] : -INFINITY;
      for (int64_t c = 0; c < nc; ++c) m = mp[e0 + c] > m ? mp[e0 + c] : m;
      double l = 0.0;
      for (int64_t c = 0; c < nc; ++c) l += mp[e0 + c] == m ? lp[e0 + c] : lp[e0 + c] * std::exp((double)mp[e0 + c] - m);
      if (sinks) l += (double)expf(sinks[h] - m);
      for (int64_t c = 0; c < nc; ++c)
        fp[e0 + c] = mp[e0 + c] == m ? (float)(1.0 / l) : (float)(std::exp((double)mp[e0 + c] - m) / l);
    }
  at::parallel_for(0, n_units, 1, [&](int64_t b, int64_t e) { table().attend_values(a, b, e, at::get_thread_num()); });
  float* op = out.data_ptr<float>();
  const float* pa = opart.data_ptr<float>();
  for (int64_t ti = 0; ti < nt; ++ti)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t e0 = coff[ti] + h * n_chunks[ti];
      float* o = op + (tokens[ti] * H + h) * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = pa[e0 * hd + d];
      for (int64_t c = 1; c < n_chunks[ti]; ++c)
        for (int64_t d = 0; d < hd; ++d) o[d] += pa[(e0 + c) * hd + d];
    }
}

// A cache tensor's type (kv_cache.h) from its dtype, and for uint8 from its row length (kernels/kv_types.py type_of)
int cache_type(const at::Tensor& c, int64_t hd) {
  switch (c.scalar_type()) {
    case at::kFloat: TORCH_CHECK(c.size(-1) == hd, "attention: a float32 cache row must hold ", hd); return KV_F32;
    case at::kHalf: TORCH_CHECK(c.size(-1) == hd, "attention: a float16 cache row must hold ", hd); return KV_F16;
    case at::kBFloat16: TORCH_CHECK(c.size(-1) == hd, "attention: a bfloat16 cache row must hold ", hd); return KV_BF16;
    case at::kByte:
      TORCH_CHECK(hd % KV_QK == 0, "attention: a block cache needs a head dim that is a multiple of ", KV_QK);
      if (c.size(-1) == kv_row_bytes(KV_Q8_0, hd)) return KV_Q8_0;
      if (c.size(-1) == kv_row_bytes(KV_Q4_0, hd)) return KV_Q4_0;
      TORCH_CHECK(false, "attention: a uint8 cache row of ", c.size(-1), " bytes holds neither q8_0 nor q4_0 of ", hd);
    default: TORCH_CHECK(false, "attention: cache dtype ", c.scalar_type());
  }
  return 0;
}

// Every row of hd values of a contiguous float32 tensor rotated in place (kv_cache.h kv_rotate)
void rotate_rows(at::Tensor& x, int64_t hd, int64_t n_rot) {
  const int64_t rows = x.numel() / hd;
  float* p = x.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) kv_rotate(p + i * hd, hd, n_rot);
  });
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor& k_cache,
                     at::Tensor& v_cache, const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& kv_of_q,
                     int64_t window, double scale, bool round16, bool scale_scores,
                     const c10::optional<at::Tensor>& sinks) {
  at::Tensor q = q_in, k = k_in, v = v_in;      // rotated below for a quantized cache
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "attention: q (n, H, hd), k and v (n, KH, hd)");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->dtype() == at::kFloat && t->is_contiguous() && t->device().is_cpu(), "attention: q, k, v must be contiguous float32");
  const int64_t n = q.size(0), H = q.size(1), hd = q.size(2), KH = k.size(1), n_slots = k_cache.size(0), cap = k_cache.size(1);
  TORCH_CHECK(hd <= 512, "attention: head dim ", hd, " above 512");
  const int k_type = cache_type(k_cache, hd), v_type = cache_type(v_cache, hd);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.size(0) == n_slots && v_cache.size(1) == cap && k_cache.size(2) == KH && v_cache.size(2) == KH,
              "attention: caches must be contiguous (n_slots, cap, KH, row) matching k");
  const at::Tensor pos = positions.to(at::kLong).contiguous(), sl = slots.to(at::kLong).contiguous();
  const at::Tensor kvq = kv_of_q.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == n && sl.numel() == n && kvq.numel() == H, "attention: positions, slots (n,), kv_of_q (H,)");
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  std::vector<int64_t> first(n), seen(n_slots, -1);
  std::vector<std::vector<int64_t>> by_slot(n_slots);
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < n_slots, "attention: slot ", sp[t], " outside 0..", n_slots - 1);
    TORCH_CHECK(pp[t] >= 0 && (window || pp[t] < cap), "attention: position ", pp[t], " outside the cache of ", cap);
    if (seen[sp[t]] < 0) seen[sp[t]] = t;
    first[t] = seen[sp[t]];
    TORCH_CHECK(pp[t] == pp[first[t]] + (int64_t)by_slot[sp[t]].size(),
                "attention: a slot's tokens in a step must have consecutive positions");
    by_slot[sp[t]].push_back(t);
  }
  for (int64_t h = 0; h < H; ++h) TORCH_CHECK(kvq.data_ptr<int64_t>()[h] >= 0 && kvq.data_ptr<int64_t>()[h] < KH, "attention: kv_of_q");
  const float* sink = nullptr;
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->dtype() == at::kFloat && sinks->is_contiguous() && sinks->numel() == H,
                "attention: sinks must be contiguous float32 (H,)");
    sink = sinks->data_ptr<float>();
  }
  // a quantized cache holds rotated keys and values (kv_cache.h kv_k_rotation): q, k and v are rotated here,
  // and the output back
  const int64_t k_rot = kv_k_rotation(k_type, hd), v_rot = kv_v_rotation(v_type, hd);
  if (k_rot) {
    q = q.clone();
    k = k.clone();
    rotate_rows(q, hd, k_rot);
    rotate_rows(k, hd, k_rot);
  }
  if (v_rot) {
    v = v.clone();
    rotate_rows(v, hd, v_rot);
  }
  if (!window) {
    write_cache(k, k_cache, k_type, pp, sp, cap, 0);
    write_cache(v, v_cache, v_type, pp, sp, cap, 0);
  }
  at::Tensor out = at::empty({n, H * hd}, q.options());
  std::vector<int64_t> single;                 // tokens attended one by one (decode steps)
  for (int64_t s = 0; s < n_slots; ++s) {
    if ((int64_t)by_slot[s].size() >= GEMM_MIN_TOKENS)
      attend_chunk(q, k, v, k_cache, v_cache, pos, s, by_slot[s], kvq, window, scale, round16, scale_scores, sink,
                   k_type, v_type, out);
    else
      single.insert(single.end(), by_slot[s].begin(), by_slot[s].end());
  }
  if (!single.empty()) attend_decode(q, k, v, k_cache, v_cache, pp, sp, first, single, kvq, window, scale, round16,
                                     scale_scores, sink, k_type, v_type, out);
  if (window) {
    write_cache(k, k_cache, k_type, pp, sp, cap, window);
    write_cache(v, v_cache, v_type, pp, sp, cap, window);
  }
  if (v_rot) rotate_rows(out, hd, v_rot);
  return out;
}

}  // namespace

const KernelTable& kernel_table() { return table(); }

}  // namespace ts

TORCH_LIBRARY(tensorsplit, m) {
  m.def("isa() -> str", &ts::isa);
  m.def("use_isa(str name) -> str", &ts::use_isa);
  m.def("matmul_threads() -> int", &ts::matmul_threads);
  m.def("pin_threads(int[] cores) -> int[]", &ts::pin_threads);
  m.def("repack(Tensor rows, int type, int n_cols) -> Tensor");
  m.def("unpack_rows(Tensor tiles, int type, int n_rows, int n_cols, Tensor ids) -> Tensor");
  m.def("quantize_act(Tensor x, int kind, int group) -> Tensor");
  m.def("group_sums(Tensor x, int group) -> Tensor");
  m.def("matmul_q8(Tensor w, int type, int n_rows, int n_cols, Tensor xq, bool wide=False) -> Tensor");
  m.def("quantize_matmul_q8(Tensor w, int type, int n_rows, int n_cols, Tensor x, int kind, int group, "
        "bool wide=False) -> (Tensor, Tensor)");
  m.def("matmul_f32(Tensor w, int type, int n_rows, int n_cols, Tensor x, Tensor? xsum, bool wide=False) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, "
        "Tensor slots, Tensor kv_of_q, int window, float scale, bool round16, bool scale_scores, "
        "Tensor? sinks=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tensorsplit, CPU, m) {
  m.impl("repack", &ts::repack);
  m.impl("unpack_rows", &ts::unpack_rows);
  m.impl("quantize_act", &ts::quantize_act);
  m.impl("group_sums", &ts::group_sums);
  m.impl("matmul_q8", &ts::matmul_q8);
  m.impl("quantize_matmul_q8", &ts::quantize_matmul_q8);
  m.impl("matmul_f32", &ts::matmul_f32);
  m.impl("attention", &ts::attention);
}
