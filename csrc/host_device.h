// FB_HD: marks inline functions that run on the host and, under nvcc, on the device too (the math
// headers shared by the CPU kernels, the CUDA kernels and their host emulator).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FB_HD __host__ __device__ __forceinline__
#else
#define FB_HD inline
#endif
