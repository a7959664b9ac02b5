// The streaming decoders against streams compressed in the test with the
// reference libraries: round trips in one piece and in random pieces,
// multi-member gzip and multi-frame zstd, padding and garbage after the end,
// truncation, corruption and the resource limits.
#include <catch2/catch.hpp>

#include <bzlib.h>
#include <lzma.h>
#include <zlib.h>
#include <zstd.h>

#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "hubfast/decode.h"
#include "compressors.h"
#include "hubfast/error.h"
#include "hubfast/spares.h"

using namespace hubfast;

namespace {

using testing::bzip2;
using testing::gzip;

// ---- reference compressors --------------------------------------------------

struct ZstdParams {
  int level = 3;
  bool checksum = true;
  int window_log = 0;     // 0: the level's default
  bool long_distance = false;
  bool unknown_size = false;  // streaming: no content size in the frame header
};

std::string zstd(const std::string& in, ZstdParams p = {}) {
  ZSTD_CCtx* c = ZSTD_createCCtx();
  REQUIRE(c);
  ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, p.level);
  ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, p.checksum ? 1 : 0);
  if (p.window_log) REQUIRE(!ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_windowLog, p.window_log)));
  if (p.long_distance) ZSTD_CCtx_setParameter(c, ZSTD_c_enableLongDistanceMatching, 1);
  std::string out(ZSTD_compressBound(in.size()) + 1024, '\0');
  size_t n;
  if (p.unknown_size) {
    // Continue first, end with no input: the size is never pledged, so the
    // header carries the window as configured.
    ZSTD_inBuffer ib{in.data(), in.size(), 0};
    ZSTD_outBuffer ob{&out[0], out.size(), 0};
    while (ib.pos < ib.size) REQUIRE(!ZSTD_isError(ZSTD_compressStream2(c, &ob, &ib, ZSTD_e_continue)));
    ZSTD_inBuffer empty{nullptr, 0, 0};
    size_t left;
    do {
      left = ZSTD_compressStream2(c, &ob, &empty, ZSTD_e_end);
      REQUIRE(!ZSTD_isError(left));
    } while (left != 0);
    n = ob.pos;
  } else {
    n = ZSTD_compress2(c, &out[0], out.size(), in.data(), in.size());
    REQUIRE(!ZSTD_isError(n));
  }
  ZSTD_freeCCtx(c);
  out.resize(n);
  return out;
}

std::string xz(const std::string& in, uint32_t preset = 6) {
  std::string out(lzma_stream_buffer_bound(in.size()), '\0');
  size_t pos = 0;
  REQUIRE(lzma_easy_buffer_encode(preset, LZMA_CHECK_CRC64, nullptr, reinterpret_cast<const uint8_t*>(in.data()),
                                  in.size(), reinterpret_cast<uint8_t*>(&out[0]), &pos, out.size()) == LZMA_OK);
  out.resize(pos);
  return out;
}

// ---- data ------------------------------------------------------------------------

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i + 4 <= n; i += 4) {
    uint32_t v = rng();
    std::memcpy(&s[i], &v, 4);
  }
  return s;
}

std::string text_data(size_t n, uint32_t seed) {
  static const char* words[] = {"tensor", "hub", "saved_model", "variables", "the", "of", "keras",
                                "layer", "weights", "bias", "\n", "  ", "0.125", "serving_default"};
  std::mt19937 rng(seed);
  std::string s;
  while (s.size() < n) {
    s += words[rng() % (sizeof words / sizeof *words)];
    s += ' ';
  }
  s.resize(n);
  return s;
}

struct Dataset {
  const char* name;
  std::string bytes;
};

const std::vector<Dataset>& datasets() {
  static const std::vector<Dataset> d = {
      {"random", random_bytes(300 << 10, 1)},
      {"zeros", std::string(3 << 20, '\0')},  // three times the decoders' output buffer
      {"text", text_data(700 << 10, 2)},
      {"tiny", "x"},
  };
  return d;
}

// ---- decoding --------------------------------------------------------------------

struct Variant {
  const char* name;
  Compression c;
  DecodeOptions opt;
  std::function<std::string(const std::string&)> compress;
};

DecodeOptions opts(bool isal, int threads) {
  DecodeOptions o;
  o.use_isal = isal;
  o.threads = threads;
  return o;
}

