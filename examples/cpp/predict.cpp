// Runs the demo's classifier, exported from Python by `python -m attnpool.export`
// as an AOTInductor package, on the sequences of an inputs file and prints its
// predictions. No Python at run time.
//
//   attnpool_predict MODEL.pt2 INPUTS.pt [LOGITS.pt]
//
// INPUTS.pt: torch.save of a dict with "tokens" [N, L] (integer) and "mask"
// [N, L] (nonzero = a real token), and optionally "labels" [N].
// LOGITS.pt, if given, receives the logits [N, C] (torch.load reads them).
//
// This program calls no attnpool function: the package calls the
// attnpool::attention_pool operator through the dispatcher. Linking
// attnpool::attnpool is what loads the library that registers it.

#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>

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
  const c10::IValue value = torch::pickle_load(bytes);
  TORCH_CHECK_VALUE(
      value.isGenericDict(), path, " must hold a dict of name -> tensor, got ", value.tagKind());
  return value.toGenericDict();
}

at::Tensor tensor_entry(
    const c10::Dict<c10::IValue, c10::IValue>& dict,
    const std::string& name,
    const std::string& path) {
  TORCH_CHECK_VALUE(dict.contains(name), path, " has no entry \"", name, "\"");
  return dict.at(name).toTensor();
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream file(path, std::ios::binary);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  TORCH_CHECK(file.good(), "cannot write ", path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 INPUTS.pt [LOGITS.pt]\n";
    return 2;
  }
  try {
    c10::InferenceMode inference;
    const auto inputs = read_dict(argv[2]);
    // The compiled model assumes the dtypes and the contiguous layout it was
    // exported with, and does not check them.
    const auto tokens = tensor_entry(inputs, "tokens", argv[2]).to(at::kLong).contiguous();
    const auto mask = tensor_entry(inputs, "mask", argv[2]).ne(0).contiguous();
    TORCH_CHECK_VALUE(
        tokens.dim() == 2 && mask.sizes() == tokens.sizes(),
        "tokens and mask must both have shape [N, L], got ",
        tokens.sizes(),
        " and ",
        mask.sizes());

    torch::inductor::AOTIModelPackageLoader model(argv[1]);
    const auto logits = model.run({tokens, mask}).at(0);
    const auto predictions = logits.argmax(-1);

    const bool labelled = inputs.contains("labels");
    const auto labels = labelled ? inputs.at("labels").toTensor() : at::Tensor();
    for (int64_t i = 0; i < predictions.size(0); ++i) {
      std::cout << "sequence " << i << ": class " << predictions[i].item<int64_t>();
      if (labelled) {
        std::cout << " (label " << labels[i].item<int64_t>() << ")";
      }
      std::cout << "\n";
    }
    if (labelled) {
      const double accuracy = predictions.eq(labels).to(at::kDouble).mean().item<double>();
      std::cout << "accuracy " << 100.0 * accuracy << "% on " << predictions.size(0)
                << " sequences\n";
    }

    if (argc == 4) {
      write_file(argv[3], torch::pickle_save(logits));
    }
  } catch (const c10::Error& error) {
    std::cerr << "attnpool_predict: " << error.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
