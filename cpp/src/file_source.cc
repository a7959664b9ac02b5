// A local archive as a Source.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "hubfast/error.h"
#include "hubfast/fd.h"
#include "hubfast/source.h"

namespace hubfast {
namespace {

class FileSource : public Source {
 public:
  explicit FileSource(std::string path) : path_(std::move(path)) {
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_errno("cannot open archive '" + path_ + "'", errno);
    fd_.reset(fd);
    struct stat st;
    if (::fstat(fd, &st) != 0) throw_errno("cannot stat '" + path_ + "'", errno);
    if (!S_ISREG(st.st_mode)) throw Error(ErrorKind::kInvalid, "'" + path_ + "' is not a regular file");
    size_ = st.st_size;
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  }

  void run(const EmitFn& emit, const CancelToken& cancel) override {
    std::vector<uint8_t> buf(1 << 20);
    for (;;) {
      cancel.throw_if_cancelled();
      ssize_t n = ::read(fd_.get(), buf.data(), buf.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        throw_errno("cannot read '" + path_ + "'", errno);
      }
      if (n == 0) break;
      emit(buf.data(), size_t(n));
    }
  }

  int64_t expected_size() const override { return size_; }
  std::string describe() const override { return path_; }

 private:
  std::string path_;
  Fd fd_;
  int64_t size_ = -1;
};

}  // namespace

std::unique_ptr<Source> make_file_source(const std::string& path) {
  return std::make_unique<FileSource>(path);
}

}  // namespace hubfast
