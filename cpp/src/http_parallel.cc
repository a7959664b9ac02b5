#include "http_parallel.h"

#include <algorithm>
#include <cstring>

#include "hubfast/digest.h"
#include "hubfast/error.h"

namespace hubfast::http {

void Parallel::add_workers(int n) {
  if (!split()) return;
  for (int i = 0; i < n; ++i) threads_.emplace_back([this] { worker(); });
  std::lock_guard<std::mutex> lk(mu_);
  ahead_ = std::min<uint64_t>(window_, threads_.size() + 2);
  work_cv_.notify_all();
}

bool Parallel::split() {
  if (first_seg_ < nseg_) return true;
  if (!first_) return false;
  uint64_t k = segment_of(std::min(src_.emitted_, total_ - 1)) + 1;  // after the bytes given so far
  if (k >= nseg_) return false;  // in the last segment: it finishes alone
  std::lock_guard<std::mutex> lk(mu_);
  first_seg_ = next_ = k;
  head_ = k - 1;
  first_->end = segment_start(k);
  return true;
}

void Parallel::grow_if_starved() {
  if (int(threads_.size()) >= policy_.limit()) return;
  GrowthSample s = sample();
  if (policy_.due(s.t)) read_cpu(s);  // /proc/stat at most once a window
  int add = policy_.step(s, int(threads_.size()), int(settled_.load(std::memory_order_relaxed)), first_stream_);
  if (add > 0) add_workers(add);
}

void Parallel::consume(const std::function<void(const uint8_t*, size_t)>& sink) {
  for (uint64_t i = first_seg_; i < nseg_; ++i) {
    Slot& s = slots_[i % window_];
    uint64_t len = segment_len(i), done = 0;
    while (done < len) {
      uint64_t avail = 0;
      {
        std::unique_lock<std::mutex> lk(mu_);
        for (;;) {
          if (error_) std::rethrow_exception(error_);
          if (s.owner == int64_t(i) && s.filled > done) {
            avail = s.filled;
            break;
          }
          if (cancel_.cancelled()) throw Error(ErrorKind::kCancelled, "download cancelled: " + src_.url_);
          waiting_ = int64_t(i);
          // Woken for a worthwhile amount, not for every network read: on
          // many slow connections each wake costs two context switches for
          // a few KiB.
          wanted_ = std::min(len, done + kWakeBytes);
          auto w0 = Clock::now();
          data_cv_.wait_for(lk, kGrowAfter);
          own_wait_ += Clock::now() - w0;
          waiting_ = -1;
          lk.unlock();
          grow_if_starved();
          lk.lock();
        }
      }
      // Bytes below `filled` are final: the worker only writes beyond it.
      while (done < avail) {
        cancel_.throw_if_cancelled();
        size_t n = size_t(std::min<uint64_t>(avail - done, kEmitSlice));
        sink(s.buf.get() + done, n);
        done += n;
      }
    }
    std::lock_guard<std::mutex> lk(mu_);
    head_ = i + 1;
    if (s.buf) spare_.push_back(std::move(s.buf));  // buffers are reused, not one per slot
    work_cv_.notify_all();
  }
}

std::vector<uint32_t> Parallel::consume_any(const std::function<void(uint64_t, const uint8_t*, size_t)>& emit_at,
                                  std::function<uint64_t()> floor, const std::function<void()>& flush) {
  std::vector<uint32_t> crcs(nseg_, 0);
  struct Ready {
    uint64_t seg, from, to;
  };
  std::vector<Ready> ready;
  {
    std::lock_guard<std::mutex> lk(mu_);
    floor_ = std::move(floor);
    head_ = first_seg_;
    work_cv_.notify_all();
  }
  for (;;) {
    ready.clear();
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (head_ >= nseg_) break;
      for (bool idle = false;; idle = true) {
        if (error_) std::rethrow_exception(error_);
        for (uint64_t i = head_; i < next_; ++i) {
          Slot& s = slots_[i % window_];
          if (s.owner == int64_t(i) && s.filled > s.emitted) ready.push_back({i, s.emitted, s.filled});
        }
        if (!ready.empty()) break;
        if (cancel_.cancelled()) throw Error(ErrorKind::kCancelled, "download cancelled: " + src_.url_);
        if (flush && (idle || floor_waiters_ > 0)) {
          // Bytes the sink holds may be what moves the floor that the
          // workers wait on (a stalled segment's part: a deadlock, before).
          // Not before every wait: a flush cuts the sink's chunk short, and
          // the decoder copies what it could have taken whole.
          lk.unlock();
          flush();
          lk.lock();
          if (error_) std::rethrow_exception(error_);
        }
        any_waiting_ = true;
        auto w0 = Clock::now();
        data_cv_.wait_for(lk, kGrowAfter);
        own_wait_ += Clock::now() - w0;
        any_waiting_ = false;
        work_cv_.notify_all();  // the floor may have moved
        lk.unlock();
        grow_if_starved();
        lk.lock();
      }
    }
    for (const Ready& r : ready) {
      const uint8_t* buf = slots_[r.seg % window_].buf.get();  // stays while the segment is unfinished
      for (uint64_t done = r.from; done < r.to;) {
        cancel_.throw_if_cancelled();
        size_t n = size_t(std::min<uint64_t>(r.to - done, kEmitSlice));
        if (src_.meta_.hash_usable) crcs[r.seg] = crc32c_update(crcs[r.seg], buf + done, n);
        emit_at(segment_start(r.seg) + done, buf + done, n);
        done += n;
      }
      std::lock_guard<std::mutex> lk(mu_);
      Slot& s = slots_[r.seg % window_];
      s.emitted = r.to;
      if (r.to == segment_len(r.seg)) {
        if (s.buf) spare_.push_back(std::move(s.buf));
        while (head_ < nseg_ && head_ < next_ && slots_[head_ % window_].owner == int64_t(head_) &&
               slots_[head_ % window_].emitted == segment_len(head_))
          ++head_;
        work_cv_.notify_all();
      }
    }
    grow_if_starved();
  }
  std::lock_guard<std::mutex> lk(mu_);
  floor_ = nullptr;
  return crcs;
}

