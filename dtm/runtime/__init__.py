"""The Dask runtime of dtm: clusters, the task graphs and tasks, progress and metrics."""
