// The parallel gzip decoder: chunk jobs on a pool of threads, stitched in
// order on the thread that feeds it. See hubfast/pgzip.h for the technique
// and pgzip_inflate.h for our own deflate decoding.
//
// Life of the stream:
//   feed() copies the compressed bytes into segments of chunk_bytes. Below
//   two segments the decoder waits ("probe"): a stream that ends there is
//   inflated by ISA-L in one go. Past it, one job per segment is queued,
//   at most 2 * threads at a time.
//   Job k (k >= 1) finds a block start S_k in segment k (memoised: the job
//   before it needs the same boundary as its stop point), decodes from there
//   with our marker inflater until its last 32 KiB hold no marker (or the
//   real window arrives because it became the oldest job), then continues
//   with ISA-L. It stops exactly at S_j, the first boundary j > k that its
//   decoding really reaches: ISA-L is fed up to the byte of S_j followed by
//   stored blocks with sentinel contents, the last one final (try_tail); if
//   ISA-L finishes exactly there with the sentinels as its last output, S_j
//   was a real block start, otherwise ISA-L's state is restored from a
//   snapshot and decoding goes on to the next boundary. Our own inflater
//   sees block boundaries and checks them directly.
//   The feeding thread emits the oldest job's output as it is produced,
//   replacing markers with the bytes of the window before it, folds every
//   piece into the member's CRC32 (crc32_combine of per-piece CRCs), checks
//   each member's trailer, and then continues with job j. Jobs between k
//   and j (false starts) are cancelled.
//
// Out-of-order input (feed_at, parallel ranged requests): a job needs only
// its own segment and the ones after it, so segments are published one by
// one as they become complete (the contiguous prefix is still counted, the
// ones beyond it are kept by index) and a job can start on any present
// segment, lowest first, while earlier ones are still on the way; one slot
// is kept for the job right after the last one started in order, so the
// chain behind the oldest job keeps being decoded. Jobs then wait for data
// that only more input can bring, and that input may be held back by the
// caller until the oldest job moves the input floor: so every job gets a
// thread of its own, and at most `threads` of them decode at a time (run
// tokens, released while a job waits, the lowest job first; the oldest job
// never waits for one, it is the critical path). The feeding thread waits
// only for progress that needs no more input: the oldest job not waiting
// for a missing segment, itself or through the block start it needs.
// finish() refuses a stream with gaps.
#include "hubfast/pgzip.h"

#include <zlib.h>
#ifdef HUBFAST_HAVE_ISAL
#include <isa-l/crc.h>
#include <isa-l/igzip_lib.h>
#endif

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

#include "env_flag.h"
#include "hubfast/error.h"
#include "hubfast/spares.h"
#include "gzip_members.h"
#include "pgzip_inflate.h"