std::vector<Variant> variants() {
  std::vector<Variant> v;
  if (have_isal()) v.push_back({"gzip/isal", Compression::kGzip, opts(true, 1), [](auto& s) { return gzip(s); }});
  v.push_back({"gzip/zlib", Compression::kGzip, opts(false, 1), [](auto& s) { return gzip(s); }});
  v.push_back({"zstd/1 thread", Compression::kZstd, opts(true, 1), [](auto& s) { return zstd(s); }});
  v.push_back({"zstd/4 threads", Compression::kZstd, opts(true, 4), [](auto& s) { return zstd(s); }});
  v.push_back({"bzip2", Compression::kBzip2, opts(true, 1), [](auto& s) { return bzip2(s); }});
  v.push_back({"xz", Compression::kXz, opts(true, 1), [](auto& s) { return xz(s); }});
  return v;
}

const char* kind_name(ErrorKind k) {
  switch (k) {
    case ErrorKind::kIntegrity: return "kIntegrity";
    case ErrorKind::kLimit: return "kLimit";
    case ErrorKind::kIO: return "kIO";
    case ErrorKind::kUnsafeArchive: return "kUnsafeArchive";
    default: return "other";
  }
}

struct Decoded {
  std::string out;
  std::string error = "none";
  std::string message;
  bool in_finish = false;  // the error came from finish()
  uint64_t units = 0;
  size_t largest_piece = 0;
};

enum class Feed { kWhole, kRandom, kBytes };

Decoded decode(Compression c, const DecodeOptions& opt, const std::string& in, Feed feed = Feed::kWhole,
               uint32_t seed = 1) {
  auto dec = make_decoder(c, opt);
  Decoded d;
  OutFn out = [&](const uint8_t* p, size_t n) {
    REQUIRE(n > 0);
    d.largest_piece = std::max(d.largest_piece, n);
    d.out.append(reinterpret_cast<const char*>(p), n);
  };
  const auto* p = reinterpret_cast<const uint8_t*>(in.data());
  try {
    if (feed == Feed::kWhole) {
      dec->feed(p, in.size(), out);
    } else {
      std::mt19937 rng(seed);
      size_t pos = 0;
      while (pos < in.size()) {
        size_t n = feed == Feed::kBytes ? 1 : 1 + rng() % 5000;
        n = std::min(n, in.size() - pos);
        dec->feed(p + pos, n, out);
        pos += n;
      }
    }
    d.in_finish = true;
    dec->finish(out);
    d.in_finish = false;
  } catch (const Error& e) {
    d.error = kind_name(e.kind());
    d.message = e.what();
  }
  d.units = dec->units();
  return d;
}

Decoded decode(const Variant& v, const std::string& in, Feed feed = Feed::kWhole, uint32_t seed = 1) {
  return decode(v.c, v.opt, in, feed, seed);
}

// The same member with FEXTRA, FNAME and FCOMMENT in its header (zlib
// writes none of them).
std::string with_optional_fields(const std::string& member) {
  std::string hdr = std::string("\x1f\x8b\x08\x1c\0\0\0\0\0\x03", 10);  // FLG = FEXTRA|FNAME|FCOMMENT
  hdr += std::string("\x06\0", 2) + std::string("ab\x02\0xy", 6);                           // XLEN = 6: one subfield
  hdr += std::string("model.tar\0", 10);
  hdr += std::string("a comment\0", 10);
  return hdr + member.substr(10);
}

// Overwrites the stack below the caller with zeros, so that a callee reading
// uninitialised locals sees zeros rather than what its last call left.
__attribute__((noinline)) void scrub_stack() {
  volatile char buf[64 << 10];
  for (size_t i = 0; i < sizeof buf; i += 64) buf[i] = 0;
  std::memset(const_cast<char*>(buf), 0, sizeof buf);
}

std::string flip(std::string s, size_t at, uint8_t mask = 0x01) {
  s[at] = char(uint8_t(s[at]) ^ mask);
  return s;
}

}  // namespace

// ---- round trips ---------------------------------------------------------------------

TEST_CASE("decode: round trip for every format, data kind and feeding", "[decode]") {
  for (const Variant& v : variants()) {
    for (const Dataset& ds : datasets()) {
      std::string packed = v.compress(ds.bytes);
      INFO(v.name << " / " << ds.name << ": " << ds.bytes.size() << " -> " << packed.size() << " bytes");
      REQUIRE(detect_compression(reinterpret_cast<const uint8_t*>(packed.data()), packed.size()) == v.c);
      Decoded whole = decode(v, packed);
      CHECK(whole.error == "none");
      CHECK(whole.message == "");
      CHECK(whole.out.size() == ds.bytes.size());
      CHECK(whole.out == ds.bytes);
      if (v.c == Compression::kGzip || v.c == Compression::kZstd) CHECK(whole.units == 1);
      for (uint32_t seed : {1u, 2u}) {
        Decoded pieces = decode(v, packed, Feed::kRandom, seed);
        CHECK(pieces.error == "none");
        CHECK(pieces.out == ds.bytes);
      }
    }
  }
}

