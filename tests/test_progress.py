"""Progress inside a batch: every long stage of an evaluation says what it is doing and how
far, to the heartbeat lines of a log (no terminal) and to the progress bar of a terminal."""
import io
import re
import time

from conftest import DEVICE, blob_loader, settings_of, trained_tiny

from locallip import progress
from locallip.evaluation import full_evaluation
from locallip.progress import Heartbeat

STAGES = (r"global vectors of layer \d+ \(once per evaluation\): global power iteration on "
          r"\w+ \d+/\d+",
          r"global Lanczos norm bounds \(once per model\)",
          r"certifying at eps 0\.3: power iteration on Conv2d \d+/500, \d+ of 16 points iterating",
          r"certifying at eps 0\.6: power iteration on Linear \d+/500, \d+ of 16 points iterating",
          r"certifying at eps 0\.3: worst-case-logit rounds \d+/50",
          r"PGD at eps 0\.3: PGD step 10/10",
          r"audit at eps 0\.6: PGD step 5/5",
          r"guaranteed certificates at eps 0\.6: Lanczos step \d+/\d+",
          r"certified radius search: radius search, evaluation \d+/24, \d+ of 16 points searching",
          r"certified radius search: power iteration on \w+ \d+/500, \d+ of \d+ points iterating")


def settings():
    return settings_of([0.3, 0.6], test_sniter=500, test_opt_iter=50, niter=10,
                       certificate='guaranteed', radius=True, audit=True, audit_restarts=2,
                       audit_steps=5)


def test_every_long_stage_reports_where_it_is():
    seen = []
    with progress.watching(seen.append):
        full_evaluation(trained_tiny('relux'), blob_loader(16, batch=16), settings(), DEVICE)
    missing = [p for p in STAGES if not any(re.fullmatch(p, s) for s in seen)]
    assert missing == [], (missing, sorted(set(re.sub(r'\d+', 'N', s) for s in seen)))
    assert progress.current() == ''          # nothing left behind once nobody watches
    before = len(seen)
    progress.stage("power iteration", 1, 2)  # unwatched: ignored
    assert len(seen) == before and progress.current() == ''


def test_heartbeat_lines_name_the_stage(capsys):
    """Without a terminal: a batch running longer than the interval prints its status with
    the stage it is in, at least once per interval."""
    with progress.watching():
        beat = Heartbeat(0.2)
        beat.status = 'evaluate: batch 1/3 running'
        progress.task('certifying at eps 0.5')
        progress.stage('power iteration on Conv2d', 412, 2000, '37 of 256 points iterating')
        time.sleep(0.75)
        beat.stop()
    lines = capsys.readouterr().out.splitlines()
    want = ('evaluate: batch 1/3 running, certifying at eps 0.5: power iteration on Conv2d '
            '412/2000, 37 of 256 points iterating (')
    assert 2 <= len([line for line in lines if line.startswith(want)]) <= 4, lines


def test_evaluation_heartbeat_inside_a_batch(monkeypatch, capsys):
    """A whole evaluation without a terminal and a short interval: the lines printed while
    its batch runs name the stages inside it."""
    monkeypatch.setattr(progress, 'PROGRESS_EVERY_S', 0.02)
    slow = progress.stage

    def stage(*a, **k):          # slow every stage down a little: the thread gets its turn
        time.sleep(0.002)
        slow(*a, **k)
    monkeypatch.setattr(progress, 'stage', stage)
    full_evaluation(trained_tiny('relux'), blob_loader(16, batch=16), settings(), DEVICE)
    beats = [line for line in capsys.readouterr().out.splitlines() if 'since the last line' in line]
    assert any('batch 1/1 running, 0 of 16 points done, certifying at eps' in line
               for line in beats), beats
    assert any('points iterating' in line for line in beats), beats


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_the_stage(monkeypatch):
    """On a terminal the evaluation's bar carries the stage in its postfix."""
    term = Terminal()
    monkeypatch.setattr('sys.stderr', term)
    monkeypatch.setattr(progress, 'BAR_REFRESH_S', 0.0)
    full_evaluation(trained_tiny('relux'), blob_loader(16, batch=16), settings(), DEVICE)
    shown = term.getvalue()
    assert 'evaluate:' in shown and 'certifying at eps 0.3: power iteration on' in shown
    assert 'certified radius search' in shown


def test_training_test_certification_heartbeat(monkeypatch, capsys):
    """Training's per-epoch test certification, without a terminal: heartbeat lines with the
    stage while a batch runs long (the training steps print their own lines, --verbose)."""
    from locallip.certificates import certify_loader
    monkeypatch.setattr(progress, 'PROGRESS_EVERY_S', 0.02)
    slow = progress.stage

    def stage(*a, **k):
        time.sleep(0.002)
        slow(*a, **k)
    monkeypatch.setattr(progress, 'stage', stage)
    out = certify_loader(trained_tiny('relux'), blob_loader(16, batch=16), 0.3, DEVICE,
                         desc='epoch 3 test', heartbeat=True, sniter=500, opt_iter=50)
    assert len(out.certified) == 16
    beats = [line for line in capsys.readouterr().out.splitlines() if 'since the last line' in line]
    assert any(line.startswith('  epoch 3 test: batch 1/1 running, certifying at eps 0.3: '
                               'power iteration on') for line in beats), beats
