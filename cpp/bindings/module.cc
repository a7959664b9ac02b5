// hubfast._core: converts types, releases the GIL around native work, polls
// for Ctrl-C and progress, and translates hubfast::Error once.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>

#include "hubfast/cache.h"
#include "hubfast/decode.h"
#include "hubfast/error.h"
#include "hubfast/extract.h"
#include "hubfast/fetch.h"
#include "hubfast/lock.h"
#include "hubfast/pipeline.h"
#include "hubfast/swarm.h"
#include "hubfast/tree.h"

namespace py = pybind11;
using namespace hubfast;

namespace {

const char* kind_name(ErrorKind k) {
  switch (k) {
    case ErrorKind::kNotFound: return "not_found";
    case ErrorKind::kNetwork: return "network";
    case ErrorKind::kHttp: return "http";
    case ErrorKind::kIntegrity: return "integrity";
    case ErrorKind::kUnsafeArchive: return "unsafe_archive";
    case ErrorKind::kLimit: return "limit";
    case ErrorKind::kDiskFull: return "disk_full";
    case ErrorKind::kAccessDenied: return "access_denied";
    case ErrorKind::kUnsafeCache: return "unsafe_cache";
    case ErrorKind::kTimeout: return "timeout";
    case ErrorKind::kLock: return "lock";
    case ErrorKind::kCancelled: return "cancelled";
    case ErrorKind::kInvalid: return "invalid";
    case ErrorKind::kIO: return "io";
  }
  return "io";
}

// A Python exception raised inside a poll (Ctrl-C, or the progress callback
// failing), held across the GIL-free section and re-raised after it.
class PendingPyError {
 public:
  void fetch() { PyErr_Fetch(&type_, &value_, &tb_); }
  bool has() const { return type_ != nullptr; }
  [[noreturn]] void restore() {
    PyErr_Restore(type_, value_, tb_);
    type_ = value_ = tb_ = nullptr;
    throw py::error_already_set();
  }

 private:
  PyObject *type_ = nullptr, *value_ = nullptr, *tb_ = nullptr;
};

template <class F>
auto run_released(const py::object& progress, F&& work) {
  PendingPyError pending;
  PollFn poll = [&](const Progress& p) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      pending.fetch();
      throw Error(ErrorKind::kCancelled, "interrupted");
    }
    if (!progress.is_none()) {
      if (PyObject* r = PyObject_CallFunction(progress.ptr(), "KLK", (unsigned long long)p.bytes_in,
                                              (long long)p.total_in, (unsigned long long)p.bytes_out)) {
        Py_DECREF(r);
      } else {
        pending.fetch();
        throw Error(ErrorKind::kCancelled, "progress callback failed");
      }
    }
  };
  try {
    py::gil_scoped_release nogil;
    return work(poll);
  } catch (const Error&) {
    if (pending.has()) pending.restore();
    throw;
  }
}

// An options dict read key by key: every key must be one the reader asked
// for, so a misspelt option fails instead of silently keeping the default.
class Options {
 public:
  Options(const py::dict& d, const char* what) : d_(d), what_(what) {}
  template <class T>
  Options& get(const char* key, T* out) {
    known_.push_back(key);
    if (d_.contains(key) && !d_[key].is_none()) *out = d_[key].cast<T>();
    return *this;
  }
  void reject_unknown() const {
    for (auto item : d_) {
      std::string k = py::str(item.first);
      if (std::find(known_.begin(), known_.end(), k) == known_.end()) {
        std::string all;
        for (const auto& n : known_) all += (all.empty() ? "" : ", ") + n;
        throw Error(ErrorKind::kInvalid, "unknown " + std::string(what_) + " option '" + k + "' (known: " + all + ")");
      }
    }
  }

 private:
  const py::dict& d_;
  const char* what_;
  std::vector<std::string> known_;
};

FetchOptions fetch_options(const std::string& url, const py::dict& d) {
  FetchOptions o;
  o.url = url;
  Options(d, "fetch")
      .get("headers", &o.headers)
      .get("ca_bundle", &o.ca_bundle)
      .get("verify_tls", &o.verify_tls)
      .get("proxy", &o.proxy)
      .get("no_proxy", &o.no_proxy)
      .get("connect_timeout", &o.connect_timeout)
      .get("low_speed_time", &o.low_speed_time)
      .get("low_speed_limit", &o.low_speed_limit)
      .get("max_redirects", &o.max_redirects)
      .get("max_retries", &o.max_retries)
      .get("backoff_base", &o.backoff_base)
      .get("backoff_max", &o.backoff_max)
      .get("connections", &o.connections)
      .get("adaptive_connections", &o.adaptive_connections)
      .get("min_parallel_bytes", &o.min_parallel_bytes)
      .get("verify_goog_hash", &o.verify_goog_hash)
      .get("user_agent", &o.user_agent)
      .get("growth_trace", &o.growth_trace)
      .reject_unknown();
  return o;
}

