"""Are two answers the same? Exact numbers first, then simple symbolic algebra with a timeout.

Numbers ("0.5", "1/2", "\\frac{1}{2}", "50%") compare exactly in-process. Anything else goes,
rewritten from LaTeX to sympy syntax, to a sympy worker process with a timeout: a process can be
killed from any thread, whereas signal-based timeouts (SIGALRM) work only in the main thread,
and a hung `simplify` in a thread can never be stopped.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

from thrifty.tts.extract import canonical, to_number

_WORKER = Path(__file__).with_name("_sympy_worker.py")


def latex_to_sympy(text: str) -> str:
    """Enough LaTeX for short final answers: fractions, roots, products, powers, pi."""
    s = text.strip().strip("$")
    for _ in range(4):  # nested \frac{\frac{a}{b}}{c}
        s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"\\[dt]?frac(\d)(\d)", r"(\1/\2)", s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = s.replace("\\pi", "pi").replace("\\left", "").replace("\\right", "")
    s = s.replace("{", "(").replace("}", ")").replace("^", "**").replace("−", "-")
    return s


class SympyWorker:
    """One sympy process shared by all threads; restarted after a timeout or a crash."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-u", str(_WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self._proc

    def equal(self, a: str, b: str, timeout: float) -> bool | None:
        """True / False, or None if sympy could not decide within `timeout` seconds."""
        with self._lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps({"a": a, "b": b}) + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], timeout)
                if ready:
                    line = proc.stdout.readline()
                    if line:
                        return json.loads(line)["equal"]
            except (BrokenPipeError, OSError, ValueError):
                pass
            self.close()  # timed out or died: a fresh process next time
            return None

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


_worker = SympyWorker()


def equivalent(
    a: str | None, b: str | None, *, timeout: float = 5.0, symbolic: bool = True
) -> bool:
    """Whether answers `a` and `b` denote the same value (None never equals anything)."""
    if a is None or b is None:
        return False
    ka, kb = canonical(a), canonical(b)
    if ka is not None and ka == kb:
        return True
    na, nb = to_number(a), to_number(b)
    if na is not None and nb is not None:
        return abs(na - nb) <= 1e-9 * max(1, abs(na), abs(nb))
    if not symbolic:
        return False
    return _worker.equal(latex_to_sympy(a), latex_to_sympy(b), timeout) is True
