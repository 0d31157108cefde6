// C++ tests of the private operator _layer_norm_folded_attention_pool (the
// norm of a MAP head's keys in the pooling pass): values and the gradients
// of x, u and the norm's weight and bias from LibTorch alone, against
// at::layer_norm then folded_attention_pool.

#include <attnpool/attnpool.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>

namespace {

using Signature = at::Tensor(
    const at::Tensor&,
    const at::Tensor&,
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&,
    double,
    const std::optional<at::Tensor>&,
    double,
    bool,
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);

at::Tensor layer_norm_pool(
    const at::Tensor& x,
    const at::Tensor& u,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpool::_layer_norm_folded_attention_pool", "")
                             .typed<Signature>();
  return op.call(x, u, weight, bias, 1e-5, mask, 0.4, true, std::nullopt, std::nullopt);
}

TEST(LayerNormFoldedAttentionPool, MatchesTheNormThenThePooling) {
  torch::manual_seed(0);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto x = (torch::randn({3, 11, 24}, f64) * 3 + 1).requires_grad_();
  const auto u = torch::randn({2, 3, 24}, f64).requires_grad_();
  const auto weight = torch::randn({24}, f64).requires_grad_();
  const auto bias = torch::randn({24}, f64).requires_grad_();
  auto mask = torch::rand({3, 11}) > 0.3;
  mask[0] = false;  // an empty row
  mask[1][0] = true;

  const auto got = layer_norm_pool(x, u, weight, bias, mask);
  const auto want = attnpool::folded_attention_pool(
      at::layer_norm(x, {24}, weight, bias, 1e-5), u, mask, 0.4, true);
  EXPECT_TRUE(torch::allclose(got, want, 1e-10, 1e-12));
  EXPECT_TRUE(got[0].eq(0).all().item<bool>());

  const auto grad = torch::randn_like(got);
  const auto inputs = std::vector<torch::Tensor>{x, u, weight, bias};
  const auto got_grads = torch::autograd::grad({got}, inputs, {grad});
  const auto want_grads = torch::autograd::grad({want}, inputs, {grad});
  for (size_t i = 0; i < inputs.size(); ++i) {
    EXPECT_TRUE(torch::allclose(got_grads[i], want_grads[i], 1e-9, 1e-11)) << "input " << i;
  }
  EXPECT_TRUE(got_grads[0][0].eq(0).all().item<bool>());
}

}  // namespace
