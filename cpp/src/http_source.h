// The HTTP(S) source's state, shared by its request code (fetch.cc) and its
// parallel ranged segments (http_parallel.cc). Internal: fetch.h is the API.
#pragma once
#include <curl/curl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "hubfast/digest.h"
#include "hubfast/error.h"
#include "hubfast/fetch.h"
#include "http_parse.h"
#include "local_peer.h"

namespace hubfast::http {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kUnknown = UINT64_MAX;
constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kWindowBytes = 128 * kMiB;  // bound on buffered segments
constexpr uint64_t kMaxSegment = 16 * kMiB;
constexpr uint64_t kMinSegment = 4 * kMiB;
constexpr int kMaxConnections = 16;
constexpr size_t kEmitSlice = 4 * kMiB;        // largest single emit() call

struct EasyDeleter {
  void operator()(CURL* e) const { curl_easy_cleanup(e); }
};
struct MultiDeleter {
  void operator()(CURLM* m) const { curl_multi_cleanup(m); }
};
using EasyPtr = std::unique_ptr<CURL, EasyDeleter>;
using MultiPtr = std::unique_ptr<CURLM, MultiDeleter>;

struct Meta {
  bool known = false;
  uint64_t total = kUnknown;  // Content-Length, if declared
  std::string etag;           // strong ETag, or empty
  std::string last_modified;  // as sent, when it is the validator
  // For If-Range and for checking every part: a strong ETag, else Last-Modified when
  // Content-Length is declared; empty: one connection, no resume.
  std::string validator;
  bool ranges = false;        // Accept-Ranges: bytes
  GoogHash hash;
  bool hash_usable = false;   // false when GCS transcoded the object
};

// ---------------------------------------------------------------------------
// A connection slot: one easy handle driven through its own multi handle, so
// that waiting can be interrupted every 100 ms and connections are reused.

struct Conn {
  EasyPtr easy;
  MultiPtr multi;
  std::unique_ptr<char[]> errbuf;  // on the heap: a Conn may move
};

// Where a range's bytes go: sink(offset in the object, data, size).
using Sink = std::function<void(uint64_t, const uint8_t*, size_t)>;

struct RangeTask {
  uint64_t pos = 0;        // next byte wanted
  uint64_t end = kUnknown; // one past the last byte wanted; kUnknown: to the end
  bool first_stream = false;  // the stream whose first response establishes Meta
  Sink sink;
};

using HaltFn = std::function<bool()>;

class HttpSource;

// State of one perform (one HTTP request/response), shared with callbacks.
struct Xfer {
  enum class Body { kDiscard, kData, kError };
  HttpSource* src = nullptr;
  RangeTask* task = nullptr;
  const HaltFn* halted = nullptr;
  std::string url;         // this hop's URL
  bool ranged = false;     // the request carried Range
  Response resp;
  Body body = Body::kDiscard;
  uint64_t got = 0;        // body bytes delivered to the sink
  uint64_t error_bytes = 0;
  std::string error_body;
  bool cut = false;        // we stopped the body on purpose (range end)
  std::exception_ptr err;  // thrown inside a callback
  // Our own low-speed check (libcurl's averages over ~5 s, so it fires
  // seconds late): samples of bytes received, the oldest one at least
  // low_speed_time old serves as the baseline.
  double low_speed_time = 0;
  double low_speed_limit = 0;
  std::deque<std::pair<Clock::time_point, curl_off_t>> samples;
  bool stalled = false;
  bool connected = false;  // connect and TLS handshake have their own timeout
  CURL* easy = nullptr;
};

class Parallel;

class HttpSource : public Source {
 public:
  explicit HttpSource(const FetchOptions& opt) : opt_(opt), url_(opt.url) {
    origin_ = parse_url(url_);
    if (!origin_ || (origin_->scheme != "http" && origin_->scheme != "https"))
      throw Error(ErrorKind::kInvalid, "not an http(s) URL: '" + url_ + "'");
    opt_.connections = std::max(1, std::min(opt_.connections, kMaxConnections));
    opt_.max_retries = std::max(0, opt_.max_retries);
    opt_.max_redirects = std::max(0, opt_.max_redirects);
  }
  ~HttpSource() override;

