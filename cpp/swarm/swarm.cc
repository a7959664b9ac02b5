// libtorrent-rasterbar behind hubfast's Source interface; see swarm.h.
#include "hubfast/swarm.h"

#include <chrono>
#include <map>
#include <iterator>
#include <libtorrent/add_torrent_params.hpp>
#include <libtorrent/alert_types.hpp>
#include <libtorrent/create_torrent.hpp>
#include <libtorrent/ip_filter.hpp>
#include <libtorrent/session.hpp>
#include <libtorrent/session_params.hpp>
#include <libtorrent/settings_pack.hpp>
#include <libtorrent/torrent_handle.hpp>
#include <libtorrent/torrent_info.hpp>
#include <libtorrent/torrent_status.hpp>
#include <sstream>

#include "hubfast/error.h"

namespace hubfast {
namespace {

template <class H>
std::string hex(const H& h) {
  std::ostringstream s;
  s << h;
  return s.str();
}

Torrent describe(const lt::torrent_info& ti, std::string data) {
  Torrent t;
  t.data = std::move(data);
  const lt::info_hash_t& ih = ti.info_hashes();
  if (ih.has_v1()) t.info_hash_v1 = hex(ih.v1);
  if (ih.has_v2()) t.info_hash_v2 = hex(ih.v2);
  t.piece_bytes = ti.piece_length();
  return t;
}

std::shared_ptr<lt::torrent_info> load(const std::string& data) {
  lt::error_code ec;
  auto ti = std::make_shared<lt::torrent_info>(lt::span<const char>(data.data(), data.size()), ec,
                                               lt::from_span);
  if (ec) throw Error(ErrorKind::kIntegrity, "not a valid .torrent: " + ec.message());
  if (ti->num_files() != 1)
    throw Error(ErrorKind::kIntegrity, "the torrent must hold exactly one file (the archive)");
  return ti;
}

int auto_piece_bytes(int64_t size) {
  int p = 256 << 10;
  while (p < (16 << 20) && size / p > 4096) p *= 2;
  return p;
}

// One session for a download or a seeder: bound where asked, discovery off
// unless asked, limits that apply to local peers too.
std::unique_ptr<lt::session> open_session(const SwarmOptions& opt) {
  lt::settings_pack sp;
  std::string iface = opt.interface.empty() ? "0.0.0.0" : opt.interface;
  sp.set_str(lt::settings_pack::listen_interfaces, iface + ":" + std::to_string(opt.listen_port));
  // Bound to one address, outgoing connections must use it too.
  if (!opt.interface.empty()) sp.set_str(lt::settings_pack::outgoing_interfaces, opt.interface);
  sp.set_bool(lt::settings_pack::enable_dht, opt.dht);
  sp.set_bool(lt::settings_pack::enable_lsd, opt.lsd);
  sp.set_bool(lt::settings_pack::enable_upnp, opt.upnp);
  sp.set_bool(lt::settings_pack::enable_natpmp, opt.natpmp);
  if (opt.require_encryption) {
    sp.set_int(lt::settings_pack::out_enc_policy, lt::settings_pack::pe_forced);
    sp.set_int(lt::settings_pack::in_enc_policy, lt::settings_pack::pe_forced);
  }
  sp.set_int(lt::settings_pack::urlseed_max_request_bytes, opt.urlseed_max_request_bytes);
  sp.set_int(lt::settings_pack::upload_rate_limit, opt.upload_rate_limit);
  sp.set_bool(lt::settings_pack::allow_multiple_connections_per_ip, true);
  // TCP only: uTP's delay-based congestion control yields to any queue on the
  // link (a cluster's links are the bottleneck it would back off from), and it
  // costs CPU in user space.
  sp.set_bool(lt::settings_pack::enable_outgoing_utp, false);
  sp.set_bool(lt::settings_pack::enable_incoming_utp, false);
  sp.set_int(lt::settings_pack::stop_tracker_timeout, 1);
  // The mitigation refuses web seeds with a query on private addresses: a TF Hub
  // archive URL (?tf-hub-format=compressed) on a cluster's mirror is exactly that.
  // Web seeds come from the caller and the torrent's publisher, the archive's server.
  sp.set_bool(lt::settings_pack::ssrf_mitigation, false);
  sp.set_int(lt::settings_pack::alert_mask, lt::alert_category::status | lt::alert_category::error |
                                                lt::alert_category::peer | lt::alert_category::tracker |
                                                lt::alert_category::piece_progress);
  sp.set_str(lt::settings_pack::user_agent, "hubfast");
  auto ses = std::make_unique<lt::session>(lt::session_params(std::move(sp)));
  if (opt.upload_rate_limit > 0) {
    // libtorrent exempts peers on local networks from rate limits; a cluster's
    // hosts are all local, so every address goes to the global (limited) class.
    lt::ip_filter f;
    std::uint32_t global = 1u << static_cast<std::uint32_t>(lt::session::global_peer_class_id);
    f.add_rule(lt::make_address("0.0.0.0"), lt::make_address("255.255.255.255"), global);
    f.add_rule(lt::make_address("::"), lt::make_address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
               global);
    ses->set_peer_class_filter(f);
  }
  return ses;
}

class SwarmSource : public Source {
 public:
  explicit SwarmSource(const SwarmOptions& opt) : opt_(opt), ti_(load(opt.torrent)) {
    // The web seeds join later (web_seed_delay): taken out of the torrent here.
    for (auto& w : ti_->web_seeds()) web_seeds_.push_back(w.url);
    for (auto& w : opt_.web_seeds) web_seeds_.push_back(w);
    ti_->set_web_seeds({});
  }

