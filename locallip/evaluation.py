"""The full evaluation of a test set, resumable and shared among processes: every batch
certified at every radius (local and global bound, optionally guaranteed), attacked with
PGD, optionally audited and searched for its certified radius; per-sample rows written to a
TSV as they are made; the summary from report.py. The command line is evaluate.py."""
import glob
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from locallip import progress
from locallip.attacks import audit_batch, pgd_correct_batch
from locallip.certificates import certify_batch, converged_global_vectors, guaranteed_certify
from locallip.errors import UserError
from locallip.lanczos import GuaranteedNorms
from locallip.radius import RadiusSearch, radius_batch
from locallip.report import (BatchOutcome, TsvWriter, batch_rows, resume_rows, summarize,
                             tsv_columns, write_tsv)
from locallip.runtime import (BATCH_STREAM, GUARANTEED_STREAM, LOWER_STREAM, NORMS_STREAM,
                              RADIUS_STREAM, all_reduce_sum, derived_seed)
from locallip.tightness import LowerSearch, lipschitz_lower_bound
from locallip.tracing import refresh, verify
from locallip.vectors import KeptVectors


@dataclass(frozen=True)
class EvalSettings:
    """What full_evaluation computes; the names are evaluate.py's flags, and so are the
    values: ``eval_settings`` builds it from the parsed flags, whose defaults (utils.py) are
    the only ones (no field but ``heartbeat`` has a default here)."""
    radii: List[float]          # L2 radii; the first is PGD's and the summary's
    test_sniter: int            # per-sample power iterations (stop at 1e-3)
    test_opt_iter: int          # worst-case-logit rounds
    bound: str                  # 'local' or 'global' (every indicator 1)
    estimate: str               # the power-iteration estimate
    alpha: Optional[float]      # PGD step (None: radius / 4, the reference's)
    niter: int                  # PGD steps (0: no attack)
    certificate: str            # 'reference' or 'guaranteed' (also Lanczos bounds)
    delta: float                # a guaranteed certificate's failure probability
    radius: bool                # also each point's certified radius
    lower_bound: bool           # also an empirical lower bound of the local constant
    radius_rtol: float          # its relative tolerance
    radius_steps: int           # Lanczos steps of the guaranteed radius
    audit: bool                 # attack every certificate inside its ball
    audit_restarts: int         # the audit's restarts ...
    audit_steps: int            # ... and steps
    seed: int                   # every random draw derives from it and the batch
    heartbeat: bool = True      # without a terminal, progress lines in the log

    @property
    def pgd_step(self) -> float:
        return self.radii[0] / 4 if self.alpha is None else self.alpha


@dataclass
class _Batches:
    """The batches one process evaluates, and the rows an earlier run finished."""
    indices: List[List[int]]           # sample indices of every batch of the loader
    todo: List[int]                    # batch numbers still to evaluate (all processes)
    rows: list = field(default_factory=list)   # finished rows (resume)
    header: Optional[List[str]] = None          # their TSV columns


