"""python -m mlx_mistral.models: the table prints every family, and its numbers are memory.py's."""

import pytest

from mlx_mistral import memory
from mlx_mistral.models import CONTEXTS, FAMILIES, HEADER, main, smallest_mac


def test_the_table_prints_every_family_with_memory_pys_numbers(capsys):
    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("  ")[0] == "model" and set(lines[1]) == {"-", " "}
    assert len(FAMILIES) == 16
    for family, line in zip(FAMILIES, lines[2:]):
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        assert cells[0] == family.name and cells[-1] == family.architecture
        gib = [float(c) for c in cells[HEADER.index("4-bit GiB"):HEADER.index("+KV 32k") + 1]]
        weights = memory.weight_bytes(family.args, bits=4)
        kv = [memory.kv_bytes(family.args, n)["gqa_rolling"] for n in CONTEXTS]
        assert gib == [round(weights / 2**30, 1), *(round((weights + k) / 2**30, 1) for k in kv)]
        macs = [smallest_mac(weights + k) for k in kv]
        assert cells[HEADER.index("smallest Mac (8k / 32k)")] == " / ".join(f"{m} GB" for m in macs)
        assert all(weights + k <= memory.USABLE * m * 2**30 for m, k in zip(macs, kv))


@pytest.mark.parametrize("name, gib_32k", [("Mistral 7B v0.1", 4.3), ("Mistral 7B v0.3, Mathstral 7B", 7.8),
                                           ("Codestral 22B v0.1", 18.7), ("Mistral NeMo 12B (2407)", 11.4),
                                           ("Mistral Small 3 24B (2501)", 17.3), ("Mistral Large 2 / 2.1 123B", 75.2)])
def test_figures_match_the_family_notes(name, gib_32k):
    """notes/mistral-family.md's 4-bit + KV@32k column (the rolling buffer holds v0.1's 4096)."""
    family = next(f for f in FAMILIES if f.name == name)
    assert round(family.total_bytes(32768) / 2**30, 1) == gib_32k
