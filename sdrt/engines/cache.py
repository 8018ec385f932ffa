"""Engine cache keys and staleness: the runtime's (:mod:`sdrt.runtime.engine_cache`), which `sdrt build` shares."""

from __future__ import annotations

from sdrt.runtime.engine_cache import KEY_FORMAT, KEY_LENGTH, cache_key, entry_key, find_entry, stale_reason

__all__ = ["KEY_FORMAT", "KEY_LENGTH", "cache_key", "entry_key", "find_entry", "stale_reason"]
