"""dsv3.parallel: parallelism applied to a built model from outside (spec 5); the model itself stays plain PyTorch."""
