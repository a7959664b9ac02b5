// Decodes a gzip file the way the pipeline does (1 MiB reads fed to a
// Decoder on one thread), writing the output to stdout (point it at
// /dev/null), and prints the wall time and the decoder's stats to stderr.
//   pgzip_bench seq FILE             the sequential decoder (ISA-L, one stream)
//   pgzip_bench par THREADS FILE [CHUNK_MIB]
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "hubfast/decode.h"
#include "hubfast/error.h"
#include "hubfast/pgzip.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s seq FILE | par THREADS FILE [CHUNK_MIB]\n", argv[0]);
    return 2;
  }
  std::string mode = argv[1];
  std::unique_ptr<hubfast::Decoder> dec;
  const char* path;
  if (mode == "seq") {
    hubfast::DecodeOptions opt;
    opt.use_isal = true;
    opt.threads = 1;
    dec = hubfast::make_decoder(hubfast::Compression::kGzip, opt);
    path = argv[2];
  } else {
    if (argc < 4) return 2;
    size_t chunk = argc > 4 ? size_t(std::atof(argv[4]) * (1 << 20)) : size_t(4) << 20;
    dec = hubfast::make_parallel_gzip_decoder(std::atoi(argv[2]), chunk);
    path = argv[3];
  }
  int fd = open(path, O_RDONLY);
  if (fd < 0) {
    std::perror(path);
    return 1;
  }
  auto t0 = std::chrono::steady_clock::now();
  std::vector<uint8_t> buf(1 << 20);
  uint64_t total = 0;
  auto out = [&](const uint8_t* p, size_t n) {
    total += n;
    while (n) {
      ssize_t w = write(1, p, n);
      if (w <= 0) {
        std::perror("write");
        std::exit(1);
      }
      p += w;
      n -= size_t(w);
    }
  };
  try {
    for (;;) {
      ssize_t r = read(fd, buf.data(), buf.size());
      if (r < 0) {
        std::perror("read");
        return 1;
      }
      if (r == 0) break;
      dec->feed(buf.data(), size_t(r), out);
    }
    dec->finish(out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto st = hubfast::parallel_gzip_stats(*dec);
  std::fprintf(stderr,
               "{\"seconds\": %.4f, \"bytes\": %llu, \"parallel\": %s, \"chunks\": %llu, \"chunks_used\": %llu, "
               "\"false_starts\": %llu, \"marker_symbols\": %llu, \"isal_bytes\": %llu}\n",
               s, (unsigned long long)total, st.parallel ? "true" : "false", (unsigned long long)st.chunks,
               (unsigned long long)st.chunks_used, (unsigned long long)st.false_starts,
               (unsigned long long)st.marker_symbols, (unsigned long long)st.isal_bytes);
  return 0;
}
