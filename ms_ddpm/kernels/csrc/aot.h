// What the kernels share about MindSpore's AOT signature (`ops.Custom(func_type="aot")`): each tensor of params
// comes with its rank in ndims and its shape in shapes.
#pragma once

#include <cstdint>

namespace ms_ddpm {

// The number of elements of a tensor of rank ndim and this shape.
inline int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

}  // namespace ms_ddpm

// Defines the exported AOT entry `name`, which hands params, ndims, shapes and dtypes to `impl` (parenthesised when
// it holds a comma, e.g. a template's arguments) and ignores the stream and extra arguments, unused on CPU.
#define MS_DDPM_AOT_ENTRY(name, impl)                                                                        \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,   \
                      void *) {                                                                              \
    return impl(nparam, params, ndims, shapes, dtypes);                                                     \
  }
