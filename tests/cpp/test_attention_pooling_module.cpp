// C++ tests of attnpool::AttentionPooling (the nn::Module) and
// attnpool::load_state_dict: shapes, parameter names, init, values, gradients
// through C++ autograd, errors, and loading saved weights.

#include "expect_error.h"

#include <attnpool/attnpool.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);

using attnpool_test::expect_error;

std::map<std::string, std::vector<int64_t>> parameter_shapes(const torch::nn::Module& module) {
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& item : module.named_parameters()) {
    shapes[item.key()] = item.value().sizes().vec();
  }
  return shapes;
}

// A file under the test's temporary directory, removed at the end of the test.
class TempFile {
 public:
  explicit TempFile(const std::string& name) : path_(::testing::TempDir() + name) {}
  ~TempFile() {
    std::remove(path_.c_str());
  }
  const std::string& path() const {
    return path_;
  }
  // torch::pickle_save's format is the one torch.save writes in Python.
  void save(const c10::IValue& value) const {
    const auto bytes = torch::pickle_save(value);
    std::ofstream(path_, std::ios::binary).write(bytes.data(), bytes.size());
  }

 private:
  std::string path_;
};

c10::Dict<std::string, at::Tensor> state_dict_of(const torch::nn::Module& module) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& item : module.named_parameters()) {
    dict.insert(item.key(), item.value().detach().clone());
  }
  return dict;
}

TEST(AttentionPoolingModule, ParameterNamesAndShapesMatchPython) {
  attnpool::AttentionPooling pool(
      attnpool::AttentionPoolingOptions(12).num_heads(3).num_queries(2));
  const std::map<std::string, std::vector<int64_t>> want{
      {"query", {2, 12}}, {"q_proj.weight", {12, 12}}, {"k_proj.weight", {12, 12}}};
  EXPECT_EQ(parameter_shapes(*pool), want);
  EXPECT_TRUE(pool->named_buffers().is_empty());
  for (const auto& param : pool->parameters()) {
    EXPECT_TRUE(param.requires_grad());
    EXPECT_EQ(param.scalar_type(), torch::kFloat32);
  }
}

TEST(AttentionPoolingModule, OneQueryPoolsToBatchByHiddenAndSeveralToBatchByQueries) {
  const auto x = torch::randn({5, 9, 16});
  attnpool::AttentionPooling one(attnpool::AttentionPoolingOptions(16).num_heads(4));
  EXPECT_EQ(one(x).sizes(), (std::vector<int64_t>{5, 16}));
  attnpool::AttentionPooling three(attnpool::AttentionPoolingOptions(16).num_queries(3));
  EXPECT_EQ(three(x).sizes(), (std::vector<int64_t>{5, 3, 16}));
}

TEST(AttentionPoolingModule, ForwardIsTheOperatorOnItsParameters) {
  torch::manual_seed(0);
  for (const int64_t num_queries : {1, 3}) {
    attnpool::AttentionPooling pool(
        attnpool::AttentionPoolingOptions(16).num_heads(4).num_queries(num_queries).scale(0.3));
    pool->to(torch::kFloat64);
    const auto x = torch::randn({5, 9, 16}, kF64);
    const auto mask = torch::rand({5, 9}) > 0.3;
    const auto query = num_queries == 1 ? pool->query[0] : pool->query;
    const auto want = attnpool::attention_pool(
        x, query, pool->q_proj->weight, pool->k_proj->weight, mask, 4, 0.3);
    EXPECT_TRUE(torch::equal(pool(x, mask), want)) << "num_queries = " << num_queries;
  }
}

