#include "gzip_members.h"

#include <zlib.h>
#ifdef HUBFAST_HAVE_ISAL
#include <isa-l/igzip_lib.h>
#endif

#include <algorithm>
#include <climits>
#include <vector>

#include "hubfast/digest.h"
#include "hubfast/error.h"

namespace hubfast {
namespace {

constexpr size_t kOutBytes = 1 << 20;

[[noreturn]] void corrupt(const std::string& detail) {
  throw Error(ErrorKind::kIntegrity, "gzip stream is corrupt: " + detail);
}

// A stream of members: between two of them only zero padding (gzip(1)
// accepts it) may stand, and nothing may follow the padding. A subclass
// inflates one member's body.
class GzipMembers : public Decoder {
 public:
  void feed(const uint8_t* in, size_t n, const OutFn& out) final {
    while (n > 0) {
      if (!in_member_) {
        if (members_ > 0) {
          size_t skip = skip_between_members(in, n);
          in += skip;
          n -= skip;
          if (n == 0) return;
        }
        start_member();
        in_member_ = true;
      }
      bool ended = false;
      size_t used = inflate_member(in, n, out, &ended);
      in += used;
      n -= used;
      if (ended) {
        in_member_ = false;
        ++members_;
      }
    }
  }

  void finish(const OutFn&) final {
    if (in_member_)
      throw Error(ErrorKind::kIntegrity, "gzip stream is truncated: it ends before its trailer (CRC32, size)");
    if (members_ == 0) throw Error(ErrorKind::kIntegrity, "gzip stream is empty");
  }

  uint64_t units() const final { return members_; }

 protected:
  virtual void start_member() = 0;
  // Inflates from `in` until the member ends (*ended) or the input is used
  // up; returns the bytes it consumed.
  virtual size_t inflate_member(const uint8_t* in, size_t n, const OutFn& out, bool* ended) = 0;
  std::vector<uint8_t> out_ = std::vector<uint8_t>(kOutBytes);

 private:
  // Returns how many bytes to skip; 0 means a member starts here.
  size_t skip_between_members(const uint8_t* p, size_t n) {
    size_t i = 0;
    while (i < n && p[i] == 0) ++i;
    if (i > 0) saw_zero_ = true;
    if (i < n && (saw_zero_ || p[i] != 0x1f)) corrupt("garbage after the end of the compressed data");
    return i;
  }

  bool in_member_ = false;
  bool saw_zero_ = false;
  uint64_t members_ = 0;
};

class GzipZlib : public GzipMembers {
 public:
  GzipZlib() {
    if (inflateInit2(&zs_, 15 + 16) != Z_OK) throw Error(ErrorKind::kIO, "zlib init failed");
  }
  ~GzipZlib() override { inflateEnd(&zs_); }

 protected:
  void start_member() override { inflateReset(&zs_); }

  size_t inflate_member(const uint8_t* in, size_t n, const OutFn& out, bool* ended) override {
    uInt len = uInt(std::min<size_t>(n, UINT_MAX));
    zs_.next_in = const_cast<Bytef*>(in);
    zs_.avail_in = len;
    for (;;) {
      zs_.next_out = out_.data();
      zs_.avail_out = uInt(out_.size());
      int r = inflate(&zs_, Z_NO_FLUSH);
      if (r != Z_OK && r != Z_STREAM_END && r != Z_BUF_ERROR)
        corrupt(zs_.msg ? zs_.msg : "zlib error " + std::to_string(r));
      size_t produced = out_.size() - zs_.avail_out;
      if (produced) out(out_.data(), produced);
      if (r == Z_STREAM_END) {
        *ended = true;
        break;
      }
      if (zs_.avail_in == 0 && zs_.avail_out > 0) break;
    }
    return len - zs_.avail_in;
  }

 private:
  z_stream zs_{};
};

#ifdef HUBFAST_HAVE_ISAL
// RFC 1952 member header, parsed incrementally: ISA-L's own header parsing
// needs the whole header in one call (intel/isa-l#224), and a header can
// straddle the pipeline's chunks.
class GzipHeader {
 public:
  void reset() { *this = GzipHeader(); }
  bool done() const { return state_ == kDone; }

