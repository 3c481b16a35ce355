import pytest

from checkpoints import tiny_config, to_original, write_hf


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(directory, torch oracle) of a tiny windowed model (W = 8) in HF layout."""
    path = tmp_path_factory.mktemp("hf")
    return path, write_hf(path, tiny_config(sliding_window=8))


@pytest.fixture(scope="session")
def original_checkpoint(tmp_path_factory, hf_checkpoint):
    path = tmp_path_factory.mktemp("original")
    to_original(hf_checkpoint[1], path)
    return path


@pytest.fixture(scope="session")
def windowless(tmp_path_factory):
    """(directory, torch oracle) of a tiny model without a sliding window, in HF layout."""
    path = tmp_path_factory.mktemp("windowless")
    return path, write_hf(path, tiny_config(sliding_window=None), seed=1)
