// A bounded queue between pipeline stages and the cancel token they share.
// The bound is what keeps memory flat however large the archive is.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <vector>

namespace hubfast {

using Bytes = std::vector<uint8_t>;

// Set once by whoever wants the pipeline to stop; every stage checks it.
class CancelToken {
 public:
  void cancel() { flag_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return flag_.load(std::memory_order_relaxed); }
  void throw_if_cancelled() const;

 private:
  std::atomic<bool> flag_{false};
};

template <class T>
class BoundedQueue {
 public:
  explicit BoundedQueue(size_t capacity) : capacity_(capacity) {}

  // Blocks while full. Returns false once the queue was aborted.
  bool push(T value) {
    std::unique_lock<std::mutex> lk(mu_);
    not_full_.wait(lk, [&] { return aborted_ || items_.size() < capacity_; });
    if (aborted_) return false;
    items_.push_back(std::move(value));
    not_empty_.notify_one();
    return true;
  }

  // Blocks while empty. nullopt once closed and drained, or aborted.
  std::optional<T> pop() { return pop_for(std::chrono::nanoseconds::max(), nullptr); }

  // As pop(), waiting at most `timeout`: then nullopt with *timed_out set.
  std::optional<T> pop_for(std::chrono::nanoseconds timeout, bool* timed_out) {
    std::unique_lock<std::mutex> lk(mu_);
    if (timed_out) *timed_out = false;
    if (items_.empty() && !closed_ && !aborted_) {
      int64_t t0 = now_ns();
      waiting_since_.store(t0, std::memory_order_relaxed);
      auto ready = [&] { return aborted_ || closed_ || !items_.empty(); };
      bool got = true;
      if (timeout == std::chrono::nanoseconds::max())
        not_empty_.wait(lk, ready);
      else
        got = not_empty_.wait_for(lk, timeout, ready);
      waiting_since_.store(0, std::memory_order_relaxed);
      wait_ns_.fetch_add(now_ns() - t0, std::memory_order_relaxed);
      if (!got) {
        if (timed_out) *timed_out = true;
        return std::nullopt;
      }
    }
    if (aborted_ || items_.empty()) return std::nullopt;
    T v = std::move(items_.front());
    items_.pop_front();
    not_full_.notify_one();
    return v;
  }

  // The producer is done: consumers drain what is left, then get nullopt.
  void close() {
    std::lock_guard<std::mutex> lk(mu_);
    closed_ = true;
    not_empty_.notify_all();
  }

  // Seconds consumers have spent waiting on an empty queue, in all: the
  // producer is the bottleneck while this grows.
  // The wait in progress counts too: a producer far too slow would
  // otherwise show nothing until its first chunk is done. Approximate under
  // races (a wait may be counted twice for an instant), which is fine for a
  // heuristic.
  double wait_seconds() const {
    int64_t ns = wait_ns_.load(std::memory_order_relaxed);
    int64_t since = waiting_since_.load(std::memory_order_relaxed);
    if (since) ns += std::max<int64_t>(0, now_ns() - since);
    return double(ns) * 1e-9;
  }

  // Something failed: wake everybody, drop what is queued.
  void abort() {
    std::lock_guard<std::mutex> lk(mu_);
    aborted_ = true;
    items_.clear();
    not_empty_.notify_all();
    not_full_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable not_full_, not_empty_;
  std::deque<T> items_;
  size_t capacity_;
  bool closed_ = false;
  bool aborted_ = false;
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  std::atomic<int64_t> wait_ns_{0}, waiting_since_{0};
};

}  // namespace hubfast
