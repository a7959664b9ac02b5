// One archive, start to end: a reader thread (the Source), a decoder thread
// and a writer thread (tar parser + DirWriter), joined by bounded queues.
// The calling thread only waits and polls, so Python can take Ctrl-C and
// drive progress while the GIL is released.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "hubfast/decode.h"
#include "hubfast/source.h"
#include "hubfast/tar.h"

namespace hubfast {

struct ExtractOptions {
  TarLimits limits;
  DecodeOptions decode;
  std::string expected_sha256;  // of the archive bytes; empty: not checked
  size_t chunk_bytes = 1 << 20;
  size_t queue_chunks = 8;      // per queue: bounds memory
};

struct Progress {
  uint64_t bytes_in = 0;     // archive bytes received
  int64_t total_in = -1;     // archive size if known
  uint64_t bytes_out = 0;    // member bytes written
};

struct ExtractStats {
  Compression compression = Compression::kNone;
  uint64_t bytes_in = 0, bytes_out = 0, files = 0, dirs = 0, units = 0;
  int decode_threads = 1;  // threads that decoded the stream in parallel (1: one stream)
  double seconds = 0, read_busy = 0, decode_busy = 0, write_busy = 0;
  std::string sha256;  // of the archive bytes, when computed
  std::map<std::string, double> source;  // the source's own counters
  struct File {
    uint64_t size;
    uint32_t crc32;
  };
  std::map<std::string, File> tree;  // every file written: size and CRC32
};

// Called about every 100 ms on the calling thread; throwing from it cancels
// the pipeline (the exception propagates once the threads are joined).
using PollFn = std::function<void(const Progress&)>;

// Extracts the archive from `src` into the open directory `target_fd`.
ExtractStats extract(Source& src, int target_fd, const ExtractOptions& opt,
                     const PollFn& poll);

}  // namespace hubfast