  // Consumes header bytes from p; returns how many it used.
  size_t consume(const uint8_t* p, size_t n) {
    size_t i = 0;
    while (i < n && state_ != kDone) {
      uint8_t c = p[i++];
      if (state_ != kHcrc) crc_ = crc32_update(crc_, &c, 1);
      switch (state_) {
        case kFixed:
          fixed_[pos_++] = c;
          if (pos_ == 10) {
            if (fixed_[0] != 0x1f || fixed_[1] != 0x8b) corrupt("not a gzip member (bad magic)");
            if (fixed_[2] != 8) corrupt("unsupported compression method");
            if (fixed_[3] & 0xE0) corrupt("reserved header flags set");
            flags_ = fixed_[3];
            pos_ = 0;
            next_after(kFixed);
          }
          break;
        case kXlen:
          xlen_ |= uint32_t(c) << (8 * pos_);
          if (++pos_ == 2) {
            pos_ = 0;
            if (xlen_ == 0) next_after(kExtra);
            else state_ = kExtra;
          }
          break;
        case kExtra:
          if (++pos_ == xlen_) {
            pos_ = 0;
            next_after(kExtra);
          }
          break;
        case kName:
          if (c == 0) next_after(kName);
          break;
        case kComment:
          if (c == 0) next_after(kComment);
          break;
        case kHcrc:
          hcrc_ |= uint32_t(c) << (8 * pos_);
          if (++pos_ == 2) {
            if (hcrc_ != (crc_ & 0xffff)) corrupt("header CRC mismatch");
            state_ = kDone;
          }
          break;
        case kDone:
          break;
      }
    }
    return i;
  }

 private:
  enum State { kFixed, kXlen, kExtra, kName, kComment, kHcrc, kDone };
  void next_after(State s) {
    // The optional fields, in RFC order: FEXTRA, FNAME, FCOMMENT, FHCRC.
    if (s < kXlen && (flags_ & 4)) { state_ = kXlen; return; }
    if (s < kName && (flags_ & 8)) { state_ = kName; return; }
    if (s < kComment && (flags_ & 16)) { state_ = kComment; return; }
    if (s < kHcrc && (flags_ & 2)) { state_ = kHcrc; return; }
    state_ = kDone;
  }
  State state_ = kFixed;
  uint8_t fixed_[10] = {};
  uint8_t flags_ = 0;
  uint32_t pos_ = 0, xlen_ = 0, hcrc_ = 0, crc_ = 0;
};

class GzipIsal : public GzipMembers {
 protected:
  void start_member() override {
    isal_inflate_init(st_.get());
    st_->crc_flag = ISAL_GZIP_NO_HDR_VER;  // raw deflate, then the trailer checked
    header_.reset();
  }

  size_t inflate_member(const uint8_t* in, size_t n, const OutFn& out, bool* ended) override {
    size_t header = 0;
    if (!header_.done()) {
      header = header_.consume(in, n);
      in += header;
      n -= header;
      if (n == 0) return header;
    }
    uint32_t len = uint32_t(std::min<size_t>(n, UINT32_MAX));
    st_->next_in = const_cast<uint8_t*>(in);
    st_->avail_in = len;
    for (;;) {
      st_->next_out = out_.data();
      st_->avail_out = uint32_t(out_.size());
      int r = isal_inflate(st_.get());
      if (r < 0) corrupt(isal_message(r));
      size_t produced = out_.size() - st_->avail_out;
      if (produced) out(out_.data(), produced);
      if (st_->block_state == ISAL_BLOCK_FINISH) {
        *ended = true;
        break;
      }
      if (st_->avail_in == 0 && st_->avail_out > 0) break;
    }
    return header + (len - st_->avail_in);
  }

 private:
  std::unique_ptr<inflate_state> st_ = std::make_unique<inflate_state>();  // ~100 KB
  GzipHeader header_;
};
#endif

}  // namespace

std::unique_ptr<Decoder> make_zlib_gzip_decoder() { return std::make_unique<GzipZlib>(); }

#ifdef HUBFAST_HAVE_ISAL
std::unique_ptr<Decoder> make_isal_gzip_decoder() { return std::make_unique<GzipIsal>(); }

std::string isal_message(int r) {
  switch (r) {
    case ISAL_INVALID_BLOCK: return "invalid deflate block";
    case ISAL_INVALID_SYMBOL: return "invalid deflate symbol";
    case ISAL_INVALID_LOOKBACK: return "invalid back-reference distance";
    case ISAL_INVALID_WRAPPER: return "invalid gzip header";
    case ISAL_UNSUPPORTED_METHOD: return "unsupported compression method";
    case ISAL_INCORRECT_CHECKSUM: return "a checksum does not match (header CRC, or CRC32/size in the trailer)";
    default: return "ISA-L error " + std::to_string(r);
  }
}
#endif

}  // namespace hubfast
