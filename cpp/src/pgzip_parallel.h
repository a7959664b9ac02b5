// The parallel gzip decoder (see pgzip.cc for how it works), shared by its
// files: pgzip.cc feeds it and stitches the jobs' output in order,
// pgzip_segments.cc keeps the compressed segments the jobs read, and
// pgzip_job.cc runs one chunk job on a worker thread.
#pragma once

#ifdef HUBFAST_HAVE_ISAL
#include <zlib.h>
#include <isa-l/crc.h>
#include <isa-l/igzip_lib.h>
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>
#include "hubfast/error.h"
#include "hubfast/spares.h"
#include "pgzip_inflate.h"
#include "gzip_members.h"
#include "hubfast/pgzip.h"

namespace hubfast {
namespace pgzip {

// Clean pieces at least this long go to the writer whole, not copied out
// (shorter ones, at a job's end, are not worth a queue slot).
constexpr size_t kHandOverMin = 64 << 10;

[[noreturn]] inline void integrity(const std::string& msg) {
  if (msg.rfind("gzip", 0) == 0) throw Error(ErrorKind::kIntegrity, msg);
  throw Error(ErrorKind::kIntegrity, "gzip stream is corrupt: " + msg);
}

// Built with -DHUBFAST_PGZIP_TRACE=1: one line per job event on stderr
// (debugging the decoder; a build-time switch, not a setting).
#ifndef HUBFAST_PGZIP_TRACE
#define HUBFAST_PGZIP_TRACE 0
#endif
#define PGZ_TRACE(...)                                           \
  do {                                                           \
    if (HUBFAST_PGZIP_TRACE) std::fprintf(stderr, __VA_ARGS__); \
  } while (0)

inline uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

// ---- the parallel decoder ----------------------------------------------------

struct MemberEnd {
  size_t offset;  // in the piece's output
  uint32_t crc, isize;
};

// A run of one job's output, handed to the feeding thread.
struct Piece {
  bool marked = false;
  std::vector<uint8_t> bytes;   // clean output (capacity: the piece size)
  std::vector<uint16_t> syms;   // marked output
  size_t len = 0;
  std::vector<MemberEnd> ends;  // member trailers met inside this piece
  std::vector<uint32_t> crcs;   // clean: CRC32 of each span between ends
};

struct Window {
  std::vector<uint8_t> bytes = std::vector<uint8_t>(kWindow);
  uint32_t valid = 0;  // how many of the last bytes belong to the current member
};

enum class JobEnd { kNone, kHit, kStreamEnd, kError, kVoid, kCancelled };

struct Job {
  explicit Job(uint64_t i) : index(i), min_seg(i) {}
  const uint64_t index;
  std::atomic<bool> cancelled{false};
  std::atomic<bool> window_ready{false};
  std::atomic<uint64_t> min_seg;  // lowest segment it may still read
  // Guarded by the decoder's mutex.
  std::deque<Piece> pieces;
  size_t buffered = 0;
  bool current = false;
  bool done = false;
  bool blocked = false;    // waits for segment wait_seg
  uint64_t wait_seg = 0;
  bool slot_wait = false;  // waits for boundary slot_index, which another job is finding
  uint64_t slot_index = 0;
  bool has_token = false;  // out-of-order input: may decode now (see run tokens)
  std::shared_ptr<const Window> window;
  JobEnd end = JobEnd::kNone;
  uint64_t end_boundary = 0;
  std::string error;
};

class ParallelGzip;

struct Stats {
  std::atomic<uint64_t> chunks{0}, chunks_used{0}, false_starts{0}, marker_symbols{0}, isal_bytes{0};
};

class ParallelGzip : public Decoder {
 public:
  ParallelGzip(int threads, size_t chunk_bytes)
      : threads_(std::max(1, threads)),
        C_(std::max<size_t>(chunk_bytes, 256)),
        piece_bytes_(std::clamp<size_t>(C_ / 2, 16 << 10, 2 << 20)),
        // 2 chunks per thread, but never more than ~160 MiB of compressed
        // segments and their pieces in flight (many-core machines).
        max_inflight_(std::min<size_t>(size_t(threads_) * 2,
                                       std::max<size_t>(4, (size_t(160) << 20) / (C_ + piece_bytes_)))),
        threshold_(2 * C_) {
    // Output a job may hold before it is its turn: 4 chunks' worth, within
    // ~96 MiB over all jobs in flight, never less than two pieces.
    budget_ = std::max<size_t>(std::min<size_t>(4 * C_, (96u << 20) / max_inflight_), 2 * piece_bytes_);
    pieces_ = std::make_shared<Spares>(max_inflight_ * (budget_ / piece_bytes_ + 2));
    if (threads_ <= 1) {
      mode_ = Mode::kSequential;
      seq_ = make_isal_gzip_decoder();
    }
  }

