// The CPU kernels built for the DEFAULT instruction set. setup.py and
// CMakeLists.txt add the compiler flags for it from this file's name suffix.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "ops/cpu/isa/kernels.h"
