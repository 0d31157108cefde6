// The CUDA kernels of folded_attention_pool (ops/cuda/folded_attention_pool_kernel.cuh)
// run on the CPU through tests/cpp/emulation/cuda_emulation.h, against the
// CPU operators: every launch layout (vector width, chunks per thread, block
// size), sequences cut into pieces and their merge, masks and attn_bias, heads, queries,
// dtypes; and the CUDA fold (matrix products) against the CPU fold kernels.
// This checks the device code's logic where no GPU is available; the real
// GPU runs are in the Python tests (parametrised over devices).

#include "ops/cuda/folded_attention_pool_kernel.cuh"
#include "ops/cuda/one_score_kernel.cuh"
#include "ops/cuda/score_softmax_kernel.cuh"
#include "ops/cuda/tensor_core_kernel.cuh"
#include "ops/fold_query.h"
#include "ops/folded_attention_pool.h"
#include "ops/pool_by_matmul.h"

#include <attnpool/attnpool.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using attnpool_emulation::launch;

struct Case {
  int64_t batch, seq_len, hidden, num_queries, num_heads;  // num_queries 0: a 1-D query
  bool masked;
  torch::ScalarType dtype;
  int threads, vec, chunks;
  int64_t pieces;
  bool one_score = false;  // the kernels of one_score_kernel.cuh (one query, one head)
  int rows = attnpool::cuda::kOneScoreRows;  // the one-score kernels' rows per warp tile
  bool u_shared = false;                     // the one-score forward reads u from shared memory
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return std::string(c10::toString(c.dtype)) + "_B" + std::to_string(c.batch) + "_L" +
         std::to_string(c.seq_len) + "_H" + std::to_string(c.hidden) + "_Q" +
         std::to_string(c.num_queries) + "_n" + std::to_string(c.num_heads) +
         (c.masked ? "_masked" : "") + "_T" + std::to_string(c.threads) + "_vec" +
         std::to_string(c.vec) + "_chunks" + std::to_string(c.chunks) + "_pieces" +
         std::to_string(c.pieces) + (c.one_score ? "_rows" + std::to_string(c.rows) : "") +
         (c.u_shared ? "_u_shared" : "");
}

struct Inputs {
  torch::Tensor x, query, w_q, w_k, mask, attn_bias;
};

Inputs make_inputs(const Case& c) {
  torch::manual_seed(c.batch * 7 + c.seq_len * 3 + c.hidden);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto param_dtype = c.dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  Inputs in;
  in.x = torch::randn({c.batch, c.seq_len, c.hidden}, f64).to(c.dtype);
  in.query = (c.num_queries == 0 ? torch::randn({c.hidden}, f64)
                                 : torch::randn({c.num_queries, c.hidden}, f64))
                 .to(param_dtype);
  in.w_q = (torch::randn({c.hidden, c.hidden}, f64) / std::sqrt(double(c.hidden))).to(param_dtype);
  in.w_k = (torch::randn({c.hidden, c.hidden}, f64) / std::sqrt(double(c.hidden))).to(param_dtype);
  if (c.masked) {
    in.mask = torch::rand({c.batch, c.seq_len}) > 0.3;
    if (c.batch > 1) {
      in.mask[1] = false;
    }
    // Rows that are not attended are never read (SPEC.md): NaN there must
    // not reach any result.
    in.x.masked_fill_(in.mask.logical_not().unsqueeze(-1), NAN);
    // Masked cases also add a bias, -inf at some positions.
    in.attn_bias = torch::randn({c.batch, c.seq_len}, f64).to(param_dtype);
    in.attn_bias.masked_fill_(torch::rand({c.batch, c.seq_len}) > 0.8, -INFINITY);
  }
  return in;
}

std::optional<torch::Tensor> optional(const torch::Tensor& t) {
  return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
}

// Calls f(std::integral_constant VEC, std::integral_constant CHUNKS).
template <typename scalar_t, typename F>
void with_layout(int vec, int chunks, F&& f) {
  constexpr int kWide = attnpool::cuda::kPackWidth<scalar_t>;
  auto by_chunks = [&](auto v) {
    if (chunks == 1) {
      f(v, std::integral_constant<int, 1>{});
    } else if (chunks == 2) {
      f(v, std::integral_constant<int, 2>{});
    } else if (chunks == 4) {
      f(v, std::integral_constant<int, 4>{});
    } else {
      f(v, std::integral_constant<int, 8>{});  // the one-score kernels' widest rows
    }
  };
  if (vec == 1) {
    by_chunks(std::integral_constant<int, 1>{});
  } else {
    by_chunks(std::integral_constant<int, kWide>{});
  }
}

// Calls f(std::integral_constant ROWS) for the one-score kernels' rows per
// warp tile: 1, 2 (theirs) or 4 (benchmarks/one_score_kernels.cu times all three).
template <typename F>
void with_rows(int rows, F&& f) {
  if (rows == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (rows == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 2>{});
  }
}

void expect_close(
    const torch::Tensor& got, const torch::Tensor& want, double tol, const char* what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const auto g = got.to(torch::kFloat64);
  const auto w = want.to(torch::kFloat64);
  EXPECT_TRUE(torch::allclose(g, w, tol, tol, /*equal_nan=*/true))
      << what << ": max difference " << (g - w).abs().nan_to_num(0.0).max().item<double>();
}

double tolerance(torch::ScalarType dtype) {
  return dtype == torch::kFloat64 ? 1e-10 : dtype == torch::kFloat32 ? 1e-4 : 3e-2;
}

using ForwardOp = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&,
    const at::Tensor&,
    const std::optional<at::Tensor>&,
    double,
    bool,
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);
using BackwardOp = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const std::optional<at::Tensor>&,
    const at::Tensor&,
    const at::Tensor&,
    double,
    bool,
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);
using FoldBackwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    int64_t);

template <typename Signature>
c10::TypedOperatorHandle<Signature> cpu_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// What the CUDA entry points compute, emulated: u from the matmul fold (the
// CUDA fold), then the pooling kernels.
struct Emulated {
  torch::Tensor u, projected, out, lse, dx, du;
};

double default_scale(const Case& c) {
  return 1.0 / std::sqrt(double(c.hidden / c.num_heads));
}

