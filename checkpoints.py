"""Checkpoints: where they go, writing them atomically, and reading them safely (no file can
run code; a file that cannot be used is one UserError saying what it is)."""
import os
import pickle
import re
import zipfile

import torch

from errors import UserError
from models import model_tag


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
    nn.Module gets the advice to save its state_dict instead)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        name = found[0] if found else 'an object outside the allowed types'
        if name.startswith('torch.nn.modules') or name.endswith(('Sequential', 'Module')):
            raise UserError(f"{path} holds a whole pickled module ({name}); refused: loading "
                            f"it would run code from the file. Save the weights instead: "
                            f"torch.save({{'state_dict': model.state_dict()}}, '{path}')") from None
        raise UserError(f"{path}: refused, loading it needs arbitrary unpickling ({name}); "
                        f"nothing in it was run. A {what} holds tensors and plain Python "
                        f"values only") from None
    except Exception as e:     # truncated zip, not a torch file: one line, in words
        raise UserError(f"cannot read {what} {path}: {unreadable_file(path, e)}") from e


ZIP_MAGIC = b'PK\x03\x04'       # torch.save's format since PyTorch 1.6 is a zip archive
PICKLE_MAGIC = b'\x80'           # the legacy format starts with a pickle protocol opcode


def unreadable_file(path: str, error: Exception) -> str:
    """What a file torch.load could not read is, in words: empty, cut short (a zip archive
    without its end: a write that did not finish), or not a PyTorch checkpoint at all."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(len(ZIP_MAGIC))
    if size == 0:
        return "the file is empty (0 bytes)"
    if head == ZIP_MAGIC and not zipfile.is_zipfile(path):
        return (f"cut short at {size} bytes (a zip archive, torch.save's format, without its "
                f"end: the write did not finish or the copy is incomplete)")
    if head.startswith(PICKLE_MAGIC) and (isinstance(error, EOFError) or 'EOF' in str(error)):
        return f"cut short at {size} bytes (a legacy PyTorch pickle that ends early)"
    if head != ZIP_MAGIC and not head.startswith(PICKLE_MAGIC):
        return (f"not a PyTorch checkpoint ({size} bytes that are neither a zip archive, "
                f"torch.save's format, nor a legacy pickle)")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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
