// The portable kernels: plain C++ for any CPU (the baseline build flags, no target pragma).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "simd_scalar.h"
#include "kernel_body.h"
TS_KERNEL_TABLE(kernels_scalar, "scalar", Scalar)
