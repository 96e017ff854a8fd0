// The training step's per-weight arithmetic over all weights in one kernel each, as PyTorch's `_foreach` ops and
// apex's multi_tensor_apply do on GPUs. The quick-start U-Net has 217 weight tensors, most of them small; on CPU
// MindSpore spends about 10 us per kernel launch, more than the arithmetic of a bias or a norm's scale, and the
// norm, the clipping product, Adam and the EMA cost about eight launches per tensor (docs/performance.md, step 9).
//
// AOT signature (MindSpore's `ops.Custom(func_type="aot")`): params holds the inputs, then the outputs; every tensor
// is float32 and contiguous (the Python side checks). The work is split over whole tensors, so each tensor's result
// does not depend on the number of threads.
#include <cmath>
#include <cstdint>
#include <vector>

#include "aot.h"
#include "parallel.h"

namespace {

// fn(i, size) for the n tensors whose ranks and shapes start at ndims[first], shapes[first], split over the threads
// by whole tensors.
template <typename Fn>
void for_each_tensor(int64_t n, int first, const int *ndims, int64_t *const *shapes, const Fn &fn) {
  ms_ddpm::ThreadPool::instance().parallel_for(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i, ms_ddpm::numel(ndims[first + i], shapes[first + i]));
  });
}

}  // namespace

// SquareSum(g_1, ..., g_n) -> (1,): sum over all tensors of sum(g^2), each tensor summed in double and the tensors'
// sums added in order (the native ops sum in float32: ReduceSum(Square(g)) per tensor, then AddN).
extern "C" int MultiTensorSquareSum(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                    void *) {
  const int n = nparam - 1;
  std::vector<double> sums(n, 0.0);
  for_each_tensor(n, 0, ndims, shapes, [&](int64_t i, int64_t size) {
    const float *g = static_cast<const float *>(params[i]);
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < size; ++j) s += static_cast<double>(g[j]) * g[j];
    sums[i] = s;
  });
  double total = 0.0;
  for (double s : sums) total += s;
  *static_cast<float *>(params[n]) = static_cast<float>(total);
  return 0;
}

// Scale(c, g_1, ..., g_n) -> (c g_1, ..., c g_n), c of shape (1,): the clipping factor (with the loss scale's
// reciprocal folded in) on every gradient.
extern "C" int MultiTensorScale(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                void *) {
  const int n = (nparam - 1) / 2;
  const float c = *static_cast<const float *>(params[0]);
  for_each_tensor(n, 1, ndims, shapes, [&](int64_t i, int64_t size) {
    const float *g = static_cast<const float *>(params[1 + i]);
    float *out = static_cast<float *>(params[1 + n + i]);
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) out[j] = g[j] * c;
  });
  return 0;
}

// LerpInPlace(c, a_1, ..., a_n, b_1, ..., b_n) -> (1,): a_i <- a_i + (b_i - a_i) c in place, the EMA step
// ema + (1 - d)(w - ema) with c = 1 - d of shape (1,). Writing the EMA's Parameters in place saves the copy back into
// each of them (an Assign per weight tensor, about a tenth of the quick start's step); the Python side marks the
// kernel as having side effects, so the graph orders it after the optimizer's update and keeps it.
extern "C" int MultiTensorLerpInPlace(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                      void *) {
  const int n = (nparam - 2) / 2;
  const float c = *static_cast<const float *>(params[0]);
  for_each_tensor(n, 1, ndims, shapes, [&](int64_t i, int64_t size) {
    float *a = static_cast<float *>(params[1 + i]);
    const float *b = static_cast<const float *>(params[1 + n + i]);
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) a[j] += (b[j] - a[j]) * c;
  });
  *static_cast<float *>(params[nparam - 1]) = 0.0f;  // the output MindSpore requires; nothing reads it
  return 0;
}

// AdamInPlace(h, w_1..w_n, m_1..m_n, v_1..v_n, g_1..g_n) -> (1,): one Adam step (Kingma & Ba 2015, Algorithm 1,
// with the bias corrections folded into the step size as in its Section 2) on every weight tensor, in place, with
// h = (lr, beta1, beta2, eps, beta1^t, beta2^t) of shape (6,). The arithmetic and its order are those of MindSpore's
// CPU Adam kernel (nnacl's AdamFp32), so the weights match `nn.Adam`'s to float32 rounding; one kernel instead of
// one per weight tensor.
extern "C" int MultiTensorAdamInPlace(int nparam, void **params, int *ndims, int64_t **shapes, const char **,
                                      void *, void *) {
  const int n = (nparam - 2) / 4;
  const float *h = static_cast<const float *>(params[0]);
  const float beta1 = h[1], beta2 = h[2], eps = h[3];
  const float lr = static_cast<float>(h[0] * std::sqrt(1.0 - h[5]) / (1 - h[4]));
  for_each_tensor(n, 1, ndims, shapes, [&](int64_t i, int64_t size) {
    float *w = static_cast<float *>(params[1 + i]);
    float *m = static_cast<float *>(params[1 + n + i]);
    float *v = static_cast<float *>(params[1 + 2 * n + i]);
    const float *g = static_cast<const float *>(params[1 + 3 * n + i]);
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) {
      m[j] += (g[j] - m[j]) * (1 - beta1);
      v[j] += (g[j] * g[j] - v[j]) * (1 - beta2);
      w[j] -= lr * m[j] / (std::sqrt(v[j]) + eps);
    }
  });
  *static_cast<float *>(params[nparam - 1]) = 0.0f;
  return 0;
}