TEST_CASE("decode: byte-by-byte feeding", "[decode]") {
  std::string data = text_data(50 << 10, 9);
  for (const Variant& v : variants()) {
    INFO(v.name);
    Decoded d = decode(v, v.compress(data), Feed::kBytes);
    CHECK(d.error == "none");
    CHECK(d.out == data);
  }
}

TEST_CASE("decode: empty input is an empty, invalid stream", "[decode]") {
  for (const Variant& v : variants()) {
    INFO(v.name);
    Decoded d = decode(v, "");
    CHECK(d.error == "kIntegrity");
    CHECK(d.in_finish);
  }
}

TEST_CASE("decode: no compression passes bytes through", "[decode]") {
  std::string data = random_bytes(10000, 3);
  Decoded d = decode(Compression::kNone, {}, data, Feed::kRandom);
  CHECK(d.error == "none");
  CHECK(d.out == data);
}

// ---- gzip ------------------------------------------------------------------------------

TEST_CASE("decode: gzip through ISA-L and through zlib agree", "[decode][gzip]") {
  if (!have_isal()) {
    WARN("built without ISA-L: nothing to compare");
    return;
  }
  for (const Dataset& ds : datasets()) {
    for (int level : {1, 6, 9}) {
      INFO(ds.name << " level " << level);
      std::string packed = gzip(ds.bytes, level);
      Decoded a = decode(Compression::kGzip, opts(true, 1), packed, Feed::kRandom);
      Decoded b = decode(Compression::kGzip, opts(false, 1), packed, Feed::kRandom);
      CHECK(a.error == "none");
      CHECK(b.error == "none");
      CHECK(a.out == b.out);
      CHECK(a.out == ds.bytes);
      CHECK(a.units == b.units);
    }
  }
}

TEST_CASE("decode: multi-member gzip decodes every member", "[decode][gzip]") {
  std::string a = text_data(200000, 1), b = random_bytes(100000, 2), c = std::string(1500000, '\0');
  std::string packed = gzip(a) + gzip(b, 1) + gzip(c, 9) + gzip("");
  for (bool isal : {true, false}) {
    if (isal && !have_isal()) continue;
    INFO((isal ? "isal" : "zlib"));
    for (Feed f : {Feed::kWhole, Feed::kRandom}) {
      Decoded d = decode(Compression::kGzip, opts(isal, 1), packed, f);
      CHECK(d.error == "none");
      CHECK(d.out == a + b + c);
      CHECK(d.units == 4);
    }
  }
}

TEST_CASE("decode: gzip members, padding and garbage after the end", "[decode][gzip]") {
  std::string data = text_data(100000, 4);
  std::string packed = gzip(data);
  for (bool isal : {true, false}) {
    if (isal && !have_isal()) continue;
    INFO((isal ? "isal" : "zlib"));
    DecodeOptions o = opts(isal, 1);
    SECTION("trailing zero padding is accepted") {
      for (Feed f : {Feed::kWhole, Feed::kRandom, Feed::kBytes}) {
        Decoded d = decode(Compression::kGzip, o, packed + std::string(4096, '\0'), f);
        CHECK(d.error == "none");
        CHECK(d.out == data);
      }
    }
    SECTION("trailing garbage is corrupt") {
      for (std::string junk : {std::string("garbage!"), std::string(100, '\0') + "x", std::string("\x1f"),
                               std::string("\x1f\x8b"), std::string("\x1f\x8b\x08\0\0\0\0\0\0\x03 not deflate"),
                               std::string(10, '\xff')}) {
        CAPTURE(junk);
        for (Feed f : {Feed::kWhole, Feed::kBytes}) {
          Decoded d = decode(Compression::kGzip, o, packed + junk, f);
          CHECK(d.error == "kIntegrity");
        }
      }
    }
    SECTION("a member after zero padding is garbage too") {
      CHECK(decode(Compression::kGzip, o, packed + std::string(8, '\0') + packed).error == "kIntegrity");
    }
  }
}

