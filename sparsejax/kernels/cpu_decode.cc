// The sparse decode FFN's row reader for the CPU (XLA FFI custom call "sparsejax_rows_ffn").
//
//   y[n] = sum over neurons j with any coef[:, j] != 0 of  coef[n, j] * (x[n] . up[j]) * out[j]
//
// (plain FFN: no `up`, the factor is 1). `coef` is σ(gate) with the active rule applied
// (inactive neurons exactly 0; a NaN counts as active), so the sum is the FFN's down projection
// over the active neurons only: each active neuron's row of `up` and of `out` ([F, D], a row is
// contiguous) is read once for all N tokens, the others are never touched. One pass, no copy of
// the rows (XLA's gather writes them out before its matmuls read them again), the next active
// row prefetched while the current one is used.
//
// The active rows are shared with XLA's intra-op thread pool (one core alone cannot keep enough
// reads in flight to reach the memory bandwidth): chunks of rows are handed out by an atomic
// counter to the calling thread and to pool threads as they start, each accumulating into its
// own buffer, summed at the end. The caller works through the chunks itself, so it never waits
// on a busy pool — only on a helper's chunk in progress.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// x . w with kLanes independent partial sums: the compiler keeps them in several vector
// registers, so the additions do not wait on one another.
constexpr int64_t kLanes = 32;
// Below this many active rows per thread a second thread costs more than it brings.
constexpr int64_t kMinRowsPerPart = 64;
// Active rows per unit of work handed to a thread.
constexpr int64_t kChunk = 16;

inline float Dot(const float* x, const float* w, int64_t d) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t t = 0; t < kLanes; ++t) part[t] += x[i + t] * w[i + t];
  }
  float s = 0.f;
  for (; i < d; ++i) s += x[i] * w[i];
  for (int64_t t = 0; t < kLanes; ++t) s += part[t];
  return s;
}

struct Problem {
  const float* x;
  const float* coef;
  const float* up;  // nullptr: plain FFN
  const float* out;
  const int32_t* rows;
  int64_t n_tok, d, f;
};

// y (zeroed, [N, D]) += the contribution of rows[begin:end].
void Accumulate(const Problem& p, int64_t begin, int64_t end, float* y) {
  const int64_t d = p.d, f = p.f;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t j = p.rows[r];
    if (r + 1 < end) {  // the next row is known: start reading it now
      const int64_t next = p.rows[r + 1];
      for (int64_t i = 0; i < d; i += 16) {
        __builtin_prefetch(p.out + next * d + i);
        if (p.up) __builtin_prefetch(p.up + next * d + i);
      }
    }
    const float* orow = p.out + j * d;
    for (int64_t n = 0; n < p.n_tok; ++n) {
      float h = p.coef[n * f + j];
      if (h == 0.f) continue;  // inactive for this token (active for another of the step)
      if (p.up) h *= Dot(p.x + n * d, p.up + j * d, d);
      float* yr = y + n * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) yr[i] += h * orow[i];
    }
  }
}

// Work shared with pool threads: chunks of kChunk active rows handed out by an atomic counter,
// the caller's into y, each helper's into its own buffer. Held by shared_ptr: a helper the pool
// starts only after the caller has finished sees `closed` and returns without touching the
// problem (whose buffers belong to the finished call).
struct Shared {
  Problem problem;
  int64_t count = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int> inside{0};
  std::atomic<bool> closed{false};
  std::vector<std::vector<float>> partial;  // one per helper

  // Rows [begin, end) of the next chunk into y; false when none is left.
  bool Take(float* y) {
    const int64_t begin = next.fetch_add(kChunk);
    if (begin >= count) return false;
    Accumulate(problem, begin, std::min(begin + kChunk, count), y);
    return true;
  }

  void Help(size_t helper) {
    inside.fetch_add(1);
    if (!closed.load()) {
      while (Take(partial[helper].data())) {
      }
    }
    inside.fetch_sub(1);
  }
};

ffi::Error RowsFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> up,
                       ffi::Buffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto cd = coef.dimensions();
  const auto od = out.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || od.size() != 2) {
    return ffi::Error::InvalidArgument("rows_ffn: x, coef and out must be rank 2");
  }
  const int64_t n_tok = xd[0], d = xd[1], f = cd[1];
  if (cd[0] != n_tok || od[0] != f || od[1] != d) {
    return ffi::Error::InvalidArgument("rows_ffn: shapes must be x [N, D], coef [N, F], out [F, D]");
  }
  const bool gated = up.element_count() > 0;
  if (gated && (up.dimensions().size() != 2 || up.dimensions()[0] != f ||
                up.dimensions()[1] != d)) {
    return ffi::Error::InvalidArgument("rows_ffn: up must be [F, D] (or empty: plain FFN)");
  }
  const float* cp = coef.typed_data();
  float* yp = y->typed_data();

  // The active neurons of the step (the union over its tokens), in index order.
  std::vector<int32_t> rows;
  rows.reserve(static_cast<size_t>(f));
  for (int64_t j = 0; j < f; ++j) {
    for (int64_t n = 0; n < n_tok; ++n) {
      if (cp[n * f + j] != 0.f) {  // true for NaN: a NaN is active and reaches the output
        rows.push_back(static_cast<int32_t>(j));
        break;
      }
    }
  }
  const Problem problem{x.typed_data(), cp, gated ? up.typed_data() : nullptr,
                        out.typed_data(), rows.data(), n_tok, d, f};
  std::memset(yp, 0, sizeof(float) * n_tok * d);
  const int64_t count = static_cast<int64_t>(rows.size());
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count / kMinRowsPerPart) - 1;
  if (helpers < 1) {
    Accumulate(problem, 0, count, yp);
    return ffi::Error::Success();
  }
  auto shared = std::make_shared<Shared>();
  shared->problem = problem;
  shared->count = count;
  shared->partial.assign(helpers, std::vector<float>(n_tok * d, 0.f));
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([shared, i] { shared->Help(i); });
  }
  while (shared->Take(yp)) {
  }
  shared->closed.store(true);
  while (shared->inside.load() != 0) std::this_thread::yield();  // a helper's last chunk
  for (const auto& part : shared->partial) {
    for (int64_t e = 0; e < n_tok * d; ++e) yp[e] += part[e];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxRowsFfn, RowsFfnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coef [N, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // up [F, D] or [0, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out [F, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [N, D]
