// Elementwise maths that the compiler can vectorise (no calls into libm inside the loops).
#pragma once

#include <cstdint>
#include <cstring>

namespace ms_ddpm {

// exp(x) for float32 (Cephes' expf): x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7 minimax polynomial,
// 2^k by writing the exponent bits. Relative error below 2e-7 over the clamped range [-87, 88].
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float k = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693359375f;  // ln2 split in two parts (Cody & Waite) so that r is exact
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return p * two_k;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

}  // namespace ms_ddpm