namespace hubfast {

#ifdef HUBFAST_HAVE_ISAL
namespace {

using namespace pgzip;

// Clean pieces at least this long go to the writer whole, not copied out
// (shorter ones, at a job's end, are not worth a queue slot).
constexpr size_t kHandOverMin = 64 << 10;

[[noreturn]] void integrity(const std::string& msg) {
  if (msg.rfind("gzip", 0) == 0) throw Error(ErrorKind::kIntegrity, msg);
  throw Error(ErrorKind::kIntegrity, "gzip stream is corrupt: " + msg);
}

// HUBFAST_PGZIP_TRACE=1: one line per job event on stderr (debugging).
bool tracing() {
  static const bool on = env_flag("HUBFAST_PGZIP_TRACE");
  return on;
}
#define PGZ_TRACE(...)                     \
  do {                                     \
    if (tracing()) std::fprintf(stderr, __VA_ARGS__); \
  } while (0)

uint32_t le32(const uint8_t* p) {
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

  void feed(const uint8_t* in, size_t n, const OutFn& out) override {
    if (mode_ == Mode::kSequential) return seq_->feed(in, n, out);
    if (offsets_) throw Error(ErrorKind::kInvalid, "gzip decoder: feed() after feed_at(): a stream is given one way only");
    in_order_ = true;
    while (n > 0) {
      if (!open_) open_ = new_segment(open_index_);
      size_t k = std::min(n, C_ - open_->data.size());
      open_->data.insert(open_->data.end(), in, in + k);
      in += k;
      n -= k;
      total_in_ += k;
      if (open_->data.size() == C_) publish_open();
      after_input(out);
    }
  }

  // A whole segment at a segment boundary becomes one without a copy.
  void feed_owned(Bytes&& in, const OutFn& out) override {
    if (mode_ == Mode::kSequential || offsets_ || open_ || in.size() != C_) return feed(in.data(), in.size(), out);
    in_order_ = true;
    open_ = segment_of(open_index_, std::move(in));
    total_in_ += C_;
    publish_open();
    after_input(out);
  }

  void feed_at_owned(uint64_t offset, Bytes&& in, const OutFn& out) override {
    const uint64_t index = offset / C_;
    if (threads_ <= 1 || in_order_ || in.size() != C_ || offset % C_ != 0 || partial_.count(index))
      return feed_at(offset, in.data(), in.size(), out);
    if (index < published_ || ahead_segs_.count(index)) given_twice(offset);
    offsets_ = true;
    end_ = std::max(end_, offset + C_);
    total_in_ += C_;
    publish_at(segment_of(index, std::move(in)));
    after_input(out);
  }

  size_t input_segment_bytes() const override { return threads_ > 1 ? C_ : 0; }

  void set_input_spares(std::shared_ptr<Spares> spares) override {
    if (spares) seg_pool_ = std::move(spares);
  }

  bool takes_offsets() const override { return threads_ > 1; }
  void set_shared_out(SharedOutFn give) override { give_ = std::move(give); }

  // Stores the bytes in their segment; a segment complete is published (see
  // the top of this file). n == 0 only hands out the output ready, and waits
  // for some when the oldest job can produce it without more input.
  void feed_at(uint64_t offset, const uint8_t* in, size_t n, const OutFn& out) override {
    if (threads_ <= 1) return Decoder::feed_at(offset, in, n, out);
    if (in_order_) throw Error(ErrorKind::kInvalid, "gzip decoder: feed_at() after feed(): a stream is given one way only");
    offsets_ = true;
    if (n == 0) {
      if (mode_ == Mode::kParallel) drain(out, Wait::kProgress);
      return;
    }
    if (offset > UINT64_MAX - n) throw Error(ErrorKind::kInvalid, "gzip decoder: offset out of range");
    end_ = std::max(end_, offset + n);
    while (n > 0) {
      const uint64_t index = offset / C_;
      const size_t within = size_t(offset - index * C_);
      const size_t k = size_t(std::min<uint64_t>(n, C_ - within));
      store_at(index, within, in, k);
      offset += k;
      in += k;
      n -= k;
      total_in_ += k;
      after_input(out);
    }
  }

  // After input: parallel once there is enough of it; then what is ready
  // goes out, waiting while too much output is held (backpressure).
  void after_input(const OutFn& out) {
    if (mode_ == Mode::kProbe && total_in_ >= threshold_) start_parallel();
    if (mode_ == Mode::kParallel) {
      drain(out, Wait::kNo);
      drain(out, Wait::kBackpressure);
    }
  }

  uint64_t input_floor() const override { return floor_.load(std::memory_order_relaxed); }

  void finish(const OutFn& out) override {
    if (mode_ == Mode::kSequential) return seq_->finish(out);
    if (offsets_) {
      complete_offsets();
    } else if (open_ && !open_->data.empty()) {
      publish_open();
    }
    const uint64_t total = offsets_ ? end_ : total_in_;
    if (mode_ == Mode::kProbe) {
      // Too small to pay: one stream.
      mode_ = Mode::kSequential;
      seq_ = make_isal_gzip_decoder();
      std::deque<SegPtr> segs;
      segs.swap(segs_);
      for (auto& s : segs) seq_->feed(s->data.data(), s->data.size(), out);
      segs.clear();
      seq_->finish(out);
      floor_ = total;
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      eof_ = true;
    }
    work_cv_.notify_all();
    drain(out, Wait::kUntilEnd);
    if (!ended_) throw Error(ErrorKind::kIntegrity, "gzip stream is truncated");
    floor_ = total;
  }

  uint64_t units() const override { return seq_ ? seq_->units() : members_; }
  int parallelism() const override { return parallel_started_ ? threads_ : 1; }

  ParallelGzipStats stats() const {
    ParallelGzipStats s;
    s.parallel = parallel_started_;
    s.chunks = stats_.chunks;
    s.chunks_used = stats_.chunks_used;
    s.false_starts = stats_.false_starts;
    s.marker_symbols = stats_.marker_symbols;
    s.isal_bytes = stats_.isal_bytes;
    return s;
  }

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

  std::shared_ptr<Segment> new_segment(uint64_t index) {
    Bytes data = seg_pool_->take(true);
    data.reserve(C_);
    return segment_of(index, std::move(data));
  }

  std::shared_ptr<Segment> segment_of(uint64_t index, Bytes&& data) {
    // A segment's buffer goes back to the pool when its last reader lets
    // go of it: the deleter runs after the final reference count
    // decrement, so every read of the buffer happens before its reuse
    // (use_count() in trim_locked() gave no such order: a TSan report).
    auto pool = seg_pool_;
    auto seg = std::shared_ptr<Segment>(new Segment, [pool](Segment* seg) {
      pool->give(std::move(seg->data));
      delete seg;
    });
    seg->index = index;
    seg->base = index * C_;
    seg->data = std::move(data);
    return seg;
  }

  void publish_open() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      segs_.push_back(std::move(open_));
      ++published_;
    }
    open_.reset();
    ++open_index_;
    work_cv_.notify_all();
  }

  // ---- out-of-order input (feeding thread) ----

  // A segment being filled: the byte ranges given so far (merged).
  struct Partial {
    std::shared_ptr<Segment> seg;
    std::map<size_t, size_t> have;  // start -> end, within the segment
    size_t count = 0;
  };

  [[noreturn]] static void given_twice(uint64_t offset) {
    throw Error(ErrorKind::kInvalid, "gzip decoder: compressed byte " + std::to_string(offset) +
                                         " given twice (feed_at takes every byte once)");
  }

  // Bytes [within, within + k) of segment `index`. Only the feeding thread
  // writes published_, ahead_segs_ and partial_: it reads them unlocked.
  void store_at(uint64_t index, size_t within, const uint8_t* in, size_t k) {
    if (index < published_ || ahead_segs_.count(index)) given_twice(index * C_ + within);
    Partial& part = partial_[index];
    if (!part.seg) part.seg = new_segment(index);
    const size_t a = within, e = within + k;
    auto next = part.have.upper_bound(a);
    auto prev = next == part.have.begin() ? part.have.end() : std::prev(next);
    if (next != part.have.end() && next->first < e) given_twice(index * C_ + next->first);
    if (prev != part.have.end() && prev->second > a) given_twice(index * C_ + a);
    // Ranges arrive in increasing order: mostly an append; a hole before
    // `within` is zero-filled until its bytes come.
    std::vector<uint8_t>& d = part.seg->data;
    if (within > d.size()) d.resize(within);
    const size_t inside = std::min(k, d.size() - within);
    std::memcpy(d.data() + within, in, inside);
    d.insert(d.end(), in + inside, in + k);
    if (prev != part.have.end() && prev->second == a) {
      prev->second = e;
      if (next != part.have.end() && next->first == e) {
        prev->second = next->second;
        part.have.erase(next);
      }
    } else if (next != part.have.end() && next->first == e) {
      const size_t ne = next->second;
      part.have.erase(next);
      part.have.emplace(a, ne);
    } else {
      part.have.emplace(a, e);
    }
    part.count += k;
    if (part.count == C_) {
      std::shared_ptr<Segment> seg = std::move(part.seg);
      partial_.erase(index);
      publish_at(std::move(seg));
    }
  }