  int64_t expected_size() const override { return ti_->total_size(); }
  std::string describe() const override { return "swarm " + hex(ti_->info_hashes().get_best()); }
  void add_stats(std::function<void(const char*, double)> put) const override {
    put("swarm_pieces", pieces_);
    put("swarm_peer_bytes", double(peer_bytes_));
    put("swarm_web_seed_bytes", double(web_bytes_));
    put("swarm_hash_failures", hash_failures_);
    put("swarm_banned_peers", bans_);
  }

  void run(const EmitFn& emit, const CancelToken& cancel) override {
    std::unique_ptr<lt::session> ses = open_session(opt_);

    lt::add_torrent_params atp;
    atp.ti = ti_;
    atp.save_path = opt_.save_dir;
    // Rarest first, not sequential: hosts that all asked for piece 0 first would
    // make the origin send it to each. Pieces are emitted in order regardless.
    atp.flags &= ~lt::torrent_flags::auto_managed;
    atp.flags &= ~lt::torrent_flags::paused;
    for (auto& t : opt_.trackers) atp.trackers.push_back(t);
    lt::error_code ec;
    lt::torrent_handle h = ses->add_torrent(std::move(atp), ec);
    if (ec) throw Error(ErrorKind::kIO, "cannot start the swarm download: " + ec.message());

    // libtorrent 2.0 may hold a verified piece in its store buffer before it
    // reaches the file, so pieces are read back through read_piece(): a window
    // of them at a time, emitted in order.
    const int n = ti_->num_pieces();
    constexpr int kWindow = 32;
    std::vector<char> have(size_t(n), 0), asked(size_t(n), 0);
    std::map<int, std::pair<boost::shared_array<char>, int>> ready;
    int next = 0;
    auto last = std::chrono::steady_clock::now();
    bool web_added = false;
    std::vector<lt::alert*> alerts;
    while (next < n) {
      cancel.throw_if_cancelled();
      if (!web_added && std::chrono::steady_clock::now() - last >
                            std::chrono::duration<double>(opt_.web_seed_delay)) {
        for (auto& w : web_seeds_) h.add_url_seed(w);
        web_added = true;
      }
      ses->wait_for_alert(std::chrono::milliseconds(100));
      ses->pop_alerts(&alerts);
      for (lt::alert* a : alerts) {
        if (auto* p = lt::alert_cast<lt::piece_finished_alert>(a)) {
          have[size_t(static_cast<int>(p->piece_index))] = 1;
        } else if (auto* r = lt::alert_cast<lt::read_piece_alert>(a)) {
          if (r->error) throw Error(ErrorKind::kIO, "cannot read a verified piece back: " + r->error.message());
          ready[static_cast<int>(r->piece)] = {r->buffer, r->size};
        } else if (lt::alert_cast<lt::hash_failed_alert>(a)) {
          ++hash_failures_;
        } else if (lt::alert_cast<lt::peer_ban_alert>(a)) {
          ++bans_;
        } else if (auto* e = lt::alert_cast<lt::torrent_error_alert>(a)) {
          throw Error(ErrorKind::kIO, "swarm download failed: " + e->error.message() + " (" +
                                          e->filename() + ")");
        } else if (auto* e = lt::alert_cast<lt::file_error_alert>(a)) {
          throw Error(ErrorKind::kIO, "swarm download failed: " + e->error.message() + " (" +
                                          e->filename() + ")");
        }
      }
      for (int i = next; i < std::min(n, next + kWindow); ++i) {
        if (have[size_t(i)] && !asked[size_t(i)]) {
          asked[size_t(i)] = 1;
          h.read_piece(lt::piece_index_t(i));
        }
      }
      for (auto it = ready.find(next); it != ready.end(); it = ready.find(next)) {
        emit(reinterpret_cast<const uint8_t*>(it->second.first.get()), size_t(it->second.second));
        ready.erase(it);
        ++next;
        ++pieces_;
        last = std::chrono::steady_clock::now();
      }
      if (std::chrono::steady_clock::now() - last > std::chrono::duration<double>(opt_.stall_timeout))
        throw Error(ErrorKind::kTimeout, "swarm download stalled: no verified piece for " +
                                             std::to_string(int(opt_.stall_timeout)) + " s");
    }
    // Bytes by source: v2 torrents raise no per-block alerts, so count per peer.
    std::vector<lt::peer_info> peers;
    h.get_peer_info(peers);
    for (auto& p : peers) {
      if (p.connection_type == lt::peer_info::web_seed || p.connection_type == lt::peer_info::http_seed)
        web_bytes_ += p.total_download;
      else
        peer_bytes_ += p.total_download;
    }
  }