// With zero projections every score is 0, so the pooling is the mean over the
// attended positions: SPEC.md §1 without any composition to trust.
TEST(AttentionPoolingModule, ZeroProjectionsPoolToTheMaskedMean) {
  attnpool::AttentionPooling pool(attnpool::AttentionPoolingOptions(8).num_heads(2));
  pool->to(torch::kFloat64);
  {
    torch::NoGradGuard no_grad;
    pool->q_proj->weight.zero_();
    pool->k_proj->weight.zero_();
  }
  const auto x = torch::randn({3, 6, 8}, kF64);
  auto mask = torch::ones({3, 6}, torch::kInt64);
  mask[0].slice(0, 2) = 0;  // attends to positions 0 and 1 only
  mask[1] = 0;              // attends to nothing: zeros
  const auto out = pool(x, mask);
  EXPECT_TRUE(torch::allclose(out[0], x[0].slice(0, 0, 2).mean(0), 1e-12, 1e-12));
  EXPECT_TRUE(torch::equal(out[1], torch::zeros({8}, kF64)));
  EXPECT_TRUE(torch::allclose(out[2], x[2].mean(0), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(pool(x)[1], x[1].mean(0), 1e-12, 1e-12));
}

TEST(AttentionPoolingModule, GradientsReachEveryParameterThroughCppAutograd) {
  torch::manual_seed(1);
  attnpool::AttentionPooling pool(attnpool::AttentionPoolingOptions(8).num_heads(2).num_queries(2));
  pool->to(torch::kFloat64);
  const auto x = torch::randn({3, 6, 8}, kF64).requires_grad_(true);
  const auto mask = torch::rand({3, 6}) > 0.2;
  pool(x, mask).square().sum().backward();

  // The same loss through the operator on copies of the parameters.
  std::vector<torch::Tensor> leaves{x.detach().clone().requires_grad_(true)};
  for (const auto& param : {pool->query, pool->q_proj->weight, pool->k_proj->weight}) {
    leaves.push_back(param.detach().clone().requires_grad_(true));
  }
  attnpool::attention_pool(leaves[0], leaves[1], leaves[2], leaves[3], mask, 2)
      .square()
      .sum()
      .backward();

  const std::vector<std::pair<std::string, torch::Tensor>> got{
      {"x", x},
      {"query", pool->query},
      {"q_proj", pool->q_proj->weight},
      {"k_proj", pool->k_proj->weight}};
  for (size_t i = 0; i < got.size(); ++i) {
    const auto& grad = got[i].second.grad();
    ASSERT_TRUE(grad.defined()) << got[i].first;
    EXPECT_GT(grad.abs().sum().item<double>(), 0.0) << got[i].first;
    EXPECT_TRUE(torch::allclose(grad, leaves[i].grad(), 1e-12, 1e-12)) << got[i].first;
  }
}

TEST(AttentionPoolingModule, InitDrawsQueriesFromNormalAndProjectionsLikeLinear) {
  torch::manual_seed(0);
  attnpool::AttentionPooling pool(attnpool::AttentionPoolingOptions(256).num_queries(64));
  // query ~ N(0, 1/256): std 1/16, so each query has about unit norm.
  const auto query = pool->query.detach();
  EXPECT_NEAR(query.std().item<double>(), 1.0 / 16, 0.05 / 16);
  EXPECT_NEAR(query.norm(2, 1).mean().item<double>(), 1.0, 0.1);
  // nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 * in).
  for (const auto& w : {pool->q_proj->weight.detach(), pool->k_proj->weight.detach()}) {
    EXPECT_LE(w.abs().max().item<double>(), 1.0 / 16);
    EXPECT_NEAR(w.std().item<double>(), 1.0 / std::sqrt(3.0 * 256), 0.02 / 16);
  }
}

TEST(AttentionPoolingModule, InitIsReproducibleAndResetParametersRedraws) {
  torch::manual_seed(7);
  attnpool::AttentionPooling a(attnpool::AttentionPoolingOptions(8).num_heads(2));
  torch::manual_seed(7);
  attnpool::AttentionPooling b(attnpool::AttentionPoolingOptions(8).num_heads(2));
  const auto before = state_dict_of(*a);
  a->reset_parameters();
  for (const auto& item : b->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), before.at(item.key()))) << item.key();
    EXPECT_FALSE(torch::equal(a->named_parameters()[item.key()], item.value())) << item.key();
  }
}

