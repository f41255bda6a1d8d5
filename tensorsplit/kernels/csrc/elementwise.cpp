// Elementwise ops of a layer, one call each where the Python model made several (torch custom ops,
// namespace `tensorsplit`; a replayed decode step pays a dispatch per call, replay.cpp):
//
//   rms_norm(x, weight, eps) -> x * rsqrt(mean(x^2) + eps) * weight       (sum of squares in double, as ggml)
//   add_rms_norm(x, a, a_weight?, weight, eps) -> (s, rms_norm(s, weight))
//       the residual add and the next norm: s = x + a', a' = a rounded to float32 (a row-parallel sum
//       arrives float64), or rms_norm(a', a_weight) where the architecture norms it first (Gemma)
//   rope(x, positions, cos, sin, neox, rope_dim) -> x rotated (cos/sin: (n_positions, rope_dim / 2) tables)
//   qkv_heads(q, k, v, positions, cos, sin, neox, rope_dim, q_norm?, k_norm?, eps, n_heads, n_kv_heads)
//       -> (q, k, v) as contiguous heads (n, H, hd), (n, KH, hd): q and k normed per head (q_norm) and
//       rotated, v copied. q, k, v (n, H * hd) ..., rows strided; k and v None: q is one fused projection
//       (n, (H + 2 KH) hd), q | k | v
//   glu(gate, up?, kind, table?) -> act(gate) * up, (n, ff) float32; up None: gate holds gate | up
//       kind: glu.h (silu, gelu by table, gpt-oss's SwiGLU-OAI)
//
// Each computes what the separate ops compute, in the same order, so fused and unfused steps agree bit
// for bit (tests/test_kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "glu.h"
#include "layout.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace ts {
namespace {

// One row: out = (x * scale) * w, scale = 1 / sqrt(mean(x^2) + eps), the squares summed in double.
inline void norm_row(const float* x, const float* w, int64_t d, double eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < d; ++i) ss += (double)(x[i] * x[i]);
  const float scale = 1.0f / std::sqrt((float)(ss / (double)d) + (float)eps);
  for (int64_t i = 0; i < d; ++i) out[i] = (x[i] * scale) * w[i];
}

// rows per task: a thread only for at least ~64K elements
inline int64_t norm_grain(int64_t d) { return std::max<int64_t>(1, 65536 / d); }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dtype() == at::kFloat && w.dtype() == at::kFloat && x.size(-1) == w.numel() && w.is_contiguous(),
              "rms_norm: float32 x (..., d) and weight (d,)");
  const at::Tensor xc = x.contiguous();
  const int64_t d = w.numel(), rows = xc.numel() / d;
  at::Tensor out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, norm_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) norm_row(xp + r * d, wp, d, eps, op + r * d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& a,
                                                const c10::optional<at::Tensor>& a_weight, const at::Tensor& w,
                                                double eps) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous() && w.dtype() == at::kFloat &&
                  w.is_contiguous() && x.size(1) == w.numel(),
              "add_rms_norm: contiguous float32 x (n, d) and weight (d,)");
  TORCH_CHECK(a.sizes() == x.sizes() && a.is_contiguous() && (a.dtype() == at::kFloat || a.dtype() == at::kDouble),
              "add_rms_norm: a must be contiguous float32 or float64 of x's shape");
  const bool a_normed = a_weight.has_value() && a_weight->defined();
  TORCH_CHECK(!a_normed || (a_weight->dtype() == at::kFloat && a_weight->is_contiguous() && a_weight->numel() == w.numel()),
              "add_rms_norm: a_weight (d,) float32");
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor sum = at::empty_like(x), out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* awp = a_normed ? a_weight->data_ptr<float>() : nullptr;
  const bool wide = a.dtype() == at::kDouble;
  const void* ap = a.data_ptr();
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, norm_grain(d), [&](int64_t b, int64_t e) {
    std::vector<float> row(a_normed ? d : 0), normed(a_normed ? d : 0);
    for (int64_t r = b; r < e; ++r) {
      const float* ar;
      if (wide) {
        const double* src = (const double*)ap + r * d;
        float* dst = a_normed ? row.data() : sp + r * d;     // rounded in place of the sum, added below
        for (int64_t i = 0; i < d; ++i) dst[i] = (float)src[i];
        ar = dst;
      } else {
        ar = (const float*)ap + r * d;
      }
      if (a_normed) {
        norm_row(ar, awp, d, eps, normed.data());
        ar = normed.data();
      }
      for (int64_t i = 0; i < d; ++i) sp[r * d + i] = xp[r * d + i] + ar[i];
      norm_row(sp + r * d, wp, d, eps, op + r * d);
    }
  });
  return {sum, out};
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, bool neox,
                int64_t rope_dim) {
  TORCH_CHECK(x.dim() == 3 && x.dtype() == at::kFloat, "rope: x (n, heads, head_dim) float32");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) * 2 == rope_dim && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dtype() == at::kFloat,
              "rope: cos and sin tables (n_positions, rope_dim / 2) float32");
  const at::Tensor xc = x.contiguous(), pos = positions.to(at::kLong).contiguous();
  const int64_t n = xc.size(0), heads = xc.size(1), hd = xc.size(2), half = rope_dim / 2;
  TORCH_CHECK(rope_dim % 2 == 0 && rope_dim <= hd && pos.numel() == n, "rope: rope_dim ", rope_dim, " of head_dim ", hd);
  at::Tensor out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cos.size(0), "rope: position ", pp[t], " past the table of ", cos.size(0));
    const float* c = cos.data_ptr<float>() + pp[t] * half;
    const float* s = sin.data_ptr<float>() + pp[t] * half;
    for (int64_t h = 0; h < heads; ++h) {
      const float* xr = xp + (t * heads + h) * hd;
      float* orow = op + (t * heads + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        // neox rotates (x[i], x[i + d/2]); normal rotates adjacent pairs (x[2i], x[2i + 1])
        const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        orow[a] = xr[a] * c[i] - xr[b] * s[i];
        orow[b] = xr[a] * s[i] + xr[b] * c[i];
      }
      for (int64_t i = rope_dim; i < hd; ++i) orow[i] = xr[i];
    }
  }
  return out;
}