 private:
  SwarmOptions opt_;
  std::shared_ptr<lt::torrent_info> ti_;
  std::vector<std::string> web_seeds_;
  double pieces_ = 0, hash_failures_ = 0, bans_ = 0;
  int64_t peer_bytes_ = 0, web_bytes_ = 0;
};

}  // namespace

bool have_swarm() { return true; }

Torrent make_torrent(const std::string& path, const std::vector<std::string>& web_seeds,
                     const std::vector<std::string>& trackers, int piece_bytes) {
  lt::file_storage fs;
  lt::error_code ec;
  lt::add_files(fs, path);
  if (fs.num_files() != 1) throw Error(ErrorKind::kNotFound, "not a regular file: '" + path + "'");
  lt::create_torrent ct(fs, piece_bytes > 0 ? piece_bytes : auto_piece_bytes(fs.total_size()));
  for (auto& w : web_seeds) ct.add_url_seed(w);
  int tier = 0;
  for (auto& t : trackers) ct.add_tracker(t, tier++);
  ct.set_creator("hubfast");
  std::string parent = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
  if (parent.empty()) parent = "/";
  lt::set_piece_hashes(ct, parent, ec);
  if (ec) throw Error(ErrorKind::kIO, "cannot hash '" + path + "': " + ec.message());
  std::string data;
  lt::bencode(std::back_inserter(data), ct.generate());
  auto ti = load(data);  // before data is moved into the result
  return describe(*ti, std::move(data));
}

Torrent parse_torrent(const std::string& data) { return describe(*load(data), data); }

std::unique_ptr<Source> make_swarm_source(const SwarmOptions& opt) {
  return std::make_unique<SwarmSource>(opt);
}

struct Seeder::Impl {
  std::unique_ptr<lt::session> ses;
  std::vector<lt::torrent_handle> torrents;
};

Seeder::Seeder(const SwarmOptions& opt) : impl_(std::make_unique<Impl>()) {
  impl_->ses = open_session(opt);
  trackers_ = opt.trackers;
}

Seeder::~Seeder() = default;

void Seeder::add(const std::string& torrent, const std::string& file, bool super_seeding) {
  lt::add_torrent_params atp;
  atp.ti = load(torrent);
  std::string name = atp.ti->files().file_path(lt::file_index_t(0));
  size_t slash = file.rfind('/');
  atp.save_path = slash == std::string::npos ? "." : file.substr(0, slash);
  if (file.substr(slash == std::string::npos ? 0 : slash + 1) != name)
    atp.renamed_files[lt::file_index_t(0)] = file.substr(slash == std::string::npos ? 0 : slash + 1);
  atp.ti->set_web_seeds({});  // a seeder has every piece
  atp.flags |= lt::torrent_flags::seed_mode;
  if (super_seeding) atp.flags |= lt::torrent_flags::super_seeding;
  atp.flags &= ~(lt::torrent_flags::auto_managed | lt::torrent_flags::paused);
  for (auto& t : trackers_) atp.trackers.push_back(t);
  lt::error_code ec;
  lt::torrent_handle h = impl_->ses->add_torrent(std::move(atp), ec);
  if (ec) throw Error(ErrorKind::kIO, "cannot seed '" + file + "': " + ec.message());
  impl_->torrents.push_back(h);
}

int64_t Seeder::uploaded() const {
  int64_t n = 0;
  for (auto& h : impl_->torrents) n += h.status().total_payload_upload;
  return n;
}

int Seeder::peers() const {
  int n = 0;
  for (auto& h : impl_->torrents) n += h.status().num_peers;
  return n;
}

}  // namespace hubfast
