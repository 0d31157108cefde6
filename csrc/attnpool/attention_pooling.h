#pragma once

// attnpool::AttentionPooling, the LibTorch twin of the Python module
// attnpool.AttentionPooling: same parameter names, shapes, init and errors, so
// a state dict trained in Python loads into it unchanged.

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
#include <string>

namespace attnpool {

// Options of AttentionPooling, as keyword arguments of the Python module:
//   AttentionPooling pool(AttentionPoolingOptions(768).num_heads(12).num_queries(4));
struct AttentionPoolingOptions {
  /* implicit */ AttentionPoolingOptions(int64_t embed_dim) : embed_dim_(embed_dim) {}

  // H, the size of each position of x ([B, L, H]).
  TORCH_ARG(int64_t, embed_dim);
  // Heads; must divide embed_dim.
  TORCH_ARG(int64_t, num_heads) = 1;
  // Learned queries Q; one query pools to [B, H], more to [B, Q, H].
  TORCH_ARG(int64_t, num_queries) = 1;
  // Score scale, finite and positive; 1/sqrt(embed_dim / num_heads) by default.
  TORCH_ARG(std::optional<double>, scale) = std::nullopt;
};

// Attention pooling with learned queries (SPEC.md §1), computed by the fused
// attnpool::attention_pool operator.
//
// Parameters (names as in Python's state_dict):
//   query          [num_queries, embed_dim], init N(0, 1/embed_dim)
//   q_proj.weight  [embed_dim, embed_dim], bias-free torch::nn::Linear, its default init
//   k_proj.weight  [embed_dim, embed_dim], bias-free torch::nn::Linear, its default init
//
// forward(x, mask, lengths) takes x [B, L, embed_dim], an optional mask
// [B, L] (nonzero or true = attend, the opposite of MultiheadAttention's
// key_padding_mask) or optional lengths [B] for a right-padded batch (rows
// past a length are never read); undefined tensors mean none. It returns
// [B, embed_dim] for one query, [B, num_queries, embed_dim] otherwise, in x's
// dtype. Move it with ->to(device, dtype) as any LibTorch module; x may be
// float16/bfloat16 while the parameters stay float32.
class AttentionPoolingImpl : public torch::nn::Cloneable<AttentionPoolingImpl> {
 public:
  explicit AttentionPoolingImpl(const AttentionPoolingOptions& options_);

  // (Re)creates and initialises the parameters; clone() relies on it.
  void reset() override;

  // Redraws the parameters from their initial distributions.
  void reset_parameters();

  void pretty_print(std::ostream& stream) const override;

  at::Tensor forward(
      const at::Tensor& x, const at::Tensor& mask = {}, const at::Tensor& lengths = {});

  AttentionPoolingOptions options;
  at::Tensor query;
  torch::nn::Linear q_proj{nullptr};
  torch::nn::Linear k_proj{nullptr};

 protected:
  // Lets torch::nn::Sequential and AnyModule call forward(x) without a mask.
  FORWARD_HAS_DEFAULT_ARGS(
      {1, torch::nn::AnyValue(at::Tensor())}, {2, torch::nn::AnyValue(at::Tensor())})
};

TORCH_MODULE(AttentionPooling);

// Copies the tensors of a file written in Python by
//   torch.save(dict(module.state_dict()), path)
// (or in C++ by torch::pickle_save of a c10::Dict<std::string, at::Tensor>)
// into module's parameters and buffers, converting to their dtype and device.
// Like Python's strict load_state_dict: every name must match and every shape
// agree, else it throws a c10::ValueError listing the offending names and
// leaves the module unchanged. Works for any module, e.g. *pool.
void load_state_dict(torch::nn::Module& module, const std::string& path);

}  // namespace attnpool
