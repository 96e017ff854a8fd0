import mindspore as ms
import pytest


@pytest.fixture(autouse=True)
def _pynative_by_default():
    """Each test starts in PyNative mode (MindSpore's default); tests that need graph mode set it themselves."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)

