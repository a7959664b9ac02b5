// HTTP(S) source through libcurl.
//
// Shape of one download (all of it inside Source::run, on the caller's thread
// unless said otherwise):
//
//  * The first request is a plain GET of the URL. Redirects are followed by
//    hand (CURLOPT_FOLLOWLOCATION off) so that the caller's headers, which may
//    carry credentials, go to the original scheme+host+port only, and so that
//    https never downgrades to http.
//  * Its response headers establish the object's metadata: Content-Length,
//    a validator (strong ETag, else Last-Modified), Accept-Ranges and
//    x-goog-hash. Bytes are emitted straight from libcurl's write callback.
//  * When the object is large and rangeable (Accept-Ranges: bytes, a length
//    >= min_parallel_bytes, a validator, connections > 1), the object is cut
//    into segments. The first response keeps streaming (emitted directly,
//    nothing wasted): with the adaptive count, alone for as long as the
//    consumer does not starve; once workers start, it is cut at the end of
//    the segment it is in (with a fixed count: at the end of segment 0).
//    Worker threads (one easy handle each, connections reused) fetch the
//    segments after it with `Range` + `If-Range` into a ring of at most
//    `window` segment buffers (window * segment <= 128 MiB). The caller's
//    thread then emits the segments in order, streaming the head segment
//    while it still arrives;
//    or, when the consumer takes offsets (the parallel gzip decoder), every
//    segment's bytes as they arrive, claims bounded above the consumer's
//    release point rather than the oldest segment.
//  * Every range (the single stream, segment 0, each segment) is fetched by
//    fetch_range(): transient failures (connection errors, timeouts, 408,
//    429, 5xx) are retried with jittered exponential backoff honouring
//    Retry-After; a transfer that dropped after making progress resumes with
//    `Range: bytes=<next>-` + `If-Range`. A 206 must start where asked and
//    carry the known total; a 200 to a resume means the object changed
//    (unless its strong ETag is unchanged: then the server merely ignored
//    Range and the prefix is skipped).
//  * The caller's thread checks the total length and x-goog-hash (crc32c,
//    or md5 when no crc32c is offered) over the bytes in emit order (out of
//    order: crc32c per segment, combined; md5 keeps the order).
//  * Stalls: libcurl's LOW_SPEED_LIMIT/TIME is set, but it averages over ~5 s
//    and fires seconds late, so the progress callback also checks the rate
//    over the last low_speed_time seconds (from the end of connect, and not
//    counting time the consumer kept us blocked in emit). Waits poll every
//    100 ms and backoff sleeps in 50 ms slices, so cancellation is prompt.
#include "hubfast/fetch.h"
#include "hubfast/growth.h"

#include <curl/curl.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <ctime>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "hubfast/digest.h"
#include "hubfast/error.h"
#include "hubfast/queue.h"

