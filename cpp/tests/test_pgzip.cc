// The parallel gzip decoder against zlib's inflate: byte-identical output on
// every kind of data and deflate block, chunk boundaries in every kind of
// block (small chunks), multi-member streams, and corrupt streams refused;
// the same with the input out of order (feed_at), as parallel ranged
// requests deliver it.
#include <catch2/catch.hpp>

#include <zlib.h>
#ifdef HUBFAST_HAVE_ISAL
#include <isa-l/igzip_lib.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../src/pgzip_inflate.h"
#include "hubfast/decode.h"
#include "hubfast/error.h"
#include "hubfast/pgzip.h"
#include "hubfast/spares.h"

using namespace hubfast;

namespace {

using Bytes = std::vector<uint8_t>;

struct GzOptions {
  int level = 6;
  int strategy = Z_DEFAULT_STRATEGY;
  int mem_level = 8;
  bool header_fields = false;  // FEXTRA, FNAME, FCOMMENT, FHCRC
  size_t flush_every = 0;      // Z_SYNC_FLUSH every n input bytes (pigz-like)
  size_t full_flush_every = 0;
};

Bytes gzip(const Bytes& in, const GzOptions& o = {}) {
  z_stream zs{};
  REQUIRE(deflateInit2(&zs, o.level, Z_DEFLATED, 15 + 16, o.mem_level, o.strategy) == Z_OK);
  gz_header h{};
  static unsigned char extra[] = "AB\x04\x00xyzw";
  static char name[] = "variables.data-00000-of-00001";
  static char comment[] = "a comment";
  if (o.header_fields) {
    h.extra = extra;
    h.extra_len = 8;
    h.name = reinterpret_cast<Bytef*>(name);
    h.comment = reinterpret_cast<Bytef*>(comment);
    h.hcrc = 1;
    REQUIRE(deflateSetHeader(&zs, &h) == Z_OK);
  }
  Bytes out(deflateBound(&zs, uLong(in.size())) + 1024 + in.size() / 100);
  zs.next_out = out.data();
  zs.avail_out = uInt(out.size());
  size_t pos = 0;
  size_t step = o.flush_every ? o.flush_every : (o.full_flush_every ? o.full_flush_every : in.size() + 1);
  for (;;) {
    size_t n = std::min(step, in.size() - pos);
    zs.next_in = const_cast<Bytef*>(in.data() + pos);
    zs.avail_in = uInt(n);
    pos += n;
    bool last = pos == in.size();
    int flush = last ? Z_FINISH : (o.full_flush_every ? Z_FULL_FLUSH : Z_SYNC_FLUSH);
    int r;
    do {
      if (zs.avail_out == 0) {
        size_t used = out.size();
        out.resize(out.size() * 2);
        zs.next_out = out.data() + used;
        zs.avail_out = uInt(out.size() - used);
      }
      r = deflate(&zs, flush);
      REQUIRE(r != Z_STREAM_ERROR);
    } while (zs.avail_out == 0 || (last && r != Z_STREAM_END));
    if (last) break;
  }
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

// zlib's reading of a (possibly multi-member) gzip stream; false on error.
bool zlib_gunzip(const Bytes& in, Bytes* out) {
  out->clear();
  size_t pos = 0;
  bool any = false;
  while (pos < in.size()) {
    if (any) {
      // Zero padding after a member is accepted to the end.
      size_t z = pos;
      while (z < in.size() && in[z] == 0) ++z;
      if (z == in.size()) return true;
      if (z != pos) return false;
    }
    z_stream zs{};
    if (inflateInit2(&zs, 15 + 16) != Z_OK) return false;
    zs.next_in = const_cast<Bytef*>(in.data() + pos);
    zs.avail_in = uInt(in.size() - pos);
    Bytes buf(1 << 16);
    int r;
    do {
      zs.next_out = buf.data();
      zs.avail_out = uInt(buf.size());
      r = inflate(&zs, Z_NO_FLUSH);
      out->insert(out->end(), buf.data(), buf.data() + (buf.size() - zs.avail_out));
    } while (r == Z_OK);
    size_t used = zs.total_in;
    inflateEnd(&zs);
    if (r != Z_STREAM_END) return false;
    pos += used;
    any = true;
  }
  return any;
}

struct Decoded {
  Bytes out;
  ParallelGzipStats stats;
  uint64_t units = 0;
};

Decoded pgunzip(const Bytes& gz, int threads, size_t chunk, uint32_t seed = 1) {
  auto d = make_parallel_gzip_decoder(threads, chunk);
  Decoded r;
  auto sink = [&](const uint8_t* p, size_t n) { r.out.insert(r.out.end(), p, p + n); };
  std::mt19937 rng(seed);
  size_t pos = 0;
  while (pos < gz.size()) {
    size_t n = std::min<size_t>(gz.size() - pos, 1 + rng() % (3 * chunk / 2 + 1));
    d->feed(gz.data() + pos, n, sink);
    pos += n;
  }
  d->finish(sink);
  r.stats = parallel_gzip_stats(*d);
  r.units = d->units();
  return r;
}

// Throws hubfast::Error of kind kIntegrity, or returns the output.
bool pgunzip_fails(const Bytes& gz, int threads, size_t chunk) {
  try {
    pgunzip(gz, threads, chunk);
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::kIntegrity);
    return true;
  }
  return false;
}

Bytes random_bytes(size_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  Bytes b(n);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v = rng();
    std::memcpy(b.data() + i, &v, std::min<size_t>(8, n - i));
  }
  return b;
}

Bytes gaussian_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  Bytes b(n & ~size_t(3));
  for (size_t i = 0; i + 4 <= b.size(); i += 4) {
    float f = nd(rng);
    std::memcpy(b.data() + i, &f, 4);
  }
  return b;
}

Bytes text(size_t n, uint32_t seed) {
  static const char* words[] = {"the",    "model",   "weights", "of",     "a",      "layer",  "are",
                                "stored", "in",      "variables", "tensor", "float", "gzip", "deflate",
                                "hub",    "signature", "serving", "default", "\n",    "kernel:0", "bias"};
  std::mt19937 rng(seed);
  std::string s;
  while (s.size() < n) {
    s += words[rng() % (sizeof words / sizeof *words)];
    s += (rng() % 7 == 0) ? ", " : " ";
  }
  s.resize(n);
  return Bytes(s.begin(), s.end());
}

