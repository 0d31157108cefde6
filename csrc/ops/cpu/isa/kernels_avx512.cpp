// The CPU kernels built for the AVX512 instruction set. setup.py and
// CMakeLists.txt add the compiler flags for it from this file's name suffix.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "ops/cpu/isa/kernels.h"
