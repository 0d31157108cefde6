// The CPU kernels built for the AVX2 instruction set. setup.py and
// CMakeLists.txt add the compiler flags for it from this file's name suffix.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "ops/cpu/isa/kernels.h"