// Runs the CUDA forward kernels, then the backward kernels from that forward's
// out and lse, launched as the case says.
Emulated run_emulated(const Case& c, const Inputs& in, const torch::Tensor& grad_out) {
  const int64_t B = c.batch, L = c.seq_len, H = c.hidden, n = c.num_heads;
  const int64_t Q = std::max<int64_t>(c.num_queries, 1);
  const int64_t num_scores = Q * n;
  const auto mask = optional(in.mask);
  const auto attn_bias = optional(in.attn_bias);
  Emulated e{};
  std::tie(e.u, e.projected) =
      attnpool::detail::fold_query_by_matmul(in.query, in.w_q, in.w_k, n, std::nullopt);
  // The inputs as the CUDA entry points prepare them.
  auto f = attnpool::detail::prepare_forward(
      in.x, e.u, mask, default_scale(c), false, attn_bias, std::nullopt);
  const auto acc_options = f.out.options();
  const auto cut = attnpool::PieceCut::into(L, c.pieces);
  auto partials = torch::empty({B * Q * cut.pieces, 1 + 2 * n + H}, acc_options);
  f.params.cut = cut;
  f.params.partials = partials.mutable_data_ptr();
  e.out = f.out;
  e.lse = f.lse;
  auto du_partials = torch::empty({B * cut.pieces, num_scores, H}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_layout<scalar_t>(c.vec, c.chunks, [&](auto vec, auto chunks) {
      constexpr int V = decltype(vec)::value;
      constexpr int C = decltype(chunks)::value;
      // The one-score kernels read rows in 16-byte packs only.
      constexpr bool kOneScoreLayout = V == attnpool::cuda::kPackWidth<scalar_t>;
      // Launches the one-score kernel kernel_for(rows) with the case's rows per
      // warp tile, a block per piece of each sequence.
      auto launch_one_score = [&](auto kernel_for, const auto& params, int64_t u_columns = 0) {
        with_rows(c.rows, [&](auto rows) {
          launch(
              kernel_for(rows),
              B * cut.pieces,
              c.threads,
              attnpool::cuda::one_score_shared_bytes<acc_t>(c.threads / 32, H, u_columns),
              params);
        });
      };
      if (c.one_score) {
        ASSERT_EQ(num_scores, 1) << "the one-score kernels take one query and one head";
        ASSERT_GE(32 * C * V, H) << "the case does not cover the row";
        ASSERT_TRUE(kOneScoreLayout) << "the one-score kernels read 16-byte packs";
        if constexpr (kOneScoreLayout) {
          if (c.u_shared) {
            launch_one_score(
                [](auto rows) {
                  return &attnpool::cuda::
                      one_score_forward_kernel<scalar_t, V, C, decltype(rows)::value, true>;
                },
                f.params,
                attnpool::cuda::kLaneColumns<V, C>);
          } else {
            launch_one_score(
                [](auto rows) {
                  return &attnpool::cuda::
                      one_score_forward_kernel<scalar_t, V, C, decltype(rows)::value>;
                },
                f.params);
          }
        }
      } else if constexpr (C <= 4) {
        ASSERT_GE(int64_t{c.threads} * C * V, H) << "the case does not cover the row";
        launch(
            &attnpool::cuda::forward_kernel<scalar_t, V, C>,
            B * Q * cut.pieces,
            c.threads,
            attnpool::cuda::forward_shared_bytes<acc_t>(c.threads / 32, n),
            f.params);
      }
      if (cut.pieces > 1) {
        const int threads = attnpool::cuda::merge_threads(cut.pieces);
        launch(
            &attnpool::cuda::merge_pieces_kernel<scalar_t>,
            B * Q * attnpool::cuda::merge_blocks_per_row(H, n),
            threads,
            attnpool::cuda::merge_shared_bytes<acc_t>(threads),
            f.params);
      }
      auto g = attnpool::detail::prepare_backward(
          grad_out,
          in.x,
          e.u,
          mask,
          e.out,
          e.lse,
          default_scale(c),
          false,
          attn_bias,
          std::nullopt);
      g.params.cut = cut;
      g.params.du_partials = du_partials.mutable_data_ptr();
      if (c.one_score) {
        if constexpr (kOneScoreLayout) {
          launch_one_score(
              [](auto rows) {
                return &attnpool::cuda::
                    one_score_backward_kernel<scalar_t, V, C, decltype(rows)::value>;
              },
              g.params);
        }
      } else if constexpr (C <= 4) {
        launch(
            &attnpool::cuda::backward_kernel<scalar_t, V, C>,
            B * cut.pieces,
            c.threads,
            attnpool::cuda::backward_shared_bytes<acc_t>(c.threads / 32, n, num_scores),
            g.params);
      }
      launch(
          &attnpool::cuda::reduce_partials_kernel<acc_t>,
          (num_scores * H + attnpool::cuda::kStripeColumns - 1) / attnpool::cuda::kStripeColumns,
          64,
          attnpool::cuda::reduce_shared_bytes<acc_t>(64),
          du_partials.const_data_ptr<acc_t>(),
          g.du.mutable_data_ptr<acc_t>(),
          B * cut.pieces,
          num_scores * H);
      e.dx = g.dx;
      e.du = g.du.view(e.u.sizes());
    });
  });
  return e;
}

torch::Tensor random_grad_out(const Case& c, torch::IntArrayRef sizes) {
  return torch::randn(sizes, torch::TensorOptions().dtype(torch::kFloat64)).to(c.dtype);
}

class EmulatedCudaKernels : public ::testing::TestWithParam<Case> {};

TEST_P(EmulatedCudaKernels, ForwardAndBackwardMatchTheCpuOperators) {
  const Case& c = GetParam();
  const auto in = make_inputs(c);
  const int64_t n = c.num_heads;
  const auto mask = optional(in.mask);
  const auto attn_bias = optional(in.attn_bias);
  const double scale = default_scale(c);
  const auto [want_u, want_projected] =
      cpu_op<decltype(attnpool::detail::fold_query_by_matmul)>("attnpool::_fold_query_forward")
          .call(in.query, in.w_q, in.w_k, n, std::nullopt);
  const auto [want_out, want_lse] =
      cpu_op<ForwardOp>("attnpool::_folded_attention_pool_forward")
          .call(in.x, want_u, mask, scale, false, attn_bias, std::nullopt);
  const auto grad_out = random_grad_out(c, want_out.sizes());
  const auto [want_dx, want_du] = cpu_op<BackwardOp>("attnpool::_folded_attention_pool_backward")
                                      .call(
                                          grad_out,
                                          in.x,
                                          want_u,
                                          mask,
                                          want_out,
                                          want_lse,
                                          scale,
                                          false,
                                          attn_bias,
                                          std::nullopt);
  const auto want_fold_grads = cpu_op<FoldBackwardOp>("attnpool::_fold_query_backward")
                                   .call(want_du, in.query, in.w_q, in.w_k, want_projected, n);

  const auto e = run_emulated(c, in, grad_out);
  const double tol = tolerance(c.dtype);
  expect_close(e.u, want_u, tol, "u");
  expect_close(e.out, want_out, tol, "out");
  expect_close(e.lse, want_lse, tol, "lse");
  expect_close(e.dx, want_dx, tol, "dx");
  expect_close(e.du, want_du, tol, "du");
  const auto fold_grads = attnpool::detail::fold_query_backward_by_matmul(
      e.du, in.query, in.w_q, in.w_k, e.projected, n);
  expect_close(std::get<0>(fold_grads), std::get<0>(want_fold_grads), tol, "dquery");
  expect_close(std::get<1>(fold_grads), std::get<1>(want_fold_grads), tol, "dw_q");
  expect_close(std::get<2>(fold_grads), std::get<2>(want_fold_grads), tol, "dw_k");
  expect_close(std::get<3>(fold_grads), std::get<3>(want_fold_grads), tol, "dq_bias");
}

// When each sequence has one row (or one attended row), softmax puts all the
// weight on it and the scores get no gradient, exactly, in the reference. The
// kernels sum delta = G . out and dp = G . x alike, so that they cancel exactly
// here instead of leaving rounding noise in the parameters' gradients.
void expect_single_row_gradients(const Case& c) {
  auto in = make_inputs(c);
  if (c.masked) {
    in.mask = torch::zeros({c.batch, c.seq_len}, torch::kBool);
    in.mask.select(1, 4).fill_(true);
    in.attn_bias = torch::Tensor();  // row 4 alone, whatever the bias would exclude
    // NaN in the rows this mask leaves out, and in no other.
    in.x = in.x.nan_to_num(1.0).masked_fill(in.mask.logical_not().unsqueeze(-1), NAN);
  }
  in.x = in.x * 3;  // scores far from 0, so that exp() is not trivially 1
  const auto grad_out = random_grad_out(c, {c.batch, c.num_queries, c.hidden});
  const auto e = run_emulated(c, in, grad_out);
  const std::string what =
      std::string(c.masked ? "masked" : "one row") + (c.one_score ? ", one-score kernels" : "");
  EXPECT_EQ(e.du.abs().max().item<double>(), 0.0) << what;
  // dx of that row is the output's gradient summed over the queries.
  const auto attended = e.dx.select(1, c.masked ? 4 : 0);
  expect_close(attended, grad_out.sum(1), 1e-5, what.c_str());
}

