#include "hubfast/extract.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "hubfast/digest.h"
#include "hubfast/error.h"

namespace hubfast {
namespace {

constexpr size_t kMaxOpenDirs = 64;  // hostile archives may hold many dirs

// Opens (creating if missing) directory `name` beneath `parent`, never
// following a link.
Fd open_subdir(int parent, const std::string& name, const std::string& shown) {
  int fd = ::openat(parent, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) {
    if (::mkdirat(parent, name.c_str(), 0755) != 0 && errno != EEXIST)
      throw_errno("cannot create directory '" + shown + "'", errno);
    fd = ::openat(parent, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  }
  if (fd < 0) {
    if (errno == ELOOP || errno == ENOTDIR)
      throw Error(ErrorKind::kUnsafeArchive,
                  "'" + shown + "' is not a directory beneath the target (a link or a file)");
    throw_errno("cannot open directory '" + shown + "'", errno);
  }
  return Fd(fd);
}

}  // namespace

DirWriter::DirWriter(int root_fd) {
  int fd = ::fcntl(root_fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) throw_errno("dup", errno);
  dirs_open_.emplace("", Fd(fd));
}

int DirWriter::dir_fd(const std::string& rel) {
  auto it = dirs_open_.find(rel);
  if (it != dirs_open_.end()) return it->second.get();
  // Walk down from the deepest open ancestor, one component at a time (a loop:
  // the depth is bounded by the extractor's limit, the stack by nothing).
  size_t done = rel.size();
  while (done != 0 && !dirs_open_.count(rel.substr(0, done))) {
    size_t slash = rel.rfind('/', done - 1);
    done = slash == std::string::npos ? 0 : slash;
  }
  std::string cur = rel.substr(0, done);
  Fd fd(::fcntl(dirs_open_.at(cur).get(), F_DUPFD_CLOEXEC, 0));
  if (!fd) throw_errno("dup", errno);
  while (cur.size() < rel.size()) {
    size_t start = cur.empty() ? 0 : cur.size() + 1;
    size_t slash = rel.find('/', start);
    if (slash == std::string::npos) slash = rel.size();
    cur = rel.substr(0, slash);
    fd = open_subdir(fd.get(), rel.substr(start, slash - start), cur);
  }
  if (dirs_open_.size() >= kMaxOpenDirs) {
    // Keep the root; drop the rest (reopened on demand).
    Fd root = std::move(dirs_open_[""]);
    dirs_open_.clear();
    dirs_open_.emplace("", std::move(root));
  }
  int raw = fd.get();
  dirs_open_.emplace(rel, std::move(fd));
  return raw;
}

void DirWriter::directory(const TarMember& m) {
  dir_fd(m.path);
  ++dirs_;
}

void DirWriter::begin_file(const TarMember& m) {
  size_t slash = m.path.rfind('/');
  std::string parent = slash == std::string::npos ? "" : m.path.substr(0, slash);
  std::string leaf = slash == std::string::npos ? m.path : m.path.substr(slash + 1);
  int pfd = dir_fd(parent);
  // No setuid/setgid/sticky, no group or world write; always owner-writable.
  mode_t mode = (m.mode & 0755) | 0600;
  int fd = ::openat(pfd, leaf.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode);
  if (fd < 0) {
    if (errno == ELOOP || errno == EISDIR)
      throw Error(ErrorKind::kUnsafeArchive, "member '" + m.path + "' would replace a link or a directory");
    throw_errno("cannot create '" + m.path + "'", errno);
  }
  file_.reset(fd);
  file_path_ = m.path;
  file_left_ = file_size_ = m.size;
  file_crc_ = 0;
  written_.erase(m.path);
  file_reserved_ = 0;
}

// Space is reserved ahead of the data (ENOSPC early, fewer fragments), but
// only as far as the data that came makes plausible: at most twice what was
// written, never the declared size at once. A header costs nothing to forge,
// and a server that declares a huge member and then drips its bytes must not
// hold the disk meanwhile.
void DirWriter::reserve_for(uint64_t upto) {
  constexpr uint64_t kMinReserve = 8u << 20;
  if (file_size_ < (1u << 20) || upto <= file_reserved_) return;
  uint64_t target = std::min(file_size_, std::max(2 * upto, kMinReserve));
  int r = ::posix_fallocate(file_.get(), 0, off_t(target));
  if (r == ENOSPC || r == EDQUOT) throw_errno("no space for '" + file_path_ + "'", r);
  file_reserved_ = target;
}

void DirWriter::file_data(const uint8_t* p, size_t n) {
  if (n > file_left_) throw Error(ErrorKind::kIntegrity, "more data than declared for '" + file_path_ + "'");
  reserve_for(file_size_ - file_left_ + n);
  file_left_ -= n;
  file_crc_ = crc32_update(file_crc_, p, n);
  while (n > 0) {
    ssize_t w = ::write(file_.get(), p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot write '" + file_path_ + "'", errno);
    }
    p += w;
    n -= size_t(w);
    bytes_ += uint64_t(w);
  }
}

void DirWriter::end_file() {
  if (file_left_ != 0) throw Error(ErrorKind::kIntegrity, "member '" + file_path_ + "' is short");
  if (::close(file_.release()) != 0) throw_errno("cannot close '" + file_path_ + "'", errno);
  ++files_;
  written_[file_path_] = FileInfo{file_size_, file_crc_};
}

}  // namespace hubfast
