// A mixture of experts' FFN for a decode step (a few tokens), in one op (torch custom op, namespace
// `tensorsplit`):
//
//   experts(x, gate[], up[], down[], rows[], n_out, types[3], selected, weights, glu_kind, glu_table?,
//           gate_bias[], up_bias[], integer) -> (n, n_out) float64
//
// x (n, K) float32: the tokens' inputs; gate[e], up[e] (rows[e], K) and down[e] (n_out, rows[e]): expert e's
// weights on this rank in the tiled layout (csrc/layout.h), types[0..2] their GGML types; rows[e] == 0 where
// the rank holds none of expert e (its tensors are then empty). selected (n, k) int64 and weights (n, k)
// float32: each token's experts and their weights. gate_bias[e], up_bias[e] (rows[e],) float32, or empty
// lists. out[t] = sum over t's experts, in expert order, of weights[t, j] * down_e(glu(gate_e x_t + b,
// up_e x_t + b')): the rank's partial sum, float64, before the all-reduce.
//
// Why one op: a decode step of a mixture of experts is otherwise some ten operator calls per expert and
// token, and an expert choice read back into Python (the step could not be replayed, step_program.py).
// Here the experts are read from the step's tensors, so the call is the same whatever they are. A prompt
// is otherwise some fifteen calls per expert that its tokens chose (a 128-expert layer: two thousand).
//
// Two schedules, one arithmetic. A few tokens (a decode step, n <= ITEM_TOKENS) go as (token, expert)
// items, each a GEMV chain on one thread. More (a prompt chunk) go by expert: each token's input forms
// are made once and gathered per expert, each expert runs as a GEMM over its tokens, split into row
// ranges that the threads take as they come, then the activation, then down's GEMM, then the weighted
// sum per token. Every output element is written by one unit, so the bits depend on neither the
// schedule nor the thread count.
//
// The arithmetic is that of the per-expert path (kernels/native_kernels.py over TorchKernels.experts), row
// for row, so that both schedules and the eager path agree bit for bit: the input quantized as
// quantize_act quantizes a row (integer numerics) or summed per group as group_sums sums it (exact); each
// weight through the table's kernel (whose rows do not depend on the other rows of the batch); the biases
// added in float32; the activation by glu.h; the activation quantized or summed again for down, which
// accumulates in float64 (the wide kernels); then the weighted sum in expert order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "glu.h"
#include "kernels.h"

namespace ts {
namespace {

const KernelTable& table() { return kernel_table(); }

// Formats with a float offset per group (w = s q + o): the float kernels need sum(x) per group
// (kernels/layout.py Format.has_min)
bool has_min(int type) {
  return type == T_Q4_1 || type == T_Q5_1 || type == T_Q2_K || type == T_Q4_K || type == T_Q5_K;
}

int64_t n_tiles_of(int64_t n_rows) { return (n_rows + TILE_ROWS - 1) / TILE_ROWS; }

// One row's input to a weight of format `type`, packed in `form_bytes` bytes: integer numerics, its 8-bit
// blocks (kernels.h q8_rows); exact, the row itself then, for formats with a min term, its per-group sums.
int64_t form_bytes(int type, int64_t K, bool integer) {
  const FormatInfo f = format_info(type);
  if (integer) return q8_row_bytes(K, f.group);
  return 4 * (K + (has_min(type) ? K / f.group : 0));
}

void make_form(const float* x, int64_t K, int type, bool integer, uint8_t* dst) {
  const FormatInfo f = format_info(type);
  if (integer) {
    const ActQ a = q8_rows(dst, K, f.group);
    table().quantize(x, K, K, act_kind(type), f.group, (int8_t*)a.q, (float*)a.d, (float*)a.s, (int32_t*)a.isum,
                     a.ldq, a.ldg, 0, 1);
    return;
  }
  float* row = (float*)dst;
  std::memcpy(row, x, K * sizeof(float));
  if (has_min(type))
    for (int64_t g = 0; g < K / f.group; ++g) {
      float acc = 0.0f;                       // in element order, as group_sums
      for (int64_t j = 0; j < f.group; ++j) acc += x[g * f.group + j];
      row[K + g] = acc;
    }
}

// out (M, ldo) rows [16 t0, 16 t1) = W x for M input forms (make_form's, `form_bytes` apart), float32 or
// (wide) float64, on the calling thread.
void gemm(const uint8_t* w, int type, int64_t n_rows, int64_t K, const uint8_t* forms, int64_t M, bool integer, bool wide,
          void* out, int64_t ldo, int64_t t0, int64_t t1) {
  const FormatInfo f = format_info(type);
  MatArgs a{};
  a.w = w;
  a.n_rows = n_rows;
  a.n_blocks = K / f.block;
  a.out = out;
  a.ldo = ldo;
  a.M = M;
  if (integer) {
    (wide ? table().q8_wide[type] : table().q8[type])(a, q8_rows(const_cast<uint8_t*>(forms), K, f.group), t0, t1);
  } else {
    const int64_t ld = form_bytes(type, K, false) / 4;
    const ActF act{(const float*)forms, has_min(type) ? (const float*)forms + K : nullptr, ld, ld};
    (wide ? table().f32_wide[type] : table().f32[type])(a, act, t0, t1);
  }
}

// `n_units` pieces of work, taken by the threads as they come (one region; the pieces write apart)
template <class F>
void run_units(int64_t n_units, const F& body) {
  if (n_units <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), n_units);
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1); u < n_units; u = next.fetch_add(1)) body(u);
  });
}