namespace hubfast {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kUnknown = UINT64_MAX;
constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kWindowBytes = 128 * kMiB;  // bound on buffered segments
constexpr uint64_t kMaxSegment = 16 * kMiB;
constexpr uint64_t kMinSegment = 4 * kMiB;
constexpr int kMaxConnections = 16;
constexpr long kBufferSize = 512 * 1024;       // libcurl's receive buffer
constexpr size_t kEmitSlice = 4 * kMiB;        // largest single emit() call
constexpr size_t kErrorBodyKeep = 512;         // error body kept for messages
constexpr uint64_t kErrorBodyMax = 1 * kMiB;   // error body read at most
constexpr int kMaxResumes = 200;               // per range, with progress each

// ---------------------------------------------------------------------------
// RAII for libcurl handles.

struct EasyDeleter {
  void operator()(CURL* e) const { curl_easy_cleanup(e); }
};
struct MultiDeleter {
  void operator()(CURLM* m) const { curl_multi_cleanup(m); }
};
struct SlistDeleter {
  void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};
struct UrlDeleter {
  void operator()(CURLU* u) const { curl_url_cleanup(u); }
};
struct CurlFree {
  void operator()(char* p) const { curl_free(p); }
};
using EasyPtr = std::unique_ptr<CURL, EasyDeleter>;
using MultiPtr = std::unique_ptr<CURLM, MultiDeleter>;
using SlistPtr = std::unique_ptr<curl_slist, SlistDeleter>;
using UrlPtr = std::unique_ptr<CURLU, UrlDeleter>;
using CurlStr = std::unique_ptr<char, CurlFree>;

void slist_append(SlistPtr& list, const std::string& s) {
  curl_slist* l = curl_slist_append(list.get(), s.c_str());
  if (!l) throw Error(ErrorKind::kIO, "out of memory building HTTP headers");
  list.release();
  list.reset(l);
}

// ---------------------------------------------------------------------------
// Small string helpers.

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

std::string hex32(uint32_t v) {
  std::string raw(4, '\0');
  for (int i = 0; i < 4; ++i) raw[i] = char((v >> (24 - 8 * i)) & 0xFF);
  return to_hex(raw);
}

// "bytes a-b/total" -> a, b, total. total "*" is refused: we always know it.
bool parse_content_range(const std::string& v, uint64_t& a, uint64_t& b, uint64_t& total) {
  std::string s = trim(v);
  if (lower(s.substr(0, 6)) != "bytes ") return false;
  s = trim(s.substr(6));
  size_t dash = s.find('-'), slash = s.find('/');
  if (dash == std::string::npos || slash == std::string::npos || dash > slash) return false;
  return parse_u64(trim(s.substr(0, dash)), a) && parse_u64(trim(s.substr(dash + 1, slash - dash - 1)), b) &&
         parse_u64(trim(s.substr(slash + 1)), total) && a <= b && b < total;
}

// Retry-After: delay-seconds or an HTTP-date. Negative: absent or unusable.
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

// ---------------------------------------------------------------------------
// URLs: origins (scheme, host, port) and a display form without the query
// (presigned redirect targets carry signatures in it).

struct UrlParts {
  std::string scheme, host, port, path;
};

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

// ---------------------------------------------------------------------------
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

struct GoogHash {
  std::optional<uint32_t> crc32c;
  std::string md5;  // raw 16 bytes, or empty
  bool operator==(const GoogHash& o) const { return crc32c == o.crc32c && md5 == o.md5; }
  bool empty() const { return !crc32c && md5.empty(); }
};

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

bool strong_etag(const std::string& e) { return !e.empty() && e[0] == '"'; }

// What the first 200 response says about the object.
struct Meta {
  bool known = false;
  uint64_t total = kUnknown;  // Content-Length, if declared
  std::string etag;           // strong ETag, or empty
  std::string validator;      // for If-Range: strong ETag, else Last-Modified
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
  uint64_t skip = 0;       // bytes to drop first (a 200 to a resume, same ETag)
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

size_t header_cb(char* p, size_t size, size_t n, void* ud);
size_t write_cb(char* p, size_t size, size_t n, void* ud);
int xferinfo_cb(void* ud, curl_off_t, curl_off_t, curl_off_t, curl_off_t);

// ---------------------------------------------------------------------------

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
  // one stream); goog_hash_crc32c / goog_hash_md5: 1 when that x-goog-hash
  // digest was checked and matched; out_of_order: 1 when segments went to
  // the decoder as they arrived rather than in order.
  void add_stats(std::function<void(const char*, double)> put) const override {
    put("http_requests", double(st_requests_.load()));
    put("retries", double(st_retries_.load()));
    put("resumes", double(st_resumes_.load()));
    put("connections", double(st_connections_.load()));
    put("redirects", double(st_redirects_.load()));
    put("bytes_received", double(st_bytes_.load()));
    put("segments", double(st_segments_.load()));
    put("goog_hash_crc32c", st_crc32c_.load() ? 1.0 : 0.0);
    put("goog_hash_md5", st_md5_.load() ? 1.0 : 0.0);
    put("out_of_order", st_any_order_.load() ? 1.0 : 0.0);
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
  uint64_t plan(RangeTask& first);  // after Meta: maybe go parallel; returns the first stream's end
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

// ---------------------------------------------------------------------------
// Parallel ranged segments, reassembled in order through a bounded ring.

class Parallel {
 public:
  Parallel(HttpSource& src, const CancelToken& cancel, uint64_t total, uint64_t seg, size_t window,
           std::function<double()> probe)
      : src_(src), cancel_(cancel), total_(total), seg_(seg), full_(full_segments(total, seg, window)),
        half_(std::max<uint64_t>(seg / 2, 1)),
        nseg_(full_ + (total - full_ * seg + half_ - 1) / half_),
        window_(window), slots_(window), probe_(std::move(probe)) {
    halted_ = [this] { return cancel_.cancelled() || halt_.load(std::memory_order_relaxed); };
    GrowthSample s = sample();
    read_cpu(s);
    policy_.begin(s);
  }
  ~Parallel() { stop(); }
  Parallel(const Parallel&) = delete;
  Parallel& operator=(const Parallel&) = delete;

  // The last `window / 2` segments' worth of bytes is cut into half-size
  // segments: the connections then run out of work closer together (on a
  // capped link the last round of full segments left most of them idle).
  static uint64_t full_segments(uint64_t total, uint64_t seg, size_t window) {
    uint64_t tail = seg * std::max<uint64_t>(1, window / 2);
    return std::max<uint64_t>(1, total > tail + seg ? (total - tail) / seg : total / seg);
  }
  uint64_t segment_start(uint64_t i) const {
    return i <= full_ ? std::min(total_, i * seg_) : std::min(total_, full_ * seg_ + (i - full_) * half_);
  }
  uint64_t segment_end(uint64_t i) const { return segment_start(i + 1); }
  uint64_t segment_of(uint64_t off) const {
    return off < full_ * seg_ ? off / seg_ : full_ + (off - full_ * seg_) / half_;
  }
  uint64_t segment_len(uint64_t i) const { return segment_end(i) - segment_start(i); }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  std::exception_ptr error() {
    std::lock_guard<std::mutex> lk(mu_);
    return error_;
  }

  // Segments claimable beyond the one being consumed: one per connection and
  // one spare, so that a connection whose segment completes before the head
  // goes on. On a link faster than the decoder, more buffered segments only
  // cost memory (the whole 128 MiB ring otherwise; two per connection held
  // ~50 MiB more at 2 GiB .tar.zst, where the decoder's frames need it).
  void add_workers(int n) {
    if (!split()) return;
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { worker(); });
    std::lock_guard<std::mutex> lk(mu_);
    ahead_ = std::min<uint64_t>(window_, threads_.size() + 2);
    work_cv_.notify_all();
  }

  // Adaptive connections: the first stream alone runs on towards the end of
  // the object (a link that keeps up with the decoder needs no other: the
  // segments' buffering costs a copy and, on 2 cores, 15% of the time of a
  // 1 GiB .tar.zst on loopback). `first` is its task, whose end moves. The
  // first workers cut it at the end of the segment it is in and start after
  // that. Consumer thread only.
  void follow_first_stream(RangeTask* first) {
    first_ = first;
    first_seg_ = nseg_;
  }
  // Where the workers' segments start; the first stream ends there.
  uint64_t first_segment() const { return first_seg_; }

  // Whether workers have segments to fetch. The first call while a first
  // stream runs on cuts it (follow_first_stream); after it has ended, it took
  // the whole object.
  bool split() {
    if (first_seg_ < nseg_) return true;
    if (!first_) return false;
    uint64_t k = segment_of(std::min(src_.emitted_, total_ - 1)) + 1;  // after the bytes given so far
    if (k >= nseg_) return false;  // in the last segment: it finishes alone
    std::lock_guard<std::mutex> lk(mu_);
    first_seg_ = next_ = k;
    head_ = k - 1;
    first_->end = segment_start(k);
    return true;
  }

  void grow_if_starved() {
    if (int(threads_.size()) >= policy_.limit()) return;
    GrowthSample s = sample();
    if (policy_.due(s.t)) read_cpu(s);  // /proc/stat at most once a window
    int add = policy_.step(s, int(threads_.size()), int(settled_.load(std::memory_order_relaxed)), first_stream_);
    if (add > 0) add_workers(add);
  }

  // Connections grow with need (GrowthPolicy): the consumer (decoder and
  // writer behind it) waiting for bytes means the transfer is the
  // bottleneck; a consumer that never waits gains nothing from more
  // connections but pays their CPU. The wait is the pipeline's (its decoder
  // on an empty queue) when it measures it, else this thread's own wait for
  // segments. Consuming thread only, during segment 0 too.
  void allow_workers(int max_workers) { policy_.allow(max_workers); }
  void first_stream_ended() {
    first_stream_ = 0;
    first_ = nullptr;
  }
  int workers() const { return int(threads_.size()); }

  // Emits the workers' segments in order through `sink` (the first stream's
  // went out directly).
  void consume(const std::function<void(const uint8_t*, size_t)>& sink) {
    for (uint64_t i = first_seg_; i < nseg_; ++i) {
      Slot& s = slots_[i % window_];
      uint64_t len = segment_len(i), done = 0;
      while (done < len) {
        uint64_t avail = 0;
        {
          std::unique_lock<std::mutex> lk(mu_);
          for (;;) {
            if (error_) std::rethrow_exception(error_);
            if (s.owner == int64_t(i) && s.filled > done) {
              avail = s.filled;
              break;
            }
            if (cancel_.cancelled()) throw Error(ErrorKind::kCancelled, "download cancelled: " + src_.url_);
            waiting_ = int64_t(i);
            // Woken for a worthwhile amount, not for every network read: on
            // many slow connections each wake costs two context switches for
            // a few KiB.
            wanted_ = std::min(len, done + kWakeBytes);
            auto w0 = Clock::now();
            data_cv_.wait_for(lk, kGrowAfter);
            own_wait_ += Clock::now() - w0;
            waiting_ = -1;
            lk.unlock();
            grow_if_starved();
            lk.lock();
          }
        }
        // Bytes below `filled` are final: the worker only writes beyond it.
        while (done < avail) {
          cancel_.throw_if_cancelled();
          size_t n = size_t(std::min<uint64_t>(avail - done, kEmitSlice));
          sink(s.buf.get() + done, n);
          done += n;
        }
      }
      std::lock_guard<std::mutex> lk(mu_);
      head_ = i + 1;
      if (s.buf) spare_.push_back(std::move(s.buf));  // buffers are reused, not one per slot
      work_cv_.notify_all();
    }
  }

  // Emits the workers' segments as their bytes arrive, in any order (each segment's
  // in order), through `emit_at`: a decoder that takes offsets works on every
  // segment that has arrived instead of waiting on the oldest. `floor` is the
  // consumer's release point: claims stay within the window above it, as the
  // emitted bytes are held there until decoded. Returns the CRC32C of each
  // segment (for the whole-object check).
  std::vector<uint32_t> consume_any(const std::function<void(uint64_t, const uint8_t*, size_t)>& emit_at,
                                    std::function<uint64_t()> floor, const std::function<void()>& flush) {
    std::vector<uint32_t> crcs(nseg_, 0);
    struct Ready {
      uint64_t seg, from, to;
    };
    std::vector<Ready> ready;
    {
      std::lock_guard<std::mutex> lk(mu_);
      floor_ = std::move(floor);
      head_ = first_seg_;
      work_cv_.notify_all();
    }
    for (;;) {
      ready.clear();
      {
        std::unique_lock<std::mutex> lk(mu_);
        if (head_ >= nseg_) break;
        for (;;) {
          if (error_) std::rethrow_exception(error_);
          for (uint64_t i = head_; i < next_; ++i) {
            Slot& s = slots_[i % window_];
            if (s.owner == int64_t(i) && s.filled > s.emitted) ready.push_back({i, s.emitted, s.filled});
          }
          if (!ready.empty()) break;
          if (cancel_.cancelled()) throw Error(ErrorKind::kCancelled, "download cancelled: " + src_.url_);
          if (flush) {
            // Bytes the sink holds may be what moves the floor that the
            // workers wait on (a stalled segment's part: a deadlock, before).
            lk.unlock();
            flush();
            lk.lock();
            if (error_) std::rethrow_exception(error_);
          }
          any_waiting_ = true;
          auto w0 = Clock::now();
          data_cv_.wait_for(lk, kGrowAfter);
          own_wait_ += Clock::now() - w0;
          any_waiting_ = false;
          work_cv_.notify_all();  // the floor may have moved
          lk.unlock();
          grow_if_starved();
          lk.lock();
        }
      }
      for (const Ready& r : ready) {
        const uint8_t* buf = slots_[r.seg % window_].buf.get();  // stays while the segment is unfinished
        for (uint64_t done = r.from; done < r.to;) {
          cancel_.throw_if_cancelled();
          size_t n = size_t(std::min<uint64_t>(r.to - done, kEmitSlice));
          if (src_.meta_.hash_usable) crcs[r.seg] = crc32c_update(crcs[r.seg], buf + done, n);
          emit_at(segment_start(r.seg) + done, buf + done, n);
          done += n;
        }
        std::lock_guard<std::mutex> lk(mu_);
        Slot& s = slots_[r.seg % window_];
        s.emitted = r.to;
        if (r.to == segment_len(r.seg)) {
          if (s.buf) spare_.push_back(std::move(s.buf));
          while (head_ < nseg_ && head_ < next_ && slots_[head_ % window_].owner == int64_t(head_) &&
                 slots_[head_ % window_].emitted == segment_len(head_))
            ++head_;
          work_cv_.notify_all();
        }
      }
      grow_if_starved();
    }
    std::lock_guard<std::mutex> lk(mu_);
    floor_ = nullptr;
    return crcs;
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stopping_ = true;
      halt_.store(true);
      work_cv_.notify_all();
      data_cv_.notify_all();
    }
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

 private:
  struct Slot {
    std::unique_ptr<uint8_t[]> buf;
    int64_t owner = -1;   // segment held
    uint64_t filled = 0;  // bytes of it received (guarded by mu_)
    uint64_t emitted = 0;  // consume_any(): bytes of it emitted
  };

  // A segment may be claimed: within the ring above the head and, when the
  // consumer holds what it was given until it decodes it, within the ring
  // above its release point too.
  bool claimable_locked() const {
    if (!floor_) return next_ < head_ + ahead_;
    // Out of order a segment's buffer is free once emitted: only the ring's
    // slots bound how far past an unfinished segment others may run (a
    // connection done early need not wait for the oldest).
    if (next_ >= head_ + window_) return false;
    uint64_t f = floor_();
    return f == UINT64_MAX || segment_start(next_) < f + (ahead_ + 1) * seg_;
  }

  void worker() {
    try {
      Conn conn = src_.make_conn();
      uint64_t received = 0;  // by this connection, up to GrowthPolicy::kSettleBytes
      for (;;) {
        uint64_t i;
        Slot* s;
        {
          std::unique_lock<std::mutex> lk(mu_);
          // Timed: the consumer's release point moves without a notify.
          while (!(stopping_ || error_ || next_ >= nseg_ || claimable_locked())) work_cv_.wait_for(lk, kGrowAfter);
          if (stopping_ || error_ || next_ >= nseg_) return;
          i = next_++;
          s = &slots_[i % window_];
          s->owner = int64_t(i);
          s->filled = 0;
          s->emitted = 0;
          if (!s->buf && !spare_.empty()) {
            s->buf = std::move(spare_.back());
            spare_.pop_back();
          }
        }
        if (!s->buf) s->buf.reset(new uint8_t[seg_]);  // not zeroed: the transfer fills it
        RangeTask t;
        t.pos = segment_start(i);
        t.end = segment_end(i);
        const uint64_t base = t.pos;
        uint8_t* buf = s->buf.get();
        const uint64_t len = t.end - t.pos;
        t.sink = [&, base, buf, i, len](uint64_t off, const uint8_t* p, size_t n) {
          if (received < GrowthPolicy::kSettleBytes && (received += n) >= GrowthPolicy::kSettleBytes)
            settled_.fetch_add(1, std::memory_order_relaxed);
          std::memcpy(buf + (off - base), p, n);
          std::lock_guard<std::mutex> lk(mu_);
          s->filled = off - base + n;
          if ((waiting_ == int64_t(i) && s->filled >= wanted_) ||
              (any_waiting_ && (s->filled - s->emitted >= kWakeBytes || s->filled == len)))
            data_cv_.notify_all();
        };
        src_.st_segments_.fetch_add(1);
        src_.note_active(1);
        try {
          src_.fetch_range(conn, t, halted_, cancel_);
        } catch (...) {
          src_.note_active(-1);
          throw;
        }
        src_.note_active(-1);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_ && !stopping_) {
        error_ = std::current_exception();
        failed_.store(true);
        halt_.store(true);
      }
      data_cv_.notify_all();
      work_cv_.notify_all();
    }
  }

  HttpSource& src_;
  const CancelToken& cancel_;
  const uint64_t total_, seg_;
  const uint64_t full_, half_;  // segments of seg_ bytes, then of half_
  const uint64_t nseg_;
  const size_t window_;
  HaltFn halted_;
  std::vector<Slot> slots_;
  std::vector<std::unique_ptr<uint8_t[]>> spare_;  // consumed segments' buffers (guarded by mu_)
  std::mutex mu_;
  std::condition_variable work_cv_, data_cv_;
  uint64_t head_ = 0;  // segment being emitted (guarded by mu_)
  uint64_t next_ = 1;  // next segment to claim; those below first_seg_ are the first stream's
  uint64_t first_seg_ = 1;  // consumer thread (and under mu_ once workers run)
  RangeTask* first_ = nullptr;  // the first stream's task while its end may move
  uint64_t ahead_ = 2;  // segments claimable beyond head_ (<= window_)
  int64_t waiting_ = -1;  // segment the consumer waits for, and for how much of it
  uint64_t wanted_ = 0;
  bool any_waiting_ = false;  // consume_any() waits for any segment
  std::function<uint64_t()> floor_;  // consume_any(): the consumer's release point
  std::chrono::nanoseconds waited() const {
    if (probe_) return std::chrono::nanoseconds(int64_t(probe_() * 1e9));
    return own_wait_;
  }
  GrowthSample sample() const {
    GrowthSample s;
    s.t = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
    s.bytes = src_.st_bytes_.load(std::memory_order_relaxed);
    s.waited = std::chrono::duration<double>(waited()).count();
    return s;
  }
  std::function<double()> probe_;  // the pipeline's consumer wait (s), if measured
  std::chrono::nanoseconds own_wait_{0};  // this thread's wait for segments
  GrowthPolicy policy_{usable_cores()};  // consumer thread only
  std::atomic<size_t> settled_{0};  // workers that have received GrowthPolicy::kSettleBytes
  int first_stream_ = 1;  // the first stream's connection, while it runs (consumer thread)
  // Timed waits wake the consumer at least once a growth window.
  static constexpr std::chrono::milliseconds kGrowAfter{int(GrowthPolicy::kWindow * 1000)};
  static constexpr uint64_t kWakeBytes = 1 * kMiB;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::atomic<bool> halt_{false}, failed_{false};
  std::vector<std::thread> threads_;
};

HttpSource::~HttpSource() = default;

// ---------------------------------------------------------------------------
// libcurl plumbing.

size_t header_cb(char* p, size_t size, size_t n, void* ud) {
  Xfer& x = *static_cast<Xfer*>(ud);
  size_t len = size * n;
  try {
    std::string line = trim(std::string(p, len));
    if (line.compare(0, 5, "HTTP/") == 0) {
      x.resp = Response();
      x.resp.status_line = line;
      size_t sp = line.find(' ');
      if (sp != std::string::npos) x.resp.status = std::strtol(line.c_str() + sp + 1, nullptr, 10);
      return len;
    }
    if (x.resp.complete) return len;  // trailers
    if (line.empty()) {
      if (x.resp.status >= 200) {
        x.resp.complete = true;
        x.src->on_headers(x);
      }
      return len;
    }
    size_t colon = line.find(':');
    if (colon == std::string::npos) return len;
    std::string name = lower(trim(line.substr(0, colon)));
    std::string value = trim(line.substr(colon + 1));
    Response& r = x.resp;
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
    return len;
  } catch (...) {
    x.err = std::current_exception();
    return 0;
  }
}

size_t write_cb(char* p, size_t size, size_t n, void* ud) {
  Xfer& x = *static_cast<Xfer*>(ud);
  try {
    return x.src->on_body(x, p, size * n);
  } catch (...) {
    x.err = std::current_exception();
    return CURL_WRITEFUNC_ERROR;
  }
}

int xferinfo_cb(void* ud, curl_off_t, curl_off_t dlnow, curl_off_t, curl_off_t) {
  Xfer& x = *static_cast<Xfer*>(ud);
  if ((*x.halted)()) return 1;
  if (x.low_speed_time <= 0) return 0;
  if (!x.connected) {
    curl_off_t pretransfer = 0;
    if (curl_easy_getinfo(x.easy, CURLINFO_PRETRANSFER_TIME_T, &pretransfer) != CURLE_OK || pretransfer <= 0)
      return 0;
    x.connected = true;
  }
  auto now = Clock::now();
  auto& q = x.samples;
  if (q.empty() || now - q.back().first >= std::chrono::milliseconds(100)) q.emplace_back(now, dlnow);
  const auto window = std::chrono::duration<double>(x.low_speed_time);
  while (q.size() >= 2 && now - q[1].first >= window) q.pop_front();
  double age = std::chrono::duration<double>(now - q.front().first).count();
  if (age >= x.low_speed_time && double(dlnow - q.front().second) < x.low_speed_limit * age) {
    x.stalled = true;
    return 1;
  }
  return 0;
}

bool is_timeout(CURLcode c) { return c == CURLE_OPERATION_TIMEDOUT; }

bool retryable(CURLcode c) {
  switch (c) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_READ_ERROR:
      return true;
    default:
      return false;
  }
}

std::string curl_cause(CURLcode c, const char* errbuf) {
  std::string s = curl_easy_strerror(c);
  if (errbuf && *errbuf) s += std::string(" (") + trim(errbuf) + ")";
  return s;
}

std::string printable(const std::string& body) {
  std::string s;
  for (char c : body.substr(0, 200)) s.push_back((c >= 32 && c < 127) ? c : ' ');
  return trim(s);
}

Conn HttpSource::make_conn() {
  Conn c;
  c.errbuf = std::make_unique<char[]>(CURL_ERROR_SIZE);
  c.easy.reset(curl_easy_init());
  c.multi.reset(curl_multi_init());
  if (!c.easy || !c.multi) throw Error(ErrorKind::kIO, "cannot initialise libcurl");
  CURL* e = c.easy.get();
  auto set = [&](CURLcode rc, const char* what) {
    if (rc != CURLE_OK)
      throw Error(ErrorKind::kInvalid, std::string("libcurl refused option ") + what + ": " + curl_easy_strerror(rc));
  };
  set(curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L), "NOSIGNAL");
  set(curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https"), "PROTOCOLS_STR");
  set(curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR,
                       origin_->scheme == "https" ? "https" : "http,https"), "REDIR_PROTOCOLS_STR");
  set(curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L), "FOLLOWLOCATION");
  set(curl_easy_setopt(e, CURLOPT_HTTPGET, 1L), "HTTPGET");
  set(curl_easy_setopt(e, CURLOPT_HTTP_VERSION, long(CURL_HTTP_VERSION_1_1)), "HTTP_VERSION");
  set(curl_easy_setopt(e, CURLOPT_USERAGENT, opt_.user_agent.c_str()), "USERAGENT");
  set(curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                       long(std::max(1.0, opt_.connect_timeout * 1000))), "CONNECTTIMEOUT");
  if (opt_.low_speed_time > 0 && opt_.low_speed_limit > 0) {
    set(curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, opt_.low_speed_limit), "LOW_SPEED_LIMIT");
    set(curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, long(std::max(1.0, std::ceil(opt_.low_speed_time)))),
        "LOW_SPEED_TIME");
  }
  set(curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, opt_.verify_tls ? 1L : 0L), "SSL_VERIFYPEER");
  set(curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, opt_.verify_tls ? 2L : 0L), "SSL_VERIFYHOST");
  if (!opt_.ca_bundle.empty()) set(curl_easy_setopt(e, CURLOPT_CAINFO, opt_.ca_bundle.c_str()), "CAINFO");
  // "" disables proxies, and keeps libcurl from reading http_proxy & co.
  set(curl_easy_setopt(e, CURLOPT_PROXY, opt_.proxy.c_str()), "PROXY");
  if (!opt_.no_proxy.empty()) set(curl_easy_setopt(e, CURLOPT_NOPROXY, opt_.no_proxy.c_str()), "NOPROXY");
  set(curl_easy_setopt(e, CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L), "SUPPRESS_CONNECT_HEADERS");
  set(curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L), "TCP_KEEPALIVE");
  set(curl_easy_setopt(e, CURLOPT_BUFFERSIZE, kBufferSize), "BUFFERSIZE");
  set(curl_easy_setopt(e, CURLOPT_ERRORBUFFER, c.errbuf.get()), "ERRORBUFFER");
  set(curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb), "HEADERFUNCTION");
  set(curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb), "WRITEFUNCTION");
  set(curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, xferinfo_cb), "XFERINFOFUNCTION");
  set(curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L), "NOPROGRESS");
  return c;
}

