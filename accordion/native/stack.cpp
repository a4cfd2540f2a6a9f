// A decoder's blocks in one call: per block, block.cpp's block_queries,
// attention.cpp's paged_attention and block.cpp's block_finish, in that order. These
// are the very functions the per-block ops run, so the bits are those of
// models/decoder.py's loop over its blocks; what goes is that loop's ~90 trips a
// step through the interpreter and the op dispatcher, which at one decode token
// cost about as much as the attention itself.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <vector>

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Terms = c10::List<OptTensor>;

// block.cpp and attention.cpp
Tensor block_queries(const Tensor& x, const Tensor& norm_w, double norm_eps, const Terms& qkv,
                     const OptTensor& qk_norm_w, double qk_norm_eps, const Tensor& cos,
                     const Tensor& sin, bool interleaved, Tensor k_cache, Tensor v_cache,
                     const Tensor& slots, int64_t n_heads, int64_t n_kv_heads, int64_t d);
Tensor block_finish(const Tensor& x, const Tensor& attn, const Terms& o,
                    const OptTensor& post_attn_w, double post_attn_eps, const Tensor& ffn_w,
                    double ffn_eps, const Terms& gate_up, const Terms& down,
                    const OptTensor& post_ffn_w, double post_ffn_eps, bool gelu);
Tensor paged_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& spans, const Tensor& ranges, double scale);

namespace {

// One block's weights and switches, as decoder.Block.use_native lays them out
struct Block {
  Tensor attn_norm;
  double attn_eps;
  Terms qkv;
  OptTensor qk_norm;
  double qk_eps;
  Terms o;
  OptTensor post_attn_norm;
  double post_attn_eps;
  Tensor ffn_norm;
  double ffn_eps;
  Terms gate_up, down;
  OptTensor post_ffn_norm;
  double post_ffn_eps;
  bool gelu;
  int64_t rope;  // which of a step's RoPE tables (cos, sin pairs) it rotates by
};

struct Stack : torch::CustomClassHolder {
  int64_t n_heads, n_kv_heads, head_dim;
  bool interleaved;
  double scale;
  std::vector<Block> blocks;

  Stack(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool interleaved, double scale)
      : n_heads(n_heads),
        n_kv_heads(n_kv_heads),
        head_dim(head_dim),
        interleaved(interleaved),
        scale(scale) {}

  void add(Tensor attn_norm, double attn_eps, Terms qkv, OptTensor qk_norm, double qk_eps, Terms o,
           OptTensor post_attn_norm, double post_attn_eps, Tensor ffn_norm, double ffn_eps,
           Terms gate_up, Terms down, OptTensor post_ffn_norm, double post_ffn_eps, bool gelu,
           int64_t rope) {
    blocks.push_back({attn_norm, attn_eps, qkv, qk_norm, qk_eps, o, post_attn_norm, post_attn_eps,
                      ffn_norm, ffn_eps, gate_up, down, post_ffn_norm, post_ffn_eps, gelu, rope});
  }

  // The residual stream after every block. Per block i: caches[2i], caches[2i + 1]
  // its K and V, slots[slot_of[i]] where its new tokens go, plans[2 plan_of[i]] and
  // plans[2 plan_of[i] + 1] its attention's spans and ranges (one per layer group and
  // window); tables[2r], tables[2r + 1] the cos and sin of RoPE table r.
  Tensor run(Tensor x, std::vector<Tensor> tables, std::vector<Tensor> caches,
             std::vector<Tensor> slots, std::vector<Tensor> plans, std::vector<int64_t> slot_of,
             std::vector<int64_t> plan_of) {
    size_t n = blocks.size();
    TORCH_CHECK(caches.size() == 2 * n && slot_of.size() == n && plan_of.size() == n,
                "one cache pair, slot list and plan per block");
    for (size_t i = 0; i < n; ++i) {
      const Block& b = blocks[i];
      const Tensor &k = caches[2 * i], &v = caches[2 * i + 1];
      TORCH_CHECK(2 * b.rope + 1 < static_cast<int64_t>(tables.size()) &&
                      slot_of[i] < static_cast<int64_t>(slots.size()) &&
                      2 * plan_of[i] + 1 < static_cast<int64_t>(plans.size()),
                  "a block's table, slots or plan is missing");
      Tensor q = block_queries(x, b.attn_norm, b.attn_eps, b.qkv, b.qk_norm, b.qk_eps,
                               tables[2 * b.rope], tables[2 * b.rope + 1], interleaved, k, v,
                               slots[slot_of[i]], n_heads, n_kv_heads, head_dim);
      Tensor o = paged_attention(q, k, v, plans[2 * plan_of[i]], plans[2 * plan_of[i] + 1], scale);
      x = block_finish(x, o, b.o, b.post_attn_norm, b.post_attn_eps, b.ffn_norm, b.ffn_eps,
                       b.gate_up, b.down, b.post_ffn_norm, b.post_ffn_eps, b.gelu);
    }
    return x;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(accordion, m) {
  m.class_<Stack>("Stack")
      .def(torch::init<int64_t, int64_t, int64_t, bool, double>())
      .def("add", &Stack::add)
      .def("run", &Stack::run);
}