constexpr int64_t ITEM_TOKENS = 4;       // up to this many tokens: (token, expert) items; more: by expert
constexpr int64_t UNIT_TILES = 8;        // a by-expert unit: 8 tiles (128 rows) of one expert's weight

struct Experts {
  at::TensorList gate, up, down;
  at::IntArrayRef rows;
  int64_t n_out;
  int tg, tu, td;
  int64_t glu_kind;
  const float* glu_table;
  at::TensorList gate_bias, up_bias;
  bool biased, integer;

  // gate's input form serves up too where up's format reads the same form
  bool same_input() const {
    const FormatInfo fg = format_info(tg), fu = format_info(tu);
    return tg == tu || (integer ? act_kind(tg) == act_kind(tu) && fg.group == fu.group
                                : fg.group == fu.group && has_min(tg) == has_min(tu));
  }
  // g, u (r,) of expert e -> a (r,): the biases added in float32, then the activation
  void activate(int64_t e, float* g, float* u, float* a) const {
    const int64_t r = rows[e];
    if (biased) {
      const float* gb = gate_bias[e].data_ptr<float>();
      const float* ub = up_bias[e].data_ptr<float>();
      for (int64_t q = 0; q < r; ++q) g[q] = g[q] + gb[q];
      for (int64_t q = 0; q < r; ++q) u[q] = u[q] + ub[q];
    }
    glu_row((int)glu_kind, g, u, a, r, glu_table);
  }
};

// One token's chosen experts held here, in expert order: (expert, weight)
std::vector<std::pair<int64_t, double>> chosen(const Experts& ex, const int64_t* sel, const float* wts, int64_t k) {
  std::vector<std::pair<int64_t, double>> out;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = sel[j];
    TORCH_CHECK(e >= 0 && e < (int64_t)ex.rows.size(), "experts: expert ", e, " outside 0..", ex.rows.size() - 1);
    if (ex.rows[e]) out.push_back({e, (double)wts[j]});
  }
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  return out;
}

// out (n, n_out) += y (items, n_out) weighted, each token's items (in expert order) summed in that order
void weighted_sum(const std::vector<std::vector<std::pair<int64_t, double>>>& per_token, const double* y,
                  int64_t n_out, double* out) {
  at::parallel_for(0, (int64_t)per_token.size(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (const auto& [i, w] : per_token[t]) {        // (item row of y, weight)
        double* o = out + t * n_out;
        const double* yi = y + i * n_out;
        for (int64_t c = 0; c < n_out; ++c) o[c] += yi[c] * w;
      }
  });
}

