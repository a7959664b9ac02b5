// Peer-to-peer distribution on BitTorrent (libtorrent-rasterbar): hybrid
// (v1 + v2) torrents whose web seed (BEP 19) is the archive's HTTP URL, and a
// Source that downloads one from a swarm and emits each piece, in order, once
// libtorrent has verified it (SHA-256 merkle trees; SHA-1 for v1 peers).
// Built only with HUBFAST_SWARM_BUILD (the default); have_swarm() says so.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "hubfast/source.h"

namespace hubfast {

bool have_swarm();

struct Torrent {
  std::string data;          // the bencoded .torrent
  std::string info_hash_v1;  // hex, 40 digits
  std::string info_hash_v2;  // hex, 64 digits
  int piece_bytes = 0;
};

// The torrent of the file at `path` (hashed here: one read of the file).
// piece_bytes 0: a power of two from 256 KiB up, about 4096 pieces at most.
Torrent make_torrent(const std::string& path, const std::vector<std::string>& web_seeds,
                     const std::vector<std::string>& trackers, int piece_bytes = 0);

// Parses a .torrent (throws kIntegrity when it is not one); data is not kept.
Torrent parse_torrent(const std::string& data);

struct SwarmOptions {
  std::string torrent;                 // the bencoded .torrent
  std::vector<std::string> trackers;   // announce URLs added to the torrent's own
  std::vector<std::string> web_seeds;  // HTTP URLs of the archive added to the torrent's own
  std::string save_dir;                // where the archive is stored while it downloads
  std::string interface;               // address to listen on and connect from; "" any
  int listen_port = 0;                 // 0: any free port
  // Off by default: clusters are private, and these send multicast or gateway
  // traffic.
  bool dht = false, lsd = false, upnp = false, natpmp = false;
  bool require_encryption = false;     // refuse plain-text peer connections
  int urlseed_max_request_bytes = 256 << 10;  // smaller requests spread the web seed's load
  int upload_rate_limit = 0;           // bytes/s, 0: none
  double stall_timeout = 60;           // seconds without a verified piece: kTimeout
  // Web seeds join only after this many seconds without a verified piece, so
  // that hosts take from seeding peers first and the origin sends less.
  double web_seed_delay = 2;
};

std::unique_ptr<Source> make_swarm_source(const SwarmOptions& opt);

// Seeds complete archives to a swarm until destroyed (the mirror, `hubfast
// serve --seed`). Network options from SwarmOptions; torrent, save_dir and web
// seeds there are ignored.
class Seeder {
 public:
  explicit Seeder(const SwarmOptions& opt);
  ~Seeder();
  Seeder(const Seeder&) = delete;
  Seeder& operator=(const Seeder&) = delete;
  // `file` holds the torrent's one file, trusted (pieces are checked as they go
  // out). super_seeding (BEP 16): each peer is offered pieces no one else has,
  // so the seeder sends each piece about once and the peers spread it.
  void add(const std::string& torrent, const std::string& file, bool super_seeding);
  int64_t uploaded() const;  // payload bytes sent to peers so far
  int peers() const;         // peers connected now

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<std::string> trackers_;
};

}  // namespace hubfast
