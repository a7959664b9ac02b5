// HTTP(S) sources through libcurl: verified TLS, timeouts, retries with
// backoff, resume with Range/If-Range, parallel ranged connections, and
// verification of Content-Length and x-goog-hash.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "hubfast/source.h"

namespace hubfast {

struct FetchOptions {
  std::string url;
  std::vector<std::string> headers;   // "Name: value", sent to the origin host only
  std::string ca_bundle;              // empty: the system store
  bool verify_tls = true;
  std::string proxy;                  // empty: none ("" means no proxy at all)
  std::string no_proxy;
  double connect_timeout = 30;        // seconds
  double low_speed_time = 30;         // seconds below low_speed_limit => timeout
  long low_speed_limit = 1024;        // bytes/s
  int max_redirects = 10;
  int max_retries = 5;
  double backoff_base = 0.5;          // seconds; doubled each retry, jittered
  double backoff_max = 30;
  // The options a setting feeds (HUBFAST_CONNECTIONS, ...) take their defaults
  // from python/hubfast/config.py; these equal them (test_settings.py checks)
  // for callers that leave an option out.
  int connections = 8;                // parallel ranged connections when allowed (at most)
  // The first response streams alone and connections are added only while the
  // consumer waits for bytes (growth.h); false: all of them at once.
  bool adaptive_connections = true;
  uint64_t min_parallel_bytes = 64ull << 20;  // smaller objects: one stream
  bool verify_goog_hash = true;
  std::string user_agent = "hubfast";
  bool growth_trace = false;          // each growth window's readings on stderr (debugging)
};

std::unique_ptr<Source> make_http_source(const FetchOptions& opt);

// Process-wide libcurl initialisation (idempotent, thread safe).
void http_global_init();

}  // namespace hubfast
