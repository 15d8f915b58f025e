// What the WKV kernels share: the bf16 type and conversions, the launch macro (or the CPU
// emulation for the tests), and the index of a block's (b, h) slice. Included by wkv6_cuda.cu
// and wkv7_cuda.cu inside their anonymous namespace's file, before any kernel.
#pragma once
#ifdef __CUDACC__
#include <cuda_bf16.h>
#define WKV_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#define WKV_ALIGNED16(p) (p)
#else
#include "emu/cuda_emu.h"  // CPU emulation for the tests; defines WKV_LAUNCH, WKV_ALIGNED16
#endif

#include <stddef.h>

#ifndef _N_
#error "Compile with -D_N_=<head size>, e.g. -D_N_=64."
#endif

namespace {

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <typename F> __device__ __forceinline__ F from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16(x); }

// Index of element (b, t=0, h, n=threadIdx.x) in a [B, T, H, N] tensor; step t adds t * H * N.
__device__ __forceinline__ size_t first_step(int T, int H)
{
    const int b = blockIdx.x / H, h = blockIdx.x % H;
    return ((size_t)b * T * H + h) * _N_ + threadIdx.x;
}

// Offset of this block's (b, h) matrix in a [B, H, N, N] tensor.
__device__ __forceinline__ size_t matrix_offset() { return (size_t)blockIdx.x * _N_ * _N_; }

}  // namespace
