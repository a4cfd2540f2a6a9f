// A transformer block's work around attention as two ops, for the decode steps
// where kernel count, not arithmetic, sets the time. models/decoder.py's Python
// (Block.queries, Block.finish) is the reference: the matrix products are the same
// native/qmatmul.cpp calls; the element-wise work between them (norms, RoPE, the cache writes,
// residual adds, casts) is one loop per stage here instead of a dozen kernels.
// Results agree with the Python to float32 rounding (tests/test_native.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Terms = c10::List<OptTensor>;

Tensor qmatmul(const Tensor& x, at::TensorList w,
               const std::optional<Tensor>& bias);  // qmatmul.cpp

namespace {

// models/linear.py Linear.forward. `lin` holds [dense, bias, part_0, part_1, ...]:
// a float32 copy (the fp32 mode) or the file's matrices for native/qmatmul.cpp.
Tensor linear(const Tensor& x, const Terms& lin) {
  OptTensor dense = lin.get(0), bias = lin.get(1);
  if (dense.has_value()) return at::linear(x, *dense, bias).contiguous();
  std::vector<Tensor> parts;
  for (size_t i = 2; i < lin.size(); ++i) parts.push_back(*lin.get(i));
  return qmatmul(x, parts, bias);
}

// RMSNorm as models/layers.py writes it: x * rsqrt(sum(x^2) + n * eps) * w, where
// w already carries sqrt(n). In place over n floats.
inline void rms_norm(float* x, const float* w, float n_eps, int64_t n) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  float r = 1.f / std::sqrt(ss + n_eps);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * r * w[i];
}

template <typename T>
inline void load(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void store(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// x rotated: x * cos + partner(x) * sin (sin signed), the partner of i being
// i + d / 2 (mod d) in the rotate-half layout and i ^ 1 in the interleaved one
inline void rope(const float* x, const float* cos, const float* sin, float* out, int64_t d,
                 bool interleaved) {
  int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    out[i] = x[i] * cos[i] + x[interleaved ? i ^ 1 : (i + half) % d] * sin[i];
  }
}

const float* opt_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// fn(r) for rows 0..t, split over the threads for a prefill chunk's many (each row
// alone, so no bit depends on the split); a decode step's few stay on this thread
template <class Fn>
void for_rows(int64_t t, Fn fn) {
  at::parallel_for(0, t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r);
  });
}

}  // namespace

// Block.queries: normed input through QKV, q/k norm, RoPE; K and V stored at
// `slots`; returns the queries [T, heads, head_dim] in the cache's dtype.
Tensor block_queries(const Tensor& x, const Tensor& norm_w, double norm_eps, const Terms& qkv,
                     const OptTensor& qk_norm_w, double qk_norm_eps, const Tensor& cos,
                     const Tensor& sin, bool interleaved, Tensor k_cache, Tensor v_cache,
                     const Tensor& slots, int64_t n_heads, int64_t n_kv_heads, int64_t d) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "x: contiguous float32");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches differ");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cos.numel() == x.size(0) * d,
              "RoPE tables: contiguous float32 [T, 1, head_dim]");
  TORCH_CHECK(
      slots.is_contiguous() && slots.scalar_type() == at::kLong && slots.numel() == x.size(0),
      "slots: one int64 per token");
  TORCH_CHECK(k_cache.stride(2) == 1 && v_cache.strides() == k_cache.strides(),
              "cache planes: [kv_heads, slots, head_dim], rows contiguous");
  int64_t t = x.size(0), hidden = x.size(1), n_qk = n_heads + n_kv_heads;
  // everything between the matrix products is float32, as the products take and give
  Tensor normed = x.clone();
  float* nx = normed.data_ptr<float>();
  const float* nw = norm_w.data_ptr<float>();
  for_rows(t, [&](int64_t r) { rms_norm(nx + r * hidden, nw, norm_eps * hidden, hidden); });
  Tensor heads = linear(normed, qkv);  // [T, (heads + 2 kv_heads) * d]
  TORCH_CHECK(heads.is_contiguous() && heads.size(1) == (n_qk + n_kv_heads) * d, "QKV shape");
  Tensor q = at::empty({t, n_heads, d}, x.options().dtype(k_cache.scalar_type()));
  const float* qk_w = opt_ptr(qk_norm_w);
  const float *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < t; ++r) {
    TORCH_CHECK(slot[r] >= 0 && slot[r] < k_cache.size(1), "slot out of range");
  }
  int64_t hs = k_cache.stride(0), ss = k_cache.stride(1);
  const float* src = heads.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, k_cache.scalar_type(), "block_queries_kv", [&] {
    scalar_t *qp = q.data_ptr<scalar_t>(), *kc = k_cache.data_ptr<scalar_t>(),
             *vc = v_cache.data_ptr<scalar_t>();
    for_rows(t, [&](int64_t r) {
      thread_local std::vector<float> scratch;  // a head's row, then its rotation
      scratch.resize(2 * d);
      float *row = scratch.data(), *rot = row + d;
      for (int64_t j = 0; j < n_qk + n_kv_heads; ++j) {
        load(src + (r * (n_qk + n_kv_heads) + j) * d, row, d);
        if (j >= n_qk) {  // V goes to the cache as it is
          store(row, vc + (j - n_qk) * hs + slot[r] * ss, d);
          continue;
        }
        if (qk_w != nullptr) rms_norm(row, qk_w + j * d, qk_norm_eps * d, d);
        rope(row, cs + r * d, sn + r * d, rot, d, interleaved);
        scalar_t* dst =
            j < n_heads ? qp + (r * n_heads + j) * d : kc + (j - n_heads) * hs + slot[r] * ss;
        store(rot, dst, d);
      }
    });
  });
  return q;
}

