// Uses attnpool::MultiheadAttentionPooling of the installed package on a head
// saved in Python, for tests/test_cpp_package.py to compare with Python:
//
//   map_head_consumer HEAD.pt INPUTS.pt EMBED_DIM NUM_HEADS NUM_QUERIES OUT.pt
//
// Loads HEAD.pt (torch.save(dict(head.state_dict()), path)) into the module,
// pools INPUTS.pt's "features" under its "mask", and writes to OUT.pt the tuple
//   (output, then a new module's parameters after torch::manual_seed(0))
// with the parameters in registration order, whose names it prints.

#include <attnpool/attnpool.h>

#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: " << argv[0]
              << " HEAD.pt INPUTS.pt EMBED_DIM NUM_HEADS NUM_QUERIES OUT.pt\n";
    return 2;
  }
  try {
    std::ifstream file(argv[2], std::ios::binary);
    const std::vector<char> bytes{std::istreambuf_iterator<char>(file), {}};
    const auto inputs = torch::pickle_load(bytes).toGenericDict();
    const auto features = inputs.at("features").toTensor();
    const auto mask = inputs.at("mask").toTensor();
    const auto options =
        attnpool::MultiheadAttentionPoolingOptions(std::stoll(argv[3]), std::stoll(argv[4]))
            .num_queries(std::stoll(argv[5]))
            .kdim(features.size(2));

    attnpool::MultiheadAttentionPooling head(options);
    attnpool::load_state_dict(*head, argv[1]);
    torch::NoGradGuard no_grad;
    std::vector<c10::IValue> out{head(features, mask)};

    torch::manual_seed(0);
    attnpool::MultiheadAttentionPooling fresh(options);
    for (const auto& param : fresh->named_parameters()) {
      std::cout << "parameter " << param.key() << " " << param.value().sizes() << "\n";
      out.push_back(param.value());
    }
    const auto saved = torch::pickle_save(c10::ivalue::Tuple::create(std::move(out)));
    std::ofstream(argv[6], std::ios::binary).write(saved.data(), saved.size());
  } catch (const c10::Error& error) {
    std::cerr << "map_head_consumer: " << error.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
