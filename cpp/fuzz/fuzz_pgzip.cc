// libFuzzer harness for the parallel gzip decoder: arbitrary bytes, or a
// gzip stream made by zlib from the input and then damaged, decoded with
// tiny chunks (so that chunk boundaries fall everywhere). Whenever zlib
// decodes the stream, the output must be identical; a refusal must be
// kIntegrity, and only where ISA-L in one stream refuses it too. When the
// last input byte says so, the stream is fed out of order through feed_at:
// ranges of random sizes in a shuffled order, several open at once, each
// delivering its pieces in increasing order (parallel ranged requests).
//   cmake -S . -B build/fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DHUBFAST_FUZZ=ON \
//     -DHUBFAST_PYTHON=OFF -DHUBFAST_SANITIZE=address,undefined
//   build/fuzz/fuzz_pgzip -max_len=200000
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "hubfast/decode.h"
#include "hubfast/error.h"
#include "hubfast/pgzip.h"

namespace {

using Bytes = std::vector<uint8_t>;

bool zlib_gunzip(const Bytes& in, Bytes* out) {
  out->clear();
  size_t pos = 0;
  bool any = false;
  while (pos < in.size()) {
    if (any) {
      size_t z = pos;
      while (z < in.size() && in[z] == 0) ++z;
      if (z == in.size()) return true;
      if (z != pos) return false;
    }
    z_stream zs{};
    if (inflateInit2(&zs, 15 + 16) != Z_OK) return false;
    zs.next_in = const_cast<Bytef*>(in.data() + pos);
    zs.avail_in = uInt(in.size() - pos);
    uint8_t buf[1 << 14];
    int r;
    do {
      zs.next_out = buf;
      zs.avail_out = sizeof buf;
      r = inflate(&zs, Z_NO_FLUSH);
      out->insert(out->end(), buf, buf + (sizeof buf - zs.avail_out));
      if (out->size() > (64u << 20)) r = Z_MEM_ERROR;  // bombs: not interesting
    } while (r == Z_OK);
    size_t used = zs.total_in;
    inflateEnd(&zs);
    if (r != Z_STREAM_END) return false;
    pos += used;
    any = true;
  }
  return any;
}

Bytes deflate_gzip(const uint8_t* p, size_t n, int level, int strategy) {
  z_stream zs{};
  deflateInit2(&zs, level, Z_DEFLATED, 15 + 16, 8, strategy);
  Bytes out(deflateBound(&zs, uLong(n)) + 64);
  zs.next_in = const_cast<Bytef*>(p);
  zs.avail_in = uInt(n);
  zs.next_out = out.data();
  zs.avail_out = uInt(out.size());
  deflate(&zs, Z_FINISH);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

// Runs `feed_all(sink)` and finish() on `d`; false on a refusal (which must
// be kIntegrity). Output over 64 MiB counts as a refusal (bombs: not
// interesting).
template <class Feed>
bool run(hubfast::Decoder& d, Bytes* out, const Feed& feed_all) {
  out->clear();
  hubfast::OutFn sink = [&](const uint8_t* p, size_t n) {
    out->insert(out->end(), p, p + n);
    if (out->size() > (64u << 20)) throw hubfast::Error(hubfast::ErrorKind::kLimit, "too large");
  };
  try {
    feed_all(sink);
    d.finish(sink);
  } catch (const hubfast::Error& e) {
    if (e.kind() == hubfast::ErrorKind::kLimit) return false;
    if (e.kind() != hubfast::ErrorKind::kIntegrity) std::abort();
    return false;
  }
  return true;
}

// Decodes with `d`, fed in order in pieces of `step`.
bool decode(hubfast::Decoder& d, const Bytes& in, size_t step, Bytes* out) {
  return run(d, out, [&](const hubfast::OutFn& sink) {
    for (size_t pos = 0; pos < in.size(); pos += step) d.feed(in.data() + pos, std::min(step, in.size() - pos), sink);
  });
}

// The same through feed_at: ranges cut and ordered by `seed`, `conns` of
// them open at once, their pieces interleaved.
bool decode_at(hubfast::Decoder& d, const Bytes& in, uint32_t seed, size_t chunk, Bytes* out) {
  std::mt19937 rng(seed);
  struct Span {
    size_t off, len;
  };
  std::vector<Span> ranges, open;
  const size_t max_range = 1 + rng() % (4 * chunk);
  for (size_t pos = 0; pos < in.size();) {
    size_t n = std::min(in.size() - pos, 1 + size_t(rng() % max_range));
    ranges.push_back({pos, n});
    pos += n;
  }
  std::shuffle(ranges.begin(), ranges.end(), rng);
  const size_t conns = 1 + rng() % 4, max_piece = 1 + rng() % chunk;
  return run(d, out, [&](const hubfast::OutFn& sink) {
    size_t next = 0;
    for (;;) {
      while (open.size() < conns && next < ranges.size()) open.push_back(ranges[next++]);
      if (open.empty()) break;
      size_t c = rng() % open.size();
      Span& s = open[c];
      size_t n = std::min(s.len, 1 + size_t(rng() % max_piece));
      d.feed_at(s.off, in.data() + s.off, n, sink);
      s.off += n;
      s.len -= n;
      if (s.len == 0) open.erase(open.begin() + long(c));
      if (rng() % 8 == 0) d.feed_at(0, nullptr, 0, sink);
    }
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  const uint8_t mode = data[0], arg = data[1], arg2 = data[2];
  const uint8_t order = data[size - 1];  // odd: out of order (feed_at); the rest seeds the order
  data += 3;
  size -= 3;
  Bytes in;
  if (mode & 1) {
    // A valid stream (maybe two members) made from the input, maybe damaged.
    static const int strategies[] = {Z_DEFAULT_STRATEGY, Z_FIXED, Z_HUFFMAN_ONLY, Z_RLE, Z_FILTERED};
    int level = (mode >> 1) % 10;
    int strategy = strategies[arg % 5];
    size_t split = (mode & 0x20) ? size / 2 : size;
    in = deflate_gzip(data, split, level, strategy);
    if (split < size) {
      Bytes second = deflate_gzip(data + split, size - split, 9 - level, Z_DEFAULT_STRATEGY);
      in.insert(in.end(), second.begin(), second.end());
    }
    if ((mode & 0x40) && !in.empty()) in[(size_t(arg2) * 7919 + arg) % in.size()] ^= uint8_t(1 + (arg >> 1));
    if (mode & 0x80) in.resize(in.size() - std::min<size_t>(in.size(), 1 + arg2 % 16));
  } else {
    in.assign(data, data + size);
  }
  const size_t chunk = size_t(256) << (arg % 5);  // 256 B .. 4 KiB
  const int threads = 2 + (arg2 & 1);
  Bytes ref, got;
  bool zok = zlib_gunzip(in, &ref);
  auto par = hubfast::make_parallel_gzip_decoder(threads, chunk);
  const uint32_t order_seed = uint32_t(order >> 1) * 2654435761u ^ uint32_t(size);
  bool ok = (order & 1) && par->takes_offsets() ? decode_at(*par, in, order_seed, chunk, &got)
                                                 : decode(*par, in, 1 + size_t(arg2) * 37, &got);
  if (zok && ok && got != ref) std::abort();
  if (zok && !ok) {
    // Refused although zlib took it: only where ISA-L refuses it too.
    hubfast::DecodeOptions opt;
    opt.use_isal = true;
    opt.threads = 1;
    auto seq = hubfast::make_decoder(hubfast::Compression::kGzip, opt);
    Bytes s;
    if (decode(*seq, in, 1 << 16, &s) && ref.size() <= (64u << 20)) std::abort();
  }
  return 0;
}
