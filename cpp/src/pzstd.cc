#include "hubfast/pzstd.h"

#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_d_stableOutBuffer: a parameter, no static-only symbol
#include <zstd.h>
#include <zstd_errors.h>

#include <algorithm>
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
constexpr size_t kCopyBuffer = 256u << 10;  // input given by pointer is copied into buffers this large
constexpr uint32_t kSkippableMask = 0xFFFFFFF0u;
constexpr uint32_t kSkippableMagic = 0x184D2A50u;

uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

[[noreturn]] void corrupt(const std::string& why) { throw Error(ErrorKind::kIntegrity, "zstd stream is corrupt: " + why); }

// A frame's compressed bytes are the input buffers themselves (shared, not
// copied into one contiguous frame: that copy was a memcpy of the whole
// archive and ~60 MiB of fresh buffers), decoded by streaming them into the
// output buffer (ZSTD_d_stableOutBuffer: no window of zstd's own).
struct Piece {
  std::shared_ptr<const Bytes> buf;
  const uint8_t* p;
  size_t n;
};

// Output buffers are reused (Spares): a fresh 32 MiB buffer per frame is a
// fresh mmap whose every page faults and is zeroed (a fifth of the time of a
// 1 GiB extraction in profiles, more than zstd itself took).
struct Job {
  std::vector<Piece> in;
  size_t content = 0;
  Bytes out;
  size_t cost = 0;  // in + content size, counted against kInflightBytes
  std::string error;
  bool limit = false;
  bool done = false;
};