  void run(const EmitFn& emit, const CancelToken& cancel) override;
  int64_t expected_size() const override { return expected_.load(std::memory_order_relaxed); }
  std::string describe() const override { return url_; }
  // http_requests: every request sent, redirect hops included; retries:
  // attempts after a failure that brought no byte (each after a backoff);
  // resumes: ranged requests continuing a range after a drop that brought
  // bytes; connections: most transfers in flight at once; redirects: hops
  // followed; bytes_received: body bytes off the wire, re-sent and skipped
  // ones included; segments: ranged segments in a parallel download (0 for
  // one stream); steals: parts of a segment taken over by an idle
  // connection from a slower one; goog_hash_crc32c / goog_hash_md5: 1 when that x-goog-hash
  // digest was checked and matched; out_of_order: 1 when segments went to
  // the decoder as they arrived rather than in order; local_server: 1 when
  // the peer of a parallel-capable download runs on this machine (growth
  // then weighs the machine's CPUs, GrowthPolicy::set_local_server).
  void add_stats(std::function<void(const char*, double)> put) const override {
    put("http_requests", double(st_requests_.load()));
    put("retries", double(st_retries_.load()));
    put("resumes", double(st_resumes_.load()));
    put("connections", double(st_connections_.load()));
    put("redirects", double(st_redirects_.load()));
    put("bytes_received", double(st_bytes_.load()));
    put("segments", double(st_segments_.load()));
    put("steals", double(st_steals_.load()));
    put("goog_hash_crc32c", st_crc32c_.load() ? 1.0 : 0.0);
    put("goog_hash_md5", st_md5_.load() ? 1.0 : 0.0);
    put("out_of_order", st_any_order_.load() ? 1.0 : 0.0);
    put("local_server", st_local_server_.load() ? 1.0 : 0.0);
  }

  // --- used by the callbacks and by Parallel ---------------------------------
  void on_headers(Xfer& x);          // throws to abort the transfer
  size_t on_body(Xfer& x, const char* p, size_t n);
  void fetch_range(Conn& c, RangeTask& t, const HaltFn& halted, const CancelToken& cancel);
  Conn make_conn();
  void note_active(int delta) {
    int now = active_.fetch_add(delta) + delta;
    int prev = st_connections_.load();
    while (now > prev && !st_connections_.compare_exchange_weak(prev, now)) {
    }
  }
  std::atomic<uint64_t> st_segments_{0};
  std::atomic<uint64_t> st_steals_{0};
  std::atomic<bool> st_local_server_{false};

 private:
  struct Attempt {
    CURLcode res = CURLE_OK;
    std::string hop_url;  // the URL that gave the final response
    Xfer x;
  };
  void perform_with_redirects(Conn& c, RangeTask& t, const HaltFn& halted, const CancelToken& cancel,
                              bool from_origin, Attempt& a);
  CURLcode perform(Conn& c, const HaltFn& halted);
  void establish_meta(const Response& r);
  // After Meta: maybe go parallel; returns the first stream's end. `easy`
  // received the response (its peer's address: GrowthPolicy::set_local_server).
  uint64_t plan(RangeTask& first, CURL* easy);
  void set_resolved(const std::string& u) {
    std::lock_guard<std::mutex> lk(mu_);
    resolved_ = u;
  }
  std::string resolved() {
    std::lock_guard<std::mutex> lk(mu_);
    return resolved_;
  }
  void sink_direct(const uint8_t* p, size_t n);
  void verify_end();

  FetchOptions opt_;
  const std::string url_;
  std::optional<UrlParts> origin_;

  // Per run(): set by the caller's thread before any worker exists.
  Meta meta_;
  bool parallel_ = false;
  std::unique_ptr<Parallel> par_;
  const EmitFn* emit_ = nullptr;
  const CancelToken* cancel_ = nullptr;
  HaltFn main_halted_;
  uint64_t emitted_ = 0;
  uint32_t crc_ = 0;
  std::unique_ptr<Digest> md5_;

  std::mutex mu_;
  std::string resolved_;  // final URL after redirects, reused for later ranges

  std::atomic<int64_t> expected_{-1};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> st_requests_{0}, st_retries_{0}, st_resumes_{0}, st_redirects_{0}, st_bytes_{0};
  std::atomic<int> st_connections_{0};
  std::atomic<bool> st_crc32c_{false}, st_md5_{false}, st_any_order_{false};

  friend class Parallel;
};

}  // namespace hubfast::http
