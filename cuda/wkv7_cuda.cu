// WKV7 (RWKV-7 "x070" time mixing) forward and backward kernels. Pure CUDA, no torch headers:
// cuda/wkv7_op.cpp binds them to torch, and the tests compile this very file with g++
// under cuda/emu/cuda_emu.h to run it on the CPU.
//
// Per batch b and head h, with state S (N x N, value index i, key index j, as the `rwkv`
// package holds it) and decay d_t = exp(-exp(w_t)) per key j:
//     sa_t = S_{t-1} a_t
//     S_t  = S_{t-1} diag(d_t) + sa_t b_t^T + v_t k_t^T
//     y_t  = S_t r_t
// Layout: r, w, k, v, a, b, y and their gradients are [B, T, H, N] contiguous (= [B, T, C]);
// states are [B, H, N, N] fp32, indexed [i][j].
//
// One block of N threads per (b, h). Forward: thread i keeps row i of S in registers
// (sa_t[i] and y_t[i] are sums over its own row) and walks through time, so nothing is
// sized by T.
//
// Backward. With G_t = dLoss/dS_t (all of it: gs_end, y_t and the later steps),
//     G_{t-1} = G_t diag(d_t) + (G_t b_t) a_t^T + gy_{t-1} r_{t-1}^T,
// and at step t, with S = S_{t-1}:
//     gr_t = S_t^T gy_t = d_t * (S^T gy_t) + b_t (sa_t . gy_t) + k_t (v_t . gy_t)
//     gv_t = G_t k_t              gk_t = G_t^T v_t          gb_t = G_t^T sa_t
//     ga_t = S^T (G_t b_t)        dLoss/dd_t[j] = sum_i G_t[i, j] S[i, j]
// Sums over j (a row of G) and sums over i (a column of G, of S) are both needed, so
// thread n holds row n of G and column n of G (two N-float arrays; the two copies get the
// same operations on the same values). S_{t-1} runs forwards and G backwards: the first
// kernel reruns the forward recurrence and keeps S at every CHUNK-th step and sa_t at every
// step; the second walks the chunks backwards, recomputes the chunk's CHUNK states from
// the saved one (the same arithmetic as the forward, so the same values) into per-(b, h)
// scratch, and then walks the chunk's steps backwards reading them. No state is obtained by
// undoing a step (dividing by d_t and subtracting, as an inverting kernel does): that
// amplifies rounding by 1/d_t per step, which strong decays make large. Every number here is
// what a plain fp32 step-by-step loop would compute.

#include "wkv_device.cuh"

namespace {

// Steps per saved state. The backward kernel stages ten [CHUNK][N] fp32 arrays in shared
// memory (40 KB for N = 64 or 128, under the 48 KB a block gets without opting in), and its
// scratch holds CHUNK states per (b, h).
constexpr int CHUNK = _N_ <= 64 ? 16 : 8;

// Row i of S through time: y (if wanted), the final state (if wanted), a copy of S before
// every CHUNK-th step (if wanted; [B, H, ceil(T / CHUNK), N, N]) and sa_t (if wanted;
// [B, T, H, N] fp32).
template <typename F>
__global__ void __launch_bounds__(_N_, 1) wkv7_forward_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b,
    const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ s_end,
    float* __restrict__ saved, float* __restrict__ sa_out)
{
    const int i = threadIdx.x, C = H * _N_;
    __shared__ float r_[_N_], d_[_N_], k_[_N_], a_[_N_], b_[_N_];

    float S[_N_];
    const size_t row = matrix_offset() + (size_t)i * _N_;
#pragma unroll
    for (int j = 0; j < _N_; j++) S[j] = s0[row + j];
    const size_t saved_at = (size_t)blockIdx.x * ((T + CHUNK - 1) / CHUNK) * _N_ * _N_ + (size_t)i * _N_;

    size_t at = first_step(T, H);
    for (int t = 0; t < T; t++, at += C) {
        if (saved && t % CHUNK == 0) {
            float* out = saved + saved_at + (size_t)(t / CHUNK) * _N_ * _N_;
#pragma unroll
            for (int j = 0; j < _N_; j++) out[j] = S[j];
        }
        __syncthreads();  // everyone is done reading the previous step's vectors
        r_[i] = to_f32(r[at]);
        d_[i] = expf(-expf(to_f32(w[at])));
        k_[i] = to_f32(k[at]);
        a_[i] = to_f32(a[at]);
        b_[i] = to_f32(b[at]);
        __syncthreads();
        float sa = 0;
#pragma unroll
        for (int j = 0; j < _N_; j++) sa += S[j] * a_[j];
        if (sa_out) sa_out[at] = sa;
        const float vi = to_f32(v[at]);
        float yi = 0;
#pragma unroll
        for (int j = 0; j < _N_; j++) {
            S[j] = S[j] * d_[j] + sa * b_[j] + vi * k_[j];
            yi += S[j] * r_[j];
        }
        if (y) y[at] = from_f32<F>(yi);
    }

    if (s_end) {
#pragma unroll
        for (int j = 0; j < _N_; j++) s_end[row + j] = S[j];
    }
}

