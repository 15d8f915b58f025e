// WKV6 (RWKV-6 time mixing) forward and backward kernels. Pure CUDA, no torch headers:
// cuda/wkv6_op.cpp binds them to torch, and the tests compile this very file with g++
// under cuda/emu/cuda_emu.h to run it on the CPU.
//
// Per batch b and head h, with state S (N x N, key index j, value index i) and
// decay d_t = exp(-exp(w_t)):
//     y_t[i] = sum_j r_t[j] * (u[j] k_t[j] v_t[i] + S[j, i])
//     S[j, i] <- d_t[j] S[j, i] + k_t[j] v_t[i]
// Layout: r, k, v, w, y and their gradients are [B, T, H, N] contiguous (= [B, T, C]);
// u is [H, N] fp32; states are [B, H, N, N] fp32, indexed [j][i].
//
// One block of N threads per (b, h); each thread keeps one row or one column of an N x N
// matrix in registers and walks through time, so nothing is sized by T.
//
// Backward. With G_t = dLoss/dS_t (S_t the state after step t), running backwards
//     G_{t-1} = d_t G_t + r_t gy_t^T,
// row j of the gradients needs row j of S_{t-1} and of G_t at the same step t:
//     gr_t = gy_t . S_{t-1} + u k_t (gy_t . v_t)      gk_t = v_t . G_t + u r_t (gy_t . v_t)
//     dLoss/dlog(d_t) = d_t (G_t . S_{t-1})           (all dot products over i, row j)
// S runs forwards and G backwards, so the backward pass first reruns the forward recurrence
// and keeps S at every CHUNK-th step (scratch, ~4 N / CHUNK bytes per element of r), then
// walks the chunks backwards. Inside a chunk, S_{t-1} is the chunk's first state decayed
// plus the chunk's own k_s v_s^T, so every dot product with S_{t-1} is a short sum of dot
// products with the chunk's first state and with the chunk's v_s, which follow G (and gy)
// through the same damped recurrence. Nothing is obtained as a difference of large terms,
// which keeps the decay gradient as precise as a plain fp32 loop, also for strong decay.
// The gv pass (column i of G, a sum over rows) runs beside the state rerun.

#include "wkv_device.cuh"

namespace {

// Four consecutive floats at a 16-byte-aligned address, shared or global, in one 128-bit load
// (a misaligned one faults on the GPU; the emulation checks).
static_assert(_N_ % 4 == 0, "the head size must be a multiple of 4");
struct alignas(16) f4 {
    float v[4];
};
__device__ __forceinline__ f4 load4(const float* p) { return *reinterpret_cast<const f4*>(WKV_ALIGNED16(p)); }

// Steps per saved state in the backward pass: fewer saved states, but longer chunks to walk
// and more shared memory (under the 48 KB a block gets without opting in).
constexpr int CHUNK = _N_ <= 64 ? 16 : 8;

// Column i of S through time: y (if wanted), the final state (if wanted), and a copy of S
// before every CHUNK-th step (if wanted; [B, H, ceil(T / CHUNK), N, N]).
template <typename F>
__device__ void forward_columns(
    int T, int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v,
    const F* __restrict__ w, const float* __restrict__ u, const float* __restrict__ s0,
    F* __restrict__ y, float* __restrict__ s_end, float* __restrict__ saved)
{
    // Thread i owns column i of S: y_t[i] then needs only its own column.
    const int i = threadIdx.x, C = H * _N_;
    __shared__ float r_[_N_], k_[_N_], d_[_N_], u_[_N_];
    u_[i] = u[(blockIdx.x % H) * _N_ + i];

    float S[_N_];
    const float* s0_ = s0 + matrix_offset() + i;
#pragma unroll
    for (int j = 0; j < _N_; j++) S[j] = s0_[j * _N_];
    const size_t saved_at = (size_t)blockIdx.x * ((T + CHUNK - 1) / CHUNK) * _N_ * _N_ + i;

    size_t at = first_step(T, H);
    for (int t = 0; t < T; t++, at += C) {
        if (saved && t % CHUNK == 0) {
#pragma unroll
            for (int j = 0; j < _N_; j++) saved[saved_at + (size_t)(t / CHUNK) * _N_ * _N_ + j * _N_] = S[j];
        }
        __syncthreads();  // everyone is done reading the previous step's r_, k_, d_
        r_[i] = to_f32(r[at]);
        k_[i] = to_f32(k[at]);
        d_[i] = expf(-expf(to_f32(w[at])));
        __syncthreads();
        const float vi = to_f32(v[at]);
        float yi = 0;
#pragma unroll
        for (int j = 0; j < _N_; j++) {
            const float kv = k_[j] * vi;
            yi += r_[j] * (u_[j] * kv + S[j]);
            S[j] = d_[j] * S[j] + kv;
        }
        if (y) y[at] = from_f32<F>(yi);
    }

    if (s_end) {
        float* s_end_ = s_end + matrix_offset() + i;
#pragma unroll
        for (int j = 0; j < _N_; j++) s_end_[j * _N_] = S[j];
    }
}

template <typename F>
__global__ void __launch_bounds__(_N_, 1) wkv6_forward_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v,
    const F* __restrict__ w, const float* __restrict__ u, const float* __restrict__ s0,
    F* __restrict__ y, float* __restrict__ s_end)
{
    forward_columns<F>(T, H, r, k, v, w, u, s0, y, s_end, nullptr);
}

