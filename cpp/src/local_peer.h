// Whether an HTTP peer runs on this machine, so that its work (a server's
// sends, a proxy's relaying) takes the same cores as ours.
#pragma once
#include <string>

namespace hubfast::http {

// `ip` as libcurl reports it (CURLINFO_PRIMARY_IP): loopback, or an address
// of one of this machine's interfaces. An unparsable address is not local.
bool address_is_local(const std::string& ip);

}  // namespace hubfast::http
