"""Reports rendered from typed records: Markdown and a self-contained HTML page.

Every renderer here reads records only (``fedspine.evaluation.records`` for an evaluation,
``fedspine.privacy.report`` for the privacy summary and report) and recomputes nothing; a table
that appears in both Markdown and HTML is built once as rows (:mod:`fedspine.reporting.tables`)
and drawn by each. The layer sits above evaluation and release and below federated,
experiments and the CLI, which call it.
"""
