// C++ tests of the attention_pool operator: values and gradients against an
// ATen composition of SPEC.md §1, the edge cases of §2, and error messages.

#include "expect_error.h"

#include <attnpool/attnpool.h>

#include <gtest/gtest.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace {

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);

// SPEC.md §1 written the slow way, projecting every key; masked positions are
// zeroed first and a sequence with nothing to attend pools to zeros.
torch::Tensor composed_attention_pool(
    const torch::Tensor& x,
    const torch::Tensor& query,
    const torch::Tensor& w_q,
    const torch::Tensor& w_k,
    const std::optional<torch::Tensor>& mask,
    int64_t num_heads,
    std::optional<double> scale) {
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2);
  const int64_t d = H / num_heads;
  const auto q = query.reshape({-1, H});
  const int64_t Q = q.size(0);
  const auto keep = mask.has_value() ? mask->ne(0) : torch::ones({B, L}, torch::kBool);
  const auto xs = x.masked_fill(keep.logical_not().unsqueeze(-1), 0);
  const auto qp = torch::matmul(q, w_q.t());
  const auto keys = torch::matmul(xs, w_k.t());
  auto s = torch::einsum(
               "blnd,qnd->bqnl", {keys.view({B, L, num_heads, d}), qp.view({Q, num_heads, d})}) *
           scale.value_or(1.0 / std::sqrt(static_cast<double>(d)));
  s = s.masked_fill(
      keep.logical_not().view({B, 1, 1, L}), -std::numeric_limits<double>::infinity());
  auto p = torch::softmax(s, -1);
  p = torch::where(keep.any(1).view({B, 1, 1, 1}), p, torch::zeros_like(p));
  const auto out =
      torch::einsum("bqnl,blnd->bqnd", {p, xs.view({B, L, num_heads, d})}).reshape({B, Q, H});
  return query.dim() == 1 ? out.select(1, 0) : out;
}

struct Case {
  int64_t batch, seq_len, hidden, num_queries, num_heads;  // num_queries 0: a 1-D query
  bool masked, strided;
};

struct Inputs {
  torch::Tensor x, query, w_q, w_k;
  std::optional<torch::Tensor> mask;
};

Inputs make_inputs(const Case& c) {
  torch::manual_seed(c.batch * 131 + c.seq_len * 17 + c.hidden + c.num_heads);
  Inputs in;
  in.x = torch::randn({c.batch, c.seq_len, c.hidden}, kF64);
  if (c.strided) {
    in.x = torch::randn({c.batch, 2 * c.seq_len, c.hidden}, kF64).slice(1, 0, 2 * c.seq_len, 2);
  }
  in.query = c.num_queries == 0 ? torch::randn({c.hidden}, kF64)
                                : torch::randn({c.num_queries, c.hidden}, kF64);
  in.w_q = torch::randn({c.hidden, c.hidden}, kF64) / std::sqrt(static_cast<double>(c.hidden));
  in.w_k = torch::randn({c.hidden, c.hidden}, kF64) / std::sqrt(static_cast<double>(c.hidden));
  if (c.masked) {
    auto mask = torch::rand({c.batch, c.seq_len}) > 0.3;
    if (c.batch > 1) {
      mask[1] = false;  // one sequence with nothing to attend
    }
    in.mask = mask;
  }
  return in;
}

class AttentionPoolCases : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionPoolCases, MatchesComposition) {
  const auto in = make_inputs(GetParam());
  const auto got =
      attnpool::attention_pool(in.x, in.query, in.w_q, in.w_k, in.mask, GetParam().num_heads);
  const auto want =
      composed_attention_pool(in.x, in.query, in.w_q, in.w_k, in.mask, GetParam().num_heads, {});
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_TRUE(torch::allclose(got, want, 1e-10, 1e-12)) << (got - want).abs().max();
}