def full_evaluation(model, loader, settings: EvalSettings, device, tsv_path=None,
                    resume=False, rank=0, world=1):
    """Clean, PGD (at the first radius) and certified accuracy at every radius of
    ``settings.radii``, local and global bound; optional per-sample TSV (written as it goes)
    and audit. Every batch is seeded from (seed, batch number) and starts its global power
    iterations from the same vectors, converged once per evaluation
    (converged_global_vectors), so ``resume`` (continue the TSV of an interrupted run,
    skipping its finished batches) gives the rows of an uninterrupted run.

    Several processes (``world`` > 1, a torch.distributed process group, ``loader`` the
    whole sequential test loader in every process): the batches still to do are dealt out
    round-robin, process ``rank`` takes every world-th; each process writes its rows to
    ``<tsv_path>.rank<r>`` as it goes, and at the end process 0 gathers all rows and writes
    the one TSV (the part files are then removed; a resumed run first folds the part files
    of an interrupted one into the TSV, whole batches only, whatever the process count).
    Rows depend on the batch number only, never on rank or world. Returns the results dict
    (JSON-ready) in process 0, None in the others."""
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    model.eval()
    refresh(model)          # the network read as its forward runs now; verified per batch
    work = _batches_to_do(loader, settings, tsv_path if resume else None, lead, world, say)
    in_shape = tuple(loader.dataset[0][0].shape)
    # this process's rows go, as they are made, to the TSV (one process) or its part file
    writer = None
    if tsv_path:
        writer = TsvWriter(tsv_path if world == 1 else f"{tsv_path}.rank{rank}",
                           *((work.header, work.rows) if world == 1 else (None, [])))
    try:
        # the whole evaluation's progress in process 0: a bar, or heartbeat lines in a log
        bar = tqdm(total=len(loader.dataset), initial=len(work.rows), desc='evaluate',
                   unit='pt', leave=False, disable=None if lead else True, file=sys.stderr)
        with progress.shown(bar, lead and settings.heartbeat) as beat:
            beat.status = "  evaluate: preparing"
            run = _BatchRun(model, settings, device,
                            converged_global_vectors(model, in_shape, settings.test_sniter,
                                                     settings.seed, device),
                            _guaranteed_norms(model, in_shape, settings, say))
            new_rows, header, audit_seconds = _evaluate_mine(run, loader, work, writer, rank,
                                                             world, (bar, beat))
    finally:
        if writer is not None:
            writer.close()
    header = header or work.header
    if world > 1:       # process 0 gathers every process's rows and writes the one TSV
        gathered = _gather(new_rows, header, audit_seconds, world)
        if not lead:
            return None
        new_rows, header, audit_seconds = gathered
        if tsv_path:
            _write_gathered(tsv_path, header, work.rows + new_rows, world)
    out = summarize(sorted(work.rows + new_rows, key=lambda q: q['idx']), settings)
    if settings.audit:      # of this run (a resumed run: of its new batches only)
        out['audit']['seconds_this_run'] = audit_seconds
    return out


def _batches_to_do(loader, settings: EvalSettings, resume_tsv, lead, world, say) -> _Batches:
    """Every batch of ``loader``, less those an interrupted run at ``resume_tsv`` (None:
    no resume) finished, whose rows are kept (its part files folded in first)."""
    indices = [list(map(int, ids)) for ids in batch_indices(loader)]
    work = _Batches(indices, list(range(len(indices))))
    if resume_tsv:
        keys = (settings.radii, indices, settings.certificate, settings.radius,
                settings.lower_bound)
        if lead:
            fold_part_files(resume_tsv, *keys)
        barrier(world)
        if os.path.isfile(resume_tsv):
            work.header, work.rows, skip = resume_rows(resume_tsv, *keys)
            work.todo = [bi for bi in work.todo if bi not in skip]
            say(f"resuming {resume_tsv}: {len(work.rows)} points done, {len(work.todo)} of "
                f"{len(indices)} batches to go", flush=True)
    return work


def _guaranteed_norms(model, in_shape, settings: EvalSettings, say):
    """The global Lanczos norm bounds of --certificate guaranteed (once per model, seeded),
    or None."""
    if settings.certificate != 'guaranteed':
        return None
    t0 = time.time()
    progress.task("global Lanczos norm bounds (once per model)")
    norms = GuaranteedNorms(model, in_shape, settings.delta,
                            generator_seed=derived_seed(settings.seed, NORMS_STREAM))
    say(f"guaranteed certificates (delta {settings.delta:g}): global norm bounds in "
        f"{time.time() - t0:.1f}s; each of {round(settings.delta / norms.delta_op)} norm "
        f"bounds per certificate fails with probability <= {norms.delta_op:.3g}", flush=True)
    return norms


