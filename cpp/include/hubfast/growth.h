// When a parallel download opens more connections: the policy on its own,
// fed cumulative readings, so that it is tested with synthetic ones.
#pragma once

#include <cstdint>

namespace hubfast {

// Cumulative readings taken by the consuming thread; the policy compares
// them across windows.
struct GrowthSample {
  double t = 0;        // seconds on a monotonic clock
  uint64_t bytes = 0;  // body bytes received by all connections
  double waited = 0;   // seconds the consumer has spent waiting for bytes
  double cpu = 0;      // CPU seconds used by this process
  double busy = 0;     // the machine's non-idle CPU seconds (0 with `all` when unknown)
  double all = 0;      // the machine's CPU seconds
  double stolen = 0;   // CPU seconds the hypervisor took from this VM (steal, all CPUs)
};

// Fills cpu, busy, all and stolen from the process's clock and /proc/stat.
void read_cpu(GrowthSample& s);

// CPUs this process may use: its affinity mask, bounded by a cgroup v2 quota.
double usable_cores();

// Doubles the connections whenever the consumer spent more than half of two
// windows in a row waiting for bytes, or nine tenths of one. A single window
// counts only on a link slower than kSlowLink: on any link a decoder waits
// through its first window, for a whole zstd frame or the two gzip segments
// it starts from, and that wait says nothing about the link. So a slow link
// reaches the full count in a few steps, while a fast one, whose consumer
// waits only briefly between chunks, stays on the connections it has.
//
// A consumer also waits when the machine's cores are all busy (decoding,
// writing, the receive path itself): more connections then bring no more
// bytes, only more threads and copies. So the first doubling waits while
// this process uses kBusyProcess of the cores, and each further one is
// measured: once every connection has received kSettleBytes (a new one's
// handshake and slow start are not counted against it), a starved window's
// rate is compared with the rate that led to the last doubling; a doubling
// that brought kLinear times the bytes or more (a per-connection limit) is
// followed by a quadrupling. Growth stops when the gain is under kGain *and*
// the CPUs were busy; with idle CPUs a small gain is a link still ramping up
// (TCP slow start on a long round trip), so growth goes on.
//
// A first stream faster than kSlowLink whose consumer waits may wait for a
// CPU rather than the link: its first doubling also needs kCpuSpan of CPU
// readings showing this process below kBusyProcess, and, when the server
// runs on this machine (set_local_server: loopback, an own address, a local
// proxy), the machine below kBusyMachine, as the server's sends take the
// same cores. A single window is a few /proc/stat ticks, too coarse to judge
// alone.
//
// On a VM, time the hypervisor takes from this guest (steal) is neither a
// wait for the link nor idle CPU: the receiving thread did not run. The
// steal of all CPUs (the stolen one may be the receiver's; /proc/stat does
// not say) is taken off both the window's wait and its wall time.
class GrowthPolicy {
 public:
  static constexpr double kWindow = 0.020;         // seconds
  static constexpr uint64_t kSettleBytes = 256 * 1024;
  static constexpr double kGain = 1.25;            // a doubling must bring this much
  static constexpr double kLinear = 1.8;           // ... and this much makes the next step x4
  static constexpr double kSlowLink = 100e6;       // bytes/s: slower than any decoder's input
  static constexpr double kBusyProcess = 0.6;      // of the usable cores
  static constexpr double kBusyMachine = 0.85;     // of all CPUs
  static constexpr double kCpuSpan = 0.1;          // seconds of CPU readings that judge a fast stream

  explicit GrowthPolicy(double cores) : cores_(cores > 0 ? cores : 1) {}

  // The first response: windows start here (time to the first byte is
  // latency, not a slow link).
  void begin(const GrowthSample& s) {
    window_ = decided_ = span_ = span_next_ = s;
    first_window_ = true;
  }

  // Whether the server (or proxy) runs on this machine: its sends then take
  // the cores the decoder needs, and a fast stream grows only with CPUs left.
  void set_local_server(bool local) { local_server_ = local; }

  // The connection limit; a limit frozen by the rate check stays frozen.
  void allow(int max_workers) { max_ = frozen_ && max_workers > max_ ? max_ : max_workers; }
  int limit() const { return max_; }
  bool frozen() const { return frozen_; }

  // Whether step() at time t may decide (and so needs the CPU readings).
  bool due(double t) const { return !settling_ && t - window_.t >= kWindow; }

  // Connections to add now (0: none). `workers` run now; `settled` of them
  // have received kSettleBytes; `others` connections run besides them (the
  // first stream's), not counted in the limit but in the doubling.
  int step(const GrowthSample& s, int workers, int settled, int others = 0);

 private:
  bool process_bound(const GrowthSample& from, const GrowthSample& to) const;
  bool cpu_bound(const GrowthSample& from, const GrowthSample& to) const;

  double cores_;
  int max_ = 0;
  bool frozen_ = false;
  bool local_server_ = false;
  bool settling_ = false;  // a doubling's connections have not all settled
  int starved_ = 0;        // starved windows in a row (a famished one counts two)
  bool first_window_ = false;  // the window after begin(): the pipeline still filling
  double rate_at_growth_ = 0;  // bytes/s of the run that led to the last doubling
  GrowthSample window_;    // where the current window began
  GrowthSample run_;       // where the current run of starved windows began
  GrowthSample decided_;   // the last doubling
  GrowthSample span_, span_next_;  // samples kCpuSpan apart: span_ is 1-2 spans old
};

}  // namespace hubfast