TEST(AttentionPoolingModule, CloneIsADeepCopy) {
  attnpool::AttentionPooling pool(attnpool::AttentionPoolingOptions(8).num_heads(2).num_queries(2));
  const auto copy = std::dynamic_pointer_cast<attnpool::AttentionPoolingImpl>(pool->clone());
  ASSERT_TRUE(copy);
  const auto x = torch::randn({2, 5, 8});
  EXPECT_TRUE(torch::equal(copy->forward(x), pool(x)));
  {
    torch::NoGradGuard no_grad;
    copy->query.add_(1.0);
  }
  EXPECT_FALSE(torch::equal(copy->forward(x), pool(x)));
}

TEST(AttentionPoolingModule, RunsInSequentialWithoutAMask) {
  torch::nn::Sequential model(
      torch::nn::Linear(4, 8), attnpool::AttentionPooling(attnpool::AttentionPoolingOptions(8)));
  EXPECT_EQ(model->forward(torch::randn({3, 5, 4})).sizes(), (std::vector<int64_t>{3, 8}));
}

TEST(AttentionPoolingModule, MixedPrecisionInputKeepsFloat32Parameters) {
  attnpool::AttentionPooling pool(attnpool::AttentionPoolingOptions(16).num_heads(2));
  const auto x = torch::randn({4, 10, 16}).to(torch::kBFloat16).requires_grad_(true);
  const auto out = pool(x);
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  out.to(torch::kFloat32).sum().backward();
  EXPECT_EQ(x.grad().scalar_type(), torch::kBFloat16);
  EXPECT_EQ(pool->query.grad().scalar_type(), torch::kFloat32);
}

TEST(AttentionPoolingModule, PrettyPrintShowsTheOptions) {
  std::ostringstream text;
  text << *attnpool::AttentionPooling(
      attnpool::AttentionPoolingOptions(12).num_heads(3).scale(0.5));
  EXPECT_EQ(
      text.str(),
      "attnpool::AttentionPooling(embed_dim=12, num_heads=3, num_queries=1, scale=0.5)(\n"
      "  (q_proj): torch::nn::Linear(in_features=12, out_features=12, bias=false)\n"
      "  (k_proj): torch::nn::Linear(in_features=12, out_features=12, bias=false)\n"
      ")");
}

TEST(AttentionPoolingModuleErrors, NameTheArgumentAndTheValue) {
  using attnpool::AttentionPooling;
  using attnpool::AttentionPoolingOptions;
  expect_error([] { AttentionPooling(0); }, "AttentionPooling: embed_dim must be >= 1, got 0");
  expect_error(
      [] { AttentionPooling(AttentionPoolingOptions(8).num_heads(3)); },
      "num_heads must be >= 1 and divide embed_dim = 8, got num_heads = 3");
  expect_error(
      [] { AttentionPooling(AttentionPoolingOptions(8).num_heads(0)); },
      "num_heads must be >= 1 and divide embed_dim = 8, got num_heads = 0");
  expect_error(
      [] { AttentionPooling(AttentionPoolingOptions(8).num_queries(0)); },
      "num_queries must be >= 1, got 0");
  expect_error(
      [] { AttentionPooling(AttentionPoolingOptions(8).scale(-2.0)); },
      "scale must be a finite positive number, got -2");
  expect_error(
      [] {
        AttentionPooling(AttentionPoolingOptions(8).scale(std::numeric_limits<double>::infinity()));
      },
      "scale must be a finite positive number, got inf");
  AttentionPooling pool(8);
  expect_error(
      [&] { pool(torch::randn({2, 5, 6})); },
      "AttentionPooling: x must have shape [B, L, embed_dim = 8], got [2, 5, 6]");
  expect_error([&] { pool(torch::randn({5, 8})); }, "got [5, 8]");
  // The operator's own checks still apply, e.g. to the mask.
  expect_error(
      [&] { pool(torch::randn({2, 5, 8}), torch::ones({2, 4})); },
      "mask must have shape [B, L] = [2, 5], got [2, 4]");
  // The same error type as Python's ValueError.
  EXPECT_THROW(AttentionPooling(0), c10::ValueError);
}