// Words from a vocabulary of thousands: skewed codes with long code lengths
// (dynamic headers sending all 19 code-length codes).
Bytes wordy_text(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::string> vocab(3000);
  for (auto& w : vocab) {
    size_t len = 2 + rng() % 8;
    for (size_t i = 0; i < len; ++i) w += char('a' + rng() % 26);
  }
  std::string s;
  while (s.size() < n) {
    s += vocab[rng() % vocab.size()];
    s += ' ';
  }
  s.resize(n);
  return Bytes(s.begin(), s.end());
}

Bytes pattern(size_t n, size_t period) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = uint8_t((i % period) * 7 + 1);
  return b;
}

// Runs of every kind: random, zeros, text, floats, short and long repeats.
Bytes mixed(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes b;
  while (b.size() < n) {
    size_t len = 1000 + rng() % 200000;
    Bytes part;
    switch (rng() % 5) {
      case 0: part = random_bytes(len, rng()); break;
      case 1: part = Bytes(len, 0); break;
      case 2: part = text(len, rng()); break;
      case 3: part = gaussian_floats(len, rng()); break;
      default: part = pattern(len, 1 + rng() % 300); break;
    }
    b.insert(b.end(), part.begin(), part.end());
  }
  b.resize(n);
  return b;
}

// bgzip-like small members, members around the chunk size, an empty one,
// many small ones.
Bytes multi_member_stream(Bytes* all, int* members) {
  std::mt19937 rng(3);
  Bytes gz;
  all->clear();
  *members = 0;
  for (size_t size : {size_t(60000), size_t(60000), size_t(0), size_t(300000), size_t(65536), size_t(1) << 20,
                      size_t(70000), size_t(700000), size_t(100), size_t(2) << 20}) {
    Bytes part = mixed(size, rng());
    GzOptions o;
    o.level = int(rng() % 10);
    o.header_fields = rng() % 2;
    Bytes g = gzip(part, o);
    all->insert(all->end(), part.begin(), part.end());
    gz.insert(gz.end(), g.begin(), g.end());
    ++*members;
  }
  for (int i = 0; i < 60; ++i) {
    Bytes part = gaussian_floats(20000 + rng() % 50000, rng());
    Bytes g = gzip(part);
    all->insert(all->end(), part.begin(), part.end());
    gz.insert(gz.end(), g.begin(), g.end());
    ++*members;
  }
  return gz;
}

// ---- out-of-order input: parallel ranged requests --------------------------

struct Span {
  uint64_t off;
  size_t len;
};

// How parallel ranged requests deliver a stream: cut into ranges of random
// sizes (not aligned to the chunk size), taken by `conns` connections in a
// shuffled order (or in order); each connection delivers its range in
// pieces of random sizes in increasing order, the open ones taking turns at
// random.
struct Ranges {
  size_t min_range = 1, max_range = 1;
  size_t max_piece = 1;
  size_t conns = 4;
  bool shuffle = true;
};

Ranges ranges_for(size_t chunk, std::mt19937& rng) {
  Ranges r;
  switch (rng() % 3) {
    case 0:  // like 4-16 MiB ranges over 4 MiB chunks, 16 KiB socket reads
      r.min_range = chunk + 1;
      r.max_range = 4 * chunk + 7;
      r.max_piece = 16 << 10;
      break;
    case 1:  // ranges of every size down to one byte, small pieces
      r.min_range = 1;
      r.max_range = 3 * chunk;
      r.max_piece = 4096;
      break;
    default:
      r.min_range = chunk / 3 + 1;
      r.max_range = 2 * chunk + 1;
      r.max_piece = chunk;
      break;
  }
  r.conns = 1 + rng() % 6;
  return r;
}

std::vector<Span> cut_ranges(size_t total, const Ranges& r, std::mt19937& rng) {
  std::vector<Span> out;
  for (size_t pos = 0; pos < total;) {
    size_t n = std::min<size_t>(total - pos, r.min_range + rng() % (r.max_range - r.min_range + 1));
    out.push_back({pos, n});
    pos += n;
  }
  if (r.shuffle) std::shuffle(out.begin(), out.end(), rng);
  return out;
}

std::vector<Span> deliveries(size_t total, const Ranges& r, std::mt19937& rng) {
  std::vector<Span> ranges = cut_ranges(total, r, rng);
  std::vector<Span> open, pieces;
  size_t next = 0;
  for (;;) {
    while (open.size() < r.conns && next < ranges.size()) open.push_back(ranges[next++]);
    if (open.empty()) break;
    size_t c = rng() % open.size();
    Span& s = open[c];
    size_t n = std::min<size_t>(s.len, 1 + rng() % r.max_piece);
    pieces.push_back({s.off, n});
    s.off += n;
    s.len -= n;
    if (s.len == 0) open.erase(open.begin() + long(c));
  }
  return pieces;
}

// The bytes given so far; prefix(): how many from the start without a gap.
struct Given {
  std::map<uint64_t, uint64_t> have;
  void add(uint64_t off, size_t n) {
    uint64_t a = off, e = off + n;
    auto it = have.upper_bound(a);
    if (it != have.begin() && std::prev(it)->second >= a) {
      --it;
      a = it->first;
      e = std::max(e, it->second);
      it = have.erase(it);
    }
    while (it != have.end() && it->first <= e) {
      e = std::max(e, it->second);
      it = have.erase(it);
    }
    have.emplace(a, e);
  }
  uint64_t prefix() const { return !have.empty() && have.begin()->first == 0 ? have.begin()->second : 0; }
};

// Feeds `pieces` through feed_at and finishes; input_floor() must never go
// back nor pass the bytes given without a gap.
Decoded feed_pieces(Decoder& d, const Bytes& gz, const std::vector<Span>& pieces) {
  Decoded r;
  auto sink = [&](const uint8_t* p, size_t n) { r.out.insert(r.out.end(), p, p + n); };
  Given given;
  uint64_t floor = 0;
  for (const Span& p : pieces) {
    d.feed_at(p.off, gz.data() + p.off, p.len, sink);
    given.add(p.off, p.len);
    uint64_t f = d.input_floor();
    if (f < floor || f > given.prefix()) FAIL("input_floor " << f << " after " << floor << ", prefix " << given.prefix());
    floor = f;
  }
  d.finish(sink);
  r.stats = parallel_gzip_stats(d);
  r.units = d.units();
  return r;
}

