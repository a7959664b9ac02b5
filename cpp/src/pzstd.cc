#include "hubfast/pzstd.h"

#include <zstd.h>
#include <zstd_errors.h>

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "hubfast/error.h"
#include "hubfast/queue.h"
#include "hubfast/spares.h"

namespace hubfast {
namespace {

constexpr size_t kMaxFrameBuffer = 64u << 20;  // larger frames: sequential
// Frames in flight (compressed in, decoded out) beyond one per thread stop
// at this many bytes: 32 MiB frames on 2 threads held ~470 MiB without it.
constexpr size_t kInflightBytes = 96u << 20;

constexpr size_t kMiB = 1u << 20;
size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

bool is_skippable(const uint8_t* p, size_t n) {
  if (n < 4) return false;
  uint32_t magic = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
  return (magic & 0xFFFFFFF0u) == 0x184D2A50u;
}

// Frame buffers are reused (Spares): a fresh 32 MiB buffer per frame is a
// fresh mmap whose every page faults and is zeroed (a fifth of the time of a
// 1 GiB extraction in profiles, more than zstd itself took). Compressed and
// decoded frames have pools of their own, each as deep as can be in use at
// once: two shared ones faulted ~60k fresh pages per GiB.
struct Job {
  Bytes in, out;
  size_t cost = 0;  // in + declared content size, counted against kInflightBytes
  std::string error;
  bool limit = false;
  bool done = false;
};

class ParallelZstdDecoder : public Decoder {
 public:
  ParallelZstdDecoder(int threads, const DecodeOptions& opt)
      : opt_(opt),
        max_inflight_(size_t(threads) * 2),
        // Compressed: the jobs' inputs and pending_. Decoded: the jobs'
        // outputs and the frames the writer's queue (8 chunks) still holds.
        in_spares_(std::make_shared<Spares>(max_inflight_ + 1)),
        out_spares_(std::make_shared<Spares>(max_inflight_ + 3)) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }

  ~ParallelZstdDecoder() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    todo_cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void feed(const uint8_t* in, size_t n, const OutFn& out) override {
    if (sequential_) return sequential_->feed(in, n, out);
    pending_.insert(pending_.end(), in, in + n);
    size_t pos = 0;
    while (pos < pending_.size()) {
      size_t len = ZSTD_findFrameCompressedSize(pending_.data() + pos, pending_.size() - pos);
      if (ZSTD_isError(len)) {
        if (ZSTD_getErrorCode(len) != ZSTD_error_srcSize_wrong)
          throw Error(ZSTD_getErrorCode(len) == ZSTD_error_frameParameter_windowTooLarge ? ErrorKind::kLimit
                                                                                        : ErrorKind::kIntegrity,
                      std::string("zstd stream is corrupt: ") + ZSTD_getErrorName(len));
        break;  // the frame is not complete yet
      }
      // A frame that does not declare a bounded size could decode to
      // gigabytes from a few KiB (RLE blocks): only the streaming decoder,
      // whose memory is bounded, may take it.
      unsigned long long content = ZSTD_getFrameContentSize(pending_.data() + pos, len);
      bool skippable = is_skippable(pending_.data() + pos, len);
      if (!skippable && (content == ZSTD_CONTENTSIZE_UNKNOWN || content == ZSTD_CONTENTSIZE_ERROR ||
                         content > kMaxFrameBuffer))
        break;
      if (pos == 0 && pending_.size() - len <= len / 4) {
        // The usual case, a frame that began in pending_ and has just been
        // completed: hand the buffer itself over and keep only the (small)
        // rest, instead of copying the whole frame out.
        // Frames are alike: the next one fills it without regrowing. A spare
        // a little small is still taken (compressed sizes vary by KiBs, and
        // an exact reserve reallocated about every other frame: fresh pages).
        Bytes rest = in_spares_->take(true);
        if (rest.capacity() < len + len / 8) rest.reserve(round_up(len + len / 4, kMiB));
        rest.insert(rest.end(), pending_.begin() + long(len), pending_.end());
        pending_.resize(len);
        Bytes frame;
        frame.swap(pending_);
        pending_.swap(rest);
        submit(std::move(frame), out);
        continue;
      }
      submit(Bytes(pending_.begin() + long(pos), pending_.begin() + long(pos + len)), out);
      pos += len;
    }
    pending_.erase(pending_.begin(), pending_.begin() + long(pos));
    bool unbounded_frame = false;
    if (!pending_.empty()) {
      size_t len = ZSTD_findFrameCompressedSize(pending_.data(), pending_.size());
      unbounded_frame = !ZSTD_isError(len);  // complete, but not ours to buffer (see above)
    }
    if (pending_.size() > kMaxFrameBuffer || unbounded_frame) {
      // One huge frame: nothing to parallelise. Drain, then stream the rest.
      drain(out);
      sequential_ = make_decoder(Compression::kZstd, opt_);
      Bytes rest;
      rest.swap(pending_);
      sequential_->feed(rest.data(), rest.size(), out);
    }
    emit_ready(out, false);
  }

