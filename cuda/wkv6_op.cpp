// Torch binding for the WKV6 kernels in wkv6_cuda.cu: checks the arguments, allocates the
// outputs and the backward scratch, and launches on the current CUDA stream. The checks,
// stream and device handling are shared with wkv7_op.cpp (wkv_binding.h); with
// -DWKV_EMULATE (tests only) it binds the CPU emulation of the same kernels instead.
// A TORCH_LIBRARY registration: the ops appear as torch.ops.<name>.*.
#include "wkv_binding.h"

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

using namespace wkv_binding;
constexpr const char* OP = "wkv6";

void check_inputs(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& w, const at::Tensor& u, const at::Tensor& s0)
{
    check_first(OP, r, "r, k, v, w", wkv6_head_size());
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    check_sequence(OP, r, "r", r);
    check_sequence(OP, k, "k", r);
    check_sequence(OP, v, "v", r);
    check_sequence(OP, w, "w", r);
    check_fp32(OP, u, "u", r, {H, N});
    check_fp32(OP, s0, "state", r, {B, H, N, N});
}

}  // namespace

// r, k, v, w: [B, T, H, N] bf16 or fp32; u: [H, N] fp32; s0: [B, H, N, N] fp32.
// Returns y (r's dtype) and the final state (fp32).
std::vector<at::Tensor> forward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor w,
                                at::Tensor u, at::Tensor s0)
{
    check_inputs(r, k, v, w, u, s0);
    WKV_DEVICE_GUARD(r);
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
    check_sequence(OP, gy, "gy", r);
    check_fp32(OP, gs_end, "gs_end", r, s0.sizes());
    WKV_DEVICE_GUARD(r);
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

WKV_LIBRARY(TORCH_EXTENSION_NAME, m)
{
    m.def("forward", &forward);    // (r, k, v, w, u, s0) -> [y, s_end]
    m.def("backward", &backward);  // (r, k, v, w, u, s0, gy, gs_end) -> [gr, gk, gv, gw, gu, gs0]
    m.def("head_size", [] { return int64_t(wkv6_head_size()); });
}
