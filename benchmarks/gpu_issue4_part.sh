export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_infer_engine.py -k cuda -rs 2>&1 | tail -15 | tee "$OUT/pytest.txt"
timeout 200 python benchmarks/engine_decode.py --batches 1,32,64 --tokens 64 --modes graphs,fp8 --profile 2>&1 | tee "$OUT/engine_decode.txt"
timeout 150 python benchmarks/fp8_weight_gemm_bench.py 2>&1 | tee "$OUT/fp8_gemm.txt"
timeout 60 python benchmarks/mla_decode_bench.py --graph-timing --heads 16 128 --batches 32 64 128 --contexts 8192 32768 2>&1 | tail -16 | tee "$OUT/mla_decode.txt"
