"""One writer per results directory: a second sweep is refused at once; a dead one's lock blocks nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from chains.harness.store import ResultStore, StoreLockedError

HOLD = textwrap.dedent("""
    import sys, time
    from chains.harness.store import ResultStore
    with ResultStore(sys.argv[1]).writer():
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_ones_lock_is_gone(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=f"in use by process {holder.pid}"):
            with ResultStore(tmp_path).writer():
                pass
    finally:
        holder.kill()
        holder.wait()
    with ResultStore(tmp_path).writer() as store:  # the killed process's lock does not block a resume
        assert store.path == tmp_path