def _evaluate_mine(run, loader, work: _Batches, writer, rank, world, shown):
    """Evaluate this process's share of ``work.todo`` (every world-th batch), in rounds of
    one batch per process, showing the whole evaluation's progress on ``shown`` (its bar and
    heartbeat). Returns (new rows, TSV columns or None, audit seconds)."""
    bar, beat = shown
    n_total, n_batches = len(loader.dataset), len(work.indices)
    positions = list(loader.batch_sampler)
    mine = work.todo[rank::world]
    batches = iter(torch.utils.data.DataLoader(loader.dataset,
                                               batch_sampler=[positions[bi] for bi in mine],
                                               num_workers=loader.num_workers,
                                               pin_memory=loader.pin_memory))
    done, new_rows, header, audit_seconds = len(work.rows), [], None, 0.0
    rounds = -(-len(work.todo) // world)                      # of one batch per process
    for r in range(rounds):
        bi = mine[r] if r < len(mine) else None
        count, t0 = 0, time.time()
        if bi is not None:
            beat.status = (f"  evaluate: batch {bi + 1}/{n_batches} running, {done} of "
                           f"{n_total} points done")
            rows, header, a_sec = run.batch(*next(batches), bi)
            audit_seconds += a_sec
            if writer is not None:
                writer.write(header, rows)
            new_rows.extend(rows)
            count = len(rows)
        if world > 1:                                # the whole evaluation's progress
            count = int(all_reduce_sum([count], run.device, world)[0])
        done += count
        bar.update(count)
        what = f"batch {bi + 1}/{n_batches}" if world == 1 else \
            f"round {r + 1}/{rounds} ({world} batches)"
        beat.say(f"  evaluate: {what} done, {done} of {n_total} points, "
                 f"{time.time() - t0:.0f}s")
    return new_rows, header, audit_seconds


def _gather(new_rows, header, audit_seconds, world):
    """Every process's (rows, header, audit seconds), joined; None outside process 0."""
    gathered = [None] * world
    dist.all_gather_object(gathered, (new_rows, header, audit_seconds))
    if dist.get_rank() != 0:
        return None
    return ([row for part, _, _ in gathered for row in part],
            next((h for _, h, _ in gathered if h is not None), None),
            sum(sec for _, _, sec in gathered))


def _write_gathered(tsv_path, header, rows, world):
    """Process 0: the one TSV of all rows; the part files removed."""
    if header is not None:
        write_tsv(tsv_path, header, sorted(rows, key=lambda q: q['idx']))
    for part in range(world):
        if os.path.exists(f"{tsv_path}.rank{part}"):
            os.remove(f"{tsv_path}.rank{part}")


class _BatchRun:
    """Every number of one test batch, from its batch number alone (the seeds): the
    certificates at every radius, PGD, the audit, the guaranteed certificates and the
    certified radius, each stage from its own random stream so that the others' columns do
    not depend on which stages run."""

    def __init__(self, model, settings: EvalSettings, device, base_global, norms):
        self.model, self.settings, self.device = model, settings, device
        self.base_global, self.norms = base_global, norms

    def batch(self, x, y, idx, bi):
        """(rows, TSV columns, seconds spent in the audit) of batch number ``bi``."""
        s, t0 = self.settings, time.time()
        torch.manual_seed(derived_seed(s.seed, BATCH_STREAM, bi))
        x, y = x.to(self.device), y.to(self.device)
        try:        # the network the bound reads is the model's own forward on this batch
            verify(self.model, x)
        except ValueError as e:
            raise UserError(f"test batch {bi}: {e}") from None
        # every batch starts from the same global vectors, converged once per evaluation
        # (they do not depend on the data): resumable, and no batch repeats the iterations
        global_vectors = {k: v.clone() for k, v in self.base_global.items()}
        vectors = KeptVectors(x.shape[0], self.device)   # fresh at the smallest radius, then warm
        by_eps = {}
        for e in sorted(s.radii):
            progress.task(f"certifying at eps {e:g}")
            by_eps[e] = certify_batch(self.model, x, y, e, vectors, global_vectors,
                                      sniter=s.test_sniter, opt_iter=s.test_opt_iter,
                                      bound=s.bound, estimate=s.estimate)
        progress.task(f"PGD at eps {s.radii[0]:g}")
        out = BatchOutcome(idx, y.cpu(), by_eps,
                           pgd_correct_batch(self.model, x, y, s.radii[0], s.pgd_step, s.niter),
                           all(c.global_converged for c in by_eps.values()))
        t_audit = time.time()
        if s.audit:
            out.audited, out.broken = self._audit(x, y, idx, by_eps)
        audit_seconds = time.time() - t_audit
        out.seconds = (time.time() - t0) / x.shape[0]
        if self.norms is not None:
            out.seconds_guaranteed = self._guaranteed(x, y, bi, by_eps)
        if s.radius:
            out.radius, out.seconds_radius = self._radius(x, y, bi, vectors)
        if s.lower_bound:
            t3 = time.time()
            search = LowerSearch(seed=derived_seed(s.seed, LOWER_STREAM, bi))
            out.lower = lipschitz_lower_bound(self.model, x, s.radii[0], search).cpu()
            out.seconds_lower = (time.time() - t3) / x.shape[0]
        columns = tsv_columns(s.radii, list(by_eps[s.radii[0]].varying), self.norms is not None,
                              s.radius, s.lower_bound)
        return batch_rows(out, s.radii), columns, audit_seconds

    def _audit(self, x, y, idx, by_eps):
        """[batch] counts of the radii at which each point was attacked / broken."""
        audited = torch.zeros(x.shape[0], dtype=torch.long)
        broken = torch.zeros(x.shape[0], dtype=torch.long)
        for e in self.settings.radii:
            progress.task(f"audit at eps {e:g}")
            sel, brk = _audit_certified(self.model, x, y, idx, e, by_eps[e].certified,
                                        self.settings)
            audited += sel.long()
            broken += brk.long()
        return audited, broken

    def _guaranteed(self, x, y, bi, by_eps) -> float:
        """Guaranteed certificates into ``by_eps``, after the rest, from their own seed;
        seconds per point."""
        s, t1 = self.settings, time.time()
        torch.manual_seed(derived_seed(s.seed, GUARANTEED_STREAM, bi))
        for e in sorted(s.radii):
            progress.task(f"guaranteed certificates at eps {e:g}")
            g = guaranteed_certify(self.model, x, y, e, self.norms, opt_iter=s.test_opt_iter,
                                   bound=s.bound)
            by_eps[e].certified_guaranteed = g.certified.cpu()
            by_eps[e].lip_guaranteed = g.lip.cpu()
        return (time.time() - t1) / x.shape[0]

    def _radius(self, x, y, bi, vectors):
        """(RadiusResult, seconds per point): from its own seed, warm-started from the
        radii's vectors."""
        s, t2 = self.settings, time.time()
        torch.manual_seed(derived_seed(s.seed, RADIUS_STREAM, bi))
        progress.task("certified radius search")
        search = RadiusSearch(sniter=s.test_sniter, opt_iter=s.test_opt_iter,
                              rtol=s.radius_rtol, steps=s.radius_steps, bound=s.bound,
                              estimate=s.estimate)
        rad = radius_batch(self.model, x, y, self.base_global, search, norms=self.norms,
                           vectors=vectors.kept)
        return rad, (time.time() - t2) / x.shape[0]


def _audit_certified(model, x, y, idx, eps, certified, settings: EvalSettings):
    """Audit the certified points of one batch at ``eps``; print the first point broken.
    Returns per-sample CPU bool tensors (attacked, broken), each [batch]."""
    sel = certified.to(x.device)
    broken_all = torch.zeros(x.shape[0], dtype=torch.bool)
    if not sel.any():
        return sel.cpu(), broken_all
    broken, found = audit_batch(model, x[sel], y[sel], eps, settings.audit_restarts,
                                settings.audit_steps)
    broken_all[sel.cpu()] = broken
    if broken.any():
        k = int(broken.nonzero()[0])
        dist = (found[k] - x[sel][k]).norm().item()
        with torch.no_grad():
            pred = int(model(found[k:k + 1]).argmax(1))
        print(f"AUDIT FAILURE: test point {int(idx[sel.cpu()][k])} (label {int(y[sel][k])}) is "
              f"certified at eps {eps:g} but the attack found a point at L2 distance {dist:.4f} "
              f"predicted {pred}", file=sys.stderr)
    return sel.cpu(), broken_all


def fold_part_files(tsv_path, radii, indices, certificate, radius, lower=False):
    """The per-process part files ``<tsv_path>.rank<r>`` left by an interrupted distributed
    evaluation, folded into ``tsv_path`` (whole batches only; atomically), then removed."""
    parts = sorted(glob.glob(glob.escape(tsv_path) + '.rank*'))
    if not parts:
        return
    header, rows = None, {}
    for path in ([tsv_path] if os.path.isfile(tsv_path) else []) + parts:
        with open(path) as f:
            if '\n' not in f.readline():
                continue        # killed before its header line was written: nothing in it
        h, kept, _ = resume_rows(path, radii, indices, certificate, radius, lower)
        header = header or h
        rows.update({row['idx']: row for row in kept})
    write_tsv(tsv_path, header, sorted(rows.values(), key=lambda q: q['idx']))
    for path in parts:
        os.remove(path)


def barrier(world):
    if world > 1:
        dist.barrier()


def batch_indices(loader):
    """The sample indices (as IndexedDataset gives them) of every batch of a sequential
    loader, without loading any image."""
    if isinstance(loader.sampler, torch.utils.data.RandomSampler):
        raise UserError("--resume needs a sequential test loader")

    def index(ds, i):
        while isinstance(ds, torch.utils.data.Subset):
            ds, i = ds.dataset, ds.indices[i]
        return int(i)
    return [[index(loader.dataset, i) for i in b] for b in loader.batch_sampler]