// Backward, reverse in time, thread i owns column i of G: gv.
template <typename F>
__device__ void reverse_columns(
    int T, int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ w,
    const float* __restrict__ u, const F* __restrict__ gy, const float* __restrict__ gs_end,
    F* __restrict__ gv)
{
    const int i = threadIdx.x, C = H * _N_;
    __shared__ float r_[_N_], k_[_N_], d_[_N_], u_[_N_];
    u_[i] = u[(blockIdx.x % H) * _N_ + i];

    float G[_N_];
    const float* gs_end_ = gs_end + matrix_offset() + i;
#pragma unroll
    for (int j = 0; j < _N_; j++) G[j] = gs_end_[j * _N_];

    size_t at = first_step(T, H) + (size_t)(T - 1) * C;
    for (int t = T - 1; t >= 0; t--, at -= C) {
        __syncthreads();
        r_[i] = to_f32(r[at]);
        k_[i] = to_f32(k[at]);
        d_[i] = expf(-expf(to_f32(w[at])));
        __syncthreads();
        const float gyi = to_f32(gy[at]);
        float kg = 0, ruk = 0;  // k_t . G_t[:,i]  and  sum_j r_t u k_t
#pragma unroll
        for (int j = 0; j < _N_; j++) {
            kg += k_[j] * G[j];
            ruk += r_[j] * u_[j] * k_[j];
            G[j] = d_[j] * G[j] + r_[j] * gyi;
        }
        gv[at] = from_f32<F>(kg + gyi * ruk);
    }
}

// Backward, first kernel: blockIdx.y = 0 reruns the forward pass to save states,
// blockIdx.y = 1 computes gv; the two are independent and run side by side. Two blocks per
// (b, h): at most 128 registers (8 blocks of 64 threads per SM) keeps B * H = 1024 in one
// wave on an H100 (132 SMs); left alone it took 142-144 and fit 7. N = 128 needs its 255.
template <typename F>
__global__ void __launch_bounds__(_N_, _N_ <= 64 ? 8 : 1) wkv6_backward_columns_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v,
    const F* __restrict__ w, const float* __restrict__ u, const float* __restrict__ s0,
    const F* __restrict__ gy, const float* __restrict__ gs_end, float* __restrict__ saved,
    F* __restrict__ gv)
{
    if (blockIdx.y == 0)
        forward_columns<F>(T, H, r, k, v, w, u, s0, nullptr, nullptr, saved);
    else
        reverse_columns<F>(T, H, r, k, w, u, gy, gs_end, gv);
}