TEST(EmulatedCudaKernelsSingleRow, ScoreGradientIsExactlyZero) {
  for (const bool masked : {false, true}) {
    const int64_t seq_len = masked ? 7 : 1;
    expect_single_row_gradients(Case{3, seq_len, 96, 2, 2, masked, torch::kFloat32, 64, 4, 1, 2});
    expect_single_row_gradients(
        Case{3, seq_len, 96, 1, 1, masked, torch::kFloat32, 64, 4, 1, 2, true});
  }
}

// A ragged batch (x [T, H], cu_seqlens) through the CUDA kernels as the CUDA
// entry points launch them: pieces of rows_per_piece rows from the piece
// table, a grid sized for the most pieces T rows can make (blocks past the
// last piece get no rows), the merge, and du's partials summed over the
// whole grid. Against the CPU varlen operators.
using VarlenForwardOp = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool);
using VarlenBackwardOp = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    double,
    bool);

template <typename scalar_t, int V, int C, bool kOneScore = false>
void run_emulated_varlen(
    const torch::Tensor& x,
    const torch::Tensor& cu_seqlens,
    const torch::Tensor& u,
    bool full_width,
    int64_t rows_per_piece,
    int threads,
    const torch::Tensor& grad_out,
    torch::Tensor (&got)[4]) {
  using acc_t = at::opmath_type<scalar_t>;
  namespace cuda = attnpool::cuda;
  auto f = attnpool::detail::prepare_varlen_forward(x, cu_seqlens, u, 0.5, full_width);
  const int64_t B = f.params.batch, T = f.params.seq_len, H = f.params.hidden;
  const int64_t Q = f.params.num_queries, n = f.params.num_heads;
  const int64_t most_items = B + (T + rows_per_piece - 1) / rows_per_piece;
  const auto first_piece = attnpool::detail::ragged_first_piece(f.pool.offsets, rows_per_piece);
  f.params.cut = {(T + rows_per_piece - 1) / rows_per_piece + 1, rows_per_piece};
  f.params.first_piece = first_piece.const_data_ptr<int64_t>();
  auto partials = torch::empty({most_items * Q, 1 + 2 * n + H}, f.out.options());
  f.params.partials = partials.mutable_data_ptr();
  if constexpr (kOneScore) {
    launch(
        &cuda::one_score_forward_kernel<scalar_t, V, C>,
        most_items,
        threads,
        cuda::one_score_shared_bytes<acc_t>(threads / 32, H),
        f.params);
  } else {
    launch(
        &cuda::forward_kernel<scalar_t, V, C>,
        most_items * Q,
        threads,
        cuda::forward_shared_bytes<acc_t>(threads / 32, n),
        f.params);
  }
  const int merge_threads = cuda::merge_threads(f.params.cut.pieces);
  launch(
      &cuda::merge_pieces_kernel<scalar_t>,
      B * Q * cuda::merge_blocks_per_row(H, n),
      merge_threads,
      cuda::merge_shared_bytes<acc_t>(merge_threads),
      f.params);
  auto g = attnpool::detail::prepare_varlen_backward(
      grad_out, x, cu_seqlens, u, f.out, f.lse, 0.5, full_width);
  g.params.cut = f.params.cut;
  g.params.first_piece = first_piece.const_data_ptr<int64_t>();
  const int64_t num_scores = Q * n;
  auto du_partials = torch::empty({most_items, num_scores, H}, f.out.options());
  g.params.du_partials = du_partials.mutable_data_ptr();
  if constexpr (kOneScore) {
    launch(
        &cuda::one_score_backward_kernel<scalar_t, V, C>,
        most_items,
        threads,
        cuda::one_score_shared_bytes<acc_t>(threads / 32, H),
        g.params);
  } else {
    launch(
        &cuda::backward_kernel<scalar_t, V, C>,
        most_items,
        threads,
        cuda::backward_shared_bytes<acc_t>(threads / 32, n, num_scores),
        g.params);
  }
  launch(
      &cuda::reduce_partials_kernel<acc_t>,
      (num_scores * H + cuda::kStripeColumns - 1) / cuda::kStripeColumns,
      64,
      cuda::reduce_shared_bytes<acc_t>(64),
      du_partials.const_data_ptr<acc_t>(),
      g.du.mutable_data_ptr<acc_t>(),
      most_items,
      num_scores * H);
  got[0] = f.out;
  got[1] = f.lse;
  got[2] = g.dx;
  got[3] = g.du.view(u.sizes());
}

TEST(EmulatedCudaKernelsRagged, VarlenMatchesTheCpuOperators) {
  // Empty sequences first, in the middle and last; one long one in pieces.
  const auto cu_seqlens = torch::tensor({0, 0, 3, 3, 45, 46, 58, 58}, torch::kInt32);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  // (Each emulated run takes seconds: two cover both output modes and both
  // layouts of a thread's columns, the third the one-score kernels.)
  for (const int run : {0, 1, 2}) {
    const bool full_width = run == 1;
    const bool one_score = run == 2;
    const auto dtype = full_width  ? torch::kBFloat16
                       : one_score ? torch::kFloat32
                                   : torch::kFloat64;
    torch::manual_seed(run + 1);
    const auto x = torch::randn({58, 64}, f64).to(dtype);
    const auto acc = dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    const auto u_shape = one_score ? std::vector<int64_t>{1, 64} : std::vector<int64_t>{2, 2, 64};
    const auto u = (torch::randn(u_shape, f64) / 8).to(acc);
    const auto [want_out, want_lse] =
        cpu_op<VarlenForwardOp>("attnpool::_folded_attention_pool_varlen_forward")
            .call(x, cu_seqlens, u, 0.5, full_width);
    const auto grad_out = torch::randn(want_out.sizes(), f64).to(acc);
    const auto [want_dx, want_du] =
        cpu_op<VarlenBackwardOp>("attnpool::_folded_attention_pool_varlen_backward")
            .call(grad_out, x, cu_seqlens, u, want_out, want_lse, 0.5, full_width);
    torch::Tensor got[4];
    if (one_score) {
      run_emulated_varlen<float, 4, 1, true>(x, cu_seqlens, u, false, 8, 64, grad_out, got);
    } else if (dtype == torch::kFloat64) {
      run_emulated_varlen<double, 1, 2>(x, cu_seqlens, u, full_width, 8, 32, grad_out, got);
    } else {
      run_emulated_varlen<at::BFloat16, 8, 1>(x, cu_seqlens, u, full_width, 8, 32, grad_out, got);
    }
    const double tol = tolerance(dtype);
    expect_close(got[0], want_out, tol, "out");
    expect_close(got[1], want_lse, tol, "lse");
    expect_close(got[2], want_dx, tol, "dx");
    expect_close(got[3], want_du, tol, "du");
  }
}

// The CUDA entry points' matrix products for several scores per row
// (ops/pool_by_matmul.h), on the CPU, against the CPU operators: heads and
// queries, full width, masks and bias (a sequence with nothing to attend),
// an empty sequence, all four dtypes.
struct MatmulCase {
  int64_t batch, seq_len, hidden, num_queries, num_heads;
  bool full_width, masked;
  torch::ScalarType dtype;
};

