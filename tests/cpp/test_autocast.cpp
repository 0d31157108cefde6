// attention_pool inside a CPU autocast region (what torch.autocast("cpu")
// turns on): the op must compute exactly what it computes outside one. Also
// run under ASan by scripts/sanitize.sh, where a kernel that reads a
// lower-precision buffer as float32 shows up as a heap-buffer-overflow.

#include <attnpool/attnpool.h>

#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>
#include <vector>

namespace {

// Turns CPU autocast on with `dtype` for its lifetime, like torch.autocast("cpu").
class CpuAutocast {
 public:
  explicit CpuAutocast(at::ScalarType dtype)
      : enabled_(at::autocast::is_autocast_enabled(at::kCPU)),
        dtype_(at::autocast::get_autocast_dtype(at::kCPU)) {
    at::autocast::set_autocast_dtype(at::kCPU, dtype);
    at::autocast::set_autocast_enabled(at::kCPU, true);
  }
  ~CpuAutocast() {
    at::autocast::set_autocast_enabled(at::kCPU, enabled_);
    at::autocast::set_autocast_dtype(at::kCPU, dtype_);
    at::autocast::clear_cache();
  }
  CpuAutocast(const CpuAutocast&) = delete;
  CpuAutocast& operator=(const CpuAutocast&) = delete;

 private:
  bool enabled_;
  at::ScalarType dtype_;
};

struct Result {
  torch::Tensor out;
  std::vector<torch::Tensor> grads;  // x, query, w_q, w_k
};

Result forward_backward(
    const torch::Tensor& x_value, at::ScalarType autocast_dtype, bool autocast) {
  torch::manual_seed(0);
  auto x = x_value.detach().clone().requires_grad_(true);
  auto query = torch::randn({2, 32}).requires_grad_(true);
  auto w_q = (torch::randn({32, 32}) / 6.0).requires_grad_(true);
  auto w_k = (torch::randn({32, 32}) / 6.0).requires_grad_(true);
  const auto mask = torch::rand({3, 21}) > 0.3;
  std::optional<CpuAutocast> region;
  if (autocast) {
    region.emplace(autocast_dtype);
  }
  const auto out = attnpool::attention_pool(x, query, w_q, w_k, mask, 4);
  const auto weights = torch::linspace(-1.0, 1.0, out.numel()).view(out.sizes());
  (out.to(torch::kFloat) * weights).sum().backward();
  return {out.detach(), {x.grad(), query.grad(), w_q.grad(), w_k.grad()}};
}

void expect_same_inside_and_outside(const torch::Tensor& x, at::ScalarType autocast_dtype) {
  const auto outside = forward_backward(x, autocast_dtype, false);
  const auto inside = forward_backward(x, autocast_dtype, true);
  ASSERT_EQ(inside.out.scalar_type(), x.scalar_type());
  EXPECT_TRUE(
      torch::allclose(inside.out.to(torch::kFloat), outside.out.to(torch::kFloat), 1e-2, 1e-2))
      << "output differs inside autocast";
  const char* names[] = {"x", "query", "w_q", "w_k"};
  for (size_t i = 0; i < inside.grads.size(); ++i) {
    EXPECT_EQ(inside.grads[i].scalar_type(), outside.grads[i].scalar_type()) << names[i];
    EXPECT_TRUE(
        torch::allclose(
            inside.grads[i].to(torch::kFloat), outside.grads[i].to(torch::kFloat), 1e-2, 1e-2))
        << "gradient of " << names[i] << " differs inside autocast";
  }
}

TEST(AttentionPoolAutocast, BFloat16InputComputesTheSameAsOutside) {
  expect_same_inside_and_outside(torch::randn({3, 21, 32}).to(torch::kBFloat16), at::kBFloat16);
}

TEST(AttentionPoolAutocast, Float32InputComputesTheSameAsOutside) {
  expect_same_inside_and_outside(torch::randn({3, 21, 32}), at::kBFloat16);
}

}  // namespace
