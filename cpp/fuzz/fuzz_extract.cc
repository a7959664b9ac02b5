// libFuzzer harness for the whole extractor: bytes -> Source -> pipeline
// (detect compression, decoder, TarReader, DirWriter) into a fresh temp
// directory, removed afterwards. hubfast::Error is the expected outcome of
// hostile input; anything else (a crash, a sanitizer report, another
// exception, a link or device on disk, a written size that disagrees with
// the stats) is a finding.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "hubfast/error.h"
#include "hubfast/extract.h"
#include "hubfast/fd.h"
#include "hubfast/pipeline.h"
#include "hubfast/source.h"

namespace {

// Feeds the input in pieces of varying size.
class BytesSource : public hubfast::Source {
 public:
  BytesSource(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  void run(const hubfast::EmitFn& emit, const hubfast::CancelToken& cancel) override {
    size_t pos = 0, step = 1;
    while (pos < n_) {
      cancel.throw_if_cancelled();
      size_t k = std::min(step, n_ - pos);
      emit(p_ + pos, k);
      pos += k;
      step = step * 5 % 4093 + 1;
    }
  }
  int64_t expected_size() const override { return int64_t(n_); }
  std::string describe() const override { return "fuzz input"; }

 private:
  const uint8_t* p_;
  size_t n_;
};

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_extract: %s\n", what.c_str());
  std::abort();
}

// The directory all inputs are extracted beneath; removed at exit.
struct Base {
  std::string path;
  hubfast::Fd parent, fd;
  Base() {
    const char* t = std::getenv("TMPDIR");
    std::string tmpl = std::string(t && *t ? t : "/tmp") + "/hubfast-fuzz-XXXXXX";
    if (!::mkdtemp(&tmpl[0])) finding("mkdtemp failed");
    path = tmpl;
    size_t slash = path.rfind('/');
    parent.reset(::open(slash == 0 ? "/" : path.substr(0, slash).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    fd.reset(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!parent || !fd) finding("cannot open " + path);
  }
  ~Base() {
    try {
      hubfast::remove_tree_at(parent.get(), path.substr(path.rfind('/') + 1));
    } catch (...) {
    }
  }
};

Base& base() {
  static Base b;
  return b;
}

// Every entry under `dir` is a regular file or a directory; returns the
// number of regular files.
uint64_t check_tree(int dir, const std::string& shown, int depth) {
  if (depth > 4096) finding("tree deeper than any path allowed: " + shown);
  int fd = ::openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  DIR* d = fd >= 0 ? ::fdopendir(fd) : nullptr;
  if (!d) finding("cannot list " + shown);
  uint64_t files = 0;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    struct stat st;
    if (::fstatat(::dirfd(d), n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) finding("cannot stat " + shown + n);
    if (S_ISREG(st.st_mode)) {
      if (st.st_mode & 07022) finding("unsafe mode on " + shown + n);
      ++files;
    } else if (S_ISDIR(st.st_mode)) {
      int sub = ::openat(::dirfd(d), n.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub < 0) finding("cannot open " + shown + n);
      files += check_tree(sub, shown + n + "/", depth + 1);
      ::close(sub);
    } else {
      finding("not a file or directory: " + shown + n);
    }
  }
  ::closedir(d);
  return files;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static uint64_t counter = 0;
  Base& b = base();
  std::string name = "in" + std::to_string(counter++);
  if (::mkdirat(b.fd.get(), name.c_str(), 0700) != 0) finding("mkdirat failed");
  hubfast::Fd target(::openat(b.fd.get(), name.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!target) finding("cannot open the target");

  hubfast::ExtractOptions opt;
  opt.limits.max_total_bytes = 64ull << 20;
  opt.limits.max_members = 10000;
  opt.decode.threads = 2;  // the parallel zstd decoder too
  opt.decode.xz_memlimit = 64ull << 20;
  opt.chunk_bytes = 1000;  // not a multiple of 512: headers straddle chunks
  opt.queue_chunks = 4;

  BytesSource src(data, size);
  try {
    hubfast::ExtractStats s = hubfast::extract(src, target.get(), opt, nullptr);
    // Success: what is on disk is what the stats say.
    uint64_t on_disk = check_tree(target.get(), "", 0);
    if (on_disk != s.tree.size()) finding("files on disk differ from stats.tree");
    uint64_t sum = 0;
    for (auto& [path, f] : s.tree) {
      struct stat st;
      if (::fstatat(target.get(), path.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) finding("missing: " + path);
      if (uint64_t(st.st_size) != f.size) finding("size differs: " + path);
      sum += f.size;
    }
    if (sum > s.bytes_out) finding("tree sizes exceed bytes_out");
    if (s.bytes_in != size) finding("bytes_in differs from the input size");
  } catch (const hubfast::Error&) {
    // Expected for hostile input. Whatever was written stays beneath target.
    check_tree(target.get(), "", 0);
  }
  target.reset();
  hubfast::remove_tree_at(b.fd.get(), name);
  return 0;
}
