#include "hubfast/growth.h"

#include <fcntl.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace hubfast {

namespace {

// Reads the start of a small file (procfs, cgroupfs) into buf, NUL-terminated.
bool read_head(const char* path, char* buf, size_t size) {
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ssize_t n = ::read(fd, buf, size - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  return true;
}

// Seconds stolen between two samples, when both carry CPU readings.
double stolen_between(const GrowthSample& from, const GrowthSample& to) {
  return from.all > 0 && to.all > 0 ? std::max(0.0, to.stolen - from.stolen) : 0.0;
}

}  // namespace

void read_cpu(GrowthSample& s) {
  timespec ts{};
  if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) == 0) s.cpu = double(ts.tv_sec) + ts.tv_nsec * 1e-9;
  s.busy = s.all = 0;
  char buf[256];
  if (!read_head("/proc/stat", buf, sizeof buf)) return;
  unsigned long long v[8] = {};  // user nice system idle iowait irq softirq steal
  if (std::sscanf(buf, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                  &v[6], &v[7]) < 4)
    return;
  static const double tick = 1.0 / double(std::max(1L, sysconf(_SC_CLK_TCK)));
  // Steal is a CPU the hypervisor gave to someone else: not ours to use.
  double busy = double(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) * tick;
  s.busy = busy;
  s.all = busy + double(v[3] + v[4]) * tick;
  s.stolen = double(v[7]) * tick;
}

double usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  double cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  char buf[128];
  long long quota = 0, period = 0;
  if (read_head("/sys/fs/cgroup/cpu.max", buf, sizeof buf) && std::sscanf(buf, "%lld %lld", &quota, &period) == 2 &&
      quota > 0 && period > 0)
    cores = std::min(cores, double(quota) / double(period));
  return std::max(cores, 1.0);
}

bool GrowthPolicy::process_bound(const GrowthSample& from, const GrowthSample& to) const {
  // All of it stolen: nothing to judge by, and no reason to grow.
  double wall = to.t - from.t - stolen_between(from, to);
  return wall <= 0 || to.cpu - from.cpu >= kBusyProcess * cores_ * wall;
}

bool GrowthPolicy::cpu_bound(const GrowthSample& from, const GrowthSample& to) const {
  if (process_bound(from, to)) return true;
  double all = to.all - from.all;
  return all > 0 && to.busy - from.busy >= kBusyMachine * all;
}

int GrowthPolicy::step(const GrowthSample& s, int workers, int settled, int others) {
  if (workers >= max_) return 0;
  if (settling_) {  // after a doubling: a new window once every connection has settled
    if (settled < workers) return 0;
    settling_ = false;
    window_ = s;
    return 0;
  }
  double wall = s.t - window_.t;
  if (wall < kWindow) return 0;
  if (s.t - span_next_.t >= kCpuSpan) {  // a window's end: s carries CPU readings
    span_ = span_next_;
    span_next_ = s;
  }
  const double stolen = stolen_between(window_, s);
  wall -= stolen;
  double waited = s.waited - window_.waited - stolen;
  bool starved = waited * 2 > wall;
  // Waiting nine tenths of a window is no blip: it counts for two.
  // The first window decides alone only on a link slower than any decoder
  // (kSlowLink): a faster first stream may just be filling the pipeline.
  bool famished = waited * 10 > wall * 9 &&
                  (!first_window_ || double(s.bytes - window_.bytes) < kSlowLink * (s.t - window_.t));
  first_window_ = false;
  if (!starved) {
    starved_ = 0;
    window_ = s;
    return 0;
  }
  if (starved_ == 0) run_ = window_;
  starved_ += famished ? 2 : 1;
  window_ = s;
  // Once the link has shown itself slow, the rate check guards each further
  // doubling: one starved window is enough.
  if (starved_ < (rate_at_growth_ > 0 ? 1 : 2)) return 0;
  starved_ = 0;
  // Before the first doubling: a consumer that waits while this process
  // keeps the cores busy waits for CPU (the receive path, decoding threads
  // behind the waiting one), not for the link. The run's samples all carry
  // CPU readings (no settling came before).
  double rate = double(s.bytes - run_.bytes) / (s.t - run_.t);
  if (rate_at_growth_ == 0) {
    if (process_bound(run_, s)) return 0;
    // A fast stream may wait for a CPU, its server's too when that runs
    // here (see the header): judged over kCpuSpan, not one window.
    if (rate >= kSlowLink &&
        (s.t - span_.t < kCpuSpan || (local_server_ ? cpu_bound(span_, s) : process_bound(span_, s))))
      return 0;
  }
  // The CPUs are judged over all the time since the last doubling: a window
  // alone is a few scheduler ticks of /proc/stat.
  if (rate_at_growth_ > 0 && rate < rate_at_growth_ * kGain && cpu_bound(decided_, s)) {
    max_ = workers;  // the last doubling brought no more bytes
    frozen_ = true;
    return 0;
  }
  // A doubling that brought about twice the bytes shows a per-connection
  // limit (a cap, a long round trip): the next step quadruples. Under a
  // 50 MB/s cap, 8 connections at ~70 ms instead of ~100 ms.
  const bool linear = rate_at_growth_ > 0 && rate >= rate_at_growth_ * kLinear;
  rate_at_growth_ = rate;
  decided_ = s;
  settling_ = true;
  return std::min(max_ - workers, std::max(1, (workers + others) * (linear ? 3 : 1)));
}

}  // namespace hubfast
