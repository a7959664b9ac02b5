// Parallel ranged segments of one HTTP object: worker connections fetch
// segments into a bounded ring of buffers, and the consuming thread emits
// them in order (or, to a decoder that takes offsets, as they arrive).
// Internal to the HTTP source (fetch.cc); see its header comment.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "hubfast/growth.h"
#include "hubfast/queue.h"
#include "http_source.h"

namespace hubfast::http {

class Parallel {
 public:
  Parallel(HttpSource& src, const CancelToken& cancel, uint64_t total, uint64_t seg, size_t window,
           std::function<double()> probe)
      : src_(src), cancel_(cancel), total_(total), seg_(seg), full_(full_segments(total, seg, window)),
        half_(std::max<uint64_t>(seg / 2, 1)),
        nseg_(full_ + (total - full_ * seg + half_ - 1) / half_),
        window_(window), slots_(window), probe_(std::move(probe)) {
    halted_ = [this] { return cancel_.cancelled() || halt_.load(std::memory_order_relaxed); };
    GrowthSample s = sample();
    read_cpu(s);
    policy_.begin(s);
  }
  ~Parallel() { stop(); }
  Parallel(const Parallel&) = delete;
  Parallel& operator=(const Parallel&) = delete;

  // The last `window / 2` segments' worth of bytes is cut into half-size
  // segments: the connections then run out of work closer together (on a
  // capped link the last round of full segments left most of them idle).
  static uint64_t full_segments(uint64_t total, uint64_t seg, size_t window) {
    uint64_t tail = seg * std::max<uint64_t>(1, window / 2);
    return std::max<uint64_t>(1, total > tail + seg ? (total - tail) / seg : total / seg);
  }
  uint64_t segment_start(uint64_t i) const {
    return i <= full_ ? std::min(total_, i * seg_) : std::min(total_, full_ * seg_ + (i - full_) * half_);
  }
  uint64_t segment_end(uint64_t i) const { return segment_start(i + 1); }
  uint64_t segment_of(uint64_t off) const {
    return off < full_ * seg_ ? off / seg_ : full_ + (off - full_ * seg_) / half_;
  }
  uint64_t segment_len(uint64_t i) const { return segment_end(i) - segment_start(i); }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  std::exception_ptr error() {
    std::lock_guard<std::mutex> lk(mu_);
    return error_;
  }

  // Segments claimable beyond the one being consumed: one per connection and
  // one spare, so that a connection whose segment completes before the head
  // goes on. On a link faster than the decoder, more buffered segments only
  // cost memory (the whole 128 MiB ring otherwise; two per connection held
  // ~50 MiB more at 2 GiB .tar.zst, where the decoder's frames need it).
  void add_workers(int n);

  // Adaptive connections: the first stream alone runs on towards the end of
  // the object (a link that keeps up with the decoder needs no other: the
  // segments' buffering costs a copy and, on 2 cores, 15% of the time of a
  // 1 GiB .tar.zst on loopback). `first` is its task, whose end moves. The
  // first workers cut it at the end of the segment it is in and start after
  // that. Consumer thread only.
  void follow_first_stream(RangeTask* first) {
    first_ = first;
    first_seg_ = nseg_;
  }
  // Where the workers' segments start; the first stream ends there.
  uint64_t first_segment() const { return first_seg_; }

  // Whether workers have segments to fetch. The first call while a first
  // stream runs on cuts it (follow_first_stream); after it has ended, it took
  // the whole object.
  bool split();

  // Connections grow with need (GrowthPolicy): the consumer (decoder and
  // writer behind it) waiting for bytes means the transfer is the
  // bottleneck; a consumer that never waits gains nothing from more
  // connections but pays their CPU. The wait is the pipeline's (its decoder
  // on an empty queue) when it measures it, else this thread's own wait for
  // segments. Consuming thread only, during segment 0 too.
  void grow_if_starved();

  void allow_workers(int max_workers) { policy_.allow(max_workers); }
  void set_local_server(bool local) { policy_.set_local_server(local); }
  // Each window's cumulative readings on stderr (FetchOptions::growth_trace).
  void trace_growth(bool on) { trace_ = on; }
  void first_stream_ended() {
    first_stream_ = 0;
    first_ = nullptr;
  }
  int workers() const { return int(threads_.size()); }

  // Emits the workers' segments in order through `sink` (the first stream's
  // went out directly).
  void consume(const std::function<void(const uint8_t*, size_t)>& sink);

  // Emits the workers' segments as their bytes arrive, in any order (each segment's
  // in order), through `emit_at`: a decoder that takes offsets works on every
  // segment that has arrived instead of waiting on the oldest. `floor` is the
  // consumer's release point: claims stay within the window above it, as the
  // emitted bytes are held there until decoded. Returns the CRC32C of each
  // segment (for the whole-object check).
  std::vector<uint32_t> consume_any(const std::function<void(uint64_t, const uint8_t*, size_t)>& emit_at,
                                    std::function<uint64_t()> floor, const std::function<void()>& flush);

