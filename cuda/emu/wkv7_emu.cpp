// The real kernel source, compiled by g++ as C++ against cuda_emu.h (tests only).
#include "../wkv7_cuda.cu"
