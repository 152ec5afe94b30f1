"""Tools around the pipeline: demo data, model folder builders, the GPU smoke test, the run report."""
