// Private to the parallel gzip decoder (pgzip.cc): compressed bytes held in
// fixed-size segments, a bit reader over them, our own deflate decoder that
// can start at any block boundary with an unknown window (16-bit output
// symbols, values >= 256 name "byte i of the unknown 32 KiB before the
// start"), and the block finder that locates block starts in a segment.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace hubfast {
namespace pgzip {

constexpr uint32_t kWindow = 32768;

// Corrupt or truncated data (on the true decoding path: kIntegrity).
class DecodeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Thrown out of a source when the job reading it was abandoned.
struct Cancelled {};

struct Segment {
  uint64_t index = 0;
  uint64_t base = 0;  // absolute offset of data[0] in the compressed stream
  std::vector<uint8_t> data;
};
using SegPtr = std::shared_ptr<const Segment>;

// Compressed bytes in segments of segment_bytes() (the last may be shorter).
// get() blocks until segment `index` exists; nullptr past the end of the
// stream; throws Cancelled when the caller's job was abandoned.
class SegmentSource {
 public:
  virtual ~SegmentSource() = default;
  virtual SegPtr get(uint64_t index) = 0;
  virtual uint64_t segment_bytes() const = 0;
};

// A contiguous buffer as a source (tests, validation helpers).
class BufferSource : public SegmentSource {
 public:
  BufferSource(const uint8_t* p, size_t n, uint64_t seg_bytes);
  SegPtr get(uint64_t index) override;
  uint64_t segment_bytes() const override { return seg_bytes_; }

 private:
  std::vector<SegPtr> segs_;
  uint64_t seg_bytes_;
};

// LSB-first bit reader across segments. Past the end of the stream it reads
// zeros, and throws DecodeError("truncated") once a consumer has used a bit
// beyond the end.
class BitReader {
 public:
  explicit BitReader(SegmentSource* src) : src_(src) {}

  void seek(uint64_t bitpos);
  uint64_t pos() const { return (seg_base_ + uint64_t(p_ - begin_) + overrun_) * 8 - bitcount_; }
  bool past_end() const { return overrun_ * 8 > bitcount_; }
  // No byte of the stream left (waits for data as needed).
  bool at_end() {
    refill();
    return bitcount_ <= overrun_ * 8;
  }
  void check_not_past_end() const;

  inline void refill() {
    if (bitcount_ <= 56) {
      if (end_ - p_ >= 8) {
        uint64_t v;
        std::memcpy(&v, p_, 8);
        bitbuf_ |= v << bitcount_;
        p_ += (63 - bitcount_) >> 3;
        bitcount_ |= 56;
      } else {
        refill_slow();
      }
    }
  }
  // Callers refill first; at most 56 bits.
  uint64_t peek() const { return bitbuf_; }
  void consume(unsigned n) {
    bitbuf_ >>= n;
    bitcount_ -= n;
  }
  uint32_t bits(unsigned n) {
    refill();
    uint32_t v = uint32_t(bitbuf_ & ((uint64_t(1) << n) - 1));
    consume(n);
    return v;
  }
  void align() { consume(bitcount_ & 7); }
  // Byte-aligned reads (after align()).
  uint8_t byte() { return uint8_t(bits(8)); }
  void read_bytes(uint8_t* dst, size_t n) { take_bytes(dst, n); }
  void skip_bytes(uint64_t n) { take_bytes(nullptr, n); }

 private:
  void take_bytes(uint8_t* dst, uint64_t n);
  void refill_slow();
  void load_segment(SegPtr s, uint64_t offset);

  SegmentSource* src_;
  SegPtr seg_;
  const uint8_t* begin_ = nullptr;
  const uint8_t* p_ = nullptr;
  const uint8_t* end_ = nullptr;
  uint64_t seg_base_ = 0;
  uint64_t next_index_ = 0;
  uint64_t overrun_ = 0;
  bool at_eof_ = false;
  uint64_t bitbuf_ = 0;
  unsigned bitcount_ = 0;
};

// Decoding table for one Huffman code. Entry layout (uint32):
//   bits 0-7   bits to consume (the code length)
//   bits 8-10  kind (Kind below)
//   bits 11-15 extra bits (lengths, distances) or subtable index bits
//   bits 16-31 value: literal, length base, distance base, subtable offset
struct HuffTable {
  enum Kind : uint32_t { kLit = 0, kLen = 1, kEob = 2, kSub = 3, kInvalid = 4, kDist = 5 };
  static uint32_t kind(uint32_t e) { return (e >> 8) & 7; }
  static uint32_t nbits(uint32_t e) { return e & 0xff; }
  static uint32_t extra(uint32_t e) { return (e >> 11) & 31; }
  static uint32_t value(uint32_t e) { return e >> 16; }