TEST(MatmulPath, ForwardAndBackwardMatchTheCpuOperators) {
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  for (const MatmulCase& c : {
           MatmulCase{2, 13, 48, 2, 3, false, true, torch::kFloat64},
           MatmulCase{3, 9, 64, 3, 2, true, true, torch::kFloat32},
           MatmulCase{2, 17, 128, 1, 4, false, true, torch::kBFloat16},
           MatmulCase{2, 11, 64, 4, 1, false, false, torch::kHalf},
           MatmulCase{2, 7, 24, 2, 3, true, false, torch::kFloat32},
           MatmulCase{2, 0, 32, 2, 2, false, false, torch::kFloat32},
       }) {
    SCOPED_TRACE(
        std::string(c10::toString(c.dtype)) + " Q" + std::to_string(c.num_queries) + " n" +
        std::to_string(c.num_heads) + (c.full_width ? " full width" : ""));
    torch::manual_seed(c.hidden + c.seq_len);
    const auto acc = c.dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    const auto x = torch::randn({c.batch, c.seq_len, c.hidden}, f64).to(c.dtype);
    const auto u =
        (torch::randn({c.num_queries, c.num_heads, c.hidden}, f64) / std::sqrt(double(c.hidden)))
            .to(acc);
    std::optional<torch::Tensor> mask;
    std::optional<torch::Tensor> attn_bias;
    if (c.masked) {
      mask = torch::rand({c.batch, c.seq_len}) > 0.3;
      mask->select(0, 1).fill_(false);
      attn_bias = torch::randn({c.batch, c.seq_len}, f64).to(acc);
      attn_bias->masked_fill_(torch::rand({c.batch, c.seq_len}) > 0.8, -INFINITY);
    }
    const double scale = 0.7;
    const auto [want_out, want_lse] = cpu_op<ForwardOp>("attnpool::_folded_attention_pool_forward")
                                          .call(x, u, mask, scale, c.full_width, attn_bias, {});
    const auto grad_out = torch::randn(want_out.sizes(), f64).to(acc);
    const auto [want_dx, want_du] =
        cpu_op<BackwardOp>("attnpool::_folded_attention_pool_backward")
            .call(grad_out, x, u, mask, want_out, want_lse, scale, c.full_width, attn_bias, {});

    const auto f =
        attnpool::detail::prepare_forward(x, u, mask, scale, c.full_width, attn_bias, {});
    const auto [out, lse] = attnpool::detail::pool_forward_by_matmul(f);
    const auto g = attnpool::detail::prepare_backward(
        grad_out, x, u, mask, out, lse, scale, c.full_width, attn_bias, {});
    const auto [dx, du] = attnpool::detail::pool_backward_by_matmul(g);
    const double tol = tolerance(c.dtype);
    expect_close(out, want_out, tol, "out");
    expect_close(lse, want_lse, tol, "lse");
    expect_close(dx, want_dx, tol, "dx");
    EXPECT_EQ(dx.scalar_type(), c.dtype);
    expect_close(du.view(u.sizes()), want_du, tol, "du");
  }
}

// With bfloat16 rows the float32 operands (u, the weights, G, ds) enter the
// products as two bfloat16 terms each, so out and du stay close to the
// float64 op on the same rows even where the softmax is sharp and du's sum
// cancels. Rounded to bfloat16 instead, the weights and ds put du 7% off on
// an H200 (tests/test_hypothesis.py, scale 3 on rows of size 3).
TEST(MatmulPath, BFloat16RowsKeepTheBitsOfFloat32Operands) {
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  for (const bool full_width : {false, true}) {
    torch::manual_seed(5);
    const auto x = (torch::randn({2, 7, 12}, f64) * 3).to(torch::kBFloat16);
    const auto u = torch::randn({1, 2, 12}, f64).to(torch::kFloat32);
    const double scale = 3.0;
    const auto x64 = x.to(torch::kFloat64);
    const auto u64 = u.to(torch::kFloat64);
    const auto [want_out, want_lse] = cpu_op<ForwardOp>("attnpool::_folded_attention_pool_forward")
                                          .call(x64, u64, {}, scale, full_width, {}, {});
    const auto grad_out = torch::randn(want_out.sizes(), f64).to(torch::kFloat32);
    const auto [want_dx, want_du] = cpu_op<BackwardOp>("attnpool::_folded_attention_pool_backward")
                                        .call(
                                            grad_out.to(torch::kFloat64),
                                            x64,
                                            u64,
                                            {},
                                            want_out,
                                            want_lse,
                                            scale,
                                            full_width,
                                            {},
                                            {});

    const auto f = attnpool::detail::prepare_forward(x, u, {}, scale, full_width, {}, {});
    const auto [out, lse] = attnpool::detail::pool_forward_by_matmul(f);
    const auto g =
        attnpool::detail::prepare_backward(grad_out, x, u, {}, out, lse, scale, full_width, {}, {});
    const auto du = std::get<1>(attnpool::detail::pool_backward_by_matmul(g)).view(u.sizes());
    SCOPED_TRACE(full_width ? "full width" : "head slices");
    const double out_tol = 1e-4 * want_out.abs().max().item<double>();
    const double du_tol = 1e-4 * want_du.abs().max().item<double>();
    EXPECT_LE((out.to(torch::kFloat64) - want_out).abs().max().item<double>(), out_tol);
    EXPECT_LE((du.to(torch::kFloat64) - want_du).abs().max().item<double>(), du_tol);
  }
}

// As EmulatedCudaKernelsSingleRow: with one attended row per sequence, du is
// exactly 0 (delta is sum_l p_l dp_l, from the same dp).
TEST(MatmulPath, ScoreGradientIsExactlyZero) {
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  for (const bool masked : {false, true}) {
    torch::manual_seed(3);
    const int64_t seq_len = masked ? 7 : 1;
    const auto x = torch::randn({3, seq_len, 96}, f64).to(torch::kFloat32) * 3;
    const auto u = torch::randn({2, 2, 96}, f64).to(torch::kFloat32) / 10;
    std::optional<torch::Tensor> mask;
    if (masked) {
      mask = torch::zeros({3, seq_len}, torch::kBool);
      mask->select(1, 4).fill_(true);
    }
    const auto f = attnpool::detail::prepare_forward(x, u, mask, 0.5, false, {}, {});
    const auto [out, lse] = attnpool::detail::pool_forward_by_matmul(f);
    const auto grad_out = torch::randn(out.sizes(), f64).to(torch::kFloat32);
    const auto g =
        attnpool::detail::prepare_backward(grad_out, x, u, mask, out, lse, 0.5, false, {}, {});
    const auto [dx, du] = attnpool::detail::pool_backward_by_matmul(g);
    EXPECT_EQ(du.abs().max().item<double>(), 0.0) << (masked ? "masked" : "one row");
    expect_close(dx.select(1, masked ? 4 : 0), grad_out.sum(1), 1e-5, "dx of the attended row");
  }
}

