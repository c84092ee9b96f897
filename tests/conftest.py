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
