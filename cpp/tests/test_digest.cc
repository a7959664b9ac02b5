// CRC32C combination against CRC32C of the concatenation: the check of an
// object whose ranges arrive out of order.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "hubfast/digest.h"

using namespace hubfast;

TEST_CASE("crc32c: known value and combination of split ranges", "[digest]") {
  const char* nine = "123456789";
  REQUIRE(crc32c_update(0, nine, 9) == 0xE3069283u);  // the CRC-32C check value
  std::mt19937_64 rng(7);
  std::vector<uint8_t> data(3 << 20);
  for (auto& b : data) b = uint8_t(rng());
  const uint32_t whole = crc32c_update(0, data.data(), data.size());
  for (size_t cut : {size_t(0), size_t(1), size_t(7), size_t(4096), size_t(1 << 20) + 3, data.size()}) {
    uint32_t a = crc32c_update(0, data.data(), cut);
    uint32_t b = crc32c_update(0, data.data() + cut, data.size() - cut);
    CHECK(crc32c_combine(a, b, data.size() - cut) == whole);
  }
  // Many ranges, combined in order.
  uint32_t acc = 0;
  size_t pos = 0;
  while (pos < data.size()) {
    size_t n = std::min<size_t>(data.size() - pos, 1 + rng() % 300000);
    acc = crc32c_combine(acc, crc32c_update(0, data.data() + pos, n), n);
    pos += n;
  }
  CHECK(acc == whole);
  CHECK(crc32c_combine(0x12345678u, 0, 0) == 0x12345678u);
}
