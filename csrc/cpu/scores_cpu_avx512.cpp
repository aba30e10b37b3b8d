// AVX-512 (F/BW/VL/DQ) build of the CPU kernel (see scores_cpu.cpp).
#include "scores_cpu.cpp"
