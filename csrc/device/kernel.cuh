// Everything a kernel file is written in: the shared tile layer of csrc/device/ (an op's
// kernel headers include this and their own launch.cuh, nothing else of csrc/).
#pragma once

#include "device/dispatch.cuh"
#include "device/kernel_args.h"
#include "device/online_softmax.cuh"
#include "device/primitives.cuh"
#include "device/tiles.cuh"
#include "device/warp_gemm.cuh"
