// Stride-1 "same" 2-D convolutions (1x1 and 3x3 with padding 1), optionally with a weight-standardised kernel
// (Qiao et al. 2019, Eq. 5), forward and backward, as MindSpore AOT kernels (ops.Custom).
//
// Each image is one matrix product (im2col; Chellapilla et al. 2006): y_b (Co, S) = W (Co, Ci k k) col_b
// (Ci k k, S) + bias, with S = H W and col_b the k x k neighbourhoods of x_b (x_b itself for k = 1). The gradient
// is one kernel: dx_b = W_t im2col(dy_b) (W_t: W flipped and transposed), dW = sum_b dy_b col_b^T, dbias = sum_b
// rows of dy_b. The products are oneDNN's sgemm from the libdnnl.so.2 MindSpore ships (MsDdpmLoadSgemm), called
// one image per thread.
// Images are split between the threads of the pool: no synchronisation inside the products, which matters on a
// machine whose cores other processes share.
//
// Parameter order of the AOT entry points (inputs, then outputs):
//   forward:  x (B, Ci, H, W), w (Co, Ci, k, k), bias (Co), [eps (1,)]     -> y (B, Co, H, W)
//   backward: dy (B, Co, H, W), x, w, [eps (1,)]                           -> dx, dw, dbias
// with eps for the weight-standardised variants. Entry points without bias take no bias and return no dbias.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot.h"
#include "parallel.h"

namespace {

using ms_ddpm::ThreadPool;

// dnnl_threadpool_interop_sgemm: row-major C = alpha op(A) op(B) + beta C; a null threadpool runs it sequentially
using Sgemm = int (*)(char, char, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *, int64_t,
                      float, float *, int64_t, void *);

std::atomic<Sgemm> sgemm_fn{nullptr};

Sgemm sgemm() { return sgemm_fn.load(); }

inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b,
                 int64_t ldb, float beta, float *c, int64_t ldc) {
  sgemm()(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc, nullptr);
}

struct Geometry {
  int64_t batch, in_channels, out_channels, height, width, kernel;
  int64_t spatial() const { return height * width; }
  int64_t patch() const { return in_channels * kernel * kernel; }  // rows of col, columns of W
};

bool read_geometry(int *ndims, int64_t **shapes, int x, int w, Geometry *g) {
  if (ndims[x] != 4 || ndims[w] != 4) return false;
  g->batch = shapes[x][0];
  g->in_channels = shapes[x][1];
  g->height = shapes[x][2];
  g->width = shapes[x][3];
  g->out_channels = shapes[w][0];
  g->kernel = shapes[w][2];
  return shapes[w][1] == g->in_channels && shapes[w][3] == g->kernel && (g->kernel == 1 || g->kernel == 3);
}

bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  }
  return true;
}

// col (C 9, H W): row (c, ky, kx) holds x[c, y + ky - 1, x + kx - 1], zero outside the image
void im2col3x3(const float *x, const Geometry &g, float *col) {
  const int64_t H = g.height, W = g.width;
  for (int64_t c = 0; c < g.in_channels; ++c) {
    for (int64_t ky = 0; ky < 3; ++ky) {
      for (int64_t kx = 0; kx < 3; ++kx) {
        float *row = col + ((c * 3 + ky) * 3 + kx) * H * W;
        const int64_t dx = kx - 1, lo = dx < 0 ? 1 : 0, hi = dx > 0 ? W - 1 : W;  // valid output columns
        for (int64_t y = 0; y < H; ++y) {
          const int64_t sy = y + ky - 1;
          float *out = row + y * W;
          if (sy < 0 || sy >= H) {
            std::memset(out, 0, W * sizeof(float));
            continue;
          }
          const float *in = x + (c * H + sy) * W + dx;
          if (lo) out[0] = 0.0f;
          if (hi < W) out[W - 1] = 0.0f;
          std::memcpy(out + lo, in + lo, (hi - lo) * sizeof(float));
        }
      }
    }
  }
}

