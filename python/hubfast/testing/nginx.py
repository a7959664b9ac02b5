"""The README's caching-proxy recipe ("Fleet behind a caching proxy") as a runnable nginx
config: Debian's nginx in the foreground with its own prefix, for the fleet tests and the
cluster benchmark."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

# The documented configuration, with the paths, address and origin filled in.
NGINX_CONF = """\
daemon off;
{user}
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=models:10m
                     max_size=50g inactive=30d use_temp_path=off;
    server {{
        listen {listen};
        location / {{
            proxy_pass {origin};
            proxy_cache models;
            # $request_uri keeps the query: ?tf-hub-format=compressed (the archive) and
            # the bare URL (an HTML page) must be different cache entries.
            proxy_cache_key $scheme$proxy_host$request_uri;
            proxy_cache_valid 200 30d;
            # One request goes to the origin; the others wait for the cache to fill.
            proxy_cache_lock on;
            proxy_cache_lock_timeout 1h;
            proxy_cache_lock_age 1h;
            proxy_cache_use_stale error timeout updating;
            # Ranged requests (parallel connections) are answered from the cache.
            proxy_force_ranges on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
}}
"""


def nginx_binary() -> Optional[str]:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                     else None)


def write_conf(prefix: Path, listen: str, origin: str) -> Path:
    """Writes ``prefix/nginx.conf`` (and the directories it names); returns its path."""
    for d in ("tmp", "cache", "logs"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the prefix
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, listen=listen, origin=origin, user=user))
    return conf
