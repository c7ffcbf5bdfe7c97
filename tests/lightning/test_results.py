"""`results_json`: the writer of results.json and the comparisons."""

from __future__ import annotations

import json
import math

from ham_lightning.lightning.results import results_json


def test_results_json_keeps_lists_of_plain_values_on_one_line_and_reads_back_the_same() -> None:
    results = {"accuracy_matrix": [[90.0, None], [85.5, 70.0]], "errors": {"images": 20, "confusions": [[0, 1, 2],
               [3, 0, 1]]}, "groups": {"assignment": [0, 0], "similarities": [[None, 0.5], [0.25, None]]},
               "runs": [{"method": "ham", "last": 70.0}], "empty": [], "none": {}, "path": ("a", 1),
               "nan": math.nan, "key": {1: "one"}}
    text = results_json(results)
    assert json.loads(text) == {**results, "path": ["a", 1], "nan": None, "key": {"1": "one"}}
    lines = text.splitlines()
    assert "      [0, 1, 2]," in lines and "      [3, 0, 1]" in lines  # one confusion a line, at its depth
    assert '    "assignment": [0, 0],' in lines and "    [90.0, null]," in lines  # a matrix a row a line
    assert '  "runs": [' in lines and '      "method": "ham",' in lines  # lists of objects stay indented
    assert len(lines) == len(text.split("\n")) and not any(line.rstrip() != line for line in lines)
