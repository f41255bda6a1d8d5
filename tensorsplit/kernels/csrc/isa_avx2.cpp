// The kernels for CPUs with AVX2, FMA and F16C (Haswell / Zen 1 and later). See isa_avx512.cpp.
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#include "simd_avx2.h"
#include "kernel_body.h"
TS_KERNEL_TABLE(kernels_avx2, "avx2", Avx2)
#else
#include "kernels.h"
namespace ts { const KernelTable* kernels_avx2() { return nullptr; } }
#endif
