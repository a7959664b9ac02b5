// The parallel gzip decoder's segment store: the compressed input in
// segments of chunk_bytes, given in order or out of order (feed_at), read
// by the jobs and released behind the oldest one.
#include "pgzip_parallel.h"

#ifdef HUBFAST_HAVE_ISAL
namespace hubfast {
namespace pgzip {

std::shared_ptr<Segment> ParallelGzip::new_segment(uint64_t index) {
  Bytes data = seg_pool_->take(true);
  data.reserve(C_);
  return segment_of(index, std::move(data));
}

std::shared_ptr<Segment> ParallelGzip::segment_of(uint64_t index, Bytes&& data) {
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

void ParallelGzip::publish_open() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    segs_.push_back(std::move(open_));
    ++published_;
  }
  open_.reset();
  ++open_index_;
  work_cv_.notify_all();
}

[[noreturn]] void ParallelGzip::given_twice(uint64_t offset) {
  throw Error(ErrorKind::kInvalid, "gzip decoder: compressed byte " + std::to_string(offset) +
                                       " given twice (feed_at takes every byte once)");
}

// Bytes [within, within + k) of segment `index`. Only the feeding thread
// writes published_, ahead_segs_ and partial_: it reads them unlocked.
void ParallelGzip::store_at(uint64_t index, size_t within, const uint8_t* in, size_t k) {
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

void ParallelGzip::publish_at(std::shared_ptr<Segment> seg) {
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
void ParallelGzip::complete_offsets() {
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

SegPtr ParallelGzip::get_segment(uint64_t i, Job& job) {
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

void ParallelGzip::trim_locked() {
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

}  // namespace pgzip
}  // namespace hubfast
#endif  // HUBFAST_HAVE_ISAL