// Block.finish: attention output [T, heads, head_dim] through O, the residual add,
// then the MLP and its residual add; returns the new residual stream (float32).
Tensor block_finish(const Tensor& x, const Tensor& attn, const Terms& o,
                    const OptTensor& post_attn_w, double post_attn_eps, const Tensor& ffn_w,
                    double ffn_eps, const Terms& gate_up, const Terms& down,
                    const OptTensor& post_ffn_w, double post_ffn_eps, bool gelu) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "x: contiguous float32");
  int64_t t = x.size(0), hidden = x.size(1);
  // everything between the matrix products is float32, as the products take and give
  Tensor y = linear(attn.reshape({t, -1}).to(at::kFloat).contiguous(), o);
  Tensor h = at::empty_like(x), normed = at::empty_like(x);
  const float *pa = opt_ptr(post_attn_w), *pf = opt_ptr(post_ffn_w), *fw = ffn_w.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *hp = h.data_ptr<float>(), *np = normed.data_ptr<float>();
  for_rows(t, [&](int64_t r) {
    float *yr = yp + r * hidden, *hr = hp + r * hidden, *nr = np + r * hidden;
    if (pa != nullptr) rms_norm(yr, pa, post_attn_eps * hidden, hidden);
    const float* xr = xp + r * hidden;
    for (int64_t i = 0; i < hidden; ++i) hr[i] = nr[i] = xr[i] + yr[i];
    rms_norm(nr, fw, ffn_eps * hidden, hidden);
  });
  Tensor gu = linear(normed, gate_up);  // [T, 2 * ffn]
  int64_t n = gu.size(1) / 2;
  // the gate, contiguous, for the activation to overwrite
  Tensor g = gu.slice(1, 0, n).contiguous();
  g = gelu ? at::gelu_(g, "tanh") : at::silu_(g);  // ATen's vectorized exp and tanh
  Tensor mixed = at::empty({t, n}, x.options());
  const float *up = gu.data_ptr<float>(), *act = g.data_ptr<float>();
  float* m = mixed.data_ptr<float>();
  for_rows(t, [&](int64_t r) {
    for (int64_t i = 0; i < n; ++i) m[r * n + i] = act[r * n + i] * up[r * 2 * n + n + i];
  });
  Tensor dn = linear(mixed, down);
  Tensor out = at::empty_like(x);
  float *dp = dn.data_ptr<float>(), *op = out.data_ptr<float>();
  for_rows(t, [&](int64_t r) {
    float *dr = dp + r * hidden, *outr = op + r * hidden;
    if (pf != nullptr) rms_norm(dr, pf, post_ffn_eps * hidden, hidden);
    const float* hr = hp + r * hidden;
    for (int64_t i = 0; i < hidden; ++i) outr[i] = hr[i] + dr[i];
  });
  return out;
}

TORCH_LIBRARY(accordion, m) {
  m.def(
      "block_queries(Tensor x, Tensor norm_w, float norm_eps, Tensor?[] qkv, Tensor? qk_norm_w,"
      " float qk_norm_eps, Tensor cos, Tensor sin, bool interleaved, Tensor(a!) k_cache,"
      " Tensor(b!) v_cache, Tensor slots, int n_heads, int n_kv_heads, int head_dim) -> Tensor");
  m.def(
      "block_finish(Tensor x, Tensor attn, Tensor?[] o, Tensor? post_attn_w, float post_attn_eps,"
      " Tensor ffn_w, float ffn_eps, Tensor?[] gate_up, Tensor?[] down, Tensor? post_ffn_w,"
      " float post_ffn_eps, bool gelu) -> Tensor");
  m.impl("block_queries", c10::DispatchKey::CompositeImplicitAutograd, &block_queries);
  m.impl("block_finish", c10::DispatchKey::CompositeImplicitAutograd, &block_finish);
}
