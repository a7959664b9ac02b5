// Streaming decompressors, chosen by the archive's magic bytes. Each verifies
// its format's own checks (gzip CRC32+ISIZE of every member, zstd frame
// checksums, xz/bzip2 checks) and refuses a stream that ends early.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace hubfast {

enum class Compression { kNone, kGzip, kZstd, kBzip2, kXz };

const char* compression_name(Compression c);

// Needs at most 6 bytes; fewer bytes than a magic means kNone.
Compression detect_compression(const uint8_t* p, size_t n);

using OutFn = std::function<void(const uint8_t*, size_t)>;

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
