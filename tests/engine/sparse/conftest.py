import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """The gather/scatter sparse ops run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
