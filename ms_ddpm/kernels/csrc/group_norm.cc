// Group normalisation (Wu & He 2018, Eq. 1-3) fused with what follows it in the U-Net blocks: the time
// embedding's scale-shift ("FiLM", x * (1 + scale) + shift; Dhariwal & Nichol 2021, Sec. 3) and SiLU
// (x * sigmoid(x); Elfwing et al. 2018), forward and backward, as MindSpore AOT kernels (ops.Custom).
//
// Tensors are float32 and contiguous: x (B, C, S) with S the product of the spatial sizes; group g of image b is
// the contiguous block of C / G channels x S values. Per (b, g): mean, rstd = 1 / sqrt(var + eps) (biased
// variance), x_hat = (x - mean) * rstd; per channel c: n = x_hat * gamma_c + beta_c, m = n * (1 + scale_bc) +
// shift_bc (FiLM), y = m * sigmoid(m) (SiLU) or m.
//
// Parameter order of the AOT entry points (inputs, then outputs):
//   forward:  x, gamma, beta, [scale, shift,] eps (G,)            -> y, mean (B, G), rstd (B, G)
//   backward: dy, x, mean, rstd, gamma, beta, [scale, shift]      -> dx, dgamma, dbeta, [dscale, dshift]
// scale and shift hold B x C values. The forward's eps is epsilon repeated G times: its length carries the number
// of groups into the inputs' shapes, which must determine the outputs' (MindSpore's PyNative mode reuses shape
// inference for the same kernel and input shapes). The backward reads G off mean's shape.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot.h"
#include "parallel.h"
#include "vector_math.h"

namespace {

using ms_ddpm::numel;
using ms_ddpm::ThreadPool;

struct Shape {
  int64_t batch, channels, spatial, groups;
  int64_t group_channels() const { return channels / groups; }
};

// x (ndim >= 2) and mean (B, G) give B, C, S and G; false when they do not fit together.
bool read_shape(int ndim_x, const int64_t *x, const int64_t *mean, Shape *s) {
  if (ndim_x < 2) return false;
  s->batch = x[0];
  s->channels = x[1];
  s->spatial = 1;
  for (int i = 2; i < ndim_x; ++i) s->spatial *= x[i];
  s->groups = mean[1];
  return mean[0] == s->batch && s->groups > 0 && s->channels % s->groups == 0;
}

// gamma and beta hold C values, scale and shift (when present) B x C; first is the index of gamma.
bool check_affine(const Shape &s, int first, bool film, int *ndims, int64_t **shapes) {
  for (int i = first; i < first + 2; ++i) {
    if (numel(ndims[i], shapes[i]) != s.channels) return false;
  }
  for (int i = first + 2; film && i < first + 4; ++i) {
    if (numel(ndims[i], shapes[i]) != s.batch * s.channels) return false;
  }
  return true;
}

bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  }
  return true;
}

// Sum of a row in float32 blocks of 1024 (vectorised), accumulated in double across blocks: accurate to a few
// float32 roundings whatever the row length.
inline double row_sum(const float *x, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += 1024) {
    const int64_t end = std::min<int64_t>(n, start + 1024);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = start; i < end; ++i) s += x[i];
    total += s;
  }
  return total;
}

inline double row_sum_squared_deviation(const float *x, int64_t n, float mean) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += 1024) {
    const int64_t end = std::min<int64_t>(n, start + 1024);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = start; i < end; ++i) {
      const float d = x[i] - mean;
      s += d * d;
    }
    total += s;
  }
  return total;
}

