#include "hubfast/lock.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/random.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "hubfast/cache.h"
#include "hubfast/error.h"

namespace hubfast {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Waits by polling: short sleeps (a release is seen within ~10 ms), the
// caller's poll (Ctrl-C) about 10 times a second, and the timeout.
class Waiter {
 public:
  Waiter(double timeout, const WaitPoll& poll, std::string what)
      : timeout_(timeout), poll_(poll), what_(std::move(what)) {}
  void wait() {
    if (timeout_ >= 0 && seconds_since(start_) >= timeout_)
      throw Error(ErrorKind::kLock, "timed out after " + std::to_string(int(seconds_since(start_))) +
                                        " s waiting for " + what_);
    std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms_));
    sleep_ms_ = std::min(sleep_ms_ * 2, 10);
    if (poll_ && seconds_since(last_poll_) >= 0.1) {
      last_poll_ = Clock::now();
      poll_();
    }
  }

 private:
  double timeout_;
  const WaitPoll& poll_;
  std::string what_;
  Clock::time_point start_ = Clock::now(), last_poll_ = Clock::now();
  int sleep_ms_ = 1;
};

}  // namespace

std::string read_small_file(const std::string& path, size_t max) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  struct stat st;
  if (!fd || ::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) return "";
  std::string out(std::min<size_t>(max, size_t(st.st_size)), '\0');
  size_t got = 0;
  while (got < out.size()) {
    ssize_t n = ::read(fd.get(), &out[got], out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += size_t(n);
  }
  out.resize(got);
  return out;
}

bool pid_alive(long pid) {
  if (pid <= 0) return true;  // unknown: assume alive
  if (::kill(pid_t(pid), 0) != 0 && errno != EPERM) return false;
  // A killed process its parent has not reaped yet is a zombie: kill(pid, 0)
  // still succeeds, but it holds nothing and will never finish a download.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;
  size_t paren = line.rfind(')');
  return paren == std::string::npos || paren + 2 >= line.size() || line[paren + 2] != 'Z';
}

std::string host_name() {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  return host;
}