  void publish_at(std::shared_ptr<Segment> seg) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      const uint64_t i = seg->index;
      if (i == published_) {
        segs_.push_back(std::move(seg));
        ++published_;
        while (!ahead_segs_.empty() && ahead_segs_.begin()->first == published_) {
          segs_.push_back(std::move(ahead_segs_.begin()->second));
          ahead_segs_.erase(ahead_segs_.begin());
          ++published_;
        }
      } else {
        ahead_segs_.emplace(i, std::move(seg));
      }
      if (i >= next_job_) pending_.insert(i);
    }
    work_cv_.notify_all();
  }

  // At finish(): the stream ends at the highest byte given; every byte below
  // must be there. Publishes the last, partial segment.
  void complete_offsets() {
    if (end_ == 0) return;
    const uint64_t last = (end_ - 1) / C_;
    const size_t last_len = size_t(end_ - last * C_);
    uint64_t i = published_;
    while (i <= last) {
      if (ahead_segs_.count(i)) {
        ++i;
        continue;
      }
      const size_t len = i == last ? last_len : C_;
      auto it = partial_.find(i);
      size_t at = 0, to = len;
      if (it != partial_.end()) {
        auto& have = it->second.have;
        if (!have.empty() && have.begin()->first == 0) at = have.begin()->second;
        auto nx = have.upper_bound(at);
        if (nx != have.end()) to = nx->first;
      }
      if (at >= len) {
        ++i;
        continue;
      }
      throw Error(ErrorKind::kIntegrity,
                  "gzip stream is incomplete: compressed bytes " + std::to_string(i * C_ + at) + " to " +
                      std::to_string(i * C_ + to) + " were never given (the stream ends at " +
                      std::to_string(end_) + ")");
    }
    auto it = partial_.find(last);
    if (it != partial_.end()) {
      std::shared_ptr<Segment> seg = std::move(it->second.seg);
      partial_.erase(it);
      publish_at(std::move(seg));
    }
  }

  void start_parallel();

  bool must_wait_locked() const {
    // Out of order: two whole segments wait for a job slot and the oldest
    // job can go on without more input (so it will free a slot). Jobs ahead
    // of it may wait for data: they will get it once the feeding resumes.
    if (offsets_) return pending_.size() >= 2 && cur_ && !stuck_locked(*cur_);
    // Two whole segments wait for a job slot and no job waits for data.
    return published_ >= next_job_ + 2 && waiting_.empty();
  }

  // Waits for input: for a segment still missing (one published already
  // wakes it), or for a boundary whose finder does.
  bool wants_data_locked(const Job& job) const {
    if (!job.blocked || eof_) return false;
    const uint64_t i = job.wait_seg;
    return i >= published_ && !ahead_segs_.count(i);
  }
  bool stuck_locked(const Job& job) const {
    if (wants_data_locked(job)) return true;
    if (!job.slot_wait) return false;
    auto it = slots_.find(job.slot_index);
    return it != slots_.end() && it->second.state == Slot::kBusy && it->second.finder &&
           wants_data_locked(*it->second.finder);
  }

  void housekeeping_locked() {
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      Job& j = *it->second;
      if (j.done && !j.current && (j.end == JobEnd::kVoid || j.end == JobEnd::kCancelled))
        it = jobs_.erase(it);
      else
        ++it;
    }
    bool added = false;
    if (offsets_) {
      // Present segments, lowest first; the last slot only for the next job
      // in order (next_job_).
      while (!pending_.empty()) {
        const uint64_t i = *pending_.begin();
        const bool in_order = i == next_job_;
        if (jobs_.size() + (in_order ? 0 : 1) >= max_inflight_) break;
        pending_.erase(pending_.begin());
        add_job_locked(i);
        added = true;
        if (in_order) {
          ++next_job_;
          advance_frontier_locked();
        } else {
          ahead_jobs_.insert(i);
        }
      }
    } else {
      while (jobs_.size() < max_inflight_ && next_job_ < published_) {
        add_job_locked(next_job_++);
        added = true;
      }
    }
    if (added) work_cv_.notify_all();
    // A job may decode through many segments (a stream with few block
    // starts): release what no job can read any more as it goes.
    trim_locked();
  }

  // Out-of-order input: next_job_ moved; jobs started ahead of it and
  // segments no job will start on are behind it now.
  void advance_frontier_locked() {
    while (!ahead_jobs_.empty() && *ahead_jobs_.begin() < next_job_) ahead_jobs_.erase(ahead_jobs_.begin());
    while (!ahead_jobs_.empty() && *ahead_jobs_.begin() == next_job_) {
      ahead_jobs_.erase(ahead_jobs_.begin());
      ++next_job_;
    }
    while (!pending_.empty() && *pending_.begin() < next_job_) pending_.erase(pending_.begin());
  }

  std::shared_ptr<Job> add_job_locked(uint64_t index) {
    auto job = std::make_shared<Job>(index);
    jobs_[index] = job;
    queue_.push_back(job);
    return job;
  }

  void make_current_locked(const std::shared_ptr<Job>& job) {
    auto w = std::make_shared<Window>();
    w->bytes = win_.bytes;
    w->valid = win_.valid;
    job->window = std::move(w);
    job->current = true;
    job->window_ready = true;
    cur_ = job;
    work_cv_.notify_all();
    token_cv_.notify_all();
  }

  void trim_locked() {
    uint64_t floor = next_job_;
    for (auto& kv : jobs_)
      if (!kv.second->done) floor = std::min<uint64_t>(floor, kv.second->min_seg.load());
    while (seg_first_ < floor && !segs_.empty()) {
      segs_.pop_front();  // its buffer is reused once no job holds it (see new_segment())
      ++seg_first_;
    }
    floor_.store(seg_first_ * C_, std::memory_order_relaxed);
    while (!slots_.empty() && slots_.begin()->first < floor) slots_.erase(slots_.begin());
  }

  void drain(const OutFn& out, Wait wait) {
    bool any = false;
    for (;;) {
      std::deque<Piece> got;
      bool done = false;
      {
        std::unique_lock<std::mutex> lk(mu_);
        housekeeping_locked();
        if (ended_ || !cur_) return;
        got.swap(cur_->pieces);
        cur_->buffered = 0;
        done = cur_->done;
        if (got.empty() && !done) {
          if (wait == Wait::kNo) return;
          if (wait == Wait::kBackpressure && !must_wait_locked()) return;
          if (wait == Wait::kProgress && (any || stuck_locked(*cur_))) return;
          main_cv_.wait(lk);
          continue;
        }
      }
      any = true;
      for (auto& p : got) process_piece(p, out);
      if (done) advance_chain();
    }
  }

  void process_piece(Piece& p, const OutFn& out) {
    const uint8_t* bytes;
    if (p.marked) {
      if (resolve_buf_.size() < p.len) resolve_buf_.resize(p.len);
      const Window& w = *cur_->window;
      const uint32_t lowest = kWindow - w.valid;
      uint8_t* o = resolve_buf_.data();
      const uint8_t* wb = w.bytes.data();
      for (size_t i = 0; i < p.len; ++i) {
        uint16_t s = p.syms[i];
        if (s < 256) {
          o[i] = uint8_t(s);
        } else {
          uint32_t idx = s - 256u;
          if (idx < lowest) integrity("invalid distance too far back");
          o[i] = wb[idx];
        }
      }
      bytes = o;
    } else {
      bytes = p.bytes.data();
    }
    size_t a = 0;
    for (size_t i = 0; i <= p.ends.size(); ++i) {
      size_t b = i < p.ends.size() ? p.ends[i].offset : p.len;
      if (b > a) {
        uint32_t c = p.marked ? crc32_gzip_refl(0, bytes + a, b - a) : p.crcs[i];
        member_crc_ = uint32_t(crc32_combine(member_crc_, c, z_off_t(b - a)));
        member_len_ += b - a;
      }
      if (i < p.ends.size()) {
        if (p.ends[i].crc != member_crc_ || p.ends[i].isize != uint32_t(member_len_))
          integrity(p.ends[i].crc != member_crc_ ? "gzip stream is corrupt: CRC32 mismatch"
                                                 : "gzip stream is corrupt: length (ISIZE) mismatch");
        ++members_;
        member_crc_ = 0;
        member_len_ = 0;
      }
      a = b;
    }
    // The rolling window of the last 32 KiB.
    if (p.len >= kWindow) {
      std::memcpy(win_.bytes.data(), bytes + p.len - kWindow, kWindow);
    } else if (p.len) {
      std::memmove(win_.bytes.data(), win_.bytes.data() + p.len, kWindow - p.len);
      std::memcpy(win_.bytes.data() + kWindow - p.len, bytes, p.len);
    }
    uint64_t since = p.ends.empty() ? uint64_t(win_.valid) + p.len : p.len - p.ends.back().offset;
    win_.valid = uint32_t(std::min<uint64_t>(since, kWindow));
    if (!p.marked && give_ && p.len >= kHandOverMin) {
      // Whole, instead of copied out (a copy of the archive's whole output):
      // the buffer comes back to pieces_ once the writer is done with it.
      p.bytes.resize(p.len);
      auto pieces = pieces_;
      give_(std::shared_ptr<const Bytes>(new Bytes(std::move(p.bytes)), [pieces](Bytes* b) {
        pieces->give(std::move(*b));
        delete b;
      }));
      return;
    }
    if (p.len) out(bytes, p.len);
    if (!p.marked) recycle(std::move(p.bytes));
  }

  void advance_chain() {
    std::shared_ptr<Job> job = cur_;
    PGZ_TRACE("main: job %llu done, end %d boundary %llu\n", (unsigned long long)job->index, int(job->end),
              (unsigned long long)job->end_boundary);
    switch (job->end) {
      case JobEnd::kError: integrity(job->error);
      case JobEnd::kStreamEnd: {
        std::lock_guard<std::mutex> lk(mu_);
        ended_ = true;
        for (auto& kv : jobs_) kv.second->cancelled = true;
        jobs_.clear();
        cur_.reset();
        work_cv_.notify_all();
        token_cv_.notify_all();
        return;
      }
      case JobEnd::kHit: {
        std::lock_guard<std::mutex> lk(mu_);
        uint64_t j = job->end_boundary;
        for (auto it = jobs_.begin(); it != jobs_.end();) {
          if (it->first < j) {
            it->second->cancelled = true;
            it = jobs_.erase(it);
          } else {
            ++it;
          }
        }
        std::shared_ptr<Job> next;
        auto it = jobs_.find(j);
        if (it != jobs_.end()) {
          next = it->second;
        } else {
          next = add_job_locked(j);
        }
        next_job_ = std::max(next_job_, j + 1);
        if (offsets_) advance_frontier_locked();
        ++stats_.chunks_used;
        make_current_locked(next);
        trim_locked();
        return;
      }
      default: throw Error(ErrorKind::kIntegrity, "gzip stream: internal error in the parallel decoder");
    }
  }

  // ---- worker side ----

  void worker();

  SegPtr get_segment(uint64_t i, Job& job) {
    std::unique_lock<std::mutex> lk(mu_);
    bool waited = false;
    for (;;) {
      if (job.cancelled || stop_) {
        job.blocked = false;
        throw Cancelled();
      }
      SegPtr s;
      if (i < published_) {
        if (i < seg_first_)
          throw DecodeError("internal error: segment " + std::to_string(i) + " was released (first kept " +
                            std::to_string(seg_first_) + ", job " + std::to_string(job.index) + ")");
        s = segs_[i - seg_first_];
      } else if (!ahead_segs_.empty()) {
        auto it = ahead_segs_.find(i);
        if (it != ahead_segs_.end()) s = it->second;
      }
      if (s || eof_) {
        if (waited) {
          job.blocked = false;
          acquire_token_locked(lk, job);
        }
        return s;
      }
      if (!waited) {
        waited = true;
        job.blocked = true;
        job.wait_seg = i;
        release_token_locked(job);
      }
      waiting_.push_back(i);
      main_cv_.notify_all();
      work_cv_.wait(lk);
      waiting_.erase(std::find(waiting_.begin(), waiting_.end(), i));
    }
  }

  Boundary get_boundary(uint64_t j, Job& job, SegmentSource* src) {
    std::unique_lock<std::mutex> lk(mu_);
    bool waited = false;
    for (;;) {
      if (job.cancelled || stop_) {
        job.slot_wait = false;
        throw Cancelled();
      }
      Slot& s = slots_[j];
      if (s.state == Slot::kBusy) {
        // Another job is finding it (and may itself wait for data).
        if (!waited) {
          waited = true;
          job.slot_wait = true;
          job.slot_index = j;
          release_token_locked(job);
          main_cv_.notify_all();
        }
        work_cv_.wait(lk);
        continue;
      }
      if (waited) {
        waited = false;
        job.slot_wait = false;
        acquire_token_locked(lk, job);
        continue;  // the lock was let go: look again
      }
      if (s.state == Slot::kDone) return s.b;
      s.state = Slot::kBusy;
      s.finder = &job;
      lk.unlock();
      Boundary b;
      try {
        b = find_boundary(src, j);
      } catch (...) {
        lk.lock();
        slots_[j].state = Slot::kFree;
        slots_[j].finder = nullptr;
        work_cv_.notify_all();
        throw;
      }
      lk.lock();
      Slot& s2 = slots_[j];
      s2.b = b;
      s2.state = Slot::kDone;
      s2.finder = nullptr;
      work_cv_.notify_all();
      return b;
    }
  }

  // Run tokens (out-of-order input only; tokens_on_ is fixed before the
  // workers start): a job decodes only while it holds one; it lets go of it
  // while it waits, and the lowest job waiting gets the next one. The oldest
  // job (current) takes one even when none is left: it never waits behind
  // a job ahead of it (one thread more than `threads` then decodes).
  void acquire_token_locked(std::unique_lock<std::mutex>& lk, Job& job) {
    if (!tokens_on_ || job.has_token) return;
    const std::pair<uint64_t, const Job*> key(job.index, &job);
    token_wait_.insert(key);
    token_cv_.wait(lk, [&] {
      return stop_ || job.cancelled || job.current || (tokens_ > 0 && *token_wait_.begin() == key);
    });
    token_wait_.erase(key);
    if (stop_ || job.cancelled) {
      token_cv_.notify_all();  // a new lowest waiter
      throw Cancelled();
    }
    --tokens_;
    job.has_token = true;
    if (tokens_ > 0 && !token_wait_.empty()) token_cv_.notify_all();
  }

  void release_token_locked(Job& job) {
    if (!job.has_token) return;
    job.has_token = false;
    ++tokens_;
    if (!token_wait_.empty()) token_cv_.notify_all();
  }

  std::shared_ptr<const Window> window_of(Job& job) {
    std::lock_guard<std::mutex> lk(mu_);
    return job.window;
  }

  void publish(Job& job, Piece&& p) {
    std::unique_lock<std::mutex> lk(mu_);
    if (job.cancelled || stop_) throw Cancelled();
    job.buffered += p.marked ? p.len * 2 : p.bytes.size();
    job.pieces.push_back(std::move(p));
    main_cv_.notify_all();
    auto ready = [&] { return job.current || job.buffered <= budget_ || job.cancelled || stop_; };
    if (!ready()) {
      release_token_locked(job);
      work_cv_.wait(lk, ready);
      if (job.cancelled || stop_) throw Cancelled();
      acquire_token_locked(lk, job);
    }
    if (job.cancelled || stop_) throw Cancelled();
  }

  std::vector<uint8_t> take_buffer() {
    Bytes b = pieces_->take(false);
    b.resize(piece_bytes_);  // a piece handed over was cut to its length
    return b;
  }

  void recycle(std::vector<uint8_t>&& b) {
    if (b.capacity() >= piece_bytes_) pieces_->give(std::move(b));
  }

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