Decoded pgunzip_at(const Bytes& gz, int threads, size_t chunk, uint32_t seed = 1) {
  auto d = make_parallel_gzip_decoder(threads, chunk);
  REQUIRE(d->takes_offsets());
  std::mt19937 rng(seed);
  Ranges r = ranges_for(chunk, rng);
  return feed_pieces(*d, gz, deliveries(gz.size(), r, rng));
}

bool pgunzip_at_fails(const Bytes& gz, int threads, size_t chunk, uint32_t seed = 1) {
  try {
    pgunzip_at(gz, threads, chunk, seed);
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::kIntegrity);
    return true;
  }
  return false;
}

void check_roundtrip(const Bytes& data, const GzOptions& o, size_t chunk, int threads = 2) {
  Bytes gz = gzip(data, o);
  Bytes ref;
  REQUIRE(zlib_gunzip(gz, &ref));
  REQUIRE(ref == data);
  Decoded d = pgunzip(gz, threads, chunk);
  REQUIRE(d.out.size() == data.size());
  REQUIRE(d.out == data);
  CHECK(d.units == 1);
}

}  // namespace

TEST_CASE("pgzip: Huffman tables follow zlib's rules", "[pgzip]") {
  using namespace pgzip;
  HuffTable t;
  uint8_t complete[4] = {1, 2, 3, 3};
  CHECK(build_table(complete, 4, CodeUse::kLitLen, 10, true, &t));
  uint8_t over[3] = {1, 1, 1};
  CHECK_FALSE(build_table(over, 3, CodeUse::kLitLen, 10, false, &t));
  uint8_t single[2] = {1, 0};  // one code of length 1: zlib accepts it
  CHECK(build_table(single, 2, CodeUse::kDist, 8, false, &t));
  CHECK_FALSE(build_table(single, 2, CodeUse::kDist, 8, true, &t));
  uint8_t incomplete[3] = {2, 2, 0};
  CHECK_FALSE(build_table(incomplete, 3, CodeUse::kDist, 8, false, &t));
  uint8_t none[3] = {0, 0, 0};  // no distance codes at all: fine until one is used
  CHECK(build_table(none, 3, CodeUse::kDist, 8, false, &t));
}

TEST_CASE("pgzip: a dynamic header with all 19 code-length codes, at every bit alignment", "[pgzip]") {
  using namespace pgzip;
  // An LSB-first bit writer.
  struct Writer {
    Bytes b;
    uint64_t n = 0;
    void put(uint64_t v, unsigned bits) {  // bits <= 64
      for (unsigned i = 0; i < bits; ++i, ++n) {
        if (n % 8 == 0) b.push_back(0);
        b.back() |= uint8_t(((v >> i) & 1) << (n % 8));
      }
    }
    void put_code(uint32_t code, unsigned len) {  // Huffman codes go MSB first
      for (unsigned i = len; i-- > 0;) put((code >> i) & 1, 1);
    }
  };
  static const uint8_t order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
  uint8_t cl[19];  // complete: 13 codes of 4 bits, 6 of 5 bits
  for (int i = 0; i < 19; ++i) cl[i] = i < 13 ? 4 : 5;
  uint32_t cl_code[19];
  {
    uint32_t code = 0, next[8] = {0}, count[8] = {0};
    for (int i = 0; i < 19; ++i) ++count[cl[i]];
    for (int len = 1; len <= 7; ++len) {
      code = (code + count[len - 1]) << 1;
      next[len] = code;
    }
    for (int i = 0; i < 19; ++i) cl_code[i] = next[cl[i]]++;
  }
  uint8_t lens[316];  // 286 lit/len: 226 x 8 + 60 x 9 bits; 30 dist: 2 x 4 + 28 x 5 bits
  for (int i = 0; i < 286; ++i) lens[i] = i < 226 ? 8 : 9;
  for (int i = 0; i < 30; ++i) lens[286 + i] = i < 2 ? 4 : 5;
  for (unsigned pad = 0; pad < 64; ++pad) {
    Writer w;
    w.put(0, pad);
    w.put(4, 3);  // BFINAL 0, BTYPE 2
    w.put(29, 5);
    w.put(29, 5);
    w.put(15, 4);  // HCLEN 19
    for (int i = 0; i < 19; ++i) w.put(cl[order[i]], 3);
    for (int i = 0; i < 316; ++i) w.put_code(cl_code[lens[i]], cl[lens[i]]);
    const uint64_t end = w.n;
    w.put(0, 64);
    BufferSource src(w.b.data(), w.b.size(), 1 << 20);
    BitReader br(&src);
    br.seek(pad);
    REQUIRE(br.bits(3) == 4);
    BlockTables tb;
    INFO("padding " << pad);
    REQUIRE(read_dynamic_header(br, true, &tb));
    CHECK(br.pos() == end);
  }
}

TEST_CASE("pgzip: the block finder finds real block starts", "[pgzip]") {
  using namespace pgzip;
  Bytes data = gaussian_floats(3 << 20, 7);
  Bytes gz = gzip(data);
  BufferSource src(gz.data(), gz.size(), 256 << 10);
  int found = 0;
  for (uint64_t i = 1; i * (256 << 10) < gz.size(); ++i) {
    Boundary b = find_boundary(&src, i);
    if (b.kind == Boundary::kNone) continue;
    ++found;
    CHECK(b.first_bit() >= i * (256 << 10) * 8 - 10);
    // Decoding from there with markers must reach the end of the stream.
    uint64_t syms = 0;
    MarkerInflater inf(&src, 1 << 16, [&](const uint16_t*, size_t n) { syms += n; });
    if (b.kind == Boundary::kStored)
      inf.start_in_stored(b.pos);
    else
      inf.start_at_block(b.pos);
    while (!inf.decode_block()) {
    }
    inf.flush();
    CHECK(syms > 0);
  }
  CHECK(found >= 8);
}

// Every kind of data the decoder must reproduce, `n` bytes each; `seed`
// varies the random ones.
struct DataCase {
  const char* name;
  Bytes data;
};
static std::vector<DataCase> data_cases(size_t n, uint32_t seed) {
  std::vector<DataCase> cases;
  cases.push_back({"random", random_bytes(n, seed)});
  cases.push_back({"float32 gaussian", gaussian_floats(n, seed + 1)});
  cases.push_back({"text", text(n, seed + 2)});
  cases.push_back({"text, large vocabulary", wordy_text(n, seed + 5)});
  cases.push_back({"zeros", Bytes(n, 0)});
  cases.push_back({"pattern 3", pattern(n, 3)});
  cases.push_back({"pattern 1000", pattern(n, 1000)});
  cases.push_back({"mixed", mixed(n, seed + 3)});
  return cases;
}

