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