// The softmax kernels of the matrix-product path (score_softmax_kernel.cuh),
// emulated: (weights, lse, p, ds).
template <typename acc_t>
std::vector<torch::Tensor> emulated_score_softmax(
    const torch::Tensor& products,
    const torch::Tensor& bias,
    const torch::Tensor& keep,
    double scale,
    const torch::Tensor& dp,
    int64_t pieces) {
  using attnpool::cuda::ScoreSoftmaxParams;
  ScoreSoftmaxParams<acc_t> a{};
  a.product = products.const_data_ptr<acc_t>();
  a.bias = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  a.keep = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  a.scale = static_cast<acc_t>(scale);
  a.batch = products.size(0);
  a.seq_len = products.size(1);
  a.num_scores = products.size(2);
  a.cut(pieces);
  const torch::Tensor partials =
      torch::empty({a.batch, a.pieces, a.num_scores, 2}, products.options());
  a.partials = partials.mutable_data_ptr<acc_t>();
  auto weights = torch::empty_like(products);
  auto lse = torch::empty({products.size(0), products.size(2), 2}, products.options());
  auto probs = torch::empty_like(products);
  auto dscores = torch::empty_like(products);
  a.weights = weights.mutable_data_ptr<acc_t>();
  a.lse_out = lse.mutable_data_ptr<acc_t>();
  a.lse = lse.const_data_ptr<acc_t>();
  a.dp = dp.const_data_ptr<acc_t>();
  a.probs = probs.mutable_data_ptr<acc_t>();
  a.dscores = dscores.mutable_data_ptr<acc_t>();
  const int64_t shared = attnpool::cuda::score_softmax_shared_bytes<acc_t>();
  const int threads = attnpool::cuda::kSoftmaxThreads;
  launch(&attnpool::cuda::score_softmax_state_kernel<acc_t>, a.blocks(), threads, shared, a);
  launch(&attnpool::cuda::score_softmax_weights_kernel<acc_t>, a.blocks(), threads, shared, a);
  launch(&attnpool::cuda::score_softmax_probs_kernel<acc_t>, a.blocks(), threads, shared, a);
  launch(&attnpool::cuda::score_softmax_dscores_kernel<acc_t>, a.blocks(), threads, shared, a);
  return {weights, lse, probs, dscores};
}

// Against the tensor operators they replace: 40 scores (two blocks of
// columns, the second partly empty), 19 rows (groups of unequal length) in
// one piece or in pieces of 7, 7 and 5, a bias with -inf, a sequence with
// nothing to attend, a NaN score.
TEST(ScoreSoftmaxKernels, MatchTheTensorOperators) {
  const std::pair<torch::ScalarType, int64_t> cases[] = {
      {torch::kFloat64, 1}, {torch::kFloat32, 1}, {torch::kFloat64, 3}, {torch::kFloat32, 3}};
  for (const auto& [dtype, pieces] : cases) {
    SCOPED_TRACE(std::string(c10::toString(dtype)) + " pieces " + std::to_string(pieces));
    torch::manual_seed(11);
    const auto options = torch::TensorOptions().dtype(dtype);
    const auto products = torch::randn({3, 19, 40}, options) * 4;
    products[2][5][7] = NAN;
    auto bias = torch::randn({3, 19}, options);
    bias.masked_fill_(torch::rand({3, 19}) > 0.8, -INFINITY);
    auto keep = torch::rand({3, 19}) > 0.3;
    keep[1] = false;
    keep[2][5] = true;
    bias[2][5] = 0;
    const auto dp = torch::randn({3, 19, 40}, options);
    const double scale = 0.7;
    const auto [want_weights, want_lse] =
        attnpool::detail::score_softmax_by_operators(products, bias, keep, scale);
    const auto [want_probs, want_ds] = attnpool::detail::score_softmax_backward_by_operators(
        products, bias, keep, scale, want_lse, dp);
    const auto got = dtype == torch::kFloat64
                         ? emulated_score_softmax<double>(products, bias, keep, scale, dp, pieces)
                         : emulated_score_softmax<float>(products, bias, keep, scale, dp, pieces);
    const double tol = tolerance(dtype);
    expect_close(got[0], want_weights, tol, "weights");
    expect_close(got[1], want_lse, tol, "lse");
    expect_close(got[2], want_probs, tol, "p");
    expect_close(got[3], want_ds, tol, "ds");
    EXPECT_TRUE(got[0][2][5][7].isnan().item<bool>()) << "NaN score";
    EXPECT_EQ(got[1].select(0, 1).select(1, 0).max().item<double>(), -INFINITY) << "empty";
    EXPECT_EQ(got[0].select(0, 1).abs().max().item<double>(), 0.0) << "empty";
  }
}

// With one attended row, p is exactly 1 there and ds exactly 0 everywhere,
// also when the other pieces have no row to attend.
TEST(ScoreSoftmaxKernels, OneAttendedRowHasNoScoreGradient) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  torch::manual_seed(12);
  const auto products = torch::randn({2, 21, 5}, options) * 3;
  auto keep = torch::zeros({2, 21}, torch::kBool);
  keep[0][13] = true;
  keep[1][0] = true;
  const auto dp = torch::randn({2, 21, 5}, options);
  for (const int64_t pieces : {1, 4}) {
    const auto got = emulated_score_softmax<float>(products, {}, keep, 0.5, dp, pieces);
    EXPECT_EQ(got[2].select(1, 13)[0].min().item<double>(), 1.0) << pieces << " pieces";
    EXPECT_EQ(got[3].abs().max().item<double>(), 0.0) << pieces << " pieces";
  }
}

// [Note: u in shared memory]: the one-score forward gives the same bits with
// u in shared memory as with u in registers.
TEST(EmulatedOneScoreKernels, UInSharedMemoryGivesTheBitsOfUInRegisters) {
  for (Case c :
       {Case{2, 30, 768, 0, 1, true, torch::kBFloat16, 128, 8, 4, 3, true, 2},
        Case{2, 37, 96, 0, 1, true, torch::kFloat32, 128, 4, 1, 2, true, 4},
        Case{1, 13, 1000, 0, 1, false, torch::kFloat32, 64, 4, 8, 2, true, 1}}) {
    const auto in = make_inputs(c);
    const auto grad_out = random_grad_out(c, {c.batch, c.hidden});
    const auto in_registers = run_emulated(c, in, grad_out);
    c.u_shared = true;
    const auto in_shared = run_emulated(c, in, grad_out);
    EXPECT_TRUE(torch::equal(in_shared.out, in_registers.out)) << c.hidden;
    EXPECT_TRUE(torch::equal(in_shared.lse, in_registers.lse)) << c.hidden;
  }
}

// {B, L, H, Q, heads, masked, dtype, threads, vec, chunks, pieces[, one_score[, rows[, u_shared]]]}
// The tensor-core forward (ops/cuda/tensor_core_kernel.cuh), launched as
// benchmarks/tensor_core_kernels.cu launches it: u's fragments, a block per
// (sequence, piece, group of 8 nt queries), the merge of pieces (or a
// ragged batch's work items). Against the CPU forward in float64 on the same
// bfloat16 rows: the kernel keeps about 16 bits of u and of each weight and
// sums in float32, so it agrees to about 1e-5, where the bfloat16
// tolerance would hide a misplaced row or column.
struct MmaCase {
  int64_t batch, seq_len, hidden, num_queries, num_heads;
  bool full_width, masked;
  int64_t pieces;  // 0: a ragged batch
  int nt;
  torch::ScalarType dtype = torch::kBFloat16;  // of x: bfloat16, or float32 as tf32 terms
  int buffers = 2;                             // the forward's tiles of x
};

constexpr int64_t kMostShared = 227 * 1024;  // an H100's, per block

// Cuts p's rows as the case says (pieces == 0: a ragged batch in pieces of
// 40 rows, whose first_piece table `table` keeps); with `other`, a different
// cut (one piece more, or pieces of 72 rows), as the backward's launches may
// cut differently from each other and from the forward. Returns the blocks
// per group of queries.
int64_t cut_for_mma(
    attnpool::ForwardParams& p,
    int64_t pieces,
    const torch::Tensor& offsets,
    torch::Tensor& table,
    bool other = false) {
  if (offsets.defined()) {
    const int64_t kRowsPerPiece = other ? 72 : 40;
    table = attnpool::detail::ragged_first_piece(offsets, kRowsPerPiece);
    p.cut = {(p.seq_len + kRowsPerPiece - 1) / kRowsPerPiece + 1, kRowsPerPiece};
    p.first_piece = table.const_data_ptr<int64_t>();
    return p.cut.pieces + p.batch;  // the most work items the rows can make
  }
  p.cut = attnpool::PieceCut::into(p.seq_len, pieces + (other ? 1 : 0));
  return p.batch * p.cut.pieces;
}

