#include "http_parse.h"

#include <curl/curl.h>

#include <cctype>
#include <cstdlib>
#include <ctime>
#include <memory>

#include "hubfast/digest.h"
#include "hubfast/error.h"

namespace hubfast::http {
namespace {

struct UrlDeleter {
  void operator()(CURLU* u) const { curl_url_cleanup(u); }
};
struct CurlFree {
  void operator()(char* p) const { curl_free(p); }
};
using UrlPtr = std::unique_ptr<CURLU, UrlDeleter>;
using CurlStr = std::unique_ptr<char, CurlFree>;

// Decimal digits only, at most 19 of them.
bool parse_u64(const std::string& s, uint64_t& out) {
  if (s.empty() || s.size() > 19) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + uint64_t(c - '0');
  }
  out = v;
  return true;
}

// Items of a separated list, each trimmed.
std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t p = s.find(sep, start);
    out.push_back(trim(s.substr(start, p == std::string::npos ? std::string::npos : p - start)));
    if (p == std::string::npos) break;
    start = p + 1;
  }
  return out;
}

}  // namespace

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && (s[a] == ' ' || s[a] == '\t' || s[a] == '\r' || s[a] == '\n')) ++a;
  while (b > a && (s[b - 1] == ' ' || s[b - 1] == '\t' || s[b - 1] == '\r' || s[b - 1] == '\n')) --b;
  return s.substr(a, b - a);
}

std::string hex32(uint32_t v) {
  std::string raw(4, '\0');
  for (int i = 0; i < 4; ++i) raw[i] = char((v >> (24 - 8 * i)) & 0xFF);
  return to_hex(raw);
}

bool parse_content_range(const std::string& v, uint64_t& a, uint64_t& b, uint64_t& total) {
  std::string s = trim(v);
  if (lower(s.substr(0, 6)) != "bytes ") return false;
  s = trim(s.substr(6));
  size_t dash = s.find('-'), slash = s.find('/');
  if (dash == std::string::npos || slash == std::string::npos || dash > slash) return false;
  return parse_u64(trim(s.substr(0, dash)), a) && parse_u64(trim(s.substr(dash + 1, slash - dash - 1)), b) &&
         parse_u64(trim(s.substr(slash + 1)), total) && a <= b && b < total;
}

double parse_retry_after(const std::string& v) {
  std::string s = trim(v);
  if (s.empty()) return -1;
  uint64_t secs;
  if (parse_u64(s, secs)) return double(secs);
  time_t t = curl_getdate(s.c_str(), nullptr);
  if (t == time_t(-1)) return -1;
  double d = std::difftime(t, std::time(nullptr));
  return d < 0 ? 0 : d;
}

std::optional<UrlParts> parse_url(const std::string& url) {
  UrlPtr u(curl_url());
  if (!u) return std::nullopt;
  if (curl_url_set(u.get(), CURLUPART_URL, url.c_str(), 0) != CURLUE_OK) return std::nullopt;
  auto get = [&](CURLUPart part, unsigned flags, std::string& out) {
    char* p = nullptr;
    if (curl_url_get(u.get(), part, &p, flags) != CURLUE_OK || !p) return false;
    CurlStr holder(p);
    out = p;
    return true;
  };
  UrlParts parts;
  if (!get(CURLUPART_SCHEME, 0, parts.scheme) || !get(CURLUPART_HOST, 0, parts.host)) return std::nullopt;
  if (!get(CURLUPART_PORT, CURLU_DEFAULT_PORT, parts.port)) parts.port.clear();
  get(CURLUPART_PATH, 0, parts.path);
  parts.scheme = lower(parts.scheme);
  parts.host = lower(parts.host);
  return parts;
}

bool same_origin(const UrlParts& a, const std::optional<UrlParts>& b) {
  return b && a.scheme == b->scheme && a.host == b->host && a.port == b->port;
}

std::string display_url(const std::string& url) {
  auto p = parse_url(url);
  if (!p) return url;
  return p->scheme + "://" + p->host + ":" + p->port + p->path;
}

bool parse_header_line(const std::string& raw, Response& r) {
  std::string line = trim(raw);
  if (line.compare(0, 5, "HTTP/") == 0) {
    r = Response();
    r.status_line = line;
    size_t sp = line.find(' ');
    if (sp != std::string::npos) r.status = std::strtol(line.c_str() + sp + 1, nullptr, 10);
    return false;
  }
  if (r.complete) return false;  // trailers
  if (line.empty()) {
    r.complete = r.status >= 200;  // 1xx: its headers end, the real ones follow
    return r.complete;
  }
  size_t colon = line.find(':');
  if (colon == std::string::npos) return false;
  std::string name = lower(trim(line.substr(0, colon)));
  std::string value = trim(line.substr(colon + 1));
  if (name == "content-length") {
    uint64_t v;
    if (parse_u64(value, v)) r.content_length = int64_t(v);
  } else if (name == "content-range") {
    r.content_range = value;
  } else if (name == "etag") {
    r.etag = value;
  } else if (name == "last-modified") {
    r.last_modified = value;
  } else if (name == "accept-ranges") {
    r.accept_ranges = lower(value);
  } else if (name == "retry-after") {
    r.retry_after = value;
  } else if (name == "content-encoding") {
    r.content_encoding = lower(value);
  } else if (name == "x-goog-stored-content-encoding") {
    r.stored_encoding = lower(value);
  } else if (name == "x-goog-hash") {
    r.goog_hash.push_back(value);
  }
  return false;
}

GoogHash parse_goog_hash(const std::vector<std::string>& values) {
  GoogHash h;
  for (const auto& v : values) {
    for (const auto& item : split(v, ',')) {
      size_t eq = item.find('=');
      if (eq == std::string::npos) continue;
      std::string key = lower(trim(item.substr(0, eq)));
      std::string val = trim(item.substr(eq + 1));
      std::string raw;
      try {
        raw = base64_decode(val);
      } catch (const Error&) {
        continue;  // unusable value: as if not offered
      }
      if (key == "crc32c" && raw.size() == 4) {
        h.crc32c = (uint32_t(uint8_t(raw[0])) << 24) | (uint32_t(uint8_t(raw[1])) << 16) |
                   (uint32_t(uint8_t(raw[2])) << 8) | uint32_t(uint8_t(raw[3]));
      } else if (key == "md5" && raw.size() == 16) {
        h.md5 = raw;
      }
    }
  }
  return h;
}

}  // namespace hubfast::http