// A decode step: (token, expert) items, each a GEMV chain on one thread.
at::Tensor by_items(const Experts& ex, const at::Tensor& x, const int64_t* sp, const float* wp, int64_t k) {
  const int64_t n = x.size(0), K = x.size(1), n_out = ex.n_out;
  struct Item { int64_t t, e; };
  std::vector<Item> items;
  std::vector<std::vector<std::pair<int64_t, double>>> per_token(n);
  for (int64_t t = 0; t < n; ++t)
    for (const auto& [e, w] : chosen(ex, sp + t * k, wp + t * k, k)) {
      per_token[t].push_back({(int64_t)items.size(), w});
      items.push_back({t, e});
    }
  at::Tensor ys = at::empty({(int64_t)items.size(), n_out}, x.options().dtype(at::kDouble));
  const float* xp = x.data_ptr<float>();
  double* yp = ys.data_ptr<double>();
  const bool same_input = ex.same_input();
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> in_g, in_u, in_a;
    std::vector<float> g, u, a;
    for (int64_t i = b0; i < b1; ++i) {
      const Item& it = items[i];
      const int64_t r = ex.rows[it.e];
      const float* xt = xp + it.t * K;
      g.resize(r);
      u.resize(r);
      a.resize(r);
      in_g.resize(form_bytes(ex.tg, K, ex.integer));
      make_form(xt, K, ex.tg, ex.integer, in_g.data());
      if (!same_input) {
        in_u.resize(form_bytes(ex.tu, K, ex.integer));
        make_form(xt, K, ex.tu, ex.integer, in_u.data());
      }
      const int64_t nt = n_tiles_of(r);
      gemm(ex.gate[it.e].data_ptr<uint8_t>(), ex.tg, r, K, in_g.data(), 1, ex.integer, false, g.data(), r, 0, nt);
      gemm(ex.up[it.e].data_ptr<uint8_t>(), ex.tu, r, K, (same_input ? in_g : in_u).data(), 1, ex.integer, false,
           u.data(), r, 0, nt);
      ex.activate(it.e, g.data(), u.data(), a.data());
      in_a.resize(form_bytes(ex.td, r, ex.integer));
      make_form(a.data(), r, ex.td, ex.integer, in_a.data());
      gemm(ex.down[it.e].data_ptr<uint8_t>(), ex.td, n_out, r, in_a.data(), 1, ex.integer, true, yp + i * n_out, n_out,
           0, n_tiles_of(n_out));
    }
  });
  at::Tensor out = at::zeros({n, n_out}, x.options().dtype(at::kDouble));
  weighted_sum(per_token, yp, n_out, out.data_ptr<double>());
  return out;
}