  ~ParallelGzip() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      eof_ = true;
      for (auto& kv : jobs_) kv.second->cancelled = true;
      for (auto& j : queue_) j->cancelled = true;
    }
    work_cv_.notify_all();
    token_cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void feed(const uint8_t* in, size_t n, const OutFn& out) override;

  // A whole segment at a segment boundary becomes one without a copy.
  void feed_owned(Bytes&& in, const OutFn& out) override;

  void feed_at_owned(uint64_t offset, Bytes&& in, const OutFn& out) override;

  size_t input_segment_bytes() const override { return threads_ > 1 ? C_ : 0; }

  void set_input_spares(std::shared_ptr<Spares> spares) override;

  bool takes_offsets() const override { return threads_ > 1; }
  void set_shared_out(SharedOutFn give) override { give_ = std::move(give); }

  // Stores the bytes in their segment; a segment complete is published (see
  // the top of this file). n == 0 only hands out the output ready, and waits
  // for some when the oldest job can produce it without more input.
  void feed_at(uint64_t offset, const uint8_t* in, size_t n, const OutFn& out) override;

  // After input: parallel once there is enough of it; then what is ready
  // goes out, waiting while too much output is held (backpressure).
  void after_input(const OutFn& out);

  uint64_t input_floor() const override { return floor_.load(std::memory_order_relaxed); }

  void finish(const OutFn& out) override;

  uint64_t units() const override { return seq_ ? seq_->units() : members_; }
  int parallelism() const override { return parallel_started_ ? threads_ : 1; }

  ParallelGzipStats stats() const;

 private:
  friend class JobRun;
  enum class Mode { kProbe, kParallel, kSequential };
  // kProgress: until some output of the oldest job, unless it waits for input.
  enum class Wait { kNo, kBackpressure, kProgress, kUntilEnd };
  struct Slot {
    enum State { kFree, kBusy, kDone } state = kFree;
    Boundary b;
    const Job* finder = nullptr;  // kBusy: the job finding it (alive until it lets go of the slot)
  };

  // ---- feeding thread ----

  std::shared_ptr<Segment> new_segment(uint64_t index);

  std::shared_ptr<Segment> segment_of(uint64_t index, Bytes&& data);

  void publish_open();

  // ---- out-of-order input (feeding thread) ----

  // A segment being filled: the byte ranges given so far (merged).
  struct Partial {
    std::shared_ptr<Segment> seg;
    std::map<size_t, size_t> have;  // start -> end, within the segment
    size_t count = 0;
  };

  [[noreturn]] static void given_twice(uint64_t offset);

  // Bytes [within, within + k) of segment `index`. Only the feeding thread
  // writes published_, ahead_segs_ and partial_: it reads them unlocked.
  void store_at(uint64_t index, size_t within, const uint8_t* in, size_t k);

  void publish_at(std::shared_ptr<Segment> seg);

  // At finish(): the stream ends at the highest byte given; every byte below
  // must be there. Publishes the last, partial segment.
  void complete_offsets();

  void start_parallel();

  bool must_wait_locked() const;

  // Waits for input: for a segment still missing (one published already
  // wakes it), or for a boundary whose finder does.
  bool wants_data_locked(const Job& job) const;
  bool stuck_locked(const Job& job) const;

  void housekeeping_locked();

  // Out-of-order input: next_job_ moved; jobs started ahead of it and
  // segments no job will start on are behind it now.
  void advance_frontier_locked();

