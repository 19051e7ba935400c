"""Measuring and reporting tools, each a ``python -m uniattn.tools.NAME`` command: they run checkpoints on
calibration or evaluation data, measure something (e.g. ``layout_search`` ranks SuperBlock layouts ``G B E``
by a cheap data-driven proxy) and print a markdown table; the full numbers, when asked, go to a JSON file
written atomically through ``uniattn.io``. Each module's docstring gives its command line and what it measures.
"""