// ---- one chunk job -------------------------------------------------------------

class JobRun {
 public:
  JobRun(ParallelGzip& d, Job& job)
      : d_(d), job_(job), src_(d, job), C_(d.C_), st_(std::make_unique<inflate_state>()),
        snap_(std::make_unique<inflate_state>()) {}
  // The buffer taken after the last piece goes back unused: one fresh 2 MiB
  // buffer per job otherwise (traced: ~half the pieces' page faults).
  ~JobRun() {
    if (!piece_.marked) d_.recycle(std::move(piece_.bytes));
  }

  struct Result {
    JobEnd end = JobEnd::kNone;
    uint64_t boundary = 0;
  };

  Result run() {
    Boundary start;
    if (job_.index == 0) {
      start = {Boundary::kMember, 0};
    } else {
      start = d_.get_boundary(job_.index, job_, &src_);
      if (start.kind == Boundary::kNone) return {JobEnd::kVoid, 0};
    }
    ++d_.stats_.chunks;
    next_t_ = job_.index + 1;
    PGZ_TRACE("job %llu: start kind %d at %llu (window %d)\n", (unsigned long long)job_.index, int(start.kind),
              (unsigned long long)start.pos, int(job_.window_ready.load()));
    piece_.bytes = d_.take_buffer();
    if (start.kind == Boundary::kMember) {
      BitReader br(&src_);
      br.seek(start.pos * 8);
      uint64_t ds = parse_gzip_header(br);
      isal_run(ds * 8, nullptr);
    } else if (start.kind == Boundary::kDynamic && job_.window_ready) {
      auto w = d_.window_of(job_);
      isal_run(start.pos, w->bytes.data());
    } else {
      marker_phase(start);
    }
    return result_;
  }