  void stop();

 private:
  // A connection's share of a segment: [from, to) relative to its start.
  // `to` drops when an idle connection takes the rest (steal_locked), so a
  // slow connection does not hold the end of the download alone. Guarded by
  // mu_, except `crc`, which only the consumer touches.
  struct Part {
    uint64_t from = 0, to = 0;
    uint64_t at = 0;        // received up to here
    uint64_t reserved = 0;  // being copied up to here (>= at): a steal starts after it
    uint64_t emitted = 0;   // consume_any(): emitted up to here
    uint32_t crc = 0;       // consume_any(): CRC32C of [from, emitted)
    Clock::time_point t0, t1;  // when its connection took it; its first byte
  };
  static constexpr int kMaxParts = 8;
  struct Slot {
    std::unique_ptr<uint8_t[]> buf;
    int64_t owner = -1;  // segment held
    Part parts[kMaxParts];
    int nparts = 0;
    // The part that starts at `from` (parts tile the segment), or -1.
    int part_at(uint64_t from) const;
    // Bytes from the segment's start that are final (received by every part
    // up to there).
    uint64_t contiguous() const;
    bool complete() const;
  };
  // Splitting another connection's part pays when what is left of it is
  // large and would take a while longer than a new request takes to bring
  // its first byte: its connection is then closed (the rest of its response
  // is not read) and its next request opens a new one.
  static constexpr uint64_t kStealBytes = 1 * kMiB;
  static constexpr std::chrono::milliseconds kStealAfter{25};
  Clock::duration ttfb_{0};  // the latest part's wait for its first byte (guarded by mu_)
  // Under mu_: takes the second half of the part with the most bytes left
  // that is worth splitting (kStolen); else whether one might be later, once
  // its rate is known (kLater), or none can (kNone).
  enum class Steal { kStolen, kLater, kNone };
  Steal steal_locked(uint64_t& seg, int& part);
  // Fetches part `k` of segment `i` on `conn`.
  void fetch_part(Conn& conn, uint64_t i, int k, uint64_t& received);

  // A segment may be claimed: within the ring above the head and, when the
  // consumer holds what it was given until it decodes it, within the ring
  // above its release point too.
  bool claimable_locked() const;

  void worker();

  HttpSource& src_;
  const CancelToken& cancel_;
  const uint64_t total_, seg_;
  const uint64_t full_, half_;  // segments of seg_ bytes, then of half_
  const uint64_t nseg_;
  const size_t window_;
  HaltFn halted_;
  std::vector<Slot> slots_;
  std::vector<std::unique_ptr<uint8_t[]>> spare_;  // consumed segments' buffers (guarded by mu_)
  std::mutex mu_;
  std::condition_variable work_cv_, data_cv_;
  uint64_t head_ = 0;  // segment being emitted (guarded by mu_)
  uint64_t next_ = 1;  // next segment to claim; those below first_seg_ are the first stream's
  uint64_t first_seg_ = 1;  // consumer thread (and under mu_ once workers run)
  RangeTask* first_ = nullptr;  // the first stream's task while its end may move
  uint64_t ahead_ = 2;  // segments claimable beyond head_ (<= window_)
  int64_t waiting_ = -1;  // segment the consumer waits for, and for how much of it
  uint64_t wanted_ = 0;
  bool any_waiting_ = false;  // consume_any() waits for any segment
  int floor_waiters_ = 0;     // workers waiting for the consumer's release point
  std::function<uint64_t()> floor_;  // consume_any(): the consumer's release point
  std::chrono::nanoseconds waited() const {
    if (probe_) return std::chrono::nanoseconds(int64_t(probe_() * 1e9));
    return own_wait_;
  }
  GrowthSample sample() const {
    GrowthSample s;
    s.t = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
    s.bytes = src_.st_bytes_.load(std::memory_order_relaxed);
    s.waited = std::chrono::duration<double>(waited()).count();
    return s;
  }
  std::function<double()> probe_;  // the pipeline's consumer wait (s), if measured
  std::chrono::nanoseconds own_wait_{0};  // this thread's wait for segments
  GrowthPolicy policy_{usable_cores()};  // consumer thread only
  std::atomic<size_t> settled_{0};  // workers that have received GrowthPolicy::kSettleBytes
  bool trace_ = false;
  int first_stream_ = 1;  // the first stream's connection, while it runs (consumer thread)
  // Timed waits wake the consumer at least once a growth window.
  static constexpr std::chrono::milliseconds kGrowAfter{int(GrowthPolicy::kWindow * 1000)};
  static constexpr uint64_t kWakeBytes = 1 * kMiB;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::atomic<bool> halt_{false}, failed_{false};
  std::vector<std::thread> threads_;
};

}  // namespace hubfast::http