TEST_CASE("decode: flipped bytes in gzip data, CRC and ISIZE", "[decode][gzip]") {
  std::string data = text_data(300000, 5);
  std::string packed = gzip(data);
  size_t n = packed.size();
  struct Spot {
    const char* what;
    size_t at;
  };
  std::vector<Spot> spots = {{"deflate data (middle)", n / 2},  {"deflate data (start)", 20},
                             {"deflate data (end)", n - 12},    {"CRC32 first byte", n - 8},
                             {"CRC32 last byte", n - 5},        {"ISIZE first byte", n - 4},
                             {"ISIZE last byte", n - 1},        {"compression method", 2}};
  for (bool isal : {true, false}) {
    if (isal && !have_isal()) continue;
    for (const Spot& s : spots) {
      for (uint8_t mask : {0x01, 0x80, 0xff}) {
        INFO((isal ? "isal" : "zlib") << ": " << s.what << " ^ " << int(mask));
        Decoded d = decode(Compression::kGzip, opts(isal, 1), flip(packed, s.at, mask), Feed::kRandom);
        CHECK(d.error == "kIntegrity");
      }
    }
  }
}

TEST_CASE("decode: ISIZE is checked modulo 2^32 and against the member", "[decode][gzip]") {
  // Two members whose trailers are swapped: each CRC32/ISIZE is valid for
  // the other member only.
  std::string a = gzip(text_data(1000, 1)), b = gzip(text_data(2000, 2));
  std::string a2 = a.substr(0, a.size() - 8) + b.substr(b.size() - 8);
  for (bool isal : {true, false}) {
    if (isal && !have_isal()) continue;
    INFO((isal ? "isal" : "zlib"));
    CHECK(decode(Compression::kGzip, opts(isal, 1), a2).error == "kIntegrity");
    // Only ISIZE wrong (CRC kept): still corrupt.
    std::string a3 = a.substr(0, a.size() - 4) + b.substr(b.size() - 4);
    CHECK(decode(Compression::kGzip, opts(isal, 1), a3).error == "kIntegrity");
  }
}

TEST_CASE("decode: gzip header flags", "[decode][gzip]") {
  std::string data = "hello gzip";
  std::string packed = gzip(data);
  for (bool isal : {true, false}) {
    if (isal && !have_isal()) continue;
    INFO((isal ? "isal" : "zlib"));
    SECTION("reserved flag bits are refused") {
      for (uint8_t bit : {0x20, 0x40, 0x80}) {
        CAPTURE(int(bit));
        std::string bad = packed;
        bad[3] = char(uint8_t(bad[3]) | bit);
        CHECK(decode(Compression::kGzip, opts(isal, 1), bad, Feed::kBytes).error == "kIntegrity");
        CHECK(decode(Compression::kGzip, opts(isal, 1), packed + bad).error == "kIntegrity");
      }
    }
    SECTION("FNAME, FEXTRA, FCOMMENT are skipped") {
      std::string with = with_optional_fields(packed);
      Decoded d = decode(Compression::kGzip, opts(isal, 1), with + with);
      CHECK(d.error == "none");
      CHECK(d.out == data + data);
      if (!isal) {  // zlib keeps the header state across calls
        Decoded b = decode(Compression::kGzip, opts(isal, 1), with + with, Feed::kBytes);
        CHECK(b.error == "none");
        CHECK(b.out == data + data);
      }
    }
  }
}

// Found by this test under ASan with detect_stack_use_after_return=1:
// isal_inflate() parses the gzip header into a local isal_gzip_header whose
// `flags` is uninitialised on each call (intel/isa-l#224: "if you rely on
// isal_inflate() to consume the gzip header, you must give the initial
// buffer a whole header at a time"). GzipIsalDecoder feeds whatever it gets,
// so a header with FEXTRA/FNAME/FCOMMENT/FHCRC split across feed() calls is
// parsed with stale stack bytes as its flags: the name is then decoded as
// deflate data. In the pipeline this happens when a member header straddles
// a chunk boundary (multi-member gzip, or a name longer than a chunk).
// Scrubbing the stack between calls makes the failure deterministic.
TEST_CASE("decode: ISA-L gzip header with optional fields split across feed() calls", "[decode][gzip]") {
  if (!have_isal()) return;
  std::string data = "hello gzip";
  std::string with = with_optional_fields(gzip(data));
  auto dec = make_decoder(Compression::kGzip, opts(true, 1));
  std::string out;
  std::string error = "none";
  try {
    for (size_t i = 0; i < with.size(); ++i) {
      dec->feed(reinterpret_cast<const uint8_t*>(with.data()) + i, 1,
                [&](const uint8_t* p, size_t n) { out.append(reinterpret_cast<const char*>(p), n); });
      scrub_stack();
    }
    dec->finish([](const uint8_t*, size_t) {});
  } catch (const Error& e) {
    error = e.what();
  }
  CHECK(error == "none");
  CHECK(out == data);
}

