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
//    a validator (strong ETag, else Last-Modified with Content-Length), Accept-Ranges and
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
//    A worker with nothing to claim (all claimed, or the ring full behind a
//    segment the consumer waits for) takes the second half of what a slower
//    connection's range has left, when that would still take a while; the
//    slower one's response is cut where its share now ends.
//  * Every range (the single stream, segment 0, each segment) is fetched by
//    fetch_range(): transient failures (connection errors, timeouts, 408,
//    429, 5xx) are retried with jittered exponential backoff honouring
//    Retry-After; a transfer that dropped after making progress resumes with
//    `Range: bytes=<next>-` + `If-Range`. A 206 must start where asked and
//    carry the known total and the validator; a 200 to a Range request, or a
//    part without the validator, means the bytes passed on may belong to
//    another version: RestartError, and the extraction starts again from
//    byte 0. Without a validator (no strong ETag, no Last-Modified with
//    Content-Length): one connection, and a drop restarts from byte 0.
//  * The caller's thread checks the total length and x-goog-hash (crc32c,
//    or md5 when no crc32c is offered) over the bytes in emit order (out of
//    order: crc32c per segment, combined; md5 keeps the order).
//  * Stalls: libcurl's LOW_SPEED_LIMIT/TIME is set, but it averages over ~5 s
//    and fires seconds late, so the progress callback also checks the rate
//    over the last low_speed_time seconds (from the end of connect, and not
//    counting time the consumer kept us blocked in emit). Waits poll every
//    100 ms and backoff sleeps in 50 ms slices, so cancellation is prompt.
#include "hubfast/fetch.h"

#include <curl/curl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "hubfast/digest.h"
#include "hubfast/error.h"
#include "http_parallel.h"
#include "http_parse.h"
#include "http_source.h"

namespace hubfast::http {
namespace {

constexpr long kBufferSize = 512 * 1024;       // libcurl's receive buffer
constexpr size_t kErrorBodyKeep = 512;         // error body kept for messages
constexpr uint64_t kErrorBodyMax = 1 * kMiB;   // error body read at most
constexpr int kMaxResumes = 200;               // per range, with progress each

struct SlistDeleter {
  void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};
using SlistPtr = std::unique_ptr<curl_slist, SlistDeleter>;

void slist_append(SlistPtr& list, const std::string& s) {
  curl_slist* l = curl_slist_append(list.get(), s.c_str());
  if (!l) throw Error(ErrorKind::kIO, "out of memory building HTTP headers");
  list.release();
  list.reset(l);
}

// ---------------------------------------------------------------------------
// libcurl plumbing.

size_t header_cb(char* p, size_t size, size_t n, void* ud) {
  Xfer& x = *static_cast<Xfer*>(ud);
  size_t len = size * n;
  try {
    if (parse_header_line(std::string(p, len), x.resp)) x.src->on_headers(x);
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

}  // namespace

HttpSource::~HttpSource() = default;

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
  // A date alone is too coarse (two versions within a second): with the length it will do.
  if (m.etag.empty() && r.content_length >= 0) m.last_modified = r.last_modified;
  m.validator = !m.etag.empty() ? m.etag : m.last_modified;
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

uint64_t HttpSource::plan(RangeTask& first, CURL* easy) {
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
      // The peer's address (getifaddrs) only for a download that may grow.
      char* ip = nullptr;
      const bool local = curl_easy_getinfo(easy, CURLINFO_PRIMARY_IP, &ip) == CURLE_OK && ip && address_is_local(ip);
      par_->set_local_server(local);
      par_->trace_growth(opt_.growth_trace);
      st_local_server_.store(local);
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
    // Every part carries the validator the download started with, else it may belong to
    // another version.
    if ((!meta_.etag.empty() && r.etag != meta_.etag) ||
        (meta_.etag.empty() && r.last_modified != meta_.last_modified) ||
        (!r.goog_hash.empty() && meta_.hash_usable && !(parse_goog_hash(r.goog_hash) == meta_.hash)))
      throw RestartError("object changed during download of " + where +
                         ": a part (206) carries another or no ETag, Last-Modified or x-goog-hash");
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
    if (t.first_stream && !parallel_) t.end = plan(t, x.easy);
    x.body = Xfer::Body::kData;
    return;
  }
  // 200 to a Range request: the server ignored Range, or If-Range failed. Even under the
  // same ETag its bytes may be another version's: start again from byte 0.
  throw RestartError("object changed during download of " + where + ": asked for bytes from " +
                     std::to_string(t.pos) + ", the server sent the whole object (200, not 206)");
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
  if (t.end != kUnknown && t.pos > t.end) {
    // The sink took less: another connection took over the rest of this
    // range (Parallel::steal_locked).
    x.cut = true;
    return CURL_WRITEFUNC_ERROR;
  }
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
    throw RestartError("download of " + url_ + " was interrupted after " + std::to_string(t.pos) +
                       " bytes and cannot be resumed: the server sends no strong ETag, nor Last-Modified with "
                       "Content-Length, so a resumed range could belong to another version");
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
        throw RestartError("download of " + where + " was interrupted (" + last_cause +
                           ") and cannot be resumed: the server sends no strong ETag, nor Last-Modified "
                           "with Content-Length");
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
    // Jitter; seeded here, not per range: most ranges never back off.
    thread_local std::minstd_rand rng(std::random_device{}());
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

}  // namespace hubfast::http

namespace hubfast {

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
  return std::make_unique<http::HttpSource>(opt);
}

}  // namespace hubfast

