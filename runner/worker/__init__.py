"""The worker side: everything that needs torch, transformers or ModelOpt.

Run as `python -m runner.worker SPEC.json`, the same way in a container or as a local subprocess.
The spec names a worker kind (a module of this package with a `run(params, output_dir)` function),
its parameters (input paths included) and the output folder; the worker writes its outputs there
and a `worker_result.json` with the outputs, a summary and the versions it ran with.
"""
