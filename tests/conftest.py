"""Unit tests use tiny networks: one CPU thread is as fast, and on a busy machine far faster
(threads spin-waiting for each other turn milliseconds into seconds)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