TEST(LoadStateDict, RoundTripReproducesTheOutputs) {
  attnpool::AttentionPooling saved(
      attnpool::AttentionPoolingOptions(8).num_heads(2).num_queries(2));
  TempFile file("attnpool_round_trip.pt");
  file.save(state_dict_of(*saved));
  attnpool::AttentionPooling loaded(
      attnpool::AttentionPoolingOptions(8).num_heads(2).num_queries(2));
  const auto x = torch::randn({3, 5, 8});
  ASSERT_FALSE(torch::equal(loaded(x), saved(x)));
  attnpool::load_state_dict(*loaded, file.path());
  EXPECT_TRUE(torch::equal(loaded(x), saved(x)));
  EXPECT_TRUE(loaded->query.requires_grad());
}

TEST(LoadStateDict, ConvertsToTheParameterDtype) {
  attnpool::AttentionPooling saved(8);
  saved->to(torch::kFloat64);
  TempFile file("attnpool_float64.pt");
  file.save(state_dict_of(*saved));
  attnpool::AttentionPooling loaded(8);
  attnpool::load_state_dict(*loaded, file.path());
  EXPECT_EQ(loaded->query.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(loaded->query, saved->query.to(torch::kFloat32)));
}

TEST(LoadStateDict, RefusesMismatchesAndLeavesTheModuleUnchanged) {
  attnpool::AttentionPooling pool(attnpool::AttentionPoolingOptions(8).num_heads(2));
  const auto before = state_dict_of(*pool);
  auto entries = state_dict_of(*pool);
  ASSERT_EQ(entries.erase("k_proj.weight"), 1u);
  entries.insert("k_proj.bias", torch::zeros({8}));
  entries.insert_or_assign("query", torch::zeros({2, 8}));
  TempFile file("attnpool_mismatch.pt");
  file.save(entries);
  expect_error(
      [&] { attnpool::load_state_dict(*pool, file.path()); },
      "does not match the module: missing names [\"k_proj.weight\"], unexpected names "
      "[\"k_proj.bias\"], shape mismatches [\"query: file [2, 8] vs module [1, 8]\"]");
  for (const auto& item : pool->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), before.at(item.key()))) << item.key();
  }
}

TEST(LoadStateDict, RefusesFilesThatAreNotADictOfTensors) {
  attnpool::AttentionPooling pool(8);
  TempFile tensor_file("attnpool_tensor.pt");
  tensor_file.save(torch::zeros({8}));
  expect_error(
      [&] { attnpool::load_state_dict(*pool, tensor_file.path()); },
      "must hold a dict of name -> tensor, written by torch.save(dict(module.state_dict()), "
      "path); got Tensor");
  TempFile int_file("attnpool_ints.pt");
  c10::Dict<std::string, int64_t> ints;
  ints.insert("query", 1);
  int_file.save(ints);
  expect_error(
      [&] { attnpool::load_state_dict(*pool, int_file.path()); },
      "must map names (str) to tensors, got an entry String -> Int");
  TempFile garbage("attnpool_garbage.pt");
  std::ofstream(garbage.path(), std::ios::binary) << "not a torch.save file";
  expect_error(
      [&] { attnpool::load_state_dict(*pool, garbage.path()); },
      "); it must be written by torch.save(dict(module.state_dict()), path)");
  expect_error(
      [] {
        attnpool::AttentionPooling other(8);
        attnpool::load_state_dict(*other, "/nonexistent/pooling.pt");
      },
      "load_state_dict: cannot open path = \"/nonexistent/pooling.pt\"");
}

}  // namespace