// Backward, second kernel: thread j owns row j of G and walks the chunks backwards;
// gr, gk, gw, this block's share of gu, and the initial-state gradient.
template <typename F>
__global__ void __launch_bounds__(_N_, 1) wkv6_backward_rows_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v,
    const F* __restrict__ w, const float* __restrict__ u, const F* __restrict__ gy,
    const float* __restrict__ gs_end, const float* __restrict__ saved, F* __restrict__ gr,
    F* __restrict__ gk, F* __restrict__ gw, float* __restrict__ gu_partial,
    float* __restrict__ gs0)
{
    const int j = threadIdx.x, C = H * _N_;
    // Read by every row: v and gy of the chunk's steps (rows padded to keep 16-byte alignment
    // for 128-bit loads and to spread M's reads by column over the banks) and
    // M[t][s] = gy_t . v_s. Column j of the others belongs to row j alone: r, k, d, exp(w),
    // Y[s] = G_t . v_s, and A[t] = gy_t . Sc (later r_t times the decay up to t).
    alignas(16) __shared__ float v_[CHUNK][_N_ + 4], gy_[CHUNK][_N_ + 4];
    __shared__ float M[CHUNK][CHUNK];
    __shared__ float r_[CHUNK][_N_], k_[CHUNK][_N_], d_[CHUNK][_N_], e_[CHUNK][_N_];
    __shared__ float Y[CHUNK][_N_], A[CHUNK][_N_];
    const float uj = u[(blockIdx.x % H) * _N_ + j];

    float G[_N_];  // row j of G_t, t the last step not yet processed
    const size_t row = matrix_offset() + (size_t)j * _N_;
#pragma unroll
    for (int i = 0; i < _N_; i++) G[i] = gs_end[row + i];  // once: a caller's tensor, maybe unaligned

    const int n_chunks = (T + CHUNK - 1) / CHUNK;
    float gu = 0;
    for (int c = n_chunks - 1; c >= 0; c--) {
        const int t0 = c * CHUNK, len = T - t0 < CHUNK ? T - t0 : CHUNK;
        const size_t at0 = first_step(T, H) + (size_t)t0 * C;
        __syncthreads();  // everyone is done with the previous chunk's shared arrays
        for (int tt = 0; tt < len; tt++) {
            const size_t at = at0 + (size_t)tt * C;
            v_[tt][j] = to_f32(v[at]);
            gy_[tt][j] = to_f32(gy[at]);
            r_[tt][j] = to_f32(r[at]);
            k_[tt][j] = to_f32(k[at]);
            const float ew = expf(to_f32(w[at]));
            e_[tt][j] = ew;
            d_[tt][j] = expf(-ew);
        }
        __syncthreads();
        for (int e = j; e < CHUNK * CHUNK; e += _N_) {
            const int t = e / CHUNK, s = e % CHUNK;
            float m = 0;
            if (s <= t && t < len) {
#pragma unroll
                for (int i = 0; i < _N_; i += 4) {
                    const f4 g = load4(&gy_[t][i]), x = load4(&v_[s][i]);
#pragma unroll
                    for (int q = 0; q < 4; q++) m += g.v[q] * x.v[q];
                }
            }
            M[t][s] = m;
        }

        // Sc = row j of the state before the chunk, saved by the first kernel (256-byte rows
        // read as float4 through the cache, len + 1 times); Z = G_t . Sc.
        const float* Sc = saved + ((size_t)blockIdx.x * n_chunks + c) * _N_ * _N_ + (size_t)j * _N_;
        float Z = 0;
#pragma unroll
        for (int i = 0; i < _N_; i += 4) {
            const f4 sc = load4(Sc + i);
#pragma unroll
            for (int q = 0; q < 4; q++) Z += G[i + q] * sc.v[q];
        }
        for (int tt = 0; tt < len; tt++) {
            float y = 0, a = 0;
#pragma unroll
            for (int i = 0; i < _N_; i += 4) {
                const f4 x = load4(&v_[tt][i]), g = load4(&gy_[tt][i]), sc = load4(Sc + i);
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    y += G[i + q] * x.v[q];
                    a += g.v[q] * sc.v[q];
                }
            }
            Y[tt][j] = y;
            A[tt][j] = a;
        }
        __syncthreads();  // M is complete

        float gu_chunk = 0;
        for (int tt = len - 1; tt >= 0; tt--) {
            const size_t at = at0 + (size_t)tt * C;
            const float rj = r_[tt][j], kj = k_[tt][j], dj = d_[tt][j], ew = e_[tt][j];
            // S_{t-1} = (decay since the chunk start) Sc + sum_{s < t} (decay since s) k_s v_s
            float GS = 0, gyS = 0, decay = 1;  // G_t . S_{t-1},  gy_t . S_{t-1}
            for (int s = tt - 1; s >= 0; s--) {
                const float kd = decay * k_[s][j];
                GS += kd * Y[s][j];
                gyS += kd * M[tt][s];
                decay *= d_[s][j];
            }
            GS += decay * Z;
            gyS += decay * A[tt][j];
            const float gy_dot_v = M[tt][tt];

            gr[at] = from_f32<F>(gyS + uj * kj * gy_dot_v);
            gk[at] = from_f32<F>(Y[tt][j] + uj * rj * gy_dot_v);
            // d(d_t)/dw_t = -d_t exp(w_t) = -exp(w_t - exp(w_t)): 0 once exp(w_t) overflows
            // (w_t > 88.7), where the product would be 0 * inf = NaN; unchanged elsewhere.
            gw[at] = from_f32<F>(ew < INFINITY ? -dj * GS * ew : 0.f);
            gu_chunk += rj * kj * gy_dot_v;

            // One step back, G_{t-1} = d_t G_t + r_t gy_t: for the dot products of G now,
            // for G itself once per chunk below.
            for (int s = 0; s < tt; s++) Y[s][j] = dj * Y[s][j] + rj * M[tt][s];
            Z = dj * Z + rj * A[tt][j];
            A[tt][j] = rj * decay;
        }
        gu += gu_chunk;  // summed per chunk first: less rounding over long sequences
        // G before the chunk = (decay over the chunk) G after it + sum_t (r_t decay up to t) gy_t,
        // step by step over t for all of G at once: gy_t's row is one 128-bit broadcast load per
        // four elements of G, and A[t] is read once.
        float chunk_decay = 1;
        for (int tt = 0; tt < len; tt++) chunk_decay *= d_[tt][j];
#pragma unroll
        for (int i = 0; i < _N_; i++) G[i] *= chunk_decay;
        for (int tt = 0; tt < len; tt++) {
            const float a = A[tt][j];
#pragma unroll
            for (int i = 0; i < _N_; i += 4) {
                const f4 g = load4(&gy_[tt][i]);
#pragma unroll
                for (int q = 0; q < 4; q++) G[i + q] += a * g.v[q];
            }
        }
    }

