"""Checkpoints: where they go, writing them atomically, and reading them safely (no file can
run code; a file that cannot be used is one UserError saying what it is)."""
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Optional

import torch

from locallip.errors import UserError
from locallip.models import model_tag


def checkpoint_base(prefix: str, model: str) -> str:
    """pretrained/<prefix>_<model> (an absolute prefix replaces pretrained/; a model given as
    an import path is named after its function)."""
    return os.path.join('pretrained', f"{prefix}_{model_tag(model)}")


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a killed run never leaves half a file."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def safe_load(path, map_location='cpu', what='checkpoint'):
    """torch.load with ``weights_only=True``: tensors, containers and plain Python values
    only, so that no code a file carries can run. A file that needs arbitrary unpickling is
    refused with a UserError naming the file and the object it asks for (a whole pickled
    nn.Module gets the advice to save its state_dict instead); bytes that are no checkpoint
    at all (random, text, another zip) are said to be that (``unreadable_file``)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():      # torch's note on a pickle protocol other than 2
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(unpicklable(path, what, e)) from None
    except Exception as e:     # truncated zip, not a torch file: one line, in words
        raise UserError(f"cannot read {what} {path}: {unreadable_file(path, e)}") from e


def unpicklable(path: str, what: str, error: Exception) -> str:
    """The one line for a file torch's safe unpickler stopped on: refused, naming the
    object, when it is a pickle that imports something outside the allowed types (code it
    would run); otherwise what the bytes are (random bytes, another format: not a checkpoint)."""
    imports = pickled_imports(_first_pickle(path))
    named = re.findall(r"GLOBAL ([\w.]+)", str(error))
    outside = named + [n for n in imports or [] if n not in _allowed_globals()]
    if imports is None or not outside:
        return f"cannot read {what} {path}: {unreadable_file(path, error)}"
    name = outside[0]
    if name.startswith('torch.nn.modules') or name.endswith(('Sequential', 'Module')):
        return (f"{path} holds a whole pickled module ({name}); refused: loading it would run "
                f"code from the file. Save the weights instead: "
                f"torch.save({{'state_dict': model.state_dict()}}, '{path}')")
    return (f"{path}: refused, loading it needs arbitrary unpickling ({name}); nothing in it "
            f"was run. A {what} holds tensors and plain Python values only")


def pickled_imports(data: bytes) -> Optional[list]:
    """The globals (module.name) the pickles at the start of ``data`` import, read from their
    opcodes with pickletools (nothing is run); None when ``data`` does not start with one
    complete pickle. A legacy torch file is several pickles in a row: all that parse count."""
    stream, names, complete = io.BytesIO(data), [], 0
    while stream.tell() < len(data):
        try:
            names += _imports_of_one_pickle(stream)
        except ValueError:      # an unknown opcode or an argument cut short: no pickle (more)
            break
        complete += 1
    return names if complete else None


def _imports_of_one_pickle(stream) -> list:
    names, strings = [], []
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ('GLOBAL', 'INST'):
            names.append(arg.replace(' ', '.'))
        elif op.name == 'STACK_GLOBAL':          # module and name: the last two strings
            names.append('.'.join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return names


def _first_pickle(path: str) -> bytes:
    """What torch.load unpickles first: a zip checkpoint's data.pkl, else the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = _data_pkl(z)
            return z.read(name) if name else b''
    with open(path, 'rb') as f:
        return f.read()


def _data_pkl(archive: zipfile.ZipFile) -> Optional[str]:
    """The name of the data.pkl torch.save writes in its zip archive (None: none there)."""
    return next((n for n in archive.namelist() if n.endswith('data.pkl')), None)


def _other_zip(path: str) -> Optional[list]:
    """The names in a zip archive without torch.save's data.pkl (None: not such a zip)."""
    with zipfile.ZipFile(path) as z:
        return None if _data_pkl(z) else z.namelist()


def _allowed_globals() -> set:
    """What torch's weights_only unpickler accepts (its allowlist and add_safe_globals'); a
    torch without these private helpers: nothing, so that any import counts as code."""
    from torch import _weights_only_unpickler as w
    return (set(getattr(w, '_get_allowed_globals', dict)())
            | set(getattr(w, '_get_user_allowed_globals', dict)()))


ZIP_MAGIC = b'PK\x03\x04'       # torch.save's format since PyTorch 1.6 is a zip archive
PICKLE_MAGIC = b'\x80'           # the legacy format starts with a pickle protocol opcode


def unreadable_file(path: str, error: Exception) -> str:
    """What a file torch.load could not read is, in words: empty, cut short (a zip archive
    without its end: a write that did not finish), or not a PyTorch checkpoint at all (random
    bytes, text, a zip archive of something else)."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(len(ZIP_MAGIC))
    if size == 0:
        return "the file is empty (0 bytes)"
    if head == ZIP_MAGIC and not zipfile.is_zipfile(path):
        return (f"cut short at {size} bytes (a zip archive, torch.save's format, without its "
                f"end: the write did not finish or the copy is incomplete)")
    held = _other_zip(path) if head == ZIP_MAGIC else None
    if held is not None:
        return (f"not a PyTorch checkpoint (a {size}-byte zip archive without the data.pkl "
                f"torch.save writes; it holds {', '.join(held[:3]) or 'nothing'}"
                f"{', ...' if len(held) > 3 else ''})")
    if head.startswith(PICKLE_MAGIC) and (isinstance(error, EOFError) or 'EOF' in str(error)):
        return f"cut short at {size} bytes (a legacy PyTorch pickle that ends early)"
    if head != ZIP_MAGIC and (not head.startswith(PICKLE_MAGIC)
                              or pickled_imports(_first_pickle(path)) is None):
        return (f"not a PyTorch checkpoint ({size} bytes that are neither a zip archive, "
                f"torch.save's format, nor a legacy pickle)")
    text = str(error).split('WeightsUnpickler error:')[-1].strip()   # torch's own words
    first = text.splitlines()[0] if text else type(error).__name__
    return f"a {size}-byte PyTorch file that does not load ({first})"


def saved_model_path(saved_model: str) -> str:
    """The checkpoint ``--saved_model`` names: ``P_best.pth`` for the reference's prefix P,
    or P itself when that file exists and P_best.pth does not."""
    best = saved_model + '_best.pth'
    if os.path.isfile(best) or not os.path.isfile(saved_model):
        if not os.path.isfile(best):
            raise UserError(f"checkpoint not found: {best} (--saved_model P loads P_best.pth, "
                            f"as the reference does, or P itself when P is a file; no file "
                            f"{saved_model} either)")
        return best
    return saved_model


def load_checkpoint(path, model, device='cpu'):
    """Load a checkpoint {'state_dict', ...} (or a bare state_dict) into ``model`` with
    ``safe_load``; clear UserError on a refused file or a mismatch."""
    ckpt = safe_load(path, device)
    state = ckpt['state_dict'] if isinstance(ckpt, dict) and 'state_dict' in ckpt else ckpt
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} holds no state_dict (a {type(ckpt).__name__}"
                        + (f" with keys {sorted(map(str, ckpt))[:5]}" if isinstance(ckpt, dict) else "")
                        + "); expected {'state_dict': ..., 'epoch': ..., 'err': ...}")
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    extra = [k for k in state if k not in mine]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in mine.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if extra:
            parts.append(f"unexpected keys {extra[:5]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise UserError(f"{path} does not match the model: " + "; ".join(parts)
                        + " (check --data and --model)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path} holds NaN or infinite weights in {bad[:5]} (a diverged run?)")
    model.load_state_dict(state)
    return ckpt
