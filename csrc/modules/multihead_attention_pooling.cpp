// attnpool::MultiheadAttentionPooling (C++ nn::Module), SPEC.md §7.

#include <attnpool/attention_pool.h>
#include <attnpool/multihead_attention_pooling.h>

#include "ops/checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/init.h>

#include <cmath>
#include <optional>

namespace attnpool {

namespace {

int64_t key_width(const MultiheadAttentionPoolingOptions& options) {
  return options.kdim().value_or(options.embed_dim());
}

}  // namespace

MultiheadAttentionPoolingImpl::MultiheadAttentionPoolingImpl(
    const MultiheadAttentionPoolingOptions& options_)
    : options(options_) {
  // The checks and messages of the Python module, so both fail alike.
  constexpr const char* owner = "MultiheadAttentionPooling";
  TORCH_CHECK_VALUE(
      options.embed_dim() >= 1, owner, ": embed_dim must be >= 1, got ", options.embed_dim());
  TORCH_CHECK_VALUE(
      key_width(options) >= 1, owner, ": kdim must be >= 1, got ", key_width(options));
  TORCH_CHECK_VALUE(
      options.num_queries() >= 1, owner, ": num_queries must be >= 1, got ", options.num_queries());
  TORCH_CHECK_VALUE(
      options.num_heads() >= 1 && options.embed_dim() % options.num_heads() == 0,
      owner,
      ": num_heads must be >= 1 and divide embed_dim = ",
      options.embed_dim(),
      ", got num_heads = ",
      options.num_heads());
  reset();
}

void MultiheadAttentionPoolingImpl::reset() {
  const int64_t embed_dim = options.embed_dim();
  const int64_t kdim = key_width(options);
  // Registered in the Python module's order, and out_proj draws its init when
  // built as nn.Linear does, so torch::manual_seed(s) gives Python's init.
  if (kdim == embed_dim) {
    in_proj_weight = register_parameter("in_proj_weight", torch::empty({3 * embed_dim, embed_dim}));
  } else {
    q_proj_weight = register_parameter("q_proj_weight", torch::empty({embed_dim, embed_dim}));
    k_proj_weight = register_parameter("k_proj_weight", torch::empty({embed_dim, kdim}));
    v_proj_weight = register_parameter("v_proj_weight", torch::empty({embed_dim, kdim}));
  }
  if (options.bias()) {
    in_proj_bias = register_parameter("in_proj_bias", torch::empty({3 * embed_dim}));
  }
  out_proj = register_module(
      "out_proj",
      torch::nn::Linear(torch::nn::LinearOptions(embed_dim, embed_dim).bias(options.bias())));
  query = register_parameter("query", torch::empty({options.num_queries(), embed_dim}));
  reset_parameters();
}

void MultiheadAttentionPoolingImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  if (in_proj_weight.defined()) {
    torch::nn::init::xavier_uniform_(in_proj_weight);
  } else {
    torch::nn::init::xavier_uniform_(q_proj_weight);
    torch::nn::init::xavier_uniform_(k_proj_weight);
    torch::nn::init::xavier_uniform_(v_proj_weight);
  }
  out_proj->reset_parameters();
  if (in_proj_bias.defined()) {
    in_proj_bias.zero_();
    out_proj->bias.zero_();
  }
  torch::nn::init::normal_(query, 0.0, 1.0 / std::sqrt(static_cast<double>(options.embed_dim())));
}

void MultiheadAttentionPoolingImpl::pretty_print(std::ostream& stream) const {
  stream << "attnpool::MultiheadAttentionPooling(embed_dim=" << options.embed_dim()
         << ", num_heads=" << options.num_heads() << ", num_queries=" << options.num_queries();
  if (key_width(options) != options.embed_dim()) {
    stream << ", kdim=" << key_width(options);
  }
  if (!options.bias()) {
    stream << ", bias=false";
  }
  stream << ")";
}

at::Tensor MultiheadAttentionPoolingImpl::forward(
    const at::Tensor& x,
    const at::Tensor& mask,
    const at::Tensor& attn_bias,
    const at::Tensor& lengths) {
  const int64_t embed_dim = options.embed_dim();
  const int64_t kdim = key_width(options);
  const int64_t heads = options.num_heads();
  const int64_t head_dim = embed_dim / heads;
  TORCH_CHECK_VALUE(
      x.dim() == 3 && x.size(2) == kdim,
      "MultiheadAttentionPooling: x must have shape [B, L, kdim = ",
      kdim,
      "], got ",
      x.sizes());
  const auto weights = in_proj_weight.defined()
                           ? in_proj_weight.chunk(3)
                           : std::vector<at::Tensor>{q_proj_weight, k_proj_weight, v_proj_weight};
  const auto biases = in_proj_bias.defined() ? in_proj_bias.chunk(3) : std::vector<at::Tensor>{};
  const auto q_bias = biases.empty() ? std::nullopt : std::optional<at::Tensor>(biases[0]);
  const auto maybe_mask = mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt;
  const auto maybe_bias = attn_bias.defined() ? std::optional<at::Tensor>(attn_bias) : std::nullopt;
  const auto maybe_lengths = lengths.defined() ? std::optional<at::Tensor>(lengths) : std::nullopt;

  // The key bias cancels in the softmax; the value projection runs on the
  // pooled vectors, per head (SPEC.md §7).
  const auto u = fold_query(query, weights[0], weights[1], heads, q_bias);  // [Q, n, kdim]
  const auto pooled = folded_attention_pool(
      x,
      u,
      maybe_mask,
      1.0 / std::sqrt(static_cast<double>(head_dim)),
      /*full_width=*/true,
      maybe_bias,
      maybe_lengths);
  const auto& w_v = weights[2];
  auto values =
      at::einsum(
          "bqnk,ndk->bqnd", {pooled.to(w_v.scalar_type()), w_v.reshape({heads, head_dim, kdim})})
          .reshape({x.size(0), options.num_queries(), embed_dim});
  if (!biases.empty()) {
    // A row with nothing to attend pooled nothing, so it gets no value bias.
    const auto attends =
        detail::attended_positions(x, maybe_mask, maybe_bias, maybe_lengths).any(1);
    values = values + attends.to(values.scalar_type()).view({-1, 1, 1}) * biases[2];
  }
  const auto out = out_proj->forward(values).to(x.scalar_type());
  return options.num_queries() == 1 ? out.select(1, 0) : out;
}

}  // namespace attnpool
