// C++ tests of attnpool::MultiheadAttentionPooling against LibTorch's own
// torch::nn::MultiheadAttention holding the same (random) weights: values,
// gradients, parameter names, the empty row, errors.

#include "expect_error.h"

#include <attnpool/attnpool.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace {

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);
constexpr int64_t kEmbed = 16, kHeads = 4, kBatch = 5, kLen = 7, kEmptyRow = 2;

using attnpool_test::expect_error;

// (num_queries, kdim, bias)
class MapHeadCases : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, bool>> {};

TEST_P(MapHeadCases, MatchesMultiheadAttention) {
  const auto [num_queries, kdim, bias] = GetParam();
  torch::manual_seed(0);
  attnpool::MultiheadAttentionPooling head(
      attnpool::MultiheadAttentionPoolingOptions(kEmbed, kHeads)
          .num_queries(num_queries)
          .kdim(kdim)
          .bias(bias));
  torch::nn::MultiheadAttention peer(
      torch::nn::MultiheadAttentionOptions(kEmbed, kHeads).kdim(kdim).vdim(kdim).bias(bias));
  head->to(torch::kFloat64);
  peer->to(torch::kFloat64);
  {
    torch::NoGradGuard no_grad;
    for (auto& item : peer->named_parameters()) {
      item.value().copy_(torch::randn_like(item.value()) / 4.0);
      head->named_parameters()[item.key()].copy_(item.value());
    }
  }
  // Every parameter of the peer exists in the head, plus query.
  std::set<std::string> names;
  for (const auto& item : head->named_parameters()) {
    names.insert(item.key());
  }
  EXPECT_EQ(names.size(), peer->named_parameters().size() + 1);
  EXPECT_EQ(names.count("query"), 1u);

  auto x = torch::randn({kBatch, kLen, kdim}, kF64);
  auto mask = torch::rand({kBatch, kLen}) > 0.4;
  mask.select(1, 0).fill_(true);
  mask[kEmptyRow].fill_(false);
  const auto attending = torch::tensor({0, 1, 3, 4});  // the peer gives NaN on the empty row

  auto x_head = x.clone().requires_grad_(true);
  auto x_peer = x.index_select(0, attending).requires_grad_(true);
  auto got = head->forward(x_head, mask);
  if (num_queries == 1) {
    got = got.unsqueeze(1);
  }
  got = got.index_select(0, attending);
  // LibTorch's module is sequence-first: [L, B, E].
  const auto queries = head->query.unsqueeze(1).expand({num_queries, 4, kEmbed});
  const auto keys = x_peer.transpose(0, 1);
  auto want = std::get<0>(peer->forward(
                              queries,
                              keys,
                              keys,
                              ~mask.index_select(0, attending),
                              /*need_weights=*/false))
                  .transpose(0, 1);
  EXPECT_TRUE(torch::allclose(got, want, 1e-9, 1e-10));
  const auto grad = torch::randn_like(got);
  got.backward(grad);
  want.backward(grad);
  EXPECT_TRUE(
      torch::allclose(x_head.grad().index_select(0, attending), x_peer.grad(), 1e-9, 1e-10));
  EXPECT_TRUE(torch::equal(x_head.grad()[kEmptyRow], torch::zeros({kLen, kdim}, kF64)));
  for (const auto& item : peer->named_parameters()) {
    EXPECT_TRUE(
        torch::allclose(
            head->named_parameters()[item.key()].grad(), item.value().grad(), 1e-9, 1e-10))
        << item.key();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes,
    MapHeadCases,
    ::testing::Values(
        std::make_tuple(int64_t{1}, kEmbed, true),
        std::make_tuple(int64_t{3}, kEmbed, true),
        std::make_tuple(int64_t{3}, int64_t{12}, true),
        std::make_tuple(int64_t{1}, int64_t{12}, false)));

TEST(MultiheadAttentionPooling, EmptyRowGivesTheOutputBias) {
  attnpool::MultiheadAttentionPooling head(
      attnpool::MultiheadAttentionPoolingOptions(kEmbed, kHeads).num_queries(2));
  {
    torch::NoGradGuard no_grad;
    head->out_proj->bias.uniform_();
  }
  const auto x = torch::randn({2, 3, kEmbed});
  const auto mask = torch::tensor({true, false}).view({2, 1}).expand({2, 3});
  const auto out = head->forward(x, mask);
  EXPECT_TRUE(torch::equal(out[1], head->out_proj->bias.expand({2, kEmbed})));
  EXPECT_FALSE(torch::equal(out[0], head->out_proj->bias.expand({2, kEmbed})));
}

TEST(MultiheadAttentionPooling, ErrorsNameTheArgument) {
  using Options = attnpool::MultiheadAttentionPoolingOptions;
  expect_error(
      [] { attnpool::MultiheadAttentionPooling(Options(16, 3)); },
      "num_heads must be >= 1 and divide embed_dim = 16");
  expect_error(
      [] { attnpool::MultiheadAttentionPooling(Options(16, 2).num_queries(0)); },
      "num_queries must be >= 1");
  expect_error(
      [] { attnpool::MultiheadAttentionPooling(Options(16, 2).kdim(0)); }, "kdim must be >= 1");
  attnpool::MultiheadAttentionPooling head(Options(16, 2).kdim(8));
  expect_error(
      [&] { head->forward(torch::randn({2, 3, 16})); }, "x must have shape [B, L, kdim = 8]");
}

}  // namespace