ExtractOptions extract_options(const py::dict& limits, const std::string& sha256, bool use_isal) {
  ExtractOptions o;
  Options(limits, "limits")
      .get("max_total_bytes", &o.limits.max_total_bytes)
      .get("max_members", &o.limits.max_members)
      .get("max_path", &o.limits.max_path)
      .get("max_pax_header", &o.limits.max_pax_header)
      .get("decode_threads", &o.decode.threads)
      .reject_unknown();
  o.expected_sha256 = sha256;
  o.decode.use_isal = use_isal;
  return o;
}

SwarmOptions swarm_options(const py::dict& d) {
  SwarmOptions o;
  Options(d, "swarm")
      .get("torrent", &o.torrent)  // bytes
      .get("trackers", &o.trackers)
      .get("web_seeds", &o.web_seeds)
      .get("save_dir", &o.save_dir)
      .get("interface", &o.interface)
      .get("listen_port", &o.listen_port)
      .get("dht", &o.dht)
      .get("lsd", &o.lsd)
      .get("upnp", &o.upnp)
      .get("natpmp", &o.natpmp)
      .get("require_encryption", &o.require_encryption)
      .get("urlseed_max_request_bytes", &o.urlseed_max_request_bytes)
      .get("upload_rate_limit", &o.upload_rate_limit)
      .get("stall_timeout", &o.stall_timeout)
      .get("web_seed_delay", &o.web_seed_delay)
      .reject_unknown();
  return o;
}

// The native defaults of the options that config.py's settings feed; config.py
// holds each setting's default and test_settings.py checks that these agree,
// so a call that leaves an option out behaves as the setting's default.
py::dict native_defaults() {
  FetchOptions f;
  ExtractOptions e;
  py::dict d;
  d["connections"] = f.connections;
  d["adaptive_connections"] = f.adaptive_connections;
  d["min_parallel_bytes"] = f.min_parallel_bytes;
  d["connect_timeout"] = f.connect_timeout;
  d["low_speed_time"] = f.low_speed_time;
  d["max_retries"] = f.max_retries;
  d["max_total_bytes"] = e.limits.max_total_bytes;
  d["max_members"] = e.limits.max_members;
  d["decode_threads"] = e.decode.threads;
  return d;
}

py::dict torrent_dict(const Torrent& t) {
  py::dict d;
  d["data"] = py::bytes(t.data);
  d["info_hash_v1"] = t.info_hash_v1;
  d["info_hash_v2"] = t.info_hash_v2;
  d["piece_bytes"] = t.piece_bytes;
  return d;
}

SourceFactory source_factory(const std::string& path, const std::string& url, const py::dict& fetch,
                             const py::dict& swarm = py::dict()) {
  if (!swarm.empty()) {
    SwarmOptions so = swarm_options(swarm);
    return [so](int) { return make_swarm_source(so); };
  }
  FetchOptions fo = fetch_options(url, fetch);  // checked for a path too
  if (!url.empty()) {
    return [fo](int restarts) {
      FetchOptions o = fo;
      if (restarts > 0) o.connections = 1;
      return make_http_source(o);
    };
  }
  if (path.empty()) throw Error(ErrorKind::kInvalid, "give either path= or url=");
  return [path](int) { return make_file_source(path); };
}

LockMode parse_lock_mode(const std::string& s) {
  if (s == "auto" || s.empty()) return LockMode::kAuto;
  if (s == "flock") return LockMode::kFlock;
  if (s == "heartbeat") return LockMode::kHeartbeat;
  throw Error(ErrorKind::kInvalid, "lock mode must be auto, flock or heartbeat, not '" + s + "'");
}

