"""docs/robustness.md: every table row names at least one test, and every test it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"(test_\w+\.py)::(test_\w+)")


def test_every_robustness_row_names_existing_tests():
    rows = [line for line in (ROOT / "docs" / "robustness.md").read_text().splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    headers = [row for row in rows if row.split("|")[-2].strip() == "test"]
    body = [row for row in rows if row not in headers]
    assert len(headers) >= 6 and len(body) > 50
    for row in body:
        references = REFERENCE.findall(row.split("|")[-2])
        assert references, row
        for file, test in references:
            assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M), (file, test)
