"""The results layer behind `sparsebench report`: results tree in, paper tables, plots and pages out.

Modules, in the order data flows through them: `load` (files -> one row per run, bench.json
included), `reference` (published numbers supplied at report time), `identity` (which runs are
one experiment: the config values that split tables and rows, and each table's training
budget), `health` (runs and groups that must not be averaged silently), `aggregate` (mean, std,
standard error and CI over seeds, deltas to the dense run of the same budget), `tables`
(formatted cell grids), `plots` (matplotlib figures), `document` (the report as blocks) and
`render` (Markdown, LaTeX, HTML); `parallel` spreads loading and drawing over processes.
Nothing here imports torch or the models.
"""
