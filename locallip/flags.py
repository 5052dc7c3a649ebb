"""The command line's parsed flags (a namespace of the clone's utils.argparser) turned into
the library's settings: the one place below the entry scripts where the evaluation and the
step read flags by name. The flags' defaults (utils.py) are the only ones: the settings
have none of their own."""
from dataclasses import fields

from locallip.evaluation import EvalSettings
from locallip.step import StepSettings


def eval_settings(args, **changes) -> EvalSettings:
    """The EvalSettings of the flags in ``args`` (a namespace of utils.argparser; the fields
    are named after them; the radii are --epsilon's, heartbeat lines follow --verbose), with
    ``changes`` on top."""
    names = {f.name for f in fields(EvalSettings)} - {'radii', 'heartbeat'}
    values = {k: getattr(args, k) for k in names}
    values.update(radii=list(args.radii), heartbeat=bool(args.verbose))
    return EvalSettings(**dict(values, **changes))


def step_settings(args) -> StepSettings:
    """The StepSettings of the training flags in ``args``."""
    return StepSettings(args.sniter, args.opt_iter, args.bound, args.pi_grad, args.estimate,
                        args.gloro, args.sparse, args.sp_thres, args.compile)
