// A push parser for tar streams: ustar, pax extended headers (path, size),
// GNU long names and base-256 sizes. It validates and normalises member
// paths and refuses links, devices and FIFOs; writing is the sink's job.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace hubfast {

struct TarLimits {
  uint64_t max_total_bytes = 64ull << 30;  // sum of member sizes
  uint64_t max_members = 1000000;
  size_t max_path = 4096;                  // bytes of a member path (depth: kMaxTreeDepth, tree.h)
  size_t max_pax_header = 1 << 20;         // bytes of one pax/GNU header body
};

struct TarMember {
  std::string path;  // normalised: no leading '/', no '.', never '..'
  bool is_dir = false;
  uint64_t size = 0;
  uint32_t mode = 0644;
};

class TarSink {
 public:
  virtual ~TarSink() = default;
  virtual void directory(const TarMember& m) = 0;
  virtual void begin_file(const TarMember& m) = 0;
  virtual void file_data(const uint8_t* p, size_t n) = 0;
  virtual void end_file() = 0;
};

class TarReader {
 public:
  TarReader(TarSink& sink, const TarLimits& limits);
  void feed(const uint8_t* p, size_t n);
  // Throws kIntegrity unless the end-of-archive marker was seen.
  void finish();
  uint64_t members() const { return members_; }
  uint64_t member_bytes() const { return total_bytes_; }
  // The end-of-archive marker has been read. What follows it must be zeros
  // (record padding), and counts against max_total_bytes: a stream that goes
  // on decoding after the archive ends is bounded like one inside it.
  bool ended() const { return state_ == State::kEnd; }

  // Normalises an archive path (exposed for tests); throws kUnsafeArchive.
  static std::string normalize_path(const std::string& raw, size_t max_path);

 private:
  enum class State { kHeader, kData, kPadding, kExtension, kEnd };
  void on_header();
  void after_end(const uint8_t* p, size_t n);
  void start_member(char type, uint64_t size, uint32_t mode, std::string name);
  void on_extension_done();

  TarSink& sink_;
  TarLimits limits_;
  State state_ = State::kHeader;
  uint8_t block_[512];
  size_t block_fill_ = 0;
  uint64_t remaining_ = 0;  // bytes of member data or padding still due
  uint64_t padding_ = 0;
  int zero_blocks_ = 0;
  char ext_type_ = 0;       // 'x', 'g', 'L', 'K' while reading an extension
  std::string ext_body_;
  std::string pending_path_;   // from pax 'path' or GNU 'L'
  bool pending_size_set_ = false;
  uint64_t pending_size_ = 0;
  std::string current_name_;   // for messages while streaming data
  uint64_t members_ = 0;
  uint64_t total_bytes_ = 0;
  uint64_t trailing_ = 0;      // bytes after the end-of-archive marker
};

}  // namespace hubfast