TEST_P(AttentionPoolCases, GradientsMatchComposition) {
  const auto in = make_inputs(GetParam());
  const int64_t heads = GetParam().num_heads;
  auto grads_of = [&](const std::function<torch::Tensor(const std::vector<torch::Tensor>&)>& f) {
    std::vector<torch::Tensor> leaves;
    for (const auto& t : {in.x, in.query, in.w_q, in.w_k}) {
      leaves.push_back(t.detach().clone().requires_grad_(true));
    }
    const auto out = f(leaves);
    const auto weights = torch::linspace(-1.0, 1.0, out.numel(), kF64).view(out.sizes());
    (out * weights).sum().backward();
    std::vector<torch::Tensor> grads;
    for (const auto& leaf : leaves) {
      grads.push_back(leaf.grad().defined() ? leaf.grad() : torch::zeros_like(leaf));
    }
    return grads;
  };
  const auto got = grads_of([&](const std::vector<torch::Tensor>& t) {
    return attnpool::attention_pool(t[0], t[1], t[2], t[3], in.mask, heads);
  });
  const auto want = grads_of([&](const std::vector<torch::Tensor>& t) {
    return composed_attention_pool(t[0], t[1], t[2], t[3], in.mask, heads, {});
  });
  const char* names[] = {"x", "query", "w_q", "w_k"};
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(torch::allclose(got[i], want[i], 1e-9, 1e-11))
        << names[i] << ": " << (got[i] - want[i]).abs().max();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes,
    AttentionPoolCases,
    ::testing::Values(
        Case{2, 5, 8, 0, 1, false, false},
        Case{3, 7, 12, 0, 3, true, false},
        Case{2, 9, 16, 3, 4, true, false},
        Case{4, 6, 8, 2, 2, false, true},
        Case{1, 300, 64, 2, 4, true, false},
        Case{1, 2000, 40, 0, 2, false, false},
        // Q * n > H + Q: attention_pool projects the keys.
        Case{3, 7, 8, 6, 4, true, false},
        Case{2, 5, 8, 6, 4, false, true}),
    [](const ::testing::TestParamInfo<Case>& info) {
      const Case& c = info.param;
      return "B" + std::to_string(c.batch) + "_L" + std::to_string(c.seq_len) + "_H" +
             std::to_string(c.hidden) + "_Q" + std::to_string(c.num_queries) + "_heads" +
             std::to_string(c.num_heads) + (c.masked ? "_masked" : "") +
             (c.strided ? "_strided" : "");
    });

TEST(AttentionPool, FullyMaskedSequenceIsZeroWithZeroGradients) {
  auto x = torch::randn({2, 4, 8}, kF64).requires_grad_(true);
  auto query = torch::randn({8}, kF64).requires_grad_(true);
  auto w_q = torch::randn({8, 8}, kF64).requires_grad_(true);
  auto w_k = torch::randn({8, 8}, kF64).requires_grad_(true);
  auto mask = torch::zeros({2, 4}, torch::kInt32);
  const auto out = attnpool::attention_pool(x, query, w_q, w_k, mask);
  EXPECT_TRUE(torch::equal(out, torch::zeros({2, 8}, kF64)));
  out.sum().backward();
  for (const auto& t : {x, query, w_q, w_k}) {
    EXPECT_TRUE(torch::equal(t.grad(), torch::zeros_like(t)));
  }
}

TEST(AttentionPool, EmptySequenceAndEmptyBatch) {
  const auto w = torch::randn({8, 8});
  const auto empty_sequence =
      attnpool::attention_pool(torch::randn({3, 0, 8}), torch::randn({2, 8}), w, w);
  EXPECT_TRUE(torch::equal(empty_sequence, torch::zeros({3, 2, 8})));
  const auto empty_batch =
      attnpool::attention_pool(torch::randn({0, 5, 8}), torch::randn({8}), w, w);
  EXPECT_EQ(empty_batch.sizes(), (std::vector<int64_t>{0, 8}));
}

TEST(AttentionPool, BFloat16InputWithFloat32ParametersMatchesFloat64) {
  torch::manual_seed(3);
  const auto x = torch::randn({4, 33, 32}).to(torch::kBFloat16);
  const auto query = torch::randn({2, 32});
  const auto w_q = torch::randn({32, 32}) / 6.0;
  const auto w_k = torch::randn({32, 32}) / 6.0;
  const auto got = attnpool::attention_pool(x, query, w_q, w_k, std::nullopt, 4);
  EXPECT_EQ(got.scalar_type(), torch::kBFloat16);
  const auto want = composed_attention_pool(
      x.to(torch::kFloat64),
      query.to(torch::kFloat64),
      w_q.to(torch::kFloat64),
      w_k.to(torch::kFloat64),
      {},
      4,
      {});
  EXPECT_TRUE(torch::allclose(got.to(torch::kFloat64), want, 2e-2, 2e-2));
}

TEST(AttentionPool, DifferentiatingTheGradientIsRefused) {
  auto x = torch::randn({2, 3, 4}, kF64).requires_grad_(true);
  const auto w = torch::randn({4, 4}, kF64);
  const auto out = attnpool::attention_pool(x, torch::randn({4}, kF64), w, w);
  const auto grad = torch::autograd::grad({out.sum()}, {x}, {}, true, true)[0];
  EXPECT_THROW(
      {
        try {
          grad.sum().backward();
        } catch (const c10::Error& e) {
          EXPECT_NE(std::string(e.what()).find("not implemented"), std::string::npos) << e.what();
          throw;
        }
      },
      c10::Error);
}

