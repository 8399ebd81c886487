"""The experiment harness: trials, the knob registry, sweeps, the study, the results store, CIs and figures.

It drives the workloads (`chains.workloads`) through the library (`langchain_energy`); neither knows it.
"""
