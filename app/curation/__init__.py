"""Data curation (DESIGN.md §5): embed -> dedup -> retrieve / cluster -> materialize -> report.

Algorithms, plain functions over numpy arrays with their parameters in the signature:
`union_find`, `knn`, `dedup`, `retrieval`, `kmeans`, `sampling`.
Stage jobs that read and write `<run.store>/curation/<run.name>/`: `embed`, `stages` (dedup,
retrieve, cluster), `materialize`, `report`; `run` is the job entry (`app.entry curate`),
`commands` the `dinoctl curate` CLI, `artifacts` the output layout.
"""