// ---- zstd -------------------------------------------------------------------------------

TEST_CASE("decode: multi-frame zstd", "[decode][zstd][pzstd]") {
  std::vector<std::string> parts;
  std::string all, packed;
  for (int i = 0; i < 40; ++i) {
    std::string part = i % 3 == 0 ? random_bytes(50000 + size_t(i) * 100, uint32_t(i)) : text_data(80000, uint32_t(i));
    if (i == 7) part = std::string(2 << 20, '\0');
    if (i == 8) part.clear();
    ZstdParams p;
    p.checksum = i % 2 == 0;
    p.unknown_size = i % 5 == 0;
    packed += zstd(part, p);
    all += part;
  }
  for (int threads : {1, 2, 4}) {
    DecodeOptions o = opts(true, threads);
    INFO("threads " << threads);
    for (Feed f : {Feed::kWhole, Feed::kRandom}) {
      Decoded d = decode(Compression::kZstd, o, packed, f);
      CHECK(d.error == "none");
      CHECK(d.out == all);
      CHECK(d.units == 40);
    }
  }
}

// A skippable frame: magic 0x184D2A5?, 4-byte little-endian size, payload.
std::string skippable(const std::string& payload) {
  std::string f("\x50\x2a\x4d\x18", 4);
  uint32_t n = uint32_t(payload.size());
  for (int i = 0; i < 4; ++i) f.push_back(char((n >> (8 * i)) & 0xff));
  return f + payload;
}

TEST_CASE("decode: zstd skippable frames are skipped", "[decode][zstd][pzstd]") {
  std::string a = text_data(10000, 1), b = text_data(20000, 2);
  std::string packed = skippable("seek table?") + zstd(a) + skippable(std::string(1000, 's')) + zstd(b) + skippable("");
  REQUIRE(detect_compression(reinterpret_cast<const uint8_t*>(packed.data()), packed.size()) == Compression::kZstd);
  for (int threads : {1, 4}) {
    INFO("threads " << threads);
    Decoded d = decode(Compression::kZstd, opts(true, threads), packed, Feed::kRandom);
    CHECK(d.error == "none");
    CHECK(d.out == a + b);
  }
}

TEST_CASE("decode: zstd garbage after the end, truncation, corruption", "[decode][zstd][pzstd]") {
  std::string data = text_data(400000, 6);
  std::string f1 = zstd(data.substr(0, 200000)), f2 = zstd(data.substr(200000));
  std::string packed = f1 + f2;
  for (int threads : {1, 4}) {
    DecodeOptions o = opts(true, threads);
    INFO("threads " << threads);
    CHECK(decode(Compression::kZstd, o, packed + "garbage!").error == "kIntegrity");
    CHECK(decode(Compression::kZstd, o, packed + std::string(16, '\0')).error == "kIntegrity");
    CHECK(decode(Compression::kZstd, o, packed + f2.substr(0, 4)).error == "kIntegrity");
    // A flipped byte in the second frame's data, and in its checksum.
    CHECK(decode(Compression::kZstd, o, flip(packed, f1.size() + f2.size() / 2, 0x10)).error == "kIntegrity");
    CHECK(decode(Compression::kZstd, o, flip(packed, packed.size() - 1)).error == "kIntegrity");
    CHECK(decode(Compression::kZstd, o, flip(packed, packed.size() - 4, 0x80)).error == "kIntegrity");
  }
}

