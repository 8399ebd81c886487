"""The study: its workloads (`chains.workloads`) and the harness that measures them (`chains.harness`).

``python -m chains.run`` and ``python -m chains.study`` are the harness's commands.
"""