  std::shared_ptr<Job> add_job_locked(uint64_t index);

  void make_current_locked(const std::shared_ptr<Job>& job);

  void trim_locked();

  void drain(const OutFn& out, Wait wait);

  void process_piece(Piece& p, const OutFn& out);

  void advance_chain();

  // ---- worker side ----

  void worker();

  SegPtr get_segment(uint64_t i, Job& job);

  Boundary get_boundary(uint64_t j, Job& job, SegmentSource* src);

  // Run tokens (out-of-order input only; tokens_on_ is fixed before the
  // workers start): a job decodes only while it holds one; it lets go of it
  // while it waits, and the lowest job waiting gets the next one. The oldest
  // job (current) takes one even when none is left: it never waits behind
  // a job ahead of it (one thread more than `threads` then decodes).
  void acquire_token_locked(std::unique_lock<std::mutex>& lk, Job& job);

  void release_token_locked(Job& job);

  std::shared_ptr<const Window> window_of(Job& job);

  void publish(Job& job, Piece&& p);

  std::vector<uint8_t> take_buffer();

  void recycle(std::vector<uint8_t>&& b);

  const int threads_;
  const size_t C_;
  const size_t piece_bytes_;
  const size_t max_inflight_;
  const uint64_t threshold_;
  size_t budget_;

  // Feeding thread only.
  Mode mode_ = Mode::kProbe;
  bool in_order_ = false;  // fed by feed()
  bool offsets_ = false;   // fed by feed_at(); also read under mu_ (written before the workers start)
  uint64_t end_ = 0;       // feed_at: the highest byte given, plus one
  std::map<uint64_t, Partial> partial_;  // feed_at: segments being filled
  std::unique_ptr<Decoder> seq_;  // one stream: small archives, or one thread
  std::shared_ptr<Segment> open_;
  uint64_t open_index_ = 0;
  uint64_t total_in_ = 0;
  bool parallel_started_ = false;
  Window win_;
  uint32_t member_crc_ = 0;
  uint64_t member_len_ = 0;
  uint64_t members_ = 0;
  std::vector<uint8_t> resolve_buf_;

  // Shared, guarded by mu_.
  std::mutex mu_;
  std::condition_variable work_cv_, main_cv_;
  std::condition_variable token_cv_;  // jobs waiting for a run token
  std::deque<SegPtr> segs_;
  uint64_t seg_first_ = 0;
  uint64_t published_ = 0;  // segments [seg_first_, published_) are in segs_
  // Out-of-order input: segments present beyond published_; present ones
  // from next_job_ on that no job started on yet; jobs started beyond
  // next_job_ (all jobs below it have started or been passed).
  std::map<uint64_t, SegPtr> ahead_segs_;
  std::set<uint64_t> pending_;
  std::set<uint64_t> ahead_jobs_;
  bool tokens_on_ = false;
  long tokens_ = 0;  // below 0 while the oldest job decodes beyond `threads`
  std::set<std::pair<uint64_t, const Job*>> token_wait_;
  bool eof_ = false;
  bool stop_ = false;
  bool ended_ = false;
  std::vector<uint64_t> waiting_;
  std::map<uint64_t, Slot> slots_;
  std::map<uint64_t, std::shared_ptr<Job>> jobs_;
  std::deque<std::shared_ptr<Job>> queue_;
  uint64_t next_job_ = 0;
  std::shared_ptr<Job> cur_;
  // Output piece buffers; shared with the pieces handed over whole, which
  // come back from the writer's queue, maybe after we are gone.
  std::shared_ptr<Spares> pieces_;
  SharedOutFn give_;
  // Buffers of segments nobody reads any more, reused instead of faulting in
  // fresh pages; shared with the segments' deleters, which may outlive us,
  // and with the caller that fills them (set_input_spares()).
  std::shared_ptr<Spares> seg_pool_ = std::make_shared<Spares>(4);
  Stats stats_;
  std::atomic<uint64_t> floor_{0};  // input_floor(): seg_first_ * C_

  std::vector<std::thread> workers_;
};

}  // namespace pgzip
}  // namespace hubfast

#endif  // HUBFAST_HAVE_ISAL
