// Torch binding for the WKV6 kernels in wkv6_cuda.cu: checks the arguments, allocates the
// outputs and the backward scratch, and launches on the current CUDA stream.
// With -DWKV6_EMULATE (tests only) it binds the CPU emulation of the same kernels
// instead, and then expects CPU tensors.
//
// Light headers and a TORCH_LIBRARY registration (the ops appear as torch.ops.<name>.*)
// instead of torch/extension.h and pybind11: a third of the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <climits>
#include <vector>

#ifdef WKV6_EMULATE
using cudaStream_t = void*;  // as in cuda/emu/cuda_emu.h
#define WKV6_DEVICE_NAME "CPU (emulation build)"
#else
// The c10 headers only (not ATen/cuda/CUDAContext.h): they need no cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define WKV6_DEVICE_NAME "CUDA"
#endif

// Defined in wkv6_cuda.cu.
int wkv6_head_size();
void wkv6_forward(bool is_bf16, int B, int T, int H, const void* r, const void* k, const void* v,
                  const void* w, const float* u, const float* s0, void* y, float* s_end,
                  cudaStream_t stream);
int wkv6_saved_states(int T);
void wkv6_backward(bool is_bf16, int B, int T, int H, const void* r, const void* k,
                   const void* v, const void* w, const float* u, const float* s0, const void* gy,
                   const float* gs_end, void* gr, void* gk, void* gv, void* gw, float* gu_partial,
                   float* gs0, float* saved, cudaStream_t stream);