// easy_perform's loop, but waking every 100 ms to honour cancellation even
// when libcurl is blocked in connect or in a silent server.
CURLcode HttpSource::perform(Conn& c, const HaltFn& halted) {
  CURLM* m = c.multi.get();
  CURL* e = c.easy.get();
  c.errbuf[0] = 0;
  if (curl_multi_add_handle(m, e) != CURLM_OK) throw Error(ErrorKind::kIO, "curl_multi_add_handle failed");
  CURLcode res = CURLE_OK;
  bool finished = false;
  for (;;) {
    int running = 0;
    CURLMcode mc = curl_multi_perform(m, &running);
    if (mc != CURLM_OK) {
      curl_multi_remove_handle(m, e);
      throw Error(ErrorKind::kNetwork, std::string("libcurl: ") + curl_multi_strerror(mc));
    }
    int queued = 0;
    while (CURLMsg* msg = curl_multi_info_read(m, &queued)) {
      if (msg->msg == CURLMSG_DONE && msg->easy_handle == e) {
        res = msg->data.result;
        finished = true;
      }
    }
    if (finished || running == 0) break;
    if (halted()) {
      res = CURLE_ABORTED_BY_CALLBACK;
      break;
    }
    curl_multi_poll(m, nullptr, 0, 100, nullptr);
  }
  curl_multi_remove_handle(m, e);
  return res;
}

