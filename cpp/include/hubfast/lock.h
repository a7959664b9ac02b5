// Cross-process locks on cache entries (docs/cache-protocol.md, "Locks").
//  - FileLock: flock on a lock file that is never deleted. The kernel
//    releases it when the holder dies, so waiters need no stale detection.
//  - HeartbeatLock: for file systems where flock is not reliable (Lustre
//    without -o flock, FUSE): an O_EXCL lock file whose mtime the holder
//    refreshes; a waiter takes over once it is stale or its owner (on this
//    host) is dead. Correctness rests on the atomic publish rename anyway.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "hubfast/fd.h"

namespace hubfast {

using WaitPoll = std::function<void()>;  // may throw to cancel a wait

class FileLock {
 public:
  // timeout < 0: wait forever. Throws kLock on timeout; poll runs ~10x/s.
  static FileLock acquire(const std::string& path, bool exclusive, double timeout, const WaitPoll& poll);
  static FileLock try_acquire(const std::string& path, bool exclusive);
  FileLock() = default;
  bool held() const { return bool(fd_); }
  void release() { fd_.reset(); }

 private:
  explicit FileLock(Fd fd) : fd_(std::move(fd)) {}
  Fd fd_;
};

// Part of the cache protocol (docs/cache-protocol.md): every process sharing a
// cache must use the same stale time, so it is a constant, not a setting.
struct HeartbeatTiming {
  double beat = 0.25;   // seconds between refreshes
  double stale = 1.5;   // a lock not refreshed for this long is taken over
};

class HeartbeatLock {
 public:
  static HeartbeatLock acquire(const std::string& path, double timeout, const WaitPoll& poll,
                               const HeartbeatTiming& timing);
  HeartbeatLock();
  HeartbeatLock(HeartbeatLock&&) noexcept;
  HeartbeatLock& operator=(HeartbeatLock&&) noexcept;
  ~HeartbeatLock();
  bool held() const;
  // Also refresh the mtime of `path` (the writer's temp dir) on every beat.
  void touch_too(const std::string& path);
  void release();

 private:
  struct State;
  std::unique_ptr<State> st_;
};

enum class LockMode { kAuto, kFlock, kHeartbeat };

// kFlock unless `dir` is on a file system where flock is unreliable.
LockMode detect_lock_mode(const std::string& dir);
const char* lock_mode_name(LockMode m);

// An exclusive writer's lock in either mode.
class EntryLock {
 public:
  static EntryLock acquire(const std::string& root, const std::string& name, LockMode mode, double timeout,
                           const WaitPoll& poll, const HeartbeatTiming& timing);
  EntryLock() = default;
  LockMode mode() const { return mode_; }
  void touch_too(const std::string& path) {
    if (hb_.held()) hb_.touch_too(path);
  }

 private:
  LockMode mode_ = LockMode::kFlock;
  FileLock flock_;
  HeartbeatLock hb_;
};

// Creates `path` holding `content` atomically (written beside it, then
// link()ed into place): false if it already exists. Readers never see it empty.
bool create_exclusive(const std::string& path, const std::string& content);

// The content of a small regular file (at most `max` bytes), "" when it is
// missing, a link, a FIFO or a device: files in a shared cache are hostile.
std::string read_small_file(const std::string& path, size_t max = 1 << 16);

// Whether a process with this pid exists on this host.
bool pid_alive(long pid);
std::string host_name();
// Hex digits from the kernel's CSPRNG: names no other user can predict.
std::string random_token(size_t hex_chars);

}  // namespace hubfast
