"""Data curation (DESIGN.md §5): embed -> dedup -> retrieve / cluster -> materialize -> report.

The algorithms (`union_find`, `knn`, `dedup`, `retrieval`, `kmeans`, `sampling`) are plain
functions over numpy arrays with their parameters in the signature; the stage jobs that read and
write the store live in `stages/`-style modules next to them and only wire these together.
"""