  unsigned root = 0;
  std::vector<uint32_t> t;

  inline uint32_t lookup(uint64_t bitbuf) const {
    uint32_t e = t[bitbuf & ((1u << root) - 1)];
    if (kind(e) == kSub) e = t[value(e) + ((bitbuf >> root) & ((1u << extra(e)) - 1))];
    return e;
  }
};

enum class CodeUse { kLitLen, kDist, kCodeLen };
// Builds `out` from code lengths. strict: complete codes only (the block
// finder); otherwise zlib's rules (an incomplete code only when it has a
// single code of length 1; an empty distance code).
bool build_table(const uint8_t* lens, unsigned n, CodeUse use, unsigned root, bool strict, HuffTable* out);

struct BlockTables {
  HuffTable lit, dist;
};
const BlockTables& fixed_tables();
// Reads a dynamic block header (after BFINAL and BTYPE). False: invalid.
bool read_dynamic_header(BitReader& br, bool strict, BlockTables* out);

// Parses a gzip member header at a byte-aligned position; returns the byte
// offset of the deflate data. Throws DecodeError.
uint64_t parse_gzip_header(BitReader& br);

// ---- our own inflater ------------------------------------------------------

// Decodes deflate blocks into 16-bit symbols. The buffer holds the 32 KiB
// window before the output: for a start at an unknown window, markers
// 256 + i (i = 0 oldest .. 32767 newest).
class MarkerInflater {
 public:
  using FlushFn = std::function<void(const uint16_t*, size_t)>;

  MarkerInflater(SegmentSource* src, size_t flush_syms, FlushFn flush);

  // Start at a block header at `bitpos`, or inside a stored block whose LEN
  // field is at `bytepos` (its header, BFINAL 0, already read).
  void start_at_block(uint64_t bitpos);
  void start_in_stored(uint64_t bytepos);

  // At a block boundary: the bit position of the next header.
  uint64_t pos() const { return br_.pos(); }
  BitReader& reader() { return br_; }
  // Peeks the next block header's three bits (BFINAL | BTYPE << 1).
  unsigned peek_header3() {
    br_.refill();
    return unsigned(br_.peek() & 7);
  }
  // Decodes one block; true when it was the final block of its member (the
  // reader then stands after it, not yet aligned).
  bool decode_block();

  // Output since the start (not counting the initial window).
  uint64_t produced() const { return emitted_ + (pos_ - flushed_); }
  // True when the last 32 KiB of output hold no marker.
  bool window_clean();
  // Replaces markers in the current window with the real bytes; window32k[i]
  // is the byte 32768 - i before the start position.
  void resolve_window(const uint8_t* window32k);
  // The last 32 KiB as bytes (only valid when window_clean()).
  void window_bytes(uint8_t* dst) const;
  // Hands the output not yet flushed to the flush callback.
  void flush();

 private:
  void decode_huffman(const BlockTables& tb);
  void decode_stored_body();
  void compact();

  BitReader br_;
  size_t flush_syms_;
  FlushFn flush_fn_;
  std::vector<uint16_t> buf_;
  size_t pos_ = 0;        // next write index in buf_
  size_t flushed_ = 0;    // buf_ index up to which output was flushed
  uint64_t emitted_ = 0;    // symbols handed to the flush callback
  uint64_t clean_after_ = 0;  // window cannot be clean before produced_ reaches this
  bool stored_pending_ = false;
  BlockTables dyn_;
};

// ---- block finder ----------------------------------------------------------

struct Boundary {
  enum Kind : uint8_t { kNone, kDynamic, kStored, kMember };
  Kind kind = kNone;
  // kDynamic: bit position of the block header; kStored: byte offset of the
  // LEN field of a non-final stored block; kMember: byte offset of a gzip
  // member header.
  uint64_t pos = 0;
  // The earliest bit position at which a decoder could be standing at this
  // boundary (for kStored the header lies in the 10 bits before LEN).
  uint64_t first_bit() const {
    switch (kind) {
      case kDynamic: return pos;
      case kStored: return pos * 8 - 10;
      case kMember: return pos * 8;
      default: return UINT64_MAX;
    }
  }
};

// The first block start found (and validated by decoding) in segment
// `index`, or kNone.
Boundary find_boundary(SegmentSource* src, uint64_t index);

// Candidate checks (exposed for the tests).
bool validate_dynamic(SegmentSource* src, uint64_t bitpos);
bool validate_stored(SegmentSource* src, uint64_t bytepos);
bool validate_member(SegmentSource* src, uint64_t bytepos);

}  // namespace pgzip
}  // namespace hubfast
