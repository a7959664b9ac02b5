// A bounded queue between pipeline stages and the cancel token they share.
// The bound is what keeps memory flat however large the archive is.
#pragma once
#include <atomic>
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
  std::optional<T> pop() {
    std::unique_lock<std::mutex> lk(mu_);
    not_empty_.wait(lk, [&] { return aborted_ || closed_ || !items_.empty(); });
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
};

}  // namespace hubfast