template <bool kFilm, bool kSilu>
int forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int n_in = kFilm ? 6 : 4;
  if (nparam != n_in + 3 || !all_float32(nparam, dtypes)) return 1;
  Shape s;
  if (!read_shape(ndims[0], shapes[0], shapes[n_in + 1], &s) || !check_affine(s, 1, kFilm, ndims, shapes) ||
      numel(ndims[n_in - 1], shapes[n_in - 1]) != s.groups) {
    return 2;
  }
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float *scale = kFilm ? static_cast<const float *>(params[3]) : nullptr;
  const float *shift = kFilm ? static_cast<const float *>(params[4]) : nullptr;
  const float eps = *static_cast<const float *>(params[n_in - 1]);
  float *y = static_cast<float *>(params[n_in]);
  float *mean_out = static_cast<float *>(params[n_in + 1]);
  float *rstd_out = static_cast<float *>(params[n_in + 2]);
  const int64_t cg = s.group_channels(), S = s.spatial;
  const double count = static_cast<double>(cg * S);

  ThreadPool::instance().parallel_for(s.batch * s.groups, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / s.groups, c0 = (bg % s.groups) * cg;
      const float *xg = x + (b * s.channels + c0) * S;
      // two passes over the group (it stays in cache): the mean, then the variance about it
      double total = 0.0;
      for (int64_t c = 0; c < cg; ++c) total += row_sum(xg + c * S, S);
      const float mean = static_cast<float>(total / count);
      double squares = 0.0;
      for (int64_t c = 0; c < cg; ++c) squares += row_sum_squared_deviation(xg + c * S, S, mean);
      const float rstd = static_cast<float>(1.0 / std::sqrt(squares / count + eps));
      mean_out[bg] = mean;
      rstd_out[bg] = rstd;
      for (int64_t c = 0; c < cg; ++c) {
        const int64_t ch = c0 + c, bc = b * s.channels + ch;
        const float film = kFilm ? 1.0f + scale[bc] : 1.0f;
        // m = (x - mean) * a + d: GroupNorm's affine and FiLM folded into one per-channel pair
        const float a = rstd * gamma[ch] * film;
        const float d = kFilm ? beta[ch] * film + shift[bc] : beta[ch];
        const float *xc = x + bc * S;
        float *yc = y + bc * S;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) {
          const float m = (xc[i] - mean) * a + d;
          yc[i] = kSilu ? m * ms_ddpm::sigmoid(m) : m;
        }
      }
    }
  });
  return 0;
}