// A prompt chunk: the tokens grouped by expert, each expert a GEMM over its tokens.
at::Tensor by_expert(const Experts& ex, const at::Tensor& x, const int64_t* sp, const float* wp, int64_t k) {
  const int64_t n = x.size(0), K = x.size(1), n_out = ex.n_out, n_expert = (int64_t)ex.rows.size();
  // items (expert, token) in expert order, each expert's tokens in token order: expert e's are
  // [start[e], start[e + 1]); item i is token tok[i]
  std::vector<std::vector<std::pair<int64_t, double>>> chosen_by(n);
  std::vector<int64_t> start(n_expert + 1, 0);
  for (int64_t t = 0; t < n; ++t) {
    chosen_by[t] = chosen(ex, sp + t * k, wp + t * k, k);
    for (const auto& ew : chosen_by[t]) ++start[ew.first + 1];
  }
  for (int64_t e = 0; e < n_expert; ++e) start[e + 1] += start[e];
  const int64_t n_items = start[n_expert];
  std::vector<int64_t> tok(n_items), fill(start.begin(), start.end() - 1);
  std::vector<std::vector<std::pair<int64_t, double>>> per_token(n);
  for (int64_t t = 0; t < n; ++t)
    for (const auto& [e, w] : chosen_by[t]) {
      const int64_t i = fill[e]++;
      tok[i] = t;
      per_token[t].push_back({i, w});
    }
  int64_t r_max = 0;
  for (int64_t e = 0; e < n_expert; ++e) r_max = std::max<int64_t>(r_max, ex.rows[e]);

  // each token's input forms, once, then gathered by item
  const bool same_input = ex.same_input();
  const int64_t bg = form_bytes(ex.tg, K, ex.integer), bu = form_bytes(ex.tu, K, ex.integer);
  std::vector<uint8_t> tok_g(n * bg), tok_u(same_input ? 0 : n * bu), in_g(n_items * bg), in_u(same_input ? 0 : n_items * bu);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      make_form(xp + t * K, K, ex.tg, ex.integer, tok_g.data() + t * bg);
      if (!same_input) make_form(xp + t * K, K, ex.tu, ex.integer, tok_u.data() + t * bu);
    }
  });
  at::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      std::memcpy(in_g.data() + i * bg, tok_g.data() + tok[i] * bg, bg);
      if (!same_input) std::memcpy(in_u.data() + i * bu, tok_u.data() + tok[i] * bu, bu);
    }
  });

  // gate and up: units (expert, which, 8 tiles), the costliest first
  struct Unit { int64_t e, which, t0, t1; };
  auto make_units = [&](int64_t n_which, auto tiles_of) {
    std::vector<Unit> units;
    for (int64_t e = 0; e < n_expert; ++e) {
      if (start[e + 1] == start[e]) continue;
      const int64_t nt = tiles_of(e);
      for (int64_t which = 0; which < n_which; ++which)
        for (int64_t t0 = 0; t0 < nt; t0 += UNIT_TILES) units.push_back({e, which, t0, std::min(nt, t0 + UNIT_TILES)});
    }
    std::stable_sort(units.begin(), units.end(), [&](const Unit& a, const Unit& b) {
      return (start[a.e + 1] - start[a.e]) * (a.t1 - a.t0) > (start[b.e + 1] - start[b.e]) * (b.t1 - b.t0);
    });
    return units;
  };
  std::vector<float> g(n_items * r_max), u(n_items * r_max);        // item i's row at i * r_max
  const std::vector<Unit> gate_up = make_units(2, [&](int64_t e) { return n_tiles_of(ex.rows[e]); });
  run_units((int64_t)gate_up.size(), [&](int64_t j) {
    const Unit& q = gate_up[j];
    const int64_t m0 = start[q.e], M = start[q.e + 1] - m0;
    if (q.which == 0)
      gemm(ex.gate[q.e].data_ptr<uint8_t>(), ex.tg, ex.rows[q.e], K, in_g.data() + m0 * bg, M, ex.integer, false,
           g.data() + m0 * r_max, r_max, q.t0, q.t1);
    else
      gemm(ex.up[q.e].data_ptr<uint8_t>(), ex.tu, ex.rows[q.e], K, (same_input ? in_g : in_u).data() + m0 * (same_input ? bg : bu),
           M, ex.integer, false, u.data() + m0 * r_max, r_max, q.t0, q.t1);
  });

  // the activation and down's input forms: expert e's rows form_bytes(td, rows[e]) apart from its first item's
  // place (the largest expert's form per item is reserved)
  const int64_t bd = form_bytes(ex.td, r_max, ex.integer);
  std::vector<uint8_t> in_d(n_items * bd);
  std::vector<int64_t> expert_of(n_items);
  for (int64_t e = 0; e < n_expert; ++e)
    for (int64_t i = start[e]; i < start[e + 1]; ++i) expert_of[i] = e;
  at::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> a(r_max);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = expert_of[i], r = ex.rows[e];
      ex.activate(e, g.data() + i * r_max, u.data() + i * r_max, a.data());
      make_form(a.data(), r, ex.td, ex.integer, in_d.data() + start[e] * bd + (i - start[e]) * form_bytes(ex.td, r, ex.integer));
    }
  });

  // down, wide: units (expert, 8 tiles of the n_out rows)
  at::Tensor ys = at::empty({n_items, n_out}, x.options().dtype(at::kDouble));
  double* yp = ys.data_ptr<double>();
  const std::vector<Unit> downs = make_units(1, [&](int64_t) { return n_tiles_of(n_out); });
  run_units((int64_t)downs.size(), [&](int64_t j) {
    const Unit& q = downs[j];
    const int64_t m0 = start[q.e], M = start[q.e + 1] - m0;
    gemm(ex.down[q.e].data_ptr<uint8_t>(), ex.td, n_out, ex.rows[q.e], in_d.data() + m0 * bd, M, ex.integer, true,
         yp + m0 * n_out, n_out, q.t0, q.t1);
  });
  at::Tensor out = at::zeros({n, n_out}, x.options().dtype(at::kDouble));
  weighted_sum(per_token, yp, n_out, out.data_ptr<double>());
  return out;
}