TEST_CASE("pgzip: byte-identical to zlib on every kind of data", "[pgzip]") {
  for (auto& c : data_cases(3 << 20, 1)) {
    for (int level : {0, 1, 6, 9}) {
      for (size_t chunk : {size_t(64) << 10, size_t(256) << 10}) {
        INFO(c.name << ", level " << level << ", chunk " << chunk);
        GzOptions o;
        o.level = level;
        check_roundtrip(c.data, o, chunk);
      }
    }
  }
}

TEST_CASE("pgzip: fixed-Huffman blocks, small blocks, flushes", "[pgzip]") {
  Bytes data = mixed(2 << 20, 11);
  SECTION("fixed Huffman only") {
    GzOptions o;
    o.strategy = Z_FIXED;
    check_roundtrip(data, o, 64 << 10);
  }
  SECTION("huffman only, RLE, filtered") {
    for (int s : {Z_HUFFMAN_ONLY, Z_RLE, Z_FILTERED}) {
      GzOptions o;
      o.strategy = s;
      check_roundtrip(data, o, 64 << 10);
    }
  }
  SECTION("many small blocks (memLevel 1)") {
    GzOptions o;
    o.mem_level = 1;
    check_roundtrip(data, o, 64 << 10);
  }
  SECTION("sync flushes every 32 KiB (pigz-like: empty stored blocks)") {
    GzOptions o;
    o.flush_every = 32 << 10;
    check_roundtrip(data, o, 64 << 10);
  }
  SECTION("full flushes") {
    GzOptions o;
    o.full_flush_every = 100 << 10;
    check_roundtrip(data, o, 64 << 10);
  }
  SECTION("header fields") {
    GzOptions o;
    o.header_fields = true;
    check_roundtrip(data, o, 64 << 10);
  }
}

TEST_CASE("pgzip: chunk sizes and thread counts", "[pgzip]") {
  Bytes data = mixed(4 << 20, 21);
  Bytes gz = gzip(data);
  for (size_t chunk : {size_t(4) << 10, size_t(17) << 10, size_t(64) << 10, size_t(1) << 20}) {
    for (int threads : {1, 2, 3, 4, 8}) {
      INFO("chunk " << chunk << ", threads " << threads);
      Decoded d = pgunzip(gz, threads, chunk, uint32_t(chunk + threads));
      REQUIRE(d.out == data);
      CHECK(d.stats.parallel == (threads > 1 && gz.size() >= 2 * chunk));
    }
  }
}

TEST_CASE("pgzip: speculative chunks are used", "[pgzip]") {
  Bytes data = gaussian_floats(8 << 20, 5);
  Bytes gz = gzip(data);
  Decoded d = pgunzip(gz, 2, 256 << 10);
  REQUIRE(d.out == data);
  CHECK(d.stats.parallel);
  CHECK(d.stats.chunks >= 20);
  CHECK(d.stats.chunks_used >= 20);
  CHECK(d.stats.isal_bytes > data.size() / 2);
  CHECK(d.stats.marker_symbols > 0);
}

TEST_CASE("pgzip: small streams and one thread go through one stream", "[pgzip]") {
  Bytes data = text(1 << 20, 9);
  Bytes gz = gzip(data);
  Decoded d = pgunzip(gz, 2, 4 << 20);
  CHECK(d.out == data);
  CHECK_FALSE(d.stats.parallel);
  Decoded d1 = pgunzip(gz, 1, 64 << 10);
  CHECK(d1.out == data);
  CHECK_FALSE(d1.stats.parallel);
  Bytes empty_gz = gzip(Bytes());
  CHECK(pgunzip(empty_gz, 2, 64 << 10).out.empty());
}

TEST_CASE("pgzip: multi-member streams", "[pgzip]") {
  Bytes all;
  int members = 0;
  Bytes gz = multi_member_stream(&all, &members);
  Bytes ref;
  REQUIRE(zlib_gunzip(gz, &ref));
  REQUIRE(ref == all);
  for (size_t chunk : {size_t(16) << 10, size_t(64) << 10, size_t(300) << 10}) {
    INFO("chunk " << chunk);
    Decoded d = pgunzip(gz, 2, chunk);
    REQUIRE(d.out == all);
    CHECK(d.units == uint64_t(members));
  }
  SECTION("trailing zeros are accepted, garbage is not") {
    Bytes z = gz;
    z.insert(z.end(), 100000, 0);
    CHECK(pgunzip(z, 2, 64 << 10).out == all);
    Bytes g = gz;
    g.push_back('x');
    CHECK(pgunzip_fails(g, 2, 64 << 10));
    Bytes zg = gz;
    zg.insert(zg.end(), 1000, 0);
    zg.push_back(0x1f);
    CHECK(pgunzip_fails(zg, 2, 64 << 10));
    Bytes half = gz;
    half.push_back(0x1f);
    CHECK(pgunzip_fails(half, 2, 64 << 10));
  }
}

TEST_CASE("pgzip: corrupt streams are refused", "[pgzip]") {
  Bytes data = mixed(2 << 20, 31);
  Bytes gz = gzip(data);
  const size_t chunk = 64 << 10;
  SECTION("empty and header-only") {
    CHECK(pgunzip_fails(Bytes(), 2, chunk));
    CHECK(pgunzip_fails(Bytes(gz.begin(), gz.begin() + 10), 2, chunk));
    CHECK(pgunzip_fails(Bytes(1 << 20, 0), 2, chunk));
  }
  SECTION("truncated") {
    for (size_t cut : {gz.size() - 1, gz.size() - 4, gz.size() - 8, gz.size() - 9, gz.size() / 2, size_t(200000)}) {
      INFO("cut at " << cut);
      CHECK(pgunzip_fails(Bytes(gz.begin(), gz.begin() + long(cut)), 2, chunk));
    }
  }
  SECTION("bad CRC, bad ISIZE") {
    Bytes c = gz;
    c[c.size() - 8] ^= 1;
    CHECK(pgunzip_fails(c, 2, chunk));
    Bytes s = gz;
    s[s.size() - 4] ^= 1;
    CHECK(pgunzip_fails(s, 2, chunk));
  }
  SECTION("flipped bytes in every chunk") {
    std::mt19937 rng(5);
    int refused = 0;
    for (size_t c0 = 0; c0 < gz.size(); c0 += chunk) {
      for (int k = 0; k < 3; ++k) {
        size_t pos = std::max<size_t>(10, c0 + rng() % chunk);
        if (pos >= gz.size()) continue;
        Bytes bad = gz;
        bad[pos] ^= uint8_t(1 + rng() % 255);
        Bytes ref;
        bool zok = zlib_gunzip(bad, &ref);
        INFO("byte " << pos << " of " << gz.size());
        if (zok) {
          CHECK(pgunzip(bad, 2, chunk).out == ref);
        } else {
          CHECK(pgunzip_fails(bad, 2, chunk));
          ++refused;
        }
      }
    }
    CHECK(refused > 20);
  }
  SECTION("reserved flags") {
    Bytes r = gz;
    r[3] |= 0x20;
    CHECK(pgunzip_fails(r, 2, chunk));
  }
}

