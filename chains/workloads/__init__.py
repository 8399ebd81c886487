"""The study's four workloads as LangChain runnables and LangGraph graphs, their Parrot forms and their data.

They take any language model and know nothing of meters, knobs or the harness that measures them.
"""
