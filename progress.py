"""Progress for long work without a terminal: heartbeat lines in a log file."""
import threading
import time


PROGRESS_EVERY_S = 60.0     # without a terminal, a progress line at least this often


class Heartbeat:
    """Progress lines for a log file (no terminal): ``say`` prints a line, and while a batch
    runs longer than ``every`` seconds a background thread prints ``status`` (with the time
    since the last line) every ``every`` seconds. every=None: silent (a terminal shows the
    progress bar instead)."""

    def __init__(self, every):
        self.every, self.status = every, ''
        self.last = time.monotonic()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.thread = None
        if every:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self):
        while not self.done.wait(self.every / 4):
            with self.lock:
                quiet = time.monotonic() - self.last
                if quiet >= self.every and self.status:
                    print(f"{self.status} ({quiet:.0f}s since the last line)", flush=True)
                    self.last = time.monotonic()

    def say(self, line):
        if self.every:
            with self.lock:
                print(line, flush=True)
                self.last = time.monotonic()

    def stop(self):
        self.done.set()
        if self.thread is not None:
            self.thread.join()
