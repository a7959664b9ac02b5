#include "http_parallel.h"

#include <algorithm>
#include <cstdio>
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
  const bool due = policy_.due(s.t);
  if (due) read_cpu(s);  // /proc/stat at most once a window
  int add = policy_.step(s, int(threads_.size()), int(settled_.load(std::memory_order_relaxed)), first_stream_);
  if (trace_ && due)
    std::fprintf(stderr, "growth t=%.4f bytes=%llu waited=%.4f cpu=%.4f busy=%.3f all=%.3f stolen=%.3f workers=%d add=%d\n",
                 s.t, (unsigned long long)s.bytes, s.waited, s.cpu, s.busy, s.all, s.stolen, int(threads_.size()), add);
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
          if (s.owner == int64_t(i) && s.contiguous() > done) {
            avail = s.contiguous();
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
    uint64_t seg;
    int part;
    uint64_t from, to;
    uint32_t crc;
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
          if (s.owner != int64_t(i)) continue;
          for (int k = 0; k < s.nparts; ++k) {
            const Part& q = s.parts[k];
            if (q.at > q.emitted) ready.push_back({i, k, q.emitted, q.at, q.crc});
          }
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
    for (Ready& r : ready) {
      // Stays while the segment is unfinished; bytes below `at` are final.
      const uint8_t* buf = slots_[r.seg % window_].buf.get();
      for (uint64_t done = r.from; done < r.to;) {
        cancel_.throw_if_cancelled();
        size_t n = size_t(std::min<uint64_t>(r.to - done, kEmitSlice));
        if (src_.meta_.hash_usable) r.crc = crc32c_update(r.crc, buf + done, n);
        emit_at(segment_start(r.seg) + done, buf + done, n);
        done += n;
      }
      std::lock_guard<std::mutex> lk(mu_);
      Slot& s = slots_[r.seg % window_];
      s.parts[r.part].emitted = r.to;
      s.parts[r.part].crc = r.crc;
      if (s.complete()) {
        // The parts' CRCs in the segment's order.
        uint32_t crc = 0;
        for (int k = s.part_at(0); k >= 0; k = s.part_at(s.parts[k].to))
          crc = s.parts[k].from == 0 ? s.parts[k].crc
                                     : crc32c_combine(crc, s.parts[k].crc, s.parts[k].to - s.parts[k].from);
        crcs[r.seg] = crc;
        if (s.buf) spare_.push_back(std::move(s.buf));
        while (head_ < nseg_ && head_ < next_ && slots_[head_ % window_].owner == int64_t(head_) &&
               slots_[head_ % window_].complete())
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

int Parallel::Slot::part_at(uint64_t from) const {
  for (int k = 0; k < nparts; ++k)
    if (parts[k].from == from) return k;
  return -1;
}

uint64_t Parallel::Slot::contiguous() const {
  uint64_t at = 0;
  for (int k = part_at(0); k >= 0; k = part_at(at)) {
    if (parts[k].at < parts[k].to) return parts[k].at;
    at = parts[k].to;
  }
  return at;
}

bool Parallel::Slot::complete() const {
  for (int k = 0; k < nparts; ++k)
    if (parts[k].emitted < parts[k].to) return false;
  return nparts > 0;
}

Parallel::Steal Parallel::steal_locked(uint64_t& seg, int& part) {
  const auto now = Clock::now();
  Slot* best = nullptr;
  int best_k = -1;
  uint64_t best_left = 0;
  bool later = false;
  // Before the last segment is claimed, a connection has nothing to do
  // because the ring is full: then only the oldest segment, and only while
  // the consumer waits for it (a busy consumer gains nothing from it).
  const bool tail = next_ >= nseg_;
  if (!tail && waiting_ < 0 && !any_waiting_) return Steal::kNone;
  const uint64_t from = tail ? head_ : waiting_ >= 0 ? uint64_t(waiting_) : head_;
  for (uint64_t i = from; i < std::min(tail ? next_ : from + 1, nseg_); ++i) {
    Slot& s = slots_[i % window_];
    if (s.owner != int64_t(i) || s.nparts >= kMaxParts) continue;
    for (int k = 0; k < s.nparts; ++k) {
      const Part& q = s.parts[k];
      uint64_t left = q.to - std::min(q.to, q.reserved);
      if (left < kStealBytes || left <= best_left) continue;
      // At its rate so far (measured over kStealAfter at least), would its
      // connection take a while longer for the rest than a new request
      // takes to start? With no byte yet, has it waited much longer than
      // requests do?
      const uint64_t got = q.at - q.from;
      if (got == 0 ? now - q.t0 < 2 * ttfb_ + kStealAfter
                   : now - q.t1 < kStealAfter ||
                         (now - q.t1) * (double(left) / double(got)) < ttfb_ + kStealAfter) {
        later = true;
        continue;
      }
      best = &s;
      best_k = k;
      best_left = left;
    }
  }
  if (!best) return later ? Steal::kLater : Steal::kNone;
  Part& victim = best->parts[best_k];
  uint64_t mid = victim.reserved + best_left / 2;
  Part& p = best->parts[best->nparts];
  p = Part();
  p.from = p.at = p.reserved = p.emitted = mid;
  p.to = victim.to;
  p.t0 = now;
  victim.to = mid;  // its connection stops here (its sink trims to it)
  seg = uint64_t(best->owner);
  part = best->nparts++;
  src_.st_steals_.fetch_add(1, std::memory_order_relaxed);
  return Steal::kStolen;
}

void Parallel::fetch_part(Conn& conn, uint64_t i, int k, uint64_t& received) {
  Slot* s = &slots_[i % window_];
  const uint64_t base = segment_start(i);
  RangeTask t;
  uint8_t* buf;
  {
    std::lock_guard<std::mutex> lk(mu_);
    t.pos = base + s->parts[k].from;
    t.end = base + s->parts[k].to;
    buf = s->buf.get();
  }
  t.sink = [&, base, buf, i, k, s](uint64_t off, const uint8_t* p, size_t n) {
    if (received < GrowthPolicy::kSettleBytes && (received += n) >= GrowthPolicy::kSettleBytes)
      settled_.fetch_add(1, std::memory_order_relaxed);
    const uint64_t rel = off - base;
    uint64_t take = 0;
    {
      // What may be copied: a steal may have moved this part's end, never
      // below what was reserved; on_body stops the response at t.end. Once
      // the segment is complete the slot may hold another one.
      std::lock_guard<std::mutex> lk(mu_);
      if (s->owner == int64_t(i)) {
        Part& q = s->parts[k];
        take = rel >= q.to ? 0 : std::min<uint64_t>(n, q.to - rel);
        q.reserved = rel + take;
        t.end = base + q.to;
      } else {
        t.end = off;
      }
    }
    if (take == 0) return;
    std::memcpy(buf + rel, p, take);
    std::lock_guard<std::mutex> lk(mu_);
    Part& q = s->parts[k];
    if (q.at == q.from) {
      q.t1 = Clock::now();
      ttfb_ = q.t1 - q.t0;
    }
    q.at = rel + take;
    if ((waiting_ == int64_t(i) && s->contiguous() >= wanted_) ||
        (any_waiting_ && (q.at - q.emitted >= kWakeBytes || q.at == q.to)))
      data_cv_.notify_all();
  };
  src_.note_active(1);
  try {
    src_.fetch_range(conn, t, halted_, cancel_);
  } catch (...) {
    src_.note_active(-1);
    throw;
  }
  src_.note_active(-1);
}

void Parallel::worker() {
  try {
    Conn conn = src_.make_conn();
    uint64_t received = 0;  // by this connection, up to GrowthPolicy::kSettleBytes
    for (;;) {
      uint64_t i = 0;
      int k = 0;
      {
        std::unique_lock<std::mutex> lk(mu_);
        // Timed: the consumer's release point moves without a notify.
        // Nothing to claim (all taken, or the ring full behind a segment
        // still arriving): help the slowest connection instead.
        bool stolen = false;
        for (;;) {
          if (stopping_ || error_) return;
          if (next_ < nseg_ && claimable_locked()) break;
          const Steal st = steal_locked(i, k);
          if ((stolen = st == Steal::kStolen)) break;
          const bool tail = next_ >= nseg_;
          if (tail && st == Steal::kNone) return;
          if (!tail) {
            ++floor_waiters_;
            data_cv_.notify_all();  // the consumer flushes what moves the floor
          }
          work_cv_.wait_for(lk, kGrowAfter);
          if (!tail) --floor_waiters_;
        }
        if (!stolen) {
          i = next_++;
          Slot& s = slots_[i % window_];
          s.owner = int64_t(i);
          s.nparts = 1;
          s.parts[0] = Part();
          s.parts[0].to = segment_len(i);
          s.parts[0].t0 = Clock::now();
          if (!s.buf && !spare_.empty()) {
            s.buf = std::move(spare_.back());
            spare_.pop_back();
          }
          if (!s.buf) s.buf.reset(new uint8_t[seg_]);  // not zeroed: the transfer fills it
          src_.st_segments_.fetch_add(1);
        }
      }
      fetch_part(conn, i, k, received);
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