TEST_CASE("decode: a zstd frame that holds less than its declared content size", "[decode][zstd][pzstd]") {
  // Found by fuzz_decode: a frame declaring 17384 bytes, then empty raw blocks, an empty last
  // block and the checksum of nothing. libzstd 1.5.4 refuses it in one call, but in pieces it
  // accepted it.
  std::string f;
  f += std::string("\x28\xb5\x2f\xfd", 4);  // magic
  f += '\x64';                                // 2-byte content size, single segment, checksum
  f += std::string("\xe8\x42", 2);            // 0x42e8 + 256 = 17384
  for (int i = 0; i < 4; ++i) f += std::string(3, '\0');  // empty raw blocks
  f += std::string("\x01\x00\x00", 3);      // the last block, empty
  f += std::string("\x99\xe9\xd8\x51", 4);  // XXH64 of nothing, low 32 bits
  std::string good = zstd(text_data(100000, 3));
  for (int threads : {1, 4})
    for (Feed feed : {Feed::kWhole, Feed::kRandom, Feed::kBytes}) {
      INFO("threads " << threads << " feed " << int(feed));
      DecodeOptions o = opts(true, threads);
      CHECK(decode(Compression::kZstd, o, f, feed).error == "kIntegrity");
      CHECK(decode(Compression::kZstd, o, good + f, feed).error == "kIntegrity");
      Decoded ok = decode(Compression::kZstd, o, good + good, feed);
      CHECK(ok.error == "none");
      CHECK(ok.out == text_data(100000, 3) + text_data(100000, 3));
    }
}

TEST_CASE("decode: a zstd window over the limit is a limit error", "[decode][zstd][pzstd]") {
  SECTION("a frame made by the compressor with windowLog 28") {
    ZstdParams p;
    p.level = 1;
    p.window_log = 28;
    p.long_distance = true;
    p.unknown_size = true;
    std::string packed = zstd(text_data(200000, 1), p);
    for (int threads : {1, 4}) {
      INFO("threads " << threads);
      DecodeOptions o = opts(true, threads);
      o.zstd_window_log_max = 27;
      CHECK(decode(Compression::kZstd, o, packed).error == "kLimit");
    }
  }
  SECTION("a hand-made frame header declaring a 2 GiB window") {
    // Magic, FHD 0 (no content size, not single-segment), window byte
    // (exponent 31 - 10 = 21, mantissa 0), one raw last block of 1 byte.
    std::string frame("\x28\xb5\x2f\xfd\x00\xa8\x09\x00\x00x", 10);
    for (int threads : {1, 4}) {
      INFO("threads " << threads);
      CHECK(decode(Compression::kZstd, opts(true, threads), frame).error == "kLimit");
      CHECK(decode(Compression::kZstd, opts(true, threads), frame, Feed::kBytes).error == "kLimit");
    }
  }
  SECTION("the same frame with a small window decodes") {
    std::string frame("\x28\xb5\x2f\xfd\x00\x00\x09\x00\x00x", 10);
    for (int threads : {1, 4}) {
      Decoded d = decode(Compression::kZstd, opts(true, threads), frame);
      CHECK(d.error == "none");
      CHECK(d.out == "x");
    }
  }
}

TEST_CASE("decode: parallel zstd with many frames in flight and an error in the middle", "[decode][zstd][pzstd]") {
  std::string all, packed;
  std::vector<size_t> starts;
  for (int i = 0; i < 64; ++i) {
    std::string part = text_data(30000, uint32_t(100 + i));
    starts.push_back(packed.size());
    packed += zstd(part);
    all += part;
  }
  Decoded ok = decode(Compression::kZstd, opts(true, 3), packed, Feed::kRandom);
  CHECK(ok.error == "none");
  CHECK(ok.out == all);
  CHECK(ok.units == 64);
  // Corrupt frame 40's checksum: frames before it are emitted, then the error.
  std::string bad = flip(packed, starts[41] - 1);
  Decoded d = decode(Compression::kZstd, opts(true, 3), bad, Feed::kRandom);
  CHECK(d.error == "kIntegrity");
  CHECK(d.out.size() <= 40 * 30000);
  CHECK(all.compare(0, d.out.size(), d.out) == 0);
}