 private:
  struct Src : SegmentSource {
    Src(ParallelGzip& d, Job& j) : d(d), job(j) {}
    SegPtr get(uint64_t index) override { return d.get_segment(index, job); }
    uint64_t segment_bytes() const override { return d.C_; }
    ParallelGzip& d;
    Job& job;
  };

  // ---- stop points ----

  uint64_t floor_bits(uint64_t j) const { return j * C_ * 8 - 16; }

  static uint64_t last_bit(const Boundary& b) {
    switch (b.kind) {
      case Boundary::kDynamic: return b.pos;
      case Boundary::kStored: return b.pos * 8 - 3;
      default: return b.pos * 8;
    }
  }

  // Learns the next boundary once decoding has come near its segment.
  void resolve_upto(uint64_t bitpos) {
    while (!t_resolved_ && !t_none_ && bitpos >= floor_bits(next_t_)) {
      if (!d_.get_segment(next_t_, job_)) {
        t_none_ = true;
        break;
      }
      tb_ = d_.get_boundary(next_t_, job_, &src_);
      if (tb_.kind == Boundary::kNone) {
        ++next_t_;
        continue;
      }
      t_resolved_ = true;
    }
  }

  void miss() {
    PGZ_TRACE("job %llu: miss boundary %llu kind %d at %llu\n", (unsigned long long)job_.index,
              (unsigned long long)next_t_, int(tb_.kind), (unsigned long long)tb_.pos);
    t_resolved_ = false;
    ++next_t_;
    ++d_.stats_.false_starts;
  }