TEST_CASE("pgzip: long marker chains and output far larger than the input", "[pgzip]") {
  // 64 MiB of zeros and of a short pattern: chunks expand ~1000x, markers
  // propagate through whole chunks, jobs pause at their output budget.
  for (size_t period : {size_t(1), size_t(5)}) {
    Bytes data = pattern(64 << 20, period);
    if (period == 1) std::fill(data.begin(), data.end(), 0);
    Bytes gz = gzip(data, {9});
    for (size_t chunk : {size_t(4) << 10, size_t(16) << 10}) {
      INFO("period " << period << ", chunk " << chunk);
      Decoded d = pgunzip(gz, 3, chunk);
      REQUIRE(d.out.size() == data.size());
      REQUIRE(d.out == data);
    }
  }
}

#ifdef HUBFAST_HAVE_ISAL
namespace {
// A gzip stream from ISA-L's compressor: its levels make blocks of 100 KiB
// and more (one block for the whole input at level 0), unlike zlib's.
Bytes isal_gzip(const Bytes& in, int level) {
  isal_zstream zs;
  isal_deflate_init(&zs);
  std::vector<uint8_t> lvl(ISAL_DEF_LVL3_DEFAULT);
  zs.level = uint32_t(level);
  zs.level_buf = lvl.data();
  zs.level_buf_size = uint32_t(lvl.size());
  zs.gzip_flag = IGZIP_GZIP;
  zs.end_of_stream = 1;
  zs.flush = NO_FLUSH;
  zs.next_in = const_cast<uint8_t*>(in.data());
  zs.avail_in = uint32_t(in.size());
  Bytes out(in.size() + in.size() / 8 + (1 << 16));
  zs.next_out = out.data();
  zs.avail_out = uint32_t(out.size());
  for (int calls = 0; zs.internal_state.state != ZSTATE_END; ++calls) {
    REQUIRE(calls < 1000);
    if (zs.avail_out == 0) {
      size_t used = out.size();
      out.resize(used * 2);
      zs.next_out = out.data() + used;
      zs.avail_out = uint32_t(out.size() - used);
    }
    REQUIRE(isal_deflate(&zs) == COMP_OK);
  }
  out.resize(zs.total_out);
  return out;
}
}  // namespace

TEST_CASE("pgzip: streams from ISA-L's compressor (large blocks)", "[pgzip]") {
  Bytes floats = gaussian_floats(16 << 20, 41);
  Bytes mix = mixed(8 << 20, 42);
  for (int level : {0, 1, 2, 3}) {
    for (const Bytes* data : {&floats, &mix}) {
      Bytes gz = isal_gzip(*data, level);
      Bytes ref;
      REQUIRE(zlib_gunzip(gz, &ref));
      REQUIRE(ref == *data);
      for (size_t chunk : {size_t(32) << 10, size_t(128) << 10, size_t(512) << 10}) {
        INFO("level " << level << ", chunk " << chunk << ", " << (data == &floats ? "floats" : "mixed"));
        REQUIRE(pgunzip(gz, 2, chunk).out == *data);
      }
    }
  }
}
#endif

TEST_CASE("pgzip: abandoned mid-stream, and an out() that throws", "[pgzip]") {
  Bytes data = gaussian_floats(6 << 20, 8);
  Bytes gz = gzip(data);
  for (size_t stop_at : {size_t(100000), gz.size() / 3, gz.size() - 10}) {
    auto d = make_parallel_gzip_decoder(3, 64 << 10);
    size_t got = 0;
    auto sink = [&](const uint8_t*, size_t n) { got += n; };
    for (size_t pos = 0; pos < stop_at; pos += 50000)
      d->feed(gz.data() + pos, std::min<size_t>(50000, stop_at - pos), sink);
    d.reset();  // workers cancelled and joined, no hang
  }
  struct Stop {};
  auto d = make_parallel_gzip_decoder(2, 64 << 10);
  size_t got = 0;
  auto sink = [&](const uint8_t*, size_t n) {
    got += n;
    if (got > (1 << 20)) throw Stop();
  };
  bool stopped = false;
  try {
    for (size_t pos = 0; pos < gz.size(); pos += 50000)
      d->feed(gz.data() + pos, std::min<size_t>(50000, gz.size() - pos), sink);
    d->finish(sink);
  } catch (const Stop&) {
    stopped = true;
  }
  CHECK(stopped);
  d.reset();
}

// ---- out-of-order input (feed_at) ------------------------------------------

TEST_CASE("pgzip: out of order (feed_at): byte-identical to zlib on every kind of data", "[pgzip]") {
  uint32_t seed = 1;
  for (auto& c : data_cases(2 << 20, 101)) {
    for (int level : {0, 1, 6, 9}) {  // 0: stored blocks only
      GzOptions o;
      o.level = level;
      Bytes gz = gzip(c.data, o);
      for (size_t chunk : {size_t(64) << 10, size_t(100) << 10}) {
        ++seed;
        const int threads = 2 + int(seed % 3);
        INFO(c.name << ", level " << level << ", chunk " << chunk << ", threads " << threads << ", seed " << seed);
        Decoded d = pgunzip_at(gz, threads, chunk, seed);
        REQUIRE(d.out.size() == c.data.size());
        REQUIRE(d.out == c.data);
        CHECK(d.units == 1);
        CHECK(d.stats.parallel == (gz.size() >= 2 * chunk));
      }
    }
  }
}

