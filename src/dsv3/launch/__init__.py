"""dsv3.launch: what `dsv3 generate | serve | eval | bench` run once dsv3.cli has parsed them: a model from a
directory (or random weights) on a device and in a dtype, in an engine, behind the server, an evaluation or a
benchmark. The `--dtype` flag arrives resolved (dsv3.cli); the rest of the parsed flags as they are."""