// The input gradient of a 3x3 "same" convolution is the "same" convolution of dy with the kernel flipped in space
// and transposed in channels: w_t[c, o, ky, kx] = w[o, c, 2 - ky, 2 - kx] (for 1x1 kernels, the transpose alone).
// This is a forward-style product on im2col(dy), cheaper than scattering W^T dy back with col2im.
void transpose_kernel(const float *w, const Geometry &g, float *w_t) {
  const int64_t k = g.kernel, Ci = g.in_channels, Co = g.out_channels;
  for (int64_t o = 0; o < Co; ++o) {
    for (int64_t c = 0; c < Ci; ++c) {
      for (int64_t i = 0; i < k * k; ++i) w_t[(c * Co + o) * k * k + (k * k - 1 - i)] = w[(o * Ci + c) * k * k + i];
    }
  }
}

// Weight standardisation per output channel: w_hat = (w - mean) r, r = 1 / sqrt(var + eps), over Ci k k values.
void standardize(const float *w, const Geometry &g, float eps, float *w_hat, float *r_out) {
  const int64_t n = g.patch();
  for (int64_t o = 0; o < g.out_channels; ++o) {
    const float *wo = w + o * n;
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += wo[i];
    const double mean = sum / n;
    double squares = 0.0;
    for (int64_t i = 0; i < n; ++i) squares += (wo[i] - mean) * (wo[i] - mean);
    const float r = static_cast<float>(1.0 / std::sqrt(squares / n + eps));
    for (int64_t i = 0; i < n; ++i) w_hat[o * n + i] = static_cast<float>(wo[i] - mean) * r;
    if (r_out) r_out[o] = r;
  }
}

// per-thread scratch, kept between calls (the shapes repeat every step)
std::vector<float> &scratch(int64_t size) {
  static thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer;
}

template <bool kBias, bool kStandardize>
int forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int n_in = 2 + kBias + kStandardize;
  if (nparam != n_in + 1 || !all_float32(nparam, dtypes) || sgemm() == nullptr) return 1;
  Geometry g;
  if (!read_geometry(ndims, shapes, 0, 1, &g)) return 2;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *bias = kBias ? static_cast<const float *>(params[2]) : nullptr;
  float *y = static_cast<float *>(params[n_in]);
  const int64_t S = g.spatial(), K = g.patch(), Co = g.out_channels;
  std::vector<float> w_hat;
  if (kStandardize) {
    w_hat.resize(Co * K);
    standardize(w, g, *static_cast<const float *>(params[n_in - 1]), w_hat.data(), nullptr);
    w = w_hat.data();
  }
  ThreadPool::instance().parallel_for(g.batch, [&](int64_t begin, int64_t end) {
    float *col = g.kernel == 3 ? scratch(K * S).data() : nullptr;
    for (int64_t b = begin; b < end; ++b) {
      const float *xb = x + b * g.in_channels * S;
      float *yb = y + b * Co * S;
      if (kBias) {
        for (int64_t o = 0; o < Co; ++o) std::fill(yb + o * S, yb + (o + 1) * S, bias[o]);
      }
      if (g.kernel == 3) im2col3x3(xb, g, col);
      gemm('N', 'N', Co, S, K, w, K, g.kernel == 3 ? col : xb, S, kBias ? 1.0f : 0.0f, yb, S);
    }
  });
  return 0;
}