TEST_CASE("pgzip: out of order (feed_at): strategies, flushes, header fields", "[pgzip]") {
  Bytes data = mixed(2 << 20, 111);
  std::vector<GzOptions> opts(7);
  opts[0].strategy = Z_FIXED;
  opts[1].strategy = Z_HUFFMAN_ONLY;
  opts[2].strategy = Z_RLE;
  opts[3].mem_level = 1;
  opts[4].flush_every = 32 << 10;
  opts[5].full_flush_every = 100 << 10;
  opts[6].header_fields = true;
  for (size_t i = 0; i < opts.size(); ++i) {
    Bytes gz = gzip(data, opts[i]);
    for (uint32_t seed : {1u, 2u, 3u}) {
      INFO("options " << i << ", seed " << seed);
      REQUIRE(pgunzip_at(gz, 2, 64 << 10, seed + uint32_t(10 * i)).out == data);
    }
  }
}

TEST_CASE("pgzip: out of order (feed_at): multi-member streams", "[pgzip]") {
  Bytes all;
  int members = 0;
  Bytes gz = multi_member_stream(&all, &members);
  for (size_t chunk : {size_t(16) << 10, size_t(64) << 10, size_t(300) << 10}) {
    for (uint32_t seed : {1u, 2u}) {
      INFO("chunk " << chunk << ", seed " << seed);
      Decoded d = pgunzip_at(gz, 3, chunk, seed + uint32_t(chunk));
      REQUIRE(d.out == all);
      CHECK(d.units == uint64_t(members));
    }
  }
  Bytes z = gz;
  z.insert(z.end(), 100000, 0);
  CHECK(pgunzip_at(z, 2, 64 << 10, 7).out == all);
  Bytes g = gz;
  g.push_back('x');
  CHECK(pgunzip_at_fails(g, 2, 64 << 10, 8));
  Bytes zg = gz;
  zg.insert(zg.end(), 1000, 0);
  zg.push_back(0x1f);
  CHECK(pgunzip_at_fails(zg, 2, 64 << 10, 9));
}

TEST_CASE("pgzip: out of order (feed_at): small streams go through one stream", "[pgzip]") {
  const size_t chunk = 64 << 10;
  // One partial segment; two segments; just under and at two chunks.
  for (size_t size : {size_t(1000), size_t(50000), size_t(100000), 2 * chunk - 200, 2 * chunk - 18}) {
    Bytes data = random_bytes(size, uint32_t(size));
    Bytes gz = gzip(data, {0});
    for (uint32_t seed : {1u, 2u, 3u}) {
      INFO("size " << size << " (gzip " << gz.size() << "), seed " << seed);
      Decoded d = pgunzip_at(gz, 2, chunk, seed);
      REQUIRE(d.out == data);
      CHECK(d.stats.parallel == (gz.size() >= 2 * chunk));
    }
  }
  Bytes t = text(1 << 20, 9);
  Decoded d = pgunzip_at(gzip(t), 4, 4 << 20, 5);
  CHECK(d.out == t);
  CHECK_FALSE(d.stats.parallel);
  CHECK(pgunzip_at(gzip(Bytes()), 2, chunk).out.empty());
  CHECK(pgunzip_at_fails(Bytes(), 2, chunk));  // nothing given: empty
  SECTION("one thread takes its input in order only") {
    auto one = make_parallel_gzip_decoder(1, chunk);
    CHECK_FALSE(one->takes_offsets());
    Bytes gz = gzip(t);
    auto sink = [](const uint8_t*, size_t) {};
    try {
      one->feed_at(0, gz.data(), gz.size(), sink);
      FAIL("feed_at accepted");
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::kInvalid);
    }
  }
}

TEST_CASE("pgzip: out of order (feed_at): many threads", "[pgzip]") {
  Bytes data = mixed(4 << 20, 121);
  Bytes gz = gzip(data);
  for (int threads : {8, 16}) {
    for (size_t chunk : {size_t(16) << 10, size_t(64) << 10}) {
      INFO("threads " << threads << ", chunk " << chunk);
      Decoded d = pgunzip_at(gz, threads, chunk, uint32_t(threads * 7 + chunk));
      REQUIRE(d.out == data);
      CHECK(d.stats.parallel);
    }
  }
}

TEST_CASE("pgzip: out of order (feed_at): gaps and bytes given twice are refused", "[pgzip]") {
  Bytes data = gaussian_floats(3 << 20, 131);
  Bytes gz = gzip(data);
  const size_t chunk = 64 << 10;
  auto sink = [](const uint8_t*, size_t) {};
  auto refused_gap = [&](const std::vector<Span>& pieces) {
    auto d = make_parallel_gzip_decoder(2, chunk);
    for (const Span& p : pieces) d->feed_at(p.off, gz.data() + p.off, p.len, sink);
    try {
      d->finish(sink);
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::kIntegrity);
      CHECK(std::string(e.what()).find("never given") != std::string::npos);
      return true;
    }
    return false;
  };
  std::mt19937 rng(4);
  Ranges r = ranges_for(chunk, rng);
  std::vector<Span> all = deliveries(gz.size(), r, rng);
  auto without = [&](uint64_t from, uint64_t to) {  // pieces cut around [from, to)
    std::vector<Span> out;
    for (const Span& p : all) {
      uint64_t a = p.off, e = p.off + p.len;
      if (a < from) out.push_back({a, size_t(std::min(e, from) - a)});
      if (e > to) out.push_back({std::max(a, to), size_t(e - std::max(a, to))});
    }
    return out;
  };
  CHECK(refused_gap(without(0, 1)));                                // the first byte
  CHECK(refused_gap(without(0, 3 * chunk)));                        // the first segments
  CHECK(refused_gap(without(gz.size() / 2, gz.size() / 2 + 1)));    // one byte inside
  CHECK(refused_gap(without(5 * chunk, 6 * chunk)));                // one whole segment
  CHECK(refused_gap(without(gz.size() - 100, gz.size() - 99)));     // inside the last segment
  CHECK(refused_gap(without(1000, 2000)));                          // below two chunks
  {
    // Below two chunks in all: the probe.
    auto d = make_parallel_gzip_decoder(2, chunk);
    d->feed_at(0, gz.data(), 1000, sink);
    d->feed_at(2000, gz.data() + 2000, 50000, sink);
    CHECK_THROWS_AS(d->finish(sink), Error);
  }
  SECTION("a byte given twice") {
    auto d = make_parallel_gzip_decoder(2, chunk);
    d->feed_at(0, gz.data(), 3 * chunk + 5, sink);
    for (Span dup : {Span{3 * chunk + 4, 10}, Span{100, 1}, Span{chunk, 2 * chunk}}) {
      try {
        d->feed_at(dup.off, gz.data() + dup.off, dup.len, sink);
        FAIL("bytes " << dup.off << " given twice accepted");
      } catch (const Error& e) {
        CHECK(e.kind() == ErrorKind::kInvalid);
      }
    }
    d.reset();
  }
  SECTION("feed() and feed_at() on one stream") {
    auto a = make_parallel_gzip_decoder(2, chunk);
    a->feed(gz.data(), 1000, sink);
    CHECK_THROWS_AS(a->feed_at(1000, gz.data() + 1000, 1000, sink), Error);
    auto b = make_parallel_gzip_decoder(2, chunk);
    b->feed_at(1000, gz.data() + 1000, 1000, sink);
    CHECK_THROWS_AS(b->feed(gz.data(), 1000, sink), Error);
  }
}

