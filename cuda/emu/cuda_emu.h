// Just enough of CUDA for g++ to compile cuda/wkv6_cuda.cu as C++20 and run it on the CPU,
// so the tests exercise the real kernel source on machines without a GPU.
//
// Model: blocks run one after another; each block runs one std::thread per CUDA thread,
// __syncthreads() is a std::barrier over the block, and __shared__ variables are function
// statics, which is per-block memory because only one block is alive at a time.
// Only what wkv6_cuda.cu uses is here: no warps, atomics or dynamic shared memory.
// A misaligned 128-bit load, which faults on a GPU but not on a CPU, raises an error.
#pragma once

#include <math.h>  // expf in the global namespace, as in CUDA

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

// bf16 as cuda_bf16.h stores it, converted the way its host code does: round to nearest
// even, any NaN becomes 0x7fff.
struct __nv_bfloat16 {
    uint16_t x;
};

inline float __bfloat162float(__nv_bfloat16 h)
{
    const uint32_t bits = uint32_t(h.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline __nv_bfloat16 __float2bfloat16(float f)
{
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return {0x7fff};
    uint16_t hi = uint16_t(bits >> 16);
    const uint32_t rest = bits << 16;  // the 16 bits dropped
    if (rest > 0x80000000u || (rest == 0x80000000u && (hi & 1u))) hi++;
    return {hi};
}

// A 128-bit load from an address that is not 16-byte aligned faults on the GPU; here the
// launch that made one throws (a RuntimeError in Python) once its threads are done.
inline std::atomic<bool> emu_misaligned{false};

template <typename T>
T* emu_aligned16(T* p)
{
    if (reinterpret_cast<uintptr_t>(p) % 16 == 0) return p;
    emu_misaligned = true;
    alignas(16) static thread_local T stand_in[4] = {};  // the compiler's aligned loads would crash
    return stand_in;
}
#define WKV_ALIGNED16(p) emu_aligned16(p)

namespace emu {

template <typename... Params>
struct Launch {
    void (*kernel)(Params...);
    dim3 grid, block;

    template <typename... Args>
    void operator()(Args... args) const
    {
        gridDim = grid;
        blockDim = block;
        const unsigned n = block.x * block.y * block.z;
        for (unsigned bz = 0; bz < grid.z; bz++)
            for (unsigned by = 0; by < grid.y; by++)
                for (unsigned bx = 0; bx < grid.x; bx++) {
                    std::barrier<> barrier(n);
                    emu_block_barrier = &barrier;
                    std::vector<std::thread> threads;
                    for (unsigned tid = 0; tid < n; tid++)
                        threads.emplace_back([&, tid] {
                            blockIdx = dim3(bx, by, bz);
                            threadIdx = dim3(tid % block.x, tid / block.x % block.y, tid / (block.x * block.y));
                            kernel(args...);
                        });
                    for (auto& t : threads) t.join();
                    if (emu_misaligned.exchange(false))
                        throw std::runtime_error("cuda_emu: a misaligned 128-bit load (it faults on a GPU)");
                }
    }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block)
{
    return {kernel, grid, block};
}

}  // namespace emu

// The stream is ignored: launches run to completion before returning.
#define WKV_LAUNCH(kernel, grid, block, stream) ((void)(stream), emu::launch(kernel, grid, block))
