// GrowthPolicy on synthetic links: how many connections it opens when the
// consumer waits or not, the link pays for more or not, and the CPUs are
// busy or idle. read_cpu and usable_cores against this machine.
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/resource.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <functional>
#include <set>
#include <string>

#include "hubfast/growth.h"
#include "../src/local_peer.h"

using namespace hubfast;

namespace {

constexpr double kCores = 2;
constexpr double kMB = 1e6;

// A download seen by the consuming thread every `dt` seconds.
struct Link {
  GrowthPolicy policy{kCores};
  GrowthSample s;
  int workers = 1;
  bool auto_settle = true;  // every connection settles at once
  int settled = 1;
  std::function<double(int)> rate = [](int n) { return 10 * kMB * n; };  // per-connection cap
  double wait = 1.0;        // fraction of the time the consumer waits
  // This process's CPU, fraction of kCores, by connections.
  std::function<double(int)> cpu = [](int) { return 0.1; };
  double machine = 0.1;     // all CPUs, fraction busy
  double steal = 0;         // all CPUs, fraction the hypervisor takes (counted busy too)

  explicit Link(int max_workers, int start = 1) : workers(start), settled(start) {
    policy.allow(max_workers);
    policy.begin(s);
  }
  void run(double seconds, double dt = 0.005) {
    for (double end = s.t + seconds; s.t < end;) {
      s.t += dt;
      s.bytes += uint64_t(rate(workers) * dt);
      s.waited += wait * dt;
      s.cpu += cpu(workers) * kCores * dt;
      s.all += kCores * dt;
      s.busy += machine * kCores * dt;
      s.stolen += steal * kCores * dt;
      workers += policy.step(s, workers, auto_settle ? workers : settled);
    }
  }
};

}  // namespace

TEST_CASE("growth: a consumer that never waits keeps its connections") {
  Link l(8, 2);
  l.wait = 0.05;
  l.run(2.0);
  CHECK(l.workers == 2);
}

TEST_CASE("growth: a starved consumer on a per-connection cap doubles up to the limit") {
  Link l(8, 1);
  l.run(0.1);
  CHECK(l.workers >= 2);
  l.run(1.0);
  CHECK(l.workers == 8);
  CHECK_FALSE(l.policy.frozen());
}

TEST_CASE("growth: a wait of half a window or less, once, is a blip") {
  Link l(8, 2);
  l.wait = 0.6;  // starved for one window, then not
  l.run(0.021);
  l.wait = 0.0;
  l.run(1.0);
  CHECK(l.workers == 2);
}

TEST_CASE("growth: waiting nine tenths of one window counts for two") {
  struct Case {
    double waited;  // of a 30 ms window
    int added;
  };
  for (Case c : {Case{0.028, 2}, Case{0.021, 0}}) {  // 93%: famished; 70%: starved, once
    INFO("waited " << c.waited);
    GrowthPolicy p(kCores);
    p.allow(8);
    GrowthSample s;
    p.begin(s);
    s.t = 0.03;
    CHECK(p.step(s, 2, 2) == 0);  // the first window: no wait
    s.t = 0.06;
    s.waited = c.waited;
    CHECK(p.step(s, 2, 2) == c.added);
  }
}

TEST_CASE("growth: the first window, the pipeline filling, does not decide alone") {
  Link l(8, 1);
  l.rate = [](int n) { return 700 * kMB * n; };  // loopback
  l.wait = 1.0;  // the decoder waits for its first zstd frame
  l.run(0.021);
  CHECK(l.workers == 1);
  l.wait = 0.0;  // then it has work: a fast link
  l.run(1.0);
  CHECK(l.workers == 1);
  // Starved on: grown once the CPUs have been read over kCpuSpan (a stream
  // this fast may be waiting for a CPU, see the loopback case below).
  Link m(8, 1);
  m.rate = [](int n) { return 700 * kMB * n; };
  m.wait = 1.0;
  m.run(0.021);
  CHECK(m.workers == 1);
  m.run(0.07);
  CHECK(m.workers == 1);
  m.run(0.04);
  CHECK(m.workers >= 2);
  // A first stream slower than any decoder (a 50 MB/s cap): the first window decides.
  Link k(8, 1);
  k.rate = [](int n) { return 50 * kMB * n; };
  k.wait = 1.0;
  k.run(0.021);
  CHECK(k.workers == 2);
}

