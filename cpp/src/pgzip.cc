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

#include "gzip_members.h"
#include "pgzip_parallel.h"

namespace hubfast {

#ifdef HUBFAST_HAVE_ISAL
namespace pgzip {

void ParallelGzip::feed(const uint8_t* in, size_t n, const OutFn& out) {
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
void ParallelGzip::feed_owned(Bytes&& in, const OutFn& out) {
  if (mode_ == Mode::kSequential || offsets_ || open_ || in.size() != C_) return feed(in.data(), in.size(), out);
  in_order_ = true;
  open_ = segment_of(open_index_, std::move(in));
  total_in_ += C_;
  publish_open();
  after_input(out);
}

void ParallelGzip::feed_at_owned(uint64_t offset, Bytes&& in, const OutFn& out) {
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

void ParallelGzip::set_input_spares(std::shared_ptr<Spares> spares) {
  if (spares) seg_pool_ = std::move(spares);
}

// Stores the bytes in their segment; a segment complete is published (see
// the top of this file). n == 0 only hands out the output ready, and waits
// for some when the oldest job can produce it without more input.
void ParallelGzip::feed_at(uint64_t offset, const uint8_t* in, size_t n, const OutFn& out) {
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
void ParallelGzip::after_input(const OutFn& out) {
  if (mode_ == Mode::kProbe && total_in_ >= threshold_) start_parallel();
  if (mode_ == Mode::kParallel) {
    drain(out, Wait::kNo);
    drain(out, Wait::kBackpressure);
  }
}

void ParallelGzip::finish(const OutFn& out) {
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

ParallelGzipStats ParallelGzip::stats() const {
  ParallelGzipStats s;
  s.parallel = parallel_started_;
  s.chunks = stats_.chunks;
  s.chunks_used = stats_.chunks_used;
  s.false_starts = stats_.false_starts;
  s.marker_symbols = stats_.marker_symbols;
  s.isal_bytes = stats_.isal_bytes;
  return s;
}

bool ParallelGzip::must_wait_locked() const {
  // Out of order: two whole segments wait for a job slot and the oldest
  // job can go on without more input (so it will free a slot). Jobs ahead
  // of it may wait for data: they will get it once the feeding resumes.
  if (offsets_) return pending_.size() >= 2 && cur_ && !stuck_locked(*cur_);
  // Two whole segments wait for a job slot and no job waits for data.
  return published_ >= next_job_ + 2 && waiting_.empty();
}

// Waits for input: for a segment still missing (one published already
// wakes it), or for a boundary whose finder does.
bool ParallelGzip::wants_data_locked(const Job& job) const {
  if (!job.blocked || eof_) return false;
  const uint64_t i = job.wait_seg;
  return i >= published_ && !ahead_segs_.count(i);
}

bool ParallelGzip::stuck_locked(const Job& job) const {
  if (wants_data_locked(job)) return true;
  if (!job.slot_wait) return false;
  auto it = slots_.find(job.slot_index);
  return it != slots_.end() && it->second.state == Slot::kBusy && it->second.finder &&
         wants_data_locked(*it->second.finder);
}

void ParallelGzip::housekeeping_locked() {
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
void ParallelGzip::advance_frontier_locked() {
  while (!ahead_jobs_.empty() && *ahead_jobs_.begin() < next_job_) ahead_jobs_.erase(ahead_jobs_.begin());
  while (!ahead_jobs_.empty() && *ahead_jobs_.begin() == next_job_) {
    ahead_jobs_.erase(ahead_jobs_.begin());
    ++next_job_;
  }
  while (!pending_.empty() && *pending_.begin() < next_job_) pending_.erase(pending_.begin());
}

std::shared_ptr<Job> ParallelGzip::add_job_locked(uint64_t index) {
  auto job = std::make_shared<Job>(index);
  jobs_[index] = job;
  queue_.push_back(job);
  return job;
}

void ParallelGzip::make_current_locked(const std::shared_ptr<Job>& job) {
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

void ParallelGzip::drain(const OutFn& out, Wait wait) {
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

void ParallelGzip::process_piece(Piece& p, const OutFn& out) {
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

void ParallelGzip::advance_chain() {
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

}  // namespace pgzip

using pgzip::ParallelGzip;

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
