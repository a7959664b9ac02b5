#include "hubfast/tar.h"

#include <cstring>

#include "hubfast/error.h"
#include "hubfast/tree.h"

namespace hubfast {
namespace {

[[noreturn]] void corrupt(const std::string& what) {
  throw Error(ErrorKind::kIntegrity, "tar archive is corrupt: " + what);
}

// A numeric header field: octal (NUL/space terminated) or GNU base-256.
uint64_t parse_number(const uint8_t* f, size_t len, const char* field) {
  if (f[0] & 0x80) {  // base-256, big endian; a negative value is refused
    if (f[0] & 0x40) corrupt(std::string("negative ") + field);
    uint64_t v = f[0] & 0x3f;
    for (size_t i = 1; i < len; ++i) {
      if (v >> 56) corrupt(std::string(field) + " overflows 64 bits");
      v = (v << 8) | f[i];
    }
    return v;
  }
  size_t i = 0;
  while (i < len && (f[i] == ' ' || f[i] == 0)) {
    if (f[i] == 0) return 0;  // empty field
    ++i;
  }
  uint64_t v = 0;
  bool any = false;
  for (; i < len; ++i) {
    uint8_t c = f[i];
    if (c == 0 || c == ' ') break;
    if (c < '0' || c > '7') corrupt(std::string("non-octal digit in ") + field);
    if (v >> 61) corrupt(std::string(field) + " overflows 64 bits");
    v = v * 8 + (c - '0');
    any = true;
  }
  for (; i < len; ++i)
    if (f[i] != 0 && f[i] != ' ') corrupt(std::string("garbage after ") + field);
  (void)any;
  return v;
}

std::string field_string(const uint8_t* f, size_t len) {
  size_t n = 0;
  while (n < len && f[n]) ++n;
  return std::string(reinterpret_cast<const char*>(f), n);
}

bool all_zero(const uint8_t* p, size_t n) {
  // Word by word: gigabytes of zeros may follow an archive.
  uint64_t any = 0;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    any |= w;
    if ((i & 4095) == 0 && any) return false;
  }
  for (; i < n; ++i) any |= p[i];
  return any == 0;
}

bool is_zero_block(const uint8_t* b) { return all_zero(b, 512); }

bool checksum_ok(const uint8_t* b) {
  uint64_t stored = parse_number(b + 148, 8, "header checksum");
  uint64_t usum = 0;
  int64_t ssum = 0;
  for (int i = 0; i < 512; ++i) {
    uint8_t c = (i >= 148 && i < 156) ? ' ' : b[i];
    usum += c;
    ssum += int8_t(c);
  }
  return stored == usum || int64_t(stored) == ssum;
}

}  // namespace

TarReader::TarReader(TarSink& sink, const TarLimits& limits) : sink_(sink), limits_(limits) {}

std::string TarReader::normalize_path(const std::string& raw, size_t max_path) {
  if (raw.size() > max_path)
    throw Error(ErrorKind::kLimit, "member path longer than " + std::to_string(max_path) +
                                       " bytes (limit max_path): " + raw.substr(0, 200) + "...");
  if (raw.find('\0') != std::string::npos)
    throw Error(ErrorKind::kUnsafeArchive, "member path contains a NUL byte: " + raw);
  std::string out;
  size_t i = 0, depth = 0;
  while (i <= raw.size()) {
    size_t j = raw.find('/', i);
    if (j == std::string::npos) j = raw.size();
    std::string comp = raw.substr(i, j - i);
    i = j + 1;
    if (comp.empty() || comp == ".") continue;
    if (comp == "..")
      throw Error(ErrorKind::kUnsafeArchive,
                  "member '" + raw + "' has a '..' component: it could land outside the target");
    if (comp.size() > 255)
      throw Error(ErrorKind::kLimit, "member '" + raw + "' has a path component over 255 bytes");
    if (++depth > kMaxTreeDepth)
      throw Error(ErrorKind::kLimit, "member '" + raw.substr(0, 200) + "...' is more than " +
                                         std::to_string(kMaxTreeDepth) + " directories deep (limit)");
    if (!out.empty()) out.push_back('/');
    out += comp;
  }
  return out;
}

