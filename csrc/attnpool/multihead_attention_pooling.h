#pragma once

// attnpool::MultiheadAttentionPooling, the LibTorch twin of the Python module
// attnpool.MultiheadAttentionPooling (SPEC.md §7): same parameter names,
// shapes, init and errors, so a state dict trained in Python loads unchanged.

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <optional>
#include <ostream>

namespace attnpool {

// Options, as the Python module's arguments:
//   MultiheadAttentionPooling head(MultiheadAttentionPoolingOptions(1152, 16).kdim(768));
struct MultiheadAttentionPoolingOptions {
  MultiheadAttentionPoolingOptions(int64_t embed_dim, int64_t num_heads)
      : embed_dim_(embed_dim), num_heads_(num_heads) {}

  // E, the width of the queries and of the output.
  TORCH_ARG(int64_t, embed_dim);
  // Heads; must divide embed_dim.
  TORCH_ARG(int64_t, num_heads);
  // Learned queries Q; one query pools to [B, E], more to [B, Q, E].
  TORCH_ARG(int64_t, num_queries) = 1;
  // The width of x (keys and values); embed_dim by default.
  TORCH_ARG(std::optional<int64_t>, kdim) = std::nullopt;
  // Biases of the input and output projections.
  TORCH_ARG(bool, bias) = true;
};

// Multi-head attention pooling with learned queries: exactly
// torch.nn.MultiheadAttention(E, n, kdim=kdim, vdim=kdim, bias=bias,
// batch_first=True)(query.expand(B, Q, E), x, x, key_padding_mask=~mask)[0],
// computed without projecting a key or a value (fold_query, then
// folded_attention_pool over the full width, then the value and output
// projections on the pooled vectors).
//
// Parameters (names as in Python's state_dict, which are nn.MultiheadAttention's):
//   in_proj_weight [3E, E] when kdim == E, else q_proj_weight [E, E],
//   k_proj_weight [E, kdim], v_proj_weight [E, kdim] (Xavier-uniform init);
//   in_proj_bias [3E] (zeros), out_proj.weight [E, E], out_proj.bias [E] (zeros);
//   query [num_queries, E], init N(0, 1/E).
//
// forward(x, mask, attn_bias, lengths) takes x [B, L, kdim], an optional mask
// [B, L] (true = attend), an optional attn_bias [B, L] added to every score
// (-inf excludes a position) and optional lengths [B] for a right-padded batch;
// undefined tensors mean none. A row with nothing to
// attend gives out_proj.bias and zero gradient to x. The output is in x's dtype.
class MultiheadAttentionPoolingImpl : public torch::nn::Cloneable<MultiheadAttentionPoolingImpl> {
 public:
  explicit MultiheadAttentionPoolingImpl(const MultiheadAttentionPoolingOptions& options_);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  at::Tensor forward(
      const at::Tensor& x,
      const at::Tensor& mask = {},
      const at::Tensor& attn_bias = {},
      const at::Tensor& lengths = {});

  MultiheadAttentionPoolingOptions options;
  // Defined as in nn.MultiheadAttention: in_proj_weight when kdim == embed_dim,
  // else the three separate weights; in_proj_bias only with bias.
  at::Tensor in_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight;
  at::Tensor in_proj_bias;
  torch::nn::Linear out_proj{nullptr};
  at::Tensor query;

 protected:
  FORWARD_HAS_DEFAULT_ARGS(
      {1, torch::nn::AnyValue(at::Tensor())},
      {2, torch::nn::AnyValue(at::Tensor())},
      {3, torch::nn::AnyValue(at::Tensor())})
};

TORCH_MODULE(MultiheadAttentionPooling);

}  // namespace attnpool
