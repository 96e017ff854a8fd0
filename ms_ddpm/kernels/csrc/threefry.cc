// Threefry-2x32 with 20 rounds (Salmon et al. 2011; Random123's threefry2x32), the generator of the training step's
// draws (train/randomness.py). MindSpore computes it there in about 130 int64 kernels (adds, masks, shifts, ors
// and xors over every counter); here it is one pass, with the same integers.
//
// AOT signature: inputs key (2,), c0 (1,) (one value for every counter), c1 (any shape); outputs x0, x1 shaped
// like c1. All int64 holding uint32 values, as the native version keeps them.
#include <cstdint>

#include "aot.h"
#include "parallel.h"

namespace {

inline uint32_t rotate_left(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

constexpr int kRotations[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
constexpr uint32_t kParity = 0x1BD11BDA;  // Threefish's key-schedule constant

}  // namespace

extern "C" int Threefry2x32(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 5) return 1;
  const int64_t *key = static_cast<const int64_t *>(params[0]);
  const uint32_t c0 = static_cast<uint32_t>(*static_cast<const int64_t *>(params[1]));
  const int64_t *c1 = static_cast<const int64_t *>(params[2]);
  int64_t *out0 = static_cast<int64_t *>(params[3]);
  int64_t *out1 = static_cast<int64_t *>(params[4]);
  const int64_t size = ms_ddpm::numel(ndims[2], shapes[2]);
  const uint32_t ks[3] = {static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]),
                          static_cast<uint32_t>(key[0]) ^ static_cast<uint32_t>(key[1]) ^ kParity};
  ms_ddpm::ThreadPool::instance().parallel_for(size, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) {
      uint32_t x0 = c0 + ks[0];
      uint32_t x1 = static_cast<uint32_t>(c1[j]) + ks[1];
      for (int i = 0; i < 5; ++i) {
        for (int r = 0; r < 4; ++r) {
          x0 += x1;
          x1 = rotate_left(x1, kRotations[i % 2][r]) ^ x0;
        }
        const int s = i + 1;  // key injection s
        x0 += ks[s % 3];
        x1 += ks[(s + 1) % 3] + static_cast<uint32_t>(s);
      }
      out0[j] = x0;
      out1[j] = x1;
    }
  });
  return 0;
}
