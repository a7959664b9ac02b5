// Built instead of swarm.cc when HUBFAST_SWARM_BUILD is OFF (the fuzz and
// TSan builds, which need no libtorrent): every entry point says so.
#include "hubfast/error.h"
#include "hubfast/swarm.h"

namespace hubfast {
namespace {
[[noreturn]] void off() {
  throw Error(ErrorKind::kInvalid, "this build of hubfast has no swarm support (libtorrent)");
}
}  // namespace

bool have_swarm() { return false; }
Torrent make_torrent(const std::string&, const std::vector<std::string>&,
                     const std::vector<std::string>&, int) { off(); }
Torrent parse_torrent(const std::string&) { off(); }
std::unique_ptr<Source> make_swarm_source(const SwarmOptions&) { off(); }

struct Seeder::Impl {};
Seeder::Seeder(const SwarmOptions&) { off(); }
Seeder::~Seeder() = default;
void Seeder::add(const std::string&, const std::string&, bool) { off(); }
int64_t Seeder::uploaded() const { return 0; }
int Seeder::peers() const { return 0; }

}  // namespace hubfast
