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
// Here the experts are read from the step's tensors, so the call is the same whatever they are.
//
// The arithmetic is that of the per-expert path (kernels/native_kernels.py over TorchKernels.experts), row
// for row, so that a prompt's grouped experts and a decode step agree bit for bit: the input quantized as
// quantize_act quantizes a row (integer numerics) or summed per group as group_sums sums it (exact); each
// weight through the table's kernel for one row; the biases added in float32; the activation by glu.h; the
// activation quantized or summed again for down, which accumulates in float64 (the wide kernels); then
// the weighted sum in expert order. Threads take whole (token, expert) items; the sum is serial.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
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

// One row's input to a weight of format f: its 8-bit blocks (integer) or, for formats with a min term, its
// per-group sums (exact). The buffer holds either.
struct RowInput {
  std::vector<uint8_t> q8;     // one q8_rows row
  std::vector<float> sums;     // (K / group,)
};

void make_input(const float* x, int64_t K, int type, bool integer, RowInput& in) {
  const FormatInfo f = format_info(type);
  if (integer) {
    const int kind = act_kind(type), group = f.group;
    in.q8.resize(q8_row_bytes(K, group));
    const ActQ a = q8_rows(in.q8.data(), K, group);
    table().quantize(x, K, K, kind, group, (int8_t*)a.q, (float*)a.d, (float*)a.s, (int32_t*)a.isum, a.ldq, a.ldg,
                     0, 1);
  } else if (has_min(type)) {
    const int64_t ng = K / f.group;
    in.sums.resize(ng);
    for (int64_t g = 0; g < ng; ++g) {
      float acc = 0.0f;                       // in element order, as group_sums
      for (int64_t j = 0; j < f.group; ++j) acc += x[g * f.group + j];
      in.sums[g] = acc;
    }
  }
}

// y (n_rows,) = W x for one row x, float32 or (wide) float64, on the calling thread.
void gemv(const uint8_t* w, int type, int64_t n_rows, int64_t K, const float* x, const RowInput& in, bool integer,
          bool wide, void* y) {
  const FormatInfo f = format_info(type);
  MatArgs a{};
  a.w = w;
  a.n_rows = n_rows;
  a.n_blocks = K / f.block;
  a.out = y;
  a.ldo = n_rows;
  a.M = 1;
  if (integer) {
    const ActQ act = q8_rows(const_cast<uint8_t*>(in.q8.data()), K, f.group);
    (wide ? table().q8_wide[type] : table().q8[type])(a, act, 0, n_tiles_of(n_rows));
  } else {
    const ActF act{x, has_min(type) ? in.sums.data() : nullptr, K, K / f.group};
    (wide ? table().f32_wide[type] : table().f32[type])(a, act, 0, n_tiles_of(n_rows));
  }
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

  // the work: (token, expert) in token order, each token's experts in expert order; experts held here only
  struct Item { int64_t t, e; double w; };
  std::vector<Item> items;
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int64_t> js(k);
    std::iota(js.begin(), js.end(), 0);
    std::sort(js.begin(), js.end(), [&](int64_t a, int64_t b) { return sp[t * k + a] < sp[t * k + b]; });
    for (int64_t j : js) {
      const int64_t e = sp[t * k + j];
      TORCH_CHECK(e >= 0 && e < n_expert, "experts: expert ", e, " outside 0..", n_expert - 1);
      if (rows[e]) items.push_back({t, e, (double)wp[t * k + j]});
    }
  }
  at::Tensor ys = at::empty({(int64_t)items.size(), n_out}, x.options().dtype(at::kDouble));
  const float* xp = x.data_ptr<float>();
  double* yp = ys.data_ptr<double>();
  // gate's input serves up too where up's format reads the same form of it
  const bool same_input = tg == tu || (integer ? act_kind(tg) == act_kind(tu) && fg.group == fu.group
                                              : fg.group == fu.group && has_min(tg) == has_min(tu));
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t b0, int64_t b1) {
    RowInput in_g, in_u, in_a;
    std::vector<float> g, u, a;
    for (int64_t i = b0; i < b1; ++i) {
      const Item& it = items[i];
      const int64_t r = rows[it.e];
      const float* xt = xp + it.t * K;
      g.resize(r);
      u.resize(r);
      a.resize(r);
      make_input(xt, K, tg, integer, in_g);
      if (!same_input) make_input(xt, K, tu, integer, in_u);
      gemv(gate[it.e].data_ptr<uint8_t>(), (int)types[0], r, K, xt, in_g, integer, false, g.data());
      gemv(up[it.e].data_ptr<uint8_t>(), (int)types[1], r, K, xt, same_input ? in_g : in_u, integer, false, u.data());
      if (biased) {
        const float* gb = gate_bias[it.e].data_ptr<float>();
        const float* ub = up_bias[it.e].data_ptr<float>();
        for (int64_t q = 0; q < r; ++q) g[q] = g[q] + gb[q];
        for (int64_t q = 0; q < r; ++q) u[q] = u[q] + ub[q];
      }
      glu_row((int)glu_kind, g.data(), u.data(), a.data(), r, tab);
      make_input(a.data(), r, td, integer, in_a);
      gemv(down[it.e].data_ptr<uint8_t>(), (int)types[2], n_out, r, a.data(), in_a, integer, true, yp + i * n_out);
    }
  });
  at::Tensor out = at::zeros({n, n_out}, x.options().dtype(at::kDouble));
  double* op = out.data_ptr<double>();
  for (int64_t i = 0; i < (int64_t)items.size(); ++i) {      // the weighted sum, in expert order per token
    double* o = op + items[i].t * n_out;
    const double* y = yp + i * n_out;
    for (int64_t c = 0; c < n_out; ++c) o[c] += y[c] * items[i].w;
  }
  return out;
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
