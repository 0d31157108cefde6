// attnpool::AttentionPooling (C++ nn::Module) and load_state_dict.

#include <attnpool/attention_pool.h>
#include <attnpool/attention_pooling.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/init.h>
#include <torch/serialize.h>
#include <torch/utils.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <vector>

namespace attnpool {

AttentionPoolingImpl::AttentionPoolingImpl(const AttentionPoolingOptions& options_)
    : options(options_) {
  // The checks and messages of the Python module, so both fail alike.
  const int64_t embed_dim = options.embed_dim();
  TORCH_CHECK_VALUE(embed_dim >= 1, "AttentionPooling: embed_dim must be >= 1, got ", embed_dim);
  TORCH_CHECK_VALUE(
      options.num_heads() >= 1 && embed_dim % options.num_heads() == 0,
      "AttentionPooling: num_heads must be >= 1 and divide embed_dim = ",
      embed_dim,
      ", got num_heads = ",
      options.num_heads());
  TORCH_CHECK_VALUE(
      options.num_queries() >= 1,
      "AttentionPooling: num_queries must be >= 1, got ",
      options.num_queries());
  const auto scale = options.scale();
  TORCH_CHECK_VALUE(
      !scale.has_value() || (std::isfinite(*scale) && *scale > 0.0),
      "AttentionPooling: scale must be a finite positive number, got ",
      scale.value_or(0.0));
  reset();
}

void AttentionPoolingImpl::reset() {
  const int64_t embed_dim = options.embed_dim();
  // Same order of random draws as the Python constructor (each Linear draws
  // once when built, then reset_parameters draws all three again), so that
  // torch::manual_seed(s) here gives exactly Python's torch.manual_seed(s) init.
  query = register_parameter("query", torch::empty({options.num_queries(), embed_dim}));
  const auto linear = torch::nn::LinearOptions(embed_dim, embed_dim).bias(false);
  q_proj = register_module("q_proj", torch::nn::Linear(linear));
  k_proj = register_module("k_proj", torch::nn::Linear(linear));
  reset_parameters();
}

void AttentionPoolingImpl::reset_parameters() {
  // N(0, 1/embed_dim) gives each query about unit norm, so the initial scores
  // are small and an untrained module pools close to the mean.
  torch::nn::init::normal_(query, 0.0, 1.0 / std::sqrt(static_cast<double>(options.embed_dim())));
  q_proj->reset_parameters();
  k_proj->reset_parameters();
}

void AttentionPoolingImpl::pretty_print(std::ostream& stream) const {
  stream << "attnpool::AttentionPooling(embed_dim=" << options.embed_dim()
         << ", num_heads=" << options.num_heads() << ", num_queries=" << options.num_queries();
  if (options.scale().has_value()) {
    stream << ", scale=" << *options.scale();
  }
  stream << ")";
}

at::Tensor AttentionPoolingImpl::forward(
    const at::Tensor& x, const at::Tensor& mask, const at::Tensor& lengths) {
  TORCH_CHECK_VALUE(
      x.dim() == 3 && x.size(2) == options.embed_dim(),
      "AttentionPooling: x must have shape [B, L, embed_dim = ",
      options.embed_dim(),
      "], got ",
      x.sizes());
  // A 1-D query makes the operator return [B, H] rather than [B, 1, H].
  const at::Tensor q = options.num_queries() == 1 ? query.select(0, 0) : query;
  return attention_pool(
      x,
      q,
      q_proj->weight,
      k_proj->weight,
      mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt,
      options.num_heads(),
      options.scale(),
      /*attn_bias=*/std::nullopt,
      lengths.defined() ? std::optional<at::Tensor>(lengths) : std::nullopt);
}

namespace {

std::string join(const std::vector<std::string>& names) {
  std::ostringstream text;
  for (size_t i = 0; i < names.size(); ++i) {
    text << (i ? ", " : "") << '"' << names[i] << '"';
  }
  return text.str();
}

// How to write a file this reads, for the error messages.
constexpr const char* kHowToSave = "torch.save(dict(module.state_dict()), path)";

// The file as name -> tensor. torch::pickle_load reads torch.save's zip
// format without Python or TorchScript, but fails on collections.OrderedDict,
// which is what state_dict() returns: hence dict(...) in kHowToSave.
std::map<std::string, at::Tensor> read_tensor_dict(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK_VALUE(file.good(), "load_state_dict: cannot open path = \"", path, "\"");
  const std::vector<char> bytes{std::istreambuf_iterator<char>(file), {}};
  c10::IValue loaded;
  try {
    loaded = torch::pickle_load(bytes);
  } catch (const c10::Error& error) {
    TORCH_CHECK_VALUE(
        false,
        "load_state_dict: cannot read ",
        path,
        " (",
        error.what_without_backtrace(),
        "); it must be written by ",
        kHowToSave);
  }
  TORCH_CHECK_VALUE(
      loaded.isGenericDict(),
      "load_state_dict: ",
      path,
      " must hold a dict of name -> tensor, written by ",
      kHowToSave,
      "; got ",
      loaded.tagKind());
  std::map<std::string, at::Tensor> tensors;
  for (const auto& entry : loaded.toGenericDict()) {
    TORCH_CHECK_VALUE(
        entry.key().isString() && entry.value().isTensor(),
        "load_state_dict: ",
        path,
        " must map names (str) to tensors, got an entry ",
        entry.key().tagKind(),
        " -> ",
        entry.value().tagKind());
    tensors.emplace(entry.key().toStringRef(), entry.value().toTensor());
  }
  return tensors;
}

}  // namespace

void load_state_dict(torch::nn::Module& module, const std::string& path) {
  auto tensors = read_tensor_dict(path);
  std::map<std::string, at::Tensor> targets;
  for (const auto& item : module.named_parameters()) {
    targets.emplace(item.key(), item.value());
  }
  for (const auto& item : module.named_buffers()) {
    targets.emplace(item.key(), item.value());
  }
  std::vector<std::string> missing, unexpected, mismatched;
  for (const auto& [name, target] : targets) {
    const auto it = tensors.find(name);
    if (it == tensors.end()) {
      missing.push_back(name);
    } else if (it->second.sizes() != target.sizes()) {
      std::ostringstream text;
      text << name << ": file " << it->second.sizes() << " vs module " << target.sizes();
      mismatched.push_back(text.str());
    }
  }
  for (const auto& [name, tensor] : tensors) {
    if (targets.count(name) == 0) {
      unexpected.push_back(name);
    }
  }
  // All checks before the first copy: a failed load leaves the module as it was.
  TORCH_CHECK_VALUE(
      missing.empty() && unexpected.empty() && mismatched.empty(),
      "load_state_dict: ",
      path,
      " does not match the module: missing names [",
      join(missing),
      "], unexpected names [",
      join(unexpected),
      "], shape mismatches [",
      join(mismatched),
      "]");
  torch::NoGradGuard no_grad;
  for (auto& [name, target] : targets) {
    target.copy_(tensors.at(name));
  }
}

}  // namespace attnpool
