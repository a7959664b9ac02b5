// One gzip stream decoded on several cores (the technique of pugz and
// rapidgzip). The compressed stream is cut into chunks; in each chunk a
// worker finds a deflate block start (candidates validated by decoding),
// decodes from there with back-references into the unknown previous 32 KiB
// kept as markers, and, once its last 32 KiB of output hold no marker, hands
// the rest of the chunk to ISA-L with that window as dictionary. Chunk i
// stops exactly where chunk i+1's block starts (ISA-L is stopped there by
// final stored blocks with sentinel contents spliced into its input; a
// start that was a false positive is decoded through instead). The feeding thread resolves
// the markers in order, emits the output in order and checks every member's
// CRC32 and ISIZE. Streams below two chunks, or one thread, are decoded by
// ISA-L in one stream.
//
// Out of order (feed_at, for parallel ranged requests; takes_offsets() is
// true unless threads <= 1): a chunk job needs only its own chunk and the
// ones after it, so a job starts as soon as its chunk is complete, even
// while earlier ones are missing, and decoding overlaps the download. Output
// is still in order on the calling thread. finish() refuses a stream with
// gaps (kIntegrity); a byte given twice, or mixing feed() and feed_at(), is
// kInvalid. The decoder holds what it is given; input_floor() (a multiple
// of the chunk size) is where the bytes still needed begin. The caller must
// be ready to feed at least 3 chunks and 4 MiB beyond it (two chunks start
// the decoding; finding a block start decodes up to 4 MiB past it), and
// when it holds everything back, call feed_at with n == 0: that hands out
// the output ready (the decoder moves on only through its calls) and waits
// for some when the oldest job can make it without more input.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "hubfast/decode.h"

namespace hubfast {

// threads <= 0: one per core. Memory stays bounded: at most 2 * threads
// chunks in flight, each buffering at most a few chunk sizes of output.
std::unique_ptr<Decoder> make_parallel_gzip_decoder(int threads, size_t chunk_bytes = 4 << 20);

// What a parallel gzip decoder did (for tests and benchmarks).
struct ParallelGzipStats {
  bool parallel = false;      // false: decoded as one stream (small, one thread)
  uint64_t chunks = 0;        // chunk jobs started
  uint64_t chunks_used = 0;   // speculative chunks whose output was used
  uint64_t false_starts = 0;  // block starts found that were not real boundaries
  uint64_t marker_symbols = 0;  // output decoded by our inflater (16-bit symbols)
  uint64_t isal_bytes = 0;      // output inflated by ISA-L
};

// Stats of a decoder made by make_parallel_gzip_decoder (zeros otherwise).
ParallelGzipStats parallel_gzip_stats(const Decoder& d);

}  // namespace hubfast