class ParallelZstdDecoder : public Decoder {
 public:
  ParallelZstdDecoder(int threads, const DecodeOptions& opt)
      : opt_(opt),
        max_inflight_(size_t(threads) * 2),
        // The jobs' outputs and the frames the writer's queue (8 chunks) still holds.
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
    if (n == 0) return;
    // Appended to the last buffer while it is ours alone (no job reads it).
    if (!held_.empty() && copied_back_ && held_.back().use_count() == 1 &&
        held_.back()->capacity() - held_.back()->size() >= n) {
      auto& b = const_cast<Bytes&>(*held_.back());
      b.insert(b.end(), in, in + n);
    } else {
      auto b = std::make_shared<Bytes>();
      b->reserve(std::max(n, kCopyBuffer));
      b->insert(b->end(), in, in + n);
      held_.push_back(std::move(b));
      copied_back_ = true;
    }
    end_ += n;
    scan(out);
  }

  void feed_owned(Bytes&& in, const OutFn& out) override {
    if (sequential_ || !spares_ || in.size() < kCopyBuffer / 4) return feed(in.data(), in.size(), out);
    // The buffer goes back to the caller's pool when the last frame that
    // reads it is decoded.
    std::shared_ptr<Spares> pool = spares_;
    const size_t n = in.size();
    held_.push_back(std::shared_ptr<const Bytes>(new Bytes(std::move(in)), [pool](const Bytes* b) {
      pool->give(std::move(*const_cast<Bytes*>(b)));
      delete b;
    }));
    copied_back_ = false;
    end_ += n;
    scan(out);
  }

  void set_input_spares(std::shared_ptr<Spares> spares) override { spares_ = std::move(spares); }

  void finish(const OutFn& out) override {
    if (sequential_) {
      drain(out);
      sequential_->finish(out);
      return;
    }
    drain(out);
    if (end_ > start_) throw Error(ErrorKind::kIntegrity, "zstd stream is truncated");
    if (units_ == 0) throw Error(ErrorKind::kIntegrity, "zstd stream is empty");
  }

  uint64_t units() const override { return units_ + (sequential_ ? sequential_->units() : 0); }
  void set_shared_out(SharedOutFn give) override { give_ = std::move(give); }
  int parallelism() const override { return units_ > 1 ? int(workers_.size()) : 1; }

 private:
  // Copies up to n held bytes from stream offset `at`; returns how many.
  size_t peek(uint64_t at, uint8_t* dst, size_t n) const {
    size_t got = 0;
    uint64_t pos = held_start_;
    for (const auto& b : held_) {
      if (got == n) break;
      uint64_t b_end = pos + b->size();
      if (at + got < b_end && at + got >= pos) {
        size_t off = size_t(at + got - pos), k = std::min<size_t>(n - got, b->size() - off);
        std::copy_n(b->data() + off, k, dst + got);
        got += k;
      }
      pos = b_end;
    }
    return got;
  }

  // Finds frame ends by walking the headers of the frames and their blocks
  // (the bytes need not be contiguous), submits every complete frame, and
  // hands a frame it may not buffer, with the rest of the stream, to the
  // sequential decoder.
  void scan(const OutFn& out) {
    for (;;) {
      if (!header_) {
        uint8_t h[ZSTD_FRAMEHEADERSIZE_MAX];
        size_t got = peek(start_, h, sizeof h);
        if (got < 4) break;
        const uint32_t magic = le32(h);
        if ((magic & kSkippableMask) == kSkippableMagic) {
          if (got < 8) break;
          frame_end_ = start_ + 8 + le32(h + 4);
          skippable_ = true;
        } else if (magic != ZSTD_MAGICNUMBER) {
          corrupt("unknown frame descriptor");
        } else {
          if (got < 5) break;
          size_t hs = ZSTD_frameHeaderSize(h, got);
          if (ZSTD_isError(hs)) corrupt(ZSTD_getErrorName(hs));
          if (got < hs) break;
          ZSTD_frameHeader fh;
          size_t r = ZSTD_getFrameHeader(&fh, h, hs);
          if (ZSTD_isError(r) || r != 0) corrupt(ZSTD_isError(r) ? ZSTD_getErrorName(r) : "frame header");
          // A frame that does not declare a bounded size could decode to
          // gigabytes from a few KiB (RLE blocks): only the streaming
          // decoder, whose memory is bounded, may take it.
          if (fh.frameContentSize == ZSTD_CONTENTSIZE_UNKNOWN || fh.frameContentSize > kMaxFrameBuffer)
            return go_sequential(out);
          content_ = size_t(fh.frameContentSize);
          checksum_ = fh.checksumFlag != 0;
          block_ = start_ + hs;
          frame_end_ = 0;
          skippable_ = false;
        }
        header_ = true;
      }
      while (frame_end_ == 0) {
        uint8_t b[3];
        if (peek(block_, b, 3) < 3) break;
        const uint32_t bh = uint32_t(b[0]) | uint32_t(b[1]) << 8 | uint32_t(b[2]) << 16;
        const uint32_t type = (bh >> 1) & 3, size = bh >> 3;
        if (type == 3) corrupt("reserved block type");
        if (size > ZSTD_BLOCKSIZE_MAX) corrupt("block larger than 128 KiB");
        block_ += 3 + (type == 1 ? 1 : size);  // an RLE block holds one byte
        if (bh & 1) frame_end_ = block_ + (checksum_ ? 4 : 0);
      }
      if (frame_end_ == 0 || frame_end_ > end_) {
        // Compressed blocks may be larger than what they decode to: a frame
        // whose bytes run far past its content size goes to streaming too.
        if (end_ - start_ > kMaxFrameBuffer + content_) return go_sequential(out);
        break;
      }
      submit_frame(out);
    }
    emit_ready(out, false);
  }

  void submit_frame(const OutFn& out) {
    const uint64_t fs = start_, fe = frame_end_;
    header_ = false;
    start_ = fe;
    if (!skippable_) {  // seek tables decode to nothing: no job needed
      auto job = std::make_shared<Job>();
      uint64_t pos = held_start_;
      for (const auto& b : held_) {
        uint64_t b_end = pos + b->size();
        if (b_end > fs && pos < fe) {
          uint64_t a = std::max(pos, fs), z = std::min(b_end, fe);
          job->in.push_back(Piece{b, b->data() + (a - pos), size_t(z - a)});
        }
        pos = b_end;
        if (pos >= fe) break;
      }
      job->content = content_;
      job->cost = size_t(fe - fs) + content_;
      if (spares_ && !pool_sized_ && !job->in.empty()) {
        // The caller's pool must be as deep as the buffers jobs hold, or
        // every frame's chunks are fresh ones (faults, zeroing).
        const size_t chunk = std::max<size_t>(job->in.front().buf->capacity(), 1);
        spares_->keep_more((max_inflight_ + 1) * (std::max(fe - fs, uint64_t(kMaxFrameBuffer) / 64) / chunk + 2));
        pool_sized_ = true;
      }
      while (order_.size() >= max_inflight_ ||
             (order_.size() >= workers_.size() && inflight_bytes_ + job->cost > kInflightBytes))
        emit_ready(out, true);
      inflight_bytes_ += job->cost;
      {
        std::lock_guard<std::mutex> lk(mu_);
        order_.push_back(job);
        todo_.push_back(job);
      }
      todo_cv_.notify_one();
    }
    release_below(start_);
  }

  void release_below(uint64_t at) {
    while (!held_.empty() && held_start_ + held_.front()->size() <= at) {
      held_start_ += held_.front()->size();
      held_.pop_front();
    }
  }

  void go_sequential(const OutFn& out) {
    drain(out);
    sequential_ = make_decoder(Compression::kZstd, opt_);
    std::deque<std::shared_ptr<const Bytes>> rest;
    rest.swap(held_);
    uint64_t pos = held_start_;
    for (const auto& b : rest) {
      uint64_t from = std::max(pos, start_);
      if (from < pos + b->size()) sequential_->feed(b->data() + (from - pos), size_t(pos + b->size() - from), out);
      pos += b->size();
    }
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
        give_(std::shared_ptr<const Bytes>(new Bytes(std::move(job->out)), [spares](const Bytes* b) {
          spares->give(std::move(*const_cast<Bytes*>(b)));
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
    ZSTD_DCtx_setParameter(dctx, ZSTD_d_stableOutBuffer, 1);
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
      job->in.clear();  // the input buffers go back to their pool
      {
        std::lock_guard<std::mutex> lk(mu_);
        job->done = true;
      }
      done_cv_.notify_all();
    }
    ZSTD_freeDCtx(dctx);
  }

  // Streams the pieces into the output buffer, whose size is the frame's
  // declared content size (bounded, see scan()): the buffer is the window.
  static void decode(ZSTD_DCtx* dctx, Job& job) {
    // A reused buffer keeps its old size: resizing writes (zeroes) only what
    // lies beyond it, not the whole frame.
    if (job.out.capacity() < job.content) job.out = Bytes();
    job.out.resize(job.content);
    ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only);
    ZSTD_outBuffer ob{job.out.data(), job.out.size(), 0};
    size_t r = 1;
    for (const Piece& pc : job.in) {
      ZSTD_inBuffer ib{pc.p, pc.n, 0};
      while (ib.pos < ib.size) {
        // Done before the bytes that scan() counted in the frame are: the
        // two disagree about where it ends.
        if (r == 0) {
          job.error = "frame ends before its last block";
          return;
        }
        r = ZSTD_decompressStream(dctx, &ob, &ib);
        if (ZSTD_isError(r)) {
          job.limit = ZSTD_getErrorCode(r) == ZSTD_error_frameParameter_windowTooLarge;
          job.error = ZSTD_getErrorName(r);
          return;
        }
      }
    }
    if (r != 0) job.error = "frame ends early";
    else if (ob.pos != job.content) job.error = "frame content is shorter than its header says";
  }

  DecodeOptions opt_;
  size_t max_inflight_;
  // Input not yet submitted in a frame: buffers from stream offset held_start_ to end_.
  std::deque<std::shared_ptr<const Bytes>> held_;
  bool copied_back_ = false;
  bool pool_sized_ = false;  // held_.back() is a copy of ours (feed()), to append to
  uint64_t held_start_ = 0, end_ = 0;
  // The frame being scanned: its start, header parsed, next block header, end once known.
  uint64_t start_ = 0, block_ = 0, frame_end_ = 0;
  bool header_ = false, skippable_ = false, checksum_ = false;
  size_t content_ = 0;
  size_t inflight_bytes_ = 0;  // feeding thread only
  std::unique_ptr<Decoder> sequential_;
  uint64_t units_ = 0;

  std::shared_ptr<Spares> spares_;      // the caller's, for the input buffers it gave
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
