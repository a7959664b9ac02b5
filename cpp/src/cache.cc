#include "hubfast/cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "hubfast/digest.h"
#include "hubfast/error.h"
#include "hubfast/extract.h"
#include "hubfast/tfhub_lock.h"
#include "hubfast/tree.h"

namespace hubfast {
namespace {

using Clock = std::chrono::steady_clock;

// Restarts from byte 0 when the object changes under a download (RestartError).
constexpr int kMaxRestarts = 2;

constexpr const char* kManifestMagic = "hubfast-manifest 2";
constexpr const char* kManifestMagicV1 = "hubfast-manifest 1";  // no end line: still read

std::string join(const std::string& a, const std::string& b) { return a + "/" + b; }

// Manifest paths are escaped so that any file name fits on one line.
std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '%' || c == '\n' || c == '\r') {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%%%02X", unsigned(uint8_t(c)));
      o += buf;
    } else {
      o.push_back(c);
    }
  }
  return o;
}

// False for a bad escape or a path that is empty, absolute or climbs out ("..").
bool unescape(const std::string& s, std::string* out) {
  std::string& o = *out;
  o.clear();
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      o.push_back(s[i]);
      continue;
    }
    auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; };
    if (i + 2 >= s.size() || hex(s[i + 1]) < 0 || hex(s[i + 2]) < 0) return false;
    o.push_back(char(hex(s[i + 1]) * 16 + hex(s[i + 2])));
    i += 2;
  }
  if (o.empty() || o[0] == '/') return false;
  return ("/" + o + "/").find("/../") == std::string::npos;
}

struct ManifestFile {
  std::string path;
  uint64_t size;
  uint32_t crc32 = 0;
  bool has_crc = false;
};

struct Manifest {
  uint64_t dev = 0, ino = 0;
  std::vector<ManifestFile> files;
  std::string archive_sha256;
};

enum class ManifestRead { kNone, kBad, kOk };