// An operand laid out by mma_operand_kernel ([Note: tensor-core operands]).
std::vector<uint32_t> operand_words(const attnpool::cuda::MmaOperand& op) {
  namespace cuda = attnpool::cuda;
  std::vector<uint32_t> words(static_cast<size_t>(op.words()));
  launch(
      &cuda::mma_operand_kernel<cuda::MmaOperand>,
      cuda::mma_operand_blocks(op),
      cuda::kMmaOperandThreads,
      0,
      op,
      words.data());
  return words;
}

// The tensor-core forward on x's rows (bfloat16, or float32 as tf32 terms)
// with nt column tiles of queries and `buffers` tiles of x in shared memory.
std::tuple<torch::Tensor, torch::Tensor> run_mma_forward(
    attnpool::detail::PreparedForward& f,
    int nt,
    int64_t pieces,
    const torch::Tensor& offsets,
    int buffers = 2) {
  namespace cuda = attnpool::cuda;
  attnpool::ForwardParams& p = f.params;
  const int64_t B = p.batch, H = p.hidden, Q = p.num_queries, n = p.num_heads;
  const int mt = cuda::mma_score_tiles(Q, n, nt);
  const int64_t groups = cuda::mma_groups(Q, nt);
  torch::Tensor first_piece;
  const int64_t blocks = cut_for_mma(p, pieces, offsets, first_piece);
  const auto partials = torch::empty({blocks * Q, 1 + 2 * n + H}, f.out.options());
  p.partials = partials.mutable_data_ptr();
  const bool tf32 = f.pool.rows.scalar_type() == torch::kFloat32;
  const auto fragments = operand_words(
      cuda::mma_u_operand(static_cast<const float*>(p.u), Q, n, H, mt, nt, false, tf32));
  const auto run = [&](auto rows) {
    using scalar_t = decltype(rows);
    EXPECT_GE(cuda::mma_forward_buffers<scalar_t>(p, nt, kMostShared), buffers);
    cuda::with_mma_score_tiles(mt, [&](auto tiles) {
      constexpr int MT = decltype(tiles)::value;
      const auto launch_with = [&](auto kernel, int columns) {
        launch(
            kernel,
            blocks * groups,
            cuda::kMmaThreads,
            cuda::mma_shared_layout<scalar_t>(H, MT, columns, buffers).bytes,
            p,
            fragments.data(),
            buffers);
      };
      if (nt == 1) {
        launch_with(&cuda::mma_forward_kernel<scalar_t, MT, 1>, 1);
      } else {
        launch_with(&cuda::mma_forward_kernel<scalar_t, MT, 2>, 2);
      }
    });
    if (p.ragged() || p.cut.pieces > 1) {
      const int threads = cuda::merge_threads(p.cut.pieces);
      launch(
          &cuda::merge_pieces_kernel<scalar_t>,
          B * Q * cuda::merge_blocks_per_row(H, n),
          threads,
          cuda::merge_shared_bytes<float>(threads),
          p);
    }
  };
  if (tf32) {
    run(float{});
  } else {
    run(at::BFloat16{});
  }
  return {f.out, f.lse};
}

// The tensor-core backward after the tensor-core forward (its score blocks,
// from nt column tiles of queries), with `buffers` tiles of x in shared
// memory: one launch for one score block, else dx's and du's ([Note: the
// tensor-core backward]), du's cut apart from dx's; then the sum of du's
// partials. dx and the partials start as NaN: a row or partial the kernels
// leave unwritten shows. Returns (dx, du) shaped as the op's.
std::tuple<torch::Tensor, torch::Tensor> run_mma_backward(
    attnpool::detail::PreparedBackward& g,
    int nt,
    int64_t pieces,
    const torch::Tensor& offsets,
    int buffers,
    const torch::Tensor& u) {
  namespace cuda = attnpool::cuda;
  const attnpool::BackwardParams& call = g.params;
  const int64_t B = call.batch, H = call.hidden, Q = call.num_queries, n = call.num_heads;
  const int64_t num_scores = Q * n;
  const int mt = cuda::mma_score_tiles(Q, n, nt);
  const int64_t score_blocks = cuda::mma_groups(Q, nt) * mt;
  const bool tf32 = g.pool.rows.scalar_type() == torch::kFloat32;
  const auto* u_values = static_cast<const float*>(call.u);
  const auto* grad_values = static_cast<const float*>(call.grad_out);
  const auto u_fragments =
      operand_words(cuda::mma_u_operand(u_values, Q, n, H, mt, nt, false, tf32));
  const auto u_columns = operand_words(cuda::mma_u_operand(u_values, Q, n, H, mt, nt, true, tf32));
  const auto grad_fragments =
      operand_words(cuda::mma_grad_operand(grad_values, B, Q, n, H, mt, nt, false, tf32));
  const auto grad_columns =
      operand_words(cuda::mma_grad_operand(grad_values, B, Q, n, H, mt, nt, true, tf32));
  torch::Tensor du_partials;
  int64_t du_blocks = 0;
  g.dx.fill_(NAN);
  const auto run = [&](auto rows, auto chains) {
    using scalar_t = decltype(rows);
    const int64_t shared = cuda::mma_backward_shared_bytes<scalar_t>(H, buffers, score_blocks);
    EXPECT_LE(shared, kMostShared);
    const auto launch_part = [&](cuda::MmaBackwardPart part) {
      attnpool::BackwardParams a = call;
      const bool du_only = part == cuda::MmaBackwardPart::kDu;
      const int64_t groups = du_only ? score_blocks : 1;
      torch::Tensor first_piece;
      const int64_t blocks = cut_for_mma(a, pieces, offsets, first_piece, du_only);
      if (part != cuda::MmaBackwardPart::kDx) {
        du_blocks = blocks;
        du_partials = torch::full({blocks, num_scores, H}, NAN, g.du.options());
        a.du_partials = du_partials.mutable_data_ptr();
      }
      launch(
          &cuda::mma_backward_kernel<scalar_t, decltype(chains)::value>,
          blocks * groups,
          cuda::kMmaThreads,
          shared,
          a,
          u_fragments.data(),
          u_columns.data(),
          grad_fragments.data(),
          grad_columns.data(),
          cuda::MmaBackwardShape{mt, nt, buffers, part});
    };
    if (score_blocks == 1) {
      launch_part(cuda::MmaBackwardPart::kBoth);
    } else {
      launch_part(cuda::MmaBackwardPart::kDx);
      launch_part(cuda::MmaBackwardPart::kDu);
    }
  };
  cuda::with_mma_chains(mt, [&](auto chains) {
    if (tf32) {
      run(float{}, chains);
    } else {
      run(at::BFloat16{}, chains);
    }
  });
  launch(
      &cuda::reduce_partials_kernel<float>,
      (num_scores * H + cuda::kStripeColumns - 1) / cuda::kStripeColumns,
      64,
      cuda::reduce_shared_bytes<float>(64),
      du_partials.const_data_ptr<float>(),
      g.du.mutable_data_ptr<float>(),
      du_blocks,
      num_scores * H);
  return {g.dx, g.du.view(u.sizes())};
}