// Backward, second kernel: the chunks backwards. Thread n holds row n and column n of G.
// scratch: [B * H, CHUNK, N, N] fp32, the chunk's states S_{t-1}; thread n writes and reads
// only column n of it (consecutive threads, consecutive addresses).
template <typename F>
__global__ void __launch_bounds__(_N_, 1) wkv7_backward_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b,
    const F* __restrict__ gy, const float* __restrict__ gs_end, const float* __restrict__ saved,
    const float* __restrict__ sa, float* __restrict__ scratch, F* __restrict__ gr,
    F* __restrict__ gw, F* __restrict__ gk, F* __restrict__ gv, F* __restrict__ ga,
    F* __restrict__ gb, float* __restrict__ gs0)
{
    const int n = threadIdx.x, C = H * _N_;
    // The chunk's vectors, read by every thread; Gb_[t] = G_t b_t, one slot per step so that
    // one barrier per step suffices.
    __shared__ float r_[CHUNK][_N_], d_[CHUNK][_N_], e_[CHUNK][_N_], k_[CHUNK][_N_];
    __shared__ float v_[CHUNK][_N_], a_[CHUNK][_N_], b_[CHUNK][_N_], gy_[CHUNK][_N_];
    __shared__ float sa_[CHUNK][_N_], Gb_[CHUNK][_N_];

    float Gr[_N_], Gc[_N_];  // Gr[j] = G[n][j], Gc[i] = G[i][n]
    const size_t row = matrix_offset() + (size_t)n * _N_, column = matrix_offset() + n;
#pragma unroll
    for (int j = 0; j < _N_; j++) Gr[j] = gs_end[row + j];
#pragma unroll
    for (int i = 0; i < _N_; i++) Gc[i] = gs_end[column + (size_t)i * _N_];

    float* const states = scratch + (size_t)blockIdx.x * CHUNK * _N_ * _N_ + n;
    const int n_chunks = (T + CHUNK - 1) / CHUNK;
    for (int c = n_chunks - 1; c >= 0; c--) {
        const int t0 = c * CHUNK, len = T - t0 < CHUNK ? T - t0 : CHUNK;
        const size_t at0 = first_step(T, H) + (size_t)t0 * C;
        __syncthreads();  // everyone is done with the previous chunk's shared arrays
        for (int tt = 0; tt < len; tt++) {
            const size_t at = at0 + (size_t)tt * C;
            r_[tt][n] = to_f32(r[at]);
            const float ew = expf(to_f32(w[at]));
            e_[tt][n] = ew;
            d_[tt][n] = expf(-ew);
            k_[tt][n] = to_f32(k[at]);
            v_[tt][n] = to_f32(v[at]);
            a_[tt][n] = to_f32(a[at]);
            b_[tt][n] = to_f32(b[at]);
            gy_[tt][n] = to_f32(gy[at]);
            sa_[tt][n] = sa[at];
        }
        __syncthreads();

        // Column n of the chunk's states, element by element through the chunk's steps:
        // states[tt] = S_{t0 + tt - 1}, exactly the forward's arithmetic.
        const float* Sc = saved + ((size_t)blockIdx.x * n_chunks + c) * _N_ * _N_ + n;
        for (int i = 0; i < _N_; i++) {
            float s = Sc[(size_t)i * _N_];
            for (int tt = 0; tt < len; tt++) {
                states[((size_t)tt * _N_ + i) * _N_] = s;
                s = s * d_[tt][n] + sa_[tt][i] * b_[tt][n] + v_[tt][i] * k_[tt][n];
            }
        }

        for (int tt = len - 1; tt >= 0; tt--) {
            const size_t at = at0 + (size_t)tt * C;
            const float* S = states + (size_t)tt * _N_ * _N_;  // column n of S_{t-1}
            const float rn = r_[tt][n], gyn = gy_[tt][n];
            const float dn = d_[tt][n], ew = e_[tt][n], an = a_[tt][n];
#ifdef WKV7_TEST_DROP_GB_TERM  // a deliberately wrong gradient, for the tests to catch
            const float keep = 0.f;
#else
            const float keep = 1.f;
#endif
            // Row n: G_t gets y_t's share gy_t r_t^T; then gv = G k and Gb = G b.
            float gvn = 0, gbr = 0;
#pragma unroll
            for (int j = 0; j < _N_; j++) {
                Gr[j] += gyn * r_[tt][j];
                gvn += Gr[j] * k_[tt][j];
                gbr += Gr[j] * b_[tt][j];
            }
            Gb_[tt][n] = gbr;
            __syncthreads();  // Gb_[tt] is complete
            // Column n, in one pass over column n of S_{t-1}: y_t's share, S^T gy, G^T S
            // (elementwise), G^T v, G^T sa, S^T (G b), sa . gy, v . gy; then the column's step back.
            float Sgy = 0, GS = 0, gkn = 0, gbn = 0, gan = 0, sagy = 0, vgy = 0;
#pragma unroll
            for (int i = 0; i < _N_; i++) {
                const float s = S[(size_t)i * _N_], gyi = gy_[tt][i], vi = v_[tt][i], sai = sa_[tt][i];
                const float Gbi = Gb_[tt][i];
                const float g = Gc[i] + gyi * rn;
                Sgy += s * gyi;
                GS += g * s;
                gkn += g * vi;
                gbn += g * sai;
                gan += s * Gbi;
                sagy += sai * gyi;
                vgy += vi * gyi;
                // One step back: G_{t-1} (without y_{t-1}'s share yet) = G_t diag(d_t) + (G_t b_t) a_t^T.
                Gc[i] = g * dn + keep * Gbi * an;
            }
#pragma unroll
            for (int j = 0; j < _N_; j++) Gr[j] = Gr[j] * d_[tt][j] + keep * gbr * a_[tt][j];

            gr[at] = from_f32<F>(dn * Sgy + b_[tt][n] * sagy + k_[tt][n] * vgy);
            // d(d_t)/dw_t = -d_t exp(w_t): 0 once exp(w_t) overflows (w_t > 88.7), where the
            // product would be 0 * inf = NaN.
            gw[at] = from_f32<F>(ew < INFINITY ? -dn * ew * GS : 0.f);
            gk[at] = from_f32<F>(gkn);
            gv[at] = from_f32<F>(gvn);
            ga[at] = from_f32<F>(gan);
            gb[at] = from_f32<F>(gbn);
        }
    }

#pragma unroll
    for (int j = 0; j < _N_; j++) gs0[row + j] = Gr[j];
}

