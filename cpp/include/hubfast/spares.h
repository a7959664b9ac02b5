// Spare byte buffers handed back by the stage that consumed them to the one
// that fills the next: a fresh large buffer is fresh pages that fault and are
// zeroed on first touch, and glibc returns freed ones to the kernel at once.
#pragma once
#include <cstddef>
#include <mutex>
#include <vector>

#include "hubfast/queue.h"

namespace hubfast {

class Spares {
 public:
  // Keeps at most `keep` buffers: idle ones count in RSS.
  explicit Spares(size_t keep) : keep_(keep) {}
  // A spare with its capacity (empty when `clear`), or an empty vector.
  Bytes take(bool clear) {
    std::lock_guard<std::mutex> lk(mu_);
    if (spare_.empty()) return Bytes();
    Bytes b = std::move(spare_.back());
    spare_.pop_back();
    if (clear) b.clear();
    return b;
  }
  // A consumer that holds more of them at once (parallel zstd's frames).
  void keep_more(size_t n) {
    std::lock_guard<std::mutex> lk(mu_);
    keep_ += n;
  }
  void give(Bytes b) {
    if (b.capacity() == 0) return;
    std::lock_guard<std::mutex> lk(mu_);
    if (spare_.size() < keep_) spare_.push_back(std::move(b));
  }

 private:
  size_t keep_;
  std::mutex mu_;
  std::vector<Bytes> spare_;
};

}  // namespace hubfast
