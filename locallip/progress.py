"""Progress of long work, inside a batch too: what stage a computation is in and how far.

The long loops (power iteration, worst-case-logit rounds, Lanczos, the radius search, PGD)
call ``stage``; the evaluation names the task around them with ``task``. Whoever shows
progress reads ``current()``: the heartbeat lines of a run without a terminal (a thread,
every PROGRESS_EVERY_S seconds) and the progress bar of a terminal (``bar_follower``). While
nobody ``watching()``, ``stage`` and ``task`` return at once; a caller whose message costs
something to build (a string per iteration, a number read from the device) asks
``watched()`` first.
"""
import contextlib
import os
import re
import threading
import time


def _every_s(default: float = 60.0) -> float:
    """$LOCALLIP_PROGRESS_EVERY_S (seconds; 0: a line at every batch), else ``default``."""
    text = os.environ.get('LOCALLIP_PROGRESS_EVERY_S', '').strip()
    if text and not re.fullmatch(r'\d+(\.\d*)?|\.\d+', text):
        raise SystemExit(f"error: LOCALLIP_PROGRESS_EVERY_S={text!r} is not a number of "
                         f"seconds (>= 0)")
    return float(text) if text else default


PROGRESS_EVERY_S = _every_s()   # without a terminal, a progress line at least this often
BAR_REFRESH_S = 1.0         # a terminal's bar shows the stage at most this often

_watchers = []              # callables told of every change (a bar's follower)
_state = {'watched': 0, 'task': '', 'detail': ''}


@contextlib.contextmanager
def watching(follower=None):
    """Record stages from here on (``follower(text)`` is also called on every change)."""
    _state['watched'] += 1
    if follower is not None:
        _watchers.append(follower)
    try:
        yield
    finally:
        _state['watched'] -= 1
        if follower is not None:
            _watchers.remove(follower)
        if not _state['watched']:
            _state['task'] = _state['detail'] = ''


def watched() -> bool:
    """Whether anyone records stages (guard a stage whose numbers cost a device sync)."""
    return _state['watched'] > 0


def task(text: str) -> None:
    """The task now running (e.g. 'certifying at eps 0.5'); clears the stage detail."""
    if _state['watched']:
        _state['task'], _state['detail'] = text, ''
        _tell()


def stage(name: str, done: int, total: int, extra: str = '') -> None:
    """Inside a task: ``name`` at step ``done`` of at most ``total`` (``extra``: e.g. how
    many points are still iterating)."""
    if _state['watched']:
        _state['detail'] = f"{name} {done}/{total}" + (f", {extra}" if extra else '')
        _tell()


def current() -> str:
    """'task: detail' of what runs now ('' when nothing is recorded)."""
    t, d = _state['task'], _state['detail']
    return f"{t}: {d}" if t and d else t or d


def _tell():
    for follower in _watchers:
        follower(current())


def bar_follower(bar):
    """A follower showing the stage in a tqdm bar's postfix, at most every BAR_REFRESH_S."""
    last = [0.0]

    def follow(text):
        now = time.monotonic()
        if now - last[0] >= BAR_REFRESH_S:
            last[0] = now
            bar.set_postfix_str(text[:100], refresh=True)
    return follow


@contextlib.contextmanager
def shown(bar, heartbeat: bool):
    """Show progress while the block runs: on a terminal in ``bar`` (a tqdm bar; its postfix
    follows the stage), else, with ``heartbeat``, as heartbeat lines. Yields the Heartbeat
    (silent on a terminal or without ``heartbeat``); stops it and closes the bar at the end."""
    beat = Heartbeat(PROGRESS_EVERY_S if bar.disable and heartbeat else None)
    try:
        with watching(None if bar.disable else bar_follower(bar)):
            yield beat
    finally:
        beat.stop()
        bar.close()


class Heartbeat:
    """Progress lines for a log file (no terminal): ``say`` prints a line, and while a batch
    runs longer than ``every`` seconds a background thread prints ``status`` with the stage
    it is in (``current()``) and the time since the last line, every ``every`` seconds.
    every=None: silent (a terminal shows the progress bar instead); 0: ``say`` only."""

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
                    now = current()
                    print(f"{self.status}{', ' + now if now else ''} ({quiet:.0f}s since the "
                          f"last line)", flush=True)
                    self.last = time.monotonic()

    def say(self, line):
        if self.every is not None:
            with self.lock:
                print(line, flush=True)
                self.last = time.monotonic()

    def stop(self):
        self.done.set()
        if self.thread is not None:
            self.thread.join()
