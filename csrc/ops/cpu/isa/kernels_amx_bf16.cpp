// The CPU kernels built for AVX-512 with AVX512-BF16 and AMX-BF16: the
// AVX512_BF16 kernels, whose scores of bfloat16 rows against several
// vectors come from AMX tile products ([Note: scores on AMX tiles] in
// isa/amx_scores.h). setup.py and CMakeLists.txt add the compiler flags for
// it from this file's name suffix.
#define CPU_CAPABILITY AMX_BF16
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY_AVX512_BF16
#define CPU_CAPABILITY_AMX_BF16
#include "ops/cpu/isa/kernels.h"