// ---------------------------------------------------------------------------
// Responses.

void HttpSource::establish_meta(const Response& r) {
  Meta m;
  m.known = true;
  if (r.content_length >= 0) m.total = uint64_t(r.content_length);
  if (strong_etag(r.etag)) m.etag = r.etag;
  m.validator = !m.etag.empty() ? m.etag : r.last_modified;
  m.ranges = r.accept_ranges == "bytes";
  m.hash = parse_goog_hash(r.goog_hash);
  // GCS serving a gzip-stored object decompressed ("decompressive
  // transcoding"): the hashes describe the stored bytes, not these.
  bool transcoded = !r.stored_encoding.empty() && r.stored_encoding != "identity" &&
                    r.content_encoding != r.stored_encoding;
  m.hash_usable = opt_.verify_goog_hash && !transcoded && !m.hash.empty();
  meta_ = m;
  expected_.store(m.total == kUnknown ? -1 : int64_t(m.total));
  // Nothing was emitted yet (this is a response from byte 0): start the
  // digests afresh for this version of the object.
  crc_ = 0;
  md5_.reset();
  if (m.hash_usable && !m.hash.crc32c && !m.hash.md5.empty()) md5_ = std::make_unique<Digest>(DigestAlgo::kMd5);
}

uint64_t HttpSource::plan(RangeTask& first) {
  const Meta& m = meta_;
  if (opt_.connections > 1 && m.ranges && m.total != kUnknown && m.total >= opt_.min_parallel_bytes &&
      !m.validator.empty()) {
    uint64_t conns = uint64_t(opt_.connections);
    // About 4 segments per connection, within [4, 16] MiB, and the ring of
    // 2 segments per connection within kWindowBytes.
    uint64_t seg = (m.total + conns * 4 - 1) / (conns * 4);
    seg = (seg + kMiB - 1) / kMiB * kMiB;
    seg = std::max(kMinSegment, std::min({seg, kMaxSegment, kWindowBytes / (2 * conns)}));
    uint64_t nseg = (m.total + seg - 1) / seg;
    if (nseg >= 2) {
      size_t window = size_t(std::max<uint64_t>(2, std::min<uint64_t>(2 * conns, kWindowBytes / seg)));
      parallel_ = true;
      par_ = std::make_unique<Parallel>(*this, *cancel_, m.total, seg, window, consumer_wait_);
      par_->allow_workers(opt_.connections - 1);
      if (opt_.adaptive_connections) {  // workers only while the consumer starves
        par_->follow_first_stream(&first);
        return m.total;
      }
      par_->add_workers(opt_.connections - 1);
      return seg;
    }
  }
  return m.total;
}