void Parallel::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
    halt_.store(true);
    work_cv_.notify_all();
    data_cv_.notify_all();
  }
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

bool Parallel::claimable_locked() const {
  if (!floor_) return next_ < head_ + ahead_;
  // Out of order a segment's buffer is free once emitted: only the ring's
  // slots bound how far past an unfinished segment others may run (a
  // connection done early need not wait for the oldest).
  if (next_ >= head_ + window_) return false;
  uint64_t f = floor_();
  return f == UINT64_MAX || segment_start(next_) < f + (ahead_ + 1) * seg_;
}

void Parallel::worker() {
  try {
    Conn conn = src_.make_conn();
    uint64_t received = 0;  // by this connection, up to GrowthPolicy::kSettleBytes
    for (;;) {
      uint64_t i;
      Slot* s;
      {
        std::unique_lock<std::mutex> lk(mu_);
        // Timed: the consumer's release point moves without a notify.
        while (!(stopping_ || error_ || next_ >= nseg_ || claimable_locked())) {
          ++floor_waiters_;
          data_cv_.notify_all();  // the consumer flushes what moves the floor
          work_cv_.wait_for(lk, kGrowAfter);
          --floor_waiters_;
        }
        if (stopping_ || error_ || next_ >= nseg_) return;
        i = next_++;
        s = &slots_[i % window_];
        s->owner = int64_t(i);
        s->filled = 0;
        s->emitted = 0;
        if (!s->buf && !spare_.empty()) {
          s->buf = std::move(spare_.back());
          spare_.pop_back();
        }
      }
      if (!s->buf) s->buf.reset(new uint8_t[seg_]);  // not zeroed: the transfer fills it
      RangeTask t;
      t.pos = segment_start(i);
      t.end = segment_end(i);
      const uint64_t base = t.pos;
      uint8_t* buf = s->buf.get();
      const uint64_t len = t.end - t.pos;
      t.sink = [&, base, buf, i, len](uint64_t off, const uint8_t* p, size_t n) {
        if (received < GrowthPolicy::kSettleBytes && (received += n) >= GrowthPolicy::kSettleBytes)
          settled_.fetch_add(1, std::memory_order_relaxed);
        std::memcpy(buf + (off - base), p, n);
        std::lock_guard<std::mutex> lk(mu_);
        s->filled = off - base + n;
        if ((waiting_ == int64_t(i) && s->filled >= wanted_) ||
            (any_waiting_ && (s->filled - s->emitted >= kWakeBytes || s->filled == len)))
          data_cv_.notify_all();
      };
      src_.st_segments_.fetch_add(1);
      src_.note_active(1);
      try {
        src_.fetch_range(conn, t, halted_, cancel_);
      } catch (...) {
        src_.note_active(-1);
        throw;
      }
      src_.note_active(-1);
    }
  } catch (...) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!error_ && !stopping_) {
      error_ = std::current_exception();
      failed_.store(true);
      halt_.store(true);
    }
    data_cv_.notify_all();
    work_cv_.notify_all();
  }
}

}  // namespace hubfast::http