// One head of a row: out = rotate(norm(x)) with the rope op's and the norm op's arithmetic.
inline void rope_head(const float* x, const float* norm_w, double eps, const float* c, const float* s, bool neox,
                      int64_t half, int64_t rope_dim, int64_t hd, float* out) {
  if (norm_w) norm_row(x, norm_w, hd, eps, out);
  else std::copy(x, x + hd, out);
  for (int64_t i = 0; i < half; ++i) {
    const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float xa = out[a], xb = out[b];
    out[a] = xa * c[i] - xb * s[i];
    out[b] = xa * s[i] + xb * c[i];
  }
  (void)rope_dim;
}

void check_rows(const at::Tensor& t, int64_t n, int64_t cols, const char* what) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.dim() == 2 && t.size(0) == n && t.size(1) == cols && t.stride(1) == 1 &&
                  t.device().is_cpu(),
              "qkv_heads: ", what, " must be float32 (", n, ", ", cols, ") with unit column stride");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_heads(
    const at::Tensor& q_in, const c10::optional<at::Tensor>& k_in, const c10::optional<at::Tensor>& v_in,
    const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, bool neox, int64_t rope_dim,
    const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm, double eps, int64_t n_heads,
    int64_t n_kv_heads) {
  const bool fused = !(k_in.has_value() && k_in->defined());
  TORCH_CHECK(fused == !(v_in.has_value() && v_in->defined()), "qkv_heads: k and v go together");
  TORCH_CHECK(n_heads > 0 && n_kv_heads > 0 && q_in.dim() == 2, "qkv_heads: q (n, features) and head counts");
  const int64_t width = fused ? q_in.size(1) : -1, all_heads = n_heads + 2 * n_kv_heads;
  const int64_t hd = fused ? width / all_heads : q_in.size(1) / n_heads;
  TORCH_CHECK(hd > 0 && (fused ? width == all_heads * hd : q_in.size(1) == n_heads * hd), "qkv_heads: ", q_in.size(1),
              " features are not ", fused ? all_heads : n_heads, " heads");
  // a fused projection (n, (H + 2 KH) hd): q, k and v are its column ranges
  const at::Tensor q = fused ? q_in.narrow(1, 0, n_heads * hd) : q_in;
  const at::Tensor k = fused ? q_in.narrow(1, n_heads * hd, n_kv_heads * hd) : *k_in;
  const at::Tensor v = fused ? q_in.narrow(1, (n_heads + n_kv_heads) * hd, n_kv_heads * hd) : *v_in;
  const int64_t n = q.size(0), half = rope_dim / 2;
  check_rows(q, n, n_heads * hd, "q");
  check_rows(k, n, n_kv_heads * hd, "k");
  check_rows(v, n, n_kv_heads * hd, "v");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) * 2 == rope_dim && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dtype() == at::kFloat && rope_dim % 2 == 0 && rope_dim <= hd,
              "qkv_heads: cos and sin tables (n_positions, rope_dim / 2) float32, rope_dim <= head_dim");
  const bool normed = q_norm.has_value() && q_norm->defined();
  TORCH_CHECK(normed == (k_norm.has_value() && k_norm->defined()), "qkv_heads: q_norm and k_norm go together");
  for (const auto* t : {&q_norm, &k_norm})
    TORCH_CHECK(!normed || ((*t)->dtype() == at::kFloat && (*t)->is_contiguous() && (*t)->numel() == hd),
                "qkv_heads: norm weights (head_dim,) float32");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == n, "qkv_heads: positions (n,)");
  at::Tensor qo = at::empty({n, n_heads, hd}, q.options()), ko = at::empty({n, n_kv_heads, hd}, q.options()),
             vo = at::empty({n, n_kv_heads, hd}, q.options());
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* qn = normed ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = normed ? k_norm->data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cos.size(0), "qkv_heads: position ", pp[t], " past the table of ", cos.size(0));
    const float* c = cos.data_ptr<float>() + pp[t] * half;
    const float* s = sin.data_ptr<float>() + pp[t] * half;
    const float* qr = q.data_ptr<float>() + t * q.stride(0);
    const float* kr = k.data_ptr<float>() + t * k.stride(0);
    for (int64_t h = 0; h < n_heads; ++h)
      rope_head(qr + h * hd, qn, eps, c, s, neox, half, rope_dim, hd, qo.data_ptr<float>() + (t * n_heads + h) * hd);
    for (int64_t h = 0; h < n_kv_heads; ++h)
      rope_head(kr + h * hd, kn, eps, c, s, neox, half, rope_dim, hd, ko.data_ptr<float>() + (t * n_kv_heads + h) * hd);
    std::copy(v.data_ptr<float>() + t * v.stride(0), v.data_ptr<float>() + t * v.stride(0) + n_kv_heads * hd,
              vo.data_ptr<float>() + t * n_kv_heads * hd);
  }
  return {qo, ko, vo};
}