void HttpSource::on_headers(Xfer& x) {
  const Response& r = x.resp;
  RangeTask& t = *x.task;
  if (r.status >= 300 && r.status < 400) {
    x.body = Xfer::Body::kDiscard;
    return;
  }
  if (r.status < 200 || r.status >= 300) {
    x.body = Xfer::Body::kError;
    return;
  }
  const std::string where = x.url == url_ ? url_ : url_ + " (redirected to " + display_url(x.url) + ")";
  if (x.url != url_) set_resolved(x.url);
  if (r.status == 206) {
    uint64_t a = 0, b = 0, total = 0;
    if (!x.ranged)
      throw Error(ErrorKind::kIntegrity, "server answered 206 Partial Content to a plain GET of " + where);
    if (!parse_content_range(r.content_range, a, b, total) || a != t.pos ||
        (meta_.total != kUnknown && total != meta_.total) ||
        (r.content_length >= 0 && uint64_t(r.content_length) != b - a + 1))
      throw Error(ErrorKind::kIntegrity, "wrong Content-Range '" + r.content_range + "' from " + where +
                                             ": asked for bytes from " + std::to_string(t.pos) + " of " +
                                             (meta_.total == kUnknown ? std::string("?")
                                                                      : std::to_string(meta_.total)));
    if ((!meta_.etag.empty() && !r.etag.empty() && r.etag != meta_.etag) ||
        (!r.goog_hash.empty() && meta_.hash_usable && !(parse_goog_hash(r.goog_hash) == meta_.hash)))
      throw Error(ErrorKind::kIntegrity, "object changed during download of " + where +
                                             ": a ranged response carries another ETag or x-goog-hash");
    x.body = Xfer::Body::kData;
    return;
  }
  if (r.status != 200)
    throw Error(ErrorKind::kHttp,
                "unexpected HTTP status '" + r.status_line + "' for " + where, int(r.status));
  if (!x.ranged) {
    // A whole object from byte 0 (the first request, or a restart before
    // any byte was emitted): it defines the object.
    establish_meta(r);
    if (t.first_stream && !parallel_) t.end = plan(t);
    x.body = Xfer::Body::kData;
    return;
  }
  // 200 to a Range request: the server ignored Range, or If-Range failed.
  bool same = !meta_.etag.empty() && r.etag == meta_.etag &&
              (meta_.total == kUnknown || r.content_length < 0 || uint64_t(r.content_length) == meta_.total);
  if (!same)
    throw Error(ErrorKind::kIntegrity,
                "object changed during download of " + where + ": asked to resume at byte " +
                    std::to_string(t.pos) + ", the server sent the whole object again (200, not 206), "
                    "so the bytes already received belong to another version; retry the download");
  x.skip = t.pos;  // unchanged object, Range ignored: drop what we have
  x.body = Xfer::Body::kData;
}

