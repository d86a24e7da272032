import csv

import numpy as np

from cnnvis.export.tables import csv_text


def test_csv_text_floats_read_back_exactly_and_missing_values_are_empty():
    values = [0.1, np.float32(1 / 3), np.float64(2 / 3), float("nan"), np.inf, None, 7, "a,b"]
    text = csv_text(["v"] * len(values), [values])
    header, row = list(csv.reader(text.splitlines()))
    assert header == ["v"] * len(values)
    assert float(row[0]) == 0.1 and np.float32(row[1]) == np.float32(1 / 3) and float(row[2]) == 2 / 3
    assert row[3:6] == ["", "", ""] and row[6] == "7" and row[7] == "a,b"
