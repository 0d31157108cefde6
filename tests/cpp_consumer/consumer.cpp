// Uses the C++ API of the installed attnpool package on weights and inputs
// exported from Python (python -m attnpool.export), for tests/test_cpp_package.py
// to compare with Python:
//
//   attnpool_consumer POOLING.pt INPUTS.pt NUM_HEADS OUT.pt
//
// Loads POOLING.pt into attnpool::AttentionPooling, pools INPUTS.pt's
// "features" under its "mask" with the module and with attnpool::attention_pool,
// and writes to OUT.pt the tuple
//   (module output, operator output, query, q_proj.weight, k_proj.weight)
// where the last three are a new module's parameters after torch::manual_seed(0).
// (A tuple, because Python's torch.load reads C++-pickled dicts only with
// weights_only=False.) Prints the parameter names and shapes.

#include <attnpool/attnpool.h>

#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

c10::Dict<c10::IValue, c10::IValue> read_dict(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK_VALUE(file.good(), "cannot open ", path);
  const std::vector<char> bytes{std::istreambuf_iterator<char>(file), {}};
  return torch::pickle_load(bytes).toGenericDict();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " POOLING.pt INPUTS.pt NUM_HEADS OUT.pt\n";
    return 2;
  }
  try {
    const auto inputs = read_dict(argv[2]);
    const auto features = inputs.at("features").toTensor();
    const auto mask = inputs.at("mask").toTensor();
    const auto options =
        attnpool::AttentionPoolingOptions(features.size(2)).num_heads(std::stoll(argv[3]));

    attnpool::AttentionPooling pool(options);
    attnpool::load_state_dict(*pool, argv[1]);
    for (const auto& param : pool->named_parameters()) {
      std::cout << "parameter " << param.key() << " " << param.value().sizes() << "\n";
    }
    torch::NoGradGuard no_grad;
    const auto pooled = pool(features, mask);
    const auto functional = attnpool::attention_pool(
        features,
        pool->query[0],
        pool->q_proj->weight,
        pool->k_proj->weight,
        mask,
        options.num_heads());

    torch::manual_seed(0);
    attnpool::AttentionPooling fresh(options);

    const auto out = c10::ivalue::Tuple::create(
        {pooled, functional, fresh->query, fresh->q_proj->weight, fresh->k_proj->weight});
    const auto bytes = torch::pickle_save(out);
    std::ofstream(argv[4], std::ios::binary).write(bytes.data(), bytes.size());
  } catch (const c10::Error& error) {
    std::cerr << "attnpool_consumer: " << error.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
