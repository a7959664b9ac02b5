"""Kaggle model handles and credentials.

``https://www.kaggle.com/models/<owner>/<model>/<framework>/<variation>/<version>``
is a plain HTTP handle to tensorflow_hub (``?tf-hub-format=compressed``
appended); tfhub.dev handles redirect there. What hubfast adds: the account's
credentials, from ``KAGGLE_USERNAME``/``KAGGLE_KEY`` or ``kaggle.json`` (in
``$KAGGLE_CONFIG_DIR``, else ``~/.kaggle``, else ``~/.config/kaggle``), sent as
HTTP Basic auth to Kaggle's host (or ``HUBFAST_ENDPOINT_KAGGLE``) only: never
to another host, a mirror, or the host a redirect leads to.
"""
from __future__ import annotations

import base64
import json
import logging
import os
from typing import List, Optional, Tuple

from . import config, mirrors

logger = logging.getLogger("hubfast")


def is_kaggle_handle(handle: str) -> bool:
    return mirrors.service_of(handle) == "kaggle"


def _config_paths(env: config.KaggleEnv) -> List[str]:
    if env.config_dir:
        return [os.path.join(env.config_dir, "kaggle.json")]
    xdg = env.xdg_config_home or os.path.join(os.path.expanduser("~"), ".config")
    return [os.path.join(os.path.expanduser("~"), ".kaggle", "kaggle.json"),
            os.path.join(xdg, "kaggle", "kaggle.json")]


def credentials() -> Optional[Tuple[str, str]]:
    """(username, key) from the environment, else from kaggle.json, else None."""
    env = config.kaggle_env()
    if env.username and env.key:
        return env.username, env.key
    for path in _config_paths(env):
        try:
            with open(path, encoding="utf8") as f:
                data = json.load(f)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            logger.warning("hubfast: ignoring unreadable Kaggle credentials %s: %s", path, e)
            continue
        if isinstance(data, dict) and data.get("username") and data.get("key"):
            return str(data["username"]), str(data["key"])
        logger.warning("hubfast: %s has no \"username\" and \"key\"; ignoring it", path)
    return None


def auth_headers(handle: str, url: str, s: Optional[config.Settings] = None) -> List[str]:
    """``Authorization: Basic ...`` when `handle` is a Kaggle URL fetched from Kaggle's own
    origin (or its endpoint override); otherwise none."""
    s = s or config.settings()
    if not is_kaggle_handle(handle):
        return []
    if mirrors.origin(url) not in mirrors.service_origins("kaggle", s):
        return []  # mirrored elsewhere: the credentials stay home
    creds = credentials()
    if creds is None:
        return []
    token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode("utf8")).decode("ascii")
    return [f"Authorization: Basic {token}"]


HINT = ("Kaggle answered 401/403: set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json "
        "(from kaggle.com > Settings > API) in ~/.kaggle, and accept the model's terms "
        "on its Kaggle page")