void TarReader::feed(const uint8_t* p, size_t n) {
  while (n > 0) {
    switch (state_) {
      case State::kEnd:
        after_end(p, n);
        return;
      case State::kData: {
        size_t take = size_t(std::min<uint64_t>(remaining_, n));
        if (take) sink_.file_data(p, take);
        p += take;
        n -= take;
        remaining_ -= take;
        if (remaining_ == 0) {
          sink_.end_file();
          state_ = padding_ ? State::kPadding : State::kHeader;
          remaining_ = padding_;
        }
        break;
      }
      case State::kPadding: {
        size_t take = size_t(std::min<uint64_t>(remaining_, n));
        p += take;
        n -= take;
        remaining_ -= take;
        if (remaining_ == 0) state_ = State::kHeader;
        break;
      }
      case State::kExtension: {
        size_t take = size_t(std::min<uint64_t>(remaining_, n));
        ext_body_.append(reinterpret_cast<const char*>(p), take);
        p += take;
        n -= take;
        remaining_ -= take;
        if (remaining_ == 0) {
          on_extension_done();
          state_ = padding_ ? State::kPadding : State::kHeader;
          remaining_ = padding_;
        }
        break;
      }
      case State::kHeader: {
        size_t take = std::min<size_t>(512 - block_fill_, n);
        std::memcpy(block_ + block_fill_, p, take);
        block_fill_ += take;
        p += take;
        n -= take;
        if (block_fill_ == 512) {
          block_fill_ = 0;
          on_header();
        }
        break;
      }
    }
  }
}

void TarReader::after_end(const uint8_t* p, size_t n) {
  if (n > limits_.max_total_bytes - total_bytes_ - trailing_)
    throw Error(ErrorKind::kLimit, "more than " + std::to_string(limits_.max_total_bytes) +
                                       " bytes of members and data after the end-of-archive marker "
                                       "(limit max_total_bytes)");
  trailing_ += n;
  if (!all_zero(p, n))
    throw Error(ErrorKind::kIntegrity, "tar archive is corrupt: data other than zeros after the "
                                       "end-of-archive marker");
}

void TarReader::on_header() {
  if (is_zero_block(block_)) {
    if (++zero_blocks_ == 2) state_ = State::kEnd;
    return;
  }
  if (zero_blocks_) corrupt("a lone zero block in the middle of the archive");
  if (!checksum_ok(block_)) corrupt("header checksum mismatch (member " + std::to_string(members_ + 1) + ")");

  char type = char(block_[156]);
  uint64_t size = parse_number(block_ + 124, 12, "size field");
  uint32_t mode = uint32_t(parse_number(block_ + 100, 8, "mode field") & 07777);
  std::string name = field_string(block_, 100);
  bool ustar = std::memcmp(block_ + 257, "ustar\0", 6) == 0;
  if (ustar) {
    std::string prefix = field_string(block_ + 345, 155);
    if (!prefix.empty()) name = prefix + "/" + name;
  }

  if (type == 'x' || type == 'g' || type == 'L' || type == 'K') {
    if (size > limits_.max_pax_header)
      throw Error(ErrorKind::kLimit, "extended header of " + std::to_string(size) +
                                         " bytes exceeds the limit max_pax_header (" +
                                         std::to_string(limits_.max_pax_header) + ")");
    ext_type_ = type;
    ext_body_.clear();
    remaining_ = size;
    padding_ = (512 - size % 512) % 512;
    state_ = State::kExtension;
    if (size == 0) {
      on_extension_done();
      state_ = State::kHeader;
    }
    return;
  }
  start_member(type, size, mode, std::move(name));
}