void check_mma_forward(const MmaCase& c) {
  const std::string what = "B" + std::to_string(c.batch) + " L" + std::to_string(c.seq_len) + " H" +
                           std::to_string(c.hidden) + " Q" + std::to_string(c.num_queries) + " n" +
                           std::to_string(c.num_heads) + (c.full_width ? " full width" : "") +
                           (c.masked ? " masked" : "") + " pieces " + std::to_string(c.pieces) +
                           " nt " + std::to_string(c.nt) + " " + c10::toString(c.dtype) +
                           " buffers " + std::to_string(c.buffers);
  SCOPED_TRACE(what);
  torch::manual_seed(c.seq_len * 5 + c.hidden + c.num_queries);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const double scale = 0.4;
  const auto u =
      (torch::randn({c.num_queries, c.num_heads, c.hidden}, f64) / 4).to(torch::kFloat32);
  // bfloat16 rows: u as two bfloat16 terms (about 16 bits); float32 rows:
  // every product as three of tf32 terms (about 21 bits).
  const bool tf32 = c.dtype == torch::kFloat32;
  const double forward_tolerance = tf32 ? 2e-6 : 1e-4;
  // dx in x's dtype (bfloat16's precision; the lo . hi term of its products
  // is below what a bfloat16 dx shows); du in float32.
  const double dx_tolerance = tf32 ? 1e-5 : 4e-3;
  const double du_tolerance = tf32 ? 1e-5 : 1e-3;
  if (c.pieces == 0) {
    // Empty sequences first, in the middle and last; one long one.
    const auto offsets = torch::tensor({0, 0, 3, 3, 95, 96, 108, 108}, torch::kInt64);
    const auto x = torch::randn({108, c.hidden}, f64).to(c.dtype);
    const auto [want_out, want_lse] =
        cpu_op<VarlenForwardOp>("attnpool::_folded_attention_pool_varlen_forward")
            .call(x.to(torch::kFloat64), offsets, u.to(torch::kFloat64), scale, c.full_width);
    auto f = attnpool::detail::prepare_varlen_forward(x, offsets, u, scale, c.full_width);
    const auto [out, lse] = run_mma_forward(f, c.nt, 0, f.pool.offsets, c.buffers);
    expect_close(out, want_out, forward_tolerance, "out");
    expect_close(lse, want_lse, forward_tolerance, "lse");
    {
      const auto grad_out = torch::randn(want_out.sizes(), f64);
      const auto [want_dx, want_du] =
          cpu_op<VarlenBackwardOp>("attnpool::_folded_attention_pool_varlen_backward")
              .call(
                  grad_out,
                  x.to(torch::kFloat64),
                  offsets,
                  u.to(torch::kFloat64),
                  want_out,
                  want_lse,
                  scale,
                  c.full_width);
      auto g = attnpool::detail::prepare_varlen_backward(
          grad_out.to(torch::kFloat32), x, offsets, u, out, lse, scale, c.full_width);
      const auto [dx, du] = run_mma_backward(g, c.nt, 0, g.pool.offsets, 2, u);
      expect_close(dx, want_dx, dx_tolerance, "dx");
      expect_close(du, want_du, du_tolerance, "du");
    }
    return;
  }
  auto x = torch::randn({c.batch, c.seq_len, c.hidden}, f64).to(c.dtype);
  std::optional<torch::Tensor> mask, bias;
  if (c.masked) {
    mask = torch::rand({c.batch, c.seq_len}) > 0.3;
    (*mask)[0] = false;  // an empty sequence
    // Rows that are not attended are never read (SPEC.md): NaN there must not
    // reach any result, even through a product with a zero weight.
    x = x.masked_fill(mask->logical_not().unsqueeze(-1), NAN);
    bias = torch::randn({c.batch, c.seq_len});
  }
  const auto to_f64 = [](const std::optional<torch::Tensor>& t) {
    return t.has_value() && t->is_floating_point()
               ? std::optional<torch::Tensor>(t->to(torch::kFloat64))
               : t;
  };
  const auto [want_out, want_lse] = cpu_op<ForwardOp>("attnpool::_folded_attention_pool_forward")
                                        .call(
                                            x.to(torch::kFloat64),
                                            u.to(torch::kFloat64),
                                            mask,
                                            scale,
                                            c.full_width,
                                            to_f64(bias),
                                            std::nullopt);
  auto f = attnpool::detail::prepare_forward(x, u, mask, scale, c.full_width, bias, std::nullopt);
  const auto [out, lse] = run_mma_forward(f, c.nt, c.pieces, torch::Tensor(), c.buffers);
  expect_close(out, want_out, forward_tolerance, "out");
  expect_close(lse, want_lse, forward_tolerance, "lse");
  const auto grad_out = torch::randn(want_out.sizes(), f64);
  const auto [want_dx, want_du] = cpu_op<BackwardOp>("attnpool::_folded_attention_pool_backward")
                                      .call(
                                          grad_out,
                                          x.to(torch::kFloat64),
                                          u.to(torch::kFloat64),
                                          mask,
                                          want_out,
                                          want_lse,
                                          scale,
                                          c.full_width,
                                          to_f64(bias),
                                          std::nullopt);
  const auto backward_inputs = [&] {
    return attnpool::detail::prepare_backward(
        grad_out.to(torch::kFloat32),
        x,
        u,
        mask,
        out,
        lse,
        scale,
        c.full_width,
        bias,
        std::nullopt);
  };
  for (const int buffers : {2, 1}) {
    SCOPED_TRACE("buffers " + std::to_string(buffers));
    auto g = backward_inputs();
    const auto [dx, du] = run_mma_backward(g, c.nt, c.pieces, torch::Tensor(), buffers, u);
    expect_close(dx, want_dx, dx_tolerance, "dx");
    expect_close(du, want_du, du_tolerance, "du");
  }
}

TEST(EmulatedTensorCoreKernels, MatchTheCpuOperatorsInFloat64) {
  // Each covers: tiles of 32 rows with a partial last one; heads of 16 and 64
  // columns; masks with an empty sequence, NaN in rows not attended, and a
  // bias; pieces merged; full width; groups of 8 and 16 queries, the last one
  // partial; 1, 2, 8, 12 and 16 tiles of 16 scores (two chains of sums,
  // then one); a ragged batch with empty sequences. Then the backward (dx to
  // bfloat16's precision, du to 1e-3; the lo . hi term of dx's products is
  // below what a bfloat16 dx shows): one launch for one score block, dx's
  // and du's past that.
  check_mma_forward({2, 70, 64, 1, 4, false, false, 1, 1});
  check_mma_forward({2, 50, 128, 3, 2, false, true, 1, 1});
  check_mma_forward({2, 100, 64, 2, 2, false, true, 3, 1});
  check_mma_forward({1, 40, 96, 2, 3, true, false, 1, 2});
  check_mma_forward({1, 33, 64, 10, 2, false, false, 2, 1});
  check_mma_forward({1, 40, 128, 16, 8, false, false, 1, 2});
  check_mma_forward({1, 40, 192, 16, 12, false, true, 2, 2});
  check_mma_forward({1, 33, 256, 16, 16, false, false, 1, 2});
  check_mma_forward({0, 0, 64, 2, 2, true, false, 0, 1});
  // Two score blocks in a ragged batch; a score block of padding only (40
  // scores in 4 tiles); one tile of x in shared memory.
  check_mma_forward({0, 0, 128, 3, 8, false, false, 0, 1});
  check_mma_forward({1, 45, 128, 5, 8, false, true, 2, 1});
  check_mma_forward({2, 70, 64, 2, 4, false, true, 2, 1, torch::kBFloat16, 1});
}

