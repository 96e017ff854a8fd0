import mindspore as ms
import pytest

# PyNative ops run synchronously in the test processes: on two cores shared by two workers, the hand-offs of
# MindSpore's asynchronous op pipeline between its threads cost more than the overlap saves (the same kernels run,
# so the numbers are the same; docs/performance.md, step 7). `runtime.set_runtime` does the same for CPU runs.
ms.runtime.launch_blocking()

# The longest modules first (by their measured durations): the suite runs on two workers, which take whole modules
# in collection order (setup.cfg: --dist loadfile --no-loadscope-reorder), and a long module handed out last would
# keep one worker busy while the other idles.
LONGEST_FIRST = ["test_tutorials.py", "test_readme_commands.py", "test_trainer.py", "test_latent.py",
                 "test_score_samplers.py", "test_unet.py", "test_distributed.py", "test_kernels.py",
                 "test_preemption.py", "test_conditional.py", "test_ncsn_training.py", "test_evaluate.py",
                 "test_ode_likelihood.py", "test_unet_torch_equivalence.py", "test_pipeline.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


@pytest.fixture(autouse=True)
def _pynative_by_default():
    """Each test starts in PyNative mode (MindSpore's default); tests that need graph mode set it themselves."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