std::string random_token(size_t n) {
  static const char* kHex = "0123456789abcdef";
  std::vector<uint8_t> bytes((n + 1) / 2);
  size_t got = 0;
  while (got < bytes.size()) {
    ssize_t r = ::getrandom(bytes.data() + got, bytes.size() - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw_errno("getrandom", errno);
    got += size_t(r);
  }
  std::string s;
  for (size_t i = 0; i < n; ++i) s.push_back(kHex[(bytes[i / 2] >> (i % 2 ? 4 : 0)) & 15]);
  return s;
}

bool create_exclusive(const std::string& path, const std::string& content) {
  std::string tmp = path + "." + random_token(12) + ".new";
  {
    Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (!fd) throw_errno("cannot create '" + tmp + "'", errno);
    if (::write(fd.get(), content.data(), content.size()) != ssize_t(content.size())) {
      int e = errno;
      ::unlink(tmp.c_str());
      throw_errno("cannot write '" + tmp + "'", e);
    }
  }
  int r = ::link(tmp.c_str(), path.c_str());
  int e = errno;
  ::unlink(tmp.c_str());
  if (r == 0) return true;
  if (e == EEXIST) return false;
  throw_errno("cannot create '" + path + "'", e);
}

FileLock FileLock::try_acquire(const std::string& path, bool exclusive) {
  // No link is followed and nothing but a regular file is locked: a link planted
  // for the name must not make us create or lock a file elsewhere (/etc/nologin).
  constexpr int kFlags = O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC;
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | kFlags, 0666);
  int create_errno = errno;
  if (fd < 0 && !exclusive && errno != ELOOP) fd = ::open(path.c_str(), O_RDONLY | kFlags);
  // Missing and not creatable (a read-only mount, another user's layer): report why it
  // could not be created (EROFS/EACCES: access denied), not that it is missing.
  if (fd < 0) throw_errno("cannot open lock file '" + path + "'", errno == ENOENT ? create_errno : errno);
  Fd guard(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
    throw Error(ErrorKind::kUnsafeCache, "lock file '" + path + "' is not a regular file");
  if (::flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0) return FileLock(std::move(guard));
  if (errno != EWOULDBLOCK) throw_errno("cannot lock '" + path + "'", errno);
  return FileLock();
}

FileLock FileLock::acquire(const std::string& path, bool exclusive, double timeout, const WaitPoll& poll) {
  Waiter w(timeout, poll, "the lock '" + path + "' (another process is writing this entry)");
  for (;;) {
    FileLock l = try_acquire(path, exclusive);
    if (l.held()) return l;
    w.wait();
  }
}

struct HeartbeatLock::State {
  std::string path, content;
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  std::vector<std::string> touch;
  std::thread beater;

  void run(double beat) {
    std::unique_lock<std::mutex> lk(mu);
    while (!cv.wait_for(lk, std::chrono::duration<double>(beat), [&] { return stop; })) {
      ::utimensat(AT_FDCWD, path.c_str(), nullptr, AT_SYMLINK_NOFOLLOW);
      for (auto& p : touch) ::utimensat(AT_FDCWD, p.c_str(), nullptr, AT_SYMLINK_NOFOLLOW);
    }
  }
};

HeartbeatLock::HeartbeatLock() = default;
HeartbeatLock::HeartbeatLock(HeartbeatLock&&) noexcept = default;
HeartbeatLock& HeartbeatLock::operator=(HeartbeatLock&& o) noexcept {
  release();
  st_ = std::move(o.st_);
  return *this;
}
HeartbeatLock::~HeartbeatLock() { release(); }
bool HeartbeatLock::held() const { return bool(st_); }

void HeartbeatLock::touch_too(const std::string& path) {
  std::lock_guard<std::mutex> lk(st_->mu);
  st_->touch.push_back(path);
}

void HeartbeatLock::release() {
  if (!st_) return;
  {
    std::lock_guard<std::mutex> lk(st_->mu);
    st_->stop = true;
  }
  st_->cv.notify_all();
  st_->beater.join();
  // Remove the lock file only while it is still ours (not taken over).
  if (read_small_file(st_->path) == st_->content) ::unlink(st_->path.c_str());
  st_.reset();
}

HeartbeatLock HeartbeatLock::acquire(const std::string& path, double timeout, const WaitPoll& poll,
                                     const HeartbeatTiming& timing) {
  std::string content = host_name() + " " + std::to_string(::getpid()) + " " + random_token(16) + "\n";
  Waiter w(timeout, poll, "the heartbeat lock '" + path + "' (another process is writing this entry)");
  for (;;) {
    if (create_exclusive(path, content)) {
      HeartbeatLock l;
      l.st_ = std::make_unique<State>();
      l.st_->path = path;
      l.st_->content = content;
      State* s = l.st_.get();
      s->beater = std::thread([s, beat = timing.beat] { s->run(beat); });
      return l;
    }
    struct stat st;
    if (::stat(path.c_str(), &st) == 0) {
      std::istringstream owner(read_small_file(path));
      std::string host;
      long pid = 0;
      owner >> host >> pid;
      double age = double(::time(nullptr) - st.st_mtime);
      bool dead_here = host == host_name() && !pid_alive(pid);
      if (dead_here || age > timing.stale) {
        // Take over: only one waiter's rename of the stale file succeeds.
        std::string grave = path + ".stale." + random_token(8);
        if (::rename(path.c_str(), grave.c_str()) == 0) ::unlink(grave.c_str());
        continue;
      }
    }
    w.wait();
  }
}

LockMode detect_lock_mode(const std::string& dir) {
  struct statfs sf;
  if (::statfs(dir.c_str(), &sf) != 0) return LockMode::kFlock;
  switch (uint64_t(sf.f_type)) {
    case 0x0BD00BD0:  // Lustre: flock only with -o flock, which statfs can't tell
    case 0x65735546:  // FUSE: depends on the daemon
      return LockMode::kHeartbeat;
    default:
      return LockMode::kFlock;
  }
}

const char* lock_mode_name(LockMode m) {
  switch (m) {
    case LockMode::kAuto: return "auto";
    case LockMode::kFlock: return "flock";
    case LockMode::kHeartbeat: return "heartbeat";
  }
  return "?";
}

EntryLock EntryLock::acquire(const std::string& root, const std::string& name, LockMode mode, double timeout,
                             const WaitPoll& poll, const HeartbeatTiming& timing) {
  EntryLock l;
  l.mode_ = mode == LockMode::kAuto ? detect_lock_mode(root) : mode;
  if (l.mode_ == LockMode::kHeartbeat)
    l.hb_ = HeartbeatLock::acquire(root + "/" + name + ".hubfast.hb", timeout, poll, timing);
  else
    l.flock_ = FileLock::acquire(lock_path(root, name), true, timeout, poll);
  return l;
}

}  // namespace hubfast