TEST_CASE("pgzip: out of order (feed_at): corrupt streams are refused", "[pgzip]") {
  Bytes data = mixed(2 << 20, 141);
  Bytes gz = gzip(data);
  const size_t chunk = 64 << 10;
  SECTION("truncated") {
    uint32_t seed = 1;
    for (size_t cut : {gz.size() - 1, gz.size() - 4, gz.size() - 8, gz.size() - 9, gz.size() / 2, size_t(200000)}) {
      INFO("cut at " << cut);
      CHECK(pgunzip_at_fails(Bytes(gz.begin(), gz.begin() + long(cut)), 2, chunk, ++seed));
    }
  }
  SECTION("bad CRC, bad ISIZE, reserved flags") {
    Bytes c = gz;
    c[c.size() - 8] ^= 1;
    CHECK(pgunzip_at_fails(c, 2, chunk, 3));
    Bytes s = gz;
    s[s.size() - 4] ^= 1;
    CHECK(pgunzip_at_fails(s, 2, chunk, 4));
    Bytes f = gz;
    f[3] |= 0x20;
    CHECK(pgunzip_at_fails(f, 2, chunk, 5));
  }
  SECTION("flipped bytes") {
    std::mt19937 rng(6);
    int refused = 0;
    for (size_t c0 = 0; c0 < gz.size(); c0 += chunk) {
      for (int k = 0; k < 2; ++k) {
        size_t pos = std::max<size_t>(10, c0 + rng() % chunk);
        if (pos >= gz.size()) continue;
        Bytes bad = gz;
        bad[pos] ^= uint8_t(1 + rng() % 255);
        Bytes ref;
        bool zok = zlib_gunzip(bad, &ref);
        INFO("byte " << pos << " of " << gz.size());
        if (zok) {
          CHECK(pgunzip_at(bad, 2 + k, chunk, uint32_t(pos)).out == ref);
        } else {
          CHECK(pgunzip_at_fails(bad, 2 + k, chunk, uint32_t(pos)));
          ++refused;
        }
      }
    }
    CHECK(refused > 15);
  }
}

namespace {
// The caller of parallel ranged requests: connections take ranges in
// order, deliver them interleaved, and none feeds beyond input_floor() +
// window; with nothing to feed it asks for output (feed_at with n == 0).
// input_floor() must never go back nor pass the bytes given without a gap,
// and must move far enough for the caller never to be stuck.
void feed_bounded(const Bytes& gz, const Bytes& data, int threads, size_t chunk, uint64_t window,
                  bool tight = false) {
  INFO("threads " << threads << ", chunk " << chunk << ", window " << window);
  auto d = make_parallel_gzip_decoder(threads, chunk);
  std::mt19937 rng{uint32_t(threads)};
  Ranges r;
  r.min_range = chunk / 2 + 1;
  r.max_range = 3 * chunk + 5;
  r.max_piece = 32 << 10;
  r.conns = 4;
  r.shuffle = false;
  std::vector<Span> ranges = cut_ranges(gz.size(), r, rng);
  std::vector<Span> open;
  size_t next = 0;
  Bytes out;
  auto sink = [&](const uint8_t* p, size_t n) { out.insert(out.end(), p, p + n); };
  Given given;
  uint64_t floor = 0;
  int pumps = 0;
  auto progress = std::chrono::steady_clock::now();
  auto check_floor = [&] {
    uint64_t f = d->input_floor();
    if (f < floor || f > given.prefix()) FAIL("input_floor " << f << " after " << floor << ", prefix " << given.prefix());
    if (f != floor) progress = std::chrono::steady_clock::now();
    floor = f;
  };
  for (;;) {
    while (open.size() < r.conns && next < ranges.size()) open.push_back(ranges[next++]);
    if (open.empty()) break;
    std::vector<size_t> ok;
    for (size_t i = 0; i < open.size(); ++i)
      if (open[i].off < floor + window) ok.push_back(i);
    if (ok.empty()) {
      size_t before = out.size();
      d->feed_at(0, nullptr, 0, sink);
      ++pumps;
      check_floor();
      if (out.size() != before) progress = std::chrono::steady_clock::now();
      if (std::chrono::steady_clock::now() - progress > std::chrono::seconds(60))
        FAIL("stuck at input_floor " << floor << " with " << out.size() << " bytes out");
      if (out.size() == before) std::this_thread::sleep_for(std::chrono::microseconds(200));
      continue;
    }
    size_t c = ok[rng() % ok.size()];
    Span& s = open[c];
    size_t n = std::min<size_t>({s.len, 1 + rng() % r.max_piece, size_t(floor + window - s.off)});
    d->feed_at(s.off, gz.data() + s.off, n, sink);
    given.add(s.off, n);
    s.off += n;
    s.len -= n;
    if (s.len == 0) open.erase(open.begin() + long(c));
    check_floor();
  }
  // A wide window is seldom reached (the feeding waits for the decoding once
  // two chunks wait for a job); one under six chunks always is.
  if (tight) CHECK(pumps > 0);
  CHECK(floor > 0);
  d->finish(sink);
  REQUIRE(out.size() == data.size());
  REQUIRE(out == data);
  CHECK(d->input_floor() == gz.size());
}
}  // namespace

