// Digests of archive bytes: sha256 and md5 through OpenSSL's EVP, CRC32C for
// GCS's x-goog-hash, CRC32 for gzip members.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace hubfast {

enum class DigestAlgo { kSha256, kMd5 };

class Digest {
 public:
  explicit Digest(DigestAlgo algo);
  ~Digest();
  Digest(const Digest&) = delete;
  Digest& operator=(const Digest&) = delete;
  void update(const void* data, size_t n);
  std::string hex();          // finishes the digest
  std::string raw();          // finishes the digest; raw bytes

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

uint32_t crc32c_update(uint32_t crc, const void* data, size_t n);
// CRC32C of A followed by B from crc(A), crc(B) and len(B): ranges of one
// object that arrive out of order are checked against its whole-object hash.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
uint32_t crc32_update(uint32_t crc, const void* data, size_t n);
std::string to_hex(const std::string& raw);
std::string base64_decode(const std::string& in);  // throws kInvalid

}  // namespace hubfast