#pragma unroll
    for (int i = 0; i < _N_; i++) gs0[row + i] = G[i];
    gu_partial[(size_t)blockIdx.x * _N_ + j] = gu;
}

// Host entry points, called by cuda/wkv6_op.cpp. Pointers are device pointers to bf16
// (when `is_bf16`) or fp32 for the [B, T, H, N] tensors, fp32 for everything else.

template <typename F>
void forward_typed(int B, int T, int H, const void* r, const void* k, const void* v,
                   const void* w, const float* u, const float* s0, void* y, float* s_end,
                   cudaStream_t stream)
{
    WKV_LAUNCH(wkv6_forward_kernel<F>, dim3(B * H), dim3(_N_), stream)(
        T, H, (const F*)r, (const F*)k, (const F*)v, (const F*)w, u, s0, (F*)y, s_end);
}

template <typename F>
void backward_typed(int B, int T, int H, const void* r, const void* k, const void* v,
                    const void* w, const float* u, const float* s0, const void* gy,
                    const float* gs_end, void* gr, void* gk, void* gv, void* gw,
                    float* gu_partial, float* gs0, float* saved, cudaStream_t stream)
{
    WKV_LAUNCH(wkv6_backward_columns_kernel<F>, dim3(B * H, 2), dim3(_N_), stream)(
        T, H, (const F*)r, (const F*)k, (const F*)v, (const F*)w, u, s0, (const F*)gy, gs_end,
        saved, (F*)gv);
    WKV_LAUNCH(wkv6_backward_rows_kernel<F>, dim3(B * H), dim3(_N_), stream)(
        T, H, (const F*)r, (const F*)k, (const F*)v, (const F*)w, u, (const F*)gy, gs_end, saved,
        (F*)gr, (F*)gk, (F*)gw, gu_partial, gs0);
}

}  // namespace

int wkv6_head_size() { return _N_; }

int wkv6_saved_states(int T) { return (T + CHUNK - 1) / CHUNK; }

void wkv6_forward(bool is_bf16, int B, int T, int H, const void* r, const void* k, const void* v,
                  const void* w, const float* u, const float* s0, void* y, float* s_end,
                  cudaStream_t stream)
{
    if (B * H == 0) return;  // an empty grid is a launch error
    if (is_bf16)
        forward_typed<bf16>(B, T, H, r, k, v, w, u, s0, y, s_end, stream);
    else
        forward_typed<float>(B, T, H, r, k, v, w, u, s0, y, s_end, stream);
}

// saved: [B, H, wkv6_saved_states(T), N, N] fp32 scratch; gu_partial: [B, H, N], to be
// summed over B by the caller.
void wkv6_backward(bool is_bf16, int B, int T, int H, const void* r, const void* k,
                   const void* v, const void* w, const float* u, const float* s0, const void* gy,
                   const float* gs_end, void* gr, void* gk, void* gv, void* gw, float* gu_partial,
                   float* gs0, float* saved, cudaStream_t stream)
{
    if (B * H == 0) return;
    if (is_bf16)
        backward_typed<bf16>(B, T, H, r, k, v, w, u, s0, gy, gs_end, gr, gk, gv, gw, gu_partial,
                             gs0, saved, stream);
    else
        backward_typed<float>(B, T, H, r, k, v, w, u, s0, gy, gs_end, gr, gk, gv, gw, gu_partial,
                              gs0, saved, stream);
}
