#include "hubfast/tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "hubfast/error.h"
#include "hubfast/fd.h"

namespace hubfast {
namespace {

constexpr int kDirFlags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;

struct Level {
  std::string name;  // beneath the level above (level 0: beneath the base fd)
  Fd fd;             // closed when out of the window; reopened by name on the way back up
  dev_t dev = 0;
  ino_t ino = 0;
  std::vector<std::string> subdirs;  // still to visit
};

struct Entry {
  std::string name;
  bool is_dir;
  uint64_t size;
  bool is_reg;
};

// A stack of open-or-reopenable directories: depth costs memory for names, not
// descriptors (at most kWalkOpenDirs + 1 are open at once).
class DirStack {
 public:
  explicit DirStack(int base) : base_(base) {}

  // Opens `name` beneath the top (or beneath the base when empty). false: it is gone,
  // or not a directory (*not_dir).
  bool push(const std::string& name, bool* not_dir) {
    int parent = levels_.empty() ? base_ : fd(levels_.size() - 1);
    Fd f(::openat(parent, name.c_str(), kDirFlags));
    *not_dir = false;
    if (!f) {
      if (errno == ENOENT) return false;
      if (errno == ENOTDIR || errno == ELOOP) {
        *not_dir = true;
        return false;
      }
      throw_errno("cannot open directory '" + path_of(name) + "'", errno);
    }
    struct stat st;
    if (::fstat(f.get(), &st) != 0) throw_errno("stat", errno);
    Level l;
    l.name = name;
    l.fd = std::move(f);
    l.dev = st.st_dev;
    l.ino = st.st_ino;
    levels_.push_back(std::move(l));
    trim(levels_.size() - 1);
    return true;
  }

  void pop() { levels_.pop_back(); }
  bool empty() const { return levels_.empty(); }
  size_t size() const { return levels_.size(); }
  Level& top() { return levels_.back(); }
  int parent_fd() { return levels_.size() < 2 ? base_ : fd(levels_.size() - 2); }

  // The descriptor of level i, reopening it (and those above it) when closed.
  int fd(size_t i) {
    if (levels_[i].fd) return levels_[i].fd.get();
    size_t j = i;
    while (j > 0 && !levels_[j - 1].fd) --j;
    for (size_t k = j; k <= i; ++k) {
      int parent = k == 0 ? base_ : levels_[k - 1].fd.get();
      Fd f(::openat(parent, levels_[k].name.c_str(), kDirFlags));
      struct stat st;
      if (!f || ::fstat(f.get(), &st) != 0 || st.st_dev != levels_[k].dev || st.st_ino != levels_[k].ino)
        throw Error(ErrorKind::kIO, "the tree at '" + path_of("") + "' changed while it was walked");
      levels_[k].fd = std::move(f);
      trim(k);
    }
    return levels_[i].fd.get();
  }

  // "a/b/c" for the levels below the first, plus `leaf`.
  std::string path_of(const std::string& leaf) const {
    std::string p;
    for (size_t k = 1; k < levels_.size(); ++k) p += levels_[k].name + "/";
    return p + leaf;
  }

 private:
  // Keep level 0 and the kWalkOpenDirs levels ending at `k` open.
  void trim(size_t k) {
    if (k > kWalkOpenDirs) levels_[k - kWalkOpenDirs].fd.reset();
  }
  int base_;
  std::vector<Level> levels_;
};

std::vector<Entry> read_entries(int dir_fd, const std::string& shown) {
  int dup = ::openat(dir_fd, ".", kDirFlags);
  if (dup < 0) throw_errno("cannot list '" + shown + "'", errno);
  DIR* d = ::fdopendir(dup);
  if (!d) {
    int e = errno;
    ::close(dup);
    throw_errno("cannot list '" + shown + "'", e);
  }
  std::vector<Entry> out;
  errno = 0;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    struct stat st;
    if (::fstatat(::dirfd(d), n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;  // gone meanwhile
    out.push_back({n, S_ISDIR(st.st_mode), uint64_t(st.st_size), S_ISREG(st.st_mode)});
  }
  ::closedir(d);
  return out;
}

Error too_deep(const std::string& path, size_t max_depth) {
  return Error(ErrorKind::kLimit, "'" + path.substr(0, 200) + "...' is more than " + std::to_string(max_depth) +
                                      " directories deep (hubfast's tree depth limit); left as it is");
}

}  // namespace

std::vector<TreeFile> list_tree(int dir_fd, size_t max_depth) {
  std::vector<TreeFile> out;
  DirStack s(dir_fd);
  bool not_dir = false;
  if (!s.push(".", &not_dir)) throw_errno("cannot list the tree", not_dir ? ENOTDIR : ENOENT);
  auto visit = [&] {
    size_t depth = s.size();  // of the entries read now: level 0's entries are at depth 1
    for (auto& e : read_entries(s.fd(s.size() - 1), s.path_of(""))) {
      if (!e.is_dir && !e.is_reg) continue;
      if (depth > max_depth) throw too_deep(s.path_of(e.name), max_depth);
      if (e.is_dir) s.top().subdirs.push_back(e.name);
      else out.push_back({s.path_of(e.name), e.size});
    }
  };
  visit();
  while (!s.empty()) {
    if (s.top().subdirs.empty()) {
      s.pop();
      continue;
    }
    std::string n = std::move(s.top().subdirs.back());
    s.top().subdirs.pop_back();
    if (s.push(n, &not_dir)) visit();
  }
  return out;
}

void remove_tree_at(int parent_fd, const std::string& name) {
  DirStack s(parent_fd);
  bool not_dir = false;
  auto unlink_file = [](int dir, const std::string& n, const std::string& shown) {
    if (::unlinkat(dir, n.c_str(), 0) != 0 && errno != ENOENT) throw_errno("cannot remove '" + shown + "'", errno);
  };
  if (!s.push(name, &not_dir)) {
    if (not_dir) unlink_file(parent_fd, name, name);
    return;
  }
  // Files go as each directory is first read; a directory once it is empty.
  auto visit = [&] {
    int fd = s.fd(s.size() - 1);
    for (auto& e : read_entries(fd, name + "/" + s.path_of(""))) {
      if (e.is_dir) s.top().subdirs.push_back(e.name);
      else unlink_file(fd, e.name, name + "/" + s.path_of(e.name));
    }
  };
  visit();
  while (!s.empty()) {
    if (s.top().subdirs.empty()) {
      std::string n = s.top().name, shown = name + "/" + s.path_of("");
      s.top().fd.reset();
      int parent = s.parent_fd();
      if (::unlinkat(parent, n.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT)
        throw_errno("cannot remove directory '" + shown + "'", errno);
      s.pop();
      continue;
    }
    std::string n = std::move(s.top().subdirs.back());
    s.top().subdirs.pop_back();
    if (s.push(n, &not_dir)) visit();
    else if (not_dir) unlink_file(s.fd(s.size() - 1), n, name + "/" + s.path_of(n));
  }
}

}  // namespace hubfast