size_t HttpSource::on_body(Xfer& x, const char* p, size_t n) {
  switch (x.body) {
    case Xfer::Body::kDiscard:
      return n;
    case Xfer::Body::kError:
      if (x.error_body.size() < kErrorBodyKeep)
        x.error_body.append(p, std::min(n, kErrorBodyKeep - x.error_body.size()));
      x.error_bytes += n;
      if (x.error_bytes > kErrorBodyMax) {
        x.cut = true;
        return CURL_WRITEFUNC_ERROR;
      }
      return n;
    case Xfer::Body::kData:
      break;
  }
  st_bytes_.fetch_add(n, std::memory_order_relaxed);
  RangeTask& t = *x.task;
  const uint8_t* q = reinterpret_cast<const uint8_t*>(p);
  size_t m = n;
  if (x.skip) {
    size_t k = size_t(std::min<uint64_t>(x.skip, m));
    x.skip -= k;
    q += k;
    m -= k;
  }
  if (m == 0) return n;
  if (t.end != kUnknown && t.pos + m > t.end) {
    if (t.end == meta_.total)
      throw Error(ErrorKind::kIntegrity, "server sent more bytes than the declared Content-Length (" +
                                             std::to_string(meta_.total) + ") for " + url_);
    // Our range ends here (segment 0 of a parallel download): stop the body.
    size_t k = size_t(t.end - t.pos);
    if (k) t.sink(t.pos, q, k);
    t.pos += k;
    x.got += k;
    x.cut = true;
    return CURL_WRITEFUNC_ERROR;
  }
  auto t0 = Clock::now();
  t.sink(t.pos, q, m);
  t.pos += m;
  x.got += m;
  // Time spent waiting for our consumer is no network stall.
  if (!x.samples.empty() && Clock::now() - t0 > std::chrono::milliseconds(500)) x.samples.clear();
  return n;
}

// One attempt: a request and the redirects it leads to.
void HttpSource::perform_with_redirects(Conn& c, RangeTask& t, const HaltFn& halted, const CancelToken& cancel,
                                        bool from_origin, Attempt& a) {
  std::string url = from_origin ? std::string() : resolved();
  if (url.empty()) url = url_;
  const bool ranged = !(t.pos == 0 && !parallel_);
  if (ranged && meta_.validator.empty())
    throw Error(ErrorKind::kNetwork, "download of " + url_ + " was interrupted after " + std::to_string(t.pos) +
                                         " bytes and cannot be resumed: the server sends neither ETag nor "
                                         "Last-Modified, so a resumed range could belong to another version");
  for (int redirects = 0;;) {
    CURL* e = c.easy.get();
    SlistPtr hdrs;
    if (same_origin(*origin_, parse_url(url)))
      for (const auto& h : opt_.headers) slist_append(hdrs, h);
    bool user_ae = false;
    for (const auto& h : opt_.headers) user_ae |= lower(h).compare(0, 16, "accept-encoding:") == 0;
    if (!user_ae) slist_append(hdrs, "Accept-Encoding: identity");
    if (ranged) {
      std::string range = "Range: bytes=" + std::to_string(t.pos) + "-";
      if (t.end != kUnknown && t.end != meta_.total) range += std::to_string(t.end - 1);
      slist_append(hdrs, range);
      slist_append(hdrs, "If-Range: " + meta_.validator);
    }
    a.x = Xfer();
    a.x.src = this;
    a.x.task = &t;
    a.x.halted = &halted;
    a.x.url = url;
    a.x.ranged = ranged;
    a.x.easy = e;
    a.x.low_speed_time = opt_.low_speed_limit > 0 ? opt_.low_speed_time : 0;
    a.x.low_speed_limit = double(opt_.low_speed_limit);
    curl_easy_setopt(e, CURLOPT_URL, url.c_str());
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, hdrs.get());
    curl_easy_setopt(e, CURLOPT_HEADERDATA, &a.x);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &a.x);
    curl_easy_setopt(e, CURLOPT_XFERINFODATA, &a.x);
    st_requests_.fetch_add(1, std::memory_order_relaxed);
    a.res = perform(c, halted);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, nullptr);
    a.hop_url = url;
    if (a.x.err) std::rethrow_exception(a.x.err);
    if (a.x.stalled && a.res == CURLE_ABORTED_BY_CALLBACK) {
      a.res = CURLE_OPERATION_TIMEDOUT;
      std::snprintf(c.errbuf.get(), CURL_ERROR_SIZE, "less than %ld bytes/s received during the last %g s",
                    opt_.low_speed_limit, opt_.low_speed_time);
    }
    if (cancel.cancelled()) throw Error(ErrorKind::kCancelled, "download cancelled: " + url_);
    if (halted()) throw Error(ErrorKind::kCancelled, "download stopped: " + url_);
    long status = a.x.resp.complete ? a.x.resp.status : 0;
    if (status < 300 || status >= 400) return;
    char* loc = nullptr;
    curl_easy_getinfo(e, CURLINFO_REDIRECT_URL, &loc);
    if (!loc || !*loc) return;  // a 3xx without Location: the caller reports it
    std::string next = loc;
    auto np = parse_url(next);
    if (!np || (np->scheme != "http" && np->scheme != "https"))
      throw Error(ErrorKind::kNetwork, "refusing redirect from " + url_ + " to a non-HTTP URL: " + display_url(next));
    if (origin_->scheme == "https" && np->scheme != "https")
      throw Error(ErrorKind::kNetwork, "refusing redirect from https to http: " + url_ + " redirected to " +
                                           display_url(next));
    if (++redirects > opt_.max_redirects)
      throw Error(ErrorKind::kNetwork, "too many redirects fetching " + url_ + " (limit " +
                                           std::to_string(opt_.max_redirects) + "; last to " +
                                           display_url(next) + ")");
    st_redirects_.fetch_add(1, std::memory_order_relaxed);
    url = next;
  }
}

