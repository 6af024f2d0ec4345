"""Commands beside training that read a recipe's data: `show-augment` (preview.py) and `bench-data`
(bench_data.py). They sit at the top layer with the CLI: they build the data as `train` does."""
