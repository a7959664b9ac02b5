// Our own deflate decoding for the parallel gzip decoder: what ISA-L cannot
// do (start at an arbitrary block boundary with an unknown window, find and
// validate block starts). The bulk of the bytes is inflated by ISA-L.
#include "pgzip_inflate.h"

#include <zlib.h>

#include <algorithm>

namespace hubfast {
namespace pgzip {
namespace {

// RFC 1951, 3.2.5.
constexpr uint16_t kLenBase[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                   31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
constexpr uint8_t kLenExtra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                   2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
constexpr uint16_t kDistBase[30] = {1,   2,   3,   4,   5,   7,    9,    13,   17,   25,   33,   49,   65,    97,    129,
                                    193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
constexpr uint8_t kDistExtra[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6,
                                    6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
constexpr uint8_t kClOrder[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};

constexpr uint32_t entry(uint32_t kind, uint32_t nbits, uint32_t extra, uint32_t value) {
  return nbits | (kind << 8) | (extra << 11) | (value << 16);
}

uint32_t symbol_entry(CodeUse use, unsigned sym, unsigned len) {
  switch (use) {
    case CodeUse::kLitLen:
      if (sym < 256) return entry(HuffTable::kLit, len, 0, sym);
      if (sym == 256) return entry(HuffTable::kEob, len, 0, 0);
      if (sym <= 285) return entry(HuffTable::kLen, len, kLenExtra[sym - 257], kLenBase[sym - 257]);
      return entry(HuffTable::kInvalid, len, 0, 0);
    case CodeUse::kDist:
      if (sym < 30) return entry(HuffTable::kDist, len, kDistExtra[sym], kDistBase[sym]);
      return entry(HuffTable::kInvalid, len, 0, 0);
    case CodeUse::kCodeLen:
      return entry(HuffTable::kLit, len, 0, sym);
  }
  return entry(HuffTable::kInvalid, 0, 0, 0);
}

[[noreturn]] void fail(const char* what) { throw DecodeError(what); }

}  // namespace

// ---- sources -----------------------------------------------------------------

BufferSource::BufferSource(const uint8_t* p, size_t n, uint64_t seg_bytes) : seg_bytes_(seg_bytes) {
  for (uint64_t off = 0, i = 0; off < n; off += seg_bytes, ++i) {
    auto s = std::make_shared<Segment>();
    s->index = i;
    s->base = off;
    s->data.assign(p + off, p + std::min<uint64_t>(n, off + seg_bytes));
    segs_.push_back(std::move(s));
  }
}

SegPtr BufferSource::get(uint64_t index) { return index < segs_.size() ? segs_[index] : nullptr; }

// ---- bit reader ----------------------------------------------------------------

void BitReader::load_segment(SegPtr s, uint64_t offset) {
  seg_ = std::move(s);
  begin_ = seg_->data.data();
  p_ = begin_ + offset;
  end_ = begin_ + seg_->data.size();
  seg_base_ = seg_->base;
  next_index_ = seg_->index + 1;
}

void BitReader::seek(uint64_t bitpos) {
  uint64_t byte = bitpos / 8;
  uint64_t index = byte / src_->segment_bytes();
  bitbuf_ = 0;
  bitcount_ = 0;
  overrun_ = 0;
  at_eof_ = false;
  SegPtr s = src_->get(index);
  if (s && byte < s->base + s->data.size()) {
    const uint64_t offset = byte - s->base;
    load_segment(std::move(s), offset);
  } else {
    seg_.reset();
    begin_ = p_ = end_ = nullptr;
    seg_base_ = byte;
    next_index_ = index + 1;
    if (!s) at_eof_ = true;  // else: at the end of a full segment, the next follows
  }
  refill();
  consume(unsigned(bitpos & 7));
}

void BitReader::refill_slow() {
  if (past_end()) fail("gzip stream is truncated");
  while (bitcount_ <= 56) {
    if (p_ < end_) {
      bitbuf_ |= uint64_t(*p_++) << bitcount_;
      bitcount_ += 8;
      continue;
    }
    if (!at_eof_) {
      SegPtr s = src_->get(next_index_);
      if (s && !s->data.empty()) {
        load_segment(std::move(s), 0);
        continue;
      }
      at_eof_ = true;
    }
    ++overrun_;  // zeros past the end
    bitcount_ += 8;
  }
}

void BitReader::check_not_past_end() const {
  if (past_end()) fail("gzip stream is truncated");
}

// Whole bytes from the stream: the bits buffered first, then straight from
// the segments; copied to dst, or dropped when dst is null.
void BitReader::take_bytes(uint8_t* dst, uint64_t n) {
  while (n && bitcount_ >= 8) {
    if (dst) *dst++ = uint8_t(bitbuf_);
    consume(8);
    --n;
  }
  check_not_past_end();
  if (n == 0) return;
  bitbuf_ = 0;
  bitcount_ = 0;
  while (n) {
    if (p_ == end_) {
      SegPtr s = at_eof_ ? nullptr : src_->get(next_index_);
      if (!s || s->data.empty()) {
        at_eof_ = true;
        fail("gzip stream is truncated");
      }
      load_segment(std::move(s), 0);
      continue;
    }
    size_t k = size_t(std::min<uint64_t>(n, uint64_t(end_ - p_)));
    if (dst) {
      std::memcpy(dst, p_, k);
      dst += k;
    }
    p_ += k;
    n -= k;
  }
}

// ---- Huffman tables ----------------------------------------------------------

bool build_table(const uint8_t* lens, unsigned n, CodeUse use, unsigned root, bool strict, HuffTable* out) {
  uint16_t count[16] = {0};
  for (unsigned i = 0; i < n; ++i) ++count[lens[i]];
  count[0] = 0;
  int left = 1;
  unsigned maxlen = 0;
  for (unsigned len = 1; len <= 15; ++len) {
    left <<= 1;
    left -= count[len];
    if (left < 0) return false;  // over-subscribed
    if (count[len]) maxlen = len;
  }
  if (left > 0) {
    if (strict || use == CodeUse::kCodeLen) return false;
    if (maxlen == 0) {
      if (use != CodeUse::kDist) return false;
    } else if (maxlen != 1) {
      return false;
    }
  }
  // Canonical codes (RFC 1951, 3.2.2).
  uint16_t next[16];
  uint32_t code = 0;
  for (unsigned len = 1; len <= 15; ++len) {
    code = (code + count[len - 1]) << 1;
    next[len] = uint16_t(code);
  }
  if (root > maxlen && maxlen > 0) root = maxlen;
  if (maxlen == 0) root = 1;
  out->root = root;
  uint32_t codes[320];
  uint8_t sub_bits[1 << 11];
  uint32_t rootmask = (1u << root) - 1;
  std::memset(sub_bits, 0, size_t(1) << root);
  for (unsigned s = 0; s < n; ++s) {
    unsigned len = lens[s];
    if (!len) continue;
    uint32_t c = next[len]++;
    uint32_t r = 0;
    for (unsigned b = 0; b < len; ++b) r |= ((c >> b) & 1u) << (len - 1 - b);
    codes[s] = r;
    if (len > root) {
      uint8_t& sb = sub_bits[r & rootmask];
      sb = uint8_t(std::max<unsigned>(sb, len - root));
    }
  }
  size_t total = size_t(1) << root;
  uint32_t offsets[1 << 11];
  for (uint32_t i = 0; i <= rootmask; ++i) {
    if (sub_bits[i]) {
      offsets[i] = uint32_t(total);
      total += size_t(1) << sub_bits[i];
    }
  }
  out->t.assign(total, entry(HuffTable::kInvalid, 0, 0, 0));
  uint32_t* t = out->t.data();
  for (uint32_t i = 0; i <= rootmask; ++i)
    if (sub_bits[i]) t[i] = entry(HuffTable::kSub, root, sub_bits[i], offsets[i]);
  for (unsigned s = 0; s < n; ++s) {
    unsigned len = lens[s];
    if (!len) continue;
    uint32_t r = codes[s];
    uint32_t e = symbol_entry(use, s, len);
    if (len <= root) {
      for (uint32_t k = r; k <= rootmask; k += 1u << len) t[k] = e;
    } else {
      uint32_t pre = r & rootmask;
      uint32_t sb = sub_bits[pre];
      uint32_t base = offsets[pre];
      for (uint32_t k = r >> root; k < (1u << sb); k += 1u << (len - root)) t[base + k] = e;
    }
  }
  return true;
}

const BlockTables& fixed_tables() {
  static const BlockTables tables = [] {
    BlockTables tb;
    uint8_t lens[288];
    std::fill(lens, lens + 144, 8);
    std::fill(lens + 144, lens + 256, 9);
    std::fill(lens + 256, lens + 280, 7);
    std::fill(lens + 280, lens + 288, 8);
    build_table(lens, 288, CodeUse::kLitLen, 10, false, &tb.lit);
    uint8_t d[32];
    std::fill(d, d + 32, 5);
    build_table(d, 32, CodeUse::kDist, 8, false, &tb.dist);
    return tb;
  }();
  return tables;
}

bool read_dynamic_header(BitReader& br, bool strict, BlockTables* out) {
  br.refill();
  uint64_t v = br.peek();
  unsigned hlit = unsigned(v & 31) + 257;
  unsigned hdist = unsigned((v >> 5) & 31) + 1;
  unsigned hclen = unsigned((v >> 10) & 15) + 4;
  br.consume(14);
  if (hlit > 286 || hdist > 30) return false;
  uint8_t cl[19] = {0};
  // Up to 57 bits: more than one refill guarantees (56).
  for (unsigned i = 0; i < hclen; ++i) {
    if ((i & 7) == 0) br.refill();
    cl[kClOrder[i]] = uint8_t(br.peek() & 7);
    br.consume(3);
  }
  thread_local HuffTable clt;
  if (!build_table(cl, 19, CodeUse::kCodeLen, 7, true, &clt)) return false;
  uint8_t lens[320];
  unsigned n = 0, total = hlit + hdist;
  while (n < total) {
    br.refill();
    uint32_t e = clt.lookup(br.peek());
    br.consume(HuffTable::nbits(e));
    unsigned sym = HuffTable::value(e);
    if (sym < 16) {
      lens[n++] = uint8_t(sym);
      continue;
    }
    unsigned rep;
    uint8_t val = 0;
    if (sym == 16) {
      if (n == 0) return false;
      val = lens[n - 1];
      rep = 3 + unsigned(br.peek() & 3);
      br.consume(2);
    } else if (sym == 17) {
      rep = 3 + unsigned(br.peek() & 7);
      br.consume(3);
    } else {
      rep = 11 + unsigned(br.peek() & 127);
      br.consume(7);
    }
    if (n + rep > total) return false;
    std::memset(lens + n, val, rep);
    n += rep;
  }
  if (lens[256] == 0) return false;
  if (!build_table(lens, hlit, CodeUse::kLitLen, 10, strict, &out->lit)) return false;
  if (!build_table(lens + hlit, hdist, CodeUse::kDist, 8, strict, &out->dist)) return false;
  return true;
}

uint64_t parse_gzip_header(BitReader& br) {
  uint8_t h[10];
  br.read_bytes(h, 10);
  if (h[0] != 0x1f || h[1] != 0x8b) fail("invalid gzip header");
  if (h[2] != 8) fail("unsupported compression method");
  uint8_t flg = h[3];
  if (flg & 0xe0) fail("reserved header flags set");
  uLong crc = crc32(0, h, 10);
  uint8_t buf[4096];
  if (flg & 4) {
    uint8_t x[2];
    br.read_bytes(x, 2);
    crc = crc32(crc, x, 2);
    size_t xlen = size_t(x[0]) | size_t(x[1]) << 8;
    while (xlen) {
      size_t k = std::min(xlen, sizeof buf);
      br.read_bytes(buf, k);
      crc = crc32(crc, buf, uInt(k));
      xlen -= k;
    }
  }
  for (uint8_t f : {uint8_t(8), uint8_t(16)}) {
    if (!(flg & f)) continue;
    size_t k = 0;
    for (;;) {
      uint8_t c;
      br.read_bytes(&c, 1);
      buf[k++] = c;
      if (k == sizeof buf || c == 0) {
        crc = crc32(crc, buf, uInt(k));
        k = 0;
      }
      if (c == 0) break;
    }
  }
  if (flg & 2) {
    uint8_t c[2];
    br.read_bytes(c, 2);
    if ((crc & 0xffff) != (uLong(c[0]) | uLong(c[1]) << 8)) fail("header crc mismatch");
  }
  br.check_not_past_end();
  return br.pos() / 8;
}

// ---- validation-only decoding (no output kept) --------------------------------

namespace {

// Decodes one Huffman block, checking symbols and distances; `hist` is the
// window available before the candidate (32 KiB mid-stream, 0 at a member
// start). Returns false on invalid data; stops early (true) past `limit`.
bool validate_huffman(BitReader& br, const BlockTables& tb, uint64_t hist, uint64_t* produced, uint64_t limit) {
  uint64_t out = *produced;
  for (;;) {
    br.refill();
    uint32_t e = tb.lit.lookup(br.peek());
    uint32_t k = HuffTable::kind(e);
    br.consume(HuffTable::nbits(e));
    if (k == HuffTable::kLit) {
      ++out;
    } else if (k == HuffTable::kLen) {
      uint32_t len = HuffTable::value(e) + uint32_t(br.peek() & ((1u << HuffTable::extra(e)) - 1));
      br.consume(HuffTable::extra(e));
      uint32_t d = tb.dist.lookup(br.peek());
      if (HuffTable::kind(d) != HuffTable::kDist) return false;
      br.consume(HuffTable::nbits(d));
      uint32_t dist = HuffTable::value(d) + uint32_t(br.peek() & ((1u << HuffTable::extra(d)) - 1));
      br.consume(HuffTable::extra(d));
      if (dist > hist + out) return false;
      out += len;
    } else if (k == HuffTable::kEob) {
      break;
    } else {
      return false;
    }
    if (out > limit) break;
  }
  *produced = out;
  return !br.past_end();
}

// At a block boundary after a validated block: is what follows plausible?
bool validate_next(BitReader& br, uint64_t hist, uint64_t produced) {
  unsigned h = br.bits(3);
  unsigned type = h >> 1;
  if (type == 3) return false;
  if (type == 0) {
    br.align();
    uint32_t len = br.bits(16), nlen = br.bits(16);
    return len == (~nlen & 0xffff) && !br.past_end();
  }
  if (type == 2) {
    thread_local BlockTables tb;
    return read_dynamic_header(br, false, &tb) && !br.past_end();
  }
  return validate_huffman(br, fixed_tables(), hist, &produced, produced + (1u << 20));
}

}  // namespace

bool validate_dynamic(SegmentSource* src, uint64_t bitpos) {
  try {
    BitReader br(src);
    br.seek(bitpos);
    if (br.bits(3) != 4) return false;
    thread_local BlockTables tb;
    if (!read_dynamic_header(br, true, &tb)) return false;
    uint64_t produced = 0;
    if (!validate_huffman(br, tb, kWindow, &produced, 4u << 20)) return false;
    if (produced > (4u << 20)) return true;
    return validate_next(br, kWindow, produced);
  } catch (const DecodeError&) {
    return false;
  }
}

bool validate_stored(SegmentSource* src, uint64_t bytepos) {
  try {
    BitReader br(src);
    br.seek(bytepos * 8);
    uint32_t len = br.bits(16), nlen = br.bits(16);
    if (len != (~nlen & 0xffff)) return false;
    br.skip_bytes(len);
    return validate_next(br, kWindow, len);
  } catch (const DecodeError&) {
    return false;
  }
}

bool validate_member(SegmentSource* src, uint64_t bytepos) {
  try {
    BitReader br(src);
    br.seek(bytepos * 8);
    parse_gzip_header(br);
    unsigned h = br.bits(3);
    bool final = h & 1;
    unsigned type = h >> 1;
    uint64_t produced = 0;
    if (type == 3) return false;
    if (type == 0) {
      br.align();
      uint32_t len = br.bits(16), nlen = br.bits(16);
      if (len != (~nlen & 0xffff)) return false;
      br.skip_bytes(len);
      produced = len;
    } else {
      thread_local BlockTables tb;
      const BlockTables* t = &fixed_tables();
      if (type == 2) {
        if (!read_dynamic_header(br, false, &tb)) return false;
        t = &tb;
      }
      if (!validate_huffman(br, *t, 0, &produced, 4u << 20)) return false;
      if (produced > (4u << 20)) return true;
    }
    if (!final) return validate_next(br, 0, produced);
    br.align();
    uint8_t tr[8];
    br.read_bytes(tr, 8);
    uint32_t isize = uint32_t(tr[4]) | uint32_t(tr[5]) << 8 | uint32_t(tr[6]) << 16 | uint32_t(tr[7]) << 24;
    return isize == uint32_t(produced);
  } catch (const DecodeError&) {
    return false;
  }
}

// ---- block finder ------------------------------------------------------------

namespace {

struct FinderTables {
  uint16_t kraft4[1 << 12];  // Kraft sum (units of 1/128) of four 3-bit code lengths
  FinderTables() {
    for (uint32_t x = 0; x < (1u << 12); ++x) {
      uint32_t k = 0;
      for (int i = 0; i < 4; ++i) {
        uint32_t l = (x >> (3 * i)) & 7;
        if (l) k += 128u >> l;
      }
      kraft4[x] = uint16_t(k);
    }
  }
};
const FinderTables& finder_tables() {
  static const FinderTables t;
  return t;
}

inline uint64_t load_bits(const uint8_t* p, uint64_t bitpos) {
  uint64_t v;
  std::memcpy(&v, p + (bitpos >> 3), 8);
  return v >> (bitpos & 7);
}

// A quick look at a candidate dynamic header in memory (at least 320
// readable bytes from p): code lengths decoded, both codes complete, an
// end-of-block code. Most false candidates fail within a few symbols.
bool quick_dynamic(const uint8_t* p, unsigned bit) {
  uint64_t pos = bit;
  uint64_t x = load_bits(p, pos);
  unsigned hlit = unsigned((x >> 3) & 31) + 257;
  unsigned hdist = unsigned((x >> 8) & 31) + 1;
  unsigned hclen = unsigned((x >> 13) & 15) + 4;
  pos += 17;
  x = load_bits(p, pos);
  uint8_t cl[19] = {0};
  for (unsigned i = 0; i < hclen; ++i) cl[kClOrder[i]] = uint8_t((x >> (3 * i)) & 7);
  pos += 3 * hclen;
  // Code-length code (complete, checked by the caller): a 7-bit table.
  uint16_t count[8] = {0};
  for (unsigned i = 0; i < 19; ++i) ++count[cl[i]];
  count[0] = 0;
  uint16_t next[8];
  uint32_t code = 0;
  for (unsigned len = 1; len <= 7; ++len) {
    code = (code + count[len - 1]) << 1;
    next[len] = uint16_t(code);
  }
  uint16_t tab[128];
  for (unsigned sym = 0; sym < 19; ++sym) {
    unsigned len = cl[sym];
    if (!len) continue;
    uint32_t c = next[len]++, r = 0;
    for (unsigned b = 0; b < len; ++b) r |= ((c >> b) & 1u) << (len - 1 - b);
    for (uint32_t k = r; k < 128; k += 1u << len) tab[k] = uint16_t(sym | len << 8);
  }
  const unsigned total = hlit + hdist;
  unsigned n = 0, prev = 0;
  uint32_t klit = 0, kdist = 0;
  bool eob = false;
  while (n < total) {
    x = load_bits(p, pos);
    uint16_t e = tab[x & 127];
    unsigned len = e >> 8, sym = e & 255;
    pos += len;
    x >>= len;
    unsigned rep = 1, val = sym;
    if (sym == 16) {
      if (n == 0) return false;
      rep = 3 + unsigned(x & 3);
      pos += 2;
      val = prev;
    } else if (sym == 17) {
      rep = 3 + unsigned(x & 7);
      pos += 3;
      val = 0;
    } else if (sym == 18) {
      rep = 11 + unsigned(x & 127);
      pos += 7;
      val = 0;
    }
    if (n + rep > total) return false;
    if (val) {
      for (unsigned k = 0; k < rep; ++k, ++n) {
        if (n < hlit) {
          klit += 32768u >> val;
          if (n == 256) eob = true;
        } else {
          kdist += 32768u >> val;
        }
      }
      if (klit > 32768 || kdist > 32768) return false;
    } else {
      n += rep;
    }
    prev = val;
  }
  return eob && klit == 32768 && kdist == 32768;
}

}  // namespace

Boundary find_boundary(SegmentSource* src, uint64_t index) {
  SegPtr seg = src->get(index);
  if (!seg || seg->data.empty()) return {};
  const FinderTables& ft = finder_tables();
  const uint8_t* d = seg->data.data();
  const size_t n = seg->data.size();
  const uint64_t base = seg->base;
  // Candidates need up to ~320 bytes after them in memory: near the end of
  // the segment, read from a copy of its last bytes followed by the first
  // of the next segment (loaded only when the scan gets there).
  constexpr size_t kAhead = 512;
  std::vector<uint8_t> edge;
  size_t edge_from = 0;
  auto window = [&](size_t i) -> const uint8_t* {
    if (i + kAhead <= n) return d + i;
    if (edge.empty()) {
      edge_from = n > kAhead ? n - kAhead : 0;
      edge.assign(d + edge_from, d + n);
      SegPtr next = src->get(index + 1);
      if (next) edge.insert(edge.end(), next->data.begin(), next->data.begin() + long(std::min(next->data.size(), kAhead)));
      edge.resize(n - edge_from + kAhead + 16, 0);
    }
    return edge.data() + (i - edge_from);
  };
  // Six bytes at a time: one 64-bit load tests 48 bit offsets at once.
  for (size_t i = 0; i < n; i += 6) {
    const uint8_t* w = window(i);
    const size_t nb = std::min<size_t>(6, n - i);
    for (size_t k = 0; k < nb; ++k) {
      const uint8_t* q = w + k;
      if (q[0] == 0x1f && q[1] == 0x8b && q[2] == 8 && !(q[3] & 0xe0) && validate_member(src, base + i + k))
        return {Boundary::kMember, base + i + k};
      if (i + k > 0 && uint8_t(q[0] ^ q[2]) == 0xff && uint8_t(q[1] ^ q[3]) == 0xff && !(d[i + k - 1] & 0xe0) &&
          validate_stored(src, base + i + k))
        return {Boundary::kStored, base + i + k};
    }
    uint64_t x;
    std::memcpy(&x, w, 8);
    // Bit b set: BFINAL 0, BTYPE 2 (bits 0,0,1), HLIT and HDIST below 30
    // (their top four bits not all set).
    uint64_t m = ~x & ~(x >> 1) & (x >> 2);
    m &= ~((x >> 4) & (x >> 5) & (x >> 6) & (x >> 7));
    m &= ~((x >> 9) & (x >> 10) & (x >> 11) & (x >> 12));
    m &= (uint64_t(1) << (nb * 8)) - 1;
    while (m) {
      unsigned bit = unsigned(__builtin_ctzll(m));
      m &= m - 1;
      const uint8_t* q = w + bit / 8;
      unsigned b = bit & 7;
      uint64_t lo, hi;
      std::memcpy(&lo, q, 8);
      std::memcpy(&hi, q + 8, 8);
      unsigned __int128 v = (unsigned __int128)hi << 64 | lo;
      uint64_t h = uint64_t(v >> b);
      unsigned hclen = unsigned((h >> 13) & 15) + 4;
      uint64_t y = uint64_t(v >> (b + 17)) & ((uint64_t(1) << (3 * hclen)) - 1);
      unsigned kraft = ft.kraft4[y & 0xfff] + ft.kraft4[(y >> 12) & 0xfff] + ft.kraft4[(y >> 24) & 0xfff] +
                       ft.kraft4[(y >> 36) & 0xfff] + ft.kraft4[(y >> 48) & 0xfff];
      if (kraft != 128) continue;
      if (!quick_dynamic(q, b)) continue;
      uint64_t pos = (base + i) * 8 + bit;
      if (validate_dynamic(src, pos)) return {Boundary::kDynamic, pos};
    }
  }
  return {};
}

// ---- the marker inflater -----------------------------------------------------

MarkerInflater::MarkerInflater(SegmentSource* src, size_t flush_syms, FlushFn flush)
    : br_(src), flush_syms_(std::max<size_t>(flush_syms, 4096)), flush_fn_(std::move(flush)) {
  buf_.resize(kWindow + flush_syms_ + 258 + 16);
  for (uint32_t i = 0; i < kWindow; ++i) buf_[i] = uint16_t(256 + i);
  pos_ = flushed_ = kWindow;
  clean_after_ = kWindow;
}

void MarkerInflater::start_at_block(uint64_t bitpos) {
  br_.seek(bitpos);
  stored_pending_ = false;
}

void MarkerInflater::start_in_stored(uint64_t bytepos) {
  br_.seek(bytepos * 8);
  stored_pending_ = true;
}

void MarkerInflater::flush() {
  if (pos_ > flushed_) {
    flush_fn_(buf_.data() + flushed_, pos_ - flushed_);
    emitted_ += pos_ - flushed_;
    flushed_ = pos_;
  }
}

void MarkerInflater::compact() {
  flush();
  std::memmove(buf_.data(), buf_.data() + pos_ - kWindow, kWindow * sizeof(uint16_t));
  pos_ = flushed_ = kWindow;
}

bool MarkerInflater::window_clean() {
  const uint64_t produced_ = produced();
  if (produced_ < clean_after_) return false;
  const uint16_t* w = buf_.data() + pos_ - kWindow;
  for (size_t i = kWindow; i-- > 0;) {
    if (w[i] >= 256) {
      // That marker leaves the window once 32 KiB more have been produced.
      clean_after_ = produced_ + (i + 1);
      return false;
    }
  }
  return true;
}

void MarkerInflater::resolve_window(const uint8_t* window32k) {
  uint16_t* w = buf_.data() + pos_ - kWindow;
  for (size_t i = 0; i < kWindow; ++i)
    if (w[i] >= 256) w[i] = window32k[w[i] - 256];
  clean_after_ = produced();
}

void MarkerInflater::window_bytes(uint8_t* dst) const {
  const uint16_t* w = buf_.data() + pos_ - kWindow;
  for (size_t i = 0; i < kWindow; ++i) dst[i] = uint8_t(w[i]);
}

bool MarkerInflater::decode_block() {
  if (stored_pending_) {
    stored_pending_ = false;
    decode_stored_body();
    return false;
  }
  unsigned h = br_.bits(3);
  bool final = h & 1;
  switch (h >> 1) {
    case 0: decode_stored_body(); break;
    case 1: decode_huffman(fixed_tables()); break;
    case 2:
      if (!read_dynamic_header(br_, false, &dyn_)) fail("invalid dynamic block header");
      decode_huffman(dyn_);
      break;
    default: fail("invalid block type");
  }
  br_.check_not_past_end();
  return final;
}

void MarkerInflater::decode_stored_body() {
  br_.align();
  uint32_t len = br_.bits(16), nlen = br_.bits(16);
  if (len != (~nlen & 0xffff)) fail("invalid stored block lengths");
  uint8_t tmp[4096];
  while (len) {
    if (pos_ + 4096 > buf_.size() - 16) compact();
    uint32_t k = std::min<uint32_t>(len, sizeof tmp);
    br_.read_bytes(tmp, k);
    uint16_t* o = buf_.data() + pos_;
    for (uint32_t i = 0; i < k; ++i) o[i] = tmp[i];
    pos_ += k;
    len -= k;
  }
}

void MarkerInflater::decode_huffman(const BlockTables& tb) {
  const HuffTable& lit = tb.lit;
  const HuffTable& dist = tb.dist;
  uint16_t* buf = buf_.data();
  size_t pos = pos_;
  const size_t limit = buf_.size() - 258 - 16;
  for (;;) {
    if (pos > limit) {
      pos_ = pos;
      compact();
      pos = pos_;
      buf = buf_.data();
    }
    br_.refill();
    uint32_t e = lit.lookup(br_.peek());
    uint32_t k = HuffTable::kind(e);
    br_.consume(HuffTable::nbits(e));
    if (k == HuffTable::kLit) {
      buf[pos++] = uint16_t(HuffTable::value(e));
      continue;
    }
    if (k == HuffTable::kLen) {
      uint32_t len = HuffTable::value(e) + uint32_t(br_.peek() & ((1u << HuffTable::extra(e)) - 1));
      br_.consume(HuffTable::extra(e));
      uint32_t d = dist.lookup(br_.peek());
      if (HuffTable::kind(d) != HuffTable::kDist) fail("invalid distance code");
      br_.consume(HuffTable::nbits(d));
      uint32_t dv = HuffTable::value(d) + uint32_t(br_.peek() & ((1u << HuffTable::extra(d)) - 1));
      br_.consume(HuffTable::extra(d));
      if (dv > pos) fail("invalid distance too far back");
      uint16_t* o = buf + pos;
      const uint16_t* s = o - dv;
      if (dv >= 8) {
        uint32_t i = 0;
        do {
          std::memcpy(o + i, s + i, 16);
          i += 8;
        } while (i < len);
      } else if (dv == 1) {
        uint16_t c = s[0];
        for (uint32_t i = 0; i < len; ++i) o[i] = c;
      } else {
        for (uint32_t i = 0; i < len; ++i) o[i] = s[i];
      }
      pos += len;
      continue;
    }
    if (k == HuffTable::kEob) break;
    fail("invalid literal/length code");
  }
  pos_ = pos;
}

}  // namespace pgzip
}  // namespace hubfast
