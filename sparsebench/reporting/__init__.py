"""The results layer behind `sparsebench report`: results tree in, paper tables, plots and pages out.

Modules, in the order data flows through them: `load` (files -> one row per run), `health`
(runs and groups that must not be averaged silently), `aggregate` (mean/std over seeds, deltas
to dense), `tables` (formatted cell grids), `plots` (matplotlib figures), `document` (the report
as blocks) and `render` (Markdown, LaTeX, HTML); `parallel` spreads loading and drawing over
processes. Nothing here imports torch or the models.
"""
