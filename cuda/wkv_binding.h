// What the torch bindings of the WKV kernels (wkv6_op.cpp, wkv7_op.cpp) share: argument
// checks with one-line messages prefixed by the op's name, the current stream, the launch
// check. With -DWKV_EMULATE (tests only) a binding binds the CPU emulation of its kernels
// instead, and then expects CPU tensors.
//
// Light headers (not torch/extension.h and pybind11): a third of the compile time.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <climits>
#include <vector>

#ifdef WKV_EMULATE
using cudaStream_t = void*;  // as in cuda/emu/cuda_emu.h
#define WKV_DEVICE_NAME "CPU (emulation build)"
#else
// The c10 headers only (not ATen/cuda/CUDAContext.h): they need no cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define WKV_DEVICE_NAME "CUDA"
#endif

namespace wkv_binding {

inline bool on_expected_device(const at::Tensor& x)
{
#ifdef WKV_EMULATE
    return x.device().is_cpu();
#else
    return x.device().is_cuda();
#endif
}

// The first sequence tensor (r): on the expected device, bf16 or fp32, [B, T, H, N] with the
// build's N, B * H and T within an int. `names` lists the sequence inputs for the messages.
inline void check_first(const char* op, const at::Tensor& r, const char* names, int head_size)
{
    TORCH_CHECK(on_expected_device(r), op, ": r must be a " WKV_DEVICE_NAME " tensor; got ",
                r.device(), ".");
    TORCH_CHECK(r.scalar_type() == at::kBFloat16 || r.scalar_type() == at::kFloat, op, ": ",
                names, " must be bfloat16 or float32; got ", r.scalar_type(), ".");
    TORCH_CHECK(r.dim() == 4, op, ": r must have shape [B, T, H, N]; got ", r.sizes(), ".");
    TORCH_CHECK(r.size(3) == head_size, op, ": this build has head size N = ", head_size,
                " but r has N = ", r.size(3), ".");
    TORCH_CHECK(r.size(0) * r.size(2) <= INT_MAX && r.size(1) <= INT_MAX, op,
                ": B * H and T must fit in an int; got r of shape ", r.sizes(), ".");
}

// A sequence tensor (r, k, v, ..., gy): [B, T, H, N], contiguous, all of r's dtype.
inline void check_sequence(const char* op, const at::Tensor& x, const char* name, const at::Tensor& r)
{
    TORCH_CHECK(on_expected_device(x) && x.device() == r.device(), op, ": ", name,
                " must be a " WKV_DEVICE_NAME " tensor on r's device (", r.device(), "); got ",
                x.device(), ".");
    TORCH_CHECK(x.scalar_type() == r.scalar_type(), op, ": ", name, " has dtype ",
                x.scalar_type(), " but r has ", r.scalar_type(), "; they must match.");
    TORCH_CHECK(x.sizes() == r.sizes(), op, ": ", name, " has shape ", x.sizes(), " but r has ",
                r.sizes(), "; they must match.");
    TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous.");
}

// u, states and their gradients: fp32, contiguous, of the given shape.
inline void check_fp32(const char* op, const at::Tensor& x, const char* name, const at::Tensor& r,
                       at::IntArrayRef shape)
{
    TORCH_CHECK(x.device() == r.device(), op, ": ", name, " must be on r's device (", r.device(),
                "); got ", x.device(), ".");
    TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": ", name, " must be float32; got ",
                x.scalar_type(), ".");
    TORCH_CHECK(x.sizes() == shape, op, ": ", name, " must have shape ", shape, "; got ",
                x.sizes(), ".");
    TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous.");
}

inline cudaStream_t current_stream()
{
#ifdef WKV_EMULATE
    return nullptr;
#else
    return c10::cuda::getCurrentCUDAStream();
#endif
}

inline void check_launch()
{
#ifndef WKV_EMULATE
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace wkv_binding

// On a GPU, launches go to r's device.
#ifdef WKV_EMULATE
#define WKV_DEVICE_GUARD(r)
#else
#define WKV_DEVICE_GUARD(r) const c10::cuda::CUDAGuard wkv_device_guard((r).device())
#endif

// TORCH_LIBRARY pastes its namespace argument, so expand TORCH_EXTENSION_NAME first.
#define WKV_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