// Gradients, with dm = dL/dm (dy times SiLU's derivative sigmoid(m) (1 + m (1 - sigmoid(m))), or dy) and, per
// (b, c), A = sum_s dm and B = sum_s dm x_hat:
//   dshift = A, dscale = gamma B + beta A, dbeta_c = sum_b (1 + scale) A, dgamma_c = sum_b (1 + scale) B,
//   dx = rstd (k dm - sum_g(k A) / N - x_hat sum_g(k B) / N), with k = (1 + scale_bc) gamma_c, sum_g over the
//   group's channels and N = C / G * S its size: GroupNorm's input gradient written out per channel.
template <bool kFilm, bool kSilu>
int backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int n_in = kFilm ? 8 : 6;
  if (nparam != n_in + (kFilm ? 5 : 3) || !all_float32(nparam, dtypes)) return 1;
  Shape s;
  if (!read_shape(ndims[1], shapes[1], shapes[2], &s) || !check_affine(s, 4, kFilm, ndims, shapes)) return 2;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *mean = static_cast<const float *>(params[2]);
  const float *rstd = static_cast<const float *>(params[3]);
  const float *gamma = static_cast<const float *>(params[4]);
  const float *beta = static_cast<const float *>(params[5]);
  const float *scale = kFilm ? static_cast<const float *>(params[6]) : nullptr;
  const float *shift = kFilm ? static_cast<const float *>(params[7]) : nullptr;
  float *dx = static_cast<float *>(params[n_in]);
  float *dgamma = static_cast<float *>(params[n_in + 1]);
  float *dbeta = static_cast<float *>(params[n_in + 2]);
  float *dscale = kFilm ? static_cast<float *>(params[n_in + 3]) : nullptr;
  float *dshift = kFilm ? static_cast<float *>(params[n_in + 4]) : nullptr;
  const int64_t C = s.channels, cg = s.group_channels(), S = s.spatial;
  const float inv_count = static_cast<float>(1.0 / static_cast<double>(cg * S));
  // per-(b, c) contributions to dgamma and dbeta, summed over b afterwards (a fixed order: deterministic)
  std::vector<float> gamma_part(s.batch * C), beta_part(s.batch * C);

  ThreadPool::instance().parallel_for(s.batch * s.groups, [&](int64_t begin, int64_t end) {
    std::vector<float> sum_dm(cg), sum_dm_xhat(cg);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / s.groups, c0 = (bg % s.groups) * cg;
      const float mu = mean[bg], r = rstd[bg];
      // pass 1: dm (kept in dx when SiLU makes it differ from dy) and its per-channel sums
      double group_k_a = 0.0, group_k_b = 0.0;
      for (int64_t c = 0; c < cg; ++c) {
        const int64_t ch = c0 + c, bc = b * C + ch;
        const float film = kFilm ? 1.0f + scale[bc] : 1.0f;
        const float a = r * gamma[ch] * film;
        const float d = kFilm ? beta[ch] * film + shift[bc] : beta[ch];
        const float *xc = x + bc * S, *dyc = dy + bc * S;
        float *dmc = dx + bc * S;
        double total_a = 0.0, total_b = 0.0;
        for (int64_t start = 0; start < S; start += 1024) {
          const int64_t stop = std::min<int64_t>(S, start + 1024);
          float sa = 0.0f, sb = 0.0f;
#pragma omp simd reduction(+ : sa, sb)
          for (int64_t i = start; i < stop; ++i) {
            const float centred = xc[i] - mu;
            float dm = dyc[i];
            if (kSilu) {
              const float m = centred * a + d;
              const float sg = ms_ddpm::sigmoid(m);
              dm *= sg * (1.0f + m * (1.0f - sg));
              dmc[i] = dm;
            }
            sa += dm;
            sb += dm * centred;
          }
          total_a += sa;
          total_b += sb;
        }
        const float A = static_cast<float>(total_a), B = static_cast<float>(total_b) * r;
        sum_dm[c] = A;
        sum_dm_xhat[c] = B;
        if (kFilm) {
          dshift[bc] = A;
          dscale[bc] = gamma[ch] * B + beta[ch] * A;
        }
        gamma_part[bc] = film * B;
        beta_part[bc] = film * A;
        const double k = static_cast<double>(film) * gamma[ch];
        group_k_a += k * A;
        group_k_b += k * B;
      }
      const float mean_ka = static_cast<float>(group_k_a) * inv_count;
      const float mean_kb = static_cast<float>(group_k_b) * inv_count;
      // pass 2: dx = c1 dm + c0 + c2 (x - mean), per channel
      for (int64_t c = 0; c < cg; ++c) {
        const int64_t ch = c0 + c, bc = b * C + ch;
        const float film = kFilm ? 1.0f + scale[bc] : 1.0f;
        const float c1 = r * gamma[ch] * film, c0v = -r * mean_ka, c2 = -r * r * mean_kb;
        const float *xc = x + bc * S;
        const float *dmc = kSilu ? dx + bc * S : dy + bc * S;
        float *dxc = dx + bc * S;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) dxc[i] = c1 * dmc[i] + c0v + c2 * (xc[i] - mu);
      }
    }
  });
  for (int64_t ch = 0; ch < C; ++ch) {
    double g = 0.0, bsum = 0.0;
    for (int64_t b = 0; b < s.batch; ++b) {
      g += gamma_part[b * C + ch];
      bsum += beta_part[b * C + ch];
    }
    dgamma[ch] = static_cast<float>(g);
    dbeta[ch] = static_cast<float>(bsum);
  }
  return 0;
}

}  // namespace

MS_DDPM_AOT_ENTRY(GroupNormForward, (forward<false, false>))
MS_DDPM_AOT_ENTRY(GroupNormBackward, (backward<false, false>))
MS_DDPM_AOT_ENTRY(GroupNormSiluForward, (forward<false, true>))
MS_DDPM_AOT_ENTRY(GroupNormSiluBackward, (backward<false, true>))
MS_DDPM_AOT_ENTRY(GroupNormFilmForward, (forward<true, false>))
MS_DDPM_AOT_ENTRY(GroupNormFilmBackward, (backward<true, false>))
MS_DDPM_AOT_ENTRY(GroupNormFilmSiluForward, (forward<true, true>))
MS_DDPM_AOT_ENTRY(GroupNormFilmSiluBackward, (backward<true, true>))
