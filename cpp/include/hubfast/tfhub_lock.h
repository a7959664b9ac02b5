// tensorflow_hub's lock on an entry: <root>/<name>.lock holding
// "<hostname>.<pid>.<task uid>", with its temp dir <name>.<task uid>.tmp.
// hubfast holds one in that format while it writes (so tensorflow_hub
// processes wait), and waits for a live one held by tensorflow_hub.
#pragma once
#include <functional>
#include <string>

#include "hubfast/lock.h"

namespace hubfast {

// tensorflow_hub's own rule: a lock from another host whose content and temp
// dir stayed unchanged this long (seconds) belongs to a dead writer.
inline constexpr double kTfhubLockStale = 600;

class TfhubLock {
 public:
  // Waits for a live tensorflow_hub lock (same host: its pid alive; other
  // host: its content or temp dir changed within `remote_stale` s), then
  // takes it. Returns an unheld lock if `ready()` turns true while waiting
  // (tensorflow_hub published the entry).
  static TfhubLock acquire(const std::string& root, const std::string& name, const std::string& task_uid,
                           double timeout, double remote_stale, const WaitPoll& poll,
                           const std::function<bool()>& ready);
  TfhubLock() = default;
  TfhubLock(TfhubLock&& o) noexcept { *this = std::move(o); }
  TfhubLock& operator=(TfhubLock&& o) noexcept {
    release();
    path_ = std::move(o.path_);
    content_ = std::move(o.content_);
    o.path_.clear();
    return *this;
  }
  ~TfhubLock() { release(); }
  bool held() const { return !path_.empty(); }
  void release();  // removes the lock file if it is still ours

 private:
  std::string path_, content_;
};

}  // namespace hubfast
