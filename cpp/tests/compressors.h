// Reference compressors (zlib, libbz2) for the native tests' inputs.
#pragma once
#include <catch2/catch.hpp>

#include <bzlib.h>
#include <zlib.h>

#include <string>

namespace hubfast::testing {

inline std::string gzip(const std::string& in, int level = 6) {
  z_stream zs{};
  REQUIRE(deflateInit2(&zs, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) == Z_OK);
  std::string out;
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  zs.avail_in = uInt(in.size());
  char buf[1 << 16];
  int r;
  do {
    zs.next_out = reinterpret_cast<Bytef*>(buf);
    zs.avail_out = sizeof buf;
    r = deflate(&zs, Z_FINISH);
    REQUIRE((r == Z_OK || r == Z_STREAM_END || r == Z_BUF_ERROR));
    out.append(buf, sizeof buf - zs.avail_out);
  } while (r != Z_STREAM_END);
  deflateEnd(&zs);
  return out;
}

inline std::string bzip2(const std::string& in) {
  unsigned cap = unsigned(in.size() + in.size() / 100 + 600);
  std::string out(cap, '\0');
  REQUIRE(BZ2_bzBuffToBuffCompress(&out[0], &cap, const_cast<char*>(in.data()), unsigned(in.size()), 9, 0, 30) ==
          BZ_OK);
  out.resize(cap);
  return out;
}

}  // namespace hubfast::testing