  // Segments below this are no longer read: nothing behind the position
  // (ISA-L may hand back up to 8 bytes), and the next boundary's segment
  // may still have to be searched (a long block can pass several).
  void set_min_seg(uint64_t byte) { job_.min_seg = std::min<uint64_t>((byte > 64 ? byte - 64 : 0) / C_, next_t_); }

  // ---- output ----

  void publish_clean() {
    if (piece_.len == 0 && piece_.ends.empty()) return;
    size_t a = 0;
    for (size_t i = 0; i <= piece_.ends.size(); ++i) {
      size_t b = i < piece_.ends.size() ? piece_.ends[i].offset : piece_.len;
      piece_.crcs.push_back(b > a ? crc32_gzip_refl(0, piece_.bytes.data() + a, b - a) : 0);
      a = b;
    }
    d_.stats_.isal_bytes += piece_.len;
    Piece p = std::move(piece_);
    piece_ = Piece();
    d_.publish(job_, std::move(p));
    piece_.bytes = d_.take_buffer();
  }

  void publish_marked(const uint16_t* s, size_t n) {
    Piece p;
    p.marked = true;
    p.syms.assign(s, s + n);
    p.len = n;
    d_.stats_.marker_symbols += n;
    d_.publish(job_, std::move(p));
  }

  void end_hit() {
    PGZ_TRACE("job %llu: hit boundary %llu kind %d at %llu\n", (unsigned long long)job_.index,
              (unsigned long long)next_t_, int(tb_.kind), (unsigned long long)tb_.pos);
    publish_clean();
    result_ = {JobEnd::kHit, next_t_};
  }

  void end_stream() {
    PGZ_TRACE("job %llu: stream end\n", (unsigned long long)job_.index);
    publish_clean();
    result_ = {JobEnd::kStreamEnd, 0};
  }

  // ---- member ends ----

  enum class After { kHit, kStreamEnd, kNewMember };

  // After a member's last block: its trailer at byte t, then a new member,
  // zero padding to the end, or the end.
  After after_member(uint64_t t, uint64_t* deflate_start) {
    BitReader br(&src_);
    br.seek(t * 8);
    uint8_t tr[8];
    br.read_bytes(tr, 8);
    piece_.ends.push_back({piece_.len, le32(tr), le32(tr + 4)});
    uint64_t m = t + 8;
    PGZ_TRACE("job %llu: member end, trailer at %llu\n", (unsigned long long)job_.index, (unsigned long long)t);
    resolve_upto(m * 8);
    if (t_resolved_ && tb_.kind == Boundary::kMember && tb_.pos == m) return After::kHit;
    skip_behind(m * 8);
    if (br.at_end()) return After::kStreamEnd;
    unsigned c = unsigned(br.peek() & 0xff);
    if (c == 0) {
      // Hand out the member's end first: zeros may go on for long (a
      // server that never stops), and the consumer decides when to stop.
      publish_clean();
      while (!br.at_end())
        if (br.bits(8) != 0) fail_garbage();
      return After::kStreamEnd;
    }
    if (c != 0x1f) fail_garbage();
    *deflate_start = parse_gzip_header(br);
    skip_behind(*deflate_start * 8);
    return After::kNewMember;
  }

  [[noreturn]] static void fail_garbage() {
    throw DecodeError("gzip stream is corrupt: garbage after the end of the compressed data");
  }

  // Boundaries that lie behind `bitpos` can no longer be reached.
  void skip_behind(uint64_t bitpos) {
    for (;;) {
      resolve_upto(bitpos);
      if (!t_resolved_ || last_bit(tb_) >= bitpos) return;
      miss();
    }
  }

  // ---- our inflater until the window is clean ----

  bool check_targets(uint64_t q, MarkerInflater& inf) {
    for (;;) {
      resolve_upto(q);
      if (!t_resolved_) return false;
      switch (tb_.kind) {
        case Boundary::kDynamic:
          if (q == tb_.pos) return true;
          if (q > tb_.pos) {
            miss();
            continue;
          }
          return false;
        case Boundary::kStored:
          if (q > tb_.pos * 8 - 3) {
            miss();
            continue;
          }
          return q >= tb_.pos * 8 - 10 && inf.peek_header3() == 0;
        default:
          if (q > tb_.pos * 8) {
            miss();
            continue;
          }
          return false;
      }
    }
  }

