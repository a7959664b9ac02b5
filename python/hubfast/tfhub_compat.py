"""``hubfast.install()``: puts hubfast's fetch, lock and verification under
unchanged ``tensorflow_hub`` code by registering a resolver in its registry."""
from __future__ import annotations

from . import resolvers


class TensorflowHubResolver:
    """A tensorflow_hub registry implementation backed by hubfast.

    It claims the handles hubfast fetches (http(s), archives, gs://...) and
    leaves plain local directories to tensorflow_hub's own PathResolver.
    """

    def is_supported(self, handle) -> bool:
        if not isinstance(handle, str):
            return False
        for r in resolvers.chain():
            if isinstance(r, resolvers.PathResolver):
                return False
            if r.is_supported(handle):
                return True
        return False

    def __call__(self, handle: str) -> str:
        return resolvers.resolve_entry(handle).path


_installed = False


def install() -> None:
    """Routes tensorflow_hub's ``load``/``resolve``/``KerasLayer`` through hubfast.

    Idempotent. Needs tensorflow_hub importable.
    """
    global _installed
    from tensorflow_hub import registry  # noqa: imports tensorflow

    if _installed:
        return
    registry.resolver.add_implementation(TensorflowHubResolver())  # tried first
    _installed = True
