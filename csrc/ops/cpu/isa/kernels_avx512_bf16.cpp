// The CPU kernels built for AVX-512 with AVX512-BF16: the AVX512 kernels,
// whose scores of bfloat16 rows come from bfloat16 products
// ([Note: bfloat16 products] in isa/vec_helpers.h). setup.py and
// CMakeLists.txt add the compiler flags for it from this file's name suffix.
#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY_AVX512_BF16
#include "ops/cpu/isa/kernels.h"
