// What the HTTP source reads off the wire: header values, URLs and their
// origins, x-goog-hash. Pure functions (libcurl only parses URLs and dates),
// so that the fetch code holds the protocol's decisions and not its syntax.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace hubfast::http {

std::string lower(std::string s);
std::string trim(const std::string& s);
std::string hex32(uint32_t v);  // big-endian hex, as digests print

// "bytes a-b/total" -> a, b, total. total "*" is refused: we always know it.
bool parse_content_range(const std::string& v, uint64_t& a, uint64_t& b, uint64_t& total);

// Retry-After: delay-seconds or an HTTP-date. Negative: absent or unusable.
double parse_retry_after(const std::string& v);

// URLs: origins (scheme, host, port) and a display form without the query
// (presigned redirect targets carry signatures in it).
struct UrlParts {
  std::string scheme, host, port, path;
};
std::optional<UrlParts> parse_url(const std::string& url);
bool same_origin(const UrlParts& a, const std::optional<UrlParts>& b);
std::string display_url(const std::string& url);

// One HTTP response's headers, as libcurl's header callback sees them.
struct Response {
  long status = 0;
  std::string status_line;
  bool complete = false;  // the blank line after the final (non-1xx) headers
  int64_t content_length = -1;
  std::string content_range, etag, last_modified, accept_ranges, retry_after;
  std::string content_encoding, stored_encoding;
  std::vector<std::string> goog_hash;  // every value of every x-goog-hash
};

// Feeds one header line (CRLF or not) into r; a status line starts a new
// response. Returns true on the blank line that ends a final response.
bool parse_header_line(const std::string& raw, Response& r);

struct GoogHash {
  std::optional<uint32_t> crc32c;
  std::string md5;  // raw 16 bytes, or empty
  bool operator==(const GoogHash& o) const { return crc32c == o.crc32c && md5 == o.md5; }
  bool empty() const { return !crc32c && md5.empty(); }
};
// Every value of every x-goog-hash header; unusable items are ignored.
GoogHash parse_goog_hash(const std::vector<std::string>& values);

// Strong: any ETag but a weak one (W/"..."), which may stay the same when the bytes change.
inline bool strong_etag(const std::string& e) { return !e.empty() && e.compare(0, 2, "W/") != 0; }

}  // namespace hubfast::http