TEST_CASE("growth: waits while the hypervisor steals the CPUs are no evidence of a slow link") {
  struct Case {
    const char* what;
    double wait, steal;  // fractions of the time
    int workers;         // after a second
  };
  for (Case c : {Case{"starved on its face, as much stolen: no slow link", 0.6, 0.15, 1},
                 Case{"the same waits without the steal: a slow link", 0.6, 0.0, 8},
                 Case{"far longer waits than the steal explains: a slow link", 0.95, 0.15, 8}}) {
    INFO(c.what);
    Link l(8, 1);
    l.wait = c.wait;
    l.steal = c.steal;
    l.machine = 0.3;
    l.run(1.0);
    CHECK(l.workers == c.workers);
  }
}

TEST_CASE("growth: a starved consumer in a process that keeps the cores busy waits for CPU") {
  Link l(16, 1);
  l.rate = [](int) { return 300 * kMB; };  // the cores, not the link, set the rate
  l.cpu = [](int) { return 0.8; };  // the receive path, the decoding threads behind the consumer
  l.run(2.0);
  CHECK(l.workers == 1);
  CHECK_FALSE(l.policy.frozen());
  l.cpu = [](int) { return 0.3; };  // the cores free up (or the link slows): growth may start
  l.run(0.2);
  CHECK(l.workers >= 2);
}

TEST_CASE("growth: on busy CPUs a doubling that brings no more bytes is the last") {
  struct Load {
    const char* who;
    double cpu, machine, rate;
  };
  // A stream slower than kSlowLink: a slow link, so the first doubling is taken on busy
  // CPUs too (a faster one keeps its count, see the loopback case).
  for (Load load : {Load{"this process", 0.9, 0.1, 300 * kMB}, Load{"other processes", 0.2, 0.95, 80 * kMB}}) {
    INFO("CPUs busy with " << load.who);
    Link l(16, 2);
    l.rate = [load](int) { return load.rate; };  // the cores, not the link, set the rate
    // Two connections left room (the first doubling); four fill the cores.
    l.cpu = [load](int n) { return n < 4 ? std::min(load.cpu, 0.3) : load.cpu; };
    l.machine = load.machine;
    l.run(2.0);
    CHECK(l.workers == 4);  // the second doubling had to pay
    CHECK(l.policy.frozen());
    l.policy.allow(32);  // the first stream's end raises the limit: frozen stays frozen
    l.run(1.0);
    CHECK(l.workers == 4);
    CHECK(l.policy.limit() == 4);
  }
}

TEST_CASE("growth: a fast stream from a server on this machine waits for the cores, not the link") {
  // 1 GiB .tar.zst from the loopback server on 2 cores: the decoder waits nearly always, this
  // process uses 1.5 cores of 2 with windows down to 1.1, the server's sends take the rest.
  struct Case {
    const char* what;
    bool local;
    double cpu, dip, machine;  // this process most windows, one window in five; all CPUs
    bool grows;
  };
  for (Case c : {Case{"local server, the machine busy: one connection", true, 0.75, 0.45, 0.95, false},
                 Case{"local server, CPUs left over: more connections", true, 0.45, 0.35, 0.5, true},
                 Case{"local server, this process idle but the machine busy: one", true, 0.45, 0.35, 0.95, false},
                 Case{"remote server, the process busy but for dips: one connection", false, 0.75, 0.45, 0.95, false},
                 // A datacenter link on a host whose other work keeps the CPUs busy: more
                 // connections cost little CPU here, and bring more bytes.
                 Case{"remote server, this process idle, the machine busy: more", false, 0.45, 0.35, 0.95, true}}) {
    INFO(c.what);
    Link l(8, 1);
    l.policy.set_local_server(c.local);
    l.rate = [](int n) { return 150 * kMB * n; };
    l.wait = 0.95;
    l.cpu = [&l, c](int) { return int(l.s.t / GrowthPolicy::kWindow) % 5 ? c.cpu : c.dip; };
    l.machine = c.machine;
    l.run(1.0);
    CHECK((l.workers > 1) == c.grows);
  }
}

TEST_CASE("growth: with idle CPUs a small gain is a link ramping up: growth goes on") {
  // A long round trip: new connections are in slow start when measured.
  Link l(16, 2);
  l.rate = [](int n) { return 40 * kMB + 1 * kMB * n; };
  l.run(3.0);
  CHECK(l.workers == 16);
  CHECK_FALSE(l.policy.frozen());
}

TEST_CASE("growth: a doubling that pays is followed by the next") {
  Link l(16, 2);
  l.rate = [](int n) { return 20 * kMB * n; };
  l.cpu = [](int n) { return n < 4 ? 0.3 : 0.9; };  // busy, but each doubling brings twice the bytes
  l.run(2.0);
  CHECK(l.workers == 16);
  CHECK_FALSE(l.policy.frozen());
}

