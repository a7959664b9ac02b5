#include "hubfast/digest.h"

#include <openssl/evp.h>
#include <zlib.h>
#ifdef HUBFAST_HAVE_ISAL
#include <isa-l/crc.h>
#endif

#include "hubfast/error.h"

namespace hubfast {

struct Digest::Impl {
  EVP_MD_CTX* ctx = nullptr;
  ~Impl() { EVP_MD_CTX_free(ctx); }
};

Digest::Digest(DigestAlgo algo) : impl_(std::make_unique<Impl>()) {
  impl_->ctx = EVP_MD_CTX_new();
  const EVP_MD* md = algo == DigestAlgo::kSha256 ? EVP_sha256() : EVP_md5();
  if (!impl_->ctx || EVP_DigestInit_ex(impl_->ctx, md, nullptr) != 1)
    throw Error(ErrorKind::kIO, "OpenSSL digest init failed");
}

Digest::~Digest() = default;

void Digest::update(const void* data, size_t n) {
  EVP_DigestUpdate(impl_->ctx, data, n);
}

std::string Digest::raw() {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(impl_->ctx, out, &len);
  return std::string(reinterpret_cast<char*>(out), len);
}

std::string Digest::hex() { return to_hex(raw()); }

std::string to_hex(const std::string& raw) {
  static const char* kHex = "0123456789abcdef";
  std::string s;
  s.reserve(raw.size() * 2);
  for (unsigned char c : raw) {
    s.push_back(kHex[c >> 4]);
    s.push_back(kHex[c & 15]);
  }
  return s;
}

namespace {
// Polynomials over GF(2) in CRC32C's reflected order (bit 31 is x^0).
constexpr uint32_t kCrc32cPoly = 0x82F63B78u;

uint32_t gf2_mul_mod(uint32_t a, uint32_t b) {  // a * b mod P
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kCrc32cPoly : b >> 1;
  }
  return p;
}

uint32_t x_pow_8n_mod(uint64_t n) {  // x^(8n) mod P, by squaring
  uint32_t result = 1u << 31;  // x^0
  uint32_t sq = 1u << 23;      // x^8
  while (n) {
    if (n & 1) result = gf2_mul_mod(result, sq);
    sq = gf2_mul_mod(sq, sq);
    n >>= 1;
  }
  return result;
}
}  // namespace

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  // crc(A||B) = crc(A) * x^(8 len B) + crc(B) (the pre/post inversions cancel).
  return gf2_mul_mod(x_pow_8n_mod(len_b), crc_a) ^ crc_b;
}

uint32_t crc32c_update(uint32_t crc, const void* data, size_t n) {
#ifdef HUBFAST_HAVE_ISAL
  // ISA-L's iSCSI CRC is CRC32C with the init/xor convention inverted.
  return ~crc32_iscsi(static_cast<unsigned char*>(const_cast<void*>(data)), int(n), ~crc);
#else
  // Bitwise fallback (only without ISA-L): slow, correct.
  const uint8_t* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
#endif
}

uint32_t crc32_update(uint32_t crc, const void* data, size_t n) {
#ifdef HUBFAST_HAVE_ISAL
  return crc32_gzip_refl(crc, static_cast<const unsigned char*>(data), n);
#else
  return uint32_t(::crc32(crc, static_cast<const Bytef*>(data), uInt(n)));
#endif
}

std::string base64_decode(const std::string& in) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
  };
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    if (c == '=' || c == ' ') continue;
    int v = val(c);
    if (v < 0) throw Error(ErrorKind::kInvalid, "invalid base64: " + in);
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(char((acc >> bits) & 0xFF));
    }
  }
  return out;
}

}  // namespace hubfast