TEST_CASE("pgzip: out of order (feed_at): input_floor() bounds the caller, which is never stuck", "[pgzip]") {
  Bytes data = mixed(6 << 20, 151);
  Bytes floats = gaussian_floats(6 << 20, 152);
  data.insert(data.end(), floats.begin(), floats.end());
  const size_t chunk = 128 << 10;
  // What pgzip.h asks of the caller: 3 chunks and 4 MiB beyond the floor.
  const uint64_t window = 3 * chunk + (4 << 20);
  for (int threads : {2, 3}) feed_bounded(gzip(data), data, threads, chunk, window);
#ifdef HUBFAST_HAVE_ISAL
  // Large blocks: validating a block start decodes far beyond it.
  feed_bounded(isal_gzip(data, 1), data, 2, chunk, window);
#endif
  // Tighter than asked, on zlib's small blocks: two chunks start the
  // decoding, one more finds the next block start.
  feed_bounded(gzip(data), data, 2, chunk, 3 * chunk, true);
}

TEST_CASE("pgzip: out of order (feed_at): jobs start while earlier segments are missing", "[pgzip]") {
  Bytes data = gaussian_floats(4 << 20, 161);
  Bytes gz = gzip(data);
  const size_t chunk = 64 << 10;
  const uint64_t hold = 2 * chunk + 1000;  // the first bytes come last
  auto d = make_parallel_gzip_decoder(2, chunk);
  Bytes out;
  auto sink = [&](const uint8_t* p, size_t n) { out.insert(out.end(), p, p + n); };
  std::mt19937 rng(5);
  Ranges r = ranges_for(chunk, rng);
  std::vector<Span> held;
  for (const Span& p : deliveries(gz.size(), r, rng)) {
    uint64_t a = std::max<uint64_t>(p.off, hold), e = p.off + p.len;
    if (p.off < hold) held.push_back({p.off, size_t(std::min<uint64_t>(e, hold) - p.off)});
    if (e > a) d->feed_at(a, gz.data() + a, size_t(e - a), sink);
  }
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (parallel_gzip_stats(*d).chunks < 2 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(parallel_gzip_stats(*d).chunks >= 2);  // decoding the later segments
  CHECK(out.empty());                          // nothing before segment 0
  CHECK(d->input_floor() == 0);
  std::reverse(held.begin(), held.end());
  for (const Span& p : held) d->feed_at(p.off, gz.data() + p.off, p.len, sink);
  d->finish(sink);
  REQUIRE(out == data);
  CHECK(parallel_gzip_stats(*d).chunks_used >= 10);
}

TEST_CASE("pgzip: out of order (feed_at): abandoned mid-stream, and an out() that throws", "[pgzip]") {
  Bytes data = gaussian_floats(6 << 20, 171);
  Bytes gz = gzip(data);
  const size_t chunk = 64 << 10;
  for (double frac : {0.05, 0.3, 0.7, 0.99}) {
    for (int threads : {2, 5}) {
      std::mt19937 rng(uint32_t(frac * 100) + uint32_t(threads));
      Ranges r = ranges_for(chunk, rng);
      std::vector<Span> pieces = deliveries(gz.size(), r, rng);
      auto d = make_parallel_gzip_decoder(threads, chunk);
      auto sink = [](const uint8_t*, size_t) {};
      for (size_t i = 0; i < size_t(double(pieces.size()) * frac); ++i)
        d->feed_at(pieces[i].off, gz.data() + pieces[i].off, pieces[i].len, sink);
      d.reset();  // jobs waiting for segments that never come: cancelled and joined
    }
  }
  struct Stop {};
  for (uint32_t seed : {1u, 2u, 3u}) {
    auto d = make_parallel_gzip_decoder(2 + int(seed % 2), chunk);
    size_t got = 0;
    auto sink = [&](const uint8_t*, size_t n) {
      got += n;
      if (got > (1 << 20)) throw Stop();
    };
    std::mt19937 rng(seed);
    Ranges r = ranges_for(chunk, rng);
    bool stopped = false;
    try {
      for (const Span& p : deliveries(gz.size(), r, rng)) d->feed_at(p.off, gz.data() + p.off, p.len, sink);
      d->finish(sink);
    } catch (const Stop&) {
      stopped = true;
    }
    CHECK(stopped);
    d.reset();
  }
}

// ---- input and output handed over whole (no copies) ---------------------------

TEST_CASE("pgzip: whole segments taken by move, pieces handed out whole, buffers back to the spares", "[pgzip]") {
  const size_t chunk = 256 << 10;
  Bytes data = mixed(6 << 20, 131);
  Bytes gz = gzip(data);
  REQUIRE(gz.size() > 4 * chunk);
  for (bool at : {false, true}) {
    INFO((at ? "feed_at_owned" : "feed_owned"));
    auto spares = std::make_shared<Spares>(64);
    auto d = make_parallel_gzip_decoder(2, chunk);
    d->set_input_spares(spares);
    Bytes out;
    size_t shared_bytes = 0;
    std::vector<std::shared_ptr<const Bytes>> held;  // as the writer's queue holds them
    d->set_shared_out([&](std::shared_ptr<const Bytes> b) {
      out.insert(out.end(), b->begin(), b->end());
      shared_bytes += b->size();
      held.push_back(std::move(b));
    });
    auto sink = [&](const uint8_t* p, size_t n) { out.insert(out.end(), p, p + n); };
    // Segments: whole ones by move; in the out-of-order case in a shuffled
    // order; the first in odd pieces (copied), the last (short) copied.
    std::vector<uint64_t> order;
    for (uint64_t off = chunk; off + chunk <= gz.size(); off += chunk) order.push_back(off);
    if (at) std::shuffle(order.begin(), order.end(), std::mt19937(7));
    size_t taken = 0;
    auto give = [&](uint64_t off, size_t n) {
      Bytes b(gz.begin() + off, gz.begin() + off + n);
      if (at)
        d->feed_at_owned(off, std::move(b), sink);
      else
        d->feed_owned(std::move(b), sink);
      if (b.empty()) ++taken;
    };
    for (uint64_t off = 0; off < chunk; off += 100000) give(off, std::min<uint64_t>(100000, chunk - off));
    for (uint64_t off : order) give(off, chunk);
    const uint64_t tail = (gz.size() / chunk) * chunk;
    if (tail < gz.size()) give(tail, gz.size() - tail);
    d->finish(sink);
    CHECK(taken == order.size());
    REQUIRE(out.size() == data.size());
    CHECK(out == data);
    CHECK(shared_bytes > data.size() / 2);
    d.reset();
    held.clear();  // the last holders let go: the buffers come back
    Bytes back = spares->take(false);
    CHECK(back.capacity() >= chunk);
  }
}