bool parse_u64(const std::string& t, int base, uint64_t* out) {
  if (t.empty() || t.size() > 20) return false;
  uint64_t v = 0;
  for (char c : t) {
    int d = (c >= '0' && c <= '9') ? c - '0' : (base == 16 && c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
    if (d < 0 || v > (UINT64_MAX - uint64_t(d)) / uint64_t(base)) return false;
    v = v * uint64_t(base) + uint64_t(d);
  }
  *out = v;
  return true;
}

// Splits off the next space-separated field of `rest`.
std::string field(std::string* rest) {
  size_t sp = rest->find(' ');
  std::string f = rest->substr(0, sp);
  rest->erase(0, sp == std::string::npos ? rest->size() : sp + 1);
  return f;
}

// kNone: no manifest (tensorflow_hub's entry). kBad: one that doesn't parse, or was cut
// short (every line ends in a newline; version 2 ends with "e <file count>").
ManifestRead read_manifest(const std::string& path, Manifest* m) {
  // Read through no link and from nothing but a regular file (a planted FIFO would hang).
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return errno == ENOENT ? ManifestRead::kNone : ManifestRead::kBad;
  if (!S_ISREG(st.st_mode)) return ManifestRead::kBad;
  std::string text = read_small_file(path, size_t(1) << 30);
  if (text.empty() || text.back() != '\n') return ManifestRead::kBad;
  size_t pos = text.find('\n');
  std::string magic = text.substr(0, pos);
  bool v2 = magic == kManifestMagic;
  if (!v2 && magic != kManifestMagicV1) return ManifestRead::kBad;
  bool ended = false;
  while (++pos < text.size()) {
    size_t nl = text.find('\n', pos);
    std::string line = text.substr(pos, nl - pos);
    pos = nl;
    if (ended || line.size() < 2 || line[1] != ' ') return ManifestRead::kBad;
    std::string rest = line.substr(2);
    uint64_t a = 0, b = 0;
    switch (line[0]) {
      case 'i':
        if (!parse_u64(field(&rest), 10, &a) || !parse_u64(field(&rest), 10, &b) || !rest.empty())
          return ManifestRead::kBad;
        m->dev = a, m->ino = b;
        break;
      case 's':
        m->archive_sha256 = rest;
        if (rest.size() != 64 || !parse_u64(rest.substr(0, 16), 16, &a)) return ManifestRead::kBad;
        break;
      case 'f': {  // "f <size> <crc32 hex> <path>"
        ManifestFile f;
        if (!parse_u64(field(&rest), 10, &f.size)) return ManifestRead::kBad;
        std::string hex = field(&rest);
        if (hex.size() != 8 || !parse_u64(hex, 16, &a) || !unescape(rest, &f.path)) return ManifestRead::kBad;
        f.crc32 = uint32_t(a);
        f.has_crc = true;
        m->files.push_back(std::move(f));
        break;
      }
      case 'e':
        if (!parse_u64(rest, 10, &a) || a != m->files.size()) return ManifestRead::kBad;
        ended = true;
        break;
      default:
        break;  // a later version's line: not needed to check the tree
    }
  }
  if (v2 && !ended) return ManifestRead::kBad;
  return m->ino != 0 ? ManifestRead::kOk : ManifestRead::kBad;
}

void fsync_tree(int fd) {
  for (auto& f : list_tree(fd)) {
    Fd file(::openat(fd, f.path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (file && ::fsync(file.get()) != 0) throw_errno("fsync '" + f.path + "'", errno);
  }
  ::fsync(fd);
}

// Written beside its final name under a name no other user can predict, created
// exclusively (a planted link or file there is never written through), then renamed.
void write_file_atomic(int root_fd, const std::string& name, const std::string& content) {
  std::string tmp = name + ".hf" + random_token(24) + ".new";
  Fd fd(::openat(root_fd, tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (!fd) throw_errno("cannot write '" + name + "'", errno);
  const char* p = content.data();
  size_t n = content.size();
  while (n) {
    ssize_t w = ::write(fd.get(), p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::unlinkat(root_fd, tmp.c_str(), 0);
      throw_errno("cannot write '" + name + "'", e);
    }
    p += w;
    n -= size_t(w);
  }
  fd.reset();
  if (::renameat(root_fd, tmp.c_str(), root_fd, name.c_str()) != 0) {
    int e = errno;
    ::unlinkat(root_fd, tmp.c_str(), 0);
    throw_errno("cannot publish '" + name + "'", e);
  }
}

std::string descriptor(const std::string& handle) {
  // tensorflow_hub's format, so either library can read the other's.
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() % 1000000;
  std::tm tm;
  ::localtime_r(&t, &tm);
  char when[64];
  std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  std::ostringstream o;
  o << "Module: " << handle << "\nDownload Time: " << when << "." << std::to_string(1000000 + us).substr(1)
    << "\nDownloader Hostname: " << host << " (PID:" << ::getpid() << ")\n";
  return o.str();
}

bool dir_nonempty(const std::string& path) {
  DIR* d = ::opendir(path.c_str());
  if (!d) return false;
  bool any = false;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") {
      any = true;
      break;
    }
  }
  ::closedir(d);
  return any;
}

Fd open_root(const std::string& root) {
  if (::mkdir(root.c_str(), 0755) != 0 && errno != EEXIST) {
    // Create missing parents as `mkdir -p` would.
    size_t slash = root.rfind('/');
    if (errno == ENOENT && slash != std::string::npos && slash > 0) {
      open_root(root.substr(0, slash));
      if (::mkdir(root.c_str(), 0755) != 0 && errno != EEXIST)
        throw_errno("cannot create cache directory '" + root + "'", errno);
    } else {
      throw_errno("cannot create cache directory '" + root + "'", errno);
    }
  }
  int fd = ::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_errno("cannot open cache directory '" + root + "'", errno);
  return Fd(fd);
}

// Removes what dead hubfast writers of this entry left: temp dirs (in flock
// mode every one, as we hold the writers' lock; in heartbeat mode those not
// refreshed for `stale` s) and replaced trees once no reader uses the entry.
void remove_dead_temps(int root_fd, const std::string& root, const std::string& name, LockMode mode,
                       double stale) {
  int dup = ::fcntl(root_fd, F_DUPFD_CLOEXEC, 0);
  DIR* d = ::fdopendir(dup);
  if (!d) {
    ::close(dup);
    return;
  }
  auto ends_with = [](const std::string& n, const char* suf) {
    size_t k = std::strlen(suf);
    return n.size() > k && n.compare(n.size() - k, k, suf) == 0;
  };
  std::string prefix = name + ".hf";
  std::vector<std::string> temps, olds;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.compare(0, prefix.size(), prefix) != 0) continue;
    if (ends_with(n, ".tmp")) temps.push_back(n);
    if (ends_with(n, ".old")) olds.push_back(n);
  }
  ::closedir(d);
  for (auto& n : temps) {
    struct stat st;
    if (mode == LockMode::kHeartbeat &&
        (::fstatat(root_fd, n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || ::time(nullptr) - st.st_mtime <= stale))
      continue;
    remove_tree_at(root_fd, n);
  }
  if (!olds.empty()) {
    FileLock unused = FileLock::try_acquire(use_lock_path(root, name), true);
    if (unused.held())
      for (auto& n : olds) remove_tree_at(root_fd, n);
  }
}

bool usable(const Lookup& l) { return l.state == EntryState::kComplete || l.state == EntryState::kForeign; }

}  // namespace

const char* entry_state_name(EntryState s) {
  switch (s) {
    case EntryState::kMissing: return "missing";
    case EntryState::kComplete: return "complete";
    case EntryState::kForeign: return "foreign";
    case EntryState::kBroken: return "broken";
    case EntryState::kUnpinned: return "unpinned";
  }
  return "?";
}

std::string manifest_path(const std::string& root, const std::string& name) {
  return join(root, name + ".hubfast");
}

std::string lock_path(const std::string& root, const std::string& name) {
  return join(root, name + ".hubfast.lock");
}

std::string use_lock_path(const std::string& root, const std::string& name) {
  return join(root, name + ".hubfast.use");
}

namespace {

// One look at the entry through a single directory handle: the stat and the
// per-file checks see the same tree even if it is renamed meanwhile.
Lookup lookup_once(const std::string& root, const std::string& name, bool* moved) {
  Lookup r;
  r.path = join(root, name);
  *moved = false;
  Fd dir(::open(r.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir) {
    if (errno == ENOTDIR) {
      r.state = EntryState::kBroken;
      r.reason = "not a directory";
    }
    return r;  // ENOENT and the like: missing
  }
  struct stat st;
  if (::fstat(dir.get(), &st) != 0) return r;
  Manifest m;
  ManifestRead got = read_manifest(manifest_path(root, name), &m);
  if (got == ManifestRead::kBad) {
    r.state = EntryState::kBroken;
    r.reason = "its manifest '" + manifest_path(root, name) + "' is damaged (does not parse)";
    return r;
  }
  if (got == ManifestRead::kNone || m.ino != uint64_t(st.st_ino) || m.dev != uint64_t(st.st_dev)) {
    // Not ours (tensorflow_hub's rule: a non-empty directory is complete).
    r.state = dir_nonempty(r.path) ? EntryState::kForeign : EntryState::kMissing;
    return r;
  }
  r.sha256 = m.archive_sha256;
  for (auto& f : m.files) {
    struct stat fs;
    std::string problem;
    if (::fstatat(dir.get(), f.path.c_str(), &fs, AT_SYMLINK_NOFOLLOW) != 0)
      problem = "'" + f.path + "' is missing";
    else if (!S_ISREG(fs.st_mode) || uint64_t(fs.st_size) != f.size)
      problem = "'" + f.path + "' changed size (" + std::to_string(fs.st_size) + " bytes, expected " +
                std::to_string(f.size) + ")";
    if (problem.empty()) continue;
    // A tree renamed away (rm, prune, repair) while we looked is not a broken entry.
    struct stat now;
    *moved = ::stat(r.path.c_str(), &now) != 0 || now.st_ino != st.st_ino || now.st_dev != st.st_dev;
    r.state = EntryState::kBroken;
    r.reason = problem;
    return r;
  }
  r.state = EntryState::kComplete;
  return r;
}

}  // namespace

Lookup lookup_entry(const std::string& root, const std::string& name, const std::string& pin) {
  bool moved = false;
  Lookup r = lookup_once(root, name, &moved);
  for (int i = 0; moved && i < 2; i++) r = lookup_once(root, name, &moved);
  if (moved) {  // still changing under us: report it missing, the caller takes the lock
    r.state = EntryState::kMissing;
    r.reason.clear();
  }
  if (!pin.empty() && usable(r) && r.sha256 != pin) {
    r.reason = r.sha256.empty() ? "no archive sha256 recorded (fetched without a pin, or not by hubfast)"
                                : "archive sha256 " + r.sha256 + " recorded, not the pinned " + pin;
    r.state = EntryState::kUnpinned;
  }
  return r;
}

EntryResult ensure_entry(const EntryRequest& req, const SourceFactory& make_source, const PollFn& poll) {
  EntryResult res;
  // A pinned entry is usable only when its manifest records the pinned digest;
  // otherwise it is fetched again and swapped in like a broken one.
  const std::string& pin = req.extract.expected_sha256;
  Lookup l = lookup_entry(req.root, req.name, pin);
  res.path = l.path;
  if (usable(l)) return res;

  Fd root = open_root(req.root);
  auto t_lock = Clock::now();
  WaitPoll wait_poll;
  if (poll) wait_poll = [&] { poll(Progress{}); };
  EntryLock lock = EntryLock::acquire(req.root, req.name, req.lock_mode, req.lock_timeout, wait_poll, req.heartbeat);

  // Somebody may have finished while we waited.
  l = lookup_entry(req.root, req.name, pin);
  if (usable(l)) return res;

  // tensorflow_hub's lock too, named after our temp dir so that its waiters
  // see the download progress; it may publish the entry while we wait.
  std::string token = "hf" + random_token(30);
  TfhubLock tflock = TfhubLock::acquire(req.root, req.name, token, req.lock_timeout, req.tfhub_stale, wait_poll,
                                        [&] { return usable(lookup_entry(req.root, req.name, pin)); });
  res.lock_wait = std::chrono::duration<double>(Clock::now() - t_lock).count();
  l = lookup_entry(req.root, req.name, pin);
  if (!tflock.held() || usable(l)) return res;

  remove_dead_temps(root.get(), req.root, req.name, lock.mode(), req.heartbeat.stale);
  std::string temp = req.name + "." + token + ".tmp";
  if (::mkdirat(root.get(), temp.c_str(), 0755) != 0)
    throw_errno("cannot create a temp directory in '" + req.root + "'", errno);
  lock.touch_too(join(req.root, temp));
  try {
    Fd tdir;
    for (int& restarts = res.restarts;; ++restarts) {
      tdir.reset(::openat(root.get(), temp.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
      if (!tdir) throw_errno("cannot open '" + temp + "'", errno);
      try {
        auto src = make_source(restarts);
        res.stats = extract(*src, tdir.get(), req.extract, poll);
        break;
      } catch (const RestartError& e) {
        // The object changed under the download: what was written may mix two versions.
        if (restarts >= kMaxRestarts)
          throw Error(ErrorKind::kIntegrity, std::string(e.what()) + "; gave up after " +
                                                 std::to_string(restarts) + " restarts from byte 0");
        tdir.reset();
        remove_tree_at(root.get(), temp);
        if (::mkdirat(root.get(), temp.c_str(), 0755) != 0)
          throw_errno("cannot create a temp directory in '" + req.root + "'", errno);
      }
    }
    auto t_pub = Clock::now();
    if (req.fsync) fsync_tree(tdir.get());

    struct stat st;
    if (::fstat(tdir.get(), &st) != 0) throw_errno("stat", errno);
    std::ostringstream o;
    o << kManifestMagic << "\ni " << st.st_dev << " " << st.st_ino << "\n";
    if (!res.stats.sha256.empty()) o << "s " << res.stats.sha256 << "\n";
    char crc[16];
    for (auto& [path, f] : res.stats.tree) {
      std::snprintf(crc, sizeof crc, "%08x", f.crc32);
      o << "f " << f.size << " " << crc << " " << escape(path) << "\n";
    }
    o << "e " << res.stats.tree.size() << "\n";
    std::string manifest_name = req.name + ".hubfast";

    if (l.state == EntryState::kBroken || l.state == EntryState::kUnpinned) {
      // Swap the good tree in atomically; readers never see a missing entry.
      if (::renameat2(root.get(), temp.c_str(), root.get(), req.name.c_str(), RENAME_EXCHANGE) != 0)
        throw_errno("cannot replace the broken entry '" + l.path + "'", errno);
      write_file_atomic(root.get(), manifest_name, o.str());
      res.repaired = true;
      // The broken tree now lives at `temp`. A reader may still use it: then
      // it waits as <name>.<token>.old for a later writer to remove it.
      FileLock unused = FileLock::try_acquire(use_lock_path(req.root, req.name), true);
      if (unused.held()) {
        remove_tree_at(root.get(), temp);
      } else {
        std::string old = req.name + "." + token + ".old";
        if (::renameat(root.get(), temp.c_str(), root.get(), old.c_str()) != 0) remove_tree_at(root.get(), temp);
      }
    } else {
      write_file_atomic(root.get(), manifest_name, o.str());
      if (::renameat(root.get(), temp.c_str(), root.get(), req.name.c_str()) != 0) {
        int e = errno;
        if (e != ENOTEMPTY && e != EEXIST) throw_errno("cannot publish '" + l.path + "'", e);
        // Another library published it meanwhile: theirs stands.
        remove_tree_at(root.get(), temp);
        return res;
      }
    }
    if (req.fsync) ::fsync(root.get());
    write_file_atomic(root.get(), req.name + ".descriptor.txt", descriptor(req.handle));
    // The readers' use-lock file, so that a layer filled by root can be read-locked by
    // every user (a shared flock needs only read access) and on a read-only mount.
    FileLock::try_acquire(use_lock_path(req.root, req.name), false);
    res.downloaded = true;
    res.publish_seconds = std::chrono::duration<double>(Clock::now() - t_pub).count();
  } catch (...) {
    try {
      remove_tree_at(root.get(), temp);
    } catch (...) {
    }
    throw;
  }
  return res;
}

std::vector<std::string> verify_entry(const std::string& root, const std::string& name, bool deep) {
  std::vector<std::string> problems;
  Lookup l = lookup_entry(root, name);
  if (l.state == EntryState::kBroken) problems.push_back(l.reason);
  if (l.state != EntryState::kComplete || !deep) return problems;
  Manifest m;
  read_manifest(manifest_path(root, name), &m);
  Fd dir(::open(l.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  std::vector<uint8_t> buf(1 << 20);
  for (auto& f : m.files) {
    if (!f.has_crc) continue;
    Fd fd(::openat(dir.get(), f.path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd) {
      problems.push_back("'" + f.path + "' cannot be opened");
      continue;
    }
    uint32_t crc = 0;
    for (;;) {
      ssize_t n = ::read(fd.get(), buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      crc = crc32_update(crc, buf.data(), size_t(n));
    }
    if (crc != f.crc32) problems.push_back("'" + f.path + "' changed content (CRC32 mismatch)");
  }
  return problems;
}

}  // namespace hubfast