  void marker_phase(const Boundary& start) {
    size_t flush_syms = std::min<size_t>(64 << 10, d_.piece_bytes_ / 2);
    MarkerInflater inf(&src_, flush_syms, [this](const uint16_t* s, size_t n) { publish_marked(s, n); });
    if (start.kind == Boundary::kStored)
      inf.start_in_stored(start.pos);
    else
      inf.start_at_block(start.pos);
    bool first = true, resolved = false;
    for (;;) {
      if (!first) {
        uint64_t q = inf.pos();
        set_min_seg(q / 8);
        if (check_targets(q, inf)) {
          inf.flush();
          end_hit();
          return;
        }
        if (!resolved && job_.window_ready) {
          inf.resolve_window(d_.window_of(job_)->bytes.data());
          resolved = true;
        }
        if (inf.window_clean()) {
          inf.flush();
          std::vector<uint8_t> dict(kWindow);
          inf.window_bytes(dict.data());
          isal_run(q, dict.data());
          return;
        }
      }
      first = false;
      if (job_.cancelled) throw Cancelled();
      if (inf.decode_block()) {
        inf.flush();
        uint64_t t = (inf.pos() + 7) / 8;
        uint64_t ds = 0;
        switch (after_member(t, &ds)) {
          case After::kHit: end_hit(); return;
          case After::kStreamEnd: end_stream(); return;
          case After::kNewMember: isal_run(ds * 8, nullptr); return;
        }
      }
    }
  }

  // ---- ISA-L for the rest ----

  uint8_t byte_at(uint64_t pos) {
    SegPtr s = d_.get_segment(pos / C_, job_);
    if (!s || pos - s->base >= s->data.size()) throw DecodeError("gzip stream is truncated");
    return s->data[pos - s->base];
  }

  void isal_init(const uint8_t* dict, uint64_t bitpos) {
    isal_inflate_init(st_.get());
    st_->crc_flag = ISAL_DEFLATE;
    if (dict) isal_inflate_set_dict(st_.get(), const_cast<uint8_t*>(dict), kWindow);
    in_ = bitpos / 8;
    if (bitpos & 7) {
      unsigned sh = unsigned(bitpos & 7);
      st_->read_in = uint64_t(byte_at(in_)) >> sh;
      st_->read_in_length = int32_t(8 - sh);
      ++in_;
    }
  }

  void isal_run(uint64_t bitpos, const uint8_t* dict) {
    PGZ_TRACE("job %llu: isal from bit %llu (dict %d)\n", (unsigned long long)job_.index,
              (unsigned long long)bitpos, dict != nullptr);
    isal_init(dict, bitpos);
    for (;;) {
      resolve_upto(in_ * 8);
      uint64_t stop;
      if (t_resolved_) {
        stop = tb_.kind == Boundary::kDynamic ? tb_.pos / 8 : tb_.pos;
        if (stop < in_) {
          miss();
          continue;
        }
      } else {
        stop = t_none_ ? UINT64_MAX : (floor_bits(next_t_) + 7) / 8;
      }
      if (in_ < stop) {
        uint64_t t = 0;
        Fed f = feed_real(stop, &t);
        if (f == Fed::kEof) throw DecodeError("gzip stream is truncated: it ends inside a deflate stream");
        if (f == Fed::kMemberEnd) {
          uint64_t ds = 0;
          switch (after_member(t, &ds)) {
            case After::kHit: end_hit(); return;
            case After::kStreamEnd: end_stream(); return;
            case After::kNewMember: isal_init(nullptr, ds * 8); continue;
          }
        }
        continue;
      }
      // Standing right before the boundary.
      if (tb_.kind != Boundary::kMember && try_tail()) {
        end_hit();
        return;
      }
      miss();
    }
  }

  enum class Fed { kDone, kMemberEnd, kEof };

  Fed feed_real(uint64_t stop, uint64_t* trailer) {
    const size_t cap = piece_.bytes.size();
    while (in_ < stop) {
      SegPtr s = d_.get_segment(in_ / C_, job_);
      if (!s || in_ - s->base >= s->data.size()) return Fed::kEof;
      uint64_t off = in_ - s->base;
      size_t n = size_t(std::min<uint64_t>(s->data.size() - off, stop - in_));
      n = std::min<size_t>(n, 1u << 30);
      st_->next_in = const_cast<uint8_t*>(s->data.data() + off);
      st_->avail_in = uint32_t(n);
      for (;;) {
        if (piece_.len == cap) publish_clean();
        uint32_t room = uint32_t(cap - piece_.len);
        uint32_t avail_before = st_->avail_in;
        st_->next_out = piece_.bytes.data() + piece_.len;
        st_->avail_out = room;
        int r = isal_inflate(st_.get());
        size_t produced = room - st_->avail_out;
        piece_.len += produced;
        if (r < 0) throw DecodeError(isal_message(r));
        if (st_->block_state == ISAL_BLOCK_FINISH) {
          // The deflate data ends read_in_length bits before what ISA-L
          // took (ISA-L 2.30 keeps those bits; later versions give whole
          // bytes back through avail_in): the trailer starts at the next byte.
          int64_t used = int64_t(n) - int64_t(st_->avail_in);
          int64_t end_bit = (int64_t(in_) + used) * 8 - int64_t(st_->read_in_length);
          *trailer = uint64_t((end_bit + 7) / 8);
          in_ = *trailer;
          return Fed::kMemberEnd;
        }
        if (st_->avail_in == 0 && st_->avail_out > 0) break;
        if (produced == 0 && st_->avail_in == avail_before && st_->avail_out > 0)
          throw DecodeError("inflate made no progress");
      }
      in_ += n;
      set_min_seg(in_);
      if (job_.cancelled) throw Cancelled();
    }
    return Fed::kDone;
  }

