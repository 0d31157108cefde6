// attnpool._C: importing it loads the operators (registered by static
// initializers in this library) and exposes facts about the build. The
// operators themselves are reached through torch.ops.attnpool.

#include <attnpool/attnpool.h>

#include "ops/attention_pool.h"
#include "ops/checks.h"

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnpool native library: operators are in torch.ops.attnpool";
  m.attr("__version__") = ATTNPOOL_VERSION;
  m.def(
      "cpu_kernel_isa",
      &attnpool::cpu_kernel_isa,
      "Instruction set the CPU kernels run with: AVX512, AVX2 or DEFAULT.");
  m.def(
      "_checked_attention_pool_scale",
      &attnpool::detail::checked_attention_pool_scale,
      "attention_pool's argument checks, then its scale (given, or 1/sqrt(H / num_heads)).");
  m.def(
      "_checked_attention_pool_varlen_scale",
      &attnpool::detail::checked_attention_pool_varlen_scale,
      "attention_pool_varlen's argument checks, then its scale.");
#ifdef ATTNPOOL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