  void finish(const OutFn& out) override {
    if (sequential_) {
      drain(out);
      sequential_->finish(out);
      return;
    }
    drain(out);
    if (!pending_.empty()) throw Error(ErrorKind::kIntegrity, "zstd stream is truncated");
    if (units_ == 0) throw Error(ErrorKind::kIntegrity, "zstd stream is empty");
  }

  uint64_t units() const override { return units_ + (sequential_ ? sequential_->units() : 0); }
  void set_shared_out(SharedOutFn give) override { give_ = std::move(give); }
  int parallelism() const override { return units_ > 1 ? int(workers_.size()) : 1; }

 private:
  void submit(Bytes frame, const OutFn& out) {
    // Skippable frames (seek tables) decode to nothing: no job needed.
    if (is_skippable(frame.data(), frame.size())) return;
    // Content sizes are bounded by kMaxFrameBuffer (checked by the caller).
    size_t cost = frame.size() + size_t(ZSTD_getFrameContentSize(frame.data(), frame.size()));
    while (order_.size() >= max_inflight_ ||
           (order_.size() >= workers_.size() && inflight_bytes_ + cost > kInflightBytes))
      emit_ready(out, true);
    auto job = std::make_shared<Job>();
    job->in = std::move(frame);
    job->cost = cost;
    inflight_bytes_ += cost;
    {
      std::lock_guard<std::mutex> lk(mu_);
      order_.push_back(job);
      todo_.push_back(job);
    }
    todo_cv_.notify_one();
  }

  // Emits finished frames in order; with `wait`, waits for the oldest one.
  void emit_ready(const OutFn& out, bool wait) {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        if (order_.empty()) return;
        if (wait) done_cv_.wait(lk, [&] { return order_.front()->done; });
        if (!order_.front()->done) return;
        job = order_.front();
        order_.pop_front();
      }
      inflight_bytes_ -= job->cost;
      if (!job->error.empty())
        throw Error(job->limit ? ErrorKind::kLimit : ErrorKind::kIntegrity, "zstd stream is corrupt: " + job->error);
      if (give_ && !job->out.empty()) {
        // The writer gets the frame itself; the buffer comes back to the
        // spares when its last slice is written.
        std::shared_ptr<Spares> spares = out_spares_;
        give_(std::shared_ptr<const Bytes>(new Bytes(std::move(job->out)), [spares](Bytes* b) {
          spares->give(std::move(*b));
          delete b;
        }));
      } else {
        if (!job->out.empty()) out(job->out.data(), job->out.size());
        out_spares_->give(std::move(job->out));
      }
      ++units_;
      wait = false;
    }
  }

  void drain(const OutFn& out) {
    while (true) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (order_.empty()) return;
      }
      emit_ready(out, true);
    }
  }

  void work() {
    ZSTD_DCtx* dctx = ZSTD_createDCtx();
    ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, opt_.zstd_window_log_max);
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        todo_cv_.wait(lk, [&] { return stop_ || !todo_.empty(); });
        if (stop_) break;
        job = todo_.front();
        todo_.pop_front();
      }
      job->out = out_spares_->take(false);
      decode(dctx, *job);
      in_spares_->give(std::move(job->in));
      {
        std::lock_guard<std::mutex> lk(mu_);
        job->done = true;
      }
      done_cv_.notify_all();
    }
    ZSTD_freeDCtx(dctx);
  }

  // One shot into the output buffer: its content size is known and bounded
  // (see feed), so the buffer is the window, and zstd neither streams through
  // a window of its own nor copies out of it.
  static void decode(ZSTD_DCtx* dctx, Job& job) {
    unsigned long long size = ZSTD_getFrameContentSize(job.in.data(), job.in.size());
    // A reused buffer keeps its old size: resizing writes (zeroes) only what
    // lies beyond it, not the whole frame.
    if (job.out.capacity() < size) job.out = Bytes();
    job.out.resize(size_t(size));
    size_t r = ZSTD_decompressDCtx(dctx, job.out.data(), job.out.size(), job.in.data(), job.in.size());
    if (ZSTD_isError(r)) {
      job.limit = ZSTD_getErrorCode(r) == ZSTD_error_frameParameter_windowTooLarge;
      job.error = ZSTD_getErrorName(r);
    } else if (r != size) {
      job.error = "frame content is shorter than its header says";
    }
  }

  DecodeOptions opt_;
  size_t max_inflight_;
  Bytes pending_;
  size_t inflight_bytes_ = 0;  // feeding thread only
  std::unique_ptr<Decoder> sequential_;
  uint64_t units_ = 0;

  std::shared_ptr<Spares> in_spares_;
  std::shared_ptr<Spares> out_spares_;  // outlives us in the writer's queue
  SharedOutFn give_;
  std::mutex mu_;
  std::condition_variable todo_cv_, done_cv_;
  std::deque<std::shared_ptr<Job>> todo_, order_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<Decoder> make_parallel_zstd_decoder(int threads, const DecodeOptions& opt) {
  return std::make_unique<ParallelZstdDecoder>(threads, opt);
}

}  // namespace hubfast
