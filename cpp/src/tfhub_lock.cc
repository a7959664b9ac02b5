#include "hubfast/tfhub_lock.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <dirent.h>

#include <cerrno>
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "hubfast/error.h"
#include "hubfast/extract.h"

namespace hubfast {
namespace {

using Clock = std::chrono::steady_clock;

struct Owner {
  std::string host, task_uid;
  long pid = -1;
};

// "<hostname>.<pid>.<uid>": the hostname may itself hold dots.
bool parse_owner(const std::string& content, Owner* o) {
  size_t b = content.rfind('.');
  if (b == std::string::npos || b == 0) return false;
  size_t a = content.rfind('.', b - 1);
  if (a == std::string::npos) return false;
  o->host = content.substr(0, a);
  o->task_uid = content.substr(b + 1);
  try {
    o->pid = std::stol(content.substr(a + 1, b - a - 1));
  } catch (...) {
    return false;
  }
  return true;
}

// Bytes under a directory (tensorflow_hub's sign that a download progresses).
// Bytes written so far into tensorflow_hub's temp dir (its progress); 0 when unreadable.
uint64_t tree_bytes(const std::string& path) {
  Fd dir(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!dir) return 0;
  uint64_t total = 0;
  try {
    for (auto& f : list_tree(dir.get())) total += f.size;
  } catch (const Error&) {
    return 0;
  }
  return total;
}

}  // namespace

void TfhubLock::release() {
  if (path_.empty()) return;
  if (read_small_file(path_) == content_) ::unlink(path_.c_str());
  path_.clear();
}

TfhubLock TfhubLock::acquire(const std::string& root, const std::string& name, const std::string& task_uid,
                             double timeout, double remote_stale, const WaitPoll& poll,
                             const std::function<bool()>& ready) {
  std::string path = root + "/" + name + ".lock";
  std::string content = host_name() + "." + std::to_string(::getpid()) + "." + task_uid;
  auto start = Clock::now();
  std::string seen_content;
  uint64_t seen_bytes = 0;
  auto seen_change = Clock::now();
  auto last_poll = Clock::now();
  for (;;) {
    if (create_exclusive(path, content)) {
      TfhubLock l;
      l.path_ = path;
      l.content_ = content;
      return l;
    }
    if (ready && ready()) return TfhubLock();

    std::string cur = read_small_file(path);
    Owner o;
    bool parsed = parse_owner(cur, &o);
    std::string their_tmp = parsed ? root + "/" + name + "." + o.task_uid + ".tmp" : "";
    bool stale = false;
    if (parsed && o.host == host_name() && !pid_alive(o.pid)) {
      stale = true;  // its owner died on this host: no need to wait 600 s
    } else {
      uint64_t bytes = parsed ? tree_bytes(their_tmp) : 0;
      if (cur != seen_content || bytes != seen_bytes) {
        seen_content = cur;
        seen_bytes = bytes;
        seen_change = Clock::now();
      } else if (std::chrono::duration<double>(Clock::now() - seen_change).count() > remote_stale) {
        stale = true;  // tensorflow_hub's own rule: unchanged for too long
      }
    }
    if (stale) {
      if (read_small_file(path) == cur) ::unlink(path.c_str());
      if (parsed && !o.task_uid.empty() && o.task_uid.find('/') == std::string::npos) {
        Fd rootfd(::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (rootfd) remove_tree_at(rootfd.get(), name + "." + o.task_uid + ".tmp");
      }
      continue;
    }
    double waited = std::chrono::duration<double>(Clock::now() - start).count();
    if (timeout >= 0 && waited >= timeout)
      throw Error(ErrorKind::kLock, "timed out after " + std::to_string(int(waited)) +
                                        " s waiting for tensorflow_hub's lock '" + path + "' (held by " + cur + ")");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (poll && std::chrono::duration<double>(Clock::now() - last_poll).count() >= 0.1) {
      last_poll = Clock::now();
      poll();
    }
  }
}

}  // namespace hubfast
