// A small persistent thread pool for the CPU kernels.
//
// MindSpore calls an AOT kernel on one of its own kernel threads, so a kernel must parallelise itself. OpenMP is
// not used: its worker threads spin after each parallel region (libgomp's default wait policy), and on a 2-core
// machine that steals a core from the MindSpore kernel that runs next. These workers block instead.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ms_ddpm {

class ThreadPool {
 public:
  // One pool per process, created on first use and never destroyed: workers may still wait on its condition
  // variables while static destructors run at exit.
  static ThreadPool &instance() {
    static ThreadPool *pool = new ThreadPool();
    return *pool;
  }

  int num_threads() const { return num_threads_; }
  void set_num_threads(int n) { num_threads_ = std::max(1, n); }

  // fn(begin, end) over [0, n), in contiguous chunks, one per thread; the calling thread runs the first chunk.
  // A call made while another is running (MindSpore may launch independent kernels concurrently), or in a child
  // process after fork (the workers did not survive it), runs serially in the caller.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)> &fn) {
    if (n <= 0) return;
    std::unique_lock<std::mutex> dispatch(dispatch_, std::try_to_lock);
    const int64_t chunks = std::min<int64_t>(num_threads_.load(), n);
    if (!dispatch.owns_lock() || chunks <= 1 || getpid() != owner_pid_) {
      fn(0, n);
      return;
    }
    ensure_workers(static_cast<int>(chunks) - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      job_size_ = n;
      job_chunks_ = chunks;
      pending_ = chunks - 1;
      ++generation_;
    }
    work_ready_.notify_all();
    run_chunk(fn, n, chunks, 0);
    std::unique_lock<std::mutex> lock(mutex_);
    work_done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  ThreadPool() : owner_pid_(getpid()) {
    unsigned hw = std::thread::hardware_concurrency();
    num_threads_ = hw == 0 ? 1 : static_cast<int>(hw);
  }

  static void run_chunk(const std::function<void(int64_t, int64_t)> &fn, int64_t n, int64_t chunks, int64_t i) {
    const int64_t begin = n * i / chunks, end = n * (i + 1) / chunks;
    if (begin < end) fn(begin, end);
  }

  // Called under dispatch_, before the job is published: a new worker starts from the current generation and
  // so takes the job about to be published.
  void ensure_workers(int count) {
    while (workers_started_ < count) {
      const int64_t index = ++workers_started_;  // worker k runs chunk k
      const uint64_t seen = generation_;
      std::thread([this, index, seen] { worker(index, seen); }).detach();
    }
  }

  void worker(int64_t index, uint64_t seen) {
    for (;;) {
      const std::function<void(int64_t, int64_t)> *job;
      int64_t n, chunks;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        work_ready_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
        n = job_size_;
        chunks = job_chunks_;
      }
      if (index >= chunks) continue;  // this job needs fewer threads
      run_chunk(*job, n, chunks, index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) work_done_.notify_one();
    }
  }

  std::mutex dispatch_;  // one job at a time
  std::mutex mutex_;     // guards the job fields below
  std::condition_variable work_ready_, work_done_;
  const std::function<void(int64_t, int64_t)> *job_ = nullptr;
  int64_t job_size_ = 0, job_chunks_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  int64_t workers_started_ = 0;
  std::atomic<int> num_threads_{1};
  const pid_t owner_pid_;
};

}  // namespace ms_ddpm