// The pipeline's way: input buffers handed over by move, frames spanning
// several of them and cut anywhere inside headers; the buffers go back to
// the caller's pool once the frames reading them are decoded.
TEST_CASE("decode: parallel zstd over owned input buffers", "[decode][zstd][pzstd]") {
  std::string all, packed;
  for (int i = 0; i < 40; ++i) {
    std::string part = i % 3 ? text_data(70000, uint32_t(300 + i)) : random_bytes(50000, uint32_t(i));
    packed += zstd(part);
    if (i % 7 == 0) packed += skippable("seek table");
    all += part;
  }
  for (uint32_t seed : {1u, 2u, 3u}) {
    INFO("seed " << seed);
    auto pool = std::make_shared<Spares>(4);
    auto dec = make_decoder(Compression::kZstd, opts(true, 3));
    dec->set_input_spares(pool);
    std::string out;
    OutFn sink = [&](const uint8_t* q, size_t n) { out.append(reinterpret_cast<const char*>(q), n); };
    std::mt19937 rng(seed);
    size_t pos = 0;
    while (pos < packed.size()) {
      // Mostly pieces large enough to be kept, some small ones that are copied.
      size_t n = std::min<size_t>(packed.size() - pos, rng() % 4 ? 64000 + rng() % 90000 : 1 + rng() % 40);
      std::vector<uint8_t> b(packed.begin() + long(pos), packed.begin() + long(pos + n));
      dec->feed_owned(std::move(b), sink);
      pos += n;
    }
    dec->finish(sink);
    CHECK(dec->units() == 40);
    CHECK(out.size() == all.size());
    CHECK((out == all));
    dec.reset();
    CHECK(pool->take(true).capacity() > 0);  // kept buffers came back
  }
  SECTION("a corrupt block in a frame that spans buffers") {
    std::string bad = flip(packed, packed.size() / 2, 0x40);
    auto dec = make_decoder(Compression::kZstd, opts(true, 3));
    dec->set_input_spares(std::make_shared<Spares>(4));
    OutFn sink = [](const uint8_t*, size_t) {};
    bool threw = false;
    try {
      for (size_t pos = 0; pos < bad.size(); pos += 100000) {
        size_t n = std::min<size_t>(100000, bad.size() - pos);
        dec->feed_owned(std::vector<uint8_t>(bad.begin() + long(pos), bad.begin() + long(pos + n)), sink);
      }
      dec->finish(sink);
    } catch (const Error& e) {
      threw = true;
      CHECK((e.kind() == ErrorKind::kIntegrity || e.kind() == ErrorKind::kLimit));
    }
    CHECK(threw);
  }
}

TEST_CASE("decode: a parallel zstd decoder dropped in mid-stream", "[decode][zstd][pzstd]") {
  std::string packed;
  for (int i = 0; i < 20; ++i) packed += zstd(text_data(50000, uint32_t(i)));
  auto dec = make_decoder(Compression::kZstd, opts(true, 4));
  size_t got = 0;
  dec->feed(reinterpret_cast<const uint8_t*>(packed.data()), packed.size() * 2 / 3,
            [&](const uint8_t*, size_t n) { got += n; });
  dec.reset();  // workers joined, queued jobs dropped: no hang, no leak
  CHECK(got <= 20 * 50000);
}

TEST_CASE("decode: one zstd frame larger than the parallel decoder buffers", "[decode][zstd][pzstd]") {
  // Over 64 MiB of compressed bytes in a single frame: the parallel decoder
  // switches to streaming. Random data keeps the frame as large as its input.
  std::string data = random_bytes(66 << 20, 77);
  ZstdParams p;
  p.level = 1;
  p.unknown_size = true;
  std::string packed = zstd(data, p) + zstd("tail");
  REQUIRE(packed.size() > (64u << 20));
  auto dec = make_decoder(Compression::kZstd, opts(true, 2));
  std::string out;
  out.reserve(data.size() + 4);
  OutFn sink = [&](const uint8_t* q, size_t n) { out.append(reinterpret_cast<const char*>(q), n); };
  for (size_t pos = 0; pos < packed.size(); pos += 1 << 20)
    dec->feed(reinterpret_cast<const uint8_t*>(packed.data()) + pos, std::min<size_t>(1 << 20, packed.size() - pos),
              sink);
  dec->finish(sink);
  CHECK(out.size() == data.size() + 4);
  CHECK((out == data + "tail"));
}

// Found by the test above: after falling back to streaming, finish() adds the
// streaming decoder's frames to units_, and units() adds them again.
TEST_CASE("decode: units() after the parallel zstd decoder fell back to streaming",
          "[decode][zstd][pzstd]") {
  ZstdParams p;
  p.level = 1;
  p.unknown_size = true;
  std::string packed = zstd("head") + zstd(random_bytes(65 << 20, 5), p) + zstd("tail");
  auto dec = make_decoder(Compression::kZstd, opts(true, 2));
  size_t got = 0;
  OutFn sink = [&](const uint8_t*, size_t k) { got += k; };
  for (size_t pos = 0; pos < packed.size(); pos += 1 << 20)
    dec->feed(reinterpret_cast<const uint8_t*>(packed.data()) + pos, std::min<size_t>(1 << 20, packed.size() - pos),
              sink);
  dec->finish(sink);
  CHECK(got == (65u << 20) + 8);
  CHECK(dec->units() == 3);
}

// ---- bzip2 and xz -------------------------------------------------------------------------

