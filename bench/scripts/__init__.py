"""Runnable one-offs over the bench library, each ``python -m sparse_ops_bench.scripts.NAME``:

``kernel_static``    the static kernel report (every kernel config compiled for sm_90a / sm_80)
``kernel_floors``    our two kernels against cuDNN on single layers (GPU; ``--smoke`` on CPU)
``launch_overhead``  host µs per conv call, launch stubbed, this tree vs an earlier commit
``convert_cpu``      converted vs masked network latency on the CPU
``structure_speed``  CPU-side structuring work (regroup, packing, conversion) as JSON
``elastic_digits``   an elastic ticket stretched to a deeper net and retrained on digits
``summary``          a short summary of a results folder (what ``gpu_run.sh`` ends with)

``gpu_run.sh`` runs one GPU session; ``test_structure_speed.py`` is the pytest-benchmark
face of ``structure_speed`` (``pytest bench/scripts/ --benchmark-only``). Library code
never imports this package (tests/test_layering.py).
"""
