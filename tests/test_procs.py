"""fednl.util.procs: stop_groups ends every process group it is given, also one that ignores SIGTERM."""

from __future__ import annotations

import subprocess
import sys

from fednl.util.procs import group_alive, stop_groups


def test_stop_groups_ends_polite_and_stubborn_groups() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                                start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == "ready"
    assert group_alive(polite.pid) and group_alive(stubborn.pid)
    stop_groups([polite.pid, stubborn.pid], grace_s=1.0)
    assert polite.wait(timeout=5) != 0 and stubborn.wait(timeout=5) == -9  # SIGKILL after the grace
    assert not group_alive(polite.pid) and not group_alive(stubborn.pid)
