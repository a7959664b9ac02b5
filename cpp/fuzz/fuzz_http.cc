// libFuzzer harness for the HTTP response handling of the fetch source: each
// input is the raw bytes a server on 127.0.0.1 answers (status line,
// headers, body), to every request of the download (resumes included).
// Redirects are disabled so that nothing ever leaves the loopback. Any
// hubfast::Error is an expected outcome; a crash, a sanitizer report or a
// hang (-timeout) is a finding.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

#include "hubfast/error.h"
#include "hubfast/fetch.h"

namespace {

std::mutex mu;
std::string response;  // what the server answers to every request
int port = 0;

void serve(int listener) {
  for (;;) {
    int c = ::accept(listener, nullptr, nullptr);
    if (c < 0) continue;
    timeval tv{1, 0};
    ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    std::string req;
    char buf[4096];
    while (req.find("\r\n\r\n") == std::string::npos && req.size() < 65536) {
      ssize_t n = ::recv(c, buf, sizeof buf, 0);
      if (n <= 0) break;
      req.append(buf, size_t(n));
    }
    std::string out;
    {
      std::lock_guard<std::mutex> lk(mu);
      out = response;
    }
    size_t off = 0;
    while (off < out.size()) {
      ssize_t n = ::send(c, out.data() + off, out.size() - off, MSG_NOSIGNAL);
      if (n <= 0) break;
      off += size_t(n);
    }
    ::close(c);
  }
}

void start_server() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  ::setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::listen(s, 64);
  socklen_t len = sizeof a;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  port = ntohs(a.sin_port);
  std::thread(serve, s).detach();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static std::once_flag once;
  std::call_once(once, start_server);
  {
    std::lock_guard<std::mutex> lk(mu);
    response.assign(reinterpret_cast<const char*>(data), size);
  }
  hubfast::FetchOptions o;
  o.url = "http://127.0.0.1:" + std::to_string(port) + "/m/1?tf-hub-format=compressed";
  o.max_redirects = 0;  // a Location may name any host: stay on the loopback
  o.max_retries = 0;
  o.connections = 2;
  o.min_parallel_bytes = 1024;  // small bodies still exercise the ranged path
  o.connect_timeout = 1;
  o.low_speed_time = 1;
  o.backoff_base = 0.001;
  o.backoff_max = 0.01;
  hubfast::CancelToken cancel;
  try {
    auto src = hubfast::make_http_source(o);
    uint64_t got = 0;
    src->run([&](const uint8_t*, size_t n) { got += n; }, cancel);
  } catch (const hubfast::Error&) {
  }
  return 0;
}