void HttpSource::fetch_range(Conn& c, RangeTask& t, const HaltFn& halted, const CancelToken& cancel) {
  int failures = 0;  // consecutive attempts that brought no byte
  int attempts = 0, resumes = 0;
  bool progressed = false, from_origin = false;
  std::string last_cause;
  bool last_timeout = false;
  std::minstd_rand rng(std::random_device{}());
  const uint64_t start = t.pos;

  for (;;) {
    if (t.end != kUnknown && t.pos >= t.end) return;
    if (attempts > 0) {
      if (progressed) {
        ++resumes;
        st_resumes_.fetch_add(1, std::memory_order_relaxed);
      } else {
        st_retries_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    ++attempts;
    const bool started_resolved = !from_origin && !resolved().empty();
    Attempt a;
    perform_with_redirects(c, t, halted, cancel, from_origin, a);
    const Response& r = a.x.resp;
    const long status = r.complete ? r.status : 0;
    const std::string where =
        a.hop_url == url_ ? url_ : url_ + " (redirected to " + display_url(a.hop_url) + ")";
    double retry_after = -1;
    progressed = a.x.got > 0;

    if (status >= 200 && status < 300) {
      from_origin = false;
      if (t.end != kUnknown && t.pos >= t.end) return;
      if (a.res == CURLE_OK) {
        if (t.end == kUnknown) return;  // no declared length: the server's end is the end
        last_cause = "connection closed after " + std::to_string(t.pos - start) + " of " +
                     std::to_string(t.end - start) + " bytes";
        last_timeout = false;
      } else {
        last_cause = curl_cause(a.res, c.errbuf.get()) + " after " + std::to_string(t.pos - start) + " bytes";
        last_timeout = is_timeout(a.res);
        if (!retryable(a.res))
          throw Error(ErrorKind::kNetwork, "download of " + where + " failed: " + last_cause);
      }
      if (t.pos > 0 && meta_.validator.empty())
        throw Error(ErrorKind::kNetwork, "download of " + where + " was interrupted (" + last_cause +
                                             ") and cannot be resumed: the server sends neither ETag nor "
                                             "Last-Modified");
    } else if (status == 0) {
      // No response: connect failure, timeout, reset before headers.
      last_cause = curl_cause(a.res, c.errbuf.get());
      last_timeout = is_timeout(a.res);
      if (a.res == CURLE_PEER_FAILED_VERIFICATION || a.res == CURLE_SSL_CACERT_BADFILE)
        throw Error(ErrorKind::kNetwork,
                    "TLS certificate verification failed for " + where + ": " + last_cause +
                        ". Point SSL_CERT_FILE or REQUESTS_CA_BUNDLE at the CA bundle that signs this server "
                        "(or set TFHUB_DISABLE_CERT_VALIDATION=true to skip verification)");
      if (a.res == CURLE_UNSUPPORTED_PROTOCOL || a.res == CURLE_URL_MALFORMAT)
        throw Error(ErrorKind::kInvalid, "cannot fetch " + where + ": " + last_cause);
      if (!retryable(a.res)) throw Error(ErrorKind::kNetwork, "download of " + where + " failed: " + last_cause);
      // A name that does not resolve is more often a typo than a hiccup:
      // one retry, not the full backoff.
      if ((a.res == CURLE_COULDNT_RESOLVE_HOST || a.res == CURLE_COULDNT_RESOLVE_PROXY) && failures >= 1)
        throw Error(ErrorKind::kNetwork, "download of " + where + " failed: " + last_cause);
    } else {
      std::string body = printable(a.x.error_body);
      last_cause = "HTTP " + r.status_line.substr(r.status_line.find(' ') == std::string::npos
                                                      ? 0
                                                      : r.status_line.find(' ') + 1) +
                   (body.empty() ? "" : ": " + body);
      last_timeout = status == 408;
      const bool fatal = !(status == 408 || status == 429 || status >= 500);
      if (fatal && started_resolved) {
        // The redirect target we reused may have expired (presigned URL):
        // ask the original URL again before giving up.
        from_origin = true;
        continue;
      }
      if (status == 404 || status == 410)
        throw Error(ErrorKind::kNotFound, "not found: " + where + " answered " + last_cause +
                                              "; check the handle's spelling and version", int(status));
      if (status == 401 || status == 403)
        throw Error(ErrorKind::kAccessDenied,
                    "access denied: " + where + " answered " + last_cause +
                        "; check your credentials (e.g. KAGGLE_USERNAME/KAGGLE_KEY) and the handle's spelling",
                    int(status));
      if (status == 416)
        throw Error(ErrorKind::kIntegrity,
                    "download of " + where + " cannot continue: the server refused the range from byte " +
                        std::to_string(t.pos) + " (" + last_cause + "); the object is shorter than the " +
                        (meta_.total == kUnknown ? std::string("bytes already received")
                                                 : "declared Content-Length " + std::to_string(meta_.total)) +
                        ", or it changed during the download",
                    int(status));
      if (status >= 300 && status < 400)
        throw Error(ErrorKind::kHttp, "unexpected redirect without a usable Location from " + where + ": " +
                                          last_cause, int(status));
      if (fatal) throw Error(ErrorKind::kHttp, "download of " + where + " failed: " + last_cause, int(status));
      retry_after = parse_retry_after(r.retry_after);
    }

    // A transient failure: resume at once after progress, else back off. A
    // stall that brought only a trickle is no progress: a server that sends a
    // few bytes and stalls on every request must run out of retries.
    if (!(status >= 200 && status < 300)) from_origin = started_resolved;
    const uint64_t substantial =
        std::max<uint64_t>(1u << 20, uint64_t(double(opt_.low_speed_limit) * opt_.low_speed_time));
    if (progressed && last_timeout && a.x.got < substantial) progressed = false;
    if (progressed) {
      failures = 0;
      if (resumes >= kMaxResumes)
        throw Error(ErrorKind::kNetwork, "download of " + url_ + " gave up after " + std::to_string(resumes) +
                                             " resumed connections; last: " + last_cause);
      continue;
    }
    if (++failures > opt_.max_retries)
      throw Error(last_timeout ? ErrorKind::kTimeout : ErrorKind::kNetwork,
                  "download of " + where + " failed after " + std::to_string(attempts) + " attempt" +
                      (attempts == 1 ? "" : "s") + " (" + std::to_string(opt_.max_retries) +
                      " retries allowed): " + last_cause,
                  status >= 400 ? int(status) : 0);
    double delay = std::min(opt_.backoff_max, opt_.backoff_base * std::pow(2.0, failures - 1));
    delay *= std::uniform_real_distribution<double>(0.5, 1.0)(rng);
    if (retry_after >= 0) delay = std::min(opt_.backoff_max, std::max(delay, retry_after));
    auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(std::max(0.0, delay)));
    while (Clock::now() < until) {
      if (cancel.cancelled()) throw Error(ErrorKind::kCancelled, "download cancelled: " + url_);
      if (halted()) throw Error(ErrorKind::kCancelled, "download stopped: " + url_);
      auto left = until - Clock::now();
      std::this_thread::sleep_for(std::min<Clock::duration>(left, std::chrono::milliseconds(50)));
    }
  }
}

// ---------------------------------------------------------------------------
// The whole object, in order.

void HttpSource::sink_direct(const uint8_t* p, size_t n) {
  if (meta_.hash_usable) {
    if (meta_.hash.crc32c) crc_ = crc32c_update(crc_, p, n);
    else if (md5_) md5_->update(p, n);
  }
  emitted_ += n;
  (*emit_)(p, n);
  if (par_) par_->grow_if_starved();
}

void HttpSource::verify_end() {
  if (meta_.total != kUnknown && emitted_ != meta_.total)
    throw Error(ErrorKind::kIntegrity, "download of " + url_ + " delivered " + std::to_string(emitted_) +
                                           " bytes, Content-Length declared " + std::to_string(meta_.total));
  if (!meta_.hash_usable) return;
  if (meta_.hash.crc32c) {
    if (crc_ != *meta_.hash.crc32c)
      throw Error(ErrorKind::kIntegrity, "download of " + url_ + " is corrupt: x-goog-hash crc32c mismatch: expected " +
                                             hex32(*meta_.hash.crc32c) + " got " + hex32(crc_));
    st_crc32c_.store(true);
  } else if (md5_) {
    std::string got = md5_->raw();
    md5_.reset();
    if (got != meta_.hash.md5)
      throw Error(ErrorKind::kIntegrity, "download of " + url_ + " is corrupt: x-goog-hash md5 mismatch: expected " +
                                             to_hex(meta_.hash.md5) + " got " + to_hex(got));
    st_md5_.store(true);
  }
}

void HttpSource::run(const EmitFn& emit, const CancelToken& cancel) {
  meta_ = Meta();
  parallel_ = false;
  emit_ = &emit;
  cancel_ = &cancel;
  emitted_ = 0;
  crc_ = 0;
  md5_.reset();
  set_resolved("");
  struct Reset {  // workers never outlive run(), whatever happens
    HttpSource& s;
    ~Reset() {
      s.par_.reset();
      s.emit_ = nullptr;
      s.cancel_ = nullptr;
    }
  } reset{*this};
  main_halted_ = [this, &cancel] { return cancel.cancelled() || (par_ && par_->failed()); };

  Conn conn = make_conn();
  RangeTask t;
  t.first_stream = true;
  t.sink = [this](uint64_t, const uint8_t* p, size_t n) { sink_direct(p, n); };
  note_active(1);
  try {
    fetch_range(conn, t, main_halted_, cancel);
  } catch (...) {
    note_active(-1);
    if (par_) {
      if (auto e = par_->error()) std::rethrow_exception(e);
    }
    throw;
  }
  note_active(-1);
  if (par_) {
    st_segments_.fetch_add(1);
    conn = Conn();  // its connection was cut mid-body; free it
    const bool link_bound = !opt_.adaptive_connections || par_->workers() > 1;  // see below
    // The first stream's connection is gone: a worker takes its place when
    // there is no adaptive count, or when the count had already grown to
    // all the others (the link needed every connection).
    if (!opt_.adaptive_connections || par_->workers() >= opt_.connections - 1) par_->add_workers(1);
    par_->allow_workers(opt_.connections);
    par_->first_stream_ended();
    // Out of order when the consumer takes it and the link is what it waits
    // for (the adaptive count had to grow during segment 0, or connections
    // are fixed): decoding then overlaps the transfer. A decoder that is the
    // bottleneck gains nothing and pays for it (1 GiB .tar.gz on loopback,
    // 2 cores: ~5% slower). An md5 cannot be combined from ranges (crc32c
    // can), so it keeps the order.
    if (offset_sink_ && !md5_ && link_bound && offset_sink_->accept()) {
      auto crcs = par_->consume_any(
          [this](uint64_t off, const uint8_t* p, size_t n) {
            emitted_ += n;
            offset_sink_->emit_at(off, p, n);
          },
          offset_sink_->floor, offset_sink_->flush);
      for (uint64_t i = par_->first_segment(); i < crcs.size(); ++i)
        crc_ = crc32c_combine(crc_, crcs[i], par_->segment_len(i));
      st_any_order_.store(true);
    } else {
      par_->consume([this](const uint8_t* p, size_t n) { sink_direct(p, n); });
    }
    par_->stop();
  }
  cancel.throw_if_cancelled();
  verify_end();
}

}  // namespace

void http_global_init() {
  static std::once_flag once;
  std::call_once(once, [] {
    CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK)
      throw Error(ErrorKind::kIO, std::string("curl_global_init failed: ") + curl_easy_strerror(rc));
  });
}

std::unique_ptr<Source> make_http_source(const FetchOptions& opt) {
  http_global_init();
  return std::make_unique<HttpSource>(opt);
}

}  // namespace hubfast

