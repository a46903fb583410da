"""The error report: what a model reads wrong, line by line, as one self-contained HTML page (and in TensorBoard).

`callback.py` collects a run's lines and writes `report.html` into its folder; `cli.py` makes the page from one or
two prediction files (`python -m dsocr_lightning report before.jsonl after.jsonl`); `lines.py` gathers lines over
ranks and computes their figures; `align.py`, `marks.py`, `histogram.py`, `thumbnails.py` and `page.py` build it.
"""