template <bool kBias, bool kStandardize>
int backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int n_in = 3 + kStandardize;
  if (nparam != n_in + 2 + kBias || !all_float32(nparam, dtypes) || sgemm() == nullptr) return 1;
  Geometry g;
  if (!read_geometry(ndims, shapes, 1, 2, &g)) return 2;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[n_in]);
  float *dw = static_cast<float *>(params[n_in + 1]);
  float *dbias = kBias ? static_cast<float *>(params[n_in + 2]) : nullptr;
  const int64_t S = g.spatial(), K = g.patch(), Co = g.out_channels, Ci = g.in_channels;
  std::vector<float> w_hat, r;
  if (kStandardize) {
    w_hat.resize(Co * K);
    r.resize(Co);
    standardize(w, g, *static_cast<const float *>(params[n_in - 1]), w_hat.data(), r.data());
  }
  const float *w_used = kStandardize ? w_hat.data() : w;
  std::vector<float> w_t(Co * K);
  transpose_kernel(w_used, g, w_t.data());
  Geometry g_t = g;  // the input gradient's convolution: Co channels in, Ci out
  std::swap(g_t.in_channels, g_t.out_channels);
  const int64_t K_t = g_t.patch();
  const int64_t chunks = std::min<int64_t>(g.batch, ThreadPool::instance().num_threads());
  // per-chunk partial sums of dW (with respect to the kernel actually used) and dbias, added in a fixed order
  std::vector<float> dw_part(chunks * Co * K, 0.0f), db_part(chunks * Co, 0.0f);
  ThreadPool::instance().parallel_for(chunks, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      float *buffer = scratch(g.kernel == 3 ? (K + K_t) * S : 0).data();
      float *col = buffer, *col_dy = buffer + K * S;
      for (int64_t b = g.batch * chunk / chunks; b < g.batch * (chunk + 1) / chunks; ++b) {
        const float *xb = x + b * Ci * S, *dyb = dy + b * Co * S;
        float *dxb = dx + b * Ci * S;
        if (g.kernel == 3) {
          im2col3x3(dyb, g_t, col_dy);
          im2col3x3(xb, g, col);
        }
        gemm('N', 'N', Ci, S, K_t, w_t.data(), K_t, g.kernel == 3 ? col_dy : dyb, S, 0.0f, dxb, S);
        gemm('N', 'T', Co, K, S, dyb, S, g.kernel == 3 ? col : xb, S, 1.0f, dw_part.data() + chunk * Co * K, K);
        if (kBias) {
          for (int64_t o = 0; o < Co; ++o) {
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < S; ++i) s += dyb[o * S + i];
            db_part[chunk * Co + o] += s;
          }
        }
      }
    }
  });
  for (int64_t i = 0; i < Co * K; ++i) {
    float s = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) s += dw_part[c * Co * K + i];
    dw[i] = s;
  }
  if (kBias) {
    for (int64_t o = 0; o < Co; ++o) {
      float s = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) s += db_part[c * Co + o];
      dbias[o] = s;
    }
  }
  if (kStandardize) {
    // through the standardisation (the gradient of GroupNorm with one group per output channel):
    // dw = r (g - mean(g) - w_hat mean(g w_hat)), g the gradient with respect to w_hat
    for (int64_t o = 0; o < Co; ++o) {
      float *go = dw + o * K;
      const float *wo = w_hat.data() + o * K;
      double mean_g = 0.0, mean_gw = 0.0;
      for (int64_t i = 0; i < K; ++i) {
        mean_g += go[i];
        mean_gw += static_cast<double>(go[i]) * wo[i];
      }
      mean_g /= K;
      mean_gw /= K;
      for (int64_t i = 0; i < K; ++i) {
        go[i] = r[o] * static_cast<float>(go[i] - mean_g - wo[i] * mean_gw);
      }
    }
  }
  return 0;
}

}  // namespace

MS_DDPM_AOT_ENTRY(Conv2dForward, (forward<true, false>))
MS_DDPM_AOT_ENTRY(Conv2dBackward, (backward<true, false>))
MS_DDPM_AOT_ENTRY(Conv2dNoBiasForward, (forward<false, false>))
MS_DDPM_AOT_ENTRY(Conv2dNoBiasBackward, (backward<false, false>))
MS_DDPM_AOT_ENTRY(Conv2dStandardizedForward, (forward<true, true>))
MS_DDPM_AOT_ENTRY(Conv2dStandardizedBackward, (backward<true, true>))

// Finds oneDNN's sgemm in the library at `path` (MindSpore's own libdnnl.so.2: the process shares one copy with
// MindSpore's CPU backend); 1 on success. The convolutions fail (return 1 to MindSpore) until this succeeded.
extern "C" int MsDdpmLoadSgemm(const char *path) {
  void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return 0;
  sgemm_fn = reinterpret_cast<Sgemm>(dlsym(handle, "dnnl_threadpool_interop_sgemm"));
  return sgemm() != nullptr;
}
