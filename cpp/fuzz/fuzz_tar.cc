// libFuzzer harness for TarReader alone (no disk: fast). Two oracles:
//  - invariants on every event: file data adds up to the declared size,
//    begin/end pair up, paths are normalised (no '..', '.', empty
//    components, leading '/', NUL);
//  - feeding the input in one piece and in uneven pieces gives the same
//    events and the same error (kind and message).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "hubfast/error.h"
#include "hubfast/tar.h"

namespace {

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_tar: %s\n", what.c_str());
  std::abort();
}

void check_path(const std::string& p, bool is_file) {
  if (p.empty()) {
    if (is_file) finding("a file with an empty path");
    finding("a directory event with an empty path");
  }
  if (p.find('\0') != std::string::npos) finding("NUL in path");
  if (p.front() == '/' || p.back() == '/') finding("path not normalised: " + p);
  size_t i = 0;
  while (i <= p.size()) {
    size_t j = p.find('/', i);
    if (j == std::string::npos) j = p.size();
    std::string c = p.substr(i, j - i);
    if (c.empty() || c == "." || c == "..") finding("bad component in " + p);
    i = j + 1;
  }
}

class LogSink : public hubfast::TarSink {
 public:
  std::string log;

  void directory(const hubfast::TarMember& m) override {
    if (open_) finding("directory inside a file");
    check_path(m.path, false);
    log += "D " + m.path + "\n";
  }
  void begin_file(const hubfast::TarMember& m) override {
    if (open_) finding("begin_file inside a file");
    check_path(m.path, true);
    open_ = true;
    size_ = m.size;
    got_ = 0;
    log += "F " + m.path + " " + std::to_string(m.size) + " " + std::to_string(m.mode) + "\n";
  }
  void file_data(const uint8_t* p, size_t n) override {
    if (!open_) finding("file_data outside a file");
    if (n == 0) finding("empty file_data");
    got_ += n;
    if (got_ > size_) finding("more data than declared");
    for (size_t i = 0; i < n; ++i) sum_ = sum_ * 31 + p[i];
  }
  void end_file() override {
    if (!open_) finding("end_file outside a file");
    if (got_ != size_) finding("end_file before all data");
    open_ = false;
    log += "E " + std::to_string(sum_) + "\n";
    sum_ = 0;
  }

 private:
  bool open_ = false;
  uint64_t size_ = 0, got_ = 0, sum_ = 0;
};

std::string run(const uint8_t* data, size_t size, bool pieces) {
  hubfast::TarLimits lim;
  lim.max_total_bytes = 1ull << 40;  // nothing is stored
  lim.max_members = 10000;
  LogSink sink;
  hubfast::TarReader reader(sink, lim);
  try {
    if (!pieces) {
      reader.feed(data, size);
    } else {
      size_t pos = 0, step = size % 13 + 1;
      while (pos < size) {
        size_t k = step < size - pos ? step : size - pos;
        reader.feed(data + pos, k);
        pos += k;
        step = (step * 7 + 3) % 1031 + 1;
      }
    }
    reader.finish();
    sink.log += "OK " + std::to_string(reader.members()) + " " + std::to_string(reader.member_bytes());
  } catch (const hubfast::Error& e) {
    sink.log += "ERROR " + std::to_string(int(e.kind())) + " " + e.what();
  }
  return sink.log;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string whole = run(data, size, false);
  std::string pieces = run(data, size, true);
  if (whole != pieces) {
    std::fprintf(stderr, "one piece:\n%s\n\nin pieces:\n%s\n", whole.c_str(), pieces.c_str());
    finding("feeding in pieces changed the result");
  }
  return 0;
}
