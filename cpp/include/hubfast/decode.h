// Streaming decompressors, chosen by the archive's magic bytes. Each verifies
// its format's own checks (gzip CRC32+ISIZE of every member, zstd frame
// checksums, xz/bzip2 checks) and refuses a stream that ends early.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace hubfast {

class Spares;

enum class Compression { kNone, kGzip, kZstd, kBzip2, kXz };

const char* compression_name(Compression c);

// Needs at most 6 bytes; fewer bytes than a magic means kNone.
Compression detect_compression(const uint8_t* p, size_t n);

using OutFn = std::function<void(const uint8_t*, size_t)>;
// A decoded buffer handed over whole instead of copied out: the receiver
// holds it for as long as it needs the bytes.
using SharedOutFn = std::function<void(std::shared_ptr<const std::vector<uint8_t>>)>;

class Decoder {
 public:
  virtual ~Decoder() = default;
  // Consumes all of `in`, calling `out` for every decoded piece.
  virtual void feed(const uint8_t* in, size_t n, const OutFn& out) = 0;
  // End of input: throws kIntegrity unless the stream ended properly.
  virtual void finish(const OutFn& out) = 0;
  // Frames or members decoded so far (zstd frames, gzip members).
  virtual uint64_t units() const { return 0; }
  // Threads that decoded in parallel (1: one stream), once finished.
  virtual int parallelism() const { return 1; }

  // Input out of order (the segments of parallel ranged requests, as they
  // arrive). A decoder whose takes_offsets() is true accepts feed_at()
  // instead of feed() for a whole stream: every byte of the stream is given
  // exactly once, in pieces of any size at any offset and in any order (the
  // pieces of one range in increasing order), then finish(). Output still
  // comes out in order, through `out` on the calling thread. feed_at()
  // never waits for input that has not been given yet (the caller feeds from
  // one thread); it may wait for decoding of what it holds. The caller
  // bounds how far ahead of the decoder's position it feeds (input_floor()).
  virtual bool takes_offsets() const { return false; }
  virtual void feed_at(uint64_t offset, const uint8_t* in, size_t n, const OutFn& out);
  // Compressed bytes below this offset have been consumed and released.
  virtual uint64_t input_floor() const { return 0; }
  // A decoder that decodes into whole buffers of its own (zstd frames in
  // parallel) hands them to `give` instead of copying them through `out`;
  // what goes through either keeps the output's order.
  virtual void set_shared_out(SharedOutFn give) {}

  // Input the caller is done with, as feed() and feed_at(): a decoder that
  // keeps its input (parallel gzip's segments) takes a whole aligned segment
  // of it by move instead of copying it; what it leaves in `in` the caller
  // may reuse.
  virtual void feed_owned(std::vector<uint8_t>&& in, const OutFn& out) { feed(in.data(), in.size(), out); }
  virtual void feed_at_owned(uint64_t offset, std::vector<uint8_t>&& in, const OutFn& out) {
    feed_at(offset, in.data(), in.size(), out);
  }
  // Where the input buffers it took go once spent: the caller's pool, to fill again.
  virtual void set_input_spares(std::shared_ptr<Spares> spares) {}
  // The size of those whole segments (0: the decoder copies all its input).
  virtual size_t input_segment_bytes() const { return 0; }
};

struct DecodeOptions {
  bool use_isal = true;        // gzip through ISA-L; zlib otherwise
  int zstd_window_log_max = 27;  // bounds the zstd window (128 MiB)
  uint64_t xz_memlimit = 256ull << 20;
  int threads = 0;  // decoding threads where the format allows (0: one per core)
};

std::unique_ptr<Decoder> make_decoder(Compression c, const DecodeOptions& opt);
bool have_isal();

}  // namespace hubfast