// Forward-mode AD is implemented in the Python package; without it a tangent
// must raise, never be dropped (a zero Jacobian, silently).
TEST(AttentionPool, ForwardModeWithoutThePythonPackageIsRefused) {
  const auto level = torch::autograd::ForwardADLevel::get_next_idx();
  const auto x = torch::randn({2, 3, 4}, kF64);
  const auto dual = at::_make_dual(x, torch::ones_like(x), static_cast<int64_t>(level));
  const auto w = torch::randn({4, 4}, kF64);
  const auto query = torch::randn({4}, kF64);
  for (const auto& call : std::vector<std::function<void()>>{
           [&] { attnpool::attention_pool(dual, query, w, w); },
           [&] { attnpool::folded_attention_pool(dual, torch::randn({1, 4}, kF64)); },
           [&] { attnpool::fold_query(at::_make_dual(query, query, level), w, w); },
           [&] {
             attnpool::folded_attention_pool_varlen(
                 dual.view({6, 4}), torch::tensor({0, 6}), torch::randn({1, 4}, kF64));
           }}) {
    EXPECT_THROW(
        {
          try {
            call();
          } catch (const c10::NotImplementedError& e) {
            EXPECT_NE(
                std::string(e.what()).find("implemented in the Python package"), std::string::npos)
                << e.what();
            throw;
          }
        },
        c10::NotImplementedError);
  }
  torch::autograd::ForwardADLevel::release_idx(level);
}

TEST(AttentionPool, ReportsTheCpuInstructionSet) {
  const std::string isa = attnpool::cpu_kernel_isa();
  EXPECT_TRUE(
      isa == "AMX_BF16" || isa == "AVX512_BF16" || isa == "AVX512" || isa == "AVX2" ||
      isa == "DEFAULT")
      << isa;
}

using attnpool_test::expect_error;

