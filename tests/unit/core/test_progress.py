"""The core: the rule for unknown duplication, artifact identity, input validation, and"""

import subprocess
import sys


def test_progress_writes_a_few_lines_to_a_log(tmp_path):
    log = tmp_path / "log.txt"
    code = ("import time\nfrom memlens.core.progress import progress\n"
            "for _ in progress(range(400), desc='step', unit='batch'):\n    time.sleep(0.005)\n")
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True)
    text = log.read_text()
    assert text.count("step") <= 3 and "400/400" in text
    # Whole lines, no carriage-return redraws: `tail` and `grep` read the log as it is.
    assert "\r" not in text and text.splitlines()[-1].startswith("step: 100%")
