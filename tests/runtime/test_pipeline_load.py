"""Pipeline loading: a component that fails to load releases the sessions loaded before it."""

from __future__ import annotations

import pytest

from sdrt.errors import UserError
from sdrt.runtime.backends import get_backend
from sdrt.runtime.backends.base import Backend


class _FailingOn(Backend):
    """The CPU backend, except that loading ``fail`` raises; records which sessions were closed."""

    name = "failing"

    def __init__(self, fail: str):
        self.inner = get_backend("cpu")
        self.fail = fail
        self.loaded, self.closed = [], []

    def load(self, manifest, component):
        if component == self.fail:
            raise UserError(f"component {component!r}: cannot load (test)")
        session = self.inner.load(manifest, component)
        close = session.close

        def recording_close():
            self.closed.append(component)
            close()

        session.close = recording_close
        self.loaded.append(component)
        return session


@pytest.mark.parametrize("fail", ["unet", "vae_decoder", "vae_encoder"])
def test_failed_load_closes_loaded_sessions(sd1_engine, fail):
    from sdrt.runtime import Pipeline

    backend = _FailingOn(fail)
    with pytest.raises(UserError, match=fail):
        Pipeline(sd1_engine, backend=backend, load_encoder=True)
    assert backend.loaded, "nothing loaded before the failing component"
    assert sorted(backend.closed) == sorted(backend.loaded)