namespace {

// lengths [B] is the mask l < lengths[b], and the padding is never read.
TEST(ModulesTakeLengths, EqualToTheMaskAndBlindToThePadding) {
  const auto lengths = torch::tensor({3, 0, 5});
  const auto mask = torch::arange(5).unsqueeze(0) < lengths.unsqueeze(1);
  auto x = torch::randn({3, 5, kEmbed});
  x.masked_fill_(~mask.unsqueeze(2), std::numeric_limits<float>::quiet_NaN());
  attnpool::AttentionPooling pool(attnpool::AttentionPoolingOptions(kEmbed).num_heads(kHeads));
  const auto pooled = pool->forward(x, at::Tensor(), lengths);
  EXPECT_TRUE(torch::equal(pooled, pool(x, mask)));
  EXPECT_FALSE(pooled.isnan().any().item<bool>());
  attnpool::MultiheadAttentionPooling head(
      attnpool::MultiheadAttentionPoolingOptions(kEmbed, kHeads).num_queries(2));
  const auto out = head->forward(x, at::Tensor(), at::Tensor(), lengths);
  EXPECT_TRUE(torch::equal(out, head(x, mask)));
  EXPECT_FALSE(out.isnan().any().item<bool>());
}

// The value bias goes to rows that attend, with positions counted in int64:
// int8 lengths wrapped past 127, and an empty row of a long batch got it.
TEST(ModulesTakeLengths, EmptyRowGetsNoValueBiasWhateverTheLengthsDtype) {
  const int64_t seq_len = 200;
  const auto lengths = torch::tensor({0, 100, 127});
  const auto x = torch::randn({3, seq_len, kEmbed});
  attnpool::MultiheadAttentionPooling head(
      attnpool::MultiheadAttentionPoolingOptions(kEmbed, kHeads));
  {
    torch::NoGradGuard no_grad;
    head->in_proj_bias.normal_();
    head->out_proj->bias.normal_();
  }
  const auto expected = head->forward(x, at::Tensor(), at::Tensor(), lengths);
  EXPECT_TRUE(torch::equal(expected[0], head->out_proj->bias));
  for (const auto dtype : {torch::kInt8, torch::kUInt8, torch::kInt16, torch::kInt32}) {
    const auto out = head->forward(x, at::Tensor(), at::Tensor(), lengths.to(dtype));
    EXPECT_TRUE(torch::equal(out, expected)) << dtype;
  }
}

}  // namespace
