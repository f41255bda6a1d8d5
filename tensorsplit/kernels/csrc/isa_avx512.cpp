// The kernels for CPUs with AVX-512 F/BW/VL/VNNI (Ice Lake and later Xeons, Zen 4 and later EPYCs).
// Only this file is compiled for those instructions (the pragma below); ops.cpp calls into it after
// checking the CPU. Nothing here includes torch or the C++ library, so no inline function compiled
// with AVX-512 can be shared with, and picked by, code that runs elsewhere.
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#include "simd_avx512.h"
#include "kernel_body.h"
TS_KERNEL_TABLE(kernels_avx512, "avx512-vnni", Avx512)
#else
#include "kernels.h"
namespace ts { const KernelTable* kernels_avx512() { return nullptr; } }
#endif