py::dict stats_dict(const ExtractStats& s) {
  py::dict d;
  d["compression"] = compression_name(s.compression);
  d["bytes_in"] = s.bytes_in;
  d["bytes_out"] = s.bytes_out;
  d["files"] = s.files;
  d["dirs"] = s.dirs;
  d["units"] = s.units;
  d["decode_threads"] = s.decode_threads;
  d["seconds"] = s.seconds;
  d["read_busy"] = s.read_busy;
  d["decode_busy"] = s.decode_busy;
  d["write_busy"] = s.write_busy;
  d["sha256"] = s.sha256;
  py::dict src;
  for (auto& [k, v] : s.source) src[py::str(k)] = v;
  d["source"] = src;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "hubfast's native core: fetch, decode, extract, cache";
  http_global_init();

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::object exc = py::module_::import("hubfast.errors")
                           .attr("_from_native")(kind_name(e.kind()), e.what(), e.code());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    }
  });

  m.def("have_isal", &have_isal, "Whether gzip is inflated with ISA-L.");
  m.attr("MAX_TREE_DEPTH") = py::int_(kMaxTreeDepth);  // directories an archive member may nest
  m.def("native_defaults", &native_defaults, "The options' native defaults that settings feed.");
  // Cache-protocol constants: every process sharing a cache must agree on them,
  // so they are not settings (docs/cache-protocol.md).
  m.attr("HEARTBEAT_STALE") = HeartbeatTiming{}.stale;
  m.attr("TFHUB_LOCK_STALE") = kTfhubLockStale;
  m.def(
      "detect_compression",
      [](py::bytes head) {
        std::string s = head;
        return compression_name(detect_compression(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
      },
      py::arg("head"));

  m.def(
      "extract",
      [](const std::string& dest, const std::string& path, const std::string& url, py::dict fetch,
         const std::string& sha256, py::dict limits, bool use_isal, py::object progress) {
        ExtractOptions opt = extract_options(limits, sha256, use_isal);
        SourceFactory make = source_factory(path, url, fetch);
        ExtractStats st = run_released(progress, [&](const PollFn& poll) {
          Fd dir(::open(dest.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
          if (!dir) throw_errno("cannot open target directory '" + dest + "'", errno);
          auto src = make(0);
          return extract(*src, dir.get(), opt, poll);
        });
        return stats_dict(st);
      },
      py::arg("dest"), py::kw_only(), py::arg("path") = "", py::arg("url") = "",
      py::arg("fetch") = py::dict(), py::arg("sha256") = "", py::arg("limits") = py::dict(),
      py::arg("use_isal") = true, py::arg("progress") = py::none(),
      "Extracts an archive (path= or url=) into the existing directory dest.");

  m.def(
      "ensure_entry",
      [](const std::string& root, const std::string& name, const std::string& handle,
         const std::string& path, const std::string& url, py::dict fetch, const std::string& sha256,
         py::dict limits, double lock_timeout, bool fsync, const std::string& lock_mode, py::object progress,
         py::dict swarm) {
        EntryRequest req;
        req.root = root;
        req.name = name;
        req.handle = handle;
        req.lock_timeout = lock_timeout;
        req.fsync = fsync;
        req.lock_mode = parse_lock_mode(lock_mode);
        req.extract = extract_options(limits, sha256, true);
        SourceFactory make = source_factory(path, url, fetch, swarm);
        EntryResult r = run_released(progress, [&](const PollFn& poll) { return ensure_entry(req, make, poll); });
        py::dict d;
        d["path"] = r.path;
        d["downloaded"] = r.downloaded;
        d["repaired"] = r.repaired;
        d["restarts"] = r.restarts;
        d["lock_wait"] = r.lock_wait;
        d["publish_seconds"] = r.publish_seconds;
        d["stats"] = r.downloaded ? py::object(stats_dict(r.stats)) : py::object(py::none());
        return d;
      },
      py::arg("root"), py::arg("name"), py::arg("handle"), py::kw_only(), py::arg("path") = "",
      py::arg("url") = "", py::arg("fetch") = py::dict(), py::arg("sha256") = "",
      py::arg("limits") = py::dict(), py::arg("lock_timeout"), py::arg("fsync"), py::arg("lock_mode"),
      py::arg("progress") = py::none(), py::arg("swarm") = py::dict(),
      "Returns the cache entry <root>/<name>, extracting it first when needed; swarm= (options "
      "with a torrent) downloads it from a BitTorrent swarm instead of url=.");

  m.def("have_swarm", &have_swarm, "Whether this build can download from BitTorrent swarms.");
  m.def(
      "make_torrent",
      [](const std::string& path, const std::vector<std::string>& web_seeds,
         const std::vector<std::string>& trackers, int piece_bytes) {
        Torrent t;
        {
          py::gil_scoped_release nogil;
          t = make_torrent(path, web_seeds, trackers, piece_bytes);
        }
        return torrent_dict(t);
      },
      py::arg("path"), py::kw_only(), py::arg("web_seeds") = std::vector<std::string>(),
      py::arg("trackers") = std::vector<std::string>(), py::arg("piece_bytes") = 0,
      "A hybrid (v1+v2) torrent of one file: {data, info_hash_v1, info_hash_v2, piece_bytes}.");
  py::class_<Seeder>(m, "Seeder", "Seeds complete archives to their swarms until closed.")
      .def(py::init([](py::dict options) { return std::make_unique<Seeder>(swarm_options(options)); }),
           py::arg("options"))
      .def("add", &Seeder::add, py::arg("torrent"), py::arg("file"), py::arg("super_seeding") = true,
           py::call_guard<py::gil_scoped_release>())
      .def("uploaded", &Seeder::uploaded)
      .def("peers", &Seeder::peers);
  m.def(
      "parse_torrent", [](py::bytes data) { return torrent_dict(parse_torrent(std::string(data))); },
      py::arg("data"), "Checks a .torrent: {data, info_hash_v1, info_hash_v2, piece_bytes}.");

  m.def(
      "lookup_entry",
      [](const std::string& root, const std::string& name, const std::string& sha256) {
        Lookup l = lookup_entry(root, name, sha256);
        return py::make_tuple(entry_state_name(l.state), l.path, l.reason);
      },
      py::arg("root"), py::arg("name"), py::arg("sha256") = "",
      "Warm lookup: (state, path, reason); with sha256, an entry whose manifest records another "
      "archive digest, or none, is 'unpinned'.");

  m.def(
      "verify_entry",
      [](const std::string& root, const std::string& name, bool deep) {
        py::gil_scoped_release nogil;
        return verify_entry(root, name, deep);
      },
      py::arg("root"), py::arg("name"), py::arg("deep") = false,
      "Problems found in an entry (empty list: fine): sizes, and with deep=True CRC32s.");
  m.def(
      "tree_size",
      [](const std::string& path) {
        py::gil_scoped_release nogil;
        Fd dir(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!dir) return uint64_t(0);  // gone, or not a directory
        uint64_t total = 0;
        for (auto& f : list_tree(dir.get())) total += f.size;
        return total;
      },
      py::arg("path"), "Bytes in the regular files beneath `path` (no links followed).");
  m.def(
      "remove_tree",
      [](const std::string& path) {
        py::gil_scoped_release nogil;
        size_t slash = path.rfind('/');
        std::string parent = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
        Fd pfd(::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (!pfd) throw_errno("cannot open '" + parent + "'", errno);
        remove_tree_at(pfd.get(), path.substr(slash + 1));
      },
      py::arg("path"), "Removes `path` and the tree beneath it, following no link.");
  m.def("lock_path", &lock_path, py::arg("root"), py::arg("name"));
  m.def("use_lock_path", &use_lock_path, py::arg("root"), py::arg("name"));
  m.def("manifest_path", &manifest_path, py::arg("root"), py::arg("name"));
  m.def(
      "lock_mode_for", [](const std::string& dir) { return lock_mode_name(detect_lock_mode(dir)); },
      py::arg("dir"), "The lock mode 'auto' picks for a directory: flock or heartbeat.");

  py::class_<FileLock>(m, "FileLock", "A flock on a lock file that is never deleted.")
      .def_static(
          "acquire",
          [](const std::string& path, bool exclusive, double timeout) {
            return run_released(py::none(), [&](const PollFn& poll) {
              WaitPoll wait_poll = [&] { poll(Progress{}); };
              return FileLock::acquire(path, exclusive, timeout, wait_poll);
            });
          },
          py::arg("path"), py::arg("exclusive") = true, py::arg("timeout") = -1.0)
      .def_static("try_acquire", &FileLock::try_acquire, py::arg("path"), py::arg("exclusive") = true)
      .def_property_readonly("held", &FileLock::held)
      .def("release", &FileLock::release)
      .def("__enter__", [](FileLock& l) -> FileLock& { return l; }, py::return_value_policy::reference)
      .def("__exit__", [](FileLock& l, py::args) { l.release(); });
}
