import pytest

from checkpoints import tiny_config, to_original, write_hf, write_tekken


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


@pytest.fixture(scope="session")
def reasoning_checkpoint(tmp_path_factory):
    """Directory of a tiny reasoning model: Tekken v13 with [THINK] and [/THINK] (write_tekken),
    and a SYSTEM_PROMPT.txt in the layout of Magistral's (text, [THINK]...[/THINK], text)."""
    path = tmp_path_factory.mktemp("reasoning")
    tekken = write_tekken(tmp_path_factory.mktemp("tok") / "tekken.json", "v13", think=True)
    write_hf(path, tiny_config(sliding_window=None, vocab_size=131072, hidden_size=32, intermediate_size=64,
                               head_dim=8), seed=2, tokenizer=tekken)
    (path / "SYSTEM_PROMPT.txt").write_text("Draft your thinking first.[THINK]scratch work[/THINK]Then answer.")
    return path


@pytest.fixture(params=["cpu paths on", "cpu paths off"])
def cpu_paths(request, monkeypatch) -> bool:
    """Each of the two code paths in turn: MLX_MISTRAL_CPU_PATHS=1 (cpu.py's swaps, the Linux
    default; True) and =0 (the path a Mac runs; False)."""
    import mlx_mistral  # noqa: F401  (first: it preloads OpenBLAS before MLX)
    import mlx.core as mx

    on = request.param == "cpu paths on"
    if on and mx.default_device() != mx.cpu:
        pytest.skip("cpu.py's paths exist only on the CPU backend")
    monkeypatch.setenv("MLX_MISTRAL_CPU_PATHS", "1" if on else "0")
    return on


@pytest.fixture
def loader(cpu_paths):
    """`load` on each code path (cpu_paths), asserting that the model took it: plain
    nn.Linear and unfolded attention on the Mac's."""
    from mlx_mistral import load
    from mlx_mistral.cpu import TransposedLinear
    from mlx_mistral.model import Attention

    import mlx.nn as nn

    on = cpu_paths

    def load_on_path(path, dtype=None):
        model, tokenizer = load(str(path), dtype)
        kinds = {type(m) for m in model.modules()}
        folded = {m.fold_gqa for m in model.modules() if isinstance(m, Attention)}
        # TransposedLinear only where this CPU measures it faster (cpu.transposed_pays)
        assert folded == {on} and (on or (TransposedLinear not in kinds and nn.Linear in kinds))
        return model, tokenizer
    return load_on_path