namespace {

bool on_expected_device(const at::Tensor& x)
{
#ifdef WKV6_EMULATE
    return x.device().is_cpu();
#else
    return x.device().is_cuda();
#endif
}

// The sequence tensors r, k, v, w (and gy): [B, T, H, N], contiguous, all of r's dtype.
void check_sequence(const at::Tensor& x, const char* name, const at::Tensor& r)
{
    TORCH_CHECK(on_expected_device(x) && x.device() == r.device(), "wkv6: ", name,
                " must be a " WKV6_DEVICE_NAME " tensor on r's device (", r.device(), "); got ",
                x.device(), ".");
    TORCH_CHECK(x.scalar_type() == r.scalar_type(), "wkv6: ", name, " has dtype ",
                x.scalar_type(), " but r has ", r.scalar_type(), "; they must match.");
    TORCH_CHECK(x.sizes() == r.sizes(), "wkv6: ", name, " has shape ", x.sizes(), " but r has ",
                r.sizes(), "; they must match.");
    TORCH_CHECK(x.is_contiguous(), "wkv6: ", name, " must be contiguous.");
}

// u, states and their gradients: fp32, contiguous, of the given shape.
void check_fp32(const at::Tensor& x, const char* name, const at::Tensor& r,
                at::IntArrayRef shape)
{
    TORCH_CHECK(x.device() == r.device(), "wkv6: ", name, " must be on r's device (", r.device(),
                "); got ", x.device(), ".");
    TORCH_CHECK(x.scalar_type() == at::kFloat, "wkv6: ", name, " must be float32; got ",
                x.scalar_type(), ".");
    TORCH_CHECK(x.sizes() == shape, "wkv6: ", name, " must have shape ", shape, "; got ",
                x.sizes(), ".");
    TORCH_CHECK(x.is_contiguous(), "wkv6: ", name, " must be contiguous.");
}

void check_inputs(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& w, const at::Tensor& u, const at::Tensor& s0)
{
    TORCH_CHECK(on_expected_device(r), "wkv6: r must be a " WKV6_DEVICE_NAME " tensor; got ",
                r.device(), ".");
    TORCH_CHECK(r.scalar_type() == at::kBFloat16 || r.scalar_type() == at::kFloat,
                "wkv6: r, k, v, w must be bfloat16 or float32; got ", r.scalar_type(), ".");
    TORCH_CHECK(r.dim() == 4, "wkv6: r must have shape [B, T, H, N]; got ", r.sizes(), ".");
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    TORCH_CHECK(N == wkv6_head_size(), "wkv6: this build has head size N = ", wkv6_head_size(),
                " but r has N = ", N, ".");
    TORCH_CHECK(B * H <= INT_MAX && r.size(1) <= INT_MAX,
                "wkv6: B * H and T must fit in an int; got r of shape ", r.sizes(), ".");
    check_sequence(r, "r", r);
    check_sequence(k, "k", r);
    check_sequence(v, "v", r);
    check_sequence(w, "w", r);
    check_fp32(u, "u", r, {H, N});
    check_fp32(s0, "state", r, {B, H, N, N});
}

cudaStream_t current_stream()
{
#ifdef WKV6_EMULATE
    return nullptr;
#else
    return c10::cuda::getCurrentCUDAStream();
#endif
}

void check_launch()
{
#ifndef WKV6_EMULATE
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace

// r, k, v, w: [B, T, H, N] bf16 or fp32; u: [H, N] fp32; s0: [B, H, N, N] fp32.
// Returns y (r's dtype) and the final state (fp32).
std::vector<at::Tensor> forward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor w,
                                at::Tensor u, at::Tensor s0)
{
    check_inputs(r, k, v, w, u, s0);
#ifndef WKV6_EMULATE
    const c10::cuda::CUDAGuard guard(r.device());
#endif
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    auto y = at::empty_like(r);
    auto s_end = at::empty_like(s0);
    wkv6_forward(r.scalar_type() == at::kBFloat16, B, T, H, r.data_ptr(), k.data_ptr(),
                 v.data_ptr(), w.data_ptr(), u.data_ptr<float>(), s0.data_ptr<float>(),
                 y.data_ptr(), s_end.data_ptr<float>(), current_stream());
    check_launch();
    return {y, s_end};
}

// gy: like r; gs_end: like s0. Returns gr, gk, gv, gw (r's dtype), gu [H, N] and gs0 (fp32).
std::vector<at::Tensor> backward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor w,
                                 at::Tensor u, at::Tensor s0, at::Tensor gy, at::Tensor gs_end)
{
    check_inputs(r, k, v, w, u, s0);
    check_sequence(gy, "gy", r);
    check_fp32(gs_end, "gs_end", r, s0.sizes());
#ifndef WKV6_EMULATE
    const c10::cuda::CUDAGuard guard(r.device());
#endif
    const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    auto gr = at::empty_like(r), gk = at::empty_like(r);
    auto gv = at::empty_like(r), gw = at::empty_like(r);
    auto gu_partial = at::empty({B, H, N}, s0.options());
    auto gs0 = at::empty_like(s0);
    // The state before every CHUNK-th step, rerun by the backward pass (see wkv6_cuda.cu).
    auto saved = at::empty({B, H, wkv6_saved_states(T), N, N}, s0.options());
    wkv6_backward(r.scalar_type() == at::kBFloat16, B, T, H, r.data_ptr(), k.data_ptr(),
                  v.data_ptr(), w.data_ptr(), u.data_ptr<float>(), s0.data_ptr<float>(),
                  gy.data_ptr(), gs_end.data_ptr<float>(), gr.data_ptr(), gk.data_ptr(),
                  gv.data_ptr(), gw.data_ptr(), gu_partial.data_ptr<float>(),
                  gs0.data_ptr<float>(), saved.data_ptr<float>(), current_stream());
    check_launch();
    return {gr, gk, gv, gw, gu_partial.sum(0), gs0};
}

// TORCH_LIBRARY pastes its namespace argument, so expand TORCH_EXTENSION_NAME first.
#define WKV6_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
WKV6_LIBRARY(TORCH_EXTENSION_NAME, m)
{
    m.def("forward", &forward);    // (r, k, v, w, u, s0) -> [y, s_end]
    m.def("backward", &backward);  // (r, k, v, w, u, s0, gy, gs_end) -> [gr, gk, gv, gw, gu, gs0]
    m.def("head_size", [] { return int64_t(wkv6_head_size()); });
}