TEST_CASE("growth: no further doubling until every connection has settled") {
  Link l(16, 2);
  l.auto_settle = false;
  l.settled = 2;
  l.run(0.2);
  CHECK(l.workers == 4);  // the first doubling; its two new connections have not settled
  l.run(2.0);
  CHECK(l.workers == 4);
  l.settled = 4;
  l.run(0.2);
  CHECK(l.workers == 16);  // the doubling paid in full (a per-connection cap): x4
}

TEST_CASE("growth: a doubling that paid in full is followed by a quadrupling, one that paid less by a doubling") {
  Link l(32, 1);
  l.auto_settle = false;
  l.settled = 1;
  l.run(0.2);
  REQUIRE(l.workers == 2);
  l.settled = 2;
  l.run(0.03);  // one more starved window: twice the bytes with two connections
  CHECK(l.workers == 8);
  // A link that gives two connections 1.5x the bytes of one: doubling again.
  Link m(32, 1);
  m.rate = [](int n) { return 10 * kMB * (n == 1 ? 1.0 : 1.5 * n / 2); };
  m.auto_settle = false;
  m.settled = 1;
  m.run(0.2);
  REQUIRE(m.workers == 2);
  m.settled = 2;
  m.run(0.03);
  CHECK(m.workers == 4);
}

TEST_CASE("growth: a doubling counts the connections outside the limit") {
  GrowthPolicy p(kCores);
  p.allow(7);  // eight connections, the first stream's besides the workers
  GrowthSample s;
  p.begin(s);
  s.t = 0.03;
  CHECK(p.step(s, 1, 1, 1) == 0);  // the first window
  s.t = 0.06;
  s.waited = 0.03;  // famished: one window decides
  CHECK(p.step(s, 1, 1, 1) == 2);  // 1 + 1 connections double to 4
}

TEST_CASE("growth: the limit caps the last doubling") {
  Link l(3, 1);
  l.run(1.0);
  CHECK(l.workers == 3);
}

TEST_CASE("growth: read_cpu and usable_cores read this machine") {
  double cores = usable_cores();
  CHECK(cores >= 1);
  GrowthSample a, b;
  read_cpu(a);
  // Spin until getrusage (an independent account of this process's CPU) has
  // seen 30 ms, however long a busy machine makes that take: a fixed span of
  // wall time gets less CPU the busier the other cores are.
  auto rusage_cpu = [] {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
  };
  double start = rusage_cpu();
  auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  volatile uint64_t x = 0;
  while (rusage_cpu() - start < 0.03 && std::chrono::steady_clock::now() < give_up)
    for (int i = 0; i < 10000; ++i) x = x + 1;
  read_cpu(b);
  CHECK(b.cpu - a.cpu >= 0.025);  // the spin above was this process's CPU
  CHECK(b.all >= a.all);
  CHECK(b.busy >= a.busy);
  CHECK(b.all >= b.busy);
  CHECK(a.all > 0);  // /proc/stat is there on Linux
}

TEST_CASE("growth: a peer on this machine is told from a remote one") {
  using hubfast::http::address_is_local;
  CHECK(address_is_local("127.0.0.1"));
  CHECK(address_is_local("127.3.2.1"));
  CHECK(address_is_local("::1"));
  CHECK(address_is_local("::ffff:127.0.0.1"));
  CHECK_FALSE(address_is_local("2001:db8::1"));  // documentation prefix
  CHECK_FALSE(address_is_local(""));
  CHECK_FALSE(address_is_local("not an address"));
  // This machine's own IPv4 addresses are local; documentation ones it does not have are not
  // (this VM's eth0 is 192.0.2.2).
  std::set<std::string> own;
  ifaddrs* list = nullptr;
  REQUIRE(getifaddrs(&list) == 0);
  for (ifaddrs* a = list; a; a = a->ifa_next) {
    if (!a->ifa_addr || a->ifa_addr->sa_family != AF_INET) continue;
    char buf[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, buf, sizeof buf);
    own.insert(buf);
  }
  freeifaddrs(list);
  for (const std::string& ip : own) {
    INFO(ip);
    CHECK(address_is_local(ip));
  }
  int remote = 0;
  for (const char* ip : {"192.0.2.1", "192.0.2.77", "198.51.100.7", "203.0.113.9"}) {
    if (own.count(ip)) continue;
    INFO(ip);
    CHECK_FALSE(address_is_local(ip));
    ++remote;
  }
  CHECK(remote >= 3);
}
