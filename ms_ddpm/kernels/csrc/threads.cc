// The number of threads the kernels of this library use (all of them share one pool).
#include "parallel.h"

extern "C" void MsDdpmSetNumThreads(int n) { ms_ddpm::ThreadPool::instance().set_num_threads(n); }