TEST_CASE("decode: bzip2 and xz garbage, corruption and concatenation", "[decode]") {
  std::string data = text_data(200000, 8);
  SECTION("bzip2") {
    std::string packed = bzip2(data);
    CHECK(decode(Compression::kBzip2, {}, packed + bzip2("more")).out == data + "more");
    CHECK(decode(Compression::kBzip2, {}, packed + "garbage").error == "kIntegrity");
    CHECK(decode(Compression::kBzip2, {}, flip(packed, packed.size() / 2)).error == "kIntegrity");
    CHECK(decode(Compression::kBzip2, {}, flip(packed, packed.size() - 3)).error == "kIntegrity");
  }
  SECTION("xz") {
    std::string packed = xz(data);
    Decoded two = decode(Compression::kXz, {}, packed + xz("more"), Feed::kRandom);
    CHECK(two.error == "none");
    CHECK(two.out == data + "more");
    // xz allows stream padding in multiples of four zero bytes.
    CHECK(decode(Compression::kXz, {}, packed + std::string(8, '\0')).error == "none");
    CHECK(decode(Compression::kXz, {}, packed + std::string(3, '\0')).error == "kIntegrity");
    CHECK(decode(Compression::kXz, {}, packed + "garbage").error == "kIntegrity");
    CHECK(decode(Compression::kXz, {}, flip(packed, packed.size() / 2)).error == "kIntegrity");
    CHECK(decode(Compression::kXz, {}, flip(packed, packed.size() - 20)).error == "kIntegrity");
  }
  SECTION("xz over the memory limit") {
    std::string packed = xz(data, 6);  // 8 MiB dictionary
    DecodeOptions o;
    o.xz_memlimit = 1 << 20;
    CHECK(decode(Compression::kXz, o, packed).error == "kLimit");
  }
}

// ---- truncation ---------------------------------------------------------------------------

TEST_CASE("decode: truncated streams fail at finish()", "[decode]") {
  std::string data = text_data(150000, 10);
  for (const Variant& v : variants()) {
    std::string packed = v.compress(data);
    for (size_t cut : {size_t(1), size_t(5), size_t(11), packed.size() / 3, packed.size() / 2, packed.size() - 4,
                       packed.size() - 1}) {
      INFO(v.name << ": " << cut << " of " << packed.size() << " bytes");
      for (Feed f : {Feed::kWhole, Feed::kRandom}) {
        Decoded d = decode(v, packed.substr(0, cut), f);
        CHECK(d.error == "kIntegrity");
        CHECK(d.in_finish);
        CHECK(d.out.size() <= data.size());
        CHECK(data.compare(0, d.out.size(), d.out) == 0);
      }
    }
  }
}

// ---- detection ----------------------------------------------------------------------------

TEST_CASE("decode: detect_compression on magic bytes", "[decode]") {
  struct Row {
    std::string bytes;
    Compression want;
  };
  std::vector<Row> rows = {
      {std::string("\x1f\x8b\x08\0", 4), Compression::kGzip},
      {std::string("\x1f\x8b", 2), Compression::kGzip},
      {std::string("\x1f", 1), Compression::kNone},
      {std::string("\x28\xb5\x2f\xfd\x04", 5), Compression::kZstd},
      {std::string("\x28\xb5\x2f", 3), Compression::kNone},
      {std::string("\x5e\x2a\x4d\x18\0\0\0\0", 8), Compression::kZstd},  // skippable frame
      {std::string("\x60\x2a\x4d\x18", 4), Compression::kNone},
      {"BZh9", Compression::kBzip2},
      {"BZ", Compression::kNone},
      {std::string("\xfd" "7zXZ\0\0", 7), Compression::kXz},
      {std::string("\xfd" "7zXZ", 5), Compression::kNone},
      {"ustar", Compression::kNone},
      {std::string(512, '\0'), Compression::kNone},
      {"", Compression::kNone},
  };
  for (const Row& r : rows) {
    CAPTURE(r.bytes);
    CHECK(detect_compression(reinterpret_cast<const uint8_t*>(r.bytes.data()), r.bytes.size()) == r.want);
  }
  CHECK(std::string(compression_name(Compression::kGzip)) == "gzip");
  CHECK(std::string(compression_name(Compression::kZstd)) == "zstd");
  CHECK(std::string(compression_name(Compression::kBzip2)) == "bzip2");
  CHECK(std::string(compression_name(Compression::kXz)) == "xz");
  CHECK(std::string(compression_name(Compression::kNone)) == "none");
}
