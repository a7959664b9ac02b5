// Writes tar members beneath one directory, through directory fds only:
// every path component is opened with O_NOFOLLOW, so nothing on disk can
// redirect a write outside the target.
#pragma once
#include <cstdint>
#include <map>
#include <string>

#include "hubfast/fd.h"
#include "hubfast/tar.h"
#include "hubfast/tree.h"  // remove_tree_at

namespace hubfast {

class DirWriter : public TarSink {
 public:
  // `root_fd` is an open directory; the writer does not own it.
  explicit DirWriter(int root_fd);
  void directory(const TarMember& m) override;
  void begin_file(const TarMember& m) override;
  void file_data(const uint8_t* p, size_t n) override;
  void end_file() override;

  struct FileInfo {
    uint64_t size = 0;
    uint32_t crc32 = 0;  // of the written bytes: lets `verify --deep` recheck
  };
  // Every regular file written, by path (a later duplicate member replaces it).
  const std::map<std::string, FileInfo>& written() const { return written_; }

  uint64_t files() const { return files_; }
  uint64_t dirs() const { return dirs_; }
  uint64_t bytes() const { return bytes_; }

 private:
  int dir_fd(const std::string& rel);  // creates missing directories
  void reserve_for(uint64_t upto);     // the current file's space, ahead of its data
  std::map<std::string, Fd> dirs_open_;
  Fd file_;
  std::string file_path_;
  uint64_t file_left_ = 0, file_size_ = 0, file_reserved_ = 0;
  uint32_t file_crc_ = 0;
  std::map<std::string, FileInfo> written_;
  uint64_t files_ = 0, dirs_ = 0, bytes_ = 0;
};

}  // namespace hubfast