at::Tensor experts(const at::Tensor& x, at::TensorList gate, at::TensorList up, at::TensorList down, at::IntArrayRef rows,
                   int64_t n_out, at::IntArrayRef types, const at::Tensor& selected, const at::Tensor& weights,
                   int64_t glu_kind, const c10::optional<at::Tensor>& glu_table, at::TensorList gate_bias,
                   at::TensorList up_bias, bool integer) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "experts: x must be a contiguous (n, K) float32 CPU tensor");
  const int64_t n = x.size(0), K = x.size(1), n_expert = (int64_t)rows.size();
  TORCH_CHECK((int64_t)gate.size() == n_expert && (int64_t)up.size() == n_expert && (int64_t)down.size() == n_expert,
              "experts: one gate, up and down per expert");
  TORCH_CHECK(types.size() == 3, "experts: types = (gate, up, down)");
  const bool biased = !gate_bias.empty();
  TORCH_CHECK(!biased || ((int64_t)gate_bias.size() == n_expert && (int64_t)up_bias.size() == n_expert),
              "experts: a gate and up bias per expert, or none");
  const at::Tensor sel = selected.to(at::kLong).contiguous();
  const at::Tensor wts = weights.to(at::kFloat).contiguous();
  TORCH_CHECK(sel.dim() == 2 && sel.size(0) == n && wts.sizes() == sel.sizes(), "experts: selected, weights (n, k)");
  const int tg = (int)types[0], tu = (int)types[1], td = (int)types[2];
  const FormatInfo fg = format_info(tg), fu = format_info(tu), fd = format_info(td);
  for (int type : {tg, tu, td}) {
    TORCH_CHECK(type >= 0 && type < T_COUNT && format_info(type).block > 0, "experts: type ", type, " has no tiled layout");
    TORCH_CHECK(integer ? table().q8[type] != nullptr : table().f32[type] != nullptr, "experts: type ", type,
                " has no kernel for these numerics");
  }
  TORCH_CHECK(K % fg.block == 0 && K % fu.block == 0 && n_out > 0, "experts: K ", K, " does not fit the blocks");
  TORCH_CHECK(glu_kind != GLU_GELU_TABLE || (glu_table.has_value() && glu_table->numel() == 65536),
              "experts: gelu needs its table");
  const float* tab = glu_kind == GLU_GELU_TABLE ? glu_table->data_ptr<float>() : nullptr;
  const int64_t k = sel.size(1);
  const int64_t* sp = sel.data_ptr<int64_t>();
  const float* wp = wts.data_ptr<float>();
  for (int64_t e = 0; e < n_expert; ++e) {
    if (!rows[e]) continue;
    const int64_t r = rows[e];
    TORCH_CHECK(r % fd.block == 0, "experts: expert ", e, "'s ", r, " rows do not fit down's blocks");
    for (auto [t, f, want] : {std::tuple{&gate[e], &fg, r}, {&up[e], &fu, r}, {&down[e], &fd, n_out}}) {
      const int64_t cols = t == &down[e] ? r : K;
      TORCH_CHECK(t->dtype() == at::kByte && t->is_contiguous() &&
                      t->numel() == n_tiles_of(want) * (cols / f->block) * f->tile_block,
                  "experts: expert ", e, "'s tiles do not match its shape");
    }
    if (biased)
      TORCH_CHECK(gate_bias[e].numel() == r && up_bias[e].numel() == r && gate_bias[e].is_contiguous() &&
                      up_bias[e].is_contiguous() && gate_bias[e].dtype() == at::kFloat && up_bias[e].dtype() == at::kFloat,
                  "experts: expert ", e, "'s biases");
  }

  const Experts ex{gate, up, down, rows, n_out, tg, tu, td, glu_kind, tab, gate_bias, up_bias, biased, integer};
  return n <= ITEM_TOKENS ? by_items(ex, x, sp, wp, k) : by_expert(ex, x, sp, wp, k);
}

}  // namespace
}  // namespace ts

TORCH_LIBRARY_FRAGMENT(tensorsplit, m) {
  m.def("experts(Tensor x, Tensor[] gate, Tensor[] up, Tensor[] down, int[] rows, int n_out, int[] types, "
        "Tensor selected, Tensor weights, int glu_kind, Tensor? glu_table, Tensor[] gate_bias, Tensor[] up_bias, "
        "bool integer) -> Tensor");
}

TORCH_LIBRARY_IMPL(tensorsplit, CPU, m) {
  m.impl("experts", &ts::experts);
}
