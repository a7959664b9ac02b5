// Cache entries: lookup by manifest, cross-process locks, atomic publish.
// An entry <root>/<name>/ appears only by rename of a finished temp
// directory <root>/<name>.hf<hex>.tmp after every byte was verified; its
// manifest <root>/<name>.hubfast is tied to that directory by inode.
// The protocol (files, manifest format, locks, temp names, repair) is written
// once in docs/cache-protocol.md: change it there first.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "hubfast/fd.h"
#include "hubfast/lock.h"
#include "hubfast/pipeline.h"
#include "hubfast/tfhub_lock.h"

namespace hubfast {

// kUnpinned: complete or foreign, but its manifest records no archive sha256, or
// another one than the pin asked for: it satisfies no pin.
enum class EntryState { kMissing, kComplete, kForeign, kBroken, kUnpinned };
const char* entry_state_name(EntryState s);

struct Lookup {
  EntryState state = EntryState::kMissing;
  std::string path;     // <root>/<name>
  std::string reason;   // for kBroken and kUnpinned: what was wrong
  std::string sha256;   // the archive's sha256 its manifest records ("" when none)
};

// Warm lookup: stat calls only. kForeign: a non-empty directory without a
// matching manifest (tensorflow_hub wrote it): usable as it is.
// With a `pin` (sha256 hex), an entry whose manifest does not record that digest
// is kUnpinned.
Lookup lookup_entry(const std::string& root, const std::string& name, const std::string& pin = "");

struct EntryRequest {
  std::string root, name, handle;
  double lock_timeout = -1;
  bool fsync = false;
  LockMode lock_mode = LockMode::kAuto;
  HeartbeatTiming heartbeat;
  double tfhub_stale = kTfhubLockStale;
  ExtractOptions extract;
};

struct EntryResult {
  std::string path;
  bool downloaded = false;   // this call extracted the archive
  bool repaired = false;     // a broken entry was replaced
  int restarts = 0;          // downloads started again from byte 0 (the object changed)
  double lock_wait = 0, publish_seconds = 0;
  ExtractStats stats;
};

// Makes the archive's source; `restarts`: how often the download started again because the
// object changed under it (then an HTTP source uses one connection: a server that ignores
// Range would change every parallel part into a restart).
using SourceFactory = std::function<std::unique_ptr<Source>(int restarts)>;

// Returns the complete entry, extracting it from a source made by
// `make_source` when needed. `poll` runs on the calling thread about every
// 100 ms (progress, Ctrl-C).
EntryResult ensure_entry(const EntryRequest& req, const SourceFactory& make_source,
                         const PollFn& poll);

// Rechecks an entry: sizes against the manifest, and with `deep` every
// file's CRC32. Returns what is wrong (empty: fine, or not hubfast's).
std::vector<std::string> verify_entry(const std::string& root, const std::string& name, bool deep);

// The manifest path of an entry and the lock file guarding its writers.
std::string manifest_path(const std::string& root, const std::string& name);
std::string lock_path(const std::string& root, const std::string& name);
// Readers (load) hold this shared; whoever deletes an entry's files takes it
// exclusively and without waiting, skipping the entry when it is in use.
std::string use_lock_path(const std::string& root, const std::string& name);

}  // namespace hubfast