// Host entry points, called by cuda/wkv7_op.cpp. Pointers are device pointers to bf16
// (when `is_bf16`) or fp32 for the [B, T, H, N] tensors, fp32 for everything else.

template <typename F>
void forward_typed(int B, int T, int H, const void* r, const void* w, const void* k,
                   const void* v, const void* a, const void* b, const float* s0, void* y,
                   float* s_end, cudaStream_t stream)
{
    WKV_LAUNCH(wkv7_forward_kernel<F>, dim3(B * H), dim3(_N_), stream)(
        T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v, (const F*)a, (const F*)b, s0,
        (F*)y, s_end, nullptr, nullptr);
}

template <typename F>
void backward_typed(int B, int T, int H, const void* r, const void* w, const void* k,
                    const void* v, const void* a, const void* b, const float* s0, const void* gy,
                    const float* gs_end, void* gr, void* gw, void* gk, void* gv, void* ga,
                    void* gb, float* gs0, float* saved, float* sa, float* scratch,
                    cudaStream_t stream)
{
    WKV_LAUNCH(wkv7_forward_kernel<F>, dim3(B * H), dim3(_N_), stream)(
        T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v, (const F*)a, (const F*)b, s0,
        nullptr, nullptr, saved, sa);
    WKV_LAUNCH(wkv7_backward_kernel<F>, dim3(B * H), dim3(_N_), stream)(
        T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v, (const F*)a, (const F*)b,
        (const F*)gy, gs_end, saved, sa, scratch, (F*)gr, (F*)gw, (F*)gk, (F*)gv, (F*)ga, (F*)gb,
        gs0);
}

}  // namespace

int wkv7_head_size() { return _N_; }

int wkv7_chunk() { return CHUNK; }

int wkv7_saved_states(int T) { return (T + CHUNK - 1) / CHUNK; }

void wkv7_forward(bool is_bf16, int B, int T, int H, const void* r, const void* w, const void* k,
                  const void* v, const void* a, const void* b, const float* s0, void* y,
                  float* s_end, cudaStream_t stream)
{
    if (B * H == 0) return;  // an empty grid is a launch error
    if (is_bf16)
        forward_typed<bf16>(B, T, H, r, w, k, v, a, b, s0, y, s_end, stream);
    else
        forward_typed<float>(B, T, H, r, w, k, v, a, b, s0, y, s_end, stream);
}

// saved: [B, H, wkv7_saved_states(T), N, N], sa: [B, T, H, N] and scratch:
// [B, H, wkv7_chunk(), N, N], all fp32 scratch.
void wkv7_backward(bool is_bf16, int B, int T, int H, const void* r, const void* w,
                   const void* k, const void* v, const void* a, const void* b, const float* s0,
                   const void* gy, const float* gs_end, void* gr, void* gw, void* gk, void* gv,
                   void* ga, void* gb, float* gs0, float* saved, float* sa, float* scratch,
                   cudaStream_t stream)
{
    if (B * H == 0) return;
    if (is_bf16)
        backward_typed<bf16>(B, T, H, r, w, k, v, a, b, s0, gy, gs_end, gr, gw, gk, gv, ga, gb,
                             gs0, saved, sa, scratch, stream);
    else
        backward_typed<float>(B, T, H, r, w, k, v, a, b, s0, gy, gs_end, gr, gw, gk, gv, ga, gb,
                              gs0, saved, sa, scratch, stream);
}