at::Tensor glu(const at::Tensor& gate, const c10::optional<at::Tensor>& up, int64_t kind,
               const c10::optional<at::Tensor>& table) {
  const bool fused = !(up.has_value() && up->defined());
  TORCH_CHECK(gate.dtype() == at::kFloat && gate.dim() == 2 && gate.stride(1) == 1 && gate.device().is_cpu(),
              "glu: gate must be 2-D float32 with unit column stride");
  const int64_t n = gate.size(0), ff = fused ? gate.size(1) / 2 : gate.size(1);
  TORCH_CHECK(!fused || gate.size(1) % 2 == 0, "glu: a fused gate | up of odd width");
  TORCH_CHECK(fused || (up->dtype() == at::kFloat && up->sizes() == gate.sizes() && up->stride(1) == 1),
              "glu: up must be float32 of gate's shape with unit column stride");
  TORCH_CHECK(kind == GLU_SILU || kind == GLU_GELU_TABLE || kind == GLU_SWIGLU_OAI, "glu: kind ", kind);
  TORCH_CHECK(kind != GLU_GELU_TABLE || (table.has_value() && table->dtype() == at::kFloat && table->numel() == 65536 &&
                            table->is_contiguous()),
              "glu: gelu needs its table of 65536 float32");
  at::Tensor out = at::empty({n, ff}, gate.options());
  const float* tab = kind == GLU_GELU_TABLE ? table->data_ptr<float>() : nullptr;
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, ff)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = gate.data_ptr<float>() + r * gate.stride(0);
      const float* u = fused ? g + ff : up->data_ptr<float>() + r * up->stride(0);
      float* o = out.data_ptr<float>() + r * ff;
      glu_row((int)kind, g, u, o, ff, tab);
    }
  });
  return out;
}

}  // namespace
}  // namespace ts

TORCH_LIBRARY_FRAGMENT(tensorsplit, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor a, Tensor? a_weight, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor positions, Tensor cos, Tensor sin, bool neox, int rope_dim) -> Tensor");
  m.def("qkv_heads(Tensor q, Tensor? k, Tensor? v, Tensor positions, Tensor cos, Tensor sin, bool neox, int rope_dim, "
        "Tensor? q_norm, Tensor? k_norm, float eps, int n_heads, int n_kv_heads) -> (Tensor, Tensor, Tensor)");
  m.def("glu(Tensor gate, Tensor? up, int kind, Tensor? table) -> Tensor");
}

TORCH_LIBRARY_IMPL(tensorsplit, CPU, m) {
  m.impl("rms_norm", &ts::rms_norm);
  m.impl("add_rms_norm", &ts::add_rms_norm);
  m.impl("rope", &ts::rope);
  m.impl("qkv_heads", &ts::qkv_heads);
  m.impl("glu", &ts::glu);
}