// Ragged batches (SPEC.md §6) from C++: the packed rows pool as the padded
// batch with lengths does, with the same gradients, empty sequences included.
TEST(AttentionPoolVarlen, EqualsThePaddedBatchWithLengths) {
  torch::manual_seed(4);
  const std::vector<int64_t> lengths{3, 0, 9, 1};
  const auto cu_seqlens = torch::tensor({0, 3, 3, 12, 13}, torch::kInt32);
  auto x = torch::randn({13, 8}, kF64).requires_grad_(true);
  auto query = torch::randn({2, 8}, kF64).requires_grad_(true);
  auto w_q = torch::randn({8, 8}, kF64).requires_grad_(true);
  auto w_k = torch::randn({8, 8}, kF64).requires_grad_(true);
  const auto out = attnpool::attention_pool_varlen(x, cu_seqlens, query, w_q, w_k, 2);
  ASSERT_EQ(out.sizes(), (std::vector<int64_t>{4, 2, 8}));

  auto padded = torch::zeros({4, 9, 8}, kF64);
  for (int64_t b = 0, row = 0; b < 4; row += lengths[b], ++b) {
    padded[b].narrow(0, 0, lengths[b]).copy_(x.detach().narrow(0, row, lengths[b]));
  }
  padded.requires_grad_(true);
  auto dense_params = std::vector<torch::Tensor>{query, w_q, w_k};
  for (auto& t : dense_params) {
    t = t.detach().clone().requires_grad_(true);
  }
  const auto want = attnpool::attention_pool(
      padded,
      dense_params[0],
      dense_params[1],
      dense_params[2],
      std::nullopt,
      2,
      std::nullopt,
      std::nullopt,
      torch::tensor(lengths));
  EXPECT_TRUE(torch::allclose(out, want, 1e-12, 1e-12));
  EXPECT_TRUE(torch::equal(out[1], torch::zeros({2, 8}, kF64)));
  out.pow(2).sum().backward();
  want.pow(2).sum().backward();
  EXPECT_TRUE(torch::allclose(query.grad(), dense_params[0].grad(), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(w_q.grad(), dense_params[1].grad(), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(w_k.grad(), dense_params[2].grad(), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(x.grad().narrow(0, 3, 9), padded.grad()[2], 1e-12, 1e-12));

  // The folded form, full width: one head's pooled vector over the whole row.
  const auto u = attnpool::fold_query(query.detach(), w_q.detach(), w_k.detach(), 2);
  const auto full = attnpool::folded_attention_pool_varlen(x.detach(), cu_seqlens, u, 0.5, true);
  const auto full_want = attnpool::folded_attention_pool(
      padded.detach(), u, std::nullopt, 0.5, true, std::nullopt, torch::tensor(lengths));
  EXPECT_TRUE(torch::allclose(full, full_want, 1e-12, 1e-12));
}

TEST(AttentionPoolVarlen, BadOffsetsAreNamed) {
  const auto x = torch::randn({5, 8});
  const auto q = torch::randn({8});
  const auto w = torch::randn({8, 8});
  using attnpool::attention_pool_varlen;
  expect_error(
      [&] { attention_pool_varlen(x, torch::tensor({0, 3, 2, 5}), q, w, w); },
      "cu_seqlens must be non-decreasing, got cu_seqlens[2] = 2 < cu_seqlens[1] = 3");
  // Under the name of the function called, not of the part that read the values.
  try {
    attention_pool_varlen(x, torch::tensor({1, 5}), q, w, w);
    ADD_FAILURE() << "no error for cu_seqlens[0] = 1";
  } catch (const c10::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("attention_pool_varlen: cu_seqlens[0] must be 0", 0), 0u)
        << e.what();
  }
  expect_error(
      [&] { attention_pool_varlen(x, torch::tensor({0, 4}), q, w, w); },
      "cu_seqlens[-1] must be T = x.shape[0] = 5, got 4");
  expect_error(
      [&] { attention_pool_varlen(x, torch::tensor({0.0, 5.0}), q, w, w); },
      "cu_seqlens must be int32 or int64, got float32");
  expect_error(
      [&] { attention_pool_varlen(x.view({1, 5, 8}), torch::tensor({0, 5}), q, w, w); },
      "attention_pool_varlen: x must have shape [T, H] (the rows of all sequences)");
}

TEST(AttentionPoolErrors, NameTheArgumentAndTheValue) {
  const auto x = torch::randn({2, 5, 8});
  const auto q = torch::randn({8});
  const auto w = torch::randn({8, 8});
  using attnpool::attention_pool;
  expect_error(
      [&] { attention_pool(torch::randn({5, 8}), q, w, w); },
      "x must have shape [B, L, H], got a 2-D tensor");
  expect_error(
      [&] { attention_pool(x.to(torch::kInt64), q, w, w); },
      "x must be float64, float32, float16 or bfloat16, got int64");
  expect_error(
      [&] { attention_pool(x, torch::randn({6}), w, w); },
      "query must have shape [H] or [Q, H] with H = 8");
  expect_error(
      [&] { attention_pool(x, torch::randn({1, 2, 8}), w, w); },
      "query must have shape [H] or [Q, H]");
  expect_error(
      [&] { attention_pool(x, q, torch::randn({8, 7}), w); },
      "w_q must have shape [H, H] = [8, 8]");
  expect_error(
      [&] { attention_pool(x, q, w, torch::randn({7, 8})); },
      "w_k must have shape [H, H] = [8, 8]");
  expect_error(
      [&] { attention_pool(x, q, w, w, std::nullopt, 3); },
      "num_heads must divide H = 8, got num_heads = 3");
  expect_error(
      [&] { attention_pool(x, q, w, w, std::nullopt, 0); }, "num_heads must be >= 1, got 0");
  expect_error(
      [&] { attention_pool(x, q, w, w, std::nullopt, 1, -1.0); },
      "scale must be a finite positive number, got -1");
  expect_error(
      [&] { attention_pool(x, q, w, w, std::nullopt, 1, std::nan("")); },
      "scale must be a finite positive number");
  expect_error(
      [&] { attention_pool(x, q, w, w, torch::ones({2, 4})); },
      "mask must have shape [B, L] = [2, 5], got [2, 4]");
  expect_error(
      [&] { attention_pool(x, q, w, w, torch::zeros({2, 5})); },
      "mask must be bool or an integer dtype (nonzero = attend), got float32. A floating-point "
      "mask is refused");
  expect_error(
      [&] { attention_pool(x, q, w, w, torch::ones({2, 5}, torch::kBool).to(torch::kMeta)); },
      "mask must be on the same device as x (cpu), got meta");
  expect_error(
      [&] { attention_pool(x, q.to(torch::kMeta), w, w); },
      "query must be on the same device as x (cpu), got meta");
  expect_error(
      [&] { attention_pool(x, q, w.to(torch::kFloat64), w); },
      "query, w_q and w_k must share one dtype");
  expect_error(
      [&] {
        attention_pool(x, q.to(torch::kFloat64), w.to(torch::kFloat64), w.to(torch::kFloat64));
      },
      "must have x's dtype (float32) or float32 when x is float16/bfloat16, got float64");
}

}  // namespace
