import sys
from pathlib import Path

# The official-style reference lives beside the tests, not in the package.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def encoder_cache(tmp_path_factory):
    """Encoders exported for the ONNX Runtime path go to a fresh cache, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("fss-cache")
        patch.setenv("FSS_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def no_background_exports(monkeypatch):
    """A small job on a new checkpoint runs torch and starts a background exporter
    (fss.runtime.encoder_path); tests do not start it, so that no test's path depends on when another
    test's exporter finishes. Yields the real launcher, for the tests of the exporter itself."""
    from fss.runtime import encoder_path

    real = encoder_path.launch_exporter
    monkeypatch.setattr(encoder_path, "launch_exporter", lambda command: None)
    yield real