// float32 rows as tf32 terms, three products each ([Note: the tensor-core
// forward]): out and lse within 2e-6 of the float64 operators on the same
// rows (one tf32 term of x instead of two: 1e-4 and more).
TEST(EmulatedTensorCoreKernels, Float32RowsMatchTheCpuOperators) {
  check_mma_forward({2, 70, 64, 1, 4, false, false, 1, 1, torch::kFloat32});
  check_mma_forward({2, 100, 64, 2, 2, false, true, 3, 1, torch::kFloat32});
  check_mma_forward({1, 40, 96, 2, 3, true, false, 1, 2, torch::kFloat32});
  check_mma_forward({1, 40, 192, 16, 12, false, true, 2, 2, torch::kFloat32});
  check_mma_forward({0, 0, 64, 2, 2, true, false, 0, 1, torch::kFloat32});
  check_mma_forward({2, 70, 128, 2, 4, false, true, 2, 1, torch::kFloat32, 1});
}

// One attended row per sequence through the tensor-core forward and
// backward: delta comes from the products dp takes, with out (that row) in
// place of x, so the scores' gradient cancels exactly, as in the reference.
// float32 rows: out is the row's two tf32 terms summed (about 22 of its 24
// bits), whose own terms are the row's, so delta still equals dp.
void expect_one_row_no_score_gradient(
    torch::ScalarType dtype, bool full_width, int64_t num_queries, int64_t num_heads, int64_t H) {
  SCOPED_TRACE(
      std::string(c10::toString(dtype)) + (full_width ? " full width" : " head slices") + " Q" +
      std::to_string(num_queries) + " n" + std::to_string(num_heads));
  torch::manual_seed(11 + H);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto u = (torch::randn({num_queries, num_heads, H}, f64) / 2).to(torch::kFloat32);
  const auto mask = torch::zeros({2, 45}, torch::kBool);
  mask.select(1, 30).fill_(true);
  auto x = (torch::randn({2, 45, H}, f64) * 3).to(dtype);
  if (dtype == torch::kFloat32) {
    // Values whose tf32 remainder rounds to a tie (Float32TermsSplitTheirSumAgain).
    x.select(1, 30).narrow(-1, 0, 4).fill_(attnpool::cuda::float_of_bits(0x3F800FFFu));
  }
  x = x.masked_fill(mask.logical_not().unsqueeze(-1), NAN);
  auto f = attnpool::detail::prepare_forward(x, u, mask, 0.4, full_width, {}, std::nullopt);
  const auto [out, lse] = run_mma_forward(f, 1, 2, torch::Tensor());
  const auto grad_out = torch::randn(out.sizes());
  auto g = attnpool::detail::prepare_backward(
      grad_out, x, u, mask, out, lse, 0.4, full_width, {}, std::nullopt);
  const auto [dx, du] = run_mma_backward(g, 1, 2, torch::Tensor(), 2, u);
  EXPECT_EQ(du.abs().max().item<double>(), 0.0);
  // dx of that row: the output's gradient summed over the scores.
  const auto summed = full_width ? grad_out.sum({1, 2}) : grad_out.sum(1);
  const double tolerance = dtype == torch::kFloat32 ? 1e-5 : 4e-3;
  expect_close(dx.select(1, 30), summed, tolerance, "dx of the attended row");
  EXPECT_EQ(dx.select(1, 29).abs().max().item<double>(), 0.0);
}

// The backward's exact zero above needs the float32 terms of hi + lo to be
// hi and lo again (tf32_lo cuts instead of rounding; rounded, 1 value in
// 8192 of [1, 2) fails, e.g. 1 + 4095 2^-23). Every float32 of [1, 2), of
// (-2, -1], of [2^-100, 2^-99) and of [2^126, 2^127). (Below about 2^-115
// lo is subnormal, its low 13 bits no longer the last of its significand,
// and the split does not hold: rows that small may leave du a rounding away
// from 0 with one attended row.)
TEST(EmulatedTensorCoreKernels, Float32TermsSplitTheirSumAgain) {
  namespace cuda = attnpool::cuda;
  int64_t failures = 0;
  for (const uint32_t exponent : {0x3F800000u, 0xBF800000u, 0x0D800000u, 0x7E800000u}) {
    for (uint32_t mantissa = 0; mantissa < (1u << 23); ++mantissa) {
      const float value = cuda::float_of_bits(exponent | mantissa);
      const uint32_t hi = cuda::tf32_hi(value);
      const uint32_t lo = cuda::tf32_lo(value, hi);
      const float sum = cuda::float_of_bits(hi) + cuda::float_of_bits(lo);
      failures += cuda::tf32_hi(sum) != hi || cuda::tf32_lo(sum, hi) != lo;
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST(EmulatedTensorCoreKernels, OneAttendedRowHasNoScoreGradient) {
  for (const auto dtype : {torch::kBFloat16, torch::kFloat32}) {
    for (const bool full_width : {false, true}) {
      expect_one_row_no_score_gradient(dtype, full_width, 2, 2, 64);
    }
    // Two score blocks (18 scores): dx and du take a launch each.
    expect_one_row_no_score_gradient(dtype, false, 3, 6, 96);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts,
    EmulatedCudaKernels,
    ::testing::Values(
        Case{2, 9, 40, 0, 1, false, torch::kFloat64, 128, 1, 1, 1},
        Case{3, 13, 48, 2, 4, true, torch::kFloat64, 128, 2, 1, 1},
        Case{3, 30, 64, 3, 2, true, torch::kFloat64, 128, 2, 1, 3},
        Case{2, 21, 96, 0, 3, true, torch::kFloat32, 128, 4, 1, 4},
        Case{2, 11, 384, 2, 2, false, torch::kFloat32, 64, 4, 2, 2},
        Case{1, 10, 256, 0, 1, false, torch::kFloat32, 64, 1, 4, 1},
        Case{2, 17, 128, 1, 4, true, torch::kBFloat16, 128, 8, 1, 2},
        Case{2, 9, 64, 0, 2, false, torch::kHalf, 128, 8, 1, 1},
        Case{2, 0, 32, 2, 1, false, torch::kFloat32, 128, 4, 1, 1},
        Case{2, 40, 48, 0, 2, true, torch::kFloat32, 64, 1, 1, 40},
        // The one-score kernels: 4 or 2 warps, 1 to 8 chunks of 16 bytes per lane.
        Case{2, 21, 96, 0, 1, true, torch::kFloat32, 128, 4, 1, 1, true},
        Case{1, 13, 1024, 1, 1, false, torch::kFloat32, 64, 4, 8, 2, true},
        Case{2, 30, 768, 0, 1, true, torch::kBFloat16, 128, 8, 4, 3, true},
        Case{2, 9, 64, 0, 1, false, torch::kFloat64, 128, 2, 1, 1, true},
        Case{2, 11, 504, 0, 1, true, torch::kHalf, 64, 8, 2, 1, true},
        Case{2, 0, 32, 0, 1, false, torch::kFloat32, 128, 4, 1, 1, true},
        Case{2, 40, 48, 0, 1, true, torch::kFloat32, 128, 4, 1, 40, true},
        // and their other rows per warp tile,
        Case{2, 30, 768, 0, 1, true, torch::kBFloat16, 128, 8, 4, 3, true, 1},
        Case{2, 37, 96, 0, 1, true, torch::kFloat32, 128, 4, 1, 2, true, 4},
        // and the forward with u in shared memory.
        Case{2, 30, 768, 0, 1, true, torch::kBFloat16, 128, 8, 4, 3, true, 2, true},
        Case{2, 37, 96, 0, 1, true, torch::kFloat32, 128, 4, 1, 2, true, 4, true},
        Case{2, 11, 504, 0, 1, true, torch::kHalf, 64, 8, 2, 1, true, 1, true}),
    case_name);

}  // namespace
