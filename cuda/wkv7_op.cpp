// Torch binding for the WKV7 kernels in wkv7_cuda.cu: checks the arguments, allocates the
// outputs and the backward scratch, and launches on the current CUDA stream. The checks,
// stream and device handling are shared with wkv6_op.cpp (wkv_binding.h); with
// -DWKV_EMULATE (tests only) it binds the CPU emulation of the same kernels instead.
// A TORCH_LIBRARY registration: the ops appear as torch.ops.<name>.*.
#include "wkv_binding.h"

// Defined in wkv7_cuda.cu.
int wkv7_head_size();
int wkv7_chunk();
int wkv7_saved_states(int T);
void wkv7_forward(bool is_bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                  const void* v, const void* a, const void* b, const float* s0, void* y,
                  float* s_end, cudaStream_t stream);
void wkv7_backward(bool is_bf16, int B, int T, int H, const void* r, const void* w,
                   const void* k, const void* v, const void* a, const void* b, const float* s0,
                   const void* gy, const float* gs_end, void* gr, void* gw, void* gk, void* gv,
                   void* ga, void* gb, float* gs0, float* saved, float* sa, float* scratch,
                   cudaStream_t stream);

namespace {

using namespace wkv_binding;
constexpr const char* OP = "wkv7";

void check_inputs(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& s0)
{
    check_first(OP, r, "r, w, k, v, a, b", wkv7_head_size());
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    check_sequence(OP, r, "r", r);
    check_sequence(OP, w, "w", r);
    check_sequence(OP, k, "k", r);
    check_sequence(OP, v, "v", r);
    check_sequence(OP, a, "a", r);
    check_sequence(OP, b, "b", r);
    check_fp32(OP, s0, "state", r, {B, H, N, N});
}

}  // namespace

// r, w, k, v, a, b: [B, T, H, N] bf16 or fp32; s0: [B, H, N, N] fp32 (value, key).
// Returns y (r's dtype) and the final state (fp32).
std::vector<at::Tensor> forward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                at::Tensor a, at::Tensor b, at::Tensor s0)
{
    check_inputs(r, w, k, v, a, b, s0);
    WKV_DEVICE_GUARD(r);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    auto y = at::empty_like(r);
    auto s_end = at::empty_like(s0);
    wkv7_forward(r.scalar_type() == at::kBFloat16, B, T, H, r.data_ptr(), w.data_ptr(),
                 k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(), s0.data_ptr<float>(),
                 y.data_ptr(), s_end.data_ptr<float>(), current_stream());
    check_launch();
    return {y, s_end};
}

// gy: like r; gs_end: like s0. Returns gr, gw, gk, gv, ga, gb (r's dtype) and gs0 (fp32).
std::vector<at::Tensor> backward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                 at::Tensor a, at::Tensor b, at::Tensor s0, at::Tensor gy,
                                 at::Tensor gs_end)
{
    check_inputs(r, w, k, v, a, b, s0);
    check_sequence(OP, gy, "gy", r);
    check_fp32(OP, gs_end, "gs_end", r, s0.sizes());
    WKV_DEVICE_GUARD(r);
    const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    auto gr = at::empty_like(r), gw = at::empty_like(r), gk = at::empty_like(r);
    auto gv = at::empty_like(r), ga = at::empty_like(r), gb = at::empty_like(r);
    auto gs0 = at::empty_like(s0);
    // Scratch (see wkv7_cuda.cu): the state before every CHUNK-th step and S_{t-1} a_t at
    // every step, from a rerun of the forward pass; one chunk's states per (b, h).
    auto saved = at::empty({B, H, wkv7_saved_states(T), N, N}, s0.options());
    auto sa = at::empty(r.sizes(), s0.options());
    auto scratch = at::empty({B, H, wkv7_chunk(), N, N}, s0.options());
    wkv7_backward(r.scalar_type() == at::kBFloat16, B, T, H, r.data_ptr(), w.data_ptr(),
                  k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(), s0.data_ptr<float>(),
                  gy.data_ptr(), gs_end.data_ptr<float>(), gr.data_ptr(), gw.data_ptr(),
                  gk.data_ptr(), gv.data_ptr(), ga.data_ptr(), gb.data_ptr(),
                  gs0.data_ptr<float>(), saved.data_ptr<float>(), sa.data_ptr<float>(),
                  scratch.data_ptr<float>(), current_stream());
    check_launch();
    return {gr, gw, gk, gv, ga, gb, gs0};
}

WKV_LIBRARY(TORCH_EXTENSION_NAME, m)
{
    m.def("forward", &forward);    // (r, w, k, v, a, b, s0) -> [y, s_end]
    m.def("backward", &backward);  // (r, w, k, v, a, b, s0, gy, gs_end) -> [gr, gw, gk, gv, ga, gb, gs0]
    m.def("head_size", [] { return int64_t(wkv7_head_size()); });
}