void TarReader::on_extension_done() {
  if (ext_type_ == 'L') {
    pending_path_ = field_string(reinterpret_cast<const uint8_t*>(ext_body_.data()), ext_body_.size());
  } else if (ext_type_ == 'x') {
    // Records: "<len> <key>=<value>\n", len counting the whole record.
    size_t pos = 0;
    while (pos < ext_body_.size()) {
      size_t sp = ext_body_.find(' ', pos);
      if (sp == std::string::npos || sp - pos > 20) corrupt("malformed pax record");
      uint64_t len = 0;
      for (size_t i = pos; i < sp; ++i) {
        char c = ext_body_[i];
        if (c < '0' || c > '9') corrupt("malformed pax record length");
        len = len * 10 + uint64_t(c - '0');
        if (len > ext_body_.size()) corrupt("pax record longer than its header");
      }
      // len <= size() - pos: never wraps (a length near 2^64 would loop forever).
      if (len <= sp - pos + 1 || len > ext_body_.size() - pos || ext_body_[pos + len - 1] != '\n')
        corrupt("malformed pax record");
      std::string rec = ext_body_.substr(sp + 1, pos + len - 1 - (sp + 1));
      size_t eq = rec.find('=');
      if (eq == std::string::npos) corrupt("pax record without '='");
      std::string key = rec.substr(0, eq), value = rec.substr(eq + 1);
      if (key == "path") {
        pending_path_ = value;
        if (pending_path_.empty()) corrupt("empty pax path");
      } else if (key == "size") {
        if (value.empty() || value.size() > 20) corrupt("bad pax size");
        uint64_t v = 0;
        for (char c : value) {
          if (c < '0' || c > '9') corrupt("bad pax size");
          if (v > (UINT64_MAX - 9) / 10) corrupt("pax size overflows 64 bits");
          v = v * 10 + uint64_t(c - '0');
        }
        pending_size_ = v;
        pending_size_set_ = true;
      }
      pos += len;
    }
  }
  // 'g' (global pax) and 'K' (GNU long link name) carry nothing we use:
  // links are refused when their header arrives.
}

void TarReader::start_member(char type, uint64_t size, uint32_t mode, std::string name) {
  if (!pending_path_.empty()) name = std::move(pending_path_);
  if (pending_size_set_) size = pending_size_;
  pending_path_.clear();
  pending_size_set_ = false;

  if (++members_ > limits_.max_members)
    throw Error(ErrorKind::kLimit, "archive has more than " + std::to_string(limits_.max_members) +
                                       " members (limit max_members)");
  std::string shown = name.substr(0, 300);
  switch (type) {
    case '1':
      throw Error(ErrorKind::kUnsafeArchive, "member '" + shown + "' is a hard link: links are refused");
    case '2':
      throw Error(ErrorKind::kUnsafeArchive, "member '" + shown + "' is a symbolic link: links are refused");
    case '3':
    case '4':
      throw Error(ErrorKind::kUnsafeArchive, "member '" + shown + "' is a device: devices are refused");
    case '6':
      throw Error(ErrorKind::kUnsafeArchive, "member '" + shown + "' is a FIFO: FIFOs are refused");
    case '0':
    case '\0':
    case '7':
    case '5':
      break;
    default:
      throw Error(ErrorKind::kUnsafeArchive, "member '" + shown + "' has unsupported type '" +
                                                 std::string(1, type) + "'");
  }

  TarMember m;
  // A pre-POSIX archive marks directories by a trailing '/' on a regular entry.
  bool v7_dir = type == '\0' && !name.empty() && name.back() == '/';
  m.path = normalize_path(name, limits_.max_path);
  m.mode = mode;
  m.is_dir = type == '5' || v7_dir;
  if (m.is_dir) {
    // A directory's size field carries no data in any format we accept.
    if (!m.path.empty()) sink_.directory(m);
    return;
  }
  if (m.path.empty())
    throw Error(ErrorKind::kUnsafeArchive, "member '" + shown + "' is a file named like the target itself");
  if (size > limits_.max_total_bytes || size > limits_.max_total_bytes - total_bytes_)
    throw Error(ErrorKind::kLimit, "archive members exceed " + std::to_string(limits_.max_total_bytes) +
                                       " bytes in total (limit max_total_bytes) at '" + m.path + "'");
  total_bytes_ += size;
  m.size = size;
  current_name_ = m.path;
  sink_.begin_file(m);
  remaining_ = size;
  padding_ = (512 - size % 512) % 512;
  if (size == 0) {
    sink_.end_file();
    state_ = State::kHeader;
  } else {
    state_ = State::kData;
  }
}

void TarReader::finish() {
  if (state_ == State::kEnd) return;
  if (state_ == State::kData)
    corrupt("it ends inside member '" + current_name_ + "' (" + std::to_string(remaining_) + " bytes missing)");
  if (state_ != State::kHeader || block_fill_ != 0) corrupt("it ends inside a header");
  corrupt(zero_blocks_ ? "it ends after one of the two end-of-archive blocks"
                       : "it ends without the end-of-archive marker (truncated at a member boundary?)");
}

}  // namespace hubfast