  // Proves a boundary real by feeding, in place of what follows it, stored
  // blocks whose contents are sentinels, the last one final: ISA-L must
  // finish exactly at the end of that input with the sentinels as its last
  // output. At a dynamic block start: a final stored block holding S2. At a
  // stored block's LEN field (its header read): LEN 8 with S1 closes that
  // block, then the final block with S2. A decoder standing inside a
  // Huffman block there may read the bytes as codes that happen to end in
  // an end-of-block right before the final block (regular bytes such as
  // 00 00 ff ff do), but it does not produce S1 from them; one standing
  // inside stored data (the only way to copy them verbatim) is refused by
  // its state.
  bool try_tail() {
    static constexpr uint8_t kS1[8] = {0x96, 0x0f, 0x5a, 0xe1, 0x3c, 0x78, 0xc3, 0xa5};
    static constexpr uint8_t kS2[8] = {0x5a, 0xc3, 0x96, 0x0f, 0xe1, 0x3c, 0xa5, 0x78};
    if (st_->block_state == ISAL_BLOCK_TYPE0) return false;
    if (piece_.bytes.size() - piece_.len < (64u << 10)) publish_clean();
    std::memcpy(snap_.get(), st_.get(), sizeof(inflate_state));
    const size_t len0 = piece_.len;
    uint8_t tail[48];
    size_t n = 0;
    auto stored8 = [&](const uint8_t* sentinel) {
      tail[n++] = 8;  // LEN 8, NLEN ~8
      tail[n++] = 0;
      tail[n++] = 0xf7;
      tail[n++] = 0xff;
      std::memcpy(tail + n, sentinel, 8);
      n += 8;
    };
    size_t expect = 8;
    if (tb_.kind == Boundary::kDynamic) {
      unsigned sh = unsigned(tb_.pos & 7);
      uint8_t b0 = sh ? uint8_t(byte_at(tb_.pos / 8) & ((1u << sh) - 1)) : 0;
      tail[n++] = uint8_t(b0 | (1u << sh));  // BFINAL 1, BTYPE 00
      if (sh >= 6) tail[n++] = 0;
    } else {
      stored8(kS1);
      tail[n++] = 1;  // BFINAL 1, BTYPE 00
      expect = 16;
    }
    stored8(kS2);
    st_->next_in = tail;
    st_->avail_in = uint32_t(n);
    uint32_t room = uint32_t(piece_.bytes.size() - piece_.len);
    st_->next_out = piece_.bytes.data() + piece_.len;
    st_->avail_out = room;
    int r = isal_inflate(st_.get());
    piece_.len += room - st_->avail_out;
    const uint8_t* end = piece_.bytes.data() + piece_.len;
    bool hit = r >= 0 && st_->block_state == ISAL_BLOCK_FINISH && st_->avail_in == 0 &&
               st_->read_in_length == 0 && piece_.len >= len0 + expect &&
               std::memcmp(end - 8, kS2, 8) == 0 && (expect == 8 || std::memcmp(end - 16, kS1, 8) == 0);
    if (hit) {
      piece_.len -= expect;
    } else {
      std::memcpy(st_.get(), snap_.get(), sizeof(inflate_state));
      piece_.len = len0;
    }
    return hit;
  }

  ParallelGzip& d_;
  Job& job_;
  Src src_;
  const uint64_t C_;
  std::unique_ptr<inflate_state> st_, snap_;
  uint64_t in_ = 0;  // next compressed byte for ISA-L
  Piece piece_;
  Result result_;
  // The next stop point: boundary next_t_, once known.
  uint64_t next_t_ = 0;
  bool t_resolved_ = false;
  bool t_none_ = false;  // no segment left: decode to the end
  Boundary tb_;
};

void ParallelGzip::start_parallel() {
  mode_ = Mode::kParallel;
  parallel_started_ = true;
  // Out-of-order input: a thread for every job in flight (one may wait for
  // data while the oldest needs a thread), `threads` of them decoding.
  tokens_on_ = offsets_;
  tokens_ = long(std::min<size_t>(size_t(threads_), max_inflight_));
  const size_t workers = offsets_ ? max_inflight_ : std::min<size_t>(size_t(threads_), max_inflight_);
  for (size_t i = 0; i < workers; ++i) workers_.emplace_back([this] { worker(); });
  std::lock_guard<std::mutex> lk(mu_);
  auto job0 = add_job_locked(0);
  next_job_ = 1;
  if (offsets_) advance_frontier_locked();
  win_.valid = 0;
  make_current_locked(job0);
  housekeeping_locked();
}

void ParallelGzip::worker() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    JobRun::Result res;
    std::string error;
    if (job->cancelled) {
      res.end = JobEnd::kCancelled;
    } else {
      try {
        {
          std::unique_lock<std::mutex> lk(mu_);
          acquire_token_locked(lk, *job);
        }
        JobRun run(*this, *job);
        res = run.run();
      } catch (const Cancelled&) {
        res.end = JobEnd::kCancelled;
      } catch (const DecodeError& e) {
        res.end = JobEnd::kError;
        error = e.what();
        PGZ_TRACE("job %llu: error %s\n", (unsigned long long)job->index, e.what());
      } catch (const std::exception& e) {
        res.end = JobEnd::kError;
        error = std::string("gzip decoding failed: ") + e.what();
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      release_token_locked(*job);
      job->blocked = false;
      job->slot_wait = false;
      job->end = res.end;
      job->end_boundary = res.boundary;
      job->error = std::move(error);
      job->done = true;
    }
    main_cv_.notify_all();
  }
}

}  // namespace

std::unique_ptr<Decoder> make_parallel_gzip_decoder(int threads, size_t chunk_bytes) {
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  return std::make_unique<ParallelGzip>(threads, chunk_bytes);
}

ParallelGzipStats parallel_gzip_stats(const Decoder& d) {
  if (auto* p = dynamic_cast<const ParallelGzip*>(&d)) return p->stats();
  return {};
}

#else  // no ISA-L: zlib, one stream

std::unique_ptr<Decoder> make_parallel_gzip_decoder(int, size_t) {
  DecodeOptions opt;
  opt.use_isal = false;
  opt.threads = 1;
  return make_decoder(Compression::kGzip, opt);
}

ParallelGzipStats parallel_gzip_stats(const Decoder&) { return {}; }

#endif

}  // namespace hubfast
